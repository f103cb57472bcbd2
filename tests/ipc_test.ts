/**
 * Kernel objects amber refuses for now, each used by a real process on
 * every tick: SysV semaphores and message queues (found through the last
 * process to use them), io_uring (its descriptor, and its rings mapped
 * with the descriptor closed), an AIO context. The dump without -R fails
 * with one line naming the object, the tree runs on unharmed, and the
 * images of dump -R make restore refuse before it creates anything.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertCounterGoesOn,
  assertExit,
  assertNoHelper,
  assertOneLineError,
  dumpArgs,
  exists,
  isAlive,
  killAndReap,
  procState,
  readLines,
  startWriter,
  tempDir,
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
  sem: `class Sembuf(ctypes.Structure):
    _fields_ = [("num", ctypes.c_ushort), ("op", ctypes.c_short), ("flg", ctypes.c_short)]
sid = must(libc.semget(0, 1, 0o1600), "semget")
open(sys.argv[2], "w").write("-s %d" % sid)
must(libc.semctl(sid, 0, 16, 3), "SETVAL")
def use():
    ops = (Sembuf * 2)(Sembuf(0, 1, 0), Sembuf(0, -1, 0))
    return libc.semop(sid, ops, 2) == 0 and libc.semctl(sid, 0, 12) == 3
`,
  msg: `qid = must(libc.msgget(0, 0o1600), "msgget")
open(sys.argv[2], "w").write("-q %d" % qid)
def use():
    buf = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_long) + 8)
    ctypes.memmove(buf, ctypes.byref(ctypes.c_long(1)), ctypes.sizeof(ctypes.c_long))
    ctypes.memmove(ctypes.addressof(buf) + 8, b"amber", 5)
    if libc.msgsnd(qid, buf, 8, 0) != 0: return False
    got = ctypes.create_string_buffer(16)
    return libc.msgrcv(qid, got, 8, 0, 0) == 8 and got.raw[8:13] == b"amber"
`,
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
  aio: `ctx = ctypes.c_ulong(0)
must(libc.syscall(206, 8, ctypes.byref(ctx)), "io_setup")
use = lambda: ctx.value != 0
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

Deno.test("refused: a SysV semaphore set the process operates on", async () => {
  await assertRefused("sem", /SysV semaphore set 0x00000000 \(id \d+\), used by this process/);
});

Deno.test("refused: a SysV message queue the process sends to and receives from", async () => {
  await assertRefused("msg", /SysV message queue 0x00000000 \(id \d+\), used by this process/);
});

Deno.test("refused: an io_uring descriptor", async () => {
  await assertRefused("io_uring", /fd \d+: anon_inode:\[io_uring\]: io_uring descriptors/);
});

Deno.test("refused: io_uring rings mapped, the descriptor closed", async () => {
  await assertRefused("io_uring-map", /mapping [0-9a-f.]+ anon_inode:\[io_uring\]: .* memory/);
});

Deno.test("refused: an AIO context (io_setup)", async () => {
  await assertRefused("aio", /mapping [0-9a-f.]+ \/\[aio\] \(deleted\): AIO ring \(io_setup\)/);
});
