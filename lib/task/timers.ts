/**
 * Timers of a process: the three itimers (ITIMER_REAL is also alarm()'s)
 * and its POSIX timers (/proc/PID/timers), each with its remaining time
 * and interval as the process itself reads them (injected getitimer and
 * timer_gettime). POSIX timers come back with the same ids: the kernel's
 * PR_TIMER_CREATE_RESTORE_IDS where it has one, else by creating them in
 * id order. Armed last but for pending signals, so they fire into a
 * process that is complete. Remaining times continue from where the dump
 * left them: time spent as images does not count. A timer whose signal is
 * pending is made to expire at once by signals.ts (expireNow), so that
 * its signal is the timer's own again.
 */
import { z } from "zod";
import { type Injector, NR } from "../../ffi/inject.ts";
import { SysError } from "../../ffi/libc.ts";
import { batchTableBytes, runEach, type Syscall, withBatch } from "../batch.ts";
import { definePart, type DumpContext, type RestoreContext } from "../context.ts";
import { AmberError, withContext } from "../errors.ts";
import { MAX_IMAGE_BYTES, u64 } from "../images/codec.ts";
import { readProcText } from "../proc/read.ts";
import { getBytes, putBytes, readU64s, u64Bytes } from "../scratch.ts";

const ITIMER_NAMES = ["ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF"];
const SIGEV_SIGNAL = 0, SIGEV_NONE = 1, SIGEV_THREAD_ID = 4;
const PR_TIMER_CREATE_RESTORE_IDS = 77;
const EINVAL = -22n;
/** Without PR_TIMER_CREATE_RESTORE_IDS, ids are reached by creating timers up to them. */
const MAX_SEQUENTIAL_ID = 4096;

const ns = u64;
const Itimer = z.object({ which: z.number().int().min(0).max(2), intervalNs: ns, valueNs: ns });
const PosixTimer = z.object({
  id: z.number().int().min(0).max(0x7fffffff),
  clock: z.number().int(),
  signal: z.number().int().min(0).max(64),
  /** sigev_value as the kernel shows it (sival_ptr). */
  value: u64,
  /** sigev_notify: SIGEV_SIGNAL, SIGEV_NONE, or SIGEV_SIGNAL|SIGEV_THREAD_ID. */
  notify: z.number().int(),
  /** The thread SIGEV_THREAD_ID sends to (else the process). */
  target: z.number().int().min(0),
  intervalNs: ns,
  valueNs: ns,
  /** timer_getoverrun: the overruns of the expiry last delivered (a new timer has none). */
  overrun: z.number().int().min(0).default(0),
});
type PosixTimerImage = z.output<typeof PosixTimer>;

const TimersSchema = z.object({ itimers: z.array(Itimer), posix: z.array(PosixTimer) });

/** Two (seconds, sub-second) pairs as nanoseconds; `unit` is ns per sub-second step. */
function pairsNs(words: bigint[], unit: bigint): [bigint, bigint] {
  const ns = (i: number) => words[i] * 1_000_000_000n + words[i + 1] * unit;
  return [ns(0), ns(2)];
}

/** struct itimerval: two struct timeval. */
const ITIMERVAL_SIZE = 32;

/** Each itimer's struct itimerval as u64 words: the three in one batch where one can run. */
function readItimers(ctx: DumpContext): bigint[][] {
  return withBatch(ctx, (run) => {
    if (!run) {
      return ITIMER_NAMES.map((name, which) => {
        ctx.injector.call(`getitimer(${name})`, NR.getitimer, which, ctx.scratch.addr);
        return readU64s(getBytes(ctx.pid, ctx.scratch, ITIMERVAL_SIZE));
      });
    }
    const base = batchTableBytes(ITIMER_NAMES.length);
    const at = (i: number) => ctx.scratch.addr + BigInt(base + i * ITIMERVAL_SIZE);
    const results = run(ITIMER_NAMES.map((_, which) => [NR.getitimer, which, at(which)]));
    const words = readU64s(getBytes(ctx.pid, ctx.scratch, 3 * ITIMERVAL_SIZE, base));
    return ITIMER_NAMES.map((name, which) => {
      if (results[which] < 0n) throw new SysError(`getitimer(${name})`, Number(-results[which]));
      return words.slice(which * 4, which * 4 + 4);
    });
  });
}

