/**
 * One page-table walk of a frozen process's private anonymous memory,
 * begun at the freeze from /proc/PID/maps on a pool thread, so that it
 * runs beside the smaps walk the mappings part waits for (each ~30 ms at
 * 2 GiB here, on two cores) instead of after it. It answers both questions
 * the pagemap part asks of that memory, once: which pages are there
 * (present or swapped), and which were written since a tracker protected
 * them (lib/mm/tracking.ts).
 *
 * The tree stays frozen from this walk to the copy; amber's own injected
 * calls may touch a stack page below the stack pointer meanwhile, memory
 * no program reads. A mapping the walk did not cover (made by amber, or
 * found otherwise) is scanned again where it is needed.
 */
import {
  PAGE_IS_PRESENT,
  PAGE_IS_SWAPPED,
  PAGE_IS_WRITTEN,
  scanPagesAsync,
} from "../../ffi/uffd.ts";
import { readMaps } from "../proc/maps.ts";
import { faultPoint } from "../errors.ts";

export interface ScanAhead {
  /** The ranges walked, ascending, each whole mappings that touch. */
  spans: [bigint, bigint][];
  /** Present or swapped regions, ascending, each with its PAGE_IS_* categories. */
  regions: [bigint, bigint, bigint][];
}

/** Pseudo mappings that are not the process's memory (or not walkable). */
const NOT_MEMORY = new Set(["[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]"]);

/** Begins the walk of `pid`; undefined (never a rejection) if it cannot be made. */
export function scanAhead(pid: number): Promise<ScanAhead | undefined> {
  const spans: [bigint, bigint][] = [];
  try {
    // (A test's way to take the other path: each mapping walked where it is needed.)
    faultPoint("scan-ahead");
    for (const m of readMaps(pid)) {
      if (m.perms[3] !== "p" || m.inode !== 0 || NOT_MEMORY.has(m.path)) continue;
      const last = spans.at(-1);
      if (last && last[1] === m.start) last[1] = m.end;
      else spans.push([m.start, m.end]);
    }
  } catch {
    return Promise.resolve(undefined);
  }
  const mask = {
    all: 0n,
    any: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
    returned: PAGE_IS_SWAPPED | PAGE_IS_WRITTEN,
  };
  return scanPagesAsync(pid, spans, mask).then((regions) => ({ spans, regions }), () => undefined);
}

/**
 * The walk's regions inside [start, end), clipped to it, if the walk
 * covered all of it; undefined if not.
 */
export function regionsWithin(
  a: ScanAhead | undefined,
  start: bigint,
  end: bigint,
): [bigint, bigint, bigint][] | undefined {
  if (!a?.spans.some(([s, e]) => s <= start && end <= e)) return undefined;
  const { regions } = a;
  // The first region ending after start.
  let lo = 0, hi = regions.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (regions[mid][1] <= start) lo = mid + 1;
    else hi = mid;
  }
  const out: [bigint, bigint, bigint][] = [];
  for (let i = lo; i < regions.length && regions[i][0] < end; i++) {
    const [s, e, cat] = regions[i];
    out.push([s > start ? s : start, e < end ? e : end, cat]);
  }
  return out;
}

/** The written parts of [start, end) as the walk saw them; undefined if it did not cover it. */
export function writtenWithin(
  a: ScanAhead | undefined,
  start: bigint,
  end: bigint,
): [bigint, bigint][] | undefined {
  const regions = regionsWithin(a, start, end);
  if (!regions) return undefined;
  const out: [bigint, bigint][] = [];
  for (const [s, e, cat] of regions) {
    if (!(cat & PAGE_IS_WRITTEN)) continue;
    const last = out.at(-1);
    if (last && last[1] === s) last[1] = e;
    else out.push([s, e]);
  }
  return out;
}
