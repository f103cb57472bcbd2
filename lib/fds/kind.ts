/** What every kind of file descriptor module provides. */
import type { z } from "zod";
import type { Injector } from "../../ffi/inject.ts";
import type {
  PrecheckContext,
  RestoreContext,
  RestoreOptions,
  Scratch,
  TreeDumpState,
} from "../context.ts";
import type { ImageDir } from "../images/dir.ts";

/** What /proc says about one open descriptor. */
export interface FdProbe {
  pid: number;
  fd: number;
  /** readlink of /proc/PID/fd/N, e.g. "/var/log/x", "pipe:[123]". */
  link: string;
  /** fdinfo "flags" (open flags, O_CLOEXEC included). */
  flags: number;
  /** fdinfo "pos". */
  pos: number;
  /** stat of the open file (follows the fd link), when it could be taken. */
  stat?: Deno.FileInfo;
  /** What the tree's earlier descriptors were. */
  tree: TreeDumpState;
  /** Where a kind may save contents besides its entry (ghost files). */
  dir: ImageDir;
  /** Largest deleted file saved as a ghost, bytes (--ghost-limit). */
  ghostLimit: number;
  /** Injection into the frozen process, for kinds that must ask it (inotify). */
  inject?: { injector: Injector; scratch: Scratch };
}

export interface FdKind<S extends z.ZodType = z.ZodType> {
  /** The `kind` field of its image entries. */
  name: string;
  /** Entry schema; must include `kind: z.literal(name)`, `fd` and `flags`. */
  schema: S;
  matches(probe: FdProbe): boolean;
  dump(probe: FdProbe): z.input<S>;
  precheck?(entry: z.output<S>, ctx: PrecheckContext): void;
  /** Returns a descriptor in the tracee holding the file; the caller moves it to its number. */
  restore(ctx: RestoreContext, entry: z.output<S>): number;
  /**
   * Runs once every descriptor of the process is in place, for state that
   * refers to other descriptors (epoll's interest list). Not run for a
   * descriptor shared with an earlier one: that one's kind did it.
   */
  afterAll?(ctx: RestoreContext, entry: z.output<S>): void;
  /** Why this descriptor cannot be restored yet, if it cannot. */
  unrestorable?(entry: z.output<S>): string | undefined;
  /**
   * What ties this descriptor to the network namespace it was dumped in
   * (an address there), if anything: a migration, which restores into
   * another one, refuses it (unless `options` say it moves too).
   */
  netnsBound?(entry: z.output<S>, options: RestoreOptions): string | undefined;
}

export function defineFdKind<S extends z.ZodType>(kind: FdKind<S>): FdKind<S> {
  return kind;
}

export const O_CLOEXEC = 0o2000000;
