/**
 * `amber run`: starts a job and checkpoints it with `pre-dump` every so
 * often into DIR/ckpt-N, keeping the newest complete ones and a
 * DIR/latest symlink that is switched (symlink to a temporary name, then
 * rename) only once a checkpoint is complete. `amber restore -D
 * DIR/latest` continues the job after a crash.
 *
 * Each checkpoint after the first of a chain stores only the pages the
 * job wrote since the previous one (write tracking, see lib/mm/tracking.ts);
 * a chain has at most `keep` links, and pruning keeps the checkpoints the
 * kept ones take pages from.
 *
 * Each checkpoint is a separate `amber pre-dump` process: the job is this
 * process's child, and a parent that also traced its child would take the
 * child's ptrace stops for its own exit (Deno waits for its children).
 * A failed checkpoint is reported and the job goes on.
 */
import { effectiveUid } from "../ffi/dirfd.ts";
import { AmberError, InterruptedError, UsageError } from "./errors.ts";
import type { LogLine } from "./log.ts";
import { readImages } from "./images/read.ts";

/** What one checkpoint gave. */
export interface CheckpointResult {
  /** N of DIR/ckpt-N. */
  n: number;
  /** DIR/ckpt-N. */
  dir: string;
  /** It is complete, and DIR/latest names it. */
  ok: boolean;
  /** The dump's own `--json` result (pids, frozenMs, totalMs, pageBytes...), when it gave one. */
  dump?: Record<string, unknown>;
  /** Why it failed (the dump's one-line error). */
  error?: string;
}

/** What {@link runJob} starts and how it checkpoints it. */
export interface RunRequest {
  /** The job: program and arguments. */
  command: string[];
  /** Where the checkpoints go (created 0700 if missing). */
  dir: string;
  /** Milliseconds between checkpoints. */
  everyMs: number;
  /** How many complete checkpoints to keep (at least 1). */
  keep: number;
  /**
   * The job stays in amber's session and process group (and gets its
   * stdin), and is dumped with --shell-job; otherwise it runs in a new
   * session with stdin on /dev/null.
   */
  shellJob?: boolean;
  /** Aborting it ends the job (SIGTERM) and returns once it is gone. */
  signal?: AbortSignal;
  /** Called after each checkpoint, complete or failed. */
  onCheckpoint?: (c: CheckpointResult) => void;
  /** Receives detail lines (each checkpoint started). */
  log?: LogLine;
}

/** How a job under {@link runJob} ended. */
export interface RunResult {
  /** The job's pid. */
  pid: number;
  /** Its exit code, or 128 + the signal that killed it. */
  exitCode: number;
  /** Every checkpoint taken, complete or failed. */
  checkpoints: CheckpointResult[];
  /** The checkpoint DIR/latest points at, if any. */
  latest?: string;
}

const LATEST = "latest";
const CKPT = /^ckpt-(\d+)$/;
const SIGNALS: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGTERM: 15 };

/** "10m", "1s", "500ms", "2h", or plain seconds → milliseconds. */
export function parseDuration(text: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(text);
  if (!m) throw new UsageError(`--every needs a period like 10m, 30s or 500ms, got ${text}`);
  const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] ?? "s"]!;
  const ms = Number(m[1]) * unit;
  if (ms < 100) throw new UsageError(`--every ${text} is too short (100ms at least)`);
  return ms;
}

/** Closes every fd above 2 (amber's own), then execs "$@" (same pid). */
const CLOSE_FDS_AND_EXEC = "for f in /proc/$$/fd/*; do n=${f##*/}; " +
  '[ "$n" -gt 2 ] && eval "exec $n>&-"; done; exec "$@"';

function startJob(req: RunRequest): Deno.ChildProcess {
  // setsid execs in place: a child of Deno is no process group leader.
  const argv = req.shellJob ? req.command : ["setsid", "--", ...req.command];
  return new Deno.Command("/bin/bash", {
    args: ["-c", CLOSE_FDS_AND_EXEC, "amber-run", ...argv],
    stdin: req.shellJob ? "inherit" : "null",
    stdout: "inherit",
    stderr: "inherit",
  }).spawn();
}

