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
import { getBytes, putBytes, putString } from "../scratch.ts";
import { defineFdKind, type FdProbe, O_CLOEXEC } from "./kind.ts";

const O_NONBLOCK = 0o4000, O_PATH = 0o10000000, O_DIRECTORY = 0o200000;
const F_GETFL = 3, F_SETFL = 4;
const FIONREAD = 0x541b;
const EAGAIN = 11;
const LINE =
  /^inotify wd:([0-9a-f]+) ino:([0-9a-f]+) sdev:([0-9a-f]+) mask:([0-9a-f]+) ignored_mask:[0-9a-f]+ fhandle-bytes:([0-9a-f]+) fhandle-type:([0-9a-f]+) f_handle:([0-9a-f]+)/;

const Watch = z.object({
  wd: z.number().int().min(1),
  mask: z.number().int().min(0),
  path: z.string().startsWith("/"),
  ino: z.number().int().min(0),
});

/** A mount point of the filesystem with kernel device number `sdev` (major << 20 | minor). */
function mountOf(pid: number, sdev: number): string {
  const dev = `${sdev >>> 20}:${sdev & 0xfffff}`;
  const mounts = readProcText(pid, "mountinfo").split("\n").map((l) => l.split(" "))
    .filter((f) => f[2] === dev);
  // A mount of the filesystem's root sees every inode of it.
  const m = mounts.find((f) => f[3] === "/") ?? mounts[0];
  if (!m) throw new AmberError(`no mount of device ${dev} in /proc/${pid}/mountinfo`);
  return m[4].replace(/\\(\d{3})/g, (_, o) => String.fromCharCode(parseInt(o, 8)));
}

/** The path of the inode behind a file handle, opened inside the (frozen) process. */
function handlePath(p: FdProbe, m: RegExpExecArray): string {
  const { injector: inj, scratch } = p.inject!;
  const mnt = mountOf(p.pid, parseInt(m[3], 16));
  const mfd = Number(
    inj.call(
      `open ${mnt}`,
      NR.openat,
      -100,
      putString(p.pid, scratch, mnt),
      O_DIRECTORY | O_CLOEXEC, // (not O_PATH: open_by_handle_at refuses those)
      0,
    ),
  );
  try {
    const handle = m[7].match(/../g)!.map((h) => parseInt(h, 16));
    const fh = new DataView(new ArrayBuffer(8 + handle.length));
    fh.setUint32(0, parseInt(m[5], 16), true);
    fh.setInt32(4, parseInt(m[6], 16), true);
    new Uint8Array(fh.buffer).set(handle, 8);
    const at = putBytes(p.pid, scratch, new Uint8Array(fh.buffer));
    const hfd = Number(
      inj.call("open_by_handle_at", NR.open_by_handle_at, mfd, at, O_PATH | O_CLOEXEC),
    );
    try {
      return Deno.readLinkSync(`/proc/${p.pid}/fd/${hfd}`);
    } finally {
      inj.call("close", NR.close, hfd);
    }
  } finally {
    inj.call("close", NR.close, mfd);
  }
}

/** Bytes of events waiting to be read (FIONREAD, inside the process). */
function queued(p: FdProbe): number {
  const { injector: inj, scratch } = p.inject!;
  const at = putBytes(p.pid, scratch, new Uint8Array(4));
  inj.call("ioctl(FIONREAD)", NR.ioctl, p.fd, FIONREAD, at);
  return new DataView(getBytes(p.pid, scratch, 4).slice().buffer).getInt32(0, true);
}

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
      const m = LINE.exec(line);
      if (!m) throw new AmberError(`fdinfo: cannot parse "${line}"`);
      const wd = parseInt(m[1], 16);
      const path = withContext(`inotify watch ${wd}`, () => handlePath(p, m));
      watches.push({ wd, mask: parseInt(m[4], 16), path, ino: parseInt(m[2], 16) });
    }
    watches.sort((a, b) => a.wd - b.wd);
    return { kind: "inotify" as const, fd: p.fd, flags: p.flags, watches, queued: queued(p) };
  },
  unrestorable(e) {
    if (e.queued) {
      return `fd ${e.fd}: inotify: ${e.queued} bytes of events not read yet would be lost: not supported yet`;
    }
  },
  precheck(e) {
    for (const w of e.watches) {
      let ino: number | undefined;
      try {
        ino = Deno.statSync(w.path).ino ?? undefined;
      } catch { /* below */ }
      if (ino !== w.ino) {
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
    const flags = Number(inj.call("fcntl(F_GETFL)", NR.fcntl, fd, F_GETFL, 0));
    inj.call(
      "fcntl(F_SETFL)",
      NR.fcntl,
      fd,
      F_SETFL,
      (flags & ~O_NONBLOCK) | (e.flags & O_NONBLOCK),
    );
    return fd;
  },
});
