/**
 * AIO requests in flight at a dump, counted and waited for while the
 * process is frozen. No interface shows them, but the kernel's own
 * accounting (fs/aio.c) can be read back by using it: a context whose
 * ring has nr slots has nr - 1 request slots, each free (in a global
 * count, or cached by a CPU; the two trade whole batches of req_batch),
 * held by a request in flight, or held by a completion until user space
 * reaps it (moves the ring's head) and a submission that finds no free
 * slot takes it back.
 *
 * Amber submits polls of its own, of a pipe nobody writes, pinned to
 * each CPU in turn, until the kernel answers EAGAIN: they take every
 * slot the kernel can still give, including those of reaped completions.
 * The global count keeps what is left below one batch, and since it only
 * ever changes by whole batches that is (nr - 1) % req_batch. So
 *   in flight = nr - 1 - taken - (nr - 1) % req_batch - (tail - head)
 * and never less than the truth (a slot cached by a CPU amber cannot run
 * on counts as in flight): 0 means none.
 *
 * Then it writes to the pipe: its polls complete after the process's own
 * completions, and more of them, answered at once, take the ring's tail a
 * whole round back to where it was; the slots and the head are written
 * back as they were, with the completions that arrived meanwhile after
 * the ones already waiting. While some are in flight amber counts again
 * after a pause (each completion lands in the ring, where dump finds it).
 */
import { type Injector, NR } from "../../ffi/inject.ts";
import { SysError } from "../../ffi/libc.ts";
import { readMemoryProc, writeMemory } from "../../ffi/memory.ts";
import type { Scratch } from "../context.ts";
import { AmberError, RefusalError } from "../errors.ts";
import { putBytes } from "../scratch.ts";

/** struct aio_ring and struct io_event are 32 bytes, struct iocb 64. */
const HEADER = 32, EVENT = 32, IOCB = 64;
const IOCB_CMD_POLL = 5, POLLIN = 1;
const O_NONBLOCK = 0o4000, O_CLOEXEC = 0o2000000;
const EAGAIN = 11;
/** Polls per io_submit (their pointers fill half the scratch area). */
const BATCH = 256;
/** Bytes of a CPU mask amber passes (1024 CPUs). */
const MASK = 128;
/** Where things go in the scratch area. */
const AT = { iocb: 0, fds: 64, byte: 72, savedMask: 128, oneCpu: 128 + MASK, ptrs: 128 + 2 * MASK };
/** How long dump waits for requests in flight by default, ms. */
export const AIO_TIMEOUT_DEFAULT_MS = 5000;
/** Longest pause between two counts while requests are in flight, ms. */
const MAX_PAUSE_MS = 100;
/** How long amber's own polls may go without completing once the pipe is written, ms. */
const PROBE_MS = 2000;

export interface AioDrainWhere {
  pid: number;
  /** Runs in the frozen process, which owns the context. */
  injector: Injector;
  scratch: Scratch;
  /** How long requests in flight are waited for, ms. */
  timeoutMs: number;
}

/** The ring's header words amber reads: slots, head (user space may write any value), tail. */
interface Header {
  nr: number;
  head: number;
  tail: number;
}

function readHeader(pid: number, ring: bigint): Header {
  const h = new DataView(readMemoryProc(pid, ring, HEADER).buffer);
  return { nr: h.getUint32(4, true), head: h.getUint32(8, true), tail: h.getUint32(12, true) };
}

/** Completions in the ring, as the kernel counts them (it takes head modulo nr). */
function inRing(h: Header): number {
  return ((h.tail % h.nr) - (h.head % h.nr) + h.nr) % h.nr;
}

/** CPUs of a /sys/devices/system/cpu list ("online", "possible"), e.g. "0-3,6". */
function cpuList(which: string): number[] {
  const text = Deno.readTextFileSync(`/sys/devices/system/cpu/${which}`).trim();
  return text.split(",").filter((r) => r).flatMap((r) => {
    const [a, b = a] = r.split("-").map(Number);
    return Array.from({ length: b - a + 1 }, (_, i) => a + i);
  });
}

/**
 * Slots the kernel never gives out: the global count's remainder below one
 * batch. req_batch is (nr - 1) / (4 * possible CPUs), at least 1.
 */
function unreachableSlots(nr: number, possibleCpus: number): number {
  const batch = Math.max(1, Math.floor((nr - 1) / (4 * possibleCpus)));
  return (nr - 1) % batch;
}

