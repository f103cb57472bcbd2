/**
 * amber as a library: a Deno script of its own, in a directory of its own,
 * imports mod.ts by path (with amber's deno.json for its npm packages, as
 * a user's program would), dumps a counter with -R, fails to restore it
 * while it still runs, restores it once it is gone, and reports what it
 * saw; the test checks the types and the error fields from outside too.
 */
import assert from "node:assert/strict";
import {
  assertCounterHealthy,
  DENO,
  killAndReap,
  ROOT,
  startCounter,
  tempDir,
  unusedPid,
  waitGone,
} from "./_util.ts";

const SCRIPT = `
import { AmberError, dump, readImages, restore } from ${JSON.stringify(`${ROOT}/mod.ts`)};
import type { DumpStats, Images, RestoreResult } from ${JSON.stringify(`${ROOT}/mod.ts`)};

const [pidText, dir, missingText] = Deno.args;
const pid = Number(pidText), missing = Number(missingText);
const out: Record<string, unknown> = {};
const errorOf = async (fn: () => Promise<unknown>) => {
  try {
    await fn();
    return { thrown: false };
  } catch (e) {
    if (!(e instanceof AmberError)) return { thrown: true, amber: false, text: String(e) };
    return { thrown: true, amber: true, ...e.toJSON() };
  }
};
let reports = 0;
const stats: DumpStats = await dump({
  pid,
  dir,
  leaveRunning: true,
  progress: () => void reports++,
});
out.dump = {
  pids: stats.pids,
  numbers: [stats.frozenMs, stats.totalMs, stats.pageBytes, stats.imageBytes]
    .every((n) => typeof n === "number" && n >= 0),
  parts: Object.keys(stats.partMs),
  dir: stats.dir,
  reports,
};
const images: Images = readImages(dir);
out.images = images.processes.map((p) => p.entry.pid);
out.missing = await errorOf(() => dump({ pid: missing, dir: dir + "-missing" }));
out.busy = await errorOf(() => restore({ dir, detached: true, allowChangedFiles: true }));
Deno.kill(pid, "SIGKILL");
for (let i = 0; i < 200; i++) {
  try {
    Deno.statSync("/proc/" + pid);
    await new Promise((r) => setTimeout(r, 50));
  } catch {
    break;
  }
}
// The counter wrote on after the dump: its file changed, as expected.
const restored: RestoreResult = await restore({ dir, detached: true, allowChangedFiles: true });
out.restore = { pids: restored.pids, ms: typeof restored.restoreMs, exitCode: restored.exitCode };
console.log(JSON.stringify(out));
`;

Deno.test("a separate Deno program embeds amber through mod.ts", async () => {
  await using tmp = await tempDir();
  await using user = await tempDir("amber-user-");
  Deno.writeTextFileSync(`${user.path}/main.ts`, SCRIPT);
  const c = await startCounter(tmp.path, 8);
  const missing = unusedPid();
  try {
    const r = await new Deno.Command(DENO, {
      args: [
        "run",
        "-A",
        "--config",
        `${ROOT}/deno.json`,
        "main.ts",
        String(c.pid),
        `${tmp.path}/img`,
        String(missing),
      ],
      cwd: user.path,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    const dec = new TextDecoder();
    assert.equal(
      r.code,
      0,
      `embedding script failed:\n${dec.decode(r.stdout)}\n${dec.decode(r.stderr)}`,
    );
    const out = JSON.parse(dec.decode(r.stdout).trim().split("\n").pop()!);
    assert.deepEqual(out.dump.pids, [c.pid]);
    assert.equal(out.dump.numbers, true, "dump stats are numbers");
    assert.ok(out.dump.parts.includes("pagemap"), `per-part times: ${out.dump.parts}`);
    assert.equal(out.dump.dir, `${tmp.path}/img`);
    assert.ok(out.dump.reports > 0, "the progress callback was called");
    assert.deepEqual(out.images, [c.pid]);
    // A pid that does not exist: an AmberError naming it.
    assert.equal(out.missing.amber, true, JSON.stringify(out.missing));
    assert.equal(out.missing.pid, missing);
    assert.equal(typeof out.missing.code, "string");
    assert.match(out.missing.message, new RegExp(`^pid ${missing}: `));
    // Restoring while the original still runs: refused, naming the pid in use.
    assert.equal(out.busy.amber, true, JSON.stringify(out.busy));
    assert.equal(out.busy.pid, c.pid, JSON.stringify(out.busy));
    assert.match(out.busy.message, /is in use by/);
    assert.deepEqual(out.restore, { pids: [c.pid], ms: "number" });
    await assertCounterHealthy({ ...c, out: c.out }, 5);
  } finally {
    await killAndReap(c.pid);
    await waitGone(c.pid);
  }
});
