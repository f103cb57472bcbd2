/**
 * restore: rebuild a dumped tree with the same PIDs and let it run.
 *
 * A generated helper executable (ffi/helper_elf.ts) is started and seized;
 * clone3(set_tid) calls injected into it, then into each new process,
 * create the tree top-down, every process starting as a copy of the empty
 * helper. Each process is then rebuilt by injected syscalls (parts, in
 * lib/parts.ts order), its threads get their registers, and everything is
 * detached at once. Any failure kills all that was created.
 */
import type { ByteReader } from "./images/stream.ts";
import {
  BATCH_PAGE_SIZE,
  batchTableBytes,
  mapBatchPageAt,
  type Syscall,
  withBatch,
} from "./batch.ts";
import { writeHelperElf } from "../ffi/helper_elf.ts";
import { Injector, NR } from "../ffi/inject.ts";
import * as pt from "../ffi/ptrace.ts";
import { libc } from "../ffi/libc.ts";
import { replaceFile } from "../ffi/dirfd.ts";
import type {
  InheritFd,
  RestoreContext,
  RestoreOptions,
  Scratch,
  TreeRestoreState,
} from "./context.ts";
import {
  AmberError,
  faultPointAsync,
  RefusalError,
  UsageError,
  withContext,
  withContextAsync,
} from "./errors.ts";
import { ImageDir } from "./images/dir.ts";
import { type Images, type ProcessImages, readImages } from "./images/read.ts";
import { findFreeRange, type MappingImage } from "./mm/mappings.ts";
import { judgeImages } from "./verdict.ts";
import { SignalGuard } from "./interrupt.ts";
import { ShellJob } from "./fds/shelljob.ts";
import { restoreControllingTerminal } from "./fds/tty.ts";
import { createdLate, ptyMembers, takeTerminalEarly } from "./fds/ptymembers.ts";
import { detailLog, type LogLine } from "./log.ts";
import { type ProgressCallback, Tracker, trackerIn } from "./progress.ts";
import { PARTS } from "./parts.ts";
import { resolveImagesDir } from "./run.ts";
import { readMaps } from "./proc/maps.ts";
import { readStat } from "./proc/stat.ts";
import { listProcNumbers, peakMemoryText } from "./proc/read.ts";
import {
  applyThreadState,
  detachThread,
  type ThreadImage,
  xfeatures,
  xstateSize,
} from "./task/threads.ts";
import { putBytes, putString, u64Bytes } from "./scratch.ts";
import { lockConnection, lockedTables, unlock } from "./net/netlock.ts";
import { lockedConnections } from "./fds/tcp.ts";
import { type ActionEnv, runActionScripts } from "./actions.ts";
import { LazyPages, type LazyStats } from "./mm/lazy.ts";
import { RemotePages } from "./mm/remote.ts";
import type { PageServerAddress } from "./streaming.ts";
import { Regs } from "../ffi/regs.ts";

/** What to restore, and how (mod.ts `restore`). */
export interface RestoreRequest {
  /**
   * Images directory (or DIR/latest of `amber run`). With `stream`, where
   * the stream is unpacked and kept; without, a private temporary directory
   * is used and removed once the tree runs.
   */
  dir?: string;
  /**
   * Read the images from this stream (what `dump` wrote with its `stream`
   * option, e.g. stdin; CRIU's --stream) instead of a directory: the whole
   * stream is checked and unpacked before anything is created.
   */
  stream?: ByteReader;
  /** Return once the tree runs instead of waiting for its root (CRIU's -d). */
  detached?: boolean;
  /** Write the root's pid into this file (replaced atomically, never through a symlink). */
  pidfile?: string;
  /** The images are of a shell job: the restored tree joins amber's session and terminal. */
  shellJob?: boolean;
  /** Reopen regular files even if they changed since the dump (CRIU's --allow-changed-files). */
  allowChangedFiles?: boolean;
  /** amber's own descriptors put in the place of external objects (CRIU's --inherit-fd). */
  inheritFds?: InheritFd[];
  /**
   * Leave private anonymous memory out of the fill: the tree runs at once,
   * and amber serves its pages from the images as they are touched, and
   * copies the rest meanwhile (CRIU's --lazy-pages; lib/mm/lazy.ts).
   */
  lazyPages?: boolean;
  /**
   * With lazyPages: the pages `dump --lazy-pages` left in the dumped tree
   * come from the dumping amber at this address (CRIU's `lazy-pages
   * --page-server --address --port`), connected to before anything is
   * created; if it fails once the tree runs (or takes longer than
   * `timeoutMs`, default 30 s, to answer), the tree is killed.
   */
  pageServer?: PageServerAddress & { timeoutMs?: number };
  /** Print the detail lines (per-part times) on stderr. */
  verbose?: boolean;
  /** Aborting it stops the restore as SIGINT does: what was created is killed. */
  signal?: AbortSignal;
  /** Receives every detail line (what -v prints). */
  log?: LogLine;
  /** Receives how far the restore is: at each part of each process, and as pages are filled. */
  progress?: ProgressCallback;
  /**
   * (lib/migrate.ts) The images come from another amber by `migrate`: the
   * tree is restored into this amber's namespaces, whatever the dumper's were.
   */
  migrated?: boolean;
  /**
   * Shell code run at network-lock (the connections locked here), pre-restore,
   * post-restore and network-unlock (CRIU's --action-script; lib/actions.ts).
   */
  actionScripts?: string[];
}

