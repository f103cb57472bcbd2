/**
 * The address space layout. Restore replaces the helper's mappings with
 * the dumped ones: [vvar]/[vdso] are moved to their dumped addresses,
 * file mappings map the same (unchanged) file again, anonymous ones are
 * created empty and filled by the pages part. Mappings that will receive
 * page data are created writable; the mm part applies final protections.
 */
import { findTracker } from "./tracking.ts";
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { BATCH_PAGE_SIZE, batchTableBytes, runEach, type Syscall, withBatch } from "../batch.ts";
import { readMemoryProc } from "../../ffi/memory.ts";
import { definePart, type RestoreContext, type TreeDumpState } from "../context.ts";
import { AmberError, hex, withContext } from "../errors.ts";
import { MAX_IMAGE_BYTES, u64 } from "../images/codec.ts";
import {
  type MapsEntry,
  readMaps,
  readVmFlags,
  readVmFlagsAsync,
  type VmFlagsEntry,
} from "../proc/maps.ts";
import { putBytes, putString } from "../scratch.ts";
import { readProcLink } from "../proc/read.ts";
import type { ImageDir } from "../images/dir.ts";
import { attachSysvShm, dumpSysvShm, sysvConflict, SysvShm } from "./sysvshm.ts";
import { AioRing, drainAioContexts, dumpAioRing, isAioRing, restoreAioRing } from "./aio.ts";
import type { Injector } from "../../ffi/inject.ts";
import {
  checkGhost,
  deletedPlaces,
  Ghost,
  notGhostable,
  restoreGhost,
  saveGhost,
  tooBig,
} from "../fds/ghost.ts";

export const PAGE = 4096n;
export const PROT = { READ: 1, WRITE: 2, EXEC: 4 } as const;
const MAP = {
  SHARED: 1,
  PRIVATE: 2,
  FIXED: 0x10,
  ANONYMOUS: 0x20,
  GROWSDOWN: 0x100,
  NORESERVE: 0x4000,
};
const MREMAP_MAYMOVE = 1, MREMAP_FIXED = 2;
const O_RDONLY = 0, O_RDWR = 2, O_CLOEXEC = 0o2000000;
const AT_FDCWD = -100;

/** Kernel-provided mappings that are moved, never recreated. */
export const SPECIAL = ["[vvar]", "[vvar_vclock]", "[vdso]"] as const;

export const FileIdentity = z.object({ ino: z.number(), size: z.number(), mtimeMs: z.number() });

export const Mapping = z.object({
  start: u64,
  end: u64,
  prot: z.number().int().min(0).max(7),
  shared: z.boolean(),
  offset: u64,
  /** Path, pseudo name ([heap], [stack], [vdso], [anon:x]) or "" for anonymous. */
  path: z.string(),
  kind: z.enum(["anon", "file", "shmem", "special", "vsyscall"]),
  vmFlags: z.array(z.string()),
  file: FileIdentity.optional(),
  /** Shared anonymous memory also mapped by this earlier process of the tree. */
  sharedWith: z.number().int().optional(),
  /** That process's mapping of the same memory, which covers this one. */
  sharedFrom: z.object({ start: u64, end: u64, offset: u64 }).optional(),
  /** A deleted (or replaced) file's contents, saved (absent: above the ghost limit). */
  ghost: Ghost.optional(),
  /** Deleted files: size at the dump, whether it is the executable, what it is if not a file. */
  deleted: z.object({
    size: z.number().int().min(0),
    exe: z.boolean(),
    internal: z.string().optional(),
  }).optional(),
  /** A SysV shared memory attachment: the segment. */
  sysv: SysvShm.optional(),
  /** The ring of an AIO context (io_setup): its size, head, tail and waiting completions. */
  aio: AioRing.optional(),
  /** A deleted file shared with a descriptor of an earlier process: mapped through it. */
  viaFd: z.object({ pid: z.number().int(), fd: z.number().int().min(0) }).optional(),
}).refine((m) => m.start < m.end && m.start % PAGE === 0n && m.end % PAGE === 0n, "bad range");
export type MappingImage = z.output<typeof Mapping>;

export function mappingLabel(m: { start: bigint; end: bigint; path: string }): string {
  return `mapping ${hex(m.start)}..${hex(m.end)}${m.path ? " " + m.path : ""}`;
}

