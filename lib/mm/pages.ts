/**
 * Memory contents. Only pages that exist are stored (per /proc/PID/pagemap),
 * raw, back to back in `pages-PID.img`; the CBOR `pagemap-PID` image lists
 * the virtual ranges they belong to, in file order.
 *
 * What is stored, per mapping:
 * - private anonymous (heap, stack, malloc arenas) and shared anonymous
 *   memory: every present or swapped page;
 * - private file-backed mappings: only pages that no longer come from the
 *   file, i.e. present without the "file page" bit (copy-on-write copies
 *   made by writes, relocations, ...) or swapped out; untouched pages are
 *   read from the file again at restore;
 * - shared file mappings: nothing, the file holds the data;
 * - [vdso]/[vvar]/[vsyscall]: nothing, the kernel provides them.
 */
import { forEachConcurrently } from "../concurrently.ts";
import { z } from "zod";
import { alignedBuffer, dataRanges, RawFile } from "../../ffi/rawfile.ts";
import {
  IOV_MAX,
  readMemoryProc,
  readRangesAsync,
  type RemoteRange,
  writeMemory,
  writeRangesAsync,
} from "../../ffi/memory.ts";
import { definePart, type DumpContext, kindState, type PrecheckContext } from "../context.ts";
import { type BulkFile, ImageDir } from "../images/dir.ts";
import { AmberError, faultPoint, withContext, withContextAsync } from "../errors.ts";
import { MAX_IMAGE_BYTES, u64 } from "../images/codec.ts";
import { hasProcessImage, readProcessImage } from "../images/process.ts";
import { regionsWithin, type ScanAhead, scanAhead } from "./scanahead.ts";
import {
  fillsThroughMem,
  type MappingImage,
  mappingLabel,
  PAGE,
  receivesPages,
} from "./mappings.ts";
import {
  intersect,
  MAX_CHAIN,
  openParent,
  type ParentPages,
  retrack,
  runsToSpans,
  type Span,
  spansToRuns,
  splitAgainstParent,
  subtract,
  trackingState,
  union,
} from "./tracking.ts";
import { trackerIn } from "../progress.ts";
import { clipMissing, fileSource, isLazy, LazyPages } from "./lazy.ts";
import { libc } from "../../ffi/libc.ts";
import { PAGE_IS_PRESENT, PAGE_IS_SWAPPED, scanPages } from "../../ffi/uffd.ts";
import { addSnapshot, startSnapshot } from "./snapshot.ts";

// Pagemap flag bits, as bits of each entry's high 32-bit word (63, 62, 61).
const PM_PRESENT = 0x80000000;
const PM_SWAP = 0x40000000;
const PM_FILE = 0x20000000;
const PM_UFFD_WP = 0x02000000;
/**
 * Swap type 31 in the low word: not swap but the kernel's marker for an
 * empty page under userfaultfd write-protect (write tracking, lib/mm/tracking.ts).
 */
const SWAP_TYPE_MASK = 0x1f;

/** An entry that is a write-protect marker on an empty page, not a swapped-out page. */
function isMarker(high: number, low: number): boolean {
  return (high & PM_UFFD_WP) !== 0 && (low & SWAP_TYPE_MASK) === SWAP_TYPE_MASK;
}
const PAGE_SIZE = Number(PAGE);
/** Bytes per transfer (one process_vm_readv/writev and one file I/O); WORKERS (or DIRECT_WORKERS) in flight. */
const CHUNK_BYTES = 4 * 1024 * 1024;

/** Pages in a 47-bit user address space: no run or process holds more. */
const MAX_PAGES = 2 ** 35;
const Run = z.object({ addr: u64, pages: z.number().int().min(1).max(MAX_PAGES) }).refine(
  (r) => r.addr % PAGE === 0n,
  "run address is not page-aligned",
);
export type PageRun = z.output<typeof Run>;

export function pagesFileName(pid: number): string {
  return `pages-${pid}.img`;
}

/** Which pagemap entries (high and low words) of mapping `m` hold a page to store. */
function pageFilter(m: MappingImage): (high: number, low: number) => boolean {
  if (m.kind === "anon" || m.kind === "shmem") {
    return (h, l) => (h & PM_PRESENT) !== 0 || ((h & PM_SWAP) !== 0 && !isMarker(h, l));
  }
  if (m.kind === "file" && !m.shared) {
    // (`&` yields signed 32-bit numbers: test bits against zero only.)
    return (h) => (h & PM_SWAP) !== 0 || ((h & PM_PRESENT) !== 0 && (h & PM_FILE) === 0);
  }
  return () => false;
}

