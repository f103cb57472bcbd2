/**
 * Pseudo-terminals inside the tree (script, tmux, expect, sshd): a
 * /dev/ptmx master held by a process of the tree, and the /dev/pts/N
 * slaves of such a master. Restore opens /dev/ptmx until the kernel hands
 * out index N again (it gives the lowest free one), sets the dump's
 * termios, window size, packet mode and lock state through the master,
 * and reopens /dev/pts/N for each slave. Sessions and foreground groups
 * come back through restoreControllingTerminal (lib/fds/tty.ts).
 *
 * Bytes waiting in either direction (typed on the master side and not
 * read from the slave, written on the slave side and not read from the
 * master) are taken out once per pty, kept in the image, and put back at
 * once, the tree still frozen (lib/fds/ptyqueue.ts); restore puts them
 * into the new pair the same way. What cannot be put back exactly is
 * refused, named.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { getInt } from "../../ffi/tty.ts";
import type { RestoreContext, TreeDumpState } from "../context.ts";
import { kindState } from "../context.ts";
import { AmberError, withContext } from "../errors.ts";
import { listProcNumbers, readProcLink, readProcText } from "../proc/read.ts";
import { encodeTermios, hasPriorityData, TTY_IOCTL } from "../../ffi/tty.ts";
import { takeFd } from "../../ffi/socket.ts";
import { libc } from "../../ffi/libc.ts";
import { getBytes, putBytes, putString } from "../scratch.ts";
import { defineFdKind, type FdProbe } from "./kind.ts";
import { openDevTty, readTerminal, TerminalImage, terminalKind, withFdCopy } from "./tty.ts";
import { readStat } from "../proc/stat.ts";
import { holdersOf, tracedByAmber } from "./holders.ts";
import {
  canStuff,
  type Drained,
  drainInput,
  drainOutput,
  EXTPROC,
  ICANON,
  InputQueue,
  inputRefusal,
  KEEP_BELOW,
  OutputQueue,
  putInput,
  putOutput,
  QUEUE_MAX,
} from "./ptyqueue.ts";

const PtyImage = z.object({
  kind: z.literal("pty"),
  fd: z.number().int().min(0),
  flags: z.number().int().min(0),
  path: z.string(),
  /** "tty": /dev/tty in a process whose controlling terminal is the pty. */
  side: z.enum(["master", "slave", "tty"]),
  index: z.number().int().min(0).max(1 << 20),
  terminal: TerminalImage,
  /** Master only: unlockpt(3) not called yet; packet mode (TIOCPKT) on. */
  locked: z.boolean().optional(),
  packet: z.boolean().optional(),
  /** Bytes the kernel showed waiting on this side and left there, and why (refused). */
  waiting: z.number().int().min(0).optional(),
  left: z.enum(["extproc", "full", "no TIOCSTI", "packet flow"]).optional(),
  /** First slave side of its pty: what was typed on the master side and not read yet. */
  input: InputQueue.optional(),
  /** First master of its pty: what the slave side wrote and the master's holder has not read. */
  output: OutputQueue.optional(),
  /** Master in packet mode with a status byte (TIOCPKT_FLUSHREAD...) its holder has not read. */
  packetStatus: z.boolean().optional(),
  /** Master only: processes outside the tree holding its slave (the new pair cannot reach them). */
  outside: z.array(z.number().int().min(1)).max(64).optional(),
});
type PtyImage = z.output<typeof PtyImage>;

const NAME = "pty";
const SLAVE = /^\/dev\/pts\/(\d+)$/;
const O_RDWR = 2, O_NOCTTY = 0o400, O_NONBLOCK = 0o4000, O_ASYNC = 0o20000;
const IXON = 0o2000, N_TTY = 0;

/**
 * Dump side: the masters the tree holds (index → "pid:fd"), those dumped
 * so far, and the ptys whose session leader, and foreground group, hold a
 * descriptor on them (restore sets both through one).
 */
interface DumpState {
  inTree: Set<number>;
  masters: Map<number, string>;
  dumped: Set<number>;
  /** Ptys whose typed bytes are taken already; packet mode of each master dumped. */
  drained: Set<number>;
  packet: Map<number, boolean>;
  leaders: Set<number>;
  foreground: Set<number>;
}

