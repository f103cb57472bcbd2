/**
 * pidfds of processes of the tree: opened again on the same pid, which
 * the restored process has. A pidfd of a process outside the tree (or of
 * one that is gone) would name whoever has that pid after the restore:
 * refused.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { AmberError } from "../errors.ts";
import { readProcText } from "../proc/read.ts";
import { defineFdKind, type FdProbe } from "./kind.ts";

const O_NONBLOCK = 0o4000, O_EXCL = 0o200;

/** Processes of the dumped tree are the ones amber holds seized right now. */
function seizedByUs(pid: number): boolean {
  try {
    const status = Deno.readTextFileSync(`/proc/${pid}/status`);
    return /^TracerPid:\s*(\d+)/m.exec(status)?.[1] === String(Deno.pid);
  } catch {
    return false;
  }
}

export const pidFd = defineFdKind({
  name: "pidfd",
  schema: z.object({
    kind: z.literal("pidfd"),
    fd: z.number().int().min(0),
    flags: z.number().int().min(0),
    /** -1: the process is gone (fdinfo says so). */
    pid: z.number().int().min(-1),
    inTree: z.boolean(),
  }),
  matches: (p: FdProbe) => p.link === "anon_inode:[pidfd]",
  dump(p: FdProbe) {
    const m = /^Pid:\s*(-?\d+)/m.exec(readProcText(p.pid, `fdinfo/${p.fd}`));
    if (!m) throw new AmberError("fdinfo shows no Pid");
    const pid = Number(m[1]);
    return { kind: "pidfd" as const, fd: p.fd, flags: p.flags, pid, inTree: seizedByUs(pid) };
  },
  unrestorable(e) {
    if (e.pid < 0) return `fd ${e.fd}: pidfd of a process that is gone: not supported yet`;
    if (!e.inTree) {
      return `fd ${e.fd}: pidfd of pid ${e.pid}, outside the dumped tree: not supported yet`;
    }
  },
  restore(ctx, e) {
    // PIDFD_NONBLOCK is O_NONBLOCK, PIDFD_THREAD is O_EXCL; pidfds are always O_CLOEXEC.
    const flags = e.flags & (O_NONBLOCK | O_EXCL);
    return Number(ctx.injector.call(`pidfd_open ${e.pid}`, NR.pidfd_open, e.pid, flags));
  },
});
