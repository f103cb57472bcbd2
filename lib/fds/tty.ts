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
import { putBytes, putString } from "../scratch.ts";
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
  /** The process was in that foreground group. */
  fg: z.boolean().optional(),
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
  if (rdev === undefined) {
    return /^\/dev\/pts\/\d+$/.test(path) ? "pts" : "terminal amber does not know";
  }
  const [ma, mi] = [major(rdev), minor(rdev)];
  if (ma >= 136 && ma <= 143) return "pts";
  if (ma === 5 && mi === 0) return "tty";
  if (ma === 5 && mi === 1) return "console";
  if ((ma === 5 && mi === 2) || path.endsWith("/ptmx")) return "ptmx";
  if (ma === 4 && mi < 64) return "virtual console";
  if (ma === 4 || ma === 204) return "serial line";
  return `terminal amber does not know (device ${ma}:${mi})`;
}

/**
 * What a terminal is, read through `fd`, amber's copy of a descriptor of
 * process `pid` whose device is `rdev`.
 */
export function readTerminal(pid: number, fd: number, rdev: number): TerminalImage {
  const st = readStat(pid);
  const ctty = st.ttyNr !== 0 && st.ttyNr === rdev;
  return {
    termios: getTermios(fd),
    winSize: getWinSize(fd),
    ctty,
    ...(ctty ? { sid: st.sid, pgrp: st.tpgid, fg: st.pgid === st.tpgid } : {}),
  };
}

/** Runs fn on amber's copy of fd `p.fd` of `p.pid`. */
export function withFdCopy<T>(p: FdProbe, fn: (fd: number) => T): T {
  const fd = takeFd(p.pid, p.fd);
  try {
    return fn(fd);
  } finally {
    libc().close(fd);
  }
}

/** Reopens /dev/tty inside the process: its controlling terminal, as restored. */
export function openDevTty(ctx: RestoreContext, e: { flags: number }): number {
  // A session leader's controlling terminal is set at the end: set it now. (Other
  // processes inherited theirs; their foreground group waits for the end.)
  restoreControllingTerminal(ctx, true);
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
    const terminal = kind === "pts" || kind === "tty"
      ? withFdCopy(p, (fd) => readTerminal(p.pid, fd, rdev))
      : undefined;
    return { kind: "tty" as const, fd: p.fd, flags: p.flags, path: p.link, rdev, terminal };
  },
  unrestorable(e) {
    const kind = terminalKind(e.path, e.rdev);
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
});

interface TerminalEntry {
  kind: string;
  fd: number;
  path?: string;
  terminal?: TerminalImage;
}

/**
 * Once a process's parts are restored (its scratch still mapped): a
 * session leader gets its controlling terminal back (TIOCSCTTY), and a
 * process of a pty's foreground group makes its group the foreground
 * again (TIOCSPGRP; amber's own terminal is handed over by
 * lib/fds/shelljob.ts instead). Other processes of a session have their
 * controlling terminal through it. Shared descriptors count too: a shell
 * usually holds its terminal only as descriptors inherited from its parent.
 */
export function restoreControllingTerminal(ctx: RestoreContext, leaderOnly = false): void {
  const fds = (ctx.images.fds as { fds: TerminalEntry[] } | undefined)?.fds ?? [];
  const ctty = fds.find((e) => (e.kind === "tty" || e.kind === "pty") && e.terminal?.ctty);
  if (!ctty?.terminal) return;
  const { sid, pgrp, fg } = ctty.terminal;
  const what = `fd ${ctty.fd}: ${ctty.path ?? "its terminal"} was its controlling terminal`;
  withContext(what, () => {
    if (sid === ctx.pid) {
      const r = ctx.injector.raw(NR.ioctl, ctty.fd, TTY_IOCTL.TIOCSCTTY, 0);
      if (r === -EPERM && ctty.kind === "tty") {
        throw new AmberError(
          "TIOCSCTTY: EPERM (amber's terminal is the controlling terminal of another session)",
        );
      }
      if (r < 0n) throw new AmberError(`TIOCSCTTY: ${errnoName(Number(-r))}`);
    }
    if (ctty.kind === "pty" && fg && pgrp !== undefined && !leaderOnly) {
      const at = putBytes(ctx.pid, ctx.scratch, new Uint8Array(new Int32Array([pgrp]).buffer));
      ctx.injector.call(`ioctl(TIOCSPGRP ${pgrp})`, NR.ioctl, ctty.fd, TTY_IOCTL.TIOCSPGRP, at);
    }
  });
}
