/**
 * Every per-process kind of kernel object, in restore order. Dump runs
 * them in the same order; each part's image is one field of the process's
 * `process-PID.cbor` (lib/images/process.ts).
 */
import type { Part } from "./context.ts";
import { fdsPart } from "./fds/fds.ts";
import { fsPart } from "./fs/fsinfo.ts";
import { locksPart } from "./fds/locks.ts";
import { mappingsPart } from "./mm/mappings.ts";
import { mmPart } from "./mm/mm.ts";
import { pagemapPart } from "./mm/pages.ts";
import { vmflagsPart } from "./mm/vmflags.ts";
import { cgroupPart } from "./task/cgroup.ts";
import { credsPart } from "./task/creds.ts";
import { nsPart } from "./task/ns.ts";
import { sysvIpcPart } from "./ipc/sysvipc.ts";
import { prctlPart } from "./task/prctl.ts";
import { procfilesPart } from "./task/procfiles.ts";
import { schedPart } from "./task/sched.ts";
import { seccompPart } from "./task/seccomp.ts";
import { rlimitsPart } from "./task/rlimits.ts";
import { sigactionsPart } from "./task/sigactions.ts";
import { signalsPart } from "./task/signals.ts";
import { threadsPart } from "./task/threads.ts";
import { timersPart } from "./task/timers.ts";
import { defineImage, type ImageKind } from "./images/codec.ts";

export const PARTS: Part[] = [
  // Nothing to restore: these refuse what amber cannot recreate yet.
  nsPart,
  sysvIpcPart,
  cgroupPart,
  seccompPart,
  mappingsPart,
  pagemapPart,
  mmPart,
  vmflagsPart,
  // Before fds: the process's own RLIMIT_NOFILE bounds its descriptor numbers.
  rlimitsPart,
  fdsPart,
  // After fds (closing a descriptor drops its file's POSIX locks), before anything runs.
  locksPart,
  fsPart,
  sigactionsPart,
  // Before threads (they inherit its loginuid) and creds (which may drop CAP_AUDIT_CONTROL).
  procfilesPart,
  threadsPart,
  credsPart,
  // After creds: a credential change resets the pdeath signal and dumpable.
  prctlPart,
  // After prctl: a real-time policy zeroes the timer slack, as it did originally.
  schedPart,
  timersPart,
  // Last: injected calls run with every signal blocked, so these stay pending.
  signalsPart,
] as Part[];

/** Most parts' images are a few KiB: 4 MiB is far more than any honest one. */
const PART_MAX_BYTES = 4 * 1024 * 1024;

const kinds = new Map<string, ImageKind<unknown>>();

/** The image kind of a part (field NAME of `process-PID.cbor`). */
export function partImage(part: Part): ImageKind<unknown> {
  let k = kinds.get(part.name);
  if (!k) {
    k = defineImage(part.name, part.version, true, part.schema, part.maxBytes ?? PART_MAX_BYTES);
    kinds.set(part.name, k);
  }
  return k;
}
