/**
 * A migration's tree built ahead (lib/migrate.ts): once the sender says
 * its next round is the final one, migrate-receive restores the round
 * before it, up to the point where the threads would get their final
 * registers, and holds the tree there, stopped, while the source freezes
 * and sends the final round. If the final round differs from that round
 * only where restore can still put it right (memory pages, each thread's
 * registers, FPU state, signal mask and sleep), the held tree takes the
 * final round's pages and runs with its threads' state: the final pause
 * no longer holds the rebuild. Otherwise (a part changed: a new mapping,
 * a file offset, a timer...) the held tree is killed and the final round
 * restored from the start, as without it. Nothing of it runs before the
 * sender's go, and a failure kills it (the source then resumes).
 */
import { isDeepStrictEqual } from "node:util";
import { AmberError, withContext } from "./errors.ts";
import { type Injector, NR } from "../ffi/inject.ts";
import { ImageDir } from "./images/dir.ts";
import type { Images } from "./images/read.ts";
import type { RestoreOptions } from "./context.ts";
import { PARTS } from "./parts.ts";
import { partRefusal } from "./verdict.ts";
import { fileSource, LazyPages, type Missing } from "./mm/lazy.ts";
import { type MappingImage, PAGE } from "./mm/mappings.ts";
import { runsToSpans, type Span, subtract, union } from "./mm/tracking.ts";
import type { ThreadImage } from "./task/threads.ts";
import { Regs } from "../ffi/regs.ts";

/**
 * The parts restore can still set from later images in a held tree (fds:
 * only regular files' offsets; their files are checked again).
 */
const PATCHED = new Set(["pagemap", "threads"]);
const CHECKED_AGAIN = new Set([...PATCHED, "fds"]);

const SEEK_SET = 0;
const PROT_WRITE = 2;

interface Run {
  addr: bigint;
  pages: number;
}
interface PagemapLike {
  pagesFile: string;
  runs: Run[];
  totalPages: number;
  parentRuns?: Run[];
  remoteRuns?: Run[];
  parent?: { dir: string; createdAt: string };
}

/** Whether a tree may be built ahead from these images (no scripts, no connections to lock). */
export function canBuildAhead(images: Images, scripts: string[] | undefined): boolean {
  return !scripts?.length && images.inventory.netLock === undefined &&
    !images.inventory.tcpEstablished &&
    images.processes.every((p) => p.entry.state !== "zombie");
}

interface FdsLike {
  fds: { kind: string; fd: number; pos?: number; type?: string; identity?: unknown }[];
  shared: unknown[];
}

function isRegularFile(e: FdsLike["fds"][number]): boolean {
  return e.kind === "file" && e.type === "regular";
}

/** The descriptors with what a held tree can still be given left out: regular files' offsets. */
function withoutOffsets(fds: FdsLike): unknown {
  return {
    ...fds,
    fds: fds.fds.map((e) => isRegularFile(e) ? { ...e, pos: 0, identity: undefined } : e),
  };
}

/** Regular files whose offset moved between the rounds: [fd, offset] to seek to. */
function movedOffsets(earlier: FdsLike, later: FdsLike): [number, number][] {
  return later.fds.flatMap((e, i) =>
    isRegularFile(e) && e.pos !== earlier.fds[i].pos ? [[e.fd, e.pos ?? 0] as [number, number]] : []
  );
}

/** What restore sets up once per thread, before the final registers (lib/task/threads.ts). */
function threadSetUp(t: ThreadImage): unknown[] {
  return [t.tid, t.comm, t.rseq, t.clearChildTid, t.robustList, t.altstack];
}

function covered(pm: PagemapLike): Span[] {
  return union(runsToSpans(pm.runs), runsToSpans(pm.parentRuns ?? []));
}

/**
 * Why a tree built from `earlier` cannot take `later` (the next round of
 * the same migration, built on it), or undefined if it can.
 */
