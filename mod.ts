/**
 * amber: checkpoint/restore of running Linux processes from userspace.
 *
 * Every function here throws {@link AmberError} on failure: a one-line
 * `message` naming the object and the step, and the same facts as fields
 * (`code`, `pid`, `object`, `step`).
 *
 * @example Dump a process, look at its images, restore it
 * ```ts
 * import { AmberError, dump, readImages, restore } from "./mod.ts";
 * try {
 *   await dump({ pid: 1234, dir: "/tmp/img", leaveRunning: true });
 *   console.log(readImages("/tmp/img").processes.length);
 *   await restore({ dir: "/tmp/img", detached: true });
 * } catch (e) {
 *   if (e instanceof AmberError) console.error(e.code, e.pid, e.object, e.step);
 * }
 * ```
 * @module
 */
import { type DumpRequest, type DumpStats, dumpTree } from "./lib/dump.ts";
import { readImages as readImagesImpl } from "./lib/images/read.ts";
import { type RestoreRequest, type RestoreResult, restoreTree } from "./lib/restore.ts";
import { cleanStaleLocks, cleanStaleLocksAsync } from "./lib/net/netlock.ts";
import { showImages } from "./lib/show.ts";
import { checkKernel, type CheckReport, formatCheckReport } from "./lib/check.ts";
import { type CheckpointResult, runJob, type RunRequest, type RunResult } from "./lib/run.ts";
import {
  type PageServerRequest,
  type PageServerResult,
  restoreStream,
  servePageServer,
} from "./lib/streaming.ts";
import { UsageError } from "./lib/errors.ts";
import {
  migrate as migrateImpl,
  migrateReceive as migrateReceiveImpl,
  type MigrateReceiveRequest,
  type MigrateReceiveResult,
  type MigrateRequest,
  type MigrateResult,
  type MigrateRound,
} from "./lib/migrate.ts";

export {
  AmberError,
  type ErrorFields,
  InterruptedError,
  RefusalError,
  UsageError,
} from "./lib/errors.ts";
export type { Progress, ProgressCallback } from "./lib/progress.ts";
export type { LogLine } from "./lib/log.ts";
export type { CheckFeature, CheckReport } from "./lib/check.ts";
export type { CheckpointResult, RunRequest, RunResult };
export type { DumpRequest, DumpStats } from "./lib/dump.ts";
export type {
  MigrateReceiveRequest,
  MigrateReceiveResult,
  MigrateRequest,
  MigrateResult,
  MigrateRound,
};
export type { RestoreRequest, RestoreResult } from "./lib/restore.ts";
export type { InheritFd } from "./lib/context.ts";
export type { LazyStats } from "./lib/mm/lazy.ts";
export type { SnapshotStats } from "./lib/mm/snapshot.ts";
export type { ByteReader, ByteWriter } from "./lib/images/stream.ts";
export type { PageServerAddress, PageServerRequest, PageServerResult } from "./lib/streaming.ts";

/** The inventory of an images directory: where and how it was dumped. */
export interface Inventory {
  /** Version of the amber that wrote the images. */
  amberVersion: string;
  /** Kernel release of the machine dumped on. */
  kernel: string;
  /** CPU architecture. */
  arch: "x86_64";
  /** Bytes of FPU (xsave) state per thread. */
  xsaveSize: number;
  /** xsave feature bits of the CPU dumped on. */
  xfeatures: bigint;
  /** SHA-256 of the [vdso] the images expect. */
  vdsoSha256: string;
  /** When the dump was taken (ISO 8601). */
  createdAt: string;
  /** Root of the dumped tree. */
  rootPid: number;
  /** Dumped with --shell-job. */
  shellJob: boolean;
  /** Why restore would refuse these images, as dump judged them. */
  verdict?: string[];
}

/** A process as the process tree image lists it. */
export interface ProcessEntry {
  /** Its pid, and its parent's, group's and session's. */
  pid: number;
  /** Parent pid. */
  ppid: number;
  /** Process group. */
  pgid: number;
  /** Session. */
  sid: number;
  /** Its name (the main thread's comm). */
  comm: string;
  /** Signal its parent gets when it ends. */
  exitSignal: number;
  /** Its thread ids, main thread first. */
  threads: number[];
  /** "stopped": in a group stop; "zombie": exited, not yet reaped by its parent. */
  state: "running" | "stopped" | "zombie";
  /** A zombie's wait status. */
  exitStatus?: number;
}

/** The images of one process. */
export interface ProcessImages {
  /** Its entry in the process tree image. */
  entry: ProcessEntry;
  /** Decoded part images by part name (mappings, pagemap, mm, fds, fs, ...). */
  parts: Record<string, unknown>;
}

/** A whole images directory, read and validated ({@link readImages}). */
export interface Images {
  /** The directory read. */
  dir: string;
  /** Where and how the images were dumped. */
  inventory: Inventory;
  /** Why the images cannot be restored, if they cannot (objects shared outside the tree). */
  unrestorable: string[];
  /** The processes, each after its parent. */
  processes: ProcessImages[];
}

/**
 * Freezes process `pid` and all its descendants, writes their images into
 * `dir` (created 0700 if missing), then kills the tree, or resumes it with
 * `leaveRunning`. On failure the tree is resumed untouched and no image is
 * left behind; aborting `signal` unwinds the same way.
 *
 * @example
 * ```ts
 * const stats = await dump({
 *   pid: 1234,
 *   dir: "/tmp/img",
 *   leaveRunning: true,
 *   progress: (p) => console.log(`${p.pagesDone}/${p.pagesTotal} pages`),
 * });
 * console.log(`${stats.pageBytes} bytes of memory, frozen ${stats.frozenMs} ms`);
 * ```
 *
 * @example Move a tree through a pipe (another amber restores it with `restore({ stream })`)
 * ```ts
 * const ssh = new Deno.Command("ssh", { args: ["dest", "amber restore --stream -d"], stdin: "piped" })
 *   .spawn();
 * const w = ssh.stdin.getWriter();
 * await dump({ pid: 1234, stream: { write: async (b) => (await w.write(b.slice()), b.length) } });
 * await w.close();
 * ```
 */
