/**
 * Incremental checkpoints without soft-dirty (this kernel has none).
 *
 * A pre-dump arms write tracking in each process: a userfaultfd made
 * inside it by injection, in async write-protect mode (UFFD_FEATURE_WP_ASYNC),
 * registered over its private anonymous mappings, which are then
 * write-protected. A write just clears a page's protection; nobody serves
 * faults. The next round reads which pages lost it with PAGEMAP_SCAN
 * (PAGE_IS_WRITTEN) and stores only those; the others come from the
 * parent image. Memory that was never protected (new mappings, other
 * kinds, a process that lost the tracker) reads as written: the fallback
 * is always a full copy, never a stale page.
 *
 * The tracker stays open in the target at a high descriptor number; the
 * fds part skips it, and the next dump closes it (a pre-dump arms a new one).
 * A pre-dump whose process still has the tracker of the round before, over
 * exactly the same mappings, keeps it instead: its PAGEMAP_SCAN protects
 * again what it reports written, in the same walk (PM_SCAN_WP_MATCHING),
 * which costs the frozen tree far less than unprotecting everything (the
 * close) and protecting it all again. The final round of a migration
 * leaves it too: the tree there is killed, or resumes and is disarmed.
 */
import { NR } from "../../ffi/inject.ts";
import {
  NR_USERFAULTFD,
  scanWritten,
  scanWrittenAndProtect,
  TRACKER_FEATURES,
  UFFD_USER_MODE_ONLY,
  UFFDIO_API,
  UFFDIO_REGISTER,
  UFFDIO_WRITEPROTECT,
  uffdioApi,
  uffdioRegister,
  uffdioWriteprotect,
  uffdProtect,
} from "../../ffi/uffd.ts";
import { Injector } from "../../ffi/inject.ts";
import { libc, SysError } from "../../ffi/libc.ts";
import { takeFd } from "../../ffi/socket.ts";
import { type DumpContext, kindState } from "../context.ts";
import { AmberError, withContext } from "../errors.ts";
import { ImageDir, publishedPath } from "../images/dir.ts";
import { inventoryImage } from "../tree/pstree.ts";
import { putBytes } from "../scratch.ts";
import { listProcNumbers, readProcLink, readProcText } from "../proc/read.ts";
import { type MappingImage, mappingLabel, PAGE } from "./mappings.ts";
import { seizeTree } from "../tree/seize.ts";
import { type ScanAhead, writtenWithin } from "./scanahead.ts";

const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;
const F_DUPFD_CLOEXEC = 1030;
/** Parents followed at most: a longer chain is a loop or a mistake. */
export const MAX_CHAIN = 64;

/** [first page, end page) by page number (addresses / 4096 fit a Number). */
export type Span = [number, number];

/** What a pre-dump records so the next round can trust the tracker it finds. */
export interface TrackerRecord {
  fd: number;
  ino: number;
  /** The process's start time (/proc/PID/stat field 22): a reused pid is another process. */
  starttime: number;
}

/** The earlier image a round builds on (--prev-images-dir), opened and checked. */
export interface Parent {
  /** As given: relative to the new images directory unless absolute. */
  path: string;
  dir: ImageDir;
  createdAt: string;
}

/** What this dump does about tracking, for the whole tree (kind state "tracking"). */
export interface TrackingState {
  /** Arm tracking after copying (pre-dump). */
  arm: boolean;
  parent?: Parent;
  /** Trackers armed by this run: closed again if it fails. */
  armed: { pid: number; fd: number; injector: Injector }[];
  /** amber's own copies of new trackers, protecting their memory once the tree runs. */
  held?: Set<number>;
  log: (line: string) => void;
  /** Leave the tracker a process has (a migration's final round: see the top). */
  keepOld?: boolean;
  /** Processes whose tracker the scan protected again, to be kept as they are (see the top). */
  rearmed?: Map<number, TrackerRecord>;
}

export function trackingState(kinds: Map<string, unknown>): TrackingState {
  return kindState(kinds, "tracking", () => ({ arm: false, armed: [], log: () => {} }));
}

