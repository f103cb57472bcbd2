/**
 * Kernel objects processes share: open file descriptions held by two
 * processes (inherited over fork) and by two descriptors of one process
 * (dup2) come back as one description, with one offset. (Shared anonymous
 * memory: tests/shmem_test.ts.)
 * Run with: deno test -A tests/sharing_test.ts
 *
 * Like the other test files, these look at the test process's children (we
 * are the subreaper): do not run test files concurrently.
 */
import assert from "node:assert/strict";
import { sameOpenFile } from "../ffi/libc.ts";
import {
  amber,
  assertConsecutive,
  assertExit,
  assertNoLiveHelper,
  assertRunningFree,
  childrenOf,
  dumpArgs,
  type Json,
  killTree,
  openFds,
  ownChildren,
  pidOf,
  processesOf,
  procState,
  readLines,
  showJson,
  startWriter,
  tempDir,
  until,
  waitForLine,
  waitVanished,
} from "./_util.ts";

// ---------------------------------------------------------------------------
// helpers

/** The only child of ROOT, once it has exactly one. */
async function onlyChild(root: number, what: string): Promise<number> {
  await until(
    () => childrenOf(root).length === 1,
    () => `${what}: ${root} has children [${childrenOf(root).join(" ")}], wanted one`,
  );
  return childrenOf(root)[0];
}

/** The fds of PID open on PATH (by /proc/PID/fd link), sorted. */
function fdsOn(pid: number, path: string): number[] {
  return openFds(pid).filter((fd) => {
    try {
      return Deno.readLinkSync(`/proc/${pid}/fd/${fd}`) === path;
    } catch {
      return false; // closed meanwhile
    }
  });
}

/** "pos" of /proc/PID/fdinfo/FD. */
function fdPos(pid: number, fd: number): number {
  const info = Deno.readTextFileSync(`/proc/${pid}/fdinfo/${fd}`);
  const m = /^pos:\s*(\d+)/m.exec(info);
  if (!m) throw new Error(`no pos in /proc/${pid}/fdinfo/${fd}`);
  return Number(m[1]);
}

/** The process object of PID in a show document. */
function procIn(doc: Json, pid: number): Json {
  const p = processesOf(doc).find((p) => pidOf(p) === pid);
  assert.ok(p, `pid ${pid} is not in the images: ${processesOf(doc).map(pidOf).join(" ")}`);
  return p;
}

// ---------------------------------------------------------------------------
// one open file description, shared

/**
 * Opens argv[1] (no O_APPEND), dup2's it onto fd 1 and forks; parent and
 * child then write "P n" / "C n" every 20 ms, alternating between fd 1 and
 * the original fd. All four descriptors are one open file description: one
 * offset, so no line overwrites another.
 */
const SHAREFD_PY = `import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.dup2(fd, 1)
tag = b"C" if os.fork() == 0 else b"P"
i = 0
while True:
    os.write(1 if i % 2 == 0 else fd, b"%s %d\\n" % (tag, i))
    i += 1
    time.sleep(0.02)
`;

/**
 * The lines of sharefd's output, checked: every line is "P n" or "C n", no
 * NUL byte, and each writer's numbers are 0, 1, 2, ... with nothing lost.
 */
async function readShared(out: string, what: string): Promise<{ P: number[]; C: number[] }> {
  const text = await Deno.readTextFile(out);
  assert.ok(!text.includes("\0"), `${what}: NUL bytes in the output`);
  const seq: { P: number[]; C: number[] } = { P: [], C: [] };
  for (const [i, line] of (await readLines(out)).entries()) {
    const m = /^([PC]) (\d+)$/.exec(line);
    assert.ok(m, `${what}: line ${i} is ${JSON.stringify(line)}`);
    seq[m[1] as "P" | "C"].push(Number(m[2]));
  }
  assertConsecutive(seq.P, `${what}: parent's lines`);
  assertConsecutive(seq.C, `${what}: child's lines`);
  return seq;
}

/** Waits until both writers have written `more` lines beyond `seq`, then checks the file. */
async function assertBothGoOn(
  out: string,
  seq: { P: number[]; C: number[] },
  more: number,
  what: string,
): Promise<{ P: number[]; C: number[] }> {
  const count = (lines: string[], tag: string) => lines.filter((l) => l[0] === tag).length;
  // A malformed line (writes overwriting each other) ends the wait at once:
  // readShared then says what is wrong.
  await waitForLine(
    out,
    (lines) =>
      lines.some((l) => !/^[PC] \d+$/.test(l)) ||
      count(lines, "P") >= seq.P.length + more && count(lines, "C") >= seq.C.length + more,
  );
  return await readShared(out, what);
}

/**
 * In ROOT and CHILD, the descriptors on OUT are `fds` (1 and the original),
 * and all four are one open file description: kcmp says so, and with both
 * stopped, every one has the same offset, the file's size.
 */