/** What a restore did (mod.ts `restore`). */
export interface RestoreResult {
  /** The processes restored, root first. */
  pids: number[];
  /** Exit code of the root when not detached (128 + signal if killed). */
  exitCode?: number;
  /** Milliseconds until the tree ran. */
  restoreMs: number;
  /** Milliseconds spent in each part, summed over the processes. */
  partMs: Record<string, number>;
  /**
   * With lazyPages: settles once every page is in (with what it took), or
   * rejects when serving failed (the tree was killed). Not detached, the
   * restore itself waits for it as well as for the root.
   */
  lazy?: Promise<LazyStats>;
  /** With lazyPages, not detached: what serving took. */
  lazyStats?: LazyStats;
}

const SCRATCH_SIZE = 64 * 1024;
/**
 * A restored thread may wait at a batch's trap stop (two stops fewer a
 * batch): it is only ever given another injected call, its final
 * registers and a detach from there, which act from that stop as from a
 * syscall stop (the kernel's restart logic runs on the detach alike).
 */
const RESTORE_INJECTOR = { restAtTrap: true };
const CLONE_PARENT = 0x8000;
const SIGCHLD = 17;
const SIGKILL = 9;
const SIGSTOP = 19;
const TRACE_OPTIONS = pt.PTRACE_O.TRACESYSGOOD | pt.PTRACE_O.TRACEFORK | pt.PTRACE_O.TRACECLONE |
  pt.PTRACE_O.EXITKILL;

/** PF_EXITING in /proc/PID/stat's flags: the task is past its last instruction, in do_exit. */
const PF_EXITING = 0x4;

/** A zombie, or a process being torn down (just killed by the dump that wrote the images). */
function isEnding(pid: number): boolean {
  try {
    const stat = readStat(pid);
    return stat.state === "Z" || stat.state === "X" || (stat.flags & PF_EXITING) !== 0;
  } catch {
    return false;
  }
}

/**
 * Who holds a pid, for "pid 1234 is in use by /usr/bin/foo". A process
 * ending (the dumped process itself, still being torn down or not yet
 * reaped by a slow init) is waited for, up to 5 s.
 */
async function pidHolder(pid: number): Promise<string | undefined> {
  for (let i = 0; i < 500 && isEnding(pid); i++) await new Promise((r) => setTimeout(r, 10));
  return pidHolderNow(pid);
}

function pidHolderNow(pid: number): string | undefined {
  try {
    Deno.statSync(`/proc/${pid}`);
  } catch {
    return undefined;
  }
  try {
    return Deno.readLinkSync(`/proc/${pid}/exe`);
  } catch {
    try {
      return Deno.readTextFileSync(`/proc/${pid}/comm`).trim();
    } catch {
      return "another process";
    }
  }
}

/** Everything that can be checked before a single process is created. */
export async function precheck(
  images: Images,
  options: RestoreOptions,
  dir: ImageDir,
): Promise<void> {
  const reasons = await judgeImages(images, dir, options);
  if (reasons.length) throw new RefusalError(reasons[0]);
  // What can never be restored is reported before what a retry could fix.
  for (const p of images.processes) {
    for (const tid of p.entry.threads) {
      const holder = await pidHolder(tid);
      if (holder) throw new AmberError(`pid ${tid} is in use by ${holder}`);
    }
  }
}

interface Blank {
  images: ProcessImages;
  injector: Injector;
}

/** clone3 with set_tid = [pid], run by `parent`; returns the new process, stopped. */
function cloneProcess(
  parent: Injector,
  scratch: Scratch,
  pid: number,
  flags: number,
  exitSignal: number,
): Injector {
  const setTid = putBytes(parent.tid, scratch, u64Bytes([pid]), 256);
  const args = u64Bytes([flags, 0, 0, 0, exitSignal, 0, 0, 0, setTid, 1, 0]);
  const argsAddr = putBytes(parent.tid, scratch, args, 0);
  const r = parent.raw(NR.clone3, argsAddr, args.length);
  if (r === -17n) {
    throw new AmberError(`pid ${pid} is in use by ${pidHolderNow(pid) ?? "another process"}`);
  }
  if (r < 0n) throw new AmberError(`clone3(set_tid ${pid}): errno ${-r}`);
  if (Number(r) !== pid) throw new AmberError(`clone3 made pid ${r}, wanted ${pid}`);
  const st = pt.waitpid(pid);
  if (!st?.stopped) throw new AmberError(`pid ${pid}: did not stop after clone3`);
  return new Injector(pid, parent.syscallAddr, RESTORE_INJECTOR).begin();
}

