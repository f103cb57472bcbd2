/** Reading and writing another process's memory. */
import { addressOf, lastErrno, libc, SysError } from "./libc.ts";

/** A range of the remote address space. */
export interface RemoteRange {
  addr: bigint;
  len: number;
}

/** Linux's IOV_MAX: the most iovecs one process_vm_readv accepts. */
export const IOV_MAX = 1024;

function iovecs(ranges: RemoteRange[], local: Uint8Array): [BigUint64Array, BigUint64Array] {
  const remote = new BigUint64Array(ranges.length * 2);
  let total = 0;
  ranges.forEach((r, i) => {
    remote[2 * i] = r.addr;
    remote[2 * i + 1] = BigInt(r.len);
    total += r.len;
  });
  if (total > local.length) throw new Error(`iovec: ${total} bytes do not fit ${local.length}`);
  const localIov = new BigUint64Array([addressOf(local), BigInt(total)]);
  return [localIov, remote];
}

/**
 * Reads up to IOV_MAX remote ranges into `local` back to back, on a pool
 * thread. Returns the bytes read, which is short when a range faulted.
 */
export function readRangesAsync(
  pid: number,
  ranges: RemoteRange[],
  local: Uint8Array,
): Promise<number> {
  return transferAsync(libc().process_vm_readv_async, "process_vm_readv", pid, ranges, local);
}

/**
 * Writes `local` back to back into up to IOV_MAX remote ranges, on a pool
 * thread. The ranges must be writable mappings. Returns the bytes written.
 */
export function writeRangesAsync(
  pid: number,
  ranges: RemoteRange[],
  local: Uint8Array,
): Promise<number> {
  return transferAsync(libc().process_vm_writev_async, "process_vm_writev", pid, ranges, local);
}

type VmCall = ReturnType<typeof libc>["process_vm_readv_async"];

async function transferAsync(
  call: VmCall,
  name: string,
  pid: number,
  ranges: RemoteRange[],
  local: Uint8Array,
): Promise<number> {
  const [localIov, remote] = iovecs(ranges, local);
  const n = await call(pid, localIov, 1n, remote, BigInt(ranges.length), 0n);
  // errno of a pool thread is lost: report the common cause.
  if (n < 0n) throw new SysError(name, 14);
  return Number(n);
}

const O_RDWR = 2, O_CLOEXEC = 0o2000000;

/** /proc/PID/mem descriptors kept open by holdMemory, by pid. */
const held = new Map<number, number>();

/**
 * Keeps /proc/PID/mem open for readMemoryProc and writeMemory of `pid`
 * until disposed: one pread or pwrite each instead of an open, a seek, the
 * transfer and a close (a dump reads and writes a frozen process's scratch
 * area ~60 times). Only while the process is held frozen: a descriptor
 * stays with the memory it was opened on, which an exec would replace.
 */
export function holdMemory(pid: number): Disposable {
  const path = new TextEncoder().encode(`/proc/${pid}/mem\0`);
  const fd = libc().open(path, O_RDWR | O_CLOEXEC, 0);
  if (fd < 0 || held.has(pid)) {
    if (fd >= 0) libc().close(fd);
    return { [Symbol.dispose]() {} }; // (each call opens its own, as without a hold)
  }
  held.set(pid, fd);
  return {
    [Symbol.dispose]() {
      held.delete(pid);
      libc().close(fd);
    },
  };
}

/** pread or pwrite on a held descriptor until all of `buf` moved. */
function transferHeld(fd: number, write: boolean, addr: bigint, buf: Uint8Array): void {
  const what = `${write ? "write" : "read"} /proc/PID/mem`;
  for (let done = 0; done < buf.length;) {
    const rest = buf.subarray(done), at = addr + BigInt(done);
    const n = write
      ? libc().pwrite64(fd, rest, BigInt(rest.length), at)
      : libc().pread64(fd, rest, BigInt(rest.length), at);
    if (n < 0n) throw new SysError(what, lastErrno());
    if (n === 0n) throw new SysError(what, 5);
    done += Number(n);
  }
}

/** Reads through /proc/PID/mem: works where process_vm_readv cannot (e.g. PROT_NONE). */
export function readMemoryProc(pid: number, addr: bigint, len: number): Uint8Array {
  const fd = held.get(pid);
  if (fd !== undefined) {
    const buf = new Uint8Array(len);
    transferHeld(fd, false, addr, buf);
    return buf;
  }
  using f = Deno.openSync(`/proc/${pid}/mem`, { read: true });
  f.seekSync(Number(addr), Deno.SeekMode.Start);
  const buf = new Uint8Array(len);
  let done = 0;
  while (done < len) {
    const n = f.readSync(buf.subarray(done));
    if (!n) throw new SysError("read /proc/PID/mem", 5);
    done += n;
  }
  return buf;
}

/**
 * Writes through /proc/PID/mem, which (unlike process_vm_writev) also
 * writes into read-only mappings.
 */
export function writeMemory(pid: number, addr: bigint, data: Uint8Array): void {
  const fd = held.get(pid);
  if (fd !== undefined) return transferHeld(fd, true, addr, data);
  using f = Deno.openSync(`/proc/${pid}/mem`, { read: true, write: true });
  f.seekSync(Number(addr), Deno.SeekMode.Start);
  let done = 0;
  while (done < data.length) {
    const n = f.writeSync(data.subarray(done));
    if (!n) throw new SysError("write /proc/PID/mem", 5);
    done += n;
  }
}
