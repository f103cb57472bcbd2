/**
 * Write tracking without soft-dirty: the userfaultfd structures amber
 * injects (write-protect in async mode) and the PAGEMAP_SCAN ioctl that
 * reads which pages were written since.
 */
import { addressOf, lastErrno, libc, rawSyscall, rawSyscallAsync, SysError } from "./libc.ts";

export const NR_USERFAULTFD = 323;
export const UFFD_USER_MODE_ONLY = 1;
/** _IOWR(0xAA, 0x3F, struct uffdio_api): 24 bytes. */
export const UFFDIO_API = 0xc018aa3fn;
/** _IOWR(0xAA, 0x00, struct uffdio_register): 32 bytes. */
export const UFFDIO_REGISTER = 0xc020aa00n;
/** _IOWR(0xAA, 0x06, struct uffdio_writeprotect): 24 bytes. */
export const UFFDIO_WRITEPROTECT = 0xc018aa06n;
export const UFFD_API = 0xaan;
/** Writes to protected pages just clear the protection: nobody has to serve faults. */
export const UFFD_FEATURE_WP_ASYNC = 1n << 15n;
const UFFDIO_REGISTER_MODE_WP = 2n;
const UFFDIO_WRITEPROTECT_MODE_WP = 1n;

/** _IOWR('f', 16, struct pm_scan_arg): 96 bytes. */
const PAGEMAP_SCAN = 0xc0606610n;
const NR_IOCTL = 16;
export const PAGE_IS_WRITTEN = 1n << 1n;
/** Regions returned per ioctl call. */
const VEC_LEN = 4096;

function u64s(values: bigint[]): Uint8Array {
  return new Uint8Array(new BigUint64Array(values).buffer);
}

/** Reports the faulting thread in messages: no effect on async tracking. */
const UFFD_FEATURE_THREAD_ID = 1n << 8n;
/**
 * What amber's tracker asks for: WP_ASYNC, plus THREAD_ID, which changes
 * nothing here but tells amber's tracker apart from a program's own
 * userfaultfd (fdinfo shows the features).
 */
export const TRACKER_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_THREAD_ID;

/** struct uffdio_api asking for amber's tracker features. */
export function uffdioApi(): Uint8Array {
  return u64s([UFFD_API, TRACKER_FEATURES, 0n]);
}

/** struct uffdio_register for write-protect tracking of [start, end). */
export function uffdioRegister(start: bigint, end: bigint): Uint8Array {
  return u64s([start, end - start, UFFDIO_REGISTER_MODE_WP, 0n]);
}

/** struct uffdio_writeprotect protecting [start, end). */
export function uffdioWriteprotect(start: bigint, end: bigint): Uint8Array {
  return u64s([start, end - start, UFFDIO_WRITEPROTECT_MODE_WP]);
}

const NR_OPEN = 2;
const NR_CLOSE = 3;
/** PAGEMAP_SCAN flags: write-protect what matched, in the same walk... */
const PM_SCAN_WP_MATCHING = 1n;
/** ...and fail (EPERM) on memory that is not under async write-protect. */
const PM_SCAN_CHECK_WPASYNC = 2n;
const EPERM = 1;

/**
 * The parts of `ranges` of process `pid` written since they were
 * write-protected (or never protected: unregistered memory counts as
 * written), per PAGEMAP_SCAN on its /proc/PID/pagemap.
 */
export function scanWritten(pid: number, ranges: [bigint, bigint][]): [bigint, bigint][] {
  return scanPages(pid, ranges, { all: PAGE_IS_WRITTEN, any: 0n, returned: PAGE_IS_WRITTEN })
    .map(([s, e]) => [s, e]);
}

/**
 * As scanWritten, and what it reports written is write-protected again in
 * the same walk, so the tracker goes on from here without being made
 * again. Per range: its written parts, or undefined if the range is not
 * under async write-protect (not registered: EPERM before anything of it
 * was protected), which the caller must then take as all written.
 */
export function scanWrittenAndProtect(
  pid: number,
  ranges: [bigint, bigint][],
): ([bigint, bigint][] | undefined)[] {
  if (!ranges.length) return [];
  const fd = openPagemap(pid);
  const mask = {
    all: PAGE_IS_WRITTEN,
    any: 0n,
    returned: PAGE_IS_WRITTEN,
    flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
  };
  try {
    return ranges.map(([start, end]) => {
      try {
        return scanRange(fd, start, end, mask).map(([s, e]) => [s, e]);
      } catch (e) {
        if (e instanceof SysError && e.errno === EPERM) return undefined;
        throw e;
      }
    });
  } finally {
    rawSyscall("close", NR_CLOSE, fd);
  }
}

