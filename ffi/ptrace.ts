/** ptrace(2) and waitpid(2), typed. Requests run on the calling (main) thread. */
import { addressOf, check, libc, SysError } from "./libc.ts";

export const PTRACE = {
  PEEKDATA: 2,
  CONT: 7,
  KILL: 8,
  SYSCALL: 24,
  GETREGS: 12,
  SETREGS: 13,
  DETACH: 17,
  SETOPTIONS: 0x4200,
  GETEVENTMSG: 0x4201,
  GETREGSET: 0x4204,
  SETREGSET: 0x4205,
  SEIZE: 0x4206,
  INTERRUPT: 0x4207,
  GETSIGINFO: 0x4202,
  PEEKSIGINFO: 0x4209,
  GETSIGMASK: 0x420a,
  SETSIGMASK: 0x420b,
  GET_RSEQ_CONFIGURATION: 0x420f,
} as const;

export const PTRACE_O = {
  TRACESYSGOOD: 1,
  TRACEFORK: 2,
  TRACEVFORK: 4,
  TRACECLONE: 8,
  EXITKILL: 0x100000,
  SUSPEND_SECCOMP: 0x200000,
} as const;

export const PTRACE_EVENT = { FORK: 1, VFORK: 2, CLONE: 3, EXEC: 4, EXIT: 6, STOP: 128 } as const;

export const NT_PRSTATUS = 1;
export const NT_X86_XSTATE = 0x202;

export const WALL = 0x40000000;
export const WNOHANG = 1;

function ptrace(req: number, tid: number, addr: bigint, data: bigint, what: string): bigint {
  return check(`${what}`, libc().ptrace(BigInt(req), tid, addr, data));
}

export function seize(tid: number, options = 0): void {
  ptrace(PTRACE.SEIZE, tid, 0n, BigInt(options), "ptrace(SEIZE)");
}

export function interrupt(tid: number): void {
  ptrace(PTRACE.INTERRUPT, tid, 0n, 0n, "ptrace(INTERRUPT)");
}

export function detach(tid: number, signal = 0): void {
  ptrace(PTRACE.DETACH, tid, 0n, BigInt(signal), "ptrace(DETACH)");
}

export function cont(tid: number, signal = 0): void {
  ptrace(PTRACE.CONT, tid, 0n, BigInt(signal), "ptrace(CONT)");
}

/** Resumes until the next syscall entry or exit stop. */
export function syscall(tid: number, signal = 0): void {
  ptrace(PTRACE.SYSCALL, tid, 0n, BigInt(signal), "ptrace(SYSCALL)");
}

export function getEventMsg(tid: number): bigint {
  const out = new BigUint64Array(1);
  ptrace(PTRACE.GETEVENTMSG, tid, 0n, addressOf(out), "ptrace(GETEVENTMSG)");
  return out[0];
}

/** Reads a register set into a buffer of `size` bytes; returns the bytes the kernel filled. */
export function getRegset(tid: number, type: number, size: number): Uint8Array {
  const buf = new Uint8Array(size);
  const iov = new BigUint64Array([addressOf(buf), BigInt(size)]);
  ptrace(PTRACE.GETREGSET, tid, BigInt(type), addressOf(iov), `ptrace(GETREGSET ${type})`);
  return buf.slice(0, Number(iov[1]));
}

export function setRegset(tid: number, type: number, data: Uint8Array): void {
  const buf = data.slice();
  const iov = new BigUint64Array([addressOf(buf), BigInt(buf.length)]);
  ptrace(PTRACE.SETREGSET, tid, BigInt(type), addressOf(iov), `ptrace(SETREGSET ${type})`);
}

export function getSigmask(tid: number): bigint {
  const out = new BigUint64Array(1);
  ptrace(PTRACE.GETSIGMASK, tid, 8n, addressOf(out), "ptrace(GETSIGMASK)");
  return out[0];
}

export function setSigmask(tid: number, mask: bigint): void {
  const buf = new BigUint64Array([mask]);
  ptrace(PTRACE.SETSIGMASK, tid, 8n, addressOf(buf), "ptrace(SETSIGMASK)");
}

/** Size of a siginfo_t as the kernel copies it out. */
export const SIGINFO_SIZE = 128;
const PEEKSIGINFO_SHARED = 1;
const PEEK_BATCH = 32;

