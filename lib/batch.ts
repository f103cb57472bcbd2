/**
 * Many injected syscalls for the price of one: a code page of BATCH_CODE
 * mapped into the frozen process runs a table of calls from the scratch
 * area and stops once (ffi/inject.ts runBatch). Each plain injected call
 * costs two ptrace stops, which dominate a dump of many small processes.
 */
import { BATCH_CODE, BATCH_ENTRY, type Injector, NR } from "../ffi/inject.ts";
import type { DumpContext, RestoreContext } from "./context.ts";
import { SysError } from "../ffi/libc.ts";
import { readStatus, statusHex } from "./proc/status.ts";
import { getBytes, putBytes, readU64s, u64Bytes } from "./scratch.ts";

const SIGTRAP_BIT = 1n << 4n;
const PROT_READ = 1, PROT_EXEC = 4, MAP_PRIVATE = 2, MAP_ANONYMOUS = 0x20;
const MAP_FIXED_NOREPLACE = 0x100000;
const PAGE = 4096;

type Ctx = Pick<DumpContext | RestoreContext, "pid" | "injector" | "scratch" | "batchPage">;

/** A syscall: its number and arguments. */
export type Syscall = [nr: number, ...args: (number | bigint)[]];

/** Runs a table of calls in one stop; returns each call's result (-errno on failure). */
export type BatchRun = (calls: Syscall[]) => bigint[];

/** A SIGTRAP ignored or pending (for the process, or thread `tid`) would meet the int3's. */
function trapInTheWay(pid: number, tid: number, shared: boolean): boolean {
  const status = readStatus(pid, tid);
  const trap = statusHex(status, "SigPnd") |
    (shared ? statusHex(status, "SigIgn") | statusHex(status, "ShdPnd") : 0n);
  return (trap & SIGTRAP_BIT) !== 0n;
}

/**
 * Runs `fn` with a batch runner, or with undefined where batching cannot be
 * used here (SIGTRAP ignored or pending, or no executable page allowed):
 * the caller then injects one call at a time. The code page is gone again
 * when `fn` returns. `onThread` gives a runner on another thread of the
 * process (the page is the process's), or undefined where that thread
 * has a SIGTRAP pending.
 */
export function withBatch<T>(
  ctx: Ctx,
  fn: (run?: BatchRun, onThread?: (inj: Injector) => BatchRun | undefined) => T,
): T {
  if (trapInTheWay(ctx.pid, ctx.injector.tid, true)) return fn();
  const inj = ctx.injector;
  const kept = ctx.batchPage;
  const code = kept?.addr ?? mapCodePage(inj);
  if (code === undefined) return fn();
  if (kept) kept.addr = code;
  try {
    const on = (other: Injector) =>
      other.tid === inj.tid || !trapInTheWay(ctx.pid, other.tid, false)
        ? (calls: Syscall[]) => runCalls(ctx, other, code, calls)
        : undefined;
    return fn((calls) => runCalls(ctx, inj, code, calls), on);
  } finally {
    if (!kept) inj.call("munmap", NR.munmap, code, PAGE);
  }
}

/** Bytes of the batch code page. */
export const BATCH_PAGE_SIZE = PAGE;

/**
 * A new code page holding BATCH_CODE, at `at` if given (never replacing a
 * mapping); undefined where none may be made executable.
 */
function mapCodePage(inj: Injector, at = 0n): bigint | undefined {
  const flags = MAP_PRIVATE | MAP_ANONYMOUS | (at ? MAP_FIXED_NOREPLACE : 0);
  const code = inj.raw(NR.mmap, at, PAGE, PROT_READ | PROT_EXEC, flags, -1, 0);
  if (code < 0n && code > -4096n) return undefined; // e.g. refused by memory-deny-write-execute
  if (at && code !== at) {
    inj.call("munmap", NR.munmap, code, PAGE); // (a kernel without MAP_FIXED_NOREPLACE)
    return undefined;
  }
  inj.poke(code, BATCH_CODE);
  return code;
}

/**
 * For a restore: a code page at `at`, a range its caller chose outside
 * every mapping of the image, kept for all the parts of the process
 * (ctx.batchPage) and unmapped by the caller with its scratch area.
 */
export function mapBatchPageAt(inj: Injector, at: bigint): bigint | undefined {
  return mapCodePage(inj, at);
}

/**
 * From now on the process's batches share one code page (two injected
 * calls fewer per batching part), until dropBatchPage. Only for a dump,
 * whose parts run one process at a time: dump drops it before any part
 * that reads the mappings (Part.readsMemoryLayout) and when the process
 * is done, so no image sees it, and it lives only while amber holds the
 * process frozen (like the scratch bytes, which are put back).
 */
export function keepBatchPage(ctx: DumpContext): void {
  ctx.batchPage ??= {};
}

/** Unmaps the kept code page, if one was mapped; batches map their own again until keepBatchPage. */
export function dropBatchPage(ctx: DumpContext): void {
  const addr = ctx.batchPage?.addr;
  ctx.batchPage = undefined;
  if (addr === undefined) return;
  ctx.injector.call("munmap", NR.munmap, addr, PAGE);
  ctx.injector.end();
}

/** Runs `calls` on `inj`'s thread through the code page; the table takes the start of the scratch area. */
function runCalls(ctx: Ctx, inj: Injector, code: bigint, calls: Syscall[]): bigint[] {
  const table = calls.flatMap(([nr, ...args]) => {
    const six = [0, 1, 2, 3, 4, 5].map((i) => args[i] ?? 0);
    return [nr, ...six, -1];
  });
  const at = putBytes(ctx.pid, ctx.scratch, u64Bytes(table));
  inj.runBatch(ctx.pid, code, at, calls.length);
  const out = readU64s(getBytes(ctx.pid, ctx.scratch, calls.length * BATCH_ENTRY));
  return calls.map((_, i) => BigInt.asIntN(64, out[i * 8 + 7]));
}

/** Bytes of scratch a table of `n` calls takes: the caller's buffers go after it. */
export function batchTableBytes(n: number): number {
  return n * BATCH_ENTRY;
}

/** Calls per batch: their table fits any scratch area (4 KiB at least). */
const BATCH_MAX = 48;

/**
 * Calls that need no result of another, in their order: in batches where
 * batching works here, else one at a time. Throws the first failure,
 * named by its `what` (later calls of its batch ran too).
 */
export function runEach(ctx: Ctx, calls: { what: string; call: Syscall }[]): bigint[] {
  if (!calls.length) return [];
  return withBatch(ctx, (run) => {
    if (!run) return calls.map(({ what, call }) => ctx.injector.call(what, ...call));
    const out: bigint[] = [];
    for (let i = 0; i < calls.length; i += BATCH_MAX) {
      const chunk = calls.slice(i, i + BATCH_MAX);
      run(chunk.map((c) => c.call)).forEach((r, j) => {
        if (r < 0n && r > -4096n) throw new SysError(chunk[j].what, Number(-r));
        out.push(r);
      });
    }
    return out;
  });
}
