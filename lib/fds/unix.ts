/**
 * Unix sockets. Dump reads each socket from unix_diag (type, state, name,
 * peer) and peeks its receive queue without consuming it. Restore brings
 * back:
 * - connected pairs whose both ends are in the tree (socketpair, or an
 *   accepted connection), recreated with socketpair in the first holder,
 *   the other end parked for its holder as pipes are; each end's queued
 *   bytes or messages are sent again through its peer, and the shutdown
 *   state is applied once both queues are full;
 * - listening sockets and bound or unbound unconnected ones, bound again
 *   to the same path (owner and mode kept) or abstract name;
 * - connections still waiting in a listener's backlog (connect()ed, not
 *   yet accept()ed) whose client end is in the tree: the client's socket
 *   is connected to the restored listener again, so accept() returns it,
 *   and what the client had sent is sent again from it (see takeBacklog).
 * - a socket whose peer is outside the tree (a supervisor, /dev/log): with
 *   `dump --external unix[INO]` it is recorded as external and restore puts
 *   amber's own descriptor given by `--inherit-fd fd[N]:socket:[INO]` in its
 *   place; with `dump --ext-unix-sk`, when that peer has a name, restore
 *   connects a new socket to the name again (see outsideEntry).
 * Anything else (a peer outside the tree otherwise, descriptors or
 * credentials in a queue) is refused.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { type UnixSocketInfo, unixSockets } from "../../ffi/sockdiag.ts";
import {
  acceptWaiting,
  getIntOption,
  hasOobByte,
  type PeekedQueue,
  peekQueue,
  setIntOption,
  SO,
  takeFd,
} from "../../ffi/socket.ts";
import { libc } from "../../ffi/libc.ts";
import { writeMemory } from "../../ffi/memory.ts";
import {
  type FdPlace,
  kindState,
  type PrecheckContext,
  type RestoreContext,
  type TreeDumpState,
} from "../context.ts";
import { AmberError } from "../errors.ts";
import type { ImageDir } from "../images/dir.ts";
import { bytes, defineImage } from "../images/codec.ts";
import { readProcText } from "../proc/read.ts";
import { getBytes, putBytes } from "../scratch.ts";
import { fetchFd, parkFd } from "./fetch.ts";
import { defineFdKind, type FdProbe, O_CLOEXEC } from "./kind.ts";
import { holdersOf, tracedByAmber } from "./holders.ts";
import { givenFor, takeInherited } from "./inherit.ts";

const LINK = /^socket:\[(\d+)\]$/;
const AF_UNIX = 1;
const STATE = { CONNECTED: 1, UNCONNECTED: 7, LISTEN: 10 } as const;
const TYPES: Record<number, string> = { 1: "stream", 2: "datagram", 5: "seqpacket" };
const O_NONBLOCK = 0o4000, F_SETFL = 4;
const MSG_DONTWAIT = 0x40;
/** Most queued bytes amber keeps for one socket. */
const QUEUE_LIMIT = 64 * 1024 * 1024;
/** Largest queued datagram amber sends again (half of restore's scratch area). */
const MAX_MESSAGE = 32 * 1024;

const UnixEntry = z.object({
  kind: z.literal("unix"),
  fd: z.number().int().min(0),
  flags: z.number().int().min(0),
  ino: z.number().int().min(0),
  type: z.union([z.literal(1), z.literal(2), z.literal(5)]),
  state: z.number().int().min(0).max(255),
  /** The bound address: a path, or an abstract name (first byte 0). */
  name: bytes.refine((b) => b.length <= 108, "socket name longer than 108 bytes").optional(),
  /** Owner and mode of the socket file of a path name. */
  file: z.object({
    ino: z.number().int(),
    mode: z.number().int(),
    uid: z.number().int(),
    gid: z.number().int(),
  }).optional(),
  peer: z.number().int().min(0).optional(),
  /**
   * A stream connection whose peer is closed (the kernel shows peer 0): what
   * the peer sent before it closed still waits in `queue`, then end of file.
   */
  peerClosed: z.boolean().optional(),
  /**
   * A client whose connection waits in a listener's backlog: connected to
   * that listener's name again at restore; `queued` when it had sent data
   * (kept in the backlog image).
   */
  inflight: z.object({
    listener: z.number().int().min(0),
    name: bytes.refine((b) => b.length > 0 && b.length <= 108, "bad listener name"),
    backlog: z.number().int().min(0).max(0x7fffffff),
    queued: z.boolean(),
  }).optional(),
  backlog: z.number().int().min(0).optional(),
  shutdown: z.number().int().min(0).max(3),
  /** What waits in this socket's receive queue: bytes of a stream, messages otherwise. */
  queue: z.array(bytes).max(65536),
  sndbuf: z.number().int(),
  rcvbuf: z.number().int(),
  passcred: z.boolean(),
  /** Its peer is outside the tree (--external): restore needs --inherit-fd fd[N]:socket:[INO]. */
  external: z.boolean().optional(),
  /** Its peer is outside the tree and has this name (--ext-unix-sk): connected to again. */
  reconnect: bytes.refine((b) => b.length > 0 && b.length <= 108, "bad peer name").optional(),
  /** Why it cannot be restored, when it cannot (seen at dump). */
  refusal: z.string().optional(),
});
type UnixImage = z.output<typeof UnixEntry>;