function protOf(perms: string): number {
  return (perms[0] === "r" ? PROT.READ : 0) | (perms[1] === "w" ? PROT.WRITE : 0) |
    (perms[2] === "x" ? PROT.EXEC : 0);
}

function kindOf(e: MapsEntry): MappingImage["kind"] {
  if ((SPECIAL as readonly string[]).includes(e.path)) return "special";
  if (e.path === "[vsyscall]") return "vsyscall";
  if (
    e.path.startsWith("/dev/zero") || e.path.startsWith("/SYSV") ||
    e.path.startsWith("[anon_shmem:")
  ) return "shmem";
  if (e.path.startsWith("/") && e.inode) return "file";
  if (e.perms[3] === "s" && e.inode) return "shmem";
  return "anon";
}

function identity(path: string): z.input<typeof FileIdentity> {
  const st = Deno.statSync(path);
  return { ino: st.ino ?? 0, size: st.size, mtimeMs: st.mtime?.getTime() ?? 0 };
}

/**
 * The first holder's mapping of the same shared memory object that covers
 * all of `e` (offsets into the object), if one does.
 */
function coveringMapping(first: number, e: MapsEntry): MapsEntry | undefined {
  const len = e.end - e.start;
  return readMaps(first).find((f) =>
    f.inode === e.inode && f.dev === e.dev && f.perms[3] === "s" && f.offset <= e.offset &&
    e.offset + len <= f.offset + (f.end - f.start)
  );
}

interface DumpWhere {
  pid: number;
  tree: TreeDumpState;
  dir: ImageDir;
  ghostLimit: number;
  /** Runs in the frozen process (AIO rings ask it whether it has their context). */
  injector?: Injector;
}

/**
 * A mapping of a file deleted since it was mapped. A shared one is one
 * file with every other holder in the tree: an earlier process's mapping
 * of it, or else an earlier process's descriptor. Otherwise its contents
 * are saved as a ghost.
 */
function dumpDeleted(w: DumpWhere, e: MapsEntry, exe: string): Partial<MappingImage> {
  const source = `/proc/${w.pid}/map_files/${hex(e.start)}-${hex(e.end)}`;
  const st = Deno.statSync(source);
  const key = `${st.dev}:${st.ino}`;
  const internal = notGhostable(e.path, st);
  const deleted = { size: st.size, exe: exe === e.path, internal };
  if (internal) return { deleted };
  if (e.perms[3] === "s") {
    const held = deletedPlaces(w.tree);
    const first = held.mapped.get(key);
    if (first && first.pid !== w.pid) {
      const from = coveringMapping(first.pid, e);
      return {
        deleted,
        sharedWith: first.pid,
        sharedFrom: from && { start: from.start, end: from.end, offset: from.offset },
      };
    }
    if (!first) held.mapped.set(key, { pid: w.pid, start: e.start, end: e.end });
    const open = held.open.get(key);
    if (open) return { deleted, viaFd: open };
  }
  return { deleted, ghost: saveGhost(w.dir, w.tree, source, w.ghostLimit) };
}

/**
 * VmFlags read ahead (see the part's prefetch), if they are of exactly these
 * mappings; read again now if not (the layout changed meanwhile: amber's
 * own batch page, or a failed read).
 */
function vmFlagsFor(
  pid: number,
  maps: MapsEntry[],
  ahead?: Map<bigint, VmFlagsEntry>,
): Map<bigint, VmFlagsEntry> {
  const same = ahead && maps.every((e) => ahead.get(e.start)?.end === e.end);
  return same ? ahead : readVmFlags(pid);
}

