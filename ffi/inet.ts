/**
 * Inet sockets seen from amber's own duplicate of them (ffi/socket.ts
 * takeFd): identity, addresses, options, TCP_INFO, and the TCP_REPAIR
 * calls that read and set a connection's sequence numbers, queues,
 * window and negotiated options (the kernel's interface CRIU uses).
 */
import { addressOf, check, lastErrno, libc, SysError } from "./libc.ts";

export const AF = { UNIX: 1, INET: 2, INET6: 10, NETLINK: 16, PACKET: 17 } as const;
export const SOL = { SOCKET: 1, IP: 0, IPV6: 41, TCP: 6 } as const;
export const SOCKOPT = {
  TYPE: 3,
  REUSEADDR: 2,
  KEEPALIVE: 9,
  BROADCAST: 6,
  OOBINLINE: 10,
  SNDBUF: 7,
  RCVBUF: 8,
  REUSEPORT: 15,
  PROTOCOL: 38,
  DOMAIN: 39,
  SNDBUFFORCE: 32,
  RCVBUFFORCE: 33,
} as const;
export const TCPOPT = {
  NODELAY: 1,
  MAXSEG: 2,
  CORK: 3,
  KEEPIDLE: 4,
  KEEPINTVL: 5,
  KEEPCNT: 6,
  INFO: 11,
  REPAIR: 19,
  REPAIR_QUEUE: 20,
  QUEUE_SEQ: 21,
  REPAIR_OPTIONS: 22,
  TIMESTAMP: 24,
  USER_TIMEOUT: 18,
  REPAIR_WINDOW: 29,
} as const;
export const IP_TOS = 1, IPV6_V6ONLY = 26, IPV6_TCLASS = 67;
export const TCP_STATES = [
  "",
  "ESTABLISHED",
  "SYN_SENT",
  "SYN_RECV",
  "FIN_WAIT1",
  "FIN_WAIT2",
  "TIME_WAIT",
  "CLOSE",
  "CLOSE_WAIT",
  "LAST_ACK",
  "LISTEN",
  "CLOSING",
] as const;
export const QUEUE = { NONE: 0, RECV: 1, SEND: 2 } as const;
const SIOCINQ = 0x541b, SIOCOUTQ = 0x5411, SIOCOUTQNSD = 0x894b;
const MSG_PEEK = 2, MSG_DONTWAIT = 0x40, O_NONBLOCK = 0o4000, EINPROGRESS = 115;

/** An address and port as a string and a number ("::ffff:1.2.3.4" for v4-mapped v6). */
export interface InetAddr {
  family: number;
  addr: string;
  port: number;
  /** sin6_scope_id: the interface index of a link-local IPv6 address. */
  scope?: number;
}

export function getInt(sock: number, level: number, option: number): number {
  const val = new Int32Array(1), len = new Uint32Array([4]);
  check(`getsockopt(${level}, ${option})`, libc().getsockopt(sock, level, option, val, len));
  return val[0];
}

export function setInt(sock: number, level: number, option: number, value: number): void {
  const val = new Int32Array([value]);
  check(`setsockopt(${level}, ${option})`, libc().setsockopt(sock, level, option, val, 4));
}

export function getRaw(sock: number, level: number, option: number, size: number): Uint8Array {
  const val = new Uint8Array(size), len = new Uint32Array([size]);
  check(`getsockopt(${level}, ${option})`, libc().getsockopt(sock, level, option, val, len));
  return val.subarray(0, len[0]);
}

export function setRaw(sock: number, level: number, option: number, val: Uint8Array): void {
  check(
    `setsockopt(${level}, ${option})`,
    libc().setsockopt(sock, level, option, val, val.length),
  );
}

/** The socket's family, type and protocol (SO_DOMAIN, SO_TYPE, SO_PROTOCOL). */
export function identity(sock: number): { family: number; type: number; protocol: number } {
  return {
    family: getInt(sock, SOL.SOCKET, SOCKOPT.DOMAIN),
    type: getInt(sock, SOL.SOCKET, SOCKOPT.TYPE),
    protocol: getInt(sock, SOL.SOCKET, SOCKOPT.PROTOCOL),
  };
}

