/**
 * File locks held by the process: POSIX record locks (owned by the
 * process), OFD locks and flock locks (owned by an open file description),
 * read from the `lock:` lines of /proc/PID/fdinfo. Restore takes them
 * again on the restored descriptors, after every descriptor is in place
 * (closing any descriptor of a file drops the process's POSIX locks on it)
 * and before any process runs, so no outside process can slip in. Leases
 * are refused for now.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { SysError } from "../../ffi/libc.ts";
import { definePart, type RestoreContext } from "../context.ts";
import { AmberError, withContext } from "../errors.ts";
import { u64 } from "../images/codec.ts";
import { listProcNumbers, readProcLink, readProcText } from "../proc/read.ts";
import { putBytes } from "../scratch.ts";

const F_SETLK = 6, F_OFD_SETLK = 37;
const F_RDLCK = 0, F_WRLCK = 1;
const LOCK_SH = 1, LOCK_EX = 2, LOCK_NB = 4;
const EAGAIN = 11, EACCES = 13;
const O_ACCMODE = 3, O_RDONLY = 0, O_WRONLY = 1;

const Lock = z.object({
  /** The descriptor it is taken again on. */
  fd: z.number().int().min(0),
  path: z.string(),
  kind: z.enum(["posix", "ofd", "flock", "lease", "other"]),
  /** As /proc/locks prints it: POSIX, OFDLCK, FLOCK, LEASE, DELEG... */
  label: z.string(),
  type: z.enum(["read", "write", "other"]),
  start: u64,
  /** Last byte; absent: to the end of the file (EOF), however it grows. */
  end: u64.optional(),
});
type LockImage = z.output<typeof Lock>;

/** `lock:\t1: POSIX  ADVISORY  WRITE 1234 fe:00:5678 0 EOF` */
const LINE =
  /^lock:\s+\d+:\s+(->\s+)?(\S+)\s+\S+\s+(\S+)\s+-?\d+\s+[0-9a-f]+:[0-9a-f]+:\d+\s+(\d+)\s+(\d+|EOF)\s*$/;

const KINDS: Record<string, LockImage["kind"]> = {
  POSIX: "posix",
  OFDLCK: "ofd",
  FLOCK: "flock",
  LEASE: "lease",
};

function describe(l: { label: string; type: string; start: bigint; end?: bigint }): string {
  return `${l.label} ${l.type} lock ${l.start}..${l.end ?? "EOF"}`;
}

/** Whether a descriptor opened with `flags` can take the lock again (fcntl checks the mode). */
function modeFits(flags: number, { kind, type }: Pick<LockImage, "kind" | "type">): boolean {
  if (kind === "flock") return true;
  const mode = flags & O_ACCMODE;
  return type === "read" ? mode !== O_WRONLY : type === "write" ? mode !== O_RDONLY : true;
}

/** Every lock of the process once, each on a descriptor that can take it again. */
function dumpLocks(pid: number): z.input<typeof Lock>[] {
  const out: z.input<typeof Lock>[] = [];
  const seen = new Set<string>();
  for (const fd of listProcNumbers(pid, "fd")) {
    let info: string, path: string;
    try {
      info = readProcText(pid, `fdinfo/${fd}`);
      path = readProcLink(pid, `fd/${fd}`);
    } catch {
      continue; // the fds part reports descriptors it cannot read
    }
    const flags = parseInt(/^flags:\s*(\d+)/m.exec(info)?.[1] ?? "0", 8);
    for (const line of info.split("\n")) {
      const m = LINE.exec(line);
      if (!line.startsWith("lock:")) continue;
      if (!m) throw new AmberError(`fd ${fd}: fdinfo: cannot parse "${line}"`);
      if (m[1]) continue; // a waiter, not a holder
      const lock = {
        fd,
        path,
        kind: KINDS[m[2]] ?? "other" as const,
        label: m[2],
        type: m[3] === "READ"
          ? "read" as const
          : m[3] === "WRITE"
          ? "write" as const
          : "other" as const,
        start: BigInt(m[4]),
        end: m[5] === "EOF" ? undefined : BigInt(m[5]),
      };
      // A POSIX lock shows on every descriptor of its file; the others on
      // every descriptor of their open file description (taking them twice
      // is harmless, but once is enough).
      const key = `${lock.kind === "posix" ? path : fd}:${describe(lock)}`;
      if (seen.has(key) || !modeFits(flags, lock)) continue;
      seen.add(key);
      out.push(lock);
    }
  }
  return out;
}

/** Takes one lock again, without waiting: someone else holding it now fails the restore. */
function takeLock(ctx: RestoreContext, l: LockImage): void {
  const inj = ctx.injector;
  if (l.kind === "flock") {
    inj.call("flock", NR.flock, l.fd, (l.type === "write" ? LOCK_EX : LOCK_SH) | LOCK_NB);
    return;
  }
  // struct flock: l_type, l_whence (shorts), l_start, l_len (off_t), l_pid.
  const fl = new DataView(new ArrayBuffer(32));
  fl.setInt16(0, l.type === "write" ? F_WRLCK : F_RDLCK, true);
  fl.setInt16(2, 0, true); // SEEK_SET
  fl.setBigInt64(8, l.start, true);
  fl.setBigInt64(16, l.end === undefined ? 0n : l.end - l.start + 1n, true);
  const at = putBytes(ctx.pid, ctx.scratch, new Uint8Array(fl.buffer));
  const cmd = l.kind === "ofd" ? F_OFD_SETLK : F_SETLK;
  inj.call(`fcntl(${l.kind === "ofd" ? "F_OFD_SETLK" : "F_SETLK"})`, NR.fcntl, l.fd, cmd, at);
}

export const locksPart = definePart({
  name: "locks",
  version: 1,
  schema: z.object({ locks: z.array(Lock) }),
  dump: ({ pid }) => ({ locks: dumpLocks(pid) }),
  unrestorable({ locks }) {
    const l = locks.find((l) => l.kind === "lease" || l.kind === "other" || l.type === "other");
    if (l) return `fd ${l.fd}: ${l.path}: ${describe(l)}: not supported yet`;
  },
  precheck(data) {
    const why = locksPart.unrestorable!(data);
    if (why) throw new AmberError(why);
  },
  restore(ctx, { locks }) {
    for (const l of locks) {
      withContext(`fd ${l.fd}: ${l.path}: ${describe(l)}`, () => {
        try {
          takeLock(ctx, l);
        } catch (e) {
          if (e instanceof SysError && (e.errno === EAGAIN || e.errno === EACCES)) {
            throw new AmberError("another process holds a conflicting lock now");
          }
          throw e;
        }
      });
    }
  },
});
