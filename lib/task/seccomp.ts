/**
 * Seccomp, per thread: strict mode, and filter mode when every thread has
 * the same filters (the usual case: installed before the threads, or with
 * TSYNC). Filters are read with PTRACE_SECCOMP_GET_FILTER and installed
 * last (Part.finish), once nothing more is injected, by the main thread
 * with SECCOMP_FILTER_FLAG_TSYNC so the threads share them again.
 */
import { z } from "zod";
import { type Injector, NR } from "../../ffi/inject.ts";
import { seccompFilter, seccompFilterFlags } from "../../ffi/seccomp.ts";
import { Regs } from "../../ffi/regs.ts";
import { definePart, type RestoreContext, type Scratch } from "../context.ts";
import { AmberError, withContext } from "../errors.ts";
import { bytes, MAX_IMAGE_BYTES, pidNumber } from "../images/codec.ts";
import { readMaps } from "../proc/maps.ts";
import { readStatus, statusHex } from "../proc/status.ts";
import { getBytes, putBytes, u64Bytes } from "../scratch.ts";
import type { ThreadImage } from "./threads.ts";

const MODES = ["disabled", "strict", "filter"];
const PR_SET_SECCOMP = 22;
const SECCOMP_MODE_STRICT = 1, SECCOMP_SET_MODE_FILTER = 1;
const FLAG = { TSYNC: 1, LOG: 2, SPEC_ALLOW: 4 } as const;
const CAP_SYS_ADMIN = 21n;

const Filter = z.object({ code: bytes, flags: z.number().int().min(0) });
const ThreadSeccomp = z.object({
  tid: pidNumber,
  mode: z.number().int().min(0),
  /** Oldest first, the order they are installed in again. */
  filters: z.array(Filter),
  /** What installing them needs: no_new_privs or CAP_SYS_ADMIN. */
  noNewPrivs: z.boolean(),
  capSysAdmin: z.boolean(),
});
type ThreadSeccomp = z.output<typeof ThreadSeccomp>;

function dumpThread(pid: number, tid: number): z.input<typeof ThreadSeccomp> {
  const st = readStatus(pid, tid);
  const mode = Number(st.get("Seccomp") ?? 0);
  const count = mode === 2 ? Number(st.get("Seccomp_filters") ?? 0) : 0;
  const filters = [];
  for (let i = count - 1; i >= 0; i--) {
    filters.push({ code: seccompFilter(tid, i), flags: seccompFilterFlags(tid, i) });
  }
  return {
    tid,
    mode,
    filters,
    noNewPrivs: st.get("NoNewPrivs") === "1",
    capSysAdmin: (statusHex(st, "CapEff") >> CAP_SYS_ADMIN & 1n) === 1n,
  };
}

const chain = (t: ThreadSeccomp) =>
  JSON.stringify(t.filters.map((f) => [f.flags, Array.from(f.code)]));

function refusal(threads: ThreadSeccomp[]): string | undefined {
  const main = threads[0];
  for (const t of threads) {
    const mode = `seccomp mode ${t.mode} (${MODES[t.mode] ?? "unknown"})`;
    if (t.mode > 2) return `tid ${t.tid}: ${mode}: not supported yet`;
    if ((t.mode === 2) !== (main.mode === 2) || chain(t) !== chain(main)) {
      return `tid ${t.tid}: ${mode}: seccomp filters that differ between threads: not supported yet`;
    }
    if (t.mode === 2 && !t.noNewPrivs && !t.capSysAdmin) {
      return `tid ${t.tid}: ${mode}: filters without no_new_privs or CAP_SYS_ADMIN: not supported yet`;
    }
    const f = t.filters.find((f) => f.flags & ~FLAG.LOG);
    if (f) return `tid ${t.tid}: seccomp filter flags 0x${f.flags.toString(16)}: not supported yet`;
  }
}

/**
 * Room for a filter in the restored memory, below the main thread's stack
 * pointer (or in any writable mapping); the caller puts the bytes back.
 */
function stackRoom(ctx: RestoreContext, size: number): Scratch {
  const { threads } = ctx.images.threads as { threads: ThreadImage[] };
  const rsp = new Regs(threads[0].regs).get("rsp");
  const below = ((rsp - 512n - BigInt(size)) / 16n) * 16n;
  const maps = readMaps(ctx.pid).filter((m) => m.perms.startsWith("rw"));
  if (maps.some((m) => m.start <= below && below + BigInt(size) <= m.end)) {
    return { addr: below, size };
  }
  const any = maps.find((m) => m.end - m.start >= BigInt(size));
  if (!any) throw new AmberError("no writable memory for the filter");
  return { addr: any.start, size };
}

function installFilters(ctx: RestoreContext, inj: Injector, t: ThreadSeccomp): void {
  const tsync = ctx.threads.size > 1 ? FLAG.TSYNC : 0;
  for (const [i, f] of t.filters.entries()) {
    withContext(`filter ${i}`, () => {
      const room = stackRoom(ctx, f.code.length + 16);
      const saved = getBytes(ctx.pid, room, room.size);
      try {
        const code = putBytes(ctx.pid, room, f.code, 16);
        // struct sock_fprog: u16 len, padding, then the program's address.
        putBytes(ctx.pid, room, u64Bytes([f.code.length / 8, code]));
        // The speculation controls are already restored: the filter must not change them.
        const flags = f.flags | tsync | FLAG.SPEC_ALLOW;
        const r = inj.call("seccomp", NR.seccomp, SECCOMP_SET_MODE_FILTER, flags, room.addr);
        if (r > 0n) throw new AmberError(`TSYNC: thread ${r} could not take the filter`);
      } finally {
        putBytes(ctx.pid, room, saved);
      }
    });
  }
}

export const seccompPart = definePart({
  name: "seccomp",
  readsMemoryLayout: true,
  maxBytes: MAX_IMAGE_BYTES,
  version: 1,
  schema: z.object({ threads: z.array(ThreadSeccomp).min(1) }),
  dump: ({ pid, proc }) => ({
    threads: proc.threads.map((tid) => withContext(`tid ${tid}`, () => dumpThread(pid, tid))),
  }),
  unrestorable: ({ threads }) => refusal(threads),
  // Every restored thread starts without seccomp: the rest waits for finish.
  restore() {},
  finish(ctx, { threads }) {
    const main = threads[0];
    if (main.mode === 2) {
      withContext(`tid ${main.tid}`, () => installFilters(ctx, ctx.injector, main));
    }
    for (const t of threads.filter((t) => t.mode === 1)) {
      const inj = ctx.threads.get(t.tid);
      if (!inj) throw new AmberError(`tid ${t.tid}: thread not created`);
      inj.call(
        `tid ${t.tid}: prctl(SET_SECCOMP strict)`,
        NR.prctl,
        PR_SET_SECCOMP,
        SECCOMP_MODE_STRICT,
      );
    }
  },
});
