/** Reading a stopped tracee's seccomp filters (needs CAP_SYS_ADMIN). */
import { addressOf, check, libc } from "./libc.ts";

const PTRACE_SECCOMP_GET_FILTER = 0x420c;
const PTRACE_SECCOMP_GET_METADATA = 0x420d;
/** struct sock_filter: u16 code, u8 jt, u8 jf, u32 k. */
export const SOCK_FILTER_SIZE = 8;

/** The BPF program of filter `index` (0 = the most recently installed) of thread `tid`. */
export function seccompFilter(tid: number, index: number): Uint8Array {
  const what = `ptrace(SECCOMP_GET_FILTER ${index})`;
  const n = Number(
    check(what, libc().ptrace(BigInt(PTRACE_SECCOMP_GET_FILTER), tid, BigInt(index), 0n)),
  );
  const buf = new Uint8Array(n * SOCK_FILTER_SIZE);
  check(what, libc().ptrace(BigInt(PTRACE_SECCOMP_GET_FILTER), tid, BigInt(index), addressOf(buf)));
  return buf;
}

/** The SECCOMP_FILTER_FLAG_* a filter was installed with, as the kernel keeps them. */
export function seccompFilterFlags(tid: number, index: number): number {
  // struct seccomp_metadata { u64 filter_off; u64 flags; }
  const md = new BigUint64Array([BigInt(index), 0n]);
  check(
    `ptrace(SECCOMP_GET_METADATA ${index})`,
    libc().ptrace(BigInt(PTRACE_SECCOMP_GET_METADATA), tid, 16n, addressOf(md)),
  );
  return Number(md[1]);
}
