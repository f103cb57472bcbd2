/**
 * Lazy restore (restore --lazy-pages): the tree runs before its private
 * anonymous memory is filled; amber serves the missing pages from the
 * images as they are touched, and pushes the rest in the background.
 *
 * The pagemap part leaves the pages of lazy mappings out of its fill and
 * records where each one is in the pages files. Once the whole tree is
 * rebuilt (every fork of the restore done, every injected call that could
 * touch memory made), each process gets a userfaultfd made inside it by
 * injection, registered in missing mode over its lazy mappings, moved to
 * amber (pidfd_getfd) and closed in the process. amber then answers each
 * fault with UFFDIO_COPY from the images (UFFDIO_ZEROPAGE for a page the
 * image does not hold or the process dropped since), and copies the
 * others in chunks between faults. When nothing is missing any more it
 * closes the userfaultfds: the kernel unregisters the ranges, and memory
 * is ordinary memory again.
 *
 * Events (non-cooperative mode) keep amber's list of missing pages right:
 * MADV_DONTNEED/REMOVE and munmap drop pages from it (they read as zeros,
 * or are gone), mremap moves them, and a fork gives amber the child's own
 * userfaultfd with a copy of the parent's missing pages.
 *
 * Lazy: private anonymous mappings that are not mlocked (mlock would fault
 * every page in while amber is still injecting). Filled before the tree
 * runs: shared memory, file mappings' private pages, locked mappings.
 *
 * If amber cannot serve (a page file read fails, an unexpected error, a
 * stop signal), it kills the tree: a process without its memory must not
 * run on. If amber itself is killed with SIGKILL, the kernel unregisters
 * the ranges as it closes amber's descriptors, and missing pages would
 * then read as zeros: nothing can prevent that from outside the kernel.
 */
import { NR } from "../../ffi/inject.ts";
import type { Injector } from "../../ffi/inject.ts";
import { libc, SysError } from "../../ffi/libc.ts";
import { alignedBuffer, type RawFile } from "../../ffi/rawfile.ts";
import { writeMemory } from "../../ffi/memory.ts";
import { takeFd } from "../../ffi/socket.ts";
import {
  LAZY_FEATURES,
  NR_USERFAULTFD,
  readUffd,
  registeredIoctls,
  UFFD_EVENT,
  uffdCopy,
  UFFDIO_API,
  UFFDIO_COPY_BIT,
  UFFDIO_REGISTER,
  uffdioApiWith,
  uffdioRegisterMissing,
  type UffdMsg,
  uffdWake,
  uffdZeropage,
} from "../../ffi/uffd.ts";
import { kindState } from "../context.ts";
import { AmberError, faultPointAsync, withContext, withContextAsync } from "../errors.ts";
import { SignalGuard } from "../interrupt.ts";
import { findFreeRange, type MappingImage, mappingLabel, PAGE } from "./mappings.ts";
import { readMaps } from "../proc/maps.ts";
import { readStat } from "../proc/stat.ts";
import { listProcNumbers } from "../proc/read.ts";
import { putBytes } from "../scratch.ts";
import { readPagemap } from "./pages.ts";
import { type Span, union } from "./tracking.ts";
import type { Regs } from "../../ffi/regs.ts";
import type { RemotePages } from "./remote.ts";

const PAGE_SIZE = Number(PAGE);
/** Bytes one background copy moves: a fault waits at most for one of these. */
const PUSH_BYTES = 512 * 1024;
/** Pages of a migration's final round copied in before the tree runs (LazyPages.patch). */
const HOT_PAGES = 1024;
/** Pages copied for a fault: the faulting one and those after it (sequential readers). */
const FAULT_AROUND = 16;
const O_CLOEXEC = 0o2000000, O_NONBLOCK = 0o4000;
const EAGAIN = 11, EEXIST = 17, ENOENT = 2, ESRCH = 3, EPERM = 1, EINVAL = 22;
const SIGKILL = 9;
const PM_PRESENT = 0x80000000;

