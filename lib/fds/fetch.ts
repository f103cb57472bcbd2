/** Taking a descriptor from another process of the tree being restored. */
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
