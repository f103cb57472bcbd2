/**
 * Syscall injection: make a stopped tracee execute one system call of our
 * choosing, without touching its memory. We point rip at a `syscall`
 * instruction that already exists in its [vdso] and let it run to the
 * syscall's entry and exit stops (PTRACE_SYSCALL). Single-stepping would
 * end each call with a forced SIGTRAP, which the kernel turns into
 * SIG_DFL when SIGTRAP is blocked or ignored: the target's own SIGTRAP
 * handler would be lost.
 */
import { libc, SysError } from "./libc.ts";
import { readMemoryProc, writeMemory } from "./memory.ts";
import * as pt from "./ptrace.ts";
import { Regs } from "./regs.ts";

const SIGTRAP = 5, SIGSTOP = 19;
/** A syscall stop's signal with PTRACE_O_TRACESYSGOOD. */
export const SYSCALL_STOP = SIGTRAP | 0x80;
const ALL_SIGNALS = (1n << 64n) - 1n;

/** Offset of the first `syscall` (0f 05) instruction in a vdso image. */
export function findSyscallInstruction(code: Uint8Array): number {
  for (let i = 0; i + 1 < code.length; i++) {
    if (code[i] === 0x0f && code[i + 1] === 0x05) return i;
  }
  throw new Error("[vdso]: no syscall instruction found");
}

/** Finds the [vdso] of a process and a syscall instruction inside it. */
export function vdsoSyscallAddress(pid: number): bigint {
  const maps = Deno.readTextFileSync(`/proc/${pid}/maps`);
  const line = maps.split("\n").find((l) => l.endsWith("[vdso]"));
  if (!line) throw new Error(`pid ${pid}: no [vdso] mapping`);
  const [start, end] = line.split(" ")[0].split("-").map((h) => BigInt("0x" + h));
  const code = readMemoryProc(pid, start, Number(end - start));
  return start + BigInt(findSyscallInstruction(code));
}

/**
 * Machine code that runs a table of syscalls in one go: rbx points at
 * `count` (r12) entries of 8 u64s — nr, six arguments, and the result the
 * code stores — and an int3 ends it. rbx and r12 survive syscalls.
 */
export const BATCH_CODE = new Uint8Array(
  [
    [0x4d, 0x85, 0xe4], // loop: test r12, r12
    [0x74, 0x2a], // jz done
    [0x48, 0x8b, 0x03], // mov rax, [rbx]
    [0x48, 0x8b, 0x7b, 0x08], // mov rdi, [rbx+8]
    [0x48, 0x8b, 0x73, 0x10], // mov rsi, [rbx+16]
    [0x48, 0x8b, 0x53, 0x18], // mov rdx, [rbx+24]
    [0x4c, 0x8b, 0x53, 0x20], // mov r10, [rbx+32]
    [0x4c, 0x8b, 0x43, 0x28], // mov r8, [rbx+40]
    [0x4c, 0x8b, 0x4b, 0x30], // mov r9, [rbx+48]
    [0x0f, 0x05], // syscall
    [0x48, 0x89, 0x43, 0x38], // mov [rbx+56], rax
    [0x48, 0x83, 0xc3, 0x40], // add rbx, 64
    [0x49, 0xff, 0xcc], // dec r12
    [0xeb, 0xd1], // jmp loop
    [0xcc], // done: int3
  ].flat(),
);
/** Bytes per BATCH_CODE table entry. */
export const BATCH_ENTRY = 64;

/** A child created while a syscall ran (clone/fork events). */
export interface ForkEvent {
  event: number;
  child: number;
}

