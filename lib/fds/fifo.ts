/**
 * Named pipes (FIFOs). The pipe behind the name is found again by opening
 * the name: restore opens it read-write first (which never blocks), so
 * that opening either end without blocking succeeds, refills the bytes
 * buffered at the dump (peeked with tee, once per FIFO), and gives the end
 * its own flags. A FIFO held by a process outside the tree connects again
 * through the name.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { peekPipe } from "../../ffi/pipe.ts";
import type { RestoreContext, TreeRestoreState } from "../context.ts";
import { AmberError } from "../errors.ts";
import { bytes } from "../images/codec.ts";
import { putBytes, putString } from "../scratch.ts";
import { defineFdKind, type FdProbe, O_CLOEXEC } from "./kind.ts";

const O_RDWR = 2, O_NONBLOCK = 0o4000, O_DIRECT = 0o40000, O_NOATIME = 0o1000000;
const O_CREAT = 0o100, O_EXCL = 0o200, O_NOCTTY = 0o400, O_TRUNC = 0o1000;
const F_SETFL = 4, F_SETPIPE_SZ = 1031;
const DELETED = " (deleted)";

const FifoEntry = z.object({
  kind: z.literal("fifo"),
  fd: z.number().int().min(0),
  flags: z.number().int().min(0),
  path: z.string().startsWith("/"),
  /** "dev:ino" of the FIFO: one per tree holds its contents. */
  id: z.string(),
  contents: z.object({ size: z.number().int().min(4096).max(1 << 30), data: bytes }).optional(),
});
type FifoImage = z.output<typeof FifoEntry>;

/** Per restore: FIFOs already refilled. */
const refilled = new WeakMap<TreeRestoreState, Set<string>>();

function openPath(ctx: RestoreContext, path: string, flags: number): number {
  const at = putString(ctx.pid, ctx.scratch, path);
  return Number(ctx.injector.call(`open ${path}`, NR.openat, -100, at, flags, 0));
}

function refill(ctx: RestoreContext, fd: number, c: NonNullable<FifoImage["contents"]>): void {
  const inj = ctx.injector;
  inj.call("fcntl(F_SETPIPE_SZ)", NR.fcntl, fd, F_SETPIPE_SZ, c.size);
  const chunk = ctx.scratch.size / 2;
  for (let off = 0; off < c.data.length; off += chunk) {
    const part = c.data.subarray(off, off + chunk);
    const n = inj.call("write", NR.write, fd, putBytes(ctx.pid, ctx.scratch, part), part.length);
    if (Number(n) !== part.length) {
      throw new AmberError(`FIFO refill: ${n} of ${part.length} bytes`);
    }
  }
}

export const fifoFd = defineFdKind({
  name: "fifo",
  schema: FifoEntry,
  matches: (p: FdProbe) => p.link.startsWith("/") && !!p.stat?.isFifo,
  dump(p: FdProbe) {
    const id = `${p.stat!.dev}:${p.stat!.ino}`;
    const first = !p.tree.seen.has(`fifo:${id}`);
    p.tree.seen.add(`fifo:${id}`);
    const deleted = p.link.endsWith(DELETED);
    const contents = first && !deleted ? peekPipe(p.pid, p.fd) : undefined;
    return { kind: "fifo" as const, fd: p.fd, flags: p.flags, path: p.link, id, contents };
  },
  unrestorable(e) {
    if (e.path.endsWith(DELETED)) return `fd ${e.fd}: ${e.path}: a deleted FIFO: not supported yet`;
  },
  precheck(e) {
    let st: Deno.FileInfo;
    try {
      st = Deno.statSync(e.path);
    } catch {
      throw new AmberError(`${e.path}: no such FIFO`);
    }
    if (!st.isFifo) throw new AmberError(`${e.path}: not a FIFO any more`);
  },
  restore(ctx, e) {
    const inj = ctx.injector;
    // Holding both ends meanwhile: opening one end alone does not wait for the other.
    const both = openPath(ctx, e.path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
    try {
      const done = refilled.get(ctx.tree) ?? new Set<string>();
      refilled.set(ctx.tree, done);
      if (e.contents && !done.has(e.id)) refill(ctx, both, e.contents);
      done.add(e.id);
      const flags = e.flags & ~(O_CREAT | O_EXCL | O_TRUNC | O_CLOEXEC) | O_NOCTTY | O_NONBLOCK;
      const fd = openPath(ctx, e.path, flags);
      inj.call(
        "fcntl(F_SETFL)",
        NR.fcntl,
        fd,
        F_SETFL,
        e.flags & (O_NONBLOCK | O_DIRECT | O_NOATIME),
      );
      return fd;
    } finally {
      inj.call("close", NR.close, both);
    }
  },
});
