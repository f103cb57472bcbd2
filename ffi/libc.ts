/**
 * The one table of libc symbols amber calls through Deno FFI, and the one
 * place where their errors are turned into exceptions.
 *
 * Every wrapper here returns the raw result or throws a {@link SysError}
 * carrying the call's name and errno; callers add what object and step
 * they were working on.
 */

const SYMBOLS = {
  ptrace: { parameters: ["i64", "i32", "u64", "u64"], result: "i64" },
  waitpid: { parameters: ["i32", "buffer", "i32"], result: "i32" },
  waitpid_async: {
    name: "waitpid",
    parameters: ["i32", "buffer", "i32"],
    result: "i32",
    nonblocking: true,
  },
  syscall: {
    parameters: ["i64", "u64", "u64", "u64", "u64", "u64", "u64"],
    result: "i64",
  },
  syscall_async: {
    name: "syscall",
    parameters: ["i64", "u64", "u64", "u64", "u64", "u64", "u64"],
    result: "i64",
    nonblocking: true,
  },
  process_vm_readv: {
    parameters: ["i32", "buffer", "u64", "buffer", "u64", "u64"],
    result: "i64",
  },
  process_vm_readv_async: {
    name: "process_vm_readv",
    parameters: ["i32", "buffer", "u64", "buffer", "u64", "u64"],
    result: "i64",
    nonblocking: true,
  },
  process_vm_writev: {
    parameters: ["i32", "buffer", "u64", "buffer", "u64", "u64"],
    result: "i64",
  },
  process_vm_writev_async: {
    name: "process_vm_writev",
    parameters: ["i32", "buffer", "u64", "buffer", "u64", "u64"],
    result: "i64",
    nonblocking: true,
  },
  pread64_async: {
    name: "pread64",
    parameters: ["i32", "buffer", "u64", "i64"],
    result: "i64",
    nonblocking: true,
  },
  pwrite64_async: {
    name: "pwrite64",
    parameters: ["i32", "buffer", "u64", "i64"],
    result: "i64",
    nonblocking: true,
  },
  fsync_async: {
    name: "fsync",
    parameters: ["i32"],
    result: "i32",
    nonblocking: true,
  },
  poll_async: {
    name: "poll",
    parameters: ["buffer", "u64", "i32"],
    result: "i32",
    nonblocking: true,
  },
  poll: { parameters: ["buffer", "u64", "i32"], result: "i32" },
  open: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  openat: { parameters: ["i32", "buffer", "i32", "i32"], result: "i32" },
  mkdirat: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  unlinkat: { parameters: ["i32", "buffer", "i32"], result: "i32" },
  renameat: { parameters: ["i32", "buffer", "i32", "buffer"], result: "i32" },
  fstat: { parameters: ["i32", "buffer"], result: "i32" },
  flock: { parameters: ["i32", "i32"], result: "i32" },
  geteuid: { parameters: [], result: "u32" },
  write: { parameters: ["i32", "buffer", "u64"], result: "i64" },
  pread64: { parameters: ["i32", "buffer", "u64", "i64"], result: "i64" },
  pwrite64: { parameters: ["i32", "buffer", "u64", "i64"], result: "i64" },
  close: { parameters: ["i32"], result: "i32" },
  ftruncate: { parameters: ["i32", "i64"], result: "i32" },
  fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i32" },
  lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  pipe2: { parameters: ["buffer", "i32"], result: "i32" },
  tee: { parameters: ["i32", "i32", "u64", "u32"], result: "i64" },
  read: { parameters: ["i32", "buffer", "u64"], result: "i64" },
  fcntl: { parameters: ["i32", "i32", "i64"], result: "i32" },
  ioctl: { parameters: ["i32", "u64", "buffer"], result: "i32" },
  getpgrp: { parameters: [], result: "i32" },
  fsync: { parameters: ["i32"], result: "i32" },
  syncfs: { parameters: ["i32"], result: "i32" },
  kill: { parameters: ["i32", "i32"], result: "i32" },
  prctl: { parameters: ["i32", "u64", "u64", "u64", "u64"], result: "i32" },
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  sendto: { parameters: ["i32", "buffer", "u64", "i32", "buffer", "u32"], result: "i64" },
  recvmsg: { parameters: ["i32", "buffer", "i32"], result: "i64" },
  recvfrom: { parameters: ["i32", "buffer", "u64", "i32", "buffer", "buffer"], result: "i64" },
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  connect: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  listen: { parameters: ["i32", "i32"], result: "i32" },
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  getpeername: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
} as const satisfies Deno.ForeignLibraryInterface;

type Lib = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

let lib: Lib | undefined;

/** Opens libc on first use, so that importing amber costs nothing. */
export function libc(): Lib {
  if (!lib) lib = Deno.dlopen("libc.so.6", SYMBOLS).symbols;
  return lib;
}

