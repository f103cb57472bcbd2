/**
 * Threads: registers, FPU/AVX state, signal mask, rseq, name,
 * clear_child_tid, robust futex list and sigaltstack of each thread. Restore creates the extra threads with clone3(set_tid) inside the
 * process; the final register state is written by applyThreadState once
 * everything else is in place.
 */
import { z } from "zod";
import { Injector, NR } from "../../ffi/inject.ts";
import * as pt from "../../ffi/ptrace.ts";
import { Regs, USER_REGS_SIZE } from "../../ffi/regs.ts";
import { readMemoryProc, writeMemory } from "../../ffi/memory.ts";
import { definePart, type DumpContext, type RestoreContext } from "../context.ts";
import { AmberError, withContext } from "../errors.ts";
import { bytes, MAX_IMAGE_BYTES, PID_MAX, pidNumber, u64 } from "../images/codec.ts";
import {
  argsOf,
  enterSleep,
  ERESTART_RESTARTBLOCK,
  leftAt,
  relativeSleep,
  restartedCall,
  shortenSleep,
  type SleepDeadline,
  WALL_CLOCKS,
} from "./sleeps.ts";
import { readProcText } from "../proc/read.ts";
import { addressOf, rawSyscall, SysError } from "../../ffi/libc.ts";
import { threadAttrQuery } from "./prctl.ts";
import { getBytes, putBytes, putString, readU64s, u64Bytes } from "../scratch.ts";
import { type BatchRun, batchTableBytes, type Syscall, withBatch } from "../batch.ts";

/** Big enough for any xsave layout; the kernel reports the real size. */
const XSTATE_MAX = 64 * 1024;

const Thread = z.object({
  tid: pidNumber,
  comm: z.string().max(16),
  regs: bytes.refine(
    (b) => b.length === USER_REGS_SIZE,
    `registers must be ${USER_REGS_SIZE} bytes`,
  ),
  xstate: bytes.refine((b) => b.length >= 512 && b.length <= XSTATE_MAX, "bad xstate size"),
  sigmask: u64,
  rseq: z.object({
    address: u64,
    // u32 arguments of rseq(2).
    length: z.number().int().min(0).max(0xffffffff),
    flags: z.number().int().min(0).max(0xffffffff),
    signature: z.number().int().min(0).max(0xffffffff),
  }),
  /** The word the kernel clears (and futex-wakes) when the thread exits: pthread_join waits on it. */
  clearChildTid: u64,
  robustList: z.object({ head: u64, length: u64 }),
  /** stack_t of sigaltstack; flags without SS_ONSTACK, which the kernel derives from rsp. */
  altstack: z.object({ sp: u64, flags: z.number().int(), size: u64 }),
  /** Wall time of the dump (ms since the epoch), for sleeps to end at their deadline. */
  dumpedAtMs: z.number(),
  /** Frozen inside restart_syscall: the call it restarts (see restartedCall). */
  restartOf: z.number().int().optional(),
  /**
   * Frozen in a relative sleep without a remaining-time buffer whose
   * deadline dump saw (lib/task/sleeps.ts): ns left at dumpedAtMs.
   */
  sleepLeftNs: u64.optional(),
});
export type ThreadImage = z.output<typeof Thread>;

const PR_GET_TID_ADDRESS = 40;

/**
 * Runs fn with an injector on each thread of the process, leader first.
 * Other threads are begun and ended one at a time, so no thread stays in
 * an injected state longer than its own calls.
 */
export async function forEachThread(
  ctx: DumpContext,
  fn: (tid: number, inj: Injector) => void | Promise<void>,
): Promise<void> {
  for (const tid of ctx.proc.threads) {
    if (tid === ctx.pid) {
      await fn(tid, ctx.injector);
      continue;
    }
    const inj = new Injector(tid, ctx.injector.syscallAddr, ctx.injector.options);
    try {
      await fn(tid, inj);
    } finally {
      inj.end();
    }
  }
}

/** Only the thread itself can read its clear_child_tid: prctl(PR_GET_TID_ADDRESS). */
function clearChildTid(ctx: DumpContext, inj: Injector): bigint {
  inj.call("prctl(GET_TID_ADDRESS)", NR.prctl, PR_GET_TID_ADDRESS, ctx.scratch.addr);
  return readU64s(getBytes(ctx.pid, ctx.scratch, 8))[0];
}

