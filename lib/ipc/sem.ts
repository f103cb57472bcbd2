/**
 * SysV semaphore sets. The first process of the tree that used a set
 * records it whole (owner, creator, mode, every value with GETALL, every
 * semaphore's last pid); each process records the semaphores it was the
 * last to operate on. Restore takes the set over if it still has its id
 * and key (a dump that kills the tree leaves it, as the kernel does), or
 * makes it again under that id, and puts every value back with SETVAL.
 * SETVAL makes the caller a semaphore's last pid, so each process then
 * sets its own semaphores again itself: GETPID is the dumped one for
 * them, and a later dump sees the set as the tree's again.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { removeIpc, semLastPids, semStat, semValues } from "../../ffi/sysvipc.ts";
import { kindState, type RestoreContext, type TreeRestoreState } from "../context.ts";
import { AmberError } from "../errors.ts";
import {
  IPC_CREAT,
  IPC_EXCL,
  IPC_SET,
  ipcConflict,
  ipcExists,
  IpcOwner,
  keyHex,
  permBytes,
  putDs,
  recreate,
} from "./ipcobj.ts";

const SETVAL = 16;
const SEMVMX = 32767;

export const SemSet = IpcOwner.extend({
  values: z.array(z.number().int().min(0).max(SEMVMX)).min(1).max(32000),
  /** Each semaphore's last pid (semctl GETPID), 0 if none. */
  pids: z.array(z.number().int().min(0)),
  /** Last semop, seconds (not restored: no call sets it). */
  otime: z.number().int(),
}).refine((s) => s.pids.length === s.values.length, "one pid per semaphore");
export type SemSetImage = z.output<typeof SemSet>;

/** Semaphores of a set whose last operation was this process's. */
export const OwnSems = z.object({
  id: z.number().int().min(0),
  nums: z.array(z.number().int().min(0)),
  values: z.array(z.number().int().min(0).max(SEMVMX)),
});

export function semLabel(s: { key: number; id: number }): string {
  return `SysV semaphore set ${keyHex(s.key)} (id ${s.id})`;
}

/** Sets some semaphore of which `pid` operated on last, with every semaphore's last pid. */
export function setsUsedBy(pid: number, rows: Record<string, number>[]): Map<number, number[]> {
  const out = new Map<number, number[]>();
  for (const r of rows) {
    try {
      const pids = semLastPids(r.semid, r.nsems);
      if (pids.includes(pid)) out.set(r.semid, pids);
    } catch { /* removed since the table was read */ }
  }
  return out;
}

export function dumpSemSet(id: number, pids: number[]): z.input<typeof SemSet> {
  const st = semStat(id);
  const { nsems: _, otime, ...owner } = st;
  return { ...owner, id, values: semValues(id, st.nsems), pids, otime };
}

export function ownSems(pid: number, id: number, pids: number[], values: number[]) {
  const nums = pids.flatMap((p, i) => p === pid ? [i] : []);
  return { id, nums, values: nums.map((i) => values[i]) };
}

/** Why set `s` cannot be restored on this machine now, if it cannot. */
export function semConflict(s: SemSetImage): string | undefined {
  return ipcConflict(
    "sem",
    "semaphore set",
    s,
    (row) => row.key === s.key && row.nsems === s.values.length,
  );
}

/** Ids of the sets restored so far in this restore. */
function restoredSets(tree: TreeRestoreState): Set<number> {
  return kindState(tree.kinds, "sysv semaphores", () => new Set<number>());
}

function setVal(ctx: RestoreContext, id: number, num: number, value: number): void {
  ctx.injector.call(`semctl(${id}, ${num}, SETVAL ${value})`, NR.semctl, id, num, SETVAL, value);
}

/** Takes set `s` over or makes it again, then puts its owner, mode and values back. */
export function restoreSemSet(ctx: RestoreContext, s: SemSetImage): void {
  const why = semConflict(s);
  if (why) throw new AmberError(why);
  const exists = ipcExists("sem", s.id);
  if (!exists) {
    const mode = IPC_CREAT | IPC_EXCL | s.mode;
    recreate(ctx, "sem", s, () => ctx.injector.raw(NR.semget, s.key, s.values.length, mode));
    // Made by this restore: it goes if the restore fails.
    ctx.tree.onEnd.push((ok) => {
      if (!ok) removeIpc("sem", s.id);
    });
  }
  // struct semid64_ds: 104 bytes.
  ctx.injector.call("semctl(IPC_SET)", NR.semctl, s.id, 0, IPC_SET, putDs(ctx, permBytes(s, 104)));
  s.values.forEach((v, i) => {
    // A new set's semaphores are 0 with no last pid: one never used stays so.
    if (exists || v !== 0 || s.pids[i] !== 0) setVal(ctx, s.id, i, v);
  });
  restoredSets(ctx.tree).add(s.id);
}

/** This process's own semaphores, operated on by it again so that GETPID names it. */
export function restoreOwnSems(ctx: RestoreContext, own: z.output<typeof OwnSems>): void {
  if (!restoredSets(ctx.tree).has(own.id)) {
    throw new AmberError(`SysV semaphore set id ${own.id}: not restored by an earlier process`);
  }
  own.nums.forEach((n, i) => setVal(ctx, own.id, n, own.values[i]));
}