export const PAGE_IS_PRESENT = 1n << 3n;
export const PAGE_IS_SWAPPED = 1n << 4n;

/**
 * The regions of `ranges` whose pages have all the categories `all` and
 * one of `any`, each with its categories among `returned` (PAGEMAP_SCAN:
 * the kernel walks the page tables, far faster than reading pagemap).
 */
export function scanPages(
  pid: number,
  ranges: [bigint, bigint][],
  mask: { all: bigint; any: bigint; returned: bigint },
): [bigint, bigint, bigint][] {
  if (!ranges.length) return [];
  const fd = openPagemap(pid);
  try {
    return ranges.flatMap(([start, end]) => scanRange(fd, start, end, mask));
  } finally {
    rawSyscall("close", NR_CLOSE, fd);
  }
}

const O_CLOEXEC = 0o2000000;

/** /proc/PID/pagemap, opened for PAGEMAP_SCAN (the caller closes it). */
function openPagemap(pid: number): number {
  const path = new TextEncoder().encode(`/proc/${pid}/pagemap\0`);
  return Number(rawSyscall(`open /proc/${pid}/pagemap`, NR_OPEN, addressOf(path), O_CLOEXEC));
}

type ScanMask = { all: bigint; any: bigint; returned: bigint; flags?: bigint };

/** struct pm_scan_arg for [at, end), regions into `vec`. */
function scanArg(at: bigint, end: bigint, vec: BigUint64Array, mask: ScanMask): BigUint64Array {
  return new BigUint64Array([
    96n, // size
    mask.flags ?? 0n, // flags
    at,
    end,
    0n, // walk_end (out)
    addressOf(vec),
    BigInt(VEC_LEN),
    0n, // max_pages: no limit
    0n, // category_inverted
    mask.all, // category_mask
    mask.any, // category_anyof_mask
    mask.returned, // return_mask
  ]);
}

/** Takes the `n` regions one call returned; where the walk goes on from. */
function tookRegions(
  arg: BigUint64Array,
  vec: BigUint64Array,
  n: number,
  at: bigint,
  out: [bigint, bigint, bigint][],
): bigint {
  for (let i = 0; i < n; i++) out.push([vec[3 * i], vec[3 * i + 1], vec[3 * i + 2]]);
  const walkEnd = arg[4];
  if (walkEnd <= at) throw new Error("PAGEMAP_SCAN: no progress");
  return walkEnd;
}

function scanRange(
  pagemapFd: number,
  start: bigint,
  end: bigint,
  mask: ScanMask,
): [bigint, bigint, bigint][] {
  const out: [bigint, bigint, bigint][] = [];
  const vec = new BigUint64Array(VEC_LEN * 3);
  for (let at = start; at < end;) {
    const arg = scanArg(at, end, vec, mask);
    const n = Number(
      rawSyscall("ioctl(PAGEMAP_SCAN)", NR_IOCTL, pagemapFd, PAGEMAP_SCAN, addressOf(arg)),
    );
    at = tookRegions(arg, vec, n, at, out);
  }
  return out;
}

/**
 * scanPages on a pool thread, so that the walk runs beside other work
 * (the smaps walk of a frozen dump, on the other core).
 */
export async function scanPagesAsync(
  pid: number,
  ranges: [bigint, bigint][],
  mask: ScanMask,
): Promise<[bigint, bigint, bigint][]> {
  const fd = openPagemap(pid);
  const out: [bigint, bigint, bigint][] = [];
  const vec = new BigUint64Array(VEC_LEN * 3);
  try {
    for (const [start, end] of ranges) {
      for (let at = start; at < end;) {
        const arg = scanArg(at, end, vec, mask);
        const n = Number(
          await rawSyscallAsync(
            "ioctl(PAGEMAP_SCAN)",
            NR_IOCTL,
            fd,
            PAGEMAP_SCAN,
            addressOf(arg),
          ),
        );
        at = tookRegions(arg, vec, n, at, out);
      }
    }
    return out;
  } finally {
    rawSyscall("close", NR_CLOSE, fd);
  }
}

// Lazy restore (lib/mm/lazy.ts): missing-mode registration, served by amber.