function dumpItimers(ctx: DumpContext) {
  return readItimers(ctx).map((words, which) => {
    const [intervalNs, valueNs] = pairsNs(words, 1000n);
    // A periodic ITIMER_REAL whose SIGALRM is pending reads 0: the kernel
    // rearms it when that signal is taken, at most one interval later. A
    // setitimer of 0 would disarm it, so it comes back due in one interval.
    return { which, intervalNs, valueNs: valueNs || intervalNs };
  }).filter((t) => t.valueNs > 0n);
}

/**
 * /proc/PID/timers, one block per timer:
 *   ID: 1 / signal: 34/0000000000000037 / notify: signal/tid.812 / ClockID: 0
 */
export function parseTimers(text: string) {
  return text.split(/^(?=ID: )/m).filter((b) => b.trim()).map((block) => {
    const field = (k: string) => {
      const m = new RegExp(`^${k}: (.*)$`, "m").exec(block);
      if (!m) throw new AmberError(`/proc timers: no ${k} in ${JSON.stringify(block)}`);
      return m[1];
    };
    const [signal, value] = field("signal").split("/");
    const notify = /^(\w+)\/(pid|tid)\.(\d+)$/.exec(field("notify"));
    if (!notify) throw new AmberError(`/proc timers: notify ${field("notify")}`);
    const kind = { signal: SIGEV_SIGNAL, none: SIGEV_NONE }[notify[1]];
    return {
      id: Number(field("ID")),
      clock: Number(field("ClockID")),
      signal: Number(signal),
      value: BigInt("0x" + value),
      notify: (kind ?? -1) | (notify[2] === "tid" ? SIGEV_THREAD_ID : 0),
      target: Number(notify[3]),
    };
  });
}

const SI_TIMER = -2;

/**
 * The POSIX timer a pending siginfo comes from, if it does: si_code
 * SI_TIMER, and the kernel's timer id in si_tid (offset 16).
 */
export function timerIdOf(info: Uint8Array): number | undefined {
  const v = new DataView(info.buffer, info.byteOffset);
  return v.getInt32(8, true) === SI_TIMER ? v.getInt32(16, true) : undefined;
}

/**
 * Makes restored timer `id` expire at once, keeping its interval: the
 * kernel then queues the timer's own signal, whose overruns it counts
 * from there (a copy queued with rt_sigqueueinfo would be a second,
 * ordinary signal beside the timer's next one).
 */
export function expireNow(ctx: RestoreContext, id: number): void {
  withContext(`POSIX timer ${id}: its pending signal`, () => {
    const t = (ctx.images.timers as z.output<typeof TimersSchema> | undefined)?.posix
      .find((p) => p.id === id);
    // (Expiring soon, not at once: the overrun goes in first; see armWithOverrun.)
    if (t && t.overrun > 0) return armWithOverrun(ctx, t, OVERRUN_LEAD_NS);
    ctx.injector.call("timer_gettime", NR.timer_gettime, id, ctx.scratch.addr);
    const [intervalNs] = pairsNs(readU64s(getBytes(ctx.pid, ctx.scratch, 32)), 1n);
    const its = putBytes(ctx.pid, ctx.scratch, timeBytes(intervalNs, 1n, 1n), 128);
    ctx.injector.call("timer_settime", NR.timer_settime, id, 0, its, 0);
  });
}

function dumpPosixTimers(ctx: DumpContext) {
  return parseTimers(readProcText(ctx.pid, "timers")).map((t) =>
    withContext(`POSIX timer ${t.id}`, () => {
      ctx.injector.call("timer_gettime", NR.timer_gettime, t.id, ctx.scratch.addr);
      const [intervalNs, valueNs] = pairsNs(readU64s(getBytes(ctx.pid, ctx.scratch, 32)), 1n);
      const overrun = Number(ctx.injector.call("timer_getoverrun", NR.timer_getoverrun, t.id));
      return { ...t, intervalNs, valueNs, overrun };
    })
  ).sort((a, b) => a.id - b.id);
}

/** struct itimerval / itimerspec: interval then value, as (seconds, sub-second) pairs. */
function timeBytes(intervalNs: bigint, valueNs: bigint, unit: bigint): Uint8Array {
  const pair = (v: bigint) => [v / 1_000_000_000n, (v % 1_000_000_000n) / unit];
  return u64Bytes([...pair(intervalNs), ...pair(valueNs)]);
}

/** CPU clocks (negative ids) name a task by pid: only the process's own threads are supported. */
function cpuClockTask(clock: number): number {
  return ~(clock >> 3);
}

