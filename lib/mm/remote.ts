/**
 * Lazy restore from the memory of the dumped tree itself (issue 13;
 * CRIU's `dump --lazy-pages` with `lazy-pages --page-server`).
 *
 * `dump --lazy-pages --address A --port P` writes every image but the
 * pages of lazy mappings (lib/mm/lazy.ts isLazy), which the pagemap image
 * lists as `remoteRuns`, then keeps the tree frozen and serves those
 * pages over TCP from its memory. `restore --lazy-pages --page-server
 * --address A --port P` connects before it creates anything, and its lazy
 * pages server (lib/mm/lazy.ts) reads the missing pages from here instead
 * of a pages file. Once every page is in the destination says so, and
 * only then does the source end its tree; a connection that ends before
 * (a destination that failed, was killed, or killed its tree because this
 * source failed) resumes the source tree, which no request changed.
 *
 * Wire, on one connection (integers little-endian):
 *
 *     destination  hello    "AMBERLZY" | u32 version (1) | u32 0
 *     source       reply    (lib/streaming.ts) ok, text {"rootPid", "createdAt"} of its dump
 *     destination  request  u32 op | u32 pid | u64 address | u32 pages | u32 number
 *       op 1 (pages):  source answers one data record of lib/images/stream.ts
 *                      (named pages-PID.img, numbered as the request, crc32 over it)
 *                      holding the pages, or a refusal reply (why) and closes
 *       op 2 (all in): source answers reply ok, and ends its tree
 *
 * The source serves only pages its images left out, of processes of its
 * tree: a request for anything else is refused (the destination is a peer
 * on the network, its requests are hostile input).
 */
import { readMemoryProc, readRangesAsync } from "../../ffi/memory.ts";
import { AmberError, faultPointAsync, InterruptedError } from "../errors.ts";
import {
  type ByteReader,
  crc32Ready,
  DATA,
  errnoOf,
  messageOf,
  RECORD_HEADER_BYTES,
  RECORD_MAX,
  recordCrc,
  recordHeader,
} from "../images/stream.ts";
import {
  acceptOne,
  type PageServerAddress,
  readReplyMessage,
  reply,
  within,
  writeReply,
} from "../streaming.ts";
import type { PageSource } from "./lazy.ts";
import { PAGE } from "./mappings.ts";
import { type Span, subtract, union } from "./tracking.ts";

const HELLO = new TextEncoder().encode("AMBERLZY");
const VERSION = 1;
const HELLO_BYTES = 16;
const REQUEST_BYTES = 24;
const OP_PAGES = 1, OP_DONE = 2;
const PAGE_SIZE = Number(PAGE);
/** Pages one request may ask for: one record's payload. */
const MAX_REQUEST_PAGES = RECORD_MAX / PAGE_SIZE;
const REPLY_MAGIC = new TextEncoder().encode("AMBERACK");
/** How long the source may take to answer a request, unless asked otherwise. */
export const DEFAULT_SOURCE_TIMEOUT_MS = 30_000;

/** Which dump a source serves: the destination checks it is the one its images are. */
interface DumpIdentity {
  rootPid: number;
  createdAt: string;
}

/**
 * Fills `buf` from `conn`; false if the connection ended before the first
 * byte, throws if it ended inside or failed (naming the socket error).
 */
async function readInto(conn: ByteReader, buf: Uint8Array, what: string): Promise<boolean> {
  const at = (rest: string) => (what ? `${what}: ${rest}` : rest);
  let got = 0;
  while (got < buf.length) {
    let n: number | null;
    try {
      n = await conn.read(buf.subarray(got));
    } catch (e) {
      throw new AmberError(at(`recv: ${errnoOf(e)}`), { cause: e });
    }
    if (n === null) {
      if (got === 0) return false;
      throw new AmberError(at("connection closed inside a message"));
    }
    got += n;
  }
  return true;
}

async function send(conn: Deno.Conn, parts: Uint8Array[], what: string): Promise<void> {
  try {
    for (const p of parts) await writeReply(conn as Deno.TcpConn, p);
  } catch (e) {
    throw new AmberError(what ? `${what}: send: ${errnoOf(e)}` : `send: ${errnoOf(e)}`, {
      cause: e,
    });
  }
}

