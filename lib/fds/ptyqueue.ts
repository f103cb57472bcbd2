/**
 * The bytes waiting in a pty (lib/fds/pty.ts), taken out at dump and put
 * back for a dump -R, a failed dump, and at restore, so that a reader
 * finds the same queue: the same bytes, the complete lines of a canonical
 * slave as lines, its partial line partial.
 *
 * Typed (master to slave): in canonical mode (ICANON) the slave's reads
 * are taken first, one complete line each (a line ended by VEOF reads
 * without it; an empty one reads as 0 bytes). Switching ICANON off then
 * makes the partial line readable; switching it back with an empty queue
 * leaves no line state behind. A pending VLNEXT (the next byte is to be
 * taken literally) is seen by stuffing a newline first: it ends the
 * partial line, which FIONREAD then counts, unless VLNEXT takes it.
 *
 * Putting back goes through TIOCSTI (the line discipline receives each
 * byte at once; a write to the master would be received later, by a
 * kernel worker, after the termios are back): with echo, signals, input
 * translation and line editing off, and in canonical mode VLNEXT before
 * every byte that would end a line, each line ended by its own newline
 * (or VEOL, VEOL2) or by VEOF. Written (slave to master): the master's
 * side is always raw, so the bytes are read and stuffed back as they are
 * (in packet mode each read starts with a TIOCPKT_DATA byte, dropped).
 * A master whose buffer is full is refused (pty.ts): more may wait in the
 * pty's flip buffer, whose room depends on how the bytes were written.
 * Bytes a kernel worker had not moved from there yet (a buffer not full)
 * are written again on the slave side, OPOST off, to wait there again.
 */
import { z } from "zod";
import {
  getInt,
  getTermios,
  openPeer,
  readSome,
  setTermios,
  stuffByte,
  type Termios,
  withNonBlocking,
  writeSome,
} from "../../ffi/tty.ts";
import { libc } from "../../ffi/libc.ts";
import { AmberError } from "../errors.ts";
import { bytes } from "../images/codec.ts";

/** n_tty's buffer is 4096 bytes with one kept free: a longer queue cannot be put back. */
export const QUEUE_MAX = 4095;
/**
 * Typed bytes are taken out only while FIONREAD shows fewer (complete
 * lines only, in canonical mode): the partial line is seen only once
 * taken out, and a full buffer may have more behind it, in the pty's
 * flip buffer, that TIOCSTI could not put back.
 */
export const KEEP_BELOW = 2048;

const kept = bytes.refine((b) => b.length <= QUEUE_MAX, `more than ${QUEUE_MAX} bytes`);

export const InputQueue = z.object({
  /** Canonical mode: the complete lines, as the slave's reads returned them. */
  lines: z.array(kept).max(QUEUE_MAX + 1),
  /** The partial line (canonical mode), or every byte (non-canonical). */
  rest: kept,
  /** The last byte typed was VLNEXT: the next one is to be taken literally. */
  lnext: z.boolean().optional(),
  /** The master is in packet mode, which reports changes of IXON's characters: kept as they are. */
  packet: z.boolean().optional(),
}).refine(
  (q) => q.lines.reduce((s, l) => s + l.length + 1, q.rest.length) <= QUEUE_MAX + 1,
  `more than ${QUEUE_MAX} bytes queued`,
);
export type InputQueue = z.output<typeof InputQueue>;

/**
 * What the slave side wrote and nobody read: the master's buffer (not
 * full), and what was still on its way there, in the pty's flip buffer
 * (TTYB_DEFAULT_MEM_LIMIT bounds it).
 */
export const OUTPUT_MAX = QUEUE_MAX + 65536;
export const OutputQueue = bytes.refine(
  (b) => b.length <= OUTPUT_MAX,
  `more than ${OUTPUT_MAX} bytes`,
);

// termios bits (asm-generic/termbits.h) and c_cc indices.
const IGNCR = 0o200, ICRNL = 0o400, INLCR = 0o100, ISTRIP = 0o40, IUCLC = 0o1000;
const PARMRK = 0o10, IXON = 0o2000, IXANY = 0o4000, IMAXBEL = 0o20000;
export const ICANON = 0o2, EXTPROC = 0o200000;
const ISIG = 0o1, XCASE = 0o4, ECHO = 0o10, ECHOE = 0o20, ECHOK = 0o40, ECHONL = 0o100;
const ECHOCTL = 0o1000, ECHOPRT = 0o2000, ECHOKE = 0o4000, IEXTEN = 0o100000;
const VERASE = 2, VKILL = 3, VEOF = 4, VTIME = 5, VMIN = 6, VSTART = 8, VSTOP = 9, VEOL = 11;
const VREPRINT = 12, VWERASE = 14, VLNEXT = 15, VEOL2 = 16;
const NL = 0x0a, OPOST = 0o1;
/** TIOCPKT_DATA: the byte a packet-mode master's read of plain data starts with. */
const PKT_DATA = 0;

