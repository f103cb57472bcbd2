/**
 * Terminal ioctls amber runs on its own descriptors: on a copy of a
 * tracee's terminal (pidfd_getfd) at dump, on its own terminal at restore.
 */
import { addressOf, check, lastErrno, libc, rawSyscall, SysError } from "./libc.ts";
import { NR } from "./inject.ts";

export const TTY_IOCTL = {
  TCGETS: 0x5401,
  TCSETS: 0x5402,
  TIOCSCTTY: 0x540e,
  TIOCGPGRP: 0x540f,
  TIOCSPGRP: 0x5410,
  TIOCOUTQ: 0x5411,
  TIOCSTI: 0x5412,
  TIOCGWINSZ: 0x5413,
  TIOCSWINSZ: 0x5414,
  FIONREAD: 0x541b,
  TIOCPKT: 0x5420,
  TIOCGSID: 0x5429,
  TIOCGPTN: 0x80045430,
  TIOCSPTLCK: 0x40045431,
  TIOCGPKT: 0x80045438,
  TIOCGPTLCK: 0x80045439,
} as const;

const TIOCGPTPEER = 0x5441, O_RDWR = 2, O_NOCTTY = 0o400;

/** The kernel's struct termios (TCGETS): four flag words, the line discipline, 19 c_cc. */
export interface Termios {
  iflag: number;
  oflag: number;
  cflag: number;
  lflag: number;
  line: number;
  cc: number[];
}

export interface WinSize {
  rows: number;
  cols: number;
  xpixel: number;
  ypixel: number;
}

const TERMIOS_SIZE = 36, NCCS = 19;

function ioctl(fd: number, name: keyof typeof TTY_IOCTL, arg: Uint8Array): void {
  check(`ioctl(${name})`, libc().ioctl(fd, BigInt(TTY_IOCTL[name]), arg));
}

export function encodeTermios(t: Termios): Uint8Array {
  const b = new Uint8Array(TERMIOS_SIZE);
  const v = new DataView(b.buffer);
  [t.iflag, t.oflag, t.cflag, t.lflag].forEach((x, i) => v.setUint32(i * 4, x, true));
  b[16] = t.line;
  b.set(t.cc.slice(0, NCCS), 17);
  return b;
}

export function getTermios(fd: number): Termios {
  const b = new Uint8Array(TERMIOS_SIZE);
  ioctl(fd, "TCGETS", b);
  const v = new DataView(b.buffer);
  const [iflag, oflag, cflag, lflag] = [0, 1, 2, 3].map((i) => v.getUint32(i * 4, true));
  return { iflag, oflag, cflag, lflag, line: b[16], cc: [...b.subarray(17, 17 + NCCS)] };
}

export function setTermios(fd: number, t: Termios): void {
  ioctl(fd, "TCSETS", encodeTermios(t));
}

export function getWinSize(fd: number): WinSize {
  const a = new Uint16Array(4);
  ioctl(fd, "TIOCGWINSZ", new Uint8Array(a.buffer));
  return { rows: a[0], cols: a[1], xpixel: a[2], ypixel: a[3] };
}

export function setWinSize(fd: number, w: WinSize): void {
  ioctl(
    fd,
    "TIOCSWINSZ",
    new Uint8Array(new Uint16Array([w.rows, w.cols, w.xpixel, w.ypixel]).buffer),
  );
}

/** An int-valued ioctl (TIOCGPGRP, TIOCGPTN, FIONREAD...). */
export function getInt(fd: number, name: keyof typeof TTY_IOCTL): number {
  const a = new Int32Array(1);
  ioctl(fd, name, new Uint8Array(a.buffer));
  return a[0];
}

const NR_RT_SIGPROCMASK = 14, SIG_BLOCK = 0, SIG_SETMASK = 2, SIGTTOU = 22;

/**
 * Runs fn with SIGTTOU blocked on this (the main) thread: the kernel then
 * lets a process outside the terminal's foreground group change its
 * settings or foreground group instead of stopping it.
 */
