/**
 * The network lock: while a TCP connection is checkpointed, every packet
 * of it, both ways, is dropped by an nftables table of amber's own (never
 * answered with RST), so its peer only sees a pause and retransmits.
 * The table is named after the dump and recorded in the images; it is
 * removed when the dumped tree runs again (dump -R, or a failed dump), or
 * when restore has rebuilt the connections (or failed to).
 *
 * While its dump goes on, a table holds an empty chain dumping_PID naming
 * the dumping amber; a complete dump deletes it (the table then waits for
 * restore). A table whose dumping amber died (SIGKILL) is stale: the tree
 * ran on when its tracer died, so the next amber run removes the table.
 */
import { AmberError } from "../errors.ts";

/** A connection as seen from the socket that is locked. */
export interface LockedConn {
  local: { addr: string; port: number };
  peer: { addr: string; port: number };
}

/**
 * The mark (SO_MARK) of amber's own raw socket at restore: packets it
 * crafts for a locked connection (a peer's FIN or ACK that will not come
 * again) pass the lock; the kernel keeps the mark from output to input on
 * loopback.
 */
export const LOCK_MARK = 0x616d6272;

const TABLE = /^amber_[a-z0-9_]{1,40}$/;

/** A table name for a dump: unique enough on one machine, and a valid nft identifier. */
export function lockTableName(pid: number): string {
  return `amber_${pid}_${Date.now().toString(36)}`;
}

const DUMPING = /^\s*chain dumping_(\d+) \{/m;
const dumpingChain = () => `dumping_${Deno.pid}`;

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
    cleanStaleLocks();
    cmds.push(
      `add table inet ${table}`,
      `add chain inet ${table} ${dumpingChain()}`,
      `add chain inet ${table} in { type filter hook input priority -300 ; policy accept ; }`,
      `add chain inet ${table} out { type filter hook output priority -300 ; policy accept ; }`,
      `add rule inet ${table} in meta mark ${LOCK_MARK} accept`,
      `add rule inet ${table} out meta mark ${LOCK_MARK} accept`,
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

/** The dump is complete: its table now waits for restore, whatever becomes of this amber. */
export function holdForRestore(table: string): void {
  if (!validTableName(table)) return;
  nft(["delete", "chain", "inet", table, dumpingChain()], `keeping table ${table} for restore`);
}

/** Seconds since the epoch at which process `pid` started, or undefined if it is gone. */
function startedAt(pid: number): number | undefined {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    if (fields[0] === "Z") return undefined;
    const btime = Number(/^btime (\d+)$/m.exec(Deno.readTextFileSync("/proc/stat"))![1]);
    return btime + Number(fields[19]) / 100; // starttime, in USER_HZ (100) ticks since boot
  } catch {
    return undefined;
  }
}

/** Whether the amber that made `table` (named at `lockTableName` time) and dumps into it is gone. */
function dumperGone(table: string, text: string): boolean {
  const m = DUMPING.exec(text);
  if (!m) return false; // complete: it waits for restore
  const started = startedAt(Number(m[1]));
  if (started === undefined) return true;
  // A process that started after the table was made only reuses the pid.
  const made = parseInt(table.split("_").at(-1)!, 36) / 1000;
  return started > made + 1;
}

/**
 * Removes the lock tables whose dumping amber died in the middle of its
 * dump; returns their names. Never fails: without nft there is nothing
 * to clean.
 */
export function cleanStaleLocks(): string[] {
  let tables: string[];
  try {
    tables = lockedTables();
  } catch {
    return [];
  }
  return tables.filter((t) => {
    try {
      if (!validTableName(t)) return false;
      if (!dumperGone(t, nft(["list", "table", "inet", t], `reading table ${t}`))) return false;
      nft(["delete", "table", "inet", t], `removing stale table ${t}`);
      return true;
    } catch {
      return false; // removed meanwhile, by its restore or another amber
    }
  });
}

/**
 * cleanStaleLocks with the listing run in the background (~40 ms of nft
 * a restore overlaps with reading its images); the rare removal is
 * synchronous.
 */
export async function cleanStaleLocksAsync(): Promise<string[]> {
  let out: Deno.CommandOutput;
  try {
    const args = ["list", "tables"];
    out = await new Deno.Command("nft", { args, stdin: "null", stdout: "piped", stderr: "null" })
      .output();
  } catch {
    return [];
  }
  if (!out.success || !tablesIn(new TextDecoder().decode(out.stdout)).length) return [];
  return cleanStaleLocks();
}

function tablesIn(listing: string): string[] {
  return [...listing.matchAll(/^table inet (amber_\S+)$/gm)].map((m) => m[1]);
}

/** amber's lock tables present now. */
export function lockedTables(): string[] {
  return tablesIn(nft(["list", "tables"], "listing tables"));
}

/** For `amber check`: creates and removes a lock table; throws when that does not work. */
export function probeLock(): string {
  const stale = cleanStaleLocks();
  const table = `amber_check_${Deno.pid}`;
  lockConnection(table, {
    local: { addr: "127.0.0.1", port: 9 },
    peer: { addr: "127.0.0.1", port: 9 },
  }, true);
  unlock(table);
  const cleaned = stale.length ? `; removed stale ${stale.join(", ")} of a dump that died` : "";
  return `an nftables table dropping a connection's packets can be added and removed${cleaned}`;
}
