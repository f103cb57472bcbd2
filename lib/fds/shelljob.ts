/**
 * A restored shell job on amber's terminal (--shell-job). The terminal
 * gets the settings it had at the dump (raw mode comes back raw); when
 * amber restores in the foreground of its shell, the job becomes the
 * terminal's foreground process group and amber stands for it towards the
 * shell: it stops when the job stops (so the shell shows it stopped),
 * continues it when `fg` continues amber, and gives the terminal back to
 * its own group when the job ends.
 */
import * as pt from "../../ffi/ptrace.ts";
import {
  getInt,
  getTermios,
  getWinSize,
  ownProcessGroup,
  sendSignal,
  setForeground,
  setTermios,
  stopSelf,
  type Termios,
  withoutTtou,
} from "../../ffi/tty.ts";
import type { Images, ProcessImages } from "../images/read.ts";
import type { TerminalImage } from "./tty.ts";

const WUNTRACED = 2;
const SIGCONT = 18, SIGWINCH = 28;

interface TtyEntry {
  kind: string;
  terminal?: TerminalImage;
}

function terminalsOf(p: ProcessImages): TerminalImage[] {
  const fds = (p.parts.fds as { fds: TtyEntry[] } | undefined)?.fds ?? [];
  return fds.filter((e) => e.kind === "tty" && e.terminal).map((e) => e.terminal!);
}

/** amber's terminal: the first of its fds 0-2 that is one. */
function amberTerminal(): number | undefined {
  for (const fd of [0, 1, 2]) {
    try {
      getTermios(fd);
      return fd;
    } catch { /* not a terminal */ }
  }
}

export class ShellJob {
  /** The settings amber found on its terminal, once it handed the terminal to the job. */
  private shellModes?: Termios;

  private constructor(
    private readonly fd: number,
    private readonly terminal: TerminalImage,
    /** The job's process group, when the tree has its own (else it is amber's). */
    private readonly group: number | undefined,
    private readonly root: number,
  ) {}

  /** The job of --shell-job images, if they hold a terminal and amber runs on one. */
  static find(images: Images): ShellJob | undefined {
    const fd = amberTerminal();
    const [root, ...rest] = images.processes;
    // The root's controlling terminal first, then any controlling terminal, then any terminal.
    const all = [root, ...rest].flatMap(terminalsOf);
    const terminal = all.find((t) => t.ctty) ?? all[0];
    if (fd === undefined || !terminal) return undefined;
    const pids = new Set(images.processes.map((p) => p.entry.pid));
    const group = [terminal.pgrp, root.entry.pgid].find((g) => g !== undefined && pids.has(g));
    return new ShellJob(fd, terminal, group, root.entry.pid);
  }

  /** amber runs in its terminal's foreground (not `amber restore ... &`). */
  private amberInForeground(): boolean {
    try {
      return getInt(this.fd, "TIOCGPGRP") === ownProcessGroup();
    } catch {
      return false;
    }
  }

  /**
   * Before the tree runs, when amber waits for it (not -d) in its
   * terminal's foreground: the dump's terminal settings, and the terminal
   * handed to the job. A detached job runs in the background, where it
   * must not change the shell's terminal.
   */
  attach(detached: boolean): void {
    if (detached || !this.amberInForeground()) return;
    withoutTtou(() => {
      this.shellModes = getTermios(this.fd);
      setTermios(this.fd, this.terminal.termios);
      if (this.group !== undefined) setForeground(this.fd, this.group);
    });
  }

  /**
   * Once the tree runs: SIGWINCH, the signal full-screen programs redraw
   * on, when the window changed size since the dump, and always for a job
   * given the terminal (the screen shows what the shell wrote since).
   */
  started(): void {
    const now = getWinSize(this.fd), then = this.terminal.winSize;
    const resized = now.rows !== then.rows || now.cols !== then.cols;
    if (resized || this.shellModes) this.signal(SIGWINCH);
  }

  /**
   * Waits for the job's root to end, stopping and continuing with it;
   * then gives the terminal back to amber's group.
   */
  async wait(): Promise<pt.WaitStatus> {
    let st: pt.WaitStatus | undefined;
    try {
      for (;;) {
        st = await pt.waitpidAsync(this.root, WUNTRACED);
        if (!st.stopped) return st;
        this.stopWithJob(st.stopSignal);
      }
    } finally {
      this.release(st?.signaled ?? false);
    }
  }

  private stopWithJob(signal: number): void {
    let modes: Termios | undefined;
    try {
      modes = getTermios(this.fd);
    } catch { /* the terminal is gone */ }
    // Returns once the shell continues amber (fg or bg).
    stopSelf(signal);
    if (this.shellModes && this.amberInForeground()) {
      withoutTtou(() => {
        if (modes) setTermios(this.fd, modes);
        if (this.group !== undefined) setForeground(this.fd, this.group);
      });
    }
    this.signal(SIGCONT);
  }

  /** Signals the job's group, or its root when it has no group of its own. */
  private signal(signal: number): void {
    sendSignal(this.group !== undefined ? -this.group : this.root, signal);
  }

  /**
   * The terminal back to amber's group; and, as a shell does for a job
   * killed by a signal (which had no chance to), the settings amber found.
   */
  private release(killed: boolean): void {
    const modes = this.shellModes;
    if (!modes) return;
    this.shellModes = undefined;
    try {
      withoutTtou(() => {
        if (this.group !== undefined && getInt(this.fd, "TIOCGPGRP") === this.group) {
          setForeground(this.fd, ownProcessGroup());
        }
        if (killed) setTermios(this.fd, modes);
      });
    } catch { /* the terminal is gone */ }
  }
}