/** get_robust_list works from outside on any thread amber may ptrace. */
function robustList(tid: number): { head: bigint; length: bigint } {
  const out = new BigUint64Array(2);
  const addr = (i: number) => addressOf(out) + BigInt(i * 8);
  rawSyscall("get_robust_list", NR.get_robust_list, tid, addr(0), addr(1));
  return { head: out[0], length: out[1] };
}

const SS_ONSTACK = 1, SS_DISABLE = 2;

type Altstack = { sp: bigint; flags: number; size: bigint };

/** stack_t { void *ss_sp; int ss_flags; size_t ss_size; } */
function stackOf([sp, flags, size]: bigint[]): Altstack {
  return { sp, flags: Number(BigInt.asIntN(32, flags)) & ~SS_ONSTACK, size };
}

function altstack(ctx: DumpContext, inj: Injector): Altstack {
  inj.call("sigaltstack", NR.sigaltstack, 0, ctx.scratch.addr);
  return stackOf(readU64s(getBytes(ctx.pid, ctx.scratch, 24)));
}

/** What only the thread itself can tell, asked one call at a time (no batch here). */
function askedOneByOne(ctx: DumpContext, inj: Injector) {
  return { clearChildTid: clearChildTid(ctx, inj), altstack: altstack(ctx, inj) };
}

/**
 * The same in one batch (one stop instead of four), with prctl's
 * attributes of the thread when it is not the leader (whose prctl asks
 * with the process's): the table, then clear_child_tid (8 bytes), the
 * stack_t (24) and prctl's ints after it.
 */
function askedInBatch(ctx: DumpContext, tid: number, inj: Injector, run: BatchRun) {
  const prctlCalls = tid === ctx.pid ? 0 : threadAttrQuery(0n).calls.length;
  const base = batchTableBytes(2 + prctlCalls);
  const at = (offset: number) => ctx.scratch.addr + BigInt(base + offset);
  const query = prctlCalls ? threadAttrQuery(at(32)) : undefined;
  const results = run([
    [NR.prctl, PR_GET_TID_ADDRESS, at(0)],
    [NR.sigaltstack, 0, at(8)],
    ...(query?.calls ?? []),
  ]);
  const [tidAddress, stack] = results;
  const failed = (r: bigint) => r < 0n && r > -4096n;
  if (failed(tidAddress)) throw new SysError("prctl(GET_TID_ADDRESS)", Number(-tidAddress));
  if (failed(stack)) throw new SysError("sigaltstack", Number(-stack));
  const bytes = getBytes(ctx.pid, ctx.scratch, 32 + (query?.bytes ?? 0), base);
  if (query) {
    try {
      const t = { pid: ctx.pid, inj, scratch: ctx.scratch };
      const values = query.values(t, results.slice(2), bytes.subarray(32));
      (ctx.threadAttrs ??= new Map()).set(tid, values);
    } catch { /* prctl asks the thread again itself, and names what failed */ }
  }
  const out = readU64s(bytes.subarray(0, 32));
  return { clearChildTid: out[0], altstack: stackOf(out.slice(1)) };
}

function dumpThread(
  ctx: DumpContext,
  tid: number,
  inj: Injector,
  run?: BatchRun,
): z.input<typeof Thread> {
  return withContext(`tid ${tid}`, () => {
    // Read before the first injected call: begin() blocks every signal.
    const regs = Regs.read(tid);
    const own = {
      tid,
      comm: readProcText(ctx.pid, `task/${tid}/comm`).replace(/\n$/, ""),
      regs: regs.bytes,
      xstate: pt.getRegset(tid, pt.NT_X86_XSTATE, XSTATE_MAX),
      sigmask: pt.getSigmask(tid),
      rseq: pt.getRseqConfig(tid),
      // (From the registers as frozen: another thread's stay injected until it is ended.)
      restartOf: restartedCall(tid, regs),
    };
    const asked = run ? askedInBatch(ctx, tid, inj, run) : askedOneByOne(ctx, inj);
    return {
      ...own,
      clearChildTid: asked.clearChildTid,
      robustList: robustList(tid),
      altstack: asked.altstack,
      ...sleepTimes(ctx.proc.sleeps.get(tid)),
    };
  });
}

/** The dump's wall time, and what the thread's sleep has left then, read together. */
function sleepTimes(deadline: SleepDeadline | undefined) {
  const left = deadline && leftAt(deadline, performance.now());
  return { dumpedAtMs: Date.now(), ...(left !== undefined ? { sleepLeftNs: left } : {}) };
}