/** Resolves a parent path (CRIU's --prev-images-dir is relative to the images directory). */
export function parentPath(imagesDir: string, path: string): string {
  return path.startsWith("/") ? path : `${publishedPath(imagesDir)}/${path}`;
}

/**
 * Opens a parent images directory with the same checks as any images
 * directory (a stream's parent is one it was told of, lib/migrate.ts).
 */
export function openParent(imagesDir: string | ImageDir, path: string): Parent {
  const dir = typeof imagesDir === "string"
    ? new ImageDir(parentPath(imagesDir, path))
    : imagesDir.parentImages(path);
  if (!dir.has("inventory.cbor")) {
    dir.close();
    throw new AmberError(
      `parent images ${dir.path}: not a complete images directory (no inventory.cbor)`,
    );
  }
  return { path, dir, createdAt: dir.read(inventoryImage).createdAt };
}

/**
 * Bits fdinfo shows beyond those asked for: the kernel's "initialized"
 * (31) and WP_UNPOPULATED (13), which WP_ASYNC turns on.
 */
const IMPLIED_FEATURES = (1n << 31n) | (1n << 13n);

function starttime(pid: number): number {
  const text = readProcText(pid, "stat");
  return Number(text.slice(text.lastIndexOf(")") + 2).split(" ")[19]);
}

/** The features field of a userfaultfd's fdinfo ("API:\taa:FEATURES:IOCTLS"). */
function uffdFeatures(pid: number, fd: number): bigint | undefined {
  const m = /^API:\s*[0-9a-f]+:([0-9a-f]+):/m.exec(readProcText(pid, `fdinfo/${fd}`));
  return m ? BigInt("0x" + m[1]) : undefined;
}

/** amber's tracker in `pid`, if it has one: a userfaultfd with exactly amber's features. */
export function findTracker(pid: number): { fd: number; ino: number } | undefined {
  for (const fd of listProcNumbers(pid, "fd")) {
    try {
      if (readProcLink(pid, `fd/${fd}`) !== "anon_inode:[userfaultfd]") continue;
      if (((uffdFeatures(pid, fd) ?? 0n) & ~IMPLIED_FEATURES) !== TRACKER_FEATURES) continue;
      return { fd, ino: Deno.statSync(`/proc/${pid}/fd/${fd}`).ino ?? 0 };
    } catch { /* closed meanwhile */ }
  }
}

/** The fd the fds part must leave out of `pid`'s images, if any. */
export function trackerFd(pid: number): number | undefined {
  return findTracker(pid)?.fd;
}

/** Memory a tracker protects: private anonymous mappings. */
export function tracked(m: MappingImage): boolean {
  return m.kind === "anon" && !m.shared;
}

function spansOfRuns(runs: { addr: bigint; pages: number }[]): Span[] {
  return runs.map((r) => {
    const s = Number(r.addr / PAGE);
    return [s, s + r.pages];
  });
}

/** Sorted, merged union. */
export function union(...lists: Span[][]): Span[] {
  const all = lists.flat().sort((a, b) => a[0] - b[0]);
  const out: Span[] = [];
  for (const [s, e] of all) {
    const last = out[out.length - 1];
    if (last && s <= last[1]) last[1] = Math.max(last[1], e);
    else out.push([s, e]);
  }
  return out;
}

/** a ∩ b; both sorted and disjoint. Keeps a's boundaries. */
export function intersect(a: Span[], b: Span[]): Span[] {
  const out: Span[] = [];
  let j = 0;
  for (const [s, e] of a) {
    while (j < b.length && b[j][1] <= s) j++;
    for (let k = j; k < b.length && b[k][0] < e; k++) {
      const lo = Math.max(s, b[k][0]), hi = Math.min(e, b[k][1]);
      if (lo < hi) out.push([lo, hi]);
    }
  }
  return out;
}