export interface InjectorOptions {
  /**
   * Put the thread's own registers and mask back after every call, so that
   * if amber dies the thread is never left in an injected state for longer
   * than one syscall. It stays in the call's syscall-exit stop: a tracer's
   * exit detaches it with TIF_SIGPENDING set (__ptrace_unlink), so on its
   * way out the kernel restarts an interrupted syscall exactly as it would
   * from the freeze's stop (tests/perf_test.ts kills amber there). end()
   * takes it back to a stop like the freeze's. For threads of a dumped
   * tree, which must survive amber.
   */
  restoreAfterEachCall?: boolean;
  /**
   * After a batch the thread may wait at the trap's stop (two stops fewer):
   * the next call resumes it from there, and end()'s interrupt stops it
   * inside signal handling as the freeze did. For a dump's other threads,
   * which are always ended, never let go from that stop.
   */
  restAtTrap?: boolean;
}

/**
 * Runs syscalls inside a stopped, seized thread (seized with
 * PTRACE_O_TRACESYSGOOD). `begin` saves its state and blocks every signal
 * so none can preempt an injected call; `end` puts the registers and
 * signal mask back exactly as they were and stops the thread where the
 * freeze had stopped it, so the kernel's syscall-restart logic still runs
 * when it resumes.
 */
export class Injector {
  private saved?: Regs;
  private savedMask = 0n;
  /** The thread has left its original stop for an injected call. */
  private moved = false;
  /** Children reported by the last call (clone3, fork). */
  forks: ForkEvent[] = [];

  constructor(
    readonly tid: number,
    public syscallAddr: bigint,
    readonly options: InjectorOptions = {},
  ) {}

  static forThread(tid: number, pid = tid, options: InjectorOptions = {}): Injector {
    return new Injector(tid, vdsoSyscallAddress(pid), options);
  }

  begin(): this {
    this.saved = Regs.read(this.tid);
    this.savedMask = pt.getSigmask(this.tid);
    pt.setSigmask(this.tid, ALL_SIGNALS);
    return this;
  }

  /** The registers as they were at begin(). */
  get savedRegs(): Regs {
    if (!this.saved) throw new Error("injector: begin() not called");
    return this.saved;
  }

  get savedSigmask(): bigint {
    return this.savedMask;
  }

  end(): void {
    if (!this.saved) return;
    this.saved.write(this.tid);
    pt.setSigmask(this.tid, this.savedMask);
    this.saved = undefined;
    if (this.moved) this.stopAgain();
  }

  /**
   * From a syscall-exit stop back to a PTRACE_EVENT_STOP inside signal
   * handling, where the freeze left the thread: only from there does the
   * kernel restart a syscall the thread was in (-ERESTARTSYS...) when it
   * resumes.
   */
  private stopAgain(): void {
    pt.interrupt(this.tid);
    pt.cont(this.tid);
    for (;;) {
      const st = this.wait();
      if (st.event === pt.PTRACE_EVENT.STOP) break;
      // A signal that became deliverable with the mask put back: the
      // trap comes first, the signal stays queued for when the tree runs.
      this.passOver(st);
      pt.cont(this.tid);
    }
    this.moved = false;
    this.giveBackStop();
  }

  /** A SIGSTOP (never blocked) taken at a stop amber passes over; see giveBackStop. */
  private stopTaken = false;

  private passOver(st: pt.WaitStatus): void {
    if (st.event === 0 && st.stopSignal === SIGSTOP) this.stopTaken = true;
  }

  /**
   * Sends the thread's process again a SIGSTOP that arrived while amber
   * moved the thread for an injected call: resuming past its delivery stop
   * took it, and the tree must still stop (and a dump see it pending).
   */
  private giveBackStop(): void {
    if (!this.stopTaken) return;
    this.stopTaken = false;
    let tgid = this.tid;
    try {
      tgid = Number(/^Tgid:\s*(\d+)/m.exec(Deno.readTextFileSync(`/proc/${this.tid}/status`))![1]);
    } catch { /* gone: nothing to stop */ }
    libc().kill(tgid, SIGSTOP);
  }

  private wait(): pt.WaitStatus {
    const st = pt.waitpid(this.tid);
    if (!st || !st.stopped) {
      throw new SysError(`thread ${this.tid} ended during an injected syscall`, 3);
    }
    return st;
  }