function request(op: number, pid: number, addr: bigint, pages: number, n: number): Uint8Array {
  const b = new Uint8Array(REQUEST_BYTES);
  const v = new DataView(b.buffer);
  v.setUint32(0, op, true);
  v.setUint32(4, pid, true);
  v.setBigUint64(8, addr, true);
  v.setUint32(16, pages, true);
  v.setUint32(20, n, true);
  return b;
}

/** What `dump --lazy-pages` serves once its images are written. */
export interface PageSourceRequest extends PageServerAddress {
  /** The pages each process's images left out (page numbers, sorted, disjoint). */
  spans: Map<number, Span[]>;
  dump: DumpIdentity;
  /** Rejects once the dump is asked to stop (SIGINT): the tree resumes. */
  stopped: Promise<never>;
  /** Called once it listens, with the port. */
  listening?: (port: number) => void;
  log: (line: string) => void;
}

/** What serving took. */
export interface PageSourceStats {
  /** The destination (address:port). */
  peer: string;
  /** Page requests answered. */
  requests: number;
  /** Bytes of pages sent. */
  bytes: number;
  /** Milliseconds from the destination's connection to its word that all is in. */
  ms: number;
}

/**
 * Serves the left-out pages of the frozen tree to one destination until it
 * says all are in (resolves: the caller ends the tree). Throws if the
 * connection ends or fails before, or a request is refused: the caller
 * resumes the tree.
 */
export async function servePageSource(req: PageSourceRequest): Promise<PageSourceStats> {
  let where = `lazy page source ${req.address}:${req.port}`;
  let listener: Deno.TcpListener;
  try {
    listener = Deno.listen({ hostname: req.address, port: req.port });
  } catch (e) {
    throw new AmberError(`${where}: listen: ${errnoOf(e)}`, { cause: e });
  }
  const port = (listener.addr as Deno.NetAddr).port;
  where = `lazy page source ${req.address}:${port}`;
  const { conn, peer } = await acceptOne(
    listener,
    req.stopped,
    where,
    () => {},
    () => req.listening?.(port),
  );
  conn.setNoDelay(true); // small requests and answers, one at a time
  const from = `${where}: destination ${peer}`;
  const stats: PageSourceStats = { peer, requests: 0, bytes: 0, ms: 0 };
  const t0 = performance.now();
  const stop = <T>(p: Promise<T>) => Promise.race([p, req.stopped]);
  const allowed = new Map([...req.spans].map(([pid, s]) => [pid, union(s)]));
  try {
    const hello = new Uint8Array(HELLO_BYTES);
    if (!await stop(readInto(conn, hello, from))) {
      throw new AmberError(`${from}: closed the connection before its hello`);
    }
    const hv = new DataView(hello.buffer);
    if (HELLO.some((b, i) => hello[i] !== b) || hv.getUint32(8, true) !== VERSION) {
      throw new AmberError(`${from}: not an amber lazy pages client of version ${VERSION}`);
    }
    await send(conn, [reply(true, JSON.stringify(req.dump))], from);
    req.log(`${from}: connected`);
    const head = new Uint8Array(REQUEST_BYTES);
    const hv2 = new DataView(head.buffer);
    let buf = new Uint8Array(0);
    const half = [...allowed.values()].flat().reduce((t, [a, b]) => t + b - a, 0) * PAGE_SIZE / 2;
    let halfway = false;
    for (let n = 1;; n++) {
      if (!await stop(readInto(conn, head, from))) {
        throw new AmberError(`${from}: closed the connection before all pages were in`);
      }
      const op = hv2.getUint32(0, true), pid = hv2.getUint32(4, true);
      const addr = hv2.getBigUint64(8, true), pages = hv2.getUint32(16, true);
      if (hv2.getUint32(20, true) !== n) {
        throw new AmberError(`${from}: request ${n} numbered ${hv2.getUint32(20, true)}`);
      }
      if (op === OP_DONE) {
        await send(conn, [reply(true)], from);
        stats.ms = performance.now() - t0;
        return stats;
      }
      if (op !== OP_PAGES) throw new AmberError(`${from}: request ${n}: unknown op ${op}`);
      const what = `${from}: request ${n}: pid ${pid}: pages ${addr.toString(16)}+${pages}`;
      checkRequest(allowed.get(pid), addr, pages, what);
      const len = pages * PAGE_SIZE;
      if (buf.length < len) buf = new Uint8Array(len);
      const data = buf.subarray(0, len);
      await readFrozen(pid, addr, data, what);
      const name = new TextEncoder().encode(`pages-${pid}.img`);
      const crc32 = await crc32Ready();
      await send(conn, [recordHeader(DATA, name, data, n)(crc32), name, data], from);
      stats.requests++;
      stats.bytes += len;
      if (!halfway && stats.bytes >= half) {
        halfway = true;
        await faultPointAsync("lazy-source-half");
      }
    }
  } catch (e) {
    // The destination kills its tree on this word (or on the closed connection).
    if (!(e instanceof InterruptedError)) {
      await writeReply(conn, reply(false, messageOf(e).replace(`${from}: `, ""))).catch(() => {});
    }
    throw e;
  } finally {
    try {
      conn.close();
    } catch { /* closed */ }
  }
}