/** Reads the pagemap entries of [start, end) (as 2 u32 words each, low first). */
export function readPagemap(file: Deno.FsFile, start: bigint, end: bigint): Uint32Array {
  const n = Number((end - start) / PAGE);
  const out = new Uint32Array(n * 2);
  const bytes = new Uint8Array(out.buffer);
  file.seekSync(Number(start / PAGE) * 8, Deno.SeekMode.Start);
  let done = 0;
  while (done < bytes.length) {
    const r = file.readSync(bytes.subarray(done));
    if (!r) throw new AmberError("pagemap: short read");
    done += r;
  }
  return out;
}

/**
 * Shared memory's pages, from the object itself: a page no holder has in
 * its page tables (read in by a process since gone, dropped with
 * MADV_DONTNEED) is still the memory's. The first holder stores them all;
 * the later ones map the same object again at restore.
 */
function sharedMemoryRuns(pid: number, m: MappingImage): PageRun[] | undefined {
  if (m.sharedWith !== undefined) return [];
  const path = `/proc/${pid}/map_files/${m.start.toString(16)}-${m.end.toString(16)}`;
  const from = Number(m.offset), len = Number(m.end - m.start);
  let ranges: [number, number][];
  try {
    ranges = dataRanges(path, from, from + len);
  } catch {
    // Not a shmem object (an io_uring ring, which the mappings part
    // refuses): what the process has mapped, as for other memory.
    return undefined;
  }
  return ranges.map(([a, b]) => {
    const start = Math.floor(a / PAGE_SIZE) * PAGE_SIZE;
    const end = Math.ceil(b / PAGE_SIZE) * PAGE_SIZE;
    return { addr: m.start + BigInt(start - from), pages: (end - start) / PAGE_SIZE };
  });
}

/** The runs of pages to store for each mapping, in address order. */
export function planRuns(pid: number, mappings: MappingImage[], ahead?: ScanAhead): PageRun[] {
  const runs: PageRun[] = [];
  using pm = Deno.openSync(`/proc/${pid}/pagemap`, { read: true });
  const present = presentRegions(pid, mappings, ahead);
  for (const m of mappings) {
    if (!receivesPages(m)) continue;
    const shared = m.kind === "shmem" && m.shared ? sharedMemoryRuns(pid, m) : undefined;
    if (shared) {
      runs.push(...shared);
      continue;
    }
    const regions = present.get(m);
    if (regions) {
      // (A run never spans two mappings: restore checks each lies in one.)
      const own: PageRun[] = [];
      for (const [start, end, swapped] of regions) {
        if (swapped) own.push(...entryRuns(pm, m, start, end));
        else appendRun(own, start, Number((end - start) / PAGE));
      }
      runs.push(...own);
      continue;
    }
    runs.push(...entryRuns(pm, m, m.start, m.end));
  }
  return runs;
}

/** Adds a run, merged into the last one when they touch. */
function appendRun(runs: PageRun[], addr: bigint, pages: number): void {
  const last = runs[runs.length - 1];
  if (last && last.addr + BigInt(last.pages) * PAGE === addr) last.pages += pages;
  else runs.push({ addr, pages });
}

/**
 * Private anonymous mappings' present or swapped regions, by PAGEMAP_SCAN
 * (the kernel walks the page tables: ~4x faster than reading and scanning
 * pagemap at 2 GiB, and this runs frozen). A region with swapped pages is
 * looked at entry by entry (a write-protect marker also reads as swapped).
 * Those the walk begun at the freeze covered (lib/mm/scanahead.ts) are
 * not walked again.
 */
function presentRegions(
  pid: number,
  mappings: MappingImage[],
  ahead: ScanAhead | undefined,
): Map<MappingImage, [bigint, bigint, boolean][]> {
  const out = new Map<MappingImage, [bigint, bigint, boolean][]>();
  const anon = mappings.filter((m) => {
    if (m.kind !== "anon" || m.shared || !receivesPages(m)) return false;
    const seen = regionsWithin(ahead, m.start, m.end);
    if (seen) out.set(m, seen.map(([s, e, cat]) => [s, e, (cat & PAGE_IS_SWAPPED) !== 0n]));
    return !seen;
  });
  const found = withContext(
    "PAGEMAP_SCAN",
    () =>
      scanPages(pid, anon.map((m) => [m.start, m.end]), {
        all: 0n,
        any: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        returned: PAGE_IS_SWAPPED,
      }),
  );
  for (const m of anon) out.set(m, []);
  let i = 0;
  for (const [start, end, cat] of found) {
    while (anon[i].end <= start) i++;
    out.get(anon[i])!.push([start, end, cat !== 0n]);
  }
  return out;
}

