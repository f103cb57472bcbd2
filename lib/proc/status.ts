/** /proc/PID/status as a key → value map. */
import { readProcText } from "./read.ts";

/**
 * One read of a status file; each field is found when asked for. A dump
 * reads a thread's status ~6 times for one to eight of its ~60 fields:
 * splitting all of them each time cost more than the read.
 */
export class ProcStatus {
  private readonly text: string;
  constructor(text: string) {
    this.text = "\n" + text;
  }

  /** The value of field `key`, trimmed; undefined without such a line. */
  get(key: string): string | undefined {
    const at = this.text.indexOf(`\n${key}:`);
    if (at < 0) return undefined;
    const from = at + key.length + 2;
    const end = this.text.indexOf("\n", from);
    return this.text.slice(from, end < 0 ? undefined : end).trim();
  }
}

export function readStatus(pid: number, tid?: number): ProcStatus {
  return new ProcStatus(readProcText(pid, tid === undefined ? "status" : `task/${tid}/status`));
}

/** "Uid: 0 0 0 0" → [0, 0, 0, 0] */
export function statusNumbers(status: ProcStatus, key: string): number[] {
  const v = status.get(key) ?? "";
  return v.split(/\s+/).filter(Boolean).map(Number);
}

export function statusHex(status: ProcStatus, key: string): bigint {
  return BigInt("0x" + (status.get(key) ?? "0"));
}