/** Bytes of clone_args (88) and its set_tid array (8), per child in a batch. */
const CLONE_ROOM = 96;

/** Children created per batch: their table and clone_args fit the scratch area. */
const CLONES_PER_BATCH = 64;

/**
 * cloneProcess for many children of one parent (a copy of the helper,
 * with its code page), in batches. Each child made is in `created` even
 * when another fails, so a failed restore kills it too.
 */
function cloneChildren(
  parent: Injector,
  helper: Helper,
  children: ProcessImages[],
  created: Map<number, Blank>,
): void {
  const ctx = {
    pid: parent.tid,
    injector: parent,
    scratch: helper.scratch,
    batchPage: { addr: helper.code },
  };
  for (let i = 0; i < children.length; i += CLONES_PER_BATCH) {
    const chunk = children.slice(i, i + CLONES_PER_BATCH);
    const base = batchTableBytes(chunk.length);
    const calls = chunk.map(({ entry }, j): Syscall => {
      const at = base + j * CLONE_ROOM;
      const setTid = putBytes(parent.tid, helper.scratch, u64Bytes([entry.pid]), at + 88);
      const args = u64Bytes([0, 0, 0, 0, entry.exitSignal, 0, 0, 0, setTid, 1, 0]);
      return [NR.clone3, putBytes(parent.tid, helper.scratch, args, at), args.length];
    });
    // (One at a time where the parent cannot batch; each child's first stop is waited for below.)
    const got = withBatch(ctx, (run) => run?.(calls)) ??
      calls.map(([nr, ...args]) => parent.raw(nr, ...args));
    let failure: AmberError | undefined;
    chunk.forEach((p, j) => {
      const pid = p.entry.pid, r = got[j];
      const why = r === -17n
        ? `pid ${pid} is in use by ${pidHolderNow(pid) ?? "another process"}`
        : r < 0n
        ? `clone3(set_tid ${pid}): errno ${-r}`
        : Number(r) !== pid
        ? `clone3 made pid ${r}, wanted ${pid}`
        : undefined;
      if (why) {
        failure ??= new AmberError(`pid ${pid}: create: ${why}`);
        return;
      }
      const st = pt.waitpid(pid);
      if (!st?.stopped) {
        failure ??= new AmberError(`pid ${pid}: create: did not stop after clone3`);
        return;
      }
      const injector = new Injector(pid, parent.syscallAddr, RESTORE_INJECTOR).begin();
      created.set(pid, { images: p, injector });
    });
    if (failure) throw failure;
  }
}

/** A scratch page in a process, where neither its current nor its future mappings are. */
function mapScratch(inj: Injector, future: MappingImage[], room = SCRATCH_SIZE): Scratch {
  const addr = findFreeRange([...readMaps(inj.tid), ...future], BigInt(room));
  // MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
  inj.call("mmap scratch", NR.mmap, addr, SCRATCH_SIZE, 3, 0x02 | 0x20 | 0x100000, -1, 0);
  return { addr, size: SCRATCH_SIZE };
}

/** Sets the session and group of a fresh process, before it has children. */
function joinSession(inj: Injector, p: ProcessImages, created: Set<number>): void {
  const { pid, sid, pgid } = p.entry;
  if (sid === pid) inj.call("setsid", NR.setsid);
  else if (pgid === pid) inj.call("setpgid", NR.setpgid, 0, 0);
  else if (created.has(pgid)) inj.call(`setpgid ${pgid}`, NR.setpgid, 0, pgid);
  // else: the group leader is outside the images (--shell-job): stay in the parent's group.
}

export interface Helper {
  child: Deno.ChildProcess;
  injector: Injector;
  /**
   * Its scratch area, and its batch code page right after it (undefined
   * where none could be made), where no mapping of any process of the
   * images lies: every process starts as a copy of the helper and keeps
   * both until it is rebuilt.
   */
  scratch: Scratch;
  code?: bigint;
}

/** The FPU state of the images must fit this CPU. */
function checkCpu(inv: Images["inventory"], tid: number): void {
  const size = xstateSize(tid), features = xfeatures(tid);
  if (inv.xsaveSize !== size || inv.xfeatures !== features) {
    throw new AmberError(
      `the images' FPU state (${inv.xsaveSize} bytes, features 0x${inv.xfeatures.toString(16)}) ` +
        `does not fit this CPU (${size} bytes, features 0x${features.toString(16)}): ` +
        "restore on the same kind of CPU",
    );
  }
}

/** Every mapping of every process of the images: where the helper's own pages must not be. */
export function imagesMappings(images: Images): MappingImage[] {
  return images.processes.flatMap((p) =>
    (p.parts.mappings as { mappings: MappingImage[] } | undefined)?.mappings ?? []
  );
}

