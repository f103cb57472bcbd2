/**
 * Freezing a process tree: PTRACE_SEIZE + PTRACE_INTERRUPT on every thread
 * of the root and its descendants, re-scanning until nothing new appears,
 * and resuming all of it exactly as it was.
 */
import { libc, SysError } from "../../ffi/libc.ts";
import * as pt from "../../ffi/ptrace.ts";
import { AmberError, withContext } from "../errors.ts";
import { listProcNumbers, readProcText } from "../proc/read.ts";
import { PF_KTHREAD, readStat } from "../proc/stat.ts";
import { readStatus } from "../proc/status.ts";
import { type SleepDeadline, SleepWatch } from "../task/sleeps.ts";

export interface FrozenProcess {
  pid: number;
  threads: number[];
  children: number[];
  /** Was in a group stop (state T) before amber came. */
  stopped: boolean;
  /** A zombie (not seized: nothing left but its exit status). */
  zombie?: { exitStatus: number };
  /** Threads frozen in a relative sleep without a buffer whose deadline was seen (lib/task/sleeps.ts). */
  sleeps: Map<number, SleepDeadline>;
}

/** A frozen tree, parents listed before their children. */
export class FrozenTree {
  readonly processes: FrozenProcess[] = [];
  readonly frozenAt = performance.now();

  get pids(): number[] {
    return this.processes.map((p) => p.pid);
  }

  /** Threads amber seized (a zombie has none). */
  get tids(): number[] {
    return this.processes.filter((p) => !p.zombie).flatMap((p) => p.threads);
  }

  /** Lets every thread run on as before. Errors are collected, not thrown midway. */
  release(): void {
    const failures: string[] = [];
    for (const tid of this.tids) {
      try {
        pt.detach(tid);
      } catch (e) {
        if (!(e instanceof SysError && e.code === "ESRCH")) failures.push(`tid ${tid}: ${e}`);
      }
    }
    if (failures.length) throw new AmberError(`resuming the tree: ${failures.join("; ")}`);
  }

  /**
   * Ends the tree (after a complete dump): SIGKILL every process (from
   * here on none runs an instruction of its own again) and, if `wait`,
   * wait for its threads as tracer, which hands each zombie to its real
   * parent. Not waiting leaves that to the kernel when amber exits, and
   * the teardown (freeing the memory: ~0.2 s per GiB here) to run after it.
   * Our own children are left for their owner (e.g. Deno.ChildProcess) to reap.
   */
  kill(wait = true): void {
    for (const pid of this.pids) libc().kill(pid, SIGKILL);
    if (!wait) return;
    for (const proc of this.processes.filter((p) => !p.zombie)) {
      const ours = readStatSafe(proc.pid)?.ppid === Deno.pid;
      // Other threads first: a dead leader is not reported while its threads remain.
      for (const tid of [...proc.threads.filter((t) => t !== proc.pid), proc.pid]) {
        // The leader of our own child is its owner's to reap; its threads are ours.
        if (ours && tid === proc.pid) continue;
        try {
          pt.waitpid(tid);
        } catch { /* already reaped */ }
      }
    }
  }
}

const SIGKILL = 9;

function readStatusSafe(pid: number) {
  try {
    return readStatus(pid);
  } catch {
    return undefined;
  }
}

function readStatSafe(pid: number) {
  try {
    return readStat(pid);
  } catch {
    return undefined;
  }
}

/** Checks that `pid` names a process amber may dump. */
export function validateTargetPid(pid: number): void {
  if (!Number.isInteger(pid) || pid < 1 || pid > 4194304) {
    throw new AmberError(`pid ${pid}: not a valid process id`);
  }
  if (pid === Deno.pid) throw new AmberError(`pid ${pid}: amber cannot dump itself`);
  let stat;
  try {
    stat = readStat(pid);
  } catch {
    throw new AmberError(`pid ${pid}: no such process`);
  }
  if (stat.flags & PF_KTHREAD) throw new AmberError(`pid ${pid}: ${stat.comm} is a kernel thread`);
  if (stat.state === "Z") throw new AmberError(`pid ${pid}: is a zombie`);
  // /proc/TID/stat of a thread answers with the thread's own id: ask its status.
  const tgid = Number(readStatusSafe(pid)?.get("Tgid") ?? pid);
  if (tgid !== pid) {
    throw new AmberError(`${pid} is a thread of process ${tgid}: dump -t ${tgid}`);
  }
}

/** Why PTRACE_SEIZE was refused, in words. */
function seizeRefusal(tid: number, e: unknown): AmberError {
  let tracer = 0;
  try {
    tracer = Number(/TracerPid:\s*(\d+)/.exec(Deno.readTextFileSync(`/proc/${tid}/status`))?.[1]);
  } catch { /* gone */ }
  if (tracer) {
    return new AmberError(
      `tid ${tid}: already traced by pid ${tracer} (a debugger, or another dump?)`,
    );
  }
  return new AmberError(`tid ${tid}: ${e instanceof Error ? e.message : e}`);
}

