/**
 * End-to-end tests of `amber restore` on the testdata targets: each target
 * is dumped (and killed) and restored twice in a row, and must come back
 * with its pids, identity and memory, continuing its output exactly where it
 * stopped. Failed restores must leave nothing behind.
 * Run with: deno test -A --parallel=false tests/restore_test.ts
 *
 * The tests look at the test process's children (restored processes come
 * back as our children, we are the subreaper), so test files must not run
 * concurrently: note that in Deno 2.9 `--parallel=false` on several files
 * still runs them in parallel; leave the flag out for a directory.
 */
import assert from "node:assert/strict";
import { decode, Encoder } from "cbor-x";
import {
  amber,
  type AmberResult,
  assertConsecutive,
  assertExit,
  buildC,
  CLI,
  COUNTER_PY,
  DENO,
  descendants,
  isAlive,
  killAndReap,
  killTree,
  listDir,
  ownChildren,
  procMaps,
  procState,
  procStatFields,
  readCounterLines,
  readLines,
  readThreadLines,
  reapZombies,
  ROOT,
  sleep,
  spawnTarget,
  tempDir,
  threadsOf,
  waitForLine,
  waitForLines,
  waitGone,
} from "./_util.ts";

const COUNTER_MIB = 64;
/** comm of the restore helper (amber-restore-helper, cut to 15 characters). */
const HELPER_COMM = "amber-restore-h";

// ---------------------------------------------------------------------------
// helpers

function dumpArgs(pid: number, dir: string, ...extra: string[]): string[] {
  return ["dump", "-t", String(pid), "-D", dir, ...extra];
}

/** Reaps what we can until none of `pids` exists any more (not even as a zombie). */
async function waitVanished(pids: number[], timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    reapZombies();
    const left = pids.filter((p) => procState(p) !== null);
    if (!left.length) return;
    if (Date.now() > deadline) {
      assert.fail(
        `still there after ${timeoutMs} ms: ${left.map((p) => `${p} (${procState(p)})`).join(" ")}`,
      );
    }
    await sleep(5);
  }
}

/**
 * Restore helpers among the test process's descendants: a helper left by an
 * amber run (its child) would be reparented to us, the subreaper. (Not
 * system-wide: other amber runs on the machine are none of our business.)
 */
function helperProcesses(): number[] {
  return descendants(Deno.pid).filter((p) => {
    try {
      return Deno.readTextFileSync(`/proc/${p}/comm`).trim() === HELPER_COMM;
    } catch {
      return false; // gone meanwhile
    }
  });
}

function assertNoHelper(what: string): void {
  assert.deepEqual(helperProcesses(), [], `${what}: a restore helper is still running`);
}

/** Our children, each with its state, for comparing before/after a restore. */
function childrenWithState(): string[] {
  return ownChildren().map((p) => `${p}:${procState(p)}`);
}

function taskStatusField(pid: number, tid: number, name: string): string {
  const text = Deno.readTextFileSync(`/proc/${pid}/task/${tid}/status`);
  const m = text.match(new RegExp(`^${name}:\\s*(.*)$`, "m"));
  if (!m) throw new Error(`no ${name} in /proc/${pid}/task/${tid}/status`);
  return m[1].trim();
}

/**
 * Every thread of PID runs freely: not traced (TracerPid 0) and not stopped
 * (state S or R; a short D, e.g. inside write(2), is waited out).
 */
async function assertRunningFree(pid: number): Promise<void> {
  for (const tid of threadsOf(pid)) {
    let state = "";
    for (let i = 0; i < 100; i++) {
      const stat = Deno.readTextFileSync(`/proc/${pid}/task/${tid}/stat`);
      state = stat.slice(stat.lastIndexOf(")") + 2)[0];
      if (state !== "D") break;
      await sleep(10);
    }
    assert.ok(state === "S" || state === "R", `thread ${tid} of ${pid} is in state ${state}`);
    assert.equal(taskStatusField(pid, tid, "TracerPid"), "0", `thread ${tid} of ${pid} is traced`);
  }
}

