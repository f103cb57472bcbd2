/**
 * Objects amber cannot restore yet are refused by the dump itself: a dump
 * without -R fails with one line naming the object and leaves the target
 * running, and the images of `dump -R` make restore refuse before it
 * creates anything. Objects it can restore (its own /proc files, an O_PATH
 * descriptor on a dangling symlink) come back working.
 * The target is testdata/holder.py, which uses its object on every tick.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertCounterGoesOn,
  assertExit,
  assertLeftNothing,
  assertOneLineError,
  assertRunningFree,
  childrenWithState,
  descendants,
  dumpArgs,
  exists,
  isAlive,
  killTree,
  listDir,
  procState,
  readLines,
  startWriter,
  tempDir,
  TESTDATA,
  waitForLines,
  waitVanished,
  type Writer,
} from "./_util.ts";

const HOLDER = `${TESTDATA}/holder.py`;

function startHolder(dir: string, kase: string): Promise<Writer> {
  const out = `${dir}/holder.txt`;
  return startWriter(["setsid", "python3", HOLDER, out, dir, kase], out, 3, 30_000);
}

/** Every process runs freely and the counter goes on, without a BAD line. */
async function assertRuns(t: Writer, pids: number[], what: string): Promise<void> {
  for (const pid of pids) {
    assert.ok(isAlive(pid), `${what}: ${pid} is gone`);
    await assertRunningFree(pid, what);
  }
  await assertCounterGoesOn(t.out, (await readLines(t.out)).length, 5, what);
}

/**
 * Dump without -R refuses naming `names`; dump -R succeeds; restore of
 * those images refuses the same way and leaves nothing behind.
 */
async function assertRefused(kase: string, names: (string | RegExp)[]): Promise<void> {
  await using tmp = await tempDir();
  const t = await startHolder(tmp.path, kase);
  let pids = [t.pid];
  try {
    pids = descendants(t.pid);
    const img = `${tmp.path}/img`;
    const msg = assertOneLineError(await amber(dumpArgs(t.pid, img)), 1, `${kase}: dump`);
    for (const n of names) {
      if (typeof n === "string") assert.ok(msg.includes(n), `${kase}: dump: no "${n}": ${msg}`);
      else assert.match(msg, n, `${kase}: dump: ${msg}`);
    }
    assert.match(msg, /not supported yet/, `${kase}: dump`);
    assert.ok(msg.includes("-R"), `${kase}: dump does not mention -R: ${msg}`);
    assert.ok(!exists(img), `${kase}: the refused dump left ${listDir(img).join(" ")}`);
    await assertRuns(t, pids, `${kase}: after the refused dump`);

    assertExit(await amber(dumpArgs(t.pid, img, "-R")), 0, `${kase}: dump -R`);
    await assertRuns(t, pids, `${kase}: after dump -R`);
    await killTree(t.pid);
    await waitVanished(pids);

    const before = childrenWithState();
    // The holder wrote on after dump -R: its output file is allowed to have grown.
    const rr = await amber(["restore", "-D", img, "-d", "--allow-changed-files"]);
    const rmsg = assertOneLineError(rr, 1, `${kase}: restore`);
    for (const n of names) {
      if (typeof n === "string") {
        assert.ok(rmsg.includes(n), `${kase}: restore: no "${n}": ${rmsg}`);
      } else assert.match(rmsg, n, `${kase}: restore: ${rmsg}`);
    }
    for (const pid of pids) assert.equal(procState(pid), null, `${kase}: restore left ${pid}`);
    assertLeftNothing(before, `${kase}: failed restore`);
  } finally {
    await killTree(t.pid);
    await waitVanished(pids);
  }
}

/** A mapping's label names its range; `path` is what maps shows. */
const mapping = (path: string | RegExp) =>
  new RegExp(`mapping [0-9a-f]+\\.\\.[0-9a-f]+ ${typeof path === "string" ? path : path.source}`);

Deno.test("refused: a shared library replaced on disk after it was loaded", async () => {
  await assertRefused("replaced-so", [
    mapping("/tmp/\\S+/libz-copy\\.so \\(deleted\\)"),
    "replaced",
  ]);
});

Deno.test("refused: multiprocessing.Lock's deleted /dev/shm/sem.* mapping", async () => {
  await assertRefused("mp-lock", [
    mapping("/dev/shm/sem\\.\\S+ \\(deleted\\)"),
    "POSIX shared memory",
  ]);
});

Deno.test("refused: the AIO ring of an io_setup context", async () => {
  await assertRefused("aio", [mapping("/\\[aio\\]"), "AIO ring"]);
});