/**
 * Where missing pages come from: the images' pages files, or the amber
 * that dumped the tree and keeps it frozen (dump --lazy-pages, lib/mm/remote.ts).
 */
export interface PageSource {
  /** Names it in messages: the pages file, or the remote page source. */
  readonly label: string;
  /** Fills `buf` with the data at `off` (a file offset, or an address in the source process). */
  read(buf: Uint8Array, off: number): Promise<void>;
  close(): void;
}

/** A pages file of the images as a page source. */
export function fileSource(file: RawFile): PageSource {
  return {
    label: file.path,
    read: (buf, off) => file.preadAll(buf, off),
    close: () => file.close(),
  };
}

/**
 * Missing pages [start, end) (page numbers), whose data is at `fileOff`
 * of `source` (a file offset, or the address the source process had them at).
 */
export interface Missing {
  start: number;
  end: number;
  source: PageSource;
  fileOff: number;
}

/** One userfaultfd amber serves: a restored process, or a child it forked since. */
interface Space {
  label: string;
  pid?: number;
  fd: number;
  /** Sorted, disjoint. */
  missing: Missing[];
  /** Faults that met a changing address space (EAGAIN): served again after the events. */
  retry: number[];
}

/** Mappings served lazily: private anonymous memory that is not mlocked. */
export function isLazy(m: MappingImage): boolean {
  return m.kind === "anon" && !m.shared && !m.vmFlags.some((f) => f === "lo" || f === "lf");
}

/** Pieces of `list` inside (keep) or outside (!keep) `spans`, with their data offsets. */
export function clipMissing<T extends { start: number; end: number; fileOff: number }>(
  list: T[],
  spans: Span[],
  keep: boolean,
): T[] {
  const out: T[] = [];
  for (const x of list) {
    let at = x.start;
    const piece = (s: number, e: number) => {
      if (s < e) {
        out.push({ ...x, start: s, end: e, fileOff: x.fileOff + (s - x.start) * PAGE_SIZE });
      }
    };
    for (const [s, e] of spans) {
      if (e <= x.start || s >= x.end) continue;
      const lo = Math.max(s, x.start), hi = Math.min(e, x.end);
      if (!keep) piece(at, lo);
      else piece(lo, hi);
      at = hi;
    }
    if (!keep) piece(at, x.end);
  }
  return out;
}

/** What restore hands over per process: its lazy mappings and where their pages are. */
interface Pending {
  pid: number;
  mappings: MappingImage[];
  missing: Missing[];
}

/** What a lazy restore took to bring every page in (RestoreResult.lazy). */
export interface LazyStats {
  /** Faults answered (from the images or with zeros). */
  faults: number;
  /** Pages copied in the background, nobody having asked for them. */
  pushedPages: number;
  /** Pages copied for faults. */
  faultedPages: number;
  /** Milliseconds from the tree's start until every page was in. */
  allInMs: number;
  /** Events seen while pages were missing: forks, mremaps, MADV_DONTNEED/REMOVE, munmaps. */
  events: { fork: number; remap: number; remove: number; unmap: number };
}

/** The lazy part of a restore, for the whole tree (kind state "lazy"). */
export class LazyPages {
  private readonly pending: Pending[] = [];
  private readonly spaces: Space[] = [];
  private readonly pushBuf = alignedBuffer(PUSH_BYTES);
  private readonly faultBuf = alignedBuffer(FAULT_AROUND * PAGE_SIZE);
  private readonly sources = new Set<PageSource>();
  /** The dumping amber serving the pages (restore --page-server), told once all are in. */
  private remote?: RemotePages;
  readonly stats: LazyStats = {
    faults: 0,
    pushedPages: 0,
    faultedPages: 0,
    allInMs: 0,
    events: { fork: 0, remap: 0, remove: 0, unmap: 0 },
  };
  private next = 0;
  private watchdog?: Deno.ChildProcess;

  constructor(private readonly log: (line: string) => void) {}

  static of(kinds: Map<string, unknown>, log: (line: string) => void): LazyPages {
    return kindState(kinds, "lazy", () => new LazyPages(log));
  }

