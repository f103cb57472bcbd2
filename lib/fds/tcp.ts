/**
 * TCP sockets, IPv4 and IPv6. Dump looks at each through amber's own
 * duplicate (pidfd_getfd): addresses, TCP_INFO, options. Restore creates
 * the socket in the process (injected socket()) and sets it up through a
 * duplicate amber takes of it, so each step is one plain call:
 * - unconnected sockets come back with their options, bound again if they
 *   were bound;
 * - listening sockets come back bound to the same address and port with
 *   the same backlog; one with connections waiting to be accepted is
 *   refused (they would be lost);
 * - established connections (only with --tcp-established) are checkpointed
 *   with TCP_REPAIR under a network lock (lib/net/netlock.ts): sequence
 *   numbers, both queues (the send queue split into sent-unacknowledged and
 *   never-sent bytes), MSS, window, timestamps, SACK and window scaling;
 *   restore rebuilds them in repair mode (no handshake), refills the
 *   queues and turns repair off just before the tree runs, once the lock is
 *   gone, so the kernel's window probe reaches the peer at once;
 * - half-closed connections (CLOSE_WAIT, FIN_WAIT1/2, CLOSING, LAST_ACK)
 *   are checkpointed the same way, their FINs left out of the sequence
 *   numbers; restore rebuilds them established and replays the close:
 *   our FIN through shutdown() in repair mode (queued as sent, nothing goes
 *   out) or, if it was never sent, after the unsent bytes; the peer's FIN
 *   (and its ACK of ours) as segments crafted on a raw socket, which the
 *   lock lets through by their mark.
 * - a connect() in progress (SYN_SENT) is locked too (so the handshake
 *   cannot finish while the tree is dumped) and comes back as a new
 *   non-blocking connect from the same address and port with the same
 *   initial sequence number, started once the lock is gone: to the peer,
 *   a retransmission of the same SYN.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import {
  AF,
  bindTo,
  connectStart,
  connectTo,
  dupSocket,
  encodeAddr,
  fillRepairQueue,
  getInt,
  type InetAddr,
  listenOn,
  localName,
  peekRepairQueue,
  peerName,
  QUEUE,
  queueSeq,
  queueSizes,
  repairWindow,
  sendAll,
  sendPacket,
  setInt,
  setQueueSeq,
  setRepair,
  setRepairOptions,
  setRepairWindow,
  shutdownWrite,
  SOCKOPT,
  SOL,
  TCP_STATES,
  type TcpInfo,
  tcpInfo,
  TCPOPT,
} from "../../ffi/inet.ts";
import { destroyTimeWait } from "../../ffi/inetdiag.ts";
import { takeFd } from "../../ffi/socket.ts";
import { libc } from "../../ffi/libc.ts";
import { kindState, type RestoreContext, type TreeDumpState } from "../context.ts";
import { AmberError } from "../errors.ts";
import { bytes } from "../images/codec.ts";
import { isMapped, TCP_FLAG, tcpPacket, type TcpSegment } from "../net/datagram.ts";
import type { Images } from "../images/read.ts";
import {
  holdForRestore,
  LOCK_MARK,
  lockConnection,
  type LockedConn,
  lockTableName,
  validTableName,
} from "../net/netlock.ts";
import { defineFdKind, type FdProbe, O_CLOEXEC } from "./kind.ts";
import {
  Addr,
  applyOptions,
  bindAgain,
  fmt,
  InetFields,
  inetFields,
  inode,
  isInet,
  processSocket,
  rawSocket,
  remoteFromProc,
  TCP_OPTIONS,
  TCP_UNCONNECTED_OPTIONS,
} from "./inet.ts";

const SOCK_STREAM = 1, IPPROTO_TCP = 6;
const STATE = {
  ESTABLISHED: 1,
  SYN_SENT: 2,
  FIN_WAIT1: 4,
  FIN_WAIT2: 5,
  CLOSE: 7,
  CLOSE_WAIT: 8,
  LAST_ACK: 9,
  LISTEN: 10,
  CLOSING: 11,
} as const;
/** States in which our FIN is in the send queue (sent or not, acknowledged in FIN_WAIT2). */
const OUR_FIN: readonly number[] = [
  STATE.FIN_WAIT1,
  STATE.FIN_WAIT2,
  STATE.CLOSING,
  STATE.LAST_ACK,
];
/** States in which the peer's FIN was received. */
const PEER_FIN: readonly number[] = [STATE.CLOSE_WAIT, STATE.CLOSING, STATE.LAST_ACK];
/** States checkpointed with TCP_REPAIR: established, or half-closed. */
const CONNECTED: readonly number[] = [STATE.ESTABLISHED, STATE.CLOSE_WAIT, ...OUR_FIN];
/** How long restore waits for a crafted segment to move a connection's state. */
const SEGMENT_MS = 5_000;
const SO_MARK = 36, SOCK_DGRAM = 2, NETLINK_SOCK_DIAG = 4;
const TCPI_OPT = { TIMESTAMPS: 1, SACK: 2, WSCALE: 4 } as const;
/** Most bytes amber keeps for one connection's queues. */
const QUEUE_LIMIT = 64 * 1024 * 1024;

