/**
 * dump: freeze a tree, write its images, then resume or end it.
 * A failed dump resumes every thread as it was and removes its images.
 */
import { Injector } from "../ffi/inject.ts";
import { readMemoryProc, writeMemory } from "../ffi/memory.ts";
import { Regs } from "../ffi/regs.ts";
import type { DumpContext, DumpOptions, Scratch, TreeDumpState } from "./context.ts";
import { AmberError, faultPoint, withContext, withContextAsync } from "./errors.ts";
import { ImageDir } from "./images/dir.ts";
import { GHOST_LIMIT_DEFAULT } from "./fds/ghost.ts";
import { vdsoDigest } from "./mm/mappings.ts";
import { pagesFileName, preparePages } from "./mm/pages.ts";
import { partImage, PARTS } from "./parts.ts";
import { readMaps } from "./proc/maps.ts";
import { readStat } from "./proc/stat.ts";
import { xfeatures, xstateSize } from "./task/threads.ts";
import {
  type FrozenProcess,
  type FrozenTree,
  listTree,
  seizeTree,
  validateTargetPid,
} from "./tree/seize.ts";
import {
  AMBER_VERSION,
  inventoryImage,
  type ProcessEntryImage,
  pstreeImage,
} from "./tree/pstree.ts";

export interface DumpRequest extends Partial<DumpOptions> {
  pid: number;
  dir: string;
}

export interface DumpStats {
  pids: number[];
  /** Milliseconds the tree was frozen. */
  frozenMs: number;
  totalMs: number;
  pageBytes: number;
  imageBytes: number;
}

const SCRATCH_SIZE = 4096;

/** A scratch area on the thread's stack, below the red zone, or in any writable mapping. */
function pickScratch(pid: number, rsp: bigint): Scratch {
  const maps = readMaps(pid);
  const below = ((rsp - 512n - BigInt(SCRATCH_SIZE)) / 16n) * 16n;
  const inside = (a: bigint) =>
    maps.some((m) => m.start <= a && a + BigInt(SCRATCH_SIZE) <= m.end && m.perms[1] === "w");
  if (inside(below)) return { addr: below, size: SCRATCH_SIZE };
  const any = maps.find((m) => m.perms.startsWith("rw") && m.end - m.start >= BigInt(SCRATCH_SIZE));
  if (!any) throw new AmberError("no writable memory for syscall arguments");
  return { addr: any.start, size: SCRATCH_SIZE };
}

/** Runs one part's dump with injection set up, putting registers and scratch bytes back afterwards. */
async function dumpPart<T>(ctx: DumpContext, fn: () => T | Promise<T>): Promise<T> {
  // The injector begins on its first call, so parts that inject nothing
  // see the thread exactly as it was frozen.
  const saved = readMemoryProc(ctx.pid, ctx.scratch.addr, ctx.scratch.size);
  try {
    return await fn();
  } finally {
    writeMemory(ctx.pid, ctx.scratch.addr, saved);
    ctx.injector.end();
  }
}

function processEntry(proc: FrozenProcess): ProcessEntryImage {
  const st = readStat(proc.pid);
  return {
    pid: proc.pid,
    ppid: st.ppid,
    pgid: st.pgid,
    sid: st.sid,
    comm: st.comm,
    exitSignal: st.exitSignal,
    threads: proc.threads,
    state: proc.zombie ? "zombie" : proc.stopped ? "stopped" : "running",
    exitStatus: proc.zombie?.exitStatus,
  };
}

function checkSessions(tree: FrozenTree, entries: ProcessEntryImage[], shellJob: boolean): void {
  const pids = new Set(tree.pids);
  for (const e of entries) {
    if (!pids.has(e.sid) && !shellJob) {
      throw new AmberError(
        `pid ${e.pid}: its session leader ${e.sid} is outside the dumped tree; dump with --shell-job`,
      );
    }
  }
}

/**
 * Dumps every part of one process; returns why it could not be restored,
 * if something in it cannot be yet.
 */
async function dumpProcess(
  dir: ImageDir,
  proc: FrozenProcess,
  options: DumpOptions,
  tree: TreeDumpState,
): Promise<string | undefined> {
  let unrestorable: string | undefined;
  const leader = proc.threads[0];
  const injector = Injector.forThread(leader, proc.pid);
  const scratch = pickScratch(proc.pid, Regs.read(leader).get("rsp"));
  const ctx: DumpContext = { pid: proc.pid, proc, dir, options, injector, scratch, done: {}, tree };
  for (const part of PARTS) {
    const t0 = performance.now();
    await withContextAsync(part.name, async () => {
      const body = await dumpPart(ctx, () => part.dump(ctx));
      const image = partImage(part);
      // Validate what we write exactly as a reader will.
      const parsed = image.schema.parse(body);
      ctx.done[part.name] = parsed;
      dir.write(image, body, proc.pid);
      unrestorable ??= part.unrestorable?.(parsed);
    });
    if (options.verbose) {
      console.error(`pid ${proc.pid}: ${part.name}: ${(performance.now() - t0).toFixed(1)} ms`);
    }
  }
  return unrestorable;
}

