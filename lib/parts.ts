/**
 * Every per-process kind of kernel object, in restore order. Dump runs
 * them in the same order; each writes its own `NAME-PID.cbor` image.
 */
import type { Part } from "./context.ts";
import { fdsPart } from "./fds/fds.ts";
import { fsPart } from "./fs/fsinfo.ts";
import { mappingsPart } from "./mm/mappings.ts";
import { mmPart } from "./mm/mm.ts";
import { pagemapPart } from "./mm/pages.ts";
import { credsPart } from "./task/creds.ts";
import { rlimitsPart } from "./task/rlimits.ts";
import { sigactionsPart } from "./task/sigactions.ts";
import { signalsPart } from "./task/signals.ts";
import { threadsPart } from "./task/threads.ts";
import { timersPart } from "./task/timers.ts";
import { defineImage, type ImageKind } from "./images/codec.ts";

export const PARTS: Part[] = [
  mappingsPart,
  pagemapPart,
  mmPart,
  // Before fds: the process's own RLIMIT_NOFILE bounds its descriptor numbers.
  rlimitsPart,
  fdsPart,
  fsPart,
  sigactionsPart,
  threadsPart,
  credsPart,
  timersPart,
  // Last: injected calls run with every signal blocked, so these stay pending.
  signalsPart,
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
