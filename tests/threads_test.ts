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
  dumpArgs,
  killAndReap,
  readLines,
  readPart,
  sleep,
  spawnTarget,
  statusField,
  tempDir,
  threadsOf,
  until,
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

// sort --parallel=2, zstd -T2 and numpy on OpenBLAS threads, dumped
// mid-work, are in the program matrix (tests/programs_test.ts).

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
// sleeps without a remaining-time buffer end at their deadline too

/** The calls of testdata/deadlines.c, each a relative sleep with no buffer. */
const NO_BUFFER_CALLS = ["usleep", "nano", "mono", "boot", "futex", "poll"];
/** Time between the end of the dump and the restore. */
const GAP_MS = 1000;

/** How many threads of PID the images in DIR give a sleep's time left. */
async function sleepsWithDeadline(dir: string, pid: number): Promise<number> {
  const doc = await readPart(dir, pid, "threads");
  const threads: { sleepLeftNs?: unknown }[] = doc.body.threads;
  return threads.filter((t) => t.sleepLeftNs !== undefined).length;
}

interface DeadlineRun {
  /** Dumps (and kills) the target into `img`, some time into its sleeps. */
  freeze(pid: number, img: string): Promise<void>;
  /** Each call's length. */
  sleepMs: number;
  /** A SIGUSR1 for the usleep thread is pending in the images. */
  signalled?: boolean;
}

/**
 * Runs testdata/deadlines.c, freezes it, waits GAP_MS and restores it;
 * checks each call ended, never early, at its own deadline: sooner than
 * a whole new sleep begun at the restore could end. A signalled usleep
 * takes its signal once, and its call is re-run (no EINTR) but not cut
 * short: the handler ran before the call could read a new timeout.
 */
async function deadlinesAcross({ freeze, sleepMs, signalled = false }: DeadlineRun) {
  await using tmp = await tempDir();
  const bin = await buildC("deadlines", ["-pthread"]);
  const out = `${tmp.path}/deadlines.txt`;
  const { pid, child } = spawnTarget(["setsid", bin, out, String(sleepMs / 1000)]);
  try {
    const [first] = await waitForLines(out, 1);
    const began = Number(first.split(" ")[1]);
    const img = `${tmp.path}/img`;
    await freeze(pid, img);
    await child.status;
    assert.equal(await sleepsWithDeadline(img, pid), NO_BUFFER_CALLS.length, "deadlines seen");
    await sleep(GAP_MS);
    const restoredAt = Date.now();
    assertExit(await amber(["restore", "-D", img]), 0, "restored deadlines");
    const lines = await readLines(out);
    assert.equal(lines.at(-1), `done usr1=${signalled ? 1 : 0}`, lines.join("\n"));
    const calls = lines.slice(1, -1).map((l) => l.split(" "));
    assert.deepEqual(calls.map(([name]) => name).sort(), [...NO_BUFFER_CALLS].sort());
    for (const [name, start, elapsed, rc] of calls) {
      assert.equal(rc, name === "futex" ? "rc=-110" : "rc=0", `${name}: result`);
      assert.ok(Number(start) - began < 1000, `${name}: began ${Number(start) - began} ms late`);
      // Never early, by the call's own clock.
      assert.ok(Number(elapsed) >= sleepMs, `${name}: ended after ${elapsed} ms`);
      if (signalled && name === "usleep") continue;
      const end = Number(start) + Number(elapsed);
      assert.ok(
        end < restoredAt + sleepMs,
        `${name}: ended ${end - restoredAt} ms into the restore: slept its whole length again`,
      );
    }
  } finally {
    await killAndReap(pid);
  }
}

Deno.test("restored sleeps without a buffer (usleep, nanosleep, clock_nanosleep, futex, poll) end at their deadline", async () => {
  await deadlinesAcross({
    sleepMs: 3000,
    freeze: async (pid, img) => {
      await sleep(1000);
      assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    },
  });
});

Deno.test("sleeps without a buffer end at their deadline through restart_syscall (after a dump -R)", async () => {
  await deadlinesAcross({
    sleepMs: 3000,
    freeze: async (pid, img) => {
      await sleep(500);
      assertExit(await amber(dumpArgs(pid, `${img}-R`, "-R")), 0, "dump -R");
      await sleep(500);
      const restarting = threadsOf(pid).filter((tid) =>
        Deno.readTextFileSync(`/proc/${pid}/task/${tid}/syscall`).startsWith("219 ")
      );
      assert.equal(restarting.length, NO_BUFFER_CALLS.length, "threads in restart_syscall");
      assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    },
  });
});

Deno.test("a signal pending at restore for a thread in a sleep without a buffer is taken once, the sleep not cut short", async () => {
  await deadlinesAcross({
    // Long enough for the deadline to be ahead at the restore, after the 2 s pause.
    sleepMs: 8000,
    signalled: true,
    freeze: async (pid, img) => {
      await sleep(1000);
      const dump = amber(dumpArgs(pid, img), { AMBER_TEST_FAULT: "after-freeze:pause" });
      await until(
        () => threadsOf(pid).every((tid) => statusField(pid, "State", tid).startsWith("t")),
        "the dump froze no thread",
        30_000,
      );
      Deno.kill(pid, "SIGUSR1");
      assertExit(await dump, 0, "dump");
    },
  });
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
