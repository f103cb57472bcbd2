/**
 * The one verdict "these images can be restored". Dump runs it on its
 * complete images before it ends the tree (a dump that would lose the tree
 * fails instead; `dump -R` records it), restore runs it before it creates
 * anything, and show prints it. Each kind of object says why it cannot be
 * restored through its part's `unrestorable` (a property of the image) and
 * `precheck` (which may also look at this machine: files, terminal...).
 */
import type { Part, PrecheckContext, RestoreOptions } from "./context.ts";
import { AmberError } from "./errors.ts";
import { ImageDir } from "./images/dir.ts";
import { type Images, type ProcessImages, readImagesIn } from "./images/read.ts";
import { vdsoDigest } from "./mm/mappings.ts";
import { PARTS } from "./parts.ts";
import { ptyMemberRefusals } from "./fds/ptymembers.ts";

function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Why one part's image, by itself, says it cannot be restored (no look at the machine). */
export function imageRefusal(part: Part, data: unknown, pid: number): string | undefined {
  const why = part.unrestorable?.(data);
  if (why) return `pid ${pid}: ${part.name}: ${why}`;
}

/** Why one part of one process cannot be restored, or undefined. */
export function partRefusal(
  part: Part,
  data: unknown,
  ctx: PrecheckContext,
): string | undefined {
  const label = `pid ${ctx.pid}: ${part.name}`;
  const why = imageRefusal(part, data, ctx.pid);
  if (why) return why;
  try {
    part.precheck?.(data, ctx);
  } catch (e) {
    if (!(e instanceof AmberError)) throw e;
    return `${label}: ${messageOf(e)}`;
  }
}

function processRefusals(
  p: ProcessImages,
  images: Images,
  dir: ImageDir,
  options: RestoreOptions,
): string[] {
  const e = p.entry;
  const out: string[] = [];
  const pids = new Set(images.processes.map((q) => q.entry.pid));
  if (!pids.has(e.sid) && !options.shellJob) {
    out.push(`pid ${e.pid}: its session ${e.sid} is not in the images; restore with --shell-job`);
  }
  if (e.state === "zombie") return out;
  for (const part of PARTS) {
    const why = partRefusal(part, p.parts[part.name], {
      pid: e.pid,
      dir,
      options,
      images: p.parts,
    });
    if (why) out.push(why);
  }
  return out;
}

/**
 * Every reason the images cannot be restored on this machine with these
 * options; none means they can (as far as anything short of creating the
 * processes can tell: free pids and the CPU are checked by restore).
 */
export async function judgeImages(
  images: Images,
  dir: ImageDir,
  options: RestoreOptions,
): Promise<string[]> {
  const reasons: string[] = [];
  const inv = images.inventory;
  const vdso = await vdsoDigest(Deno.pid);
  if (inv.vdsoSha256 && vdso !== inv.vdsoSha256) {
    reasons.push(
      `this kernel's [vdso] differs from the image's (dumped on ${inv.kernel}); not supported yet`,
    );
  }
  reasons.push(...images.unrestorable);
  // Which process restore creates from which depends on the whole tree.
  reasons.push(...ptyMemberRefusals(images));
  for (const p of images.processes) reasons.push(...processRefusals(p, images, dir, options));
  return reasons;
}

/** The verdict on the images directory `path`, read the way restore reads it. */
export async function judgeDirectory(path: string, options: RestoreOptions): Promise<string[]> {
  using dir = new ImageDir(path);
  return await judgeImageDir(dir, options);
}

/** The verdict on the images of `dir` (a directory, or a dump's images in memory). */
export async function judgeImageDir(dir: ImageDir, options: RestoreOptions): Promise<string[]> {
  return await judgeImages(readImagesIn(dir), dir, options);
}

/** The restore options a verdict taken at dump time assumes. */
export function dumpVerdictOptions(shellJob: boolean): RestoreOptions {
  return {
    detached: false,
    shellJob,
    verbose: false,
    allowChangedFiles: false,
    inheritFds: [],
    assumeInherited: true,
  };
}