/**
 * What the clients of connections waiting in a backlog had sent, read by
 * a dump that ends the tree (the only way to read it is to accept the
 * connection), by client socket inode.
 */
const backlogImage = defineImage(
  "backlog",
  1,
  false,
  z.object({
    queues: z.array(z.object({
      client: z.number().int().min(0),
      messages: z.array(bytes).max(65536),
    })).max(65536),
  }).refine(
    (b) => b.queues.every((q) => q.messages.reduce((n, m) => n + m.length, 0) <= QUEUE_LIMIT),
    `a queue larger than ${QUEUE_LIMIT} bytes`,
  ),
);
type BacklogImage = z.output<typeof backlogImage.schema>;

function inode(link: string): number | undefined {
  const m = LINK.exec(link);
  return m ? Number(m[1]) : undefined;
}

/** unix_diag's view of the tree's sockets, taken once per dump (the tree is frozen). */
function socketsOf(tree: TreeDumpState): Map<number, UnixSocketInfo> {
  return kindState(tree.kinds, "unix", unixSockets);
}

/** The path of a filesystem name; undefined for none or an abstract one (first byte 0). */
function pathName(name?: Uint8Array): string | undefined {
  if (!name?.length || name[0] === 0) return undefined;
  let end = name.length;
  while (end > 0 && name[end - 1] === 0) end--;
  return new TextDecoder().decode(name.subarray(0, end));
}

function displayName(name?: Uint8Array): string {
  if (!name?.length) return "unnamed";
  return pathName(name) ?? `@${new TextDecoder().decode(name.subarray(1))}`;
}

function describe(e: { ino: number; type: number; name?: Uint8Array }): string {
  return `unix ${TYPES[e.type] ?? e.type} socket:[${e.ino}] (${displayName(e.name)})`;
}

/** Why this socket cannot be brought back, judged from what unix_diag shows. */
function refusalOf(p: FdProbe, s: UnixSocketInfo): string | undefined {
  const sockets = socketsOf(p.tree);
  if (s.state === STATE.LISTEN) {
    const why = backlogRefusal(p, s);
    if (why) return why;
  } else if (s.state === STATE.CONNECTED && clientsWaiting(p.tree).has(s.ino)) {
    const listener = clientsWaiting(p.tree).get(s.ino)!;
    if (!listener.name?.length) return "its listener has no name: not supported yet";
    if (pathName(listener.name)?.startsWith("/") === false) {
      return "its listener is bound to a relative path: not supported yet";
    }
    if (s.wqueue > 0 && p.tree.options.leaveRunning) return untakable(s.ino);
  } else if (s.state === STATE.CONNECTED) {
    // A stream's peer is checked against the tree (notePeer); a datagram
    // socket may be connected one way only, to a receiver bound elsewhere.
    const peer = s.peer === undefined ? undefined : sockets.get(s.peer);
    if (s.type === 2 && peer?.peer !== s.ino) {
      return `datagram socket connected to socket:[${s.peer}] one way: not supported yet ` +
        "(dump --ext-unix-sk connects to its name again)";
    }
  } else if (s.state !== STATE.UNCONNECTED) {
    return `in state ${s.state} (connecting or closing): not supported yet`;
  } else if (s.rqueue && s.type === 2) {
    return "datagrams from unnamed senders are queued: not supported yet";
  }
  if (pathName(s.name)?.startsWith("/") === false) {
    return "bound to a relative path: not supported yet";
  }
}

/**
 * Why the listener's backlog cannot come back, if it cannot: each
 * connection waiting in it must have its client end (SCM_RIGHTS in what
 * it sent are refused; the listener's fdinfo counts them) and data a
 * client sent can be kept only by a dump that ends the tree.
 */
function backlogRefusal(p: FdProbe, s: UnixSocketInfo): string | undefined {
  if (!s.pending.length) return;
  if (s.pending.includes(0)) {
    return "a connection waiting to be accepted whose client has closed its end: not supported yet";
  }
  const info = readProcText(p.pid, `fdinfo/${p.fd}`);
  const fds = Number(/^scm_fds:\s*(\d+)/m.exec(info)?.[1] ?? 0);
  if (fds) {
    return `connections waiting to be accepted carry ${fds} descriptor(s) (SCM_RIGHTS): ` +
      "not supported yet";
  }
  const sent = sentBy(p.tree, s);
  const big = sent.find((c) => socketsOf(p.tree).get(c)!.wqueue > QUEUE_LIMIT);
  if (big !== undefined) {
    return `the connection from socket:[${big}] waiting to be accepted has more than ` +
      `${QUEUE_LIMIT} bytes queued: not supported yet`;
  }
  if (sent.length && p.tree.options.leaveRunning) return untakable(sent[0]);
}