  /** Resumes to the next syscall stop, noting fork/clone events on the way. */
  private toSyscallStop(): void {
    pt.syscall(this.tid);
    for (;;) {
      const st = this.wait();
      if (st.stopSignal === SYSCALL_STOP && st.event === 0) return;
      if (st.event === pt.PTRACE_EVENT.FORK || st.event === pt.PTRACE_EVENT.CLONE) {
        this.forks.push({ event: st.event, child: Number(pt.getEventMsg(this.tid)) });
      }
      // Any other stop (a group stop, a signal that cannot be blocked) is
      // passed over: the syscall has not finished yet.
      this.passOver(st);
      pt.syscall(this.tid);
    }
  }

  /** Runs syscall `nr`; returns rax as the kernel left it (-errno on failure). */
  raw(nr: number, ...args: (number | bigint)[]): bigint {
    if (!this.saved) this.begin();
    else if (this.options.restoreAfterEachCall) pt.setSigmask(this.tid, ALL_SIGNALS);
    const regs = this.savedRegs.clone();
    const argRegs = ["rdi", "rsi", "rdx", "r10", "r8", "r9"] as const;
    argRegs.forEach((r, i) => regs.set(r, args[i] ?? 0));
    regs.set("rax", nr).set("orig_rax", -1n).set("rip", this.syscallAddr);
    regs.write(this.tid);
    this.forks = [];
    this.moved = true;
    this.toSyscallStop(); // entry
    this.toSyscallStop(); // exit
    this.giveBackStop();
    const result = Regs.read(this.tid).signed("rax");
    // Cheaper than end() after each call (no interrupt, cont and wait), and as safe.
    if (this.options.restoreAfterEachCall) {
      this.savedRegs.write(this.tid);
      pt.setSigmask(this.tid, this.savedMask);
    }
    return result;
  }

  /**
   * Runs BATCH_CODE, placed at `code`, over the `count` entries at
   * `table`: many syscalls for one stop instead of two each. The int3 that
   * ends it raises a SIGTRAP, which the kernel would reset to SIG_DFL if
   * it were blocked or ignored, so it stays unblocked (the caller must not
   * batch where SIGTRAP is ignored); amber takes it at its delivery stop
   * and never lets it through. A SIGTRAP from elsewhere that comes first
   * is queued again (from `tgid`, by the thread itself) afterwards. The
   * thread then runs one plain call, so it waits in a syscall-exit stop
   * like after any other injected call (see restoreAfterEachCall), unless
   * it may rest at the trap (restAtTrap).
   */
  runBatch(tgid: number, code: bigint, table: bigint, count: number): void {
    if (!this.saved) this.begin();
    const end = code + BigInt(BATCH_CODE.length);
    const regs = this.savedRegs.clone();
    regs.set("rbx", table).set("r12", count).set("orig_rax", -1n).set("rip", code);
    regs.write(this.tid);
    pt.setSigmask(this.tid, ALL_SIGNALS & ~(1n << BigInt(SIGTRAP - 1)));
    this.moved = true;
    let foreign: Uint8Array | undefined; // (SIGTRAP is not real-time: one at most)
    pt.cont(this.tid);
    for (;;) {
      const st = this.wait();
      if (st.stopSignal === SIGTRAP && st.event === 0) {
        if (Regs.read(this.tid).get("rip") === end) break;
        foreign = pt.getSiginfo(this.tid);
      } else this.passOver(st);
      pt.cont(this.tid);
    }
    this.giveBackStop();
    if (this.options.restoreAfterEachCall) this.savedRegs.write(this.tid);
    // Every signal blocked again for the calls that follow (a SIGTRAP queued
    // by one of them would be delivered and lost at its stop otherwise).
    else pt.setSigmask(this.tid, ALL_SIGNALS);
    if (!foreign) {
      if (!this.options.restAtTrap) this.raw(NR.getpid);
      return;
    }
    this.poke(table, foreign); // (the table is used up)
    this.call("rt_tgsigqueueinfo", NR.rt_tgsigqueueinfo, tgid, this.tid, SIGTRAP, table);
  }

