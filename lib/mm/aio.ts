/**
 * AIO contexts (io_setup). A context is known to user space by its ring,
 * the `/[aio]` mapping: the context id is the ring's address, and the
 * ring holds the completions not yet reaped, from head (advanced by
 * io_getevents) to tail. Dump copies the ring's size, head, tail and
 * those completions.
 *
 * Restore makes a context with a ring of the same size, and brings the
 * kernel's own tail (where it writes the next completion, kept apart from
 * the ring's copy) to the dumped one the only way there is: requests of
 * its own, zero-byte reads of /dev/null that complete inside io_submit.
 * As many as the dumped head are submitted and reaped, then as many as
 * there were completions waiting are submitted and left in the ring,
 * whose slots then get the dumped completions written over them. Head,
 * tail, the kernel's tail and its count of requests in use are then what
 * they were. The ring is last moved to its dumped address (mremap: the
 * kernel follows its ring), which makes that address the context id again.
 *
 * The kernel counts free slots per CPU and moves them between a CPU's
 * count and the context's in batches, so a thread that moves between
 * CPUs while submitting strands slots on the one it left, and a ring
 * nearly full (fio: 125 of 127) then cannot take them all. The thread
 * doing this is held on one CPU throughout.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { readMemoryProc, writeMemory } from "../../ffi/memory.ts";
import { getAffinity, setAffinity } from "../../ffi/sched.ts";
import type { Injector } from "../../ffi/inject.ts";
import type { RestoreContext } from "../context.ts";
import { AmberError, hex, withContextAsync } from "../errors.ts";
import { readMaps } from "../proc/maps.ts";
import { type AioDrainWhere, drainAio } from "./aiodrain.ts";
import { bytes } from "../images/codec.ts";
import { putBytes, putString } from "../scratch.ts";

const AIO_RING_MAGIC = 0xa10a10a1;
/** struct aio_ring and struct io_event are both 32 bytes. */
const HEADER = 32, EVENT = 32, IOCB = 64;
const PAGE = 4096;
const IOCB_CMD_PREAD = 0;
const MREMAP_MAYMOVE = 1, MREMAP_FIXED = 2;
const AT_FDCWD = -100, O_RDONLY = 0, O_CLOEXEC = 0o2000000;
const EINVAL = 22n;
/** Requests submitted (or reaped) per call, so that they fit in the scratch area. */
const BATCH = 128;

export const AioRing = z.object({
  /** Slots in the ring (the kernel's nr_events, from its io_setup argument). */
  nr: z.number().int().min(1),
  head: z.number().int().min(0),
  tail: z.number().int().min(0),
  /** The completions not yet reaped, head to tail (struct io_event each). */
  events: bytes,
}).refine(
  (r) =>
    r.head < r.nr && r.tail < r.nr &&
    r.events.length === ((r.tail - r.head + r.nr) % r.nr) * EVENT,
  "ring head, tail and completions do not agree",
);
export type AioRingImage = z.output<typeof AioRing>;

/** A ring as `show` prints it. */
export function aioRingText(r: AioRingImage): string {
  const waiting = r.events.length / EVENT;
  return `AIO ring of ${r.nr} events, head ${r.head}, tail ${r.tail}, ` +
    `${waiting} completion${waiting === 1 ? "" : "s"} waiting`;
}

export function isAioRing(path: string): boolean {
  return path.startsWith("/[aio]");
}

/** Bytes of a ring of `nr` slots (whole pages). */
function ringBytes(nr: number): number {
  return Math.ceil((HEADER + nr * EVENT) / PAGE) * PAGE;
}

/**
 * What is wrong with the ring header at start..end (the process can write
 * it), if anything: the kernel keeps its own size and tail, and writes
 * the ring's copies.
 */
