/**
 * dump: freeze a tree, write its images, then resume or end it.
 * A failed dump resumes every thread as it was and removes its images.
 */
import { Injector } from "../ffi/inject.ts";
import { dropBatchPage, keepBatchPage } from "./batch.ts";
import { holdMemory, readMemoryProc, writeMemory } from "../ffi/memory.ts";
import { Regs } from "../ffi/regs.ts";
import type {
  DumpContext,
  DumpEnd,
  DumpOptions,
  Part,
  RestoreOptions,
  Scratch,
  TreeDumpState,
} from "./context.ts";
import type { z } from "zod";
import { unlock } from "./net/netlock.ts";
import { runActionScripts } from "./actions.ts";
import {
  AmberError,
  faultPointAsync,
  InterruptedError,
  RefusalError,
  UnknownOutcomeError,
  UsageError,
  withContext,
  withContextAsync,
} from "./errors.ts";
import { ImageDir } from "./images/dir.ts";
import { type ByteWriter, StreamImages } from "./images/stream.ts";
import { connectPageServer, type PageServerAddress, streamTo } from "./streaming.ts";
import { GHOST_LIMIT_DEFAULT } from "./fds/ghost.ts";
import { AIO_TIMEOUT_DEFAULT_MS } from "./mm/aiodrain.ts";
import { vdsoDigest } from "./mm/mappings.ts";
import { preparePages } from "./mm/pages.ts";
import { servePageSource } from "./mm/remote.ts";
import type { Span } from "./mm/tracking.ts";
import {
  closeSnapshots,
  copySnapshots,
  enableSnapshots,
  protectSnapshots,
  SnapshotLost,
  type SnapshotStats,
} from "./mm/snapshot.ts";
import {
  closeHeldTrackers,
  disarmArmed,
  openParent,
  type Parent,
  type TrackingState,
} from "./mm/tracking.ts";
import { PARTS } from "./parts.ts";
import { warmUp } from "./warmup.ts";
import { decodePart, encodePart, writeProcessImage } from "./images/process.ts";
import { decodeImage, encodeImage, imageFileName, type ImageKind } from "./images/codec.ts";
import { assembleImages, type Inventory, type Pstree } from "./images/read.ts";
import { ownPeakMemory } from "./proc/read.ts";
import { SignalGuard } from "./interrupt.ts";
import { detailLog, type LogLine } from "./log.ts";
import { type ProgressCallback, Tracker } from "./progress.ts";
import { dumpVerdictOptions, imageRefusal, judgeImages } from "./verdict.ts";
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

