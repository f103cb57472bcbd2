/**
 * Unix sockets. Dump reads each socket from unix_diag (type, state, name,
 * peer) and peeks its receive queue without consuming it. Restore brings
 * back:
 * - connected pairs whose both ends are in the tree (socketpair, or an
 *   accepted connection), recreated with socketpair in the first holder,
 *   the other end parked for its holder as pipes are; each end's queued
 *   bytes or messages are sent again through its peer, and the shutdown
 *   state is applied once both queues are full;
 * - listening sockets (no connection waiting) and bound or unbound
 *   unconnected ones, bound again to the same path (owner and mode kept)
 *   or abstract name.
 * Anything else (a peer outside the tree, connections waiting in a
 * backlog, descriptors or credentials in a queue) is refused.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { type UnixSocketInfo, unixSockets } from "../../ffi/sockdiag.ts";
import { getIntOption, type PeekedQueue, peekQueue, SO, takeFd } from "../../ffi/socket.ts";
import { libc } from "../../ffi/libc.ts";
import { type FdPlace, kindState, type RestoreContext, type TreeDumpState } from "../context.ts";
import { AmberError } from "../errors.ts";
import { bytes } from "../images/codec.ts";
import { getBytes, putBytes } from "../scratch.ts";
import { fetchFd, parkFd } from "./fetch.ts";
import { defineFdKind, type FdProbe, O_CLOEXEC } from "./kind.ts";

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
  backlog: z.number().int().min(0).optional(),
  shutdown: z.number().int().min(0).max(3),
  /** What waits in this socket's receive queue: bytes of a stream, messages otherwise. */
  queue: z.array(bytes).max(65536),
  sndbuf: z.number().int(),
  rcvbuf: z.number().int(),
  passcred: z.boolean(),
  /** Why it cannot be restored, when it cannot (seen at dump). */
  refusal: z.string().optional(),
});
type UnixImage = z.output<typeof UnixEntry>;

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
function refusalOf(s: UnixSocketInfo, sockets: Map<number, UnixSocketInfo>): string | undefined {
  if (s.state === STATE.LISTEN) {
    if (s.pending.length) {
      return `${s.pending.length} connection(s) waiting to be accepted: not supported yet`;
    }
  } else if (s.state === STATE.CONNECTED) {
    // A stream's peer is checked against the tree (notePeer); a datagram
    // socket may be connected one way only, to a receiver bound elsewhere.
    const peer = s.peer === undefined ? undefined : sockets.get(s.peer);
    if (s.type === 2 && peer?.peer !== s.ino) {
      return `datagram socket connected to socket:[${s.peer}] one way: not supported yet`;
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
 * Notes that the tree holds socket `ino`, whose peer must be in the tree
 * too; what is still missing at the end of the dump refuses the images.
 */
function notePeer(tree: TreeDumpState, e: { ino: number; peer?: number }, label: string): void {
  tree.seen.add(`unix:${e.ino}`);
  tree.pending.delete(`unix:${e.ino}`);
  if (e.peer !== undefined && !tree.seen.has(`unix:${e.peer}`)) {
    tree.pending.set(
      `unix:${e.peer}`,
      `${label}: its peer socket:[${e.peer}] is held outside the dumped tree ` +
        "(a supervisor, /dev/log, a client?): not supported yet",
    );
  }
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
function queueRefusal(s: UnixSocketInfo, q: PeekedQueue): string | undefined {
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
    const refusal = refusalOf(s, socketsOf(p.tree));
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
      peer: s.state === STATE.CONNECTED ? s.peer : undefined,
      backlog: s.state === STATE.LISTEN ? s.wqueue : undefined,
      shutdown: s.shutdown & 3,
      queue: queued.messages,
      sndbuf: getIntOption(sock, SO.SNDBUF),
      rcvbuf: getIntOption(sock, SO.RCVBUF),
      passcred: getIntOption(sock, SO.PASSCRED) !== 0,
      refusal: refusal ?? queueRefusal(s, queued),
    };
  } finally {
    libc().close(sock);
  }
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
  const chunk = ctx.scratch.size / 2;
  // A stream's bytes may be cut anywhere; a message goes in one send.
  const parts = e.type === 1
    ? e.queue.flatMap((m) =>
      Array.from(
        { length: Math.ceil(m.length / chunk) },
        (_, i) => m.subarray(i * chunk, (i + 1) * chunk),
      )
    )
    : e.queue;
  for (const part of parts) {
    const at = putBytes(ctx.pid, ctx.scratch, part);
    const n = ctx.injector.call("send", NR.sendto, via, at, part.length, MSG_DONTWAIT, 0, 0);
    if (Number(n) !== part.length) throw new AmberError(`queue refill: ${n} of ${part.length}`);
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

/** The first end of a pair: socketpair here, the peer end parked for its holder. */
function createPair(ctx: RestoreContext, e: UnixImage): number {
  const at = putBytes(ctx.pid, ctx.scratch, new Uint8Array(8));
  ctx.injector.call("socketpair", NR.socketpair, AF_UNIX, e.type | O_CLOEXEC, 0, at);
  const [mine, other] = new Int32Array(getBytes(ctx.pid, ctx.scratch, 8).slice().buffer);
  applyOptions(ctx, mine, e);
  refill(ctx, other, e);
  const places = placesOf(ctx);
  places.set(e.ino, { pid: ctx.pid, fd: e.fd });
  const parked = { pid: ctx.pid, fd: parkFd(ctx, other) };
  ctx.tree.parked.push(parked);
  places.set(e.peer!, parked);
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
  const fd = Number(inj.call("socket", NR.socket, AF_UNIX, e.type | O_CLOEXEC, 0));
  applyOptions(ctx, fd, e);
  if (e.name) {
    const path = pathName(e.name);
    if (path) removeStaleSocket(path);
    const addr = sockaddr(e.name);
    inj.call(
      `bind ${displayName(e.name)}`,
      NR.bind,
      fd,
      putBytes(ctx.pid, ctx.scratch, addr),
      addr.length,
    );
    if (e.file && path) {
      Deno.chownSync(path, e.file.uid, e.file.gid);
      Deno.chmodSync(path, e.file.mode);
    }
  }
  if (e.state === STATE.LISTEN) inj.call("listen", NR.listen, fd, e.backlog ?? 128);
  return fd;
}

/** The socket file the dumped process left behind: removed so the name can be bound again. */
function removeStaleSocket(path: string): void {
  try {
    if (Deno.lstatSync(path).isSocket) Deno.removeSync(path);
  } catch { /* not there */ }
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
    const entry = dumpSocket(p, s);
    if (entry.peer !== undefined) notePeer(p.tree, entry, `fd ${p.fd}: ${describe(entry)}`);
    else notePeer(p.tree, { ino: entry.ino }, "");
    return entry;
  },
  unrestorable: (e) => e.refusal && `fd ${e.fd}: ${describe(e)}: ${e.refusal}`,
  precheck(e) {
    const path = pathName(e.name);
    if (!path || e.state === STATE.CONNECTED) return;
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
    if (e.state !== STATE.CONNECTED) return createBound(ctx, e);
    const known = placesOf(ctx).get(e.ino);
    return known ? takePairEnd(ctx, e, known) : createPair(ctx, e);
  },
});