export function dumpMappings(
  w: DumpWhere,
  ahead?: Map<bigint, VmFlagsEntry>,
): z.input<typeof Mapping>[] {
  const { pid, tree } = w;
  const maps = readMaps(pid);
  const flags = vmFlagsFor(pid, maps, ahead);
  // Write-protect registration by amber's own tracker is not the process's.
  const tracker = findTracker(pid) !== undefined;
  const exe = readProcLink(pid, "exe");
  return maps.map((e) => {
    const kind = kindOf(e);
    let sharedWith: number | undefined;
    let sharedFrom: MapsEntry | undefined;
    const sysv = e.path.startsWith("/SYSV") ? dumpSysvShm(e.inode) : undefined;
    const aio = isAioRing(e.path) && w.injector
      ? withContext(mappingLabel(e), () => dumpAioRing(pid, w.injector!, e.start, e.end))
      : undefined;
    if (kind === "shmem") {
      // A SysV segment's inode number is its id: kept apart from other shared memory.
      const key = sysv ? -1 - e.inode : e.inode;
      sharedWith = tree.sharedMemory.get(key);
      if (sharedWith === pid) sharedWith = undefined;
      if (!tree.sharedMemory.has(key)) tree.sharedMemory.set(key, pid);
      // The first holder is frozen: its mappings are as they were.
      if (sharedWith !== undefined) sharedFrom = coveringMapping(sharedWith, e);
    }
    return withContext(mappingLabel(e), () => ({
      start: e.start,
      end: e.end,
      prot: protOf(e.perms),
      shared: e.perms[3] === "s",
      offset: e.offset,
      path: e.path,
      kind,
      vmFlags: (flags.get(e.start)?.flags ?? []).filter((f) =>
        !(tracker && f === "uw" && kind === "anon" && e.perms[3] !== "s")
      ),
      file: kind === "file"
        ? identity(`/proc/${pid}/map_files/${hex(e.start)}-${hex(e.end)}`)
        : undefined,
      sysv,
      aio,
      sharedWith,
      sharedFrom: sharedFrom &&
        { start: sharedFrom.start, end: sharedFrom.end, offset: sharedFrom.offset },
      // (Last: a deleted file shared with an earlier process sets sharedWith/From.)
      ...(kind === "file" && e.path.endsWith(DELETED) && !pseudoDeleted(e.path)
        ? dumpDeleted(w, e, exe)
        : {}),
    }));
  });
}

/** sha256 of the [vdso] code, to refuse restoring on a kernel whose vdso differs. */
export async function vdsoDigest(pid: number, maps = readMaps(pid)): Promise<string> {
  const v = maps.find((m) => m.path === "[vdso]");
  if (!v) return "";
  // The kernel's one image of that size: hashed once (each migration round and the
  // receiver's verdict asked again, a few ms on the thread pool inside the pause).
  const size = Number(v.end - v.start);
  const known = vdsoDigests.get(size);
  if (known) return known;
  const code = readMemoryProc(pid, v.start, size);
  const d = await crypto.subtle.digest("SHA-256", code as Uint8Array<ArrayBuffer>);
  const hex = Array.from(new Uint8Array(d), (b) => b.toString(16).padStart(2, "0")).join("");
  vdsoDigests.set(size, hex);
  return hex;
}

/** vdsoDigest's, by the vdso's size (64-bit, x32 and 32-bit images differ in size). */
const vdsoDigests = new Map<number, string>();

/**
 * Whether the pages part will write into this mapping. Every holder of
 * shared anonymous memory stores the pages present in its own page tables
 * (a page only one of them touched is present only there), each written
 * into the one shared object at restore.
 */
export function receivesPages(m: MappingImage): boolean {
  return m.kind === "anon" || m.kind === "shmem" || (m.kind === "file" && !m.shared);
}

/**
 * Mappings created writable and given their final protection after the
 * fill: shared ones the process cannot write (their pages go in by
 * process_vm_writev), and private ones that were writable once and carry VM_ACCOUNT
 * ("ac"), which only a writable mapping gets; without it the kernel would
 * merge them with neighbours they were apart from (e.g. RELRO segments).
 */
export function writableWhileFilled(m: MappingImage): boolean {
  // A later holder of shared memory gets its pages through the first one.
  if (m.prot & PROT.WRITE || m.sharedWith !== undefined) return false;
  return m.shared ? receivesPages(m) : m.vmFlags.includes("ac");
}

/**
 * Mappings not writable during the fill get their pages through
 * /proc/PID/mem; every other mapping is filled by amber with process_vm_writev
 * (an injected preadv in the process measured slower: lib/mm/pages.ts fillPages).
 */
export function fillsThroughMem(m: MappingImage): boolean {
  return !(m.prot & PROT.WRITE) && !writableWhileFilled(m);
}

function overlaps(a: { start: bigint; end: bigint }, b: { start: bigint; end: bigint }): boolean {
  return a.start < b.end && b.start < a.end;
}