/** Checkpoint numbers in `dir`, and whether each is complete (has its inventory). */
function checkpoints(dir: string): { n: number; complete: boolean }[] {
  const out: { n: number; complete: boolean }[] = [];
  for (const e of Deno.readDirSync(dir)) {
    const m = CKPT.exec(e.name);
    if (!m || !e.isDirectory) continue;
    let complete = false;
    try {
      complete = Deno.lstatSync(`${dir}/${e.name}/inventory.cbor`).isFile;
    } catch { /* incomplete */ }
    out.push({ n: Number(m[1]), complete });
  }
  return out.sort((a, b) => a.n - b.n);
}

/** The checkpoints directory: created 0700, or one the user owns that nobody else can write. */
function prepareDir(dir: string): void {
  try {
    Deno.mkdirSync(dir, { mode: 0o700 });
  } catch (e) {
    if (!(e instanceof Deno.errors.AlreadyExists)) throw e;
  }
  const st = Deno.lstatSync(dir);
  if (!st.isDirectory) throw new AmberError(`checkpoints directory ${dir}: not a directory`);
  if (st.uid !== effectiveUid() || (st.mode! & 0o022)) {
    throw new AmberError(
      `checkpoints directory ${dir}: must be owned by uid ${effectiveUid()} and writable by nobody else`,
    );
  }
}

/** Points DIR/latest at ckpt-N atomically: a new symlink renamed over the old one. */
function switchLatest(dir: string, n: number): void {
  const tmp = `${dir}/.latest-${Deno.pid}`;
  try {
    Deno.removeSync(tmp);
  } catch { /* none */ }
  Deno.symlinkSync(`ckpt-${n}`, tmp);
  Deno.renameSync(tmp, `${dir}/${LATEST}`);
  using d = Deno.openSync(dir, { read: true });
  d.syncSync();
}