/** Why dump -R cannot keep what client `ino` sent on a connection waiting in a backlog. */
function untakable(ino: number): string {
  return `the connection from socket:[${ino}] waiting to be accepted has sent data, ` +
    "which amber can read only by accepting it, and nothing puts it back into the backlog " +
    "of a tree that runs on: dump without -R to keep it";
}

/** The clients, among those waiting in listener `s`'s backlog, that have sent data. */
function sentBy(tree: TreeDumpState, s: UnixSocketInfo): number[] {
  // Each message a client sent is charged to its send buffer until read.
  return s.pending.filter((c) => (socketsOf(tree).get(c)?.wqueue ?? 0) > 0);
}

/** Clients whose connection waits in a backlog, by inode, with their listener. */
function clientsWaiting(tree: TreeDumpState): Map<number, UnixSocketInfo> {
  return kindState(tree.kinds, "unix clients waiting", () => {
    const out = new Map<number, UnixSocketInfo>();
    for (const s of socketsOf(tree).values()) {
      if (s.state === STATE.LISTEN) { for (const c of s.pending) if (c) out.set(c, s); }
    }
    return out;
  });
}

/**
 * Notes that the tree holds socket `ino`, and that each of `others` must
 * be in the tree too (unless seen already); what is still missing at the
 * end of the dump refuses the images.
 */
function noteSeen(tree: TreeDumpState, ino: number, others: { ino: number; why: string }[]): void {
  tree.seen.add(`unix:${ino}`);
  tree.pending.delete(`unix:${ino}`);
  for (const o of others) {
    if (!tree.seen.has(`unix:${o.ino}`)) tree.pending.set(`unix:${o.ino}`, o.why);
  }
}

/** What a socket's entry needs of the tree: its peer, its listener, its backlog's clients. */
function noteRelations(tree: TreeDumpState, e: z.input<typeof UnixEntry>, label: string): void {
  const outside = "held outside the dumped tree";
  const others = e.peer !== undefined
    ? [{
      ino: e.peer,
      why: `${label}: its peer socket:[${e.peer}] is ${outside} ` +
        "(a supervisor, /dev/log, a client?): not supported yet " +
        `(dump --external unix[${e.ino}] records it as external; --ext-unix-sk connects ` +
        "to the peer's name again)",
    }]
    : e.inflight
    ? [{
      ino: e.inflight.listener,
      why: `${label}: it is connecting to socket:[${e.inflight.listener}], ${outside}: ` +
        "not supported yet",
    }]
    : (socketsOf(tree).get(e.ino)?.pending ?? []).filter((c) => c).map((c) => ({
      ino: c,
      why: `${label}: a connection waiting in its backlog comes from socket:[${c}], ${outside}: ` +
        "not supported yet",
    }));
  noteSeen(
    tree,
    e.ino,
    e.state === STATE.LISTEN || e.peer !== undefined || e.inflight ? others : [],
  );
}

/** What a dump that ends the tree takes from backlogs before its images are final. */
interface BacklogTaking {
  /** Listeners whose backlog is taken (one step each, however many holders). */
  listeners: Set<number>;
  /** The connections amber accepted: held until the tree's end, then closed. */
  accepted: number[];
  image: BacklogImage;
}

function backlogTaking(tree: TreeDumpState): BacklogTaking {
  return kindState(tree.kinds, "unix backlog", () => {
    const st: BacklogTaking = { listeners: new Set(), accepted: [], image: { queues: [] } };
    tree.onEnd.push(() => {
      for (const fd of st.accepted.splice(0)) libc().close(fd);
    });
    return st;
  });
}

/**
 * Data a client sent on a connection still waiting in the backlog sits in
 * the receive queue of the listener's embryo socket, which nothing shows
 * but accept(). So a dump that ends the tree accepts, from a duplicate of
 * the listener, every waiting connection up to the last one with data (in
 * backlog order, the order accept takes them), and peeks each one's queue.
 * That cannot be undone (nothing puts a connection back into a backlog,
 * and the client end stays connected to the socket amber took), so it is
 * done only once the dump's verdict is clean, with no interruption point
 * left before the images are final (lib/dump.ts beforeCommit): a dump that
 * fails or is refused earlier never takes anything. Only failing to write
 * or publish the last images after this (or amber killed by SIGKILL in
 * that window) would resume the tree with those connections taken (their
 * clients then see them closed). A dump -R refuses such a backlog instead
 * (backlogRefusal).
 */
