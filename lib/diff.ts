/**
 * `amber show DIR --diff DIR2`: what changed between two checkpoints of
 * one job: processes that came or went, mappings, descriptors, and the
 * memory pages whose contents differ (compared byte for byte, read through
 * ImageDir like any image), as address ranges named by their mapping.
 */
import { escapeText } from "./errors.ts";
import { ImageDir } from "./images/dir.ts";
import { type Images, type ProcessImages, readImages } from "./images/read.ts";
import { type MappingImage, mappingLabel } from "./mm/mappings.ts";
import type { PageRun } from "./mm/pages.ts";
import { resolveImagesDir } from "./run.ts";
import type { RawFile } from "../ffi/rawfile.ts";

const PAGE = 4096;
/** Pages compared per read. */
const BATCH = 256;

/** A range of pages: `pages` pages from `start`, in mapping `mapping`. */
export interface PageRange {
  start: string;
  end: string;
  pages: number;
  mapping: string;
}

interface FdLike {
  fd: number;
  kind: string;
  flags: number;
  path?: string;
  link?: string;
  pos?: number;
}

/** What changed in one process present in both. */
export interface ProcessDiff {
  pid: number;
  threads?: { before: number; after: number };
  mappingsAdded: string[];
  mappingsRemoved: string[];
  fdsAdded: string[];
  fdsRemoved: string[];
  fdsChanged: string[];
  /** Pages present in both whose contents differ. */
  pagesChanged: PageRange[];
  /** Pages stored only in the second images. */
  pagesAdded: PageRange[];
  /** Pages stored only in the first. */
  pagesRemoved: PageRange[];
  pagesCompared: number;
}

/** The whole difference between two images directories. */
export interface ImagesDiff {
  before: string;
  after: string;
  processesAdded: number[];
  processesRemoved: number[];
  processes: ProcessDiff[];
}

interface PagemapLike {
  pagesFile: string;
  runs: PageRun[];
  totalPages: number;
}

function live(p: ProcessImages): boolean {
  return p.entry.state !== "zombie";
}

function mappingsOf(p: ProcessImages): MappingImage[] {
  return live(p) ? (p.parts.mappings as { mappings: MappingImage[] }).mappings : [];
}

function fdsOf(p: ProcessImages): FdLike[] {
  return live(p) ? (p.parts.fds as { fds: FdLike[] }).fds : [];
}

function fdText(f: FdLike): string {
  const what = f.path ?? f.link ?? "";
  return `fd ${f.fd} ${f.kind}${what ? " " + what : ""}${
    f.pos === undefined ? "" : ` at ${f.pos}`
  } flags 0${f.flags.toString(8)}`;
}

/** Pages of a process: address → offset in its pages file. */
function pageOffsets(pm: PagemapLike): Map<bigint, number> {
  const out = new Map<bigint, number>();
  let off = 0;
  for (const r of pm.runs) {
    for (let i = 0; i < r.pages; i++) out.set(r.addr + BigInt(i * PAGE), off + i * PAGE);
    off += r.pages * PAGE;
  }
  return out;
}

/** Sorted page addresses as ranges of consecutive pages, each named by its mapping. */
function ranges(addrs: bigint[], mappings: MappingImage[]): PageRange[] {
  const out: PageRange[] = [];
  const sorted = [...addrs].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  for (const a of sorted) {
    const last = out.at(-1);
    if (last && BigInt("0x" + last.end) === a) {
      last.end = (a + BigInt(PAGE)).toString(16);
      last.pages++;
      continue;
    }
    const m = mappings.find((x) => x.start <= a && a < x.end);
    out.push({
      start: a.toString(16),
      end: (a + BigInt(PAGE)).toString(16),
      pages: 1,
      mapping: m ? mappingLabel(m) : "no mapping",
    });
  }
  return out;
}

function equalPage(a: Uint8Array, b: Uint8Array): boolean {
  const x = new BigUint64Array(a.buffer, a.byteOffset, PAGE / 8);
  const y = new BigUint64Array(b.buffer, b.byteOffset, PAGE / 8);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
  return true;
}

/** Compares the pages both images hold, BATCH pages per read from each file. */
async function changedPages(
  a: { dir: ImageDir; pm: PagemapLike; offsets: Map<bigint, number> },
  b: { dir: ImageDir; pm: PagemapLike; offsets: Map<bigint, number> },
): Promise<bigint[]> {
  const common = [...a.offsets.keys()].filter((addr) => b.offsets.has(addr));
  if (!common.length) return [];
  const fa = a.dir.openData(a.pm.pagesFile, a.pm.totalPages * PAGE);
  let fb;
  try {
    fb = b.dir.openData(b.pm.pagesFile, b.pm.totalPages * PAGE);
  } catch (e) {
    fa.close();
    throw e;
  }
  try {
    return await compareFiles(common, a.offsets, b.offsets, fa, fb);
  } finally {
    fa.close();
    fb.close();
  }
}

async function compareFiles(
  common: bigint[],
  oa: Map<bigint, number>,
  ob: Map<bigint, number>,
  fa: RawFile,
  fb: RawFile,
): Promise<bigint[]> {
  const a = { offsets: oa }, b = { offsets: ob };
  const bufA = new Uint8Array(PAGE), bufB = new Uint8Array(PAGE * BATCH);
  const changed: bigint[] = [];
  for (let i = 0; i < common.length;) {
    // A batch: consecutive in both files, so one read from each.
    let n = 1;
    const offA = a.offsets.get(common[i])!, offB = b.offsets.get(common[i])!;
    while (
      n < BATCH && i + n < common.length &&
      a.offsets.get(common[i + n]) === offA + n * PAGE &&
      b.offsets.get(common[i + n]) === offB + n * PAGE
    ) n++;
    const ra = new Uint8Array(PAGE * n);
    await fa.preadAll(ra, offA);
    await fb.preadAll(bufB.subarray(0, PAGE * n), offB);
    for (let k = 0; k < n; k++) {
      bufA.set(ra.subarray(k * PAGE, (k + 1) * PAGE));
      if (!equalPage(bufA, bufB.subarray(k * PAGE, (k + 1) * PAGE))) changed.push(common[i + k]);
    }
    i += n;
  }
  return changed;
}