/** What to dump, and how (mod.ts `dump`). */
export interface DumpRequest {
  /** Root of the tree: this process and all its descendants are dumped. */
  pid: number;
  /**
   * Images directory: created 0700, or an existing one owned by the caller that nobody else can
   * write. Not with `stream` or `pageServer`, which take the images elsewhere.
   */
  dir?: string;
  /**
   * Write the images to this stream (stdout, a pipe) instead of a directory, as `restore`'s
   * `stream` reads them (CRIU's --stream): pages as they are read, no file on this machine. The
   * tree is ended only once the whole stream was written.
   */
  stream?: ByteWriter;
  /**
   * Send the images to `amber page-server` at this address (CRIU's --page-server) instead of
   * writing a directory; the tree is ended only once the server said it stored them.
   */
  pageServer?: PageServerAddress;
  /**
   * Leave the private anonymous pages out of the images and serve them
   * from the frozen tree at this address (CRIU's dump --lazy-pages with
   * --address/--port) to `restore` with `lazyPages` and `pageServer`; the
   * tree is ended once the destination has every page, and resumes if the
   * connection ends before (lib/mm/remote.ts).
   */
  lazyPages?: PageServerAddress & { listening?: (port: number) => void };
  /** Let the tree run on after the dump (CRIU's -R); it is killed otherwise. */
  leaveRunning?: boolean;
  /** The tree is a job of a shell: its session or terminal is outside it (CRIU's --shell-job). */
  shellJob?: boolean;
  /** Largest deleted file whose contents dump saves, in bytes (CRIU's --ghost-limit). */
  ghostLimit?: number;
  /**
   * How long AIO requests in flight (O_DIRECT I/O, fsync, poll) are waited for while the tree is
   * frozen, ms (default 5000); a dump of a context still holding some then is refused.
   */
  aioTimeoutMs?: number;
  /**
   * Checkpoint established TCP connections with TCP_REPAIR under an nftables lock (CRIU's
   * --tcp-established); without it a dump of a tree holding one fails naming it.
   */
  tcpEstablished?: boolean;
  /**
   * Objects outside the tree its descriptors may lead to, recorded as external (CRIU's
   * --external), e.g. "pipe:[123]"; restore then needs an inheritFds entry for each.
   */
  external?: string[];
  /**
   * A unix socket connected to a peer outside the tree that has a name (/dev/log, a
   * supervisor's listening path) is recorded to be connected to that name again at restore
   * (CRIU's --ext-unix-sk); without it such a socket is refused.
   */
  extUnixSk?: boolean;
  /**
   * Pre-dump (mod.ts `preDump`): the tree runs on and write tracking is
   * armed in it, so a later dump with `prevImagesDir` stores only what changed.
   */
  preDump?: boolean;
  /**
   * The earlier images (a pre-dump) this one builds on, relative to `dir`
   * unless absolute (CRIU's --prev-images-dir); needs `trackMem`.
   */
  prevImagesDir?: string;
  /** Store only the pages written since `prevImagesDir` was dumped (CRIU's --track-mem). */
  trackMem?: boolean;
  /**
   * Shell code run at pre-dump, network-lock, post-dump and network-unlock
   * (CRIU's --action-script; lib/actions.ts, docs/NETWORK.md).
   */
  actionScripts?: string[];
  /**
   * Return once the tree is killed, without waiting for the kernel to tear
   * it down (free its memory: ~0.2 s per GiB here): for a caller that exits
   * right after, as the CLI does. Its pids stay taken a little longer (a
   * restore waits for that); a caller that goes on must not set it, as its
   * dead processes stay traced by it until it exits.
   */
  noWaitForEnd?: boolean;
  /** Print the detail lines (per-part times) on stderr. */
  verbose?: boolean;
  /** Aborting it stops the dump as SIGINT does: the tree resumes, no images are left. */
  signal?: AbortSignal;
  /** Receives every detail line (what -v prints). */
  log?: LogLine;
  /** Receives how far the dump is: at each part of each process, and as pages are copied. */
  progress?: ProgressCallback;
}

/** A dump as one round of a migration (lib/migrate.ts; not in mod.ts). */
export interface MigrationDump extends DumpRequest {
  /**
   * A stream already connected that takes this round's images, and the
   * round it builds on, as the receiver names it: a migration's rounds go
   * over one connection, their parents stay in memory here.
   */
  migrationRound?: { into: StreamImages; parent?: Parent };
}

/** What a dump did (mod.ts `dump`). */
export interface DumpStats {
  /** The processes dumped, root first. */
  pids: number[];
  /** Milliseconds the tree was frozen. */
  frozenMs: number;
  /** What the copy-on-write snapshot of dump -R copied after the tree resumed. */
  snapshot?: SnapshotStats;
  /** Milliseconds the whole dump took. */
  totalMs: number;
  /** Bytes of memory pages stored. */
  pageBytes: number;
  /** Bytes of all image files. */
  imageBytes: number;
  /** Milliseconds spent in each part (kind of kernel object), summed over the processes. */
  partMs: Record<string, number>;
  /** amber's own peak resident memory by the end of the dump (VmHWM), in bytes. */
  peakMemoryBytes: number;
  /** The images directory written. */
  dir: string;
}

/** Room for a batch of all 62 sigactions, with their table (lib/task/sigactions.ts). */
const SCRATCH_SIZE = 8192;

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

