/**
 * What SysV semaphore sets and message queues have in common: their rows
 * in /proc/sysvipc, their owner and mode, and being made again under
 * their own id (through /proc/sys/kernel/{sem,msg}_next_id) by a restored
 * process with the creator's ids.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import type { RestoreContext } from "../context.ts";
import { AmberError } from "../errors.ts";
import { putBytes } from "../scratch.ts";

export const IPC_CREAT = 0o1000, IPC_EXCL = 0o2000, IPC_RMID = 0, IPC_SET = 1;

export const IpcOwner = z.object({
  key: z.number().int(),
  id: z.number().int().min(0),
  uid: z.number().int().min(0),
  gid: z.number().int().min(0),
  cuid: z.number().int().min(0),
  cgid: z.number().int().min(0),
  mode: z.number().int().min(0).max(0o777),
});
export type IpcOwnerImage = z.output<typeof IpcOwner>;

export type IpcKind = "sem" | "msg";

/** Rows of /proc/sysvipc/NAME as column → number. */
export function sysvTable(name: IpcKind): Record<string, number>[] {
  let text: string;
  try {
    text = Deno.readTextFileSync(`/proc/sysvipc/${name}`);
  } catch {
    return []; // no SysV IPC in this kernel
  }
  const [head, ...rows] = text.trim().split("\n").map((l) => l.trim().split(/\s+/));
  return rows.map((r) => Object.fromEntries(head.map((h, i) => [h, Number(r[i])])));
}

export function keyHex(key: number): string {
  return `0x${(key >>> 0).toString(16).padStart(8, "0")}`;
}

/** Whether `pid` is a live process (not a zombie) outside what the dump has seen. */
export function liveProcess(pid: number): boolean {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return false;
  }
}

/** struct ipc64_perm with uid, gid and mode, inside a zeroed ds of `size` bytes. */
export function permBytes(o: IpcOwnerImage, size: number): DataView {
  const ds = new DataView(new ArrayBuffer(size));
  ds.setUint32(4, o.uid, true);
  ds.setUint32(8, o.gid, true);
  ds.setUint32(20, o.mode, true);
  return ds;
}

/** Passes a ds to IPC_SET through the process's scratch area. */
export function putDs(ctx: RestoreContext, ds: DataView): bigint {
  return putBytes(ctx.pid, ctx.scratch, new Uint8Array(ds.buffer));
}

/**
 * Makes the object again under its own id, from the restored process (as
 * yet root, before its credentials) running as the creator (effective
 * uid and gid are the creator's in the kernel's eyes: cuid/cgid cannot be
 * set otherwise). `get` makes it and returns the id or -errno.
 */
export function recreate(
  ctx: RestoreContext,
  kind: IpcKind,
  o: IpcOwnerImage,
  get: () => bigint,
): void {
  const inj = ctx.injector;
  // The next object of this kind gets this id; the kernel forgets it once used.
  Deno.writeTextFileSync(`/proc/sys/kernel/${kind}_next_id`, `${o.id}\n`);
  let r: bigint;
  inj.call("setresgid", NR.setresgid, -1, o.cgid, -1);
  inj.call("setresuid", NR.setresuid, -1, o.cuid, -1);
  try {
    r = get();
  } finally {
    inj.call("setresuid", NR.setresuid, -1, 0, -1);
    inj.call("setresgid", NR.setresgid, -1, 0, -1);
  }
  if (r < 0n) {
    // Use up the id asked for, so that nobody else's next object gets it.
    const spare = kind === "sem"
      ? inj.raw(NR.semget, 0, 1, IPC_CREAT | 0o600)
      : inj.raw(NR.msgget, 0, IPC_CREAT | 0o600);
    if (spare >= 0n) removeFrom(ctx, kind, Number(spare));
    throw new AmberError(`${kind}get(key ${keyHex(o.key)}): errno ${-r}`);
  }
  if (Number(r) !== o.id) {
    removeFrom(ctx, kind, Number(r));
    throw new AmberError(`${kind}get made id ${r}, wanted ${o.id}`);
  }
}

/** IPC_RMID, run by the restored process. */
function removeFrom(ctx: RestoreContext, kind: IpcKind, id: number): void {
  if (kind === "sem") ctx.injector.raw(NR.semctl, id, 0, IPC_RMID, 0);
  else ctx.injector.raw(NR.msgctl, id, IPC_RMID, 0);
}

/**
 * Why object `o` cannot be made again or taken over now, if it cannot:
 * its id is another object's, or its key is. `same` says whether the row
 * with its id is the same object (key and shape).
 */
export function ipcConflict(
  kind: IpcKind,
  what: string,
  o: IpcOwnerImage,
  same: (row: Record<string, number>) => boolean,
): string | undefined {
  const idCol = kind === "sem" ? "semid" : "msqid";
  for (const row of sysvTable(kind)) {
    if (row[idCol] === o.id && !same(row)) {
      return `SysV ${what} id ${o.id} is now another one (key ${keyHex(row.key)})`;
    }
    if (row[idCol] !== o.id && o.key !== 0 && row.key === o.key) {
      return `SysV ${what} key ${keyHex(o.key)} now belongs to id ${row[idCol]}`;
    }
  }
}

/** Whether an object of `kind` with this id exists now. */
export function ipcExists(kind: IpcKind, id: number): boolean {
  const idCol = kind === "sem" ? "semid" : "msqid";
  return sysvTable(kind).some((row) => row[idCol] === id);
}