/** A sockaddr_in / sockaddr_in6 as an InetAddr. */
export function decodeAddr(b: Uint8Array): InetAddr {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const family = v.getUint16(0, true), port = v.getUint16(2, false);
  if (family === AF.INET) return { family, port, addr: [...b.subarray(4, 8)].join(".") };
  const words = Array.from({ length: 8 }, (_, i) => v.getUint16(8 + 2 * i, false).toString(16));
  const mapped = words.slice(0, 5).every((w) => w === "0") && words[5] === "ffff";
  const addr = mapped ? `::ffff:${[...b.subarray(20, 24)].join(".")}` : compressV6(words);
  const scope = b.byteLength >= 28 ? v.getUint32(24, true) : 0;
  return scope ? { family, port, addr, scope } : { family, port, addr };
}

function compressV6(words: string[]): string {
  // The longest run of two or more zero words becomes "::".
  let best = -1, bestLen = 1;
  for (let i = 0; i < 8; i++) {
    let n = 0;
    while (i + n < 8 && words[i + n] === "0") n++;
    if (n > bestLen) [best, bestLen] = [i, n];
  }
  if (best < 0) return words.join(":");
  return `${words.slice(0, best).join(":")}::${words.slice(best + bestLen).join(":")}`;
}

/** sockaddr_in / sockaddr_in6 for an address as decodeAddr writes it. */
export function encodeAddr(a: InetAddr): Uint8Array {
  const b = new Uint8Array(a.family === AF.INET ? 16 : 28);
  const v = new DataView(b.buffer);
  v.setUint16(0, a.family, true);
  v.setUint16(2, a.port, false);
  if (a.family === AF.INET) {
    b.set(a.addr.split(".").map(Number), 4);
    return b;
  }
  let text = a.addr;
  const v4 = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(text);
  if (v4) {
    b.set(v4.slice(1).map(Number), 20);
    text = text.slice(0, v4.index) + "0:0";
  }
  const [head, tail] = text.split("::");
  const h = head ? head.split(":") : [], t = tail !== undefined && tail ? tail.split(":") : [];
  const words = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill("0"), ...t];
  words.forEach((w, i) => {
    if (!(v4 && i >= 6)) v.setUint16(8 + 2 * i, parseInt(w, 16), false);
  });
  v.setUint32(24, a.scope ?? 0, true);
  return b;
}

function nameOf(sock: number, peer: boolean): InetAddr | undefined {
  const buf = new Uint8Array(128), len = new Uint32Array([128]);
  const r = peer ? libc().getpeername(sock, buf, len) : libc().getsockname(sock, buf, len);
  if (r === -1) {
    const errno = lastErrno();
    if (peer && errno === 107) return undefined; // ENOTCONN
    throw new SysError(peer ? "getpeername" : "getsockname", errno);
  }
  return decodeAddr(buf.subarray(0, len[0]));
}

export const localName = (sock: number) => nameOf(sock, false)!;
export const peerName = (sock: number) => nameOf(sock, true);

export function bindTo(sock: number, a: InetAddr): void {
  const addr = encodeAddr(a);
  check(`bind ${a.addr}:${a.port}`, libc().bind(sock, addr, addr.length));
}

export function connectTo(sock: number, a: InetAddr): void {
  const addr = encodeAddr(a);
  check(`connect ${a.addr}:${a.port}`, libc().connect(sock, addr, addr.length));
}

/** A non-blocking connect: starts the handshake (EINPROGRESS), or fails. */
export function connectStart(sock: number, a: InetAddr): void {
  const flags = check("fcntl(F_GETFL)", libc().fcntl(sock, 3, 0n));
  setStatusFlags(sock, flags | O_NONBLOCK);
  try {
    const addr = encodeAddr(a);
    if (libc().connect(sock, addr, addr.length) === -1) {
      const errno = lastErrno();
      if (errno !== EINPROGRESS) throw new SysError(`connect ${a.addr}:${a.port}`, errno);
    }
  } finally {
    setStatusFlags(sock, flags);
  }
}

export function listenOn(sock: number, backlog: number): void {
  check("listen", libc().listen(sock, backlog));
}

