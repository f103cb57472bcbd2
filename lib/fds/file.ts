/**
 * Files reopened by path: regular files, directories, symlinks held by an
 * O_PATH descriptor, non-terminal devices (/dev/null).
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import type { FdPlace, RestoreContext, TreeRestoreState } from "../context.ts";
import { AmberError } from "../errors.ts";
import { procPath } from "../proc/read.ts";
import { u64 } from "../images/codec.ts";
import {
  checkGhost,
  deletedPlaces,
  Ghost,
  notGhostable,
  restoreGhost,
  saveGhost,
  tooBig,
} from "./ghost.ts";
import { putString } from "../scratch.ts";
import { defineFdKind, type FdProbe, O_CLOEXEC } from "./kind.ts";
import { isTerminal } from "./tty.ts";

const O_CREAT = 0o100, O_EXCL = 0o200, O_NOCTTY = 0o400, O_TRUNC = 0o1000;
const O_NOFOLLOW = 0o400000, O_PATH = 0o10000000, O_ACCMODE = 3, O_RDONLY = 0;
const SEEK_SET = 0;
const DELETED = " (deleted)";
/** /proc/PID/...: a file of one process, by number. */
const PROC_FILE = /^\/proc\/(\d+)(\/|$)/;

function typeOf(st: Deno.FileInfo) {
  if (st.isFile) return "regular" as const;
  if (st.isDirectory) return "directory" as const;
  if (st.isSymlink) return "symlink" as const;
  return "device" as const;
}

const FileEntry = z.object({
  kind: z.literal("file"),
  fd: z.number().int().min(0),
  flags: z.number().int().min(0),
  path: z.string().startsWith("/"),
  pos: z.number().int().min(0),
  type: z.enum(["regular", "directory", "symlink", "device"]),
  /** The file was unlinked while open: no path reaches it any more. */
  deleted: z.boolean().optional(),
  /** A deleted file's contents, saved (absent: above the ghost limit, see `size`). */
  ghost: Ghost.optional(),
  /** A deleted file's size at the dump. */
  size: z.number().int().min(0).optional(),
  /** What a deleted file with no place to be recreated in is (a memfd...). */
  internal: z.string().optional(),
  /** A deleted file the tree maps shared: reopened through that (earlier restored) mapping. */
  viaMapping: z.object({ pid: z.number().int(), start: u64, end: u64 }).optional(),
  /** For /proc/N/... files: the process that held the descriptor. */
  owner: z.number().int().optional(),
  /** Regular files: what the file was at the dump, to notice a change before reopening it. */
  identity: z.object({ ino: z.number(), size: z.number(), mtimeMs: z.number() }).optional(),
});
type FileImage = z.output<typeof FileEntry>;

function whyNot(e: FileImage): string | undefined {
  if (e.internal) return `${e.path}: ${e.internal}: not supported yet`;
  if (e.deleted && !e.ghost && !e.viaMapping) {
    return `${e.path}: ${tooBig("the deleted open file", e.size ?? 0)}`;
  }
  const proc = PROC_FILE.exec(e.path);
  // Its own /proc files come back with the process; another's pid may be anyone's then.
  if (proc && Number(proc[1]) !== e.owner) {
    return `${e.path}: a /proc file of another process: not supported yet`;
  }
}

/** Whether PID is a live (not zombie) process now. */
function running(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) [ZX]/s.test(Deno.readTextFileSync(`/proc/${pid}/stat`));
  } catch {
    return false;
  }
}

/**
 * How the file differs from its identity at the dump, if in a way that
 * matters: any change for a descriptor that can write (it would write over
 * what others added), only replacement or shrinking for a read-only one.
 */
function changed(e: FileImage, now: Deno.FileInfo): string | undefined {
  const was = e.identity!;
  const ino = now.ino ?? 0, mtimeMs = now.mtime?.getTime() ?? 0;
  if (ino !== was.ino) return `inode ${was.ino} is now ${ino}: replaced`;
  const writes = (e.flags & O_ACCMODE) !== O_RDONLY && !(e.flags & O_PATH);
  if (now.size < was.size || (writes && now.size !== was.size)) {
    return `size ${was.size} is now ${now.size} bytes`;
  }
  if (writes && mtimeMs !== was.mtimeMs) {
    return `modified at ${new Date(mtimeMs).toISOString()}, after the dump's ${
      new Date(was.mtimeMs).toISOString()
    }`;
  }
}

/**
 * A deleted file: reopened through the tree's shared mapping of it if
 * there is one (mappings are restored first: one file for both), else
 * saved as a ghost. Noted for the mappings of later processes.
 */
function dumpGhost(p: FdProbe): Partial<FileImage> {
  const internal = notGhostable(p.link, p.stat!);
  if (internal) return { internal, size: p.stat!.size };
  const key = `${p.stat!.dev}:${p.stat!.ino}`;
  const held = deletedPlaces(p.tree);
  if (!held.open.has(key)) held.open.set(key, { pid: p.pid, fd: p.fd });
  const mapped = held.mapped.get(key);
  if (mapped) return { viaMapping: mapped, size: p.stat!.size };
  const source = procPath(p.pid, `fd/${p.fd}`);
  return { ghost: saveGhost(p.dir, p.tree, source, p.ghostLimit), size: p.stat!.size };
}

