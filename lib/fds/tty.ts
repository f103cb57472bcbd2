/**
 * Terminals. A process attached to a terminal can only come back with
 * --shell-job: it then gets the terminal amber was started on. A
 * pseudo-terminal master (/dev/ptmx) the process opened itself is a
 * terminal of its own, not its job's: refused for now.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { AmberError } from "../errors.ts";
import { defineFdKind, type FdProbe } from "./kind.ts";

/** Terminal char devices: /dev/tty*, /dev/pts/*, /dev/console, /dev/ptmx. */
export function isTerminal(p: FdProbe): boolean {
  if (!p.stat?.isCharDevice) return false;
  return /^\/dev\/(tty|pts\/|console|ptmx)/.test(p.link);
}

export const ttyFd = defineFdKind({
  name: "tty",
  schema: z.object({
    kind: z.literal("tty"),
    fd: z.number().int().min(0),
    flags: z.number().int().min(0),
    path: z.string(),
  }),
  matches: isTerminal,
  dump: (p) => ({ kind: "tty" as const, fd: p.fd, flags: p.flags, path: p.link }),
  unrestorable(e) {
    if (e.path === "/dev/ptmx") {
      return `fd ${e.fd}: /dev/ptmx: a pseudo-terminal the process opened itself: not supported yet`;
    }
  },
  precheck(e, ctx) {
    if (!ctx.options.shellJob) {
      throw new AmberError(`${e.path} is a terminal: restore with --shell-job`);
    }
  },
  restore(ctx) {
    const tty = [...ctx.inherited].find(([, what]) => /^\/dev\/(tty|pts\/|console)/.test(what));
    if (!tty) throw new AmberError("--shell-job needs amber to run on a terminal");
    return Number(ctx.injector.call("dup", NR.fcntl, tty[0], 0, /* F_DUPFD */ 0));
  },
});
