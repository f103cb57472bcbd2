/**
 * Shared helpers for amber's tests: building and starting the target programs
 * of testdata/, running the amber CLI, and reading what targets write.
 *
 * Importing this module makes the test process a child subreaper
 * (PR_SET_CHILD_SUBREAPER), so orphaned targets (the children of a killed
 * tree, a tree restored by a `restore -d` that has exited) become our
 * children and are reaped promptly here instead of by pid 1 seconds later.
 * It goes through ffi/, like every FFI call of the project.
 */
import assert from "node:assert/strict";
import { decode, Encoder } from "cbor-x";
import { lastErrno, libc, SysError } from "../ffi/libc.ts";
import { waitpid, WALL, WNOHANG } from "../ffi/ptrace.ts";
import { type MapsEntry, parseMaps } from "../lib/proc/maps.ts";

export type { MapsEntry };

/** The repository root (the parent of tests/). */
export const ROOT: string = new URL("..", import.meta.url).pathname.replace(/\/$/, "");
export const TESTDATA = `${ROOT}/testdata`;
export const BUILD_DIR = `${ROOT}/.build`;
export const DENO = `${ROOT}/node_modules/.bin/deno`;
export const CLI = `${ROOT}/cli.ts`;

// ---------------------------------------------------------------------------
// Subreaper and waitpid, through amber's own FFI layer.

const PR_SET_CHILD_SUBREAPER = 36;

if (libc().prctl(PR_SET_CHILD_SUBREAPER, 1n, 0n, 0n, 0n) !== 0) {
  throw new Error(`prctl(PR_SET_CHILD_SUBREAPER) failed, errno ${lastErrno()}`);
}

/** Children Deno started that tests wait for by pid (spawnTarget, trackChild): Deno reaps them. */
const denoChildren = new Map<number, Deno.ChildProcess>();

/**
 * Lets waitGone, killAndReap and killTree take the pid of a child started
 * with Deno.Command(...).spawn(): they then wait for its child.status
 * instead of reaping it, which would make Deno's own wait fail (ECHILD).
 */
export function trackChild(child: Deno.ChildProcess): void {
  denoChildren.set(child.pid, child);
  // Once Deno has reaped it, the pid is no longer its child: a restored
  // process may come back with it, ours to reap as the subreaper.
  child.status.then(() => {
    if (denoChildren.get(child.pid) === child) denoChildren.delete(child.pid);
  }, () => {});
}

/**
 * waitpid(pid, WNOHANG | __WALL) on a process Deno did not start. Returns
 * the pid once reaped, 0 if it is still running, -1 if it is not our child.
 */
function waitpidNoHang(pid: number): number {
  try {
    return waitpid(pid, WNOHANG | WALL) ? pid : 0;
  } catch (e) {
    if (e instanceof SysError && e.code === "ECHILD") return -1;
    throw e;
  }
}

/** Our own children (any thread's), read from /proc/self/task/TID/children. */
export function ownChildren(): number[] {
  return childrenOf(Deno.pid);
}

/**
 * Reaps those of `pids` that are zombie children of the test process
 * (orphans handed to us as subreaper, restored processes) and returns
 * them. Only pids a test names, the processes of its target trees, never
 * "every zombie": a child Deno started itself (amber, a pipeline's bash,
 * gcc) is a zombie of ours for a moment too, and reaping it makes Deno's
 * own wait for it fail with ECHILD ("No child processes"), thrown where
 * nobody catches it; nothing here tells such a child from an orphan
 * (Deno.Command(...).output() shows no pid).
 */
export function reapZombies(pids: number[]): number[] {
  const reaped: number[] = [];
  for (const pid of new Set(pids)) {
    if (denoChildren.has(pid) || procState(pid) !== "Z") continue;
    if (waitpidNoHang(pid) === pid) reaped.push(pid);
  }
  return reaped;
}

// ---------------------------------------------------------------------------
// /proc

/** The state letter of /proc/PID/stat (R, S, D, T, t, Z, X, ...), or null if gone. */
export function procState(pid: number): string | null {
  let stat: string;
  try {
    stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  } catch {
    return null;
  }
  const close = stat.lastIndexOf(")");
  return stat.slice(close + 2, close + 3) || null;
}

/** True while PID exists and is not a zombie. */
export function isAlive(pid: number): boolean {
  const s = procState(pid);
  return s !== null && s !== "Z" && s !== "X" && s !== "x";
}

/** Field of /proc/PID/stat after the comm: index 0 is state, 1 ppid, 2 pgrp, 3 session. */
export function procStatFields(pid: number): string[] {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  return stat.slice(stat.lastIndexOf(")") + 2).trim().split(" ");
}

