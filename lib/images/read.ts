/**
 * Reading a whole images directory, every file validated, and every
 * reference between images checked against the images themselves.
 */
import type { z } from "zod";
import { AmberError } from "../errors.ts";
import { checkSharedFds } from "../fds/fds.ts";
import { checkThreadList } from "../task/threads.ts";
import { inventoryImage, type ProcessEntryImage, pstreeImage } from "../tree/pstree.ts";
import { ImageDir } from "./dir.ts";
import { processImageError, readProcessImage } from "./process.ts";

export type Inventory = z.output<typeof inventoryImage.schema>;

export interface ProcessImages {
  entry: ProcessEntryImage;
  /** Decoded part images by part name (mappings, pagemap, mm, fds, fs, ...), from process-PID.cbor. */
  parts: Record<string, unknown>;
}

export interface Images {
  dir: string;
  inventory: Inventory;
  /** Why the images cannot be restored, if they cannot (see pstree). */
  unrestorable: string[];
  processes: ProcessImages[];
}

/** Cross-image checks: what one image names must exist in the others. */
function checkReferences(dir: ImageDir, processes: ProcessImages[]): void {
  for (const p of processes) {
    if (p.entry.state === "zombie") continue;
    const why = checkThreadList(p.entry.threads, p.parts.threads);
    if (why) throw processImageError(dir, p.entry.pid, "threads", why);
  }
  const bad = checkSharedFds(processes.map((p) => ({
    pid: p.entry.pid,
    fds: p.entry.state === "zombie" ? undefined : p.parts.fds,
  })));
  if (bad) throw processImageError(dir, bad.pid, "fds", bad.why);
}

/** Reads and validates every image of `path`; errors name the file and field. */
export function readImages(path: string): Images {
  using dir = new ImageDir(path);
  return readImagesIn(dir);
}

/** Reads and validates every image of `dir` (a directory, or a dump's images in memory). */
export function readImagesIn(dir: ImageDir): Images {
  const path = dir.path;
  if (!dir.has("inventory.cbor")) {
    throw new AmberError(
      `${path}: not a complete images directory (no inventory.cbor: nothing dumped here, or the dump failed)`,
    );
  }
  const inventory = dir.read(inventoryImage);
  return assembleImages(dir, inventory, dir.read(pstreeImage), (pid) => readProcessImage(dir, pid));
}

export type Pstree = z.output<typeof pstreeImage.schema>;

/**
 * The images of `dir` from its decoded inventory, pstree and each live
 * process's parts: the root and every reference between images checked.
 */
export function assembleImages(
  dir: ImageDir,
  inventory: Inventory,
  pstree: Pstree,
  partsOf: (pid: number) => Record<string, unknown>,
): Images {
  const path = dir.path;
  const { processes, unrestorable } = pstree;
  if (processes[0].pid !== inventory.rootPid) {
    throw new AmberError(
      `${dir.file("pstree.cbor")}: first process ${
        processes[0].pid
      } is not the root ${inventory.rootPid}`,
    );
  }
  const all = processes.map((entry) => ({
    entry,
    // A zombie is only its pstree entry.
    parts: entry.state === "zombie" ? {} : partsOf(entry.pid),
  }));
  checkReferences(dir, all);
  return { dir: path, inventory, unrestorable, processes: all };
}