/** Whether a helper started ahead (for earlier images) keeps its pages clear of these images'. */
function helperFits(helper: Helper, images: Images): boolean {
  const start = helper.scratch.addr;
  const end = (helper.code ?? start + BigInt(helper.scratch.size)) + BigInt(BATCH_PAGE_SIZE);
  return imagesMappings(images).every((m) => m.end <= start || end <= m.start);
}

async function startHelper(images: Images): Promise<Helper> {
  const helper = await spawnHelper(imagesMappings(images));
  try {
    checkCpu(images.inventory, helper.child.pid);
    return helper;
  } catch (e) {
    helper.child.kill("SIGKILL");
    await helper.child.status;
    throw e;
  }
}

/**
 * What a restore can be handed ready (migrate-receive prepares it while the
 * final round is still to come): the images already read and checked from
 * the directory, a helper started ahead (spawnHelper), killed by the restore
 * once it used it and otherwise by whoever started it, and the word to begin.
 */
export interface PreparedRestore {
  images?: Images;
  helper?: Helper;
  /**
   * Settles once the restore may begin (migrate-receive: the sender said
   * go): the images are checked meanwhile, and nothing else is done before.
   */
  go?: Promise<void>;
  /**
   * (lib/prebuilt.ts) Called once the tree is rebuilt and its lazy memory
   * armed, before any thread gets its final registers: the tree, stopped,
   * waits for what it returns, the images (of the same processes) whose
   * thread state it runs with, their pages already patched in, and since
   * when the restore counts (its restoreMs). Throwing kills the tree.
   */
  hold?: (built: BuiltTree) => Promise<{ images: Images; since: number }>;
}

/** A rebuilt tree that has not run yet (PreparedRestore.hold). */
export interface BuiltTree {
  /** Each process's, which may still inject calls (none touching lazy memory). */
  injectors: Map<number, Injector>;
  /** The restore's kind states (the lazy pages' among them). */
  kinds: Map<string, unknown>;
}

/**
 * The restore helper, stopped and seized, its scratch and code page mapped
 * clear of `future` (the mappings of the images' processes), the CPU not
 * checked yet.
 */
export async function spawnHelper(future: MappingImage[]): Promise<Helper> {
  const path = writeHelperElf();
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(path, { stdin: "inherit", stdout: "inherit", stderr: "inherit" })
      .spawn();
  } finally {
    Deno.removeSync(path.replace(/\/[^/]+$/, ""), { recursive: true });
  }
  try {
    pt.seize(child.pid, TRACE_OPTIONS);
    pt.interrupt(child.pid);
    pt.waitpid(child.pid);
    const injector = Injector.forThread(child.pid).begin();
    const scratch = mapScratch(injector, future, SCRATCH_SIZE + BATCH_PAGE_SIZE);
    const code = mapBatchPageAt(injector, scratch.addr + BigInt(scratch.size));
    return { child, injector, scratch, code };
  } catch (e) {
    child.kill("SIGKILL");
    await child.status;
    throw e instanceof AmberError
      ? e
      : new AmberError(`restore helper: ${e instanceof Error ? e.message : e}`);
  }
}

function inheritedFds(): Map<number, string> {
  const out = new Map<number, string>();
  for (const fd of [0, 1, 2]) {
    try {
      out.set(fd, Deno.readLinkSync(`/proc/self/fd/${fd}`));
    } catch { /* closed */ }
  }
  return out;
}

/**
 * Creates `procs` (parents first, each parent already created and still a
 * copy of the helper), each a copy of the helper.
 */
function createProcesses(
  procs: ProcessImages[],
  images: Images,
  helper: Helper,
  created: Map<number, Blank>,
  detached: boolean,
): void {
  const pids = new Set(images.processes.map((p) => p.entry.pid));
  const standIns: { leader: Injector; parent: Injector }[] = [];
  const standInFor = (p: ProcessImages, parent?: Blank) => {
    const { pgid } = p.entry;
    if (parent && !pids.has(pgid) && !created.has(pgid) && !pidHolderNow(pgid)) {
      standIns.push({
        leader: standInLeader(parent.injector, helper.scratch, pgid),
        parent: parent.injector,
      });
    }
  };
  const join = (p: ProcessImages, injector: Injector) => {
    const groups = new Set([...created.keys(), ...standIns.map((s) => s.leader.tid)]);
    withContext(`pid ${p.entry.pid}: create`, () => joinSession(injector, p, groups));
  };
  try {
    for (let i = 0; i < procs.length;) {
      // Children of one parent in a row: their clone3s in batches of that parent.
      const parent = created.get(procs[i].entry.ppid);
      let n = 1;
      while (i + n < procs.length && procs[i + n].entry.ppid === procs[i].entry.ppid) n++;
      if (parent && helper.code !== undefined && n > 1) {
        const run = procs.slice(i, i += n);
        for (const p of run) withContext(`pid ${p.entry.pid}: create`, () => standInFor(p, parent));
        cloneChildren(parent.injector, helper, run, created);
        for (const p of run) join(p, created.get(p.entry.pid)!.injector);
        continue;
      }
      const p = procs[i++];
      const { pid, exitSignal } = p.entry;
      withContext(`pid ${pid}: create`, () => {
        standInFor(p, parent);
        const injector = parent
          ? cloneProcess(parent.injector, helper.scratch, pid, 0, exitSignal)
          : detached
          // Detached: a child of the helper, handed to init (or a subreaper) when the helper ends.
          ? cloneProcess(helper.injector, helper.scratch, pid, 0, SIGCHLD)
          // Attached: amber's own child (CLONE_PARENT), so amber can wait for it like CRIU.
          : cloneProcess(helper.injector, helper.scratch, pid, CLONE_PARENT, 0);
        created.set(pid, { images: p, injector });
      });
      join(p, created.get(pid)!.injector);
    }
  } finally {
    for (const s of standIns) endStandIn(s.leader, s.parent);
  }
}