/** `count` slots from `from` (wrapping) of a ring of `nr`, read from or written to the process. */
function slotRanges(nr: number, from: number, count: number): [number, number][] {
  const out: [number, number][] = [];
  for (let i = from % nr; count > 0;) {
    const n = Math.min(count, nr - i);
    out.push([i, n]);
    count -= n;
    i = 0;
  }
  return out;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Amber's polls in one context, and what it learnt of the ring while they were there. */
class Probe {
  /** aio_data of amber's polls: tells their completions from the process's. */
  readonly tag = crypto.getRandomValues(new BigUint64Array(1))[0];
  readonly iocb: bigint;
  readonly ptrs: bigint;
  readonly nr: number;
  /** The ring's slots as they were (nr events). */
  readonly slots: Uint8Array;
  /** Polls submitted, and their completions seen in the ring. */
  taken = 0;
  seen = 0;
  /** The process's completions that arrived after amber's first look, in order. */
  readonly arrived: Uint8Array[] = [];
  /** Where amber has read the ring's completions up to. */
  private readTo: number;
  /** CPUs amber could not run on: their cached slots count as in flight. */
  readonly missed: number[] = [];
  private fds?: [number, number];
  private readonly possible = cpuList("possible");

  constructor(readonly w: AioDrainWhere, readonly ring: bigint, readonly before: Header) {
    this.nr = before.nr;
    this.iocb = w.scratch.addr + BigInt(AT.iocb);
    this.ptrs = w.scratch.addr + BigInt(AT.ptrs);
    this.slots = readMemoryProc(w.pid, ring + BigInt(HEADER), this.nr * EVENT);
    this.readTo = before.tail % this.nr;
    if (AT.ptrs + BATCH * 8 > w.scratch.size) throw new Error("scratch too small for AIO polls");
  }

  private get inj(): Injector {
    return this.w.injector;
  }

  /** The pipe, and BATCH pointers to one poll of its read end. */
  open(): void {
    const { pid, scratch } = this.w;
    putBytes(pid, scratch, new Uint8Array(8), AT.fds);
    this.inj.call("pipe2", NR.pipe2, scratch.addr + BigInt(AT.fds), O_NONBLOCK | O_CLOEXEC);
    const fds = new Int32Array(readMemoryProc(pid, scratch.addr + BigInt(AT.fds), 8).buffer);
    this.fds = [fds[0], fds[1]];
    const iocb = new DataView(new ArrayBuffer(IOCB));
    iocb.setBigUint64(0, this.tag, true); // aio_data
    iocb.setUint16(16, IOCB_CMD_POLL, true); // aio_lio_opcode
    iocb.setUint32(20, this.fds[0], true); // aio_fildes
    iocb.setBigUint64(24, BigInt(POLLIN), true); // aio_buf: the events polled for
    putBytes(pid, scratch, new Uint8Array(iocb.buffer), AT.iocb);
    const ptrs = new BigUint64Array(BATCH).fill(this.iocb);
    putBytes(pid, scratch, new Uint8Array(ptrs.buffer), AT.ptrs);
  }

  close(): void {
    for (const fd of this.fds ?? []) this.inj.raw(NR.close, fd);
    this.fds = undefined;
  }

  /** Submits up to `n` polls; how many the kernel took (0: no free slot). */
  private submit(n: number): number {
    const r = Number(this.inj.raw(NR.io_submit, this.ring, n, this.ptrs));
    if (r === -EAGAIN) return 0;
    if (r < 0) throw new SysError("io_submit", -r);
    this.taken += r;
    return r;
  }

  /** Takes every free slot: on each CPU in turn until the kernel has none. */
  takeFreeSlots(): void {
    const { pid, scratch } = this.w;
    const saved = scratch.addr + BigInt(AT.savedMask), one = scratch.addr + BigInt(AT.oneCpu);
    const len = Number(this.inj.call("sched_getaffinity", NR.sched_getaffinity, 0, MASK, saved));
    const online = new Set(cpuList("online"));
    try {
      for (const cpu of this.possible) {
        const mask = new Uint8Array(len);
        if (cpu < len * 8) mask[cpu >> 3] = 1 << (cpu & 7);
        putBytes(pid, scratch, mask, AT.oneCpu);
        const pinned = online.has(cpu) && cpu < len * 8 &&
          this.inj.raw(NR.sched_setaffinity, 0, len, one) === 0n;
        if (!pinned) this.missed.push(cpu);
        else while (this.submit(BATCH) === BATCH);
      }
    } finally {
      this.inj.call("sched_setaffinity", NR.sched_setaffinity, 0, len, saved);
    }
  }

  /** Requests of the process in flight now (an upper bound, exact when no CPU was missed). */
  inFlight(): number {
    const h = readHeader(this.w.pid, this.ring);
    return this.nr - 1 - this.taken - unreachableSlots(this.nr, this.possible.length) - inRing(h);
  }

  /**
   * Reads the completions the ring got since the last look, telling
   * amber's from the process's, and moves the head so that only the
   * process's stay counted as waiting: the kernel gives the slots of the
   * others back when amber submits again.
   */
  private collect(): void {
    const { pid } = this.w;
    const tail = readHeader(pid, this.ring).tail % this.nr;
    for (
      const [i, n] of slotRanges(this.nr, this.readTo, (tail - this.readTo + this.nr) % this.nr)
    ) {
      const got = readMemoryProc(pid, this.ring + BigInt(HEADER + i * EVENT), n * EVENT);
      const v = new DataView(got.buffer);
      for (let k = 0; k < n; k++) {
        const ours = v.getBigUint64(k * EVENT, true) === this.tag &&
          v.getBigUint64(k * EVENT + 8, true) === this.iocb;
        if (ours) this.seen++;
        else this.arrived.push(got.slice(k * EVENT, (k + 1) * EVENT));
      }
    }
    this.readTo = tail;
    this.setHead((tail - this.waiting() + this.nr) % this.nr);
  }

  /** The process's completions waiting: those there were, and those that arrived. */
  private waiting(): number {
    return inRing(this.before) + this.arrived.length;
  }

  private setHead(head: number): void {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, head, true);
    writeMemory(this.w.pid, this.ring + 8n, b);
  }

  /**
   * Completes amber's polls (the pipe gets a byte), then submits more,
   * answered at once, until the kernel's tail went whole rounds, and
   * puts the ring back. `pending`: requests of the process still in
   * flight, whose completions may land in the slots after the tail
   * (undefined: not counted, any may).
   */
  async release(pending?: number): Promise<void> {
    if (this.taken === 0) return;
    try {
      putBytes(this.w.pid, this.w.scratch, new Uint8Array([1]), AT.byte);
      this.inj.call("write", NR.write, this.fds![1], this.w.scratch.addr + BigInt(AT.byte), 1);
      await this.completeRounds();
    } finally {
      this.collect();
      this.putBack(pending);
    }
  }

  private async completeRounds(): Promise<void> {
    const rounds = Math.ceil(this.taken / this.nr) * this.nr;
    let seen = -1, since = 0;
    while (this.seen < rounds) {
      this.collect();
      if (this.seen !== seen) [seen, since] = [this.seen, performance.now()];
      else if (performance.now() - since > PROBE_MS) {
        throw new AmberError(`${rounds - this.seen} of amber's own poll requests did not complete`);
      }
      const more = Math.min(BATCH, rounds - this.taken);
      if (more === 0 || this.submit(more) === 0) await sleep(1);
    }
  }

  /**
   * The process's waiting completions before the tail, then the head
   * before them. After whole rounds the tail is back at its place, moved
   * on only by what arrived: every slot is then written as it was.
   */
  private putBack(pending?: number): void {
    const nr = this.nr, tail = this.readTo, keep = this.waiting();
    const from = (tail - keep + nr) % nr;
    const image = this.slots.slice();
    const keepers = [
      ...slotRanges(nr, this.before.head, inRing(this.before)).map(([i, n]) =>
        this.slots.slice(i * EVENT, (i + n) * EVENT)
      ),
      ...this.arrived,
    ];
    let at = from;
    for (const ev of keepers) {
      for (let k = 0; k < ev.length; k += EVENT, at = (at + 1) % nr) {
        image.set(ev.subarray(k, k + EVENT), at * EVENT);
      }
    }
    const whole = this.seen % nr === 0 && pending !== undefined;
    // Slots after the tail are the kernel's to write, for requests still in flight.
    const ranges = whole
      ? slotRanges(nr, tail + pending!, nr - pending!)
      : slotRanges(nr, from, keep);
    for (const [i, n] of ranges) {
      const bytes = image.subarray(i * EVENT, (i + n) * EVENT);
      writeMemory(this.w.pid, this.ring + BigInt(HEADER + i * EVENT), bytes);
    }
    this.setHead(whole && from === this.before.head % nr ? this.before.head : from);
  }
}

