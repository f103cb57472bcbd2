/**
 * A whole image set as one byte stream: `dump --stream` to stdout,
 * `restore --stream` from stdin, and the page server over TCP.
 *
 * Format (integers little-endian):
 *
 *     header  "AMBERSTM" | u32 version (1) | u32 flags (0)
 *     record  u8 type | u8 name length | u16 0 | u32 payload length | u32 crc32 | u32 number
 *             | name | payload
 *
 * A data record (type 1) appends its payload (at most RECORD_MAX bytes) to
 * the image file it names; a file's records come one after the other. A
 * dump sends the pages files as it reads them, then, once its verdict is
 * taken, the CBOR images and ghost copies it kept in memory, inventory.cbor
 * last. The end record (type 2, named "end") counts the files and bytes
 * sent; a stream without one is incomplete. Records are numbered from 1
 * and their crc32 covers the header (but the crc), name and payload, so a
 * lost, repeated or damaged record is named by its number.
 *
 * Reading trusts nothing: names come from the allow-list of image files
 * (no path can be formed), every length is checked against its bound
 * before anything is read, and what is read goes into an ImageDir's
 * staging directory, committed only once the end record checked out.
 */
import { AmberError, InterruptedError } from "../errors.ts";
import { processImage } from "./process.ts";
// (Loaded for the tree images they define, which the allow-list takes from codec.ts.)
import "../tree/pstree.ts";
import { type BulkFile, ImageDir } from "./dir.ts";
import {
  decodeImage,
  encodeImage,
  imageFileName,
  type ImageKind,
  MAX_IMAGE_BYTES,
  PID_MAX,
  treeImageNamed,
} from "./codec.ts";

const MAGIC = new TextEncoder().encode("AMBERSTM");
const VERSION = 1;
const HEADER_BYTES = 16;
export const RECORD_HEADER_BYTES = 16;
/** Largest payload of one record: a pages chunk (lib/mm/pages.ts) fits in one. */
export const RECORD_MAX = 4 * 1024 * 1024;
/** Records up to this size are written with one write (copied together). */
const COALESCE_BYTES = 64 * 1024;

