/**
 * SysV semaphore sets and message queues, and AIO contexts, restored: the
 * targets check the objects themselves after restore by using them. And
 * what is still refused, each used by a real process on every tick:
 * io_uring (its descriptor, and its rings mapped with the descriptor
 * closed), a SysV queue shared with a live process outside the tree. The
 * dump without -R fails with one line naming the object, the tree runs on
 * unharmed, and the images of dump -R make restore refuse before it
 * creates anything.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertCounterGoesOn,
  assertExit,
  assertNoHelper,
  assertOneLineError,
  buildC,
  childrenOf,
  dumpArgs,
  exists,
  isAlive,
  type Json,
  killAndReap,
  procMaps,
  procState,
  readLines,
  showJson,
  spawnTarget,
  startWriter,
  tempDir,
  waitFor,
  waitForLine,
  waitForLines,
  waitGone,
  waitVanished,
} from "./_util.ts";

const PRELUDE = `import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
def must(r, what):
    if r < 0: raise OSError(ctypes.get_errno(), what)
    return r
`;

/** Each case sets things up, then returns a function that uses the object (True when it works). */
const CASES: Record<string, string> = {
  "io_uring": `params = (ctypes.c_char * 120)()
fd = must(libc.syscall(425, 8, params), "io_uring_setup")
use = lambda: os.readlink("/proc/self/fd/%d" % fd) == "anon_inode:[io_uring]"
`,
  "io_uring-map": `params = (ctypes.c_char * 120)()
fd = must(libc.syscall(425, 8, params), "io_uring_setup")
ring = libc.mmap(None, 4096, 3, 1, fd, 0)
os.close(fd)
head = ctypes.c_uint32.from_address(ring)
use = lambda: head.value == 0
`,
};

const LOOP = `
out = open(sys.argv[1], "w")
n = 0
while True:
    out.write("%d\\n" % n if use() else "BAD %d\\n" % n)
    out.flush()
    n += 1
    time.sleep(0.02)
`;

async function assertRefused(kase: string, name: RegExp): Promise<void> {
  await using tmp = await tempDir();
  const out = `${tmp.path}/out.txt`, ipc = `${tmp.path}/ipc`;
  const argv = ["setsid", "python3", "-c", PRELUDE + CASES[kase] + LOOP, out, ipc];
  const t = await startWriter(argv, out, 3, 30_000);
  try {
    const img = `${tmp.path}/img`;
    const msg = assertOneLineError(await amber(dumpArgs(t.pid, img)), 1, `${kase}: dump`);
    assert.match(msg, new RegExp(`pid ${t.pid}: .*${name.source}.*not supported yet`), msg);
    assert.ok(msg.includes("-R"), `${kase}: dump does not mention -R: ${msg}`);
    assert.ok(!exists(img), `${kase}: the refused dump left images`);
    await assertCounterGoesOn(out, (await readLines(out)).length, 5, `${kase}: after the refusal`);

    assertExit(await amber(dumpArgs(t.pid, img, "-R")), 0, `${kase}: dump -R`);
    await assertCounterGoesOn(out, (await readLines(out)).length, 5, `${kase}: after dump -R`);
    await killAndReap(t.pid);
    const rr = await amber(["restore", "-D", img, "-d"]);
    assert.match(assertOneLineError(rr, 1, `${kase}: restore`), name);
    assert.equal(procState(t.pid), null, `${kase}: restore left the process`);
    assertNoHelper(`${kase}: refused restore`);
  } finally {
    if (isAlive(t.pid)) await killAndReap(t.pid);
    if (exists(ipc)) {
      const [flag, id] = Deno.readTextFileSync(ipc).split(" ");
      await new Deno.Command("ipcrm", { args: [flag, id] }).output();
    }
  }
}

Deno.test("refused: an io_uring descriptor", async () => {
  await assertRefused("io_uring", /fd \d+: anon_inode:\[io_uring\]: io_uring descriptors/);
});

