/**
 * The fast paths of dump stay correct: every signal action comes back,
 * also the flags and mask kept with a SIG_DFL one (SIGCHLD's act, others'
 * can be read back), and an injecting dump killed outright leaves its
 * target running on, its interrupted sleep restarted, not failed.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  assertRunningFree,
  dumpArgs,
  killAndReap,
  readLines,
  startWriter,
  statusField,
  tempDir,
  waitForLine,
  waitForLines,
} from "./_util.ts";

/**
 * argv: OUT GO. SIGCHLD at SIG_DFL with SA_NOCLDSTOP|SA_NOCLDWAIT, SIGUSR2
 * at SIG_DFL with SA_RESTART and a mask, SIGUSR1 handled, SIGPIPE ignored, two resource limits changed. Sleeps with a relative nanosleep (a frozen one
 * restarts through restart_syscall), checking its result: a line per
 * tick. Once GO exists it reads the actions back: "PASS" or "FAIL ...".
 */
const TARGET_PY = `import ctypes, os, resource, signal, sys
out, go = sys.argv[1], sys.argv[2]
resource.setrlimit(resource.RLIMIT_NOFILE, (512, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
resource.setrlimit(resource.RLIMIT_CORE, (4096, 8192))
libc = ctypes.CDLL(None, use_errno=True)
class SA(ctypes.Structure):
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]
class TS(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]
def line(s):
    with open(out, "a") as o:
        o.write(s + "\\n")
sa = SA(None, (ctypes.c_ulong * 16)(), 1 | 2, None)
if libc.sigaction(signal.SIGCHLD, ctypes.byref(sa), None):
    sys.exit(3)
usr2 = SA(None, (ctypes.c_ulong * 16)(1 << 14), 0x10000000, None)
if libc.sigaction(signal.SIGUSR2, ctypes.byref(usr2), None):
    sys.exit(3)
signal.signal(signal.SIGUSR1, lambda s, f: None)
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
n = 0
while not os.path.exists(go):
    if libc.nanosleep(ctypes.byref(TS(0, 30000000)), None):
        line("FAIL nanosleep errno %d" % ctypes.get_errno())
        sys.exit(1)
    line(str(n))
    n += 1
old = SA()
libc.sigaction(signal.SIGCHLD, None, ctypes.byref(old))
ok = (old.flags & 3) == 3 and not old.handler
ok = ok and signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
ok = ok and callable(signal.getsignal(signal.SIGUSR1))
libc.sigaction(signal.SIGUSR2, None, ctypes.byref(old))
ok = ok and old.flags & 0x10000000 and old.mask[0] == 1 << 14 and not old.handler
line("PASS" if ok else "FAIL SIGCHLD flags 0x%x handler %s" % (old.flags, old.handler))
`;

async function startTarget(dir: string) {
  const out = `${dir}/out.txt`, go = `${dir}/go`;
  const t = await startWriter(["setsid", "python3", "-c", TARGET_PY, out, go], out, 3);
  return { ...t, go };
}

/** Tells the target to check itself; returns its verdict line. */
async function verdict(out: string, go: string): Promise<string> {
  Deno.writeTextFileSync(go, "");
  const lines = await waitForLine(out, (ls) => ls.some((l) => /^(PASS|FAIL)/.test(l)));
  return lines.find((l) => /^(PASS|FAIL)/.test(l))!;
}

function signalState(pid: number): string[] {
  return ["SigBlk", "SigCgt", "SigIgn"].map((f) => `${f} ${statusField(pid, f)}`);
}

const limits = (pid: number) => Deno.readTextFileSync(`/proc/${pid}/limits`);

Deno.test("SIGCHLD flags at SIG_DFL, handled and ignored signals, limits come back", async () => {
  await using tmp = await tempDir();
  const t = await startTarget(tmp.path);
  try {
    const img = `${tmp.path}/img`;
    const before = limits(t.pid);
    assert.match(before, /^Max open files\s+512\s/m);
    assertExit(await amber(dumpArgs(t.pid, img)), 0, "dump");
    await t.child.status;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    const n = (await readLines(t.out)).length;
    await waitForLines(t.out, n + 2);
    assert.equal(limits(t.pid), before, "resource limits after restore");
    assert.equal(await verdict(t.out, t.go), "PASS");
  } finally {
    await killAndReap(t.pid);
  }
});

Deno.test("dump killed between injected calls: the target runs on, its sleep restarted", async () => {
  await using tmp = await tempDir();
  const t = await startTarget(tmp.path);
  try {
    const before = signalState(t.pid);
    for (const extra of [["-R"], []]) {
      const r = await amber(dumpArgs(t.pid, `${tmp.path}/img${extra.join("")}`, ...extra), {
        AMBER_TEST_FAULT: "mid-sigactions:SIGKILL",
      });
      // Deno reports a child killed by signal N as code 128 + N.
      assert.equal(r.code, 128 + 9, `amber ${extra}: ${r.code} ${r.stderr}`);
      await assertRunningFree(t.pid, `after a killed dump ${extra}`);
      assert.deepEqual(signalState(t.pid), before);
      const n = (await readLines(t.out)).length;
      await waitForLines(t.out, n + 3);
    }
    assert.equal(await verdict(t.out, t.go), "PASS");
  } finally {
    await killAndReap(t.pid);
  }
});