  static find(kinds: Map<string, unknown>): LazyPages | undefined {
    return kinds.get("lazy") as LazyPages | undefined;
  }

  /** Pages of process `pid` left for later (called by the pagemap part). */
  add(pid: number, mappings: MappingImage[], missing: Missing[]): void {
    if (!missing.length) return;
    for (const m of missing) this.sources.add(m.source);
    let p = this.pending.find((x) => x.pid === pid);
    if (!p) this.pending.push(p = { pid, mappings: [], missing: [] });
    p.missing = p.missing.concat(missing).sort((a, b) => a.start - b.start);
    // Only mappings with pages to come are registered: others fault in zeros as usual.
    p.mappings = mappings.filter((m) =>
      p!.missing.some((x) => BigInt(x.start) * PAGE < m.end && m.start < BigInt(x.end) * PAGE)
    );
  }

  /** The remote page source of this restore: closed with it, told when all pages are in. */
  useRemote(remote: RemotePages): void {
    this.remote = remote;
  }

  /** Where the pages process `pid` left in the dumped tree come from. */
  remoteFor(pid: number): PageSource {
    if (!this.remote) throw new AmberError("pages left in the dumped tree, but no page source");
    return this.remote.forPid(pid);
  }

  /**
   * Arms every process, the tree still stopped: pages something touched
   * during the restore are filled now (a fault would never come for them),
   * then the userfaultfd is made inside the process and taken by amber.
   */
  async arm(injectors: Map<number, Injector>, threadRegs: (pid: number) => Regs[]): Promise<void> {
    for (const p of this.pending.splice(0)) {
      await withContextAsync(`pid ${p.pid}: lazy pages`, async () => {
        const inj = injectors.get(p.pid)!;
        const missing = await this.fillTouched(p, [
          ...threadRegs(p.pid).flatMap(pagesAmberMayTouch),
          ...pagesOthersRead(p.pid),
        ]);
        this.log(`pid ${p.pid}: lazy pages: touched pages filled`);
        const fd = makeUffd(inj, p.mappings);
        this.log(`pid ${p.pid}: lazy pages: userfaultfd registered`);
        if (typeof fd === "string") {
          this.log(`pid ${p.pid}: lazy pages: ${fd}: filled before it runs`);
          for (const m of missing) await this.writeNow(p.pid, m);
          return;
        }
        this.spaces.push({ label: `pid ${p.pid}`, pid: p.pid, fd, missing, retry: [] });
      });
    }
    if (this.spaces.length) this.watchdog = startWatchdog(this.spaces);
    this.log("lazy pages: armed");
  }

  /**
   * A tree built from an earlier migration round (lib/prebuilt.ts), still
   * stopped, takes process `pid`'s pages of the final round (`newer`): those
   * still missing are served from there instead, the others (present, or
   * in memory that is not lazy) are written now. Then the pages amber may
   * touch with the final registers (`touch`) and the first HOT_PAGES of
   * `newer` are copied in if missing.
   */
  async patch(pid: number, newer: Missing[], touch: Span[]): Promise<void> {
    for (const m of newer) this.sources.add(m.source);
    const s = this.spaces.find((x) => x.pid === pid);
    if (!s) {
      for (const m of newer) await this.writeNow(pid, m);
      return;
    }
    const missing = s.missing.map((m): Span => [m.start, m.end]);
    for (const m of clipMissing(newer, missing, false)) await this.writeNow(pid, m);
    s.missing = [
      ...clipMissing(s.missing, union(newer.map((m): Span => [m.start, m.end])), false),
      ...clipMissing(newer, missing, true),
    ].sort((a, b) => a.start - b.start);
    // The pages written since that round are the tree's working set: copied in before it
    // runs (up to HOT_PAGES), not faulted in one at a time as it writes them again.
    const hot: Span[] = [];
    let left = HOT_PAGES;
    for (const m of newer) {
      if (left <= 0) break;
      const end = Math.min(m.end, m.start + left);
      hot.push([m.start, end]);
      left -= end - m.start;
    }
    // Before the tree runs, nobody waits on a fault: the push's larger copies.
    const step = PUSH_BYTES / PAGE_SIZE;
    for (const [from, to] of union(touch, hot)) {
      for (const m of s.missing.filter((x) => x.start < to && from < x.end)) {
        for (let at = Math.max(from, m.start); at < Math.min(to, m.end); at += step) {
          const end = Math.min(to, m.end, at + step);
          // (The list changes as pages go in: find the piece that still holds them.)
          const piece = s.missing.find((x) => x.start <= at && end <= x.end);
          if (piece && await this.copy(s, piece, at, end, this.pushBuf) < 0) {
            throw new AmberError(`pid ${pid}: lazy pages: UFFDIO_COPY: the memory is changing`);
          }
        }
      }
    }
  }