/** The direct children of PID, over all its threads. */
export function childrenOf(pid: number): number[] {
  const out: number[] = [];
  let tasks: Deno.DirEntry[];
  try {
    tasks = [...Deno.readDirSync(`/proc/${pid}/task`)];
  } catch {
    return out;
  }
  for (const t of tasks) {
    try {
      const text = Deno.readTextFileSync(`/proc/${pid}/task/${t.name}/children`).trim();
      if (text) out.push(...text.split(/\s+/).map(Number));
    } catch {
      // the thread exited meanwhile
    }
  }
  return out.sort((a, b) => a - b);
}

/** PID and all its descendants, parents before children. */
export function descendants(pid: number): number[] {
  const out = [pid];
  for (let i = 0; i < out.length; i++) out.push(...childrenOf(out[i]));
  return out;
}

/** Thread ids of PID, sorted. */
export function threadsOf(pid: number): number[] {
  return [...Deno.readDirSync(`/proc/${pid}/task`)].map((e) => Number(e.name)).sort((a, b) =>
    a - b
  );
}

/** Parses /proc/PID/maps (with amber's own parser, lib/proc/maps.ts). */
export function procMaps(pid: number): MapsEntry[] {
  return parseMaps(Deno.readTextFileSync(`/proc/${pid}/maps`));
}

/** A field of /proc/PID/status in bytes for "kB" fields (VmSize, RssAnon, ...), else as number. */
export function procStatus(pid: number, field: string): number {
  const text = Deno.readTextFileSync(`/proc/${pid}/status`);
  const m = text.match(new RegExp(`^${field}:\\s+(\\d+)(\\s+kB)?`, "m"));
  if (!m) throw new Error(`no ${field} in /proc/${pid}/status`);
  return Number(m[1]) * (m[2] ? 1024 : 1);
}

/** A pid that does not exist right now (searched down from pid_max). */
export function unusedPid(): number {
  const max = Number(Deno.readTextFileSync("/proc/sys/kernel/pid_max").trim());
  for (let pid = max - 1; pid > 300; pid--) {
    try {
      Deno.statSync(`/proc/${pid}`);
    } catch {
      return pid;
    }
  }
  throw new Error("no free pid found");
}

/** A field of /proc/PID/task/TID/status as text ("State", "TracerPid", ...). */
export function statusField(pid: number, name: string, tid = pid): string {
  const text = Deno.readTextFileSync(`/proc/${pid}/task/${tid}/status`);
  const m = text.match(new RegExp(`^${name}:\\s*(.*)$`, "m"));
  if (!m) throw new Error(`no ${name} in /proc/${pid}/task/${tid}/status`);
  return m[1].trim();
}

/** The open fds of PID, sorted. */
export function openFds(pid: number): number[] {
  return [...Deno.readDirSync(`/proc/${pid}/fd`)].map((e) => Number(e.name)).sort((a, b) => a - b);
}

/** Our children, each with its state, for comparing before/after a restore. */
export function childrenWithState(): string[] {
  // Only whether a child is a zombie: R and S alternate in any running child.
  return ownChildren().map((p) => `${p}:${procState(p) === "Z" ? "zombie" : "alive"}`);
}

/** PID and its descendants whose name (/proc/PID/comm) is `name`; those gone meanwhile left out. */
export function processesNamed(pid: number, name: string): number[] {
  return descendants(pid).filter((p) => {
    try {
      return Deno.readTextFileSync(`/proc/${p}/comm`).trim() === name;
    } catch {
      return false; // gone meanwhile
    }
  });
}

// ---------------------------------------------------------------------------
// building and starting targets

/** Flags each testdata program needs at link time. */
const LINK_FLAGS: Record<string, string[]> = {
  threads: ["-pthread"],
  sweeper: ["-pthread"],
  dynlib: ["-lm", "-lz", "-lcrypt"],
};

async function mtime(path: string): Promise<number | null> {
  try {
    return (await Deno.stat(path)).mtime?.getTime() ?? null;
  } catch {
    return null;
  }
}

/**
 * Compiles testdata/NAME.c into .build/NAME (with extra flags:
 * .build/NAME-<hash of the flags>) unless an up-to-date build exists, and
 * returns the binary's absolute path.
 */
