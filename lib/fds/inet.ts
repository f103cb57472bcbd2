/**
 * What the inet socket kinds (tcp.ts, udp.ts) share: addresses in the
 * images, the integer options copied as they are, buffer sizes and
 * status flags, and binding again.
 */
import { z } from "zod";
import {
  AF,
  bindTo,
  decodeAddr,
  getInt,
  getRaw,
  identity,
  type InetAddr,
  IP_TOS,
  IPV6_TCLASS,
  IPV6_V6ONLY,
  setInt,
  setRaw,
  setStatusFlags,
  SOCKOPT,
  SOL,
  TCPOPT,
} from "../../ffi/inet.ts";
import { takeFd } from "../../ffi/socket.ts";
import { libc, SysError } from "../../ffi/libc.ts";
import { NR } from "../../ffi/inject.ts";
import { kindState, type RestoreContext } from "../context.ts";
import { bytes } from "../images/codec.ts";
import { type FdProbe, O_CLOEXEC } from "./kind.ts";

const LINK = /^socket:\[(\d+)\]$/;
const O_NONBLOCK = 0o4000;
const SOCK_RAW = 3, IPPROTO_RAW = 255, EADDRINUSE = 98;

export const Addr = z.object({
  family: z.union([z.literal(AF.INET), z.literal(AF.INET6)]),
  addr: z.string().max(64).regex(/^[0-9a-f.:]+$/),
  port: z.number().int().min(0).max(65535),
  /** Interface index of a link-local IPv6 address (sin6_scope_id). */
  scope: z.number().int().min(1).max(0xffffffff).optional(),
});

/** An option as getsockopt gave it: an int, or the bytes of a struct or name. */
export const SockOpt = z.object({
  level: z.number().int(),
  option: z.number().int(),
  value: z.union([z.number(), bytes.refine((b) => b.length <= 64, "option value too long")]),
});

/** Options copied as they are: [level, option], with a size for those that are not ints. */
type OptionSpec = [number, number] | [number, number, number];

const SOCKET_OPTIONS: OptionSpec[] = [
  [SOL.SOCKET, SOCKOPT.REUSEPORT],
  [SOL.SOCKET, SOCKOPT.KEEPALIVE],
  [SOL.SOCKET, SOCKOPT.OOBINLINE],
  [SOL.SOCKET, SOCKOPT.BROADCAST],
  [SOL.SOCKET, 12], // SO_PRIORITY
  [SOL.SOCKET, 18], // SO_RCVLOWAT
  [SOL.SOCKET, 29], // SO_TIMESTAMP
  [SOL.SOCKET, 36], // SO_MARK
  [SOL.SOCKET, 13, 8], // SO_LINGER: struct linger
  [SOL.SOCKET, 25, 16], // SO_BINDTODEVICE: an interface name
];
export const TCP_OPTIONS: OptionSpec[] = [
  [SOL.TCP, TCPOPT.NODELAY],
  [SOL.TCP, TCPOPT.CORK],
  [SOL.TCP, TCPOPT.KEEPIDLE],
  [SOL.TCP, TCPOPT.KEEPINTVL],
  [SOL.TCP, TCPOPT.KEEPCNT],
  [SOL.TCP, TCPOPT.USER_TIMEOUT],
  [SOL.TCP, 8], // TCP_LINGER2
  [SOL.TCP, 9], // TCP_DEFER_ACCEPT
  [SOL.TCP, 23], // TCP_FASTOPEN
  [SOL.TCP, 25], // TCP_NOTSENT_LOWAT
  [SOL.TCP, 13, 16], // TCP_CONGESTION: an algorithm's name
];
/** Multicast options, which only datagram sockets may set. */
export const UDP_V4_OPTIONS: OptionSpec[] = [
  [SOL.IP, 33], // IP_MULTICAST_TTL
  [SOL.IP, 34], // IP_MULTICAST_LOOP
];
export const UDP_V6_OPTIONS: OptionSpec[] = [
  [SOL.IPV6, 18], // IPV6_MULTICAST_HOPS
  [SOL.IPV6, 19], // IPV6_MULTICAST_LOOP
];
/** TCP options that mean something else once connected (the MSS comes from TCP_REPAIR then). */
export const TCP_UNCONNECTED_OPTIONS: OptionSpec[] = [[SOL.TCP, TCPOPT.MAXSEG]];
const V4_OPTIONS: OptionSpec[] = [
  [SOL.IP, IP_TOS],
  [SOL.IP, 2], // IP_TTL
  [SOL.IP, 8], // IP_PKTINFO
  [SOL.IP, 10], // IP_MTU_DISCOVER
  [SOL.IP, 11], // IP_RECVERR
  [SOL.IP, 15], // IP_FREEBIND
  [SOL.IP, 19], // IP_TRANSPARENT
];
const V6_OPTIONS: OptionSpec[] = [
  [SOL.IPV6, IPV6_V6ONLY],
  [SOL.IPV6, IPV6_TCLASS],
  [SOL.IPV6, 16], // IPV6_UNICAST_HOPS
  [SOL.IPV6, 23], // IPV6_MTU_DISCOVER
  [SOL.IPV6, 25], // IPV6_RECVERR
  [SOL.IPV6, 49], // IPV6_RECVPKTINFO
  [SOL.IPV6, 75], // IPV6_TRANSPARENT
  [SOL.IPV6, 78], // IPV6_FREEBIND
];