  /** Pages amber may touch in a stopped process's threads, or others read (patch's `touch`). */
  static touchedBy(pid: number, regs: Regs[]): Span[] {
    return [...regs.flatMap(pagesAmberMayTouch), ...pagesOthersRead(pid)];
  }

  /** Whether any page is still missing. */
  get active(): boolean {
    return this.spaces.some((s) => s.missing.length || s.retry.length);
  }

  /** Pages still missing, over all processes. */
  missingPages(): number {
    return this.spaces.reduce(
      (n, s) => n + s.missing.reduce((k, m) => k + m.end - m.start, 0),
      0,
    );
  }

  /** The pages the restore touched after all (present now): filled from the images at once. */
  private async fillTouched(p: Pending, touch: Span[]): Promise<Missing[]> {
    using pm = Deno.openSync(`/proc/${p.pid}/pagemap`, { read: true });
    const present: Span[] = [];
    for (const m of p.mappings) {
      const entries = readPagemap(pm, m.start, m.end);
      const first = Number(m.start / PAGE);
      for (let i = 0; i < entries.length / 2; i++) {
        if ((entries[2 * i + 1] & PM_PRESENT) === 0) continue;
        const last = present[present.length - 1];
        if (last && last[1] === first + i) last[1]++;
        else present.push([first + i, first + i + 1]);
      }
    }
    const now = union(present, touch);
    for (const m of clipMissing(p.missing, now, true)) await this.writeNow(p.pid, m);
    return clipMissing(p.missing, now, false);
  }

  /** Writes pages straight into a stopped process (no fault can be involved: they are present). */
  private async writeNow(pid: number, m: Missing): Promise<void> {
    const step = PUSH_BYTES / PAGE_SIZE; // pages per read: a run may be gigabytes
    for (let at = m.start; at < m.end; at += step) {
      const to = Math.min(m.end, at + step);
      const buf = this.pushBuf.subarray(0, (to - at) * PAGE_SIZE);
      await this.readSource(`pid ${pid}`, m, at, to, buf);
      writeMemory(pid, BigInt(at) * PAGE, buf);
    }
  }

  /** Reads pages [from, to) of `m` from its source; the error names the process and pages. */
  private async readSource(
    label: string,
    m: Missing,
    from: number,
    to: number,
    buf: Uint8Array,
  ): Promise<void> {
    try {
      await m.source.read(buf, m.fileOff + (from - m.start) * PAGE_SIZE);
    } catch (e) {
      const range = `${(BigInt(from) * PAGE).toString(16)}-${(BigInt(to) * PAGE).toString(16)}`;
      throw new AmberError(
        `${label}: pages ${range}: ${m.source.label}: ${e instanceof Error ? e.message : e}`,
      );
    }
  }