function ringProblem(pid: number, start: bigint, end: bigint): string | undefined {
  const h = new DataView(readMemoryProc(pid, start, HEADER).buffer);
  const [nr, , tail, magic] = [0, 1, 2, 3].map((i) => h.getUint32(4 + i * 4, true));
  const incompat = h.getUint32(24, true), headerLength = h.getUint32(28, true);
  if (magic !== AIO_RING_MAGIC || incompat !== 0 || headerLength !== HEADER) {
    return "AIO ring: not a ring header amber knows";
  }
  if (nr < 2 || ringBytes(nr) !== Number(end - start)) {
    return `AIO ring of ${nr} events mapped in part: not supported yet`;
  }
  if (tail >= nr) return `AIO ring: tail ${tail} beyond its ${nr} events`;
}

/**
 * Whether the process `inj` runs in has the context of the ring at
 * `start`: io_getevents for no event says (a child inherits the mapping
 * over fork, not the context).
 */
function ownsContext(inj: Injector, start: bigint): boolean {
  const r = inj.raw(NR.io_getevents, start, 0, 0, 0, 0);
  if (r === -EINVAL) return false;
  if (r < 0n) throw new AmberError(`AIO ring: io_getevents: errno ${-r}`);
  return true;
}

/**
 * Before the rings are read: waits until no context of the frozen process
 * has a request in flight, or refuses (lib/mm/aiodrain.ts). Rings of
 * contexts it does not have are left to dumpAioRing to refuse.
 */
export async function drainAioContexts(w: AioDrainWhere): Promise<void> {
  for (const m of readMaps(w.pid).filter((m) => isAioRing(m.path))) {
    if (!ringProblem(w.pid, m.start, m.end) && ownsContext(w.injector, m.start)) {
      await withContextAsync(`aio context 0x${hex(m.start)}`, () => drainAio(w, m.start));
    }
  }
}

/** The ring mapped at start..end of a frozen process, `inj` running in it, once drained. */
export function dumpAioRing(
  pid: number,
  inj: Injector,
  start: bigint,
  end: bigint,
): z.input<typeof AioRing> {
  const problem = ringProblem(pid, start, end);
  if (problem) throw new AmberError(problem);
  const h = new DataView(readMemoryProc(pid, start, HEADER).buffer);
  const [nr, head, tail] = [0, 1, 2].map((i) => h.getUint32(4 + i * 4, true));
  if (!ownsContext(inj, start)) {
    throw new AmberError("AIO ring of a context this process does not have (inherited over fork)");
  }
  // User space may write head; the kernel takes it modulo nr.
  const from = head % nr, count = (tail - from + nr) % nr;
  const events = new Uint8Array(count * EVENT);
  for (let i = 0; i < count; i++) {
    const slot = (from + i) % nr;
    events.set(readMemoryProc(pid, start + BigInt(HEADER + slot * EVENT), EVENT), i * EVENT);
  }
  return { nr, head: from, tail, events };
}

/** Where things go in the scratch area: the context id, iocbs, their pointers, reaped events. */
function layout(ctx: RestoreContext) {
  const idAt = 0, iocbs = 64, ptrs = iocbs + BATCH * IOCB, events = ptrs + BATCH * 8;
  const need = events + BATCH * EVENT + 64;
  if (need > ctx.scratch.size) throw new Error(`scratch: ${need} bytes needed for AIO`);
  return { idAt, iocbs, ptrs, events, devNull: events + BATCH * EVENT };
}

