/** /proc/PID/maps and the VmFlags of /proc/PID/smaps. */
import { AmberError } from "../errors.ts";
import { readProcText } from "./read.ts";

export interface MapsEntry {
  start: bigint;
  end: bigint;
  /** "rwxp" / "r--s" as printed. */
  perms: string;
  offset: bigint;
  /** "fd:01" */
  dev: string;
  inode: number;
  /** Path or pseudo name ("[heap]"); "" for anonymous. */
  path: string;
}

const LINE =
  /^([0-9a-f]+)-([0-9a-f]+) ([-r][-w][-x][ps]) ([0-9a-f]+) ([0-9a-f]+:[0-9a-f]+) (\d+)\s*(.*)$/;

export function parseMaps(text: string): MapsEntry[] {
  return text.split("\n").filter(Boolean).map((line) => {
    const m = LINE.exec(line);
    if (!m) throw new AmberError(`maps: cannot parse "${line}"`);
    return {
      start: BigInt("0x" + m[1]),
      end: BigInt("0x" + m[2]),
      perms: m[3],
      offset: BigInt("0x" + m[4]),
      dev: m[5],
      inode: Number(m[6]),
      path: m[7],
    };
  });
}

export function readMaps(pid: number): MapsEntry[] {
  return parseMaps(readProcText(pid, "maps"));
}

/** VmFlags per mapping start, from smaps (e.g. ["rd", "wr", "gd"]). */
export function readVmFlags(pid: number): Map<bigint, string[]> {
  const out = new Map<bigint, string[]>();
  let current: bigint | undefined;
  for (const line of readProcText(pid, "smaps").split("\n")) {
    const head = /^([0-9a-f]+)-[0-9a-f]+ /.exec(line);
    if (head) current = BigInt("0x" + head[1]);
    else if (line.startsWith("VmFlags:") && current !== undefined) {
      out.set(current, line.slice(8).trim().split(/\s+/));
    }
  }
  return out;
}