/** a \ b; both sorted and disjoint. Keeps a's boundaries. */
export function subtract(a: Span[], b: Span[]): Span[] {
  const out: Span[] = [];
  let j = 0;
  for (const [s, e] of a) {
    while (j < b.length && b[j][1] <= s) j++;
    let at = s;
    for (let k = j; k < b.length && b[k][0] < e; k++) {
      if (b[k][0] > at) out.push([at, b[k][0]]);
      at = Math.max(at, b[k][1]);
    }
    if (at < e) out.push([at, e]);
  }
  return out;
}

export function spansToRuns(spans: Span[]): { addr: bigint; pages: number }[] {
  return spans.map(([s, e]) => ({ addr: BigInt(s) * PAGE, pages: e - s }));
}

export function runsToSpans(runs: { addr: bigint; pages: number }[]): Span[] {
  return spansOfRuns(runs);
}

/** What a parent image holds for one process (its pagemap and mappings images). */
export interface ParentPages {
  runs: { addr: bigint; pages: number }[];
  parentRuns?: { addr: bigint; pages: number }[];
  tracking?: TrackerRecord;
  mappings: MappingImage[];
}

/**
 * Splits the pages to store into those the parent already holds (not
 * written since, in a mapping that is still the same) and those to copy.
 */
export function splitAgainstParent(
  ctx: DumpContext,
  runs: { addr: bigint; pages: number }[],
  mappings: MappingImage[],
  parent: ParentPages | undefined,
  ahead?: ScanAhead,
): { own: Span[]; fromParent: Span[] } {
  const all = spansOfRuns(runs);
  const full = { own: all, fromParent: [] };
  const st = trackingState(ctx.tree.kinds);
  if (!parent) return full;
  const tracker = findTracker(ctx.pid);
  const rec = parent.tracking;
  if (!tracker || !rec || tracker.fd !== rec.fd || tracker.ino !== rec.ino) {
    st.log(`pid ${ctx.pid}: no write tracking from ${st.parent?.path}: all pages copied`);
    return full;
  }
  if (rec.starttime !== starttime(ctx.pid)) return full;
  const same = mappings.filter((m) =>
    tracked(m) &&
    parent.mappings.some((p) =>
      p.start === m.start && p.end === m.end && tracked(p) && p.path === m.path
    )
  );
  const written: Span[] = [];
  const ranges = same.map((m): [bigint, bigint] => [m.start, m.end]);
  const got = withContext(
    "PAGEMAP_SCAN",
    () => scanForRound(ctx, st, rec, mappings, same, ranges, ahead),
  );
  for (const [s, e] of got) written.push([Number(s / PAGE), Number((e + PAGE - 1n) / PAGE)]);
  const held = union(spansOfRuns(parent.runs), spansOfRuns(parent.parentRuns ?? []));
  const unchanged = subtract(
    intersect(
      spansOfRuns(same.map((m) => ({
        addr: m.start,
        pages: Number((m.end - m.start) / PAGE),
      }))),
      held,
    ),
    union(written),
  );
  const fromParent = intersect(all, unchanged);
  return { own: subtract(all, fromParent), fromParent };
}

/**
 * The written parts of `ranges`. A migration's pre-copy round whose every tracked mapping is
 * one of the tracker's (`same`) protects them again as it reads them and
 * keeps the tracker; a range the kernel says is not tracked reads as
 * written, and the next round gets a new tracker.
 */
function scanForRound(
  ctx: DumpContext,
  st: TrackingState,
  rec: TrackerRecord,
  mappings: MappingImage[],
  same: MappingImage[],
  ranges: [bigint, bigint][],
  ahead: ScanAhead | undefined,
): [bigint, bigint][] {
  // (Only a migration's pre-copy round: it copies after the tracker is armed, never a snapshot.)
  const keeps = st.arm && ctx.options.copyWhileRunning;
  if (!keeps || mappings.filter(tracked).length !== same.length) {
    // What the walk begun at the freeze saw; the rest walked now.
    const seen = ranges.map(([s, e]) => writtenWithin(ahead, s, e));
    const rest = scanWritten(ctx.pid, ranges.filter((_, i) => !seen[i]));
    return [...seen.flatMap((w) => w ?? []), ...rest].sort((a, b) => a[0] < b[0] ? -1 : 1);
  }
  const got = scanWrittenAndProtect(ctx.pid, ranges);
  const whole = got.every((g) => g !== undefined);
  if (whole) (st.rearmed ??= new Map()).set(ctx.pid, rec);
  return got.flatMap((g, i) => g ?? [ranges[i]]);
}

