/**
 * Threads: registers, FPU/AVX state, signal mask, rseq and name of each
 * thread. Restore creates the extra threads with clone3(set_tid) inside the
 * process; the final register state is written by applyThreadState once
 * everything else is in place.
 */
import { z } from "zod";
import { Injector, NR } from "../../ffi/inject.ts";
import * as pt from "../../ffi/ptrace.ts";
import { Regs, USER_REGS_SIZE } from "../../ffi/regs.ts";
import { definePart, type RestoreContext } from "../context.ts";
import { AmberError, withContext } from "../errors.ts";
import { bytes, PID_MAX, pidNumber, u64 } from "../images/codec.ts";
import { readProcText } from "../proc/read.ts";
import { putBytes, putString, u64Bytes } from "../scratch.ts";

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
});
export type ThreadImage = z.output<typeof Thread>;

export function dumpThread(pid: number, tid: number): z.input<typeof Thread> {
  return withContext(`tid ${tid}`, () => ({
    tid,
    comm: readProcText(pid, `task/${tid}/comm`).replace(/\n$/, ""),
    regs: Regs.read(tid).bytes,
    xstate: pt.getRegset(tid, pt.NT_X86_XSTATE, XSTATE_MAX),
    sigmask: pt.getSigmask(tid),
    rseq: pt.getRseqConfig(tid),
  }));
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
  const nr = regs.signed("orig_rax");
  const rax = regs.signed("rax");
  if (nr >= 0n) {
    if ([ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK].includes(rax)) {
      regs.set("rax", nr).set("rip", regs.get("rip") - 2n);
    }
  }
  return regs;
}

/** Writes a thread's final FPU state, registers and signal mask. */
export function applyThreadState(tid: number, img: ThreadImage): void {
  withContext(`tid ${tid}: registers`, () => {
    pt.setRegset(tid, pt.NT_X86_XSTATE, img.xstate);
    resumeRegs(img).write(tid);
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
  version: 1,
  schema: z.object({ threads: z.array(Thread).min(1).max(PID_MAX) }),
  dump: ({ pid, proc }) => ({ threads: proc.threads.map((tid) => dumpThread(pid, tid)) }),
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
      });
    }
  },
});