Deno.test("refused: a memfd mapping", async () => {
  await assertRefused("memfd", [mapping("/memfd:amber-test"), "memfd"]);
});

Deno.test("refused: an attached SysV shared memory segment", async () => {
  await assertRefused("sysv-shm", [mapping("/SYSV"), "SysV shared memory"]);
});

Deno.test("refused: hugetlb anonymous memory", async () => {
  const knob = "/proc/sys/vm/nr_hugepages";
  const old = Deno.readTextFileSync(knob).trim();
  // The machine may reserve no huge pages: reserve one for the test.
  if (old === "0") Deno.writeTextFileSync(knob, "1");
  try {
    assert.notEqual(Deno.readTextFileSync(knob).trim(), "0", "no huge page could be reserved");
    await assertRefused("hugetlb", [mapping("/anon_hugepage"), "hugetlb"]);
  } finally {
    if (old === "0") Deno.writeTextFileSync(knob, "0");
  }
});

Deno.test("refused: a pseudo-terminal the process opened itself", async () => {
  await assertRefused("ptmx", [/fd \d+: \/dev\/ptmx/]);
});

Deno.test("refused: a /proc file of another process of the tree", async () => {
  await assertRefused("proc-child", [/fd \d+: \/proc\/\d+\/status: a \/proc file of another/]);
});

Deno.test("refused: a file unlinked while open", async () => {
  await assertRefused("deleted-file", [
    /fd \d+: \/tmp\/\S+\/deleted\.txt \(deleted\): open file was deleted/,
  ]);
});

Deno.test("refused: shared anonymous memory the first holder maps only in part", async () => {
  await assertRefused("shm-split", [
    /mapping [0-9a-f]+\.\.[0-9a-f]+ \/dev\/zero \(deleted\): anonymous memory shared with pid \d+, which maps it differently/,
  ]);
});

Deno.test("refused: a file lease", async () => {
  await assertRefused("lease", [/fd \d+: \/tmp\/\S+\/leased\.txt: LEASE read lock/]);
});

/** Dump (killing the target), restore -d, and the target goes on using its object. */
async function assertRestored(kase: string): Promise<void> {
  await using tmp = await tempDir();
  const t = await startHolder(tmp.path, kase);
  try {
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(t.pid, img)), 0, `${kase}: dump`);
    await t.child.status;
    const n = (await readLines(t.out)).length;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, `${kase}: restore`);
    await assertRunningFree(t.pid, `${kase}: restored`);
    await assertCounterGoesOn(t.out, n, 10, `${kase}: after restore`);
  } finally {
    await killTree(t.pid);
  }
}

Deno.test("restored: the process's own /proc/PID/status, open", async () => {
  await assertRestored("proc-self");
});

Deno.test("restored: an eventfd's count, semaphore mode and O_NONBLOCK", async () => {
  await assertRestored("eventfd");
});

Deno.test("restored: an O_PATH descriptor on a dangling symlink", async () => {
  await assertRestored("opath-dangling");
});

/** Writes "N" lines through a plain (not O_APPEND) descriptor, at its own offset. */
const WRITER_PY = `import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
n = 0
while True:
    os.write(fd, b"%d\\n" % n)
    n += 1
    time.sleep(0.02)
`;

Deno.test("a file appended to since the dump: restore refuses, --allow-changed-files accepts", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/written.txt`;
  const t = await startWriter(["setsid", "python3", "-c", WRITER_PY, out], out, 3, 30_000);
  try {
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(t.pid, img)), 0, "dump");
    await t.child.status;
    // Someone else appends to the file meanwhile.
    const added = "written by another process\n";
    Deno.writeTextFileSync(out, added, { append: true });
    const content = Deno.readTextFileSync(out);

    const before = childrenWithState();
    const msg = assertOneLineError(await amber(["restore", "-D", img, "-d"]), 1, "restore");
    for (const want of [out, "changed since the dump", "size", "--allow-changed-files"]) {
      assert.ok(msg.includes(want), `restore: no "${want}": ${msg}`);
    }
    assert.equal(procState(t.pid), null, "the refused restore left the process");
    assertLeftNothing(before, "refused restore");
    assert.equal(Deno.readTextFileSync(out), content, "the refused restore touched the file");

    const rr = await amber(["restore", "-D", img, "-d", "--allow-changed-files"]);
    assertExit(rr, 0, "restore --allow-changed-files");
    await assertRunningFree(t.pid, "restored");
    const n = content.split("\n").length;
    await waitForLines(out, n + 5);
  } finally {
    await killTree(t.pid);
  }
});