/**
 * Counts the requests of the process in flight in the context whose ring
 * is at `ring`, leaving the ring as it was (plus what arrived). amber's
 * polls are there only for the count: were amber killed meanwhile, they
 * would stay in the process, holding slots.
 */
async function countInFlight(w: AioDrainWhere, ring: bigint) {
  const probe = new Probe(w, ring, readHeader(w.pid, ring));
  let left: number | undefined;
  try {
    probe.open();
    try {
      probe.takeFreeSlots();
      left = probe.inFlight();
    } finally {
      // Also after a failure: closing the pipe would end the polls in the process's ring.
      await probe.release(left === undefined ? undefined : Math.max(0, left));
    }
    return { left, missed: probe.missed };
  } finally {
    probe.close();
  }
}

/**
 * Waits, while the process is frozen, until the context whose ring is at
 * `ring` has no request in flight, counting again and again (less often
 * as time goes by); refuses after w.timeoutMs. The ring is left as the
 * process had it, plus the completions that arrived.
 */
export async function drainAio(w: AioDrainWhere, ring: bigint): Promise<void> {
  const deadline = performance.now() + w.timeoutMs;
  let count = await countInFlight(w, ring);
  for (let pause = 1; count.left > 0 && performance.now() < deadline; pause *= 2) {
    await sleep(Math.min(pause, MAX_PAUSE_MS, Math.max(0, deadline - performance.now())));
    count = await countInFlight(w, ring);
  }
  const { left, missed } = count;
  if (left < 0) {
    throw new RefusalError(
      `the ring's head was moved back past completions the kernel counts as reaped; ` +
        "its requests cannot be counted",
    );
  }
  if (left > 0) {
    const elsewhere = missed.length
      ? ` (or held by CPUs ${missed.join(",")}, where amber could not count)`
      : "";
    throw new RefusalError(
      `${left} request${left === 1 ? "" : "s"} still in flight${elsewhere} after ` +
        `${w.timeoutMs / 1000} s (--aio-timeout)`,
    );
  }
}
