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
  amberAfter,
  assertConsecutive,
  assertCounterFile,
  assertCounterGoesOn,
  assertExit,
  assertLeftNothing,
  assertNoHelper,
  assertOneLineError,
  assertPyChecksums,
  assertRunningFree,
  buildC,
  childrenWithState,
  CLI,
  DENO,
  descendants,
  dumpArgs,
  dumpKill,
  editPart,
  isAlive,
  killAndReap,
  listDir,
  openFds,
  ownChildren,
  processFile,
  procMaps,
  procState,
  procStatFields,
  readCounterLines,
  readLines,
  readThreadLines,
  sleep,
  startCounter,
  startDynlib,
  startPyCounter,
  startThreads,
  startWriter,
  tempDir,
  threadsOf,
  waitForLine,
  waitForLines,
  waitGone,
  withTree,
} from "./_util.ts";

const COUNTER_MIB = 64;

// ---------------------------------------------------------------------------
// helpers

interface Identity {
  exe: string;
  cmdline: string;
  /** "fd -> target" of every open fd. */
  fds: string[];
  /** "start path" of every mapping (left out where the heap moves by itself). */
  maps?: string[];
}

function fdsOf(pid: number): string[] {
  return openFds(pid).map((fd) => `${fd} -> ${Deno.readLinkSync(`/proc/${pid}/fd/${fd}`)}`);
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
 * `amber restore -d` of `img`, whose root is `root` and processes `pids`:
 * checks that exactly the root became a new child of ours (we are the
 * subreaper), that every process is back and runs untraced, and that no
 * helper is left. amber runs with one more fd open (fd 9, /dev/null), as a
 * shell or a supervisor may pass one on: the restored processes must not
 * inherit it (they get exactly the fds of the images).
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
  const r = await amberAfter("exec 9</dev/null", ["restore", "-D", img, "-d", ...extra]);
  assertExit(r, 0, `${what}: restore -d`);
  assert.equal(r.stdout, "", `${what}: restore printed something`);
  for (const pid of pids) {
    assert.ok(isAlive(pid), `${what}: process ${pid} is not running after restore -d`);
    await assertRunningFree(pid, what);
  }
  const added = ownChildren().filter((p) => !before.includes(p));
  assert.deepEqual(added, [root], `${what}: new children of the test process`);
  assertNoHelper(what);
}

/**
 * Twice: dumps (ending it) the single process PID, which writes the counter
 * file OUT, into DIR/imgN; runs `atDump`; restores it detached; checks it is
 * the process `identity` describes; runs `afterRestore`; and waits for 10
 * more lines, the whole file still consecutive with no other line.
 */
async function counterRounds(
  dir: string,
  label: string,
  pid: number,
  out: string,
  identity: Identity,
  hooks: { atDump?: (what: string) => Promise<void>; afterRestore?: (what: string) => void } = {},
): Promise<void> {
  for (const round of [1, 2]) {
    const what = `${label} round ${round}`;
    const img = `${dir}/img${round}`;
    await dumpKill(pid, [pid], img, what);
    await hooks.atDump?.(what);
    const n = (await readLines(out)).length;
    await restoreDetached(img, pid, [pid], what);
    assertSameIdentity(pid, identity, what);
    hooks.afterRestore?.(what);
    await assertCounterGoesOn(out, n, 10, what);
  }
}

// ---------------------------------------------------------------------------
// counter.c