/** The start of struct tcp_info. */
export interface TcpInfo {
  state: number;
  /** TCPI_OPT_*: 1 timestamps, 2 SACK, 4 window scaling. */
  options: number;
  sndWscale: number;
  rcvWscale: number;
  /** For a listener: the connections waiting to be accepted. */
  unacked: number;
  /** For a listener: its backlog. */
  sacked: number;
  /** Segments sent and received (both 0 on a socket that never connected, or was disconnected). */
  segsOut: number;
  segsIn: number;
}

export function tcpInfo(sock: number): TcpInfo {
  const b = getRaw(sock, SOL.TCP, TCPOPT.INFO, 144);
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  return {
    state: b[0],
    options: b[5],
    sndWscale: b[6] & 0xf,
    rcvWscale: b[6] >> 4,
    unacked: v.getUint32(24, true),
    sacked: v.getUint32(28, true),
    segsOut: v.getUint32(136, true),
    segsIn: v.getUint32(140, true),
  };
}

function ioctlInt(sock: number, request: number, name: string): number {
  const val = new Int32Array(1);
  check(name, libc().ioctl(sock, BigInt(request), val));
  return val[0];
}

/** Bytes in the receive queue, the send queue, and the part of the send queue never sent. */
export function queueSizes(sock: number): { inq: number; outq: number; unsent: number } {
  return {
    inq: ioctlInt(sock, SIOCINQ, "ioctl(SIOCINQ)"),
    outq: ioctlInt(sock, SIOCOUTQ, "ioctl(SIOCOUTQ)"),
    unsent: ioctlInt(sock, SIOCOUTQNSD, "ioctl(SIOCOUTQNSD)"),
  };
}

/** Repair mode on (1) or off (0: the kernel sends a window probe; -1: it does not). */
export function setRepair(sock: number, mode: 1 | 0 | -1): void {
  setInt(sock, SOL.TCP, TCPOPT.REPAIR, mode);
}

/** In repair mode: the sequence number after the last byte of a queue. */
export function queueSeq(sock: number, queue: number): number {
  setInt(sock, SOL.TCP, TCPOPT.REPAIR_QUEUE, queue);
  return getInt(sock, SOL.TCP, TCPOPT.QUEUE_SEQ) >>> 0;
}

/** In repair mode, before connect: where a queue's sequence numbers start. */
export function setQueueSeq(sock: number, queue: number, seq: number): void {
  setInt(sock, SOL.TCP, TCPOPT.REPAIR_QUEUE, queue);
  setInt(sock, SOL.TCP, TCPOPT.QUEUE_SEQ, seq | 0);
}

/** In repair mode: `len` bytes of a queue, peeked (nothing is consumed). */
export function peekRepairQueue(sock: number, queue: number, len: number): Uint8Array {
  setInt(sock, SOL.TCP, TCPOPT.REPAIR_QUEUE, queue);
  const buf = new Uint8Array(len);
  if (!len) return buf;
  const n = Number(libc().recvfrom(sock, buf, BigInt(len), MSG_PEEK | MSG_DONTWAIT, null, null));
  if (n < 0) throw new SysError("recv(MSG_PEEK) of a repair queue", lastErrno());
  if (n !== len) throw new Error(`repair queue ${queue}: peeked ${n} of ${len} bytes`);
  return buf;
}

/** Sends all of `data` without blocking; throws if the socket takes less. */
export function sendAll(sock: number, data: Uint8Array, what: string, waitMs = 0): void {
  const until = performance.now() + waitMs;
  for (let at = 0; at < data.length;) {
    const part = data.subarray(at, at + 64 * 1024);
    const n = Number(libc().sendto(sock, part, BigInt(part.length), MSG_DONTWAIT, null, 0));
    if (n < 0) {
      const errno = lastErrno();
      // A full send buffer drains as the peer reads: wait for room, up to `waitMs` in all.
      if (errno === EAGAIN && waitWritable(sock, until - performance.now())) continue;
      throw new SysError(`${what}: send (${at} of ${data.length} bytes in)`, errno);
    }
    at += n;
  }
}

const EAGAIN = 11, POLLOUT = 4;