function takeBacklog(
  dir: ImageDir,
  st: BacklogTaking,
  from: { pid: number; fd: number; label: string },
  s: UnixSocketInfo,
  sent: number[],
): void {
  const count = Math.max(...sent.map((c) => s.pending.indexOf(c))) + 1;
  const sock = takeFd(from.pid, from.fd);
  const taken: number[] = [];
  try {
    for (let i = 0; i < count; i++) {
      const conn = acceptWaiting(sock);
      if (conn === undefined) {
        throw new AmberError(`${from.label}: backlog: connection ${i + 1} of ${count} is gone`);
      }
      taken.push(conn);
      st.accepted.push(conn);
    }
  } finally {
    libc().close(sock);
  }
  const now = unixSockets();
  for (const [i, conn] of taken.entries()) {
    const client = s.pending[i];
    const ino = inode(Deno.readLinkSync(`/proc/self/fd/${conn}`));
    if (ino === undefined || now.get(ino)?.peer !== client) {
      throw new AmberError(
        `${from.label}: backlog: connection ${i + 1} is not socket:[${client}]'s`,
      );
    }
    // Each message's credentials are its sender's, the client: they come
    // back by sending it again from the restored client.
    setIntOption(conn, SO.PASSCRED, 0);
    setIntOption(conn, SO.PASSSEC, 0);
    const q = peekQueue(conn, s.type, QUEUE_LIMIT);
    // Only accepting shows these; the dump then fails rather than change them.
    if (q.ancillary) {
      throw new AmberError(`${from.label}: socket:[${client}] sent ancillary data: not supported`);
    }
    if (s.type === 1 && hasOobByte(conn)) {
      throw new AmberError(
        `${from.label}: socket:[${client}] sent an out-of-band byte (MSG_OOB): not supported`,
      );
    }
    if (sent.includes(client)) st.image.queues.push({ client, messages: q.messages });
  }
  dir.write(backlogImage, st.image);
}

/** Arranges, once per listener, for its backlog's data to be taken before the images are final. */
function planTaking(p: FdProbe, s: UnixSocketInfo, label: string): void {
  const sent = sentBy(p.tree, s);
  const st = backlogTaking(p.tree);
  if (!sent.length || p.tree.options.leaveRunning || st.listeners.has(s.ino)) return;
  st.listeners.add(s.ino);
  const from = { pid: p.pid, fd: p.fd, label };
  p.tree.beforeCommit.push((dir) => takeBacklog(dir, st, from, s, sent));
}

function socketFile(name: Uint8Array | undefined): UnixImage["file"] {
  const path = pathName(name);
  if (!path) return undefined;
  try {
    const st = Deno.lstatSync(path);
    return { ino: st.ino ?? 0, mode: (st.mode ?? 0) & 0o7777, uid: st.uid ?? 0, gid: st.gid ?? 0 };
  } catch {
    return undefined; // unlinked since bind: restored bound again all the same
  }
}

/** A queue amber could not keep whole. */
function queueRefusal(s: UnixSocketInfo, q: PeekedQueue, oob: boolean): string | undefined {
  if (oob) return "an out-of-band byte (MSG_OOB) waits in its queue: not supported yet";
  if (q.ancillary) {
    return "its queue carries descriptors or credentials (SCM_RIGHTS): not supported yet";
  }
  if (s.type !== 1 && q.messages.some((m) => m.length > MAX_MESSAGE)) {
    return `a queued message is larger than ${MAX_MESSAGE} bytes: not supported yet`;
  }
  const total = q.messages.reduce((n, m) => n + m.length, 0);
  if (total >= QUEUE_LIMIT) return `more than ${QUEUE_LIMIT} bytes are queued: not supported yet`;
}

function dumpSocket(p: FdProbe, s: UnixSocketInfo): z.input<typeof UnixEntry> {
  const sock = takeFd(p.pid, p.fd);
  try {
    const refusal = refusalOf(p, s);
    const listener = s.state === STATE.CONNECTED ? clientsWaiting(p.tree).get(s.ino) : undefined;
    const queued = refusal || s.state === STATE.LISTEN
      ? { messages: [], ancillary: false }
      : peekQueue(sock, s.type, QUEUE_LIMIT);
    return {
      kind: "unix" as const,
      fd: p.fd,
      flags: p.flags,
      ino: s.ino,
      type: s.type as 1 | 2 | 5,
      state: s.state,
      name: s.name?.length ? s.name : undefined,
      file: socketFile(s.name),
      peer: s.state === STATE.CONNECTED && !listener && !closedPeer(s) ? s.peer : undefined,
      peerClosed: closedPeer(s) || undefined,
      inflight: listener && {
        listener: listener.ino,
        name: listener.name ?? new Uint8Array(),
        backlog: listener.wqueue,
        queued: s.wqueue > 0,
      },
      backlog: s.state === STATE.LISTEN ? s.wqueue : undefined,
      shutdown: s.shutdown & 3,
      queue: queued.messages,
      sndbuf: getIntOption(sock, SO.SNDBUF),
      rcvbuf: getIntOption(sock, SO.RCVBUF),
      passcred: getIntOption(sock, SO.PASSCRED) !== 0,
      refusal: refusal ??
        queueRefusal(s, queued, s.type === 1 && s.state === STATE.CONNECTED && hasOobByte(sock)),
    };
  } finally {
    libc().close(sock);
  }
}