/** At a pty's first master: what restore will need a slave descriptor for. */
function expectHolders(p: FdProbe, state: DumpState, e: PtyImage): void {
  const { sid, pgrp } = e.terminal;
  if (sid !== undefined && !state.leaders.has(e.index)) {
    p.tree.pending.set(
      `pty ${e.index} session`,
      `pty ${e.index}: its session leader ${sid} holds no descriptor on it: not supported yet`,
    );
  }
  if (pgrp !== undefined && pgrp !== sid && !state.foreground.has(e.index)) {
    p.tree.pending.set(
      `pty ${e.index} foreground`,
      `pty ${e.index}: no process of its foreground group ${pgrp} holds a descriptor on it: ` +
        "not supported yet",
    );
  }
}

/** A slave descriptor of the session leader, or of the foreground group. */
function noteHolder(p: FdProbe, state: DumpState, e: PtyImage): void {
  const t = e.terminal;
  if (!t.ctty) return;
  if (t.sid === p.pid) {
    state.leaders.add(e.index);
    p.tree.pending.delete(`pty ${e.index} session`);
  }
  if (t.fg) {
    state.foreground.add(e.index);
    p.tree.pending.delete(`pty ${e.index} foreground`);
  }
}

function parentOf(pid: number): number {
  const stat = readProcText(pid, "stat");
  return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
}

function childrenOf(pid: number): number[] {
  return listProcNumbers(pid, "task").flatMap((t) =>
    readProcText(pid, `task/${t}/children`).trim().split(/\s+/).filter((x) => x).map(Number)
  );
}

/** The frozen tree holding `pid`: every process amber traces around it. */
function frozenTree(pid: number): number[] {
  let root = pid;
  for (let p = parentOf(root); p > 1 && tracedByAmber(p); p = parentOf(p)) root = p;
  const out = [root];
  for (let i = 0; i < out.length; i++) out.push(...childrenOf(out[i]).filter(tracedByAmber));
  return out;
}

function mastersOf(pid: number): [number, string][] {
  return listProcNumbers(pid, "fd").flatMap((fd): [number, string][] => {
    if (!readProcLink(pid, `fd/${fd}`).endsWith("/ptmx")) return [];
    const index = /^tty-index:\s*(\d+)$/m.exec(readProcText(pid, `fdinfo/${fd}`))?.[1];
    return index === undefined ? [] : [[Number(index), `pid ${pid} fd ${fd}`]];
  });
}

function dumpState(tree: TreeDumpState, pid: number): DumpState {
  return kindState(tree.kinds, NAME, () => {
    const pids = frozenTree(pid);
    // Members of a pty's session are judged on the images (lib/fds/ptymembers.ts).
    const masters = new Map(pids.flatMap(mastersOf));
    return {
      inTree: new Set(pids),
      masters,
      dumped: new Set<number>(),
      drained: new Set<number>(),
      packet: new Map<number, boolean>(),
      leaders: new Set<number>(),
      foreground: new Set<number>(),
    };
  });
}

/** The pty index of a tty_nr (major 136: /dev/pts), if it is one. */
export function ptsIndex(ttyNr: number): number | undefined {
  if (((ttyNr >>> 8) & 0xfff) !== 136) return undefined;
  return (ttyNr & 0xff) | ((ttyNr >>> 12) & 0xfff00);
}

/**
 * Processes outside the tree with a descriptor on the slave of pty
 * `index`: /dev/pts/N itself, or /dev/tty where it is their controlling
 * terminal.
 */
function outsideHolders(p: FdProbe, state: DumpState, index: number): number[] {
  const outside = (pids: number[]) => pids.filter((pid) => !state.inTree.has(pid));
  const viaTty = outside(holdersOf(p.tree, "/dev/tty").map((h) => h.pid)).filter((pid) => {
    try {
      return ptsIndex(readStat(pid).ttyNr) === index;
    } catch {
      return false; // gone since the scan
    }
  });
  const pids = [...outside(holdersOf(p.tree, `/dev/pts/${index}`).map((h) => h.pid)), ...viaTty];
  return [...new Set(pids)].slice(0, 64);
}

function isMaster(p: FdProbe): boolean {
  return terminalKind(p.link, p.stat?.rdev ?? undefined) === "ptmx";
}

/** The pty index of a slave, or of the controlling terminal behind /dev/tty. */
function slaveIndex(p: FdProbe): number | undefined {
  const m = SLAVE.exec(p.link);
  if (m) return Number(m[1]);
  if (terminalKind(p.link, p.stat?.rdev ?? undefined) !== "tty") return undefined;
  return ptsIndex(readStat(p.pid).ttyNr);
}

