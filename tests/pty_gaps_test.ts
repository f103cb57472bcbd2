/**
 * Ptys amber refuses rather than breaks (issue 10's gaps): a master in the
 * tree whose slave a process outside the tree holds.
 * Run with: deno test -A tests/pty_gaps_test.ts
 */
import assert from "node:assert/strict";
import {
  amber,
  assertOneLineError,
  dumpArgs,
  exists,
  isAlive,
  killAndReap,
  spawnTarget,
  tempDir,
  until,
  waitForLines,
} from "./_util.ts";

/** Opens a pty pair, writes the slave's name to argv[1], keeps only the master. */
const PY_MASTER = `
import os, sys, time
m, s = os.openpty()
name = os.ttyname(s)
os.close(s)
with open(sys.argv[1], "w") as f:
    f.write(name + "\\n")
time.sleep(600)
`;

/**
 * How the outside process holds the slave: as /dev/pts/N, or as /dev/tty
 * once the slave is its controlling terminal (it leads a session of its
 * own and keeps only /dev/tty).
 */
const OUTSIDE = {
  "/dev/pts/N": (slave: string) => ["bash", "-c", `exec 3<>${slave}; exec sleep 600`],
  "/dev/tty": (slave: string) => [
    "setsid",
    "bash",
    "-c",
    `exec 4<>${slave}; exec 3<>/dev/tty; exec 4<&-; exec sleep 600`,
  ],
};

for (const [how, argv] of Object.entries(OUTSIDE)) {
  Deno.test(`a pty master whose slave only a process outside the tree holds (${how}) is refused, named`, async () => {
    await using tmp = await tempDir();
    const out = `${tmp.path}/slave.txt`;
    const tree = spawnTarget(["setsid", "python3", "-c", PY_MASTER, out]);
    let outside = 0;
    try {
      const [slave] = await waitForLines(out, 1, 30_000);
      assert.match(slave, /^\/dev\/pts\/\d+$/);
      const holder = spawnTarget(argv(slave));
      outside = holder.pid;
      const link = how === "/dev/tty" ? "/dev/tty" : slave;
      await until(() => {
        try {
          return Deno.readLinkSync(`/proc/${outside}/fd/3`) === link &&
            !exists(`/proc/${outside}/fd/4`);
        } catch {
          return false;
        }
      }, "the outside process does not hold the slave");
      const img = `${tmp.path}/img`;
      const msg = assertOneLineError(await amber(dumpArgs(tree.pid, img)), 1, "dump");
      assert.match(
        msg,
        new RegExp(`pty \\d+: ${slave} is held by pid ${outside} outside the dumped tree`),
      );
      assert.ok(isAlive(tree.pid) && isAlive(outside), "the refused dump harmed a process");
      assert.ok(!exists(img), "the refused dump left images");
    } finally {
      await killAndReap(tree.pid);
      if (outside) await killAndReap(outside);
    }
  });
}
