/**
 * End-to-end tests of `amber dump` (and `show --json`) on the testdata
 * targets. Run with: deno test -A --parallel=false tests/
 */
import assert from "node:assert/strict";
import {
  amber,
  assertConsecutive,
  assertCounterGoesOn,
  assertCounterHealthy,
  assertExit,
  assertPyChecksums,
  dumpArgs,
  field,
  isAlive,
  killAndReap,
  listDir,
  mappingsOf,
  type MapsEntry,
  pidOf,
  processesOf,
  procMaps,
  procStatFields,
  procStatus,
  readCounterLines,
  readLines,
  readThreadLines,
  showJson,
  sizeOf,
  sleep,
  startCounter,
  startDynlib,
  startPyCounter,
  startThreads,
  tempDir,
  unusedPid,
  waitForLines,
  waitGone,
  withTree,
  type Writer,
} from "./_util.ts";

const MiB = 1024 * 1024;
const COUNTER_MIB = 64;

/** One line of /proc maps, in the comparable form of show --json. */
function mapKey(m: { start: bigint; end: bigint }): string {
  return `${m.start.toString(16)}-${m.end.toString(16)}`;
}

/**
 * Runs `body` on a target started by `start` in a new temporary directory,
 * and kills the target afterwards, whatever happened.
 */
async function withTarget<T extends Writer>(
  start: (dir: string) => Promise<T>,
  body: (t: T, dir: string) => Promise<void>,
): Promise<void> {
  await using tmp = await tempDir();
  const t = await start(tmp.path);
  try {
    await body(t, tmp.path);
  } finally {
    await killAndReap(t.pid);
  }
}

function imageFiles(dir: string): string[] {
  return listDir(dir).filter((n) => /\.(cbor|img)$/.test(n));
}

Deno.test("dump -R leaves the counter running without a gap, memory intact", () =>
  withTarget((dir) => startCounter(dir, COUNTER_MIB), async (c, dir) => {
    const img = `${dir}/img`;
    const r = await amber(dumpArgs(c.pid, img, "-R"));
    assertExit(r, 0, "dump -R");
    assert.ok(isAlive(c.pid), "dump -R killed the target");
    await assertCounterHealthy(c, 10);

    // The images directory is private, and so is every file in it.
    assert.equal(Deno.statSync(img).mode! & 0o777, 0o700, "images dir mode");
    const files = listDir(img);
    for (const f of files) {
      assert.equal(Deno.statSync(`${img}/${f}`).mode! & 0o777, 0o600, `${f} mode`);
    }
    for (const f of ["inventory.cbor", "pstree.cbor", `pages-${c.pid}.img`]) {
      assert.ok(files.includes(f), `${f} missing from ${files.join(" ")}`);
    }

    // A second dump of the same, still running process works as well.
    assertExit(await amber(dumpArgs(c.pid, `${dir}/img2`, "-R")), 0, "second dump -R");
    await assertCounterHealthy(c, 10);
  }));

Deno.test("show --json lists every mapping and pages about the resident anon memory", () =>
  withTarget((dir) => startCounter(dir, COUNTER_MIB), async (c, dir) => {
    const img = `${dir}/img`;
    // counter's mappings do not change while it loops: read them right before.
    const before: MapsEntry[] = procMaps(c.pid);
    const rssAnon = procStatus(c.pid, "RssAnon");
    const vmSize = procStatus(c.pid, "VmSize");
    assertExit(await amber(dumpArgs(c.pid, img, "-R")), 0, "dump -R");
    const after = procMaps(c.pid);
    assert.deepEqual(
      after.map(mapKey),
      before.map(mapKey),
      "counter's mappings changed (amber left a mapping behind, or a test bug)",
    );

    const doc = await showJson(img);
    const procs = processesOf(doc);
    assert.deepEqual(procs.map(pidOf), [c.pid]);
    const proc = procs[0];
    const threads = proc.threads ?? proc.entry?.threads;
    if (Array.isArray(threads)) {
      assert.deepEqual(threads.map((t: unknown) => (typeof t === "object" ? pidOf(t) : t)), [
        c.pid,
      ]);
    }

    const shown = mappingsOf(proc);
    assert.deepEqual(
      shown.map(mapKey),
      before.map(mapKey),
      "mappings in show --json differ from /proc/PID/maps",
    );
    for (let i = 0; i < before.length; i++) {
      const raw = shown[i].raw;
      const perms = raw.perms ?? raw.prot;
      if (typeof perms === "string") assert.equal(perms, before[i].perms, `perms of ${raw.start}`);
      if (typeof raw.path === "string" && before[i].path) {
        assert.equal(raw.path, before[i].path, `path of ${raw.start}`);
      }
    }

    // Only the touched memory is saved: the 64 MiB pattern plus a little,
    // not the untouched sparse region (VmSize is ~5x larger).
    const pageBytes = sizeOf(img, /^pages-.*\.img$/);
    assert.ok(pageBytes >= COUNTER_MIB * MiB, `pages ${pageBytes} < ${COUNTER_MIB} MiB`);
    assert.ok(pageBytes <= (COUNTER_MIB + 8) * MiB, `pages ${pageBytes} > ${COUNTER_MIB + 8} MiB`);
    assert.ok(
      Math.abs(pageBytes - rssAnon) <= 8 * MiB,
      `pages ${pageBytes} far from RssAnon ${rssAnon}`,
    );
    assert.ok(pageBytes < vmSize / 2, `pages ${pageBytes} not far below VmSize ${vmSize}`);
    const shownBytes = proc.pages?.bytes;
    if (typeof shownBytes === "number") {
      assert.ok(Math.abs(shownBytes - pageBytes) <= MiB, `show's pages.bytes ${shownBytes}`);
    }
    await assertCounterHealthy(c, 5);
  }));