  /**
   * Serves faults and pushes the other pages until none is missing (or
   * every process is gone). A failure kills the tree and is thrown.
   */
  async serve(t0: number): Promise<LazyStats> {
    using guard = new SignalGuard();
    const half = this.missingPages() / 2;
    let halfway = false;
    try {
      while (this.active) {
        guard.throwIfStopped();
        if (!halfway && this.stats.pushedPages + this.stats.faultedPages >= half) {
          halfway = true;
          await faultPointAsync("lazy-half");
          guard.throwIfStopped();
        }
        for (const s of [...this.spaces]) await this.drain(s);
        await this.pushOne();
      }
      for (const s of [...this.spaces]) await this.drain(s);
      this.stats.allInMs = performance.now() - t0;
      await this.tellRemote();
      this.log(
        `lazy pages: all in after ${this.stats.allInMs.toFixed(0)} ms: ${this.stats.faults} ` +
          `faults, ${this.stats.faultedPages} pages on demand, ${this.stats.pushedPages} pushed; ` +
          `events: ${Object.entries(this.stats.events).map(([k, n]) => `${n} ${k}`).join(", ")}`,
      );
      return this.stats;
    } catch (e) {
      const left = this.missingPages();
      const killed = this.killTree();
      const why = e instanceof Error ? e.message : String(e);
      throw new AmberError(
        `lazy pages: ${why}: ${left} pages not in yet: killed ${killed.join(" ")} ` +
          "(a process cannot run on without its memory)",
      );
    } finally {
      this.close();
    }
  }

  /**
   * Tells the remote source every page is in, so it ends its copy of the
   * tree. Without its word the tree stays here anyway (it has all its
   * memory); the source resumes its own only if the word never reached it.
   */
  private async tellRemote(): Promise<void> {
    if (!this.remote) return;
    try {
      await this.remote.done();
    } catch (e) {
      this.log(
        `lazy pages: all in, but the page source did not confirm it ends its tree: ` +
          `${e instanceof Error ? e.message : e}`,
      );
    }
  }

  /** SIGKILL to every served process and what it forked since; returns their pids. */
  private killTree(): number[] {
    const pids = new Set<number>();
    const visit = (pid: number) => {
      if (pids.has(pid)) return;
      pids.add(pid);
      for (const tid of safeList(pid)) {
        try {
          const kids = Deno.readTextFileSync(`/proc/${pid}/task/${tid}/children`).trim();
          for (const k of kids ? kids.split(" ") : []) visit(Number(k));
        } catch { /* gone */ }
      }
    };
    for (const s of this.spaces) if (s.pid) visit(s.pid);
    for (const pid of pids) libc().kill(pid, SIGKILL);
    return [...pids];
  }

  /** A restore that failed before the tree ran: its descriptors go (the tree is killed anyway). */
  abandon(): void {
    this.pending.length = 0;
    this.close();
  }

  private close(): void {
    // The watchdog's copies first: the last copy closed unregisters the memory.
    if (this.watchdog) {
      try {
        Deno.kill(-this.watchdog.pid, "SIGKILL");
      } catch { /* gone */ }
      this.watchdog = undefined;
    }
    for (const s of this.spaces.splice(0)) libc().close(s.fd);
    for (const f of this.sources) f.close();
    this.sources.clear();
    this.remote?.close();
    this.remote = undefined;
  }

  /** Handles what is waiting on one userfaultfd. */
  private async drain(s: Space): Promise<void> {
    for (;;) {
      let msgs: UffdMsg[];
      try {
        msgs = readUffd(s.fd);
      } catch (e) {
        throw new AmberError(`${s.label}: ${e instanceof Error ? e.message : e}`);
      }
      if (!msgs.length) break;
      for (const m of msgs) this.event(s, m);
      for (const f of msgs.filter((m) => m.event === UFFD_EVENT.PAGEFAULT)) {
        s.retry.push(Number(f.address! / PAGE));
      }
    }
    const todo = s.retry.splice(0);
    for (const page of todo) await this.fault(s, page);
    if (!s.missing.length && !s.retry.length && s.pid === undefined) {
      // A forked child with everything in: nothing more to watch.
      this.spaces.splice(this.spaces.indexOf(s), 1);
      libc().close(s.fd);
    }
  }

