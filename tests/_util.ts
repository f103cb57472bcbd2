/**
 * Shared helpers for amber's tests: building and starting the target programs
 * of testdata/, running the amber CLI, and reading what targets write.
 *
 * Importing this module makes the test process a child subreaper
 * (PR_SET_CHILD_SUBREAPER), so orphaned targets (the children of a killed
 * tree, a tree restored by a `restore -d` that has exited) become our
 * children and are reaped promptly here instead of by pid 1 seconds later.
 * That FFI use is the only one in the tests.
 */
import assert from "node:assert/strict";

/** The repository root (the parent of tests/). */
export const ROOT: string = new URL("..", import.meta.url).pathname.replace(/\/$/, "");
export const TESTDATA = `${ROOT}/testdata`;
export const BUILD_DIR = `${ROOT}/.build`;
export const DENO = `${ROOT}/node_modules/.bin/deno`;
export const CLI = `${ROOT}/cli.ts`;

// ---------------------------------------------------------------------------
// libc: subreaper and waitpid

const PR_SET_CHILD_SUBREAPER = 36;
const WNOHANG = 1;
const WALL = 0x40000000;
const ECHILD = 10;

const libc = Deno.dlopen("libc.so.6", {
  prctl: { parameters: ["i32", "u64", "u64", "u64", "u64"], result: "i32" },
  waitpid: { parameters: ["i32", "buffer", "i32"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
});

function errno(): number {
  const p = libc.symbols.__errno_location();
  return p ? new Deno.UnsafePointerView(p).getInt32() : 0;
}

if (libc.symbols.prctl(PR_SET_CHILD_SUBREAPER, 1n, 0n, 0n, 0n) !== 0) {
  throw new Error(`prctl(PR_SET_CHILD_SUBREAPER) failed, errno ${errno()}`);
}

/** Children started through spawnTarget: Deno reaps these itself (child.status). */
const denoChildren = new Map<number, Deno.ChildProcess>();

/**
 * waitpid(pid, WNOHANG | __WALL) on a process Deno did not start. Returns
 * the pid once reaped, 0 if it is still running, -1 if it is not our child.
 */
function waitpidNoHang(pid: number): number {
  const status = new Int32Array(1);
  const r = libc.symbols.waitpid(pid, new Uint8Array(status.buffer), WNOHANG | WALL);
  if (r < 0 && errno() !== ECHILD) throw new Error(`waitpid(${pid}) failed, errno ${errno()}`);
  return r;
}

/** Our own children (any thread's), read from /proc/self/task/TID/children. */
export function ownChildren(): number[] {
  return childrenOf(Deno.pid);
}

/**
 * Reaps every zombie child of the test process that Deno did not start
 * itself (orphans handed to us as subreaper, restored processes). Returns the
 * pids reaped. Deno's own children are left for their `child.status`.
 */
export function reapZombies(): number[] {
  const reaped: number[] = [];
  for (const pid of ownChildren()) {
    if (denoChildren.has(pid)) continue;
    if (procState(pid) !== "Z") continue;
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

/** One line of /proc/PID/maps. */
export interface MapsEntry {
  start: bigint;
  end: bigint;
  perms: string;
  offset: bigint;
  dev: string;
  inode: number;
  path: string;
}

/** Parses /proc/PID/maps. */
export function procMaps(pid: number): MapsEntry[] {
  const text = Deno.readTextFileSync(`/proc/${pid}/maps`);
  return text.split("\n").filter((l) => l).map((line) => {
    const m = line.match(/^([0-9a-f]+)-([0-9a-f]+) (\S+) ([0-9a-f]+) (\S+) (\d+)\s*(.*)$/);
    if (!m) throw new Error(`unexpected maps line: ${line}`);
    return {
      start: BigInt(`0x${m[1]}`),
      end: BigInt(`0x${m[2]}`),
      perms: m[3],
      offset: BigInt(`0x${m[4]}`),
      dev: m[5],
      inode: Number(m[6]),
      path: m[7],
    };
  });
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

// ---------------------------------------------------------------------------
// building and starting targets

/** Flags each testdata program needs at link time. */
const LINK_FLAGS: Record<string, string[]> = {
  threads: ["-pthread"],
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
const CLOSE_FDS_AND_EXEC = "for f in /proc/$$/fd/*; do n=${f##*/}; " +
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
  denoChildren.set(child.pid, child);
  // Once Deno has reaped it, the pid is no longer its child: a restored
  // process may come back with it, ours to reap as the subreaper.
  child.status.then(() => {
    if (denoChildren.get(child.pid) === child) denoChildren.delete(child.pid);
  });
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

/** SIGKILLs PID (if still there) and waits until it is reaped. */
export async function killAndReap(pid: number): Promise<void> {
  try {
    Deno.kill(pid, "SIGKILL");
  } catch {
    // already gone (or a zombie)
  }
  if (!(await waitGone(pid))) throw new Error(`process ${pid} did not go away after SIGKILL`);
  reapZombies();
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

// ---------------------------------------------------------------------------
// running amber

export interface AmberResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs `deno run -A cli.ts ...args` with the environment plus `env`; kills it
 * after timeoutMs (default 120 s).
 */
export async function amber(
  args: string[],
  env: Record<string, string> = {},
  timeoutMs = 120_000,
): Promise<AmberResult> {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  try {
    const r = await new Deno.Command(DENO, {
      args: ["run", "-A", CLI, ...args],
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

/** Asserts an amber run exited with `code`, showing its output if not. */
export function assertExit(r: AmberResult, code: number, what = "amber"): void {
  assert.equal(
    r.code,
    code,
    `${what}: exit ${r.code}, expected ${code}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`,
  );
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
