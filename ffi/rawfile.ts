/**
 * A file read or written with positioned I/O on pool threads, so several
 * transfers (and memory copies) can be in flight at once. Bulk page data only.
 */
import { check, libc, SysError } from "./libc.ts";

const O_WRONLY = 0o1, O_CREAT = 0o100, O_TRUNC = 0o1000, O_CLOEXEC = 0o2000000;

export class RawFile {
  private constructor(readonly fd: number, readonly path: string) {}

  /** Creates (or truncates) `path` for writing with `mode`. */
  static create(path: string, mode = 0o600): RawFile {
    const name = new TextEncoder().encode(path + "\0");
    const fd = check(
      `open ${path}`,
      libc().open(name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode),
    );
    return new RawFile(fd, path);
  }

  /** Opens `path` for reading. */
  static openRead(path: string): RawFile {
    const name = new TextEncoder().encode(path + "\0");
    return new RawFile(check(`open ${path}`, libc().open(name, O_CLOEXEC, 0)), path);
  }

  /** Fills `data` from `offset`; throws if the file ends first. */
  async preadAll(data: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const n = await libc().pread64_async(
        this.fd,
        data.subarray(done),
        BigInt(data.length - done),
        BigInt(offset + done),
      );
      if (n < 0n) throw new SysError(`read ${this.path}`, 5);
      if (n === 0n) throw new Error(`${this.path}: ends at ${offset + done}, before the data`);
      done += Number(n);
    }
  }

  /** Sets the file's size. */
  truncate(size: number): void {
    check(`ftruncate ${this.path}`, libc().ftruncate(this.fd, BigInt(size)));
  }

  /** Writes all of `data` at `offset`. */
  async pwriteAll(data: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const n = await libc().pwrite64_async(
        this.fd,
        data.subarray(done),
        BigInt(data.length - done),
        BigInt(offset + done),
      );
      // errno of a pool thread is lost; ENOSPC/EIO are the likely causes.
      if (n <= 0n) throw new SysError(`write ${this.path}`, 5);
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
