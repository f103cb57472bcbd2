/**
 * Multicast groups joined on this machine's interfaces, as the kernel
 * lists them (/proc/net/igmp, /proc/net/igmp6, amber's own network
 * namespace). The kernel has no per-socket list: a socket's memberships
 * are found by asking it about each of these groups (ffi/inet.ts
 * membership), which reads only.
 */
import { AF, type InetAddr } from "../../ffi/inet.ts";

export interface Group {
  ifindex: number;
  group: InetAddr;
}

function readOr(path: string): string {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return ""; // no IPv4/IPv6 here: no groups of it
  }
}

/** /proc/net/igmp: a device line "IDX\tNAME : ...", then a "\t\t\t\tGROUP USERS ..." line per group. */
function igmp(): Group[] {
  const out: Group[] = [];
  let ifindex = 0;
  for (const line of readOr("/proc/net/igmp").split("\n").slice(1)) {
    const dev = /^(\d+)\s/.exec(line);
    if (dev) ifindex = Number(dev[1]);
    const g = /^\s+([0-9A-Fa-f]{8})\s/.exec(line);
    if (!g || !ifindex) continue;
    // The address's bytes, printed as a host-order (little-endian) word.
    const n = parseInt(g[1], 16);
    const addr = [n & 255, (n >>> 8) & 255, (n >>> 16) & 255, n >>> 24].join(".");
    out.push({ ifindex, group: { family: AF.INET, addr, port: 0 } });
  }
  return out;
}

/** /proc/net/igmp6: "IDX NAME GROUP(32 hex) USERS FLAGS TIMER" per line. */
function igmp6(): Group[] {
  return readOr("/proc/net/igmp6").split("\n").flatMap((line) => {
    const m = /^(\d+)\s+\S+\s+([0-9a-f]{32})\s/.exec(line);
    if (!m) return [];
    const addr = m[2].match(/.{4}/g)!.map((w) => parseInt(w, 16).toString(16)).join(":");
    return [{ ifindex: Number(m[1]), group: { family: AF.INET6, addr, port: 0 } }];
  });
}

/** Every (interface, group) joined on the machine now: IPv4 first, then IPv6. */
export function joinedGroups(): Group[] {
  return [...igmp(), ...igmp6()];
}