/**
 * A connected stream whose peer socket was released: the kernel keeps the
 * dead peer, whose inode is gone (0), e.g. a server's accepted connection
 * whose client exited before the server read its last bytes.
 */
function closedPeer(s: UnixSocketInfo): boolean {
  return s.state === STATE.CONNECTED && s.type !== 2 && s.peer === 0;
}

/** sockaddr_un for a name (a path gets its terminating NUL). */
function sockaddr(name: Uint8Array): Uint8Array {
  const path = pathName(name);
  const raw = path === undefined ? name : new TextEncoder().encode(path + "\0");
  const addr = new Uint8Array(2 + raw.length);
  addr[0] = AF_UNIX;
  addr.set(raw, 2);
  return addr;
}

/** Sends what was queued through `via`, so it waits in its peer's receive queue again. */
function refill(ctx: RestoreContext, via: number, e: UnixImage): void {
  sendQueued(ctx, via, e.type, e.queue);
}

/**
 * Sends `messages` from `via`: a stream's bytes in scratch-sized pieces, a
 * message in one send (through a mapping of its size when it is larger).
 */
function sendQueued(ctx: RestoreContext, via: number, type: number, messages: Uint8Array[]) {
  const chunk = ctx.scratch.size / 2;
  // A stream's bytes may be cut anywhere; a message goes in one send.
  const parts = type === 1
    ? messages.flatMap((m) =>
      Array.from(
        { length: Math.ceil(m.length / chunk) },
        (_, i) => m.subarray(i * chunk, (i + 1) * chunk),
      )
    )
    : messages;
  const largest = parts.reduce((n, m) => Math.max(n, m.length), 0);
  const inj = ctx.injector;
  const size = Math.ceil(largest / 4096) * 4096;
  // MAP_PRIVATE | MAP_ANONYMOUS, read and write
  const big = largest > chunk ? inj.call("mmap", NR.mmap, 0, size, 3, 0x22, -1, 0) : undefined;
  try {
    for (const part of parts) {
      let at: bigint;
      if (big === undefined) at = putBytes(ctx.pid, ctx.scratch, part);
      else writeMemory(ctx.pid, at = big, part);
      const n = inj.call("send", NR.sendto, via, at, part.length, MSG_DONTWAIT, 0, 0);
      if (Number(n) !== part.length) throw new AmberError(`queue refill: ${n} of ${part.length}`);
    }
  } finally {
    if (big !== undefined) inj.call("munmap", NR.munmap, big, size);
  }
}

/** Socket options and descriptor flags of the image, on a fresh socket. */
function applyOptions(ctx: RestoreContext, fd: number, e: UnixImage): void {
  const inj = ctx.injector;
  const setInt = (option: number, value: number) =>
    inj.call(`setsockopt(${option})`, NR.setsockopt, fd, 1, option, putIntArg(ctx, value), 4);
  // The kernel doubles what it is given; set only what differs from a fresh socket's.
  if (getIntArg(ctx, fd, SO.SNDBUF) !== e.sndbuf) setInt(SO.SNDBUF, e.sndbuf >> 1);
  if (getIntArg(ctx, fd, SO.RCVBUF) !== e.rcvbuf) setInt(SO.RCVBUF, e.rcvbuf >> 1);
  if (e.passcred) setInt(SO.PASSCRED, 1);
  if (e.flags & O_NONBLOCK) inj.call("fcntl(F_SETFL)", NR.fcntl, fd, F_SETFL, O_NONBLOCK);
}

function putIntArg(ctx: RestoreContext, value: number): bigint {
  return putBytes(ctx.pid, ctx.scratch, new Uint8Array(new Int32Array([value]).buffer), 4096);
}

function getIntArg(ctx: RestoreContext, fd: number, option: number): number {
  const val = putBytes(ctx.pid, ctx.scratch, new Uint8Array(8), 4096);
  const len = putBytes(ctx.pid, ctx.scratch, new Uint8Array(new Uint32Array([4]).buffer), 4104);
  ctx.injector.call(`getsockopt(${option})`, NR.getsockopt, fd, 1, option, val, len);
  return new Int32Array(getBytes(ctx.pid, ctx.scratch, 4, 4096).slice().buffer)[0];
}

/** Where each socket of the tree is once created, by inode. */
function placesOf(ctx: RestoreContext): Map<number, FdPlace> {
  return kindState(ctx.tree.kinds, "unix", () => new Map<number, FdPlace>());
}

/**
 * A socketpair in this process: this socket's end (its options set, its
 * queue refilled through the other end) and the other end; noted as made.
 */