/** Submits `n` zero-byte reads of `fd` to context `id`, in batches; reaps them if `reap`. */
function submitDummies(ctx: RestoreContext, id: bigint, fd: number, n: number, reap: boolean) {
  const inj = ctx.injector, at = layout(ctx);
  const iocbs = new Uint8Array(BATCH * IOCB), v = new DataView(iocbs.buffer);
  const ptrs = new BigUint64Array(BATCH);
  for (let i = 0; i < BATCH; i++) {
    v.setUint16(i * IOCB + 16, IOCB_CMD_PREAD, true); // aio_lio_opcode
    v.setUint32(i * IOCB + 20, fd, true); // aio_fildes
    v.setBigUint64(i * IOCB + 24, ctx.scratch.addr + BigInt(at.events), true); // aio_buf
    ptrs[i] = ctx.scratch.addr + BigInt(at.iocbs + i * IOCB);
  }
  putBytes(ctx.pid, ctx.scratch, iocbs, at.iocbs);
  const ptrsAt = putBytes(ctx.pid, ctx.scratch, new Uint8Array(ptrs.buffer), at.ptrs);
  const eventsAt = ctx.scratch.addr + BigInt(at.events);
  for (let done = 0; done < n;) {
    const k = Math.min(BATCH, n - done);
    const got = Number(inj.call("io_submit", NR.io_submit, id, k, ptrsAt));
    if (got !== k) throw new AmberError(`io_submit took ${got} of ${k} requests`);
    if (reap) {
      const r = Number(inj.call("io_getevents", NR.io_getevents, id, k, k, eventsAt, 0));
      if (r !== k) throw new AmberError(`io_getevents reaped ${r} of ${k}`);
    }
    done += k;
  }
}

/**
 * The io_setup argument that makes a ring of `nr` slots: the kernel
 * takes at least 4 per possible CPU, doubles it, adds 2 and fills whole
 * pages, so ring sizes are 128 * pages - 1.
 */
function setupEvents(nr: number): number {
  return Math.floor((nr - 2) / 2);
}

/** Makes the context of the ring dumped at `start`, with its completions, at that address. */
export function restoreAioRing(ctx: RestoreContext, r: AioRingImage, start: bigint): void {
  const tid = ctx.injector.tid, cpus = getAffinity(tid);
  setAffinity(tid, cpus.slice(0, 1));
  try {
    restoreRingOnOneCpu(ctx, r, start);
  } finally {
    setAffinity(tid, cpus);
  }
}

function restoreRingOnOneCpu(ctx: RestoreContext, r: AioRingImage, start: bigint): void {
  const inj = ctx.injector, at = layout(ctx);
  putBytes(ctx.pid, ctx.scratch, new Uint8Array(8), at.idAt);
  inj.call("io_setup", NR.io_setup, setupEvents(r.nr), ctx.scratch.addr + BigInt(at.idAt));
  const id = new DataView(readMemoryProc(ctx.pid, ctx.scratch.addr, 8).buffer).getBigUint64(
    0,
    true,
  );
  const nr = new DataView(readMemoryProc(ctx.pid, id, HEADER).buffer).getUint32(4, true);
  if (nr !== r.nr) throw new AmberError(`io_setup made a ring of ${nr} events, not ${r.nr}`);
  const path = putString(ctx.pid, ctx.scratch, "/dev/null", at.devNull);
  const fd = Number(inj.call("open /dev/null", NR.openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC));
  try {
    submitDummies(ctx, id, fd, r.head, true);
    const waiting = r.events.length / EVENT;
    submitDummies(ctx, id, fd, waiting, false);
    const tail = new DataView(readMemoryProc(ctx.pid, id, HEADER).buffer).getUint32(12, true);
    if (tail !== r.tail) {
      throw new AmberError(`ring tail ${tail} after the requests, not ${r.tail}`);
    }
    for (let i = 0; i < waiting; i++) {
      const slot = (r.head + i) % r.nr;
      const ev = r.events.subarray(i * EVENT, (i + 1) * EVENT);
      writeMemory(ctx.pid, id + BigInt(HEADER + slot * EVENT), ev);
    }
  } finally {
    inj.call("close", NR.close, fd);
  }
  const size = ringBytes(r.nr);
  const moved = inj.call(
    "mremap AIO ring",
    NR.mremap,
    id,
    size,
    size,
    MREMAP_MAYMOVE | MREMAP_FIXED,
    start,
  );
  if (BigInt.asUintN(64, moved) !== start) throw new AmberError(`mremap landed at ${hex(moved)}`);
}