  /** Runs a syscall and throws SysError(name) when it fails. */
  call(name: string, nr: number, ...args: (number | bigint)[]): bigint {
    const r = this.raw(nr, ...args);
    if (r < 0n && r > -4096n) throw new SysError(name, Number(-r));
    return r;
  }

  /** Writes bytes into the tracee (any protection). */
  poke(addr: bigint, data: Uint8Array): void {
    writeMemory(this.tid, addr, data);
  }
}

/** x86-64 syscall numbers amber injects or calls. */
export const NR = {
  read: 0,
  write: 1,
  open: 2,
  close: 3,
  poll: 7,
  lseek: 8,
  mmap: 9,
  mprotect: 10,
  munmap: 11,
  brk: 12,
  rt_sigaction: 13,
  rt_sigprocmask: 14,
  ioctl: 16,
  pread64: 17,
  mremap: 25,
  madvise: 28,
  shmget: 29,
  shmat: 30,
  shmctl: 31,
  dup2: 33,
  nanosleep: 35,
  getitimer: 36,
  setitimer: 38,
  getpid: 39,
  socket: 41,
  connect: 42,
  sendto: 44,
  shutdown: 48,
  bind: 49,
  listen: 50,
  socketpair: 53,
  setsockopt: 54,
  getsockopt: 55,
  wait4: 61,
  semget: 64,
  semctl: 66,
  shmdt: 67,
  msgget: 68,
  msgsnd: 69,
  msgrcv: 70,
  msgctl: 71,
  fcntl: 72,
  flock: 73,
  chdir: 80,
  fchdir: 81,
  fchmod: 91,
  fchown: 93,
  umask: 95,
  setuid: 105,
  setgid: 106,
  setpgid: 109,
  setsid: 112,
  setreuid: 113,
  setgroups: 116,
  setresuid: 117,
  setresgid: 119,
  setfsuid: 122,
  setfsgid: 123,
  capset: 126,
  rt_sigtimedwait: 128,
  rt_sigqueueinfo: 129,
  sigaltstack: 131,
  personality: 135,
  prctl: 157,
  arch_prctl: 158,
  chroot: 161,
  gettid: 186,
  futex: 202,
  sched_setaffinity: 203,
  sched_getaffinity: 204,
  io_setup: 206,
  io_destroy: 207,
  io_getevents: 208,
  io_submit: 209,
  set_tid_address: 218,
  restart_syscall: 219,
  timer_create: 222,
  timer_settime: 223,
  timer_gettime: 224,
  timer_getoverrun: 225,
  timer_delete: 226,
  clock_gettime: 228,
  clock_nanosleep: 230,
  exit_group: 231,
  epoll_ctl: 233,
  tgkill: 234,
  get_mempolicy: 239,
  inotify_add_watch: 254,
  inotify_rm_watch: 255,
  openat: 257,
  unlinkat: 263,
  set_robust_list: 273,
  get_robust_list: 274,
  timerfd_create: 283,
  timerfd_settime: 286,
  accept4: 288,
  signalfd4: 289,
  eventfd2: 290,
  epoll_create1: 291,
  dup3: 292,
  pipe2: 293,
  inotify_init1: 294,
  rt_tgsigqueueinfo: 297,
  fanotify_init: 300,
  fanotify_mark: 301,
  prlimit64: 302,
  open_by_handle_at: 304,
  kcmp: 312,
  seccomp: 317,
  memfd_create: 319,
  userfaultfd: 323,
  membarrier: 324,
  mlock2: 325,
  rseq: 334,
  pidfd_open: 434,
  clone3: 435,
  pidfd_getfd: 438,
  mseal: 462,
} as const;
