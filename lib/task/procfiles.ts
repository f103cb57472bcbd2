/**
 * Per-process attributes kept in /proc/PID files: oom_score_adj,
 * coredump_filter and the autogroup's nice value, written by amber from
 * outside; loginuid, which only the process itself may write, through an
 * injected open/write. Restored before the threads are created (they
 * inherit the loginuid) and before creds (setting a loginuid that is
 * already set needs CAP_AUDIT_CONTROL).
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { definePart, type RestoreContext } from "../context.ts";
import { AmberError, withContext } from "../errors.ts";
import { procPath, readProcText } from "../proc/read.ts";
import { putString } from "../scratch.ts";

const O_WRONLY = 1, O_CLOEXEC = 0o2000000, AT_FDCWD = -100;

function readAutogroupNice(pid: number): number | undefined {
  // "/autogroup-99 nice 0"; missing without CONFIG_SCHED_AUTOGROUP.
  let text: string;
  try {
    text = Deno.readTextFileSync(procPath(pid, "autogroup"));
  } catch {
    return undefined;
  }
  const m = / nice (-?\d+)/.exec(text);
  return m ? Number(m[1]) : undefined;
}

/**
 * The autogroup is the session's (setsid made a new one): set its nice.
 * A process left in the root autogroup (a session amber did not create,
 * in a container whose init has none) shows no line and takes no nice;
 * that is the same as nice 0, anything else is refused by name.
 */
function restoreAutogroupNice(pid: number, nice: number | undefined): void {
  if (nice === undefined) return;
  const now = readAutogroupNice(pid);
  if (now === nice) return;
  if (now === undefined) {
    if (nice === 0) return;
    throw new AmberError(
      `autogroup nice ${nice}: the restored process is in the root autogroup, which has no nice`,
    );
  }
  writeProcFile(pid, "autogroup", String(nice));
}

/** Writes a /proc/PID file from amber; the error names the file. */
function writeProcFile(pid: number, rest: string, value: string): void {
  try {
    Deno.writeTextFileSync(procPath(pid, rest), value);
  } catch (e) {
    throw new AmberError(
      `${procPath(pid, rest)}: write ${value}: ${e instanceof Error ? e.message : e}`,
    );
  }
}

/** The process writes its own /proc/self/loginuid (the kernel allows no one else). */
function setLoginuid(ctx: RestoreContext, uid: number): void {
  const inj = ctx.injector;
  const path = putString(ctx.pid, ctx.scratch, "/proc/self/loginuid");
  const text = new TextEncoder().encode(String(uid));
  const buf = putString(ctx.pid, ctx.scratch, String(uid), 256);
  const fd = inj.call("open", NR.openat, AT_FDCWD, path, O_WRONLY | O_CLOEXEC, 0);
  try {
    inj.call("write", NR.write, fd, buf, text.length);
  } finally {
    inj.raw(NR.close, fd);
  }
}

export const procfilesPart = definePart({
  name: "procfiles",
  version: 1,
  schema: z.object({
    oomScoreAdj: z.number().int().min(-1000).max(1000),
    coredumpFilter: z.number().int().min(0),
    autogroupNice: z.number().int().min(-20).max(19).optional(),
    loginuid: z.number().int().min(0).max(0xffffffff),
  }),
  dump: ({ pid }) => ({
    oomScoreAdj: Number(readProcText(pid, "oom_score_adj").trim()),
    coredumpFilter: parseInt(readProcText(pid, "coredump_filter").trim(), 16),
    autogroupNice: readAutogroupNice(pid),
    loginuid: Number(readProcText(pid, "loginuid").trim()),
  }),
  restore(ctx, img) {
    const { pid } = ctx;
    withContext("loginuid", () => {
      if (Number(readProcText(pid, "loginuid").trim()) !== img.loginuid) {
        setLoginuid(ctx, img.loginuid);
      }
    });
    if (Number(readProcText(pid, "oom_score_adj").trim()) !== img.oomScoreAdj) {
      // Lowering it below what the helper inherited needs CAP_SYS_RESOURCE.
      writeProcFile(pid, "oom_score_adj", String(img.oomScoreAdj));
    }
    if (parseInt(readProcText(pid, "coredump_filter").trim(), 16) !== img.coredumpFilter) {
      writeProcFile(pid, "coredump_filter", `0x${img.coredumpFilter.toString(16)}`);
    }
    restoreAutogroupNice(pid, img.autogroupNice);
  },
});
