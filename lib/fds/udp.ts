/**
 * UDP sockets, IPv4 and IPv6: bound again to the same address and port,
 * connected again to the same peer, with their options and multicast
 * group memberships (any-source; a source filter is refused). A datagram
 * waiting in the receive queue is refused rather than lost: sending it
 * again would need its sender's address, which amber cannot bind to.
 * So is corked data not yet sent.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import {
  AF,
  connectTo,
  getInt,
  hasDatagram,
  joinGroup,
  localName,
  membership,
  outQueue,
  peerName,
  SOCKOPT,
  SOL,
} from "../../ffi/inet.ts";
import { takeFd } from "../../ffi/socket.ts";
import { libc } from "../../ffi/libc.ts";
import { kindState, type RestoreContext, type TreeDumpState } from "../context.ts";
import { joinedGroups } from "../net/multicast.ts";
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
  UDP_V4_OPTIONS,
  UDP_V6_OPTIONS,
} from "./inet.ts";
import { defineFdKind, type FdProbe, O_CLOEXEC } from "./kind.ts";

const SOCK_DGRAM = 2, IPPROTO_UDP = 17;
const SOL_UDP = 17, UDP_CORK = 1;

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

function refusalOf(sock: number): string | undefined {
  if (hasDatagram(sock)) return "datagrams are waiting in its receive queue: not supported yet";
  if (getInt(sock, SOL_UDP, UDP_CORK) && outQueue(sock) > 0) {
    return "corked data not yet sent: not supported yet";
  }
}

function dumpSocket(p: FdProbe): z.input<typeof UdpEntry> {
  const sock = takeFd(p.pid, p.fd);
  try {
    const family = getInt(sock, SOL.SOCKET, SOCKOPT.DOMAIN) as typeof AF.INET | typeof AF.INET6;
    const joined = memberships(p.tree, sock, family);
    return {
      kind: "udp" as const,
      fd: p.fd,
      flags: p.flags,
      ino: inode(p.link)!,
      family,
      local: localName(sock) as z.input<typeof Addr>,
      peer: peerName(sock) as z.input<typeof Addr> | undefined,
      ...inetFields(sock, family, [
        [SOL_UDP, UDP_CORK],
        ...(family === AF.INET ? UDP_V4_OPTIONS : UDP_V6_OPTIONS),
      ]),
      groups: joined.groups.length ? joined.groups : undefined,
      refusal: refusalOf(sock) ?? joined.refusal,
    };
  } finally {
    libc().close(sock);
  }
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
  restore: restoreSocket,
});