function dumpMaster(p: FdProbe, fd: number): PtyImage {
  const index = getInt(fd, "TIOCGPTN");
  // The pty's session and foreground group, as its master sees them.
  const asked = (name: "TIOCGSID" | "TIOCGPGRP") => {
    try {
      return getInt(fd, name);
    } catch {
      return undefined; // ENOTTY: no session has it as controlling terminal
    }
  };
  const sid = asked("TIOCGSID");
  return {
    kind: "pty",
    fd: p.fd,
    flags: p.flags,
    path: p.link,
    side: "master",
    index,
    terminal: {
      ...readTerminal(p.pid, fd, -1),
      ...(sid !== undefined ? { sid, pgrp: asked("TIOCGPGRP") } : {}),
    },
    locked: getInt(fd, "TIOCGPTLCK") !== 0,
    packet: getInt(fd, "TIOCGPKT") !== 0,
  };
}

/**
 * Runs take on amber's copy of the descriptor, then put on what it took:
 * the tree, frozen, finds its queue as it was, whether it is killed or
 * runs on (dump -R, a failed dump).
 */
function takeAndPutBack<T>(p: FdProbe, take: (fd: number) => T, put: (fd: number, t: T) => void) {
  const fd = takeFd(p.pid, p.fd);
  try {
    const got = take(fd);
    put(fd, got);
    return got;
  } finally {
    libc().close(fd);
  }
}

/** The first master of a pty: what its holder has not read, unless it cannot be kept. */
function keepOutput(p: FdProbe, e: PtyImage): void {
  // Refused (see unrestorable): stuffing bytes would signal its owner; another discipline.
  if (e.flags & O_ASYNC || e.terminal.termios.line !== N_TTY) return;
  if (e.packet && withFdCopy(p, hasPriorityData)) {
    e.packetStatus = true;
    return;
  }
  // A full buffer may have more behind it, in the pty's flip buffer, which takes more or
  // less depending on how it was written: it could not surely be put back.
  const waiting = withFdCopy(p, (fd) => getInt(fd, "FIONREAD"));
  const left = waiting >= QUEUE_MAX ? "full" : !canStuff() ? "no TIOCSTI" : undefined;
  if (left) {
    if (waiting) Object.assign(e, { waiting, left });
    return;
  }
  const out = takeAndPutBack(p, (fd) => drainOutput(fd, !!e.packet), putOutput);
  if (out.length) e.output = out;
}

/** The first slave side of a pty: what was typed and not read yet, unless it cannot be kept. */
function keepInput(p: FdProbe, e: PtyImage, packet: boolean): void {
  // Refused (see unrestorable): stuffing bytes would signal its owner.
  const signalled = holdersOf(p.tree, `/dev/pts/${e.index}`).some((h) => h.flags & O_ASYNC);
  if (signalled || e.flags & O_ASYNC || e.terminal.termios.line !== N_TTY) return;
  const waiting = withFdCopy(p, (fd) => getInt(fd, "FIONREAD"));
  const t = e.terminal.termios;
  // Without VLNEXT (non-canonical), IXON's characters could not be put back as bytes, and in
  // packet mode disabling them would tell the master's holder.
  const flowBound = packet && t.iflag & IXON && !(t.lflag & ICANON);
  const left = t.lflag & EXTPROC
    ? "extproc"
    : flowBound
    ? "packet flow"
    : waiting >= KEEP_BELOW
    ? "full"
    : !canStuff()
    ? "no TIOCSTI"
    : undefined;
  if (left) {
    if (waiting) Object.assign(e, { waiting, left });
    return;
  }
  const into: Drained = { lines: [], rest: new Uint8Array(), lnext: false };
  takeAndPutBack(p, (fd) => {
    try {
      drainInput(fd, into);
    } catch (err) {
      // Putting back the lines taken would put them after those left.
      const taken = into.lines.reduce((n, l) => n + l.length, into.rest.length);
      if (taken) {
        throw new AmberError(
          `${err instanceof Error ? err.message : err}: ${taken} bytes typed were taken out ` +
            "and cannot be put back in order",
        );
      }
      throw err;
    }
  }, (fd) => putInput(fd, queueOf(into, packet)));
  const q = queueOf(into, packet);
  if (q.lines.length || q.rest.length || q.lnext) e.input = q;
}