/** Seizes one thread and asks it to stop; false when it vanished meanwhile. */
function seizeThread(tid: number): boolean {
  try {
    // Seccomp suspended: the syscalls dump injects are not the thread's own,
    // and its filter (or strict mode) could fail them or kill the process.
    pt.seize(tid, pt.PTRACE_O.TRACESYSGOOD | pt.PTRACE_O.SUSPEND_SECCOMP);
  } catch (e) {
    if (e instanceof SysError && e.code === "ESRCH") return false;
    // The kernel refuses (EPERM) a task that is exiting: it ended meanwhile.
    if (e instanceof SysError && e.code === "EPERM" && exited(tid)) return false;
    throw seizeRefusal(tid, e);
  }
  pt.interrupt(tid);
  return true;
}

/** Waits for a seized thread's interrupt stop; false when it exited first. */
function stopped(tid: number): boolean {
  for (;;) {
    const st = pt.waitpid(tid);
    if (!st || !st.stopped) return false; // exited while we froze it
    if (st.event === pt.PTRACE_EVENT.STOP) return true;
    // A signal-delivery stop came first: deliver the signal as the kernel
    // would have; the interrupt stays pending and stops the thread next.
    pt.cont(tid, st.event ? 0 : st.stopSignal);
  }
}

/**
 * Seizes and interrupts `tids`; returns those now frozen. All are asked to
 * stop before any stop is waited for, so a process's threads reach their
 * stops together instead of one wake-up after another.
 */
function freezeThreads(tids: number[]): number[] {
  const asked: number[] = [];
  try {
    for (const tid of tids) if (seizeThread(tid)) asked.push(tid);
  } catch (e) {
    // Those already asked stop, as they did when each was waited for at once.
    for (const tid of asked) {
      try {
        stopped(tid);
      } catch { /* the first failure is the one to report */ }
    }
    throw e;
  }
  return asked.filter(stopped);
}

/** Whether thread `tid` is gone or exiting (a zombie, or dead). */
function exited(tid: number): boolean {
  const state = readStatSafe(tid)?.state;
  return state === undefined || state === "Z" || state === "X";
}

function threadsOf(pid: number): number[] {
  try {
    return listProcNumbers(pid, "task");
  } catch {
    return [];
  }
}

function childrenOf(pid: number, threads: number[]): number[] {
  const out = new Set<number>();
  for (const tid of threads) {
    try {
      readProcText(pid, `task/${tid}/children`).split(/\s+/).filter(Boolean)
        .forEach((c) => out.add(Number(c)));
    } catch { /* thread gone */ }
  }
  return [...out].sort((a, b) => a - b);
}

/** An unreaped child: nothing to seize, only its exit status to keep. */
function frozenZombie(proc: FrozenProcess, exitStatus: number, tree: FrozenTree): FrozenProcess {
  proc.threads = [proc.pid];
  proc.zombie = { exitStatus };
  tree.processes.push(proc);
  return proc;
}

function freezeProcess(pid: number, tree: FrozenTree): FrozenProcess | undefined {
  const stat = readStatSafe(pid);
  if (!stat) return undefined;
  const proc: FrozenProcess = {
    pid,
    threads: [],
    children: [],
    stopped: stat.state === "T",
    sleeps: new Map(),
  };
  if (stat.state === "Z") return frozenZombie(proc, stat.exitCode, tree);
  const seen = new Set<number>();
  // Only a sleep's timer tells its deadline, and the interrupt cancels it.
  const watch = SleepWatch.watch(pid, threadsOf(pid));
  // Threads can spawn threads until all of them are stopped: re-scan.
  for (;;) {
    const fresh = threadsOf(pid).filter((t) => !seen.has(t));
    if (!fresh.length) break;
    for (const tid of fresh) seen.add(tid);
    proc.threads.push(...freezeThreads(fresh));
  }
  proc.sleeps = watch?.settle() ?? proc.sleeps;
  if (!proc.threads.length) {
    // It exited while amber froze it: its parent, frozen, cannot reap it.
    const now = readStatSafe(pid);
    return now?.state === "Z" ? frozenZombie(proc, now.exitCode, tree) : undefined;
  }
  tree.processes.push(proc);
  proc.children = childrenOf(pid, proc.threads);
  return proc;
}

/**
 * `rootPid` and its descendants as they are now, the tree still running:
 * a guess at what seizeTree will find, for work worth doing beforehand.
 */
export function listTree(rootPid: number): number[] {
  const out: number[] = [];
  const queue = [rootPid];
  while (queue.length) {
    const pid = queue.shift()!;
    out.push(pid);
    queue.push(...childrenOf(pid, threadsOf(pid)));
  }
  return out;
}

/**
 * Freezes `rootPid` and all its descendants. On failure every thread
 * already frozen is resumed before the error propagates.
 */
export function seizeTree(rootPid: number): FrozenTree {
  validateTargetPid(rootPid);
  const tree = new FrozenTree();
  try {
    const queue = [rootPid];
    while (queue.length) {
      const pid = queue.shift()!;
      const proc = withContext(`pid ${pid}: freeze`, () => freezeProcess(pid, tree));
      if (!proc) {
        if (pid === rootPid) throw new AmberError(`pid ${pid}: exited before it could be frozen`);
        continue;
      }
      queue.push(...proc.children);
    }
    return tree;
  } catch (e) {
    try {
      tree.release();
    } catch { /* keep the first error */ }
    throw e;
  }
}
