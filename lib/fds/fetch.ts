/** Taking a descriptor from another process of the tree being restored, or parking one. */
import { NR } from "../../ffi/inject.ts";
import type { FdPlace, RestoreContext } from "../context.ts";

/** A descriptor of this process for the open file that fd `fd` of `pid` holds. */
export function fetchFd(ctx: RestoreContext, from: FdPlace): number {
  const inj = ctx.injector;
  if (from.pid === ctx.pid) return Number(inj.call(`dup ${from.fd}`, NR.fcntl, from.fd, 0, 0));
  const pidfd = inj.call(`pidfd_open ${from.pid}`, NR.pidfd_open, from.pid, 0);
  try {
    return Number(
      inj.call(`pidfd_getfd ${from.pid}:${from.fd}`, NR.pidfd_getfd, pidfd, from.fd, 0),
    );
  } finally {
    inj.call("close", NR.close, pidfd);
  }
}

/**
 * Moves descriptor `fd` of this process above every number of its images
 * (ctx.parkFloor), where no descriptor being restored can land on it.
 */
export function parkFd(ctx: RestoreContext, fd: number): number {
  const F_DUPFD_CLOEXEC = 1030;
  const high = Number(
    ctx.injector.call("fcntl(F_DUPFD_CLOEXEC)", NR.fcntl, fd, F_DUPFD_CLOEXEC, ctx.parkFloor),
  );
  ctx.injector.call("close", NR.close, fd);
  return high;
}