/** The runs of [start, end) of mapping `m`, from its pagemap entries. */
function entryRuns(pm: Deno.FsFile, m: MappingImage, start: bigint, end: bigint): PageRun[] {
  const runs: PageRun[] = [];
  const entries = withContext(
    `${mappingLabel(m)}: pagemap`,
    () => readPagemap(pm, start, end),
  );
  const stores = pageFilter(m);
  const pages = entries.length / 2;
  let runStart = -1;
  for (let i = 0; i <= pages; i++) {
    // Numbers, not BigInt: this runs once per page of the address space.
    const keep = i < pages && stores(entries[2 * i + 1], entries[2 * i]);
    if (keep && runStart < 0) runStart = i;
    if (!keep && runStart >= 0) {
      runs.push({ addr: start + BigInt(runStart) * PAGE, pages: i - runStart });
      runStart = -1;
    }
  }
  return runs;
}

/** A run with its place in the pages file. */
interface Placed {
  addr: bigint;
  len: number;
  fileOff: number;
}

/** What one transfer moves: file-contiguous ranges, at most CHUNK_BYTES and IOV_MAX of them. */
interface Chunk {
  fileOff: number;
  bytes: number;
  ranges: RemoteRange[];
}

/** Gives each run its offset in the pages file (runs are stored back to back). */
function place(runs: PageRun[]): Placed[] {
  let fileOff = 0;
  return runs.map((r) => {
    const p = { addr: r.addr, len: r.pages * PAGE_SIZE, fileOff };
    fileOff += p.len;
    return p;
  });
}

/** Cuts runs into chunks; a chunk never spans a gap in the file. */
function chunks(runs: Placed[]): Chunk[] {
  const out: Chunk[] = [];
  let cur: Chunk | undefined;
  for (const r of runs) {
    let addr = r.addr, fileOff = r.fileOff, left = r.len;
    while (left > 0) {
      if (
        !cur || cur.bytes === CHUNK_BYTES || cur.ranges.length === IOV_MAX ||
        cur.fileOff + cur.bytes !== fileOff
      ) {
        cur = { fileOff, bytes: 0, ranges: [] };
        out.push(cur);
      }
      const len = Math.min(left, CHUNK_BYTES - cur.bytes);
      cur.ranges.push({ addr, len });
      cur.bytes += len;
      addr += BigInt(len);
      fileOff += len;
      left -= len;
    }
  }
  return out;
}

/** Transfers in flight at once: enough to keep both cores copying. */
const WORKERS = 3;
/**
 * Transfers in flight to or from a file opened O_DIRECT: there the disk is
 * the limit, and it goes faster with more requests queued (1 GiB here,
 * interleaved runs, medians: a dump's page write with 8 writers in an
 * allocated file 1.1 s against 1.7 s with 3 in a growing one at load ~12,
 * 1.1 against 1.2 s at load ~7; restore's fill with 8 readers 1.6 s against 1.9 s with 3
 * at load ~7, though 2.4 against 1.9 s at load ~12, the cores then short).
 */
const DIRECT_WORKERS = 8;

/**
 * Runs `move(chunk, buffer)` over all chunks with `workers` workers, each
 * with its own reused buffer; waits for every worker even when one fails.
 */
async function transfer(
  list: Chunk[],
  move: (c: Chunk, buf: Uint8Array, index: number) => Promise<void>,
  workers = WORKERS,
): Promise<void> {
  const size = Math.max(0, ...list.map((c) => c.bytes));
  await forEachConcurrently(list, workers, () => {
    const buf = alignedBuffer(size);
    return (c, i) => move(c, buf.subarray(0, c.bytes), i);
  });
}

function mappingAt(mappings: MappingImage[], addr: bigint): MappingImage | undefined {
  return mappings.find((x) => x.start <= addr && addr < x.end);
}

