/**
 * Pending signals, per thread and process-wide, each with its full
 * siginfo (PTRACE_PEEKSIGINFO). Restore queues them again from inside the
 * process (the kernel refuses a forged si_code from anyone else), in
 * their order, after every other injected call: those run with every
 * signal blocked, so the signals wait for the threads' own masks.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import * as pt from "../../ffi/ptrace.ts";
import { definePart } from "../context.ts";
import { AmberError, withContext } from "../errors.ts";
import { bytes, MAX_IMAGE_BYTES, pidNumber } from "../images/codec.ts";
import { readStatus, statusHex } from "../proc/status.ts";
import { putBytes } from "../scratch.ts";
import { readProcText } from "../proc/read.ts";
import { expireNow, parseTimers, timerIdOf } from "./timers.ts";

const SIGKILL = 9, SIGSTOP = 19;

const Siginfo = bytes.refine((b) => b.length === pt.SIGINFO_SIZE, "siginfo must be 128 bytes");

const SignalsSchema = z.object({
  shared: z.array(Siginfo),
  threads: z.array(z.object({ tid: pidNumber, pending: z.array(Siginfo) })),
  /** Ids of the process's POSIX timers: their pending signals come back from them (expireNow). */
  timers: z.array(z.number().int()).max(1 << 20).default([]),
});

export function signalOf(info: Uint8Array): number {
  return new DataView(info.buffer, info.byteOffset).getInt32(0, true);
}

/**
 * What the kernel would deliver for a signal pending without a queue
 * entry (queue full, or a fast-pathed kernel signal): SI_USER, pid 0.
 */
function bareSiginfo(sig: number): Uint8Array {
  const info = new Uint8Array(pt.SIGINFO_SIZE);
  new DataView(info.buffer).setInt32(0, sig, true);
  return info;
}

/** The queue's siginfos, plus one for each pending bit of `mask` that has none. */
function pendingOf(tid: number, shared: boolean, mask: bigint): Uint8Array[] {
  const queued = pt.peekSiginfo(tid, shared);
  const seen = new Set(queued.map(signalOf));
  for (let sig = 1; sig <= 64; sig++) {
    if (mask & (1n << BigInt(sig - 1)) && !seen.has(sig)) queued.push(bareSiginfo(sig));
  }
  return queued;
}

const SI_TIMER = -2;

/** si_overrun of a POSIX timer's siginfo (si_code SI_TIMER), else 0. */
function timerOverrun(info: Uint8Array): number {
  const v = new DataView(info.buffer, info.byteOffset);
  return v.getInt32(8, true) === SI_TIMER ? v.getInt32(20, true) : 0;
}

function refusal(infos: Uint8Array[], where: string): string | undefined {
  const sig = infos.map(signalOf).find((s) => s === SIGKILL || s === SIGSTOP);
  if (sig) return `${where}: pending ${sig === SIGKILL ? "SIGKILL" : "SIGSTOP"}: not supported yet`;
  // A queued copy is an ordinary signal: no timer would count its overruns again.
  const timer = infos.find((i) => timerOverrun(i) !== 0);
  if (timer) {
    return `${where}: pending POSIX timer signal ${signalOf(timer)} with overrun ${
      timerOverrun(timer)
    }: not supported yet`;
  }
}

export const signalsPart = definePart({
  name: "signals",
  maxBytes: MAX_IMAGE_BYTES,
  version: 1,
  schema: SignalsSchema,
  // A signal sent to the frozen tree while the dump went on is pending: keep it.
  dumpAgainLast: true,
  dump({ pid, proc }) {
    const status = readStatus(pid);
    return {
      timers: parseTimers(readProcText(pid, "timers")).map((t) => t.id),
      shared: pendingOf(pid, true, statusHex(status, "ShdPnd")),
      threads: proc.threads.map((tid) => ({
        tid,
        pending: withContext(
          `tid ${tid}`,
          () => pendingOf(tid, false, statusHex(readStatus(pid, tid), "SigPnd")),
        ),
      })).filter((t) => t.pending.length),
    };
  },
  unrestorable({ shared, threads }) {
    return refusal(shared, "process") ??
      threads.map((t) => refusal(t.pending, `tid ${t.tid}`)).find(Boolean);
  },
  restore(ctx, { shared, threads, timers }) {
    const ids = new Set(timers);
    // A live timer's signal is sent again by the timer itself, after the others.
    const fromTimer = (info: Uint8Array) => ids.has(timerIdOf(info) ?? -1);
    const queued = (info: Uint8Array) => !fromTimer(info);
    for (const t of threads) {
      const inj = ctx.threads.get(t.tid);
      if (!inj) throw new AmberError(`tid ${t.tid}: pending signals for a thread not restored`);
      for (const info of t.pending.filter(queued)) {
        const addr = putBytes(ctx.pid, ctx.scratch, info);
        const sig = signalOf(info);
        inj.call(
          `tid ${t.tid}: rt_tgsigqueueinfo(${sig})`,
          NR.rt_tgsigqueueinfo,
          ctx.pid,
          t.tid,
          sig,
          addr,
        );
      }
    }
    for (const info of shared.filter(queued)) {
      const addr = putBytes(ctx.pid, ctx.scratch, info);
      const sig = signalOf(info);
      // Only the leader may forge si_code for its process (its tid is the pid).
      ctx.injector.call(`rt_sigqueueinfo(${sig})`, NR.rt_sigqueueinfo, ctx.pid, sig, addr);
    }
    const expiring = [shared, ...threads.map((t) => t.pending)].flat().filter(fromTimer);
    for (const id of new Set(expiring.map((i) => timerIdOf(i)!))) expireNow(ctx, id);
  },
});