function latestTarget(dir: string): number | undefined {
  try {
    const m = CKPT.exec(Deno.readLinkSync(`${dir}/${LATEST}`));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

/** The checkpoints whose pages checkpoint `n` takes some of its pages from. */
function parentsOf(dir: string, n: number): number[] {
  const out = new Set<number>();
  try {
    for (const p of readImages(`${dir}/ckpt-${n}`).processes) {
      const parent = (p.parts.pagemap as { parent?: { dir: string } } | undefined)?.parent;
      const m = parent && CKPT.exec(parent.dir.replace(/\/+$/, "").split("/").pop()!);
      if (m) out.add(Number(m[1]));
    }
  } catch { /* unreadable: keeps nothing alive */ }
  return [...out];
}

/**
 * Keeps the newest `keep` complete checkpoints (and the one latest names),
 * with the earlier ones they take pages from; removes the others and
 * incomplete ones left by a crash.
 */
function prune(dir: string, keep: number): void {
  const all = checkpoints(dir);
  const complete = all.filter((c) => c.complete).map((c) => c.n);
  const kept = new Set(complete.slice(-keep));
  const latest = latestTarget(dir);
  if (latest !== undefined) kept.add(latest);
  for (const n of [...kept]) {
    for (const queue = [n]; queue.length;) {
      for (const p of parentsOf(dir, queue.pop()!)) if (!kept.has(p)) kept.add(p), queue.push(p);
    }
  }
  for (const c of all) {
    if (kept.has(c.n)) continue;
    removeIfThere(`${dir}/ckpt-${c.n}`);
  }
}

function removeIfThere(path: string): void {
  try {
    Deno.removeSync(path, { recursive: true });
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
}

/** How to start another amber: this deno running cli.ts. */
function amberCommand(args: string[]): Deno.Command {
  const cli = new URL("../cli.ts", import.meta.url).pathname;
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", cli, ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  });
}

/**
 * A checkpoint is a pre-dump: the job runs on with write tracking armed,
 * so the next one (from `parent`) stores only the pages written since.
 */
async function checkpoint(
  req: RunRequest,
  pid: number,
  n: number,
  parent?: number,
): Promise<CheckpointResult> {
  const dir = `${req.dir}/ckpt-${n}`;
  const args = ["pre-dump", "-t", String(pid), "-D", dir, "--json"];
  if (parent !== undefined) args.push("--prev-images-dir", `../ckpt-${parent}`, "--track-mem");
  if (req.shellJob) args.push("--shell-job");
  const out = await amberCommand(args).output();
  const dec = new TextDecoder();
  let dump: Record<string, unknown> | undefined;
  try {
    dump = JSON.parse(dec.decode(out.stdout));
  } catch { /* no JSON: the dump died */ }
  if (out.success && checkpoints(req.dir).some((c) => c.n === n && c.complete)) {
    switchLatest(req.dir, n);
    return { n, dir, ok: true, dump };
  }
  const said = dec.decode(out.stderr).trim().split("\n").pop()?.replace(/^amber: /, "");
  return { n, dir, ok: false, dump, error: said || `dump exited with ${out.code}` };
}

const SIGNUM: Record<string, number> = {
  SIGHUP: 1,
  SIGINT: 2,
  SIGQUIT: 3,
  SIGILL: 4,
  SIGTRAP: 5,
  SIGABRT: 6,
  SIGBUS: 7,
  SIGFPE: 8,
  SIGKILL: 9,
  SIGUSR1: 10,
  SIGSEGV: 11,
  SIGUSR2: 12,
  SIGPIPE: 13,
  SIGALRM: 14,
  SIGTERM: 15,
};

/** A shell's way: the exit code, or 128 + the number of the signal that killed it. */
function exitCodeOf(st: Deno.CommandStatus): number {
  return st.signal ? 128 + (SIGNUM[st.signal] ?? 0) : st.code;
}

/** Runs the job to its end, checkpointing it on the way; returns its exit status. */
export async function runJob(req: RunRequest): Promise<RunResult> {
  if (!req.command.length) throw new UsageError("run needs a command after --");
  if (!(req.keep >= 1)) throw new UsageError("--keep needs a number, at least 1");
  prepareDir(req.dir);
  const log = req.log ?? (() => {});
  const job = startJob(req);
  const results: CheckpointResult[] = [];
  let exited = false;
  const status = job.status.then((st) => (exited = true, st));
  let wake: () => void = () => {};
  let asked = false;
  const onUsr1 = () => {
    asked = true;
    wake();
  };
  // Stop signals go to the job; amber run ends when the job does.
  const forward = new Map<Deno.Signal, () => void>();
  for (const sig of Object.keys(SIGNALS) as Deno.Signal[]) {
    const f = () => {
      try {
        job.kill(sig);
      } catch { /* gone */ }
    };
    Deno.addSignalListener(sig, f);
    forward.set(sig, f);
  }
  Deno.addSignalListener("SIGUSR1", onUsr1);
  const onAbort = () => forward.get("SIGTERM")!();
  req.signal?.addEventListener("abort", onAbort);
  try {
    let n = Math.max(0, ...checkpoints(req.dir).map((c) => c.n));
    let chain = 0;
    while (!exited) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        status,
        new Promise<void>((r) => {
          wake = r;
          if (asked) r();
          timer = setTimeout(r, req.everyMs);
        }),
      ]);
      clearTimeout(timer);
      asked = false;
      if (exited) break;
      n++;
      log(`checkpoint ${n} of pid ${job.pid}`);
      // Chains of at most `keep` links: a full copy starts each one.
      const parent = chain > 0 && chain < req.keep ? n - 1 : undefined;
      const c = await checkpoint(req, job.pid, n, parent);
      chain = c.ok ? (parent === undefined ? 1 : chain + 1) : 0;
      // A failed checkpoint leaves nothing half-made behind.
      if (!c.ok) removeIfThere(c.dir);
      if (exited && !c.ok) break; // the job ended while it was dumped: not a failure
      results.push(c);
      req.onCheckpoint?.(c);
      prune(req.dir, req.keep);
    }
  } finally {
    Deno.removeSignalListener("SIGUSR1", onUsr1);
    for (const [sig, f] of forward) Deno.removeSignalListener(sig, f);
    req.signal?.removeEventListener("abort", onAbort);
  }
  const st = await status;
  if (req.signal?.aborted && st.signal) throw new InterruptedError("abort", 130);
  const latest = latestTarget(req.dir);
  return {
    pid: job.pid,
    exitCode: exitCodeOf(st),
    checkpoints: results,
    latest: latest === undefined ? undefined : `${req.dir}/ckpt-${latest}`,
  };
}

/**
 * The images directory restore opens for `path`. restore never follows a
 * link to its images, with one exception: DIR/latest as amber run makes
 * it, a symlink owned by the user, naming a sibling `ckpt-N` directory;
 * that directory is then checked like any other.
 */
export function resolveImagesDir(path: string): string {
  let st: Deno.FileInfo;
  try {
    st = Deno.lstatSync(path);
  } catch {
    return path; // restore names what is missing
  }
  if (!st.isSymlink) return path;
  const target = Deno.readLinkSync(path);
  if (!CKPT.test(target) || st.uid !== effectiveUid()) return path; // refused as a symlink
  return path.replace(/[^/]+\/*$/, "") + target;
}
