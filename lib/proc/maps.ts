/** /proc/PID/maps and the VmFlags of /proc/PID/smaps. */
import { AmberError } from "../errors.ts";
import { procPath, readProcText } from "./read.ts";

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

/** A mapping's VmFlags (e.g. ["rd", "wr", "gd"]) and where it ends, as smaps shows them. */
export interface VmFlagsEntry {
  end: bigint;
  flags: string[];
}

/** VmFlags per mapping start, from the text of /proc/PID/smaps. */
export function parseVmFlags(text: string): Map<bigint, VmFlagsEntry> {
  const out = new Map<bigint, VmFlagsEntry>();
  let current: { start: bigint; end: bigint } | undefined;
  for (const line of text.split("\n")) {
    const head = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
    if (head) current = { start: BigInt("0x" + head[1]), end: BigInt("0x" + head[2]) };
    else if (line.startsWith("VmFlags:") && current) {
      out.set(current.start, { end: current.end, flags: line.slice(8).trim().split(/\s+/) });
    }
  }
  return out;
}

export function readVmFlags(pid: number): Map<bigint, VmFlagsEntry> {
  return parseVmFlags(readProcText(pid, "smaps"));
}

/**
 * readVmFlags on a pool thread: smaps walks every page of the process
 * (~0.1 s at 2 GiB), which can overlap other work of a frozen dump.
 * Undefined when the read fails (the caller reads it again itself).
 */
export function readVmFlagsAsync(pid: number): Promise<Map<bigint, VmFlagsEntry> | undefined> {
  return Deno.readTextFile(procPath(pid, "smaps")).then(parseVmFlags, () => undefined);
}
