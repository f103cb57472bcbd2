/**
 * epoll: the interest list (each watched descriptor with its events and
 * data) from fdinfo `tfd:` lines. Restore creates the instance with the
 * other descriptors, and fills it once every descriptor of the process is
 * in place (a watched descriptor may have a higher number, or be another
 * epoll). A watch whose descriptor number no longer holds the watched file
 * (closed there and kept open as a dup, the number re-used) is added again
 * through the dup, moved to that number for the epoll_ctl; one whose file
 * this process no longer holds at all (another process's number on a
 * shared instance) is refused.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { epollWatchIsFile } from "../../ffi/libc.ts";
import { AmberError } from "../errors.ts";
import { u64 } from "../images/codec.ts";
import { readProcText } from "../proc/read.ts";
import { putBytes } from "../scratch.ts";
import type { RestoreContext } from "../context.ts";
import { defineFdKind, O_CLOEXEC } from "./kind.ts";

const EPOLL_CTL_ADD = 1;

const LINE =
  /^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)\s+pos:\s*-?\d+\s+ino:\s*([0-9a-f]+)\s+sdev:\s*([0-9a-f]+)/;

const Watch = z.object({
  fd: z.number().int().min(0),
  events: z.number().int(),
  data: u64,
  /** The descriptor holding the watched file when number `fd` no longer does. */
  via: z.number().int().min(0).optional(),
});
type Watch = z.infer<typeof Watch>;

const F_GETFD = 1, F_DUPFD_CLOEXEC = 1030, FD_CLOEXEC = 1;

/** The descriptor of `pid` that holds the file `epfd` watches under `key`, if any. */
function holderOfWatch(pid: number, epfd: number, key: number): number | undefined {
  if (epollWatchIsFile(pid, epfd, key)) return key;
  for (const name of Deno.readDirSync(`/proc/${pid}/fd`)) {
    const fd = Number(name.name);
    if (epollWatchIsFile(pid, epfd, key, fd)) return fd;
  }
}

export const epollFd = defineFdKind({
  name: "epoll",
  schema: z.object({
    kind: z.literal("epoll"),
    fd: z.number().int().min(0),
    flags: z.number().int().min(0),
    watches: z.array(Watch),
    /** A watch amber could not tie to a descriptor of this process. */
    stale: z.number().int().optional(),
  }),
  matches: (p) => p.link === "anon_inode:[eventpoll]",
  dump(p) {
    const watches: z.input<typeof Watch>[] = [];
    let stale: number | undefined;
    for (const line of readProcText(p.pid, `fdinfo/${p.fd}`).split("\n")) {
      if (!line.startsWith("tfd:")) continue;
      const m = LINE.exec(line);
      if (!m) throw new AmberError(`fdinfo: cannot parse "${line}"`);
      const fd = Number(m[1]);
      // kcmp, not the inode: anonymous descriptors (eventfd, timerfd...) share one.
      const holder = holderOfWatch(p.pid, p.fd, fd);
      if (holder === undefined) stale ??= fd;
      const via = holder === fd ? undefined : holder;
      watches.push({ fd, events: parseInt(m[2], 16) | 0, data: BigInt(`0x${m[3]}`), via });
    }
    return { kind: "epoll" as const, fd: p.fd, flags: p.flags, watches, stale };
  },
  unrestorable(e) {
    if (e.stale !== undefined) {
      return `fd ${e.fd}: epoll watch of fd ${e.stale}, whose file this process no longer holds ` +
        "(another process's descriptor on a shared epoll): not supported yet";
    }
  },
  restore(ctx) {
    return Number(ctx.injector.call("epoll_create1", NR.epoll_create1, O_CLOEXEC));
  },
  afterAll(ctx, e) {
    for (const w of e.watches) {
      if (w.via === undefined) addWatch(ctx, e.fd, w);
      else addWatchVia(ctx, e.fd, w, w.via);
    }
  },
});

function addWatch(ctx: RestoreContext, epfd: number, w: Watch): void {
  // struct epoll_event is packed: u32 events, u64 data.
  const ev = new DataView(new ArrayBuffer(12));
  ev.setUint32(0, w.events >>> 0, true);
  ev.setBigUint64(4, w.data, true);
  const at = putBytes(ctx.pid, ctx.scratch, new Uint8Array(ev.buffer));
  ctx.injector.call(`epoll_ctl(ADD fd ${w.fd})`, NR.epoll_ctl, epfd, EPOLL_CTL_ADD, w.fd, at);
}

/**
 * Adds a watch keyed by number `w.fd` on the file `via` holds: the file is
 * put at that number for the epoll_ctl, and whatever the number holds
 * (with its close-on-exec flag) is put back after.
 */
function addWatchVia(ctx: RestoreContext, epfd: number, w: Watch, via: number): void {
  const inj = ctx.injector;
  const flags = inj.raw(NR.fcntl, w.fd, F_GETFD); // negative: the number is free
  const saved = flags < 0n ? undefined : inj.call("fcntl", NR.fcntl, w.fd, F_DUPFD_CLOEXEC, 0);
  inj.call(`dup2(${via}, ${w.fd})`, NR.dup2, via, w.fd);
  addWatch(ctx, epfd, w);
  if (saved === undefined) {
    inj.call("close", NR.close, w.fd);
    return;
  }
  inj.call("dup3", NR.dup3, saved, w.fd, (flags & BigInt(FD_CLOEXEC)) ? O_CLOEXEC : 0);
  inj.call("close", NR.close, saved);
}
