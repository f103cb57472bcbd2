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
  spawnTarget,
  startWriter,
  tempDir,
  TESTDATA,
  until,
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
async function assertRefused(
  kase: string,
  names: (string | RegExp)[],
  notYet = true,
): Promise<void> {
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
    if (notYet) assert.match(msg, /not supported yet/, `${kase}: dump: ${msg}`);
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

Deno.test("restored: an io_setup context, io_getevents on it still works", async () => {
  await assertRestored("aio");
});

/** Runs `body` with at least one huge page reserved (the machine may reserve none). */
async function withHugePage(body: () => Promise<void>): Promise<void> {
  const knob = "/proc/sys/vm/nr_hugepages";
  const old = Deno.readTextFileSync(knob).trim();
  if (old === "0") Deno.writeTextFileSync(knob, "1");
  try {
    assert.notEqual(Deno.readTextFileSync(knob).trim(), "0", "no huge page could be reserved");
    await body();
  } finally {
    if (old === "0") Deno.writeTextFileSync(knob, "0");
  }
}

Deno.test("refused: hugetlb anonymous memory", () =>
  withHugePage(() => assertRefused("hugetlb", [mapping("/anon_hugepage"), "hugetlb"])));

// Large enough for dump -R's copy-on-write snapshot, whose own registration
// of the process's memory must not hide the process's.
Deno.test("refused: memory registered on the process's own userfaultfd (write-protect)", () =>
  assertRefused("uffd-wp", ["userfaultfd (write-protect) registration"]));

Deno.test("refused: a memfd of huge pages held as a descriptor", () =>
  withHugePage(() => assertRefused("memfd-hugetlb", [/fd \d+: \/memfd:huge.*huge pages/])));

Deno.test("restored: a pseudo-terminal pair the process opened itself (lib/fds/pty.ts)", async () => {
  await assertRestored("ptmx");
});

Deno.test("refused: a /proc file of another process of the tree", async () => {
  await assertRefused("proc-child", [/fd \d+: \/proc\/\d+\/status: a \/proc file of another/]);
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
async function assertRestored(kase: string, work?: string, ...dumpExtra: string[]): Promise<void> {
  await using tmp = await tempDir();
  const t = await startHolder(work ?? tmp.path, kase);
  let pids = [t.pid];
  try {
    pids = descendants(t.pid);
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(t.pid, img, ...dumpExtra)), 0, `${kase}: dump`);
    await t.child.status;
    await waitVanished(pids);
    const n = (await readLines(t.out)).length;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, `${kase}: restore`);
    await assertRunningFree(t.pid, `${kase}: restored`);
    for (const pid of pids) assert.ok(isAlive(pid), `${kase}: ${pid} not restored`);
    await assertCounterGoesOn(t.out, n, 10, `${kase}: after restore`);
  } finally {
    await killTree(t.pid);
    await waitVanished(pids);
  }
}

Deno.test("restored: a shared library replaced on disk after it was loaded (ghost copy)", async () => {
  await assertRestored("replaced-so");
});

Deno.test("restored: multiprocessing.Lock's deleted /dev/shm/sem.* mapping", async () => {
  await assertRestored("mp-lock");
});

Deno.test("restored: multiprocessing.Value and its lock, shared with a child process", async () => {
  await assertRestored("mp-value");
});

Deno.test("restored: a file unlinked while open (ghost copy), still unlinked", async () => {
  await assertRestored("deleted-file");
});

Deno.test("a deleted file above the ghost limit is refused; --ghost-limit saves it", async () => {
  await assertRefused("deleted-big", [
    /fd \d+: \/tmp\/\S+\/big\.bin \(deleted\): the deleted open file is 2097152 bytes, above the ghost limit: dump with --ghost-limit 2097152/,
  ], false);
  await assertRestored("deleted-big", undefined, "--ghost-limit", "3M");
});

Deno.test("restored: a memfd mapped, its descriptor closed", async () => {
  await assertRestored("memfd");
});

Deno.test("restored: a memfd descriptor (not mapped)", async () => {
  await assertRestored("memfd-fd");
});

Deno.test("restored: the process's own /proc/PID/status, open", async () => {
  await assertRestored("proc-self");
});

Deno.test("restored: a FIFO with bytes waiting in it, each end with its own flags", async () => {
  await assertRestored("fifo");
});

