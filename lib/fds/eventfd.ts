/**
 * eventfd: its count and semaphore mode from fdinfo, restored by eventfd2
 * and a write of the count (eventfd2 takes only 32 bits of it). O_NONBLOCK
 * and O_CLOEXEC are its flags like any descriptor's.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { AmberError } from "../errors.ts";
import { u64 } from "../images/codec.ts";
import { readProcText } from "../proc/read.ts";
import { putBytes, u64Bytes } from "../scratch.ts";
import { defineFdKind, O_CLOEXEC } from "./kind.ts";

const EFD_SEMAPHORE = 1, O_NONBLOCK = 0o4000;

function field(info: string, name: string): string | undefined {
  return new RegExp(`^${name}:\\s*(\\S+)`, "m").exec(info)?.[1];
}

export const eventFd = defineFdKind({
  name: "eventfd",
  schema: z.object({
    kind: z.literal("eventfd"),
    fd: z.number().int().min(0),
    flags: z.number().int().min(0),
    count: u64,
    semaphore: z.boolean(),
  }),
  matches: (p) => p.link === "anon_inode:[eventfd]",
  dump(p) {
    const info = readProcText(p.pid, `fdinfo/${p.fd}`);
    const count = field(info, "eventfd-count");
    const semaphore = field(info, "eventfd-semaphore");
    if (count === undefined || semaphore === undefined) {
      throw new AmberError("fdinfo shows no eventfd-count/eventfd-semaphore (kernel too old)");
    }
    // The kernel prints the count in hex ("%16llx").
    const value = BigInt(`0x${count}`);
    return {
      kind: "eventfd" as const,
      fd: p.fd,
      flags: p.flags,
      count: value,
      semaphore: semaphore === "1",
    };
  },
  restore(ctx, e) {
    const inj = ctx.injector;
    const flags = (e.flags & O_NONBLOCK) | O_CLOEXEC | (e.semaphore ? EFD_SEMAPHORE : 0);
    const fd = Number(inj.call("eventfd2", NR.eventfd2, 0, flags));
    if (e.count) {
      inj.call("write count", NR.write, fd, putBytes(ctx.pid, ctx.scratch, u64Bytes([e.count])), 8);
    }
    return fd;
  },
});
