/**
 * The VmFlags of smaps that a mapping gets from madvise, mlock or mseal
 * rather than from mmap: recorded per mapping at dump and applied once
 * the mm part has given every mapping its final protection. Flags neither
 * mmap (the mappings part) nor this part recreates are refused.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { runEach, type Syscall } from "../batch.ts";
import { definePart } from "../context.ts";
import { MAX_IMAGE_BYTES, u64 } from "../images/codec.ts";
import { type MappingImage, mappingLabel } from "./mappings.ts";

/** Flags that mapping the same thing again recreates (permissions, kind, growth, accounting). */
const FROM_MMAP = new Set([
  "rd",
  "wr",
  "ex",
  "sh",
  "mr",
  "mw",
  "me",
  "ms",
  "gd",
  "ac",
  "nr",
  "de",
  "io",
  "pf",
  "mm",
  "ar",
  "ht",
  "dw",
  "sd",
]);
/** VmFlags → the madvise advice that sets it. */
const MADVISE: Record<string, number> = {
  rr: 1, // MADV_RANDOM
  sr: 2, // MADV_SEQUENTIAL
  dc: 10, // MADV_DONTFORK
  mg: 12, // MADV_MERGEABLE
  hg: 14, // MADV_HUGEPAGE
  nh: 15, // MADV_NOHUGEPAGE
  dd: 16, // MADV_DONTDUMP
  wf: 18, // MADV_WIPEONFORK
};
/** lo: mlock; lf: mlock2(MLOCK_ONFAULT); sl: mseal. */
const OTHER = new Set(["lo", "lf", "sl"]);
const MLOCK_ONFAULT = 1;
const NAMES: Record<string, string> = {
  um: "userfaultfd (missing) registration",
  uw: "userfaultfd (write-protect) registration",
  ui: "userfaultfd (minor) registration",
  ss: "shadow stack",
  sf: "synchronous page faults (MAP_SYNC)",
};

const Entry = z.object({ start: u64, end: u64, path: z.string(), flags: z.array(z.string()) });
type Entry = z.output<typeof Entry>;

function applied(f: string): boolean {
  return MADVISE[f] !== undefined || OTHER.has(f);
}

export const vmflagsPart = definePart({
  name: "vmflags",
  readsMemoryLayout: true,
  maxBytes: MAX_IMAGE_BYTES,
  version: 1,
  schema: z.object({ mappings: z.array(Entry) }),
  dump({ done }) {
    const { mappings } = done.mappings as { mappings: MappingImage[] };
    const out: z.input<typeof Entry>[] = [];
    for (const m of mappings) {
      // [vvar]/[vdso] are moved with their flags, never recreated.
      if (m.kind === "special" || m.kind === "vsyscall") continue;
      const flags = m.vmFlags.filter((f) => !FROM_MMAP.has(f));
      if (flags.length) out.push({ start: m.start, end: m.end, path: m.path, flags });
    }
    return { mappings: out };
  },
  unrestorable({ mappings }) {
    for (const m of mappings) {
      const f = m.flags.find((f) => !applied(f));
      if (f) {
        return `${mappingLabel(m)}: VmFlag ${f}${
          NAMES[f] ? ` (${NAMES[f]})` : ""
        }: not supported yet`;
      }
    }
  },
  restore(ctx, { mappings }) {
    // Independent calls (disjoint ranges, each mapping's in order): in batches.
    runEach(ctx, mappings.flatMap(flagCalls));
  },
});

/** The calls that give `m` its flags, named for errors. */
function flagCalls(m: Entry): { what: string; call: Syscall }[] {
  const len = m.end - m.start;
  const label = mappingLabel(m);
  const calls: { what: string; call: Syscall }[] = [];
  for (const f of m.flags) {
    if (MADVISE[f] !== undefined) {
      calls.push({ what: `${label}: madvise(${f})`, call: [NR.madvise, m.start, len, MADVISE[f]] });
    }
  }
  if (m.flags.includes("lo")) {
    const onFault = m.flags.includes("lf") ? MLOCK_ONFAULT : 0;
    calls.push({ what: `${label}: mlock2`, call: [NR.mlock2, m.start, len, onFault] });
  }
  // Last: a sealed mapping refuses any further change.
  if (m.flags.includes("sl")) {
    calls.push({ what: `${label}: mseal`, call: [NR.mseal, m.start, len, 0] });
  }
  return calls;
}