function makePair(ctx: RestoreContext, e: UnixImage): [number, number] {
  const at = putBytes(ctx.pid, ctx.scratch, new Uint8Array(8));
  ctx.injector.call("socketpair", NR.socketpair, AF_UNIX, e.type | O_CLOEXEC, 0, at);
  const [mine, other] = new Int32Array(getBytes(ctx.pid, ctx.scratch, 8).slice().buffer);
  applyOptions(ctx, mine, e);
  refill(ctx, other, e);
  placesOf(ctx).set(e.ino, { pid: ctx.pid, fd: e.fd });
  return [mine, other];
}

/** The first end of a pair: socketpair here, the peer end parked for its holder. */
function createPair(ctx: RestoreContext, e: UnixImage): number {
  const [mine, other] = makePair(ctx, e);
  const parked = { pid: ctx.pid, fd: parkFd(ctx, other) };
  ctx.tree.parked.push(parked);
  placesOf(ctx).set(e.peer!, parked);
  return mine;
}

/** A stream whose peer closed: a socketpair whose other end, once it refilled the queue, closes. */
function createWithClosedPeer(ctx: RestoreContext, e: UnixImage): number {
  const [mine, other] = makePair(ctx, e);
  ctx.injector.call("close the closed peer", NR.close, other);
  return mine;
}

/** The second end: taken from where the first left it, its queue refilled through the first. */
function takePairEnd(ctx: RestoreContext, e: UnixImage, from: FdPlace): number {
  const mine = fetchFd(ctx, from);
  applyOptions(ctx, mine, e);
  const peer = fetchFd(ctx, placesOf(ctx).get(e.peer!)!);
  refill(ctx, peer, e);
  ctx.injector.call("close", NR.close, peer);
  // Both queues are full now; shutdown sets the peer's side too.
  const how = [-1, 0, 1, 2][e.shutdown];
  if (how >= 0) ctx.injector.call("shutdown", NR.shutdown, mine, how);
  return mine;
}

/** A listening or unconnected socket, bound again to its name. */
function createBound(ctx: RestoreContext, e: UnixImage): number {
  const inj = ctx.injector;
  const early = e.state === STATE.LISTEN ? backlogRestore(ctx).early.get(e.ino) : undefined;
  if (early) {
    // Made by a client restored before it: listen again, so the
    // connections to come get this process's credentials.
    const fd = fetchFd(ctx, early);
    applyOptions(ctx, fd, e);
    ownSocketFile(e);
    inj.call("listen", NR.listen, fd, e.backlog ?? 128);
    return fd;
  }
  const fd = Number(inj.call("socket", NR.socket, AF_UNIX, e.type | O_CLOEXEC, 0));
  applyOptions(ctx, fd, e);
  if (e.name) bindName(ctx, fd, e.name);
  ownSocketFile(e);
  if (e.state === STATE.LISTEN) inj.call("listen", NR.listen, fd, e.backlog ?? 128);
  return fd;
}

function bindName(ctx: RestoreContext, fd: number, name: Uint8Array): void {
  const path = pathName(name);
  if (path) removeStaleSocket(path);
  const addr = sockaddr(name);
  ctx.injector.call(
    `bind ${displayName(name)}`,
    NR.bind,
    fd,
    putBytes(ctx.pid, ctx.scratch, addr),
    addr.length,
  );
}

/** The socket file of a path name gets its owner and mode. */
function ownSocketFile(e: UnixImage): void {
  const path = pathName(e.name);
  if (e.file && path) {
    Deno.chownSync(path, e.file.uid, e.file.gid);
    Deno.chmodSync(path, e.file.mode);
  }
}

/** What restore keeps for connections waiting in a backlog. */
interface BacklogRestore {
  /** Listeners created so far, by inode. */
  listening: Set<number>;
  /** Listeners a client restored before them made, parked for their holder, by inode. */
  early: Map<number, FdPlace>;
}

function backlogRestore(ctx: RestoreContext): BacklogRestore {
  return kindState(
    ctx.tree.kinds,
    "unix backlog",
    () => ({ listening: new Set(), early: new Map() }),
  );
}

/** What client `e` had sent, from the backlog image. */
function sentData(dir: ImageDir, e: UnixImage): Uint8Array[] {
  if (!e.inflight?.queued) return [];
  if (!dir.has("backlog.cbor")) {
    throw new AmberError(`${describe(e)}: what it sent is not in the images (backlog.cbor)`);
  }
  const q = dir.read(backlogImage).queues.find((q) => q.client === e.ino);
  if (!q) throw new AmberError(`${describe(e)}: what it sent is not in backlog.cbor`);
  return q.messages;
}

/**
 * A client whose connection waited in a backlog: a socket of its own
 * (nonblocking until connected, so a full backlog fails rather than
 * waits), connected to its listener from this process, so the connection
 * has the client's credentials as it had. A listener not restored yet is
 * made here, bound and listening, and parked for its holder.
 */
