/**
 * Sleeps a thread was frozen in, and when they end.
 *
 * A relative sleep without a remaining-time buffer — nanosleep(req, NULL)
 * (usleep), clock_nanosleep(clock, 0, req, NULL), FUTEX_WAIT with a
 * timeout, poll with a timeout — keeps its deadline only in the kernel's
 * restart block, which no interface shows and which dies with the
 * process. It is seen once, on the way in: the sleep's hrtimer is in
 * /proc/timer_list (`hrtimer_wakeup`, a hashed but stable pointer, its
 * expiry) until the freeze's PTRACE_INTERRUPT wakes the thread and cancels
 * it. So the list is read just before and just after the interrupts of a
 * process's threads, if /proc/PID/task/TID/syscall shows one of them in
 * such a call (and only then), and a timer that went away is matched to
 * the thread by its expiry and the call's timeout. The restore re-runs
 * the call with what was left. In doubt, nothing is recorded and the call
 * sleeps its whole length again, as before: late, never early.
 *
 * Also here: which call a thread frozen inside restart_syscall restarts.
 */
import { NR, SYSCALL_STOP } from "../../ffi/inject.ts";
import { readMemoryProc, writeMemory } from "../../ffi/memory.ts";
import * as pt from "../../ffi/ptrace.ts";
import { Regs } from "../../ffi/regs.ts";
import { PID_MAX } from "../images/codec.ts";
import { readMaps } from "../proc/maps.ts";
import { readProcText } from "../proc/read.ts";
import { readStat } from "../proc/stat.ts";
import { readStatus } from "../proc/status.ts";
import { readU64s, u64Bytes } from "../scratch.ts";

export const ERESTART_RESTARTBLOCK = -516n;

/** Clocks whose sleeps run on while the process is only images. */
export const WALL_CLOCKS = [0n, 1n, 7n]; // REALTIME, MONOTONIC, BOOTTIME

/** Clocks a relative clock_nanosleep restarts on (CPU clocks are negative). */
const SLEEP_CLOCKS = [0n, 1n, 7n, 8n, 9n, 11n];

const ARG_REGS = ["rdi", "rsi", "rdx", "r10", "r8", "r9"] as const;
type ArgReg = typeof ARG_REGS[number];

const FUTEX_WAIT = 0n, FUTEX_WAIT_BITSET = 9n;
const FUTEX_PRIVATE_FLAG = 128n, FUTEX_CLOCK_REALTIME = 256n;
const NS = 1_000_000_000n;

export function argsOf(regs: Regs): bigint[] {
  return ARG_REGS.map((r) => regs.get(r));
}