Deno.test("counter (64 MiB): dump + restore -d twice, same pid, output and memory intact", async () => {
  await using tmp = await tempDir();
  const { pid, out } = await startCounter(tmp.path, COUNTER_MIB);
  try {
    const identity = identityOf(pid);
    await counterRounds(tmp.path, "counter", pid, out, identity, {
      atDump: async (what) => {
        const atDump = await readCounterLines(out);
        assertConsecutive(atDump.numbers, `${what}: output at the dump`);
        await sleep(50);
        assert.equal((await readLines(out)).length, atDump.lines.length, "written while dumped");
      },
    });

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
  const { lines, numbers } = await assertCounterFile(
    out,
    "the whole output, memory checked after two restores",
    ["check ok"],
  );
  const expected = numbers.map(String);
  expected.splice(lines.indexOf("check ok"), 0, "check ok");
  assert.equal(text, expected.join("\n") + "\n", "the output file's content");
  assertNoHelper("at the end");
});

Deno.test("restore straight after the dump, its process still being torn down, waits for the pid", async () => {
  await using tmp = await tempDir();
  // Large enough that freeing its memory takes a while after the dump returns.
  const { pid, out } = await startCounter(tmp.path, 256);
  try {
    const img = `${tmp.path}/img`;
    const dump = `${DENO} run -A ${CLI} dump -t ${pid} -D ${img}`;
    const n = (await readLines(out)).length;
    // One shell, the restore started the moment the dump exits.
    assertExit(await amberAfter(`${dump} || exit 9`, ["restore", "-D", img, "-d"]), 0, "restore");
    assert.ok(isAlive(pid), "not running after restore -d");
    await assertCounterGoesOn(out, n, 5, "after the restore");
    // Its memory is the dumped one (the counter checks its pattern).
    Deno.kill(pid, "SIGUSR1");
    await waitForLine(out, (lines) => lines.some((l) => l.startsWith("check")));
    assert.ok((await readLines(out)).includes("check ok"), "memory check after the restore");
  } finally {
    await killAndReap(pid);
  }
  assertNoHelper("at the end");
});

// ---------------------------------------------------------------------------
// CPython

Deno.test("CPython counter: dump + restore -d twice, output continues, checksums right", async () => {
  await using tmp = await tempDir();
  const { pid, out } = await startPyCounter(tmp.path);
  try {
    // CPython's heap moves by itself: no maps.
    await counterRounds(tmp.path, "python", pid, out, identityOf(pid, false));
  } finally {
    await killAndReap(pid);
  }
  assert.ok(!(await Deno.readTextFile(out)).includes("\0"), "NUL bytes in the output");
  assertPyChecksums((await assertCounterFile(out, "the whole output")).lines);
});

// ---------------------------------------------------------------------------
// shared libraries

Deno.test("dynamically linked program: dump + restore -d twice, libraries and output intact", async () => {
  await using tmp = await tempDir();
  const { pid, out } = await startDynlib(tmp.path);
  try {
    const identity = identityOf(pid);
    const libs = (p: number) => [...new Set(procMaps(p).map((m) => m.path))].sort();
    const libsBefore = libs(pid);
    assert.ok(libsBefore.some((l) => /libz\.so/.test(l)), "libz not mapped (test bug)");
    await counterRounds(tmp.path, "dynlib", pid, out, identity, {
      afterRestore: (what) => assert.deepEqual(libs(pid), libsBefore, `${what}: mapped files`),
    });
  } finally {
    await killAndReap(pid);
  }
  assertConsecutive((await readCounterLines(out)).numbers);
});

// ---------------------------------------------------------------------------
// threads

Deno.test("threads: dump + restore -d twice, every thread back and counting on", async () => {
  await using tmp = await tempDir();
  const nthreads = 4;
  const { pid, out, tids } = await startThreads(tmp.path, nthreads);
  try {
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

Deno.test("tree: dump + restore -d twice, pids, ppids, groups, sessions; --pidfile", async () => {
  await using tmp = await tempDir();
  await withTree(tmp.path, async (root, pids, outDir) => {
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
        await assertCounterGoesOn(`${outDir}/${p}.txt`, sizes.get(p)!, 5, `${what}: process ${p}`);
      }
    }
  });
});

// ---------------------------------------------------------------------------
// restore without -d

Deno.test("restore without -d waits for the root and exits with its code; nanosleep resumes", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("exit_later");
  const out = `${tmp.path}/exit.txt`;
  const ticks = 25;
  const { pid } = await startWriter([bin, out, String(ticks), "--setsid"], out, 2);
  try {
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
    assertLeftNothing(before, "attached restore");

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
    damage: (dir, pid) =>
      editPart(dir, pid, "mappings", () => {}, (bytes) => {
        const mid = Math.floor(bytes.length / 2);
        for (let i = mid; i < mid + 8; i++) bytes[i] ^= 0xff;
        return bytes;
      }),
    mentions: () => ["mappings"],
    // Either the decoder fails on the part, or the decoded garbage fails
    // while restoring that process.
    oneOf: (dir, pid) => [`${processFile(dir, pid)}: mappings`, `pid ${pid}`],
  },
  {
    name: "truncated mappings image",
    damage: (dir, pid) =>
      editPart(dir, pid, "mappings", () => {}, (b) => b.subarray(0, b.length >> 1)),
    mentions: (dir, pid) => [`${processFile(dir, pid)}: mappings`],
  },
  {
    name: "truncated process image",
    damage: (dir, pid) => truncateHalf(processFile(dir, pid)),
    mentions: (dir, pid) => [processFile(dir, pid)],
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
  const { pid, out } = await startCounter(tmp.path, 8);
  const img = `${tmp.path}/img`;
  try {
    await dumpKill(pid, [pid], img, "counter");
    const lines = (await readLines(out)).length;

    for (const [i, c] of FAILURES.entries()) {
      const dir = `${tmp.path}/bad${i}`;
      await copyImages(img, dir);
      await c.damage(dir, pid);
      const before = childrenWithState();
      const r = await amber(["restore", "-D", dir, "-d"]);
      const msg = assertOneLineError(r, 1, `restore of a ${c.name}`);
      for (const m of c.mentions(dir, pid)) {
        assert.ok(msg.includes(m), `${c.name}: message does not name ${m}: ${msg}`);
      }
      const oneOf = c.oneOf?.(dir, pid);
      if (oneOf) {
        assert.ok(oneOf.some((m) => msg.includes(m)), `${c.name}: names none of ${oneOf}: ${msg}`);
      }
      assert.equal(procState(pid), null, `${c.name}: pid ${pid} exists after the failure`);
      assertLeftNothing(before, c.name);
      assert.equal((await readLines(out)).length, lines, `${c.name}: the target wrote`);
    }

    // The intact images still restore: the failures came from the damage.
    await restoreDetached(img, pid, [pid], "intact images");
    await waitForLines(out, lines + 5);
    Deno.kill(pid, "SIGUSR1");
    await waitForLine(out, (l) => l.includes("check ok"));
    await assertCounterFile(out, "intact images", ["check ok"]);
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
  await withTree(tmp.path, async (root, pids) => {
    const img = `${tmp.path}/img`;
    await dumpKill(root, pids, img, "tree");
    const leaf = pids.at(-1)!;
    const bad = `${tmp.path}/bad`;
    await copyImages(img, bad);
    await editPart(bad, leaf, "threads", (b) => {
      const regs: Uint8Array = b.threads[0].regs;
      new DataView(regs.buffer, regs.byteOffset, regs.byteLength)
        .setBigUint64(FS_BASE_OFFSET, 1n << 63n, true);
    });

    const before = childrenWithState();
    const r = await amber(["restore", "-D", bad, "-d"]);
    const msg = assertOneLineError(r, 1, "restore with a bad fs_base");
    assert.ok(msg.includes(String(leaf)), `message does not name ${leaf}: ${msg}`);
    const left = pids.filter((p) => procState(p) !== null).map((p) => `${p} (${procState(p)})`);
    assert.deepEqual(left, [], "processes (or zombies) left by the failed restore");
    assertLeftNothing(before, "failed tree restore");

    // The intact images restore.
    await restoreDetached(img, root, pids, "intact tree images");
  });
});

Deno.test("restore while the pid is in use fails, names the pid and its holder", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, 8);
  try {
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(c.pid, img, "-R")), 0, "dump -R");
    const exe = Deno.readLinkSync(`/proc/${c.pid}/exe`);
    const before = childrenWithState();
    const r = await amber(["restore", "-D", img, "-d"]);
    const msg = assertOneLineError(r, 1, "restore over a running pid");
    assert.ok(
      msg.includes(`pid ${c.pid} is in use by ${exe}`),
      `expected "pid ${c.pid} is in use by ${exe}": ${msg}`,
    );
    assertLeftNothing(before, "pid in use");

    // The original is untouched.
    assert.ok(isAlive(c.pid));
    await assertRunningFree(c.pid, "the original");
    const n = (await readLines(c.out)).length;
    await waitForLines(c.out, n + 5);
    assertConsecutive((await readCounterLines(c.out)).numbers);
  } finally {
    await killAndReap(c.pid);
  }
  assert.ok(await waitGone(c.pid));
});
