/**
 * Whole IP packets from a peer's address, sent on a raw socket (IPPROTO_RAW:
 * the header is ours) to a restored socket's own address: UDP datagrams
 * that waited in its queue (with a correct UDP checksum: IPv6 requires
 * one), and the TCP segments a half-closed connection must see again (the
 * peer's FIN, its ACK of ours).
 */
import { AF, encodeAddr, type InetAddr } from "../../ffi/inet.ts";

const IPPROTO_UDP = 17, IPPROTO_TCP = 6;

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

/** The pseudo-header the UDP and TCP checksums cover. */
function pseudoHeader(src: Uint8Array, dst: Uint8Array, protocol: number, len: number) {
  const v6 = src.length === 16;
  const pseudo = new Uint8Array(v6 ? 40 : 12);
  const p = new DataView(pseudo.buffer);
  pseudo.set(src, 0);
  pseudo.set(dst, src.length);
  if (v6) {
    p.setUint32(32, len);
    pseudo[39] = protocol;
  } else {
    pseudo[9] = protocol;
    p.setUint16(10, len);
  }
  return pseudo;
}

/** `payload` (a UDP or TCP segment) behind an IPv4 or IPv6 header from `src` to `dst`. */
function ipPacket(src: Uint8Array, dst: Uint8Array, protocol: number, payload: Uint8Array) {
  const v6 = src.length === 16;
  const head = new Uint8Array(v6 ? 40 : 20);
  const h = new DataView(head.buffer);
  if (v6) {
    h.setUint32(0, 0x60000000);
    h.setUint16(4, payload.length);
    head[6] = protocol;
    head[7] = 64;
    head.set(src, 8);
    head.set(dst, 24);
  } else {
    head[0] = 0x45;
    h.setUint16(2, head.length + payload.length);
    head[8] = 64;
    head[9] = protocol;
    head.set(src, 12);
    head.set(dst, 16);
    // The kernel fills in the header checksum (and an id) of a raw packet.
  }
  const packet = new Uint8Array(head.length + payload.length);
  packet.set(head);
  packet.set(payload, head.length);
  return packet;
}

function addressPair(from: InetAddr, to: InetAddr, what: string): [Uint8Array, Uint8Array] {
  const src = addressBytes(from), dst = addressBytes(to);
  if (src.length !== dst.length) throw new Error(`${what}: addresses of two families`);
  return [src, dst];
}

/**
 * The packet carrying `data` from `from` to `to` (both IPv4, given as
 * IPv4 or v4-mapped, or both IPv6); its family is the addresses'.
 */
export function udpPacket(from: InetAddr, to: InetAddr, data: Uint8Array): Uint8Array {
  const [src, dst] = addressPair(from, to, "udp packet");
  const udp = new Uint8Array(8 + data.length);
  const u = new DataView(udp.buffer);
  u.setUint16(0, from.port);
  u.setUint16(2, to.port);
  u.setUint16(4, udp.length);
  udp.set(data, 8);
  // A computed 0 is sent as all ones (0 means "no checksum" to IPv4).
  u.setUint16(6, checksum([pseudoHeader(src, dst, IPPROTO_UDP, udp.length), udp]) || 0xffff);
  return ipPacket(src, dst, IPPROTO_UDP, udp);
}

export const TCP_FLAG = { FIN: 0x01, ACK: 0x10 } as const;

/** What a TCP segment without data or options says. */
export interface TcpSegment {
  seq: number;
  ack: number;
  flags: number;
  /** The window field, as it goes on the wire (already scaled down). */
  window: number;
}

/**
 * A TCP segment without data or options from `from` to `to` (addresses as
 * for udpPacket): what a restored connection must see of its peer (a FIN,
 * an ACK) that the peer will not send again.
 */
export function tcpPacket(from: InetAddr, to: InetAddr, s: TcpSegment): Uint8Array {
  const [src, dst] = addressPair(from, to, "tcp packet");
  const tcp = new Uint8Array(20);
  const t = new DataView(tcp.buffer);
  t.setUint16(0, from.port);
  t.setUint16(2, to.port);
  t.setUint32(4, s.seq >>> 0);
  t.setUint32(8, s.ack >>> 0);
  tcp[12] = 5 << 4; // header length in words
  tcp[13] = s.flags;
  t.setUint16(14, Math.min(s.window, 0xffff));
  t.setUint16(16, checksum([pseudoHeader(src, dst, IPPROTO_TCP, tcp.length), tcp]));
  return ipPacket(src, dst, IPPROTO_TCP, tcp);
}
