/**
 * The copy-on-write snapshot of `dump -R`: the tree runs again while the
 * pages of its private anonymous memory are copied, and the images still
 * hold that memory as it was at the freeze.
 *
 * While frozen, a userfaultfd is made inside each process by injection and
 * moved to amber (pidfd_getfd; the target's own descriptor is closed at
 * once, before anything is registered): amber is its only holder. amber
 * registers the process's private anonymous mappings on it in sync
 * write-protect mode and, the last thing before the tree resumes, protects
 * every page it will copy. Then, with the tree running, amber copies the
 * pages in chunks; a chunk loses its protection as soon as it has been
 * read. A thread that writes a page not yet read waits in the kernel; amber
 * reads its fault from the userfaultfd between (and beside) the copies,
 * moves that page's chunk to the front, and the chunk's read, then
 * unprotecting it, lets the thread go on.
 *
 * Safety: if amber dies, the kernel releases the userfaultfd (no other
 * holder), which unregisters the memory and wakes every waiting thread;
 * their writes then go through as ordinary ones. A failed copy closes it
 * the same way.
 *
 * What is not snapshotted but copied while frozen, as before: shared
 * memory (another process could write it), private file mappings' copied
 * pages, mappings the kernel will not register (another userfaultfd has
 * them: write tracking of a pre-dump, or the program's own), small
 * processes (no prepared pages file), incremental rounds and pre-dumps
 * (their write tracking must be armed while frozen). munmap, mremap or
 * madvise(DONTNEED) of pages not yet copied (reported as userfaultfd
 * events) fail the dump: the pages as of the freeze are gone; the tree
 * runs on unharmed.
 */
import { readRangesAsync, type RemoteRange } from "../../ffi/memory.ts";
import { NR } from "../../ffi/inject.ts";
import { libc } from "../../ffi/libc.ts";
import { getRseqConfig } from "../../ffi/ptrace.ts";
import { takeFd } from "../../ffi/socket.ts";
import {
  NR_USERFAULTFD,
  SNAPSHOT_FEATURES,
  UFFD_EVENT,
  uffdApi,
  type UffdMessage,
  uffdMessages,
  uffdProtect,
  uffdProtectAsync,
  uffdRegisterWp,
  uffdWait,
} from "../../ffi/uffd.ts";
import { alignedBuffer } from "../../ffi/rawfile.ts";
import { type DumpContext, kindState } from "../context.ts";
import { AmberError, faultPoint, withContext, withContextAsync } from "../errors.ts";
import type { BulkFile } from "../images/dir.ts";
import { trackerIn } from "../progress.ts";
import { type MappingImage, mappingLabel, PAGE } from "./mappings.ts";

const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;
/** How long one wait for faults lasts before it looks whether the copy is over. */
const WAIT_MS = 20;
const PAGE_SIZE = Number(PAGE);
/** Bytes write-protected per call of the early protection (~5 ms of page table walk). */
const PROTECT_SLICE = 32 << 20;

/** One transfer of the snapshot copy, file-contiguous. */
export interface SnapChunk {
  fileOff: number;
  bytes: number;
  ranges: RemoteRange[];
}

interface Chunk extends SnapChunk {
  snap: Snapshot;
  start: bigint;
  end: bigint;
  /** pending, being read, read (and unprotected). */
  state: "pending" | "reading" | "read";
}

/** One process's snapshot: its userfaultfd (amber's), its pages file, what is left to copy. */
export interface Snapshot {
  pid: number;
  uffd: number;
  file: BulkFile;
  /** Runs after the copy: truncates, closes and commits the pages file. */
  finish: () => void;
  mappings: MappingImage[];
  /** Ranges to protect at the freeze (the snapshotted runs). */
  protect: RemoteRange[];
  /** Protection of the ranges amber never writes while frozen, begun at once on pool threads. */
  early?: Promise<void>;
  /** The ranges left for the last step (pages amber or the kernel still write while frozen). */
  late?: RemoteRange[];
  chunks: Chunk[];
  faults: number;
  /** Why the copy cannot be trusted (pages it still needed were unmapped). */
  lost?: string;
  /** The pages file is closed (finished or given up). */
  closed: boolean;
}

interface SnapshotState {
  /** Off for the frozen retry after a snapshot lost pages. */
  enabled: boolean;
  snaps: Snapshot[];
}

function snapshotState(kinds: Map<string, unknown>): SnapshotState {
  return kindState(kinds, "snapshot", () => ({ enabled: true, snaps: [] }));
}

