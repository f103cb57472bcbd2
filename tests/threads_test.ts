/**
 * Thread state a program relies on after a restore: pthread_join returns
 * (clear_child_tid), a thread dying with a robust mutex held hands it on
 * as EOWNERDEAD (robust futex list), and real multi-threaded programs
 * dumped mid-work finish with the result of a run never dumped.
 * Run with: deno test -A tests/threads_test.ts
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  buildC,
  commandWorks,
  dumpArgs,
  killAndReap,
  readLines,
  spawnTarget,
  tempDir,
  waitForLine,
  waitForLines,
  waitGone,
} from "./_util.ts";

Deno.test("threads are joined after restore; a robust mutex of a dead thread is EOWNERDEAD", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("joiner", ["-pthread"]);
  const out = `${tmp.path}/joiner.txt`, go = `${tmp.path}/go`;
  const { pid, child } = spawnTarget(["setsid", bin, out, go]);
  try {
    await waitForLines(out, 1);
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    await child.status;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    Deno.writeTextFileSync(go, "");
    const lines = await waitForLine(
      out,
      (l) => l.some((x) => x === "PASS" || /FAIL/.test(x)),
      30_000,
    );
    assert.deepEqual(lines, ["ready", "join ok", "robust ok", "PASS"]);
    assert.ok(await waitGone(pid), "the restored joiner did not exit");
  } finally {
    await killAndReap(pid);
  }
});