function labelFor(mappings: MappingImage[], addr: bigint): string {
  const m = mappingAt(mappings, addr);
  return m ? mappingLabel(m) : `address ${addr.toString(16)}`;
}

/**
 * Fills `buf` from ranges one by one, falling back to /proc/PID/mem, to
 * name what faulted. `running`: a migration's pre-copy round, copying
 * while the tree runs, for which memory unmapped since the freeze reads
 * as zeros (whatever is mapped there later is not the tracked mapping,
 * and reads as written to the next round).
 */
function readSlowly(
  pid: number,
  ranges: RemoteRange[],
  buf: Uint8Array,
  mappings: MappingImage[],
  running = false,
) {
  let off = 0;
  for (const r of ranges) {
    withContext(labelFor(mappings, r.addr), () => {
      try {
        buf.set(readMemoryProc(pid, r.addr, r.len), off);
      } catch {
        if (running) buf.fill(0, off, off + r.len);
        else throw new AmberError("process_vm_readv: EFAULT");
      }
    });
    off += r.len;
  }
}

/**
 * A pages file written full of zeros before the tree is frozen, as large
 * as the process's anonymous memory: growing the page cache is the slowest
 * part of a dump on our VMs, and this way it happens while the process
 * still runs. The copy under freeze then overwrites pages that exist.
 */
export interface PreparedPages {
  file: BulkFile;
  size: number;
  commit: () => void;
  /** Closes and removes it (its process was not dumped after all). */
  drop: () => void;
}

/** Below this, preparing saves less than it costs. */
const PREPARE_MIN_BYTES = 32 * 1024 * 1024;

/** Anonymous, swapped and shared-memory kB of /proc/PID/smaps_rollup, in bytes. */
function anonymousBytes(pid: number): number {
  let text: string;
  try {
    text = Deno.readTextFileSync(`/proc/${pid}/smaps_rollup`);
  } catch {
    return 0; // gone, or a kernel thread: nothing to prepare
  }
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? 0);
  return (kb("Anonymous") + kb("Swap") + kb("Pss_Shmem")) * 1024;
}

/** Prepares the pages file of a process about to be dumped (see {@link PreparedPages}). */
export async function preparePages(dir: ImageDir, pid: number): Promise<PreparedPages | undefined> {
  const estimate = Math.ceil(anonymousBytes(pid) / CHUNK_BYTES) * CHUNK_BYTES;
  if (estimate < PREPARE_MIN_BYTES) return undefined;
  const { file, commit, drop } = dir.reserve(pagesFileName(pid));
  const list = Array.from(
    { length: estimate / CHUNK_BYTES },
    (_, i) => ({ fileOff: i * CHUNK_BYTES, bytes: CHUNK_BYTES, ranges: [] }),
  );
  try {
    // The workers' buffers are still all zeros: nothing is read into them here.
    await transfer(list, (c, zeros) => file.pwriteAll(zeros, c.fileOff));
  } catch (e) {
    file.close();
    drop();
    throw e;
  }
  return { file, size: estimate, commit, drop: () => (file.close(), drop()) };
}

/**
 * Copies the planned runs into the pages file; returns bytes stored and
 * whether it went past the page cache. Under `dump -R` with a prepared
 * file, the private anonymous runs are left to the snapshot
 * (lib/mm/snapshot.ts), copied after the tree resumes.
 */
