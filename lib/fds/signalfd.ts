/**
 * signalfd descriptors (util-linux script, systemd, many event loops).
 * Only the mask is the descriptor's own: the signals it reads are the
 * process's pending signals, which the signals part restores.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { readProcText } from "../proc/read.ts";
import { putBytes, u64Bytes } from "../scratch.ts";
import { u64 } from "../images/codec.ts";
import { defineFdKind } from "./kind.ts";

const NR_SIGNALFD4 = 289;
const O_NONBLOCK = 0o4000;

export const signalFd = defineFdKind({
  name: "signalfd",
  schema: z.object({
    kind: z.literal("signalfd"),
    fd: z.number().int().min(0),
    flags: z.number().int().min(0),
    sigmask: u64,
  }),
  matches: (p) => p.link === "anon_inode:[signalfd]",
  dump(p) {
    const mask = /^sigmask:\s*([0-9a-f]+)$/m.exec(readProcText(p.pid, `fdinfo/${p.fd}`))?.[1];
    return { kind: "signalfd" as const, fd: p.fd, flags: p.flags, sigmask: BigInt(`0x${mask}`) };
  },
  restore(ctx, e) {
    const mask = putBytes(ctx.pid, ctx.scratch, u64Bytes([e.sigmask]));
    return Number(
      ctx.injector.call("signalfd4", NR_SIGNALFD4, -1, mask, 8, e.flags & O_NONBLOCK),
    );
  },
});