/** Size of this CPU's xsave area as the kernel exposes it to ptrace. */
export function xstateSize(tid: number): number {
  return pt.getRegset(tid, pt.NT_X86_XSTATE, XSTATE_MAX).length;
}

/** The xsave features (XCR0) in use: the first 8 bytes of sw_reserved (offset 464). */
export function xfeatures(tid: number): bigint {
  const x = pt.getRegset(tid, pt.NT_X86_XSTATE, XSTATE_MAX);
  return new DataView(x.buffer, x.byteOffset).getBigUint64(464, true);
}

const CLONE_THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000;
const ERESTARTSYS = -512n, ERESTARTNOINTR = -513n, ERESTARTNOHAND = -514n;

/**
 * The registers a thread must resume with. A thread frozen inside an
 * interruptible syscall re-executes it, as the kernel does after a signal
 * without handler. For -ERESTART_RESTARTBLOCK the kernel would call
 * restart_syscall, whose saved state (e.g. a sleep's deadline) died with
 * the old process, so the original syscall is re-run instead.
 */
export function resumeRegs(img: ThreadImage): Regs {
  const regs = new Regs(img.regs);
  const nr = syscallOf(img);
  const rax = regs.signed("rax");
  if (nr >= 0n) {
    if ([ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK].includes(rax)) {
      regs.set("rax", nr).set("rip", regs.get("rip") - 2n);
    }
  }
  return regs;
}

/** The call a thread was frozen in; for restart_syscall, the call it restarts. */
function syscallOf(img: ThreadImage): bigint {
  const nr = new Regs(img.regs).signed("orig_rax");
  return nr === BigInt(NR.restart_syscall) && img.restartOf !== undefined
    ? BigInt(img.restartOf)
    : nr;
}

/** Why a thread's frozen call cannot be resumed, if it cannot. */
function unresumable(img: ThreadImage): string | undefined {
  const regs = new Regs(img.regs);
  if (
    regs.signed("orig_rax") === BigInt(NR.restart_syscall) &&
    regs.signed("rax") === ERESTART_RESTARTBLOCK &&
    img.restartOf === undefined
  ) {
    return `tid ${img.tid}: restart_syscall of a call amber cannot tell: not supported yet`;
  }
  const inSleep = regs.signed("rax") === ERESTART_RESTARTBLOCK &&
    relativeSleep(syscallOf(img), argsOf(regs));
  if (img.sleepLeftNs !== undefined && !inSleep) {
    return `tid ${img.tid}: a sleep's time left for a thread in no relative sleep (bad image)`;
  }
}

/**
 * A relative sleep frozen with a remaining-time buffer: the kernel wrote
 * the time left into it when amber froze the thread. Re-running the call
 * on that buffer, less the time since the dump, ends the sleep at its
 * original deadline instead of sleeping its whole length again. Only the
 * request pointer register changes (callers do not rely on it: glibc's
 * wrappers do not, and it is caller-saved across the C call). Returns
 * the register holding the request to repoint, if this is such a sleep.
 */
function resumableSleep(
  regs: Regs,
  nr: bigint,
): { req: "rdi" | "rdx"; rem: bigint; wall: boolean } | undefined {
  if (regs.signed("rax") !== ERESTART_RESTARTBLOCK) return undefined;
  if (nr === BigInt(NR.nanosleep) && regs.get("rsi")) {
    return { req: "rdi", rem: regs.get("rsi"), wall: true };
  }
  if (nr === BigInt(NR.clock_nanosleep) && regs.get("rsi") === 0n && regs.get("r10")) {
    return { req: "rdx", rem: regs.get("r10"), wall: WALL_CLOCKS.includes(regs.get("rdi")) };
  }
  return undefined;
}

/** Shortens a frozen sleep's remaining time by the time since the dump; see resumableSleep. */
function sleepOn(tid: number, img: ThreadImage, regs: Regs): void {
  const sleep = resumableSleep(new Regs(img.regs), syscallOf(img));
  if (!sleep) return;
  const [sec, nsec] = readU64s(readMemoryProc(tid, sleep.rem, 16));
  const since = sleep.wall ? BigInt(Math.max(0, Date.now() - img.dumpedAtMs)) * 1_000_000n : 0n;
  let left = sec * 1_000_000_000n + nsec - since;
  if (left < 0n) left = 0n;
  writeMemory(tid, sleep.rem, u64Bytes([left / 1_000_000_000n, left % 1_000_000_000n]));
  regs.set(sleep.req, sleep.rem);
}