/** How bytes are stuffed into a slave so they are queued exactly as they are. */
interface Stuffing {
  termios: Termios;
  canonical: boolean;
  /** The bytes that end a line in canonical mode. */
  ends: Set<number>;
  /** Bytes needing VLNEXT before them. */
  quoted: Set<number>;
  lnext: number;
  eof: number;
}

/** The termios for stuffing: nothing but the queueing itself happens to the bytes. */
function stuffing(t: Termios, packet: boolean): Stuffing {
  const canonical = (t.lflag & ICANON) !== 0;
  const cc = [...t.cc];
  for (const i of [VERASE, VKILL, VWERASE, VREPRINT]) cc[i] = 0;
  // VEOL2 ends a line only with IEXTEN, which stuffing turns on for VLNEXT.
  if (!(t.lflag & IEXTEN)) cc[VEOL2] = 0;
  const ends = new Set([NL, cc[VEOL], cc[VEOL2]].filter((c) => c !== 0));
  // In packet mode the master is told of every change of IXON's characters: leave them.
  const flow = packet && (t.iflag & IXON) ? [cc[VSTART], cc[VSTOP]].filter((c) => c) : [];
  if (!packet) cc[VSTART] = cc[VSTOP] = 0;
  const free = [0x16, 0x04, 0x01, 0x02, 0x05, 0x06, 0x07].filter((c) =>
    !ends.has(c) && !flow.includes(c)
  );
  const [lnext, eof] = free;
  cc[VLNEXT] = lnext;
  cc[VEOF] = eof;
  const off = ISIG | XCASE | ECHO | ECHOE | ECHOK | ECHONL | ECHOCTL | ECHOPRT | ECHOKE;
  const lflag = canonical ? (t.lflag & ~off) | IEXTEN : t.lflag & ~(off | IEXTEN);
  return {
    termios: {
      ...t,
      iflag: t.iflag & ~(IGNCR | ICRNL | INLCR | ISTRIP | IUCLC | PARMRK | IXANY | IMAXBEL),
      lflag,
      cc,
    },
    canonical,
    ends,
    quoted: new Set([...ends, lnext, eof, ...flow]),
    lnext,
    eof,
  };
}

/**
 * Why the typed bytes `q` cannot be put back exactly into a slave with
 * termios `t`, if they cannot.
 */
export function inputRefusal(q: InputQueue, t: Termios): string | undefined {
  if (!(t.lflag & ICANON) && q.lines.length) return "complete lines on a non-canonical pty";
  if ((t.lflag & ICANON) || !q.packet || !(t.iflag & IXON)) return;
  const flow = [t.cc[VSTART], t.cc[VSTOP]].filter((c) => c);
  if (q.rest.some((b) => flow.includes(b))) {
    return "bytes typed include IXON's start or stop character, in packet mode";
  }
}

/** What `drainInput` has taken so far (a failure half way leaves it incomplete). */
export interface Drained {
  lines: Uint8Array[];
  rest: Uint8Array;
  lnext: boolean;
}

/**
 * Reads until nothing is left (EAGAIN, or a read of 0 bytes where that is
 * not an empty line: non-canonical with VMIN and VTIME 0); at most `max` reads.
 */
function readEach(fd: number, max: number, lines: boolean, each: (b: Uint8Array) => void): void {
  const buf = new Uint8Array(2 * (QUEUE_MAX + 1));
  for (let i = 0; i < max; i++) {
    const n = readSome(fd, buf);
    if (n < 0 || (n === 0 && !lines)) return;
    each(buf.slice(0, n));
  }
  throw new AmberError(`its queue still gives bytes after ${max} reads`);
}

/**
 * Takes every byte typed and not read yet out of slave `fd` (amber's copy
 * of a descriptor of the frozen tree), into `into`; the termios and the
 * file's flags are left as they were. Not for EXTPROC (refused before).
 */
export function drainInput(fd: number, into: Drained): void {
  const t = getTermios(fd);
  const canonical = (t.lflag & ICANON) !== 0;
  withNonBlocking(fd, () => {
    try {
      // A non-blocking read ends with EAGAIN once the worker's pending bytes are in too.
      if (canonical) readEach(fd, QUEUE_MAX + 2, true, (line) => into.lines.push(line));
      const probed = canonical && (t.lflag & IEXTEN) !== 0 && t.cc[VLNEXT] !== 0;
      if (probed) into.lnext = lnextPending(fd, t);
      if (canonical) setTermios(fd, { ...t, lflag: t.lflag & ~ICANON, cc: rawCc(t.cc) });
      const rest: number[] = [];
      readEach(fd, QUEUE_MAX + 2, false, (b) => rest.push(...b));
      if (probed && rest.pop() !== NL) throw new AmberError("the newline stuffed to probe VLNEXT");
      into.rest = new Uint8Array(rest);
    } finally {
      setTermios(fd, t);
    }
  });
}