/** Opens a /proc magic link (which O_NOFOLLOW, kept from the original open, would refuse). */
function openPath(ctx: RestoreContext, path: string, flags: number): number {
  const at = putString(ctx.pid, ctx.scratch, path);
  return Number(
    ctx.injector.call(`open ${path}`, NR.openat, -100, at, flags & ~O_NOFOLLOW, 0),
  );
}

/** Per restore: the first descriptor restored on each ghost, by ghost file. */
const restoredGhosts = new WeakMap<TreeRestoreState, Map<string, FdPlace>>();

function ghostsOf(tree: TreeRestoreState): Map<string, FdPlace> {
  let m = restoredGhosts.get(tree);
  if (!m) restoredGhosts.set(tree, m = new Map());
  return m;
}

/**
 * Opens the ghost with the entry's own flags, through /proc: the one an
 * earlier descriptor of the tree already holds (one file, as before the
 * dump), or a new one made here.
 */
function openGhost(ctx: RestoreContext, e: FileImage, flags: number): number {
  if (e.viaMapping) {
    const { pid, start, end } = e.viaMapping;
    return openPath(ctx, `/proc/${pid}/map_files/${start.toString(16)}-${end.toString(16)}`, flags);
  }
  const known = ghostsOf(ctx.tree).get(e.ghost!.file);
  const tmp = known ? undefined : restoreGhost(ctx, e.ghost!, e.path);
  const path = known ? `/proc/${known.pid}/fd/${known.fd}` : `/proc/${ctx.pid}/fd/${tmp}`;
  const fd = openPath(ctx, path, flags);
  if (tmp !== undefined) ctx.injector.call("close", NR.close, tmp);
  ghostsOf(ctx.tree).set(e.ghost!.file, { pid: ctx.pid, fd: e.fd });
  return fd;
}

export const fileFd = defineFdKind({
  name: "file",
  schema: FileEntry,
  matches: (p) => p.link.startsWith("/") && !!p.stat && !isTerminal(p),
  dump(p: FdProbe) {
    const deleted = p.link.endsWith(DELETED) || undefined;
    const ghost = deleted && dumpGhost(p);
    return {
      ...ghost,
      kind: "file" as const,
      fd: p.fd,
      flags: p.flags,
      path: p.link,
      pos: p.pos,
      type: typeOf(p.stat!),
      deleted,
      owner: PROC_FILE.test(p.link) ? p.pid : undefined,
      identity: p.stat!.isFile && !PROC_FILE.test(p.link)
        ? { ino: p.stat!.ino ?? 0, size: p.stat!.size, mtimeMs: p.stat!.mtime?.getTime() ?? 0 }
        : undefined,
    };
  },
  unrestorable: (e) => {
    const why = whyNot(e);
    return why && `fd ${e.fd}: ${why}`;
  },
  precheck(e, ctx) {
    if (e.ghost) return checkGhost(ctx, e.ghost);
    if (e.viaMapping) return;
    // A file of the process's own /proc directory exists once the process does.
    if (PROC_FILE.exec(e.path)?.[1] === String(ctx.pid)) return;
    let now: Deno.FileInfo;
    try {
      // The descriptor's own file: a symlink is not followed.
      now = e.type === "symlink" ? Deno.lstatSync(e.path) : Deno.statSync(e.path);
    } catch {
      throw new AmberError(`${e.path}: no such file`);
    }
    // Opening a FIFO or socket put there since would block the new process.
    if (now.isFifo || now.isSocket) {
      throw new AmberError(`${e.path}: now a FIFO or socket, was a ${e.type} file`);
    }
    // While the dumped process still runs, restore refuses its pid as in use
    // (checked last); the file it keeps writing is no news then.
    const change = e.identity && !ctx.options.allowChangedFiles && !running(ctx.pid) &&
      changed(e, now);
    if (change) {
      throw new AmberError(
        `${e.path}: changed since the dump (${change}); the restored process would ` +
          "overwrite or misread it: restore with --allow-changed-files to accept the file as it is",
      );
    }
  },
  restore(ctx, e) {
    const { pid, injector: inj, scratch } = ctx;
    let flags = e.flags & ~(O_CREAT | O_EXCL | O_TRUNC | O_CLOEXEC) | O_NOCTTY;
    if (e.type === "symlink") flags |= O_PATH | O_NOFOLLOW;
    const fd = e.ghost || e.viaMapping ? openGhost(ctx, e, flags) : Number(
      inj.call(`open ${e.path}`, NR.openat, -100, putString(pid, scratch, e.path), flags, 0),
    );
    if (e.type === "regular" && e.pos && !(flags & O_PATH)) {
      inj.call("lseek", NR.lseek, fd, e.pos, SEEK_SET);
    }
    return fd;
  },
});
