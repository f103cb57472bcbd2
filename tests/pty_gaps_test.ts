/**
 * Ptys amber refuses rather than breaks (issue 10's gaps): a master in the
 * tree whose slave a process outside the tree holds, and a process of a
 * pty's session other than its leader whose leader holds the master itself
 * (restore could not fork it after the leader got its pty back); one whose
 * leader is restored after the master comes back with its pty.
 * Run with: deno test -A tests/pty_gaps_test.ts
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  assertOneLineError,
  descendants,
  dumpArgs,
  exists,
  isAlive,
  killAndReap,
  killTree,
  procStatFields,
  spawnTarget,
  tempDir,
  until,
  waitForLines,
  waitVanished,
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

Deno.test("a process of a pty's session other than its leader (script -qfc 'sleep; true') comes back with the pty as controlling terminal", async () => {
  await using tmp = await tempDir();
  // script's child, bash, leads the pty's session; sleep is a member, on the pty too.
  const tree = spawnTarget(["setsid", "script", "-qfc", "sleep 600; true", `${tmp.path}/ts`], {
    env: { SHELL: "/bin/bash", PATH: "/usr/bin:/bin" },
  });
  try {
    let sleeper = 0;
    await until(() => {
      sleeper = descendants(tree.pid).find((p) => comm(p) === "sleep") ?? 0;
      return sleeper !== 0;
    }, "script's command does not run");
    const before = descendants(tree.pid).map((p) => [p, ...procStatFields(p).slice(1, 6)]);
    const slave = Deno.readLinkSync(`/proc/${sleeper}/fd/0`);
    assert.notEqual(procStatFields(sleeper)[3], String(sleeper), "test bug: sleep leads");
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(tree.pid, img)), 0, "dump");
    await waitVanished(before.map(([p]) => Number(p)));
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore -d");
    // Parent, group, session, controlling terminal (tty_nr) and its foreground group, each.
    const after = descendants(tree.pid).map((p) => [p, ...procStatFields(p).slice(1, 6)]);
    assert.deepEqual(after, before, "the restored processes' sessions and terminals");
    assert.equal(Deno.readLinkSync(`/proc/${sleeper}/fd/0`), slave, "sleep's stdin");
  } finally {
    await killTree(tree.pid);
  }
});

/**
 * A session leader holding its pty's master itself, and a child of it on
 * the pty: the master is restored only with the leader, too late for the
 * child to be forked after the leader took its pty.
 */
const PY_OWN_MASTER = `
import fcntl, os, sys, termios, time
os.setsid()
m, s = os.openpty()
fcntl.ioctl(s, termios.TIOCSCTTY, 0)
if os.fork() == 0:
    os.execvp("sleep", ["sleep", "600"])
open(sys.argv[1], "w").close()
time.sleep(600)
`;

Deno.test("a pty's session member whose leader holds the pty's master itself is refused, named", async () => {
  await using tmp = await tempDir();
  const ready = `${tmp.path}/ready`;
  const tree = spawnTarget(["python3", "-c", PY_OWN_MASTER, ready]);
  try {
    await until(() => exists(ready), "python3 did not start its child");
    const [child] = descendants(tree.pid).slice(1);
    const img = `${tmp.path}/img`;
    const msg = assertOneLineError(await amber(dumpArgs(tree.pid, img)), 1, "dump");
    assert.match(
      msg,
      new RegExp(
        `pid ${child}: pty \\d+ is its controlling terminal, and its master is restored only ` +
          `with or after its session leader ${tree.pid}`,
      ),
    );
    assert.ok(isAlive(tree.pid) && isAlive(child), "the refused dump harmed the tree");
    assert.ok(!exists(img), "the refused dump left images");
  } finally {
    await killTree(tree.pid);
  }
});

function comm(pid: number): string | undefined {
  try {
    return Deno.readTextFileSync(`/proc/${pid}/comm`).trim();
  } catch {
    return undefined;
  }
}