Deno.test("refused: io_uring rings mapped, the descriptor closed", async () => {
  await assertRefused("io_uring-map", /mapping [0-9a-f.]+ anon_inode:\[io_uring\]: .* memory/);
});

/**
 * A semaphore set (values 3, 0, 7) and a queue holding three messages of
 * types 5, 2, 9, both made as uid/gid 65534 (their creator) and then used
 * by root. Counts every 20 ms; on SIGUSR1 it checks, through the ids it
 * was given by the kernel, the values, that semop works on them, and that
 * msgrcv returns the messages in order, and writes "check ok".
 */
const SYSV_PY = PRELUDE + `import signal
class Sembuf(ctypes.Structure):
    _fields_ = [("num", ctypes.c_ushort), ("op", ctypes.c_short), ("flg", ctypes.c_short)]
class Msg(ctypes.Structure):
    _fields_ = [("type", ctypes.c_long), ("text", ctypes.c_char * 64)]
MSGS = [(5, b"first"), (2, b"second one"), (9, b"third")]
os.setegid(65534); os.seteuid(65534)
sid = must(libc.semget(0, 3, 0o1640), "semget")
qid = must(libc.msgget(0, 0o1620), "msgget")
os.seteuid(0); os.setegid(0)
for i, v in enumerate([3, 0, 7]):
    must(libc.semctl(sid, i, 16, v), "SETVAL")
for t, text in MSGS:
    must(libc.msgsnd(qid, ctypes.byref(Msg(t, text)), len(text), 0), "msgsnd")
open(sys.argv[2], "w").write("%d %d" % (sid, qid))
out = open(sys.argv[1], "w")
def values():
    return [libc.semctl(sid, i, 12) for i in range(3)]
def check():
    if values() != [3, 0, 7]: return "values %s" % values()
    ops = (Sembuf * 2)(Sembuf(0, -1, 0), Sembuf(2, 1, 0))
    if libc.semop(sid, ops, 2) != 0 or values() != [2, 0, 8]: return "semop %s" % values()
    for t, text in MSGS:
        m = Msg()
        n = libc.msgrcv(qid, ctypes.byref(m), 64, 0, 0o4000)
        if n != len(text) or m.type != t or m.text != text: return "msgrcv %d %d %r" % (n, m.type, m.text)
    if libc.msgrcv(qid, ctypes.byref(Msg()), 64, 0, 0o4000) != -1: return "a fourth message"
    return "ok"
def on_usr1(s, f):
    with open(sys.argv[1] + ".check", "a") as c:
        c.write("check %s\\n" % check())
signal.signal(signal.SIGUSR1, on_usr1)
n = 0
while True:
    out.write("%d\\n" % n)
    out.flush()
    n += 1
    time.sleep(0.02)
`;

/** The rows of /proc/sysvipc/{sem,msg} for these ids, without times (and the queue's pids). */
function sysvRows(sid: number, qid: number): string[] {
  const row = (name: string, id: number, drop: number[]) =>
    Deno.readTextFileSync(`/proc/sysvipc/${name}`).split("\n").map((l) => l.trim().split(/\s+/))
      .find((f) => Number(f[1]) === id)?.filter((_, i) => !drop.includes(i)).join(" ") ?? "gone";
  // sem: key semid perms nsems uid gid cuid cgid otime ctime;
  // msg: key msqid perms cbytes qnum lspid lrpid uid gid cuid cgid stime rtime ctime.
  return [row("sem", sid, [8, 9]), row("msg", qid, [5, 6, 11, 12, 13])];
}

/** Runs python3 code on the objects from outside (ctypes), with sid and qid set. */
async function meddle(sid: number, qid: number, code: string): Promise<void> {
  const r = await new Deno.Command("python3", {
    args: ["-c", PRELUDE + `sid, qid = ${sid}, ${qid}\n` + code],
  }).output();
  assert.equal(r.code, 0, new TextDecoder().decode(r.stderr));
}

