/**
 * What a per-process part (one kind of kernel object) sees while it is
 * dumped or restored. Parts are listed in lib/parts.ts.
 */
import type { z } from "zod";
import type { Injector } from "../ffi/inject.ts";
import type { ImageDir } from "./images/dir.ts";
import type { FrozenProcess } from "./tree/seize.ts";
import type { PreparedPages } from "./mm/pages.ts";

/** A few bytes of the tracee's memory amber may use for syscall arguments. */
export interface Scratch {
  addr: bigint;
  size: number;
}

export interface DumpOptions {
  leaveRunning: boolean;
  shellJob: boolean;
  verbose: boolean;
  /** Largest deleted file whose contents dump saves (--ghost-limit), bytes. */
  ghostLimit: number;
  /** How long dump waits for AIO requests in flight before refusing (--aio-timeout), ms. */
  aioTimeoutMs: number;
  /** Established TCP connections may be dumped (with TCP_REPAIR, under a network lock). */
  tcpEstablished: boolean;
  /** Objects outside the tree the images may refer to (CRIU's --external), e.g. "pipe:[123]". */
  external?: string[];
  /**
   * A migration's pre-copy round: the pages are copied once the tree runs
   * again, write tracking armed before (a page written meanwhile is sent
   * by the next round). Its images alone are not a consistent checkpoint.
   */
  copyWhileRunning?: boolean;
  /** Unix sockets whose outside peer has a name are connected to it again (--ext-unix-sk). */
  extUnixSk?: boolean;
  /**
   * dump --lazy-pages: the pages of lazy mappings stay in the frozen tree,
   * served from there once the images are written (lib/mm/remote.ts).
   */
  lazySource?: boolean;
}

/** How a dump ends for the tree: it runs on (dump -R, or a failed dump), or it is killed. */
export type DumpEnd = "resume" | "kill";

export interface DumpContext {
  pid: number;
  proc: FrozenProcess;
  dir: ImageDir;
  options: DumpOptions;
  /** Injector on a live thread of the process, begun. */
  injector: Injector;
  scratch: Scratch;
  /** Image bodies already dumped for this process, by part name. */
  done: Record<string, unknown>;
  /** What parts began reading ahead for this process (their prefetch), by part name. */
  ahead: Map<string, unknown>;
  /** What earlier processes of the tree hold, for objects processes share. */
  tree: TreeDumpState;
  /**
   * prctl's attributes of the process's other threads, by tid, asked by
   * the threads part in its one batch on each (lib/task/prctl.ts
   * threadAttrQuery); a thread missing here is asked by prctl itself.
   */
  threadAttrs?: Map<number, Record<string, bigint>>;
  /**
   * The batch code page kept for the process's parts (lib/batch.ts
   * keepBatchPage), once one mapped it; absent: each batch maps its own.
   */
  batchPage?: { addr?: bigint };
}

/** Kernel objects seen so far in the tree, so a second holder can refer to the first. */
export interface TreeDumpState {
  /** Open descriptors by "dev:ino:link", with the processes and numbers holding them. */
  openFiles: Map<string, { pid: number; fd: number }[]>;
  /** Shared anonymous memory by inode, with its first holder. */
  sharedMemory: Map<number, number>;
  /**
   * Problems a later process may still resolve (e.g. a pipe whose other end
   * has not been seen yet), by key; what is left at the end makes the
   * images unrestorable.
   */
  pending: Map<string, string>;
  /** Objects already recorded once for the whole tree (e.g. "pipe:123"). */
  seen: Set<string>;
  /** Pages files written ahead of the freeze, by pid; taken by the pages part. */
  preparedPages: Map<number, PreparedPages>;
  /** What a kind of object keeps for the whole tree, by kind name; only that kind reads it. */
  kinds: Map<string, unknown>;
  options: DumpOptions;
  /**
   * The nftables table locking the dumped TCP connections (lib/net/netlock.ts),
   * once a kind made one: recorded in the inventory, removed when the tree
   * runs again or by restore.
   */
  netLock?: string;
  /**
   * Run just before the tree is resumed, or after it is killed: for state
   * a kind put on the live objects while dumping (TCP repair mode).
   */
  onEnd: ((end: DumpEnd) => void)[];
  /**
   * Run only by a dump that ends the tree, once its verdict is clean, just
   * before the images are made final: for state that can be read only by
   * taking it from the tree (data sent on a unix connection still waiting
   * in a backlog), so a dump that fails or is refused never takes it.
   * What they write into `dir` is part of the images.
   */
  beforeCommit: ((dir: ImageDir) => void)[];
  /** Run once the tree runs again, before the images are complete (copyWhileRunning). */
  afterResume: (() => Promise<void>)[];
}