/** Runs an ioctl on the tracker with a struct put in scratch. */
function uffdIoctl(ctx: DumpContext, name: string, fd: number, req: bigint, arg: Uint8Array) {
  const addr = putBytes(ctx.pid, ctx.scratch, arg);
  return ctx.injector.call(name, NR.ioctl, fd, req, addr);
}

/** A descriptor number high under the process's RLIMIT_NOFILE, where programs rarely look. */
function parkTracker(ctx: DumpContext, fd: number): number {
  const limits = readProcText(ctx.pid, "limits");
  const soft = Number(/^Max open files\s+(\d+)/m.exec(limits)?.[1] ?? 1024);
  const top = Math.min(soft, 4096) - 1;
  for (const floor of [top, Math.floor(top / 2), 3]) {
    const r = ctx.injector.raw(NR.fcntl, fd, F_DUPFD_CLOEXEC, floor);
    if (r >= 0n) {
      ctx.injector.call("close", NR.close, fd);
      return Number(r);
    }
  }
  return fd;
}

/** Makes the tracker inside the process: userfaultfd, UFFDIO_API with WP_ASYNC. */
function makeTracker(ctx: DumpContext): number {
  let r = ctx.injector.raw(NR_USERFAULTFD, O_CLOEXEC | O_NONBLOCK);
  // vm.unprivileged_userfaultfd=0: user-mode only still tracks (async needs no handler).
  if (r === -1n) r = ctx.injector.raw(NR_USERFAULTFD, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
  if (r < 0n) throw new SysError("userfaultfd", Number(-r));
  const fd = Number(r);
  try {
    uffdIoctl(ctx, "ioctl(UFFDIO_API)", fd, UFFDIO_API, uffdioApi());
    return parkTracker(ctx, fd);
  } catch (e) {
    ctx.injector.raw(NR.close, fd);
    throw e;
  }
}

/**
 * After the pages are copied: closes the tracker the process had (it has
 * been read) and, for a pre-dump, arms a new one over every private
 * anonymous mapping. Returns what the image records about it.
 */
export function retrack(ctx: DumpContext, mappings: MappingImage[]): TrackerRecord | undefined {
  const st = trackingState(ctx.tree.kinds);
  const old = findTracker(ctx.pid);
  // A plain dump leaves it: a later --track-mem round may still build on its pre-dump.
  if (!st.arm && (!st.parent || st.keepOld)) return undefined;
  const kept = st.arm && old ? st.rearmed?.get(ctx.pid) : undefined;
  if (kept && old && kept.fd === old.fd && kept.ino === old.ino) {
    // Protected again by the scan: armed by this run as much as a new one.
    st.armed.push({ pid: ctx.pid, fd: old.fd, injector: ctx.injector });
    st.log(`pid ${ctx.pid}: write tracking kept (fd ${old.fd}, protected again by the scan)`);
    return kept;
  }
  if (old) ctx.injector.call("close tracker", NR.close, old.fd);
  if (!st.arm) return undefined;
  return withContext("arming write tracking", () => {
    const t0 = performance.now();
    const fd = makeTracker(ctx);
    st.armed.push({ pid: ctx.pid, fd, injector: ctx.injector });
    // A first round that copies once the tree runs protects the memory then, before the
    // copy, from amber's copy of the tracker: a walk of every page table entry (~15 ms for
    // 256 MiB, far more on a busy machine) not within the freeze. A page written between
    // the resume and its protection is copied after both, and one not copied (absent at
    // the freeze) is in no parent, so the next round sends it: nothing is missed. (Not in a
    // round with a parent: a page the parent holds, written in that window, would be lost.)
    const later = ctx.options.copyWhileRunning && !st.parent ? takeFd(ctx.pid, fd) : undefined;
    const protect: MappingImage[] = [];
    if (later !== undefined) (st.held ??= new Set()).add(later);
    for (const m of mappings.filter(tracked)) {
      // A mapping that cannot be registered (another tracker's, VM_IO...) reads as written.
      const addr = putBytes(ctx.pid, ctx.scratch, uffdioRegister(m.start, m.end));
      if (ctx.injector.raw(NR.ioctl, fd, UFFDIO_REGISTER, addr) < 0n) {
        st.log(`pid ${ctx.pid}: ${mappingLabel(m)}: not tracked (UFFDIO_REGISTER failed)`);
        continue;
      }
      if (later !== undefined) {
        protect.push(m);
        continue;
      }
      withContext(
        mappingLabel(m),
        () =>
          uffdIoctl(
            ctx,
            "ioctl(UFFDIO_WRITEPROTECT)",
            fd,
            UFFDIO_WRITEPROTECT,
            uffdioWriteprotect(m.start, m.end),
          ),
      );
    }
    if (later !== undefined) {
      ctx.tree.afterResume.push(() => {
        try {
          protectRunning(ctx.pid, later, protect, st.log);
        } finally {
          closeHeld(st, later);
        }
        return Promise.resolve();
      });
    }
    const ino = Deno.statSync(`/proc/${ctx.pid}/fd/${fd}`).ino ?? 0;
    st.log(
      `pid ${ctx.pid}: write tracking armed (fd ${fd}) in ${
        (performance.now() - t0).toFixed(1)
      } ms`,
    );
    return { fd, ino, starttime: starttime(ctx.pid) };
  });
}

/**
 * Write-protects the registered mappings of a running process through
 * amber's copy of its tracker. One that changed since (unmapped, moved)
 * fails alone: unprotected, its pages read as written to the next round.
 */
function protectRunning(
  pid: number,
  fd: number,
  mappings: MappingImage[],
  log: (line: string) => void,
): void {
  for (const m of mappings) {
    try {
      uffdProtect(fd, m.start, m.end, true);
    } catch (e) {
      log(`pid ${pid}: ${mappingLabel(m)}: not protected: ${e instanceof Error ? e.message : e}`);
    }
  }
}

function closeHeld(st: TrackingState, fd: number): void {
  if (st.held?.delete(fd)) libc().close(fd);
}

/** amber's copies of the trackers, once they are of no more use (or the dump failed). */
export function closeHeldTrackers(kinds: Map<string, unknown>): void {
  const st = kinds.get("tracking") as TrackingState | undefined;
  for (const fd of [...st?.held ?? []]) closeHeld(st!, fd);
}

/** A failed dump closes the trackers it armed: nothing is left in the tree. */
export function disarmArmed(kinds: Map<string, unknown>): void {
  const st = kinds.get("tracking") as TrackingState | undefined;
  closeHeldTrackers(kinds);
  for (const a of st?.armed.splice(0) ?? []) {
    try {
      a.injector.raw(NR.close, a.fd);
      a.injector.end();
    } catch { /* the process is gone */ }
  }
}

/**
 * Closes amber's trackers in a tree no round will build on any more (a
 * migration that failed after its pre-copy rounds): frozen for the few
 * injected closes, then it runs on as it did before the first round.
 */
export function disarmTree(rootPid: number): void {
  const tree = seizeTree(rootPid);
  try {
    for (const p of tree.processes.filter((p) => !p.zombie)) {
      const t = findTracker(p.pid);
      if (!t) continue;
      const inj = Injector.forThread(p.threads[0], p.pid).begin();
      try {
        inj.raw(NR.close, t.fd);
      } finally {
        inj.end();
      }
    }
  } finally {
    tree.release();
  }
}