/** Whether this dump may take snapshots (see {@link SnapshotLost}). */
export function enableSnapshots(kinds: Map<string, unknown>, on: boolean): void {
  snapshotState(kinds).enabled = on;
}

/**
 * The running tree unmapped pages the snapshot had not copied yet: this
 * dump's memory is not one instant. The dump is taken again, frozen for
 * the whole copy.
 */
export class SnapshotLost extends AmberError {}

/**
 * Makes a userfaultfd inside the frozen process and takes it into amber;
 * the process keeps none. Undefined when the kernel refuses one to the
 * process (vm.unprivileged_userfaultfd=0 for a non-root target: user-mode
 * only would make the kernel's own writes into its memory fail instead of
 * wait, so that is not used).
 */
function takeUffd(ctx: DumpContext): number | undefined {
  const r = ctx.injector.raw(NR_USERFAULTFD, O_CLOEXEC | O_NONBLOCK);
  if (r < 0n) return undefined;
  const inTarget = Number(r);
  let fd: number | undefined;
  try {
    fd = takeFd(ctx.pid, inTarget);
  } catch {
    // (pidfd_getfd refused: copied frozen, as without a snapshot.)
  } finally {
    ctx.injector.call("close userfaultfd", NR.close, inTarget);
  }
  if (fd === undefined) return undefined;
  try {
    uffdApi(fd, SNAPSHOT_FEATURES);
  } catch {
    libc().close(fd);
    return undefined;
  }
  return fd;
}

/** Memory the snapshot can take: private anonymous (nobody else writes it). */
function snapshottable(m: MappingImage): boolean {
  return m.kind === "anon" && !m.shared;
}

/**
 * Registers the process's private anonymous mappings that hold pages to
 * copy; returns which mappings are registered (their pages are copied
 * after the tree resumes), or undefined when none is.
 */
export function startSnapshot(
  ctx: DumpContext,
  mappings: MappingImage[],
  holdsPages: (m: MappingImage) => boolean,
): { uffd: number; registered: MappingImage[] } | undefined {
  const candidates = mappings.filter((m) => snapshottable(m) && holdsPages(m));
  if (!candidates.length || !snapshotState(ctx.tree.kinds).enabled) return undefined;
  const uffd = withContext("snapshot: userfaultfd", () => takeUffd(ctx));
  if (uffd === undefined) return undefined;
  const registered = candidates.filter((m) => uffdRegisterWp(uffd, m.start, m.end));
  if (!registered.length) {
    libc().close(uffd);
    return undefined;
  }
  return { uffd, registered };
}

/** Records a process's snapshot, to be protected at the freeze's end and copied after it. */
export function addSnapshot(
  ctx: DumpContext,
  s: Omit<Snapshot, "faults" | "closed" | "chunks"> & { chunks: SnapChunk[] },
): void {
  const snap: Snapshot = { ...s, chunks: [], faults: 0, closed: false };
  protectEarly(ctx, snap);
  snap.chunks = s.chunks.map((c) => {
    const last = c.ranges[c.ranges.length - 1];
    return {
      ...c,
      snap,
      start: c.ranges[0].addr,
      end: last.addr + BigInt(last.len),
      state: "pending",
    };
  });
  snapshotState(ctx.tree.kinds).snaps.push(snap);
}

/**
 * The pages amber or the kernel write while the tree is still frozen, which
 * must not be protected before the end (amber's own write would wait on
 * amber): the scratch area of injected calls, and each thread's rseq area,
 * which the kernel updates every time an injection resumes the thread.
 */
function stillWritten(ctx: DumpContext): [bigint, bigint][] {
  const pages = (at: bigint, len: number): [bigint, bigint] => [
    at / PAGE * PAGE,
    (at + BigInt(len) + PAGE - 1n) / PAGE * PAGE,
  ];
  const out = [pages(ctx.scratch.addr, ctx.scratch.size)];
  for (const tid of ctx.proc.threads) {
    try {
      const rseq = getRseqConfig(tid);
      if (rseq.address) out.push(pages(rseq.address, rseq.length));
    } catch {
      return [[0n, 1n << 64n]]; // unknown: protect everything last, as before
    }
  }
  return out;
}

/** Splits the ranges to protect by whether they cross `keep` (protected last) or not. */
function splitByKeep(ranges: RemoteRange[], keep: [bigint, bigint][]) {
  const crosses = (r: RemoteRange) =>
    keep.some(([a, b]) => r.addr < b && a < r.addr + BigInt(r.len));
  return { early: ranges.filter((r) => !crosses(r)), late: ranges.filter(crosses) };
}