const u32 = z.number().int().min(0).max(0xffffffff);

const Repair = z.object({
  /** Sequence number after the last byte of the send queue (write_seq). */
  sndSeq: u32,
  /** Next sequence number expected from the peer (rcv_nxt). */
  rcvSeq: u32,
  /** Everything not yet acknowledged by the peer; its last `unsent` bytes were never sent. */
  sendQueue: bytes,
  unsent: z.number().int().min(0),
  /** Our FIN (FIN_WAIT1, CLOSING, LAST_ACK) had not been sent yet: it goes after the unsent bytes. */
  finUnsent: z.boolean().optional(),
  /** Received, not yet read by the process. */
  recvQueue: bytes,
  mss: z.number().int().min(0),
  window: z.object({ sndWl1: u32, sndWnd: u32, maxWindow: u32, rcvWnd: u32, rcvWup: u32 }),
  timestamps: z.boolean(),
  sack: z.boolean(),
  wscale: z.object({ snd: z.number().int().min(0).max(14), rcv: z.number().int().min(0).max(14) })
    .optional(),
  timestamp: u32,
}).refine((r) => r.unsent <= r.sendQueue.length, "more unsent bytes than queued");

const TcpEntry = z.object({
  kind: z.literal("tcp"),
  ...InetFields,
  /** tcp_info state: 1 established, 7 closed (unconnected), 10 listening... */
  state: z.number().int().min(0).max(255),
  backlog: z.number().int().min(0).optional(),
  repair: Repair.optional(),
  /** The nftables table that locks this connection until it is restored. */
  lock: z.string().refine(validTableName, "not an amber lock table").optional(),
  /** A connect() in progress (SYN_SENT): the initial sequence number of its SYN. */
  synSeq: u32.optional(),
  /** Why it cannot be restored, when it cannot (seen at dump). */
  refusal: z.string().optional(),
});
type TcpImage = z.output<typeof TcpEntry>;

function describe(e: { state: number; local: InetAddr; peer?: InetAddr }): string {
  const state = TCP_STATES[e.state] ?? `state ${e.state}`;
  return e.peer
    ? `tcp ${fmt(e.local)} -> ${fmt(e.peer)} (${state})`
    : `tcp ${fmt(e.local)} (${state})`;
}

interface DumpState {
  /** Entries already dumped, by inode: a second holder gets the same. */
  entries: Map<number, z.input<typeof TcpEntry>>;
  /** amber's duplicates of the sockets put in repair mode. */
  repaired: number[];
}

function dumpState(tree: TreeDumpState): DumpState {
  return kindState(tree.kinds, "tcp", () => {
    const st: DumpState = { entries: new Map(), repaired: [] };
    tree.onEnd.push((end) => endRepair(st, end, tree.netLock));
    return st;
  });
}