Deno.test("restored: a signalfd's mask and O_NONBLOCK", async () => {
  await assertRestored("signalfd");
});

Deno.test("restored: timerfds, periodic and one-shot, still armed", async () => {
  await assertRestored("timerfd");
});

Deno.test("restored: epoll interest lists (edge-triggered, own data, nested epoll)", async () => {
  await assertRestored("epoll");
});

Deno.test("restored: an epoll watch whose fd number now holds another eventfd", async () => {
  await assertRestored("epoll-reused");
});

Deno.test("refused: an epoll watch of a file only another process holds", async () => {
  await assertRefused("epoll-child-fd", [
    /fd \d+: epoll watch of fd \d+, whose file this process no longer holds/,
  ]);
});

Deno.test("restored: inotify watches, same wd, events after the restore", async () => {
  await assertRestored("inotify");
});

Deno.test("restored: inotify watches keep IN_ONESHOT and IN_EXCL_UNLINK", async () => {
  await assertRestored("inotify-flags");
});

Deno.test("restored: a fanotify group with an inode mark and an ignored mask", async () => {
  await assertRestored("fanotify");
});

Deno.test("restored: a fanotify group with mount and filesystem marks too", async () => {
  await assertRestored("fanotify-mount");
});

Deno.test("refused: fanotify events queued and not read; a permission-class group", async () => {
  await assertRefused("fanotify-queued", [/fd \d+: fanotify: 24 bytes of events not read yet/]);
  await assertRefused("fanotify-perm", [/fd \d+: fanotify: a permission-class group/]);
});

Deno.test("refused: inotify events queued and not read", async () => {
  await assertRefused("inotify-queued", [/fd \d+: inotify: \d+ bytes of events not read yet/]);
});

Deno.test("restored: a pidfd of a child in the tree", async () => {
  await assertRestored("pidfd");
});

Deno.test("refused: a pidfd of a process outside the tree", async () => {
  await assertRefused("pidfd-outside", [/fd \d+: pidfd of pid \d+, outside the dumped tree/]);
});

Deno.test("restored: a read-only shared mapping of a read-write file can still be made writable", async () => {
  await assertRestored("shared-ro-map");
});

Deno.test("restored: a SysV shared memory segment marked for removal, shared with a child", async () => {
  await assertRestored("sysv-shm");
});

Deno.test("restored: SysV shared memory attached read-only stays read-only", async () => {
  await assertRestored("sysv-shm-ro");
});

Deno.test("restored: a SysV shared memory segment that outlives its processes", async () => {
  await using tmp = await tempDir();
  try {
    await assertRestored("sysv-shm-kept", tmp.path);
  } finally {
    const id = Deno.readTextFileSync(`${tmp.path}/shmid`).trim();
    await new Deno.Command("ipcrm", { args: ["-m", id] }).output();
  }
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

Deno.test("refused: an executable replaced on disk while it runs", async () => {
  await using tmp = await tempDir();
  const exe = `${tmp.path}/sleeper`;
  Deno.copyFileSync("/usr/bin/sleep", exe);
  Deno.chmodSync(exe, 0o755);
  const t = spawnTarget(["setsid", exe, "600"]);
  try {
    await until(() => Deno.readLinkSync(`/proc/${t.pid}/exe`) === exe, "the sleeper did not start");
    // An upgrade: a new file renamed over the running one.
    Deno.copyFileSync(exe, `${exe}.new`);
    Deno.renameSync(`${exe}.new`, exe);
    const img = `${tmp.path}/img`;
    const want = "the executable was deleted or replaced: not supported yet";
    const msg = assertOneLineError(await amber(dumpArgs(t.pid, img)), 1, "dump");
    assert.ok(msg.includes(want) && msg.includes(`${exe} (deleted)`), `dump: ${msg}`);
    assert.ok(isAlive(t.pid), "the refused dump ended the sleeper");
    assertExit(await amber(dumpArgs(t.pid, img, "-R")), 0, "dump -R");
    await killTree(t.pid);
    const before = childrenWithState();
    const rmsg = assertOneLineError(await amber(["restore", "-D", img, "-d"]), 1, "restore");
    assert.ok(rmsg.includes(want), `restore: ${rmsg}`);
    assertLeftNothing(before, "refused restore");
  } finally {
    await killTree(t.pid);
  }
});
