/**
 * Images that travel instead of resting in a directory (issue 13):
 * `dump --stream` and `restore --stream` through a pipe, and a dump sent
 * to `amber page-server` over TCP. The stream format is lib/images/stream.ts.
 *
 * The page server writes what it receives into its images directory as a
 * local dump does (staging directory, 0700/0600, committed only when the
 * stream ended well and every image decodes), then tells the sender, which
 * ends its tree only once the server said the images are safe.
 */
import { AmberError, InterruptedError } from "./errors.ts";
import { SignalGuard } from "./interrupt.ts";
import { detailLog } from "./log.ts";
import { type RestoreRequest, type RestoreResult, restoreTree } from "./restore.ts";
import { ImageDir } from "./images/dir.ts";
import { type Images, readImages } from "./images/read.ts";
import {
  type ByteReader,
  type ByteWriter,
  errnoOf,
  messageOf,
  RecordWriter,
  StreamImages,
  unpackStream,
} from "./images/stream.ts";

const REPLY_MAGIC = new TextEncoder().encode("AMBERACK");
const REPLY_BYTES = 16;
const CLOSED = "closed the connection before saying the images are safe";
/** How long a failed write waits for the page server's reason. */
const EXPLAIN_WAIT_MS = 2000;
/** Longest failure message a page server sends back. */
const REPLY_MESSAGE_MAX = 4096;

/** Where a dump goes, besides a directory. */
export interface PageServerAddress {
  /** Host name or IP address of the page server. */
  address: string;
  /** Its TCP port. */
  port: number;
}

/** The images of a dump, written to `out` (stdout, a pipe) as one stream. */
export function streamTo(out: ByteWriter, where = "stream"): StreamImages {
  return new StreamImages(new RecordWriter(out, where));
}

/** `p`, or a failure saying what did not happen within `ms`. */
export async function within<T>(p: Promise<T>, ms: number, what: () => string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new AmberError(what())), ms);
  });
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}

export async function readExactly(conn: ByteReader, n: number, what: string): Promise<Uint8Array> {
  const buf = new Uint8Array(n);
  for (let got = 0; got < n;) {
    const r = await conn.read(buf.subarray(got));
    if (r === null) {
      throw new AmberError(`${what}: ${CLOSED}`);
    }
    got += r;
  }
  return buf;
}

/**
 * Reads one reply (the page server's: it stored the images; a receiver's
 * after a round): throws its message if it refused, else returns its words, if any.
 */
export async function readReply(conn: ByteReader, where: string): Promise<string> {
  const { ok, text } = await readReplyMessage(conn, where);
  if (!ok) throw new AmberError(`${where}: ${text || "refused the images"}`);
  return text;
}

/**
 * Reads one reply, whichever it says (ok, or refused with a reason);
 * throws only if none came (the connection closed) or it is malformed.
 */
export async function readReplyMessage(
  conn: ByteReader,
  where: string,
): Promise<{ ok: boolean; text: string }> {
  const head = await readExactly(conn, REPLY_BYTES, where);
  const v = new DataView(head.buffer);
  if (REPLY_MAGIC.some((b, i) => head[i] !== b)) {
    throw new AmberError(`${where}: not an amber page server reply`);
  }
  const status = v.getUint32(8, true), len = v.getUint32(12, true);
  if (status > 1 || len > REPLY_MESSAGE_MAX) throw new AmberError(`${where}: malformed reply`);
  const text = new TextDecoder().decode(await readExactly(conn, len, where));
  return { ok: status === 0, text };
}

export function reply(ok: boolean, message = ""): Uint8Array {
  const text = new TextEncoder().encode(message).subarray(0, REPLY_MESSAGE_MAX);
  const out = new Uint8Array(REPLY_BYTES + text.length);
  out.set(REPLY_MAGIC);
  const v = new DataView(out.buffer);
  v.setUint32(8, ok ? 0 : 1, true);
  v.setUint32(12, text.length, true);
  out.set(text, REPLY_BYTES);
  return out;
}

/**
 * Connects to a page server, before anything is frozen: the images go
 * there, and complete() returns only once the server has them on its disk.
 */
export async function connectPageServer(to: PageServerAddress): Promise<StreamImages> {
  const where = `page server ${to.address}:${to.port}`;
  let conn: Deno.TcpConn;
  try {
    conn = await Deno.connect({ hostname: to.address, port: to.port });
  } catch (e) {
    throw new AmberError(`${where}: connect: ${errnoOf(e)}`, { cause: e });
  }
  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    try {
      conn.close();
    } catch { /* gone */ }
  };
  // A server that refused the stream says why before it closes: that is the reason to give.
  const explain = async (e: unknown) => {
    const timer = setTimeout(close, EXPLAIN_WAIT_MS);
    try {
      await readReply(conn, where);
    } catch (said) {
      if (said instanceof AmberError && !said.message.includes(CLOSED)) return said;
    } finally {
      clearTimeout(timer);
    }
    return e;
  };
  return new StreamImages(
    new RecordWriter(conn, where, explain),
    async () => void await readReply(conn, where),
    close,
  );
}

/** What {@link receiveImages} needs. */
interface Receive {
  input: ByteReader;
  /** The images directory, or the ImageDir already opened on it for writing. */
  dir: string | ImageDir;
  where: string;
  expectEof: boolean;
  stopped?: Promise<never>;
  /**
   * Images that must survive a crash are synced before they are published
   * (the page server, `-D DIR`); a private directory that is gone once the
   * tree runs need not wait for the disk.
   */
  durable: boolean;
  /** Detail lines: when the stream ended, when its images were read. */
  log?: (line: string) => void;
}

