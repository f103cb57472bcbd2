/**
 * Processes that are not simply running: unreaped children (zombies),
 * stopped processes, processes traced by someone else, processes holding
 * descriptors amber cannot restore yet. And unmodified real programs (bash,
 * mawk, perl, CPython) that fork, stop and hold pointers into relocated code,
 * dumped and restored on the fly.
 * Run with: deno test -A tests/states_test.ts
 *
 * Like the other test files, these look at the test process's children (we
 * are the subreaper): do not run test files concurrently.
 */
import assert from "node:assert/strict";
import {
  amber,
  amberAfter,
  type AmberResult,
  assertConsecutive,
  assertCounterFile,
  assertCounterGoesOn,
  assertExit,
  assertNoLiveHelper,
  assertRunningFree,
  childrenOf,
  commandWorks,
  dumpArgs,
  exists,
  isAlive,
  type Json,
  killAndReap,
  killTree,
  listDir,
  openFds,
  ownChildren,
  pidOf,
  processesOf,
  procState,
  procStatFields,
  readCounterLines,
  readLines,
  ROOT,
  showJson,
  sleep,
  spawnTarget,
  startCounter,
  startWriter,
  statusField,
  tempDir,
  until,
  waitForLines,
  waitVanished,
} from "./_util.ts";

// ---------------------------------------------------------------------------
// helpers

/** The wait status a zombie will report to its parent (field 52 of /proc/PID/stat). */
function exitCodeOf(pid: number): number {
  return Number(procStatFields(pid)[49]);
}

function commOf(pid: number): string {
  return Deno.readTextFileSync(`/proc/${pid}/comm`).trim();
}

function cmdlineOf(pid: number): string[] {
  try {
    return Deno.readTextFileSync(`/proc/${pid}/cmdline`).split("\0").slice(0, -1);
  } catch {
    return [];
  }
}

/** `dump` (ending the tree) of ROOT into IMG; waits until every dumped process is gone. */
async function dumpKill(root: number, img: string, what: string): Promise<Json[]> {
  assertExit(await amber(dumpArgs(root, img)), 0, `${what}: dump`);
  const procs = processesOf(await showJson(img));
  await waitVanished(procs.map(pidOf));
  return procs;
}

/**
 * `restore -d` of IMG whose root is ROOT: exit 0, nothing printed, exactly
 * the root became a new child of ours, no helper left. `check` runs as soon
 * as the restore has returned.
 */
async function restoreDetached(
  img: string,
  root: number,
  what: string,
  check?: () => void,
  extra: string[] = [],
): Promise<void> {
  const before = ownChildren();
  assert.ok(!before.includes(root), `${what}: ${root} is still our child before the restore`);
  const r = await amber(["restore", "-D", img, "-d", ...extra]);
  assertExit(r, 0, `${what}: restore -d`);
  check?.();
  assert.equal(r.stdout, "", `${what}: restore printed something`);
  assert.ok(procState(root) !== null, `${what}: root ${root} is not there after restore -d`);
  const added = ownChildren().filter((p) => !before.includes(p));
  assert.deepEqual(added, [root], `${what}: new children of the test process`);
  assertNoLiveHelper(what);
}

/** Names of the core files (core, core.PID, ...) in DIR. */
function coreFiles(dir: string): string[] {
  return listDir(dir).filter((n) => /^core(\.\d+)?$/.test(n)).map((n) => `${dir}/${n}`);
}

// ---------------------------------------------------------------------------
// zombies

/**
 * Starts `bash -c SCRIPT` in its own session; SCRIPT ends in `exec sleep
 * 1000`, so the root is a sleep that never reaps the children bash left.
 * Waits until the root is that sleep and has `n` children, all zombies.
 */
