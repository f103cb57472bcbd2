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
import { readProcText } from "../proc/read.ts";
import { addressOf, rawSyscall } from "../../ffi/libc.ts";
import { getBytes, putBytes, putString, readU64s, u64Bytes } from "../scratch.ts";

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

/** stack_t { void *ss_sp; int ss_flags; size_t ss_size; } */
function altstack(ctx: DumpContext, inj: Injector): { sp: bigint; flags: number; size: bigint } {
  inj.call("sigaltstack", NR.sigaltstack, 0, ctx.scratch.addr);
  const [sp, flags, size] = readU64s(getBytes(ctx.pid, ctx.scratch, 24));
  return { sp, flags: Number(BigInt.asIntN(32, flags)) & ~SS_ONSTACK, size };
}

function dumpThread(ctx: DumpContext, tid: number, inj: Injector): z.input<typeof Thread> {
  return withContext(`tid ${tid}`, () => ({
    tid,
    comm: readProcText(ctx.pid, `task/${tid}/comm`).replace(/\n$/, ""),
    // Read before the first injected call: begin() blocks every signal.
    regs: Regs.read(tid).bytes,
    xstate: pt.getRegset(tid, pt.NT_X86_XSTATE, XSTATE_MAX),
    sigmask: pt.getSigmask(tid),
    rseq: pt.getRseqConfig(tid),
    clearChildTid: clearChildTid(ctx, inj),
    robustList: robustList(tid),
    altstack: altstack(ctx, inj),
    dumpedAtMs: Date.now(),
    restartOf: restartedCall(tid, Regs.read(tid)),
  }));
}

/** Clocks a relative clock_nanosleep restarts on (CPU clocks are negative). */
const SLEEP_CLOCKS = [0n, 1n, 7n, 8n, 9n, 11n];

function validTimespec(tid: number, addr: bigint): boolean {
  if (addr < 0x1000n) return false;
  try {
    const [sec, nsec] = readU64s(readMemoryProc(tid, addr, 16));
    return BigInt.asIntN(64, sec) >= 0n && nsec < 1_000_000_000n;
  } catch {
    return false; // not mapped: not a timespec
  }
}

/**
 * Whether a register holds a clockid_t clock_nanosleep restarts on: an
 * int (sign- or zero-extended, unlike a pointer), one of SLEEP_CLOCKS or
 * a CPU clock (~pid << 3 | per-thread bit | type 0..2).
 */
function isSleepClock(reg: bigint): boolean {
  const clock = BigInt.asIntN(32, reg);
  if (reg !== BigInt.asUintN(64, clock) && reg !== BigInt.asUintN(32, clock)) return false;
  if (clock >= 0n) return SLEEP_CLOCKS.includes(clock);
  return (clock & 3n) !== 3n && ~(clock >> 3n) <= BigInt(PID_MAX);
}

function u32At(tid: number, addr: bigint): bigint | undefined {
  try {
    const b = readMemoryProc(tid, addr, 4);
    return BigInt(new DataView(b.buffer, b.byteOffset).getUint32(0, true));
  } catch {
    return undefined;
  }
}

/**
 * The call a thread frozen inside restart_syscall (frozen once before,
 * e.g. by a dump -R, and resumed) restarts. The kernel keeps it only in
 * its restart block, which dies with the process, but the registers still
 * hold its arguments, and on x86-64 only four calls restart that way:
 * clock_nanosleep (a clock id, relative, a timespec), futex (a word
 * still holding the awaited value, a timeout), nanosleep (a timespec),
 * poll (what is left). Undefined when not in restart_syscall, or when
 * even poll does not fit (refused).
 */
