/**
 * An images directory, treated the way OpenSSH treats ~/.ssh: amber runs
 * as root and images hold a process's memory and credentials.
 *
 * Writing: the directory is created 0700, or an existing one is used only
 * if the caller owns it and nobody else can write it (never chmodded). A
 * lock on it makes a second dump into it fail at once. Every file goes
 * into a private staging directory inside it (`.amber-dump-PID`), created
 * relative to a directory descriptor with O_CREAT|O_EXCL|O_NOFOLLOW, 0600;
 * commit() moves the complete image into place, inventory.cbor last, so an
 * earlier complete image survives a failed or interrupted dump.
 *
 * Reading: the directory and each file are opened without following
 * links, and refused unless owned by the reader and writable by nobody
 * else; a file must be regular and within its kind's size limit, checked
 * with fstat before a bounded read.
 */
import { forEachConcurrently } from "../concurrently.ts";
import { RawFile } from "../../ffi/rawfile.ts";
import {
  effectiveUid,
  Fd,
  type FdStat,
  isErrno,
  listDirFd,
  mkdirAt,
  O_CREAT,
  O_DIRECTORY,
  O_EXCL,
  O_NONBLOCK,
  O_RDONLY,
  O_WRONLY,
  renameAt,
  unlinkAt,
} from "../../ffi/dirfd.ts";
import { AmberError, withContext, withContextAsync } from "../errors.ts";
import {
  decodeImage,
  encodeImage,
  imageFileName,
  type ImageKind,
  MAX_IMAGE_BYTES,
} from "./codec.ts";

const INVENTORY = "inventory.cbor";
const STAGING_PREFIX = ".amber-dump-";
/**
 * Unsynced files beyond which syncAll syncs the filesystem rather than
 * each file. syncfs also waits for whatever else is being written to the
 * filesystem (0.2-1.2 s of it here on a busy machine, against 5 ms for a
 * process's two dozen files fsynced SYNC_IN_FLIGHT at a time); past ~100
 * files the fsyncs cost more (1000: ~120 ms against ~25 ms when quiet).
 */
const SYNCFS_FROM = 128;
/** fsyncs syncAll keeps in flight. */
const SYNC_IN_FLIGHT = 16;

/** Where the images of `path` end up: a staging directory's are published in its parent. */
export function publishedPath(path: string): string {
  const i = path.lastIndexOf("/");
  return path.slice(i + 1).startsWith(STAGING_PREFIX) ? path.slice(0, Math.max(i, 1)) : path;
}
/** Names amber gives image files (and older ambers gave their temporary files). */
const IMAGE_NAME = /^[a-z]+(-\d+)?\.(cbor|img)(\.tmp)?$/;

function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function octal(mode: number): string {
  return (mode & 0o7777).toString(8).padStart(4, "0");
}

/** Why `st` (of `what`) is not to be trusted by the current user, if it is not. */
function distrust(st: FdStat, uid: number): string | undefined {
  if (st.uid !== uid) return `owned by uid ${st.uid}, not by uid ${uid}`;
  if (st.mode & 0o022) return `mode ${octal(st.mode)} lets others write it`;
}

/** Opens directory `path` itself, naming a symlink or a non-directory as such. */
function openDirectory(path: string): Fd {
  try {
    return Fd.openDir(path);
  } catch (e) {
    if (isErrno(e, "ENOENT")) throw new AmberError("does not exist");
    if (isErrno(e, "ELOOP") || isErrno(e, "ENOTDIR")) {
      let link = false;
      try {
        link = Deno.lstatSync(path).isSymlink;
      } catch { /* vanished */ }
      throw new AmberError(link ? "is a symlink; refusing to follow it" : "not a directory");
    }
    throw e;
  }
}

/** Removes every entry of the directory `name` of `parent` (files only), then it. */
function removeDirAt(parent: Fd, name: string): void {
  try {
    using d = parent.openAt(name, O_RDONLY | O_DIRECTORY);
    for (const e of listDirFd(d)) unlinkAt(d, e.name);
  } catch { /* gone, or not ours to empty */ }
  try {
    unlinkAt(parent, name, true);
  } catch { /* gone */ }
}

/**
 * A file being written in bulk (pages, ghost copies): a RawFile for a
 * directory, or a part of a stream (lib/images/stream.ts).
 */
export interface BulkFile {
  /** O_DIRECT where the file can have it; false for a stream. */
  setDirect(): boolean;
  truncate(size: number): void;
  /** Allocates `size` bytes ahead of direct writes (false: not here); a RawFile's only. */
  allocate?(size: number): boolean;
  pwriteAll(data: Uint8Array, offset: number): Promise<void>;
  pwriteAllSync(data: Uint8Array, offset: number): void;
  /** The writer of `offset` failed: one that waits for it must not wait forever. */
  abort?(why: unknown): void;
  close(): void;
}

export class ImageDir {
  /** The images directory (locked while writing). */
  private dirFd?: Fd;
  /** The private staging directory files are written into. */
  private stage?: Fd;
  private staged = new Set<string>();
  private synced = new Set<string>();
  private createdDir = false;
  private readonly stagingName = `${STAGING_PREFIX}${Deno.pid}`;