/**
 * A sleep without a buffer whose deadline dump saw re-runs for what it
 * had left less the time since the dump; see shortenSleep. Returns the
 * registers to fall back to if the thread must be stepped into the call.
 */
function sleepLeft(tid: number, img: ThreadImage, regs: Regs): Regs | undefined {
  if (img.sleepLeftNs === undefined) return undefined;
  // Date.now() moves in whole ms: one less counts, so as never to end early.
  const since = BigInt(Math.max(0, Date.now() - img.dumpedAtMs - 1)) * 1_000_000n;
  return shortenSleep(tid, syscallOf(img), regs, img.sleepLeftNs - since);
}

/**
 * Writes a thread's final FPU state, registers and signal mask. Returns
 * the registers to fall back to when the thread must be stepped into its
 * sleep as it is let go (detachThread).
 */
export function applyThreadState(tid: number, img: ThreadImage): Regs | undefined {
  return withContext(`tid ${tid}: registers`, () => {
    pt.setRegset(tid, pt.NT_X86_XSTATE, img.xstate);
    const regs = resumeRegs(img);
    sleepOn(tid, img, regs);
    const fallback = sleepLeft(tid, img, regs);
    regs.write(tid);
    pt.setSigmask(tid, img.sigmask);
    return fallback;
  });
}

/**
 * Lets a restored thread run. One whose sleep's new timeout lies in its
 * memory is first stepped into the call (enterSleep): only here, once
 * nothing can fail any more, as a thread inside a call can no longer be
 * made to run an injected one (a failed restore still reaps with those).
 */
export function detachThread(tid: number, intoSleep?: Regs): void {
  const signal = intoSleep ? enterSleep(tid, intoSleep) : 0;
  if (signal !== undefined) pt.detach(tid, signal);
}

/** Creates thread `tid` in the process of `main` with clone3(set_tid). */
function createThread(ctx: RestoreContext, tid: number): Injector {
  const setTid = putBytes(ctx.pid, ctx.scratch, u64Bytes([tid]), 128);
  const args = u64Bytes([CLONE_THREAD_FLAGS, 0, 0, 0, 0, 0, 0, 0, setTid, 1, 0]);
  const argsAddr = putBytes(ctx.pid, ctx.scratch, args, 0);
  const got = Number(ctx.injector.call("clone3", NR.clone3, argsAddr, args.length));
  if (got !== tid) throw new AmberError(`clone3 made tid ${got}, wanted ${tid}`);
  return threadStarted(ctx, tid);
}

/** The new thread's first stop; its injector (with the leader's options). */
function threadStarted(ctx: RestoreContext, tid: number): Injector {
  const st = pt.waitpid(tid);
  if (!st?.stopped) throw new AmberError(`new thread did not stop`);
  return new Injector(tid, ctx.injector.syscallAddr, ctx.injector.options).begin();
}

/** Bytes of clone_args (88) and its set_tid array (8), per thread in a batch. */
const CLONE_ROOM = 96;

/** Threads created per batch: their table and clone_args fit a 64 KiB scratch area. */
const CLONES_PER_BATCH = 64;

/** Creates the threads `tids` with clone3(set_tid), many per batch where batching works. */
function createThreads(ctx: RestoreContext, tids: number[], run?: BatchRun): void {
  if (!run) {
    for (const tid of tids) {
      ctx.threads.set(tid, withContext(`tid ${tid}: create`, () => createThread(ctx, tid)));
    }
    return;
  }
  for (let i = 0; i < tids.length; i += CLONES_PER_BATCH) {
    const chunk = tids.slice(i, i + CLONES_PER_BATCH);
    const base = batchTableBytes(chunk.length);
    const calls = chunk.map((tid, j): Syscall => {
      const at = base + j * CLONE_ROOM;
      const setTid = putBytes(ctx.pid, ctx.scratch, u64Bytes([tid]), at + 88);
      const args = u64Bytes([CLONE_THREAD_FLAGS, 0, 0, 0, 0, 0, 0, 0, setTid, 1, 0]);
      return [NR.clone3, putBytes(ctx.pid, ctx.scratch, args, at), args.length];
    });
    const got = run(calls);
    chunk.forEach((tid, j) => {
      withContext(`tid ${tid}: create`, () => {
        const r = got[j];
        if (r < 0n && r > -4096n) throw new SysError("clone3", Number(-r));
        if (Number(r) !== tid) throw new AmberError(`clone3 made tid ${r}, wanted ${tid}`);
        ctx.threads.set(tid, threadStarted(ctx, tid));
      });
    });
  }
}

