/**
 * The image container: every CBOR image is `{ magic, version, body }`,
 * checked against its kind's zod schema on every read. Page data never
 * passes through here (see lib/mm/pages.ts).
 */
// This subpath skips cbor-x's node entry (node:stream, a native addon: ~25 ms of start-up).
import { decode, Encoder } from "cbor-x/decode";
import { z } from "zod";
import { AmberError } from "../errors.ts";

// zod compiles a schema to a function on its first parse (1-6 ms each, ~25
// ms for a dump's parts, all of it while the tree is frozen); amber parses
// each schema a few times per run, so its interpreter is cheaper (reading
// a 1-process image: 63 ms of CPU compiled, 38 without; 50 processes: 167
// and 159).
z.config({ jitless: true });

/** Largest CBOR image we accept: anything bigger is not ours. */
export const MAX_IMAGE_BYTES = 256 * 1024 * 1024;

/** One kind of image: its file name, magic, version and schema. */
export interface ImageKind<T> {
  /** Short name, e.g. "core"; files are `core.cbor` or `core-PID.cbor`. */
  name: string;
  perProcess: boolean;
  version: number;
  schema: z.ZodType<T>;
  /** Largest file of this kind accepted (default MAX_IMAGE_BYTES), checked before reading. */
  maxBytes?: number;
}

export function defineImage<S extends z.ZodType>(
  name: string,
  version: number,
  perProcess: boolean,
  schema: S,
  maxBytes?: number,
): ImageKind<z.output<S>> {
  const kind = { name, version, perProcess, schema: schema as z.ZodType<z.output<S>>, maxBytes };
  if (!perProcess) TREE_IMAGES.set(`${name}.cbor`, kind);
  return kind;
}

/** Images of the whole tree (inventory, pstree, a kind's own), by file name. */
const TREE_IMAGES = new Map<string, ImageKind<unknown>>();

/** The tree image kind behind file `name`, if amber defines one. */
export function treeImageNamed(name: string): ImageKind<unknown> | undefined {
  return TREE_IMAGES.get(name);
}

export function magicOf(kind: ImageKind<unknown>): string {
  return `AMBER-${kind.name}`;
}

export function imageFileName(kind: ImageKind<unknown>, pid?: number): string {
  if (kind.perProcess !== (pid !== undefined)) {
    throw new Error(`image ${kind.name}: ${kind.perProcess ? "needs" : "takes no"} pid`);
  }
  return pid === undefined ? `${kind.name}.cbor` : `${kind.name}-${pid}.cbor`;
}

const encoder = new Encoder({ useRecords: false, mapsAsObjects: true });

export function encodeImage<T>(kind: ImageKind<T>, body: T): Uint8Array {
  return encoder.encode({ magic: magicOf(kind), version: kind.version, body });
}

function describeIssue(issue: z.core.$ZodIssue): string {
  const path = issue.path.map((p) => typeof p === "number" ? `[${p}]` : `.${String(p)}`)
    .join("").replace(/^\./, "");
  return `field ${path || "(top)"}: ${issue.message}`;
}

/** Built once: a zod schema compiles its parser on first use. */
const HEAD = z.object({ magic: z.string(), version: z.number(), body: z.unknown() });

/** Decodes and validates one image; errors name the file and the field. */
export function decodeImage<T>(kind: ImageKind<T>, bytes: Uint8Array, file: string): T {
  const limit = kind.maxBytes ?? MAX_IMAGE_BYTES;
  if (bytes.length > limit) {
    throw new AmberError(`${file}: ${bytes.length} bytes is larger than its limit of ${limit}`);
  }
  let raw: unknown;
  try {
    raw = decode(bytes);
  } catch (e) {
    throw new AmberError(
      `${file}: not a valid CBOR image (truncated or corrupted): ${
        e instanceof Error ? e.message : e
      }`,
    );
  }
  const head = HEAD.safeParse(raw);
  if (!head.success) throw new AmberError(`${file}: not an amber image (no magic/version/body)`);
  if (head.data.magic !== magicOf(kind)) {
    throw new AmberError(`${file}: magic "${head.data.magic}", expected "${magicOf(kind)}"`);
  }
  if (head.data.version !== kind.version) {
    throw new AmberError(
      `${file}: format version ${head.data.version} is not supported (this amber reads version ${kind.version})`,
    );
  }
  const body = kind.schema.safeParse(head.data.body);
  if (!body.success) {
    throw new AmberError(`${file}: ${body.error.issues.slice(0, 3).map(describeIssue).join("; ")}`);
  }
  return body.data;
}

// Shared schema pieces.

/** A 64-bit unsigned value (addresses, masks) as BigInt. */
export const u64 = z.union([z.bigint(), z.number().int()]).transform((v) => BigInt(v)).refine(
  (v) => v >= 0n && v < 1n << 64n,
  "not a 64-bit unsigned value",
);
/** The kernel's largest pid_max: also a bound on how many processes or threads an image lists. */
export const PID_MAX = 4194304;
export const pidNumber = z.number().int().min(1).max(PID_MAX);
export const bytes = z.custom<Uint8Array>((v) => v instanceof Uint8Array, "expected bytes");
