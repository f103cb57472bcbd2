/**
 * Control groups: amber restores a process into its own cgroups, so a
 * process whose /proc/PID/cgroup differs from the dumping amber's is
 * refused, and restore refuses to run in cgroups other than the dumper's.
 */
import { z } from "zod";
import { definePart } from "../context.ts";
import { AmberError } from "../errors.ts";
import { readProcText } from "../proc/read.ts";

function lines(text: string): string[] {
  return text.split("\n").filter(Boolean);
}

const ownCgroups = () => lines(Deno.readTextFileSync("/proc/self/cgroup"));

export const cgroupPart = definePart({
  name: "cgroup",
  version: 1,
  schema: z.object({ cgroups: z.array(z.string()), dumper: z.array(z.string()) }),
  dump: ({ pid }) => ({ cgroups: lines(readProcText(pid, "cgroup")), dumper: ownCgroups() }),
  unrestorable({ cgroups, dumper }) {
    const i = cgroups.findIndex((c, i) => c !== dumper[i]);
    if (i >= 0 || cgroups.length !== dumper.length) {
      const c = cgroups[i] ?? "(none)";
      return `cgroup ${c} differs from amber's own ${dumper[i] ?? "(none)"}: not supported yet`;
    }
  },
  precheck({ dumper }) {
    const own = ownCgroups();
    const i = own.findIndex((c, i) => c !== dumper[i]);
    if (i >= 0 || own.length !== dumper.length) {
      throw new AmberError(
        `cgroup: restore would put the process in ${own[i] ?? "(none)"}, it was dumped in ${
          dumper[i] ?? "(none)"
        }; restore from the cgroup it was dumped from`,
      );
    }
  },
  // Nothing to do: the restored process is born in amber's cgroups.
  restore() {},
});