/** A free, page-aligned hole of `size` bytes that overlaps none of `taken`. */
export function findFreeRange(taken: { start: bigint; end: bigint }[], size: bigint): bigint {
  const sorted = [...taken].sort((a, b) => (a.start < b.start ? -1 : 1));
  let candidate = 0x10000000n;
  for (const t of sorted) {
    if (t.end <= candidate) continue;
    if (t.start >= candidate + size) break;
    candidate = t.end;
  }
  if (candidate + size > 0x7fffffff0000n) throw new AmberError("no free address range");
  return candidate;
}

/** Unmaps the helper's own mappings (`unmaps`) and moves the kernel's [vvar]/[vdso] to the dumped addresses. */
function moveSpecials(
  ctx: RestoreContext,
  image: MappingImage[],
  current: MapsEntry[],
  unmaps: { what: string; call: Syscall }[],
): void {
  const inj = ctx.injector;
  const wanted = image.filter((m) => m.kind === "special");
  const all = [...current, ...image];
  // Through a free hole first, so a destination never overlaps a source.
  const moves = wanted.map((w) => {
    const cur = current.find((c) => c.path === w.path);
    if (!cur || cur.end - cur.start !== w.end - w.start) {
      throw new AmberError(
        `${w.path}: this kernel's layout differs from the image's (${
          cur ? hex(cur.end - cur.start) : "missing"
        } vs ${hex(w.end - w.start)} bytes); restore on the kernel that dumped it`,
      );
    }
    return { cur, w };
  });
  const total = moves.reduce((s, m) => s + (m.w.end - m.w.start), 0n);
  let hole = findFreeRange(all, total + PAGE);
  const staged = moves.map(({ cur, w }) => {
    const at = hole;
    hole += w.end - w.start;
    return { cur, at, w };
  });
  const flags = MREMAP_MAYMOVE | MREMAP_FIXED;
  const steps = [
    ...staged.map(({ cur, at, w }) => ({ path: cur.path, from: cur.start, to: at, w })),
    ...staged.map(({ at, w }) => ({ path: w.path, from: at, to: w.start, w })),
  ];
  const call = (s: (typeof steps)[0]): Syscall => {
    const size = s.w.end - s.w.start;
    return [NR.mremap, s.from, size, size, flags, s.to];
  };
  withBatch(ctx, (run) => {
    if (!run) {
      for (const u of unmaps) inj.call(u.what, ...u.call);
      // One at a time, each from [vdso] where the last one left it.
      for (const s of steps) {
        inj.call(`mremap ${s.path}`, ...call(s));
        if (s.path === "[vdso]") inj.syscallAddr = inj.syscallAddr - s.from + s.to;
      }
      return;
    }
    // With the helper's mappings gone first, in batches: their code runs from its own page,
    // not from [vdso].
    runEach(ctx, [
      ...unmaps,
      ...steps.map((s) => ({ what: `mremap ${s.path}`, call: call(s) })),
    ]);
    const vdso = staged.find(({ cur }) => cur.path === "[vdso]");
    if (vdso) inj.syscallAddr = inj.syscallAddr - vdso.cur.start + vdso.w.start;
  });
  for (const t of ctx.threads.values()) t.syscallAddr = inj.syscallAddr;
}

/** munmaps of all the helper's own mappings but the kernel's, the scratch area and the code page. */
function helperMappings(
  ctx: RestoreContext,
  current: MapsEntry[],
): { what: string; call: Syscall }[] {
  const ours = [{ start: ctx.scratch.addr, end: ctx.scratch.addr + BigInt(ctx.scratch.size) }];
  const code = ctx.batchPage?.addr;
  if (code !== undefined) ours.push({ start: code, end: code + BigInt(BATCH_PAGE_SIZE) });
  const gone = current.filter((m) =>
    !(SPECIAL as readonly string[]).includes(m.path) && m.path !== "[vsyscall]" &&
    !ours.some((r) => overlaps(m, r))
  );
  return gone.map((m) => ({
    what: `munmap ${mappingLabel(m)}`,
    call: [NR.munmap, m.start, m.end - m.start],
  }));
}

function openAt(ctx: RestoreContext, path: string, mode: number): number {
  const at = putString(ctx.pid, ctx.scratch, path);
  return Number(ctx.injector.call(`open ${path}`, NR.openat, AT_FDCWD, at, mode | O_CLOEXEC, 0));
}