/** A failed system call: `name: ENAME (message)`. */
export class SysError extends Error {
  constructor(readonly call: string, readonly errno: number) {
    super(`${call}: ${errnoName(errno)}`);
    this.name = "SysError";
  }
  /** The symbolic errno, e.g. "ESRCH". */
  get code(): string {
    return errnoName(this.errno);
  }
}

const ERRNO_NAMES: Record<number, string> = {
  1: "EPERM",
  2: "ENOENT",
  3: "ESRCH",
  4: "EINTR",
  5: "EIO",
  6: "ENXIO",
  7: "E2BIG",
  9: "EBADF",
  10: "ECHILD",
  11: "EAGAIN",
  12: "ENOMEM",
  13: "EACCES",
  14: "EFAULT",
  16: "EBUSY",
  17: "EEXIST",
  19: "ENODEV",
  20: "ENOTDIR",
  21: "EISDIR",
  22: "EINVAL",
  24: "EMFILE",
  25: "ENOTTY",
  27: "EFBIG",
  28: "ENOSPC",
  30: "EROFS",
  36: "ENAMETOOLONG",
  38: "ENOSYS",
  39: "ENOTEMPTY",
  40: "ELOOP",
  95: "EOPNOTSUPP",
  92: "ENOPROTOOPT",
  97: "EAFNOSUPPORT",
  98: "EADDRINUSE",
  99: "EADDRNOTAVAIL",
  104: "ECONNRESET",
  107: "ENOTCONN",
  111: "ECONNREFUSED",
  122: "EDQUOT",
};

/** "EFAULT" for 14; "errno 123" for codes without a name here. */
export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `errno ${errno}`;
}

/** errno of the last synchronous call on this (the main) thread. */
export function lastErrno(): number {
  const p = libc().__errno_location();
  return p ? new Deno.UnsafePointerView(p).getInt32() : 0;
}

/** Throws SysError(call) when a libc call returned -1. */
export function check<T extends number | bigint>(call: string, result: T): T {
  if (result === -1 || result === -1n) throw new SysError(call, lastErrno());
  return result;
}

/** Address of a buffer's first byte, for calls that take it as an integer. */
export function addressOf(buf: ArrayBufferView): bigint {
  const p = Deno.UnsafePointer.of(buf as ArrayBufferView<ArrayBuffer>);
  return p ? BigInt(Deno.UnsafePointer.value(p)) : 0n;
}

/**
 * Raw syscall through libc's syscall(2); throws SysError(name) on failure.
 * Arguments are passed as 64-bit values.
 */
export function rawSyscall(
  name: string,
  nr: number,
  ...args: (number | bigint)[]
): bigint {
  const a = [0, 1, 2, 3, 4, 5].map((i) => BigInt.asUintN(64, BigInt(args[i] ?? 0)));
  return check(name, libc().syscall(BigInt(nr), a[0], a[1], a[2], a[3], a[4], a[5]));
}

/**
 * rawSyscall on a pool thread, for a long kernel walk amber can overlap
 * with other work. That thread's errno is lost: on failure the call is made
 * again here, where it is read, and that error is thrown. Only for calls
 * that are harmless to repeat.
 */
export async function rawSyscallAsync(
  name: string,
  nr: number,
  ...args: (number | bigint)[]
): Promise<bigint> {
  const a = [0, 1, 2, 3, 4, 5].map((i) => BigInt.asUintN(64, BigInt(args[i] ?? 0)));
  const r = await libc().syscall_async(BigInt(nr), a[0], a[1], a[2], a[3], a[4], a[5]);
  return r === -1n ? rawSyscall(name, nr, ...args) : r;
}

const NR_KCMP = 312;
const KCMP_FILE = 0;

/** Whether fd `fdA` of `pidA` and fd `fdB` of `pidB` are the same open file description. */
export function sameOpenFile(pidA: number, fdA: number, pidB: number, fdB: number): boolean {
  return rawSyscall("kcmp", NR_KCMP, pidA, pidB, KCMP_FILE, fdA, fdB) === 0n;
}

const KCMP_EPOLL_TFD = 7;

/**
 * Whether the file epoll `epfd` of `pid` watches under fd number `key`
 * is the file `pid`'s fd `fd` holds now. The key's own number may hold
 * another file (the watched one closed there, kept open elsewhere, the
 * number re-used). False when either is gone.
 */
export function epollWatchIsFile(pid: number, epfd: number, key: number, fd = key): boolean {
  const slot = new Uint32Array([epfd, key, 0]); // struct kcmp_epoll_slot: efd, tfd, toff
  try {
    return rawSyscall("kcmp", NR_KCMP, pid, pid, KCMP_EPOLL_TFD, fd, addressOf(slot)) === 0n;
  } catch {
    return false;
  }
}
