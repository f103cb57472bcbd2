/**
 * Pipes. Dump records which end each descriptor is and, once per pipe, the
 * bytes buffered in it (peeked with tee, not consumed). Restore creates
 * each pipe once, in the first process that holds an end, refills it, and
 * parks the other end there until every process that needs it has taken
 * it with pidfd_getfd. Descriptors inherited over fork are the same open
 * file and are shared by the fds part before they get here.
 *
 * A pipe whose other end is held outside the tree (stdout into an outside
 * `tee`) is refused, unless the dump lists it with `--external pipe:[INO]`
 * (CRIU's spelling): it is then recorded as external, and restore puts
 * amber's own descriptor given by `--inherit-fd fd[N]:pipe:[INO]` in its
 * place. Bytes buffered for a read end the tree holds are recorded and
 * written into the new pipe, after whatever it holds already.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { peekPipe } from "../../ffi/pipe.ts";
import {
  kindState,
  type PrecheckContext,
  type RestoreContext,
  type TreeDumpState,
} from "../context.ts";
import { AmberError } from "../errors.ts";
import { bytes } from "../images/codec.ts";
import { getBytes, putBytes, putString } from "../scratch.ts";
import { fetchFd, parkFd } from "./fetch.ts";
import { holdersOf } from "./holders.ts";
import { givenFor, takeInherited } from "./inherit.ts";
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
      `pipe:[${ino}]: its ${other} end is held outside the dumped tree; not supported yet ` +
        `(dump --external pipe:[${ino}] records it as external)`,
    );
  }
  return first;
}

/**
 * An external pipe's end, noted for the tree: the tree may hold only one
 * end of it (the other is what is outside), and the first holder records
 * the buffered bytes when that end is the read end.
 */
function noteExternalEnd(tree: TreeDumpState, ino: number, end: End): boolean {
  const ends = kindState(tree.kinds, "pipe", () => new Map<number, End>());
  const known = ends.get(ino);
  ends.set(ino, end);
  if (known && known !== end) {
    tree.pending.set(
      `pipe:${ino}:external`,
      `pipe:[${ino}]: listed with --external, but the tree holds both its ends`,
    );
  }
  return !known;
}

function isExternal(tree: TreeDumpState, ino: number): boolean {
  return (tree.options.external ?? []).includes(`pipe:[${ino}]`);
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
  /** The other end is outside the tree (--external): restore needs --inherit-fd. */
  external: z.boolean().optional(),
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
    refill(ctx, w, e.contents.data);
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

function refill(ctx: RestoreContext, w: number, data: Uint8Array): void {
  const inj = ctx.injector;
  const chunk = ctx.scratch.size / 2;
  for (let off = 0; off < data.length; off += chunk) {
    const part = data.subarray(off, off + chunk);
    const n = inj.call("write", NR.write, w, putBytes(ctx.pid, ctx.scratch, part), part.length);
    if (Number(n) !== part.length) throw new Error(`pipe refill: ${n} of ${part.length} bytes`);
  }
}

/** amber's fd N must be there, a pipe end of the same direction as the one it stands for. */
function checkInherited(ctx: PrecheckContext, e: PipeImage): void {
  const given = givenFor(ctx, `pipe:[${e.ino}]`, `pipe:[${e.ino}] (${endOf(e.flags)} end)`);
  if (given && (!LINK.test(given.link) || endOf(given.flags) !== endOf(e.flags))) {
    throw new AmberError(
      `--inherit-fd fd[${given.fd}]: amber's fd ${given.fd} is ${given.link}, ` +
        `not the ${endOf(e.flags)} end of a pipe`,
    );
  }
}

/** amber's inherited descriptor, taken into this process; buffered bytes written after. */
function inheritPipe(ctx: RestoreContext, e: PipeImage): number {
  const fd = takeInherited(ctx, `pipe:[${e.ino}]`);
  if (e.contents?.data.length) {
    // A write end of the same pipe, through /proc, only for the refill.
    const O_WRONLY = 1;
    const path = putString(ctx.pid, ctx.scratch, `/proc/self/fd/${fd}`);
    const w = Number(
      ctx.injector.call(
        "open pipe for refill",
        NR.open,
        path,
        O_WRONLY | O_NONBLOCK | O_CLOEXEC,
        0,
      ),
    );
    try {
      refill(ctx, w, e.contents.data);
    } finally {
      ctx.injector.call("close", NR.close, w);
    }
  }
  ctx.tree.pipes.set(e.ino, { [endOf(e.flags)]: { pid: ctx.pid, fd: e.fd } });
  return fd;
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
    if (isExternal(p.tree, ino)) {
      // The bytes waiting for an outside reader are its business, not the tree's.
      const first = noteExternalEnd(p.tree, ino, end);
      const contents = first && end === "read" ? peekPipe(p.pid, p.fd) : undefined;
      return { kind: "pipe" as const, fd: p.fd, flags: p.flags, ino, contents, external: true };
    }
    const otherClosed = !anyoneHolds(p.tree, ino, otherEnd(end)) || undefined;
    const first = notePipeEnd(p.tree, ino, end, !!otherClosed);
    // The buffer belongs to the pipe, not to an end: record it once.
    const contents = first ? peekPipe(p.pid, p.fd) : undefined;
    return { kind: "pipe" as const, fd: p.fd, flags: p.flags, ino, contents, otherClosed };
  },
  precheck(e, ctx) {
    if (e.external) checkInherited(ctx, e);
  },
  restore(ctx, e) {
    const known = ctx.tree.pipes.get(e.ino)?.[endOf(e.flags)];
    const fd = known ? fetchFd(ctx, known) : e.external ? inheritPipe(ctx, e) : createPipe(ctx, e);
    setEndFlags(ctx, fd, e);
    return fd;
  },
});