function unrestorableTimer(t: PosixTimerImage, tids: Set<number>): string | undefined {
  const where = `POSIX timer ${t.id}`;
  const base = t.notify & ~SIGEV_THREAD_ID;
  if (base !== SIGEV_SIGNAL && base !== SIGEV_NONE) {
    return `${where}: notify ${t.notify}: not supported yet`;
  }
  if (t.clock < 0 && !tids.has(cpuClockTask(t.clock))) {
    return `${where}: CPU clock of task ${
      cpuClockTask(t.clock)
    } outside the process: not supported yet`;
  }
  if (t.overrun > 0) {
    const why = overrunUnrestorable(t);
    if (why) return `${where}: overrun count ${t.overrun}: ${why}: not supported yet`;
  }
  if (t.notify & SIGEV_THREAD_ID && !tids.has(t.target)) {
    return `${where}: signals thread ${t.target}, which is not in the images`;
  }
  return undefined;
}

/** Clocks whose time runs on while amber restores: REALTIME, MONOTONIC, BOOTTIME, TAI. */
const WALL_CLOCKS = [0, 1, 7, 11];
const TIMER_ABSTIME = 1;
/** How soon a timer whose signal was pending expires again after getting its overrun. */
const OVERRUN_LEAD_NS = 20_000_000n;
/** Tries of armWithOverrun before it gives up (each at most ~10 ms). */
const OVERRUN_TRIES = 20;

/** Why timer `t`'s overrun count cannot be given to a new timer, if it cannot. */
function overrunUnrestorable(t: PosixTimerImage): string | undefined {
  if (!t.intervalNs) return "a one-shot timer";
  if ((t.notify & ~SIGEV_THREAD_ID) !== SIGEV_SIGNAL) return "a timer without a signal";
  if (!WALL_CLOCKS.includes(t.clock)) return `clock ${t.clock}`;
  if (t.valueNs > t.intervalNs) return "more time left than its interval";
}

/**
 * Arms restored timer `t` with its interval, about `leftNs` from now, and
 * gives it the overrun count the process reads (timer_getoverrun: the
 * expiries missed before the signal it took last), which only the
 * kernel's own delivery sets: the timer is armed at an absolute time N+1
 * intervals before the wanted expiry, so it expires at once, and taking
 * its signal (rt_sigtimedwait, in the thread it targets, every signal
 * blocked) makes the kernel forward it past now, counting N overruns when
 * the signal is taken less than `lead` after the clock was read and
 * `lead` is under one interval. The three calls run as one batch (lib/batch.ts)
 * so that this holds for short intervals too; a miss is tried again. A
 * later timer_settime would clear the count.
 */
function armWithOverrun(ctx: RestoreContext, t: PosixTimerImage, leftNs: bigint): void {
  const inj = t.notify & SIGEV_THREAD_ID ? ctx.threads.get(t.target) ?? ctx.injector : ctx.injector;
  const n = BigInt(t.overrun), interval = t.intervalNs;
  // The wanted expiry if it is far enough off, else as near as it can be.
  const lead = leftNs > OVERRUN_LEAD_NS
    ? leftNs
    : interval > OVERRUN_LEAD_NS
    ? OVERRUN_LEAD_NS
    : interval / 2n;
  const at = (offset: number) => ctx.scratch.addr + BigInt(offset);
  const set = u64Bytes([1n << BigInt(t.signal - 1)]);
  // The timer expired when armed: its signal is queued at once (wait at most 10 ms).
  putBytes(ctx.pid, ctx.scratch, new Uint8Array([...set, ...u64Bytes([0, 10_000_000n])]), 256);
  withBatch(ctx, (runMain, onThread) => {
    const run = inj === ctx.injector ? runMain : onThread?.(inj);
    for (let tries = 1;; tries++) {
      inj.call("clock_gettime", NR.clock_gettime, t.clock, at(512));
      const [sec, nsec] = readU64s(getBytes(ctx.pid, ctx.scratch, 16, 512));
      const start = sec * 1_000_000_000n + nsec + lead - (n + 1n) * interval;
      if (start <= 0n) throw new AmberError(`overrun count ${n}: its clock is not that far along`);
      putBytes(ctx.pid, ctx.scratch, timeBytes(interval, start, 1n), 320);
      const calls: Syscall[] = [
        [NR.timer_settime, t.id, TIMER_ABSTIME, at(320), 0],
        [NR.rt_sigtimedwait, at(256), 0, at(264), 8],
        [NR.timer_getoverrun, t.id],
      ];
      const [armed, taken, got] = run ? run(calls) : calls.map(([nr, ...a]) => inj.raw(nr, ...a));
      if (armed < 0n) throw new AmberError(`timer_settime: errno ${-armed}`);
      if (taken !== BigInt(t.signal)) throw new AmberError(`rt_sigtimedwait: ${taken}`);
      if (got === n) return;
      // Taken too late: one more interval went by. Again: with a 1 ms interval the lead is
      // 0.5 ms, which a loaded machine's ptrace round trips exceed more often than not.
      if (tries === OVERRUN_TRIES) {
        throw new AmberError(`overrun count ${n}: the kernel counted ${got}`);
      }
    }
  });
}