export async function buildC(name: string, extraFlags: string[] = []): Promise<string> {
  const src = `${TESTDATA}/${name}.c`;
  let out = `${BUILD_DIR}/${name}`;
  if (extraFlags.length) {
    const digest = await crypto.subtle.digest(
      "SHA-256",
      new TextEncoder().encode(extraFlags.join("\0")),
    );
    const hex = [...new Uint8Array(digest)].slice(0, 4).map((b) => b.toString(16).padStart(2, "0"))
      .join("");
    out = `${out}-${hex}`;
  }
  const srcTime = await mtime(src);
  if (srcTime === null) throw new Error(`no such target source: ${src}`);
  const outTime = await mtime(out);
  if (outTime !== null && outTime >= srcTime) return out;

  await Deno.mkdir(BUILD_DIR, { recursive: true });
  const tmp = `${out}.tmp-${Deno.pid}`;
  const args = [
    "-O2",
    "-g",
    "-Wall",
    "-Wextra",
    "-o",
    tmp,
    src,
    ...(LINK_FLAGS[name] ?? []),
    ...extraFlags,
  ];
  const r = await new Deno.Command("gcc", { args, stdout: "piped", stderr: "piped" }).output();
  if (!r.success) {
    await Deno.remove(tmp).catch(() => {});
    throw new Error(`gcc ${args.join(" ")} failed:\n${new TextDecoder().decode(r.stderr)}`);
  }
  await Deno.rename(tmp, out);
  return out;
}

/** Path of the Python target. */
export const COUNTER_PY = `${TESTDATA}/counter.py`;

export interface SpawnOptions {
  cwd?: string;
  env?: Record<string, string>;
}

export interface Target {
  pid: number;
  child: Deno.ChildProcess;
}

/**
 * Closes every fd above 2, then execs "$@" (same pid). The test process may
 * have inherited stray fds from whatever started it (a pipe on fd 251, say);
 * Deno passes those on to its children, and a target holding one could not
 * be dumped. bash, not dash: dash's redirections take one-digit fds only.
 */
export const CLOSE_FDS_AND_EXEC = "for f in /proc/$$/fd/*; do n=${f##*/}; " +
  '[ "$n" -gt 2 ] && eval "exec $n>&-"; done; exec "$@"';

/**
 * Starts argv[0] with argv[1..], all stdio on /dev/null and no other fd open
 * (through a bash that execs it: the pid is the target's). Kill it with
 * killAndReap(pid) (or killTree) before the test ends: Deno's sanitizer
 * fails a test that leaves a child process behind.
 */
export function spawnTarget(argv: string[], opts: SpawnOptions = {}): Target {
  const child = new Deno.Command("/bin/bash", {
    args: ["-c", CLOSE_FDS_AND_EXEC, "amber-target", ...argv],
    stdin: "null",
    stdout: "null",
    stderr: "null",
    cwd: opts.cwd,
    env: opts.env,
  }).spawn();
  trackChild(child);
  return { pid: child.pid, child };
}

/**
 * Waits for PID to end (without killing it) and reaps it if it is ours.
 * Returns true once gone, false on timeout. A zombie whose parent is not us
 * counts as gone.
 */
export async function waitGone(pid: number, timeoutMs = 10_000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  const child = denoChildren.get(pid);
  if (child) {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<false>((resolve) => {
      timer = setTimeout(() => resolve(false), timeoutMs);
    });
    try {
      const done = await Promise.race([child.status.then(() => true), timeout]);
      if (done) denoChildren.delete(pid);
      return done;
    } finally {
      clearTimeout(timer);
    }
  }
  for (;;) {
    const r = waitpidNoHang(pid);
    if (r === pid) return true;
    if (r < 0) {
      // Not our child: done once it is a zombie of someone else, or gone.
      if (!isAlive(pid)) return true;
    }
    if (Date.now() > deadline) return false;
    await sleep(5);
  }
}

/**
 * SIGKILLs PID (if still there) and waits until it is reaped, and reaps
 * those of its children that had ended already (orphaned, they are ours).
 */
export async function killAndReap(pid: number): Promise<void> {
  const children = childrenOf(pid);
  try {
    Deno.kill(pid, "SIGKILL");
  } catch {
    // already gone (or a zombie)
  }
  if (!(await waitGone(pid))) throw new Error(`process ${pid} did not go away after SIGKILL`);
  reapZombies(children);
}

/**
 * SIGKILLs PID and every descendant (collected first), then reaps them all:
 * children left behind are reparented to us, the subreaper.
 */
export async function killTree(pid: number): Promise<void> {
  const pids = descendants(pid);
  for (const p of pids) {
    try {
      Deno.kill(p, "SIGKILL");
    } catch {
      // gone
    }
  }
  for (const p of pids) await killAndReap(p);
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `get` every 10 ms until it returns (or resolves to) something other than undefined. */
export async function waitFor<T>(
  get: () => T | undefined | Promise<T | undefined>,
  what: string | (() => string),
  timeoutMs = 10_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await get();
    if (v !== undefined) return v;
    if (Date.now() > deadline) {
      assert.fail(`${typeof what === "string" ? what : what()} (after ${timeoutMs} ms)`);
    }
    await sleep(10);
  }
}