  /** Bookkeeping of non-cooperative events (faults are queued by drain). */
  private event(s: Space, m: UffdMsg): void {
    const name = EVENT_NAMES.get(m.event);
    if (name) this.stats.events[name]++;
    if (m.event === UFFD_EVENT.REMOVE || m.event === UFFD_EVENT.UNMAP) {
      const start = m.start!, end = m.end!;
      s.missing = clipMissing(
        s.missing,
        [[Number(start / PAGE), Number((end + PAGE - 1n) / PAGE)]],
        false,
      );
    } else if (m.event === UFFD_EVENT.REMAP) {
      const from = m.from!, to = m.to!, len = m.len!;
      const span: Span = [Number(from / PAGE), Number((from + len) / PAGE)];
      const shift = Number(to / PAGE) - span[0];
      const moved = clipMissing(s.missing, [span], true).map((x) => ({
        ...x,
        start: x.start + shift,
        end: x.end + shift,
      }));
      const dest: Span = [span[0] + shift, span[1] + shift];
      s.missing = clipMissing(clipMissing(s.missing, [span], false), [dest], false)
        .concat(moved).sort((a, b) => a.start - b.start);
    } else if (m.event === UFFD_EVENT.FORK) {
      const ufd = m.ufd!;
      this.spaces.push({
        label: `a child of ${s.label}`,
        fd: ufd,
        missing: s.missing.map((x) => ({ ...x })),
        retry: [],
      });
    }
  }

  /** Answers a fault on `page`: its data and the next missing pages, or zeros. */
  private async fault(s: Space, page: number): Promise<void> {
    this.stats.faults++;
    const addr = BigInt(page) * PAGE;
    const m = s.missing.find((x) => x.start <= page && page < x.end);
    if (!m) {
      const r = uffdZeropage(s.fd, addr, PAGE_SIZE);
      // EEXIST: present after all; ENOENT: unmapped or moved since (its thread meets that itself).
      if (r === -EEXIST || r === -ENOENT) uffdWake(s.fd, addr, PAGE_SIZE);
      else if (r === -EAGAIN) s.retry.push(page);
      else if (r < 0 && r !== -ENOENT && r !== -ESRCH) {
        throw new SysError(`${s.label}: UFFDIO_ZEROPAGE ${addr.toString(16)}`, -r);
      }
      return;
    }
    const end = Math.min(m.end, page + FAULT_AROUND);
    const done = await this.copy(s, m, page, end, this.faultBuf);
    if (done < 0) s.retry.push(page);
    else this.stats.faultedPages += done;
  }

  /** Copies one chunk of missing pages nobody asked for yet, round robin over the processes. */
  private async pushOne(): Promise<void> {
    const open = this.spaces.filter((s) => s.missing.length);
    if (!open.length) return;
    const s = open[this.next++ % open.length];
    const m = s.missing[0];
    const end = Math.min(m.end, m.start + PUSH_BYTES / PAGE_SIZE);
    const done = await this.copy(s, m, m.start, end, this.pushBuf);
    if (done > 0) this.stats.pushedPages += done;
  }

