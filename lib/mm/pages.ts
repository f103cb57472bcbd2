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
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { RawFile } from "../../ffi/rawfile.ts";
import {
  IOV_MAX,
  readMemoryProc,
  readRangesAsync,
  type RemoteRange,
  writeMemory,
} from "../../ffi/memory.ts";
import { definePart, type DumpContext, type RestoreContext } from "../context.ts";
import { AmberError, faultPoint, withContext } from "../errors.ts";
import { u64 } from "../images/codec.ts";
import { putBytes, u64Bytes } from "../scratch.ts";
import {
  fillsThroughMem,
  type MappingImage,
  mappingLabel,
  PAGE,
  receivesPages,
} from "./mappings.ts";

// Pagemap flag bits, as bits of each entry's high 32-bit word (63, 62, 61).
const PM_PRESENT = 0x80000000;
const PM_SWAP = 0x40000000;
const PM_FILE = 0x20000000;
const PAGE_SIZE = Number(PAGE);
/** Bytes read per process_vm_readv batch; two such buffers are in flight. */
const CHUNK_BYTES = 4 * 1024 * 1024;

const Run = z.object({ addr: u64, pages: z.number().int().min(1) });
export type PageRun = z.output<typeof Run>;

export function pagesFileName(pid: number): string {
  return `pages-${pid}.img`;
}

