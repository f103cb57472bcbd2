/** SysV semaphores, asked from outside: which process last used each semaphore. */
import { rawSyscall } from "./libc.ts";

const NR_SEMCTL = 66, GETPID = 11;

/** semctl(GETPID) for each semaphore of set `semid`: the last process to semop (or SETVAL) it. */
export function semLastPids(semid: number, nsems: number): number[] {
  return Array.from(
    { length: nsems },
    (_, i) => Number(rawSyscall(`semctl(${semid}, ${i}, GETPID)`, NR_SEMCTL, semid, i, GETPID)),
  );
}