function imageBytes(dir: string): number {
  let total = 0;
  for (const e of Deno.readDirSync(dir)) {
    if (e.isFile) total += Deno.statSync(`${dir}/${e.name}`).size;
  }
  return total;
}

/** Dumps the tree rooted at `req.pid` into `req.dir`. */
export async function dumpTree(req: DumpRequest): Promise<DumpStats> {
  const t0 = performance.now();
  const options: DumpOptions = {
    leaveRunning: req.leaveRunning ?? false,
    shellJob: req.shellJob ?? false,
    verbose: req.verbose ?? false,
    ghostLimit: req.ghostLimit ?? GHOST_LIMIT_DEFAULT,
  };
  validateTargetPid(req.pid);
  const dir = new ImageDir(req.dir).openForWrite();
  const state: TreeDumpState = {
    openFiles: new Map(),
    sharedMemory: new Map(),
    pending: new Map(),
    seen: new Set(),
    preparedPages: new Map(),
  };
  let tree: FrozenTree;
  try {
    // Grow the page cache for the big pages files while the tree still runs.
    for (const pid of listTree(req.pid)) {
      const prepared = await preparePages(dir, pid);
      if (prepared) state.preparedPages.set(pid, prepared);
    }
    tree = seizeTree(req.pid);
  } catch (e) {
    for (const p of state.preparedPages.values()) p.file.close();
    dir.discard();
    throw e;
  }
  let frozenMs = 0;
  let running = false;
  const resume = () => {
    frozenMs = performance.now() - tree.frozenAt;
    tree.release();
    running = true;
  };
  try {
    faultPoint("after-freeze");
    const entries = tree.processes.map(processEntry);
    checkSessions(tree, entries, options.shellJob);
    for (const proc of tree.processes.filter((p) => !p.zombie)) {
      const why = await withContextAsync(
        `pid ${proc.pid}`,
        () => dumpProcess(dir, proc, options, state),
      );
      // Ending a tree that can never come back would lose it.
      if (why && !options.leaveRunning) {
        throw new AmberError(
          `pid ${proc.pid}: ${why}; the tree is left running (dump -R keeps it running with its images)`,
        );
      }
    }
    const unrestorable = [...state.pending.values()];
    if (unrestorable.length && !options.leaveRunning) {
      throw new AmberError(
        `${unrestorable[0]}; the tree is left running (dump -R keeps it running with its images)`,
      );
    }
    dir.write(pstreeImage, { processes: entries, unrestorable });
    // Prepared for a process that was gone by the time of the freeze.
    for (const p of state.preparedPages.values()) p.drop();
    const root = tree.processes[0].threads[0];
    const inventory = {
      amberVersion: AMBER_VERSION,
      kernel: Deno.osRelease(),
      arch: "x86_64" as const,
      xsaveSize: xstateSize(root),
      xfeatures: xfeatures(root),
      vdsoSha256: await vdsoDigest(req.pid),
      createdAt: new Date().toISOString(),
      rootPid: req.pid,
      shellJob: options.shellJob,
    };
    faultPoint("before-commit");
    // Everything is in the page cache: a tree that keeps running need not
    // wait for the disk. The inventory, written last and only once all else
    // is durable, marks the images complete.
    if (options.leaveRunning) resume();
    dir.syncAll();
    dir.write(inventoryImage, inventory);
    dir.syncAll();
  } catch (e) {
    if (!running) withContext("resuming the tree after a failed dump", () => tree.release());
    for (const p of state.preparedPages.values()) p.file.close();
    dir.discard();
    throw e;
  }
  if (!options.leaveRunning) {
    frozenMs = performance.now() - tree.frozenAt;
    tree.kill();
  }
  const pageBytes = tree.pids.reduce((s, pid) => {
    try {
      return s + Deno.statSync(dir.file(pagesFileName(pid))).size;
    } catch {
      return s;
    }
  }, 0);
  return {
    pids: tree.pids,
    frozenMs,
    totalMs: performance.now() - t0,
    pageBytes,
    imageBytes: imageBytes(req.dir),
  };
}