/**
 * Repair mode lasts only while a connection is read (an amber killed
 * meanwhile leaves a tree whose connections work once the lock is gone).
 * A killed tree's connections go back into it through amber's duplicates,
 * the last holders, so their close sends nothing (no FIN, no RST) and the
 * peer waits for restore; their lock is then kept for restore.
 */
function endRepair(st: DumpState, end: "resume" | "kill", lock: string | undefined): void {
  let failed: unknown;
  for (const sock of st.repaired.splice(0)) {
    try {
      if (end === "kill") setRepair(sock, 1);
    } catch (e) {
      failed ??= e; // the others still get theirs
    } finally {
      libc().close(sock);
    }
  }
  if (end === "kill" && lock) holdForRestore(lock);
  if (failed) throw failed;
}

/** Locks the connection, puts it in repair mode and reads everything TCP_REPAIR shows. */
function checkpointConnection(
  p: FdProbe,
  sock: number,
  local: InetAddr,
  peer: InetAddr,
  reuseaddr: boolean,
): {
  repair?: z.input<typeof Repair>;
  synSeq?: number;
  lock: string;
  state: number;
  refusal?: string;
} {
  const tree = p.tree;
  const create = tree.netLock === undefined;
  const lock = tree.netLock ?? lockTableName(p.pid);
  lockConnection(lock, { local, peer }, create);
  tree.netLock = lock;
  setRepair(sock, 1);
  const st = dumpState(tree);
  st.repaired.push(dupSocket(sock));
  try {
    // Read again under the lock: a segment may have moved it meanwhile.
    const state = tcpInfo(sock).state;
    // write_seq is one past the SYN's sequence number.
    if (state === STATE.SYN_SENT) {
      return { synSeq: (queueSeq(sock, QUEUE.SEND) - 1) >>> 0, lock, state };
    }
    if (!CONNECTED.includes(state)) {
      return { lock, state, refusal: "changed state while being locked: not supported yet" };
    }
    return { repair: readRepair(sock, state), lock, state };
  } finally {
    // Out of repair without a window probe (nothing changed); that resets
    // SO_REUSEADDR, which the dump read before.
    setRepair(sock, -1);
    setInt(sock, SOL.SOCKET, SOCKOPT.REUSEADDR, reuseaddr ? 1 : 0);
  }
}

/** Everything TCP_REPAIR shows of a connection in repair mode. */
function readRepair(sock: number, state: number): z.input<typeof Repair> {
  const sizes = queueSizes(sock);
  // A FIN takes a sequence number but no byte of the queues (SIOCINQ leaves the peer's out).
  const ourFin = OUR_FIN.includes(state), peerFin = PEER_FIN.includes(state);
  const finQueued = ourFin && state !== STATE.FIN_WAIT2;
  const finUnsent = finQueued && sizes.unsent > 0;
  sizes.outq -= finQueued ? 1 : 0;
  sizes.unsent -= finUnsent ? 1 : 0;
  if (sizes.inq + sizes.outq > QUEUE_LIMIT) {
    throw new AmberError(`more than ${QUEUE_LIMIT} bytes queued: not supported yet`);
  }
  const info = tcpInfo(sock);
  const sndSeq = (queueSeq(sock, QUEUE.SEND) - (ourFin ? 1 : 0)) >>> 0;
  const rcvSeq = (queueSeq(sock, QUEUE.RECV) - (peerFin ? 1 : 0)) >>> 0;
  const window = repairWindow(sock);
  if (peerFin && ((window.rcvWup - rcvSeq) | 0) > 0) {
    // The last window we announced started after the FIN: one earlier, its right edge kept.
    window.rcvWup = (window.rcvWup - 1) >>> 0;
    window.rcvWnd += 1;
  }
  const repair = {
    sndSeq,
    sendQueue: peekRepairQueue(sock, QUEUE.SEND, sizes.outq),
    rcvSeq,
    recvQueue: peekRepairQueue(sock, QUEUE.RECV, sizes.inq),
    unsent: sizes.unsent,
    finUnsent: finUnsent || undefined,
    mss: getInt(sock, SOL.TCP, TCPOPT.MAXSEG),
    window,
    timestamps: (info.options & TCPI_OPT.TIMESTAMPS) !== 0,
    sack: (info.options & TCPI_OPT.SACK) !== 0,
    wscale: info.options & TCPI_OPT.WSCALE
      ? { snd: info.sndWscale, rcv: info.rcvWscale }
      : undefined,
    timestamp: getInt(sock, SOL.TCP, TCPOPT.TIMESTAMP) >>> 0,
  };
  setInt(sock, SOL.TCP, TCPOPT.REPAIR_QUEUE, QUEUE.NONE);
  return repair;
}