/** What every inet entry holds besides its kind's own state. */
export const InetFields = {
  fd: z.number().int().min(0),
  flags: z.number().int().min(0),
  ino: z.number().int().min(0),
  family: z.union([z.literal(AF.INET), z.literal(AF.INET6)]),
  local: Addr,
  peer: Addr.optional(),
  reuseaddr: z.boolean(),
  sndbuf: z.number().int(),
  rcvbuf: z.number().int(),
  options: z.array(SockOpt).max(64),
};
export interface InetImage {
  flags: number;
  local: z.output<typeof Addr>;
  reuseaddr: boolean;
  sndbuf: number;
  rcvbuf: number;
  options: z.output<typeof SockOpt>[];
}

export function inode(link: string): number | undefined {
  const m = LINK.exec(link);
  return m ? Number(m[1]) : undefined;
}

export function fmt(a?: { addr: string; port: number; scope?: number }): string {
  if (!a) return "?";
  const addr = a.scope ? `${a.addr}%${a.scope}` : a.addr;
  return a.addr.includes(":") ? `[${addr}]:${a.port}` : `${addr}:${a.port}`;
}

/**
 * Whether the socket behind a probe is an inet socket of this type and
 * protocol; amber's look at each socket is kept for the dump.
 */
export function isInet(p: FdProbe, type: number, protocol: number): boolean {
  const ino = inode(p.link);
  if (ino === undefined) return false;
  const seen = kindState(
    p.tree.kinds,
    "inet",
    () => new Map<number, { family: number; type: number; protocol: number }>(),
  );
  if (!seen.has(ino)) {
    const sock = takeFd(p.pid, p.fd);
    try {
      seen.set(ino, identity(sock));
    } finally {
      libc().close(sock);
    }
  }
  const id = seen.get(ino)!;
  return (id.family === AF.INET || id.family === AF.INET6) && id.type === type &&
    id.protocol === protocol;
}

/** The fields of InetFields amber reads from the socket itself. */
export function inetFields(sock: number, family: number, extra: OptionSpec[]) {
  const list = [...SOCKET_OPTIONS, ...extra, ...(family === AF.INET ? V4_OPTIONS : V6_OPTIONS)];
  return {
    reuseaddr: getInt(sock, SOL.SOCKET, SOCKOPT.REUSEADDR) !== 0,
    sndbuf: getInt(sock, SOL.SOCKET, SOCKOPT.SNDBUF),
    rcvbuf: getInt(sock, SOL.SOCKET, SOCKOPT.RCVBUF),
    options: list.map(([level, option, size]) => ({
      level,
      option,
      value: size ? getRaw(sock, level, option, size).slice() : getInt(sock, level, option),
    })),
  };
}

