/**
 * One image file per process, `process-PID.cbor`, holding every part's
 * image: creating, syncing, publishing and reading ~20 small files per
 * process cost more than dumping most of its parts. Each part inside is a
 * whole image of its own (magic, version, body), with its own size limit,
 * decoded and validated with its own schema, so a part's format changes
 * alone as before.
 */
import { z } from "zod";
import type { Part } from "../context.ts";
import { AmberError } from "../errors.ts";
import { partImage, PARTS } from "../parts.ts";
import {
  bytes,
  decodeImage,
  defineImage,
  encodeImage,
  imageFileName,
  type ImageKind,
  MAX_IMAGE_BYTES,
} from "./codec.ts";
import type { ImageDir } from "./dir.ts";

type PartBytes = Record<string, Uint8Array>;

let kind: ImageKind<PartBytes> | undefined;

/** The process image kind: each part's encoded image by part name (built once PARTS is). */
export function processImage(): ImageKind<PartBytes> {
  kind ??= defineImage(
    "process",
    1,
    true,
    z.object(Object.fromEntries(PARTS.map((p) => [p.name, bytes]))) as z.ZodType<PartBytes>,
    MAX_IMAGE_BYTES,
  );
  return kind;
}

/** The file name of `pid`'s process image. */
export function processFileName(pid: number): string {
  return imageFileName(processImage(), pid);
}

/** A part's body encoded as its image (the bytes the process image holds for it). */
export function encodePart(part: Part, body: unknown): Uint8Array {
  return encodeImage(partImage(part), body);
}

/**
 * Decodes and validates a part's image as restore does; `file` names it
 * in errors.
 */
export function decodePart(part: Part, bytes: Uint8Array, file: string): unknown {
  return decodeImage(partImage(part), bytes, `${file}: ${part.name}`);
}

/** Writes `pid`'s process image of every part's encoded image (encodePart). */
export function writeProcessImage(dir: ImageDir, pid: number, parts: Record<string, Uint8Array>) {
  for (const p of PARTS) {
    if (!(p.name in parts)) throw new Error(`pid ${pid}: part ${p.name} was not dumped`);
  }
  dir.write(processImage(), parts, pid);
}

/** Reads `pid`'s process image: every part decoded and validated, by part name. */
export function readProcessImage(dir: ImageDir, pid: number): Record<string, unknown> {
  const file = dir.file(processFileName(pid));
  if (!hasProcessImage(dir, pid) && dir.has(`threads-${pid}.cbor`)) {
    throw new AmberError(
      `${file}: missing: the images have a file per part (written by an older amber), ` +
        "which this amber does not read",
    );
  }
  const parts = dir.read(processImage(), pid);
  return Object.fromEntries(PARTS.map((p) => [p.name, decodePart(p, parts[p.name], file)]));
}

/** Whether `dir` holds a process image of `pid`. */
export function hasProcessImage(dir: ImageDir, pid: number): boolean {
  return dir.has(processFileName(pid));
}

/** `why`, about part `part` of `pid`'s process image, as an error naming the file and part. */
export function processImageError(dir: ImageDir, pid: number, part: string, why: string) {
  return new AmberError(`${dir.file(processFileName(pid))}: ${part}: ${why}`);
}
