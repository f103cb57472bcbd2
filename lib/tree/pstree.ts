/** The process tree image and the inventory: what was dumped, where and on what. */
import { z } from "zod";
import { defineImage, PID_MAX, pidNumber, u64 } from "../images/codec.ts";

export const IMAGE_FORMAT_VERSION = 1;
export const AMBER_VERSION = "0.1.0";

export const ProcessEntry = z.object({
  pid: pidNumber,
  ppid: z.number().int().min(0),
  pgid: pidNumber,
  sid: z.number().int().min(0),
  /** Its controlling terminal's device number (stat tty_nr), when it has one. */
  tty: z.number().int().min(1).optional(),
  /** The process name (its main thread's comm). */
  comm: z.string().max(16),
  exitSignal: z.number().int().min(0).max(64),
  threads: z.array(pidNumber).min(1).max(PID_MAX),
  /** "stopped": in a group stop; "zombie": exited, not yet reaped by its parent. */
  state: z.enum(["running", "stopped", "zombie"]),
  /** A zombie's wait status. */
  exitStatus: z.number().int().min(0).max(0xffff).optional(),
});
export type ProcessEntryImage = z.output<typeof ProcessEntry>;

export const pstreeImage = defineImage(
  "pstree",
  1,
  false,
  z.object({
    processes: z.array(ProcessEntry).min(1).max(PID_MAX),
    /** Why these images cannot be restored (objects shared with processes outside the tree). */
    unrestorable: z.array(z.string()).max(PID_MAX),
  }).refine(
    (t) => new Set(t.processes.map((p) => p.pid)).size === t.processes.length,
    "a pid is listed twice",
  ).refine(
    (t) => {
      const tids = t.processes.flatMap((p) => p.threads);
      return new Set(tids).size === tids.length;
    },
    "a thread id is listed twice",
  ).refine(
    (t) =>
      t.processes.every((p, i) => i === 0 || t.processes.slice(0, i).some((q) => q.pid === p.ppid)),
    "every process but the first must follow its parent",
  ),
);

export const inventoryImage = defineImage(
  "inventory",
  IMAGE_FORMAT_VERSION,
  false,
  z.object({
    amberVersion: z.string(),
    kernel: z.string(),
    arch: z.literal("x86_64"),
    xsaveSize: z.number().int(),
    xfeatures: u64,
    vdsoSha256: z.string(),
    createdAt: z.string(),
    rootPid: pidNumber,
    shellJob: z.boolean(),
    /** The nftables table (lib/net/netlock.ts) locking the dumped TCP connections until restore. */
    netLock: z.string().regex(/^amber_[a-z0-9_]{1,40}$/).optional(),
    /** Dumped with --tcp-established (a migration's TCP sockets move with it). */
    tcpEstablished: z.boolean().optional(),
    /** Why restore would refuse these images, as dump judged them (see lib/verdict.ts). */
    verdict: z.array(z.string()).optional(),
  }),
  64 * 1024,
);