/** The ranges cut in two lists of about the same bytes (a range may be cut at a page). */
function halvesOf(ranges: RemoteRange[]): RemoteRange[][] {
  const total = ranges.reduce((n, r) => n + r.len, 0);
  const half = Math.floor(total / 2 / PAGE_SIZE) * PAGE_SIZE;
  const out: RemoteRange[][] = [[], []];
  let sofar = 0;
  for (const r of ranges) {
    const cut = Math.min(Math.max(half - sofar, 0), r.len);
    if (cut) out[0].push({ addr: r.addr, len: cut });
    if (cut < r.len) out[1].push({ addr: r.addr + BigInt(cut), len: r.len - cut });
    sofar += r.len;
  }
  return out;
}

/**
 * Begins protecting what amber will not write again before the tree
 * resumes, beside the rest of the dump: the kernel walks every page table
 * entry (~0.15 s a GiB here), on two pool threads, each half of the bytes.
 */
function protectEarly(ctx: DumpContext, snap: Snapshot): void {
  const { early, late } = splitByKeep(snap.protect, stillWritten(ctx));
  snap.late = late;
  const halves = halvesOf(early);
  const run = async (list: RemoteRange[]) => {
    for (const r of list) {
      // The walk holds the mmap lock: in slices, so that an injected mmap
      // of the dump (which needs it to write) waits for one slice only.
      for (let off = 0; off < r.len; off += PROTECT_SLICE) {
        const at = r.addr + BigInt(off);
        const end = at + BigInt(Math.min(PROTECT_SLICE, r.len - off));
        await withContextAsync(
          `pid ${snap.pid}: snapshot: ${labelAt(snap, at)}`,
          () => uffdProtectAsync(snap.uffd, at, end),
        );
      }
    }
  };
  snap.early = Promise.all(halves.map(run)).then(() => {});
  // Awaited by protectSnapshots; a dump that fails first only closes the fd.
  snap.early.catch(() => {});
}

/** The last step under the freeze: every page to copy is write-protected; returns how many processes. */
export async function protectSnapshots(kinds: Map<string, unknown>): Promise<number> {
  const snaps = snapshotState(kinds).snaps;
  for (const s of snaps) {
    await s.early;
    for (const r of s.late ?? s.protect) {
      withContext(
        `pid ${s.pid}: snapshot: ${labelAt(s, r.addr)}`,
        () => uffdProtect(s.uffd, r.addr, r.addr + BigInt(r.len), true),
      );
    }
  }
  return snaps.length;
}

function labelAt(s: Snapshot, addr: bigint): string {
  const m = s.mappings.find((x) => x.start <= addr && addr < x.end);
  return m ? mappingLabel(m) : `address ${addr.toString(16)}`;
}

/** The chunk of `s` holding `addr` (chunks are in address order), if any. */
function chunkAt(s: Snapshot, addr: bigint): Chunk | undefined {
  let lo = 0, hi = s.chunks.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const c = s.chunks[mid];
    if (addr < c.start) hi = mid - 1;
    else if (addr >= c.end) lo = mid + 1;
    else return c;
  }
  return undefined;
}

/** Lifts protection; a range unmapped meanwhile fails, which only means no thread waits there. */
function unprotect(s: Snapshot, start: bigint, end: bigint): void {
  try {
    uffdProtect(s.uffd, start, end, false);
  } catch { /* unmapped since: an event says whether it mattered */ }
}

const EVENT_NAMES: Record<number, string> = {
  [UFFD_EVENT.REMAP]: "mremap",
  [UFFD_EVENT.REMOVE]: "madvise(DONTNEED)",
  [UFFD_EVENT.UNMAP]: "munmap",
};

/** What a message of `s`'s userfaultfd asks: a chunk first, or the end of the copy. */
function handle(s: Snapshot, msg: UffdMessage, urgent: Chunk[]): void {
  if (msg.event === UFFD_EVENT.PAGEFAULT) {
    s.faults++;
    const page = msg.args[1] & ~(PAGE - 1n);
    const c = chunkAt(s, page);
    if (!c || c.state === "read") unprotect(s, page, page + PAGE);
    else if (c.state === "pending") urgent.push(c);
    return;
  }
  const what = EVENT_NAMES[msg.event];
  if (!what) return;
  const start = msg.args[0];
  const end = msg.event === UFFD_EVENT.REMAP ? start + msg.args[2] : msg.args[1];
  const hit = s.chunks.find((c) => c.state !== "read" && c.start < end && start < c.end);
  s.lost ??= hit &&
    `pid ${s.pid}: ${labelAt(s, hit.start)}: ${what} of ${start.toString(16)}-${
      end.toString(16)
    } by the running process took pages before the snapshot copied them`;
}