export async function copyPages(
  ctx: DumpContext,
  runs: PageRun[],
  mappings: MappingImage[],
): Promise<{ bytes: number; direct: boolean }> {
  const prepared = ctx.tree.preparedPages.get(ctx.pid);
  ctx.tree.preparedPages.delete(ctx.pid);
  const { file, commit } = prepared ?? ctx.dir.reserve(pagesFileName(ctx.pid));
  // A tree that dies after the dump waits for the disk anyway: straight to
  // it, without growing the page cache (the slow part here) or writing twice.
  const direct = !prepared && !ctx.options.leaveRunning && file.setDirect();
  const placed = place(runs);
  const total = placed.reduce((s, p) => s + p.len, 0);
  const finish = () => {
    // A prepared file may be larger than what was stored.
    if (prepared && prepared.size > total) file.truncate(total);
    file.close();
    commit();
  };
  const owners = ownersOf(placed, mappings);
  const holding = new Set(owners);
  const snap = prepared && !trackingState(ctx.tree.kinds).arm
    ? startSnapshot(ctx, mappings, (m) => holding.has(m))
    : undefined;
  const registered = new Set(snap?.registered);
  const later = (_: Placed, i: number) => registered.has(owners[i]!);
  const now = placed.filter((p, i) => !later(p, i));
  const tracker = trackerIn(ctx.tree.kinds);
  tracker?.addTotal(total);
  try {
    // Allocated ahead, the direct writes are overwrites, which run in parallel (twice as
    // fast here), and a disk too full for the pages fails the dump before the copy.
    if (direct) withContext(`image ${pagesFileName(ctx.pid)}`, () => file.allocate?.(total));
    await copyNow(ctx, chunks(now), file, mappings, direct);
  } catch (e) {
    file.close();
    if (snap) libc().close(snap.uffd);
    throw e;
  }
  if (!snap) {
    finish();
    return { bytes: total, direct };
  }
  const deferred = placed.filter(later);
  addSnapshot(ctx, {
    pid: ctx.pid,
    uffd: snap.uffd,
    file,
    finish,
    mappings,
    protect: deferred.map((p) => ({ addr: p.addr, len: p.len })),
    chunks: chunks(deferred),
  });
  return { bytes: total, direct };
}

/** The mapping each run lies in (both sorted by address: one walk). */
function ownersOf(runs: Placed[], mappings: MappingImage[]): (MappingImage | undefined)[] {
  let j = 0;
  return runs.map((r) => {
    while (j < mappings.length && mappings[j].end <= r.addr) j++;
    const m = mappings[j];
    return m && m.start <= r.addr ? m : undefined;
  });
}

/** The frozen copy of `list` into `file` (left open). */
async function copyNow(
  ctx: DumpContext,
  list: Chunk[],
  file: BulkFile,
  mappings: MappingImage[],
  direct: boolean,
) {
  const tracker = trackerIn(ctx.tree.kinds);
  await transfer(list, async (c, buf, i) => {
    try {
      const running = ctx.options.copyWhileRunning;
      // (EFAULT on the first range: unmapped since the freeze, for a round that copies running.)
      const got = await readRangesAsync(ctx.pid, c.ranges, buf).catch((e) => {
        if (running) return -1;
        throw e;
      });
      if (got !== c.bytes) readSlowly(ctx.pid, c.ranges, buf, mappings, running);
      if (i === Math.floor(list.length / 2)) faultPoint("mid-pages");
    } catch (e) {
      // A stream waits for this chunk before the next ones: they must not wait forever.
      file.abort?.(e);
      throw e;
    }
    await file.pwriteAll(buf, c.fileOff);
    tracker?.pages(c.bytes);
  }, direct ? DIRECT_WORKERS : WORKERS);
}

/**
 * Fills the restored mappings from the pages file: amber reads the file
 * and writes into the process with process_vm_writev, several chunks at a
 * time; mappings the process cannot write go through /proc/PID/mem.
 * A preadv injected into the process (one copy, in the kernel) was slower
 * here, alone or beside these workers: the disk is the limit, and one
 * blocking call at a time in the process faults its pages in serially.
 */
async function fillPages(
  pid: number,
  placed: Placed[],
  file: RawFile,
  mappings: MappingImage[],
  direct: boolean,
  moved?: (bytes: number) => void,
): Promise<void> {
  const viaMem = (r: Placed) => {
    const m = mappingAt(mappings, r.addr);
    return !!m && fillsThroughMem(m);
  };
  try {
    await transfer(chunks(placed.filter((r) => !viaMem(r))), async (c, buf) => {
      await file.preadAll(buf, c.fileOff);
      const label = labelFor(mappings, c.ranges[0].addr);
      const n = await withContextAsync(label, () => writeRangesAsync(pid, c.ranges, buf));
      if (n !== c.bytes) throw new AmberError(`${label}: process_vm_writev: EFAULT`);
      moved?.(c.bytes);
    }, direct ? DIRECT_WORKERS : WORKERS);
    await transfer(chunks(placed.filter(viaMem)), async (c, buf) => {
      await file.preadAll(buf, c.fileOff);
      let off = 0;
      for (const r of c.ranges) {
        const data = buf.subarray(off, off + r.len);
        withContext(labelFor(mappings, r.addr), () => writeMemory(pid, r.addr, data));
        off += r.len;
      }
      moved?.(c.bytes);
    });
  } finally {
    file.close();
  }
}

