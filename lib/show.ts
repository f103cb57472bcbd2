/**
 * `amber show`: the images of a directory as a readable summary, or all of
 * them as one JSON document (64-bit values as "0x..." strings, byte blobs
 * as short hex strings or their length; page contents are never read).
 */
import { sysvIpcLines } from "./ipc/sysvipc.ts";
import { ImageDir } from "./images/dir.ts";
import { escapeText } from "./errors.ts";
import { type Images, type ProcessImages, readImages } from "./images/read.ts";
import { dumpVerdictOptions, judgeImages } from "./verdict.ts";
import { resolveImagesDir } from "./run.ts";
import type { MappingImage } from "./mm/mappings.ts";
import { aioRingText } from "./mm/aio.ts";
import type { MmImage } from "./mm/mm.ts";
import { describeChain, type PageRun } from "./mm/pages.ts";
import type { ThreadImage } from "./task/threads.ts";

const PAGE_SIZE = 4096;
/** Longest string from an image shown whole. */
const SHOW_TEXT_MAX = 300;
/** Byte blobs up to this size are shown as hex, larger ones by length only. */
const HEX_BLOB_MAX = 256;

interface PagemapImage {
  pagesFile: string;
  runs: PageRun[];
  totalPages: number;
  parentRuns?: PageRun[];
  /** Left in the dumped tree's memory (dump --lazy-pages). */
  remoteRuns?: PageRun[];
}

interface FdImage {
  kind: string;
  fd: number;
  flags: number;
  path?: string;
  link?: string;
  type?: string;
  pos?: number;
  ino?: number;
  external?: boolean;
  /** A unix socket's outside peer name (--ext-unix-sk). */
  reconnect?: Uint8Array;
}

interface FsImage {
  cwd: string;
  root: string;
  umask: number;
}

/** The typed view of one process's part images that show needs. */
function partsOf(p: ProcessImages) {
  if (p.entry.state === "zombie") {
    // A zombie has no images besides its pstree entry.
    return {
      mappings: [] as MappingImage[],
      pagemap: { pagesFile: "", runs: [], totalPages: 0 } as unknown as PagemapImage,
      mm: { exe: "(zombie)" } as MmImage,
      fds: [] as FdImage[],
      fs: { cwd: "-", root: "-", umask: 0 } as FsImage,
      threads: [] as ThreadImage[],
    };
  }
  return {
    mappings: (p.parts.mappings as { mappings: MappingImage[] }).mappings,
    pagemap: p.parts.pagemap as PagemapImage,
    mm: p.parts.mm as MmImage,
    fds: (p.parts.fds as { fds: FdImage[] }).fds,
    fs: p.parts.fs as FsImage,
    threads: (p.parts.threads as { threads: ThreadImage[] }).threads,
  };
}

/** "rw-p" / "r--s", as /proc/PID/maps prints them. */
export function permsOf(m: { prot: number; shared: boolean }): string {
  return (m.prot & 1 ? "r" : "-") + (m.prot & 2 ? "w" : "-") + (m.prot & 4 ? "x" : "-") +
    (m.shared ? "s" : "p");
}

function hex0x(v: bigint): string {
  return v < 0n ? `-0x${(-v).toString(16)}` : `0x${v.toString(16)}`;
}

function bytesHex(b: Uint8Array): string {
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/** Any decoded image value as plain JSON data. */
function toJson(v: unknown): unknown {
  if (typeof v === "bigint") return hex0x(v);
  if (v instanceof Uint8Array) return v.length <= HEX_BLOB_MAX ? bytesHex(v) : { bytes: v.length };
  if (Array.isArray(v)) return v.map(toJson);
  if (v && typeof v === "object") {
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v)) if (x !== undefined) out[k] = toJson(x);
    return out;
  }
  return v;
}

/** Which image of an incremental chain holds which pages. */
function chainLines(dirPath: string, pid: number, pagemap: PagemapImage): string[] {
  const chain = describeChain(dirPath, pid, pagemap as Parameters<typeof describeChain>[2]);
  if (typeof chain === "string") return [`  pages from parent images: ${chain}`];
  return chain.map((l, i) =>
    `  ${i ? "from parent" : "held here"}: ${l.dir}: ${l.runs} runs, ${l.pages} pages, ${
      mib(l.pages * PAGE_SIZE)
    } MiB`
  );
}

