/**
 * Ghost files: the contents of a file that was deleted (or replaced) while
 * a process of the tree still had it open or mapped. Dump copies it once
 * per tree into the images (`ghost-DEV-INO.img`), up to a size limit
 * (--ghost-limit, 1 MiB by default, like CRIU's); restore recreates it as
 * an unnamed file (O_TMPFILE) in the directory it was in, so it is as
 * deleted as it was, on the same filesystem.
 *
 * A memfd is a ghost too (its inode has no directory): saved the same way,
 * under the same limit, and made again with memfd_create under its name,
 * with its seals added once it is filled.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import type { RestoreContext, TreeDumpState } from "../context.ts";
import type { BulkFile, ImageDir } from "../images/dir.ts";
import { putString } from "../scratch.ts";
import { memfdSeals } from "../../ffi/memfd.ts";

export const GHOST_LIMIT_DEFAULT = 1 << 20;
const DELETED = " (deleted)";
const O_RDWR = 2, O_CREAT = 0o100, O_EXCL = 0o200, O_CLOEXEC = 0o2000000, O_TMPFILE = 0o20200000;
const AT_FDCWD = -100;

export const Ghost = z.object({
  /** Image file holding the contents. */
  file: z.string().regex(/^ghost-\d+-\d+\.img$/),
  size: z.number().int().min(0),
  mode: z.number().int().min(0).max(0o7777),
  uid: z.number().int().min(0),
  gid: z.number().int().min(0),
  /** A memfd: the name given to memfd_create and its seals (F_SEAL_*). */
  memfd: z.object({ name: z.string().max(249), seals: z.number().int().min(0).max(0xff) })
    .optional(),
});
export type GhostImage = z.output<typeof Ghost>;

/** Where the tree holds a deleted file, so that every holder comes back on one file. */
export interface DeletedPlaces {
  /** The first descriptor of the tree open on each deleted file, by "dev:ino". */
  open: Map<string, { pid: number; fd: number }>;
  /** The first shared mapping of each deleted file, by "dev:ino". */
  mapped: Map<string, { pid: number; start: bigint; end: bigint }>;
}

const places = new WeakMap<TreeDumpState, DeletedPlaces>();

/** Per dump: the deleted files held so far. */
export function deletedPlaces(tree: TreeDumpState): DeletedPlaces {
  let p = places.get(tree);
  if (!p) places.set(tree, p = { open: new Map(), mapped: new Map() });
  return p;
}

/** The path a deleted file had, without the " (deleted)" the kernel adds. */
export function originalPath(link: string): string {
  return link.endsWith(DELETED) ? link.slice(0, -DELETED.length) : link;
}

/**
 * Saves the file behind `source` (a /proc/PID/fd/N or map_files link) as a
 * ghost, once per tree; undefined when it is larger than `limit`.
 */
export function saveGhost(
  dir: ImageDir,
  tree: TreeDumpState,
  source: string,
  limit: number,
): GhostImage | undefined {
  const st = Deno.statSync(source);
  if (st.size > limit) return undefined;
  const file = `ghost-${st.dev}-${st.ino}.img`;
  const link = Deno.readLinkSync(source);
  const ghost = {
    file,
    size: st.size,
    mode: (st.mode ?? 0o600) & 0o7777,
    uid: st.uid ?? 0,
    gid: st.gid ?? 0,
    memfd: link.startsWith(MEMFD)
      ? { name: originalPath(link).slice(MEMFD.length), seals: memfdSeals(source) }
      : undefined,
  };
  if (tree.seen.has(file)) return ghost;
  const { file: out, commit, drop } = dir.reserve(file);
  try {
    // The file may have changed size since the stat; what was copied is the ghost.
    ghost.size = copyInto(source, out, limit);
  } finally {
    out.close();
  }
  if (ghost.size > limit) {
    drop();
    return undefined;
  }
  commit();
  tree.seen.add(file);
  return ghost;
}

/** Copies `source` into `out`, stopping once past `limit` bytes; returns the bytes read. */
function copyInto(source: string, out: BulkFile, limit: number): number {
  using src = Deno.openSync(source, { read: true });
  const buf = new Uint8Array(1 << 20);
  let total = 0;
  for (;;) {
    const n = src.readSync(buf);
    if (n === null) return total;
    if (total + n <= limit) out.pwriteAllSync(buf.subarray(0, n), total);
    total += n;
    if (total > limit) return total;
  }
}

/** Why a deleted file was not saved: it is above the ghost limit. */
export function tooBig(what: string, size: number): string {
  return `${what} is ${size} bytes, above the ghost limit: dump with --ghost-limit ${size} ` +
    "(or more) to save it";
}

