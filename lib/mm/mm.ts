/**
 * The mm_struct fields (code/data/brk/stack/args/env bounds, auxv, exe
 * file), set in one PR_SET_MM_MAP call once the mappings exist, and the
 * final protections of every mapping (lib/mm/vmflags.ts adds madvise/mlock).
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { definePart } from "../context.ts";
import { runEach, type Syscall } from "../batch.ts";
import { AmberError, withContext } from "../errors.ts";
import { bytes, u64 } from "../images/codec.ts";
import { listProcNumbers, readProcBytes, readProcLink } from "../proc/read.ts";
import { readStat } from "../proc/stat.ts";
import { putBytes, putString, u64Bytes } from "../scratch.ts";
import { FileIdentity, type MappingImage, mappingLabel, writableWhileFilled } from "./mappings.ts";
import { reattachReadOnly } from "./sysvshm.ts";

const PR_SET_MM = 35;
const PR_SET_MM_MAP = 14;
const PRCTL_MM_MAP_SIZE = 104;

export const MmSchema = z.object({
  startCode: u64,
  endCode: u64,
  startData: u64,
  endData: u64,
  startBrk: u64,
  brk: u64,
  startStack: u64,
  argStart: u64,
  argEnd: u64,
  envStart: u64,
  envEnd: u64,
  auxv: bytes.refine((b) => b.length % 16 === 0 && b.length <= 4096, "bad auxv"),
  exe: z.string(),
  exeFile: FileIdentity.optional(),
});
export type MmImage = z.output<typeof MmSchema>;

export const mmPart = definePart({
  name: "mm",
  readsMemoryLayout: true,
  version: 1,
  schema: MmSchema,
  dump({ pid, injector }) {
    const st = readStat(pid);
    const exe = readProcLink(pid, "exe");
    const exeStat = Deno.statSync(`/proc/${pid}/exe`);
    return {
      startCode: st.startCode,
      endCode: st.endCode,
      startData: st.startData,
      endData: st.endData,
      startBrk: st.startBrk,
      // brk(0) changes nothing and returns the current break.
      brk: injector.call("brk(0)", NR.brk, 0),
      startStack: st.startStack,
      argStart: st.argStart,
      argEnd: st.argEnd,
      envStart: st.envStart,
      envEnd: st.envEnd,
      auxv: readProcBytes(pid, "auxv"),
      exe,
      exeFile: {
        ino: exeStat.ino ?? 0,
        size: exeStat.size,
        mtimeMs: exeStat.mtime?.getTime() ?? 0,
      },
    };
  },
  precheck({ exe, exeFile }) {
    if (exe.endsWith(" (deleted)")) throw new AmberError(`exe ${exe}: deleted; not supported yet`);
    let st;
    try {
      st = Deno.statSync(exe);
    } catch {
      throw new AmberError(`exe ${exe}: missing`);
    }
    if (exeFile && (st.ino !== exeFile.ino || st.size !== exeFile.size)) {
      throw new AmberError(`exe ${exe}: changed since the dump`);
    }
  },
  restore(ctx, mm) {
    const { pid, scratch } = ctx;
    const { mappings } = ctx.images.mappings as { mappings: MappingImage[] };
    const calls: { what: string; call: Syscall }[] = [];
    for (const m of mappings) {
      if (m.kind === "special" || m.kind === "vsyscall") continue;
      withContext(mappingLabel(m), () => {
        if (m.sysv && m.sharedWith === undefined && !m.vmFlags.includes("mw")) {
          reattachReadOnly(ctx, m.sysv, m.start);
        }
      });
      if (writableWhileFilled(m)) {
        const call: Syscall = [NR.mprotect, m.start, m.end - m.start, m.prot];
        calls.push({ what: `${mappingLabel(m)}: mprotect`, call });
      }
    }
    // The mprotects (disjoint ranges), the exe's open, the map and the close in one batch: the
    // exe gets the lowest free descriptor (the process is amber's alone), checked after.
    // The path after the auxv: both are read by calls of the same batch.
    const exePath = putString(pid, scratch, mm.exe, AUXV_AT + mm.auxv.length);
    const open = new Set(listProcNumbers(pid, "fd"));
    let exeFd = 0;
    while (open.has(exeFd)) exeFd++;
    calls.push({ what: `open ${mm.exe}`, call: [NR.openat, -100, exePath, 0o2000000, 0] });
    const auxvAddr = putBytes(pid, scratch, mm.auxv, AUXV_AT);
    const map = new Uint8Array(PRCTL_MM_MAP_SIZE);
    map.set(u64Bytes([
      mm.startCode,
      mm.endCode,
      mm.startData,
      mm.endData,
      mm.startBrk,
      mm.brk,
      mm.startStack,
      mm.argStart,
      mm.argEnd,
      mm.envStart,
      mm.envEnd,
      auxvAddr,
    ]));
    new DataView(map.buffer).setUint32(96, mm.auxv.length, true);
    new DataView(map.buffer).setUint32(100, Number(exeFd), true);
    const mapAddr = putBytes(pid, scratch, map, MM_MAP_AT);
    const opened = calls.length - 1;
    calls.push(
      {
        what: "prctl(PR_SET_MM_MAP)",
        call: [NR.prctl, PR_SET_MM, PR_SET_MM_MAP, mapAddr, PRCTL_MM_MAP_SIZE, 0],
      },
      { what: "close", call: [NR.close, exeFd] },
    );
    const got = runEach(ctx, calls)[opened];
    if (Number(got) !== exeFd) {
      throw new AmberError(
        `open ${mm.exe}: gave fd ${got} where fd ${exeFd} was the lowest free one`,
      );
    }
  },
});

/** Where the auxv (the exe's path after it) and the prctl_mm_map go: past a batch's table. */
const AUXV_AT = 4096, MM_MAP_AT = 3072;