/** The parts of the runs' pages that lie in `take` (sorted, disjoint), with their file offsets. */
function placeWithin(runs: PageRun[], take: Span[]): Placed[] {
  return place(runs).flatMap((p) => {
    const s = Number(p.addr / PAGE);
    return intersect([[s, s + p.len / PAGE_SIZE]], take).map(([a, b]) => ({
      addr: BigInt(a) * PAGE,
      len: (b - a) * PAGE_SIZE,
      fileOff: p.fileOff + (a - s) * PAGE_SIZE,
    }));
  });
}

/** The spans (page numbers) of the mappings restore serves lazily. */
function lazySpansOf(mappings: MappingImage[]): Span[] {
  return union(
    mappings.filter(isLazy).map((m): Span => [Number(m.start / PAGE), Number(m.end / PAGE)]),
  );
}

/**
 * Pages left in the dumped tree (dump --lazy-pages) lie in lazy mappings
 * only, apart from the stored ones, and need the dumping amber to serve them.
 */
function checkRemoteRuns(image: PagemapImage, ctx: PrecheckContext): void {
  const remote = union(runsToSpans(image.remoteRuns ?? []));
  if (!remote.length) return;
  const { mappings } = ctx.images.mappings as { mappings: MappingImage[] };
  const outside = subtract(remote, lazySpansOf(mappings));
  if (outside.length) {
    throw new AmberError(
      `pagemap: page ${(BigInt(outside[0][0]) * PAGE).toString(16)} left in the dumped tree ` +
        "is outside its private anonymous memory",
    );
  }
  const stored = union(runsToSpans(image.runs), runsToSpans(image.parentRuns ?? []));
  if (intersect(remote, stored).length) {
    throw new AmberError("pagemap: a page is both stored and left in the dumped tree");
  }
  if (!ctx.options.lazyPages || !ctx.options.pageSource) {
    const pages = remote.reduce((n, [a, b]) => n + b - a, 0);
    throw new AmberError(
      `${pages} pages were left in the dumped tree's memory (dump --lazy-pages): restore ` +
        "with --lazy-pages --page-server --address A --port P of the dumping amber",
    );
  }
}

const PagemapSchema = z.object({
  pagesFile: z.string().regex(/^pages-\d+\.img$/),
  runs: z.array(Run).max(MAX_PAGES),
  totalPages: z.number().int().min(0).max(MAX_PAGES),
  /** Written past the page cache: its pages are on the disk only, read them the same way. */
  direct: z.boolean().optional(),
  /**
   * The earlier image (pre-dump) holding the pages of `parentRuns`: its
   * path relative to this images directory (unless absolute), and its
   * inventory's createdAt, so a directory dumped again there is refused.
   */
  parent: z.object({ dir: z.string().min(1).max(4096), createdAt: z.string().max(100) })
    .optional(),
  /** Pages unchanged since the parent image: restored from it (or its own parents). */
  parentRuns: z.array(Run).max(MAX_PAGES).optional(),
  /**
   * Pages of lazy mappings left in the dumped tree's memory (dump
   * --lazy-pages), served by the dumping amber to restore --page-server.
   */
  remoteRuns: z.array(Run).max(MAX_PAGES).optional(),
  /** Write tracking armed in the process after this image (pre-dump), for the next round. */
  tracking: z.object({
    fd: z.number().int().min(0),
    ino: z.number().int().min(0),
    starttime: z.number().int().min(0),
  }).optional(),
});
type PagemapImage = z.output<typeof PagemapSchema>;

/** What the parent image of this dump holds for this process, if it has it. */
function parentPages(ctx: DumpContext): ParentPages | undefined {
  const parent = trackingState(ctx.tree.kinds).parent;
  if (!parent || !hasProcessImage(parent.dir, ctx.pid)) return undefined;
  const parts = readProcessImage(parent.dir, ctx.pid);
  const { mappings } = parts.mappings as { mappings: MappingImage[] };
  return { ...(parts.pagemap as PagemapImage), mappings };
}

/** One image of a chain and the pages restore takes from it. */
interface Level {
  dir: ImageDir;
  image: PagemapImage;
  placed: Placed[];
}

/**
 * Follows `image`'s parents (each opened and checked like any images
 * directory) for the pages it does not hold itself; throws if a parent is
 * missing, was replaced, or lacks pages the child says it has. The
 * caller closes the levels' directories (all but the first).
 */