export function buildAheadMismatch(earlier: Images, later: Images): string | undefined {
  const inv = ({ createdAt: _c, verdict: _v, ...rest }: Images["inventory"]) => rest;
  if (!isDeepStrictEqual(inv(earlier.inventory), inv(later.inventory))) return "inventory";
  if (!isDeepStrictEqual(earlier.unrestorable, later.unrestorable)) return "pstree";
  if (earlier.processes.length !== later.processes.length) return "pstree";
  for (const [i, p] of later.processes.entries()) {
    const q = earlier.processes[i];
    const pid = p.entry.pid;
    if (!isDeepStrictEqual(p.entry, q.entry)) return `pid ${pid}: pstree`;
    for (const part of PARTS) {
      if (PATCHED.has(part.name)) continue;
      const strip = part.name === "fds" ? withoutOffsets : (x: unknown) => x;
      const a = p.parts[part.name], b = q.parts[part.name];
      if (!isDeepStrictEqual(strip(a as FdsLike), strip(b as FdsLike))) {
        return `pid ${pid}: ${part.name}`;
      }
    }
    const ts = (p.parts.threads as { threads: ThreadImage[] }).threads;
    const qs = (q.parts.threads as { threads: ThreadImage[] }).threads;
    if (
      ts.length !== qs.length ||
      ts.some((t, j) => !isDeepStrictEqual(threadSetUp(t), threadSetUp(qs[j])))
    ) {
      return `pid ${pid}: threads`;
    }
    const pm = p.parts.pagemap as PagemapLike, qm = q.parts.pagemap as PagemapLike;
    if (pm.remoteRuns?.length || qm.remoteRuns?.length) return `pid ${pid}: pagemap: remote pages`;
    if (pm.parent?.createdAt !== earlier.inventory.createdAt) {
      return `pid ${pid}: pagemap: not built on that round`;
    }
    // The same pages, only newer data for some: a page that came or went changes what is lazy.
    const a = covered(pm), b = covered(qm);
    if (subtract(a, b).length || subtract(b, a).length) {
      return `pid ${pid}: pagemap: pages came or went`;
    }
    // Shared memory it cannot write has its final protection by now: no write reaches it.
    const { mappings } = p.parts.mappings as { mappings: MappingImage[] };
    const locked = mappings.filter((m) => m.shared && !(m.prot & PROT_WRITE));
    if (
      pm.runs.some((r) =>
        locked.some((m) => r.addr < m.end && m.start < r.addr + BigInt(r.pages) * PAGE)
      )
    ) {
      return `pid ${pid}: pagemap: read-only shared memory written`;
    }
  }
}

/**
 * The verdict on `later` where it differs from the held tree's images: the
 * other parts are the same images, checked and restored in it already, and
 * so are the parents its pages come from (buildAheadMismatch: no other pages).
 */
export function buildAheadRefusal(
  later: Images,
  dir: ImageDir,
  restoreOptions: RestoreOptions,
): string | undefined {
  const options = { ...restoreOptions, parentsChecked: true };
  for (const p of later.processes) {
    for (const part of PARTS.filter((x) => CHECKED_AGAIN.has(x.name))) {
      const why = partRefusal(part, p.parts[part.name], {
        pid: p.entry.pid,
        dir,
        options,
        images: p.parts,
      });
      if (why) return why;
    }
  }
}

/** Gives the held tree's regular files the offsets they had at the later round (lseek). */
export function patchOffsets(
  earlier: Images,
  later: Images,
  injectors: Map<number, Injector>,
  log: (line: string) => void,
): void {
  for (const [i, p] of later.processes.entries()) {
    const pid = p.entry.pid;
    const moved = movedOffsets(earlier.processes[i].parts.fds as FdsLike, p.parts.fds as FdsLike);
    for (const [fd, pos] of moved) {
      withContext(`pid ${pid}: fd ${fd}`, () => {
        injectors.get(pid)!.call("lseek", NR.lseek, fd, pos, SEEK_SET);
      });
    }
    if (moved.length) log(`pid ${pid}: built ahead: ${moved.length} file offset(s) moved`);
  }
}

/**
 * Puts `later`'s own pages (those written since the held tree's round)
 * into the held tree, stopped: written into present memory, or left to the
 * lazy pages server where still missing.
 */
export async function patchPages(
  later: Images,
  dir: ImageDir,
  kinds: Map<string, unknown>,
  log: (line: string) => void,
): Promise<void> {
  const own = LazyPages.find(kinds);
  // A restore without lazy pages: every page is present, written at once.
  const lazy = own ?? new LazyPages(log);
  try {
    for (const p of later.processes) {
      const pid = p.entry.pid;
      const pm = p.parts.pagemap as PagemapLike;
      const newer: Missing[] = [];
      if (pm.totalPages) {
        const source = fileSource(dir.openData(pm.pagesFile, pm.totalPages * Number(PAGE)));
        let fileOff = 0;
        for (const r of pm.runs) {
          const start = Number(r.addr / PAGE);
          newer.push({ start, end: start + r.pages, fileOff, source });
          fileOff += r.pages * Number(PAGE);
        }
      }
      const regs = (p.parts.threads as { threads: ThreadImage[] }).threads.map((t) =>
        new Regs(t.regs)
      );
      await lazy.patch(pid, newer, LazyPages.touchedBy(pid, regs));
      log(`pid ${pid}: built ahead: ${newer.reduce((n, m) => n + m.end - m.start, 0)} newer pages`);
    }
  } catch (e) {
    throw new AmberError(`built ahead: ${e instanceof Error ? e.message : e}`, { cause: e });
  } finally {
    if (!own) lazy.abandon();
  }
}