function createWaitingClient(ctx: RestoreContext, e: UnixImage): number {
  const inj = ctx.injector;
  const fd = newClient(ctx, e);
  const st = backlogRestore(ctx);
  const listener = e.inflight!.listener;
  if (!st.listening.has(listener)) {
    const l = Number(inj.call("socket", NR.socket, AF_UNIX, e.type | O_CLOEXEC, 0));
    bindName(ctx, l, e.inflight!.name);
    inj.call("listen", NR.listen, l, e.inflight!.backlog);
    const parked = { pid: ctx.pid, fd: parkFd(ctx, l) };
    ctx.tree.parked.push(parked);
    st.early.set(listener, parked);
    st.listening.add(listener);
  }
  connectClient(ctx, fd, e);
  return fd;
}

/**
 * A client's new socket, nonblocking until connected (a full backlog then
 * fails rather than waits), bound to its own name again if it had one (a
 * client may bind before connecting).
 */
function newClient(ctx: RestoreContext, e: UnixImage): number {
  const inj = ctx.injector;
  const fd = Number(inj.call("socket", NR.socket, AF_UNIX, e.type | O_CLOEXEC | O_NONBLOCK, 0));
  applyOptions(ctx, fd, e);
  if (e.name) bindName(ctx, fd, e.name);
  ownSocketFile(e);
  return fd;
}

function connectName(ctx: RestoreContext, fd: number, name: Uint8Array): void {
  const addr = sockaddr(name);
  const at = putBytes(ctx.pid, ctx.scratch, addr);
  ctx.injector.call(`connect ${displayName(name)}`, NR.connect, fd, at, addr.length);
}

/** A connected client's shutdown state and file flags, as dumped. */
function finishClient(ctx: RestoreContext, fd: number, e: UnixImage): void {
  const how = [-1, 0, 1, 2][e.shutdown];
  if (how >= 0) ctx.injector.call("shutdown", NR.shutdown, fd, how);
  ctx.injector.call("fcntl(F_SETFL)", NR.fcntl, fd, F_SETFL, e.flags & O_NONBLOCK);
}

/** Connects client `e` to its listener, so it waits in the backlog again, and sends again what it had sent. */
function connectClient(ctx: RestoreContext, fd: number, e: UnixImage): void {
  connectName(ctx, fd, e.inflight!.name);
  sendQueued(ctx, fd, e.type, sentData(ctx.dir, e));
  finishClient(ctx, fd, e);
}

/** The backlog data a client needs is in the images (unless the dump has yet to write it). */
function checkSentData(e: UnixImage, ctx: PrecheckContext): void {
  if (e.inflight?.queued && !ctx.options.takenLater) sentData(ctx.dir, e);
}

/** The socket file the dumped process left behind: removed so the name can be bound again. */
function removeStaleSocket(path: string): void {
  try {
    if (Deno.lstatSync(path).isSocket) Deno.removeSync(path);
  } catch { /* not there */ }
}

/** How a socket whose peer is outside the tree is to come back, if the dump was told. */
function outsideMode(p: FdProbe, s: UnixSocketInfo): "external" | "reconnect" | undefined {
  const listed = p.tree.options.external ?? [];
  if (listed.includes(`socket:[${s.ino}]`) || listed.includes(`unix[${s.ino}]`)) return "external";
  if (!p.tree.options.extUnixSk || s.state !== STATE.CONNECTED || s.peer === undefined) return;
  if (clientsWaiting(p.tree).has(s.ino)) return; // its listener's backlog: restored as such
  const peer = socketsOf(p.tree).get(s.peer);
  if (!peer?.name?.length || peerInTree(p, s.peer)) return;
  return "reconnect";
}

/** Whether a process of the dumped tree holds socket `ino`. */
function peerInTree(p: FdProbe, ino: number): boolean {
  return holdersOf(p.tree, `socket:[${ino}]`).some((h) => tracedByAmber(h.pid));
}

/**
 * A socket whose peer is outside the tree. External (--external): amber's
 * own descriptor takes its place at restore. Reconnect (--ext-unix-sk): a
 * new socket is connected to the peer's name, the one the peer was bound
 * to (a stream connection's peer carries its listener's name), so a
 * datagram socket sends to the same receiver again, and a stream is a new
 * connection to the listener (its old connection ends with the dumped
 * tree: the peer reads what was sent, then end of file). What waits in the
 * socket's own receive queue would be lost either way, so it is refused.
 */
