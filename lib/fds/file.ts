/** Files reopened by path: regular files, directories, non-terminal devices (/dev/null). */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { AmberError } from "../errors.ts";
import { putString } from "../scratch.ts";
import { defineFdKind, O_CLOEXEC } from "./kind.ts";
import { isTerminal } from "./tty.ts";

const O_CREAT = 0o100, O_EXCL = 0o200, O_NOCTTY = 0o400, O_TRUNC = 0o1000;
const SEEK_SET = 0;

export const fileFd = defineFdKind({
  name: "file",
  schema: z.object({
    kind: z.literal("file"),
    fd: z.number().int().min(0),
    flags: z.number().int().min(0),
    path: z.string().startsWith("/"),
    pos: z.number().int().min(0),
    type: z.enum(["regular", "directory", "device"]),
  }),
  matches: (p) => p.link.startsWith("/") && !!p.stat && !isTerminal(p),
  dump(p) {
    if (p.link.endsWith(" (deleted)")) {
      throw new AmberError(`${p.link}: open file was deleted; not supported yet`);
    }
    if (p.stat!.isFifo || p.stat!.isSocket) {
      throw new AmberError(`${p.link}: named FIFO or socket file; not supported yet`);
    }
    const type = p.stat!.isFile
      ? "regular" as const
      : p.stat!.isDirectory
      ? "directory" as const
      : "device" as const;
    return { kind: "file" as const, fd: p.fd, flags: p.flags, path: p.link, pos: p.pos, type };
  },
  precheck(e) {
    let st: Deno.FileInfo;
    try {
      st = Deno.statSync(e.path);
    } catch {
      throw new AmberError(`${e.path}: no such file`);
    }
    // Opening a FIFO or socket put there since would block the new process.
    const now = st.isFile
      ? "regular"
      : st.isDirectory
      ? "directory"
      : st.isCharDevice || st.isBlockDevice
      ? "device"
      : "FIFO or socket";
    if (now !== e.type) throw new AmberError(`${e.path}: now a ${now}, was a ${e.type}`);
  },
  restore({ pid, injector: inj, scratch }, e) {
    const flags = e.flags & ~(O_CREAT | O_EXCL | O_TRUNC | O_CLOEXEC) | O_NOCTTY;
    const fd = Number(
      inj.call(`open ${e.path}`, NR.openat, -100, putString(pid, scratch, e.path), flags, 0),
    );
    if (e.type === "regular" && e.pos) inj.call("lseek", NR.lseek, fd, e.pos, SEEK_SET);
    return fd;
  },
});