/**
 * Creates the processes of the tree, parents first, but those that must
 * inherit a pty from their session leader (lib/fds/ptymembers.ts) only
 * once it has it: `beforeRebuilding` is called for each process just
 * before it is rebuilt, while it is still a copy of the helper.
 */
class TreeBuilder {
  private readonly late: Set<number>;
  private readonly leaders = new Map<number, number>();
  private readonly haveTty = new Set<number>();

  constructor(
    private readonly images: Images,
    private readonly helper: Helper,
    readonly created: Map<number, Blank>,
    private readonly detached: boolean,
  ) {
    this.late = createdLate(images);
    for (const m of ptyMembers(images)) this.leaders.set(m.leader, m.index);
  }

  createEarly(): void {
    const early = this.images.processes.filter((p) => !this.late.has(p.entry.pid));
    createProcesses(early, this.images, this.helper, this.created, this.detached);
  }

  beforeRebuilding(pid: number): void {
    const index = this.leaders.get(pid);
    if (index === undefined) return;
    withContext(`pid ${pid}: terminal`, () => {
      takeTerminalEarly(this.created.get(pid)!.injector, this.helper.scratch, index);
    });
    this.haveTty.add(pid);
    const members = new Map(ptyMembers(this.images).map((m) => [m.pid, m.leader]));
    const ready = this.images.processes.filter(({ entry: e }) => {
      if (!this.late.has(e.pid) || this.created.has(e.pid)) return false;
      const leader = members.get(e.pid);
      return leader === undefined || this.haveTty.has(leader);
    });
    // Parents first: a process whose parent is still waiting waits too.
    const now = new Set(ready.map((p) => p.entry.pid));
    const batch = ready.filter(({ entry: e }) => {
      const parentReady = this.created.has(e.ppid) || now.has(e.ppid);
      if (!parentReady) now.delete(e.pid);
      return parentReady;
    });
    createProcesses(batch, this.images, this.helper, this.created, this.detached);
  }
}

/**
 * A process group whose leader has exited (a pipeline's first command, the
 * group of a zombie) can only be joined while it exists: a stand-in with
 * the leader's pid makes it, and ends once its members have joined; the
 * group lives on with them.
 */
function standInLeader(parent: Injector, scratch: Scratch, pgid: number): Injector {
  const leader = withContext(`group ${pgid}: stand-in leader`, () => {
    return cloneProcess(parent, scratch, pgid, 0, SIGCHLD);
  });
  leader.call("setpgid", NR.setpgid, 0, 0);
  return leader;
}

/** Kills a stand-in leader and has its parent reap it, so its pid is free again. */
function endStandIn(leader: Injector, parent: Injector): void {
  libc().kill(leader.tid, SIGKILL);
  try {
    pt.waitpid(leader.tid);
  } catch { /* reaped */ }
  parent.raw(NR.wait4, leader.tid, 0, pt.WALL, 0);
}

async function rebuildProcess(
  blank: Blank,
  helper: Helper,
  dir: ImageDir,
  options: RestoreOptions,
  tree: TreeRestoreState,
  log: (m: string) => void,
): Promise<RestoreContext> {
  const pid = blank.images.entry.pid;
  // The helper's, which this copy of it has too, in a range no mapping of the images uses.
  const scratch = { ...helper.scratch };
  const code = helper.code;
  const ctx: RestoreContext = {
    pid,
    dir,
    options,
    injector: blank.injector,
    scratch,
    threads: new Map([[pid, blank.injector]]),
    images: blank.images.parts,
    inherited: inheritedFds(),
    parkFloor: 3,
    tree,
    log,
    batchPage: code === undefined ? undefined : { addr: code },
  };
  const tracker = trackerIn(tree.kinds);
  for (const part of PARTS) {
    const t0 = performance.now();
    tracker?.at(pid, part.name);
    await withContextAsync(part.name, async () => {
      await part.restore(ctx, blank.images.parts[part.name]);
    });
    tracker?.took(part.name, performance.now() - t0);
    log(`pid ${pid}: ${part.name}: ${(performance.now() - t0).toFixed(1)} ms`);
  }
  // Its session leader and group exist by now (parents are rebuilt first).
  withContext("terminal", () => restoreControllingTerminal(ctx));
  const span = scratch.size + (code === undefined ? 0 : BATCH_PAGE_SIZE);
  blank.injector.call("munmap scratch", NR.munmap, scratch.addr, span);
  return ctx;
}

