/**
 * What the kernel tells about unix sockets through NETLINK_SOCK_DIAG
 * (unix_diag): type, state, bound name, peer, pending connections, queue
 * lengths and shutdown state, for every unix socket of this network
 * namespace in one dump.
 */
import { addressOf, check, libc, SysError } from "./libc.ts";

const AF_NETLINK = 16, AF_UNIX = 1;
const SOCK_DGRAM = 2, SOCK_CLOEXEC = 0o2000000;
const NETLINK_SOCK_DIAG = 4;
const SOCK_DIAG_BY_FAMILY = 20;
const NLM_F_REQUEST = 1, NLM_F_DUMP = 0x300;
const NLMSG_ERROR = 2, NLMSG_DONE = 3;
const UDIAG_SHOW = { NAME: 1, VFS: 2, PEER: 4, ICONS: 8, RQLEN: 0x10 };
const ATTR = { NAME: 0, VFS: 1, PEER: 2, ICONS: 3, RQLEN: 4, SHUTDOWN: 6 };

/** One unix socket as unix_diag describes it. */
export interface UnixSocketInfo {
  ino: number;
  /** SOCK_STREAM 1, SOCK_DGRAM 2, SOCK_SEQPACKET 5. */
  type: number;
  /** TCP_ESTABLISHED 1 (connected), TCP_CLOSE 7 (unconnected), TCP_LISTEN 10. */
  state: number;
  /** Bound address as the kernel holds it: a path, or an abstract name starting with a 0 byte. */
  name?: Uint8Array;
  /** The bound file's inode and device, for path names. */
  vfs?: { ino: number; dev: number };
  /** Inode of the connected peer. */
  peer?: number;
  /** Inodes of connections waiting in a listener's backlog. */
  pending: number[];
  /** Receive queue: bytes queued (or a listener's backlog length) and its limit. */
  rqueue: number;
  wqueue: number;
  /** SHUT_RD 1 | SHUT_WR 2 as applied to this socket. */
  shutdown: number;
}

function request(): Uint8Array {
  const buf = new Uint8Array(40);
  const v = new DataView(buf.buffer);
  v.setUint32(0, 40, true);
  v.setUint16(4, SOCK_DIAG_BY_FAMILY, true);
  v.setUint16(6, NLM_F_REQUEST | NLM_F_DUMP, true);
  v.setUint32(8, 1, true);
  buf[16] = AF_UNIX;
  v.setUint32(20, 0xffffffff, true); // every state
  v.setUint32(
    28,
    UDIAG_SHOW.NAME | UDIAG_SHOW.VFS | UDIAG_SHOW.PEER | UDIAG_SHOW.ICONS | UDIAG_SHOW.RQLEN,
    true,
  );
  v.setUint32(32, 0xffffffff, true);
  v.setUint32(36, 0xffffffff, true);
  return buf;
}

function parseMessage(v: DataView, at: number, end: number): UnixSocketInfo {
  const info: UnixSocketInfo = {
    type: v.getUint8(at + 1),
    state: v.getUint8(at + 2),
    ino: v.getUint32(at + 4, true),
    pending: [],
    rqueue: 0,
    wqueue: 0,
    shutdown: 0,
  };
  for (let a = at + 16; a + 4 <= end;) {
    const len = v.getUint16(a, true), type = v.getUint16(a + 2, true);
    if (len < 4) break;
    const data = a + 4, size = len - 4;
    if (type === ATTR.NAME) {
      info.name = new Uint8Array(v.buffer.slice(data, data + size));
    } else if (type === ATTR.VFS) {
      info.vfs = { ino: v.getUint32(data, true), dev: v.getUint32(data + 4, true) };
    } else if (type === ATTR.PEER) {
      info.peer = v.getUint32(data, true);
    } else if (type === ATTR.ICONS) {
      for (let i = 0; i + 4 <= size; i += 4) info.pending.push(v.getUint32(data + i, true));
    } else if (type === ATTR.RQLEN) {
      info.rqueue = v.getUint32(data, true);
      info.wqueue = v.getUint32(data + 4, true);
    } else if (type === ATTR.SHUTDOWN) {
      info.shutdown = v.getUint8(data);
    }
    a += (len + 3) & ~3;
  }
  return info;
}

/**
 * Sends one NETLINK_SOCK_DIAG request on `fd` and hands each answer
 * message (the DataView over the whole buffer, where its body starts and
 * ends) to `each`, until the dump is done or the request acknowledged; an
 * error in `harmless` counts as an acknowledgement.
 */
export function sockDiagExchange(
  fd: number,
  req: Uint8Array,
  each: (v: DataView, at: number, end: number) => void,
  harmless: number[] = [],
): void {
  const dest = new Uint8Array(12);
  dest[0] = AF_NETLINK;
  check("sendto(sock_diag)", libc().sendto(fd, req, BigInt(req.length), 0, dest, 12));
  const buf = new Uint8Array(64 * 1024);
  const iov = new BigUint64Array([addressOf(buf), BigInt(buf.length)]);
  const msg = new BigUint64Array(7); // struct msghdr: only the iovec is set
  msg[2] = addressOf(iov);
  msg[3] = 1n;
  for (;;) {
    const n = Number(check("recvmsg(sock_diag)", libc().recvmsg(fd, msg, 0)));
    const v = new DataView(buf.buffer, 0, n);
    for (let at = 0; at + 16 <= n;) {
      const len = v.getUint32(at, true), type = v.getUint16(at + 4, true);
      if (type === NLMSG_DONE) return;
      if (type === NLMSG_ERROR) {
        const errno = -v.getInt32(at + 16, true);
        if (errno && !harmless.includes(errno)) throw new SysError("sock_diag", errno);
        return; // an acknowledgement
      }
      each(v, at + 16, at + len);
      at += (len + 3) & ~3;
    }
  }
}

/** Every unix socket of amber's network namespace, by inode. */
export function unixSockets(): Map<number, UnixSocketInfo> {
  const out = new Map<number, UnixSocketInfo>();
  const fd = check(
    "socket(AF_NETLINK)",
    libc().socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG),
  );
  try {
    sockDiagExchange(fd, request(), (v, at, end) => {
      const info = parseMessage(v, at, end);
      out.set(info.ino, info);
    });
    return out;
  } finally {
    libc().close(fd);
  }
}