function refusalOf(state: number, info: TcpInfo, tcpEstablished: boolean) {
  if (state === STATE.LISTEN) {
    return info.unacked
      ? `${info.unacked} connection(s) waiting to be accepted: not supported yet`
      : undefined;
  }
  if (state === STATE.ESTABLISHED) {
    return tcpEstablished ? undefined : "an established connection: dump with --tcp-established";
  }
  if (CONNECTED.includes(state)) {
    return tcpEstablished ? undefined : "a half-closed connection: dump with --tcp-established";
  }
  if (state === STATE.SYN_SENT) {
    return tcpEstablished ? undefined : "a connect in progress: dump with --tcp-established";
  }
  if (state !== STATE.CLOSE) return "a connection being set up: not supported yet";
  // Closed after a connection (reset, or both FINs acknowledged): recv would say EOF or an
  // error, a fresh socket ENOTCONN; nothing shows its peer any more.
  if (info.segsOut || info.segsIn) return "a connection that has ended: not supported yet";
}

function dumpSocket(p: FdProbe, ino: number): z.input<typeof TcpEntry> {
  const sock = takeFd(p.pid, p.fd);
  try {
    const family = getInt(sock, SOL.SOCKET, SOCKOPT.DOMAIN) as typeof AF.INET | typeof AF.INET6;
    const info = tcpInfo(sock);
    const local = localName(sock);
    const peer = info.state === STATE.LISTEN || info.state === STATE.CLOSE
      ? undefined
      : info.state === STATE.SYN_SENT
      ? remoteFromProc(p.pid, ino, family)
      : peerName(sock);
    const refusal = refusalOf(info.state, info, p.tree.options.tcpEstablished);
    const entry: z.input<typeof TcpEntry> = {
      kind: "tcp" as const,
      fd: p.fd,
      flags: p.flags,
      ino,
      family,
      state: info.state,
      local: local as z.input<typeof Addr>,
      peer: peer as z.input<typeof Addr> | undefined,
      backlog: info.state === STATE.LISTEN ? info.sacked : undefined,
      ...inetFields(
        sock,
        family,
        CONNECTED.includes(info.state) ? TCP_OPTIONS : [...TCP_OPTIONS, ...TCP_UNCONNECTED_OPTIONS],
      ),
      refusal,
    };
    if (!refusal && (CONNECTED.includes(info.state) || info.state === STATE.SYN_SENT) && peer) {
      Object.assign(entry, checkpointConnection(p, sock, local, peer, entry.reuseaddr));
    }
    return entry;
  } finally {
    libc().close(sock);
  }
}

// ---------------------------------------------------------------------------
// restore

/**
 * The connections of `images` that their dump locked (established,
 * half-closed, connecting), each once: a restore in another network
 * (migrate-receive) locks them again there before anything can reach them.
 */
export function lockedConnections(images: Images): LockedConn[] {
  const out = new Map<string, LockedConn>();
  for (const p of images.processes) {
    const fds = (p.parts.fds as { fds?: { kind: string }[] } | undefined)?.fds ?? [];
    for (const e of fds.filter((e) => e.kind === "tcp") as TcpImage[]) {
      if (!e.lock || !e.peer) continue;
      const c = { local: e.local, peer: e.peer };
      out.set(`${fmt(e.local)} ${fmt(e.peer)}`, c);
    }
  }
  return [...out.values()];
}

