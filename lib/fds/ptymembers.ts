/**
 * Processes of a pty's session other than its leader (a `cat` or `vim`
 * run from a tmux pane's shell) whose controlling terminal is a pty of the
 * tree. Only a session leader can take a controlling terminal
 * (TIOCSCTTY); the others inherit it when they are forked. So restore
 * creates such a member, and everything below it, only once its leader
 * has its pty back: the leader, still an empty copy of the helper, opens
 * the pty's slave and takes it (its master is restored by then, in an
 * earlier process), then forks them.
 */
import { NR } from "../../ffi/inject.ts";
import type { Injector } from "../../ffi/inject.ts";
import { TTY_IOCTL } from "../../ffi/tty.ts";
import type { Scratch } from "../context.ts";
import type { Images, ProcessImages } from "../images/read.ts";
import { putString } from "../scratch.ts";
import { ptsIndex } from "./pty.ts";

/** A member of a pty's session that must get the pty as controlling terminal. */
export interface PtyMember {
  pid: number;
  leader: number;
  index: number;
}

interface PtyEntry {
  kind: string;
  side?: string;
  index?: number;
}

const O_RDWR = 2, O_NOCTTY = 0o400;

function fdsOf(p: ProcessImages): PtyEntry[] {
  return (p.parts.fds as { fds: PtyEntry[] } | undefined)?.fds ?? [];
}

/** Where (in restore order) the master of each pty of the tree is first restored. */
function masters(images: Images): Map<number, number> {
  const out = new Map<number, number>();
  for (const [i, p] of images.processes.entries()) {
    for (const e of fdsOf(p)) {
      if (e.kind === "pty" && e.side === "master" && !out.has(e.index!)) out.set(e.index!, i);
    }
  }
  return out;
}

/** Every live process whose controlling terminal is a pty of the tree, its session led by another. */
export function ptyMembers(images: Images): PtyMember[] {
  const ptys = masters(images);
  return images.processes.flatMap(({ entry: e }) => {
    const index = e.tty === undefined ? undefined : ptsIndex(e.tty);
    if (index === undefined || !ptys.has(index) || e.sid === e.pid || e.state === "zombie") {
      return [];
    }
    return [{ pid: e.pid, leader: e.sid, index }];
  });
}

/**
 * Why a member could not inherit its pty at restore: its leader must be in
 * the tree with that pty as its own controlling terminal, restored after
 * the pty's master, and its parent must have the pty too (or be the leader).
 */
export function ptyMemberRefusals(images: Images): string[] {
  const ptys = masters(images);
  const at = new Map(images.processes.map((p, i) => [p.entry.pid, i]));
  const entry = (pid: number) => images.processes[at.get(pid) ?? -1]?.entry;
  return ptyMembers(images).flatMap(({ pid, leader, index }) => {
    const self = entry(pid)!, lead = entry(leader), parent = entry(self.ppid);
    const what = `pid ${pid}: pty ${index} is its controlling terminal`;
    const why = !lead || lead.state === "zombie" || lead.tty !== self.tty
      ? `but not its session leader's (${leader})`
      : ptys.get(index)! >= at.get(leader)!
      ? `and its master is restored only with or after its session leader ${leader}`
      : !parent || parent.sid !== self.sid || (parent.pid !== leader && parent.tty !== self.tty)
      ? `and its parent ${self.ppid} does not have it as controlling terminal`
      : undefined;
    return why ? [`${what}, ${why}: not supported yet`] : [];
  });
}

/**
 * Processes restore creates only once a leader has its pty back: the
 * members, and everything below them (a child is forked by its parent).
 */
export function createdLate(images: Images): Set<number> {
  const late = new Set(ptyMembers(images).map((m) => m.pid));
  for (const { entry } of images.processes) if (late.has(entry.ppid)) late.add(entry.pid);
  return late;
}

/**
 * The leader, still an empty copy of the helper, takes pty `index` as its
 * controlling terminal, so that what it forks from now on inherits it.
 * (Its own restore takes it again later: TIOCSCTTY on its own terminal
 * does nothing.)
 */
export function takeTerminalEarly(inj: Injector, scratch: Scratch, index: number): void {
  const path = putString(inj.tid, scratch, `/dev/pts/${index}`);
  const fd = inj.call(`open /dev/pts/${index}`, NR.open, path, O_RDWR | O_NOCTTY, 0);
  try {
    inj.call(`pty ${index}: ioctl(TIOCSCTTY)`, NR.ioctl, fd, TTY_IOCTL.TIOCSCTTY, 0);
  } finally {
    inj.call("close", NR.close, fd);
  }
}
