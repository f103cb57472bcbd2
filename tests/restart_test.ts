/**
 * Interrupted system calls across a dump and a restore: targets whose
 * threads sit in blocking calls (sleeps, poll, select, futex waits) are
 * dumped (and killed) and restored three times in a row; every call must
 * carry on as if nothing had happened: no EINTR, no other result, no early
 * return, and every thread counting on without a gap.
 * Run with: deno test -A tests/restart_test.ts
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  buildC,
  dumpKill,
  isAlive,
  killAndReap,
  readLines,
  readPart,
  sleep,
  spawnTarget,
  tempDir,
  TESTDATA,
  threadsOf,
} from "./_util.ts";

const ROUNDS = 3;
/** New lines each thread must write after a restore before the next dump. */
const MORE = 3;

/** The threads of testdata/blocking.c, by the name in their lines. */
const C_THREADS = [
  "nanosleep",
  "clockabs",
  "poll",
  "ppoll",
  "select",
  "futex",
  "futexabs",
  "condtimed",
  "signal",
  "condwait",
];
/** The threads of testdata/blocking.py. */
const PY_THREADS = ["sleep", "select", "event"];

// x86-64 syscall numbers of the calls blocking.c blocks in.
const NR_NAMES: Record<number, string> = {
  7: "poll",
  23: "select",
  35: "nanosleep",
  202: "futex",
  230: "clock_nanosleep",
  270: "pselect6",
  271: "ppoll",
};
/** What blocking.c's threads must be caught in, in at least one of the dumps. */
const C_SYSCALLS_CAUGHT: string[][] = [
  ["nanosleep"],
  ["clock_nanosleep"],
  ["poll", "ppoll"], // glibc may implement poll() with ppoll
  ["ppoll"],
  ["select", "pselect6"],
  ["futex"],
];
/** -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK. */
const RESTART_CODES = [-512n, -513n, -514n, -516n];
const RAX = 10 * 8, ORIG_RAX = 15 * 8;

// ---------------------------------------------------------------------------
// helpers

interface BlockingLines {
  /** Per thread name, the N of its "T<name> N ok" lines, in file order. */
  byThread: Map<string, number[]>;
  /** Every line that is not "T<name> N ok". */
  bad: string[];
}

async function readBlocking(file: string): Promise<BlockingLines> {
  const byThread = new Map<string, number[]>();
  const bad: string[] = [];
  for (const line of await readLines(file)) {
    const m = line.match(/^T(\w+) (\d+) ok$/);
    if (!m) {
      bad.push(line);
      continue;
    }
    const list = byThread.get(m[1]) ?? [];
    list.push(Number(m[2]));
    byThread.set(m[1], list);
  }
  return { byThread, bad };
}

/** No EINTR or bad line; exactly the threads `names`, each counting 0, 1, 2, ... */
function assertHealthy(lines: BlockingLines, names: string[], what: string): void {
  assert.deepEqual(lines.bad, [], `${what}: a blocking call misbehaved`);
  assert.deepEqual([...lines.byThread.keys()].sort(), [...names].sort(), `${what}: threads`);
  for (const [name, numbers] of lines.byThread) {
    const i = numbers.findIndex((n, i) => n !== i);
    assert.equal(
      i,
      -1,
      `${what}: thread ${name}: line ${i} is ${numbers[i]}, expected ${i} (around: ${
        numbers.slice(Math.max(0, i - 3), i + 3).join(",")
      })`,
    );
  }
}

/** Waits until every thread of `names` has written `more` lines beyond `before`. */
async function waitProgress(
  file: string,
  names: string[],
  before: Map<string, number[]>,
  more: number,
  what: string,
  timeoutMs = 10_000,
): Promise<BlockingLines> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const lines = await readBlocking(file);
    const behind = names.filter((n) =>
      (lines.byThread.get(n)?.length ?? 0) < (before.get(n)?.length ?? 0) + more
    );
    if (!behind.length || lines.bad.length) return lines;
    if (Date.now() > deadline) {
      assert.fail(`${what}: no progress from thread(s) ${behind.join(", ")} in ${timeoutMs} ms`);
    }
    await sleep(10);
  }
}

