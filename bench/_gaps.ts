/** Asking testdata/gaps.c for its longest pause (bench/bench.ts, bench/migtrace.ts). */
import { readLines, waitForLine } from "../tests/_util.ts";

/**
 * The longest gap (ms) the gaps target `pid` saw since the last ask, after
 * it checked its memory, and when that gap ended (ms, wall clock; 0 from a
 * gaps.c that does not say).
 */
export async function gapReport(pid: number, out: string): Promise<{ ms: number; endMs: number }> {
  const before = (await readLines(out)).filter((l) => l.startsWith("check")).length;
  Deno.kill(pid, "SIGUSR1");
  const lines = await waitForLine(
    out,
    (ls) => ls.filter((l) => l.startsWith("check")).length > before,
    60_000,
  );
  const check = lines.filter((l) => l.startsWith("check")).at(-1);
  if (check !== "check ok") throw new Error(`gaps ${pid}: ${check}`);
  const last = (prefix: string) => lines.filter((l) => l.startsWith(prefix)).at(-1);
  return {
    ms: Number(last("gap ")!.slice(4)) / 1000,
    endMs: Number(last("gap-end ")?.slice(8) ?? 0) / 1000,
  };
}