function queueOf(d: Drained, packet: boolean): InputQueue {
  return {
    lines: d.lines,
    rest: d.rest,
    ...(d.lnext ? { lnext: true } : {}),
    ...(packet ? { packet: true } : {}),
  };
}

export const ptyFd = defineFdKind({
  name: NAME,
  schema: PtyImage,
  matches(p) {
    if (!p.stat?.isCharDevice) return false;
    if (isMaster(p)) return true;
    const index = slaveIndex(p);
    return index !== undefined && dumpState(p.tree, p.pid).masters.has(index);
  },
  dump(p) {
    const state = dumpState(p.tree, p.pid);
    if (isMaster(p)) {
      const e = withFdCopy(p, (fd) => dumpMaster(p, fd));
      const outside = outsideHolders(p, state, e.index);
      if (outside.length) e.outside = outside;
      if (!state.dumped.has(e.index)) {
        expectHolders(p, state, e);
        if (!outside.length) keepOutput(p, e);
        state.packet.set(e.index, !!e.packet);
      }
      state.dumped.add(e.index);
      return e;
    }
    const index = slaveIndex(p)!;
    if (!state.dumped.has(index)) {
      p.tree.pending.set(
        `pty ${index} order`,
        `pid ${p.pid}: fd ${p.fd}: ${p.link} comes before its master (${
          state.masters.get(index)
        }) in restore order: not supported yet`,
      );
    }
    const devTty = !SLAVE.test(p.link);
    const rdev = devTty ? readStat(p.pid).ttyNr : p.stat!.rdev ?? 0;
    const e = withFdCopy(p, (fd): PtyImage => ({
      kind: "pty",
      fd: p.fd,
      flags: p.flags,
      path: p.link,
      side: devTty ? "tty" : "slave",
      index,
      terminal: readTerminal(p.pid, fd, rdev),
    }));
    // Not before its master: restore would have no pair to put them in.
    if (!state.drained.has(index) && state.dumped.has(index)) {
      state.drained.add(index);
      keepInput(p, e, state.packet.get(index) ?? false);
    }
    noteHolder(p, state, e);
    return e;
  },
  unrestorable(e) {
    if (e.outside?.length) {
      return `fd ${e.fd}: pty ${e.index}: /dev/pts/${e.index} is held by pid ${
        e.outside.join(", pid ")
      } outside the dumped tree: not supported yet`;
    }
    const pty = `fd ${e.fd}: pty ${e.index}`;
    if (e.flags & O_ASYNC) return `${pty}: O_ASYNC (signal-driven I/O): not supported yet`;
    // TCSETS does not change it, and its queues are not n_tty's.
    const line = e.terminal.termios.line;
    if (line !== N_TTY) return `${pty}: line discipline ${line} (not N_TTY): not supported yet`;
    if (e.packetStatus) {
      return `${pty}: packet mode with a status byte its master's holder has not read: ` +
        "not supported yet";
    }
    const bad = e.input && inputRefusal(e.input, e.terminal.termios);
    if (bad) return `${pty}: ${bad}: not supported yet`;
    if (!e.waiting) return;
    const what = e.side === "master" ? "written on its slave side" : "typed on its master side";
    const why = {
      extproc: "with EXTPROC on (line editing left to the master's holder)",
      full: e.side === "master"
        ? "its buffer is full (what waits behind it could not surely be put back)"
        : `more than amber keeps (${KEEP_BELOW - 1})`,
      "no TIOCSTI": "putting them back needs CAP_SYS_ADMIN (TIOCSTI)",
      "packet flow": "in packet mode with IXON, non-canonical (its start and stop characters " +
        "could not be put back)",
      none: "",
    }[e.left ?? "none"];
    return `${pty}: ${e.waiting} bytes ${what} and not read yet would be lost: ${why}: ` +
      "not supported yet";
  },
  precheck(e) {
    if ((e.input || e.output?.length) && !canStuff()) {
      throw new AmberError(
        `fd ${e.fd}: pty ${e.index}: putting back its bytes needs CAP_SYS_ADMIN (TIOCSTI)`,
      );
    }
  },
  restore(ctx, e) {
    if (e.side === "master") return openMaster(ctx, e);
    const fd = e.side === "tty" ? openDevTty(ctx, e) : openSlave(ctx, e);
    if (e.input) {
      const q = e.input;
      withContext(
        `pty ${e.index}: putting back the bytes typed`,
        () => throughCopy(ctx, fd, (c) => putInput(c, q)),
      );
    }
    return fd;
  },
});

