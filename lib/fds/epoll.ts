/**
 * epoll: the interest list (each watched descriptor with its events and
 * data) from fdinfo `tfd:` lines. Restore creates the instance with the
 * other descriptors, and fills it once every descriptor of the process is
 * in place (a watched descriptor may have a higher number, or be another
 * epoll). A watch whose descriptor number no longer holds the watched file
 * (closed, or another process's number on a shared instance) is refused.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { AmberError } from "../errors.ts";
import { u64 } from "../images/codec.ts";
import { readProcText } from "../proc/read.ts";
import { putBytes } from "../scratch.ts";
import { defineFdKind, O_CLOEXEC } from "./kind.ts";

const EPOLL_CTL_ADD = 1;

const LINE =
  /^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)\s+pos:\s*-?\d+\s+ino:\s*([0-9a-f]+)\s+sdev:\s*([0-9a-f]+)/;

const Watch = z.object({ fd: z.number().int().min(0), events: z.number().int(), data: u64 });

/** The inode number of fd `fd` of `pid`, if open. */
function inodeOf(pid: number, fd: number): number | undefined {
  try {
    return Deno.statSync(`/proc/${pid}/fd/${fd}`).ino ?? undefined;
  } catch {
    return undefined;
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
      if (inodeOf(p.pid, fd) !== parseInt(m[4], 16)) stale ??= fd;
      watches.push({ fd, events: parseInt(m[2], 16) | 0, data: BigInt(`0x${m[3]}`) });
    }
    return { kind: "epoll" as const, fd: p.fd, flags: p.flags, watches, stale };
  },
  unrestorable(e) {
    if (e.stale !== undefined) {
      return `fd ${e.fd}: epoll watch of fd ${e.stale}, which no longer holds the watched file ` +
        "(closed, or another process's): not supported yet";
    }
  },
  restore(ctx) {
    return Number(ctx.injector.call("epoll_create1", NR.epoll_create1, O_CLOEXEC));
  },
  afterAll(ctx, e) {
    for (const w of e.watches) {
      // struct epoll_event is packed: u32 events, u64 data.
      const ev = new DataView(new ArrayBuffer(12));
      ev.setUint32(0, w.events >>> 0, true);
      ev.setBigUint64(4, w.data, true);
      const at = putBytes(ctx.pid, ctx.scratch, new Uint8Array(ev.buffer));
      ctx.injector.call(`epoll_ctl(ADD fd ${w.fd})`, NR.epoll_ctl, e.fd, EPOLL_CTL_ADD, w.fd, at);
    }
  },
});