/** The parts' last steps (lib/context.ts Part.finish), process by process. */
function finishProcesses(contexts: RestoreContext[]): void {
  for (const ctx of contexts) {
    for (const part of PARTS) {
      if (part.finish) {
        withContext(`pid ${ctx.pid}: ${part.name}`, () => part.finish!(ctx, ctx.images[part.name]));
      }
    }
  }
}

/**
 * Undoes a failed restore: kills what was created, children first, and has
 * each parent (a stopped tracee still under our control, or amber itself
 * for an attached root) reap its child, so no zombie holds a pid afterwards.
 */
function killCreated(created: Map<number, Blank>, helper: Helper): void {
  for (const blank of [...created.values()].reverse()) {
    const { pid, ppid } = blank.images.entry;
    let tids: number[] = [];
    try {
      tids = listProcNumbers(pid, "task");
    } catch { /* already gone */ }
    libc().kill(pid, SIGKILL);
    // As tracer, collect every thread's exit (the leader last); that hands
    // the zombie to its parent, or reaps it when the parent is amber.
    for (const tid of [...tids.filter((t) => t !== pid), pid]) {
      try {
        pt.waitpid(tid);
      } catch { /* reaped */ }
    }
    const parent = created.get(ppid)?.injector ?? helper.injector;
    try {
      parent.raw(NR.wait4, pid, 0, pt.WALL, 0);
    } catch { /* the parent is amber, which reaped it above */ }
  }
}

/**
 * Lets a recreated zombie die as the original did, under its name:
 * exit_group(code), or its fatal signal with the default action. Core
 * dumps are turned off first, so a zombie of a signal that dumps core
 * comes back without the "core dumped" bit of its wait status.
 * amber waits for the death as tracer, which leaves the zombie to its
 * parent, so it is a zombie by the time restore returns.
 */
function becomeZombie(blank: Blank): void {
  const inj = blank.injector;
  const { pid, comm, exitStatus = 0 } = blank.images.entry;
  // The blank's memory is still the helper's: its stack has room for arguments.
  const scratch = { addr: (inj.savedRegs.get("rsp") - 4096n) & ~15n, size: 64 };
  inj.call("prctl(SET_NAME)", NR.prctl, 15, putString(pid, scratch, comm));
  const signal = exitStatus & 0x7f;
  const regs = inj.savedRegs.clone().set("orig_rax", -1n).set("rip", inj.syscallAddr);
  if (signal) {
    const zero = putBytes(pid, scratch, new Uint8Array(16), 32);
    inj.call("prlimit64(RLIMIT_CORE)", NR.prlimit64, 0, 4, zero, 0);
    regs.set("rax", NR.tgkill).set("rdi", pid).set("rsi", pid).set("rdx", signal);
  } else {
    regs.set("rax", NR.exit_group).set("rdi", (exitStatus >> 8) & 0xff);
  }
  regs.write(pid);
  pt.setSigmask(pid, 0n);
  pt.cont(pid);
  for (;;) {
    const st = pt.waitpid(pid);
    if (!st?.stopped) return;
    // The signal-delivery stop of its own fatal signal: let it through.
    pt.cont(pid, st.event ? 0 : st.stopSignal);
  }
}

/**
 * A failed restore removes the dump's network lock too. CRIU keeps it so a
 * retry may still find the peers waiting, but then a restore never retried
 * would leave it in the ruleset for good, dropping that address pair's
 * packets; here nothing amber added outlives it, and the peers of the
 * dumped connections see them reset.
 */
function releaseLock(lock: NetworkLock, log: (m: string) => void): void {
  if (!lock.table) return;
  try {
    unlock(lock.table);
    log(`network lock ${lock.table} removed: the dumped connections are lost`);
  } catch (e) {
    log(`network lock ${lock.table}: ${e instanceof Error ? e.message : e}`);
  }
  try {
    lock.unlocked();
  } catch (e) {
    log(e instanceof Error ? e.message : String(e));
  }
}

/** The images' network lock, as this restore holds it. */
interface NetworkLock {
  /** The dump's table (or the one made here in its name), if the images hold connections. */
  table?: string;
  /** Runs the network-unlock scripts, once, after the table is gone. */
  unlocked(): void;
}

