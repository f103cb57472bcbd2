/**
 * SysV semaphore sets and message queues, asked from amber itself (they
 * belong to the IPC namespace, which amber shares with the tree). None of
 * these calls changes what it reads: IPC_STAT, GETALL, GETPID and msgrcv
 * with MSG_COPY leave values, queued messages and last pids as they were.
 */
import { NR } from "./inject.ts";
import { addressOf, rawSyscall } from "./libc.ts";

const IPC_STAT = 2, GETPID = 11, GETALL = 13;
const IPC_NOWAIT = 0o4000, MSG_COPY = 0o40000;

/** struct ipc64_perm, the head of semid64_ds and msqid64_ds (x86-64). */
export interface IpcPerm {
  key: number;
  uid: number;
  gid: number;
  cuid: number;
  cgid: number;
  mode: number;
}

function perm(v: DataView): IpcPerm {
  return {
    key: v.getInt32(0, true),
    uid: v.getUint32(4, true),
    gid: v.getUint32(8, true),
    cuid: v.getUint32(12, true),
    cgid: v.getUint32(16, true),
    mode: v.getUint32(20, true) & 0o777,
  };
}

/** semctl(GETPID) for each semaphore of set `semid`: the last process to semop (or SETVAL) it. */
export function semLastPids(semid: number, nsems: number): number[] {
  return Array.from(
    { length: nsems },
    (_, i) => Number(rawSyscall(`semctl(${semid}, ${i}, GETPID)`, NR.semctl, semid, i, GETPID)),
  );
}

export interface SemStat extends IpcPerm {
  nsems: number;
  otime: number;
}

/** semctl(IPC_STAT): struct semid64_ds (104 bytes; otime at 48, nsems at 80). */
export function semStat(semid: number): SemStat {
  const buf = new Uint8Array(104);
  rawSyscall(`semctl(${semid}, IPC_STAT)`, NR.semctl, semid, 0, IPC_STAT, addressOf(buf));
  const v = new DataView(buf.buffer);
  return {
    ...perm(v),
    otime: Number(v.getBigInt64(48, true)),
    nsems: Number(v.getBigUint64(80, true)),
  };
}

/** semctl(GETALL): every semaphore's value. */
export function semValues(semid: number, nsems: number): number[] {
  const buf = new Uint16Array(Math.max(nsems, 1));
  rawSyscall(`semctl(${semid}, GETALL)`, NR.semctl, semid, 0, GETALL, addressOf(buf));
  return Array.from(buf.subarray(0, nsems));
}

export interface MsgStat extends IpcPerm {
  /** Bytes queued, messages queued, the queue's limit in bytes. */
  cbytes: number;
  qnum: number;
  qbytes: number;
  lspid: number;
  lrpid: number;
}

/** msgctl(IPC_STAT): struct msqid64_ds (120 bytes; cbytes at 72, lspid at 96). */
export function msgStat(msqid: number): MsgStat {
  const buf = new Uint8Array(120);
  rawSyscall(`msgctl(${msqid}, IPC_STAT)`, NR.msgctl, msqid, IPC_STAT, addressOf(buf));
  const v = new DataView(buf.buffer);
  return {
    ...perm(v),
    cbytes: Number(v.getBigUint64(72, true)),
    qnum: Number(v.getBigUint64(80, true)),
    qbytes: Number(v.getBigUint64(88, true)),
    lspid: v.getInt32(96, true),
    lrpid: v.getInt32(100, true),
  };
}

export interface QueuedMessage {
  type: bigint;
  data: Uint8Array;
}

/**
 * A copy of message number `index` of queue `msqid` (msgrcv with
 * MSG_COPY: the message stays queued, lrpid is not changed); `room` is
 * the largest message size to expect.
 */
export function msgPeek(msqid: number, index: number, room: number): QueuedMessage {
  const buf = new Uint8Array(8 + room);
  const n = rawSyscall(
    `msgrcv(${msqid}, message ${index}, MSG_COPY)`,
    NR.msgrcv,
    msqid,
    addressOf(buf),
    room,
    index,
    IPC_NOWAIT | MSG_COPY,
  );
  const type = new DataView(buf.buffer).getBigInt64(0, true);
  return { type, data: buf.slice(8, 8 + Number(n)) };
}

/** Removes a semaphore set or a message queue amber made, from amber (IPC_RMID). */
export function removeIpc(what: "sem" | "msg", id: number): void {
  if (what === "sem") rawSyscall(`semctl(${id}, IPC_RMID)`, NR.semctl, id, 0, 0, 0);
  else rawSyscall(`msgctl(${id}, IPC_RMID)`, NR.msgctl, id, 0, 0);
}