/** Runs fn on amber's copy of the restored process's descriptor `fd`. */
function throughCopy(ctx: RestoreContext, fd: number, fn: (copy: number) => void): void {
  const copy = takeFd(ctx.pid, fd);
  try {
    fn(copy);
  } finally {
    libc().close(copy);
  }
}

/** Restore side: the masters recreated so far, by index. */
function created(ctx: RestoreContext): Set<number> {
  return kindState(ctx.tree.kinds, NAME, () => new Set<number>());
}

function setInt(ctx: RestoreContext, fd: number, name: keyof typeof TTY_IOCTL, v: number): void {
  const at = putBytes(ctx.pid, ctx.scratch, new Uint8Array(new Int32Array([v]).buffer));
  ctx.injector.call(`ioctl(${name})`, NR.ioctl, fd, TTY_IOCTL[name], at);
}

function ptyNumber(ctx: RestoreContext, fd: number): number {
  const at = putBytes(ctx.pid, ctx.scratch, new Uint8Array(4));
  ctx.injector.call("ioctl(TIOCGPTN)", NR.ioctl, fd, TTY_IOCTL.TIOCGPTN, at);
  return new Int32Array(getBytes(ctx.pid, ctx.scratch, 4).slice().buffer)[0];
}

/** Opens /dev/ptmx until the kernel gives index `e.index` (the lowest free one comes first). */
function openMaster(ctx: RestoreContext, e: PtyImage): number {
  const inj = ctx.injector;
  const flags = O_RDWR | O_NOCTTY | (e.flags & O_NONBLOCK);
  const others: number[] = [];
  let fd = -1;
  try {
    for (let i = 0; i <= e.index; i++) {
      const path = putString(ctx.pid, ctx.scratch, "/dev/ptmx", 64);
      const got = Number(inj.call("open /dev/ptmx", NR.open, path, flags, 0));
      const n = ptyNumber(ctx, got);
      if (n === e.index) {
        fd = got;
        break;
      }
      others.push(got);
      if (n > e.index) break;
    }
  } finally {
    for (const o of others) inj.call("close", NR.close, o);
  }
  // Like a pid, an index in use is for a later retry: checked here, not in the verdict.
  if (fd < 0) {
    throw new AmberError(`pty ${e.index}: /dev/pts/${e.index} is in use: restore needs it free`);
  }
  setInt(ctx, fd, "TIOCSPTLCK", 0);
  const termios = putBytes(ctx.pid, ctx.scratch, encodeTermios(e.terminal.termios));
  inj.call("ioctl(TCSETS)", NR.ioctl, fd, TTY_IOCTL.TCSETS, termios);
  const w = e.terminal.winSize;
  const ws = new Uint8Array(new Uint16Array([w.rows, w.cols, w.xpixel, w.ypixel]).buffer);
  inj.call(
    "ioctl(TIOCSWINSZ)",
    NR.ioctl,
    fd,
    TTY_IOCTL.TIOCSWINSZ,
    putBytes(ctx.pid, ctx.scratch, ws),
  );
  if (e.packet) setInt(ctx, fd, "TIOCPKT", 1);
  const out = e.output;
  if (out?.length) {
    withContext(
      `pty ${e.index}: putting back the bytes written on its slave side`,
      () => throughCopy(ctx, fd, (c) => putOutput(c, out)),
    );
  }
  // Locked: nobody could have opened the slave, so nobody will need to.
  if (e.locked) setInt(ctx, fd, "TIOCSPTLCK", 1);
  created(ctx).add(e.index);
  return fd;
}

function openSlave(ctx: RestoreContext, e: PtyImage): number {
  if (!created(ctx).has(e.index)) {
    throw new AmberError(`pty ${e.index}: its master is not restored yet`);
  }
  const path = putString(ctx.pid, ctx.scratch, `/dev/pts/${e.index}`);
  const flags = (e.flags & (0o3 | 0o2000 | O_NONBLOCK)) | O_NOCTTY;
  return Number(ctx.injector.call(`open /dev/pts/${e.index}`, NR.open, path, flags, 0));
}
