/**
 * epoll instances. Dump reads the interest list from fdinfo (`tfd`,
 * events, data, and the watched file's inode, checked against the
 * process's own descriptor so a watch whose descriptor was closed is
 * refused rather than pointed at the wrong file). Restore creates the
 * instance and, once every descriptor of the process is in place, adds
 * each watch again with its events and data; readiness comes back from
 * the files themselves.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import type { RestoreContext } from "../context.ts";
import { u64 } from "../images/codec.ts";
import { procPath, readProcText } from "../proc/read.ts";
import { putBytes } from "../scratch.ts";
import { defineFdKind, type FdProbe, O_CLOEXEC } from "./kind.ts";

const EPOLL_CTL_ADD = 1;
const WATCH =
  /^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)\s+pos:\d+\s+ino:([0-9a-f]+)/gm;

const Watch = z.object({
  tfd: z.number().int().min(0),
  events: z.number().int().min(0).max(0xffffffff),
  data: u64,
});

const EpollEntry = z.object({
  kind: z.literal("epoll"),
  fd: z.number().int().min(0),
  flags: z.number().int().min(0),
  watches: z.array(Watch).max(1 << 20),
  /** A watch on a file no descriptor of the process holds as that number any more. */
  refusal: z.string().optional(),
});
type EpollImage = z.output<typeof EpollEntry>;

function inodeOf(pid: number, fd: number): number | undefined {
  try {
    return Deno.statSync(procPath(pid, `fd/${fd}`)).ino ?? undefined;
  } catch {
    return undefined;
  }
}

/** struct epoll_event, packed on x86-64: u32 events, u64 data. */
function epollEvent(events: number, data: bigint): Uint8Array {
  const b = new Uint8Array(12);
  const v = new DataView(b.buffer);
  v.setUint32(0, events, true);
  v.setBigUint64(4, data, true);
  return b;
}

export const epollFd = defineFdKind({
  name: "epoll",
  schema: EpollEntry,
  matches: (p: FdProbe) => p.link === "anon_inode:[eventpoll]",
  dump(p: FdProbe) {
    const info = readProcText(p.pid, `fdinfo/${p.fd}`);
    const watches = [];
    let refusal: string | undefined;
    for (const m of info.matchAll(WATCH)) {
      const tfd = Number(m[1]), ino = parseInt(m[4], 16);
      if (inodeOf(p.pid, tfd) !== ino) {
        refusal ??= `watches inode ${ino} as fd ${tfd}, which that fd no longer is ` +
          "(closed or replaced after epoll_ctl): not supported yet";
      }
      watches.push({ tfd, events: parseInt(m[2], 16), data: BigInt("0x" + m[3]) });
    }
    return { kind: "epoll" as const, fd: p.fd, flags: p.flags, watches, refusal };
  },
  unrestorable: (e) => e.refusal && `fd ${e.fd}: epoll: ${e.refusal}`,
  restore(ctx, _e) {
    return Number(ctx.injector.call("epoll_create1", NR.epoll_create1, O_CLOEXEC));
  },
  finish(ctx: RestoreContext, e: EpollImage) {
    for (const w of e.watches) {
      const at = putBytes(ctx.pid, ctx.scratch, epollEvent(w.events, w.data));
      ctx.injector.call(`epoll_ctl(ADD fd ${w.tfd})`, NR.epoll_ctl, e.fd, EPOLL_CTL_ADD, w.tfd, at);
    }
  },
});