/**
 * The file a mapping maps and the offset into it: its own file (opened once
 * per path and mode, in `fds`), or for memory shared with an earlier
 * process of the tree, that process's restored mapping of it (one shared
 * object; its mapping starts at the object's offset 0); -1 for anonymous.
 */
function backing(
  ctx: RestoreContext,
  m: MappingImage,
  fds: Map<string, number>,
): { fd: number; offset: bigint } {
  if (m.sharedWith !== undefined && m.sharedFrom) {
    const from = m.sharedFrom;
    const path = `/proc/${m.sharedWith}/map_files/${hex(from.start)}-${hex(from.end)}`;
    const mode = openMode(m);
    const key = `${mode}:${path}`;
    if (!fds.has(key)) fds.set(key, openAt(ctx, path, mode));
    // A file's offsets are its own; a new shared anonymous object starts at 0.
    return { fd: fds.get(key)!, offset: m.kind === "shmem" ? m.offset - from.offset : m.offset };
  }
  if (m.viaFd) {
    const path = `/proc/${m.viaFd.pid}/fd/${m.viaFd.fd}`;
    const mode = openMode(m);
    const key = `${mode}:${path}`;
    if (!fds.has(key)) fds.set(key, openAt(ctx, path, mode));
    return { fd: fds.get(key)!, offset: m.offset };
  }
  if (m.ghost) {
    const key = `ghost:${m.ghost.file}`;
    if (!fds.has(key)) fds.set(key, restoreGhost(ctx, m.ghost, m.path));
    return { fd: fds.get(key)!, offset: m.offset };
  }
  if (m.kind !== "file") return { fd: -1, offset: 0n };
  const mode = openMode(m, O_RDONLY);
  const key = `${mode}:${m.path}`;
  if (!fds.has(key)) fds.set(key, openAt(ctx, m.path, mode));
  return { fd: fds.get(key)!, offset: m.offset };
}

/**
 * How to open what a mapping maps. VM_MAYWRITE ("mw") on a shared mapping
 * means its file was opened for writing (or the SysV segment attached
 * read-write), so mprotect may make it writable; without it, it must not.
 * A private mapping is opened as `privately` says.
 */
function openMode(m: MappingImage, privately = O_RDWR): number {
  if (!m.shared) return privately;
  return m.prot & PROT.WRITE || m.vmFlags.includes("mw") ? O_RDWR : O_RDONLY;
}

/** The mmap that recreates `m` (its file opened into `fds` first); undefined for SysV memory, attached here. */
function mmapOf(
  ctx: RestoreContext,
  m: MappingImage,
  fds: Map<string, number>,
): Syscall | undefined {
  if (m.sysv && m.sharedWith === undefined) return void attachSysvShm(ctx, m.sysv, m.start);
  const prot = m.prot | (writableWhileFilled(m) ? PROT.READ | PROT.WRITE : 0);
  let flags = MAP.FIXED | (m.shared ? MAP.SHARED : MAP.PRIVATE);
  if (m.vmFlags.includes("gd")) flags |= MAP.GROWSDOWN;
  if (m.vmFlags.includes("nr")) flags |= MAP.NORESERVE;
  const { fd, offset } = backing(ctx, m, fds);
  if (fd < 0) flags |= MAP.ANONYMOUS;
  return [NR.mmap, m.start, m.end - m.start, prot, flags, fd, offset];
}

/** Gives an anonymous mapping its name ([anon:NAME]), once it exists. */
function nameOne(ctx: RestoreContext, m: MappingImage): void {
  const anonName = /^\[anon(_shmem)?:(.*)\]$/.exec(m.path);
  if (!anonName) return;
  // PR_SET_VMA(0x53564d41), PR_SET_VMA_ANON_NAME(0)
  const name = putString(ctx.pid, ctx.scratch, anonName[2]);
  ctx.injector.call(
    "prctl(PR_SET_VMA_ANON_NAME)",
    NR.prctl,
    0x53564d41,
    0,
    m.start,
    m.end - m.start,
    name,
  );
}

/**
 * The files of `maps` that can be opened before any mapping is made (all
 * but memory this process maps twice, ghosts and SysV segments), opened
 * in batches, keyed as backing() looks them up.
 */