function concat(parts: Uint8Array[], total: number): Uint8Array {
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
/** A data record's type (the lazy page source answers with them too, lib/mm/remote.ts). */
export const DATA = 1;
const END = 2;
const END_NAME = "end";
const END_BYTES = 16;
const INVENTORY = "inventory.cbor";
/** Largest pages file: a 47-bit address space. */
const MAX_PAGES_BYTES = 2 ** 47;

/** Where a stream's bytes go: stdout, a pipe, a socket. */
export interface ByteWriter {
  /** Writes some of `p` (as Deno.Writer); resolves with how many bytes. */
  write(p: Uint8Array): Promise<number>;
}

/** Where a stream's bytes come from: stdin, a pipe, a socket. */
export interface ByteReader {
  /** Reads into `p` (as Deno.Reader); resolves with how many bytes, null at the end. */
  read(p: Uint8Array): Promise<number | null>;
}

export function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** "EPIPE" for Deno's BrokenPipe and the like, else the message. */
export function errnoOf(e: unknown): string {
  const code = (e as { code?: unknown })?.code;
  return typeof code === "string" && /^E[A-Z0-9]+$/.test(code) ? code : messageOf(e);
}

/** Never settles: what a stream waits with when nothing can stop it. */
const NEVER = new Promise<never>(() => {});

export type Crc32 = typeof import("node:zlib").crc32;
let zlibCrc32: Crc32 | undefined;

/** node:zlib's crc32, loaded on first use: node compatibility costs every command ~50 ms of start-up. */
export async function crc32Ready(): Promise<Crc32> {
  return zlibCrc32 ??= (await import("node:zlib")).crc32;
}

/** A record's header; its crc is filled in once crc32 is loaded (see RecordWriter.enqueue). */
export function recordHeader(
  type: number,
  name: Uint8Array,
  payload: Uint8Array,
  n: number,
): Sealed {
  const h = new Uint8Array(RECORD_HEADER_BYTES);
  const v = new DataView(h.buffer);
  v.setUint8(0, type);
  v.setUint8(1, name.length);
  v.setUint32(4, payload.length, true);
  v.setUint32(12, n, true);
  return (crc32) => {
    v.setUint32(8, recordCrc(crc32, h, name, payload), true);
    return h;
  };
}

/** A part of the stream that needs crc32 to be complete. */
export type Sealed = (crc32: Crc32) => Uint8Array;

/** crc32 of a record: its header with the crc field zero, its name and its payload. */
export function recordCrc(
  crc32: Crc32,
  header: Uint8Array,
  name: Uint8Array,
  payload: Uint8Array,
): number {
  const h = header.slice();
  h.fill(0, 8, 12);
  return crc32(payload, crc32(name, crc32(h))) >>> 0;
}

function streamHeader(): Uint8Array {
  const h = new Uint8Array(HEADER_BYTES);
  h.set(MAGIC);
  new DataView(h.buffer).setUint32(8, VERSION, true);
  return h;
}

/**
 * Sends records in order on one writer. The first failure sticks: every
 * later send fails with it, so a dump stops at the first broken pipe.
 */
export class RecordWriter {
  private tail: Promise<void> = Promise.resolve();
  private failure?: unknown;
  private n = 0;
  /** Files and payload bytes sent so far. */
  files = 0;
  bytes = 0;
  /** Rejects once the dump is asked to stop (a signal): a write to a stalled reader waits with it. */
  stopped: Promise<never> = NEVER;

  /**
   * `explain`, given a failed write, may find a better reason (what the
   * page server said before it closed the connection).
   */
  constructor(
    private readonly out: ByteWriter,
    readonly where: string,
    private readonly explain?: (e: unknown) => Promise<unknown>,
  ) {
    this.enqueue([streamHeader()]).catch(() => {});
  }

  private async writeAll(p: Uint8Array): Promise<void> {
    for (let done = 0; done < p.length;) {
      let n: number;
      try {
        n = await Promise.race([this.out.write(p.subarray(done)), this.stopped]);
      } catch (e) {
        if (e instanceof AmberError || e instanceof InterruptedError) throw e;
        throw new AmberError(`${this.where}: write: ${errnoOf(e)}`, { cause: e });
      }
      done += n;
    }
  }

  private enqueue(parts: (Uint8Array | Sealed)[]): Promise<void> {
    const p = this.tail.then(async () => {
      if (this.failure) throw this.failure;
      try {
        const crc32 = await crc32Ready();
        // Small records (header, name, payload) go together in one write, not three each.
        let batch: Uint8Array[] = [], size = 0;
        const flush = async () => {
          if (batch.length) {
            await this.writeAll(batch.length === 1 ? batch[0] : concat(batch, size));
          }
          batch = [];
          size = 0;
        };
        for (const part of parts) {
          const b = part instanceof Uint8Array ? part : part(crc32);
          if (size + b.length > COALESCE_BYTES) await flush();
          if (b.length > COALESCE_BYTES) await this.writeAll(b);
          else {
            batch.push(b);
            size += b.length;
          }
        }
        await flush();
      } catch (e) {
        this.failure ??= this.explain && !(e instanceof InterruptedError)
          ? await this.explain(e)
          : e;
        throw this.failure;
      }
    });
    this.tail = p.catch(() => {});
    return p;
  }

  /** Sends `data` as records of file `name` (one empty record for an empty file). */
  send(name: string, data: Uint8Array, first = true): Promise<void> {
    return this.enqueue(this.records(name, data, first));
  }

  /** Sends each file as send() does, the small ones together. */
  sendAll(files: [string, Uint8Array][]): Promise<void> {
    return this.enqueue(files.flatMap(([name, data]) => this.records(name, data, true)));
  }

  private records(name: string, data: Uint8Array, first: boolean): (Uint8Array | Sealed)[] {
    const nameBytes = new TextEncoder().encode(name);
    if (first) this.files++;
    const parts: (Uint8Array | Sealed)[] = [];
    for (let off = 0; off < data.length || (off === 0 && !parts.length); off += RECORD_MAX) {
      const payload = data.subarray(off, off + RECORD_MAX);
      parts.push(recordHeader(DATA, nameBytes, payload, ++this.n), nameBytes, payload);
      this.bytes += payload.length;
    }
    return parts;
  }

  /** Sends the end record and waits until everything was handed to the writer. */
  async end(): Promise<void> {
    const payload = new Uint8Array(END_BYTES);
    const v = new DataView(payload.buffer);
    v.setUint32(0, this.files, true);
    v.setBigUint64(8, BigInt(this.bytes), true);
    const name = new TextEncoder().encode(END_NAME);
    await this.enqueue([recordHeader(END, name, payload, ++this.n), name, payload]);
  }

  /** Stops sending: whatever comes later fails with `why`. */
  fail(why: unknown): void {
    this.failure ??= why;
  }
}

/**
 * A pages file sent as the pages part copies it: chunks come from several
 * workers, out of order, and each waits for the ones before it, so the
 * stream holds the file in order and no more than the workers' buffers.
 */
class StreamedFile implements BulkFile {
  private written = 0;
  private waiting = new Map<number, { resolve: () => void; reject: (e: unknown) => void }>();
  private failure?: unknown;

  constructor(private readonly name: string, private readonly out: RecordWriter) {}

  get size(): number {
    return this.written;
  }

  setDirect(): boolean {
    return false;
  }

  truncate(size: number): void {
    if (size !== this.written) throw new Error(`${this.name}: a stream cannot be truncated`);
  }

  async pwriteAll(data: Uint8Array, offset: number): Promise<void> {
    if (this.failure) throw this.failure;
    if (offset < this.written) throw new Error(`${this.name}: offset ${offset} written twice`);
    if (offset > this.written) {
      await new Promise<void>((resolve, reject) => this.waiting.set(offset, { resolve, reject }));
    }
    try {
      await this.out.send(this.name, data, offset === 0);
    } catch (e) {
      this.abort(e);
      throw e;
    }
    this.written += data.length;
    const next = this.waiting.get(this.written);
    this.waiting.delete(this.written);
    next?.resolve();
  }

  pwriteAllSync(): void {
    throw new Error(`${this.name}: a stream is written asynchronously`);
  }

  abort(why: unknown): void {
    this.failure ??= why;
    for (const w of this.waiting.values()) w.reject(this.failure);
    this.waiting.clear();
  }

  close(): void {}
}

/** A small bulk file (a ghost copy) kept in memory until the images are sent. */
class HeldFile implements BulkFile {
  private buf = new Uint8Array(0);
  private length = 0;

  bytes(): Uint8Array {
    return this.buf.subarray(0, this.length);
  }

  setDirect(): boolean {
    return false;
  }

  truncate(size: number): void {
    this.grow(size);
    this.length = size;
  }

  private grow(size: number): void {
    if (size <= this.buf.length) return;
    const next = new Uint8Array(Math.max(size, this.buf.length * 2));
    next.set(this.bytes());
    this.buf = next;
  }

  pwriteAllSync(data: Uint8Array, offset: number): void {
    this.grow(offset + data.length);
    this.buf.set(data, offset);
    this.length = Math.max(this.length, offset + data.length);
  }

  pwriteAll(data: Uint8Array, offset: number): Promise<void> {
    this.pwriteAllSync(data, offset);
    return Promise.resolve();
  }

  close(): void {}
}

/**
 * A dump's images going to a stream instead of a directory. The pages
 * files are sent as they are read; the CBOR images (and ghost copies) are
 * kept in memory, read back from there by the verdict, and sent by
 * complete(), inventory last. Nothing is written to a file.
 */
export class StreamImages extends ImageDir {
  /** Written, not sent yet. */
  private held = new Map<string, Uint8Array>();
  /** Pages files sent already, with their sizes. */
  private sent = new Map<string, number>();
  /** Earlier streams this one's images name as parents, by the path they name (a migration). */
  private parents = new Map<string, StreamImages>();
  private pagesBytes = 0;

  /**
   * `where` names the stream in messages; `acknowledged`, if given, waits
   * until the receiver says the images are safe (the page server).
   */
  constructor(
    readonly out: RecordWriter,
    private readonly acknowledged?: () => Promise<void>,
    private readonly closeTransport?: () => void,
  ) {
    super(out.where);
  }

  /** Lets a stop signal end a write that waits for a stalled reader. */
  watch(stopped: Promise<never>): this {
    this.out.stopped = stopped;
    return this;
  }

  override openForWrite(): this {
    return this;
  }

  override file(name: string): string {
    return `${this.path}: ${name}`;
  }

  override reserve(name: string): { file: BulkFile; commit: () => void; drop: () => void } {
    if (/^pages-\d+\.img$/.test(name)) {
      const file = new StreamedFile(name, this.out);
      return {
        file,
        commit: () => {
          this.sent.set(name, file.size);
          this.pagesBytes += file.size;
          // An empty file still has its (empty) record, sent with the rest.
          if (!file.size) this.held.set(name, new Uint8Array(0));
        },
        drop: () => {
          throw new Error(`${name}: already sent`);
        },
      };
    }
    const file = new HeldFile();
    return {
      file,
      commit: () => this.held.set(name, file.bytes()),
      drop: () => this.held.delete(name),
    };
  }

  override write<T>(kind: ImageKind<T>, body: T, pid?: number): void {
    this.held.set(imageFileName(kind, pid), encodeImage(kind, body));
  }

  override syncAll(): Promise<void> {
    return Promise.resolve();
  }

  override commit(): void {
    throw new Error("a stream is completed with complete()");
  }

  /** Sends what is held, inventory last, and the end record; waits for the receiver's word. */
  override async complete(): Promise<void> {
    const inventory = this.held.get(INVENTORY);
    if (!inventory) throw new Error("complete before the inventory was written");
    // Inventory last: a receiver that has it has every image.
    const rest = [...this.held].filter(([name]) => name !== INVENTORY);
    await this.out.sendAll([...rest, [INVENTORY, inventory]]);
    await this.out.end();
    await this.acknowledged?.();
    this.closeTransport?.();
  }

  override discard(): void {
    this.out.fail(new AmberError(`${this.path}: the dump failed`));
    this.closeTransport?.();
  }

  override has(name: string): boolean {
    return this.held.has(name) || this.sent.has(name);
  }

  override read<T>(kind: ImageKind<T>, pid?: number): T {
    const name = imageFileName(kind, pid);
    const bytes = this.held.get(name);
    if (!bytes) throw new AmberError(`${this.file(name)}: missing`);
    return decodeImage(kind, bytes, this.file(name));
  }

  override checkData(name: string, size: number): void {
    const actual = this.sent.get(name) ?? this.held.get(name)?.length;
    if (actual === undefined) throw new AmberError(`${this.file(name)}: missing`);
    if (actual !== size) {
      throw new AmberError(`${this.file(name)}: ${actual} bytes, expected ${size}`);
    }
  }

  override openData(name: string): never {
    throw new Error(`${this.file(name)}: a stream is not read back`);
  }

  override storedBytes(): { pages: number; total: number } {
    return { pages: this.pagesBytes, total: this.out.bytes };
  }

  /** Says that `path`, as this stream's images name a parent, is `images`, sent before. */
  withParent(path: string, images: StreamImages): this {
    this.parents.set(path, images);
    return this;
  }

  override parentImages(path: string): ImageDir {
    const p = this.parents.get(path);
    if (!p) throw new AmberError(`${this.path}: parent images ${path}: not sent before`);
    return p;
  }

  override close(): void {}
}

// Reading.

/** The largest file `name` may be, if it is a name of an image file amber writes. */
function fileLimit(name: string): number | undefined {
  const tree = treeImageNamed(name); // inventory, pstree, a kind's own (backlog)
  if (tree) return tree.maxBytes ?? MAX_IMAGE_BYTES;
  let m = /^pages-([1-9]\d{0,6})\.img$/.exec(name);
  if (m) return Number(m[1]) <= PID_MAX ? MAX_PAGES_BYTES : undefined;
  if (/^ghost-\d{1,20}-\d{1,20}\.img$/.test(name)) return Number.MAX_SAFE_INTEGER;
  m = /^process-([1-9]\d{0,6})\.cbor$/.exec(name);
  return m && Number(m[1]) <= PID_MAX ? processImage().maxBytes ?? MAX_IMAGE_BYTES : undefined;
}

/** Reads exactly `buf.length` bytes unless the input ends first; returns how many it got. */
async function readFull(input: ByteReader, buf: Uint8Array, stopped: Promise<never>) {
  let got = 0;
  while (got < buf.length) {
    const n = await Promise.race([input.read(buf.subarray(got)), stopped]);
    if (n === null) break;
    got += n;
  }
  return got;
}

/** How a stream is read. */
export interface UnpackOptions {
  /** Names the stream in messages ("stream on stdin"). */
  where: string;
  /** Nothing may follow the end record (a pipe; a socket waits for the reply instead). */
  expectEof: boolean;
  /** Rejects once reading is asked to stop. */
  stopped?: Promise<never>;
}

/**
 * Reads a stream into `dir` (opened for writing): every record checked
 * before and after it is read, every file staged. Throws, naming the
 * record, at the first thing wrong; the caller then discards `dir`.
 */
export async function unpackStream(
  input: ByteReader,
  dir: ImageDir,
  opts: UnpackOptions,
): Promise<{ files: number; bytes: number }> {
  const stopped = opts.stopped ?? NEVER;
  const where = opts.where;
  const crc32 = await crc32Ready();
  const head = new Uint8Array(HEADER_BYTES);
  const got = await readFull(input, head, stopped);
  if (got === 0) throw new AmberError(`${where}: empty (nothing was dumped into it)`);
  if (got < HEADER_BYTES || MAGIC.some((b, i) => head[i] !== b)) {
    throw new AmberError(`${where}: not an amber image stream (no AMBERSTM header)`);
  }
  const hv = new DataView(head.buffer);
  if (hv.getUint32(8, true) !== VERSION || hv.getUint32(12, true) !== 0) {
    throw new AmberError(
      `${where}: stream format version ${hv.getUint32(8, true)} is not supported ` +
        `(this amber reads version ${VERSION})`,
    );
  }
  const rh = new Uint8Array(RECORD_HEADER_BYTES);
  const rv = new DataView(rh.buffer);
  const payloadBuf = new Uint8Array(RECORD_MAX);
  const seen = new Set<string>();
  let current: { name: string; file: BulkFile; size: number; commit: () => void } | undefined;
  const closeCurrent = () => {
    if (!current) return;
    current.file.close();
    current.commit();
    current = undefined;
  };
  let n = 0, files = 0, bytes = 0, last = "";
  try {
    for (;;) {
      const hgot = await readFull(input, rh, stopped);
      const at = `${where}: record ${n + 1}`;
      if (hgot === 0) {
        throw new AmberError(
          `${where}: ends after record ${n}${last && ` (${last})`}, before its end record ` +
            "(truncated: the dump did not finish)",
        );
      }
      if (hgot < RECORD_HEADER_BYTES) {
        throw new AmberError(`${at}: ends inside its header (truncated)`);
      }
      n++;
      const type = rv.getUint8(0), nameLen = rv.getUint8(1), len = rv.getUint32(4, true);
      if ((type !== DATA && type !== END) || rv.getUint16(2, true) !== 0 || nameLen === 0) {
        throw new AmberError(`${at}: not a record header (corrupted)`);
      }
      if (rv.getUint32(12, true) !== n) {
        throw new AmberError(
          `${at}: numbered ${rv.getUint32(12, true)} (corrupted, or records lost)`,
        );
      }
      const nameBytes = new Uint8Array(nameLen);
      if (await readFull(input, nameBytes, stopped) < nameLen) {
        throw new AmberError(`${at}: ends inside its name (truncated)`);
      }
      const name = String.fromCharCode(...nameBytes);
      const label = /^[a-z0-9.-]+$/.test(name) ? `${at} (${name})` : at;
      const limit = type === END ? (name === END_NAME ? END_BYTES : undefined) : fileLimit(name);
      if (limit === undefined) {
        throw new AmberError(`${label}: not the name of an image file amber writes (refused)`);
      }
      if (len > RECORD_MAX || (type === END && len !== END_BYTES)) {
        throw new AmberError(`${label}: ${len} bytes, more than a record holds (corrupted)`);
      }
      if (type === DATA && current?.name !== name) {
        if (seen.has(name)) throw new AmberError(`${label}: ${name} sent twice (corrupted)`);
        closeCurrent();
        seen.add(name);
        const r = dir.reserve(name);
        current = { name, file: r.file, size: 0, commit: r.commit };
        files++;
      }
      if (current && type === DATA && current.size + len > limit) {
        throw new AmberError(`${label}: ${name} grows past its limit of ${limit} bytes (refused)`);
      }
      const payload = payloadBuf.subarray(0, len);
      const pgot = await readFull(input, payload, stopped);
      if (pgot < len) {
        throw new AmberError(`${label}: ends after ${pgot} of its ${len} bytes (truncated)`);
      }
      if (recordCrc(crc32, rh, nameBytes, payload) !== rv.getUint32(8, true)) {
        throw new AmberError(`${label}: checksum mismatch (corrupted)`);
      }
      if (type === END) {
        closeCurrent();
        const ev = new DataView(payload.buffer, payload.byteOffset, END_BYTES);
        const [sentFiles, sentBytes] = [ev.getUint32(0, true), Number(ev.getBigUint64(8, true))];
        if (sentFiles !== files || sentBytes !== bytes) {
          throw new AmberError(
            `${label}: says ${sentFiles} files and ${sentBytes} bytes, the stream held ` +
              `${files} and ${bytes} (corrupted)`,
          );
        }
        if (last !== INVENTORY) {
          throw new AmberError(`${label}: the last image is not ${INVENTORY} (incomplete)`);
        }
        break;
      }
      current!.file.pwriteAllSync(payload, current!.size);
      current!.size += len;
      bytes += len;
      last = name;
    }
    if (opts.expectEof && await readFull(input, new Uint8Array(1), stopped)) {
      throw new AmberError(`${where}: data after the end record (refused)`);
    }
  } finally {
    current?.file.close();
  }
  return { files, bytes };
}