/** Has the target check the objects (SIGUSR1) and asserts it found them as they were. */
async function checkOk(pid: number, out: string, what: string): Promise<void> {
  const file = `${out}.check`;
  const before = exists(file) ? (await readLines(file)).length : 0;
  Deno.kill(pid, "SIGUSR1");
  const lines = await waitForLine(file, (ls) => ls.length > before);
  assert.equal(lines[before], "check ok", what);
}

async function withSysvTarget(
  body: (t: { pid: number; out: string; img: string; sid: number; qid: number }) => Promise<void>,
): Promise<void> {
  await using tmp = await tempDir();
  const out = `${tmp.path}/out.txt`, ids = `${tmp.path}/ids`;
  const t = await startWriter(["setsid", "python3", "-c", SYSV_PY, out, ids], out, 3, 30_000);
  const [sid, qid] = Deno.readTextFileSync(ids).split(" ").map(Number);
  try {
    await body({ pid: t.pid, out, img: `${tmp.path}/img`, sid, qid });
  } finally {
    if (isAlive(t.pid)) await killAndReap(t.pid);
    await new Deno.Command("ipcrm", { args: ["-s", String(sid), "-q", String(qid)] }).output();
  }
}

Deno.test("restored: SysV semaphore values and queued messages, the objects taken over after a dump", async () => {
  await withSysvTarget(async ({ pid, out, img, sid, qid }) => {
    const rows = sysvRows(sid, qid);
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    await waitGone(pid);
    // The kernel keeps them when their users end, as the dump leaves them.
    assert.deepEqual(sysvRows(sid, qid), rows, "the dump changed the objects");
    // Meanwhile someone changes them: the restore puts the dumped state back.
    await meddle(
      sid,
      qid,
      `libc.semctl(sid, 0, 16, 99)
m = ctypes.create_string_buffer(16)
m[0] = 1
must(libc.msgsnd(qid, m, 4, 0), "msgsnd")
`,
    );
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    assert.deepEqual(sysvRows(sid, qid), rows, "the restored objects differ");
    // Still the tree's: a second dump finds them through their last pids.
    assertExit(await amber(dumpArgs(pid, `${img}2`, "-R")), 0, "dump -R of the restored tree");
    const again = (await showJson(`${img}2`)).processes[0].images.sysvipc;
    assert.deepEqual([again.sems[0]?.id, again.msgs[0]?.id], [sid, qid], "the second dump");
    assert.deepEqual(again.sems[0].values, [3, 0, 7], "values in the second dump");
    await checkOk(pid, out, "after restore");
    await assertCounterGoesOn(out, (await readLines(out)).length, 5, "after restore");
  });
});

Deno.test("restored: SysV semaphores and queues made again under their ids; dump -R leaves them untouched", async () => {
  await withSysvTarget(async ({ pid, out, img, sid, qid }) => {
    const rows = sysvRows(sid, qid);
    assertExit(await amber(dumpArgs(pid, img, "-R")), 0, "dump -R");
    assert.deepEqual(sysvRows(sid, qid), rows, "dump -R changed the objects");
    await checkOk(pid, out, "after dump -R, the running original");
    await killAndReap(pid);
    const ipcrm = await new Deno.Command("ipcrm", { args: ["-s", `${sid}`, "-q", `${qid}`] })
      .output();
    assert.equal(ipcrm.code, 0, "ipcrm");
    // A restore that fails removes what it made again.
    const failed = await amber(["restore", "-D", img, "-d", "--allow-changed-files"], {
      AMBER_TEST_FAULT: "before-detach",
    });
    assertOneLineError(failed, 1, "failed restore");
    assert.deepEqual(sysvRows(sid, qid), ["gone", "gone"], "the failed restore left objects");
    // (The counter file went on after dump -R.)
    assertExit(await amber(["restore", "-D", img, "-d", "--allow-changed-files"]), 0, "restore");
    assert.deepEqual(
      sysvRows(sid, qid),
      rows,
      "the objects made again differ (ids, owner, creator)",
    );
    await checkOk(pid, out, "after restore");
  });
});