/** Polls `pred` every 10 ms until it holds; fails with `what` after timeoutMs. */
export async function until(
  pred: () => boolean,
  what: string | (() => string),
  timeoutMs = 10_000,
): Promise<void> {
  await waitFor(() => (pred() ? true : undefined), what, timeoutMs);
}

/** Reaps those of `pids` that are ours until none exists any more (not even as a zombie). */
export async function waitVanished(pids: number[], timeoutMs = 10_000): Promise<void> {
  await until(
    () => {
      reapZombies(pids);
      return pids.every((p) => procState(p) === null);
    },
    () =>
      `still there: ${
        pids.filter((p) => procState(p) !== null).map((p) => `${p} (${procState(p)})`).join(" ")
      }`,
    timeoutMs,
  );
}

/** Whether `cmd ARGS...` can be run and exits 0 (to see if a tool is installed). */
/** A free TCP port on 127.0.0.1 (asked of the kernel, then released). */
export function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

export async function commandWorks(cmd: string, ...args: string[]): Promise<boolean> {
  return await new Deno.Command(cmd, { args, stdout: "null", stderr: "null" })
    .output().then((r) => r.success, () => false);
}

// ---------------------------------------------------------------------------
// reading what targets write

function completeLines(text: string): string[] {
  const end = text.lastIndexOf("\n");
  return end < 0 ? [] : text.slice(0, end).split("\n");
}

/** The complete lines (ending in "\n") of FILE; [] if it does not exist yet. */
export async function readLines(file: string): Promise<string[]> {
  try {
    return completeLines(await Deno.readTextFile(file));
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return [];
    throw e;
  }
}

/** Polls FILE until it has at least N complete lines; returns them. Throws on timeout. */
export async function waitForLines(file: string, n: number, timeoutMs = 10_000): Promise<string[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const lines = await readLines(file);
    if (lines.length >= n) return lines;
    if (Date.now() > deadline) {
      throw new Error(`${file}: ${lines.length} lines after ${timeoutMs} ms, wanted ${n}`);
    }
    await sleep(10);
  }
}

/** Polls until `pred(lines)` holds for FILE's complete lines; returns them. */
export async function waitForLine(
  file: string,
  pred: (lines: string[]) => boolean,
  timeoutMs = 10_000,
): Promise<string[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const lines = await readLines(file);
    if (pred(lines)) return lines;
    if (Date.now() > deadline) {
      throw new Error(
        `${file}: condition not met after ${timeoutMs} ms; last lines: ${
          JSON.stringify(lines.slice(-5))
        }`,
      );
    }
    await sleep(10);
  }
}

export interface CounterLines {
  /** Every complete line. */
  lines: string[];
  /** The leading numbers of the lines that start with one ("N" or "N checksum"). */
  numbers: number[];
  /** The lines that do not start with a number ("check ok", "BAD 12", ...). */
  other: string[];
}

/** Reads a counter-style file (counter.c, tree.c, dynlib.c, counter.py). */
export async function readCounterLines(file: string): Promise<CounterLines> {
  const lines = await readLines(file);
  const numbers: number[] = [];
  const other: string[] = [];
  for (const line of lines) {
    const m = line.match(/^(\d+)(\s|$)/);
    if (m) numbers.push(Number(m[1]));
    else other.push(line);
  }
  return { lines, numbers, other };
}

/** Asserts numbers are 0, 1, 2, ... with no gap or repeat. */
export function assertConsecutive(numbers: number[], what = "counter"): void {
  for (let i = 0; i < numbers.length; i++) {
    if (numbers[i] !== i) {
      assert.fail(
        `${what}: line ${i} is ${numbers[i]}, expected ${i} (around: ${
          numbers.slice(Math.max(0, i - 3), i + 3).join(",")
        })`,
      );
    }
  }
}

/** Per thread index, the counters of threads.c's "T<i> N" lines. */
export async function readThreadLines(file: string): Promise<Map<number, number[]>> {
  const byThread = new Map<number, number[]>();
  for (const line of await readLines(file)) {
    const m = line.match(/^T(\d+) (\d+)$/);
    if (!m) throw new Error(`${file}: unexpected line ${JSON.stringify(line)}`);
    const list = byThread.get(Number(m[1])) ?? [];
    list.push(Number(m[2]));
    byThread.set(Number(m[1]), list);
  }
  return byThread;
}

/**
 * The counter file OUT holds 0, 1, 2, ... and, besides, exactly the lines
 * `other` (in that order).
 */
