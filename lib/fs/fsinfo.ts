/** A process's root, working directory and umask. */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { AmberError } from "../errors.ts";
import { definePart } from "../context.ts";
import { readProcLink } from "../proc/read.ts";
import { readStatus } from "../proc/status.ts";
import { putString } from "../scratch.ts";
import { runEach, type Syscall } from "../batch.ts";

export const fsPart = definePart({
  name: "fs",
  version: 1,
  schema: z.object({
    cwd: z.string().startsWith("/"),
    root: z.string().startsWith("/"),
    umask: z.number().int().min(0).max(0o777),
  }),
  dump({ pid }) {
    const cwd = readProcLink(pid, "cwd");
    const root = readProcLink(pid, "root");
    for (const [what, p] of [["cwd", cwd], ["root", root]]) {
      if (p.endsWith(" (deleted)")) throw new AmberError(`${what} ${p}: directory was deleted`);
    }
    return { cwd, root, umask: parseInt(readStatus(pid).get("Umask") ?? "22", 8) };
  },
  precheck({ cwd, root }) {
    for (const [what, p] of [["cwd", cwd], ["root", root]]) {
      let ok = false;
      try {
        ok = Deno.statSync(p).isDirectory;
      } catch { /* missing */ }
      if (!ok) throw new AmberError(`${what} ${p}: no such directory`);
    }
  },
  restore(ctx, { cwd, root, umask }) {
    const { pid, scratch } = ctx;
    // One batch; the paths go past its table.
    const calls: { what: string; call: Syscall }[] = [
      { what: `chdir ${cwd}`, call: [NR.chdir, putString(pid, scratch, cwd, 1024)] },
    ];
    if (root !== "/") {
      calls.push({
        what: `chroot ${root}`,
        call: [NR.chroot, putString(pid, scratch, root, 8192)],
      });
    }
    calls.push({ what: "umask", call: [NR.umask, umask] });
    runEach(ctx, calls);
  },
});
