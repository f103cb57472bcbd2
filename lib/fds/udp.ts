/**
 * UDP sockets, IPv4 and IPv6: bound again to the same address and port,
 * connected again to the same peer, with their options and multicast
 * group memberships (any-source; a source filter is refused). Datagrams
 * waiting in the receive queue are peeked at dump with their senders'
 * addresses and handed to the restored socket in order, each as a whole
 * IP packet from its sender to the socket's own address (lib/net/datagram.ts),
 * before it is connected again (a connected socket takes only its peer's).
 * Corked data not yet sent is refused.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import {
  AF,
  connectTo,
  getInt,
  type InetAddr,
  joinGroup,
  localName,
  membership,
  outQueue,
  peekDatagrams,
  peerName,
  receiveMemory,
  sendPacket,
  setInt,
  SOCKOPT,
  SOL,
} from "../../ffi/inet.ts";
import { takeFd } from "../../ffi/socket.ts";
import { libc } from "../../ffi/libc.ts";
import { kindState, type RestoreContext, type TreeDumpState } from "../context.ts";
import { joinedGroups } from "../net/multicast.ts";
import { isMapped, udpPacket } from "../net/datagram.ts";
import { bytes } from "../images/codec.ts";
import { AmberError } from "../errors.ts";
import {
  Addr,
  applyOptions,
  bindAgain,
  fmt,
  InetFields,
  inetFields,
  inode,
  isInet,
  rawSocket,
  UDP_V4_OPTIONS,
  UDP_V6_OPTIONS,
} from "./inet.ts";
import { defineFdKind, type FdProbe, O_CLOEXEC } from "./kind.ts";

const SOCK_DGRAM = 2, IPPROTO_UDP = 17;
const SOL_UDP = 17, UDP_CORK = 1;
/** Most bytes and datagrams amber keeps for one socket's receive queue. */
const QUEUE_LIMIT = 64 * 1024 * 1024, QUEUE_COUNT = 65536;
/** How long restore waits for one handed-back datagram to reach the socket. */
const ARRIVAL_MS = 2000;

const Membership = z.object({
  /** SOL_IP or SOL_IPV6: an IPv6 socket may join IPv4 groups too. */
  level: z.number().int(),
  ifindex: z.number().int().min(1),
  group: Addr,
});
type MembershipImage = z.output<typeof Membership>;

const UdpEntry = z.object({
  kind: z.literal("udp"),
  ...InetFields,
  /** Multicast groups joined (any source), joined again on restore. */
  groups: z.array(Membership).max(1024).optional(),
  /** Datagrams waiting in the receive queue, oldest first, with their senders. */
  queue: z.array(z.object({ data: bytes.refine((b) => b.length <= 65507), from: Addr }))
    .max(QUEUE_COUNT).optional(),
  refusal: z.string().optional(),
});
type UdpImage = z.output<typeof UdpEntry>;

function describe(
  e: { local: { addr: string; port: number }; peer?: { addr: string; port: number } },
) {
  return e.peer ? `udp ${fmt(e.local)} -> ${fmt(e.peer)}` : `udp ${fmt(e.local)}`;
}

/**
 * The groups this socket joined, among those joined on the machine (read
 * once per dump); a source filter is refused (only any-source joins
 * come back).
 */
function memberships(
  tree: TreeDumpState,
  sock: number,
  family: number,
): { groups: MembershipImage[]; refusal?: string } {
  const all = kindState(tree.kinds, "udp multicast", joinedGroups);
  const groups: MembershipImage[] = [];
  for (const { ifindex, group } of all) {
    if (group.family === AF.INET6 && family !== AF.INET6) continue;
    const level = group.family === AF.INET ? SOL.IP : SOL.IPV6;
    const m = membership(sock, level, ifindex, group);
    if (!m) continue;
    if (m.mode !== 0 || m.sources !== 0) {
      return {
        groups,
        refusal: `multicast group ${group.addr} on interface ${ifindex} with a source filter: ` +
          "not supported yet",
      };
    }
    groups.push({ level, ifindex, group: group as MembershipImage["group"] });
  }
  return { groups };
}

/** A multicast or broadcast address, which a handed-back datagram must not be sent to. */
function isGroupAddress(a: InetAddr): boolean {
  const v4 = /(\d+)\.\d+\.\d+\.\d+$/.exec(a.addr);
  if (a.family === AF.INET || isMapped(a)) {
    return Number(v4?.[1]) >= 224 || a.addr.endsWith("255.255.255.255");
  }
  return a.addr.startsWith("ff");
}

/** The datagrams waiting in the socket's queue, or why they cannot be kept. */
function queueOf(sock: number, local: InetAddr): { queue?: QueuedImage[]; refusal?: string } {
  const queue = peekDatagrams(sock, QUEUE_LIMIT, QUEUE_COUNT);
  if (!queue) {
    return {
      refusal: `more than ${QUEUE_COUNT} datagrams or ${QUEUE_LIMIT} bytes wait in its receive ` +
        "queue: not supported yet",
    };
  }
  if (!queue.length) return {};
  if (isGroupAddress(local)) {
    return {
      refusal: "datagrams wait in the queue of a socket bound to a multicast or broadcast " +
        "address: not supported yet",
    };
  }
  return { queue: queue as QueuedImage[] };
}
type QueuedImage = { data: Uint8Array; from: z.input<typeof Addr> };