/** Which pagemap entries (high words) of mapping `m` hold a page to store. */
function pageFilter(m: MappingImage): (high: number) => boolean {
  if (m.kind === "anon" || m.kind === "shmem") return (h) => (h & (PM_PRESENT | PM_SWAP)) !== 0;
  if (m.kind === "file" && !m.shared) {
    return (h) => (h & PM_SWAP) !== 0 || (h & (PM_PRESENT | PM_FILE)) === PM_PRESENT;
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

/** The runs of pages to store for each mapping, in address order. */
export function planRuns(pid: number, mappings: MappingImage[]): PageRun[] {
  const runs: PageRun[] = [];
  using pm = Deno.openSync(`/proc/${pid}/pagemap`, { read: true });
  for (const m of mappings) {
    if (!receivesPages(m)) continue;
    const entries = withContext(
      `${mappingLabel(m)}: pagemap`,
      () => readPagemap(pm, m.start, m.end),
    );
    const stores = pageFilter(m);
    const pages = entries.length / 2;
    let runStart = -1;
    for (let i = 0; i <= pages; i++) {
      // Numbers, not BigInt: this runs once per page of the address space.
      const keep = i < pages && stores(entries[2 * i + 1]);
      if (keep && runStart < 0) runStart = i;
      if (!keep && runStart >= 0) {
        runs.push({ addr: m.start + BigInt(runStart) * PAGE, pages: i - runStart });
        runStart = -1;
      }
    }
  }
  return runs;
}

/** Splits runs into read batches of at most CHUNK_BYTES and IOV_MAX ranges. */
function batches(runs: PageRun[]): RemoteRange[][] {
  const out: RemoteRange[][] = [];
  let cur: RemoteRange[] = [];
  let bytes = 0;
  for (const r of runs) {
    let addr = r.addr;
    let left = r.pages * PAGE_SIZE;
    while (left > 0) {
      const len = Math.min(left, CHUNK_BYTES - bytes);
      cur.push({ addr, len });
      bytes += len;
      addr += BigInt(len);
      left -= len;
      if (bytes === CHUNK_BYTES || cur.length === IOV_MAX) {
        out.push(cur);
        cur = [];
        bytes = 0;
      }
    }
  }
  if (cur.length) out.push(cur);
  return out;
}

function labelFor(mappings: MappingImage[], addr: bigint): string {
  const m = mappings.find((x) => x.start <= addr && addr < x.end);
  return m ? mappingLabel(m) : `address ${addr.toString(16)}`;
}

/** Fills `buf` from ranges one by one, falling back to /proc/PID/mem, to name what faulted. */
function readSlowly(pid: number, ranges: RemoteRange[], buf: Uint8Array, mappings: MappingImage[]) {
  let off = 0;
  for (const r of ranges) {
    withContext(labelFor(mappings, r.addr), () => {
      try {
        buf.set(readMemoryProc(pid, r.addr, r.len), off);
      } catch {
        throw new AmberError("process_vm_readv: EFAULT");
      }
    });
    off += r.len;
  }
}

/** Reads in flight at once, each followed by its write: enough to keep 2 cores busy. */
const WORKERS = 3;

/** Copies the planned runs into the pages file; returns bytes written. */
export async function copyPages(
  ctx: DumpContext,
  runs: PageRun[],
  mappings: MappingImage[],
): Promise<number> {
  const { tmp, commit } = ctx.dir.reserve(pagesFileName(ctx.pid));
  const file = RawFile.create(tmp);
  const plan = batches(runs);
  const offsets: number[] = [];
  let total = 0;
  for (const ranges of plan) {
    offsets.push(total);
    total += ranges.reduce((s, r) => s + r.len, 0);
  }
  let next = 0;
  const worker = async () => {
    const buf = new Uint8Array(Math.min(CHUNK_BYTES, total));
    while (next < plan.length) {
      const i = next++;
      const ranges = plan[i];
      const want = ranges.reduce((s, r) => s + r.len, 0);
      const part = buf.subarray(0, want);
      const got = await readRangesAsync(ctx.pid, ranges, part);
      if (got !== want) readSlowly(ctx.pid, ranges, part, mappings);
      if (i === Math.floor(plan.length / 2)) faultPoint("mid-pages");
      await file.pwriteAll(part, offsets[i]);
    }
  };
  const workers = Array.from({ length: Math.min(WORKERS, plan.length) }, worker);
  try {
    // allSettled: no worker may still be writing when the file is closed.
    const results = await Promise.allSettled(workers);
    const failed = results.find((r) => r.status === "rejected");
    if (failed) throw (failed as PromiseRejectedResult).reason;
  } finally {
    file.close();
  }
  commit();
  return total;
}

/** A run with its place in the pages file. */
interface Placed {
  addr: bigint;
  len: bigint;
  fileOff: bigint;
}

/** Runs of `mappings`, each with its pages-file offset, split by how they are filled. */
function placeRuns(
  runs: PageRun[],
  mappings: MappingImage[],
): { inside: Placed[]; viaMem: Placed[] } {
  const inside: Placed[] = [], viaMem: Placed[] = [];
  let fileOff = 0n;
  for (const r of runs) {
    const len = BigInt(r.pages) * PAGE;
    const m = mappings.find((x) => x.start <= r.addr && r.addr < x.end);
    (m && fillsThroughMem(m) ? viaMem : inside).push({ addr: r.addr, len, fileOff });
    fileOff += len;
  }
  return { inside, viaMem };
}

/** Batches of file-contiguous runs, at most `max` per batch. */
function contiguousBatches(runs: Placed[], max: number): Placed[][] {
  const out: Placed[][] = [];
  for (const r of runs) {
    const last = out.at(-1);
    const tail = last?.at(-1);
    if (last && tail && tail.fileOff + tail.len === r.fileOff && last.length < max) last.push(r);
    else out.push([r]);
  }
  return out;
}

/** preadv inside the tracee: the kernel copies page cache straight into its memory. */
function preadvInside(ctx: RestoreContext, fd: bigint, batch: Placed[], mappings: MappingImage[]) {
  const IOV_AT = 32 * 1024;
  const group = batch.map((r) => ({ ...r }));
  let fileOff = group[0].fileOff;
  while (group.length) {
    const iov = u64Bytes(group.flatMap((g) => [g.addr, g.len]));
    const addr = putBytes(ctx.pid, ctx.scratch, iov, IOV_AT);
    const label = labelFor(mappings, group[0].addr);
    let n = withContext(
      label,
      () => ctx.injector.call("preadv", 295, fd, addr, group.length, fileOff, 0),
    );
    if (n === 0n) throw new AmberError(`${label}: pages file ends early`);
    fileOff += n;
    // A short read (over 2 GiB, or a signal) continues where it stopped.
    while (group.length && n >= group[0].len) n -= group.shift()!.len;
    if (n > 0n) {
      group[0].addr += n;
      group[0].len -= n;
    }
  }
}

/** Fills the restored mappings from the pages file. */
function fillPages(
  ctx: RestoreContext,
  runs: PageRun[],
  pagesPath: string,
  mappings: MappingImage[],
): void {
  const { inside, viaMem } = placeRuns(runs, mappings);
  const inj = ctx.injector;
  const path = putBytes(ctx.pid, ctx.scratch, new TextEncoder().encode(pagesPath + "\0"));
  const fd = inj.call(`open ${pagesPath}`, NR.openat, -100, path, 0o2000000, 0);
  const perCall = Math.min(IOV_MAX, (ctx.scratch.size - 32 * 1024) / 16);
  for (const batch of contiguousBatches(inside, perCall)) preadvInside(ctx, fd, batch, mappings);
  inj.call("close", NR.close, fd);
  if (!viaMem.length) return;
  using file = Deno.openSync(pagesPath, { read: true });
  for (const r of viaMem) {
    withContext(labelFor(mappings, r.addr), () => {
      const data = new Uint8Array(Number(r.len));
      file.seekSync(Number(r.fileOff), Deno.SeekMode.Start);
      let done = 0;
      while (done < data.length) {
        const n = file.readSync(data.subarray(done));
        if (!n) throw new AmberError("pages file ends early");
        done += n;
      }
      writeMemory(ctx.pid, r.addr, data);
    });
  }
}

export const pagemapPart = definePart({
  name: "pagemap",
  version: 1,
  schema: z.object({
    pagesFile: z.string().regex(/^pages-\d+\.img$/),
    runs: z.array(Run),
    totalPages: z.number().int().min(0),
  }),
  async dump(ctx) {
    const { mappings } = ctx.done.mappings as { mappings: MappingImage[] };
    const runs = planRuns(ctx.pid, mappings);
    const bytes = await copyPages(ctx, runs, mappings);
    return { pagesFile: pagesFileName(ctx.pid), runs, totalPages: bytes / PAGE_SIZE };
  },
  precheck({ pagesFile, runs, totalPages }, ctx) {
    const path = ctx.dir.file(pagesFile);
    const size = Deno.statSync(path).size;
    if (size !== totalPages * PAGE_SIZE) {
      throw new AmberError(`${path}: ${size} bytes, expected ${totalPages * PAGE_SIZE}`);
    }
    const counted = runs.reduce((s, r) => s + r.pages, 0);
    if (counted !== totalPages) {
      throw new AmberError(`pagemap: runs hold ${counted} pages, not ${totalPages}`);
    }
    const { mappings } = ctx.images.mappings as { mappings: MappingImage[] };
    for (const r of runs) {
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
  restore(ctx, { pagesFile, runs }) {
    const { mappings } = ctx.images.mappings as { mappings: MappingImage[] };
    fillPages(ctx, runs, Deno.realPathSync(ctx.dir.file(pagesFile)), mappings);
  },
});
