/**
 * Scale: a process of 100 threads and a tree of 50 processes round-trip,
 * every thread and process back under its id and working.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  descendants,
  dumpKill,
  killAndReap,
  killTree,
  procStatFields,
  readLines,
  readThreadLines,
  startThreads,
  startTree,
  tempDir,
  threadsOf,
  waitFor,
} from "./_util.ts";

Deno.test("a process with 100 threads: every thread back and counting on", async () => {
  await using tmp = await tempDir();
  const { pid, out, tids } = await startThreads(tmp.path, 100);
  try {
    const img = `${tmp.path}/img`;
    await dumpKill(pid, [pid], img, "100 threads");
    const atDump = await readThreadLines(out);
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    assert.deepEqual(threadsOf(pid), tids, "thread ids");
    await waitFor(
      async () => {
        const now = await readThreadLines(out);
        return [...atDump].every(([i, n]) => (now.get(i)?.length ?? 0) >= n.length + 3) ||
          undefined;
      },
      "some thread does not write any more",
      30_000,
    );
  } finally {
    await killAndReap(pid);
  }
});

Deno.test("a tree of 50 processes: same pids and parents, every process counting on", async () => {
  await using tmp = await tempDir();
  const dir = `${tmp.path}/out`;
  let root = 0;
  const pids = await startTree(dir, (r) => root = r, 1, 49);
  try {
    assert.equal(pids.length, 50);
    const parents = pids.map((p) => procStatFields(p)[1]);
    const img = `${tmp.path}/img`;
    await dumpKill(root, pids, img, "50 processes");
    const lines = await Promise.all(pids.map((p) => readLines(`${dir}/${p}.txt`)));
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    assert.deepEqual(descendants(root), pids, "pids");
    assert.deepEqual(pids.map((p) => procStatFields(p)[1]), parents, "parents");
    await waitFor(
      async () => {
        const now = await Promise.all(pids.map((p) => readLines(`${dir}/${p}.txt`)));
        return now.every((l, i) => l.length >= lines[i].length + 3) || undefined;
      },
      "some process does not write any more",
      30_000,
    );
  } finally {
    await killTree(root);
  }
});