async function startZombieParent(script: string, n: number, cwd: string): Promise<number> {
  const root = spawnTarget(["setsid", "bash", "-c", script], { cwd }).pid;
  await until(
    () =>
      cmdlineOf(root).join(" ") === "sleep 1000" && childrenOf(root).length === n &&
      childrenOf(root).every((c) => procState(c) === "Z"),
    () =>
      `root ${root} (${cmdlineOf(root).join(" ")}): children ${
        childrenOf(root).map((c) => `${c} (${procState(c)})`).join(" ")
      }, wanted ${n} zombies`,
  );
  return root;
}

interface ZombieFacts {
  /** The wait status its parent will get. */
  status: number;
  /** Its name, as ps shows it ("[sleep] <defunct>"). */
  comm: string;
}

/** What a zombie child looks like from outside. */
function zombieFacts(pids: number[]): Map<number, ZombieFacts> {
  return new Map(pids.map((p) => [p, { status: exitCodeOf(p), comm: commOf(p) }]));
}

/**
 * After a restore: each of `zombies` is a zombie child of ROOT again, with
 * its old wait status and name.
 */
function assertZombiesBack(root: number, zombies: Map<number, ZombieFacts>, what: string): void {
  assert.ok(isAlive(root), `${what}: root ${root} is not running`);
  assert.deepEqual(
    childrenOf(root),
    [...zombies.keys()].sort((a, b) => a - b),
    `${what}: children`,
  );
  for (const [pid, facts] of zombies) {
    assert.equal(procState(pid), "Z", `${what}: ${pid} is not a zombie`);
    assert.equal(Number(procStatFields(pid)[1]), root, `${what}: ppid of ${pid}`);
    assert.equal(exitCodeOf(pid), facts.status, `${what}: wait status of zombie ${pid}`);
    assert.equal(commOf(pid), facts.comm, `${what}: name (/proc/${pid}/comm) of zombie ${pid}`);
  }
}

Deno.test("zombie children (exit 0, exit 7): dump, show, restore -d brings them back as zombies", async () => {
  await using tmp = await tempDir();
  // `sleep 0.1` exits 0, the subshell exits 7; the exec'd sleep never reaps
  // them. Both wait until bash has become that sleep: a child ending before
  // would be reaped by bash.
  const afterExec = 'while read -r c < /proc/$$/comm; [ "$c" != sleep ]; do :; done';
  const script = `(${afterExec}; exec sleep 0.1) & (${afterExec}; exit 7) & exec sleep 1000`;
  const root = await startZombieParent(script, 2, tmp.path);
  try {
    const zombies = zombieFacts(childrenOf(root));
    const statuses = [...zombies.values()].map((z) => z.status).sort((a, b) => a - b);
    assert.deepEqual(statuses, [0, 7 << 8], "test setup");

    const img = `${tmp.path}/img`;
    const procs = await dumpKill(root, img, "zombies");
    assert.deepEqual(procs.map(pidOf), [root, ...zombies.keys()], "processes in the images");
    assert.equal(procs[0].state, "running", "root's state in the images");
    for (const p of procs.slice(1)) {
      assert.equal(p.state, "zombie", `state of ${pidOf(p)} in the images`);
      assert.equal(p.exitStatus, zombies.get(pidOf(p))?.status, `exitStatus of ${pidOf(p)}`);
      assert.equal(p.ppid, root, `ppid of ${pidOf(p)} in the images`);
    }
    // The human-readable show copes with zombies too.
    const text = await amber(["show", img]);
    assertExit(text, 0, "show");

    // The zombies are zombies again (not still dying) once the restore returns.
    await restoreDetached(img, root, "zombies", () => assertZombiesBack(root, zombies, "zombies"));
    await assertRunningFree(root, "zombies");
    assert.deepEqual(cmdlineOf(root), ["sleep", "1000"], "root's cmdline");

    // And once more, from the restored tree.
    await dumpKill(root, `${tmp.path}/img2`, "zombies, round 2");
    await restoreDetached(
      `${tmp.path}/img2`,
      root,
      "zombies, round 2",
      () => assertZombiesBack(root, zombies, "zombies, round 2"),
    );
  } finally {
    await killTree(root);
  }
});

