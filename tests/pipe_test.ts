/**
 * Pipes: a parent and child talking through a pipe with bytes still in it
 * come back connected, the bytes in place; each end keeps its own status
 * flags; a pipe whose other end is closed everywhere comes back so (make
 * -j2 mid-build finishes); a pipe to a process outside the tree is refused
 * without harming anyone.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertConsecutive,
  assertExit,
  assertNoHelper,
  childrenOf,
  commandWorks,
  dumpArgs,
  exists,
  killAndReap,
  killTree,
  listDir,
  procState,
  readCounterLines,
  readLines,
  showJson,
  spawnTarget,
  startWriter,
  tempDir,
  until,
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

/**
 * Two pipes, each with one non-blocking end: the read end of the first,
 * the write end of the second. The target checks its ends every tick and
 * that reading the empty non-blocking end does not block.
 */
const FLAGS_PY = `import os, sys, time
r1, w1 = os.pipe()
r2, w2 = os.pipe()
os.set_blocking(r1, False)
os.set_blocking(w2, False)
out = open(sys.argv[1], "w")
n = 0
while True:
    want = [(r1, False), (w1, True), (r2, True), (w2, False)]
    bad = [fd for fd, b in want if os.get_blocking(fd) != b]
    try:
        os.read(r1, 1)
        bad.append("r1 read")
    except BlockingIOError:
        pass
    out.write("%d\\n" % n if not bad else "BAD %d %s\\n" % (n, bad))
    out.flush()
    n += 1
    time.sleep(0.02)
`;

/** fdinfo flags of every pipe end of PID, by fd. */
function pipeFlags(pid: number): Record<number, string> {
  const out: Record<number, string> = {};
  for (const e of Deno.readDirSync(`/proc/${pid}/fd`)) {
    if (!Deno.readLinkSync(`/proc/${pid}/fd/${e.name}`).startsWith("pipe:")) continue;
    const info = Deno.readTextFileSync(`/proc/${pid}/fdinfo/${e.name}`);
    out[Number(e.name)] = /^flags:\s*(\d+)/m.exec(info)![1];
  }
  return out;
}

Deno.test("each pipe end keeps its own O_NONBLOCK", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/flags.txt`;
  const t = await startWriter(["setsid", "python3", "-c", FLAGS_PY, out], out, 3, 30_000);
  try {
    const before = pipeFlags(t.pid);
    assert.equal(Object.keys(before).length, 4, "test setup: four pipe ends");
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(t.pid, img)), 0, "dump");
    await t.child.status;
    const n = (await readLines(out)).length;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    assert.deepEqual(pipeFlags(t.pid), before, "fdinfo flags of the pipe ends after restore");
    await waitForLines(out, n + 10);
    assertConsecutive((await readCounterLines(out)).numbers, "the target's checks");
    assert.deepEqual((await readCounterLines(out)).other, [], "the target saw wrong flags");
  } finally {
    await killAndReap(t.pid);
  }
});

/**
 * A small build where every job takes a while. make gives every job but
 * one a pipe whose write end it closed as stdin: that end is held by
 * nobody.
 */
const MAKEFILE = `OUTS := $(addsuffix .out,a b c d e f)
all.txt: $(OUTS)
\tcat $(OUTS) > all.tmp && mv all.tmp all.txt
%.out:
\tsleep 0.5; echo $@ > $@.tmp && mv $@.tmp $@
`;

Deno.test("make -j2 dumped mid-build finishes the build after restore", async () => {
  assert.ok(await commandWorks("make", "--version"), "this test needs make (Debian package make)");
  await using tmp = await tempDir();
  const build = `${tmp.path}/build`;
  Deno.mkdirSync(build);
  Deno.writeTextFileSync(`${build}/Makefile`, MAKEFILE);
  const { pid, child } = spawnTarget(["setsid", "make", "-j2", "-C", build]);
  try {
    // Mid-build: jobs running, some done, not all.
    await until(() => listDir(build).some((f) => f.endsWith(".out")), "no job finished", 30_000);
    assert.ok(!exists(`${build}/all.txt`), "test setup: the build ended before the dump");
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump mid-build");
    await child.status;
    const doc = await showJson(img);
    const closedEnds = pipeFds(doc).filter((f) => (f as { otherClosed?: boolean }).otherClosed);
    assert.ok(closedEnds.length > 0, "no pipe end whose other end is closed everywhere");
    for (const p of doc.processes) assert.ok(await waitGone(p.pid), `${p.pid} lingers`);
    assert.ok(!exists(`${build}/all.txt`), "the build ended before the dump");
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    assert.ok(await waitGone(pid, 30_000), "the restored make did not finish");
    const outs = ["a", "b", "c", "d", "e", "f"].map((x) => `${x}.out\n`).join("");
    assert.equal(Deno.readTextFileSync(`${build}/all.txt`), outs, "the build's result");
  } finally {
    await killTree(pid);
  }
});