export function dump(req: DumpRequest): Promise<DumpStats> {
  // A dump SIGKILLed earlier may have left its network lock: looked for beside this dump (nft
  // takes ~40 ms; a dump that locks connections itself cleans first, lib/net/netlock.ts).
  const cleaning = cleanStaleLocksAsync();
  return dumpTree(req).finally(() => cleaning);
}

/** What to pre-dump (mod.ts `preDump`): a dump request, less what a pre-dump decides itself. */
export type PreDumpRequest = Omit<DumpRequest, "preDump" | "leaveRunning" | "trackMem">;

/**
 * Pre-dump (CRIU's `pre-dump`): dumps the tree like `dump` with
 * `leaveRunning`, and arms write tracking in it (userfaultfd write-protect
 * in async mode, read back with PAGEMAP_SCAN), so that the next round, a
 * pre-dump or a dump with `prevImagesDir` and `trackMem`, stores only the
 * pages written since. Any number of pre-dumps form a chain; restore of
 * the last image reads the pages it does not hold from its parents.
 *
 * @example
 * ```ts
 * await preDump({ pid: 1234, dir: "/tmp/img/1" });
 * await preDump({ pid: 1234, dir: "/tmp/img/2", prevImagesDir: "../1" });
 * const stats = await dump({ pid: 1234, dir: "/tmp/img/3", prevImagesDir: "../2", trackMem: true });
 * console.log(`${stats.pageBytes} bytes written since the last pre-dump`);
 * ```
 */
export function preDump(req: PreDumpRequest): Promise<DumpStats> {
  return dumpTree({ ...req, preDump: true, leaveRunning: true });
}

/**
 * Rebuilds the tree saved in `dir` with the same PIDs and lets it run.
 * With `detached` it returns once the tree runs; otherwise it waits for the
 * root process and returns its exit code. A failed or aborted restore
 * leaves nothing running.
 *
 * @example
 * ```ts
 * const { pids } = await restore({ dir: "/tmp/img", detached: true });
 * ```
 */
export function restore(req: RestoreRequest): Promise<RestoreResult> {
  // A dump SIGKILLed earlier may have left its network lock: looked for while the images are read.
  const cleaning = cleanStaleLocksAsync();
  const restoring = req.stream
    ? restoreStream({ ...req, stream: req.stream })
    : req.dir
    ? restoreTree({ ...req, dir: req.dir })
    : Promise.reject(new UsageError("-D DIR is required; see amber restore --help"));
  return restoring.finally(() => cleaning);
}

/**
 * Receives one dump over TCP (CRIU's `page-server`): listens on
 * `address:port`, writes the images a `dump` with `pageServer` sends into
 * `dir` as a local dump would (staging directory, published only when
 * complete and every image decodes), tells the sender they are safe, and
 * returns. A stream that breaks off or fails a check is refused, and the
 * sender's tree runs on.
 *
 * @example
 * ```ts
 * const got = await pageServer({ address: "0.0.0.0", port: 27000, dir: "/var/tmp/img" });
 * console.log(`${got.bytes} bytes from ${got.peer}`);
 * ```
 */
export function pageServer(req: PageServerRequest): Promise<PageServerResult> {
  return servePageServer(req);
}

/**
 * Moves a running tree to the amber `migrateReceive` runs at `to`:
 * pre-copy rounds while it runs, then a short freeze for the last dirty
 * pages and the rest of its state; the tree here ends only once the
 * destination said it runs there. Any failure before that resumes it here.
 *
 * @example
 * ```ts
 * const r = await migrate({ pid: 1234, to: { address: "10.0.0.2", port: 27001 } });
 * console.log(r.preCopyRounds, r.finalPageBytes, r.frozenMs);
 * ```
 */
export function migrate(req: MigrateRequest): Promise<MigrateResult> {
  cleanStaleLocks();
  return migrateImpl(req);
}

/**
 * Waits for one `migrate` on `address:port`, stores its rounds and
 * restores the tree here (in this amber's namespaces); resolves once it runs.
 */
export function migrateReceive(req: MigrateReceiveRequest): Promise<MigrateReceiveResult> {
  cleanStaleLocks();
  return migrateReceiveImpl(req);
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

/** What {@link show} prints. */
export interface ShowOptions {
  /** Every image decoded, as one JSON document. */
  json?: boolean;
  /** One line per process: threads, memory, descriptor kinds, why not restorable. */
  tree?: boolean;
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
export function show(dir: string, opts: ShowOptions = {}): Promise<string> {
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

/**
 * Starts `command` and checkpoints it every `everyMs` into `dir/ckpt-N`
 * (each one a `dump -R`), keeping the newest `keep` complete ones and
 * `dir/latest` pointing at the newest; resolves with the job's exit status
 * when it ends. A failed checkpoint is reported to `onCheckpoint` and the
 * job goes on. `restore({ dir: dir + "/latest" })` continues the job.
 *
 * @example
 * ```ts
 * const { exitCode, checkpoints } = await run({
 *   command: ["python3", "job.py"],
 *   dir: "/var/tmp/job",
 *   everyMs: 600_000,
 *   keep: 3,
 *   onCheckpoint: (c) => console.log(c.ok ? `checkpoint ${c.n}` : c.error),
 * });
 * ```
 */
export function run(req: RunRequest): Promise<RunResult> {
  return runJob(req);
}
