/**
 * inotify: every watch (wd, mask) found again through the watched inode's
 * file handle (fdinfo f_handle, opened by open_by_handle_at inside the
 * frozen process at dump) and recorded by path. Restore adds the watches
 * in wd order, re-adding until the kernel hands out the same wd, then
 * drains the IN_IGNORED events that leaves. Events queued and not read at
 * the dump would be lost: refused. fdinfo's mask carries IN_ONESHOT and
 * IN_EXCL_UNLINK too (seen on 6.18), so they are added back with the watch.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { AmberError, withContext } from "../errors.ts";
import { readProcText } from "../proc/read.ts";
import { putBytes, putString } from "../scratch.ts";
import {
  fdinfoFields,
  handlePath,
  hexField,
  inodeAt,
  queuedBytes,
  setNonblock,
} from "./fshandle.ts";
import { defineFdKind, O_CLOEXEC } from "./kind.ts";

const O_NONBLOCK = 0o4000;
const EAGAIN = 11;

const Watch = z.object({
  wd: z.number().int().min(1),
  mask: z.number().int().min(0),
  path: z.string().startsWith("/"),
  ino: z.number().int().min(0),
});

export const inotifyFd = defineFdKind({
  name: "inotify",
  schema: z.object({
    kind: z.literal("inotify"),
    fd: z.number().int().min(0),
    flags: z.number().int().min(0),
    watches: z.array(Watch),
    /** Bytes of events queued and not read at the dump. */
    queued: z.number().int().min(0),
  }),
  matches: (p) => p.link === "anon_inode:inotify" && !!p.inject,
  dump(p) {
    const watches: z.input<typeof Watch>[] = [];
    for (const line of readProcText(p.pid, `fdinfo/${p.fd}`).split("\n")) {
      if (!line.startsWith("inotify ")) continue;
      const f = fdinfoFields(line);
      const wd = hexField(f, "wd");
      const path = withContext(`inotify watch ${wd}`, () => handlePath(p, f));
      watches.push({ wd, mask: hexField(f, "mask"), path, ino: hexField(f, "ino") });
    }
    watches.sort((a, b) => a.wd - b.wd);
    return { kind: "inotify" as const, fd: p.fd, flags: p.flags, watches, queued: queuedBytes(p) };
  },
  unrestorable(e) {
    if (e.queued) {
      return `fd ${e.fd}: inotify: ${e.queued} bytes of events not read yet would be lost: not supported yet`;
    }
  },
  precheck(e) {
    for (const w of e.watches) {
      if (inodeAt(w.path) !== w.ino) {
        throw new AmberError(`inotify watch ${w.wd}: ${w.path} is not the watched file any more`);
      }
    }
  },
  restore(ctx, e) {
    const inj = ctx.injector;
    const fd = Number(inj.call("inotify_init1", NR.inotify_init1, O_CLOEXEC | O_NONBLOCK));
    for (const w of e.watches) {
      withContext(`inotify watch ${w.wd} ${w.path}`, () => {
        const at = putString(ctx.pid, ctx.scratch, w.path);
        // wds are handed out in increasing order: skip up to the wanted one.
        for (;;) {
          const wd = Number(inj.call("inotify_add_watch", NR.inotify_add_watch, fd, at, w.mask));
          if (wd === w.wd) break;
          if (wd > w.wd) throw new AmberError(`the kernel gave wd ${wd}`);
          inj.call("inotify_rm_watch", NR.inotify_rm_watch, fd, wd);
        }
      });
    }
    // Removing the skipped watches queued IN_IGNORED events: none was queued at the dump.
    const buf = putBytes(ctx.pid, ctx.scratch, new Uint8Array(4096));
    while (inj.raw(NR.read, fd, buf, 4096) > 0n) { /* drained */ }
    const r = inj.raw(NR.read, fd, buf, 4096);
    if (r !== -BigInt(EAGAIN)) throw new AmberError(`draining IN_IGNORED events: ${r}`);
    setNonblock(inj, fd, e.flags);
    return fd;
  },
});