function outsideEntry(
  p: FdProbe,
  s: UnixSocketInfo,
  mode: "external" | "reconnect",
): z.input<typeof UnixEntry> {
  const e = dumpSocket(p, s);
  // Not peeked when refusalOf refused it (connected one way): unix_diag's count says.
  const queued = Math.max(s.rqueue, e.queue.reduce((n, m) => n + m.length, 0));
  const refusal = mode === "external" && s.peer !== undefined && peerInTree(p, s.peer)
    ? `listed with --external, but its peer socket:[${s.peer}] is in the tree`
    : s.pending.length
    ? `listed with --external, but ${s.pending.length} connection(s) wait in its backlog`
    : queued
    ? `${queued} bytes from its peer outside the tree wait in its queue and would be lost: ` +
      "not supported yet"
    : undefined;
  const peerName = mode === "reconnect" ? socketsOf(p.tree).get(s.peer!)!.name : undefined;
  noteSeen(p.tree, s.ino, []);
  return {
    ...e,
    peer: undefined,
    inflight: undefined,
    queue: [],
    ...(mode === "external" ? { external: true } : { reconnect: peerName }),
    refusal,
  };
}

/** amber's fd N must be there, a unix socket of the same type as the one it stands for. */
function checkInherited(ctx: PrecheckContext, e: UnixImage): void {
  const given = givenFor(ctx, `socket:[${e.ino}]`, describe(e));
  if (!given) return;
  const kind = inode(given.link) === undefined
    ? undefined
    : [getIntOption(given.fd, SO.DOMAIN), getIntOption(given.fd, SO.TYPE)];
  if (!kind || kind[0] !== AF_UNIX || kind[1] !== e.type) {
    throw new AmberError(
      `--inherit-fd fd[${given.fd}]: amber's fd ${given.fd} is ${given.link}, ` +
        `not a unix ${TYPES[e.type]} socket`,
    );
  }
}

/** amber's descriptor, taken into this process with the file flags of the image. */
function inheritSocket(ctx: RestoreContext, e: UnixImage): number {
  const fd = takeInherited(ctx, `socket:[${e.ino}]`);
  ctx.injector.call("fcntl(F_SETFL)", NR.fcntl, fd, F_SETFL, e.flags & O_NONBLOCK);
  return fd;
}

/** The peer's path must still be a socket to connect to (an abstract name is tried at restore). */
function checkPeerName(e: UnixImage): void {
  const path = pathName(e.reconnect);
  if (!path) return;
  let isSocket = false;
  try {
    isSocket = Deno.statSync(path).isSocket ?? false;
  } catch { /* gone */ }
  if (!isSocket) {
    throw new AmberError(
      `${describe(e)}: its peer's name ${path} is not a socket now: nothing to connect to again`,
    );
  }
}

/** A new socket connected to the outside peer's name. */
function reconnect(ctx: RestoreContext, e: UnixImage): number {
  const fd = newClient(ctx, e);
  connectName(ctx, fd, e.reconnect!);
  finishClient(ctx, fd, e);
  return fd;
}

export const unixFd = defineFdKind({
  name: "unix",
  schema: UnixEntry,
  matches: (p: FdProbe) => {
    const ino = inode(p.link);
    return ino !== undefined && socketsOf(p.tree).has(ino);
  },
  dump(p: FdProbe) {
    const s = socketsOf(p.tree).get(inode(p.link)!)!;
    const outside = outsideMode(p, s);
    if (outside) return outsideEntry(p, s, outside);
    const entry = dumpSocket(p, s);
    const label = `fd ${p.fd}: ${describe(entry)}`;
    noteRelations(p.tree, entry, label);
    if (s.state === STATE.LISTEN && !entry.refusal) planTaking(p, s, label);
    return entry;
  },
  unrestorable: (e) => e.refusal && `fd ${e.fd}: ${describe(e)}: ${e.refusal}`,
  // An abstract name is the network namespace's; a path name is the filesystem's.
  netnsBound: (e) => e.name?.length && e.name[0] === 0 ? describe(e) : undefined,
  precheck(e, ctx) {
    if (e.external) return checkInherited(ctx, e);
    if (e.reconnect) return checkPeerName(e);
    checkSentData(e, ctx);
    const path = pathName(e.name);
    if (!path || (e.state === STATE.CONNECTED && !e.inflight)) return;
    let st: Deno.FileInfo;
    try {
      st = Deno.lstatSync(path);
    } catch {
      return; // free: bound again at restore
    }
    if (!st.isSocket || (e.file && st.ino !== e.file.ino)) {
      throw new AmberError(
        `${describe(e)}: ${path} exists and is not the socket file the dump left; remove it first`,
      );
    }
  },
  restore(ctx, e) {
    if (e.external) return inheritSocket(ctx, e);
    if (e.reconnect) return reconnect(ctx, e);
    if (e.inflight) return createWaitingClient(ctx, e);
    if (e.state === STATE.LISTEN) {
      const fd = createBound(ctx, e);
      backlogRestore(ctx).listening.add(e.ino);
      return fd;
    }
    if (e.state !== STATE.CONNECTED) return createBound(ctx, e);
    if (e.peerClosed) return createWithClosedPeer(ctx, e);
    const known = placesOf(ctx).get(e.ino);
    return known ? takePairEnd(ctx, e, known) : createPair(ctx, e);
  },
});