/** timer_create(clock, sigevent, &id) asking for `t.id` (restore-ids mode, or the next id). */
function createTimer(ctx: RestoreContext, inj: Injector, t: PosixTimerImage): number {
  // struct sigevent: sigev_value, sigev_signo, sigev_notify, _tid; 64 bytes.
  const sev = new Uint8Array(64);
  const v = new DataView(sev.buffer);
  v.setBigUint64(0, t.value, true);
  v.setInt32(8, t.signal, true);
  v.setInt32(12, t.notify, true);
  v.setInt32(16, t.target, true);
  const sevAddr = putBytes(ctx.pid, ctx.scratch, sev, 0);
  const idAddr = putBytes(ctx.pid, ctx.scratch, u64Bytes([t.id]), 64);
  inj.call("timer_create", NR.timer_create, t.clock, sevAddr, idAddr);
  return Number(BigInt.asIntN(32, readU64s(getBytes(ctx.pid, ctx.scratch, 8, 64))[0]));
}

function restorePosixTimers(ctx: RestoreContext, timers: PosixTimerImage[]): void {
  if (!timers.length) return; // (the restore-ids mode is only for timer_create)
  const inj = ctx.injector;
  const restoreIds = inj.raw(NR.prctl, PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0);
  if (restoreIds < 0n && restoreIds !== EINVAL) {
    throw new AmberError(`prctl(PR_TIMER_CREATE_RESTORE_IDS): errno ${-restoreIds}`);
  }
  for (const t of timers) {
    withContext(`POSIX timer ${t.id}`, () => {
      let id = createTimer(ctx, inj, t);
      // No restore-ids mode: ids come in order; spend the ones below ours.
      const spare: number[] = [];
      while (restoreIds < 0n && id < t.id && id < MAX_SEQUENTIAL_ID) {
        spare.push(id);
        id = createTimer(ctx, inj, t);
      }
      for (const s of spare) inj.call("timer_delete", NR.timer_delete, s);
      if (id !== t.id) throw new AmberError(`timer_create gave id ${id}`);
      if (t.valueNs > 0n && t.overrun > 0) armWithOverrun(ctx, t, t.valueNs);
      else if (t.valueNs > 0n) {
        const its = putBytes(ctx.pid, ctx.scratch, timeBytes(t.intervalNs, t.valueNs, 1n), 128);
        inj.call("timer_settime", NR.timer_settime, t.id, 0, its, 0);
      }
    });
  }
  if (restoreIds === 0n) {
    inj.call(
      "prctl(PR_TIMER_CREATE_RESTORE_IDS off)",
      NR.prctl,
      PR_TIMER_CREATE_RESTORE_IDS,
      0,
      0,
      0,
      0,
    );
  }
}

export const timersPart = definePart({
  name: "timers",
  maxBytes: MAX_IMAGE_BYTES,
  version: 1,
  schema: TimersSchema.extend({ tids: z.array(z.number().int()) }),
  dump: (ctx) => ({
    itimers: dumpItimers(ctx),
    posix: dumpPosixTimers(ctx),
    tids: ctx.proc.threads,
  }),
  unrestorable({ posix, tids }) {
    const threads = new Set(tids);
    return posix.map((t) => unrestorableTimer(t, threads)).find(Boolean);
  },
  restore(ctx, { itimers, posix }) {
    // In one batch, each value past its table.
    runEach(
      ctx,
      itimers.map((t, i) => {
        const val = putBytes(
          ctx.pid,
          ctx.scratch,
          timeBytes(t.intervalNs, t.valueNs, 1000n),
          1024 + i * 64,
        );
        return {
          what: `setitimer(${ITIMER_NAMES[t.which]})`,
          call: [NR.setitimer, t.which, val, 0],
        };
      }),
    );
    restorePosixTimers(ctx, posix);
  },
});
