/**
 * A file read or written with positioned I/O on pool threads, so several
 * transfers (and memory copies) can be in flight at once. Bulk page data only.
 */
import { addressOf, check, lastErrno, libc, SysError } from "./libc.ts";

type PositionedCall = ReturnType<typeof libc>["pread64_async"];

const F_GETFL = 3, F_SETFL = 4, O_DIRECT = 0o40000, EOPNOTSUPP = 95;
/** What O_DIRECT asks of buffers, offsets and lengths here. */
export const DIRECT_ALIGN = 4096;

/** A zeroed buffer whose first byte is DIRECT_ALIGN-aligned in memory, as O_DIRECT needs. */
export function alignedBuffer(size: number): Uint8Array {
  const raw = new Uint8Array(size + DIRECT_ALIGN);
  const skew = Number(addressOf(raw) % BigInt(DIRECT_ALIGN));
  return raw.subarray(skew ? DIRECT_ALIGN - skew : 0, (skew ? DIRECT_ALIGN - skew : 0) + size);
}

export class RawFile {
  private constructor(readonly fd: number, readonly path: string) {}

  /**
   * Takes over an open descriptor. Image files are opened relative to
   * their directory, never by path (see lib/images/dir.ts).
   */
  static fromFd(fd: number, path: string): RawFile {
    return new RawFile(fd, path);
  }

  /** Fills `data` from `offset`; throws if the file ends first. */
  async preadAll(data: Uint8Array, offset: number): Promise<void> {
    await this.positioned(libc().pread64_async, "read", data, offset);
  }

  /**
   * Turns on O_DIRECT: transfers go between the (aligned) buffers and the
   * disk without filling the page cache. False where the filesystem has no
   * direct I/O (tmpfs): the file stays buffered.
   */
  setDirect(): boolean {
    const flags = check(`fcntl(F_GETFL) ${this.path}`, libc().fcntl(this.fd, F_GETFL, 0n));
    return libc().fcntl(this.fd, F_SETFL, BigInt(flags | O_DIRECT)) === 0;
  }

  /** Sets the file's size. */
  truncate(size: number): void {
    check(`ftruncate ${this.path}`, libc().ftruncate(this.fd, BigInt(size)));
  }

  /**
   * Allocates the file's first `size` bytes (fallocate) and sets its size,
   * so that direct writes into it overwrite allocated blocks, which ext4
   * runs in parallel (extending or hole-filling ones take the inode lock
   * one at a time). False where the filesystem cannot allocate ahead;
   * throws when the space is not there (ENOSPC, EDQUOT).
   */
  allocate(size: number): boolean {
    if (size === 0) return true;
    if (libc().fallocate(this.fd, 0, 0n, BigInt(size)) === 0) return true;
    const errno = lastErrno();
    if (errno === EOPNOTSUPP) return false;
    throw new SysError(`fallocate ${this.path}`, errno);
  }

  /** Writes all of `data` at `offset`. */
  async pwriteAll(data: Uint8Array, offset: number): Promise<void> {
    await this.positioned(libc().pwrite64_async, "write", data, offset);
  }

  /**
   * pread/pwrite until all of `data` moved. errno of a pool thread is lost,
   * so a failed call is repeated on this thread to learn why (ENOSPC, ...).
   */
  private async positioned(
    call: PositionedCall,
    what: "read" | "write",
    data: Uint8Array,
    offset: number,
  ): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const n = await call(
        this.fd,
        data.subarray(done),
        BigInt(data.length - done),
        BigInt(offset + done),
      );
      if (n < 0n) {
        const sync = what === "read" ? libc().pread64 : libc().pwrite64;
        const rest = data.subarray(done);
        const again = sync(this.fd, rest, BigInt(rest.length), BigInt(offset + done));
        if (again < 0n) throw new SysError(`${what} ${this.path}`, lastErrno());
        if (again === 0n) throw new Error(`${what} ${this.path}: stopped at ${offset + done}`);
        done += Number(again);
        continue;
      }
      if (n === 0n) throw new Error(`${what} ${this.path}: stopped at ${offset + done}`);
      done += Number(n);
    }
  }

  /** Fills `data` from `offset`, on this thread (small files); throws if the file ends first. */
  preadAllSync(data: Uint8Array, offset: number): void {
    for (let done = 0; done < data.length;) {
      const rest = data.subarray(done);
      const n = libc().pread64(this.fd, rest, BigInt(rest.length), BigInt(offset + done));
      if (n < 0n) throw new SysError(`read ${this.path}`, lastErrno());
      if (n === 0n) throw new Error(`read ${this.path}: ends at ${offset + done}`);
      done += Number(n);
    }
  }

  /** Writes all of `data` at `offset`, on this thread (small files). */
  pwriteAllSync(data: Uint8Array, offset: number): void {
    for (let done = 0; done < data.length;) {
      const rest = data.subarray(done);
      const n = libc().pwrite64(this.fd, rest, BigInt(rest.length), BigInt(offset + done));
      if (n < 0n) throw new SysError(`write ${this.path}`, lastErrno());
      if (n === 0n) throw new Error(`write ${this.path}: stopped at ${offset + done}`);
      done += Number(n);
    }
  }

  sync(): void {
    check(`fsync ${this.path}`, libc().fsync(this.fd));
  }

  close(): void {
    libc().close(this.fd);
  }
}

const SEEK_DATA = 3, SEEK_HOLE = 4, ENXIO = 6, O_RDONLY_CLOEXEC = 0o2000000;

/**
 * The byte ranges of [from, to) of file `path` that hold data (SEEK_DATA /
 * SEEK_HOLE): for shared memory, what its object holds whether or not a
 * process has the pages in its page tables.
 */
export function dataRanges(path: string, from: number, to: number): [number, number][] {
  const name = new TextEncoder().encode(path + "\0");
  const fd = check(`open ${path}`, libc().open(name, O_RDONLY_CLOEXEC, 0));
  const out: [number, number][] = [];
  try {
    for (let off = from; off < to;) {
      const data = libc().lseek(fd, BigInt(off), SEEK_DATA);
      if (data < 0n) {
        const errno = lastErrno();
        if (errno === ENXIO) break; // no data after off
        throw new SysError(`lseek(SEEK_DATA) ${path}`, errno);
      }
      if (Number(data) >= to) break;
      const hole = Number(check(`lseek(SEEK_HOLE) ${path}`, libc().lseek(fd, data, SEEK_HOLE)));
      out.push([Number(data), Math.min(hole, to)]);
      off = hole;
    }
  } finally {
    libc().close(fd);
  }
  return out;
}