function restartedCall(tid: number, regs: Regs): number | undefined {
  if (regs.signed("orig_rax") !== BigInt(NR.restart_syscall)) return undefined;
  if (regs.signed("rax") !== ERESTART_RESTARTBLOCK) return undefined;
  const [rdi, rsi, rdx, r10] = (["rdi", "rsi", "rdx", "r10"] as const).map((r) => regs.get(r));
  if (rsi === 0n && isSleepClock(rdi) && validTimespec(tid, rdx)) {
    return NR.clock_nanosleep;
  }
  const op = rsi & ~(128n | 256n); // FUTEX_PRIVATE_FLAG, FUTEX_CLOCK_REALTIME
  if (
    (op === 0n || op === 9n) && rdi % 4n === 0n && validTimespec(tid, r10) &&
    u32At(tid, rdi) === (rdx & 0xffffffffn)
  ) return NR.futex;
  if (validTimespec(tid, rdi) && (rsi === 0n || rsi >= 0x1000n)) return NR.nanosleep;
  if (rsi <= 1n << 20n && (rsi === 0n || rdi >= 0x1000n)) return NR.poll;
  return undefined;
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
const ERESTART_RESTARTBLOCK = -516n;

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
}

/** Clocks whose sleeps run on while the process is only images. */
const WALL_CLOCKS = [0n, 1n, 7n]; // REALTIME, MONOTONIC, BOOTTIME

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

/** Writes a thread's final FPU state, registers and signal mask. */
export function applyThreadState(tid: number, img: ThreadImage): void {
  withContext(`tid ${tid}: registers`, () => {
    pt.setRegset(tid, pt.NT_X86_XSTATE, img.xstate);
    const regs = resumeRegs(img);
    sleepOn(tid, img, regs);
    regs.write(tid);
    pt.setSigmask(tid, img.sigmask);
  });
}

/** Creates thread `tid` in the process of `main` with clone3(set_tid). */
function createThread(ctx: RestoreContext, tid: number): Injector {
  const setTid = putBytes(ctx.pid, ctx.scratch, u64Bytes([tid]), 128);
  const args = u64Bytes([CLONE_THREAD_FLAGS, 0, 0, 0, 0, 0, 0, 0, setTid, 1, 0]);
  const argsAddr = putBytes(ctx.pid, ctx.scratch, args, 0);
  const got = Number(ctx.injector.call("clone3", NR.clone3, argsAddr, args.length));
  if (got !== tid) throw new AmberError(`clone3 made tid ${got}, wanted ${tid}`);
  const st = pt.waitpid(tid);
  if (!st?.stopped) throw new AmberError(`new thread did not stop`);
  return new Injector(tid, ctx.injector.syscallAddr).begin();
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
  async dump(ctx) {
    const threads: z.input<typeof Thread>[] = [];
    await forEachThread(ctx, (tid, inj) => {
      threads.push(dumpThread(ctx, tid, inj));
    });
    return { threads };
  },
  unrestorable: ({ threads }) => threads.map(unresumable).find(Boolean),
  precheck({ threads }, { pid }) {
    if (threads[0].tid !== pid) {
      throw new AmberError(`first thread is ${threads[0].tid}, not the leader`);
    }
  },
  restore(ctx, { threads }) {
    for (const t of threads.slice(1)) {
      ctx.threads.set(t.tid, withContext(`tid ${t.tid}: create`, () => createThread(ctx, t.tid)));
    }
    for (const t of threads) {
      const inj = ctx.threads.get(t.tid)!;
      withContext(`tid ${t.tid}`, () => {
        inj.call("prctl(SET_NAME)", NR.prctl, 15, putString(ctx.pid, ctx.scratch, t.comm));
        if (t.rseq.address) {
          inj.call("rseq", NR.rseq, t.rseq.address, t.rseq.length, 0, t.rseq.signature);
        }
        inj.call("set_tid_address", NR.set_tid_address, t.clearChildTid);
        if (t.robustList.head) {
          inj.call("set_robust_list", NR.set_robust_list, t.robustList.head, t.robustList.length);
        }
        const ss = t.altstack;
        if (!(ss.flags & SS_DISABLE)) {
          const addr = putBytes(
            ctx.pid,
            ctx.scratch,
            u64Bytes([ss.sp, BigInt.asUintN(32, BigInt(ss.flags)), ss.size]),
          );
          inj.call("sigaltstack", NR.sigaltstack, addr, 0);
        }
      });
    }
  },
});