Deno.test("refused: a SysV message queue shared with a live process outside the tree", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/out.txt`, ids = `${tmp.path}/ids`;
  // The outsider makes the queue, sends one message and stays.
  const outsider = spawnTarget([
    "python3",
    "-c",
    PRELUDE + `qid = must(libc.msgget(0, 0o1600), "msgget")
m = ctypes.create_string_buffer(16)
m[0] = 1
must(libc.msgsnd(qid, m, 4, 0), "msgsnd")
open(sys.argv[1], "w").write("%d" % qid)
time.sleep(600)
`,
    ids,
  ]);
  let qid = -1;
  try {
    qid = Number(
      await waitFor(
        () => exists(ids) && Deno.readTextFileSync(ids) || undefined,
        "the outsider's queue id",
      ),
    );
    const t = await startWriter(
      [
        "setsid",
        "python3",
        "-c",
        PRELUDE + `qid = int(sys.argv[2])
must(libc.msgrcv(qid, ctypes.create_string_buffer(16), 8, 0, 0), "msgrcv")
use = lambda: True
` + LOOP,
        out,
        String(qid),
      ],
      out,
      3,
      30_000,
    );
    try {
      const msg = assertOneLineError(await amber(dumpArgs(t.pid, `${tmp.path}/img`)), 1, "dump");
      assert.match(
        msg,
        new RegExp(
          `SysV message queue 0x00000000 \\(id ${qid}\\) is also used by pid ${outsider.pid}, outside`,
        ),
        msg,
      );
      await assertCounterGoesOn(out, (await readLines(out)).length, 5, "after the refusal");
    } finally {
      await killAndReap(t.pid);
    }
  } finally {
    await killAndReap(outsider.pid);
    if (qid >= 0) await new Deno.Command("ipcrm", { args: ["-q", String(qid)] }).output();
  }
});

/**
 * The aio target (testdata/aio.c) on a data file, counting into out.txt;
 * with `polls`, also polling a FIFO (`fifo`) that many times through its
 * context, after 200 reads reaped on its CPUs in turn.
 */
async function withAioTarget(
  body: (t: { pid: number; out: string; img: string; fifo: string }) => Promise<void>,
  polls = 0,
): Promise<void> {
  await using tmp = await tempDir();
  const out = `${tmp.path}/out.txt`, data = `${tmp.path}/data`, fifo = `${tmp.path}/fifo`;
  Deno.writeTextFileSync(data, "0123456789abcdefghijklmnopqrstuvwxyz");
  const mkfifo = await new Deno.Command("mkfifo", { args: [fifo] }).output();
  assert.equal(mkfifo.code, 0, "mkfifo");
  const argv = ["setsid", await buildC("aio"), out, data, ...(polls ? [fifo, String(polls)] : [])];
  const t = await startWriter(argv, out, 3);
  try {
    await body({ pid: t.pid, out, img: `${tmp.path}/img`, fifo });
  } finally {
    if (isAlive(t.pid)) await killAndReap(t.pid);
  }
}

/** Bytes of the process's memory at `start`, read through /proc/PID/mem. */
function memoryOf(pid: number, start: bigint, length: number): Uint8Array {
  using f = Deno.openSync(`/proc/${pid}/mem`);
  f.seekSync(Number(start), Deno.SeekMode.Start);
  const buf = new Uint8Array(length);
  for (let got = 0; got < length;) {
    const n = f.readSync(buf.subarray(got));
    if (!n) throw new Error(`pid ${pid}: memory at ${start.toString(16)}: short read`);
    got += n;
  }
  return buf;
}

/** The target's AIO ring mapping. */
function aioRingOf(pid: number): { start: bigint; end: bigint } {
  const ring = procMaps(pid).find((m) => m.path.startsWith("/[aio]"));
  assert.ok(ring, "the target has no AIO ring");
  return ring;
}

/** Completions waiting in a ring (its header: nr, head, tail). */
function waitingIn(pid: number, ring: bigint): number {
  const [nr, head, tail] = new Uint32Array(memoryOf(pid, ring + 4n, 12).buffer);
  return (tail + nr - head) % nr;
}

/** The pipes a process holds, by their names (pipe:[INO]). */
function pipesOf(pid: number): Set<string> {
  const links = [...Deno.readDirSync(`/proc/${pid}/fd`)].map((e) => {
    try {
      return Deno.readLinkSync(`/proc/${pid}/fd/${e.name}`);
    } catch {
      return "";
    }
  });
  return new Set(links.filter((l) => l.startsWith("pipe:")));
}

/** Writes a line to the FIFO the target polls (it holds the read end: opening never blocks). */
function feed(fifo: string): void {
  using f = Deno.openSync(fifo, { write: true });
  f.writeSync(new TextEncoder().encode("fed\n"));
}

Deno.test("restored: an AIO context with a completion not yet reaped, then a new request", async () => {
  await withAioTarget(async ({ pid, out, img }) => {
    const ring = procMaps(pid).find((m) => m.path.startsWith("/[aio]"));
    assert.ok(ring, "the target has no AIO ring");
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    await waitGone(pid);
    const image = (await showJson(img)).processes[0].images.mappings.mappings.find((m: Json) =>
      m.path.startsWith("/[aio]")
    );
    assert.deepEqual([image.aio.nr, image.aio.head, image.aio.tail], [383, 5, 6], "ring in image");
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    const again = procMaps(pid).find((m) => m.path.startsWith("/[aio]"));
    assert.deepEqual([again?.start, again?.end], [ring.start, ring.end], "the ring's address");
    await checkOk(pid, out, "after restore");
    await assertCounterGoesOn(out, (await readLines(out)).length, 5, "after restore");
  });
});

Deno.test("restored: an AIO context from dump -R, which left the original's ring as it was", async () => {
  await withAioTarget(async ({ pid, out, img }) => {
    assertExit(await amber(dumpArgs(pid, img, "-R")), 0, "dump -R");
    await checkOk(pid, out, "the original after dump -R");
    await killAndReap(pid);
    assertExit(await amber(["restore", "-D", img, "-d", "--allow-changed-files"]), 0, "restore");
    await checkOk(pid, out, "after restore");
  });
});

Deno.test("restored: an AIO poll in flight at the dump, completed while frozen, then reaped", async () => {
  await withAioTarget(async ({ pid, out, img, fifo }) => {
    const ring = aioRingOf(pid);
    const pipes = pipesOf(pid);
    const dump = amber(dumpArgs(pid, img, "--aio-timeout", "60"));
    // amber's own pipe in the frozen target: it is counting the requests in flight.
    await waitFor(
      () => procState(pid) === "t" && [...pipesOf(pid)].some((p) => !pipes.has(p)) || undefined,
      "amber counting the target's AIO requests",
      60_000,
    );
    feed(fifo);
    assertExit(await dump, 0, "dump");
    await waitGone(pid);
    const image = (await showJson(img)).processes[0].images.mappings.mappings.find((m: Json) =>
      m.path.startsWith("/[aio]")
    );
    // The read's completion, then the poll's (aio_data 7), at the ring's own places.
    assert.deepEqual([image.aio.nr, image.aio.head, image.aio.tail], [383, 200, 202], "the ring");
    assert.equal(image.aio.events.slice(64, 66), "07", "the poll's completion in the image");
    const shown = await amber(["show", img]);
    assert.match(shown.stdout, /AIO ring of 383 events, head 200, tail 202, 2 completions waiting/);
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    assert.equal(waitingIn(pid, ring.start), 2, "completions waiting after restore");
    await checkOk(pid, out, "after restore");
    await assertCounterGoesOn(out, (await readLines(out)).length, 5, "after restore");
  }, 1);
});

Deno.test("refused: AIO polls still in flight after --aio-timeout; the ring is left as it was", async () => {
  await withAioTarget(async ({ pid, out, img, fifo }) => {
    const ring = aioRingOf(pid);
    const size = Number(ring.end - ring.start);
    const before = memoryOf(pid, ring.start, size);
    const msg = assertOneLineError(
      await amber(dumpArgs(pid, img, "--aio-timeout", "1")),
      1,
      "dump",
    );
    assert.match(
      msg,
      new RegExp(
        `^amber: pid ${pid}: .*aio context 0x${ring.start.toString(16)}: ` +
          "3 requests still in flight after 1 s",
      ),
    );
    assert.ok(!exists(img) || [...Deno.readDirSync(img)].length === 0, "images left");
    // Header and every slot, but the 3 after the tail, which the polls' completions will take.
    const after = memoryOf(pid, ring.start, size);
    const tail = new Uint32Array(before.buffer, 12, 1)[0];
    for (const m of [before, after]) m.fill(0, 32 + tail * 32, 32 + (tail + 3) * 32);
    assert.deepEqual(after, before, "the ring changed");
    await assertCounterGoesOn(out, (await readLines(out)).length, 5, "after the refusal");
    feed(fifo);
    await waitFor(() => waitingIn(pid, ring.start) === 4 || undefined, "the polls' completions");
    await checkOk(pid, out, "fed after the refusal");
  }, 3);
});

/**
 * Parent and child share one set of two semaphores: the parent last set
 * semaphore 0, the child semaphore 1 (semctl GETPID names each). Each
 * logs every 20 ms whether GETPID still names the right process for both
 * and the values are still 4 and 9.
 */
const SHARED_SEM_PY = PRELUDE + `sid = must(libc.semget(0, 2, 0o1600), "semget")
open(sys.argv[2], "w").write("%d" % sid)
must(libc.semctl(sid, 0, 16, 4), "SETVAL")
parent = os.getpid()
child = os.fork()
if child == 0:
    must(libc.semctl(sid, 1, 16, 9), "SETVAL")
    child = os.getpid()
else:
    while libc.semctl(sid, 1, 11) != child: time.sleep(0.01)
out = open(sys.argv[1] + (".P" if os.getpid() == parent else ".C"), "w")
n = 0
while True:
    ok = [libc.semctl(sid, i, 11) for i in (0, 1)] == [parent, child]
    ok = ok and [libc.semctl(sid, i, 12) for i in (0, 1)] == [4, 9]
    out.write("%d\\n" % n if ok else "BAD %d\\n" % n)
    out.flush()
    n += 1
    time.sleep(0.02)
`;

Deno.test("restored: a semaphore set parent and child share, each semaphore's last pid its own", async () => {
  await using tmp = await tempDir();
  const base = `${tmp.path}/out`, ids = `${tmp.path}/ids`;
  const t = await startWriter(
    ["setsid", "python3", "-c", SHARED_SEM_PY, base, ids],
    `${base}.P`,
    3,
  );
  const sid = Number(Deno.readTextFileSync(ids));
  let pids = [t.pid];
  try {
    await waitForLines(`${base}.C`, 3);
    pids = [t.pid, ...childrenOf(t.pid)];
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(t.pid, img)), 0, "dump");
    await waitVanished(pids);
    const doc = await showJson(img);
    const part = (pid: number) => doc.processes.find((p: Json) => p.pid === pid).images.sysvipc;
    assert.equal(part(pids[0]).sems.length, 1, "the parent records the set");
    assert.equal(part(pids[1]).sems.length, 0, "the child refers to it");
    assert.deepEqual(part(pids[1]).own, [{ id: sid, nums: [1], values: [9] }], "the child's own");
    const n = [(await readLines(`${base}.P`)).length, (await readLines(`${base}.C`)).length];
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    await assertCounterGoesOn(`${base}.P`, n[0], 5, "the parent after restore");
    await assertCounterGoesOn(`${base}.C`, n[1], 5, "the child after restore");
  } finally {
    for (const pid of pids) if (isAlive(pid)) await killAndReap(pid);
    await new Deno.Command("ipcrm", { args: ["-s", String(sid)] }).output();
  }
});