function openAhead(ctx: RestoreContext, maps: MappingImage[]): Map<string, number> {
  const wanted = new Map<string, { path: string; mode: number }>();
  for (const m of maps) {
    if (m.sysv && m.sharedWith === undefined) continue;
    let path: string | undefined, mode = openMode(m);
    if (m.sharedWith !== undefined) {
      if (m.sharedWith !== ctx.pid && m.sharedFrom) {
        path = `/proc/${m.sharedWith}/map_files/${hex(m.sharedFrom.start)}-${
          hex(m.sharedFrom.end)
        }`;
      }
    } else if (m.viaFd) path = `/proc/${m.viaFd.pid}/fd/${m.viaFd.fd}`;
    else if (!m.ghost && m.kind === "file") {
      path = m.path;
      mode = openMode(m, O_RDONLY);
    }
    if (path !== undefined) wanted.set(`${mode}:${path}`, { path, mode });
  }
  const fds = new Map<string, number>();
  const list = [...wanted];
  const encoder = new TextEncoder();
  for (let i = 0; i < list.length;) {
    // As many as fit the scratch area: the table, then the paths.
    const chunk: { what: string; call: Syscall }[] = [];
    const keys: string[] = [];
    let at = batchTableBytes(OPENS_PER_BATCH);
    for (; i < list.length && chunk.length < OPENS_PER_BATCH; i++) {
      const [key, { path, mode }] = list[i];
      const bytes = encoder.encode(path + "\0");
      if (chunk.length && at + bytes.length > ctx.scratch.size) break;
      const addr = putBytes(ctx.pid, ctx.scratch, bytes, at);
      at += bytes.length;
      chunk.push({ what: `open ${path}`, call: [NR.openat, AT_FDCWD, addr, mode | O_CLOEXEC, 0] });
      keys.push(key);
    }
    runEach(ctx, chunk).forEach((fd, j) => fds.set(keys[j], Number(fd)));
  }
  return fds;
}

/** Files opened per batch (openAhead). */
const OPENS_PER_BATCH = 32;

/**
 * Recreates the mappings: files opened (and SysV segments attached) one
 * at a time, the mmaps, which are independent of each other (fixed,
 * disjoint ranges), in batches; those already planned go before a mapping
 * that opens one of this process's own (memory it maps twice).
 */
function mapAll(ctx: RestoreContext, maps: MappingImage[]): void {
  const fds = openAhead(ctx, maps);
  let planned: { m: MappingImage; what: string; call: Syscall }[] = [];
  const flush = (last = false) => {
    // The files opened are closed in the last batch, after the mmaps that use them.
    const closes = last
      ? [...fds.values()].map((fd) => ({ what: "close", call: [NR.close, fd] as Syscall }))
      : [];
    const got = runEach(ctx, [...planned, ...closes]);
    planned.forEach(({ m }, i) => {
      if (BigInt.asUintN(64, got[i]) !== m.start) {
        throw new AmberError(`${mappingLabel(m)}: mmap landed at ${hex(got[i])}`);
      }
    });
    for (const { m } of planned) withContext(mappingLabel(m), () => nameOne(ctx, m));
    planned = [];
  };
  for (const m of maps) {
    if (m.sharedWith === ctx.pid) flush();
    const call = withContext(mappingLabel(m), () => mmapOf(ctx, m, fds));
    if (call) planned.push({ m, what: `${mappingLabel(m)}: mmap`, call });
  }
  flush(true);
}

const DELETED = " (deleted)";

/** Kernel objects maps shows as deleted files; undefined for a file that really was deleted. */
function pseudoDeleted(path: string): string | undefined {
  if (path.startsWith("/[aio]")) return "AIO ring (io_setup)";
  if (path.startsWith("/anon_hugepage")) return "hugetlb anonymous memory";
}

