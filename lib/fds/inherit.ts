/**
 * Objects outside the tree (CRIU's external resources): a dump told
 * `--external RESOURCE` records the tree's descriptor on it as external,
 * and restore puts amber's own descriptor N, given with `--inherit-fd
 * fd[N]:RESOURCE`, in its place. Each kind (pipes, unix sockets) checks
 * that amber's descriptor is of the right sort.
 */
import type { InheritFd, PrecheckContext, RestoreContext } from "../context.ts";
import { AmberError } from "../errors.ts";
import { fetchFd } from "./fetch.ts";

/** The --inherit-fd entry standing in for `resource` ("pipe:[123]"), if one was given. */
export function inheritFor(
  ctx: PrecheckContext | RestoreContext,
  resource: string,
): InheritFd | undefined {
  return (ctx.options.inheritFds ?? []).find((i) => i.resource === resource);
}

/** amber's descriptor standing in for `resource`: its number, /proc link and file flags. */
export interface GivenFd {
  fd: number;
  link: string;
  flags: number;
}

/**
 * What amber was given for external `resource` (`what` says what it is in
 * the tree); refuses, naming the flag to pass, when nothing was. Undefined
 * for a verdict taken at dump time, which assumes it will be given.
 */
export function givenFor(
  ctx: PrecheckContext,
  resource: string,
  what: string,
): GivenFd | undefined {
  const given = inheritFor(ctx, resource);
  if (!given) {
    if (ctx.options.assumeInherited) return undefined;
    throw new AmberError(`${what} is external: restore with --inherit-fd fd[N]:${resource}`);
  }
  try {
    const link = Deno.readLinkSync(`/proc/self/fd/${given.fd}`);
    const info = Deno.readTextFileSync(`/proc/self/fdinfo/${given.fd}`);
    const flags = parseInt(/^flags:\s*(\d+)/m.exec(info)?.[1] ?? "0", 8);
    return { fd: given.fd, link, flags };
  } catch {
    throw new AmberError(`--inherit-fd fd[${given.fd}]: amber has no fd ${given.fd}`);
  }
}

/** amber's descriptor for `resource`, taken into the process being restored. */
export function takeInherited(ctx: RestoreContext, resource: string): number {
  const given = inheritFor(ctx, resource);
  if (!given) throw new AmberError(`${resource} is external: no --inherit-fd for it`);
  return fetchFd(ctx, { pid: Deno.pid, fd: given.fd });
}
