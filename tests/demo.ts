/**
 * deno task demo: checkpoint a running CPython process, show its images,
 * restore it with the same PID and watch it carry on.
 */
import {
  amber,
  COUNTER_PY,
  killAndReap,
  readLines,
  sleep,
  spawnTarget,
  tempDir,
  waitForLines,
} from "./_util.ts";

function step(title: string, text = ""): void {
  console.log(`\n== ${title}`);
  if (text.trim()) console.log(text.trimEnd());
}

function must(r: { code: number; stdout: string; stderr: string }, what: string): string {
  if (r.code !== 0) throw new Error(`${what} failed (exit ${r.code}): ${r.stderr.trim()}`);
  return r.stdout + r.stderr;
}

await using tmp = await tempDir("amber-demo-");
const out = `${tmp.path}/counter.txt`;
const images = `${tmp.path}/images`;
// A session leader, as a daemon would be, so no --shell-job is needed.
const target = spawnTarget(["setsid", "python3", COUNTER_PY, out]);
const pid = target.pid;
try {
  await waitForLines(out, 10);
  step(`python3 ${COUNTER_PY} is running as pid ${pid}, counting every 20 ms`);
  step("amber dump (freezes it, writes its images, ends it)");
  console.log(must(await amber(["dump", "-t", String(pid), "-D", images, "-v"]), "dump").trim());
  await target.child.status;
  const before = await readLines(out);
  console.log(`pid ${pid} is gone; its last line was "${before.at(-1)}"`);
  const shown = must(await amber(["show", images]), "show").split("\n");
  step(
    "amber show (first lines)",
    shown.slice(0, 16).join("\n") + `\n  ... ${shown.length - 16} more lines`,
  );
  await sleep(500);
  step("amber restore -d (same pid, same memory; carries on)");
  console.log(must(await amber(["restore", "-D", images, "-d", "-v"]), "restore").trim());
  await waitForLines(out, before.length + 10);
  const after = await readLines(out);
  const exe = Deno.readLinkSync(`/proc/${pid}/exe`);
  console.log(`pid ${pid} runs again (${exe}); the lines around the checkpoint:`);
  console.log(after.slice(before.length - 3, before.length + 3).map((l) => `  ${l}`).join("\n"));
  const bad = after.filter((l) => l.startsWith("BAD"));
  console.log(
    bad.length ? `memory check FAILED: ${bad[0]}` : "no line lost or repeated, checksums right",
  );
} finally {
  await killAndReap(pid);
}
