/**
 * Thread state a program relies on after a restore: pthread_join returns
 * (clear_child_tid), a thread dying with a robust mutex held hands it on
 * as EOWNERDEAD (robust futex list), and real multi-threaded programs
 * dumped mid-work finish with the result of a run never dumped.
 * Run with: deno test -A tests/threads_test.ts
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  buildC,
  commandWorks,
  dumpArgs,
  killAndReap,
  spawnTarget,
  statusField,
  tempDir,
  threadsOf,
  waitForLine,
  waitForLines,
  waitGone,
} from "./_util.ts";

Deno.test("threads are joined after restore; a robust mutex of a dead thread is EOWNERDEAD", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("joiner", ["-pthread"]);
  const out = `${tmp.path}/joiner.txt`, go = `${tmp.path}/go`;
  const { pid, child } = spawnTarget(["setsid", bin, out, go]);
  try {
    await waitForLines(out, 1);
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    await child.status;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    Deno.writeTextFileSync(go, "");
    const lines = await waitForLine(
      out,
      (l) => l.some((x) => x === "PASS" || /FAIL/.test(x)),
      30_000,
    );
    assert.deepEqual(lines, ["ready", "join ok", "robust ok", "PASS"]);
    assert.ok(await waitGone(pid), "the restored joiner did not exit");
  } finally {
    await killAndReap(pid);
  }
});

// ---------------------------------------------------------------------------
// real programs, dumped while their threads work

interface Job {
  argv: string[];
  env?: Record<string, string>;
  /** Threads the process has once its parallel part runs. */
  threads: number;
  /** Whether the job has got into its work (besides having its threads). */
  started?: () => boolean;
  /** The file the job writes, removed before the dumped run. */
  out: string;
  /** What the job leaves behind when it is done. */
  result: () => string;
}

function threadCount(pid: number): number {
  try {
    return [...Deno.readDirSync(`/proc/${pid}/task`)].length;
  } catch {
    return 0;
  }
}

function fileSize(path: string): number {
  try {
    return Deno.statSync(path).size;
  } catch {
    return 0;
  }
}

