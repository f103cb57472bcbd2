/**
 * fanotify: the group (its init flags and the flags of the event
 * descriptors it hands out, from fdinfo) and every inode mark (mask,
 * ignored mask, mark flags), found again through the marked inode's file
 * handle and recorded by path, like inotify's watches; mount marks by
 * their mount point (mountinfo) and filesystem marks by a mount of that
 * filesystem. Restore creates the group with fanotify_init and adds the
 * marks with fanotify_mark. Refused: events queued and not read; groups of
 * the permission classes (a process may be blocked waiting for an answer
 * the group owes it, which nothing shows).
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import type { RestoreContext } from "../context.ts";
import { AmberError, withContext } from "../errors.ts";
import { readProcText } from "../proc/read.ts";
import { putString } from "../scratch.ts";
import {
  fdinfoFields,
  handlePath,
  hexField,
  inodeAt,
  mountOf,
  mountPointOf,
  queuedBytes,
  setNonblock,
} from "./fshandle.ts";
import { defineFdKind, type FdProbe } from "./kind.ts";

const FAN_CLOEXEC = 0x1, FAN_NONBLOCK = 0x2, FAN_CLASS_MASK = 0xc;
const FAN_MARK_ADD = 0x1, FAN_MARK_IGNORED_MASK = 0x20, FAN_MARK_IGNORE = 0x400;
const FAN_MARK_ON = { inode: 0, mount: 0x10, filesystem: 0x100 } as const;
/** Mark flags fdinfo shows and fanotify_mark takes back as they are. */
const FAN_MARK_IGNORED_SURV_MODIFY = 0x40, FAN_MARK_EVICTABLE = 0x200;
const AT_FDCWD = -100;

const Mark = z.object({
  /** What is marked: the inode at `path`, the mount there, or its filesystem. */
  on: z.enum(["inode", "mount", "filesystem"]),
  path: z.string().startsWith("/"),
  /** The inode at `path` at the dump (for a mount or filesystem: the mount's root). */
  ino: z.number().int().min(0),
  mask: z.number().int().min(0),
  ignoredMask: z.number().int().min(0),
  markFlags: z.number().int().min(0),
});
type Mark = z.infer<typeof Mark>;

/** The group line and the marks of an fdinfo. */
function readMarks(p: FdProbe) {
  let group: Map<string, string> | undefined;
  const marks: z.input<typeof Mark>[] = [];
  for (const line of readProcText(p.pid, `fdinfo/${p.fd}`).split("\n")) {
    if (!line.startsWith("fanotify ")) continue;
    const f = fdinfoFields(line);
    if (f.has("event-flags")) {
      group = f;
      continue;
    }
    const on = f.has("mnt_id") ? "mount" : f.has("ino") ? "inode" : "filesystem";
    const path = withContext(`fanotify ${on} mark`, () => markedPath(p, on, f));
    marks.push({
      on,
      path,
      ino: on === "inode" ? hexField(f, "ino") : inodeAt(path) ?? 0,
      mask: hexField(f, "mask"),
      ignoredMask: hexField(f, "ignored_mask"),
      markFlags: hexField(f, "mflags"),
    });
  }
  if (!group) throw new AmberError(`fdinfo: no fanotify group line`);
  return { group, marks };
}

/** Where a mark is found again: the inode's path, the mount point, a mount of the filesystem. */
function markedPath(p: FdProbe, on: Mark["on"], f: Map<string, string>): string {
  if (on === "inode") return handlePath(p, f);
  if (on === "mount") return mountPointOf(p.pid, hexField(f, "mnt_id"));
  return mountOf(p.pid, hexField(f, "sdev"));
}

export const fanotifyFd = defineFdKind({
  name: "fanotify",
  schema: z.object({
    kind: z.literal("fanotify"),
    fd: z.number().int().min(0),
    flags: z.number().int().min(0),
    /** fanotify_init's flags and event_f_flags. */
    initFlags: z.number().int().min(0),
    eventFlags: z.number().int().min(0),
    marks: z.array(Mark),
    /** Bytes of events queued and not read at the dump. */
    queued: z.number().int().min(0),
  }),
  matches: (p) => p.link === "anon_inode:[fanotify]" && !!p.inject,
  dump(p) {
    const { group, marks } = readMarks(p);
    return {
      kind: "fanotify" as const,
      fd: p.fd,
      flags: p.flags,
      initFlags: hexField(group, "flags"),
      eventFlags: hexField(group, "event-flags"),
      marks,
      queued: queuedBytes(p),
    };
  },
  unrestorable(e) {
    const what = `fd ${e.fd}: fanotify`;
    if (e.queued) {
      return `${what}: ${e.queued} bytes of events not read yet would be lost: not supported yet`;
    }
    if (e.initFlags & FAN_CLASS_MASK) {
      return `${what}: a permission-class group (answers it owes cannot be seen): not supported yet`;
    }
  },
  precheck(e) {
    for (const m of e.marks) {
      if (inodeAt(m.path) !== m.ino) {
        throw new AmberError(`fanotify ${m.on} mark: ${m.path} is not what was marked any more`);
      }
    }
  },
  restore(ctx, e) {
    const inj = ctx.injector;
    const init = (e.initFlags & ~FAN_NONBLOCK) | FAN_CLOEXEC | FAN_NONBLOCK;
    const fd = Number(inj.call("fanotify_init", NR.fanotify_init, init, e.eventFlags));
    for (const m of e.marks) {
      withContext(`fanotify mark ${m.path}`, () => addMark(ctx, fd, m));
    }
    setNonblock(inj, fd, e.flags);
    return fd;
  },
});

/** Adds mark `m` back: its mask, then its ignored mask (as the old or the new ignore flag). */
function addMark(ctx: RestoreContext, fd: number, m: Mark): void {
  const inj = ctx.injector;
  const at = putString(ctx.pid, ctx.scratch, m.path);
  const keep = (m.markFlags & (FAN_MARK_IGNORED_SURV_MODIFY | FAN_MARK_EVICTABLE)) |
    FAN_MARK_ON[m.on];
  if (m.mask) {
    inj.call("fanotify_mark", NR.fanotify_mark, fd, FAN_MARK_ADD | keep, m.mask, AT_FDCWD, at);
  }
  if (m.ignoredMask) {
    const ignore = m.markFlags & FAN_MARK_IGNORE ? FAN_MARK_IGNORE : FAN_MARK_IGNORED_MASK;
    const flags = FAN_MARK_ADD | ignore | keep;
    inj.call("fanotify_mark(ignore)", NR.fanotify_mark, fd, flags, m.ignoredMask, AT_FDCWD, at);
  }
}
