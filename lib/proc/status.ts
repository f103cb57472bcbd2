/** /proc/PID/status as a key → value map. */
import { readProcText } from "./read.ts";

export function readStatus(pid: number, tid?: number): Map<string, string> {
  const text = readProcText(pid, tid === undefined ? "status" : `task/${tid}/status`);
  const out = new Map<string, string>();
  for (const line of text.split("\n")) {
    const i = line.indexOf(":");
    if (i > 0) out.set(line.slice(0, i), line.slice(i + 1).trim());
  }
  return out;
}

/** "Uid: 0 0 0 0" → [0, 0, 0, 0] */
export function statusNumbers(status: Map<string, string>, key: string): number[] {
  const v = status.get(key) ?? "";
  return v.split(/\s+/).filter(Boolean).map(Number);
}

export function statusHex(status: Map<string, string>, key: string): bigint {
  return BigInt("0x" + (status.get(key) ?? "0"));
}