function resolveChain(dir: ImageDir, pid: number, image: PagemapImage): Level[] {
  const levels: Level[] = [{ dir, image, placed: place(image.runs) }];
  let need = union(runsToSpans(image.parentRuns ?? []));
  let child = image, childDir = dir;
  try {
    while (need.length) {
      if (levels.length > MAX_CHAIN) {
        throw new AmberError(`pagemap: more than ${MAX_CHAIN} parents`);
      }
      if (!child.parent) throw new AmberError("pagemap: pages from a parent image, but no parent");
      const p = openParent(childDir, child.parent.dir);
      levels.push({ dir: p.dir, image: child, placed: [] });
      const where = `parent images ${p.dir.path}`;
      if (p.createdAt !== child.parent.createdAt) {
        throw new AmberError(`${where}: dumped again since (not the image this one builds on)`);
      }
      if (!hasProcessImage(p.dir, pid)) throw new AmberError(`${where}: no pages of pid ${pid}`);
      const pm = readProcessImage(p.dir, pid).pagemap as PagemapImage;
      const own = union(runsToSpans(pm.runs));
      const more = union(runsToSpans(pm.parentRuns ?? []));
      const missing = subtract(need, union(own, more));
      if (missing.length) {
        throw new AmberError(
          `${where}: lacks page ${(BigInt(missing[0][0]) * PAGE).toString(16)} of pid ${pid}`,
        );
      }
      const level = levels[levels.length - 1];
      level.image = pm;
      level.placed = placeWithin(pm.runs, intersect(need, own));
      need = intersect(need, more);
      child = pm;
      childDir = p.dir;
    }
  } catch (e) {
    for (const l of levels.slice(1)) l.dir.close();
    throw e;
  }
  return levels;
}

/**
 * Which image of the chain holds which of the process's pages (for show):
 * per image, its directory and the pages restore takes from it; or why
 * the chain cannot be followed.
 */
export function describeChain(
  path: string,
  pid: number,
  image: z.output<typeof PagemapSchema>,
): { dir: string; runs: number; pages: number }[] | string {
  using dir = new ImageDir(path);
  let levels: Level[];
  try {
    levels = resolveChain(dir, pid, image);
  } catch (e) {
    return e instanceof Error ? e.message : String(e);
  }
  for (const l of levels.slice(1)) l.dir.close();
  return levels.map((l) => ({
    dir: l.dir.path,
    runs: l.placed.length,
    pages: l.placed.reduce((s, p) => s + p.len / PAGE_SIZE, 0),
  }));
}