/** The calls that give a new thread its own attributes, with what each is named in errors. */
function threadCalls(ctx: RestoreContext, t: ThreadImage, room: number): [string, Syscall][] {
  const calls: [string, Syscall][] = [
    ["prctl(SET_NAME)", [NR.prctl, 15, putString(ctx.pid, ctx.scratch, t.comm, room)]],
  ];
  if (t.rseq.address) {
    calls.push(["rseq", [NR.rseq, t.rseq.address, t.rseq.length, 0, t.rseq.signature]]);
  }
  calls.push(["set_tid_address", [NR.set_tid_address, t.clearChildTid]]);
  if (t.robustList.head) {
    calls.push(["set_robust_list", [NR.set_robust_list, t.robustList.head, t.robustList.length]]);
  }
  const ss = t.altstack;
  if (!(ss.flags & SS_DISABLE)) {
    const stack = u64Bytes([ss.sp, BigInt.asUintN(32, BigInt(ss.flags)), ss.size]);
    const addr = putBytes(ctx.pid, ctx.scratch, stack, room + 32);
    calls.push(["sigaltstack", [NR.sigaltstack, addr, 0]]);
  }
  return calls;
}

/** Room the table of threadCalls takes at the start of the scratch area. */
const THREAD_TABLE = batchTableBytes(8);

/** A thread's own attributes: in one batch where it works, else one call at a time. */
function setUpThread(ctx: RestoreContext, inj: Injector, t: ThreadImage, run?: BatchRun): void {
  const calls = threadCalls(ctx, t, THREAD_TABLE);
  if (!run) {
    for (const [name, call] of calls) inj.call(name, ...call);
    return;
  }
  run(calls.map(([, call]) => call)).forEach((r, i) => {
    if (r < 0n && r > -4096n) throw new SysError(calls[i][0], Number(-r));
  });
}

/** Why a threads image disagrees with its process's pstree thread list, if it does. */
export function checkThreadList(pstree: number[], image: unknown): string | undefined {
  const tids = (image as { threads: ThreadImage[] }).threads.map((t) => t.tid);
  if (tids.length !== pstree.length || tids.some((t, i) => t !== pstree[i])) {
    return `threads ${tids.slice(0, 8).join(",")} are not pstree's ${pstree.slice(0, 8).join(",")}`;
  }
}

export const threadsPart = definePart({
  name: "threads",
  maxBytes: MAX_IMAGE_BYTES,
  version: 2,
  schema: z.object({ threads: z.array(Thread).min(1).max(PID_MAX) }),
  dump(ctx) {
    // Two calls only each thread can make: one batch a thread instead of
    // four stops (a process of 100 threads spent most of this part there).
    return withBatch(ctx, (run, batchOn) => {
      const threads = ctx.proc.threads.map((tid) => {
        if (tid === ctx.pid) return dumpThread(ctx, tid, ctx.injector, run);
        // It may rest at the batch's trap: it is always ended right after.
        const inj = new Injector(tid, ctx.injector.syscallAddr, { restAtTrap: true });
        try {
          return dumpThread(ctx, tid, inj, batchOn?.(inj));
        } finally {
          inj.end();
        }
      });
      return { threads };
    });
  },
  unrestorable: ({ threads }) => threads.map(unresumable).find(Boolean),
  precheck({ threads }, { pid }) {
    if (threads[0].tid !== pid) {
      throw new AmberError(`first thread is ${threads[0].tid}, not the leader`);
    }
  },
  restore(ctx, { threads }) {
    // Two stops a call otherwise: one batch creates the threads, one a thread sets it up.
    withBatch(ctx, (run, batchOn) => {
      createThreads(ctx, threads.slice(1).map((t) => t.tid), run);
      for (const t of threads) {
        const inj = ctx.threads.get(t.tid)!;
        withContext(`tid ${t.tid}`, () => setUpThread(ctx, inj, t, batchOn?.(inj)));
      }
    });
  },
});
