/**
 * UDP datagrams as whole IP packets, for handing a restored socket the
 * datagrams that waited in its queue with their senders' addresses: a raw
 * socket (IPPROTO_RAW: the header is ours) sends them to the socket's own
 * address, with a correct UDP checksum (IPv6 requires one).
 */
import { AF, encodeAddr, type InetAddr } from "../../ffi/inet.ts";

const IPPROTO_UDP = 17;

/** The address bytes of `a`: 4 for IPv4 or a v4-mapped IPv6 address, 16 for IPv6. */
export function addressBytes(a: InetAddr): Uint8Array {
  const raw = encodeAddr({ ...a, port: 0 });
  if (a.family === AF.INET) return raw.slice(4, 8);
  return isMapped(a) ? raw.slice(20, 24) : raw.slice(8, 24);
}

/** An IPv6 address that stands for an IPv4 one (::ffff:a.b.c.d). */
export function isMapped(a: InetAddr): boolean {
  return a.family === AF.INET6 && /^::ffff:\d+\.\d+\.\d+\.\d+$/i.test(a.addr);
}

/** The Internet checksum (one's complement of the one's complement sum) of `parts`. */
function checksum(parts: Uint8Array[]): number {
  let sum = 0, odd = -1;
  for (const p of parts) {
    for (const b of p) {
      if (odd < 0) odd = b;
      else {
        sum += (odd << 8) | b;
        odd = -1;
      }
    }
  }
  if (odd >= 0) sum += odd << 8;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

/**
 * The packet carrying `data` from `from` to `to` (both IPv4, given as
 * IPv4 or v4-mapped, or both IPv6); its family is the addresses'.
 */
export function udpPacket(from: InetAddr, to: InetAddr, data: Uint8Array): Uint8Array {
  const src = addressBytes(from), dst = addressBytes(to);
  if (src.length !== dst.length) throw new Error("udp packet: addresses of two families");
  const udp = new Uint8Array(8 + data.length);
  const u = new DataView(udp.buffer);
  u.setUint16(0, from.port);
  u.setUint16(2, to.port);
  u.setUint16(4, udp.length);
  udp.set(data, 8);
  const v6 = src.length === 16;
  const pseudo = new Uint8Array(v6 ? 40 : 12);
  const p = new DataView(pseudo.buffer);
  pseudo.set(src, 0);
  pseudo.set(dst, src.length);
  if (v6) {
    p.setUint32(32, udp.length);
    pseudo[39] = IPPROTO_UDP;
  } else {
    pseudo[9] = IPPROTO_UDP;
    p.setUint16(10, udp.length);
  }
  // A computed 0 is sent as all ones (0 means "no checksum" to IPv4).
  u.setUint16(6, checksum([pseudo, udp]) || 0xffff);
  const head = new Uint8Array(v6 ? 40 : 20);
  const h = new DataView(head.buffer);
  if (v6) {
    h.setUint32(0, 0x60000000);
    h.setUint16(4, udp.length);
    head[6] = IPPROTO_UDP;
    head[7] = 64;
    head.set(src, 8);
    head.set(dst, 24);
  } else {
    head[0] = 0x45;
    h.setUint16(2, head.length + udp.length);
    head[8] = 64;
    head[9] = IPPROTO_UDP;
    head.set(src, 12);
    head.set(dst, 16);
    // The kernel fills in the header checksum (and an id) of a raw packet.
  }
  const packet = new Uint8Array(head.length + udp.length);
  packet.set(head);
  packet.set(udp, head.length);
  return packet;
}
