/**
 * End-to-end tests of `amber dump` (and `show --json`) on the testdata
 * targets. Run with: deno test -A --parallel=false tests/
 */
import assert from "node:assert/strict";
import {
  amber,
  assertConsecutive,
  assertExit,
  buildC,
  COUNTER_PY,
  descendants,
  field,
  isAlive,
  killAndReap,
  killTree,
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
  spawnTarget,
  type Target,
  tempDir,
  threadsOf,
  unusedPid,
  waitForLine,
  waitForLines,
  waitGone,
} from "./_util.ts";

const MiB = 1024 * 1024;
const COUNTER_MIB = 64;

interface Counter extends Target {
  out: string;
}

/** Starts testdata/counter.c in its own session, once its memory is filled. */
async function startCounter(dir: string, mib = COUNTER_MIB): Promise<Counter> {
  const bin = await buildC("counter");
  const out = `${dir}/counter.txt`;
  const target = spawnTarget([bin, out, String(mib), "--setsid"]);
  // The output file is opened only after the memory is filled.
  await waitForLines(out, 3);
  return { ...target, out };
}

/** Waits for `more` further lines, asks for a memory check, and checks everything written. */
async function assertCounterHealthy(c: Counter, more = 10): Promise<void> {
  assert.ok(isAlive(c.pid), `counter ${c.pid} is not running`);
  const now = (await readLines(c.out)).length;
  await waitForLines(c.out, now + more);
  const checks = (await readCounterLines(c.out)).other.length;
  Deno.kill(c.pid, "SIGUSR1");
  await waitForLine(c.out, (lines) => lines.filter((l) => l.startsWith("check")).length > checks);
  const { numbers, other } = await readCounterLines(c.out);
  assert.deepEqual(other, Array(checks + 1).fill("check ok"), "memory check after the dump");
  assertConsecutive(numbers);
}

function dumpArgs(pid: number, dir: string, ...extra: string[]): string[] {
  return ["dump", "-t", String(pid), "-D", dir, ...extra];
}

/** One line of /proc maps, in the comparable form of show --json. */
function mapKey(m: { start: bigint; end: bigint }): string {
  return `${m.start.toString(16)}-${m.end.toString(16)}`;
}

function imageFiles(dir: string): string[] {
  return listDir(dir).filter((n) => /\.(cbor|img)$/.test(n));
}

Deno.test("dump -R leaves the counter running without a gap, memory intact", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path);
  try {
    const img = `${tmp.path}/img`;
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
    assertExit(await amber(dumpArgs(c.pid, `${tmp.path}/img2`, "-R")), 0, "second dump -R");
    await assertCounterHealthy(c, 10);
  } finally {
    await killAndReap(c.pid);
  }
});

Deno.test("show --json lists every mapping and pages about the resident anon memory", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path);
  try {
    const img = `${tmp.path}/img`;
    // counter's mappings do not change while it loops: read them right before.
    const before: MapsEntry[] = procMaps(c.pid);
    const rssAnon = procStatus(c.pid, "RssAnon");
    const vmSize = procStatus(c.pid, "VmSize");
    assertExit(await amber(dumpArgs(c.pid, img, "-R")), 0, "dump -R");
    const after = procMaps(c.pid);
    assert.deepEqual(
      after.map(mapKey),
      before.map(mapKey),
      "counter's mappings changed (test bug)",
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
  } finally {
    await killAndReap(c.pid);
  }
});

Deno.test("dump without -R ends the process", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, 8);
  try {
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(c.pid, img)), 0, "dump");
    assert.ok(await waitGone(c.pid, 10_000), `process ${c.pid} still there after dump`);
    const status = await c.child.status;
    assert.ok(!status.success, "the dumped process should have been killed");
    const lines = (await readLines(c.out)).length;
    await sleep(100);
    assert.equal((await readLines(c.out)).length, lines, "the counter went on writing");
    assert.ok(listDir(img).includes(`pages-${c.pid}.img`), "no pages image");
    assertConsecutive((await readCounterLines(c.out)).numbers);
  } finally {
    await killAndReap(c.pid);
  }
});

Deno.test("dump of a process tree records every process", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("tree");
  const depth = 2, width = 2;
  const count = 1 + width + width * width;
  const outDir = `${tmp.path}/out`;
  await Deno.mkdir(outDir);
  const root = spawnTarget([bin, outDir, String(depth), String(width), "--setsid"]);
  try {
    // Every process writes its own PID.txt once its children are forked.
    const deadline = Date.now() + 10_000;
    let files: string[] = [];
    while (Date.now() < deadline) {
      files = listDir(outDir);
      if (files.length === count) {
        const counts = await Promise.all(files.map((f) => readLines(`${outDir}/${f}`)));
        if (counts.every((l) => l.length >= 2)) break;
      }
      await sleep(10);
    }
    const pids = descendants(root.pid);
    assert.equal(pids.length, count, `tree has ${pids.length} processes: ${pids.join(" ")}`);
    assert.deepEqual(files.sort(), pids.map((p) => `${p}.txt`).sort());
    const ppids = new Map(pids.map((p) => [p, Number(procStatFields(p)[1])]));

    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(root.pid, img, "-R")), 0, "dump -R of the tree");

    const procs = processesOf(await showJson(img));
    const shownPids = procs.map(pidOf);
    assert.equal(shownPids[0], root.pid, "the root comes first");
    assert.deepEqual([...shownPids].sort((a, b) => a - b), [...pids].sort((a, b) => a - b));
    for (const p of procs) {
      const pid = pidOf(p);
      if (typeof p.ppid === "number" && pid !== root.pid) {
        assert.equal(p.ppid, ppids.get(pid), `ppid of ${pid}`);
      }
      if (typeof p.sid === "number") assert.equal(p.sid, root.pid, `sid of ${pid}`);
    }

    // Every process keeps running and counting without a gap.
    for (const pid of pids) {
      assert.ok(isAlive(pid), `${pid} died in the dump`);
      const file = `${outDir}/${pid}.txt`;
      await waitForLines(file, (await readLines(file)).length + 5);
      const { numbers, other } = await readCounterLines(file);
      assert.deepEqual(other, []);
      assertConsecutive(numbers, `process ${pid}`);
    }
  } finally {
    await killTree(root.pid);
  }
});