/** Why one mapping cannot be restored yet, if it cannot. */
function whyNot(m: MappingImage): string | undefined {
  if (m.sharedWith !== undefined && !m.sharedFrom) {
    const what = m.kind === "shmem" ? "anonymous memory" : "a deleted file's memory";
    return `${what} shared with pid ${m.sharedWith}, which maps it differently: not supported yet`;
  }
  if (m.path.startsWith("/SYSV") && !m.sysv) return "SysV shared memory: not supported yet";
  // The first holder attaches the whole segment again.
  if (m.sysv && m.sharedWith === undefined && (m.offset || m.end - m.start < BigInt(m.sysv.size))) {
    return `SysV shared memory segment ${m.sysv.id} attached in part: not supported yet`;
  }
  if (m.kind === "special" || m.kind === "vsyscall") return undefined;
  // The memory of a kernel object (io_uring rings, perf buffers): not plain shared memory.
  if (m.path.startsWith("anon_inode:")) return `${m.path} memory: not supported yet`;
  if (m.vmFlags.includes("ht")) return "hugetlb memory: not supported yet";
  // Device memory (VM_IO / VM_PFNMAP): its pages are not memory amber can copy.
  if (m.vmFlags.includes("io") || m.vmFlags.includes("pf")) {
    return "device memory (VM_IO/VM_PFNMAP): not supported yet";
  }
  if (m.aio || m.kind !== "file" || !m.path.endsWith(DELETED)) return undefined;
  const pseudo = pseudoDeleted(m.path);
  if (pseudo || !m.deleted) return `${pseudo ?? "a deleted file"}: not supported yet`;
  if (m.deleted.internal) return `${m.deleted.internal}: not supported yet`;
  if (m.deleted.exe) return "the executable was deleted or replaced: not supported yet";
  if (m.sharedWith === undefined && !m.ghost && !m.viaFd) {
    return tooBig("the deleted (or replaced) mapped file", m.deleted.size);
  }
}

export const mappingsPart = definePart({
  name: "mappings",
  readsMemoryLayout: true,
  maxBytes: MAX_IMAGE_BYTES,
  version: 1,
  schema: z.object({ mappings: z.array(Mapping), vdsoSha256: z.string() }),
  prefetch: readVmFlagsAsync,
  // A VmFlags change that leaves the layout as it was (madvise over a whole mapping) between
  // that read and the freeze is in the final round, which reads them frozen.
  prefetchWhileRunning: true,
  async dump({ pid, tree, dir, options, injector, scratch, ahead }) {
    await drainAioContexts({ pid, injector, scratch, timeoutMs: options.aioTimeoutMs });
    const flags = await (ahead.get("mappings") as ReturnType<typeof readVmFlagsAsync> | undefined);
    const where = { pid, tree, dir, ghostLimit: options.ghostLimit, injector };
    const mappings = dumpMappings(where, flags);
    return { mappings, vdsoSha256: await vdsoDigest(pid) };
  },
  unrestorable({ mappings }) {
    for (const m of mappings) {
      const why = whyNot(m);
      if (why) return `${mappingLabel(m)}: ${why}`;
    }
  },
  precheck({ mappings }, ctx) {
    let prevEnd = 0n;
    for (const m of mappings) {
      withContext(mappingLabel(m), () => {
        if (m.start < prevEnd) throw new AmberError("overlaps the previous mapping");
        const why = whyNot(m);
        if (why) throw new AmberError(why);
        prevEnd = m.end;
        if (m.ghost) checkGhost(ctx, m.ghost);
        const conflict = m.sysv && m.sharedWith === undefined && sysvConflict(m.sysv);
        if (conflict) throw new AmberError(conflict);
        if (m.kind !== "file" || m.deleted || m.aio) return;
        let now;
        try {
          now = identity(m.path);
        } catch {
          throw new AmberError("file is missing");
        }
        if (
          m.file &&
          (now.ino !== m.file.ino || now.size !== m.file.size || now.mtimeMs !== m.file.mtimeMs)
        ) {
          throw new AmberError("file changed since the dump (inode, size or mtime differ)");
        }
      });
    }
  },
  restore(ctx, { mappings }) {
    const current = readMaps(ctx.pid);
    moveSpecials(ctx, mappings, current, helperMappings(ctx, current));
    const plain = mappings.filter((m) => !(m.kind === "special" || m.kind === "vsyscall" || m.aio));
    mapAll(ctx, plain);
    // Once every mapping is in place: io_setup's ring lands in a hole, then moves to its own.
    for (const m of mappings) {
      if (m.aio) withContext(mappingLabel(m), () => restoreAioRing(ctx, m.aio!, m.start));
    }
  },
});