Deno.test("dump without -R ends the process", () =>
  withTarget((dir) => startCounter(dir, 8), async (c, dir) => {
    const img = `${dir}/img`;
    assertExit(await amber(dumpArgs(c.pid, img)), 0, "dump");
    assert.ok(await waitGone(c.pid, 10_000), `process ${c.pid} still there after dump`);
    const status = await c.child.status;
    assert.ok(!status.success, "the dumped process should have been killed");
    const lines = (await readLines(c.out)).length;
    await sleep(100);
    assert.equal((await readLines(c.out)).length, lines, "the counter went on writing");
    assert.ok(listDir(img).includes(`pages-${c.pid}.img`), "no pages image");
    assertConsecutive((await readCounterLines(c.out)).numbers);
  }));

Deno.test("dump of a process tree records every process", async () => {
  await using tmp = await tempDir();
  await withTree(tmp.path, async (root, pids, outDir) => {
    // Every process writes its own PID.txt.
    assert.deepEqual(listDir(outDir), pids.map((p) => `${p}.txt`).sort());
    const ppids = new Map(pids.map((p) => [p, Number(procStatFields(p)[1])]));

    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(root, img, "-R")), 0, "dump -R of the tree");

    const procs = processesOf(await showJson(img));
    const shownPids = procs.map(pidOf);
    assert.equal(shownPids[0], root, "the root comes first");
    assert.deepEqual([...shownPids].sort((a, b) => a - b), [...pids].sort((a, b) => a - b));
    for (const p of procs) {
      const pid = pidOf(p);
      if (typeof p.ppid === "number" && pid !== root) {
        assert.equal(p.ppid, ppids.get(pid), `ppid of ${pid}`);
      }
      if (typeof p.sid === "number") assert.equal(p.sid, root, `sid of ${pid}`);
    }

    // Every process keeps running and counting without a gap.
    for (const pid of pids) {
      assert.ok(isAlive(pid), `${pid} died in the dump`);
      const file = `${outDir}/${pid}.txt`;
      await assertCounterGoesOn(file, (await readLines(file)).length, 5, `process ${pid}`);
    }
  });
});

Deno.test("dump -R of a multithreaded process records every thread", async () => {
  const nthreads = 4;
  await withTarget((dir) => startThreads(dir, nthreads), async (t, dir) => {
    const img = `${dir}/img`;
    assertExit(await amber(dumpArgs(t.pid, img, "-R")), 0, "dump -R of threads");
    const procs = processesOf(await showJson(img));
    assert.deepEqual(procs.map(pidOf), [t.pid]);
    const shown = procs[0].threads ?? procs[0].entry?.threads;
    assert.ok(Array.isArray(shown), "show --json has no thread list");
    const shownTids = shown.map((
      x: unknown,
    ) => (typeof x === "object" ? field(x, "tid", "pid") : x));
    assert.deepEqual([...shownTids].sort((a, b) => a - b), t.tids);

    await waitForLines(t.out, (await readLines(t.out)).length + nthreads * 5);
    const byThread = await readThreadLines(t.out);
    assert.equal(byThread.size, nthreads);
    for (const [i, numbers] of byThread) assertConsecutive(numbers, `thread ${i}`);
  });
});

