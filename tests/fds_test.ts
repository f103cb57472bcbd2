/**
 * Descriptors: a high descriptor number, in a process that raised its own
 * RLIMIT_NOFILE, comes back with that number and that limit.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertCounterGoesOn,
  assertExit,
  dumpArgs,
  killAndReap,
  readLines,
  startWriter,
  tempDir,
} from "./_util.ts";

/** Raises its soft RLIMIT_NOFILE, then writes a counter through fd 5000. */
const HIGH_FD_PY = `import os, resource, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.dup2(fd, 5000)
os.close(fd)
n = 0
while True:
    os.write(5000, b"%d\\n" % n)
    n += 1
    time.sleep(0.02)
`;

function openFilesLimit(pid: number): string {
  const line = Deno.readTextFileSync(`/proc/${pid}/limits`).split("\n")
    .find((l) => l.startsWith("Max open files"));
  return line?.slice(26).trim().split(/\s+/).slice(0, 2).join(" ") ?? "";
}

Deno.test("fd 5000 and a raised RLIMIT_NOFILE come back", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/high.txt`;
  const target = await startWriter(["setsid", "python3", "-c", HIGH_FD_PY, out], out, 3, 30_000);
  const { pid } = target;
  try {
    const limit = openFilesLimit(pid);
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    await target.child.status;
    const before = (await readLines(out)).length;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    assert.equal(Deno.readLinkSync(`/proc/${pid}/fd/5000`), out, "fd 5000 after restore");
    assert.equal(openFilesLimit(pid), limit, "RLIMIT_NOFILE after restore");
    await assertCounterGoesOn(out, before, 10, "the counter written through fd 5000");
  } finally {
    await killAndReap(pid);
  }
});
