/** Reading /proc files with errors that name the file. */
import { AmberError } from "../errors.ts";

export function procPath(pid: number, rest: string): string {
  return `/proc/${pid}/${rest}`;
}

/** Reads /proc/PID/REST as text; a vanished process reads as ESRCH. */
export function readProcText(pid: number, rest: string): string {
  try {
    return Deno.readTextFileSync(procPath(pid, rest));
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new AmberError(`${procPath(pid, rest)}: no such process`);
    }
    throw new AmberError(`${procPath(pid, rest)}: ${e instanceof Error ? e.message : e}`);
  }
}

export function readProcBytes(pid: number, rest: string): Uint8Array {
  try {
    return Deno.readFileSync(procPath(pid, rest));
  } catch (e) {
    throw new AmberError(`${procPath(pid, rest)}: ${e instanceof Error ? e.message : e}`);
  }
}

export function readProcLink(pid: number, rest: string): string {
  try {
    return Deno.readLinkSync(procPath(pid, rest));
  } catch (e) {
    throw new AmberError(`${procPath(pid, rest)}: readlink: ${e instanceof Error ? e.message : e}`);
  }
}

/** Numeric directory entries of /proc/PID/REST (task ids, fds). */
export function listProcNumbers(pid: number, rest: string): number[] {
  const out: number[] = [];
  try {
    for (const e of Deno.readDirSync(procPath(pid, rest))) {
      if (/^\d+$/.test(e.name)) out.push(Number(e.name));
    }
  } catch (e) {
    throw new AmberError(`${procPath(pid, rest)}: ${e instanceof Error ? e.message : e}`);
  }
  return out.sort((a, b) => a - b);
}

/** amber's own peak resident memory so far (VmHWM), in bytes; 0 if unknown. */
export function ownPeakMemory(): number {
  try {
    const status = Deno.readTextFileSync("/proc/self/status");
    return Number(/^VmHWM:\s*(\d+) kB/m.exec(status)?.[1] ?? 0) * 1024;
  } catch {
    return 0;
  }
}

/** A peak (by default amber's own so far) for a summary line: "peak memory 87 MiB". */
export function peakMemoryText(bytes = ownPeakMemory()): string {
  return `peak memory ${(bytes / 1048576).toFixed(0)} MiB`;
}
