/**
 * Timers across a dump and a restore: the three itimers, alarm(), and
 * POSIX timers with their ids (gaps included), clocks, signals, values,
 * SIGEV_THREAD_ID target and periods. testdata/timers.c checks itself
 * after restore; /proc/PID/timers is compared from outside.
 * Run with: deno test -A tests/timers_test.ts
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  buildC,
  dumpArgs,
  killAndReap,
  spawnTarget,
  tempDir,
  waitForLine,
  waitForLines,
  waitGone,
} from "./_util.ts";

function procTimers(pid: number): string {
  return Deno.readTextFileSync(`/proc/${pid}/timers`);
}

Deno.test("itimers and POSIX timers come back with their ids and periods and keep firing", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("timers", ["-pthread"]);
  const out = `${tmp.path}/timers.txt`, go = `${tmp.path}/go`;
  const { pid, child } = spawnTarget(["setsid", bin, out, go]);
  try {
    await waitForLines(out, 1, 30_000);
    const timers = procTimers(pid);
    assert.match(timers, /^ID: 2\nsignal: \d+\/0+c8\nnotify: signal\/tid\.\d+\n/m);
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    await child.status;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    // Same ids, clocks, signals, values and targets, in the kernel's order.
    assert.equal(procTimers(pid), timers, "/proc/PID/timers after restore");
    Deno.writeTextFileSync(go, "");
    const lines = await waitForLine(
      out,
      (l) => l.some((x) => x === "PASS" || /^FAIL/.test(x)),
      30_000,
    );
    assert.deepEqual(lines, ["ready", "PASS"]);
    assert.ok(await waitGone(pid), "the restored target did not exit");
  } finally {
    await killAndReap(pid);
  }
});

/** Sets alarm(4), says "armed", and writes "alarm" from its SIGALRM handler. */
const ALARM_PY = `import signal, sys, time
out = open(sys.argv[1], "w", buffering=1)
signal.signal(signal.SIGALRM, lambda *a: (out.write("alarm\\n"), sys.exit(0)))
signal.alarm(4)
out.write("armed\\n")
while True:
    time.sleep(0.05)
`;

Deno.test("alarm() set before the dump fires after the restore", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/alarm.txt`;
  const { pid, child } = spawnTarget(["setsid", "python3", "-c", ALARM_PY, out]);
  try {
    await waitForLines(out, 1, 30_000);
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    assert.equal(
      (await child.status).signal,
      "SIGKILL",
      "the alarm fired before the dump ended it",
    );
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    assert.deepEqual(await waitForLines(out, 2, 30_000), ["armed", "alarm"]);
    assert.ok(await waitGone(pid), "the restored target did not exit");
  } finally {
    await killAndReap(pid);
  }
});