function refusalOf(sock: number): string | undefined {
  if (getInt(sock, SOL_UDP, UDP_CORK) && outQueue(sock) > 0) {
    return "corked data not yet sent: not supported yet";
  }
}

function dumpSocket(p: FdProbe): z.input<typeof UdpEntry> {
  const sock = takeFd(p.pid, p.fd);
  try {
    const family = getInt(sock, SOL.SOCKET, SOCKOPT.DOMAIN) as typeof AF.INET | typeof AF.INET6;
    const joined = memberships(p.tree, sock, family);
    const local = localName(sock);
    const queued = queueOf(sock, local);
    return {
      kind: "udp" as const,
      fd: p.fd,
      flags: p.flags,
      ino: inode(p.link)!,
      family,
      local: local as z.input<typeof Addr>,
      peer: peerName(sock) as z.input<typeof Addr> | undefined,
      ...inetFields(sock, family, [
        [SOL_UDP, UDP_CORK],
        ...(family === AF.INET ? UDP_V4_OPTIONS : UDP_V6_OPTIONS),
      ]),
      groups: joined.groups.length ? joined.groups : undefined,
      queue: queued.queue,
      refusal: refusalOf(sock) ?? joined.refusal ?? queued.refusal,
    };
  } finally {
    libc().close(sock);
  }
}

/**
 * Where a handed-back datagram goes: the socket's own address, or, for a
 * socket bound to any address, loopback (of the sender's family: an IPv6
 * socket may hold datagrams from IPv4 senders, as v4-mapped addresses).
 */
function destinationOf(e: UdpImage, v4: boolean): InetAddr {
  const local = e.local, port = local.port;
  const any = local.addr === "0.0.0.0" || local.addr === "::" || local.addr === "::ffff:0.0.0.0";
  const localV4 = local.family === AF.INET || isMapped(local);
  if (!any && localV4 === v4) {
    return localV4 ? { family: AF.INET, addr: local.addr.replace(/^::ffff:/i, ""), port } : local;
  }
  return v4
    ? { family: AF.INET, addr: "127.0.0.1", port }
    : { family: AF.INET6, addr: "::1", port };
}

/**
 * Hands the socket the datagrams that waited in its queue, in order: each
 * is sent from its sender's address and port to the socket's address, and
 * is waited for (the socket's receive memory grows) before the next goes,
 * so none overtakes another and one that cannot arrive fails the restore.
 */
function deliverQueue(ctx: RestoreContext, sock: number, e: UdpImage): void {
  if (!e.queue?.length) return;
  const raw = new Map<number, number>();
  // Room for all, whatever each packet's overhead here; the image's size comes back after.
  setInt(sock, SOL.SOCKET, SOCKOPT.RCVBUFFORCE, QUEUE_LIMIT);
  try {
    for (const [i, d] of (e.queue ?? []).entries()) {
      const v4 = d.from.family === AF.INET || isMapped(d.from);
      const family = v4 ? AF.INET : AF.INET6;
      if (!raw.has(family)) raw.set(family, rawSocket(ctx, family));
      const from = v4 ? { ...d.from, family, addr: d.from.addr.replace(/^::ffff:/i, "") } : d.from;
      const to = destinationOf(e, v4);
      const before = receiveMemory(sock);
      sendPacket(raw.get(family)!, udpPacket(from, to, d.data), to);
      const deadline = Date.now() + ARRIVAL_MS;
      while (receiveMemory(sock) <= before) {
        if (Date.now() > deadline) {
          throw new AmberError(`queued datagram ${i + 1} from ${fmt(d.from)} did not arrive`);
        }
      }
    }
  } finally {
    for (const fd of raw.values()) libc().close(fd);
  }
  setInt(sock, SOL.SOCKET, SOCKOPT.RCVBUFFORCE, e.rcvbuf >> 1);
}

function restoreSocket(ctx: RestoreContext, e: UdpImage): number {
  const fd = Number(
    ctx.injector.call("socket", NR.socket, e.family, SOCK_DGRAM | O_CLOEXEC, IPPROTO_UDP),
  );
  const sock = takeFd(ctx.pid, fd);
  try {
    applyOptions(sock, e);
    bindAgain(sock, e);
    for (const g of e.groups ?? []) joinGroup(sock, g.level, g.ifindex, g.group);
    deliverQueue(ctx, sock, e);
    if (e.peer) connectTo(sock, e.peer);
  } catch (err) {
    throw new AmberError(`${describe(e)}: ${err instanceof Error ? err.message : err}`);
  } finally {
    libc().close(sock);
  }
  return fd;
}

export const udpFd = defineFdKind({
  name: "udp",
  schema: UdpEntry,
  matches: (p: FdProbe) => isInet(p, SOCK_DGRAM, IPPROTO_UDP),
  dump: dumpSocket,
  unrestorable: (e) => e.refusal && `fd ${e.fd}: ${describe(e)}: ${e.refusal}`,
  netnsBound: describe,
  restore: restoreSocket,
});