/** A timespec's length in ns; undefined when `addr` holds none. */
function timespecAt(tid: number, addr: bigint): bigint | undefined {
  if (addr < 0x1000n) return undefined;
  try {
    const [sec, nsec] = readU64s(readMemoryProc(tid, addr, 16));
    if (BigInt.asIntN(64, sec) < 0n || nsec >= NS) return undefined;
    return sec * NS + nsec;
  } catch {
    return undefined; // not mapped: not a timespec
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
export function restartedCall(tid: number, regs: Regs): number | undefined {
  if (regs.signed("orig_rax") !== BigInt(NR.restart_syscall)) return undefined;
  if (regs.signed("rax") !== ERESTART_RESTARTBLOCK) return undefined;
  const [rdi, rsi, rdx, r10] = argsOf(regs);
  if (rsi === 0n && isSleepClock(rdi) && timespecAt(tid, rdx) !== undefined) {
    return NR.clock_nanosleep;
  }
  const op = rsi & ~(FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME);
  if (
    (op === FUTEX_WAIT || op === FUTEX_WAIT_BITSET) && rdi % 4n === 0n &&
    timespecAt(tid, r10) !== undefined && u32At(tid, rdi) === (rdx & 0xffffffffn)
  ) return NR.futex;
  if (timespecAt(tid, rdi) !== undefined && (rsi === 0n || rsi >= 0x1000n)) return NR.nanosleep;
  if (rsi <= 1n << 20n && (rsi === 0n || rdi >= 0x1000n)) return NR.poll;
  return undefined;
}

/** Where a relative sleep without a remaining-time buffer has its timeout. */
export interface RelativeSleep {
  reg: ArgReg;
  /** A pointer to a timespec, or poll's milliseconds. */
  form: "timespec" | "ms";
}

/**
 * Call `nr` with arguments `args`, if it is a relative sleep on a clock
 * that runs while the process is only images, with no buffer the kernel
 * writes the time left into. The integer arguments are C ints: their low
 * 32 bits count.
 */
export function relativeSleep(nr: bigint, args: bigint[]): RelativeSleep | undefined {
  const [a0, a1, a2, a3] = args;
  const int = (v: bigint) => BigInt.asIntN(32, v);
  if (nr === BigInt(NR.nanosleep) && a0 && a1 === 0n) return { reg: "rdi", form: "timespec" };
  if (
    nr === BigInt(NR.clock_nanosleep) && WALL_CLOCKS.includes(int(a0)) && int(a1) === 0n && a2 &&
    a3 === 0n
  ) return { reg: "rdx", form: "timespec" };
  // FUTEX_WAIT's timeout is relative (CLOCK_MONOTONIC); FUTEX_WAIT_BITSET's is absolute.
  if (nr === BigInt(NR.futex) && (int(a1) & ~FUTEX_PRIVATE_FLAG) === FUTEX_WAIT && a3) {
    return { reg: "r10", form: "timespec" };
  }
  if (nr === BigInt(NR.poll) && int(a2) > 0n) return { reg: "rdx", form: "ms" };
  return undefined;
}

/** The whole timeout of a relative sleep, in ns. */
function timeoutOf(tid: number, regs: Regs, sleep: RelativeSleep): bigint | undefined {
  const v = regs.get(sleep.reg);
  return sleep.form === "ms" ? BigInt.asIntN(32, v) * 1_000_000n : timespecAt(tid, v);
}

// ---------------------------------------------------------------------------
// dump: the deadline, from /proc/timer_list around the freeze

/** What a frozen sleep had left, `leftNs` at performance.now() `at`. */
export interface SleepDeadline {
  leftNs: bigint;
  at: number;
}

/** The time left at performance.now() `now`, never below 0. */
export function leftAt(d: SleepDeadline, now: number): bigint {
  // Rounded down: the sleep may end a little late, not early.
  const left = d.leftNs - BigInt(Math.floor((now - d.at) * 1e6));
  return left > 0n ? left : 0n;
}

export interface TimerList {
  /** CLOCK_MONOTONIC when the list was taken. */
  now: bigint;
  /** CLOCK_BOOTTIME - CLOCK_MONOTONIC (clock 2's offset). */
  bootOffset: bigint;
  /** Sleepers' timers (hrtimer_wakeup) by hashed address: ns from `now` to the soft expiry. */
  wakeups: Map<string, bigint>;
}

const TIMER = /^ #\d+: <(\w+)>, (\w+), S:\w+\n # expires at -?\d+--?\d+ nsecs \[in (-?\d+) to/gm;

/** /proc/timer_list: throws where it cannot be read or its layout is unknown. */
export function readTimerList(): TimerList {
  return parseTimerList(Deno.readTextFileSync("/proc/timer_list"));
}

/**
 * /proc/timer_list read twice, its sleepers' timers merged. The kernel
 * prints a CPU's timers by index, taking its lock for each one, so a timer
 * removed meanwhile (another process's, on a busy machine) shifts the rest
 * and the next one is skipped: a second look finds what the first missed.
 * Before the freeze that keeps a sleeper's timer from going unseen; after
 * it, a timer still there from looking gone.
 */
function readTimerListTwice(): TimerList {
  const first = readTimerList(), second = readTimerList();
  for (const [id, inNs] of second.wakeups) {
    if (!first.wakeups.has(id)) first.wakeups.set(id, inNs + second.now - first.now);
  }
  return first;
}

function parseTimerList(text: string): TimerList {
  const now = /^now at (\d+) nsecs$/m.exec(text);
  if (!now) throw new Error("/proc/timer_list: no 'now at'");
  const boot = / clock 2:\n(?: {2}\..*\n)*? {2}\.offset: +(-?\d+) nsecs/.exec(text);
  const wakeups = new Map<string, bigint>();
  for (const m of text.matchAll(TIMER)) {
    if (m[2] === "hrtimer_wakeup") wakeups.set(m[1], BigInt(m[3]));
  }
  return { now: BigInt(now[1]), bootOffset: BigInt(boot?.[1] ?? 0), wakeups };
}

function voluntarySwitches(pid: number, tid: number): string | undefined {
  return readStatus(pid, tid).get("voluntary_ctxt_switches");
}

const MAYBE_SLEEP: number[] = [
  NR.nanosleep,
  NR.clock_nanosleep,
  NR.futex,
  NR.poll,
  NR.restart_syscall,
];

/** /proc/PID/task/TID/syscall if it shows the thread blocked in what may be such a sleep. */
function blockedIn(pid: number, tid: number): string | undefined {
  const line = readProcText(pid, `task/${tid}/syscall`).trim();
  const [nr, ...args] = line.split(" ").map((f) => /^(0x)?[0-9a-f]+$/.test(f) ? BigInt(f) : -1n);
  if (!MAYBE_SLEEP.includes(Number(nr))) return undefined;
  if (nr !== BigInt(NR.restart_syscall) && !relativeSleep(nr, args.slice(0, 6))) return undefined;
  return line;
}

/** USER_HZ: /proc/PID/stat's start time is in these ticks of CLOCK_BOOTTIME on x86-64. */
const USER_HZ = 100n;

/** A thread found blocked in what may be such a sleep, before the freeze. */
interface Sleeper {
  tid: number;
  /** Its voluntary context switches, counted before it was seen blocked. */
  switches: string;
}

/**
 * The sleeps of one process's threads watched across their freeze: the
 * timer list is read twice before the first interrupt and twice after the
 * last (four reads per process, however many sleepers: each read formats
 * every timer of the machine, 10-20 µs apiece measured here).
 */
export class SleepWatch {
  private constructor(
    readonly pid: number,
    private sleepers: Sleeper[],
    private before: TimerList,
  ) {}

  /**
   * Before any of `tids` is interrupted. The switch count first, then the
   * call: if the count later rose by exactly one (the freeze's own stop),
   * the thread has been blocked in that call since before the count, so
   * its timer was set before the first list was taken, and it is among
   * the timers gone after. Undefined when no thread sleeps so.
   */
  static watch(pid: number, tids: number[]): SleepWatch | undefined {
    const sleepers: Sleeper[] = [];
    for (const tid of tids) {
      try {
        const line = blockedIn(pid, tid);
        if (!line) continue;
        const switches = voluntarySwitches(pid, tid);
        if (switches !== undefined && blockedIn(pid, tid) === line) {
          sleepers.push({ tid, switches });
        }
      } catch { /* gone */ }
    }
    if (!sleepers.length) return undefined;
    try {
      return new SleepWatch(pid, sleepers, readTimerListTwice());
    } catch {
      return undefined; // no /proc/timer_list: as before, the whole length
    }
  }

  /** Once every thread is in its interrupt stop: the deadlines of those one timer fits. */
  settle(): Map<number, SleepDeadline> {
    const out = new Map<number, SleepDeadline>();
    let after: TimerList;
    try {
      after = readTimerListTwice();
    } catch {
      return out;
    }
    const at = performance.now();
    for (const s of this.sleepers) {
      try {
        const left = this.leftOf(s, after);
        if (left !== undefined) out.set(s.tid, { leftNs: left, at });
      } catch { /* gone: nothing to restore */ }
    }
    return out;
  }

  private leftOf({ tid, switches }: Sleeper, after: TimerList): bigint | undefined {
    // Woke and slept again, or took a signal: its timer may be a new one.
    if (voluntarySwitches(this.pid, tid) !== String(BigInt(switches) + 1n)) return undefined;
    const regs = Regs.read(tid);
    if (regs.signed("rax") !== ERESTART_RESTARTBLOCK) return undefined;
    const orig = regs.signed("orig_rax");
    const nr = orig === BigInt(NR.restart_syscall) ? restartedCall(tid, regs) : Number(orig);
    const sleep = nr === undefined ? undefined : relativeSleep(BigInt(nr), argsOf(regs));
    const timeout = sleep && timeoutOf(tid, regs, sleep);
    if (timeout === undefined) return undefined;
    const started = readStat(this.pid, tid).startTime * (NS / USER_HZ) - this.before.bootOffset;
    return this.deadline(after, timeout, started);
  }

  /**
   * A sleeper's timer gone with the interrupts, still in the future, whose
   * soft expiry less `timeout` (when the call began) lies between the
   * thread's start and the first list: the time it had left at the second
   * list. Of several (threads of the process sleeping alike) the latest,
   * so that the sleep never ends early; it still ends no later than a
   * whole new sleep would.
   */
  private deadline(after: TimerList, timeout: bigint, started: bigint): bigint | undefined {
    const { now, wakeups } = this.before;
    let best: bigint | undefined;
    for (const [id, inNs] of wakeups) {
      if (after.wakeups.has(id)) continue;
      const began = now + inNs - timeout;
      if (began > now || began < started || now + inNs <= after.now) continue;
      if (best === undefined || inNs > best) best = inNs;
    }
    return best === undefined ? undefined : now + best - after.now;
  }
}

// ---------------------------------------------------------------------------
// restore: the call again, with what was left

/**
 * Makes `regs` (a thread about to re-run relative sleep `nr`) sleep
 * `leftNs`, at most its whole timeout. Only the timeout register changes
 * (as for a sleep with a buffer: callers do not rely on it, it is
 * caller-saved across the C call). Poll's timeout is that register. A
 * timespec needs the thread's memory, and none of the program's may be
 * changed: it goes just below the stack pointer's red zone, inside the
 * stack's mapping. By the ABI nothing live is there (a signal frame may be
 * written there at any moment), and the thread runs none of its own code
 * before the kernel copies the timespec in at the call's entry; only a
 * signal handler could write over it first, so the thread is stepped into
 * the call before it is let go (enterSleep), and given back its own
 * timeout (the whole length) if a signal comes first. Returns the
 * registers of that fallback when the timespec was written; undefined
 * when nothing needs stepping (poll, or no room: the whole length then).
 */
export function shortenSleep(
  tid: number,
  nr: bigint,
  regs: Regs,
  leftNs: bigint,
): Regs | undefined {
  const sleep = relativeSleep(nr, argsOf(regs));
  if (!sleep) return undefined;
  const whole = timeoutOf(tid, regs, sleep);
  if (whole === undefined) return undefined;
  const left = leftNs < whole ? (leftNs > 0n ? leftNs : 0n) : whole;
  if (sleep.form === "ms") {
    regs.set(sleep.reg, (left + 999_999n) / 1_000_000n);
    return undefined;
  }
  const sp = regs.get("rsp");
  const addr = (sp - RED_ZONE - 16n) & ~15n;
  const stack = readMaps(tid).find((m) => m.start <= addr && sp < m.end);
  if (!stack || !stack.perms.startsWith("rw")) return undefined;
  const fallback = regs.clone();
  writeMemory(tid, addr, u64Bytes([left / NS, left % NS]));
  regs.set(sleep.reg, addr);
  return fallback;
}

/** The x86-64 ABI's red zone below rsp, which the thread's own code may use. */
const RED_ZONE = 128n;

/**
 * Steps a thread whose registers are written into its syscall's entry
 * stop: past it the kernel reads the new timespec before any signal
 * handler can run. If a signal is delivered first, the thread goes back
 * to `fallback` and the signal must be given at detach: it is returned
 * (0 for none; undefined when the thread is gone).
 */
export function enterSleep(tid: number, fallback: Regs): number | undefined {
  pt.syscall(tid);
  const st = pt.waitpid(tid);
  if (!st?.stopped) return undefined;
  if (st.stopSignal === SYSCALL_STOP && st.event === 0) return 0;
  fallback.write(tid);
  return st.event ? 0 : st.stopSignal;
}