  /**
   * UFFDIO_COPY of pages [from, to) of `m`; they leave the missing list
   * once placed (or found present, or gone for good). Returns pages
   * placed, or -1 when none could be settled: try again after the events
   * (the address space is changing).
   *
   * ENOENT (no registered mapping there) is not proof that a page is
   * gone. The kernel looks the mapping up before it checks for a pending
   * event, so a copy that meets an mremap answers ENOENT for the old
   * place while the REMAP event saying where the pages went is still
   * unread: dropping them then would serve zeros at the new place for
   * data the image holds. So an ENOENT is asked again, page by page
   * (a run may also end past its mapping), and a page is dropped only
   * when a second ask, which checks for pending events first (EAGAIN),
   * says ENOENT again: it is in no mapping and no event will bring it.
   */
  private async copy(
    s: Space,
    m: Missing,
    from: number,
    to: number,
    buf: Uint8Array,
  ): Promise<number> {
    const data = buf.subarray(0, (to - from) * PAGE_SIZE);
    await this.readSource(s.label, m, from, to, data);
    // The list may have changed while the file was read (events of another space do not touch it,
    // but a drain of this one may have run): copy only what is still missing.
    if (!s.missing.includes(m) || from < m.start || to > m.end) return 0;
    /** Pages [from, at) are settled: placed, present already, or gone. */
    let at = from;
    let placed = 0;
    let pageByPage = false;
    /** The page whose first ENOENT is being asked again. */
    let doubted = -1;
    while (at < to) {
      const pages = pageByPage ? 1 : to - at;
      const addr = BigInt(at) * PAGE;
      const r = uffdCopy(s.fd, addr, addressOfSub(data, at - from), pages * PAGE_SIZE);
      if (r > 0) {
        placed += r / PAGE_SIZE;
        at += r / PAGE_SIZE;
        continue;
      }
      if (r === -EAGAIN) break;
      if (r === -EEXIST) {
        // Present already (should not happen: every way in faults to amber): keep it, wake.
        uffdWake(s.fd, addr, PAGE_SIZE);
        at++;
        continue;
      }
      if (r === -ESRCH) {
        // The process is gone (or has exec'd): nothing more to fill in it.
        s.missing = [];
        return placed;
      }
      if (r === -ENOENT && pages > 1) {
        pageByPage = true;
      } else if (r === -ENOENT && doubted !== at) {
        doubted = at;
      } else if (r === -ENOENT) {
        // In no registered mapping, no event pending: a fault there never comes to amber.
        uffdWake(s.fd, addr, PAGE_SIZE);
        at++;
      } else {
        throw new SysError(`${s.label}: UFFDIO_COPY ${addr.toString(16)}`, -r);
      }
    }
    if (at > from) s.missing = clipMissing(s.missing, [[from, at]], false);
    return at === from ? -1 : placed;
  }
}

/**
 * Pages amber itself may still read or write in a thread after the
 * userfaultfds are armed (a sleep's timespec below the stack pointer or
 * behind an argument register: lib/task/sleeps.ts). They are filled
 * before: amber, stopped in such an access, could not serve its fault.
 */
function pagesAmberMayTouch(regs: Regs): Span[] {
  const sp = regs.get("rsp");
  const args = (["rdi", "rsi", "rdx", "r10", "r8", "r9"] as const).map((r) => regs.get(r));
  const stack: Span = [Number((sp - 4096n) / PAGE), Number(sp / PAGE) + 1];
  return [stack, ...args.map((a): Span => [Number(a / PAGE), Number((a + 32n) / PAGE) + 1])];
}

/**
 * The argument and environment strings: read by other processes through
 * /proc/PID/cmdline and environ (ps, pgrep -f), whose remote reads of a
 * missing page fail instead of waiting for amber, so they would read empty.
 */
function pagesOthersRead(pid: number): Span[] {
  const st = readStat(pid);
  const span = (
    from: bigint,
    to: bigint,
  ): Span => [Number(from / PAGE), Number((to + PAGE - 1n) / PAGE)];
  return [span(st.argStart, st.argEnd), span(st.envStart, st.envEnd)];
}

const F_SETFD = 2, FD_CLOEXEC = 1;
const EVENT_NAMES = new Map<number, keyof LazyStats["events"]>([
  [UFFD_EVENT.FORK, "fork"],
  [UFFD_EVENT.REMAP, "remap"],
  [UFFD_EVENT.REMOVE, "remove"],
  [UFFD_EVENT.UNMAP, "unmap"],
]);

/**
 * If amber dies (SIGKILL) while pages are missing, the kernel would
 * unregister the memory as amber's descriptors close, and the tree would
 * run on with zeros where its pages should be. A watchdog holding copies
 * of the userfaultfds (inherited: the only descriptors amber lets through)
 * keeps the faulting threads waiting instead, and once amber is gone kills
 * the tree and says why. It lives in its own process group, killed as a
 * whole once every page is in. Children forked later are served by
 * userfaultfds the watchdog does not hold: it kills them too, but they may
 * run for its polling interval (0.1 s) with zeros where pages were missing.
 */