/** Whether `sock` becomes writable within `ms` (none left: false at once). */
function waitWritable(sock: number, ms: number): boolean {
  if (ms <= 0) return false;
  const pfd = new Uint8Array(8);
  new DataView(pfd.buffer).setInt32(0, sock, true);
  new DataView(pfd.buffer).setInt16(4, POLLOUT, true);
  return libc().poll(pfd, 1n, Math.ceil(ms)) > 0;
}

/** In repair mode: refills a queue with bytes (recv: as if received; send: as if sent). */
export function fillRepairQueue(sock: number, queue: number, data: Uint8Array): void {
  setInt(sock, SOL.TCP, TCPOPT.REPAIR_QUEUE, queue);
  sendAll(sock, data, queue === QUEUE.RECV ? "receive queue" : "send queue");
}

export interface RepairWindow {
  sndWl1: number;
  sndWnd: number;
  maxWindow: number;
  rcvWnd: number;
  rcvWup: number;
}

export function repairWindow(sock: number): RepairWindow {
  const b = getRaw(sock, SOL.TCP, TCPOPT.REPAIR_WINDOW, 20);
  const w = new Uint32Array(b.slice().buffer);
  return { sndWl1: w[0], sndWnd: w[1], maxWindow: w[2], rcvWnd: w[3], rcvWup: w[4] };
}

export function setRepairWindow(sock: number, w: RepairWindow): void {
  const a = new Uint32Array([w.sndWl1, w.sndWnd, w.maxWindow, w.rcvWnd, w.rcvWup]);
  setRaw(sock, SOL.TCP, TCPOPT.REPAIR_WINDOW, new Uint8Array(a.buffer));
}

const TCPOPT_CODE = { MAXSEG: 2, WINDOW: 3, SACK_PERM: 4, TIMESTAMP: 8 };

/** In repair mode, once connected: the options the handshake had negotiated. */
export function setRepairOptions(
  sock: number,
  o: { mss: number; sack: boolean; timestamps: boolean; wscale?: { snd: number; rcv: number } },
): void {
  const pairs = [[TCPOPT_CODE.MAXSEG, o.mss]];
  if (o.wscale) pairs.push([TCPOPT_CODE.WINDOW, o.wscale.snd | (o.wscale.rcv << 16)]);
  if (o.sack) pairs.push([TCPOPT_CODE.SACK_PERM, 0]);
  if (o.timestamps) pairs.push([TCPOPT_CODE.TIMESTAMP, 0]);
  const a = new Uint32Array(pairs.flat());
  setRaw(sock, SOL.TCP, TCPOPT.REPAIR_OPTIONS, new Uint8Array(a.buffer));
}

/** shutdown(SHUT_WR); in repair mode with the send queue selected, the FIN is queued as already sent. */
export function shutdownWrite(sock: number): void {
  check("shutdown(SHUT_WR)", libc().shutdown(sock, 1));
}

/** Another descriptor of amber's for the same socket (F_DUPFD_CLOEXEC). */
export function dupSocket(sock: number): number {
  return check("fcntl(F_DUPFD_CLOEXEC)", libc().fcntl(sock, 1030, 3n));
}

/** Sets the open file's status flags (shared with the process's descriptor). */
export function setStatusFlags(sock: number, flags: number): void {
  check("fcntl(F_SETFL)", libc().fcntl(sock, 4, BigInt(flags)));
}

/** Whether a datagram waits in the socket's receive queue (peeked, not taken). */
export function hasDatagram(sock: number): boolean {
  const buf = new Uint8Array(1);
  const n = Number(libc().recvfrom(sock, buf, 1n, MSG_PEEK | MSG_DONTWAIT | 0x20, null, null));
  if (n >= 0) return true;
  const errno = lastErrno();
  if (errno === 11) return false; // EAGAIN
  throw new SysError("recv(MSG_PEEK)", errno);
}

/** Bytes the socket holds on its way out (a UDP socket: corked data not yet sent). */
export function outQueue(sock: number): number {
  return ioctlInt(sock, SIOCOUTQ, "ioctl(SIOCOUTQ)");
}

const MCAST_JOIN_GROUP = 42, MCAST_MSFILTER = 48;
const EADDRNOTAVAIL = 99, ENODEV = 19, EINVAL = 22;