function pageTotals(pm: PagemapImage) {
  return { runs: pm.runs.length, pages: pm.totalPages, bytes: pm.totalPages * PAGE_SIZE };
}

function processJson(p: ProcessImages) {
  const parts = partsOf(p);
  return {
    pid: p.entry.pid,
    ppid: p.entry.ppid,
    pgid: p.entry.pgid,
    sid: p.entry.sid,
    exitSignal: p.entry.exitSignal,
    state: p.entry.state,
    exitStatus: p.entry.exitStatus,
    threads: p.entry.threads,
    comm: parts.threads[0]?.comm ?? p.entry.comm,
    exe: parts.mm.exe,
    mappings: parts.mappings.map((m) => ({
      start: hex0x(m.start),
      end: hex0x(m.end),
      perms: permsOf(m),
      path: m.path,
      kind: m.kind,
    })),
    pages: pageTotals(parts.pagemap),
    images: toJson(p.parts),
  };
}

function imagesJson(images: Images, reasons: string[]): string {
  const processes = images.processes.map(processJson);
  const totals = processes.reduce(
    (t, p) => ({
      processes: t.processes + 1,
      runs: t.runs + p.pages.runs,
      pages: t.pages + p.pages.pages,
      bytes: t.bytes + p.pages.bytes,
    }),
    { processes: 0, runs: 0, pages: 0, bytes: 0 },
  );
  return JSON.stringify(
    {
      dir: images.dir,
      inventory: toJson(images.inventory),
      restorable: reasons.length === 0,
      /** Why restore refuses these images here (the verdict of lib/verdict.ts). */
      unrestorable: reasons,
      processes,
      totals,
    },
    null,
    2,
  );
}

// Text summary.

/** Rows as left-aligned columns (right-aligned where `right[i]`), two spaces apart. */
function table(rows: string[][], right: boolean[] = [], indent = "    "): string[] {
  const widths: number[] = [];
  for (const r of rows) r.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, c.length)));
  return rows.map((r) =>
    indent + r.map((c, i) => {
      if (i === r.length - 1 && !right[i]) return c;
      return right[i] ? c.padStart(widths[i]) : c.padEnd(widths[i]);
    }).join("  ").trimEnd()
  );
}

function mib(bytes: number): string {
  return (bytes / 1048576).toFixed(2);
}

function kib(bytes: bigint): string {
  return (bytes / 1024n).toString();
}

function octal(n: number): string {
  return "0" + n.toString(8);
}

function treeLines(images: Images): string[] {
  const byParent = new Map<number, ProcessImages[]>();
  const pids = new Set(images.processes.map((p) => p.entry.pid));
  const roots: ProcessImages[] = [];
  for (const p of images.processes) {
    if (!pids.has(p.entry.ppid) || p.entry.pid === images.inventory.rootPid) roots.push(p);
    else byParent.set(p.entry.ppid, [...(byParent.get(p.entry.ppid) ?? []), p]);
  }
  const lines: string[] = [];
  const walk = (p: ProcessImages, depth: number) => {
    const { threads, mm } = partsOf(p);
    const e = p.entry;
    lines.push(
      `  ${"  ".repeat(depth)}${e.pid} ${threads[0]?.comm ?? e.comm}  ` +
        `(pgid ${e.pgid}, sid ${e.sid}${
          e.threads.length > 1 ? `, ${e.threads.length} threads` : ""
        })` +
        `  ${mm.exe}`,
    );
    for (const c of byParent.get(e.pid) ?? []) walk(c, depth + 1);
  };
  for (const r of roots) walk(r, 0);
  return lines;
}

/** A unix socket name as text: a path, or @name for an abstract one; escaped for a terminal. */
function socketName(name: Uint8Array): string {
  const text = new TextDecoder().decode(name[0] === 0 ? name.subarray(1) : name);
  return escapeText((name[0] === 0 ? "@" : "") + text.replace(/\0+$/, ""), SHOW_TEXT_MAX);
}