export async function assertCounterFile(
  out: string,
  what: string,
  other: string[] = [],
): Promise<CounterLines> {
  const c = await readCounterLines(out);
  assert.deepEqual(c.other, other, `${what}: lines besides the counter`);
  assertConsecutive(c.numbers, what);
  return c;
}

/**
 * Waits until the counter file OUT has `more` lines beyond its first `n`,
 * then asserts it as assertCounterFile does.
 */
export async function assertCounterGoesOn(
  out: string,
  n: number,
  more: number,
  what: string,
  other: string[] = [],
): Promise<CounterLines> {
  await waitForLines(out, n + more);
  return await assertCounterFile(out, what, other);
}

// ---------------------------------------------------------------------------
// starting targets and waiting until they write

/** A target writing to a file. */
export interface Writer extends Target {
  out: string;
}

/**
 * spawnTarget(argv), then waits until OUT has `lines` complete lines; kills
 * the target if that times out.
 */
export async function startWriter(
  argv: string[],
  out: string,
  lines: number,
  timeoutMs = 10_000,
): Promise<Writer> {
  const target = spawnTarget(argv);
  try {
    await waitForLines(out, lines, timeoutMs);
  } catch (e) {
    await killAndReap(target.pid);
    throw e;
  }
  return { ...target, out };
}

/** Waits for `more` further lines, asks for a memory check, and checks everything written. */
/**
 * Asks a self-checking target (SIGUSR1: testdata/dirtier.c, sweeper.c...)
 * for a memory check, by `pid` (default its own: a migrated one has
 * another), and asserts every check it wrote so far said "check ok".
 */
/** Sends `signal` and waits for the line it makes the process write (`what ok` or `what BAD...`). */
export async function ask(
  pid: number,
  out: string,
  signal: Deno.Signal,
  what: string,
): Promise<string> {
  const seen = (ls: string[]) => ls.filter((l) => l.startsWith(`${what} `)).length;
  const before = seen(await readLines(out));
  Deno.kill(pid, signal);
  const lines = await waitForLine(out, (ls) => seen(ls) > before, 60_000);
  return lines.filter((l) => l.startsWith(`${what} `)).at(-1)!;
}

export async function assertChecksOk(w: Writer, what: string, pid = w.pid): Promise<void> {
  const before = (await readLines(w.out)).filter((l) => l.startsWith("check")).length;
  Deno.kill(pid, "SIGUSR1");
  const lines = await waitForLine(
    w.out,
    (ls) => ls.filter((l) => l.startsWith("check")).length > before,
  );
  const checks = lines.filter((l) => l.startsWith("check"));
  assert.deepEqual(checks, Array(checks.length).fill("check ok"), `${what}: ${checks.at(-1)}`);
}

export async function assertCounterHealthy(c: Writer, more = 10): Promise<void> {
  assert.ok(isAlive(c.pid), `counter ${c.pid} is not running`);
  const now = (await readLines(c.out)).length;
  await waitForLines(c.out, now + more);
  const checks = (await readCounterLines(c.out)).other.length;
  Deno.kill(c.pid, "SIGUSR1");
  await waitForLine(c.out, (lines) => lines.filter((l) => l.startsWith("check")).length > checks);
  await assertCounterFile(c.out, "memory check after the dump", Array(checks + 1).fill("check ok"));
}

/**
 * Starts testdata/counter.c filling `mib` MiB, in its own session, writing
 * DIR/counter.txt; returns once it writes (it opens the file only after the
 * memory is filled).
 */
export async function startCounter(dir: string, mib: number): Promise<Writer> {
  const bin = await buildC("counter");
  const out = `${dir}/counter.txt`;
  return await startWriter([bin, out, String(mib), "--setsid"], out, 3);
}

/**
 * Starts testdata/threads.c with `nthreads` counting threads, in its own
 * session, writing DIR/threads.txt; returns once each thread has written a
 * few lines, with the thread ids (checked: the main thread and `nthreads`).
 */
export async function startThreads(
  dir: string,
  nthreads: number,
): Promise<Writer & { tids: number[] }> {
  const bin = await buildC("threads");
  const out = `${dir}/threads.txt`;
  const t = await startWriter(["setsid", bin, out, String(nthreads)], out, nthreads * 3);
  try {
    const tids = threadsOf(t.pid);
    assert.equal(tids.length, nthreads + 1);
    return { ...t, tids };
  } catch (e) {
    await killAndReap(t.pid);
    throw e;
  }
}

/** Starts testdata/dynlib.c in its own session, writing DIR/dynlib.txt; returns once it writes. */
export async function startDynlib(dir: string): Promise<Writer> {
  const bin = await buildC("dynlib");
  const out = `${dir}/dynlib.txt`;
  return await startWriter(["setsid", bin, out], out, 3);
}

