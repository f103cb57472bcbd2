/**
 * Signal dispositions (rt_sigaction), read and set by injected syscalls.
 * Restore sets every one: the restored process starts as a copy of amber's
 * helper, which inherits whatever amber's own starter ignores.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { batchTableBytes, runEach, type Syscall, withBatch } from "../batch.ts";
import { definePart, type DumpContext } from "../context.ts";
import { AmberError, faultPoint } from "../errors.ts";
import { u64 } from "../images/codec.ts";
import { type ProcStatus, readStatus, statusHex } from "../proc/status.ts";
import { getBytes, putBytes, readU64s, u64Bytes } from "../scratch.ts";

const SIGKILL = 9;
const SIGSTOP = 19;
const SIGTRAP = 5;
/** struct kernel_sigaction: handler, flags, restorer, mask (8 bytes each). */
const KSIGACTION_SIZE = 32;

const Sigaction = z.object({
  signal: z.number().int().min(1).max(64),
  handler: u64,
  flags: u64,
  restorer: u64,
  mask: u64,
});

const bit = (sig: number) => 1n << BigInt(sig - 1);

/** The signals whose disposition is not SIG_DFL (ignored or handled), as a mask. */
function nonDefault(status: ProcStatus): bigint {
  return statusHex(status, "SigIgn") | statusHex(status, "SigCgt");
}

/** Each signal's struct kernel_sigaction, one injected rt_sigaction at a time. */
function askEach({ pid, injector, scratch }: DumpContext, signals: number[]): bigint[][] {
  return signals.map((sig) => {
    injector.call(`rt_sigaction(${sig})`, NR.rt_sigaction, sig, 0, scratch.addr, 8);
    return readU64s(getBytes(pid, scratch, KSIGACTION_SIZE));
  });
}

/** The same, as many signals per injected batch as the scratch area holds. */
function askBatched(
  ctx: DumpContext,
  signals: number[],
  run: (calls: Syscall[]) => bigint[],
): bigint[][] {
  const out: bigint[][] = [];
  // As many as the scratch holds, each with its table entry: all 62 in a dump's 8 KiB.
  const perBatch = Math.floor(ctx.scratch.size / (batchTableBytes(1) + KSIGACTION_SIZE));
  for (let i = 0; i < signals.length; i += perBatch) {
    const chunk = signals.slice(i, i + perBatch);
    const base = batchTableBytes(chunk.length);
    const at = (j: number) => ctx.scratch.addr + BigInt(base + j * KSIGACTION_SIZE);
    const results = run(chunk.map((sig, j) => [NR.rt_sigaction, sig, 0, at(j), 8]));
    const acts = readU64s(getBytes(ctx.pid, ctx.scratch, chunk.length * KSIGACTION_SIZE, base));
    results.forEach((r, j) => {
      if (r < 0n) throw new AmberError(`rt_sigaction(${chunk[j]}): errno ${-r}`);
      out.push(acts.slice(j * 4, j * 4 + 4));
    });
  }
  return out;
}

export const sigactionsPart = definePart({
  name: "sigactions",
  version: 1,
  schema: z.object({ actions: z.array(Sigaction) }),
  dump(ctx) {
    const signals = Array.from({ length: 64 }, (_, i) => i + 1)
      .filter((sig) => sig !== SIGKILL && sig !== SIGSTOP);
    // Every one is asked, SIG_DFL ones too: /proc shows only which are
    // handled or ignored, not the flags and mask an action keeps (SIGCHLD's
    // act at SIG_DFL, and any can be read back by the program).
    const raw = withBatch(
      ctx,
      (run) => run ? askBatched(ctx, signals, run) : askEach(ctx, signals),
    );
    const actions = [];
    for (const [i, signal] of signals.entries()) {
      const [handler, flags, restorer, mask] = raw[i];
      if (handler || flags || restorer || mask) {
        actions.push({ signal, handler, flags, restorer, mask });
      }
    }
    // The leader is still at its last injected call here (tests kill amber at this point).
    faultPoint("mid-sigactions");
    return { actions };
  },
  restore(ctx, { actions }) {
    const { pid, injector, scratch } = ctx;
    const wanted = new Map(actions.map((a) => [a.signal, a]));
    // Dispositions the process has now (the helper's) that are not SIG_DFL.
    const now = nonDefault(readStatus(pid));
    const calls: { what: string; call: Syscall }[] = [];
    let trap: Syscall | undefined;
    for (let sig = 1; sig <= 64; sig++) {
      if (sig === SIGKILL || sig === SIGSTOP) continue;
      const a = wanted.get(sig);
      if (!a && !(now & bit(sig))) continue;
      const act = a ? [a.handler, a.flags, a.restorer, a.mask] : [0, 0, 0, 0];
      // Each struct past the batch's table (64 calls at most).
      const addr = putBytes(pid, scratch, u64Bytes(act), ACTS_AT + sig * 32);
      const call: Syscall = [NR.rt_sigaction, sig, addr, 0, 8];
      // The batch ends with an int3, whose SIGTRAP resets an ignored SIGTRAP: that one comes after.
      if (sig === SIGTRAP) trap = call;
      else calls.push({ what: `rt_sigaction(${sig})`, call });
    }
    runEach(ctx, calls);
    if (trap) injector.call(`rt_sigaction(${SIGTRAP})`, ...trap);
  },
});

/** Where the sigaction structs go in the scratch area: past a batch table of 64 calls. */
const ACTS_AT = 4096;
