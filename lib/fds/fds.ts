/**
 * The descriptor table. Each descriptor is handled by the first kind in
 * FD_KINDS that matches it: adding a kind means adding a module and a line
 * here.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { definePart, type RestoreContext, type TreeDumpState } from "../context.ts";
import { fetchFd } from "./fetch.ts";
import { runEach, type Syscall, withBatch } from "../batch.ts";
import { pipeFd } from "./pipe.ts";
import { sameOpenFile } from "../../ffi/libc.ts";
import { MAX_IMAGE_BYTES, pidNumber } from "../images/codec.ts";
import { AmberError, withContext } from "../errors.ts";
import type { ImageDir } from "../images/dir.ts";
import { listProcNumbers, procPath, readProcLink, readProcText } from "../proc/read.ts";
import { epollFd } from "./epoll.ts";
import { eventFd } from "./eventfd.ts";
import { fifoFd } from "./fifo.ts";
import { fileFd } from "./file.ts";
import { fanotifyFd } from "./fanotify.ts";
import { inotifyFd } from "./inotify.ts";
import { pidFd } from "./pidfd.ts";
import { signalFd } from "./signalfd.ts";
import { timerFd } from "./timerfd.ts";
import { type FdKind, type FdProbe, O_CLOEXEC } from "./kind.ts";
import { ttyFd } from "./tty.ts";
import { ptyFd } from "./pty.ts";
import { unixFd } from "./unix.ts";
import { tcpFd } from "./tcp.ts";
import { udpFd } from "./udp.ts";
import { socketFd } from "./socket.ts";
import { unsupportedFd } from "./unsupported.ts";
import { trackerFd } from "../mm/tracking.ts";

/** The kernel's fs.nr_open ceiling: no process has more descriptors. */
const MAX_FDS = 1 << 20;

/** In match order; the last one takes anything. */
export const FD_KINDS: FdKind[] = [
  ptyFd,
  ttyFd,
  fifoFd,
  fileFd,
  pipeFd,
  eventFd,
  signalFd,
  timerFd,
  epollFd,
  inotifyFd,
  fanotifyFd,
  pidFd,
  unixFd,
  tcpFd,
  udpFd,
  socketFd,
  unsupportedFd,
];

const FdEntry = z.discriminatedUnion(
  "kind",
  FD_KINDS.map((k) => k.schema) as unknown as [z.ZodObject, ...z.ZodObject[]],
);
type FdEntryImage = { kind: string; fd: number; flags: number };

function kindOf(name: string): FdKind {
  const k = FD_KINDS.find((k) => k.name === name);
  if (!k) throw new AmberError(`fd kind ${name}: unknown`);
  return k;
}

export function probeFd(
  pid: number,
  fd: number,
  tree: TreeDumpState,
  dir: ImageDir,
  ghostLimit: number,
  inject?: FdProbe["inject"],
): FdProbe {
  const link = readProcLink(pid, `fd/${fd}`);
  const info = readProcText(pid, `fdinfo/${fd}`);
  const field = (name: string) => new RegExp(`^${name}:\\s*(\\S+)`, "m").exec(info)?.[1] ?? "0";
  let stat: Deno.FileInfo | undefined;
  try {
    stat = Deno.statSync(procPath(pid, `fd/${fd}`));
  } catch { /* anon inodes, sockets: no path to stat */ }
  return {
    pid,
    fd,
    link,
    flags: parseInt(field("flags"), 8),
    pos: Number(field("pos")),
    stat,
    tree,
    dir,
    ghostLimit,
    inject,
  };
}

/**
 * Closes what the helper inherited beyond amber's stdio and moves that stdio
 * out of the way of the image's numbers: one batch (independent calls).
 */
function parkInherited(ctx: RestoreContext, entries: FdEntryImage[]): number[] {
  const calls: { what: string; call: Syscall }[] = [];
  for (const fd of listProcNumbers(ctx.pid, "fd")) {
    if (!ctx.inherited.has(fd)) {
      calls.push({ what: `close inherited fd ${fd}`, call: [NR.close, fd] });
    }
  }
  ctx.parkFloor = Math.max(3, ...entries.map((e) => e.fd + 1));
  const F_DUPFD_CLOEXEC = 1030;
  const inherited = [...ctx.inherited];
  for (const [fd] of inherited) {
    calls.push({
      what: "fcntl(F_DUPFD_CLOEXEC)",
      call: [NR.fcntl, fd, F_DUPFD_CLOEXEC, ctx.parkFloor],
    });
    calls.push({ what: "close", call: [NR.close, fd] });
  }
  const got = runEach(ctx, calls).slice(calls.length - 2 * inherited.length);
  ctx.inherited.clear();
  inherited.forEach(([, what], i) => ctx.inherited.set(Number(got[2 * i]), what));
  return [...ctx.inherited.keys()];
}

