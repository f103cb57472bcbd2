/** Reading a whole images directory, every file validated. */
import type { z } from "zod";
import { AmberError } from "../errors.ts";
import { partImage, PARTS } from "../parts.ts";
import { inventoryImage, type ProcessEntryImage, pstreeImage } from "../tree/pstree.ts";
import { ImageDir } from "./dir.ts";

export type Inventory = z.output<typeof inventoryImage.schema>;

export interface ProcessImages {
  entry: ProcessEntryImage;
  /** Decoded part images by part name (mappings, pagemap, mm, fds, fs, ...). */
  parts: Record<string, unknown>;
}

export interface Images {
  dir: string;
  inventory: Inventory;
  /** Why the images cannot be restored, if they cannot (see pstree). */
  unrestorable: string[];
  processes: ProcessImages[];
}

/** Reads and validates every image of `path`; errors name the file and field. */
export function readImages(path: string): Images {
  let st;
  try {
    st = Deno.statSync(path);
  } catch {
    throw new AmberError(`images directory ${path}: does not exist`);
  }
  if (!st.isDirectory) throw new AmberError(`images directory ${path}: not a directory`);
  const dir = new ImageDir(path);
  try {
    Deno.statSync(dir.file("inventory.cbor"));
  } catch {
    throw new AmberError(
      `${path}: not a complete images directory (no inventory.cbor: nothing dumped here, or the dump failed)`,
    );
  }
  const inventory = dir.read(inventoryImage);
  const { processes, unrestorable } = dir.read(pstreeImage);
  if (processes[0].pid !== inventory.rootPid) {
    throw new AmberError(
      `${dir.file("pstree.cbor")}: first process ${
        processes[0].pid
      } is not the root ${inventory.rootPid}`,
    );
  }
  return {
    dir: path,
    inventory,
    unrestorable,
    processes: processes.map((entry) => ({
      entry,
      // A zombie is only its pstree entry.
      parts: entry.state === "zombie"
        ? {}
        : Object.fromEntries(PARTS.map((p) => [p.name, dir.read(partImage(p), entry.pid)])),
    })),
  };
}