async function assertOneDescription(
  root: number,
  child: number,
  out: string,
  fds: number[],
  what: string,
): Promise<void> {
  assert.deepEqual(fdsOn(root, out), fds, `${what}: fds of the parent ${root} on ${out}`);
  assert.deepEqual(fdsOn(child, out), fds, `${what}: fds of the child ${child} on ${out}`);
  const all = [root, child].flatMap((pid) => fds.map((fd) => ({ pid, fd })));
  for (const b of all.slice(1)) {
    assert.ok(
      sameOpenFile(root, 1, b.pid, b.fd),
      `${what}: fd ${b.fd} of ${b.pid} is not the open file description of fd 1 of ${root}`,
    );
  }
  for (const pid of [root, child]) Deno.kill(pid, "SIGSTOP");
  try {
    await until(
      () => procState(root) === "T" && procState(child) === "T",
      () => `${what}: not stopped: ${root} ${procState(root)}, ${child} ${procState(child)}`,
    );
    const size = Deno.statSync(out).size;
    const positions = all.map(({ pid, fd }) => `${pid}:${fd} at ${fdPos(pid, fd)}`);
    assert.deepEqual(
      positions,
      all.map(({ pid, fd }) => `${pid}:${fd} at ${size}`),
      `${what}: offsets of the descriptors on ${out} (file size ${size})`,
    );
  } finally {
    for (const pid of [root, child]) Deno.kill(pid, "SIGCONT");
  }
}

Deno.test("shared open file (dup2 + fork, no O_APPEND): 3 rounds of dump + restore -d, one offset", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/shared.txt`;
  const { pid: root } = await startWriter(
    ["setsid", "python3", "-c", SHAREFD_PY, out],
    out,
    1,
    30_000,
  );
  let child = 0;
  try {
    child = await onlyChild(root, "start");
    let seq = await assertBothGoOn(out, { P: [], C: [] }, 3, "start");
    const fds = fdsOn(root, out);
    assert.equal(fds.length, 2, `test setup: fds of ${root} on ${out}: ${fds.join(" ")}`);
    assert.equal(fds[0], 1, `test setup: fds of ${root} on ${out}: ${fds.join(" ")}`);
    const orig = fds[1];
    await assertOneDescription(root, child, out, fds, "before any dump");

    for (let round = 1; round <= 3; round++) {
      const what = `round ${round}`;
      const img = `${tmp.path}/img${round}`;
      assertExit(await amber(dumpArgs(root, img)), 0, `${what}: dump`);
      await waitVanished([root, child]);

      // The images record the sharing: the parent's second fd is its fd 1,
      // both fds of the child are the parent's fd 1.
      const doc = await showJson(img);
      assert.deepEqual(processesOf(doc).map(pidOf), [root, child], `${what}: pids in the images`);
      const sharedOf = (pid: number) =>
        new Map<number, Json>(
          (procIn(doc, pid).images?.fds?.shared ?? []).map((s: Json) => [s.fd, s]),
        );
      const parentShared = sharedOf(root);
      const childShared = sharedOf(child);
      assert.ok(!parentShared.has(1), `${what}: parent's fd 1 recorded as shared`);
      assert.deepEqual(
        parentShared.get(orig),
        { fd: orig, pid: root, ownerFd: 1 },
        `${what}: parent's fd ${orig} (shared: ${JSON.stringify([...parentShared.values()])})`,
      );
      for (const fd of fds) {
        assert.deepEqual(
          childShared.get(fd),
          { fd, pid: root, ownerFd: 1 },
          `${what}: child's fd ${fd} (shared: ${JSON.stringify([...childShared.values()])})`,
        );
      }
      seq = await readShared(out, `${what}: after the dump`);

      const before = ownChildren();
      const r = await amber(["restore", "-D", img, "-d"]);
      assertExit(r, 0, `${what}: restore -d`);
      assert.deepEqual(
        ownChildren().filter((p) => !before.includes(p)),
        [root],
        `${what}: new children of the test process`,
      );
      assert.deepEqual(childrenOf(root), [child], `${what}: children of the restored root`);
      assertNoLiveHelper(what);
      await assertRunningFree(root, `${what}: parent`);
      await assertRunningFree(child, `${what}: child`);
      await assertOneDescription(root, child, out, fds, `${what}: after restore -d`);
      seq = await assertBothGoOn(out, seq, 5, `${what}: after restore -d`);
    }
  } finally {
    await killTree(root);
    if (child) await killTree(child);
  }
  const seq = await readShared(out, "the whole output");
  const lines = await readLines(out);
  assert.equal(lines.length, seq.P.length + seq.C.length);
  assert.equal(
    await Deno.readTextFile(out),
    lines.map((l) => `${l}\n`).join(""),
    "the output file ends with a complete line",
  );
});