/** One descriptor that is the same open file as an earlier one (dup, or inherited by fork). */
const SharedFd = z.object({
  fd: z.number().int().min(0),
  pid: pidNumber,
  ownerFd: z.number().int().min(0),
});
type SharedFdImage = z.output<typeof SharedFd>;

/**
 * Finds an earlier descriptor of the tree (this process's or an earlier
 * one's) open on the same file description, so restore can share it
 * rather than open the file again: one offset, one set of flags.
 */
function findOwner(tree: TreeDumpState, probe: FdProbe): { pid: number; fd: number } | undefined {
  if (!probe.stat) return undefined;
  const key = `${probe.stat.dev}:${probe.stat.ino}:${probe.link}`;
  const seen = tree.openFiles.get(key) ?? [];
  const owner = seen.find((o) => sameOpenFile(probe.pid, probe.fd, o.pid, o.fd));
  if (!owner) tree.openFiles.set(key, [...seen, { pid: probe.pid, fd: probe.fd }]);
  return owner;
}

/**
 * Where the shared-descriptor entries of a tree's fds images (in restore
 * order; undefined for zombies) name something restore cannot take a
 * descriptor from: a pid outside the tree or restored later, an fd that
 * process does not have, or, within one process, one installed later.
 */
export function checkSharedFds(
  procs: { pid: number; fds: unknown }[],
): { pid: number; why: string } | undefined {
  const order = new Map(procs.map((p, i) => [p.pid, i]));
  const listed = (i: number) =>
    ((procs[i].fds as { fds: FdEntryImage[] } | undefined)?.fds ?? []).map((e) => e.fd);
  for (const [i, p] of procs.entries()) {
    if (!p.fds) continue;
    const own = listed(i);
    for (const s of (p.fds as { shared: SharedFdImage[] }).shared) {
      const at = order.get(s.pid);
      const why = !own.includes(s.fd)
        ? `shared fd ${s.fd} is not in its fds`
        : at === undefined
        ? `fd ${s.fd} is shared with pid ${s.pid}, which is not in the tree`
        : at > i || !procs[at].fds
        ? `fd ${s.fd} is shared with pid ${s.pid}, which is not restored before it`
        : !listed(at).includes(s.ownerFd)
        ? `fd ${s.fd} is shared with fd ${s.ownerFd} of pid ${s.pid}, which it does not have`
        : at === i && own.indexOf(s.ownerFd) >= own.indexOf(s.fd)
        ? `fd ${s.fd} is shared with fd ${s.ownerFd}, which is not restored before it`
        : undefined;
      if (why) return { pid: p.pid, why };
    }
  }
}

function installFd(ctx: RestoreContext, e: FdEntryImage, shared?: SharedFdImage): void {
  const inj = ctx.injector;
  const tmp = shared
    ? fetchFd(ctx, { pid: shared.pid, fd: shared.ownerFd })
    : kindOf(e.kind).restore(ctx, e);
  const cloexec = e.flags & O_CLOEXEC ? O_CLOEXEC : 0;
  if (tmp === e.fd) {
    inj.call("fcntl(F_SETFD)", NR.fcntl, tmp, 2, cloexec ? 1 : 0);
    return;
  }
  inj.call("dup3", NR.dup3, tmp, e.fd, cloexec);
  inj.call("close", NR.close, tmp);
}

/**
 * Descriptors taken from earlier ones (installFd's calls for each, in its
 * order) in one batch: the numbers the kernel will give (the lowest free
 * one, in a process only amber changes) are worked out from its table
 * beforehand, and what it gave is checked after.
 */
