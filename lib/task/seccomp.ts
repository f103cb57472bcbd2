/** Seccomp, per thread: only mode 0 (disabled) is restored so far. */
import { z } from "zod";
import { definePart } from "../context.ts";
import { pidNumber } from "../images/codec.ts";
import { readStatus } from "../proc/status.ts";

const MODES = ["disabled", "strict", "filter"];

export const seccompPart = definePart({
  name: "seccomp",
  version: 1,
  schema: z.object({
    threads: z.array(
      z.object({ tid: pidNumber, mode: z.number().int().min(0), filters: z.number().int().min(0) }),
    ),
  }),
  dump: ({ pid, proc }) => ({
    threads: proc.threads.map((tid) => {
      const st = readStatus(pid, tid);
      return {
        tid,
        mode: Number(st.get("Seccomp") ?? 0),
        filters: Number(st.get("Seccomp_filters") ?? 0),
      };
    }),
  }),
  unrestorable({ threads }) {
    const t = threads.find((t) => t.mode !== 0);
    if (t) {
      return `tid ${t.tid}: seccomp mode ${t.mode} (${
        MODES[t.mode] ?? "unknown"
      }, ${t.filters} filters): not supported yet`;
    }
  },
  // Mode 0 is what every restored thread starts with.
  restore() {},
});