/**
 * The syscalls the threads of PID were stopped in, as dumped in `img`: one
 * name per thread whose registers show an interrupted, restartable syscall.
 */
async function interruptedSyscalls(img: string, pid: number): Promise<string[]> {
  const doc = await readPart(img, pid, "threads");
  const out: string[] = [];
  for (const t of doc.body.threads as { regs: Uint8Array }[]) {
    const regs = new DataView(t.regs.buffer, t.regs.byteOffset, t.regs.byteLength);
    const rax = regs.getBigInt64(RAX, true);
    const nr = Number(regs.getBigInt64(ORIG_RAX, true));
    if (nr >= 0 && RESTART_CODES.includes(rax)) out.push(NR_NAMES[nr] ?? `syscall ${nr}`);
  }
  return out;
}

/**
 * ROUNDS times: dump (kill) the process PID, check what it wrote so far,
 * restore it detached, check it is back with the same threads, and wait for
 * every thread to write MORE lines. Returns the syscalls caught per round.
 */
async function dumpRestoreRounds(
  pid: number,
  out: string,
  names: string[],
  tmp: string,
  what: string,
): Promise<string[][]> {
  let lines = await waitProgress(out, names, new Map(), MORE, `${what}: start`, 30_000);
  assertHealthy(lines, names, `${what}: before the first dump`);
  const tids = threadsOf(pid);
  assert.equal(tids.length, names.length + 1, `${what}: threads of ${pid}`);
  const caught: string[][] = [];
  for (let round = 1; round <= ROUNDS; round++) {
    const at = `${what} round ${round}`;
    const img = `${tmp}/img${round}`;
    await dumpKill(pid, [pid], img, at);
    caught.push(await interruptedSyscalls(img, pid));
    const atDump = await readBlocking(out);
    assertHealthy(atDump, names, `${at}: output at the dump`);

    assertExit(await amber(["restore", "-D", img, "-d"]), 0, `${at}: restore -d`);
    assert.ok(isAlive(pid), `${at}: ${pid} is not running after restore -d`);
    assert.deepEqual(threadsOf(pid), tids, `${at}: thread ids`);
    lines = await waitProgress(out, names, atDump.byThread, MORE, at);
    assertHealthy(lines, names, `${at}: after the restore`);
  }
  return caught;
}

// ---------------------------------------------------------------------------
// tests

Deno.test("C threads blocked in sleeps, poll, select, futex: restarted, no EINTR, 3 rounds", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("blocking", ["-pthread"]);
  const out = `${tmp.path}/blocking.txt`;
  const pid = spawnTarget(["setsid", bin, out]).pid;
  let caught: string[][];
  try {
    caught = await dumpRestoreRounds(pid, out, C_THREADS, tmp.path, "blocking.c");
  } finally {
    await killAndReap(pid);
  }
  // The dumps did find the threads inside their calls (each thread spends
  // nearly all its time there): else this test would prove nothing.
  const seen = new Set(caught.flat());
  for (const alternatives of C_SYSCALLS_CAUGHT) {
    assert.ok(
      alternatives.some((s) => seen.has(s)),
      `no thread was caught inside ${alternatives.join("/")} in ${ROUNDS} dumps: ${
        JSON.stringify(caught)
      }`,
    );
  }
  const text = await Deno.readTextFile(out);
  assert.ok(!text.includes("\0"), "NUL bytes in the output");
  assertHealthy(await readBlocking(out), C_THREADS, "the whole output");
});

Deno.test("CPython threads in time.sleep, select.select, Event.wait: alive and counting, 3 rounds", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/blocking-py.txt`;
  const pid = spawnTarget(["setsid", "python3", `${TESTDATA}/blocking.py`, out]).pid;
  try {
    await dumpRestoreRounds(pid, out, PY_THREADS, tmp.path, "blocking.py");
  } finally {
    await killAndReap(pid);
  }
  const text = await Deno.readTextFile(out);
  assert.ok(!text.includes("\0"), "NUL bytes in the output");
  assertHealthy(await readBlocking(out), PY_THREADS, "the whole output");
});
