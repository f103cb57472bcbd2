/**
 * Pipes. Dump records which end each descriptor is and, once per pipe, the
 * bytes buffered in it (peeked with tee, not consumed). Restore creates
 * each pipe once, in the first process that holds an end, refills it, and
 * parks the other end there until every process that needs it has taken
 * it with pidfd_getfd. Descriptors inherited over fork are the same open
 * file and are shared by the fds part before they get here.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { peekPipe } from "../../ffi/pipe.ts";
import type { RestoreContext, TreeDumpState } from "../context.ts";
import { bytes } from "../images/codec.ts";
import { getBytes, putBytes } from "../scratch.ts";
import { fetchFd, parkFd } from "./fetch.ts";
import { holdersOf } from "./holders.ts";
import { defineFdKind, type FdProbe, O_CLOEXEC } from "./kind.ts";

const O_ACCMODE = 3, O_NONBLOCK = 0o4000, O_DIRECT = 0o40000, O_NOATIME = 0o1000000;
/** Status flags an end keeps on its own and F_SETFL can set (O_DIRECT: packet mode). */
const END_FLAGS = O_NONBLOCK | O_DIRECT | O_NOATIME;
const F_SETFL = 4, F_SETPIPE_SZ = 1031;
const LINK = /^pipe:\[(\d+)\]$/;

type End = "read" | "write";

function endOf(flags: number): End {
  return (flags & O_ACCMODE) === 0 ? "read" : "write";
}

function otherEnd(end: End): End {
  return end === "read" ? "write" : "read";
}

/**
 * Notes that the tree holds this end of pipe `ino`; returns true the first
 * time the pipe is seen. An end never seen by the end of the dump is left
 * in `pending`: restore could not reconnect it. An end no process holds
 * (closed everywhere) needs nothing.
 */
function notePipeEnd(tree: TreeDumpState, ino: number, end: End, otherClosed: boolean): boolean {
  const key = `pipe:${ino}`;
  const first = !tree.seen.has(key);
  tree.seen.add(key);
  tree.pending.delete(`${key}:${end}`);
  if (first && !otherClosed) {
    const other = otherEnd(end);
    tree.pending.set(
      `${key}:${other}`,
      `pipe:[${ino}]: its ${other} end is held outside the dumped tree; not supported yet`,
    );
  }
  return first;
}

const PipeEntry = z.object({
  kind: z.literal("pipe"),
  fd: z.number().int().min(0),
  flags: z.number().int().min(0),
  ino: z.number().int().min(0),
  /** Capacity and buffered bytes, recorded with the first end of the pipe dumped. */
  contents: z.object({
    size: z.number().int().min(4096).max(1 << 30),
    data: bytes,
  }).refine((c) => c.data.length <= c.size, "more data than the pipe holds").optional(),
  /** No process holds the other end (e.g. make's stdin pipe for its jobs): closed at restore. */
  otherClosed: z.boolean().optional(),
});
type PipeImage = z.output<typeof PipeEntry>;

/** Creates the pipe in this process, refilled; returns the descriptor of the wanted end. */
function createPipe(ctx: RestoreContext, e: PipeImage): number {
  const inj = ctx.injector;
  const fdsAt = putBytes(ctx.pid, ctx.scratch, new Uint8Array(8));
  // Each end's own status flags are set when that end is installed (setEndFlags).
  inj.call("pipe2", 293, fdsAt, O_CLOEXEC);
  const [r, w] = new Int32Array(getBytes(ctx.pid, ctx.scratch, 8).slice().buffer);
  if (e.contents) {
    inj.call("fcntl(F_SETPIPE_SZ)", NR.fcntl, w, F_SETPIPE_SZ, e.contents.size);
    const chunk = ctx.scratch.size / 2;
    for (let off = 0; off < e.contents.data.length; off += chunk) {
      const part = e.contents.data.subarray(off, off + chunk);
      const n = inj.call("write", NR.write, w, putBytes(ctx.pid, ctx.scratch, part), part.length);
      if (Number(n) !== part.length) throw new Error(`pipe refill: ${n} of ${part.length} bytes`);
    }
  }
  const end = endOf(e.flags);
  const [mine, other] = end === "read" ? [r, w] : [w, r];
  const here = { pid: ctx.pid, fd: e.fd };
  if (e.otherClosed) {
    inj.call(`close the ${otherEnd(end)} end nobody holds`, NR.close, other);
    ctx.tree.pipes.set(e.ino, { [end]: here });
    return mine;
  }
  // The other end waits, out of the images' way, for whoever needs it.
  const place = { pid: ctx.pid, fd: parkFd(ctx, other) };
  ctx.tree.parked.push(place);
  ctx.tree.pipes.set(e.ino, { [end]: here, [otherEnd(end)]: place });
  return mine;
}

/** The end's open file description gets the status flags of the image (O_NONBLOCK...). */
function setEndFlags(ctx: RestoreContext, fd: number, e: PipeImage): void {
  ctx.injector.call("fcntl(F_SETFL)", NR.fcntl, fd, F_SETFL, e.flags & END_FLAGS);
}

/** Whether any process of the system holds the `end` end of pipe `ino`. */
function anyoneHolds(tree: TreeDumpState, ino: number, end: End): boolean {
  return holdersOf(tree, `pipe:[${ino}]`).some((h) => endOf(h.flags) === end);
}

export const pipeFd = defineFdKind({
  name: "pipe",
  schema: PipeEntry,
  matches: (p: FdProbe) => LINK.test(p.link),
  dump(p: FdProbe) {
    const ino = Number(LINK.exec(p.link)![1]);
    const end = endOf(p.flags);
    const otherClosed = !anyoneHolds(p.tree, ino, otherEnd(end)) || undefined;
    const first = notePipeEnd(p.tree, ino, end, !!otherClosed);
    // The buffer belongs to the pipe, not to an end: record it once.
    const contents = first ? peekPipe(p.pid, p.fd) : undefined;
    return { kind: "pipe" as const, fd: p.fd, flags: p.flags, ino, contents, otherClosed };
  },
  restore(ctx, e) {
    const known = ctx.tree.pipes.get(e.ino)?.[endOf(e.flags)];
    const fd = known ? fetchFd(ctx, known) : createPipe(ctx, e);
    setEndFlags(ctx, fd, e);
    return fd;
  },
});
