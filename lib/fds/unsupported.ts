/**
 * Descriptors amber records but cannot restore yet (pipes, sockets,
 * eventfd, ...): dump notes what they are, restore refuses before
 * anything is started.
 */
import { z } from "zod";
import { AmberError } from "../errors.ts";
import { defineFdKind } from "./kind.ts";

export function describeLink(link: string): string {
  const m = /^(\w+):\[(\d+)\]$/.exec(link) ?? /^anon_inode:\[?([\w-]+)\]?$/.exec(link);
  return m ? m[1] : link.startsWith("/") ? "file" : "unknown";
}

export const unsupportedFd = defineFdKind({
  name: "unsupported",
  schema: z.object({
    kind: z.literal("unsupported"),
    fd: z.number().int().min(0),
    flags: z.number().int().min(0),
    type: z.string(),
    link: z.string(),
  }),
  matches: () => true,
  dump: (p) => ({
    kind: "unsupported" as const,
    fd: p.fd,
    flags: p.flags,
    type: describeLink(p.link),
    link: p.link,
  }),
  unrestorable: (e) => `fd ${e.fd}: ${e.link}: ${e.type} descriptors are not supported yet`,
  restore(_ctx, e) {
    throw new AmberError(`${e.type} descriptors are not supported yet`);
  },
});