/** Refuses a request for pages its images hold, or of a process not dumped. */
function checkRequest(allowed: Span[] | undefined, addr: bigint, pages: number, what: string) {
  if (!allowed) throw new AmberError(`${what}: not a process of the dumped tree (refused)`);
  if (pages < 1 || pages > MAX_REQUEST_PAGES || addr % PAGE !== 0n || addr >= 1n << 47n) {
    throw new AmberError(`${what}: malformed (refused)`);
  }
  const first = Number(addr / PAGE);
  if (subtract([[first, first + pages]], allowed).length) {
    throw new AmberError(`${what}: not pages the images left out (refused)`);
  }
}

/** The frozen process's pages (through /proc/PID/mem where process_vm_readv cannot, PROT_NONE). */
async function readFrozen(pid: number, addr: bigint, buf: Uint8Array, what: string) {
  let got = 0;
  try {
    got = await readRangesAsync(pid, [{ addr, len: buf.length }], buf);
  } catch { /* below */ }
  if (got === buf.length) return;
  try {
    buf.set(readMemoryProc(pid, addr, buf.length));
  } catch (e) {
    throw new AmberError(`${what}: read: ${messageOf(e)}`);
  }
}

/**
 * The destination's side: one connection to the dumping amber, whose
 * pages are read as the lazy pages server asks (one request at a time).
 */
export class RemotePages {
  private n = 0;
  private tail: Promise<unknown> = Promise.resolve();
  private failure?: AmberError;
  private closed = false;
  private readonly head = new Uint8Array(RECORD_HEADER_BYTES);

  private constructor(
    private readonly conn: Deno.TcpConn,
    readonly where: string,
    private readonly timeoutMs: number,
  ) {}

  /**
   * Connects and checks the source serves the dump these images are
   * (`dump`: their inventory); throws naming the address and the error.
   */
  static async connect(
    to: PageServerAddress & { timeoutMs?: number },
    dump: DumpIdentity,
  ): Promise<RemotePages> {
    const where = `page source ${to.address}:${to.port}`;
    let conn: Deno.TcpConn;
    try {
      conn = await Deno.connect({ hostname: to.address, port: to.port });
    } catch (e) {
      throw new AmberError(`${where}: connect: ${errnoOf(e)}`, { cause: e });
    }
    conn.setNoDelay(true); // small requests and answers, one at a time
    const r = new RemotePages(conn, where, to.timeoutMs ?? DEFAULT_SOURCE_TIMEOUT_MS);
    try {
      const hello = new Uint8Array(HELLO_BYTES);
      hello.set(HELLO);
      new DataView(hello.buffer).setUint32(8, VERSION, true);
      await send(conn, [hello], where);
      const said = await r.answer(readReplyMessage(conn, where));
      if (!said.ok) throw new AmberError(`${where}: ${said.text}`);
      let serves: Partial<DumpIdentity> = {};
      try {
        serves = JSON.parse(said.text);
      } catch { /* below */ }
      if (serves.rootPid !== dump.rootPid || serves.createdAt !== dump.createdAt) {
        throw new AmberError(
          `${where}: serves the dump of pid ${serves.rootPid} taken ${serves.createdAt}, ` +
            `not these images (pid ${dump.rootPid}, ${dump.createdAt})`,
        );
      }
    } catch (e) {
      r.close();
      throw e;
    }
    return r;
  }