/**
 * Runs one part's dump with injection set up, putting the scratch bytes
 * back afterwards. The injector begins on its first call, so parts that
 * inject nothing before it see the thread exactly as it was frozen. It is
 * ended (the thread taken back to the freeze's stop: one more stop) only
 * when `end` says so: between the parts of one process the thread stays in
 * its last call's syscall-exit stop with its own registers and mask, as
 * safe if amber dies there (see InjectorOptions.restoreAfterEachCall).
 */
async function dumpPart<T>(ctx: DumpContext, fn: () => T | Promise<T>, end: boolean): Promise<T> {
  const saved = readMemoryProc(ctx.pid, ctx.scratch.addr, ctx.scratch.size);
  try {
    return await fn();
  } finally {
    writeMemory(ctx.pid, ctx.scratch.addr, saved);
    if (end) ctx.injector.end();
  }
}

function processEntry(proc: FrozenProcess): ProcessEntryImage {
  const st = readStat(proc.pid);
  return {
    pid: proc.pid,
    ppid: st.ppid,
    pgid: st.pgid,
    sid: st.sid,
    ...(st.ttyNr ? { tty: st.ttyNr } : {}),
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

/** Each process's parts as its image holds them (encoded), by part name. */
const partBytes = new WeakMap<DumpContext, Record<string, Uint8Array>>();
/** Processes whose image a tree that runs on writes once it runs (dump -R). */
const writeScheduled = new WeakSet<DumpContext>();

/**
 * Dumps one part of a process, encoded for its image and decoded back from
 * those bytes exactly as restore reads them: what later parts and the
 * verdict see is what the image holds.
 */
async function dumpOnePart(ctx: DumpContext, part: Part, end = true): Promise<void> {
  await withContextAsync(part.name, async () => {
    const body = await dumpPart(ctx, () => part.dump(ctx), end);
    const bytes = encodePart(part, body);
    ctx.done[part.name] = decodePart(part, bytes, "its image");
    let parts = partBytes.get(ctx);
    if (!parts) partBytes.set(ctx, parts = {});
    parts[part.name] = bytes;
  });
}

/** Writes the process's one image, of every part dumped so far (again, after a late part). */
function writeProcess(ctx: DumpContext): void {
  const write = () => writeProcessImage(ctx.dir, ctx.pid, partBytes.get(ctx) ?? {});
  // A tree that runs on is not kept frozen while its images are written.
  if (!ctx.options.leaveRunning) return withContext("image", write);
  if (writeScheduled.has(ctx)) return;
  writeScheduled.add(ctx);
  const label = `pid ${ctx.pid}: image`;
  ctx.tree.afterResume.push(() => Promise.resolve(withContext(label, write)));
}

/**
 * Every part's read ahead for one process of the frozen tree (see
 * Part.prefetch), but those `early` already holds.
 */
function prefetchParts(pid: number, early?: Map<string, unknown>): Map<string, unknown> {
  const ahead = new Map<string, unknown>();
  for (const part of PARTS) {
    if (part.prefetch) ahead.set(part.name, early?.get(part.name) ?? part.prefetch(pid));
  }
  return ahead;
}

/**
 * A pre-copy round's reads ahead that may be taken while the tree still
 * runs (Part.prefetchWhileRunning), so that they are out of its freeze:
 * the smaps walk is ~30-60 ms of it at 2 GiB. Settled before the freeze.
 */
async function prefetchWhileRunning(rootPid: number): Promise<Map<number, Map<string, unknown>>> {
  const parts = PARTS.filter((p) => p.prefetchWhileRunning && p.prefetch);
  const perPid = listTree(rootPid).map(async (pid) => {
    const read = await Promise.all(parts.map((p) => p.prefetch!(pid)));
    return [pid, new Map(parts.map((p, i) => [p.name, read[i]]))] as const;
  });
  return new Map(await Promise.all(perPid));
}

/**
 * Dumps every part of one process; returns its context and why it could
 * not be restored, if its images alone say so (the verdict's own check of
 * each part, taken early so a doomed dump stops before writing the rest).
 */
async function dumpProcess(
  dir: ImageDir,
  proc: FrozenProcess,
  options: DumpOptions,
  tree: TreeDumpState,
  guard: SignalGuard,
  log: LogLine,
  tracker: Tracker,
  ahead: Map<string, unknown>,
): Promise<{ ctx: DumpContext; refusal?: string }> {
  let refusal: string | undefined;
  // Its scratch area is read and written around every part and call: one descriptor for all.
  using _memory = holdMemory(proc.pid);
  const leader = proc.threads[0];
  const injector = Injector.forThread(leader, proc.pid, { restoreAfterEachCall: true });
  const scratch = pickScratch(proc.pid, Regs.read(leader).get("rsp"));
  const ctx: DumpContext = {
    pid: proc.pid,
    proc,
    dir,
    options,
    injector,
    scratch,
    done: {},
    ahead,
    tree,
  };
  try {
    for (const part of PARTS) {
      await guard.checkpoint();
      const t0 = performance.now();
      tracker.at(proc.pid, part.name);
      // One batch code page for the parts that batch, never seen by those that read the layout.
      if (part.readsMemoryLayout) dropBatchPage(ctx);
      else keepBatchPage(ctx);
      // The thread is taken back to its freeze stop once, after the last part.
      await dumpOnePart(ctx, part, false);
      refusal ??= imageRefusal(part, ctx.done[part.name], proc.pid);
      tracker.took(part.name, performance.now() - t0);
      log(`pid ${proc.pid}: ${part.name}: ${(performance.now() - t0).toFixed(1)} ms`);
    }
  } catch (e) {
    try {
      dropBatchPage(ctx);
    } catch { /* the first failure is the one to report */ }
    try {
      injector.end();
    } catch { /* the first failure is the one to report */ }
    throw e;
  }
  dropBatchPage(ctx);
  injector.end();
  writeProcess(ctx);
  return { ctx, refusal };
}

/**
 * Parts whose state a frozen tree can still gain (signals sent to it while
 * the dump went on) are dumped once more, the last thing before the images
 * are judged, so nothing that arrived meanwhile is lost.
 */
async function dumpLateParts(contexts: DumpContext[]): Promise<void> {
  for (const ctx of contexts) {
    await withContextAsync(`pid ${ctx.pid}`, async () => {
      const late = PARTS.filter((p) => p.dumpAgainLast);
      const encoded = () => late.map((p) => partBytes.get(ctx)?.[p.name] ?? new Uint8Array());
      const before = encoded();
      for (const part of late) await dumpOnePart(ctx, part);
      // Written again only if something arrived: the image holds what was dumped last.
      const after = encoded();
      if (after.some((b, i) => !sameBytes(b, before[i]))) writeProcess(ctx);
    });
  }
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/**
 * The verdict restore will give on the images as written, taken from
 * memory: each part was decoded from the bytes its process image holds
 * (dumpOnePart), the inventory and pstree are decoded here from the bytes
 * they were written as; the bulk files (pages, ghosts) are looked at
 * where they were written.
 */
async function judgeWritten(
  dir: ImageDir,
  inventory: z.input<typeof inventoryImage.schema>,
  pstree: z.input<typeof pstreeImage.schema>,
  contexts: DumpContext[],
  options: RestoreOptions,
): Promise<string[]> {
  const asWritten = <T>(kind: ImageKind<T>, body: unknown) =>
    decodeImage(kind, encodeImage(kind, body as T), dir.file(imageFileName(kind)));
  const parts = new Map(contexts.map((c) => [c.pid, c.done]));
  using staged = dir instanceof StreamImages ? undefined : new ImageDir(dir.stagingPath);
  const reader = staged ?? dir;
  const images = assembleImages(
    reader,
    asWritten<Inventory>(inventoryImage, inventory),
    asWritten<Pstree>(pstreeImage, pstree),
    (pid) => parts.get(pid)!,
  );
  return await judgeImages(images, reader, options);
}

/** Ending a tree whose images cannot come back would lose it. */
function refuseToEnd(why: string): AmberError {
  return new RefusalError(
    `${why}; the tree is left running (dump -R keeps it running with its images)`,
  );
}

/**
 * Where the images go: a directory, a stream, or a page server (connected
 * to before anything is frozen). A stream carries one complete dump: no
 * chain (its parents would be here, the images there).
 */
async function openTarget(req: MigrationDump): Promise<ImageDir> {
  if (req.migrationRound) return req.migrationRound.into;
  if (req.lazyPages) {
    const other = req.stream
      ? "--stream"
      : req.pageServer
      ? "--page-server"
      : req.leaveRunning
      ? "-R"
      : req.preDump || req.prevImagesDir !== undefined || req.trackMem
      ? "pre-dump, --prev-images-dir or --track-mem"
      : undefined;
    if (other) {
      throw new UsageError(
        `--lazy-pages keeps one complete dump's tree frozen to serve its pages: not with ${other}`,
      );
    }
  }
  const elsewhere = req.stream ? "--stream" : req.pageServer ? "--page-server" : undefined;
  if (!elsewhere) {
    if (!req.dir) throw new UsageError("-D DIR is required; see amber dump --help");
    return new ImageDir(req.dir).openForWrite();
  }
  if (req.stream && req.pageServer) {
    throw new UsageError("--stream and --page-server both take the images: give one");
  }
  if (req.dir !== undefined) {
    throw new UsageError(`${elsewhere} takes the images elsewhere: no -D with it`);
  }
  if (req.preDump || req.prevImagesDir !== undefined || req.trackMem) {
    throw new UsageError(
      `${elsewhere} sends one complete dump: not with pre-dump, --prev-images-dir or --track-mem`,
    );
  }
  return req.stream ? streamTo(req.stream) : await connectPageServer(req.pageServer!);
}

/** Runs the kinds' end-of-dump steps, all of them even if one fails; throws the first failure. */
function endKinds(state: TreeDumpState, end: DumpEnd): void {
  const hooks = state.onEnd.splice(0);
  let first: unknown;
  for (const h of hooks) {
    try {
      h(end);
    } catch (e) {
      first ??= e;
    }
  }
  if (first) throw first;
}

/** What the request says about write tracking (lib/mm/tracking.ts). */
function trackingFor(req: MigrationDump, log: LogLine): TrackingState {
  if (req.prevImagesDir !== undefined && !req.trackMem && !req.preDump) {
    throw new UsageError("--prev-images-dir needs --track-mem");
  }
  if (req.trackMem && !req.preDump && req.prevImagesDir === undefined) {
    throw new UsageError(
      "--track-mem needs --prev-images-dir (the pre-dump this dump builds on)",
    );
  }
  const parent = req.migrationRound
    ? req.migrationRound.parent
    : req.prevImagesDir === undefined
    ? undefined
    : openParent(req.dir!, req.prevImagesDir);
  // A migration's final round leaves the tracker: the tree is killed, or resumes and is disarmed.
  const keepOld = req.migrationRound !== undefined && !req.preDump;
  return { arm: !!req.preDump, parent, armed: [], log, keepOld };
}

function closeParent(state: TreeDumpState): void {
  (state.kinds.get("tracking") as TrackingState | undefined)?.parent?.dir.close();
}

/**
 * dump --lazy-pages: the images are complete; the pages they left out are
 * served from the frozen tree until the destination has them all. If it
 * does not get there, the tree resumes (nothing it had was changed).
 */
async function serveLeftPages(
  at: NonNullable<DumpRequest["lazyPages"]>,
  tree: FrozenTree,
  state: TreeDumpState,
  guard: SignalGuard,
  log: LogLine,
  resume: () => void,
  dump: { rootPid: number; createdAt: string },
): Promise<void> {
  try {
    const got = await servePageSource({
      ...at,
      spans: (state.kinds.get("lazy-source") as Map<number, Span[]> | undefined) ?? new Map(),
      dump,
      stopped: guard.stopped,
      listening: at.listening,
      log,
    });
    log(
      `lazy pages: ${got.peer} has every page: ${got.requests} requests, ` +
        `${(got.bytes / 1048576).toFixed(1)} MiB served in ${got.ms.toFixed(0)} ms`,
    );
  } catch (e) {
    withContext("resuming the tree after its page source failed", resume);
    if (e instanceof InterruptedError) throw e;
    throw new AmberError(
      `${e instanceof Error ? e.message : e}; the tree (pids ${tree.pids.join(" ")}) ` +
        "resumes here, untouched",
      { cause: e },
    );
  }
}

/**
 * post-dump, once the images are complete: a script that fails it fails
 * the dump (the tree then runs on), but the images stay, complete.
 */
function postDump(
  scripts: string[] | undefined,
  env: { imageDir?: string; initPid: number },
  leaveRunning: boolean,
): void {
  try {
    runActionScripts(scripts, "post-dump", env);
  } catch (e) {
    if (leaveRunning) throw e;
    throw new AmberError(
      `${(e as Error).message}; the images are complete${
        env.imageDir ? ` in ${env.imageDir}` : ""
      }, the tree runs on`,
    );
  }
}

/**
 * Dumps the tree rooted at `req.pid` into `req.dir`. A dump -R whose
 * snapshot lost pages to the running tree is taken again, frozen.
 */
export async function dumpTree(req: MigrationDump): Promise<DumpStats> {
  // A tree that runs on is frozen only for the parts: their code is compiled first.
  if ((req.leaveRunning || req.preDump) && !req.migrationRound) {
    await warmUp(dumpTree, detailLog(req), req.signal);
  }
  try {
    return await dumpTreeOnce(req, true);
  } catch (e) {
    if (!(e instanceof SnapshotLost)) throw e;
    detailLog(req)(`${e.message}: dumping again, frozen for the whole copy`);
    return await dumpTreeOnce(req, false);
  }
}

async function dumpTreeOnce(req: MigrationDump, snapshots: boolean): Promise<DumpStats> {
  const t0 = performance.now();
  const options: DumpOptions = {
    leaveRunning: (req.leaveRunning || req.preDump) ?? false,
    shellJob: req.shellJob ?? false,
    verbose: req.verbose ?? false,
    ghostLimit: req.ghostLimit ?? GHOST_LIMIT_DEFAULT,
    aioTimeoutMs: req.aioTimeoutMs ?? AIO_TIMEOUT_DEFAULT_MS,
    tcpEstablished: req.tcpEstablished ?? false,
    external: req.external ?? [],
    copyWhileRunning: req.migrationRound !== undefined && !!req.preDump,
    extUnixSk: req.extUnixSk ?? false,
    lazySource: req.lazyPages !== undefined,
  };
  const log = detailLog(req);
  validateTargetPid(req.pid);
  using guard = new SignalGuard(req.signal);
  // A migration runs pre-dump and post-dump once for all its rounds (lib/migrate.ts).
  const scripts = req.actionScripts;
  const scriptEnv = { imageDir: req.dir, initPid: req.pid };
  if (!req.migrationRound) runActionScripts(scripts, "pre-dump", scriptEnv);
  // The connections are locked only when the tree is dumped to end it or let it run on.
  const locksNetwork = options.tcpEstablished && !req.preDump;
  let networkLocked = false;
  const dir = await openTarget(req);
  if (dir instanceof StreamImages) dir.watch(guard.stopped);
  const state: TreeDumpState = {
    openFiles: new Map(),
    sharedMemory: new Map(),
    pending: new Map(),
    seen: new Set(),
    preparedPages: new Map(),
    kinds: new Map(),
    options,
    onEnd: [],
    beforeCommit: [],
    afterResume: [],
  };
  const tracker = new Tracker("dump", req.progress).attach(state.kinds);
  let tree: FrozenTree;
  let early: Map<number, Map<string, unknown>> | undefined;
  try {
    state.kinds.set("tracking", trackingFor(req, log));
    enableSnapshots(state.kinds, snapshots);
    // Grow the page cache for the big pages files while the tree still runs
    // (for -R, whose tree is frozen only for the copy; a killed tree's pages
    // go straight to the disk instead).
    // (Not for an incremental round: it stores a fraction of the memory.)
    // (Nor for a stream: it has no file.)
    const prepare = options.leaveRunning && req.prevImagesDir === undefined &&
      !(dir instanceof StreamImages);
    for (const pid of prepare ? listTree(req.pid) : []) {
      const prepared = await preparePages(dir, pid);
      if (prepared) state.preparedPages.set(pid, prepared);
      await guard.checkpoint();
    }
    early = options.copyWhileRunning ? await prefetchWhileRunning(req.pid) : undefined;
    const seizing = performance.now();
    tree = seizeTree(req.pid);
    log(`frozen: ${tree.tids.length} thread(s) in ${(performance.now() - seizing).toFixed(1)} ms`);
  } catch (e) {
    for (const p of state.preparedPages.values()) p.file.close();
    closeParent(state);
    dir.discard();
    throw e;
  }
  let frozenMs = 0;
  let running = false;
  /** The dump a lazy page source serves (--lazy-pages), as its inventory names it. */
  let identity: { rootPid: number; createdAt: string } | undefined;
  let snapshot: SnapshotStats | undefined;
  // Objects a kind changed while dumping (TCP repair mode) go back first,
  // then the network lock goes: the tree runs as it was.
  // (A migration whose destination may run the tree keeps the network locked.)
  const resume = (keepNetwork = false) => {
    frozenMs = performance.now() - tree.frozenAt;
    try {
      endKinds(state, "resume");
    } finally {
      if (state.netLock && !keepNetwork) unlock(state.netLock);
      if (!keepNetwork) state.netLock = undefined;
      tree.release();
      running = true;
    }
    // The operator's part of the lock goes once amber's has (a moved address comes back).
    if (networkLocked && !keepNetwork) {
      networkLocked = false;
      runActionScripts(scripts, "network-unlock", scriptEnv);
    }
  };
  try {
    await faultPointAsync("after-freeze");
    await guard.checkpoint();
    // Frozen, before the first connection is locked: whatever else the operator locks.
    if (locksNetwork) {
      networkLocked = true;
      runActionScripts(scripts, "network-lock", scriptEnv);
    }
    const entries = tree.processes.map(processEntry);
    checkSessions(tree, entries, options.shellJob);
    const contexts: DumpContext[] = [];
    const live = tree.processes.filter((p) => !p.zombie);
    const ahead = new Map(live.map((p) => [p.pid, prefetchParts(p.pid, early?.get(p.pid))]));
    for (const proc of live) {
      const { ctx, refusal } = await withContextAsync(
        `pid ${proc.pid}`,
        () => dumpProcess(dir, proc, options, state, guard, log, tracker, ahead.get(proc.pid)!),
      );
      if (refusal && !options.leaveRunning) throw refuseToEnd(refusal);
      contexts.push(ctx);
    }
    const pending = [...state.pending.values()];
    if (pending.length && !options.leaveRunning) throw refuseToEnd(pending[0]);
    const pstree = { processes: entries, unrestorable: pending };
    dir.write(pstreeImage, pstree);
    log(`parts dumped: ${(performance.now() - tree.frozenAt).toFixed(1)} ms after the freeze`);
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
      // With -R the lock is gone as soon as the tree runs again.
      netLock: options.leaveRunning ? undefined : state.netLock,
      tcpEstablished: options.tcpEstablished || undefined,
    };
    identity = { rootPid: inventory.rootPid, createdAt: inventory.createdAt };
    await faultPointAsync("before-commit");
    await guard.checkpoint();
    await dumpLateParts(contexts);
    // Everything is in the page cache: a tree that keeps running need not
    // wait for the disk. Its private memory is copied after it runs again
    // (protected the last thing before), as it was at this moment.
    if (options.leaveRunning) {
      const t = performance.now();
      const n = await protectSnapshots(state.kinds);
      if (n) {
        log(
          `snapshot: ${n} process(es) write-protected in ${(performance.now() - t).toFixed(1)} ms`,
        );
      }
      resume();
      snapshot = await copySnapshots(state.kinds);
      if (snapshot) {
        log(
          `snapshot: ${(snapshot.bytes / 1048576).toFixed(1)} MiB copied while running in ${
            snapshot.ms.toFixed(0)
          } ms, ${snapshot.faults} write fault(s) served`,
        );
      }
    }
    for (const copy of state.afterResume.splice(0)) await copy();
    await dir.syncAll();
    dir.write(inventoryImage, inventory);
    // The verdict restore will give, from the images as written.
    const verdictOptions = {
      ...dumpVerdictOptions(options.shellJob),
      // Its left-out pages come from this amber, to a restore with --lazy-pages --page-server.
      ...(options.lazySource ? { lazyPages: true, pageSource: true } : {}),
      takenLater: !options.leaveRunning,
      // A migration's rounds are judged as the receiver will judge them.
      migrated: req.migrationRound !== undefined || options.lazySource === true,
      movedTcp: req.migrationRound !== undefined && options.tcpEstablished,
    };
    // A migration's final round is judged by the receiver, which restores nothing it refuses
    // and says why; this tree ends only once the tree runs there (lib/migrate.ts): not twice
    // within the pause. (Pre-copy rounds are judged here: a refusal stops before the final.)
    const reasons = req.migrationRound && !req.preDump
      ? []
      : await judgeWritten(dir, inventory, pstree, contexts, verdictOptions);
    if (reasons.length && !options.leaveRunning) throw refuseToEnd(reasons[0]);
    log(
      `verdict ${req.migrationRound && !req.preDump ? "left to the receiver" : "taken"}: ` +
        `${(performance.now() - tree.frozenAt).toFixed(1)} ms after the freeze`,
    );
    await guard.checkpoint();
    if (options.lazySource && state.beforeCommit.length) {
      // Taken from the tree, it would be lost to it if the page source fails and it resumes.
      throw new AmberError(
        "a unix listener's backlog can only be dumped by taking it from the tree, which " +
          "must stay untouched to resume: not with --lazy-pages",
      );
    }
    // Nothing can refuse this dump any more: what can only be read by
    // taking it from the tree is taken now (no checkpoint from here on).
    if (!options.leaveRunning) { for (const take of state.beforeCommit.splice(0)) take(dir); }
    // The inventory, rewritten with the verdict and made durable only once
    // all else is, marks the images complete.
    dir.write(inventoryImage, { ...inventory, verdict: reasons });
    // The complete image is in dir.stagingPath; publishing it replaces an earlier one. A
    // stream sends it (and waits for the page server's word that it is stored).
    await dir.complete();
    if (!req.migrationRound) postDump(scripts, scriptEnv, options.leaveRunning);
  } catch (e) {
    closeSnapshots(state.kinds);
    closeHeldTrackers(state.kinds);
    const unknown = e instanceof UnknownOutcomeError;
    const kept = unknown ? state.netLock : undefined;
    if (!running) {
      disarmArmed(state.kinds);
      withContext("resuming the tree after a failed dump", () => resume(unknown));
    }
    for (const p of state.preparedPages.values()) p.file.close();
    closeParent(state);
    dir.discard();
    if (kept) {
      throw new UnknownOutcomeError(
        `${(e as Error).message}; its connections stay locked (nft table inet ${kept}): ` +
          "delete it too if the tree goes on here",
        { cause: e },
      );
    }
    throw e;
  }
  closeParent(state);
  if (req.lazyPages) {
    await serveLeftPages(req.lazyPages, tree, state, guard, log, resume, identity!);
  }
  if (!options.leaveRunning) {
    frozenMs = performance.now() - tree.frozenAt;
    tree.kill(!req.noWaitForEnd);
    // The lock stays, recorded in the inventory, until restore.
    endKinds(state, "kill");
    // A migrated tree's connections were restored under the destination's own lock, and
    // their sockets here closed in repair mode: nothing here needs this one any more.
    if (req.migrationRound && state.netLock) unlock(state.netLock);
  }
  tracker.finish();
  const stored = dir.storedBytes(tree.pids);
  return {
    pids: tree.pids,
    frozenMs,
    ...(snapshot ? { snapshot } : {}),
    totalMs: performance.now() - t0,
    pageBytes: stored.pages,
    imageBytes: stored.total,
    partMs: tracker.partMs,
    peakMemoryBytes: ownPeakMemory(),
    dir: dir.path,
  };
}