function fdTarget(f: FdImage): string {
  if (f.kind === "unsupported") return `${f.link ?? ""} (${f.type ?? "?"}, not restorable)`;
  if (f.kind === "pipe") {
    const end = `pipe:[${f.ino}] ${(f.flags & 3) === 0 ? "read" : "write"} end`;
    return f.external ? `${end}, external (restore needs --inherit-fd)` : end;
  }
  if (f.kind === "unix" && f.external) {
    return `socket:[${f.ino}], external (restore needs --inherit-fd fd[N]:socket:[${f.ino}])`;
  }
  if (f.kind === "unix" && f.reconnect) {
    return `socket:[${f.ino}], connected again to ${socketName(f.reconnect)} (--ext-unix-sk)`;
  }
  return f.path ?? f.link ?? "";
}

function processLines(p: ProcessImages, dirPath: string): string[] {
  const e = p.entry;
  const { mappings, pagemap, mm, fds, fs, threads } = partsOf(p);
  const out: string[] = [];
  out.push(
    `pid ${e.pid} (${threads[0]?.comm ?? e.comm}): ppid ${e.ppid}, pgid ${e.pgid}, sid ${e.sid}, ` +
      `exit signal ${e.exitSignal}` + (e.state === "running" ? "" : `, ${e.state}`) +
      (e.exitStatus !== undefined ? ` (wait status ${e.exitStatus})` : ""),
  );
  out.push(`  exe ${mm.exe}`);
  out.push(`  cwd ${fs.cwd}, root ${fs.root}, umask ${fs.umask.toString(8).padStart(3, "0")}`);
  out.push(`  threads (${threads.length}):`);
  out.push(...table(threads.map((t) => [String(t.tid), t.comm]), [true]));
  out.push(`  mappings (${mappings.length}):`);
  out.push(
    ...table(
      [
        ["start-end", "perms", "KiB", "kind", "path"],
        ...mappings.map((m) => [
          `${m.start.toString(16)}-${m.end.toString(16)}`,
          permsOf(m),
          kib(m.end - m.start),
          m.kind,
          m.aio ? `${m.path} (${aioRingText(m.aio)})` : m.path,
        ]),
      ],
      [false, false, true],
    ),
  );
  out.push(`  fds (${fds.length}):`);
  if (fds.length) {
    out.push(
      ...table(
        [
          ["fd", "kind", "flags", "pos", "path"],
          ...fds.map((f) => [
            String(f.fd),
            f.kind,
            octal(f.flags),
            f.pos === undefined ? "-" : String(f.pos),
            fdTarget(f),
          ]),
        ],
        [true, false, false, true],
      ),
    );
  }
  out.push(...sysvIpcLines(p.parts.sysvipc));
  const t = pageTotals(pagemap);
  out.push(`  pages: ${t.runs} runs, ${t.pages} pages, ${mib(t.bytes)} MiB (${pagemap.pagesFile})`);
  if (pagemap.parentRuns?.length) out.push(...chainLines(dirPath, p.entry.pid, pagemap));
  const left = (pagemap.remoteRuns ?? []).reduce((n, r) => n + r.pages, 0);
  if (left) out.push(`  left in the dumped tree (dump --lazy-pages): ${left} pages`);
  return out;
}

/** Images of dump --lazy-pages: their anonymous memory is still in the dumped tree. */
function leftInTree(images: Images): boolean {
  return images.processes.some((p) =>
    !!(p.parts.pagemap as PagemapImage | undefined)?.remoteRuns?.length
  );
}

function verdictLines(reasons: string[], lazySource = false): string[] {
  if (!reasons.length && lazySource) {
    return ["restorable: yes, with --lazy-pages --page-server (from the dumping amber)"];
  }
  if (!reasons.length) return ["restorable: yes"];
  return ["restorable: no", ...reasons.map((why) => `  cannot be restored: ${why}`)];
}