/**
 * The lock the images' connections need here. On the dumping machine the
 * dump's table still holds them; elsewhere (migrate-receive, images copied
 * to another machine) none does, and a retransmission from a peer that
 * reached this network before the connection exists would be answered
 * with a reset: they are locked here first, in a table of the same name,
 * before the pre-restore scripts can bring their addresses up.
 */
function takeLock(images: Images, scripts: string[] | undefined, env: ActionEnv): NetworkLock {
  const table = images.inventory.netLock;
  let pending = table !== undefined;
  const lock: NetworkLock = {
    table,
    unlocked() {
      if (!pending) return;
      pending = false;
      runActionScripts(scripts, "network-unlock", env);
    },
  };
  if (table === undefined || lockedTables().includes(table)) return lock;
  const conns = lockedConnections(images);
  try {
    conns.forEach((c, i) => {
      withContext(`network lock ${table}`, () => lockConnection(table, c, i === 0));
    });
    if (conns.length) runActionScripts(scripts, "network-lock", env);
  } catch (e) {
    releaseLock(lock, () => {});
    throw e;
  }
  return lock;
}

/** Restores the images in `req.dir`. */
export async function restoreTree(
  req: RestoreRequest & { dir: string; prepared?: PreparedRestore },
  running?: () => void,
): Promise<RestoreResult> {
  let t0 = performance.now();
  const options: RestoreOptions = {
    detached: req.detached ?? false,
    shellJob: req.shellJob ?? false,
    verbose: req.verbose ?? false,
    allowChangedFiles: req.allowChangedFiles ?? false,
    inheritFds: req.inheritFds ?? [],
    // Images served by a dumping amber come from another machine, as a migration's do.
    migrated: (req.migrated || req.pageServer !== undefined) ?? false,
    lazyPages: req.lazyPages ?? false,
    pageSource: req.pageServer !== undefined,
  };
  if (req.pageServer && !options.lazyPages) {
    throw new UsageError("--page-server serves lazy pages: it needs --lazy-pages");
  }
  const scripts = req.actionScripts;
  const log = detailLog(req);
  using guard = new SignalGuard(req.signal);
  // DIR/latest of amber run is followed, explicitly; no other link is.
  const path = resolveImagesDir(req.dir);
  let images = req.prepared?.images ? { ...req.prepared.images, dir: path } : readImages(path);
  const dir = new ImageDir(path);
  // Migrated with --tcp-established: the operator moved the sockets' addresses here.
  options.movedTcp = options.migrated && images.inventory.tcpEstablished === true;
  const env: ActionEnv = { imageDir: path, initPid: images.processes[0]?.entry.pid };
  let lock: NetworkLock = { unlocked() {} };
  let helper: Helper;
  let remote: RemotePages | undefined;
  try {
    log(`images read: ${(performance.now() - t0).toFixed(1)} ms`);
    const go = req.prepared?.go;
    if (go) {
      // Checked while the word to start comes; nothing is locked or created before it.
      await precheck(images, options, dir);
      await go;
      lock = takeLock(images, scripts, env);
    } else {
      lock = takeLock(images, scripts, env);
      await precheck(images, options, dir);
    }
    await guard.checkpoint();
    // Nothing exists yet; the connections are locked: the operator may bring up addresses.
    runActionScripts(scripts, "pre-restore", env);
    log(`images read and checked: ${(performance.now() - t0).toFixed(1)} ms`);
    // Before anything is created: a source that is not there, or serves another dump, fails here.
    if (req.pageServer) remote = await RemotePages.connect(req.pageServer, images.inventory);
    // A helper started ahead is used if the final images left its pages free, else a new one.
    const ready = req.prepared?.helper;
    const fits = ready && helperFits(ready, images);
    if (ready && !fits) {
      try {
        ready.child.kill("SIGKILL");
      } catch { /* gone already */ }
    }
    if (fits) checkCpu(images.inventory, ready.child.pid);
    helper = fits ? ready : await startHelper(images);
    log(`helper started: ${(performance.now() - t0).toFixed(1)} ms`);
  } catch (e) {
    remote?.close();
    releaseLock(lock, log);
    throw e;
  }
  const created = new Map<number, Blank>();
  const threads: [number, ThreadImage][] = [];
  /** Threads to step into their sleep at detach, with the registers to fall back to. */
  const intoSleep = new Map<number, Regs>();
  const contexts: RestoreContext[] = [];
  const tree: TreeRestoreState = { pipes: new Map(), parked: [], kinds: new Map(), onEnd: [] };
  const tracker = new Tracker("restore", req.progress).attach(tree.kinds);
  if (remote) LazyPages.of(tree.kinds, log).useRemote(remote);
  for (const p of images.processes) {
    tracker.addTotal(((p.parts.pagemap as { totalPages?: number })?.totalPages ?? 0) * 4096);
  }
  try {
    const builder = new TreeBuilder(images, helper, created, options.detached);
    builder.createEarly();
    log(`created: ${(performance.now() - t0).toFixed(1)} ms`);
    for (const { entry: { pid } } of images.processes) {
      await guard.checkpoint();
      builder.beforeRebuilding(pid);
      const blank = created.get(pid);
      // The verdict (ptyMemberRefusals) makes sure of it.
      if (!blank) throw new AmberError(`pid ${pid}: create: not created before its turn`);
      if (blank.images.entry.state === "zombie") continue;
      contexts.push(
        await withContextAsync(
          `pid ${pid}`,
          () => rebuildProcess(blank, helper, dir, options, tree, log),
        ),
      );
      const imgs = (blank.images.parts.threads as { threads: ThreadImage[] }).threads;
      for (const t of imgs) threads.push([t.tid, t]);
    }
    await guard.checkpoint();
    for (const { pid, fd } of tree.parked) created.get(pid)!.injector.call("close", NR.close, fd);
    finishProcesses(contexts);
    log(`processes rebuilt: ${(performance.now() - t0).toFixed(1)} ms`);
    // The userfaultfds come last, once no injected call can fault on lazy memory.
    await LazyPages.find(tree.kinds)?.arm(
      new Map([...created].map(([pid, b]) => [pid, b.injector])),
      (pid) =>
        threads.filter(([tid]) => created.get(pid)!.images.entry.threads.includes(tid))
          .map(([, img]) => new Regs(img.regs)),
    );
    if (req.prepared?.hold) {
      // Later images of the same tree: its threads run with their state.
      const later = await req.prepared.hold({
        injectors: new Map([...created].map(([pid, b]) => [pid, b.injector])),
        kinds: tree.kinds,
      });
      images = later.images;
      t0 = later.since;
      threads.length = 0;
      for (const p of images.processes) {
        if (p.entry.state === "zombie") continue;
        for (const t of (p.parts.threads as { threads: ThreadImage[] }).threads) {
          threads.push([t.tid, t]);
        }
      }
    }
    for (const [tid, img] of threads) {
      const fallback = applyThreadState(tid, img);
      if (fallback) intoSleep.set(tid, fallback);
    }
    if (req.pidfile) {
      const pidfile = req.pidfile;
      withContext(
        `pidfile ${pidfile}`,
        () => replaceFile(pidfile, new TextEncoder().encode(`${images.processes[0].entry.pid}\n`)),
      );
    }
    log(`thread state set: ${(performance.now() - t0).toFixed(1)} ms`);
    await faultPointAsync("before-detach");
    for (const blank of created.values()) {
      if (blank.images.entry.state === "zombie") becomeZombie(blank);
      // A pending SIGSTOP puts it back into its group stop once detached.
      if (blank.images.entry.state === "stopped") libc().kill(blank.injector.tid, SIGSTOP);
    }
    runActionScripts(scripts, "post-restore", env);
    // As CRIU does: the lock goes just before the tree runs, then repair
    // mode (its window probe reaches the peer at once).
    if (lock.table) withContext("network lock", () => unlock(lock.table!));
    lock.unlocked();
    for (const end of tree.onEnd.splice(0)) end(true);
  } catch (e) {
    LazyPages.find(tree.kinds)?.abandon();
    for (const end of tree.onEnd.splice(0)) end(false);
    killCreated(created, helper);
    helper.child.kill("SIGKILL");
    await helper.child.status;
    releaseLock(lock, log);
    throw e;
  }
  // The progress line is erased before a shell job owns the terminal, not over its screen.
  tracker.finish();
  // The terminal is the job's before it runs, or its first read would stop it (SIGTTIN).
  const job = options.shellJob ? ShellJob.find(images) : undefined;
  job?.attach(options.detached);
  // Children first, so no parent runs before its children exist as they were.
  for (const [tid] of threads.reverse()) detachThread(tid, intoSleep.get(tid));
  job?.started();
  helper.child.kill("SIGKILL");
  await helper.child.status;
  const pids = images.processes.map((p) => p.entry.pid);
  const restoreMs = performance.now() - t0;
  log(
    `restored ${pids.length} process(es) ${pids.join(" ")} in ${restoreMs.toFixed(0)} ms, ` +
      peakMemoryText(),
  );
  // The tree runs on its own now: signals to amber are amber's again.
  guard[Symbol.dispose]();
  const lazyPages = LazyPages.find(tree.kinds);
  const lazy = lazyPages?.serve(performance.now());
  lazy?.catch(() => {}); // a caller who does not wait for it still sees the tree killed
  running?.();
  const partMs = tracker.partMs;
  if (options.detached) return { pids, restoreMs, partMs, lazy };
  const root = job ? job.wait() : pt.waitpidAsync(pids[0], 0);
  // A failure to serve ends the wait for the root: the tree was killed.
  const st = lazy ? await Promise.race([root, lazy.then(() => root)]) : await root;
  const lazyStats = lazy ? await lazy : undefined;
  const exitCode = st.exited ? st.exitCode : 128 + st.termSignal;
  return { pids, restoreMs, partMs, exitCode, lazy, lazyStats };
}