Deno.test("zombie children killed by SIGTERM and SIGABRT: same status back, no core file", async () => {
  await using tmp = await tempDir();
  // The root may dump core (soft limit raised to the hard one), so may the
  // restore below: only amber's own care keeps the restored zombies from it.
  // The SIGABRT child cannot (RLIMIT_CORE 0), so its status has no core bit.
  const raise = 'ulimit -S -c "$(ulimit -H -c)"';
  const script = `${raise}; sleep 1000 & (ulimit -S -c 0; exec sleep 1000) & exec sleep 1000`;
  const root = spawnTarget(["setsid", "bash", "-c", script], { cwd: tmp.path }).pid;
  try {
    await until(
      () =>
        cmdlineOf(root).join(" ") === "sleep 1000" && childrenOf(root).length === 2 &&
        childrenOf(root).every((c) => cmdlineOf(c).join(" ") === "sleep 1000"),
      () => `root ${root}: children ${childrenOf(root).join(" ")} not both sleeping yet`,
    );
    // The child that may not dump core gets SIGABRT.
    const coreLimit = (p: number) =>
      /^Max core file size\s+(\S+)/m.exec(Deno.readTextFileSync(`/proc/${p}/limits`))?.[1];
    const [aborted, termed] = childrenOf(root).sort((a, b) =>
      Number(coreLimit(b) === "0") - Number(coreLimit(a) === "0") || b - a
    );
    Deno.kill(termed, "SIGTERM");
    Deno.kill(aborted, "SIGABRT");
    await until(
      () => procState(termed) === "Z" && procState(aborted) === "Z",
      () => `children ${termed} ${aborted} are not zombies yet`,
    );
    const zombies = zombieFacts([termed, aborted]);
    assert.equal(zombies.get(termed)?.status, 15, "test setup");
    assert.equal(zombies.get(aborted)?.status, 6, "test setup");

    const dirs = [...new Set([tmp.path, Deno.cwd(), ROOT])];
    const coresBefore = dirs.flatMap(coreFiles);

    const img = `${tmp.path}/img`;
    const procs = await dumpKill(root, img, "signalled zombies");
    for (const p of procs.slice(1)) {
      assert.equal(p.state, "zombie", `state of ${pidOf(p)} in the images`);
      assert.equal(p.exitStatus, zombies.get(pidOf(p))?.status, `exitStatus of ${pidOf(p)}`);
    }

    // restore -d, run with core dumps allowed (as far as the hard limit goes).
    const before = ownChildren();
    const r = await amberAfter(raise, ["restore", "-D", img, "-d"]);
    assertExit(r, 0, "restore -d");
    assertZombiesBack(root, zombies, "signalled zombies");
    assert.deepEqual(ownChildren().filter((p) => !before.includes(p)), [root], "new children");
    assertNoLiveHelper("signalled zombies");
    await assertRunningFree(root, "signalled zombies");
    assert.deepEqual(dirs.flatMap(coreFiles), coresBefore, "core files written by the restore");
  } finally {
    await killTree(root);
  }
});

// ---------------------------------------------------------------------------
// a shell forking all the time