export function withoutTtou<T>(fn: () => T): T {
  const set = new BigUint64Array([1n << BigInt(SIGTTOU - 1)]), old = new BigUint64Array(1);
  rawSyscall("rt_sigprocmask", NR_RT_SIGPROCMASK, SIG_BLOCK, addressOf(set), addressOf(old), 8);
  try {
    return fn();
  } finally {
    rawSyscall("rt_sigprocmask", NR_RT_SIGPROCMASK, SIG_SETMASK, addressOf(old), 0, 8);
  }
}

/** tcsetpgrp(3). */
export function setForeground(fd: number, pgrp: number): void {
  ioctl(fd, "TIOCSPGRP", new Uint8Array(new Int32Array([pgrp]).buffer));
}

export function ownProcessGroup(): number {
  return libc().getpgrp();
}

const NR_TGKILL = 234, NR_KILL = 62;

/** Stops amber itself with `signal` (it returns once amber is continued). */
export function stopSelf(signal: number): void {
  rawSyscall("tgkill", NR_TGKILL, Deno.pid, Deno.pid, signal);
}

/** kill(2): `target` is a pid, or minus a process group. */
export function sendSignal(target: number, signal: number): void {
  rawSyscall(`kill(${target}, ${signal})`, NR_KILL, target, signal);
}

const F_GETFL = 3, F_SETFL = 4, O_NONBLOCK = 0o4000, EAGAIN = 11, EIO = 5;

/**
 * Runs fn with O_NONBLOCK set on the open file description of `fd` (shared
 * with the process amber took it from), then puts its flags back.
 */
export function withNonBlocking<T>(fd: number, fn: () => T): T {
  const flags = check("fcntl(F_GETFL)", libc().fcntl(fd, F_GETFL, 0n));
  check("fcntl(F_SETFL)", libc().fcntl(fd, F_SETFL, BigInt(flags | O_NONBLOCK)));
  try {
    return fn();
  } finally {
    check("fcntl(F_SETFL)", libc().fcntl(fd, F_SETFL, BigInt(flags)));
  }
}

/**
 * One read(2) of a terminal into buf: the byte count (0 for an empty
 * line), or -1 when nothing is left: EAGAIN, or EIO once the other side
 * of a pty is closed and its bytes are all read.
 */
export function readSome(fd: number, buf: Uint8Array): number {
  const n = Number(libc().read(fd, buf, BigInt(buf.length)));
  if (n >= 0) return n;
  const errno = lastErrno();
  if (errno === EAGAIN || errno === EIO) return -1;
  throw new SysError("read", errno);
}

/** TIOCSTI: the terminal's line discipline receives `byte` as if it had come from the other side. */
export function stuffByte(fd: number, byte: number): void {
  ioctl(fd, "TIOCSTI", new Uint8Array([byte]));
}

const POLLPRI = 2;

/** Whether poll(2) reports POLLPRI on fd now (a pty master in packet mode: a status byte). */
export function hasPriorityData(fd: number): boolean {
  const pfd = new Uint8Array(8);
  const v = new DataView(pfd.buffer);
  v.setInt32(0, fd, true);
  v.setInt16(4, POLLPRI, true);
  rawSyscall("poll", NR.poll, addressOf(pfd), 1, 0);
  return (v.getInt16(6, true) & POLLPRI) !== 0;
}

/** A new descriptor of amber's own on the slave of pty master `fd` (TIOCGPTPEER), non-blocking. */
export function openPeer(fd: number): number {
  const flags = O_RDWR | O_NOCTTY | O_NONBLOCK;
  return Number(rawSyscall("ioctl(TIOCGPTPEER)", NR.ioctl, fd, TIOCGPTPEER, flags));
}

/** One write(2): the byte count, or 0 when the terminal takes nothing now (EAGAIN). */
export function writeSome(fd: number, data: Uint8Array): number {
  const n = Number(libc().write(fd, data, BigInt(data.length)));
  if (n >= 0) return n;
  const errno = lastErrno();
  if (errno === EAGAIN) return 0;
  throw new SysError("write", errno);
}