  /** What the source owes, within the timeout: a source that hangs fails like one that is gone. */
  private answer<T>(p: Promise<T>): Promise<T> {
    return within(p, this.timeoutMs, () => {
      this.close(); // the late answer, if it comes, must not be read as the next one
      return `no answer for ${this.timeoutMs / 1000} s (the source hangs)`;
    });
  }

  /** The pages of process `pid`, by their address in the source. */
  forPid(pid: number): PageSource {
    return {
      label: `${this.where} (its pid ${pid})`,
      read: (buf, off) => this.queue(() => this.answer(this.fetch(pid, BigInt(off), buf))),
      close: () => {},
    };
  }

  private queue<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.tail.then(() => {
      if (this.failure) throw this.failure;
      return fn().catch((e) => {
        // The stream is out of step after any failure: every later read fails the same way.
        this.failure ??= e instanceof AmberError ? e : new AmberError(messageOf(e));
        throw this.failure;
      });
    });
    this.tail = p.catch(() => {});
    return p;
  }

  private async fetch(pid: number, addr: bigint, buf: Uint8Array): Promise<void> {
    for (let done = 0; done < buf.length; done += RECORD_MAX) {
      const part = buf.subarray(done, done + RECORD_MAX);
      await this.fetchOne(pid, addr + BigInt(done), part);
    }
  }

  private async fetchOne(pid: number, addr: bigint, buf: Uint8Array): Promise<void> {
    const n = ++this.n;
    await send(this.conn, [request(OP_PAGES, pid, addr, buf.length / PAGE_SIZE, n)], "");
    const h = this.head;
    if (!await readInto(this.conn, h, "")) {
      throw new AmberError("closed the connection (the source amber is gone)");
    }
    if (REPLY_MAGIC.every((b, i) => h[i] === b)) throw await this.refusal(h);
    const v = new DataView(h.buffer);
    const nameLen = v.getUint8(1), len = v.getUint32(4, true);
    if (v.getUint8(0) !== DATA || v.getUint32(12, true) !== n || len !== buf.length) {
      throw new AmberError(`answer ${n}: not the record asked for (corrupted)`);
    }
    const name = new Uint8Array(nameLen);
    if (!await readInto(this.conn, name, "") || !await readInto(this.conn, buf, "")) {
      throw new AmberError(`answer ${n}: connection closed inside it`);
    }
    if (new TextDecoder().decode(name) !== `pages-${pid}.img`) {
      throw new AmberError(`answer ${n}: pages of another process (corrupted)`);
    }
    if (recordCrc(await crc32Ready(), h, name, buf) !== v.getUint32(8, true)) {
      throw new AmberError(`answer ${n}: checksum mismatch (corrupted)`);
    }
  }

  /** The source's refusal, whose header was read already. */
  private async refusal(head: Uint8Array): Promise<AmberError> {
    const v = new DataView(head.buffer);
    const len = Math.min(v.getUint32(12, true), 4096);
    const text = new Uint8Array(len);
    await readInto(this.conn, text, "").catch(() => false);
    return new AmberError(`said: ${new TextDecoder().decode(text)}`);
  }

  /** Tells the source every page is in (it ends its tree) and waits for its word. */
  done(): Promise<void> {
    return this.queue(async () => {
      await send(this.conn, [request(OP_DONE, 0, 0n, 0, ++this.n)], this.where);
      const said = await this.answer(readReplyMessage(this.conn, this.where));
      if (!said.ok) throw new AmberError(`${this.where}: ${said.text}`);
    });
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    try {
      this.conn.close();
    } catch { /* closed */ }
  }
}