Deno.test("bash loop forking `sleep 0.05`: 10 rounds of dump + restore -d, output consecutive", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/loop.txt`;
  const loop = 'i=0; while :; do sleep 0.05; echo "$i" >> "$1"; i=$((i+1)); done';
  const root = spawnTarget(["setsid", "bash", "-c", loop, "loop", out]).pid;
  try {
    await waitForLines(out, 3);
    for (let round = 1; round <= 10; round++) {
      const what = `round ${round}`;
      const n = (await readLines(out)).length;
      const img = `${tmp.path}/img${round}`;
      const procs = await dumpKill(root, img, what);
      assert.equal(pidOf(procs[0]), root, `${what}: root of the images`);
      await restoreDetached(img, root, what);
      await assertRunningFree(root, what);
      await waitForLines(out, n + 3);
      assertConsecutive((await readCounterLines(out)).numbers, what);
    }
  } finally {
    await killTree(root);
  }
  const text = await Deno.readTextFile(out);
  assert.ok(!text.includes("\0"), "NUL bytes in the output");
  const { numbers } = await assertCounterFile(out, "the whole output");
  assert.equal(text, numbers.map((n) => `${n}\n`).join(""), "the output file's content");
});

// ---------------------------------------------------------------------------
// stopped processes

async function waitStopped(pid: number, what: string): Promise<void> {
  await until(
    () => procState(pid) === "T",
    () => `${what}: ${pid} is in state ${procState(pid)}, not T`,
  );
  assert.equal(statusField(pid, "TracerPid"), "0", `${what}: ${pid} is traced`);
}

/** While stopped, PID's output does not grow. */
async function assertNoOutput(out: string, pid: number, what: string): Promise<number> {
  const n = (await readLines(out)).length;
  await sleep(100);
  assert.equal((await readLines(out)).length, n, `${what}: output grew while stopped`);
  assert.equal(procState(pid), "T", `${what}: no longer stopped`);
  return n;
}

Deno.test("stopped process: comes back stopped after dump + restore -d and after dump -R", async () => {
  await using tmp = await tempDir();
  const { pid, out } = await startCounter(tmp.path, 1);
  try {
    Deno.kill(pid, "SIGSTOP");
    await waitStopped(pid, "before the dump");

    const img = `${tmp.path}/img`;
    const procs = await dumpKill(pid, img, "stopped");
    assert.equal(procs[0].state, "stopped", "state in the images");
    await restoreDetached(img, pid, "stopped");
    await waitStopped(pid, "after restore -d");
    let n = await assertNoOutput(out, pid, "after restore -d");
    Deno.kill(pid, "SIGCONT");
    await waitForLines(out, n + 10);
    await assertRunningFree(pid, "after SIGCONT");
    assertConsecutive((await readCounterLines(out)).numbers, "after SIGCONT");

    // dump -R leaves a stopped process stopped (and untraced).
    Deno.kill(pid, "SIGSTOP");
    await waitStopped(pid, "before dump -R");
    const imgR = `${tmp.path}/imgR`;
    assertExit(await amber(dumpArgs(pid, imgR, "-R")), 0, "dump -R");
    await waitStopped(pid, "after dump -R");
    n = await assertNoOutput(out, pid, "after dump -R");
    const [entry] = processesOf(await showJson(imgR));
    assert.equal(entry.state, "stopped", "state in the -R images");
    Deno.kill(pid, "SIGCONT");
    await waitForLines(out, n + 10);
    await assertRunningFree(pid, "after dump -R and SIGCONT");

    // Those images restore stopped too.
    await killAndReap(pid);
    // It wrote on after dump -R: its counter file is not what the images saw.
    await restoreDetached(imgR, pid, "restore of the -R images", undefined, [
      "--allow-changed-files",
    ]);
    await waitStopped(pid, "after restoring the -R images");
    n = await assertNoOutput(out, pid, "after restoring the -R images");
    Deno.kill(pid, "SIGCONT");
    await waitForLines(out, n + 10);
    await assertRunningFree(pid, "after the second SIGCONT");
  } finally {
    await killAndReap(pid);
  }
  // The -R images were taken at an earlier point: their restore rewrites the
  // lines written since (same numbers at the same offsets), so the file is
  // still one consecutive run.
  const text = await Deno.readTextFile(out);
  assert.ok(!text.includes("\0"), "NUL bytes in the output");
  await assertCounterFile(out, "the whole output");
});

// ---------------------------------------------------------------------------
// descriptors amber cannot restore yet

/** CPython holding a netlink socket, appending a counter to argv[1] every 20 ms. */
const HOLDER_PY = `import os, socket, sys, time
held = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)  # not restored yet
f = open(sys.argv[1], "a")
i = 0
while True:
    f.write("%d\\n" % i)
    f.flush()
    i += 1
    time.sleep(0.02)