/** The ghost's file is in the images, checked as every image file is, and of its size. */
export function checkGhost(ctx: { dir: ImageDir }, g: GhostImage): void {
  ctx.dir.checkData(g.file, g.size);
}

/**
 * Why a deleted file cannot come back as a ghost, if it cannot: a memfd or
 * another file of a kernel-internal filesystem has no directory to be
 * recreated in (its name's directory is on another filesystem). A memfd
 * has none either, but memfd_create makes it again.
 */
export function notGhostable(link: string, st: Deno.FileInfo): string | undefined {
  // memfd_create makes a memfd again, but not one of huge pages (hugetlbfs
  // gives the huge page size as its block size).
  if (link.startsWith(MEMFD)) {
    return (st.blksize ?? 0) > 4096 ? "a memfd of huge pages (MFD_HUGETLB)" : undefined;
  }
  if (Deno.statSync(hostDir(originalPath(link))).dev !== st.dev) {
    return "a file of a kernel-internal filesystem";
  }
}

/** The nearest existing directory of `path` (its own, or a parent if that is gone too). */
function hostDir(path: string): string {
  let d = path.replace(/\/[^/]*$/, "") || "/";
  for (;;) {
    try {
      if (Deno.statSync(d).isDirectory) return d;
    } catch { /* gone too */ }
    d = d.replace(/\/[^/]*$/, "") || "/";
  }
}

/**
 * Creates the file for a ghost: under its own name, unlinked once filled,
 * so /proc shows the name it had; where that name is taken again (a
 * replaced library) or gone, an O_TMPFILE file in the nearest directory.
 */
function createGhost(
  ctx: RestoreContext,
  g: GhostImage,
  path: string,
): { fd: number; named?: string } {
  const inj = ctx.injector;
  if (g.memfd) {
    const name = putString(ctx.pid, ctx.scratch, g.memfd.name);
    return { fd: Number(inj.call("memfd_create", NR.memfd_create, name, MFD_CLOEXEC_SEALING)) };
  }
  const orig = originalPath(path);
  const mode = O_RDWR | O_CLOEXEC;
  const named = inj.raw(
    NR.openat,
    AT_FDCWD,
    putString(ctx.pid, ctx.scratch, orig),
    mode | O_CREAT | O_EXCL,
    g.mode,
  );
  if (named >= 0n) return { fd: Number(named), named: orig };
  const dir = hostDir(orig);
  const at = putString(ctx.pid, ctx.scratch, dir);
  return {
    fd: Number(
      inj.call(`open O_TMPFILE in ${dir}`, NR.openat, AT_FDCWD, at, O_TMPFILE | mode, g.mode),
    ),
  };
}

/**
 * Recreates a ghost in the process, deleted as it was, with its contents,
 * mode and owner. Returns its descriptor, open read-write.
 */
export function restoreGhost(ctx: RestoreContext, g: GhostImage, path: string): number {
  const inj = ctx.injector;
  const { fd, named } = createGhost(ctx, g, path);
  try {
    fillGhost(ctx, g, fd);
  } finally {
    if (named) {
      inj.call(`unlink ${named}`, NR.unlinkat, AT_FDCWD, putString(ctx.pid, ctx.scratch, named), 0);
    }
  }
  inj.call("fchmod", NR.fchmod, fd, g.mode);
  inj.call("fchown", NR.fchown, fd, g.uid, g.gid);
  // Last: a write seal would stop the fill. (F_SEAL_SEAL alone: made without MFD_ALLOW_SEALING.)
  if (g.memfd?.seals) inj.call("fcntl(F_ADD_SEALS)", NR.fcntl, fd, F_ADD_SEALS, g.memfd.seals);
  return fd;
}

/** amber fills the ghost from outside, through the process's descriptor. */
function fillGhost(ctx: RestoreContext, g: GhostImage, fd: number): void {
  using out = Deno.openSync(`/proc/${ctx.pid}/fd/${fd}`, { write: true });
  const src = ctx.dir.openData(g.file, g.size);
  try {
    const buf = new Uint8Array(1 << 20);
    for (let done = 0; done < g.size; done += buf.length) {
      const part = buf.subarray(0, Math.min(buf.length, g.size - done));
      src.preadAllSync(part, done);
      let w = 0;
      while (w < part.length) w += out.writeSync(part.subarray(w));
    }
  } finally {
    src.close();
  }
}

const MEMFD = "/memfd:";
/** MFD_CLOEXEC | MFD_ALLOW_SEALING: seals are added as the image says. */
const MFD_CLOEXEC_SEALING = 3;
const F_ADD_SEALS = 1033;
