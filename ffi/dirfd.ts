/**
 * Files opened relative to a directory descriptor, never following a
 * symlink: what the images directory code needs to treat a directory
 * another user might have touched the way OpenSSH treats ~/.ssh (ownership
 * and mode checked on the open descriptor, names resolved with openat).
 */
import { check, lastErrno, libc, SysError } from "./libc.ts";

export const O_RDONLY = 0, O_WRONLY = 0o1, O_CREAT = 0o100, O_EXCL = 0o200;
export const O_NONBLOCK = 0o4000, O_DIRECTORY = 0o200000, O_NOFOLLOW = 0o400000;
const O_CLOEXEC = 0o2000000;
const AT_REMOVEDIR = 0x200;
const LOCK_EX = 2, LOCK_NB = 4, EWOULDBLOCK = 11;
const S_IFMT = 0o170000, S_IFREG = 0o100000, S_IFDIR = 0o040000;
const STAT_SIZE = 144;

const TYPES: Record<number, string> = {
  0o010000: "FIFO",
  0o020000: "character device",
  0o040000: "directory",
  0o060000: "block device",
  0o100000: "regular file",
  0o120000: "symlink",
  0o140000: "socket",
};

/** fstat(2) of an open descriptor, the fields amber looks at. */
export interface FdStat {
  mode: number;
  uid: number;
  gid: number;
  size: number;
  isFile: boolean;
  isDirectory: boolean;
  /** "regular file", "FIFO", "character device", ... */
  type: string;
}

function cstr(s: string): Uint8Array {
  return new TextEncoder().encode(s + "\0");
}

/** The caller's effective uid: who must own the files amber trusts. */
export function effectiveUid(): number {
  return libc().geteuid();
}

/** An open descriptor with the path it was opened as (for messages). */
export class Fd {
  #fd: number;
  constructor(fd: number, readonly path: string) {
    this.#fd = fd;
  }

  /** The descriptor number; -1 once closed or released. */
  get fd(): number {
    return this.#fd;
  }

  /** Opens directory `path` itself (not a symlink to one, unless `follow`). */
  static openDir(path: string, follow = false): Fd {
    const flags = O_RDONLY | O_DIRECTORY | O_CLOEXEC | (follow ? 0 : O_NOFOLLOW);
    return new Fd(check("open", libc().open(cstr(path), flags, 0)), path);
  }

  /** openat(this, name, flags | O_NOFOLLOW | O_CLOEXEC, mode). */
  openAt(name: string, flags: number, mode = 0): Fd {
    const fd = libc().openat(this.fd, cstr(name), flags | O_NOFOLLOW | O_CLOEXEC, mode);
    return new Fd(check("open", fd), `${this.path}/${name}`);
  }

  stat(): FdStat {
    const buf = new Uint8Array(STAT_SIZE);
    check("fstat", libc().fstat(this.fd, buf));
    const v = new DataView(buf.buffer);
    const mode = v.getUint32(24, true);
    return {
      mode,
      uid: v.getUint32(28, true),
      gid: v.getUint32(32, true),
      size: Number(v.getBigInt64(48, true)),
      isFile: (mode & S_IFMT) === S_IFREG,
      isDirectory: (mode & S_IFMT) === S_IFDIR,
      type: TYPES[mode & S_IFMT] ?? "special file",
    };
  }

  /** Reads exactly `size` bytes from offset 0; a file that shrank is an error. */
  readExactly(size: number): Uint8Array {
    const out = new Uint8Array(size);
    let done = 0;
    while (done < size) {
      const n = Number(
        check(
          "read",
          libc().pread64(this.fd, out.subarray(done), BigInt(size - done), BigInt(done)),
        ),
      );
      if (n === 0) throw new Error(`read: file ended at ${done} of ${size} bytes`);
      done += n;
    }
    return out;
  }

  writeAll(data: Uint8Array): void {
    let done = 0;
    while (done < data.length) {
      done += Number(
        check("write", libc().write(this.fd, data.subarray(done), BigInt(data.length - done))),
      );
    }
  }

  sync(): void {
    check("fsync", libc().fsync(this.fd));
  }

  /** fsync on a pool thread, so that several can be in flight (the journal takes them together). */
  async syncAsync(): Promise<void> {
    // errno of a pool thread is lost: a failure is asked again here, to learn why.
    if (await libc().fsync_async(this.fd) !== 0) this.sync();
  }

  /** Makes everything written to this descriptor's filesystem durable (syncfs). */
  syncFilesystem(): void {
    check("syncfs", libc().syncfs(this.fd));
  }

  /** flock(LOCK_EX | LOCK_NB): false if another descriptor holds it. */
  tryLock(): boolean {
    if (libc().flock(this.fd, LOCK_EX | LOCK_NB) === 0) return true;
    const errno = lastErrno();
    if (errno === EWOULDBLOCK) return false;
    throw new SysError("flock", errno);
  }

  /** Gives the descriptor away (e.g. to a RawFile); this object no longer closes it. */
  release(): number {
    const fd = this.#fd;
    this.#fd = -1;
    return fd;
  }

  close(): void {
    if (this.fd >= 0) libc().close(this.release());
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** mkdirat(dir, name, mode). */
export function mkdirAt(dir: Fd, name: string, mode: number): void {
  check("mkdir", libc().mkdirat(dir.fd, cstr(name), mode));
}

/** unlinkat(dir, name) for a file, or rmdir of an (empty) directory. */
export function unlinkAt(dir: Fd, name: string, isDir = false): void {
  check(isDir ? "rmdir" : "unlink", libc().unlinkat(dir.fd, cstr(name), isDir ? AT_REMOVEDIR : 0));
}

/** renameat(from, name, to, newName): replaces newName, never follows it. */
export function renameAt(from: Fd, name: string, to: Fd, newName = name): void {
  check("rename", libc().renameat(from.fd, cstr(name), to.fd, cstr(newName)));
}

/** Names in an open directory (read through its descriptor, not its path). */
export function listDirFd(dir: Fd): { name: string; isFile: boolean; isDirectory: boolean }[] {
  return [...Deno.readDirSync(`/proc/self/fd/${dir.fd}`)].map((e) => ({
    name: e.name,
    isFile: e.isFile,
    isDirectory: e.isDirectory,
  }));
}

/** Whether a failure is errno `code` (e.g. "ENOENT"). */
export function isErrno(e: unknown, code: string): boolean {
  return e instanceof SysError && e.code === code;
}

/**
 * Replaces file `path` with `data` atomically: a new file beside it
 * (O_EXCL|O_NOFOLLOW) renamed over it, so a symlink planted at `path` is
 * replaced, never followed. (The directory itself may be a symlink, e.g.
 * /var/run.)
 */
export function replaceFile(path: string, data: Uint8Array, mode = 0o644): void {
  const slash = path.lastIndexOf("/");
  const name = path.slice(slash + 1);
  if (!name || name === "." || name === "..") throw new Error("not a file name");
  using dir = Fd.openDir(slash < 0 ? "." : path.slice(0, slash) || "/", true);
  const tmp = `.${name}.amber-${Deno.pid}`;
  try {
    using fd = dir.openAt(tmp, O_WRONLY | O_CREAT | O_EXCL, mode);
    fd.writeAll(data);
    fd.sync();
    renameAt(dir, tmp, dir, name);
  } catch (e) {
    try {
      unlinkAt(dir, tmp);
    } catch { /* not created, or renamed */ }
    throw e;
  }
}
