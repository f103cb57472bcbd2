/**
 * A freeze that is the first run of every dump path in this amber pays
 * for V8 compiling them as they first run: measured, a first migration
 * round of a 256 MiB process frozen ~80 ms, the next ones ~35 ms; a 2 GiB
 * `dump -R` spent ~40 ms of its freeze in parts that take ~1 ms warm. A
 * pre-dump of a throwaway process of amber's own, into nowhere, runs them
 * first, while the tree still runs: once per amber process. Whatever it
 * meets is of no consequence.
 */
import type { DumpStats, MigrationDump } from "./dump.ts";
import { InterruptedError } from "./errors.ts";
import { SignalGuard } from "./interrupt.ts";
import { messageOf, RecordWriter, StreamImages } from "./images/stream.ts";

let warmed = false;

/**
 * Runs `dumpTree` once on a throwaway `sleep` (the first call in this
 * process only). A stop asked for meanwhile (SIGINT..., `signal`) is thrown.
 */
export async function warmUp(
  dumpTree: (req: MigrationDump) => Promise<DumpStats>,
  log: (line: string) => void,
  signal?: AbortSignal,
): Promise<void> {
  if (warmed) return;
  warmed = true;
  using guard = new SignalGuard(signal);
  const t0 = performance.now();
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command("sleep", {
      args: ["600"],
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).spawn();
  } catch (e) {
    return log(`warm-up: sleep: ${messageOf(e)}`); // (no sleep here: the dump goes on cold)
  }
  try {
    // Dumped once it is sleep, not the copy of amber before its exec.
    for (let i = 0; i < 200; i++) {
      const exe = await Deno.readLink(`/proc/${child.pid}/exe`).catch(() => "");
      if (!exe.startsWith(Deno.execPath())) break;
      await new Promise((r) => setTimeout(r, 5));
    }
    const nowhere = new RecordWriter({ write: (p) => Promise.resolve(p.length) }, "warm-up");
    await dumpTree({
      pid: child.pid,
      shellJob: true,
      preDump: true,
      migrationRound: { into: new StreamImages(nowhere, () => Promise.resolve()) },
      log: () => {},
      signal,
    });
    log(`warmed up in ${(performance.now() - t0).toFixed(0)} ms`);
  } catch (e) {
    if (e instanceof InterruptedError) throw e;
    log(`warm-up: ${messageOf(e)}`);
  } finally {
    child.kill("SIGKILL");
    await child.status;
  }
  await guard.checkpoint();
}
