/**
 * Many injected syscalls for the price of one: a code page of BATCH_CODE
 * mapped into the frozen process runs a table of calls from the scratch
 * area and stops once (ffi/inject.ts runBatch). Each plain injected call
 * costs two ptrace stops, which dominate a dump of many small processes.
 */
import { BATCH_CODE, BATCH_ENTRY, NR } from "../ffi/inject.ts";
import type { DumpContext } from "./context.ts";
import { readStatus, statusHex } from "./proc/status.ts";
import { getBytes, putBytes, readU64s, u64Bytes } from "./scratch.ts";

const SIGTRAP_BIT = 1n << 4n;
const PROT_READ = 1, PROT_EXEC = 4, MAP_PRIVATE = 2, MAP_ANONYMOUS = 0x20;
const PAGE = 4096;

type Ctx = Pick<DumpContext, "pid" | "injector" | "scratch">;

/** A syscall: its number and arguments. */
export type Syscall = [nr: number, ...args: (number | bigint)[]];

/**
 * Runs `fn` with a batch runner, or with undefined where batching cannot be
 * used here (SIGTRAP ignored or pending, or no executable page allowed):
 * the caller then injects one call at a time. The code page is gone again
 * when `fn` returns.
 */
export function withBatch<T>(ctx: Ctx, fn: (run?: (calls: Syscall[]) => bigint[]) => T): T {
  const status = readStatus(ctx.pid, ctx.injector.tid);
  const trap = statusHex(status, "SigIgn") | statusHex(status, "SigPnd") |
    statusHex(status, "ShdPnd");
  if (trap & SIGTRAP_BIT) return fn();
  const inj = ctx.injector;
  const flags = MAP_PRIVATE | MAP_ANONYMOUS;
  const code = inj.raw(NR.mmap, 0, PAGE, PROT_READ | PROT_EXEC, flags, -1, 0);
  if (code < 0n && code > -4096n) return fn(); // e.g. refused by memory-deny-write-execute
  try {
    inj.poke(code, BATCH_CODE);
    return fn((calls) => runCalls(ctx, code, calls));
  } finally {
    inj.call("munmap", NR.munmap, code, PAGE);
  }
}

/** Runs `calls` through the code page; the table takes the start of the scratch area. */
function runCalls(ctx: Ctx, code: bigint, calls: Syscall[]): bigint[] {
  const table = calls.flatMap(([nr, ...args]) => {
    const six = [0, 1, 2, 3, 4, 5].map((i) => args[i] ?? 0);
    return [nr, ...six, -1];
  });
  const at = putBytes(ctx.pid, ctx.scratch, u64Bytes(table));
  ctx.injector.runBatch(ctx.pid, code, at, calls.length);
  const out = readU64s(getBytes(ctx.pid, ctx.scratch, calls.length * BATCH_ENTRY));
  return calls.map((_, i) => BigInt.asIntN(64, out[i * 8 + 7]));
}

/** Bytes of scratch a table of `n` calls takes: the caller's buffers go after it. */
export function batchTableBytes(n: number): number {
  return n * BATCH_ENTRY;
}