function rawCc(cc: number[]): number[] {
  const out = [...cc];
  out[VMIN] = 1;
  out[VTIME] = 0;
  return out;
}

/**
 * Whether VLNEXT is pending: a stuffed newline then stays in the partial
 * line (FIONREAD unchanged) instead of ending it. Changing the termios
 * keeps that state as long as ICANON stays on.
 */
function lnextPending(fd: number, t: Termios): boolean {
  const before = getInt(fd, "FIONREAD");
  setTermios(fd, stuffing(t, true).termios);
  stuffByte(fd, NL);
  return getInt(fd, "FIONREAD") === before;
}

/** Stuffs the typed bytes `q` into slave `fd` and checks the kernel queued them all. */
export function putInput(fd: number, q: InputQueue): void {
  const t = getTermios(fd);
  const s = stuffing(t, q.packet ?? false);
  if (!s.canonical && q.lines.length) throw new AmberError("complete lines on a non-canonical pty");
  const before = getInt(fd, "FIONREAD");
  setTermios(fd, s.termios);
  try {
    for (const line of q.lines) putLine(fd, line, s);
    for (const b of q.rest) putByte(fd, b, s);
    if (q.lnext) stuffByte(fd, s.lnext);
  } finally {
    setTermios(fd, t);
  }
  // Canonical: FIONREAD counts the complete lines' bytes, without the VEOF ends.
  const want = s.canonical ? q.lines.reduce((n, l) => n + l.length, 0) : q.rest.length;
  const got = getInt(fd, "FIONREAD") - before;
  if (got !== want) throw new AmberError(`put back ${got} of ${want} bytes typed`);
}

function putByte(fd: number, b: number, s: Stuffing): void {
  if (s.canonical && s.quoted.has(b)) stuffByte(fd, s.lnext);
  stuffByte(fd, b);
}

/** A complete line: ended by its own last byte if that ends lines, else by VEOF. */
function putLine(fd: number, line: Uint8Array, s: Stuffing): void {
  const last = line.length - 1;
  const ended = last >= 0 && s.ends.has(line[last]);
  line.forEach((b, i) => i === last && ended ? stuffByte(fd, b) : putByte(fd, b, s));
  if (!ended) stuffByte(fd, s.eof);
}

/** Takes what the slave side wrote out of master `fd` (amber's copy); packet mode's data bytes dropped. */
export function drainOutput(fd: number, packet: boolean): Uint8Array {
  const out: number[] = [];
  withNonBlocking(fd, () =>
    readEach(fd, 2 * (QUEUE_MAX + 1), false, (b) => {
      if (packet && b[0] !== PKT_DATA) {
        throw new AmberError(`packet mode: read a status byte ${b[0]} instead of data`);
      }
      out.push(...(packet ? b.subarray(1) : b));
    }));
  return new Uint8Array(out);
}

/**
 * Puts the bytes the slave side wrote back for master `fd`'s holder to
 * read: stuffed into its buffer as far as it holds, the rest written on
 * the slave side to wait in the flip buffer.
 */
export function putOutput(fd: number, data: Uint8Array): void {
  const before = getInt(fd, "FIONREAD");
  const direct = data.subarray(0, Math.max(0, QUEUE_MAX - before));
  for (const b of direct) stuffByte(fd, b);
  const got = getInt(fd, "FIONREAD") - before;
  if (got !== direct.length) {
    throw new AmberError(`put back ${got} of ${direct.length} bytes written on its slave side`);
  }
  if (direct.length < data.length) writeOnSlave(fd, data.subarray(direct.length));
}

/** Writes `rest` on the slave side of master `fd`, OPOST off: it was processed once already. */
function writeOnSlave(fd: number, rest: Uint8Array): void {
  const slave = openPeer(fd);
  try {
    const t = getTermios(slave);
    setTermios(slave, { ...t, oflag: t.oflag & ~OPOST });
    try {
      // In small writes, which the flip buffer takes the most of.
      for (let off = 0; off < rest.length;) {
        const n = writeSome(slave, rest.subarray(off, off + 256));
        if (n === 0) {
          throw new AmberError(
            `the pty took ${off} of the ${rest.length} bytes written on its slave side beyond ` +
              "its master's buffer",
          );
        }
        off += n;
      }
    } finally {
      setTermios(slave, t);
    }
  } finally {
    libc().close(slave);
  }
}

const CAP_SYS_ADMIN = 21n;

/** TIOCSTI on a terminal other than amber's controlling one needs CAP_SYS_ADMIN. */
export function canStuff(): boolean {
  const eff = /^CapEff:\s*([0-9a-f]+)$/m.exec(Deno.readTextFileSync("/proc/self/status"))?.[1];
  return eff !== undefined && ((BigInt(`0x${eff}`) >> CAP_SYS_ADMIN) & 1n) === 1n;
}
