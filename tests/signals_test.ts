/**
 * Signal state across a dump and a restore: every disposition as it was
 * (none inherited from whoever started amber), pending signals per thread
 * and process-wide with their siginfo, several instances of a real-time
 * signal, a per-thread signal on its thread, a handler on its sigaltstack.
 * The target (testdata/signals.c) checks itself; the kernel's view
 * (/proc/PID/task/TID/status) is compared from outside too.
 * Run with: deno test -A tests/signals_test.ts
 */
import assert from "node:assert/strict";
import {
  amber,
  type AmberResult,
  assertExit,
  buildC,
  CLI,
  DENO,
  dumpArgs,
  killAndReap,
  ROOT,
  spawnTarget,
  statusField,
  tempDir,
  threadsOf,
  waitForLine,
  waitForLines,
  waitGone,
} from "./_util.ts";

const SIGUSR2 = 12, SIGRT1 = 35, SIGRT2 = 36;
const SIGNAL_FIELDS = ["SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"];

/** The signal fields of /proc status, per thread. */
function signalState(pid: number): Record<number, Record<string, string>> {
  return Object.fromEntries(
    threadsOf(pid).map((tid) => [
      tid,
      Object.fromEntries(SIGNAL_FIELDS.map((f) => [f, statusField(pid, f, tid)])),
    ]),
  );
}

function bit(mask: string, sig: number): boolean {
  return (BigInt("0x" + mask) & (1n << BigInt(sig - 1))) !== 0n;
}

/** `amber ARGS` started as `env --ignore-signal=HUP,INT amber ARGS` would start it. */
async function amberIgnoring(signals: string, args: string[]): Promise<AmberResult> {
  const r = await new Deno.Command("env", {
    args: [`--ignore-signal=${signals}`, DENO, "run", "-A", CLI, ...args],
    cwd: ROOT,
    env: { NO_COLOR: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: r.code, stdout: dec.decode(r.stdout), stderr: dec.decode(r.stderr) };
}

Deno.test("pending signals with siginfo, per thread and shared, and every disposition come back", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("signals", ["-pthread"]);
  const out = `${tmp.path}/signals.txt`, go = `${tmp.path}/go`;
  const { pid, child } = spawnTarget(["setsid", bin, out, go]);
  try {
    const [ready] = await waitForLines(out, 1);
    const t = Number(ready.split(" ")[2]);
    assert.equal(ready, `ready ${pid} ${t}`);
    const sender = new Deno.Command(bin, {
      args: ["--queue", String(pid), String(SIGUSR2), "4242"],
    })
      .spawn();
    assert.ok((await sender.status).success, "sigqueue from another process");
    const before = signalState(pid);
    assert.ok(bit(before[pid].ShdPnd, SIGUSR2), "SIGUSR2 pending before the dump");
    assert.ok(bit(before[pid].ShdPnd, SIGRT1), "SIGRTMIN+1 pending before the dump");
    assert.ok(bit(before[t].SigPnd, SIGRT2), "SIGRTMIN+2 pending on T before the dump");
    assert.ok(!bit(before[pid].SigPnd, SIGRT2), "SIGRTMIN+2 not pending on the main thread");

    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    await child.status;
    // SIGHUP and SIGINT ignored by amber's starter must not reach the target.
    assertExit(await amberIgnoring("HUP,INT", ["restore", "-D", img, "-d"]), 0, "restore");
    assert.deepEqual(signalState(pid), before, "signal state in /proc after restore");

    Deno.writeTextFileSync(go, String(sender.pid));
    const lines = await waitForLine(out, (l) => l.some((x) => x === "PASS" || /^FAIL/.test(x)));
    assert.deepEqual(lines, [
      ready,
      "dispositions ok",
      `usr2 value=4242 code=-1 pid=${sender.pid}`,
      "rt1 1 2 3",
      `rt2 tid=${t} onstack=1`,
      "PASS",
    ]);
    assert.ok(await waitGone(pid), "the restored target did not exit");
  } finally {
    await killAndReap(pid);
  }
});