  constructor(readonly path: string) {}

  /** Where the image being written lives until commit(). */
  get stagingPath(): string {
    return `${this.path}/${this.stagingName}`;
  }

  /** The final path of image file `name`. */
  file(name: string): string {
    return `${this.path}/${name}`;
  }

  /** Prepares writing: the directory checked or created, locked, and a staging directory. */
  openForWrite(): this {
    try {
      this.prepareWrite();
    } catch (e) {
      this.discard();
      throw e;
    }
    return this;
  }

  private prepareWrite(): void {
    withContext(`images directory ${this.path}`, () => {
      try {
        Deno.mkdirSync(this.path, { mode: 0o700 });
        this.createdDir = true;
      } catch (e) {
        if (!(e instanceof Deno.errors.AlreadyExists)) throw e;
      }
      const dir = openDirectory(this.path);
      this.dirFd = dir;
      const why = distrust(dir.stat(), effectiveUid());
      if (why) {
        throw new AmberError(
          `${why}; dump uses only a directory its own user owns and no other can write`,
        );
      }
      if (!dir.tryLock()) {
        throw new AmberError("another amber dump is writing into it right now");
      }
      // With the lock held, any other staging directory is a dead dump's.
      for (const e of listDirFd(dir)) {
        if (e.isDirectory && e.name.startsWith(STAGING_PREFIX)) removeDirAt(dir, e.name);
      }
      mkdirAt(dir, this.stagingName, 0o700);
      this.stage = dir.openAt(this.stagingName, O_RDONLY | O_DIRECTORY);
    });
  }

  private stagingFd(): Fd {
    if (!this.stage) throw new Error("images directory not opened for writing");
    return this.stage;
  }

  /** Creates staging file `name` (O_CREAT|O_EXCL|O_NOFOLLOW, 0600). */
  private create(name: string): Fd {
    const fd = this.stagingFd().openAt(name, O_WRONLY | O_CREAT | O_EXCL, 0o600);
    this.staged.add(name);
    return fd;
  }

  /**
   * Creates file `name` in the staging directory for bulk writing;
   * commit() marks it complete (to be synced), drop() removes it.
   */
  reserve(name: string): { file: BulkFile; commit: () => void; drop: () => void } {
    const fd = withContext(`image ${name}`, () => this.create(name));
    return {
      file: RawFile.fromFd(fd.release(), `${this.stagingPath}/${name}`),
      commit: () => this.synced.delete(name),
      drop: () => {
        this.staged.delete(name);
        unlinkAt(this.stagingFd(), name);
      },
    };
  }

  /** Writes image `kind` into the staging directory; writing it again replaces this run's copy. */
  write<T>(kind: ImageKind<T>, body: T, pid?: number): void {
    const name = imageFileName(kind, pid);
    withContext(`image ${name}`, () => {
      const data = encodeImage(kind, body);
      if (this.staged.delete(name)) unlinkAt(this.stagingFd(), name);
      using fd = this.create(name);
      fd.writeAll(data);
      this.synced.delete(name);
    });
  }

  /**
   * Makes every staged file, and the staging directory, durable: each file
   * with an fsync, several in flight (the journal commits them together),
   * or, for very many files, one syncfs (see SYNCFS_FROM).
   */
  async syncAll(): Promise<void> {
    const stage = this.stagingFd();
    const pending = [...this.staged].filter((n) => !this.synced.has(n));
    if (pending.length > SYNCFS_FROM) {
      withContext(`images directory ${this.stagingPath}`, () => stage.syncFilesystem());
      for (const name of pending) this.synced.add(name);
      return;
    }
    await forEachConcurrently(pending, SYNC_IN_FLIGHT, () => async (name) => {
      using fd = withContext(`image ${name}`, () => stage.openAt(name, O_RDONLY));
      await withContextAsync(`image ${name}`, () => fd.syncAsync());
      this.synced.add(name);
    });
    withContext(`images directory ${this.stagingPath}`, () => stage.sync());
  }

  /**
   * Publishes the staged image: the old inventory goes first, so a mix of
   * old and new files is never taken for a complete image; then the new
   * files, the removal of the old image's other files, and the new
   * inventory last. Not `ordered`: the same without the directory syncs
   * that keep that order through a crash (a private directory, gone after).
   */
  commit(ordered = true): void {
    const dir = this.dirFd!, stage = this.stagingFd();
    if (!this.staged.has(INVENTORY)) throw new Error("commit before the inventory was written");
    withContext(`images directory ${this.path}`, () => {
      try {
        unlinkAt(dir, INVENTORY);
      } catch (e) {
        if (!isErrno(e, "ENOENT")) throw e;
      }
      if (ordered) dir.sync();
      for (const name of this.staged) if (name !== INVENTORY) renameAt(stage, name, dir);
      for (const e of listDirFd(dir)) {
        if (IMAGE_NAME.test(e.name) && !this.staged.has(e.name) && !e.isDirectory) {
          unlinkAt(dir, e.name);
        }
      }
      renameAt(stage, INVENTORY, dir);
      if (ordered) dir.sync();
      this.staged.clear();
      this.closeStage();
      if (ordered) dir.sync();
    });
    this.close();
  }