/**
 * The siginfo of every signal queued to a stopped tracee, oldest first:
 * its own queue, or (shared) its process's.
 */
export function peekSiginfo(tid: number, shared: boolean): Uint8Array[] {
  const out: Uint8Array[] = [];
  const buf = new Uint8Array(SIGINFO_SIZE * PEEK_BATCH);
  // struct ptrace_peeksiginfo_args { u64 off; u32 flags; s32 nr; }
  const args = new BigUint64Array(2);
  const view = new DataView(args.buffer);
  for (;;) {
    args[0] = BigInt(out.length);
    view.setUint32(8, shared ? PEEKSIGINFO_SHARED : 0, true);
    view.setInt32(12, PEEK_BATCH, true);
    const n = Number(
      ptrace(PTRACE.PEEKSIGINFO, tid, addressOf(args), addressOf(buf), "ptrace(PEEKSIGINFO)"),
    );
    for (let i = 0; i < n; i++) out.push(buf.slice(i * SIGINFO_SIZE, (i + 1) * SIGINFO_SIZE));
    if (n < PEEK_BATCH) return out;
  }
}

/** The siginfo of the signal a tracee is stopped delivering. */
export function getSiginfo(tid: number): Uint8Array {
  const buf = new Uint8Array(SIGINFO_SIZE);
  ptrace(PTRACE.GETSIGINFO, tid, 0n, addressOf(buf), "ptrace(GETSIGINFO)");
  return buf;
}

/** rseq registration of a thread: zero address when it has none. */
export interface RseqConfig {
  address: bigint;
  length: number;
  flags: number;
  signature: number;
}

export function getRseqConfig(tid: number): RseqConfig {
  const buf = new BigUint64Array(3);
  ptrace(PTRACE.GET_RSEQ_CONFIGURATION, tid, 24n, addressOf(buf), "ptrace(GET_RSEQ_CONFIGURATION)");
  const v = new DataView(buf.buffer);
  return {
    address: buf[0],
    length: v.getUint32(8, true),
    signature: v.getUint32(12, true),
    flags: v.getUint32(16, true),
  };
}

/** A decoded waitpid status. */
export interface WaitStatus {
  pid: number;
  raw: number;
  exited: boolean;
  exitCode: number;
  signaled: boolean;
  termSignal: number;
  stopped: boolean;
  stopSignal: number;
  /** PTRACE_EVENT_* for ptrace event stops, else 0. */
  event: number;
}

export function decodeStatus(pid: number, raw: number): WaitStatus {
  const stopped = (raw & 0xff) === 0x7f;
  const exited = (raw & 0x7f) === 0;
  return {
    pid,
    raw,
    exited,
    exitCode: (raw >> 8) & 0xff,
    signaled: !exited && !stopped,
    termSignal: raw & 0x7f,
    stopped,
    stopSignal: stopped ? (raw >> 8) & 0xff : 0,
    event: stopped ? (raw >> 16) & 0xff : 0,
  };
}

/** waitpid on the calling thread (blocks it unless WNOHANG). Null when WNOHANG found nothing. */
export function waitpid(pid: number, options = WALL): WaitStatus | null {
  const status = new Int32Array(1);
  for (;;) {
    const r = libc().waitpid(pid, status, options);
    if (r === -1) {
      try {
        check("waitpid", r);
      } catch (e) {
        if (e instanceof SysError && e.code === "EINTR") continue;
        throw e;
      }
    }
    return r === 0 ? null : decodeStatus(r, status[0]);
  }
}

/** waitpid on a pool thread, so the event loop keeps running while it blocks. */
export async function waitpidAsync(pid: number, options = WALL): Promise<WaitStatus> {
  const status = new Int32Array(1);
  for (;;) {
    const r = await libc().waitpid_async(pid, status, options);
    if (r >= 0) return decodeStatus(r, status[0]);
    // errno of a pool thread is not readable from here; ECHILD is the only
    // failure that does not resolve itself.
    if (!(await pidExists(pid))) throw new SysError("waitpid", 10);
  }
}

async function pidExists(pid: number): Promise<boolean> {
  try {
    await Deno.stat(`/proc/${pid}`);
    return true;
  } catch {
    return false;
  }
}