function installShared(ctx: RestoreContext, run: [FdEntryImage, SharedFdImage][]): void {
  withBatch(ctx, (batch) => {
    if (!batch) {
      for (const [e, s] of run) withContext(`fd ${e.fd}`, () => installFd(ctx, e, s));
      return;
    }
    const open = new Set(listProcNumbers(ctx.pid, "fd"));
    const take = (fd?: number) => {
      let n = fd ?? 0;
      if (fd === undefined) { while (open.has(n)) n++; }
      open.add(n);
      return n;
    };
    const calls: { what: string; call: Syscall; gives?: number }[] = [];
    const add = (e: FdEntryImage, what: string, call: Syscall, gives?: number) =>
      calls.push({ what: `fd ${e.fd}: ${what}`, call, gives });
    for (const [e, s] of run) {
      let tmp: number;
      if (s.pid === ctx.pid) add(e, `dup ${s.ownerFd}`, [NR.fcntl, s.ownerFd, 0, 0], tmp = take());
      else {
        const pidfd = take();
        add(e, `pidfd_open ${s.pid}`, [NR.pidfd_open, s.pid, 0], pidfd);
        const getfd: Syscall = [NR.pidfd_getfd, pidfd, s.ownerFd, 0];
        add(e, `pidfd_getfd ${s.pid}:${s.ownerFd}`, getfd, tmp = take());
        add(e, "close", [NR.close, pidfd]);
        open.delete(pidfd);
      }
      const cloexec = e.flags & O_CLOEXEC ? O_CLOEXEC : 0;
      if (tmp === e.fd) add(e, "fcntl(F_SETFD)", [NR.fcntl, tmp, 2, cloexec ? 1 : 0]);
      else {
        add(e, "dup3", [NR.dup3, tmp, e.fd, cloexec], take(e.fd));
        add(e, "close", [NR.close, tmp]);
        open.delete(tmp);
      }
    }
    runEach(ctx, calls).forEach((r, i) => {
      const { what, gives } = calls[i];
      if (gives !== undefined && Number(r) !== gives) {
        throw new AmberError(`${what}: gave fd ${r} where fd ${gives} was the lowest free one`);
      }
    });
  });
}

export const fdsPart = definePart({
  name: "fds",
  maxBytes: MAX_IMAGE_BYTES,
  version: 1,
  schema: z.object({ fds: z.array(FdEntry).max(MAX_FDS), shared: z.array(SharedFd).max(MAX_FDS) }),
  dump({ pid, tree, dir, options, injector, scratch }) {
    const shared: SharedFdImage[] = [];
    // amber's own write tracker (lib/mm/tracking.ts) is not the process's.
    const tracker = trackerFd(pid);
    const fds = listProcNumbers(pid, "fd").filter((fd) => fd !== tracker).map((fd) =>
      withContext(`fd ${fd}`, () => {
        const probe = probeFd(pid, fd, tree, dir, options.ghostLimit, { injector, scratch });
        const owner = findOwner(tree, probe);
        if (owner) shared.push({ fd, pid: owner.pid, ownerFd: owner.fd });
        return FD_KINDS.find((k) => k.matches(probe))!.dump(probe);
      })
    );
    return { fds: fds as z.input<typeof FdEntry>[], shared };
  },
  precheck({ fds }, ctx) {
    const seen = new Set<number>();
    for (const e of fds as FdEntryImage[]) {
      if (seen.has(e.fd)) throw new AmberError(`fd ${e.fd}: listed twice`);
      seen.add(e.fd);
      const kind = kindOf(e.kind);
      // The same verdict the dump gave, so images dumped with -R refuse here.
      const why = kind.unrestorable?.(e);
      if (why) throw new AmberError(why);
      const tied = ctx.options.migrated ? kind.netnsBound?.(e, ctx.options) : undefined;
      if (tied) {
        throw new AmberError(
          `fd ${e.fd}: ${tied}: bound in the source's network namespace, which a migration ` +
            "leaves (not migrated)",
        );
      }
      withContext(`fd ${e.fd}`, () => kind.precheck?.(e, ctx));
    }
  },
  unrestorable({ fds }) {
    for (const e of fds as FdEntryImage[]) {
      const why = kindOf(e.kind).unrestorable?.(e);
      if (why) return why;
    }
  },
  restore(ctx, { fds, shared }) {
    const entries = fds as FdEntryImage[];
    const sharing = new Map(shared.map((s) => [s.fd, s]));
    const parked = parkInherited(ctx, entries);
    // Runs of descriptors shared with earlier ones in one batch each; the others by their kind.
    for (let i = 0; i < entries.length;) {
      const run: [FdEntryImage, SharedFdImage][] = [];
      for (; i < entries.length && sharing.has(entries[i].fd); i++) {
        run.push([entries[i], sharing.get(entries[i].fd)!]);
      }
      if (run.length) installShared(ctx, run);
      else {
        const e = entries[i++];
        withContext(`fd ${e.fd}`, () => installFd(ctx, e));
      }
    }
    for (const e of entries) {
      if (!sharing.has(e.fd)) withContext(`fd ${e.fd}`, () => kindOf(e.kind).afterAll?.(ctx, e));
    }
    runEach(ctx, parked.map((fd) => ({ what: "close", call: [NR.close, fd] })));
  },
});
