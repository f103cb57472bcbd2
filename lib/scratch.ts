/** Passing syscall arguments through a scratch area of the tracee's memory. */
import { readMemoryProc, writeMemory } from "../ffi/memory.ts";
import type { Scratch } from "./context.ts";

/** Writes bytes at scratch + offset; returns their address in the tracee. */
export function putBytes(pid: number, scratch: Scratch, data: Uint8Array, offset = 0): bigint {
  if (offset + data.length > scratch.size) {
    throw new Error(`scratch: ${data.length} bytes at ${offset} exceed ${scratch.size}`);
  }
  const addr = scratch.addr + BigInt(offset);
  writeMemory(pid, addr, data);
  return addr;
}

/** Writes a NUL-terminated string; returns its address. */
export function putString(pid: number, scratch: Scratch, s: string, offset = 0): bigint {
  const bytes = new TextEncoder().encode(s + "\0");
  return putBytes(pid, scratch, bytes, offset);
}

export function getBytes(pid: number, scratch: Scratch, len: number, offset = 0): Uint8Array {
  return readMemoryProc(pid, scratch.addr + BigInt(offset), len);
}

/** Little-endian u64 array as bytes. */
export function u64Bytes(values: (bigint | number)[]): Uint8Array {
  const a = new BigUint64Array(values.map((v) => BigInt.asUintN(64, BigInt(v))));
  return new Uint8Array(a.buffer);
}

export function readU64s(bytes: Uint8Array): bigint[] {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return Array.from({ length: bytes.length >> 3 }, (_, i) => v.getBigUint64(i * 8, true));
}