/** An address as it goes on the wire: a v4-mapped one is IPv4. */
function wire(a: InetAddr): InetAddr {
  return isMapped(a) ? { ...a, family: AF.INET, addr: a.addr.replace(/^::ffff:/i, "") } : a;
}

/**
 * Segments from the connection's peer crafted on a raw socket of the
 * process's network (marked, so they pass the lock); each is waited for
 * until the connection is in the state it should bring. The raw socket is
 * made while the process is being rebuilt (injecting later would clobber
 * the registers it was given), and kept until the tree runs.
 */
class PeerSegments {
  #raw?: number;
  constructor(private e: TcpImage) {}

  open(ctx: RestoreContext): void {
    this.#raw = rawSocket(ctx, wire(this.e.peer!).family);
    setInt(this.#raw, SOL.SOCKET, SO_MARK, LOCK_MARK);
  }

  /** Sends `seg` to the connection `sock` is a descriptor of; waits until it is in `state`. */
  send(sock: number, seg: Omit<TcpSegment, "window">, state: number, what: string): void {
    const r = this.e.repair!, from = wire(this.e.peer!), to = wire(this.e.local);
    if (this.#raw === undefined) throw new Error(`${what}: no raw socket`);
    // The peer's window as it announced it, so that nothing changes.
    const window = r.window.sndWnd >>> (r.wscale?.snd ?? 0);
    sendPacket(this.#raw, tcpPacket(from, to, { ...seg, window }), to);
    const deadline = Date.now() + SEGMENT_MS;
    for (let now = tcpInfo(sock).state; now !== state; now = tcpInfo(sock).state) {
      if (Date.now() > deadline) {
        throw new AmberError(
          `${what}: the connection is ${TCP_STATES[now]}, not ${TCP_STATES[state]}`,
        );
      }
    }
  }

  close(): void {
    if (this.#raw !== undefined) libc().close(this.#raw);
    this.#raw = undefined;
  }
}

/** shutdown(SHUT_WR) in repair mode with the send queue selected: our FIN counts as sent, nothing goes out. */
function finAsSent(sock: number): void {
  setInt(sock, SOL.TCP, TCPOPT.REPAIR_QUEUE, QUEUE.SEND);
  shutdownWrite(sock);
  setInt(sock, SOL.TCP, TCPOPT.REPAIR_QUEUE, QUEUE.NONE);
}

/**
 * Brings a connection rebuilt established (in repair mode, under the lock)
 * to its half-closed state, in the order the FINs came. A FIN of ours that
 * was never sent waits for the unsent bytes: `later` sends it (and, in
 * CLOSING, the peer's FIN that came after it) once they are queued.
 */
function replayClose(sock: number, e: TcpImage, peer: PeerSegments): (copy: number) => void {
  const r = e.repair!, st = e.state, unsent = r.finUnsent === true;
  const una = (r.sndSeq - r.sendQueue.length) >>> 0;
  const fin = { seq: r.rcvSeq, ack: una, flags: TCP_FLAG.FIN | TCP_FLAG.ACK };
  const peerFin = (on: number, state: number) => peer.send(on, fin, state, "the peer's FIN");
  if ((st === STATE.FIN_WAIT1 || st === STATE.CLOSING) && !unsent) finAsSent(sock);
  if (st === STATE.FIN_WAIT2) {
    finAsSent(sock);
    const ack = { seq: r.rcvSeq, ack: (r.sndSeq + 1) >>> 0, flags: TCP_FLAG.ACK };
    peer.send(sock, ack, STATE.FIN_WAIT2, "the peer's ACK of our FIN");
  }
  if (st === STATE.CLOSE_WAIT || st === STATE.LAST_ACK) peerFin(sock, STATE.CLOSE_WAIT);
  if (st === STATE.CLOSING && !unsent) peerFin(sock, STATE.CLOSING);
  if (st === STATE.LAST_ACK && !unsent) finAsSent(sock);
  return (copy) => {
    if (!unsent) return;
    shutdownWrite(copy);
    if (st === STATE.CLOSING) peerFin(copy, STATE.CLOSING);
  };
}

/**
 * A connection rebuilt in repair mode: sequence numbers, bind, connect
 * (no handshake), negotiated options, timestamp, queues, window, then its
 * close replayed if it was half-closed. Repair stays on until the tree is
 * about to run.
 */
function setupConnection(ctx: RestoreContext, sock: number, e: TcpImage): void {
  const r = e.repair!;
  setRepair(sock, 1); // also lets bind share the port with the listener
  setQueueSeq(sock, QUEUE.SEND, (r.sndSeq - r.sendQueue.length) >>> 0);
  setQueueSeq(sock, QUEUE.RECV, (r.rcvSeq - r.recvQueue.length) >>> 0);
  setInt(sock, SOL.TCP, TCPOPT.REPAIR_QUEUE, QUEUE.NONE);
  bindTo(sock, e.local);
  connectTo(sock, e.peer!);
  setRepairOptions(sock, r);
  setInt(sock, SOL.TCP, TCPOPT.TIMESTAMP, r.timestamp | 0);
  fillRepairQueue(sock, QUEUE.RECV, r.recvQueue);
  const sent = r.sendQueue.length - r.unsent;
  fillRepairQueue(sock, QUEUE.SEND, r.sendQueue.subarray(0, sent));
  setInt(sock, SOL.TCP, TCPOPT.REPAIR_QUEUE, QUEUE.NONE);
  setRepairWindow(sock, r.window);
  const peer = new PeerSegments(e);
  let later: (copy: number) => void;
  try {
    if (PEER_FIN.includes(e.state) || e.state === STATE.FIN_WAIT2) peer.open(ctx);
    later = replayClose(sock, e, peer);
  } catch (err) {
    peer.close();
    throw err;
  }
  const copy = dupSocket(sock);
  ctx.tree.onEnd.push((ok) => {
    try {
      if (!ok) return; // closed in repair mode: nothing reaches the peer
      setRepair(copy, 0);
      // Bytes never sent go out the ordinary way, and a FIN never sent after them.
      // (Going out while the peer reads: more than the new socket's buffer holds may be waiting.)
      // The refilled queue is charged more than the original's segments were (measured: 13 KB
      // over 4 MB), so the buffer grows by the unsent bytes while they go in, then is the dumped
      // size again: a peer that reads only later has them all queued.
      // (Only then: setting the size locks it, ending the kernel's tuning of it.)
      const unsent = r.sendQueue.subarray(sent);
      if (unsent.length) {
        setInt(copy, SOL.SOCKET, SOCKOPT.SNDBUFFORCE, (e.sndbuf >> 1) + unsent.length);
        sendAll(copy, unsent, `${describe(e)}: unsent bytes`, UNSENT_WAIT_MS);
        setInt(copy, SOL.SOCKET, SOCKOPT.SNDBUFFORCE, e.sndbuf >> 1);
      }
      try {
        later(copy);
      } catch (err) {
        throw new AmberError(`${describe(e)}: ${err instanceof Error ? err.message : err}`);
      }
      setInt(copy, SOL.SOCKET, SOCKOPT.REUSEADDR, e.reuseaddr ? 1 : 0);
    } finally {
      peer.close();
      libc().close(copy);
    }
  });
}

/**
 * A connect() in progress: bound again to its address and port, its SYN's
 * sequence number set (in repair mode, the only way), and connected
 * without blocking once the lock is gone, so the first SYN is not dropped.
 * A process blocked in connect() restarts it and waits on this one.
 */
function setupConnecting(ctx: RestoreContext, sock: number, e: TcpImage): void {
  setRepair(sock, 1); // bind shares the port as the other repaired sockets do
  setQueueSeq(sock, QUEUE.SEND, e.synSeq!);
  setInt(sock, SOL.TCP, TCPOPT.REPAIR_QUEUE, QUEUE.NONE);
  bindTo(sock, e.local);
  setRepair(sock, -1); // an ordinary connect from here on: its handshake goes out
  setInt(sock, SOL.SOCKET, SOCKOPT.REUSEADDR, e.reuseaddr ? 1 : 0);
  const copy = dupSocket(sock);
  ctx.tree.onEnd.push((ok) => {
    try {
      if (ok) connectStart(copy, e.peer!);
    } catch (err) {
      throw new AmberError(`${describe(e)}: ${err instanceof Error ? err.message : err}`);
    } finally {
      libc().close(copy);
    }
  });
}

/**
 * Ends the connections in TIME_WAIT on the socket's address and port (as
 * `ss -K` does); returns how many. Closed by the tree before the dump, they
 * are orphans nothing dumps, but they keep a listener that had no
 * SO_REUSEADDR from binding its port again (SO_REUSEADDR on the new
 * socket is not enough: theirs counts too). All they still did was answer
 * a late segment of their old connection, which now gets a reset.
 */
function endTimeWait(ctx: RestoreContext, local: InetAddr): number {
  const nl = processSocket(ctx, AF.NETLINK, SOCK_DGRAM, NETLINK_SOCK_DIAG);
  try {
    const raw = encodeAddr({ ...local, port: 0 });
    const addr = local.family === AF.INET ? raw.slice(4, 8) : raw.slice(8, 24);
    return destroyTimeWait(nl, local.family, local.port, addr);
  } finally {
    libc().close(nl);
  }
}

function restoreSocket(ctx: RestoreContext, e: TcpImage): number {
  const fd = Number(
    ctx.injector.call("socket", NR.socket, e.family, SOCK_STREAM | O_CLOEXEC, IPPROTO_TCP),
  );
  const sock = takeFd(ctx.pid, fd);
  try {
    applyOptions(sock, e);
    if (CONNECTED.includes(e.state)) setupConnection(ctx, sock, e);
    else if (e.state === STATE.SYN_SENT) setupConnecting(ctx, sock, e);
    else {
      bindAgain(
        sock,
        e,
        () => e.state === STATE.LISTEN && listenOn(sock, e.backlog ?? 128),
        () => endTimeWait(ctx, e.local) > 0,
      );
    }
  } catch (err) {
    throw new AmberError(`${describe(e)}: ${err instanceof Error ? err.message : err}`);
  } finally {
    libc().close(sock);
  }
  return fd;
}

/** How long restore waits for the peer to make room for a connection's unsent bytes. */
const UNSENT_WAIT_MS = 60_000;

export const tcpFd = defineFdKind({
  name: "tcp",
  schema: TcpEntry,
  matches: (p: FdProbe) => isInet(p, SOCK_STREAM, IPPROTO_TCP),
  dump(p: FdProbe) {
    const ino = inode(p.link)!;
    const st = dumpState(p.tree);
    const known = st.entries.get(ino);
    // A second holder (dup, fork) is restored from the first: one checkpoint.
    if (known) return { ...known, fd: p.fd, flags: p.flags };
    const entry = dumpSocket(p, ino);
    st.entries.set(ino, entry);
    return entry;
  },
  unrestorable(e) {
    if (e.refusal) return `fd ${e.fd}: ${describe(e)}: ${e.refusal}`;
    if (e.state === STATE.SYN_SENT && (e.synSeq === undefined || !e.peer)) {
      return `fd ${e.fd}: ${describe(e)}: no sequence number or peer in the images`;
    }
    if (CONNECTED.includes(e.state) && (!e.repair || !e.peer)) {
      return `fd ${e.fd}: ${describe(e)}: no repair state in the images`;
    }
    if (e.repair?.finUnsent && (!OUR_FIN.includes(e.state) || e.state === STATE.FIN_WAIT2)) {
      return `fd ${e.fd}: ${describe(e)}: an unsent FIN in a state without one`;
    }
  },
  // Its addresses and connections live in the network namespace; a migration with
  // --tcp-established moves them (the operator moves the addresses).
  netnsBound: (e, options) => options.movedTcp ? undefined : describe(e),
  restore: restoreSocket,
});
