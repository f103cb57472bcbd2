/**
 * Looking into a socket of another process without disturbing it: amber
 * takes its own descriptor for the socket (pidfd_getfd) and reads options
 * and the receive queue with MSG_PEEK at a moving SO_PEEK_OFF, then puts
 * the socket's peek offset back.
 */
import { NR } from "./inject.ts";
import { addressOf, check, lastErrno, libc, rawSyscall, SysError } from "./libc.ts";

const SOL_SOCKET = 1;
export const SO = {
  TYPE: 3,
  SNDBUF: 7,
  RCVBUF: 8,
  PASSCRED: 16,
  PASSSEC: 34,
  DOMAIN: 39,
  PEEK_OFF: 42,
} as const;
const MSG_PEEK = 2, MSG_TRUNC = 0x20, MSG_DONTWAIT = 0x40;
const SOCK_STREAM = 1;
const EAGAIN = 11;
const MAX_MESSAGES = 65536;

/** A duplicate, in amber, of fd `fd` of `pid` (the same open file). */
export function takeFd(pid: number, fd: number): number {
  const pidfd = Number(rawSyscall(`pidfd_open ${pid}`, NR.pidfd_open, pid, 0));
  try {
    return Number(rawSyscall(`pidfd_getfd ${pid}:${fd}`, NR.pidfd_getfd, pidfd, fd, 0));
  } finally {
    libc().close(pidfd);
  }
}

/**
 * Takes the first connection waiting in the backlog of listener `sock`
 * (amber's duplicate), as amber's own descriptor; undefined when none
 * waits. Irreversible: nothing puts a connection back into a backlog.
 */
export function acceptWaiting(sock: number): number | undefined {
  const SOCK_NONBLOCK = 0o4000, SOCK_CLOEXEC = 0o2000000;
  try {
    return Number(rawSyscall("accept4", NR.accept4, sock, 0, 0, SOCK_NONBLOCK | SOCK_CLOEXEC));
  } catch (e) {
    if (e instanceof SysError && e.errno === EAGAIN) return undefined;
    throw e;
  }
}

/** Whether an out-of-band byte (MSG_OOB, a unix or TCP stream's) waits in `sock`'s queue. */
export function hasOobByte(sock: number): boolean {
  const MSG_OOB = 1, EINVAL = 22, EOPNOTSUPP = 95;
  const n = Number(
    libc().recvfrom(sock, new Uint8Array(1), 1n, MSG_OOB | MSG_PEEK | MSG_DONTWAIT, null, null),
  );
  if (n >= 0) return true;
  const errno = lastErrno();
  // None (or already read, or inline), or a kernel without unix MSG_OOB.
  if (errno === EINVAL || errno === EAGAIN || errno === EOPNOTSUPP) return false;
  throw new SysError("recv(MSG_OOB | MSG_PEEK)", errno);
}

export function getIntOption(sock: number, option: number): number {
  const val = new Int32Array(1), len = new Uint32Array([4]);
  check(`getsockopt(${option})`, libc().getsockopt(sock, SOL_SOCKET, option, val, len));
  return val[0];
}

export function setIntOption(sock: number, option: number, value: number): void {
  check(
    `setsockopt(${option})`,
    libc().setsockopt(sock, SOL_SOCKET, option, new Int32Array([value]), 4),
  );
}

/** A receive queue as peeked: the bytes of a stream, or each message of a datagram socket. */
export interface PeekedQueue {
  messages: Uint8Array[];
  /** Some message carries ancillary data (SCM_RIGHTS, SCM_CREDENTIALS). */
  ancillary: boolean;
}

/** Peeks every byte (stream) or message waiting in `sock`'s receive queue; at most `limit` bytes. */
export function peekQueue(sock: number, type: number, limit: number): PeekedQueue {
  const saved = getIntOption(sock, SO.PEEK_OFF);
  setIntOption(sock, SO.PEEK_OFF, 0);
  const out: PeekedQueue = { messages: [], ancillary: false };
  try {
    let buf = new Uint8Array(64 * 1024);
    const control = new Uint8Array(512);
    let total = 0;
    while (total <= limit && out.messages.length < MAX_MESSAGES) {
      const iov = new BigUint64Array([addressOf(buf), BigInt(buf.length)]);
      // struct msghdr: name, namelen, iov, iovlen, control, controllen, flags
      const msg = new BigUint64Array([0n, 0n, addressOf(iov), 1n, addressOf(control), 512n, 0n]);
      // MSG_TRUNC: a datagram's real length (on a stream it would discard).
      const flags = MSG_PEEK | MSG_DONTWAIT | (type === SOCK_STREAM ? 0 : MSG_TRUNC);
      const n = Number(libc().recvmsg(sock, msg, flags));
      if (n < 0) {
        const errno = lastErrno();
        if (errno === EAGAIN) break;
        throw new SysError("recvmsg(MSG_PEEK)", errno);
      }
      if (msg[5] > 0n) out.ancillary = true;
      if (type !== SOCK_STREAM && n > buf.length) {
        // A datagram larger than the buffer: peek it again whole (the offset did not move).
        buf = new Uint8Array(n);
        setIntOption(sock, SO.PEEK_OFF, total);
        continue;
      }
      if (n === 0 && type === SOCK_STREAM) break; // end of stream: the peer shut down
      out.messages.push(buf.slice(0, Math.min(n, buf.length)));
      total += n;
    }
    if (type === SOCK_STREAM && out.messages.length > 1) {
      const all = new Uint8Array(total);
      let at = 0;
      for (const m of out.messages) {
        all.set(m, at);
        at += m.length;
      }
      out.messages = [all];
    }
    return out;
  } finally {
    setIntOption(sock, SO.PEEK_OFF, saved);
  }
}
