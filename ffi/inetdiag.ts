/**
 * TCP sockets in TIME_WAIT through NETLINK_SOCK_DIAG (inet_diag): listed
 * by local port, and ended with SOCK_DESTROY (what `ss -K` does), on a
 * netlink socket the caller made in the right network namespace.
 */
import { sockDiagExchange } from "./sockdiag.ts";

const IPPROTO_TCP = 6, TCP_TIME_WAIT = 6;
const SOCK_DIAG_BY_FAMILY = 20, SOCK_DESTROY = 21;
const NLM_F_REQUEST = 1, NLM_F_ACK = 4, NLM_F_DUMP = 0x300;
const ENOENT = 2;
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

/**
 * Ends the TIME_WAIT TCP sockets of `family` on local port `port` whose
 * local address is `addr` (4 or 16 bytes; all zero: any); returns how many.
 */
export function destroyTimeWait(nl: number, family: number, port: number, addr: Uint8Array) {
  const ids: Uint8Array[] = [];
  const dump = request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, family);
  sockDiagExchange(nl, dump, (v, at) => {
    // struct inet_diag_msg: family, state, timer, retrans, then the socket id.
    const id = new Uint8Array(v.buffer, v.byteOffset + at + 4, SOCKID_LEN).slice();
    const sport = (id[0] << 8) | id[1];
    const src = id.subarray(4, 4 + addr.length);
    const any = addr.every((b) => b === 0);
    if (
      v.getUint8(at + 1) === TCP_TIME_WAIT && sport === port &&
      (any || src.every((b, i) => b === addr[i]))
    ) {
      ids.push(id);
    }
  });
  for (const id of ids) {
    // ENOENT: it expired meanwhile.
    const destroy = request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, family, id);
    sockDiagExchange(nl, destroy, () => {}, [ENOENT]);
  }
  return ids.length;
}