async function sha256(path: string): Promise<string> {
  const d = await crypto.subtle.digest("SHA-256", await Deno.readFile(path));
  return [...new Uint8Array(d)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Runs the job to its end without amber; returns its result. */
async function runUndumped(job: Job, what: string): Promise<string> {
  const { pid, child } = spawnTarget(["setsid", ...job.argv], { env: job.env });
  try {
    const st = await child.status;
    assert.equal(st.code, 0, `${what}: undumped run exit code`);
    return job.result();
  } finally {
    await killAndReap(pid);
  }
}

/**
 * Runs the job, dumps (and kills) it once its threads work, restores it
 * attached and returns its result once the restored job has exited 0.
 */
async function runDumped(job: Job, img: string, what: string): Promise<string> {
  Deno.removeSync(job.out);
  const { pid, child } = spawnTarget(["setsid", ...job.argv], { env: job.env });
  try {
    const deadline = Date.now() + 60_000;
    while (threadCount(pid) < job.threads || !(job.started?.() ?? true)) {
      assert.ok(Date.now() < deadline, `${what}: never had ${job.threads} threads`);
      await new Promise((r) => setTimeout(r, 2));
    }
    assertExit(await amber(dumpArgs(pid, img)), 0, `${what}: dump`);
    assert.equal((await child.status).signal, "SIGKILL", `${what}: the dump ended the job`);
    assertExit(await amber(["restore", "-D", img]), 0, `${what}: restored job`);
    return job.result();
  } finally {
    await killAndReap(pid);
  }
}

async function assertSameResult(job: Job, dir: string, what: string): Promise<void> {
  const want = await runUndumped(job, what);
  const got = await runDumped(job, `${dir}/img`, what);
  assert.equal(got, want, `${what}: result after dump and restore`);
}

Deno.test("sort --parallel=2 dumped mid-sort finishes with the undumped result", async () => {
  await using tmp = await tempDir();
  const input = `${tmp.path}/in.txt`, out = `${tmp.path}/out.txt`;
  const lines = [];
  let x = 12345;
  for (let i = 0; i < 1_500_000; i++) {
    x = (x * 1103515245 + 12345) % 2147483648;
    lines.push(`${x} ${"x".repeat(x % 20)}`);
  }
  Deno.writeTextFileSync(input, lines.join("\n") + "\n");
  const job: Job = {
    argv: ["sort", "-g", "--parallel=2", "-S", "256M", "-o", out, input],
    threads: 2,
    out,
    result: () => Deno.readTextFileSync(out),
  };
  await assertSameResult(job, tmp.path, "sort");
});

Deno.test("zstd -T2 dumped mid-compression writes the same bytes as an undumped run", async () => {
  if (!(await commandWorks("zstd", "--version"))) throw new Error("zstd is not installed");
  await using tmp = await tempDir();
  const input = `${tmp.path}/in.bin`, out = `${tmp.path}/out.zst`;
  // Random letters: compressible, so every level has work to do.
  const data = new Uint8Array(24 << 20);
  for (let i = 0; i < data.length; i += 65536) crypto.getRandomValues(data.subarray(i, i + 65536));
  for (let i = 0; i < data.length; i++) data[i] = 97 + (data[i] & 15);
  Deno.writeFileSync(input, data);
  const job: Job = {
    argv: ["zstd", "-T2", "-12", "-q", "-f", input, "-o", out],
    threads: 3,
    out,
    started: () => fileSize(out) > 0,
    result: () => String(Deno.statSync(out).size),
  };
  const want = await runUndumped(job, "zstd");
  const wantSha = await sha256(out);
  const got = await runDumped(job, `${tmp.path}/img`, "zstd");
  assert.equal(got, want, "zstd: output size after dump and restore");
  assert.equal(await sha256(out), wantSha, "zstd: output bytes after dump and restore");
});

const NUMPY_JOB = `import numpy as np, sys
rng = np.random.default_rng(5)
a = rng.standard_normal((500, 500)); b = rng.standard_normal((500, 500))
acc = 0.0
for i in range(80):
    a = np.tanh(a @ b)
    acc += float(a.sum())
    if i == 0:
        open(sys.argv[1], "w").write("started\\n")
open(sys.argv[1], "a").write(repr(acc) + "\\n")
`;

Deno.test("numpy on 2 OpenBLAS threads dumped mid-job ends with the undumped result", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/np.txt`;
  const job: Job = {
    // Debian's numpy (python3-numpy) on libopenblas0-pthread.
    argv: ["/usr/bin/python3", "-c", NUMPY_JOB, out],
    env: { OPENBLAS_NUM_THREADS: "2" },
    threads: 2,
    out,
    started: () => fileSize(out) > 0,
    result: () => Deno.readTextFileSync(out),
  };
  const want = await runUndumped(job, "numpy");
  assert.match(want, /^started\n-?\d/, "numpy: the undumped run wrote a number");
  const got = await runDumped(job, `${tmp.path}/img`, "numpy");
  assert.equal(got, want, "numpy: result after dump and restore");
});

// ---------------------------------------------------------------------------
// sleeps end at their deadline

const SLEEP_MS = 6000;
/** How long after the sleeps began the dump starts. */
const DUMP_AFTER_MS = 1500;

Deno.test("a restored 6 s nanosleep ends 6 s after it began, not 6 s after the restore", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("sleeper", ["-pthread"]);
  const out = `${tmp.path}/sleeper.txt`;
  const { pid, child } = spawnTarget(["setsid", bin, out]);
  try {
    const [first] = await waitForLines(out, 1);
    const began = Number(first.split(" ")[1]);
    await new Promise((r) => setTimeout(r, Math.max(0, began + DUMP_AFTER_MS - Date.now())));
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    await child.status;
    assertExit(await amber(["restore", "-D", img]), 0, "restored sleeper");
    const lines = await waitForLines(out, 4);
    assert.equal(lines.at(-1), "done");
    for (const line of lines.slice(1, 3)) {
      const [name, elapsed, rc] = line.split(" ");
      assert.equal(rc, "rc=0", `${name}: result`);
      // Never early; and sooner than a whole new sleep begun at the dump could end.
      assert.ok(Number(elapsed) >= SLEEP_MS, `${name}: ended after ${elapsed} ms`);
      assert.ok(
        Number(elapsed) < SLEEP_MS + DUMP_AFTER_MS,
        `${name}: ended after ${elapsed} ms: slept its whole length again`,
      );
    }
  } finally {
    await killAndReap(pid);
  }
});

// ---------------------------------------------------------------------------
// per-thread credentials

function threadIds(pid: number): string[] {
  return threadsOf(pid).map((tid) =>
    `${tid} uid ${statusField(pid, "Uid", tid)} gid ${statusField(pid, "Gid", tid)}`
  );
}

Deno.test("a thread with other uids and gids than its process keeps them", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("threadcreds", ["-pthread"]);
  const out = `${tmp.path}/creds.txt`, go = `${tmp.path}/go`;
  const { pid, child } = spawnTarget(["setsid", bin, out, go]);
  try {
    await waitForLines(out, 1);
    const before = threadIds(pid);
    assert.equal(new Set(before.map((l) => l.replace(/^\d+ /, ""))).size, 2, "two sets of ids");
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    await child.status;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    assert.deepEqual(threadIds(pid), before, "per-thread uids and gids after restore");
    Deno.writeTextFileSync(go, "");
    assert.deepEqual(await waitForLines(out, 4), [
      "ready",
      "main uid=0 gid=0",
      "other uid=1234 gid=2345",
      "PASS",
    ]);
    assert.ok(await waitGone(pid), "the restored target did not exit");
  } finally {
    await killAndReap(pid);
  }
});