function sameValue(a: number | Uint8Array, b: number | Uint8Array): boolean {
  if (typeof a === "number" || typeof b === "number") return a === b;
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/** Options that differ from a fresh socket's, set before bind (V6ONLY and REUSEPORT must be). */
export function applyOptions(sock: number, e: InetImage): void {
  for (const o of e.options) {
    const v = o.value;
    const now = typeof v === "number"
      ? getInt(sock, o.level, o.option)
      : getRaw(sock, o.level, o.option, Math.max(v.length, 16)).slice();
    if (sameValue(now, v)) continue;
    if (typeof v === "number") setInt(sock, o.level, o.option, v);
    else setRaw(sock, o.level, o.option, v);
  }
  // The kernel doubles what it is given; set only what differs from a fresh socket's.
  if (getInt(sock, SOL.SOCKET, SOCKOPT.SNDBUF) !== e.sndbuf) {
    setInt(sock, SOL.SOCKET, SOCKOPT.SNDBUFFORCE, e.sndbuf >> 1);
  }
  if (getInt(sock, SOL.SOCKET, SOCKOPT.RCVBUF) !== e.rcvbuf) {
    setInt(sock, SOL.SOCKET, SOCKOPT.RCVBUFFORCE, e.rcvbuf >> 1);
  }
  if (e.flags & O_NONBLOCK) setStatusFlags(sock, O_NONBLOCK);
}

/**
 * Binds again to the dumped address, if the socket was bound. Like a
 * restarting server's SO_REUSEADDR: the dumped socket's port may linger
 * (TIME_WAIT, a connection restored before it); the image's own setting
 * comes back once bound. When bind or `then` (listen) still finds the
 * port in use, `inUse` may free it (TIME_WAIT connections that had no
 * SO_REUSEADDR) and says whether to try once more.
 */
export function bindAgain(
  sock: number,
  e: InetImage,
  then?: () => void,
  inUse?: () => boolean,
): void {
  // `inUse` may free the port (and says so): then once more.
  const retried = (step: () => void) => {
    try {
      step();
    } catch (err) {
      if (!(err instanceof SysError && err.errno === EADDRINUSE && inUse?.())) throw err;
      step();
    }
  };
  setInt(sock, SOL.SOCKET, SOCKOPT.REUSEADDR, 1);
  if (e.local.port !== 0) retried(() => bindTo(sock, e.local));
  if (then) retried(then);
  setInt(sock, SOL.SOCKET, SOCKOPT.REUSEADDR, e.reuseaddr ? 1 : 0);
}

/** A raw socket (IPPROTO_RAW: the caller writes the IP header) of the process's network, as amber's. */
export function rawSocket(ctx: RestoreContext, family: number): number {
  return processSocket(ctx, family, SOCK_RAW, IPPROTO_RAW);
}

/** A socket made in the restored process (so of its network namespace), as amber's. */
export function processSocket(
  ctx: RestoreContext,
  family: number,
  type: number,
  protocol: number,
): number {
  const inj = ctx.injector;
  const fd = Number(inj.call("socket", NR.socket, family, type | O_CLOEXEC, protocol));
  try {
    return takeFd(ctx.pid, fd);
  } finally {
    inj.call("close", NR.close, fd);
  }
}

/**
 * The remote address of TCP socket `ino` of process `pid` as its network's
 * /proc/net/tcp{,6} shows it: getpeername() says ENOTCONN while a connect
 * is in progress.
 */
export function remoteFromProc(pid: number, ino: number, family: number): InetAddr | undefined {
  const file = `/proc/${pid}/net/${family === AF.INET ? "tcp" : "tcp6"}`;
  for (const line of Deno.readTextFileSync(file).split("\n").slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 10 || Number(f[9]) !== ino) continue;
    const [hex, port] = f[2].split(":");
    // Each 32-bit word of the address is printed in host (little-endian) order.
    const words = hex.match(/.{8}/g)!.map((w) => w.match(/../g)!.reverse().join(""));
    const raw = Uint8Array.from(words.join("").match(/../g)!.map((b) => parseInt(b, 16)));
    const sa = new Uint8Array(family === AF.INET ? 16 : 28);
    const v = new DataView(sa.buffer);
    v.setUint16(0, family, true);
    v.setUint16(2, parseInt(port, 16), false);
    sa.set(raw, family === AF.INET ? 4 : 8);
    return decodeAddr(sa);
  }
}
