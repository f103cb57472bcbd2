/**
 * Sockets no other kind takes (netlink, packet, raw, SCTP, ...): recorded
 * with their family, type and protocol so the refusal says what they are.
 */
import { z } from "zod";
import { identity } from "../../ffi/inet.ts";
import { takeFd } from "../../ffi/socket.ts";
import { libc } from "../../ffi/libc.ts";
import { AmberError } from "../errors.ts";
import { inode } from "./inet.ts";
import { defineFdKind, type FdProbe } from "./kind.ts";

const FAMILIES: Record<number, string> = {
  1: "unix",
  2: "inet",
  10: "inet6",
  16: "netlink",
  17: "packet",
  38: "alg",
  40: "vsock",
  44: "xdp",
};
const TYPES: Record<number, string> = { 1: "stream", 2: "datagram", 3: "raw", 5: "seqpacket" };
const NETLINK: Record<number, string> = {
  0: "NETLINK_ROUTE",
  4: "NETLINK_SOCK_DIAG",
  9: "NETLINK_AUDIT",
  15: "NETLINK_KOBJECT_UEVENT",
  16: "NETLINK_GENERIC",
};

const SocketEntry = z.object({
  kind: z.literal("socket"),
  fd: z.number().int().min(0),
  flags: z.number().int().min(0),
  link: z.string(),
  family: z.number().int(),
  type: z.number().int(),
  protocol: z.number().int(),
});
type SocketImage = z.output<typeof SocketEntry>;

function describe(e: SocketImage): string {
  const family = FAMILIES[e.family] ?? `family ${e.family}`;
  const type = TYPES[e.type] ?? `type ${e.type}`;
  const proto = e.family === 16 ? ` ${NETLINK[e.protocol] ?? `protocol ${e.protocol}`}` : "";
  return `${family} ${type}${proto} ${e.link}`;
}

function why(e: SocketImage): string {
  const family = FAMILIES[e.family] ?? `family ${e.family}`;
  return `${describe(e)}: ${family} sockets of this kind are not supported yet`;
}

export const socketFd = defineFdKind({
  name: "socket",
  schema: SocketEntry,
  matches: (p: FdProbe) => inode(p.link) !== undefined,
  dump(p: FdProbe) {
    const sock = takeFd(p.pid, p.fd);
    try {
      return { kind: "socket" as const, fd: p.fd, flags: p.flags, link: p.link, ...identity(sock) };
    } finally {
      libc().close(sock);
    }
  },
  unrestorable: (e) => `fd ${e.fd}: ${why(e)}`,
  precheck(e) {
    throw new AmberError(why(e));
  },
  restore(_ctx, e) {
    throw new AmberError(why(e));
  },
});