interface Identity {
  exe: string;
  cmdline: string;
  /** "fd -> target" of every open fd. */
  fds: string[];
  /** "start path" of every mapping (left out where the heap moves by itself). */
  maps?: string[];
}

function fdsOf(pid: number): string[] {
  return [...Deno.readDirSync(`/proc/${pid}/fd`)].map((e) => Number(e.name)).sort((a, b) => a - b)
    .map((fd) => `${fd} -> ${Deno.readLinkSync(`/proc/${pid}/fd/${fd}`)}`);
}

function identityOf(pid: number, maps = true): Identity {
  return {
    exe: Deno.readLinkSync(`/proc/${pid}/exe`),
    cmdline: Deno.readTextFileSync(`/proc/${pid}/cmdline`),
    fds: fdsOf(pid),
    ...(maps ? { maps: procMaps(pid).map((m) => `${m.start.toString(16)} ${m.path}`) } : {}),
  };
}

/** exe, cmdline, fds and (if recorded) the mappings' starts and paths are as before. */
function assertSameIdentity(pid: number, before: Identity, what: string): void {
  assert.deepEqual(
    identityOf(pid, before.maps !== undefined),
    before,
    `${what}: /proc/${pid}/{exe,cmdline,fd/,maps} differ from before the dump`,
  );
}

/** The process-identifying fields that a restore must bring back. */
function treeFacts(pids: number[]): Map<number, string> {
  return new Map(pids.map((p) => {
    const f = procStatFields(p);
    return [p, `ppid ${f[1]} pgid ${f[2]} sid ${f[3]}`];
  }));
}

/**
 * Runs amber like amber(), but with one more fd open (fd 9, /dev/null), as a
 * shell or a supervisor may pass one on: the restored processes must not
 * inherit it (they get exactly the fds of the images).
 */
async function amberWithStrayFd(args: string[], timeoutMs = 120_000): Promise<AmberResult> {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  try {
    const r = await new Deno.Command("/bin/bash", {
      args: ["-c", 'exec 9</dev/null; exec "$@"', "amber", DENO, "run", "-A", CLI, ...args],
      cwd: ROOT,
      env: { NO_COLOR: "1" },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      signal: abort.signal,
    }).output();
    const dec = new TextDecoder();
    return { code: r.code, stdout: dec.decode(r.stdout), stderr: dec.decode(r.stderr) };
  } finally {
    clearTimeout(timer);
  }
}

/**
 * `amber dump` (without -R) of the tree of `root`, whose processes are
 * `pids`: checks they all end, and reaps them, so their pids are free.
 */
async function dumpKill(root: number, pids: number[], img: string, what: string): Promise<void> {
  assertExit(await amber(dumpArgs(root, img)), 0, `${what}: dump`);
  await waitVanished(pids);
}

/**
 * `amber restore -d` of `img`, whose root is `root` and processes `pids`:
 * checks that exactly the root became a new child of ours (we are the
 * subreaper), that every process is back and runs untraced, and that no
 * helper is left.
 */
async function restoreDetached(
  img: string,
  root: number,
  pids: number[],
  what: string,
  ...extra: string[]
): Promise<void> {
  const before = ownChildren();
  assert.ok(!before.includes(root), `${what}: ${root} is still our child before the restore`);
  const r = await amberWithStrayFd(["restore", "-D", img, "-d", ...extra]);
  assertExit(r, 0, `${what}: restore -d`);
  assert.equal(r.stdout, "", `${what}: restore printed something`);
  for (const pid of pids) {
    assert.ok(isAlive(pid), `${what}: process ${pid} is not running after restore -d`);
    await assertRunningFree(pid);
  }
  const added = ownChildren().filter((p) => !before.includes(p));
  assert.deepEqual(added, [root], `${what}: new children of the test process`);
  assertNoHelper(what);
}

// ---------------------------------------------------------------------------
// counter.c

