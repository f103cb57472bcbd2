/**
 * Every per-process kind of kernel object, in restore order. Dump runs
 * them in the same order; each writes its own `NAME-PID.cbor` image.
 */
import type { Part } from "./context.ts";
import { fdsPart } from "./fds/fds.ts";
import { fsPart } from "./fs/fsinfo.ts";
import { locksPart } from "./fds/locks.ts";
import { mappingsPart } from "./mm/mappings.ts";
import { mmPart } from "./mm/mm.ts";
import { pagemapPart } from "./mm/pages.ts";
import { credsPart } from "./task/creds.ts";
import { rlimitsPart } from "./task/rlimits.ts";
import { sigactionsPart } from "./task/sigactions.ts";
import { threadsPart } from "./task/threads.ts";
import { defineImage, type ImageKind } from "./images/codec.ts";

export const PARTS: Part[] = [
  mappingsPart,
  pagemapPart,
  mmPart,
  // Before fds: the process's own RLIMIT_NOFILE bounds its descriptor numbers.
  rlimitsPart,
  fdsPart,
  // After fds (closing a descriptor drops its file's POSIX locks), before anything runs.
  locksPart,
  fsPart,
  sigactionsPart,
  threadsPart,
  credsPart,
] as Part[];

const kinds = new Map<string, ImageKind<unknown>>();

/** The image kind of a part (file `NAME-PID.cbor`). */
export function partImage(part: Part): ImageKind<unknown> {
  let k = kinds.get(part.name);
  if (!k) {
    k = defineImage(part.name, part.version, true, part.schema);
    kinds.set(part.name, k);
  }
  return k;
}
