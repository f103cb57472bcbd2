/**
 * Write tracking without soft-dirty: the userfaultfd structures amber
 * injects (write-protect in async mode) and the PAGEMAP_SCAN ioctl that
 * reads which pages were written since.
 */
import { addressOf, rawSyscall } from "./libc.ts";

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
const PAGE_IS_WRITTEN = 1n << 1n;
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

/**
 * The parts of `ranges` of process `pid` written since they were
 * write-protected (or never protected: unregistered memory counts as
 * written), per PAGEMAP_SCAN on its /proc/PID/pagemap.
 */
export function scanWritten(pid: number, ranges: [bigint, bigint][]): [bigint, bigint][] {
  if (!ranges.length) return [];
  const path = new TextEncoder().encode(`/proc/${pid}/pagemap\0`);
  const fd = Number(rawSyscall(`open /proc/${pid}/pagemap`, NR_OPEN, addressOf(path), O_CLOEXEC));
  try {
    return ranges.flatMap(([start, end]) => scanRange(fd, start, end));
  } finally {
    rawSyscall("close", NR_CLOSE, fd);
  }
}

const O_CLOEXEC = 0o2000000;

function scanRange(pagemapFd: number, start: bigint, end: bigint): [bigint, bigint][] {
  const out: [bigint, bigint][] = [];
  const vec = new BigUint64Array(VEC_LEN * 3);
  let at = start;
  while (at < end) {
    const arg = new BigUint64Array([
      96n, // size
      0n, // flags
      at,
      end,
      0n, // walk_end (out)
      addressOf(vec),
      BigInt(VEC_LEN),
      0n, // max_pages: no limit
      0n, // category_inverted
      PAGE_IS_WRITTEN, // category_mask
      0n, // category_anyof_mask
      PAGE_IS_WRITTEN, // return_mask
    ]);
    const n = Number(
      rawSyscall("ioctl(PAGEMAP_SCAN)", NR_IOCTL, pagemapFd, PAGEMAP_SCAN, addressOf(arg)),
    );
    for (let i = 0; i < n; i++) out.push([vec[3 * i], vec[3 * i + 1]]);
    const walkEnd = arg[4];
    if (walkEnd <= at) throw new Error("PAGEMAP_SCAN: no progress");
    at = walkEnd;
  }
  return out;
}
