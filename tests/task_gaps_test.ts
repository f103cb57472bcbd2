/**
 * Task state amber refuses rather than loses (issue 8's gaps): a POSIX
 * timer with an overrun count, a pending SIGSTOP, a sleep resumed through
 * restart_syscall.
 * Run with: deno test -A tests/task_gaps_test.ts
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  assertOneLineError,
  buildC,
  dumpArgs,
  exists,
  isAlive,
  killAndReap,
  procState,
  readLines,
  spawnTarget,
  tempDir,
  until,
  waitForLine,
  waitForLines,
  waitGone,
} from "./_util.ts";

Deno.test("a POSIX timer with an overrun count is refused, named, and the target runs on", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("overrun");
  const out = `${tmp.path}/overrun.txt`;
  const { pid } = spawnTarget(["setsid", bin, out, "delivered"]);
  try {
    const [line] = await waitForLines(out, 1, 30_000);
    assert.match(line, /^ready [1-9]\d*$/, "the target saw no overrun (test bug)");
    const img = `${tmp.path}/img`;
    const msg = assertOneLineError(await amber(dumpArgs(pid, img)), 1, "dump");
    assert.match(
      msg,
      new RegExp(`pid ${pid}: .*POSIX timer 0: overrun count \\d+: not supported yet`),
    );
    assert.ok(isAlive(pid) && procState(pid) !== "Z", "the target did not survive the refusal");
    assert.ok(!exists(`${img}/inventory.cbor`), "images were published");
  } finally {
    await killAndReap(pid);
  }
});

Deno.test("a POSIX timer's pending signal comes back as the timer's own, its overruns counted", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("overrun");
  const out = `${tmp.path}/overrun.txt`, go = `${tmp.path}/go`;
  const { pid } = spawnTarget(["setsid", bin, out, "pending", go]);
  try {
    await waitForLines(out, 1, 30_000);
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    assert.ok(await waitGone(pid), "the dumped target still runs");
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    Deno.writeTextFileSync(go, "");
    const lines = await waitForLine(out, (l) => l.length >= 2, 30_000);
    assert.equal(lines[1], "PASS", "the signal taken after restore");
  } finally {
    await killAndReap(pid);
  }
});

Deno.test("a SIGSTOP sent during the dump is refused, named; the tree is left to stop", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/count.txt`;
  const sh = `i=0; while :; do echo $i >> ${out}; i=$((i+1)); sleep 0.05; done`;
  const { pid } = spawnTarget(["setsid", "bash", "-c", sh]);
  try {
    await waitForLines(out, 2, 30_000);
    const img = `${tmp.path}/img`;
    const dump = amber(dumpArgs(pid, img), { AMBER_TEST_FAULT: "before-commit:pause" });
    // The signals image of the first pass is written: the tree is frozen;
    // the late pass reads the SIGSTOP sent now as pending.
    await until(
      () =>
        exists(img) &&
        [...Deno.readDirSync(img)].some((d) =>
          d.name.startsWith(".amber-dump-") && exists(`${img}/${d.name}/signals-${pid}.cbor`)
        ),
      "the dump wrote no signals image",
      30_000,
    );
    Deno.kill(pid, "SIGSTOP");
    const msg = assertOneLineError(await dump, 1, "dump");
    assert.match(msg, new RegExp(`pid ${pid}: .*pending SIGSTOP: not supported yet`));
    // Unharmed: the SIGSTOP it was sent takes effect, SIGCONT lets it go on.
    await until(() => procState(pid) === "T", "the SIGSTOP was lost", 10_000);
    const n = (await readLines(out)).length;
    Deno.kill(pid, "SIGCONT");
    await waitForLines(out, n + 2, 10_000);
  } finally {
    await killAndReap(pid);
  }
});

/**
 * A loop of relative clock_nanosleep(CLOCK_MONOTONIC, 6 s) without a
 * remaining-time buffer (raw syscall 230), writing "slept N ok" or
 * "slept N err ERRNO" after each.
 */
const SLEEPER_PY = `import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
class ts(ctypes.Structure):
    _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]
out = open(sys.argv[1], "a", buffering=1)
out.write("start\\n")
n = 0
while True:
    r = libc.syscall(230, 1, 0, ctypes.byref(ts(6, 0)), None)
    out.write("slept %d %s\\n" % (n, "ok" if r == 0 else "err %d" % ctypes.get_errno()))
    n += 1
`;

Deno.test("a sleep already in restart_syscall at the dump comes back without EINTR", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/sleep.txt`;
  const { pid } = spawnTarget(["setsid", "python3", "-c", SLEEPER_PY, out]);
  try {
    await waitForLines(out, 1, 30_000);
    // dump -R interrupts the sleep: it then goes on through restart_syscall.
    assertExit(await amber(dumpArgs(pid, `${tmp.path}/first`, "-R")), 0, "dump -R");
    const syscall = Deno.readTextFileSync(`/proc/${pid}/syscall`).split(" ")[0];
    assert.equal(syscall, "219", "the sleep is not in restart_syscall (test bug)");
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    await until(() => !isAlive(pid), "the dumped target still runs", 10_000);
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    const before = (await readLines(out)).length;
    const lines = await waitForLine(out, (l) => l.length >= before + 2, 30_000);
    const bad = lines.filter((l) => l.startsWith("slept") && !l.endsWith(" ok"));
    assert.deepEqual(bad, [], "a sleep failed");
  } finally {
    await killAndReap(pid);
  }
});
