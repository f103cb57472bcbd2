/**
 * What inotify and fanotify descriptors share: their fdinfo lines name a
 * watched inode by file handle (found again as a path by opening it inside
 * the frozen process), and FIONREAD says how many bytes of events wait.
 */
import { type Injector, NR } from "../../ffi/inject.ts";
import { AmberError } from "../errors.ts";
import { readProcText } from "../proc/read.ts";
import { getBytes, putBytes, putString } from "../scratch.ts";
import { type FdProbe, O_CLOEXEC } from "./kind.ts";

const O_PATH = 0o10000000, O_DIRECTORY = 0o200000;
const FIONREAD = 0x541b;
const O_NONBLOCK = 0o4000, F_GETFL = 3, F_SETFL = 4;

/** The `key:hex` words of an fdinfo line (`inotify wd:2 ino:13 ...`). */
export function fdinfoFields(line: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const word of line.trim().split(/\s+/)) {
    const i = word.indexOf(":");
    if (i > 0) out.set(word.slice(0, i), word.slice(i + 1));
  }
  return out;
}

/** The hex field `key` of an fdinfo line, which must be there. */
export function hexField(fields: Map<string, string>, key: string): number {
  const v = fields.get(key);
  if (v === undefined || !/^[0-9a-f]+$/.test(v)) {
    throw new AmberError(`fdinfo: no ${key} field`);
  }
  return parseInt(v, 16);
}

/** mountinfo's octal escapes (\040 for a space) undone. */
function unescapeMountPath(path: string): string {
  return path.replace(/\\(\d{3})/g, (_, o) => String.fromCharCode(parseInt(o, 8)));
}

/** The mount point of mount `mntId` (mountinfo's first field) as `pid` sees it. */
export function mountPointOf(pid: number, mntId: number): string {
  const m = readProcText(pid, "mountinfo").split("\n").map((l) => l.split(" "))
    .find((f) => f[0] === String(mntId));
  if (!m) throw new AmberError(`no mount ${mntId} in /proc/${pid}/mountinfo`);
  return unescapeMountPath(m[4]);
}

/** A mount point of the filesystem with kernel device number `sdev` (major << 20 | minor). */
export function mountOf(pid: number, sdev: number): string {
  const dev = `${sdev >>> 20}:${sdev & 0xfffff}`;
  const mounts = readProcText(pid, "mountinfo").split("\n").map((l) => l.split(" "))
    .filter((f) => f[2] === dev);
  // A mount of the filesystem's root sees every inode of it.
  const m = mounts.find((f) => f[3] === "/") ?? mounts[0];
  if (!m) throw new AmberError(`no mount of device ${dev} in /proc/${pid}/mountinfo`);
  return unescapeMountPath(m[4]);
}

/** The file handle of an fdinfo line (sdev, fhandle-bytes, fhandle-type, f_handle) as bytes. */
function fileHandle(fields: Map<string, string>): Uint8Array {
  const hex = fields.get("f_handle") ?? "";
  const handle = (hex.match(/../g) ?? []).map((h) => parseInt(h, 16));
  if (handle.length !== hexField(fields, "fhandle-bytes")) {
    throw new AmberError(`fdinfo: f_handle is not fhandle-bytes long`);
  }
  const fh = new DataView(new ArrayBuffer(8 + handle.length));
  fh.setUint32(0, handle.length, true);
  fh.setInt32(4, hexField(fields, "fhandle-type"), true);
  new Uint8Array(fh.buffer).set(handle, 8);
  return new Uint8Array(fh.buffer);
}

/** The path of the inode an fdinfo line names by file handle, opened inside the (frozen) process. */
export function handlePath(p: FdProbe, fields: Map<string, string>): string {
  const { injector: inj, scratch } = p.inject!;
  const mnt = mountOf(p.pid, hexField(fields, "sdev"));
  const mfd = Number(
    inj.call(
      `open ${mnt}`,
      NR.openat,
      -100,
      putString(p.pid, scratch, mnt),
      O_DIRECTORY | O_CLOEXEC, // (not O_PATH: open_by_handle_at refuses those)
      0,
    ),
  );
  try {
    const at = putBytes(p.pid, scratch, fileHandle(fields));
    const hfd = Number(
      inj.call("open_by_handle_at", NR.open_by_handle_at, mfd, at, O_PATH | O_CLOEXEC),
    );
    try {
      return Deno.readLinkSync(`/proc/${p.pid}/fd/${hfd}`);
    } finally {
      inj.call("close", NR.close, hfd);
    }
  } finally {
    inj.call("close", NR.close, mfd);
  }
}

/** Bytes of events waiting to be read (FIONREAD, inside the process). */
export function queuedBytes(p: FdProbe): number {
  const { injector: inj, scratch } = p.inject!;
  const at = putBytes(p.pid, scratch, new Uint8Array(4));
  inj.call("ioctl(FIONREAD)", NR.ioctl, p.fd, FIONREAD, at);
  return new DataView(getBytes(p.pid, scratch, 4).slice().buffer).getInt32(0, true);
}

/** The inode number `path` has now, if it exists. */
export function inodeAt(path: string): number | undefined {
  try {
    return Deno.statSync(path).ino ?? undefined;
  } catch {
    return undefined;
  }
}

/** Gives fd `fd` (created non-blocking) the O_NONBLOCK of the dumped file flags `flags`. */
export function setNonblock(inj: Injector, fd: number, flags: number): void {
  const now = Number(inj.call("fcntl(F_GETFL)", NR.fcntl, fd, F_GETFL, 0));
  inj.call("fcntl(F_SETFL)", NR.fcntl, fd, F_SETFL, (now & ~O_NONBLOCK) | (flags & O_NONBLOCK));
}
