/**
 * The network lock: while a TCP connection is checkpointed, every packet
 * of it, both ways, is dropped by an nftables table of amber's own (never
 * answered with RST), so its peer only sees a pause and retransmits.
 * The table is named after the dump and recorded in the images; it is
 * removed when the dumped tree runs again (dump -R, or a failed dump), or
 * when restore has rebuilt the connections (or failed to).
 */
import { AmberError } from "../errors.ts";

/** A connection as seen from the socket that is locked. */
export interface LockedConn {
  local: { addr: string; port: number };
  peer: { addr: string; port: number };
}

const TABLE = /^amber_[a-z0-9_]{1,40}$/;

/** A table name for a dump: unique enough on one machine, and a valid nft identifier. */
export function lockTableName(pid: number): string {
  return `amber_${pid}_${Date.now().toString(36)}`;
}

export function validTableName(name: string): boolean {
  return TABLE.test(name);
}

function nft(args: string[], what: string): string {
  let out: Deno.CommandOutput;
  try {
    out = new Deno.Command("nft", { args, stdin: "null", stdout: "piped", stderr: "piped" })
      .outputSync();
  } catch (e) {
    throw new AmberError(`network lock: ${what}: cannot run nft (${(e as Error).message})`);
  }
  if (!out.success) {
    const err = new TextDecoder().decode(out.stderr).trim().split("\n")[0];
    throw new AmberError(`network lock: ${what}: nft: ${err}`);
  }
  return new TextDecoder().decode(out.stdout);
}

/** An IPv4 address on the wire for a v4 or v4-mapped v6 one, else undefined. */
function v4(addr: string): string | undefined {
  return /^(?:::ffff:)?(\d+\.\d+\.\d+\.\d+)$/.exec(addr)?.[1];
}

function rules(c: LockedConn): string[] {
  const l4 = v4(c.local.addr), p4 = v4(c.peer.addr);
  const [fam, l, p] = l4 && p4 ? ["ip", l4, p4] : ["ip6", c.local.addr, c.peer.addr];
  const way = (sa: string, sp: number, da: string, dp: number) =>
    `${fam} saddr ${sa} ${fam} daddr ${da} tcp sport ${sp} tcp dport ${dp} drop`;
  return [
    way(l, c.local.port, p, c.peer.port),
    way(p, c.peer.port, l, c.local.port),
  ];
}

/** Adds the rules dropping one connection's packets, creating the table on first use. */
export function lockConnection(table: string, c: LockedConn, create: boolean): void {
  if (!validTableName(table)) throw new AmberError(`network lock: bad table name ${table}`);
  const cmds: string[] = [];
  if (create) {
    cmds.push(
      `add table inet ${table}`,
      `add chain inet ${table} in { type filter hook input priority -300 ; policy accept ; }`,
      `add chain inet ${table} out { type filter hook output priority -300 ; policy accept ; }`,
    );
  }
  for (const r of rules(c)) {
    cmds.push(`add rule inet ${table} in ${r}`, `add rule inet ${table} out ${r}`);
  }
  nft([cmds.join(" ; ")], `locking ${c.local.addr}:${c.local.port}`);
}

/** Removes the table; a table already gone is fine. */
export function unlock(table: string): void {
  if (!validTableName(table)) return;
  if (!lockedTables().includes(table)) return;
  nft(["delete", "table", "inet", table], `removing table ${table}`);
}

/** amber's lock tables present now. */
export function lockedTables(): string[] {
  const out = nft(["list", "tables"], "listing tables");
  return [...out.matchAll(/^table inet (amber_\S+)$/gm)].map((m) => m[1]);
}

/** For `amber check`: creates and removes a lock table; throws when that does not work. */
export function probeLock(): string {
  const table = `amber_check_${Deno.pid}`;
  lockConnection(table, {
    local: { addr: "127.0.0.1", port: 9 },
    peer: { addr: "127.0.0.1", port: 9 },
  }, true);
  unlock(table);
  return "an nftables table dropping a connection's packets can be added and removed";
}