`;

// (Pipes are restored now: tests/pipe_test.ts.)
for (const kind of ["socket"]) {
  Deno.test(`${kind} held: dump without -R refuses and leaves it running; -R images do not restore`, async () => {
    await using tmp = await tempDir();
    const out = `${tmp.path}/holder.txt`;
    const argv = ["setsid", "python3", "-c", HOLDER_PY, out, kind];
    const { pid } = await startWriter(argv, out, 3, 30_000);
    let alive = true;
    try {
      const fd = openFds(pid).find((f) =>
        Deno.readLinkSync(`/proc/${pid}/fd/${f}`).startsWith(`${kind}:`)
      );
      assert.ok(fd !== undefined, `no ${kind} descriptor in /proc/${pid}/fd (test bug)`);
      const names = (r: AmberResult, what: string) => {
        const msg = r.stderr;
        assert.match(msg, new RegExp(`\\bfd ${fd}\\b`), `${what}: does not name fd ${fd}: ${msg}`);
        assert.ok(msg.includes(kind), `${what}: does not name the kind ${kind}: ${msg}`);
      };

      const img = `${tmp.path}/img`;
      const r = await amber(dumpArgs(pid, img));
      assertExit(r, 1, "dump without -R");
      names(r, "dump without -R");
      assert.ok(r.stderr.includes("-R"), `dump without -R: does not mention -R: ${r.stderr}`);
      assert.ok(!exists(img), `dump without -R left ${img}: ${listDir(img).join(" ")}`);
      await assertRunningFree(pid, "after the refused dump");
      const n = (await readLines(out)).length;
      await waitForLines(out, n + 5);
      assertConsecutive((await readCounterLines(out)).numbers, "after the refused dump");

      assertExit(await amber(dumpArgs(pid, img, "-R")), 0, "dump -R");
      await assertRunningFree(pid, "after dump -R");
      // show gives restore's own verdict, in JSON and in text.
      const doc = await showJson(img);
      assert.equal(doc.restorable, false, "show --json: restorable");
      assert.equal(doc.unrestorable.length, 1, `show --json: ${doc.unrestorable}`);
      assert.match(doc.unrestorable[0], new RegExp(`fd ${fd}\\b.*${kind}`), "show --json: why");
      assert.deepEqual(doc.inventory.verdict, doc.unrestorable, "the verdict dump -R recorded");
      const text = await amber(["show", img]);
      assert.match(text.stdout, /^restorable: no$/m, `show: ${text.stdout}`);
      const m = (await readLines(out)).length;
      await waitForLines(out, m + 5);

      await killAndReap(pid);
      alive = false;
      const before = ownChildren();
      const rr = await amber(["restore", "-D", img, "-d"]);
      assertExit(rr, 1, "restore of the -R images");
      names(rr, "restore");
      assert.equal(procState(pid), null, `restore left process ${pid} behind`);
      assert.deepEqual(ownChildren().filter((p) => !before.includes(p)), [], "new children");
      assertNoLiveHelper("failed restore");
      const lines = (await readLines(out)).length;
      await sleep(50);
      assert.equal((await readLines(out)).length, lines, "someone writes after the failed restore");
    } finally {
      if (alive) await killAndReap(pid);
    }
    assertConsecutive((await readCounterLines(out)).numbers, "the whole output");
  });
}

// ---------------------------------------------------------------------------
// traced by someone else

/** Seizes argv[1] with PTRACE_SEIZE (no stop), says so, and holds it. */
const SEIZE_PY = `import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:
    sys.exit("PTRACE_SEIZE: errno %d" % ctypes.get_errno())