/** Non-cooperative events amber must see to keep its map of missing pages right. */
export const UFFD_FEATURE_EVENT_FORK = 1n << 1n;
export const UFFD_FEATURE_EVENT_REMAP = 1n << 2n;
export const UFFD_FEATURE_EVENT_REMOVE = 1n << 3n;
export const UFFD_FEATURE_EVENT_UNMAP = 1n << 6n;
export const LAZY_FEATURES = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP |
  UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP;
const UFFDIO_REGISTER_MODE_MISSING = 1n;
/** Bit of uffdio_register.ioctls saying UFFDIO_COPY works on the range (_UFFDIO_COPY = 3). */
export const UFFDIO_COPY_BIT = 1n << 3n;
/** _IOWR(0xAA, 0x03, struct uffdio_copy): 40 bytes. */
const UFFDIO_COPY = 0xc028aa03n;
/** _IOWR(0xAA, 0x04, struct uffdio_zeropage): 32 bytes. */
const UFFDIO_ZEROPAGE = 0xc020aa04n;
/** _IOR(0xAA, 0x02, struct uffdio_range): 16 bytes. */
const UFFDIO_WAKE = 0x8010aa02n;

export const UFFD_EVENT = { PAGEFAULT: 0x12, FORK: 0x13, REMAP: 0x14, REMOVE: 0x15, UNMAP: 0x16 };

/** struct uffdio_api asking for `features`. */
export function uffdioApiWith(features: bigint): Uint8Array {
  return u64s([UFFD_API, features, 0n]);
}

/** struct uffdio_register for missing-page faults over [start, end). */
export function uffdioRegisterMissing(start: bigint, end: bigint): Uint8Array {
  return u64s([start, end - start, UFFDIO_REGISTER_MODE_MISSING, 0n]);
}

/** The ioctls field a UFFDIO_REGISTER wrote back. */
export function registeredIoctls(reg: Uint8Array): bigint {
  return new BigUint64Array(reg.buffer, reg.byteOffset, 4)[3];
}

/** One message read from a userfaultfd (struct uffd_msg, 32 bytes). */
export interface UffdMsg {
  event: number;
  /** PAGEFAULT: the faulting address. */
  address?: bigint;
  /** FORK: the child's userfaultfd, now a descriptor of the reader. */
  ufd?: number;
  /** REMAP: from, to, len; REMOVE/UNMAP: start, end. */
  from?: bigint;
  to?: bigint;
  len?: bigint;
  start?: bigint;
  end?: bigint;
}

/** Reads the messages waiting on non-blocking userfaultfd `fd`, decoded. */
export function readUffd(fd: number): UffdMsg[] {
  return uffdMessages(fd).map(({ event, args: [a0, a1, a2] }) => {
    if (event === UFFD_EVENT.PAGEFAULT) return { event, address: a1 };
    if (event === UFFD_EVENT.FORK) return { event, ufd: Number(a0 & 0xffffffffn) };
    if (event === UFFD_EVENT.REMAP) return { event, from: a0, to: a1, len: a2 };
    if (event === UFFD_EVENT.REMOVE || event === UFFD_EVENT.UNMAP) {
      return { event, start: a0, end: a1 };
    }
    return { event };
  });
}

/**
 * The result of a fill: bytes placed, or -errno (EAGAIN: the address space
 * is changing, read the events first; EEXIST: a page is there already;
 * ENOENT/ESRCH: the range or the process is gone).
 */
function fill(fd: number, req: bigint, arg: BigInt64Array, outIndex: number): number {
  const r = libc().syscall(BigInt(NR_IOCTL), BigInt(fd), req, addressOf(arg), 0n, 0n, 0n);
  if (r < 0n) {
    const placed = Number(arg[outIndex]);
    return placed > 0 ? placed : -lastErrno();
  }
  return Number(arg[outIndex]);
}

/** UFFDIO_COPY of `len` bytes at `src` (amber's) to `dst` (the process's), waking faulters. */
export function uffdCopy(fd: number, dst: bigint, src: bigint, len: number): number {
  return fill(fd, UFFDIO_COPY, new BigInt64Array([dst, src, BigInt(len), 0n, 0n]), 4);
}

/** UFFDIO_ZEROPAGE over [start, start + len), waking faulters. */
export function uffdZeropage(fd: number, start: bigint, len: number): number {
  return fill(fd, UFFDIO_ZEROPAGE, new BigInt64Array([start, BigInt(len), 0n, 0n]), 3);
}

