/**
 * SysV shared memory attachments. Dump records the segment (key, id, mode,
 * owner, size, whether it was marked for removal) from /proc/sysvipc/shm;
 * its pages are stored like any shared memory's. Restore attaches the
 * segment with that id if it still exists (as a segment not marked for
 * removal does after its processes end), or creates it again under that id
 * (through /proc/sys/kernel/shm_next_id) and marks it for removal again
 * once attached. Later holders map the first holder's attachment.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import type { RestoreContext } from "../context.ts";
import { AmberError } from "../errors.ts";
import { putBytes } from "../scratch.ts";

const IPC_CREAT = 0o1000, IPC_EXCL = 0o2000, IPC_RMID = 0, IPC_SET = 1;
const SHM_DEST = 0o1000, SHM_RDONLY = 0o10000;
const MREMAP_MAYMOVE = 1, MREMAP_FIXED = 2;
const NEXT_ID = "/proc/sys/kernel/shm_next_id";

export const SysvShm = z.object({
  key: z.number().int(),
  id: z.number().int().min(0),
  mode: z.number().int().min(0).max(0o777),
  uid: z.number().int().min(0),
  gid: z.number().int().min(0),
  size: z.number().int().min(1),
  /** Marked for removal (IPC_RMID): it goes when its last attachment does. */
  removed: z.boolean(),
});
export type SysvShmImage = z.output<typeof SysvShm>;

interface Segment extends SysvShmImage {
  nattch: number;
}

/** The segments of /proc/sysvipc/shm by id. */
function segments(): Map<number, Segment> {
  const out = new Map<number, Segment>();
  const lines = Deno.readTextFileSync("/proc/sysvipc/shm").trim().split("\n").slice(1);
  for (const line of lines) {
    const f = line.trim().split(/\s+/);
    const perms = parseInt(f[2], 8);
    out.set(Number(f[1]), {
      key: Number(f[0]),
      id: Number(f[1]),
      mode: perms & 0o777,
      size: Number(f[3]),
      nattch: Number(f[6]),
      uid: Number(f[7]),
      gid: Number(f[8]),
      removed: (perms & SHM_DEST) !== 0,
    });
  }
  return out;
}

/** The segment behind a /SYSV mapping (its inode number is the segment id). */
export function dumpSysvShm(id: number): SysvShmImage {
  const s = segments().get(id);
  if (!s) throw new AmberError(`SysV shared memory segment ${id} is not in /proc/sysvipc/shm`);
  const { nattch: _, ...image } = s;
  return image;
}

/** Creates segment `s` again under its own id. */
function recreate(ctx: RestoreContext, s: SysvShmImage): void {
  const inj = ctx.injector;
  // The next segment created gets this id; the kernel forgets it once used.
  Deno.writeTextFileSync(NEXT_ID, `${s.id}\n`);
  const key = s.removed ? 0 : s.key; // a removed segment's key is IPC_PRIVATE
  const r = inj.raw(NR.shmget, key, s.size, IPC_CREAT | IPC_EXCL | s.mode);
  if (r < 0n) {
    // Use up the id asked for, so that nobody else's next segment gets it.
    const spare = inj.raw(NR.shmget, 0, 4096, IPC_CREAT | 0o600);
    if (spare >= 0n) inj.raw(NR.shmctl, spare, IPC_RMID, 0);
    throw new AmberError(`shmget(key ${key}, ${s.size} bytes): errno ${-r}`);
  }
  const id = Number(r);
  if (id !== s.id) {
    inj.raw(NR.shmctl, id, IPC_RMID, 0);
    throw new AmberError(`shmget made segment ${id}, wanted ${s.id}`);
  }
  // struct ipc64_perm at the start of struct shmid64_ds: uid, gid at 4, 8; mode at 20.
  const ds = new DataView(new ArrayBuffer(112));
  ds.setUint32(4, s.uid, true);
  ds.setUint32(8, s.gid, true);
  ds.setUint16(20, s.mode, true);
  const at = putBytes(ctx.pid, ctx.scratch, new Uint8Array(ds.buffer));
  inj.call("shmctl(IPC_SET)", NR.shmctl, id, IPC_SET, at);
}

/** Why segment `s` cannot be attached again now, if it cannot. */
export function sysvConflict(s: SysvShmImage): string | undefined {
  const now = segments().get(s.id);
  if (!now) return undefined;
  if (now.size !== s.size || (!s.removed && now.key !== s.key)) {
    return `SysV shared memory id ${s.id} is now another segment (key ${now.key}, ${now.size} bytes)`;
  }
}

/**
 * Attaches segment `s` at `addr`, read-write while the pages go in (the mm
 * part sets the final protection), creating it again if it is gone.
 */
export function attachSysvShm(ctx: RestoreContext, s: SysvShmImage, addr: bigint): void {
  const inj = ctx.injector;
  const exists = segments().has(s.id);
  const why = sysvConflict(s);
  if (why) throw new AmberError(why);
  if (!exists) recreate(ctx, s);
  try {
    const got = inj.call(`shmat ${s.id}`, NR.shmat, s.id, addr, 0);
    if (BigInt.asUintN(64, got) !== addr) {
      throw new AmberError(`shmat landed at ${got.toString(16)}`);
    }
  } catch (e) {
    // A segment made here and not attached would outlive the failed restore.
    if (!exists) inj.raw(NR.shmctl, s.id, IPC_RMID, 0);
    throw e;
  }
  if (!exists && s.removed) inj.call("shmctl(IPC_RMID)", NR.shmctl, s.id, IPC_RMID, 0);
}

/**
 * Makes the attachment at `addr` read-only for good: attached read-write
 * for the fill, it could be mprotect()ed writable, which the process's
 * SHM_RDONLY attachment could not. A read-only attachment is made
 * elsewhere first (so a segment marked for removal never loses its last
 * attachment), the read-write one detached, and the new one moved in.
 */
export function reattachReadOnly(ctx: RestoreContext, s: SysvShmImage, addr: bigint): void {
  const inj = ctx.injector;
  const ro = inj.call(`shmat ${s.id} SHM_RDONLY`, NR.shmat, s.id, 0, SHM_RDONLY);
  inj.call(`shmdt`, NR.shmdt, addr);
  const size = BigInt(s.size + 4095) & ~4095n;
  const flags = MREMAP_MAYMOVE | MREMAP_FIXED;
  const got = inj.call("mremap", NR.mremap, ro, size, size, flags, addr);
  if (BigInt.asUintN(64, got) !== addr) {
    throw new AmberError(`mremap landed at ${got.toString(16)}`);
  }
}
