/**
 * Pipes: a parent and child talking through a pipe with bytes still in it
 * come back connected, the bytes in place; a pipe to a process outside the
 * tree is refused without harming anyone.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertConsecutive,
  assertExit,
  assertNoHelper,
  childrenOf,
  dumpArgs,
  killAndReap,
  killTree,
  procState,
  readCounterLines,
  readLines,
  showJson,
  spawnTarget,
  tempDir,
  waitForLines,
  waitGone,
} from "./_util.ts";

/**
 * The child writes a counter into a pipe every 10 ms; the parent copies it
 * to argv[1] twice as slowly, so bytes always wait in the pipe.
 */
const PIPE_PY = `import os, sys, time
r, w = os.pipe()
out = open(sys.argv[1], "w")
if os.fork() == 0:
    os.close(r)
    n = 0
    while True:
        os.write(w, b"%d\\n" % n)
        n += 1
        time.sleep(0.01)
os.close(w)
time.sleep(0.2)
for line in os.fdopen(r):
    out.write(line)
    out.flush()
    time.sleep(0.02)
`;

interface PipeFd {
  kind: string;
  fd: number;
  ino: number;
  contents?: { size: number; data: { bytes: number } | string };
}

function pipeFds(doc: { processes: { pid: number; images: { fds: { fds: PipeFd[] } } }[] }) {
  return doc.processes.flatMap((p) =>
    p.images.fds.fds.filter((f) => f.kind === "pipe").map((f) => ({ pid: p.pid, ...f }))
  );
}

Deno.test("a pipe between parent and child, with bytes in it, survives dump and restore", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/copied.txt`;
  const { pid, child } = spawnTarget(["setsid", "python3", "-c", PIPE_PY, out]);
  try {
    await waitForLines(out, 5, 30_000);
    for (let round = 1; round <= 3; round++) {
      const img = `${tmp.path}/img${round}`;
      const before = (await readLines(out)).length;
      assertExit(await amber(dumpArgs(pid, img)), 0, `round ${round}: dump`);
      if (round === 1) await child.status;
      const doc = await showJson(img);
      // The child, orphaned by the dump, is ours to reap (subreaper).
      for (const p of doc.processes) assert.ok(await waitGone(p.pid), `${p.pid} lingers`);
      const pipes = pipeFds(doc);
      assert.equal(pipes.length, 2, `round ${round}: pipe ends in the images`);
      assert.equal(new Set(pipes.map((p) => p.ino)).size, 1, "both ends are one pipe");
      const withData = pipes.filter((p) => p.contents);
      assert.equal(withData.length, 1, "the buffer is recorded once");
      const bytes = withData[0].contents!.data;
      const size = typeof bytes === "string" ? bytes.length / 2 : bytes.bytes;
      assert.ok(size > 0, `round ${round}: no bytes were waiting in the pipe`);
      const r = await amber(["restore", "-D", img, "-d"]);
      assertExit(r, 0, `round ${round}: restore`);
      await waitForLines(out, before + 20);
    }
  } finally {
    await killTree(pid);
  }
  // Every byte written into the pipe, buffered ones included, came out once.
  assertConsecutive((await readCounterLines(out)).numbers, "what went through the pipe");
});

/** A writer whose stdout is a pipe to `cat`, which stays outside the dumped tree. */
Deno.test("a pipe to a process outside the tree: dump refuses, -R images do not restore", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/cat.txt`;
  const script = `python3 -u -c 'import time
n = 0
while True:
    print(n); n += 1; time.sleep(0.02)' | cat > ${out}`;
  const { pid: shell } = spawnTarget(["setsid", "bash", "-c", script]);
  try {
    await waitForLines(out, 3, 30_000);
    const writer = childrenOf(shell).find((c) =>
      Deno.readTextFileSync(`/proc/${c}/cmdline`).split("\0")[0].endsWith("python3")
    );
    assert.ok(writer, "no python writer under the shell (test bug)");
    const img = `${tmp.path}/img`;
    const r = await amber([...dumpArgs(writer, img), "--shell-job"]);
    assertExit(r, 1, "dump of the writer alone");
    assert.match(r.stderr, /pipe:\[\d+\]: its read end is held outside the dumped tree/);
    assert.ok(r.stderr.includes("-R"), `does not mention -R: ${r.stderr}`);
    assert.ok(["S", "R"].includes(procState(writer) ?? ""), "the writer runs on");
    const n = (await readLines(out)).length;
    await waitForLines(out, n + 5);
    assertExit(await amber([...dumpArgs(writer, img, "-R"), "--shell-job"]), 0, "dump -R");
    const doc = await showJson(img);
    assert.equal(doc.unrestorable.length, 1, "the images say why they cannot be restored");
    await killAndReap(writer);
    const rr = await amber(["restore", "-D", img, "-d", "--shell-job"]);
    assertExit(rr, 1, "restore");
    assert.match(rr.stderr, /its read end is held outside the dumped tree/);
    assert.equal(procState(writer), null, "restore left the writer behind");
    // (The shell and cat end on their own meanwhile: check amber's own leftovers.)
    assertNoHelper("failed restore");
  } finally {
    await killTree(shell);
  }
  assertConsecutive((await readCounterLines(out)).numbers, "what cat received");
});