export const pagemapPart = definePart({
  name: "pagemap",
  readsMemoryLayout: true,
  maxBytes: MAX_IMAGE_BYTES,
  version: 1,
  schema: PagemapSchema,
  prefetch: scanAhead,
  async dump(ctx) {
    const { mappings } = ctx.done.mappings as { mappings: MappingImage[] };
    const ahead = await (ctx.ahead.get("pagemap") as ReturnType<typeof scanAhead> | undefined);
    const planned = planRuns(ctx.pid, mappings, ahead);
    const { own, fromParent } = splitAgainstParent(ctx, planned, mappings, parentPages(ctx), ahead);
    let runs = spansToRuns(own);
    let remoteRuns: PageRun[] | undefined;
    if (ctx.options.lazySource) {
      // Left in the frozen tree, served from there (lib/mm/remote.ts) as the destination asks.
      const lazy = lazySpansOf(mappings);
      const left = intersect(own, lazy);
      remoteRuns = spansToRuns(left);
      runs = spansToRuns(subtract(own, lazy));
      kindState(ctx.tree.kinds, "lazy-source", () => new Map<number, Span[]>()).set(ctx.pid, left);
    }
    let bytes: number, direct = false, tracking;
    if (ctx.options.copyWhileRunning) {
      // Armed first, still frozen: whatever the tree writes while its pages are copied is
      // marked written, and the next round sends it again.
      tracking = retrack(ctx, mappings);
      bytes = runs.reduce((s, r) => s + r.pages, 0) * PAGE_SIZE;
      ctx.tree.afterResume.push(async () => {
        const got = await copyPages(ctx, runs, mappings);
        if (got.bytes !== bytes) {
          throw new AmberError(`pagemap: ${got.bytes} bytes, ${bytes} planned`);
        }
      });
    } else {
      ({ bytes, direct } = await copyPages(ctx, runs, mappings));
      // The tracker read, a pre-dump arms a new one (still frozen: no write is missed).
      tracking = retrack(ctx, mappings);
    }
    const parent = trackingState(ctx.tree.kinds).parent;
    return {
      pagesFile: pagesFileName(ctx.pid),
      runs,
      totalPages: bytes / PAGE_SIZE,
      direct,
      tracking,
      ...(remoteRuns?.length ? { remoteRuns } : {}),
      ...(fromParent.length && parent
        ? {
          parent: { dir: parent.path, createdAt: parent.createdAt },
          parentRuns: spansToRuns(fromParent),
        }
        : {}),
    };
  },
  precheck(image, ctx) {
    const { pagesFile, runs, totalPages } = image;
    ctx.dir.checkData(pagesFile, totalPages * PAGE_SIZE);
    const counted = runs.reduce((s, r) => s + r.pages, 0);
    if (counted !== totalPages) {
      throw new AmberError(`pagemap: runs hold ${counted} pages, not ${totalPages}`);
    }
    const fromParent = runsToSpans(image.parentRuns ?? []);
    if (intersect(union(runsToSpans(runs)), union(fromParent)).length) {
      throw new AmberError("pagemap: a page is both in this image and in its parent");
    }
    checkRemoteRuns(image, ctx);
    const chain = ctx.options.parentsChecked ? [] : resolveChain(ctx.dir, ctx.pid, image);
    for (const l of chain.slice(1)) {
      try {
        l.dir.checkData(l.image.pagesFile, l.image.totalPages * PAGE_SIZE);
      } finally {
        l.dir.close();
      }
    }
    const { mappings } = ctx.images.mappings as { mappings: MappingImage[] };
    for (const r of [...runs, ...(image.parentRuns ?? [])]) {
      const end = r.addr + BigInt(r.pages) * PAGE;
      const m = mappings.find((x) => x.start <= r.addr && end <= x.end);
      if (!m || !receivesPages(m)) {
        throw new AmberError(
          `pagemap: run ${r.addr.toString(16)}..${
            end.toString(16)
          } is outside any writable mapping`,
        );
      }
    }
  },
  async restore(ctx, image) {
    const { mappings } = ctx.images.mappings as { mappings: MappingImage[] };
    const tracker = trackerIn(ctx.tree.kinds);
    // Oldest first is not needed: the levels' pages are disjoint.
    const levels = resolveChain(ctx.dir, ctx.pid, image);
    try {
      const lazy = ctx.options.lazyPages ? mappings.filter(isLazy) : [];
      const lazySpans = lazySpansOf(lazy);
      if (image.remoteRuns?.length) {
        // Their data is at the same address in the source process (checked in precheck).
        const lazyPages = LazyPages.of(ctx.tree.kinds, ctx.log);
        const source = lazyPages.remoteFor(ctx.pid);
        lazyPages.add(
          ctx.pid,
          lazy,
          image.remoteRuns.map((r) => ({
            start: Number(r.addr / PAGE),
            end: Number(r.addr / PAGE) + r.pages,
            fileOff: Number(r.addr),
            source,
          })),
        );
      }
      for (const l of levels) {
        const size = l.image.totalPages * PAGE_SIZE;
        const all = l.placed.map((p) => ({
          start: Number(p.addr / PAGE),
          end: Number(p.addr / PAGE) + p.len / PAGE_SIZE,
          fileOff: p.fileOff,
        }));
        const later = clipMissing(all, lazySpans, true);
        // Served by the lazy pages server after the tree runs (lib/mm/lazy.ts).
        if (later.length) {
          const source = fileSource(l.dir.openData(l.image.pagesFile, size));
          LazyPages.of(ctx.tree.kinds, ctx.log).add(
            ctx.pid,
            lazy,
            later.map((x) => ({ ...x, source })),
          );
        }
        const now = (later.length ? clipMissing(all, lazySpans, false) : all).map((x) => ({
          addr: BigInt(x.start) * PAGE,
          len: (x.end - x.start) * PAGE_SIZE,
          fileOff: x.fileOff,
        }));
        const file = l.dir.openData(l.image.pagesFile, size);
        // Parallel direct reads beat the page cache's readahead for data not in it.
        const direct = !!l.image.direct && file.setDirect();
        await fillPages(ctx.pid, now, file, mappings, direct, (n) => tracker?.pages(n));
      }
    } finally {
      for (const l of levels.slice(1)) l.dir.close();
    }
  },
});