/**
 * Reads a stream into images directory `dir` with a dump's safety: a
 * staging directory, every record checked, every image decoded, and the
 * image published (durably) only then. Throws naming the record or the
 * image; nothing is left in `dir` but what was there. Returns the images
 * as read (a restore from them need not read them again).
 */
export async function receiveImages(
  r: Receive,
): Promise<{ files: number; bytes: number; images: Images }> {
  const dir = typeof r.dir === "string" ? new ImageDir(r.dir).openForWrite() : r.dir;
  try {
    const got = await unpackStream(r.input, dir, r);
    r.log?.(`${r.where}: stream ended: ${got.files} files`);
    // Every image decoded and cross-checked, as restore will read them.
    const images = readImages(dir.stagingPath);
    r.log?.(`${r.where}: images read and checked`);
    if (r.durable) await dir.complete();
    else dir.commit(false);
    return { ...got, images };
  } catch (e) {
    dir.discard();
    throw e;
  }
}

/** What `amber page-server` is asked to do (mod.ts `pageServer`). */
export interface PageServerRequest extends PageServerAddress {
  /** Images directory the dump is written into (0700, as a dump makes it). */
  dir: string;
  /** Called once it listens, with the port (useful with port 0). */
  listening?: (port: number) => void;
  /** Aborting it stops the server as SIGINT does: a dump in progress is discarded. */
  signal?: AbortSignal;
}

/** What a page server received. */
export interface PageServerResult {
  /** The images directory written. */
  dir: string;
  /** Who sent the dump. */
  peer: string;
  /** Image files written. */
  files: number;
  /** Bytes of all of them. */
  bytes: number;
}

/**
 * Waits for one dump on `address:port`, writes it into `dir`, tells the
 * sender whether the images are safe, and returns (CRIU's page-server also
 * serves one dump).
 */
export async function servePageServer(req: PageServerRequest): Promise<PageServerResult> {
  // SIGINT, SIGTERM, SIGHUP or req.signal: what was received goes, amber exits 128 + N.
  using guard = new SignalGuard(req.signal);
  let where = `page server ${req.address}:${req.port}`;
  // Checked and locked first: a directory it cannot write fails before a dump is sent.
  const dir = new ImageDir(req.dir).openForWrite();
  let listener: Deno.TcpListener;
  try {
    listener = Deno.listen({ hostname: req.address, port: req.port });
  } catch (e) {
    dir.discard();
    throw new AmberError(`${where}: listen: ${errnoOf(e)}`, { cause: e });
  }
  const port = (listener.addr as Deno.NetAddr).port;
  where = `page server ${req.address}:${port}`;
  const { conn, peer } = await acceptOne(
    listener,
    guard.stopped,
    where,
    () => dir.discard(),
    () => req.listening?.(port),
  );
  const from = `${where}: dump from ${peer}`;
  try {
    const got = await receiveImages({
      input: conn,
      dir,
      where: from,
      expectEof: false,
      stopped: guard.stopped,
      durable: true,
    });
    await writeReply(conn, reply(true));
    return { dir: req.dir, peer, ...got };
  } catch (e) {
    // The sender resumes its tree on this word (or on the closed connection).
    // (Without our own name in front: the sender names us already.)
    const why = messageOf(e).replace(`${from}: `, "");
    await writeReply(conn, reply(false, why)).catch(() => {});
    throw e;
  } finally {
    conn.close();
  }
}

/**
 * Waits for the one sender a server serves, then closes the listener;
 * `discard` undoes what the server prepared if none comes (SIGINT).
 */
export async function acceptOne(
  listener: Deno.TcpListener,
  stopped: Promise<never>,
  where: string,
  discard: () => void,
  listening: () => void,
): Promise<{ conn: Deno.TcpConn; peer: string }> {
  let conn: Deno.TcpConn;
  try {
    listening();
    conn = await Promise.race([listener.accept(), stopped]);
  } catch (e) {
    discard();
    if (e instanceof InterruptedError) throw e;
    throw new AmberError(`${where}: accept: ${errnoOf(e)}`, { cause: e });
  } finally {
    listener.close();
  }
  const a = conn.remoteAddr as Deno.NetAddr;
  return { conn, peer: `${a.hostname}:${a.port}` };
}

export async function writeReply(conn: Deno.TcpConn, data: Uint8Array): Promise<void> {
  for (let done = 0; done < data.length;) done += await conn.write(data.subarray(done));
}

/**
 * Restore from a stream (`restore --stream`): the whole stream is checked
 * and unpacked into an images directory first, so a truncated or damaged
 * stream is refused before a single process exists, and restore then
 * reads it with all its usual checks. The directory is `req.dir` (kept),
 * or a fresh private one (0700) removed as soon as the tree runs.
 */
export async function restoreStream(
  req: RestoreRequest & { stream: ByteReader },
): Promise<RestoreResult> {
  const own = req.dir === undefined;
  const dir = req.dir ?? Deno.makeTempDirSync({ prefix: "amber-stream-" });
  const remove = () => {
    if (!own) return;
    try {
      Deno.removeSync(dir, { recursive: true });
    } catch { /* gone */ }
  };
  try {
    {
      using guard = new SignalGuard(req.signal);
      const got = await receiveImages({
        input: req.stream,
        dir,
        where: "image stream",
        expectEof: true,
        stopped: guard.stopped,
        durable: !own,
      });
      detailLog(req)(`stream unpacked: ${got.files} files, ${got.bytes} bytes into ${dir}`);
    }
    return await restoreTree({ ...req, dir }, remove);
  } finally {
    remove();
  }
}