/** Starts testdata/counter.py in its own session, writing DIR/py.txt; returns once it writes. */
export function startPyCounter(dir: string): Promise<Writer> {
  const out = `${dir}/py.txt`;
  return startWriter(["setsid", "python3", COUNTER_PY, out], out, 3, 30_000);
}

/** counter.py's lines "N checksum": each checksum is 2 more than the one before. */
export function assertPyChecksums(lines: string[]): void {
  const sums = lines.map((l) => BigInt(l.split(" ")[1]));
  for (let i = 1; i < sums.length; i++) assert.equal(sums[i] - sums[i - 1], 2n, `checksum ${i}`);
}

/** Shape of the tree testdata/tree.c makes: depth 2, 2 children each. */
export const TREE_DEPTH = 2, TREE_WIDTH = 2;

/**
 * Starts testdata/tree.c (root in its own session) in `outDir` and waits
 * until every process writes. `onStart` gets the root at once, so that a
 * failing start can still be cleaned up. Returns all pids, root first.
 */
export async function startTree(
  outDir: string,
  onStart: (root: number) => void,
  depth = TREE_DEPTH,
  width = TREE_WIDTH,
): Promise<number[]> {
  const bin = await buildC("tree");
  let count = 1;
  for (let level = 1, n = 1; level <= depth; level++) count += n *= width;
  await Deno.mkdir(outDir);
  const root = spawnTarget([bin, outDir, String(depth), String(width), "--setsid"]).pid;
  onStart(root);
  // Every process writes its own PID.txt once its children are forked.
  const deadline = Date.now() + 10_000 + count * 100;
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

/**
 * Starts a tree (startTree) in DIR/out, runs `body` on it, and then, whatever
 * happened, kills the tree and waits until all its processes are gone.
 */
export async function withTree(
  dir: string,
  body: (root: number, pids: number[], outDir: string) => Promise<void>,
): Promise<void> {
  const outDir = `${dir}/out`;
  let root = 0;
  let pids: number[] = [];
  try {
    pids = await startTree(outDir, (r) => root = r);
    await body(root, pids, outDir);
  } finally {
    if (root) await killTree(root);
    await waitVanished(pids);
  }
}

// ---------------------------------------------------------------------------
// running amber

export interface AmberResult {
  code: number;
  stdout: string;
  stderr: string;
}

async function run(
  cmd: string,
  args: string[],
  env: Record<string, string>,
  timeoutMs: number,
): Promise<AmberResult> {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  try {
    const r = await new Deno.Command(cmd, {
      args,
      cwd: ROOT,
      env: { NO_COLOR: "1", ...env },
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
 * Runs `deno run -A cli.ts ...args` with the environment plus `env`; kills it
 * after timeoutMs (default 120 s).
 */
export function amber(
  args: string[],
  env: Record<string, string> = {},
  timeoutMs = 120_000,
): Promise<AmberResult> {
  return run(DENO, ["run", "-A", CLI, ...args], env, timeoutMs);
}

/** Runs amber like amber(), through `prefix` (`nsenter --net=... --`, `env ...`), which execs it. */
export function amberVia(
  prefix: string[],
  args: string[],
  timeoutMs = 120_000,
): Promise<AmberResult> {
  return run(prefix[0], [...prefix.slice(1), DENO, "run", "-A", CLI, ...args], {}, timeoutMs);
}

/** amber started in the background, its stderr collected line by line. */
export interface Background {
  child: Deno.ChildProcess;
  lines: string[];
  done: Promise<Deno.CommandStatus>;
  waitLine(re: RegExp, timeoutMs?: number): Promise<string>;
}

/** amber ARGS started in the background (after `prefix`, e.g. nsenter), with `env`. */
export function amberInBackground(
  args: string[],
  prefix: string[] = [],
  env: Record<string, string> = {},
): Background {
  const argv = [...prefix, DENO, "run", "-A", CLI, ...args];
  const child = new Deno.Command(argv[0], {
    args: argv.slice(1),
    cwd: ROOT,
    env: { NO_COLOR: "1", ...env },
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const lines: string[] = [];
  const reading = (async () => {
    let rest = "";
    for await (const chunk of child.stderr.pipeThrough(new TextDecoderStream())) {
      rest += chunk;
      const parts = rest.split("\n");
      rest = parts.pop()!;
      lines.push(...parts);
    }
    if (rest) lines.push(rest);
  })();
  const done = reading.then(() => child.status);
  return {
    child,
    lines,
    done,
    async waitLine(re, timeoutMs = 120_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const hit = lines.find((l) => re.test(l));
        if (hit) return hit;
        assert.ok(Date.now() < deadline, `no line like ${re}:\n${lines.join("\n")}`);
        await new Promise((r) => setTimeout(r, 5));
      }
    },
  };
}

/**
 * Runs amber like amber(), from a bash that first runs the shell command
 * `setup` (opening an fd, raising a limit, ...) and then execs amber.
 */
export function amberAfter(
  setup: string,
  args: string[],
  timeoutMs = 120_000,
): Promise<AmberResult> {
  const argv = ["-c", `${setup}; exec "$@"`, "amber", DENO, "run", "-A", CLI, ...args];
  return run("/bin/bash", argv, {}, timeoutMs);
}

/** Asserts an amber run exited with `code`, showing its output if not. */
export function assertExit(r: AmberResult, code: number, what = "amber"): void {
  assert.equal(
    r.code,
    code,
    `${what}: exit ${r.code}, expected ${code}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`,
  );
}

/**
 * An amber run that failed with `code` and one line "amber: ..." on stderr;
 * returns that line.
 */
export function assertOneLineError(r: AmberResult, code: number, what: string): string {
  assertExit(r, code, what);
  const msg = r.stderr.trim();
  assert.match(msg, /^amber: /, `${what}: ${r.stderr}`);
  assert.equal(msg.split("\n").length, 1, `${what}: one line expected: ${r.stderr}`);
  return msg;
}

/** The arguments of `amber dump -t PID -D DIR ...extra`. */
export function dumpArgs(pid: number, dir: string, ...extra: string[]): string[] {
  return ["dump", "-t", String(pid), "-D", dir, ...extra];
}

/**
 * `amber dump` (without -R) of the tree of `root`, whose processes are
 * `pids`: checks they all end, and reaps them, so their pids are free.
 */
export async function dumpKill(
  root: number,
  pids: number[],
  img: string,
  what: string,
  ...extra: string[]
): Promise<void> {
  assertExit(await amber(dumpArgs(root, img, ...extra)), 0, `${what}: dump`);
  await waitVanished(pids);
}

/** comm of the restore helper (amber-restore-helper, cut to 15 characters). */
export const HELPER_COMM = "amber-restore-h";

/**
 * Restore helpers among the test process's descendants: a helper left by an
 * amber run (its child) would be reparented to us, the subreaper. (Not
 * system-wide: other amber runs on the machine are none of our business.)
 */
export function helperProcesses(): number[] {
  return processesNamed(Deno.pid, HELPER_COMM);
}

/** No restore helper among `helpers` (by default: helperProcesses()). */
export function assertNoHelper(what: string, helpers = helperProcesses()): void {
  // A helper amber killed and left unreaped (it is ours as subreaper) runs no more: reaped here,
  // safely (amber started it, not Deno).
  const reaped = new Set(reapZombies(helpers));
  const described = helpers.filter((p) => !reaped.has(p)).map((p) => {
    try {
      return `${p} (state ${procState(p)}, ppid ${procStatFields(p)[1]})`;
    } catch {
      return `${p} (gone)`;
    }
  });
  assert.deepEqual(described, [], `${what}: a restore helper is still running`);
}

/**
 * After a failed amber run: our children (with their states) are those of
 * `before` (childrenWithState()), and no restore helper is left.
 */
export function assertLeftNothing(before: string[], what: string): void {
  assert.deepEqual(childrenWithState(), before, `${what}: children left behind`);
  assertNoHelper(what);
}

/**
 * Every thread of PID runs freely: not traced (TracerPid 0) and not stopped
 * (state S or R; a short D, e.g. inside write(2), is waited out).
 */
export async function assertRunningFree(pid: number, what: string): Promise<void> {
  for (const tid of threadsOf(pid)) {
    let state = "";
    for (let i = 0; i < 100; i++) {
      state = statusField(pid, "State", tid)[0];
      if (state !== "D") break;
      await sleep(10);
    }
    assert.ok(
      state === "S" || state === "R",
      `${what}: thread ${tid} of ${pid} is in state ${state}`,
    );
    assert.equal(
      statusField(pid, "TracerPid", tid),
      "0",
      `${what}: thread ${tid} of ${pid} is traced`,
    );
  }
}

// ---------------------------------------------------------------------------
// reading `amber show --json` defensively

// deno-lint-ignore no-explicit-any
export type Json = any;

/** Runs `amber show DIR --json` and parses it. */
export async function showJson(dir: string): Promise<Json> {
  const r = await amber(["show", dir, "--json"]);
  assertExit(r, 0, "show --json");
  return JSON.parse(r.stdout);
}

/** The process list of a show document. */
export function processesOf(doc: Json): Json[] {
  const list = doc?.processes ?? doc?.pstree?.processes ?? doc?.tree;
  if (!Array.isArray(list)) throw new Error(`no process list in show --json: ${keysOf(doc)}`);
  return list;
}

function keysOf(v: Json): string {
  return v && typeof v === "object" ? Object.keys(v).join(",") : String(v);
}

/** Reads `name` from a process object, looking into `entry` and `parts` too. */
export function field(proc: Json, ...names: string[]): Json {
  for (const scope of [proc, proc?.entry, proc?.parts, proc?.core]) {
    if (!scope || typeof scope !== "object") continue;
    for (const n of names) if (scope[n] !== undefined) return scope[n];
  }
  return undefined;
}

export function pidOf(proc: Json): number {
  const pid = field(proc, "pid");
  if (typeof pid !== "number") throw new Error(`process without pid: ${keysOf(proc)}`);
  return pid;
}

/** Parses an address written as "0x..." string, decimal string or number. */
export function addr(v: Json): bigint {
  if (typeof v === "bigint") return v;
  if (typeof v === "number") return BigInt(v);
  if (typeof v === "string") return BigInt(/^0x/i.test(v) ? v : `0x${v}`);
  throw new Error(`not an address: ${JSON.stringify(v)}`);
}

/** The mappings of a process object: [{start, end, ...rest}] with bigint addresses. */
export function mappingsOf(proc: Json): { start: bigint; end: bigint; raw: Json }[] {
  let list = field(proc, "mappings", "vmas", "mm");
  if (list && !Array.isArray(list)) list = list.mappings ?? list.vmas;
  if (!Array.isArray(list)) throw new Error(`process without mappings: ${keysOf(proc)}`);
  return list.map((m: Json) => ({ start: addr(m.start), end: addr(m.end), raw: m }));
}

// ---------------------------------------------------------------------------
// temporary directories

export interface TempDir {
  path: string;
  [Symbol.asyncDispose](): Promise<void>;
}

/**
 * A fresh directory under /tmp, removed with everything in it when the
 * `await using` binding goes out of scope:
 *
 *   await using tmp = await tempDir();
 *   const out = `${tmp.path}/out.txt`;
 */
export async function tempDir(prefix = "amber-test-"): Promise<TempDir> {
  const path = await Deno.makeTempDir({ dir: "/tmp", prefix });
  return {
    path,
    async [Symbol.asyncDispose]() {
      await Deno.remove(path, { recursive: true }).catch(() => {});
    },
  };
}

/** Names of the entries of DIR; [] if it does not exist. */
export function listDir(dir: string): string[] {
  try {
    return [...Deno.readDirSync(dir)].map((e) => e.name).sort();
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return [];
    throw e;
  }
}

/** Total size of the files of DIR whose names match `re`. */
export function sizeOf(dir: string, re: RegExp): number {
  let total = 0;
  for (const name of listDir(dir)) if (re.test(name)) total += Deno.statSync(`${dir}/${name}`).size;
  return total;
}

/** Whether PATH exists. */
export function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/**
 * No live restore helper among the test process's descendants. Zombies are
 * left out: what a restored zombie is called is checked on its own.
 */
export function assertNoLiveHelper(what: string): void {
  assertNoHelper(what, helperProcesses().filter(isAlive));
}

// Images: each process's parts are images inside its one process-PID.cbor.

const imageCbor = new Encoder({ useRecords: false, mapsAsObjects: true });
// deno-lint-ignore no-explicit-any
type ImageBody = any;

/** The file of images directory `dir` holding every part of `pid`. */
export function processFile(dir: string, pid: number): string {
  return `${dir}/process-${pid}.cbor`;
}

/** The image document (magic, version, body) of part `part` of `pid`, as stored. */
export async function readPart(dir: string, pid: number, part: string): Promise<ImageBody> {
  const outer = decode(await Deno.readFile(processFile(dir, pid)));
  return decode(outer.body[part]);
}

/**
 * Rewrites part `part` of `pid`'s image with `edit` (given the part's
 * body), or, with `raw`, replaces the part's encoded bytes with what `raw`
 * makes of them.
 */
export async function editPart(
  dir: string,
  pid: number,
  part: string,
  edit: (body: ImageBody) => void,
  raw?: (bytes: Uint8Array) => Uint8Array,
): Promise<void> {
  const file = processFile(dir, pid);
  const outer = decode(await Deno.readFile(file));
  if (raw) {
    outer.body[part] = raw(outer.body[part]);
  } else {
    const doc = decode(outer.body[part]);
    edit(doc.body);
    outer.body[part] = imageCbor.encode(doc);
  }
  await Deno.writeFile(file, imageCbor.encode(outer));
}
