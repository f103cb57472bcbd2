/**
 * A signal sent to the frozen tree while the dump goes on is not lost: it
 * is pending when the images are written, so it is in them.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  dumpArgs,
  exists,
  killAndReap,
  processFile,
  sleep,
  startWriter,
  statusField,
  tempDir,
  until,
  waitForLine,
} from "./_util.ts";

/** Blocks SIGUSR2; on SIGUSR1 says whether a SIGUSR2 is pending. */
const PY = `import signal, sys, time
out = sys.argv[1]
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
def report(s, f):
    with open(out, "a") as o:
        o.write("pending %s\\n" % (signal.SIGUSR2 in signal.sigpending()))
signal.signal(signal.SIGUSR1, report)
n = 0
while True:
    with open(out, "a") as o:
        o.write("%d\\n" % n)
    n += 1
    time.sleep(0.02)
`;

Deno.test("a signal sent to the tree during the dump is in the images", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/late.txt`;
  const target = await startWriter(["setsid", "python3", "-c", PY, out], out, 3);
  const { pid } = target;
  try {
    const img = `${tmp.path}/img`;
    const dump = amber(dumpArgs(pid, img), { AMBER_TEST_FAULT: "before-commit:pause" });
    // Once the signals image of the first pass is written, the tree is
    // frozen and its pending signals were read: this one comes later.
    await until(
      () => {
        if (!exists(img)) return false;
        return [...Deno.readDirSync(img)].some((d) =>
          d.name.startsWith(".amber-dump-") && exists(processFile(`${img}/${d.name}`, pid))
        );
      },
      "the dump wrote no signals image",
      30_000,
    );
    assert.notEqual(statusField(pid, "TracerPid"), "0", "the target is not frozen (test bug)");
    Deno.kill(pid, "SIGUSR2");
    assertExit(await dump, 0, "dump");
    await target.child.status;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    await sleep(50);
    Deno.kill(pid, "SIGUSR1");
    const lines = await waitForLine(out, (l) => l.some((x) => x.startsWith("pending")));
    assert.ok(lines.includes("pending True"), `SIGUSR2 lost: ${lines.slice(-3)}`);
  } finally {
    await killAndReap(pid);
  }
});