async function processDiff(
  pa: ProcessImages,
  pb: ProcessImages,
  da: ImageDir,
  db: ImageDir,
): Promise<ProcessDiff> {
  const ma = mappingsOf(pa), mb = mappingsOf(pb);
  const key = (m: MappingImage) => `${mappingLabel(m)}`;
  const ka = new Set(ma.map(key)), kb = new Set(mb.map(key));
  const fa = new Map(fdsOf(pa).map((f) => [f.fd, fdText(f)]));
  const fb = new Map(fdsOf(pb).map((f) => [f.fd, fdText(f)]));
  const d: ProcessDiff = {
    pid: pa.entry.pid,
    mappingsAdded: [...kb].filter((k) => !ka.has(k)),
    mappingsRemoved: [...ka].filter((k) => !kb.has(k)),
    fdsAdded: [...fb].filter(([fd]) => !fa.has(fd)).map(([, t]) => t),
    fdsRemoved: [...fa].filter(([fd]) => !fb.has(fd)).map(([, t]) => t),
    fdsChanged: [...fa].filter(([fd, t]) => fb.has(fd) && fb.get(fd) !== t)
      .map(([fd, t]) => `${t} -> ${fb.get(fd)}`),
    pagesChanged: [],
    pagesAdded: [],
    pagesRemoved: [],
    pagesCompared: 0,
  };
  if (pa.entry.threads.length !== pb.entry.threads.length) {
    d.threads = { before: pa.entry.threads.length, after: pb.entry.threads.length };
  }
  if (!live(pa) || !live(pb)) return d;
  const pma = pa.parts.pagemap as PagemapLike, pmb = pb.parts.pagemap as PagemapLike;
  const oa = pageOffsets(pma), ob = pageOffsets(pmb);
  const changed = await changedPages(
    { dir: da, pm: pma, offsets: oa },
    { dir: db, pm: pmb, offsets: ob },
  );
  d.pagesCompared = [...oa.keys()].filter((x) => ob.has(x)).length;
  d.pagesChanged = ranges(changed, mb);
  d.pagesAdded = ranges([...ob.keys()].filter((x) => !oa.has(x)), mb);
  d.pagesRemoved = ranges([...oa.keys()].filter((x) => !ob.has(x)), ma);
  return d;
}

/** The difference between the images in `before` and `after` (two checkpoints of one job). */
export async function diffImages(before: string, after: string): Promise<ImagesDiff> {
  const pathA = resolveImagesDir(before), pathB = resolveImagesDir(after);
  const a: Images = readImages(pathA), b: Images = readImages(pathB);
  using da = new ImageDir(pathA);
  using db = new ImageDir(pathB);
  const byPid = (i: Images) => new Map(i.processes.map((p) => [p.entry.pid, p]));
  const pa = byPid(a), pb = byPid(b);
  const processes: ProcessDiff[] = [];
  for (const [pid, p] of pa) {
    const q = pb.get(pid);
    if (q) processes.push(await processDiff(p, q, da, db));
  }
  return {
    before: pathA,
    after: pathB,
    processesAdded: [...pb.keys()].filter((p) => !pa.has(p)),
    processesRemoved: [...pa.keys()].filter((p) => !pb.has(p)),
    processes,
  };
}

function rangeText(r: PageRange): string {
  return `${r.start}-${r.end} (${r.pages} page${r.pages === 1 ? "" : "s"}) in ${r.mapping}`;
}

/** The diff as text, strings from the images escaped. */
export function formatDiff(d: ImagesDiff): string {
  const e = (s: string) => escapeText(s, 300);
  const lines = [`amber images ${e(d.before)} -> ${e(d.after)}`];
  if (d.processesAdded.length) lines.push(`processes added: ${d.processesAdded.join(" ")}`);
  if (d.processesRemoved.length) lines.push(`processes removed: ${d.processesRemoved.join(" ")}`);
  for (const p of d.processes) {
    const sum = (rs: PageRange[]) => rs.reduce((s, r) => s + r.pages, 0);
    lines.push(
      `pid ${p.pid}: ${sum(p.pagesChanged)} of ${p.pagesCompared} pages changed, ` +
        `${sum(p.pagesAdded)} added, ${sum(p.pagesRemoved)} removed`,
    );
    if (p.threads) lines.push(`  threads: ${p.threads.before} -> ${p.threads.after}`);
    const list = (title: string, items: string[]) => {
      for (const x of items) lines.push(`  ${title} ${e(x)}`);
    };
    list("mapping added:", p.mappingsAdded);
    list("mapping removed:", p.mappingsRemoved);
    list("fd added:", p.fdsAdded);
    list("fd removed:", p.fdsRemoved);
    list("fd changed:", p.fdsChanged);
    list("pages changed:", p.pagesChanged.map(rangeText));
    list("pages added:", p.pagesAdded.map(rangeText));
    list("pages removed:", p.pagesRemoved.map(rangeText));
  }
  return lines.join("\n");
}
