/**
 * TCP sockets in TIME_WAIT through NETLINK_SOCK_DIAG (inet_diag): listed
 * by local port, and ended with SOCK_DESTROY (what `ss -K` does), on a
 * netlink socket the caller made in the right network namespace.
 */
import { addressOf, check, libc, SysError } from "./libc.ts";

const AF_NETLINK = 16, IPPROTO_TCP = 6, TCP_TIME_WAIT = 6;
const SOCK_DIAG_BY_FAMILY = 20, SOCK_DESTROY = 21;
const NLM_F_REQUEST = 1, NLM_F_ACK = 4, NLM_F_DUMP = 0x300;
const NLMSG_ERROR = 2, NLMSG_DONE = 3, ENOENT = 2;
/** struct inet_diag_sockid: ports, addresses, interface, cookie. */
const SOCKID_LEN = 48;

/** nlmsghdr + inet_diag_req_v2 for TIME_WAIT TCP sockets of `family`, with socket id `id`. */
function request(type: number, flags: number, family: number, id?: Uint8Array): Uint8Array {
  const buf = new Uint8Array(16 + 8 + SOCKID_LEN);
  const v = new DataView(buf.buffer);
  v.setUint32(0, buf.length, true);
  v.setUint16(4, type, true);
  v.setUint16(6, flags, true);
  v.setUint32(8, 1, true);
  buf[16] = family;
  buf[17] = IPPROTO_TCP;
  v.setUint32(20, 1 << TCP_TIME_WAIT, true);
  if (id) buf.set(id, 24);
  return buf;
}

/** Sends `req` and hands every answer message (type, body) to `each` until DONE or the ack. */
function exchange(
  nl: number,
  req: Uint8Array,
  each: (type: number, body: DataView) => void,
  harmless: number[] = [],
) {
  const dest = new Uint8Array(12);
  dest[0] = AF_NETLINK;
  check("sendto(inet_diag)", libc().sendto(nl, req, BigInt(req.length), 0, dest, 12));
  const buf = new Uint8Array(64 * 1024);
  const iov = new BigUint64Array([addressOf(buf), BigInt(buf.length)]);
  const msg = new BigUint64Array(7); // struct msghdr: only the iovec is set
  msg[2] = addressOf(iov);
  msg[3] = 1n;
  for (;;) {
    const n = Number(check("recvmsg(inet_diag)", libc().recvmsg(nl, msg, 0)));
    for (let at = 0; at + 16 <= n;) {
      const len = new DataView(buf.buffer, at, 16).getUint32(0, true);
      const type = new DataView(buf.buffer, at, 16).getUint16(4, true);
      if (type === NLMSG_DONE) return;
      const body = new DataView(buf.buffer, at + 16, len - 16);
      if (type === NLMSG_ERROR) {
        const errno = -body.getInt32(0, true);
        if (errno && !harmless.includes(errno)) throw new SysError("inet_diag", errno);
        return; // the ack
      }
      each(type, body);
      at += (len + 3) & ~3;
    }
  }
}

/**
 * Ends the TIME_WAIT TCP sockets of `family` on local port `port` whose
 * local address is `addr` (4 or 16 bytes; all zero: any); returns how many.
 */
export function destroyTimeWait(nl: number, family: number, port: number, addr: Uint8Array) {
  const ids: Uint8Array[] = [];
  exchange(nl, request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, family), (_, body) => {
    // struct inet_diag_msg: family, state, timer, retrans, then the socket id.
    const id = new Uint8Array(body.buffer, body.byteOffset + 4, SOCKID_LEN).slice();
    const sport = (id[0] << 8) | id[1];
    const src = id.subarray(4, 4 + addr.length);
    const any = addr.every((b) => b === 0);
    if (
      body.getUint8(1) === TCP_TIME_WAIT && sport === port &&
      (any || src.every((b, i) => b === addr[i]))
    ) {
      ids.push(id);
    }
  });
  for (const id of ids) {
    // ENOENT: it expired meanwhile.
    exchange(nl, request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, family, id), () => {}, [ENOENT]);
  }
  return ids.length;
}
