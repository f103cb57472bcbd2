/** signalfd: its signal mask (fdinfo sigmask), restored by signalfd4. */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { AmberError } from "../errors.ts";
import { u64 } from "../images/codec.ts";
import { readProcText } from "../proc/read.ts";
import { putBytes, u64Bytes } from "../scratch.ts";
import { defineFdKind, O_CLOEXEC } from "./kind.ts";

const O_NONBLOCK = 0o4000;

export const signalFd = defineFdKind({
  name: "signalfd",
  schema: z.object({
    kind: z.literal("signalfd"),
    fd: z.number().int().min(0),
    flags: z.number().int().min(0),
    mask: u64,
  }),
  matches: (p) => p.link === "anon_inode:[signalfd]",
  dump(p) {
    const m = /^sigmask:\s*([0-9a-f]+)/m.exec(readProcText(p.pid, `fdinfo/${p.fd}`));
    if (!m) throw new AmberError("fdinfo shows no sigmask");
    return { kind: "signalfd" as const, fd: p.fd, flags: p.flags, mask: BigInt(`0x${m[1]}`) };
  },
  restore(ctx, e) {
    const at = putBytes(ctx.pid, ctx.scratch, u64Bytes([e.mask]));
    const flags = (e.flags & O_NONBLOCK) | O_CLOEXEC;
    return Number(ctx.injector.call("signalfd4", NR.signalfd4, -1, at, 8, flags));
  },
});
