/**
 * Process groups whose leader has exited (the first command of a pipeline
 * that finished, the group of a zombie) come back with their members.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  dumpArgs,
  killTree,
  procState,
  procStatFields,
  spawnTarget,
  tempDir,
  waitFor,
  waitVanished,
} from "./_util.ts";

/** A leader a in its own group, b (running) and c (a zombie) in a's group; a has exited. */
const GROUPS_PY = `import os, sys, time
out = sys.argv[1]
a = os.fork()
if a == 0:
    os.setpgid(0, 0)
    time.sleep(0.5)
    os._exit(0)
os.setpgid(a, a)
b = os.fork()
if b == 0:
    os.setpgid(0, a)
    while True:
        time.sleep(0.05)
c = os.fork()
if c == 0:
    os.setpgid(0, a)
    os._exit(7)
os.waitpid(a, 0)
with open(out, "w") as f:
    f.write("%d %d %d\\n" % (a, b, c))
while True:
    time.sleep(1)
`;

const pgidOf = (pid: number) => Number(procStatFields(pid)[2]);

Deno.test("a group whose leader exited keeps its running and zombie members", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/pids.txt`;
  const { pid: root } = spawnTarget(["setsid", "python3", "-c", GROUPS_PY, out]);
  try {
    const [a, b, c] = await waitFor(async () => {
      try {
        const nums = (await Deno.readTextFile(out)).trim().split(" ").map(Number);
        return nums.length === 3 ? nums : undefined;
      } catch {
        return undefined;
      }
    }, "the target did not set up its groups");
    assert.equal(procState(a), null, "the leader is gone (test bug)");
    assert.deepEqual([pgidOf(b), pgidOf(c), procState(c)], [a, a, "Z"], "before the dump");
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(root, img)), 0, "dump");
    // c, the zombie, is ours once its parent (root) has ended.
    await waitVanished([root, b, c]);
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    assert.deepEqual([pgidOf(b), pgidOf(c), procState(c)], [a, a, "Z"], "after the restore");
    assert.equal(procState(a), null, "the stand-in leader is gone");
  } finally {
    await killTree(root);
  }
});
