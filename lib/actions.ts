/**
 * Action scripts (CRIU's --action-script): shell code an operator gives
 * to dump, restore, migrate and migrate-receive, run at fixed points with
 * CRTOOLS_SCRIPT_ACTION naming the point, so that whoever owns the
 * network can change it where amber cannot know how (move a service
 * address from one host to another, switch a route).
 *
 * Each script is run as `sh -c SCRIPT` (a path to an executable file is
 * shell code too), one after the other, and waited for; its stdout goes
 * to amber's stderr (amber's stdout is for --json). A script that exits
 * non-zero fails the step it was run for, named; what that undoes is the
 * step's own (see docs/NETWORK.md "Action scripts").
 */
import { AmberError } from "./errors.ts";

/** The points amber runs scripts at (CRIU's names). */
export type Action =
  | "pre-dump"
  | "network-lock"
  | "post-dump"
  | "network-unlock"
  | "pre-restore"
  | "post-restore";

/** What a script sees besides CRTOOLS_SCRIPT_ACTION. */
export interface ActionEnv {
  /** CRTOOLS_IMAGE_DIR: the images directory, when there is one. */
  imageDir?: string;
  /** CRTOOLS_INIT_PID: the tree's root. */
  initPid?: number;
}

/** Runs every script for `action`, in order; throws naming the first that fails. */
export function runActionScripts(
  scripts: readonly string[] | undefined,
  action: Action,
  env: ActionEnv = {},
): void {
  for (const script of scripts ?? []) {
    const vars: Record<string, string> = { CRTOOLS_SCRIPT_ACTION: action };
    if (env.imageDir !== undefined) vars.CRTOOLS_IMAGE_DIR = env.imageDir;
    if (env.initPid !== undefined) vars.CRTOOLS_INIT_PID = String(env.initPid);
    let out: Deno.CommandOutput;
    try {
      out = new Deno.Command("sh", {
        args: ["-c", script],
        env: vars,
        stdin: "null",
        stdout: "piped",
        stderr: "inherit",
      }).outputSync();
    } catch (e) {
      throw new AmberError(
        `action script ${script}: ${action}: cannot run sh (${(e as Error).message})`,
      );
    }
    for (let done = 0; done < out.stdout.length;) {
      done += Deno.stderr.writeSync(out.stdout.subarray(done));
    }
    if (!out.success) {
      const how = out.signal ? `killed by ${out.signal}` : `exit status ${out.code}`;
      throw new AmberError(`action script ${script}: ${action}: ${how}`);
    }
  }
}
