/**
 * amber: checkpoint/restore of running Linux processes from userspace.
 *
 * @example
 * ```ts
 * import { dump, readImages, restore } from "./mod.ts";
 * await dump({ pid: 1234, dir: "/tmp/img", leaveRunning: true });
 * console.log(readImages("/tmp/img").processes.length);
 * await restore({ dir: "/tmp/img", detached: true });
 * ```
 * @module
 */
import { type DumpRequest, type DumpStats, dumpTree } from "./lib/dump.ts";
import { type Images, readImages as readImagesImpl } from "./lib/images/read.ts";
import { type RestoreRequest, type RestoreResult, restoreTree } from "./lib/restore.ts";
import { showImages } from "./lib/show.ts";
import { checkKernel, type CheckReport, formatCheckReport } from "./lib/check.ts";

export { AmberError, InterruptedError, UsageError } from "./lib/errors.ts";
export type { CheckReport, DumpRequest, DumpStats, Images, RestoreRequest, RestoreResult };

/**
 * Freezes process `pid` and all its descendants, writes their images into
 * `dir` (created 0700 if missing), then kills the tree, or resumes it with
 * `leaveRunning`. On failure the tree is resumed untouched and no image is
 * left behind.
 *
 * @example
 * ```ts
 * const stats = await dump({ pid: 1234, dir: "/tmp/img", leaveRunning: true });
 * console.log(`${stats.pageBytes} bytes of memory, frozen ${stats.frozenMs} ms`);
 * ```
 */
export function dump(req: DumpRequest): Promise<DumpStats> {
  return dumpTree(req);
}

/**
 * Rebuilds the tree saved in `dir` with the same PIDs and lets it run.
 * With `detached` it returns once the tree runs; otherwise it waits for the
 * root process and returns its exit code.
 *
 * @example
 * ```ts
 * const { pids } = await restore({ dir: "/tmp/img", detached: true });
 * ```
 */
export function restore(req: RestoreRequest): Promise<RestoreResult> {
  return restoreTree(req);
}

/**
 * Reads and validates every image in `dir`. Errors name the file and the
 * field that is wrong.
 *
 * @example
 * ```ts
 * const images = readImages("/tmp/img");
 * for (const p of images.processes) console.log(p.entry.pid, p.entry.threads);
 * ```
 */
export function readImages(dir: string): Images {
  return readImagesImpl(dir);
}

/**
 * A readable summary of the images in `dir`, or with `json` all images as
 * one JSON document (addresses as hex strings, page contents left out).
 *
 * @example
 * ```ts
 * console.log(await show("/tmp/img", { json: true }));
 * ```
 */
export function show(dir: string, opts: { json?: boolean } = {}): Promise<string> {
  return showImages(dir, opts);
}

/**
 * Probes the kernel features amber needs; `ok` is true only when dump and
 * restore can work on this machine.
 *
 * @example
 * ```ts
 * const report = check();
 * if (!report.ok) console.log(formatCheck(report));
 * ```
 */
export function check(): CheckReport {
  return checkKernel();
}

/**
 * The check report as text, one feature per line.
 *
 * @example
 * ```ts
 * console.log(formatCheck(check()));
 * ```
 */
export function formatCheck(report: CheckReport): string {
  return formatCheckReport(report);
}