Deno.test("dump -R of a program using several shared libraries", () =>
  withTarget(startDynlib, async (t, dir) => {
    const libs = new Set(procMaps(t.pid).map((m) => m.path).filter((p) => /\.so/.test(p)));
    const img = `${dir}/img`;
    assertExit(await amber(dumpArgs(t.pid, img, "-R")), 0, "dump -R of dynlib");
    const shown = new Set(mappingsOf(processesOf(await showJson(img))[0]).map((m) => m.raw.path));
    for (const lib of libs) assert.ok(shown.has(lib), `${lib} missing from the mappings`);
    assert.ok([...libs].some((l) => /libz\.so/.test(l)), "libz not mapped (test bug)");
    await assertCounterGoesOn(t.out, (await readLines(t.out)).length, 10, "dynlib");
  }));

Deno.test("dump -R of a Python process", () =>
  withTarget(startPyCounter, async (t, dir) => {
    const img = `${dir}/img`;
    assertExit(await amber(dumpArgs(t.pid, img, "-R")), 0, "dump -R of python");
    const n = (await readLines(t.out)).length;
    assertPyChecksums((await assertCounterGoesOn(t.out, n, 10, "python")).lines);
  }));

Deno.test("dump of a nonexistent pid fails and names it", async () => {
  await using tmp = await tempDir();
  const pid = unusedPid();
  const img = `${tmp.path}/img`;
  const r = await amber(dumpArgs(pid, img));
  assertExit(r, 1, "dump of a missing pid");
  assert.match(r.stderr, /^amber: /);
  assert.ok(r.stderr.includes(String(pid)), `message does not name ${pid}: ${r.stderr}`);
  assert.deepEqual(imageFiles(img), []);
});

Deno.test("dump of a kernel thread fails", async () => {
  await using tmp = await tempDir();
  const r = await amber(dumpArgs(2, `${tmp.path}/img`));
  assertExit(r, 1, "dump of kthreadd");
  assert.match(r.stderr, /^amber: /);
  assert.equal(r.stderr.trim().split("\n").length, 1, `one line expected: ${r.stderr}`);
  assert.ok(isAlive(2));
});

Deno.test("dump into an unwritable directory fails and leaves the target running", () =>
  withTarget((dir) => startCounter(dir, 8), async (c, dir) => {
    const file = `${dir}/a-file`;
    await Deno.writeTextFile(file, "not a directory\n");
    for (const dir of [`${file}/img`, "/proc/amber-test-images"]) {
      const r = await amber(dumpArgs(c.pid, dir, "-R"));
      assertExit(r, 1, `dump -D ${dir}`);
      assert.match(r.stderr, /^amber: /);
      assert.ok(isAlive(c.pid), `target died after the failed dump into ${dir}`);
    }
    await assertCounterHealthy(c, 5);
  }));

// mid-sigactions: after the snapshot's early write protection began (-R), before it is done.
for (const point of ["after-freeze", "mid-pages", "mid-sigactions", "before-commit"]) {
  for (const leaveRunning of [true, false]) {
    const flag = leaveRunning ? " -R" : "";
    Deno.test(`a fault at ${point}${flag} leaves the target running and no images`, () =>
      withTarget((dir) => startCounter(dir, COUNTER_MIB), async (c, dir) => {
        const img = `${dir}/img`;
        // Once into an existing empty directory, once into one dump creates.
        if (leaveRunning) await Deno.mkdir(img);
        const args = dumpArgs(c.pid, img, ...(leaveRunning ? ["-R"] : []));
        const r = await amber(args, { AMBER_TEST_FAULT: point });
        assertExit(r, 1, `dump with fault ${point}`);
        assert.match(r.stderr, /^amber: /);
        assert.ok(r.stderr.includes(point), `not the injected fault: ${r.stderr}`);
        assert.ok(isAlive(c.pid), `target died after the fault at ${point}`);
        assert.deepEqual(imageFiles(img), [], `images left in ${img}`);
        await assertCounterHealthy(c, 10);
      }));
  }
}

Deno.test("bad usage exits 2", async () => {
  await using tmp = await tempDir();
  const pid = String(unusedPid());
  const cases = [
    [],
    ["frobnicate"],
    ["dump"],
    ["dump", "-D", tmp.path],
    ["dump", "-t", pid],
    ["dump", "-t", "abc", "-D", tmp.path],
    ["dump", "-t", pid, "-D", tmp.path, "--no-such-flag"],
    ["dump", "-t", pid, "-D", tmp.path, "extra"],
    ["restore"],
    ["show"],
    ["show", tmp.path, "another"],
  ];
  for (const args of cases) {
    const r = await amber(args);
    assertExit(r, 2, `amber ${args.join(" ")}`);
    assert.match(r.stderr, /^amber: /, `amber ${args.join(" ")}: ${r.stderr}`);
  }
});
