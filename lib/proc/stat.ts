/** /proc/PID/stat, the fields amber uses. */
import { AmberError } from "../errors.ts";
import { readProcText } from "./read.ts";

export interface ProcStat {
  pid: number;
  comm: string;
  state: string;
  ppid: number;
  pgid: number;
  sid: number;
  ttyNr: number;
  tpgid: number;
  flags: number;
  /** Field 22: when the task started, in USER_HZ ticks of CLOCK_BOOTTIME. */
  startTime: bigint;
  startCode: bigint;
  endCode: bigint;
  startStack: bigint;
  exitSignal: number;
  /** Field 52: the wait status a zombie's parent will read. */
  exitCode: number;
  startData: bigint;
  endData: bigint;
  startBrk: bigint;
  argStart: bigint;
  argEnd: bigint;
  envStart: bigint;
  envEnd: bigint;
}

/** PF_KTHREAD in the flags field. */
export const PF_KTHREAD = 0x00200000;

export function parseStat(text: string): ProcStat {
  const open = text.indexOf("(");
  const close = text.lastIndexOf(")");
  if (open < 0 || close < open) throw new AmberError(`stat: cannot parse "${text.slice(0, 60)}"`);
  // f[0] is field 3 (state) in proc(5) numbering.
  const f = text.slice(close + 2).trim().split(" ");
  const n = (field: number) => Number(f[field - 3]);
  const b = (field: number) => BigInt(f[field - 3] ?? 0);
  return {
    pid: Number(text.slice(0, open).trim()),
    comm: text.slice(open + 1, close),
    state: f[0],
    ppid: n(4),
    pgid: n(5),
    sid: n(6),
    ttyNr: n(7),
    tpgid: n(8),
    flags: n(9),
    startTime: b(22),
    startCode: b(26),
    endCode: b(27),
    startStack: b(28),
    exitSignal: n(38),
    startData: b(45),
    endData: b(46),
    startBrk: b(47),
    argStart: b(48),
    argEnd: b(49),
    envStart: b(50),
    envEnd: b(51),
    exitCode: n(52),
  };
}

export function readStat(pid: number, tid?: number): ProcStat {
  return parseStat(readProcText(pid, tid === undefined ? "stat" : `task/${tid}/stat`));
}