/** UFFDIO_WAKE: lets threads waiting on a page that is present after all go on. */
export function uffdWake(fd: number, start: bigint, len: number): void {
  const arg = new BigUint64Array([start, BigInt(len)]);
  libc().syscall(BigInt(NR_IOCTL), BigInt(fd), UFFDIO_WAKE, addressOf(arg), 0n, 0n, 0n);
}

/*
 * The copy-on-write snapshot of dump -R (lib/mm/snapshot.ts): a userfaultfd
 * in sync write-protect mode, made in the target but held and served by
 * amber alone.
 */

/** mremap, madvise(DONTNEED) and munmap of registered memory are reported (the copy must know). */
export const SNAPSHOT_FEATURES = (1n << 2n) | (1n << 3n) | (1n << 6n);
/** _IOWR(0xAA, 0x01, struct uffdio_range): 16 bytes. */
const UFFDIO_UNREGISTER = 0x8010aa01n;
const EAGAIN = 11;

/** One struct uffd_msg: the event and its three 64-bit arguments. */
export interface UffdMessage {
  event: number;
  /** pagefault: flags, address; remap: from, to, len; remove/unmap: start, end. */
  args: [bigint, bigint, bigint];
}

function uffdCall(name: string, fd: number, req: bigint, arg: Uint8Array): void {
  rawSyscall(name, NR_IOCTL, fd, req, addressOf(arg));
}

/** UFFDIO_API on amber's own descriptor (the context stays bound to the target's memory). */
export function uffdApi(fd: number, features: bigint): void {
  uffdCall("ioctl(UFFDIO_API)", fd, UFFDIO_API, u64s([UFFD_API, features, 0n]));
}

/** Registers [start, end) for write-protect faults; false when the kernel will not (EBUSY, EINVAL). */
export function uffdRegisterWp(fd: number, start: bigint, end: bigint): boolean {
  try {
    uffdCall("ioctl(UFFDIO_REGISTER)", fd, UFFDIO_REGISTER, uffdioRegister(start, end));
    return true;
  } catch {
    return false;
  }
}

export function uffdUnregister(fd: number, start: bigint, end: bigint): void {
  uffdCall("ioctl(UFFDIO_UNREGISTER)", fd, UFFDIO_UNREGISTER, u64s([start, end - start]));
}

/** Write-protects [start, end), or lifts the protection and wakes the threads that wait on it. */
export function uffdProtect(fd: number, start: bigint, end: bigint, on: boolean): void {
  const mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0n;
  uffdCall("ioctl(UFFDIO_WRITEPROTECT)", fd, UFFDIO_WRITEPROTECT, u64s([start, end - start, mode]));
}

/** uffdProtect(on) on a pool thread: a walk of every page table entry of the range. */
export async function uffdProtectAsync(fd: number, start: bigint, end: bigint): Promise<void> {
  const arg = u64s([start, end - start, UFFDIO_WRITEPROTECT_MODE_WP]);
  await rawSyscallAsync(
    "ioctl(UFFDIO_WRITEPROTECT)",
    NR_IOCTL,
    fd,
    UFFDIO_WRITEPROTECT,
    addressOf(arg),
  );
  // (arg is referenced until here, so it outlives the call.)
  arg.fill(0);
}

const MSG_BYTES = 32;
const MSGS_PER_READ = 64;

/** The messages waiting on a non-blocking userfaultfd (none: empty). */
export function uffdMessages(fd: number): UffdMessage[] {
  const out: UffdMessage[] = [];
  const buf = new BigUint64Array(MSG_BYTES / 8 * MSGS_PER_READ);
  for (;;) {
    let n: number;
    try {
      n = Number(rawSyscall("read(userfaultfd)", 0, fd, addressOf(buf), buf.byteLength));
    } catch (e) {
      if (e instanceof SysError && e.errno === EAGAIN) return out;
      throw e;
    }
    for (let i = 0; i < n / MSG_BYTES; i++) {
      const w = 4 * i;
      out.push({ event: Number(buf[w] & 0xffn), args: [buf[w + 1], buf[w + 2], buf[w + 3]] });
    }
    if (n < buf.byteLength) return out;
  }
}

const POLLIN = 1;

/** Waits on a pool thread until `fd` is readable or `ms` pass; whether it is. */
export async function uffdWait(fd: number, ms: number): Promise<boolean> {
  const pfd = new Uint8Array(8);
  new DataView(pfd.buffer).setInt32(0, fd, true);
  new DataView(pfd.buffer).setInt16(4, POLLIN, true);
  return (await libc().poll_async(pfd, 1n, ms)) > 0;
}