export interface RestoreOptions {
  detached: boolean;
  shellJob: boolean;
  verbose: boolean;
  /** Reopen regular files even if they changed since the dump (--allow-changed-files). */
  allowChangedFiles: boolean;
  /** Leave private anonymous memory to be served on demand once the tree runs (--lazy-pages). */
  lazyPages?: boolean;
  /**
   * The pages dump --lazy-pages left in the dumped tree come from the
   * dumping amber (restore --page-server), or from nowhere.
   */
  pageSource?: boolean;
  /**
   * The pages of the images' parents were checked already, and hold what
   * these images take from them (lib/prebuilt.ts: a tree built from them).
   */
  parentsChecked?: boolean;
  /** Accepted as CRIU's flag; the images say which connections come back. */
  tcpEstablished?: boolean;
  /** Amber's own descriptors standing in for external objects (CRIU's --inherit-fd). */
  inheritFds?: InheritFd[];
  /**
   * The verdict a dump (or show) takes: each external object is assumed to
   * be given with --inherit-fd at restore.
   */
  assumeInherited?: boolean;
  /**
   * The verdict a dump takes before its beforeCommit steps ran: what they
   * will write (lib/fds/unix.ts backlog data) is assumed present.
   */
  takenLater?: boolean;
  /**
   * The images were sent by `amber migrate` from another amber (another
   * machine, or other namespaces): restored into this amber's namespaces;
   * what is tied to the old network namespace is refused instead.
   */
  migrated?: boolean;
  /**
   * A migration made with --tcp-established: its TCP sockets come back
   * bound to their addresses, which the operator moved here.
   */
  movedTcp?: boolean;
}

/** `--inherit-fd fd[N]:RESOURCE`: amber's fd N takes the place of RESOURCE (e.g. "pipe:[123]"). */
export interface InheritFd {
  /** amber's own descriptor that takes the resource's place. */
  fd: number;
  /** What the image names as external, e.g. "pipe:[123]". */
  resource: string;
}

export interface RestoreContext {
  pid: number;
  dir: ImageDir;
  options: RestoreOptions;
  /** Injector on the process's main thread (begun; registers are the helper's). */
  injector: Injector;
  scratch: Scratch;
  /** Every thread of the process once created, main thread first. */
  threads: Map<number, Injector>;
  /** This process's images, by part name. */
  images: Record<string, unknown>;
  /** Descriptors amber's helper left in the process (stdio), fd → what they are. */
  inherited: Map<number, string>;
  /** Lowest descriptor number free for parking (above every number in the images). */
  parkFloor: number;
  /** Objects the processes of the tree share, as restored so far. */
  tree: TreeRestoreState;
  log: (msg: string) => void;
  /** The batch code page beside the scratch area, for all its parts (lib/batch.ts). */
  batchPage?: { addr?: bigint };
}

/** Where a descriptor lives in the tree being restored. */
export interface FdPlace {
  pid: number;
  fd: number;
}

/** Restore-wide state, for objects processes share. */
export interface TreeRestoreState {
  /** Pipes created so far by inode: where each end can be fetched from. */
  pipes: Map<number, { read?: FdPlace; write?: FdPlace }>;
  /** Descriptors kept only so a later process can fetch them; closed at the end. */
  parked: FdPlace[];
  /** What a kind of object keeps for the whole tree, by kind name; only that kind reads it. */
  kinds: Map<string, unknown>;
  /**
   * Run once the tree is rebuilt, just before it runs (ok), or when the
   * restore fails (not ok): e.g. TCP repair mode turned off.
   */
  onEnd: ((ok: boolean) => void)[];
}

/** A kind's own tree-wide state: made on first use, kept in `kinds` under the kind's name. */
export function kindState<T>(kinds: Map<string, unknown>, name: string, make: () => T): T {
  if (!kinds.has(name)) kinds.set(name, make());
  return kinds.get(name) as T;
}

export interface PrecheckContext {
  pid: number;
  dir: ImageDir;
  options: RestoreOptions;
  images: Record<string, unknown>;
}

/** One kind of per-process kernel object: its image schema, dump and restore. */
export interface Part<S extends z.ZodType = z.ZodType> {
  /** Image name: its image is field NAME of `process-PID.cbor` (lib/images/process.ts). */
  name: string;
  version: number;
  /**
   * Largest image restore reads for it (its bytes in the process image,
   * checked before they are decoded);
   * parts whose images grow with the process (mappings, pages, fds) say
   * how far.
   */
  maxBytes?: number;
  schema: S;
  dump(ctx: DumpContext): z.input<S> | Promise<z.input<S>>;
  /** Checks before anything is created (files exist, kinds supported...). */
  precheck?(data: z.output<S>, ctx: PrecheckContext): void;
  restore(ctx: RestoreContext, data: z.output<S>): void | Promise<void>;
  /**
   * Runs once every process of the tree is rebuilt, before the threads get
   * their final registers: for state that would get in the way of any
   * later injected syscall (seccomp). ctx.scratch is unmapped by then.
   */
  finish?(ctx: RestoreContext, data: z.output<S>): void;
  /**
   * Dumped once more at the very end, the tree still frozen: for state it
   * can gain meanwhile (a signal sent to it during the dump).
   */
  dumpAgainLast?: boolean;
  /**
   * Its dump reads the process's mappings or memory: the batch code page
   * (lib/batch.ts) is not mapped while it runs.
   */
  readsMemoryLayout?: boolean;
  /**
   * Begins, once the tree is frozen and before any part runs, a slow read
   * its dump of process `pid` will need, on a pool thread; what it returns
   * is that process's ctx.ahead entry for the part.
   */
  prefetch?(pid: number): unknown;
  /**
   * Its prefetch may run before the freeze, while the tree runs, in a
   * round whose images are provisional (a migration's pre-copy round: the
   * final round reads everything again, frozen, and the tree built from
   * the round before is used only if nothing but pages and registers
   * changed). The part checks what it read against the frozen tree.
   */
  prefetchWhileRunning?: boolean;
  /** Why an object in this image cannot be restored yet, if one cannot. */
  unrestorable?(data: z.output<S>): string | undefined;
}

export function definePart<S extends z.ZodType>(part: Part<S>): Part<S> {
  return part;
}
