/**
 * Terminals outside the tree. A process attached to a terminal can only
 * come back with --shell-job: it then gets the terminal amber was started
 * on, with the settings its terminal had at the dump (lib/fds/shelljob.ts
 * applies them to the whole job). /dev/tty is reopened in the process,
 * where it names its restored controlling terminal. Consoles, virtual
 * consoles and serial lines are refused.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { takeFd } from "../../ffi/socket.ts";
import { getTermios, getWinSize, TTY_IOCTL } from "../../ffi/tty.ts";
import { errnoName, libc } from "../../ffi/libc.ts";
import type { RestoreContext } from "../context.ts";
import { AmberError, withContext } from "../errors.ts";
import { readStat } from "../proc/stat.ts";
import { putString } from "../scratch.ts";
import { defineFdKind, type FdProbe } from "./kind.ts";

/** Terminal char devices: /dev/tty*, /dev/pts/*, /dev/console, /dev/ptmx. */
export function isTerminal(p: FdProbe): boolean {
  if (!p.stat?.isCharDevice) return false;
  return /^\/dev\/(tty|pts\/|console|ptmx)/.test(p.link);
}

const TermiosImage = z.object({
  iflag: z.number().int().min(0),
  oflag: z.number().int().min(0),
  cflag: z.number().int().min(0),
  lflag: z.number().int().min(0),
  line: z.number().int().min(0).max(255),
  cc: z.array(z.number().int().min(0).max(255)).length(19),
});
const WinSizeImage = z.object({
  rows: z.number().int().min(0).max(0xffff),
  cols: z.number().int().min(0).max(0xffff),
  xpixel: z.number().int().min(0).max(0xffff),
  ypixel: z.number().int().min(0).max(0xffff),
});

/** What a terminal was at the dump, as seen through one descriptor on it. */
export const TerminalImage = z.object({
  termios: TermiosImage,
  winSize: WinSizeImage,
  /** It was the controlling terminal of the process holding the descriptor. */
  ctty: z.boolean(),
  /** Its session and foreground process group, when it was the controlling terminal. */
  sid: z.number().int().min(0).optional(),
  pgrp: z.number().int().min(0).optional(),
});
export type TerminalImage = z.output<typeof TerminalImage>;

const TtyImage = z.object({
  kind: z.literal("tty"),
  fd: z.number().int().min(0),
  flags: z.number().int().min(0),
  path: z.string(),
  /** Device number (st_rdev), as glibc encodes it. */
  rdev: z.number().int().min(0).optional(),
  terminal: TerminalImage.optional(),
});
type TtyImage = z.output<typeof TtyImage>;

const O_NOCTTY = 0o400;
const EPERM = 1n;
const major = (rdev: number) => (rdev >>> 8) & 0xfff;
const minor = (rdev: number) => (rdev & 0xff) | ((rdev >>> 12) & 0xfff00);

/** What kind of terminal a device is (Documentation/admin-guide/devices.txt). */
export function terminalKind(path: string, rdev?: number): string {
  if (rdev === undefined) return /^\/dev\/pts\/\d+$/.test(path) ? "pts" : "unknown";
  const [ma, mi] = [major(rdev), minor(rdev)];
  if (ma >= 136 && ma <= 143) return "pts";
  if (ma === 5 && mi === 0) return "tty";
  if (ma === 5 && mi === 1) return "console";
  if ((ma === 5 && mi === 2) || path.endsWith("/ptmx")) return "ptmx";
  if (ma === 4 && mi < 64) return "virtual console";
  if (ma === 4 || ma === 204) return "serial line";
  return "unknown";
}

/** Reads the terminal behind fd `fd` of `pid` through a copy of the descriptor in amber. */
function readTerminal(p: FdProbe, rdev: number): TerminalImage {
  const fd = takeFd(p.pid, p.fd);
  try {
    const st = readStat(p.pid);
    const ctty = st.ttyNr !== 0 && st.ttyNr === rdev;
    return {
      termios: getTermios(fd),
      winSize: getWinSize(fd),
      ctty,
      ...(ctty ? { sid: st.sid, pgrp: st.tpgid } : {}),
    };
  } finally {
    libc().close(fd);
  }
}

/** Reopens /dev/tty inside the process: its controlling terminal, as restored. */
function openDevTty(ctx: RestoreContext, e: TtyImage): number {
  const path = putString(ctx.pid, ctx.scratch, "/dev/tty");
  // Access mode, O_APPEND and O_NONBLOCK; never O_CREAT and the like.
  const flags = (e.flags & (0o3 | 0o2000 | 0o4000)) | O_NOCTTY;
  return Number(ctx.injector.call("open /dev/tty", NR.open, path, flags, 0));
}

export const ttyFd = defineFdKind({
  name: "tty",
  schema: TtyImage,
  matches: isTerminal,
  dump(p) {
    const rdev = p.stat!.rdev ?? 0;
    const kind = terminalKind(p.link, rdev);
    const terminal = kind === "pts" || kind === "tty" ? readTerminal(p, rdev) : undefined;
    return { kind: "tty" as const, fd: p.fd, flags: p.flags, path: p.link, rdev, terminal };
  },
  unrestorable(e) {
    const kind = terminalKind(e.path, e.rdev);
    if (kind === "ptmx") return `fd ${e.fd}: pty master ${e.path}: not supported yet`;
    if (kind !== "pts" && kind !== "tty") {
      return `fd ${e.fd}: ${e.path} is a ${kind}: not supported`;
    }
  },
  precheck(e, ctx) {
    if (!ctx.options.shellJob) {
      throw new AmberError(`${e.path} is a terminal: restore with --shell-job`);
    }
  },
  restore(ctx, e) {
    if (terminalKind(e.path, e.rdev) === "tty") return openDevTty(ctx, e);
    const tty = [...ctx.inherited].find(([, what]) => /^\/dev\/(tty|pts\/|console)/.test(what));
    if (!tty) throw new AmberError("--shell-job needs amber to run on a terminal");
    return Number(ctx.injector.call("dup", NR.fcntl, tty[0], 0, /* F_DUPFD */ 0));
  },
  finish(ctx, e) {
    // A session leader gets its terminal back as controlling terminal; a
    // process of another session has it through its session already.
    if (!e.terminal?.ctty || e.terminal.sid !== ctx.pid) return;
    withContext(`${e.path} was its controlling terminal`, () => {
      const r = ctx.injector.raw(NR.ioctl, e.fd, TTY_IOCTL.TIOCSCTTY, 0);
      if (r === -EPERM) {
        throw new AmberError(
          "TIOCSCTTY: EPERM (amber's terminal is the controlling terminal of another session)",
        );
      }
      if (r < 0n) throw new AmberError(`TIOCSCTTY: ${errnoName(Number(-r))}`);
    });
  },
});