Deno.test("counter (64 MiB): dump + restore -d twice, same pid, output and memory intact", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("counter");
  const out = `${tmp.path}/counter.txt`;
  const c = spawnTarget([bin, out, String(COUNTER_MIB), "--setsid"]);
  const pid = c.pid;
  try {
    // The output file is opened only after the memory is filled.
    await waitForLines(out, 3);
    const identity = identityOf(pid);
    for (const round of [1, 2]) {
      const what = `round ${round}`;
      const img = `${tmp.path}/img${round}`;
      await dumpKill(pid, [pid], img, what);
      const atDump = await readCounterLines(out);
      assertConsecutive(atDump.numbers, `${what}: output at the dump`);
      await sleep(50);
      assert.equal((await readLines(out)).length, atDump.lines.length, "written while dumped");

      await restoreDetached(img, pid, [pid], what);
      assertSameIdentity(pid, identity, what);
      // The output grows again, from where it stopped.
      await waitForLines(out, atDump.lines.length + 10);
      const { numbers, other } = await readCounterLines(out);
      assert.deepEqual(other, [], `${what}: unexpected lines`);
      assertConsecutive(numbers, `${what}: output after the restore`);
    }

    // The 64 MiB pattern and the sparse pages survived both restores.
    Deno.kill(pid, "SIGUSR1");
    await waitForLine(out, (lines) => lines.some((l) => l.startsWith("check")));
    const n = (await readLines(out)).length;
    await waitForLines(out, n + 3);
    assertSameIdentity(pid, identity, "after the check");
  } finally {
    await killAndReap(pid);
  }

  // The whole file, read after the end: exactly the consecutive lines (a
  // wrong file offset would leave NUL bytes or overwritten lines).
  const text = await Deno.readTextFile(out);
  assert.ok(!text.includes("\0"), "NUL bytes in the output file");
  assert.ok(text.endsWith("\n"), "the output file ends in a partial line");
  const { lines, numbers, other } = await readCounterLines(out);
  assert.deepEqual(other, ["check ok"], "memory check after two restores");
  assertConsecutive(numbers, "the whole output");
  const expected = numbers.map(String);
  expected.splice(lines.indexOf("check ok"), 0, "check ok");
  assert.equal(text, expected.join("\n") + "\n", "the output file's content");
  assertNoHelper("at the end");
});

// ---------------------------------------------------------------------------
// CPython

