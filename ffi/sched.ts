/**
 * Scheduling attributes of any thread, by tid, from amber itself:
 * sched_getattr/sched_setattr, CPU affinity, I/O priority. Root may set
 * these on another process without injecting anything.
 */
import { addressOf, rawSyscall } from "./libc.ts";

const NR = {
  getpriority: 140,
  setpriority: 141,
  sched_setaffinity: 203,
  sched_getaffinity: 204,
  ioprio_set: 251,
  ioprio_get: 252,
  sched_setattr: 314,
  sched_getattr: 315,
} as const;

/** struct sched_attr as of Linux 4.13 (with utilization clamps): 56 bytes. */
const SCHED_ATTR_SIZE = 56;
const IOPRIO_WHO_PROCESS = 1;
const PRIO_PROCESS = 0;
/** Bytes of CPU mask asked for: 1024 CPUs, glibc's cpu_set_t. */
const CPU_MASK_BYTES = 128;

export interface SchedAttr {
  policy: number;
  flags: bigint;
  nice: number;
  priority: number;
  runtime: bigint;
  deadline: bigint;
  period: bigint;
  utilMin: number;
  utilMax: number;
}

export function schedGetattr(tid: number): SchedAttr {
  const buf = new Uint8Array(SCHED_ATTR_SIZE);
  rawSyscall(`sched_getattr(${tid})`, NR.sched_getattr, tid, addressOf(buf), SCHED_ATTR_SIZE, 0);
  const v = new DataView(buf.buffer);
  return {
    policy: v.getUint32(4, true),
    flags: v.getBigUint64(8, true),
    nice: v.getInt32(16, true),
    priority: v.getUint32(20, true),
    runtime: v.getBigUint64(24, true),
    deadline: v.getBigUint64(32, true),
    period: v.getBigUint64(40, true),
    utilMin: v.getUint32(48, true),
    utilMax: v.getUint32(52, true),
  };
}

/** sched_setattr with exactly `a`; the caller picks the SCHED_FLAG_* it needs in a.flags. */
export function schedSetattr(tid: number, a: SchedAttr): void {
  const buf = new Uint8Array(SCHED_ATTR_SIZE);
  const v = new DataView(buf.buffer);
  v.setUint32(0, SCHED_ATTR_SIZE, true);
  v.setUint32(4, a.policy, true);
  v.setBigUint64(8, a.flags, true);
  v.setInt32(16, a.nice, true);
  v.setUint32(20, a.priority, true);
  v.setBigUint64(24, a.runtime, true);
  v.setBigUint64(32, a.deadline, true);
  v.setBigUint64(40, a.period, true);
  v.setUint32(48, a.utilMin, true);
  v.setUint32(52, a.utilMax, true);
  rawSyscall(`sched_setattr(${tid})`, NR.sched_setattr, tid, addressOf(buf), 0);
}

/** The CPUs a thread may run on, ascending. */
export function getAffinity(tid: number): number[] {
  const buf = new Uint8Array(CPU_MASK_BYTES);
  const n = Number(
    rawSyscall(
      `sched_getaffinity(${tid})`,
      NR.sched_getaffinity,
      tid,
      CPU_MASK_BYTES,
      addressOf(buf),
    ),
  );
  const cpus = [];
  for (let cpu = 0; cpu < n * 8; cpu++) if (buf[cpu >> 3] & (1 << (cpu & 7))) cpus.push(cpu);
  return cpus;
}

export function setAffinity(tid: number, cpus: number[]): void {
  const buf = new Uint8Array(CPU_MASK_BYTES);
  for (const cpu of cpus) buf[cpu >> 3] |= 1 << (cpu & 7);
  rawSyscall(
    `sched_setaffinity(${tid})`,
    NR.sched_setaffinity,
    tid,
    CPU_MASK_BYTES,
    addressOf(buf),
  );
}

/** The largest CPU number a mask can name here. */
export const MAX_CPU = CPU_MASK_BYTES * 8 - 1;

/** ioprio_get(IOPRIO_WHO_PROCESS, tid): class << 13 | data. */
export function getIoprio(tid: number): number {
  return Number(rawSyscall(`ioprio_get(${tid})`, NR.ioprio_get, IOPRIO_WHO_PROCESS, tid));
}

export function setIoprio(tid: number, ioprio: number): void {
  rawSyscall(`ioprio_set(${tid})`, NR.ioprio_set, IOPRIO_WHO_PROCESS, tid, ioprio);
}

/** A thread's nice value (sched_getattr reports none for real-time threads). */
export function getNice(tid: number): number {
  // The raw syscall returns 20 - nice, so that no result looks like an error.
  return 20 - Number(rawSyscall(`getpriority(${tid})`, NR.getpriority, PRIO_PROCESS, tid));
}

export function setNice(tid: number, nice: number): void {
  rawSyscall(`setpriority(${tid})`, NR.setpriority, PRIO_PROCESS, tid, nice);
}