/** Serves `s`'s faults until `over()`. */
async function serve(s: Snapshot, urgent: Chunk[], over: () => boolean): Promise<void> {
  try {
    while (!over()) {
      if (!await uffdWait(s.uffd, WAIT_MS)) continue;
      if (over()) return;
      for (const m of uffdMessages(s.uffd)) handle(s, m, urgent);
    }
  } catch (e) {
    // Faults nobody serves wait until the copy ends: then this dump cannot stand.
    s.lost ??= `pid ${s.pid}: snapshot: ${e instanceof Error ? e.message : e}`;
  }
}

/** Transfers in flight at once, as for the frozen copy. */
const WORKERS = 3;
const CHUNK_BYTES = 4 * 1024 * 1024;

/** Closes every snapshot's userfaultfd (idempotent): the kernel unprotects and wakes what waits. */
export function closeSnapshots(kinds: Map<string, unknown>): void {
  const snaps = snapshotState(kinds).snaps;
  closeUffds(snaps);
  for (const s of snaps) {
    if (s.closed) continue;
    s.closed = true;
    s.file.close();
  }
}

/** What the copy-on-write snapshot of a dump -R copied after the tree ran again. */
export interface SnapshotStats {
  /** Bytes copied while the tree ran. */
  bytes: number;
  /** Write faults the copy served. */
  faults: number;
  /** How long the copy took after the tree resumed. */
  ms: number;
}

/** Copies every snapshot's pages with the tree running; throws if one is lost. */
export async function copySnapshots(
  kinds: Map<string, unknown>,
): Promise<SnapshotStats | undefined> {
  const snaps = snapshotState(kinds).snaps;
  if (!snaps.length) return undefined;
  const t0 = performance.now();
  const all = snaps.flatMap((s) => s.chunks);
  const half = Math.floor(all.length / 2);
  const urgent: Chunk[] = [];
  const tracker = trackerIn(kinds);
  let next = 0, over = false, copied = 0;
  const take = (): Chunk | undefined => {
    while (urgent.length) {
      const c = urgent.shift()!;
      if (c.state === "pending") return c;
    }
    while (next < all.length && all[next].state !== "pending") next++;
    return all[next++];
  };
  const worker = async () => {
    try {
      await copyChunks();
    } catch (e) {
      over = true; // the others stop too
      throw e;
    }
  };
  const copyChunks = async () => {
    const buf = alignedBuffer(CHUNK_BYTES);
    for (let c = take(); c && !over; c = take()) {
      const s = c.snap;
      c.state = "reading";
      const data = buf.subarray(0, c.bytes);
      const got = await readRangesAsync(s.pid, c.ranges, data);
      c.state = "read";
      for (const r of c.ranges) unprotect(s, r.addr, r.addr + BigInt(r.len));
      if (got !== c.bytes) {
        throw new AmberError(
          `pid ${s.pid}: ${
            labelAt(s, c.start)
          }: process_vm_readv: short read during the snapshot copy`,
        );
      }
      if (c === all[half]) faultPoint("mid-snapshot");
      await s.file.pwriteAll(data, c.fileOff);
      copied += c.bytes;
      tracker?.pages(c.bytes);
    }
  };
  const servers = snaps.map((s) => serve(s, urgent, () => over));
  const results = await Promise.allSettled(Array.from({ length: WORKERS }, worker));
  over = true;
  await Promise.allSettled(servers);
  // An unmap reported while the last chunks were read is read only now.
  for (const s of snaps) for (const m of uffdMessages(s.uffd)) handle(s, m, []);
  closeUffds(snaps);
  // Lost pages first: the short read they caused is only a symptom.
  const lost = snaps.find((s) => s.lost)?.lost;
  if (lost) throw new SnapshotLost(lost);
  const failed = results.find((r) => r.status === "rejected");
  if (failed) throw (failed as PromiseRejectedResult).reason;
  for (const s of snaps) {
    s.closed = true;
    s.finish();
  }
  return {
    bytes: copied,
    faults: snaps.reduce((n, s) => n + s.faults, 0),
    ms: performance.now() - t0,
  };
}

function closeUffds(snaps: Snapshot[]): void {
  for (const s of snaps) {
    if (s.uffd < 0) continue;
    libc().close(s.uffd);
    s.uffd = -1;
  }
}