Deno.test("CPython counter: dump + restore -d twice, output continues, checksums right", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/py.txt`;
  const t = spawnTarget(["setsid", "python3", COUNTER_PY, out]);
  const pid = t.pid;
  try {
    await waitForLines(out, 3, 30_000);
    // CPython's heap moves by itself: no maps.
    const identity = identityOf(pid, false);
    for (const round of [1, 2]) {
      const what = `python round ${round}`;
      const img = `${tmp.path}/img${round}`;
      await dumpKill(pid, [pid], img, what);
      const n = (await readLines(out)).length;
      await restoreDetached(img, pid, [pid], what);
      assertSameIdentity(pid, identity, what);
      await waitForLines(out, n + 10);
      const { numbers, other } = await readCounterLines(out);
      assert.deepEqual(other, [], `${what}: counter.py found a wrong checksum`);
      assertConsecutive(numbers, what);
    }
  } finally {
    await killAndReap(pid);
  }
  const { numbers, other, lines } = await readCounterLines(out);
  assert.ok(!(await Deno.readTextFile(out)).includes("\0"), "NUL bytes in the output");
  assert.deepEqual(other, []);
  assertConsecutive(numbers);
  const sums = lines.map((l) => BigInt(l.split(" ")[1]));
  for (let i = 1; i < sums.length; i++) assert.equal(sums[i] - sums[i - 1], 2n, `checksum ${i}`);
});

// ---------------------------------------------------------------------------
// shared libraries

Deno.test("dynamically linked program: dump + restore -d twice, libraries and output intact", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("dynlib");
  const out = `${tmp.path}/dynlib.txt`;
  const t = spawnTarget(["setsid", bin, out]);
  const pid = t.pid;
  try {
    await waitForLines(out, 3);
    const identity = identityOf(pid);
    const libs = (p: number) => [...new Set(procMaps(p).map((m) => m.path))].sort();
    const libsBefore = libs(pid);
    assert.ok(libsBefore.some((l) => /libz\.so/.test(l)), "libz not mapped (test bug)");
    for (const round of [1, 2]) {
      const what = `dynlib round ${round}`;
      const img = `${tmp.path}/img${round}`;
      await dumpKill(pid, [pid], img, what);
      const n = (await readLines(out)).length;
      await restoreDetached(img, pid, [pid], what);
      assertSameIdentity(pid, identity, what);
      assert.deepEqual(libs(pid), libsBefore, `${what}: mapped files`);
      await waitForLines(out, n + 10);
      const { numbers, other } = await readCounterLines(out);
      assert.deepEqual(other, [], `${what}: dynlib found a wrong value`);
      assertConsecutive(numbers, what);
    }
  } finally {
    await killAndReap(pid);
  }
  assertConsecutive((await readCounterLines(out)).numbers);
});

// ---------------------------------------------------------------------------
// threads

Deno.test("threads: dump + restore -d twice, every thread back and counting on", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("threads");
  const out = `${tmp.path}/threads.txt`;
  const nthreads = 4;
  const t = spawnTarget(["setsid", bin, out, String(nthreads)]);
  const pid = t.pid;
  try {
    await waitForLines(out, nthreads * 3);
    const tids = threadsOf(pid);
    assert.equal(tids.length, nthreads + 1);
    const identity = identityOf(pid);
    for (const round of [1, 2]) {
      const what = `threads round ${round}`;
      const img = `${tmp.path}/img${round}`;
      await dumpKill(pid, [pid], img, what);
      const atDump = await readThreadLines(out);
      await restoreDetached(img, pid, [pid], what);
      assert.deepEqual(threadsOf(pid), tids, `${what}: thread ids`);
      assertSameIdentity(pid, identity, what);
      // Every thread writes again.
      const deadline = Date.now() + 10_000;
      let byThread = await readThreadLines(out);
      while (
        [...atDump].some(([i, nums]) => (byThread.get(i)?.length ?? 0) < nums.length + 5)
      ) {
        assert.ok(Date.now() < deadline, `${what}: some thread does not write any more`);
        await sleep(10);
        byThread = await readThreadLines(out);
      }
      assert.equal(byThread.size, nthreads, `${what}: threads writing`);
      for (const [i, numbers] of byThread) assertConsecutive(numbers, `${what}: thread ${i}`);
    }
  } finally {
    await killAndReap(pid);
  }
  assert.ok(!(await Deno.readTextFile(out)).includes("\0"), "NUL bytes in the output");
});

// ---------------------------------------------------------------------------
// process tree

const TREE_DEPTH = 2, TREE_WIDTH = 2;

/**
 * Starts testdata/tree.c (root in its own session) in `outDir` and waits
 * until every process writes. `onStart` gets the root at once, so that a
 * failing start can still be cleaned up. Returns all pids, root first.
 */
async function startTree(outDir: string, onStart: (root: number) => void): Promise<number[]> {
  const bin = await buildC("tree");
  const count = 1 + TREE_WIDTH + TREE_WIDTH * TREE_WIDTH;
  await Deno.mkdir(outDir);
  const root = spawnTarget([bin, outDir, String(TREE_DEPTH), String(TREE_WIDTH), "--setsid"]).pid;
  onStart(root);
  // Every process writes its own PID.txt once its children are forked.
  const deadline = Date.now() + 10_000;
  for (;;) {
    const files = listDir(outDir);
    if (files.length === count) {
      const lines = await Promise.all(files.map((f) => readLines(`${outDir}/${f}`)));
      if (lines.every((l) => l.length >= 2)) break;
    }
    assert.ok(Date.now() < deadline, `tree did not start: ${files.join(" ")}`);
    await sleep(10);
  }
  const pids = descendants(root);
  assert.equal(pids.length, count, `tree has ${pids.length} processes: ${pids.join(" ")}`);
  return pids;
}

Deno.test("tree: dump + restore -d twice, pids, ppids, groups, sessions; --pidfile", async () => {
  await using tmp = await tempDir();
  const outDir = `${tmp.path}/out`;
  let root = 0;
  let pids: number[] = [];
  try {
    pids = await startTree(outDir, (r) => root = r);
    const facts = treeFacts(pids);
    assert.equal(facts.get(root), `ppid ${Deno.pid} pgid ${root} sid ${root}`, "test bug");
    const identities = new Map(pids.map((p) => [p, identityOf(p)]));

    for (const round of [1, 2]) {
      const what = `tree round ${round}`;
      const img = `${tmp.path}/img${round}`;
      await dumpKill(root, pids, img, what);
      const sizes = new Map<number, number>();
      for (const p of pids) sizes.set(p, (await readLines(`${outDir}/${p}.txt`)).length);

      const pidfile = `${tmp.path}/pidfile${round}`;
      await restoreDetached(img, root, pids, what, "--pidfile", pidfile);
      assert.equal(await Deno.readTextFile(pidfile), `${root}\n`, `${what}: --pidfile content`);
      // Same processes, same places in the tree, same groups and sessions
      // (the root's parent is the test process again, as subreaper).
      assert.deepEqual(descendants(root).sort(), [...pids].sort(), `${what}: processes`);
      assert.deepEqual(treeFacts(pids), facts, `${what}: ppid/pgid/sid`);
      for (const p of pids) assertSameIdentity(p, identities.get(p)!, `${what}: process ${p}`);

      for (const p of pids) {
        const file = `${outDir}/${p}.txt`;
        await waitForLines(file, sizes.get(p)! + 5);
        const { numbers, other } = await readCounterLines(file);
        assert.deepEqual(other, [], `${what}: process ${p}`);
        assertConsecutive(numbers, `${what}: process ${p}`);
      }
    }
  } finally {
    if (root) await killTree(root);
    await waitVanished(pids);
  }
});

// ---------------------------------------------------------------------------
// restore without -d

Deno.test("restore without -d waits for the root and exits with its code; nanosleep resumes", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("exit_later");
  const out = `${tmp.path}/exit.txt`;
  const ticks = 25;
  const t = spawnTarget([bin, out, String(ticks), "--setsid"]);
  const pid = t.pid;
  try {
    await waitForLines(out, 2);
    // Sleeping in nanosleep nearly all the time: that is where the dump finds it.
    const img = `${tmp.path}/img`;
    await dumpKill(pid, [pid], img, "exit_later");
    const atDump = (await readLines(out)).length;
    assert.ok(atDump < ticks, `exit_later ended before the dump (test too slow?)`);

    const before = childrenWithState();
    const r = await amber(["restore", "-D", img]);
    assertExit(r, 7, "restore (attached) of exit_later");
    assert.equal(r.stderr, "", "restore printed an error");
    // amber waited for (and reaped) its restored root.
    assert.equal(procState(pid), null, `restored ${pid} still exists after amber exited`);
    assert.deepEqual(childrenWithState(), before, "children left by the attached restore");
    assertNoHelper("attached restore");

    const lines = await readLines(out);
    assert.equal(lines.at(-1), "done", `exit_later did not finish: ${lines.slice(-3)}`);
    assert.ok(lines.length > atDump, "nothing written after the restore");
    assertConsecutive(lines.slice(0, -1).map(Number), "exit_later");
    assert.equal(lines.length, ticks + 1);
  } finally {
    await killAndReap(pid);
  }
});

// ---------------------------------------------------------------------------
// failures

/** Copies the files of `from` into a new directory `to` (0700, as dump makes it). */
async function copyImages(from: string, to: string): Promise<void> {
  await Deno.mkdir(to, { mode: 0o700 });
  for (const name of listDir(from)) await Deno.copyFile(`${from}/${name}`, `${to}/${name}`);
}

async function truncateHalf(file: string): Promise<void> {
  const size = (await Deno.stat(file)).size;
  await Deno.truncate(file, Math.floor(size / 2));
}

/** Same encoder options as lib/images/codec.ts. */
const cbor = new Encoder({ useRecords: false, mapsAsObjects: true });

interface FailureCase {
  name: string;
  damage: (dir: string, pid: number) => Promise<void>;
  /** What the message must name. */
  mentions: (dir: string, pid: number) => string[];
  /** At least one of these must be named too, if given. */
  oneOf?: (dir: string, pid: number) => string[];
}

const FAILURES: FailureCase[] = [
  {
    name: "corrupted mappings image (bytes flipped in the middle)",
    damage: async (dir, pid) => {
      const file = `${dir}/mappings-${pid}.cbor`;
      const bytes = await Deno.readFile(file);
      const mid = Math.floor(bytes.length / 2);
      for (let i = mid; i < mid + 8; i++) bytes[i] ^= 0xff;
      await Deno.writeFile(file, bytes);
    },
    mentions: () => ["mappings"],
    // Either the decoder fails on the file, or the decoded garbage fails
    // while restoring that process.
    oneOf: (dir, pid) => [`${dir}/mappings-${pid}.cbor`, `pid ${pid}`],
  },
  {
    name: "truncated mappings image",
    damage: (dir, pid) => truncateHalf(`${dir}/mappings-${pid}.cbor`),
    mentions: (dir, pid) => [`${dir}/mappings-${pid}.cbor`],
  },
  {
    name: "truncated pages image",
    damage: (dir, pid) => truncateHalf(`${dir}/pages-${pid}.img`),
    mentions: (dir, pid) => [`${dir}/pages-${pid}.img`],
  },
  {
    name: "inventory of format version 99",
    damage: async (dir) => {
      const file = `${dir}/inventory.cbor`;
      const doc = decode(await Deno.readFile(file));
      assert.equal(typeof doc.version, "number", "inventory has no version (test bug)");
      doc.version = 99;
      await Deno.writeFile(file, cbor.encode(doc));
    },
    mentions: (dir) => [`${dir}/inventory.cbor`, "99"],
  },
];

Deno.test("restore of damaged images fails with one clear line and leaves nothing behind", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("counter");
  const out = `${tmp.path}/counter.txt`;
  const pid = spawnTarget([bin, out, "8", "--setsid"]).pid;
  const img = `${tmp.path}/img`;
  try {
    await waitForLines(out, 3);
    await dumpKill(pid, [pid], img, "counter");
    const lines = (await readLines(out)).length;

    for (const [i, c] of FAILURES.entries()) {
      const dir = `${tmp.path}/bad${i}`;
      await copyImages(img, dir);
      await c.damage(dir, pid);
      const before = childrenWithState();
      const r = await amber(["restore", "-D", dir, "-d"]);
      assertExit(r, 1, `restore of a ${c.name}`);
      const msg = r.stderr.trim();
      assert.match(msg, /^amber: /, `${c.name}: ${r.stderr}`);
      assert.equal(msg.split("\n").length, 1, `${c.name}: one line expected: ${r.stderr}`);
      for (const m of c.mentions(dir, pid)) {
        assert.ok(msg.includes(m), `${c.name}: message does not name ${m}: ${msg}`);
      }
      const oneOf = c.oneOf?.(dir, pid);
      if (oneOf) {
        assert.ok(oneOf.some((m) => msg.includes(m)), `${c.name}: names none of ${oneOf}: ${msg}`);
      }
      assert.equal(procState(pid), null, `${c.name}: pid ${pid} exists after the failure`);
      assert.deepEqual(childrenWithState(), before, `${c.name}: children left behind`);
      assertNoHelper(c.name);
      assert.equal((await readLines(out)).length, lines, `${c.name}: the target wrote`);
    }

    // The intact images still restore: the failures came from the damage.
    await restoreDetached(img, pid, [pid], "intact images");
    await waitForLines(out, lines + 5);
    Deno.kill(pid, "SIGUSR1");
    await waitForLine(out, (l) => l.includes("check ok"));
    const { numbers, other } = await readCounterLines(out);
    assert.deepEqual(other, ["check ok"]);
    assertConsecutive(numbers);
  } finally {
    await killAndReap(pid);
  }
});

/** Offset of fs_base in a thread image's regs (struct user_regs_struct). */
const FS_BASE_OFFSET = 21 * 8;

Deno.test("a failure in the middle of a tree's restore leaves no process and no zombie", async () => {
  // No fault hook in restore: an fs_base the kernel refuses (non-canonical;
  // PTRACE_SETREGSET fails) makes the restore fail once every process of
  // the tree exists and is rebuilt, when the registers are set.
  await using tmp = await tempDir();
  const outDir = `${tmp.path}/out`;
  let root = 0;
  let pids: number[] = [];
  try {
    pids = await startTree(outDir, (r) => root = r);
    const img = `${tmp.path}/img`;
    await dumpKill(root, pids, img, "tree");
    const leaf = pids.at(-1)!;
    const bad = `${tmp.path}/bad`;
    await copyImages(img, bad);
    const file = `${bad}/threads-${leaf}.cbor`;
    const doc = decode(await Deno.readFile(file));
    const regs: Uint8Array = doc.body.threads[0].regs;
    new DataView(regs.buffer, regs.byteOffset, regs.byteLength)
      .setBigUint64(FS_BASE_OFFSET, 1n << 63n, true);
    await Deno.writeFile(file, cbor.encode(doc));

    const before = childrenWithState();
    const r = await amber(["restore", "-D", bad, "-d"]);
    assertExit(r, 1, "restore with a bad fs_base");
    const msg = r.stderr.trim();
    assert.match(msg, /^amber: /, r.stderr);
    assert.equal(msg.split("\n").length, 1, `one line expected: ${r.stderr}`);
    assert.ok(msg.includes(String(leaf)), `message does not name ${leaf}: ${msg}`);
    const left = pids.filter((p) => procState(p) !== null).map((p) => `${p} (${procState(p)})`);
    assert.deepEqual(left, [], "processes (or zombies) left by the failed restore");
    assert.deepEqual(childrenWithState(), before, "children left behind");
    assertNoHelper("failed tree restore");

    // The intact images restore.
    await restoreDetached(img, root, pids, "intact tree images");
  } finally {
    if (root) await killTree(root);
    await waitVanished(pids);
  }
});

Deno.test("restore while the pid is in use fails, names the pid and its holder", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("counter");
  const out = `${tmp.path}/counter.txt`;
  const c = spawnTarget([bin, out, "8", "--setsid"]);
  try {
    await waitForLines(out, 3);
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(c.pid, img, "-R")), 0, "dump -R");
    const exe = Deno.readLinkSync(`/proc/${c.pid}/exe`);
    const before = childrenWithState();
    const r = await amber(["restore", "-D", img, "-d"]);
    assertExit(r, 1, "restore over a running pid");
    const msg = r.stderr.trim();
    assert.match(msg, /^amber: /);
    assert.equal(msg.split("\n").length, 1, `one line expected: ${r.stderr}`);
    assert.ok(
      msg.includes(`pid ${c.pid} is in use by ${exe}`),
      `expected "pid ${c.pid} is in use by ${exe}": ${msg}`,
    );
    assert.deepEqual(childrenWithState(), before, "children left behind");
    assertNoHelper("pid in use");

    // The original is untouched.
    assert.ok(isAlive(c.pid));
    await assertRunningFree(c.pid);
    const n = (await readLines(out)).length;
    await waitForLines(out, n + 5);
    assertConsecutive((await readCounterLines(out)).numbers);
  } finally {
    await killAndReap(c.pid);
  }
  assert.ok(await waitGone(c.pid));
});