Deno.test("dump -R of a multithreaded process records every thread", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("threads");
  const out = `${tmp.path}/threads.txt`;
  const nthreads = 4;
  const t = spawnTarget(["setsid", bin, out, String(nthreads)]);
  try {
    await waitForLines(out, nthreads * 3);
    const tids = threadsOf(t.pid);
    assert.equal(tids.length, nthreads + 1);
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(t.pid, img, "-R")), 0, "dump -R of threads");
    const procs = processesOf(await showJson(img));
    assert.deepEqual(procs.map(pidOf), [t.pid]);
    const shown = procs[0].threads ?? procs[0].entry?.threads;
    assert.ok(Array.isArray(shown), "show --json has no thread list");
    const shownTids = shown.map((
      x: unknown,
    ) => (typeof x === "object" ? field(x, "tid", "pid") : x));
    assert.deepEqual([...shownTids].sort((a, b) => a - b), tids);

    await waitForLines(out, (await readLines(out)).length + nthreads * 5);
    const byThread = await readThreadLines(out);
    assert.equal(byThread.size, nthreads);
    for (const [i, numbers] of byThread) assertConsecutive(numbers, `thread ${i}`);
  } finally {
    await killAndReap(t.pid);
  }
});

Deno.test("dump -R of a program using several shared libraries", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("dynlib");
  const out = `${tmp.path}/dynlib.txt`;
  const t = spawnTarget(["setsid", bin, out]);
  try {
    await waitForLines(out, 3);
    const libs = new Set(procMaps(t.pid).map((m) => m.path).filter((p) => /\.so/.test(p)));
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(t.pid, img, "-R")), 0, "dump -R of dynlib");
    const shown = new Set(mappingsOf(processesOf(await showJson(img))[0]).map((m) => m.raw.path));
    for (const lib of libs) assert.ok(shown.has(lib), `${lib} missing from the mappings`);
    assert.ok([...libs].some((l) => /libz\.so/.test(l)), "libz not mapped (test bug)");

    await waitForLines(out, (await readLines(out)).length + 10);
    const { numbers, other } = await readCounterLines(out);
    assert.deepEqual(other, [], "dynlib found a wrong value");
    assertConsecutive(numbers);
  } finally {
    await killAndReap(t.pid);
  }
});

Deno.test("dump -R of a Python process", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/py.txt`;
  const t = spawnTarget(["setsid", "python3", COUNTER_PY, out]);
  try {
    await waitForLines(out, 3, 30_000);
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(t.pid, img, "-R")), 0, "dump -R of python");
    await waitForLines(out, (await readLines(out)).length + 10);
    const { numbers, other, lines } = await readCounterLines(out);
    assert.deepEqual(other, [], "counter.py found a wrong checksum");
    assertConsecutive(numbers);
    const sums = lines.map((l) => BigInt(l.split(" ")[1]));
    for (let i = 1; i < sums.length; i++) assert.equal(sums[i] - sums[i - 1], 2n, `checksum ${i}`);
  } finally {
    await killAndReap(t.pid);
  }
});

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

Deno.test("dump into an unwritable directory fails and leaves the target running", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, 8);
  try {
    const file = `${tmp.path}/a-file`;
    await Deno.writeTextFile(file, "not a directory\n");
    for (const dir of [`${file}/img`, "/proc/amber-test-images"]) {
      const r = await amber(dumpArgs(c.pid, dir, "-R"));
      assertExit(r, 1, `dump -D ${dir}`);
      assert.match(r.stderr, /^amber: /);
      assert.ok(isAlive(c.pid), `target died after the failed dump into ${dir}`);
    }
    await assertCounterHealthy(c, 5);
  } finally {
    await killAndReap(c.pid);
  }
});

for (const point of ["after-freeze", "mid-pages", "before-commit"]) {
  for (const leaveRunning of [true, false]) {
    const flag = leaveRunning ? " -R" : "";
    Deno.test(`a fault at ${point}${flag} leaves the target running and no images`, async () => {
      await using tmp = await tempDir();
      const c = await startCounter(tmp.path);
      try {
        const img = `${tmp.path}/img`;
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
      } finally {
        await killAndReap(c.pid);
      }
    });
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