function startWatchdog(spaces: Space[]): Deno.ChildProcess {
  const fds = spaces.map((s) => s.fd);
  const pids = spaces.flatMap((s) => (s.pid ? [String(s.pid)] : []));
  const script = 'amber=$1; shift; tail --pid="$amber" -s 0.1 -f /dev/null; ' +
    // The tree and what it forked since, listed before any is killed (orphans move).
    'tree() { echo "$1"; for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do tree "$c"; done; }; ' +
    'all=$(for p in "$@"; do tree "$p"; done); kill -KILL $all 2>/dev/null; ' +
    'echo "amber: lazy pages: amber (pid $amber) died with pages missing: killed" $all >&2';
  for (const fd of fds) libc().fcntl(fd, F_SETFD, 0n);
  try {
    const child = new Deno.Command("/bin/bash", {
      args: ["-c", script, "amber-lazy-watch", String(Deno.pid), ...pids],
      stdin: "null",
      stdout: "null",
      stderr: "inherit",
      detached: true,
    }).spawn();
    child.unref();
    child.status.catch(() => {});
    return child;
  } finally {
    for (const fd of fds) libc().fcntl(fd, F_SETFD, BigInt(FD_CLOEXEC));
  }
}

function addressOfSub(buf: Uint8Array, pages: number): bigint {
  const p = Deno.UnsafePointer.of(buf.subarray(pages * PAGE_SIZE) as Uint8Array<ArrayBuffer>);
  return p ? BigInt(Deno.UnsafePointer.value(p)) : 0n;
}

function safeList(pid: number): number[] {
  try {
    return listProcNumbers(pid, "task");
  } catch {
    return [];
  }
}

/**
 * Makes the userfaultfd inside the stopped process, registers its lazy
 * mappings and moves it to amber. A string when the kernel will not give
 * this process one that serves kernel-mode faults and reports forks: why.
 */
function makeUffd(inj: Injector, mappings: MappingImage[]): number | string {
  const pid = inj.tid;
  const scratchAddr = findFreeRange(readMaps(pid), PAGE);
  // MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE; never registered, so never faults to amber.
  inj.call("mmap scratch", NR.mmap, scratchAddr, PAGE, 3, 0x02 | 0x20 | 0x100000, -1, 0);
  const scratch = { addr: scratchAddr, size: PAGE_SIZE };
  let fd = -1;
  try {
    const made = inj.raw(NR_USERFAULTFD, O_CLOEXEC | O_NONBLOCK);
    // User-mode-only faults would not do: a read() into a missing page must be served too.
    if (made === -BigInt(EPERM)) {
      return "userfaultfd: EPERM for its credentials (no CAP_SYS_PTRACE, " +
        "vm.unprivileged_userfaultfd 0)";
    }
    if (made < 0n) throw new SysError("userfaultfd", Number(-made));
    fd = Number(made);
    const api = putBytes(pid, scratch, uffdioApiWith(LAZY_FEATURES));
    const r = inj.raw(NR.ioctl, fd, UFFDIO_API, api);
    if (r === -BigInt(EPERM) || r === -BigInt(EINVAL)) {
      return `ioctl(UFFDIO_API): ${r === -BigInt(EPERM) ? "EPERM" : "EINVAL"} for the ` +
        "fork, remap, remove and unmap events";
    }
    if (r < 0n) throw new SysError("ioctl(UFFDIO_API)", Number(-r));
    for (const m of mappings) {
      const reg = uffdioRegisterMissing(m.start, m.end);
      const at = putBytes(pid, scratch, reg, 64);
      withContext(
        mappingLabel(m),
        () => inj.call("ioctl(UFFDIO_REGISTER)", NR.ioctl, fd, UFFDIO_REGISTER, at),
      );
      const back = new Uint8Array(32);
      using mem = Deno.openSync(`/proc/${pid}/mem`, { read: true });
      mem.seekSync(Number(at), Deno.SeekMode.Start);
      mem.readSync(back);
      if (!(registeredIoctls(back) & UFFDIO_COPY_BIT)) {
        throw new AmberError(`${mappingLabel(m)}: UFFDIO_COPY not offered for it`);
      }
    }
    const mine = takeFd(pid, fd);
    return mine;
  } finally {
    if (fd >= 0) inj.raw(NR.close, fd);
    inj.call("munmap scratch", NR.munmap, scratchAddr, PAGE_SIZE);
  }
}
