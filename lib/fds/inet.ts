/**
 * What the inet socket kinds (tcp.ts, udp.ts) share: addresses in the
 * images, the integer options copied as they are, buffer sizes and
 * status flags, and binding again.
 */
import { z } from "zod";
import {
  AF,
  bindTo,
  getInt,
  identity,
  IP_TOS,
  IPV6_TCLASS,
  IPV6_V6ONLY,
  setInt,
  setStatusFlags,
  SOCKOPT,
  SOL,
  TCPOPT,
} from "../../ffi/inet.ts";
import { takeFd } from "../../ffi/socket.ts";
import { libc } from "../../ffi/libc.ts";
import { kindState } from "../context.ts";
import type { FdProbe } from "./kind.ts";

const LINK = /^socket:\[(\d+)\]$/;
const O_NONBLOCK = 0o4000;

export const Addr = z.object({
  family: z.union([z.literal(AF.INET), z.literal(AF.INET6)]),
  addr: z.string().max(64).regex(/^[0-9a-f.:]+$/),
  port: z.number().int().min(0).max(65535),
});

export const SockOpt = z.object({
  level: z.number().int(),
  option: z.number().int(),
  value: z.number(),
});

/** Integer options copied as they are: [level, option]. */
const SOCKET_OPTIONS: [number, number][] = [
  [SOL.SOCKET, SOCKOPT.REUSEPORT],
  [SOL.SOCKET, SOCKOPT.KEEPALIVE],
  [SOL.SOCKET, SOCKOPT.OOBINLINE],
  [SOL.SOCKET, SOCKOPT.BROADCAST],
];
export const TCP_OPTIONS: [number, number][] = [
  [SOL.TCP, TCPOPT.NODELAY],
  [SOL.TCP, TCPOPT.CORK],
  [SOL.TCP, TCPOPT.KEEPIDLE],
  [SOL.TCP, TCPOPT.KEEPINTVL],
  [SOL.TCP, TCPOPT.KEEPCNT],
  [SOL.TCP, TCPOPT.USER_TIMEOUT],
];
const V4_OPTIONS: [number, number][] = [[SOL.IP, IP_TOS]];
const V6_OPTIONS: [number, number][] = [[SOL.IPV6, IPV6_V6ONLY], [SOL.IPV6, IPV6_TCLASS]];

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
  options: z.array(SockOpt).max(32),
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

export function fmt(a?: { addr: string; port: number }): string {
  if (!a) return "?";
  return a.addr.includes(":") ? `[${a.addr}]:${a.port}` : `${a.addr}:${a.port}`;
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
export function inetFields(sock: number, family: number, extra: [number, number][]) {
  const list = [...SOCKET_OPTIONS, ...extra, ...(family === AF.INET ? V4_OPTIONS : V6_OPTIONS)];
  return {
    reuseaddr: getInt(sock, SOL.SOCKET, SOCKOPT.REUSEADDR) !== 0,
    sndbuf: getInt(sock, SOL.SOCKET, SOCKOPT.SNDBUF),
    rcvbuf: getInt(sock, SOL.SOCKET, SOCKOPT.RCVBUF),
    options: list.map(([level, option]) => ({ level, option, value: getInt(sock, level, option) })),
  };
}

/** Options that differ from a fresh socket's, set before bind (V6ONLY and REUSEPORT must be). */
export function applyOptions(sock: number, e: InetImage): void {
  for (const o of e.options) {
    if (getInt(sock, o.level, o.option) !== o.value) setInt(sock, o.level, o.option, o.value);
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
 * comes back once bound.
 */
export function bindAgain(sock: number, e: InetImage, then?: () => void): void {
  setInt(sock, SOL.SOCKET, SOCKOPT.REUSEADDR, 1);
  if (e.local.port !== 0) bindTo(sock, e.local);
  then?.();
  setInt(sock, SOL.SOCKET, SOCKOPT.REUSEADDR, e.reuseaddr ? 1 : 0);
}