function imagesText(images: Images, reasons: string[]): string {
  const inv = images.inventory;
  const lines = [
    `amber images in ${images.dir}`,
    `inventory: amber ${inv.amberVersion}, kernel ${inv.kernel} ${inv.arch}, created ${inv.createdAt}, ` +
    `root pid ${inv.rootPid}${inv.shellJob ? ", shell job" : ""}, xsave ${inv.xsaveSize} bytes`,
    ...verdictLines(reasons, leftInTree(images)),
    "",
    "process tree:",
    ...treeLines(images),
  ];
  let runs = 0, pages = 0;
  for (const p of images.processes) {
    lines.push("", ...processLines(p, images.dir));
    const pm = partsOf(p).pagemap;
    runs += pm.runs.length;
    pages += pm.totalPages;
  }
  lines.push(
    "",
    `total: ${images.processes.length} process(es), ${runs} runs, ${pages} pages, ` +
      `${mib(pages * PAGE_SIZE)} MiB`,
  );
  return lines.join("\n");
}

/** Descriptor kinds of a process, counted: "file 3, pipe 2". */
function fdKinds(fds: FdImage[]): string {
  const counts = new Map<string, number>();
  for (const f of fds) counts.set(f.kind, (counts.get(f.kind) ?? 0) + 1);
  return [...counts].map(([k, n]) => `${k} ${n}`).join(", ") || "none";
}

/**
 * One line per process, children indented under their parent: pid, name,
 * threads, memory stored, descriptor kinds, and why it cannot be restored.
 */
function compactTree(images: Images, reasons: string[]): string {
  const pids = new Set(images.processes.map((p) => p.entry.pid));
  const why = (pid: number) => reasons.filter((r) => r.startsWith(`pid ${pid}: `));
  const general = reasons.filter((r) =>
    !/^pid (\d+): /.test(r) || !pids.has(Number(/\d+/.exec(r)![0]))
  );
  const lines = [
    `${images.dir}: ${reasons.length ? "not restorable" : "restorable"}`,
    ...general.map((r) => `  cannot be restored: ${r}`),
  ];
  const children = new Map<number, ProcessImages[]>();
  const roots: ProcessImages[] = [];
  for (const p of images.processes) {
    if (!pids.has(p.entry.ppid) || p.entry.pid === images.inventory.rootPid) roots.push(p);
    else children.set(p.entry.ppid, [...(children.get(p.entry.ppid) ?? []), p]);
  }
  const walk = (p: ProcessImages, depth: number) => {
    const e = p.entry;
    const { threads, pagemap, fds } = partsOf(p);
    const pad = "  ".repeat(depth);
    const state = e.state === "running" ? "" : ` ${e.state}`;
    lines.push(
      `${pad}${e.pid} ${threads[0]?.comm ?? e.comm}${state}: ${e.threads.length} thread(s), ` +
        `${mib(pagemap.totalPages * PAGE_SIZE)} MiB, fds: ${fdKinds(fds)}`,
    );
    for (const r of why(e.pid)) lines.push(`${pad}  x ${r.slice(`pid ${e.pid}: `.length)}`);
    for (const c of children.get(e.pid) ?? []) walk(c, depth + 1);
  };
  for (const r of roots) walk(r, 0);
  return lines.join("\n");
}

/** A copy of `v` with every string escaped for a terminal (JSON escapes on its own). */
function escapeStrings<T>(v: T): T {
  if (typeof v === "string") return escapeText(v, SHOW_TEXT_MAX) as T;
  if (Array.isArray(v)) return v.map(escapeStrings) as T;
  if (v && typeof v === "object" && Object.getPrototypeOf(v) === Object.prototype) {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, escapeStrings(x)])) as T;
  }
  return v;
}

/**
 * The images of `dir`, validated, as text or (with `json`) one JSON
 * document. Invalid images throw the AmberError of readImages.
 */
export async function showImages(
  path: string,
  opts: { json?: boolean; tree?: boolean } = {},
): Promise<string> {
  const dir = resolveImagesDir(path);
  const images = readImages(dir);
  // Judged as restore would judge them, with the flags they were dumped with.
  using reader = new ImageDir(dir);
  // (Those of dump --lazy-pages, as restore --lazy-pages --page-server judges them.)
  const lazySource = leftInTree(images)
    ? { lazyPages: true, pageSource: true, migrated: true }
    : {};
  const reasons = await judgeImages(images, reader, {
    ...dumpVerdictOptions(images.inventory.shellJob),
    ...lazySource,
  });
  if (opts.json) return imagesJson(images, reasons);
  if (opts.tree) return compactTree(escapeStrings(images), escapeStrings(reasons));
  return imagesText(escapeStrings(images), escapeStrings(reasons));
}