print("seized", flush=True)
time.sleep(1000)
`;

Deno.test("already traced (strace, or a PTRACE_SEIZE helper): dump refuses, process unharmed", async () => {
  await using tmp = await tempDir();
  const { pid, out } = await startCounter(tmp.path, 1);
  let tracer: Deno.ChildProcess | undefined;
  try {
    tracer = (await commandWorks("strace", "-V"))
      ? new Deno.Command("strace", {
        args: ["-q", "-o", "/dev/null", "-p", String(pid)],
        stdin: "null",
        stdout: "null",
        stderr: "null",
      }).spawn()
      : new Deno.Command("python3", {
        args: ["-c", SEIZE_PY, String(pid)],
        stdin: "null",
        stdout: "null",
        stderr: "null",
      }).spawn();
    const tracerPid = tracer.pid;
    await until(
      () => statusField(pid, "TracerPid") === String(tracerPid),
      () => `${pid} is not traced by ${tracerPid} (TracerPid ${statusField(pid, "TracerPid")})`,
    );

    const img = `${tmp.path}/img`;
    for (const extra of [[], ["-R"]]) {
      const what = `dump ${extra.join(" ")}`.trim();
      const r = await amber(dumpArgs(pid, img, ...extra));
      assertExit(r, 1, what);
      assert.ok(
        r.stderr.includes(`already traced by pid ${tracerPid}`),
        `${what}: message does not say who traces it: ${r.stderr}`,
      );
      assert.ok(!exists(img), `${what} left ${img}`);
      // Still traced by the same tracer, still counting.
      assert.equal(statusField(pid, "TracerPid"), String(tracerPid), `${what}: tracer changed`);
      const n = (await readLines(out)).length;
      await waitForLines(out, n + 5);
    }

    tracer.kill("SIGINT");
    await tracer.status;
    tracer = undefined;
    await until(
      () => statusField(pid, "TracerPid") === "0",
      () => `${pid} still traced after the tracer ended`,
    );
    await assertRunningFree(pid, "after the tracer ended");
    const n = (await readLines(out)).length;
    await waitForLines(out, n + 5);
  } finally {
    if (tracer) {
      tracer.kill("SIGKILL");
      await tracer.status;
    }
    await killAndReap(pid);
  }
  await assertCounterFile(out, "the whole output");
});

// ---------------------------------------------------------------------------
// unmodified interpreters

const INTERPRETERS: { name: string; argv: (out: string) => string[] }[] = [
  {
    name: "mawk",
    argv: (out) => [
      "mawk",
      `BEGIN{for(i=0;;i++){print i >> "${out}"; fflush("${out}"); for(j=0;j<300000;j++)x+=j}}`,
    ],
  },
  {
    name: "perl",
    argv: (out) => [
      "perl",
      "-e",
      '$|=1; open F,">>",$ARGV[0]; select F; $|=1; ' +
      'for($i=0;;$i++){print "$i\\n"; select(undef,undef,undef,0.02)}',
      out,
    ],
  },
];

for (const { name, argv } of INTERPRETERS) {
  Deno.test(`${name}: dump + restore -d twice, output continues consecutively`, async () => {
    await using tmp = await tempDir();
    const out = `${tmp.path}/${name}.txt`;
    const { pid } = await startWriter(["setsid", ...argv(out)], out, 5);
    try {
      const cmdline = cmdlineOf(pid);
      for (const round of [1, 2]) {
        const what = `${name} round ${round}`;
        await dumpKill(pid, `${tmp.path}/img${round}`, what);
        const n = (await readLines(out)).length;
        await restoreDetached(`${tmp.path}/img${round}`, pid, what);
        await assertRunningFree(pid, what);
        assert.deepEqual(cmdlineOf(pid), cmdline, `${what}: cmdline`);
        await assertCounterGoesOn(out, n, 10, what);
      }
    } finally {
      await killAndReap(pid);
    }
    const text = await Deno.readTextFile(out);
    assert.ok(!text.includes("\0"), "NUL bytes in the output");
    assertConsecutive((await readCounterLines(out)).numbers, `${name}: the whole output`);
  });
}
