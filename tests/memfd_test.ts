/**
 * memfd: name, contents, size, seals and offset come back, as a descriptor
 * and as a shared mapping, and one memfd held by two processes (inherited,
 * and through another open file) is one memfd after restore. The target
 * (testdata/memfd.py) checks all of it on every tick; a memfd above the
 * ghost limit is refused naming the flag that raises it.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertCounterGoesOn,
  assertExit,
  assertOneLineError,
  childrenOf,
  descendants,
  dumpArgs,
  isAlive,
  killTree,
  readLines,
  startWriter,
  tempDir,
  TESTDATA,
  waitVanished,
} from "./_util.ts";

Deno.test("memfds (descriptor, shared mapping, seals) survive dump and restore as one memfd", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/memfd.txt`;
  const t = await startWriter(["setsid", "python3", `${TESTDATA}/memfd.py`, out], out, 5, 30_000);
  let pids = [t.pid];
  try {
    pids = descendants(t.pid);
    assert.equal(pids.length, 2, "parent and child (test bug)");
    const img = `${tmp.path}/img`;

    const small = assertOneLineError(
      await amber(dumpArgs(t.pid, img, "--ghost-limit", "4K")),
      1,
      "dump with a 4 KiB ghost limit",
    );
    assert.match(small, /\/memfd:amber-memfd \(deleted\)/, small);
    assert.match(small, /--ghost-limit 12388/, small);
    assert.ok(isAlive(t.pid), "the refused dump left the tree running");
    await assertCounterGoesOn(out, (await readLines(out)).length, 5, "after the refused dump");

    assertExit(await amber(dumpArgs(t.pid, img)), 0, "dump");
    await t.child.status;
    await waitVanished(pids);
    const n = (await readLines(out)).length;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    await assertCounterGoesOn(out, n, 20, "after restore");
    const [child] = childrenOf(t.pid);
    assert.equal(child, pids[1], "the child is back under its parent");
    // Every descriptor of amber-memfd in both processes (python's mmap holds a dup too).
    const inodes = new Set(
      pids.flatMap((pid) =>
        [...Deno.readDirSync(`/proc/${pid}/fd`)]
          .map((e) => `/proc/${pid}/fd/${e.name}`)
          .filter((p) => Deno.readLinkSync(p) === "/memfd:amber-memfd (deleted)")
          .map((p) => Deno.statSync(p).ino)
      ),
    );
    assert.equal(inodes.size, 1, "one amber-memfd after restore");
  } finally {
    await killTree(t.pid);
    await waitVanished(pids);
  }
});
