/**
 * Injected syscalls leave no trace in the target: a SIGTRAP handler and an
 * ignored SIGTRAP survive `dump -R` and a restore, and so does the blocked
 * mask (single steps would have reset SIGTRAP to SIG_DFL).
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  dumpArgs,
  killAndReap,
  startWriter,
  statusField,
  tempDir,
  threadsOf,
  waitForLine,
} from "./_util.ts";

/**
 * argv[1] "handle" or "ignore": SIGTRAP disposition; "blocked": handled and
 * blocked; "pending": that, and one SIGTRAP pending. SIGUSR1 blocked; a line per tick; a
 * second thread sleeps.
 */
const TRAP_PY = `import os, signal, sys, threading, time
mode, out = sys.argv[1], sys.argv[2]
def trapped(s, f):
    with open(out, "a") as o:
        o.write("trapped\\n")
signal.signal(signal.SIGTRAP, signal.SIG_IGN if mode == "ignore" else trapped)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
if mode in ("blocked", "pending"):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTRAP})
if mode == "pending":
    os.kill(os.getpid(), signal.SIGTRAP)
# A second thread (with the masks above): restore makes and sets it up in a batch, or one call
# at a time where SIGTRAP is ignored.
threading.Thread(target=time.sleep, args=(86400,), daemon=True).start()
n = 0
while True:
    with open(out, "a") as o:
        o.write("%d\\n" % n)
    n += 1
    time.sleep(0.02)
`;

const SIGTRAP_BIT = 1n << 4n;

function signalState(pid: number): { cgt: bigint; ign: bigint; blk: bigint; pnd: bigint } {
  const f = (name: string) => BigInt("0x" + statusField(pid, name));
  return { cgt: f("SigCgt"), ign: f("SigIgn"), blk: f("SigBlk"), pnd: f("SigPnd") | f("ShdPnd") };
}

// Dump asks signal actions in batches that end with an int3 (lib/batch.ts):
// SIGTRAP handled, blocked or pending must come through that untouched too.
const WHAT = { handle: "handled", ignore: "ignored", blocked: "blocked", pending: "pending" };
for (const mode of ["handle", "ignore", "blocked", "pending"] as const) {
  Deno.test(`SIGTRAP ${WHAT[mode]}: kept by dump -R and by restore, mask too`, async () => {
    await using tmp = await tempDir();
    const out = `${tmp.path}/trap.txt`;
    const target = await startWriter(["setsid", "python3", "-c", TRAP_PY, mode, out], out, 3);
    const { pid } = target;
    try {
      const before = signalState(pid);
      const bitSet = mode === "ignore" ? before.ign : before.cgt;
      assert.ok(bitSet & SIGTRAP_BIT, `SIGTRAP ${mode} before the dump`);
      assert.equal(!!(before.pnd & SIGTRAP_BIT), mode === "pending", "SIGTRAP pending");
      const img = `${tmp.path}/img`;
      assertExit(await amber(dumpArgs(pid, img, "-R")), 0, "dump -R");
      assert.deepEqual(signalState(pid), before, "signal state after dump -R");
      Deno.removeSync(out);
      assertExit(await amber(dumpArgs(pid, `${img}2`)), 0, "dump");
      await target.child.status;
      assertExit(await amber(["restore", "-D", `${img}2`, "-d"]), 0, "restore");
      await waitForLine(out, (l) => l.length >= 2);
      assert.deepEqual(signalState(pid), before, "signal state after restore");
      assert.equal(threadsOf(pid).length, 2, "both threads after restore");
      Deno.kill(pid, "SIGTRAP");
      if (mode === "handle") await waitForLine(out, (l) => l.includes("trapped"));
      const n = (await waitForLine(out, (l) => l.length >= 2)).length;
      await waitForLine(out, (l) => l.length >= n + 3);
      assert.equal(statusField(pid, "State")[0] !== "Z", true, "alive after SIGTRAP");
    } finally {
      await killAndReap(pid);
    }
  });
}
