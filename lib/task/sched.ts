/**
 * Scheduling, per thread: policy and priority (sched_attr, with nice,
 * reset-on-fork, deadline parameters and utilization clamps), CPU
 * affinity and I/O priority. amber reads and sets them by tid itself;
 * restore runs once every thread exists.
 */
import { z } from "zod";
import {
  getAffinity,
  getIoprio,
  getNice,
  MAX_CPU,
  type SchedAttr,
  schedGetattr,
  schedSetattr,
  setAffinity,
  setIoprio,
  setNice,
} from "../../ffi/sched.ts";
import { definePart } from "../context.ts";
import { AmberError, withContext } from "../errors.ts";
import { pidNumber, u64 } from "../images/codec.ts";

const u32 = z.number().int().min(0).max(0xffffffff);
/** Flags sched_getattr reports that sched_setattr takes back: RESET_ON_FORK, RECLAIM, DL_OVERRUN. */
const KEPT_FLAGS = 0x7n;
const SCHED_FLAG_UTIL_CLAMP = 0x20n | 0x40n;

const ThreadSched = z.object({
  tid: pidNumber,
  policy: u32,
  flags: u64,
  nice: z.number().int().min(-20).max(19),
  priority: u32,
  runtime: u64,
  deadline: u64,
  period: u64,
  utilMin: u32,
  utilMax: u32,
  affinity: z.array(z.number().int().min(0).max(MAX_CPU)).min(1),
  ioprio: u32,
});
type ThreadSched = z.output<typeof ThreadSched>;

function dumpThread(tid: number): z.input<typeof ThreadSched> {
  const attr = schedGetattr(tid);
  return { tid, ...attr, nice: getNice(tid), affinity: getAffinity(tid), ioprio: getIoprio(tid) };
}

function sameAttr(a: SchedAttr, b: SchedAttr): boolean {
  return a.policy === b.policy && (a.flags & KEPT_FLAGS) === (b.flags & KEPT_FLAGS) &&
    a.priority === b.priority && a.runtime === b.runtime && a.deadline === b.deadline &&
    a.period === b.period && a.utilMin === b.utilMin && a.utilMax === b.utilMax;
}

function restoreAttr(tid: number, want: ThreadSched): void {
  // A real-time or deadline thread keeps the nice value it had before: set that first.
  if (getNice(tid) !== want.nice) setNice(tid, want.nice);
  const now = schedGetattr(tid);
  if (sameAttr(now, want)) return;
  const clamp = now.utilMin !== want.utilMin || now.utilMax !== want.utilMax;
  const flags = (want.flags & KEPT_FLAGS) | (clamp ? SCHED_FLAG_UTIL_CLAMP : 0n);
  schedSetattr(tid, { ...want, flags });
}

export const schedPart = definePart({
  name: "sched",
  version: 1,
  schema: z.object({ threads: z.array(ThreadSched).min(1) }),
  dump: ({ proc }) => ({
    threads: proc.threads.map((tid) => withContext(`tid ${tid}`, () => dumpThread(tid))),
  }),
  restore(ctx, { threads }) {
    for (const t of threads) {
      if (!ctx.threads.has(t.tid)) throw new AmberError(`tid ${t.tid}: thread not created`);
      withContext(`tid ${t.tid}`, () => {
        if (getAffinity(t.tid).join() !== t.affinity.join()) setAffinity(t.tid, t.affinity);
        restoreAttr(t.tid, t);
        if (getIoprio(t.tid) !== t.ioprio) setIoprio(t.tid, t.ioprio);
      });
    }
  },
});