  /** Makes the staged image durable and publishes it (a stream sends it instead). */
  async complete(): Promise<void> {
    await this.syncAll();
    this.commit();
  }

  /** Bytes of the image files published: pages files, and all of them. */
  storedBytes(pids: number[]): { pages: number; total: number } {
    const size = (name: string) => {
      try {
        return Deno.statSync(this.file(name)).size;
      } catch {
        return 0;
      }
    };
    let total = 0;
    for (const e of Deno.readDirSync(this.path)) if (e.isFile) total += size(e.name);
    return { pages: pids.reduce((s, pid) => s + size(`pages-${pid}.img`), 0), total };
  }

  /** Closes and removes the staging directory, if this run made one. */
  private closeStage(): void {
    if (!this.stage) return;
    this.stage.close();
    this.stage = undefined;
    if (this.dirFd) removeDirAt(this.dirFd, this.stagingName);
  }

  /**
   * Removes what this run staged and releases the lock; an earlier
   * complete image in the directory is left as it was.
   */
  discard(): void {
    this.staged.clear();
    this.closeStage();
    this.close();
    if (this.createdDir) {
      try {
        Deno.removeSync(this.path);
      } catch { /* not empty: leave it */ }
    }
  }

  // Reading.

  private reader?: Fd;

  /** The directory, opened and checked once. */
  private readFd(): Fd {
    if (!this.reader) {
      this.reader = withContext(`images directory ${this.path}`, () => {
        const dir = openDirectory(this.path);
        const why = distrust(dir.stat(), effectiveUid());
        if (why) {
          dir.close();
          throw new AmberError(`${why}; amber reads only images no other user could have written`);
        }
        return dir;
      });
    }
    return this.reader;
  }

  /** Whether file `name` exists (as anything) in the directory. */
  has(name: string): boolean {
    const dir = this.readFd();
    try {
      Deno.lstatSync(`/proc/self/fd/${dir.fd}/${name}`);
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Opens file `name` for reading, refusing anything but a regular file of
   * the reader's own, writable by nobody else, of at most `maxBytes`.
   */
  openChecked(name: string, maxBytes: number): { fd: Fd; size: number } {
    const path = this.file(name);
    const dir = this.readFd();
    let fd: Fd;
    try {
      // O_NONBLOCK: opening a planted FIFO must not wait for a writer.
      fd = dir.openAt(name, O_RDONLY | O_NONBLOCK);
    } catch (e) {
      if (isErrno(e, "ELOOP")) throw new AmberError(`${path}: is a symlink; refusing to follow it`);
      if (isErrno(e, "ENOENT")) throw new AmberError(`${path}: missing`);
      throw new AmberError(`${path}: cannot open: ${messageOf(e)}`);
    }
    try {
      const st = fd.stat();
      if (!st.isFile) throw new AmberError(`${path}: a ${st.type}, not a regular file`);
      const why = distrust(st, effectiveUid());
      if (why) {
        throw new AmberError(
          `${path}: ${why}; amber reads only images no other user could have written`,
        );
      }
      if (st.size > maxBytes) {
        throw new AmberError(`${path}: ${st.size} bytes is larger than its limit of ${maxBytes}`);
      }
      return { fd, size: st.size };
    } catch (e) {
      fd.close();
      throw e;
    }
  }

  read<T>(kind: ImageKind<T>, pid?: number): T {
    const name = imageFileName(kind, pid);
    const { fd, size } = this.openChecked(name, kind.maxBytes ?? MAX_IMAGE_BYTES);
    let bytes: Uint8Array;
    try {
      bytes = fd.readExactly(size);
    } catch (e) {
      throw new AmberError(`${this.file(name)}: cannot read: ${messageOf(e)}`);
    } finally {
      fd.close();
    }
    return decodeImage(kind, bytes, this.file(name));
  }

  /** Opens a bulk data file (pages) after the same checks; `size` is what it must hold. */
  openData(name: string, size: number): RawFile {
    const { fd, size: actual } = this.openChecked(name, Number.MAX_SAFE_INTEGER);
    if (actual !== size) {
      fd.close();
      throw new AmberError(`${this.file(name)}: ${actual} bytes, expected ${size}`);
    }
    return RawFile.fromFd(fd.release(), this.file(name));
  }

  /** Checks that bulk file `name` is there, checked like any image file, and holds `size` bytes. */
  checkData(name: string, size: number): void {
    this.openData(name, size).close();
  }

  /**
   * The images directory `path` names as this one's parent (CRIU's
   * --prev-images-dir: relative to this directory unless absolute).
   */
  parentImages(path: string): ImageDir {
    return new ImageDir(path.startsWith("/") ? path : `${publishedPath(this.path)}/${path}`);
  }

  /** Closes the directory descriptors (and so releases a writer's lock). */
  close(): void {
    this.dirFd?.close();
    this.dirFd = undefined;
    this.reader?.close();
    this.reader = undefined;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
