/** Looking into another process's pipe without taking anything out of it. */
import { check, libc } from "./libc.ts";

const O_RDONLY = 0, O_NONBLOCK = 0o4000, O_CLOEXEC = 0o2000000;
const F_SETPIPE_SZ = 1031, F_GETPIPE_SZ = 1032;
const SPLICE_F_NONBLOCK = 2;

/** A pipe's capacity and the bytes waiting in it. */
export interface PipeContents {
  size: number;
  data: Uint8Array;
}

function closeAll(fds: number[]): void {
  for (const fd of fds) if (fd >= 0) libc().close(fd);
}

/**
 * Reads what is buffered in the pipe behind fd `fd` of `pid`: a new read
 * end is opened through /proc, and tee(2) copies the buffer into a pipe of
 * ours, leaving the original untouched.
 */
export function peekPipe(pid: number, fd: number): PipeContents {
  const path = `/proc/${pid}/fd/${fd}`;
  const name = new TextEncoder().encode(path + "\0");
  const src = check(`open ${path}`, libc().open(name, O_RDONLY | O_NONBLOCK | O_CLOEXEC, 0));
  const ends = new Int32Array([-1, -1]);
  try {
    const size = check("fcntl(F_GETPIPE_SZ)", libc().fcntl(src, F_GETPIPE_SZ, 0n));
    check("pipe2", libc().pipe2(ends, O_NONBLOCK | O_CLOEXEC));
    check("fcntl(F_SETPIPE_SZ)", libc().fcntl(ends[1], F_SETPIPE_SZ, BigInt(size)));
    const n = libc().tee(src, ends[1], BigInt(size), SPLICE_F_NONBLOCK);
    // EAGAIN: nothing buffered.
    const copied = n < 0n ? 0 : Number(n);
    const data = new Uint8Array(copied);
    let done = 0;
    while (done < copied) {
      const r = check("read", libc().read(ends[0], data.subarray(done), BigInt(copied - done)));
      if (r === 0n) break;
      done += Number(r);
    }
    return { size, data };
  } finally {
    closeAll([src, ends[0], ends[1]]);
  }
}