/** struct group_req / group_filter's head: u32 interface, padding, sockaddr_storage group. */
function groupStruct(ifindex: number, group: InetAddr, size: number): Uint8Array {
  const b = new Uint8Array(size);
  new DataView(b.buffer).setUint32(0, ifindex, true);
  b.set(encodeAddr(group), 8);
  return b;
}

/**
 * Whether the socket joined `group` on interface `ifindex`, with its
 * source filter (mode 0 exclude, 1 include; number of sources):
 * getsockopt(MCAST_MSFILTER) only reads, and fails for a group the
 * socket has not joined there.
 */
export function membership(
  sock: number,
  level: number,
  ifindex: number,
  group: InetAddr,
): { mode: number; sources: number } | undefined {
  const buf = groupStruct(ifindex, group, 272), len = new Uint32Array([272]);
  if (libc().getsockopt(sock, level, MCAST_MSFILTER, buf, len) === -1) {
    const errno = lastErrno();
    if ([EADDRNOTAVAIL, ENODEV, EINVAL].includes(errno)) return undefined;
    throw new SysError("getsockopt(MCAST_MSFILTER)", errno);
  }
  const v = new DataView(buf.buffer);
  return { mode: v.getUint32(136, true), sources: v.getUint32(140, true) };
}

/** setsockopt(MCAST_JOIN_GROUP): joins `group` on interface `ifindex`, any source. */
export function joinGroup(sock: number, level: number, ifindex: number, group: InetAddr): void {
  setRaw(sock, level, MCAST_JOIN_GROUP, groupStruct(ifindex, group, 136));
}

const SO_PEEK_OFF = 42, SO_MEMINFO = 55, MSG_TRUNC = 0x20;

/** One datagram waiting in a UDP socket's receive queue, with its sender. */
export interface QueuedDatagram {
  data: Uint8Array;
  from: InetAddr;
}

/**
 * Peeks every datagram waiting in UDP socket `sock`, oldest first, with
 * its source address, at a moving SO_PEEK_OFF (the socket's own offset is
 * put back); undefined if more than `limit` bytes or `count` datagrams wait.
 */
export function peekDatagrams(
  sock: number,
  limit: number,
  count: number,
): QueuedDatagram[] | undefined {
  const saved = getInt(sock, SOL.SOCKET, SO_PEEK_OFF);
  const out: QueuedDatagram[] = [];
  const buf = new Uint8Array(65536), name = new Uint8Array(28);
  const iov = new BigUint64Array([addressOf(buf), BigInt(buf.length)]);
  let total = 0;
  try {
    for (;;) {
      setInt(sock, SOL.SOCKET, SO_PEEK_OFF, total);
      // struct msghdr: name, namelen, iov, iovlen, control, controllen, flags
      const msg = new BigUint64Array([addressOf(name), 28n, addressOf(iov), 1n, 0n, 0n, 0n]);
      const n = Number(libc().recvmsg(sock, msg, MSG_PEEK | MSG_DONTWAIT | MSG_TRUNC));
      if (n < 0) {
        const errno = lastErrno();
        if (errno === 11) return out; // EAGAIN: all peeked
        throw new SysError("recvmsg(MSG_PEEK)", errno);
      }
      if (n > buf.length || out.length >= count || total + n > limit) return undefined;
      out.push({ data: buf.slice(0, n), from: decodeAddr(name.subarray(0, Number(msg[1]))) });
      total += n;
    }
  } finally {
    setInt(sock, SOL.SOCKET, SO_PEEK_OFF, saved);
  }
}

/** Bytes the socket's receive queue holds (SO_MEMINFO's rmem_alloc). */
export function receiveMemory(sock: number): number {
  return new DataView(getRaw(sock, SOL.SOCKET, SO_MEMINFO, 36).slice().buffer).getUint32(0, true);
}

/** Sends a whole IP packet (header included) on raw socket `sock` towards `to`. */
export function sendPacket(sock: number, packet: Uint8Array, to: InetAddr): void {
  const addr = encodeAddr({ ...to, port: 0 });
  const n = Number(libc().sendto(sock, packet, BigInt(packet.length), 0, addr, addr.length));
  if (n < 0) throw new SysError("sendto(raw)", lastErrno());
  if (n !== packet.length) throw new Error(`sendto(raw): ${n} of ${packet.length} bytes`);
}
