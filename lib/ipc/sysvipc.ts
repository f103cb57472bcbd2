/**
 * SysV semaphore sets and message queues the tree uses (lib/ipc/sem.ts,
 * lib/ipc/msg.ts). They belong to the IPC namespace, not to a process
 * (CRIU dumps them only with a whole IPC namespace), and amber restores
 * into its own namespace (lib/task/ns.ts refuses another). Nothing
 * attaches them to a process, so "used by the tree" is what the kernel
 * keeps of who used them last: a queue whose last msgsnd or msgrcv
 * (lspid/lrpid) or a set one of whose semaphores' last semop or SETVAL
 * (semctl GETPID) was a process of the tree. A set or queue created but
 * never used by the tree, or used since by someone else only, is not
 * seen; one whose last user is a live process outside the tree is shared
 * with it, and refused. SysV shared memory is restored with the mappings
 * (lib/mm/sysvshm.ts).
 *
 * SEM_UNDO adjustments (semadj) are not restored: the kernel keeps them
 * per process and shows them nowhere (docs/STATE.md, Limits).
 */
import { z } from "zod";
import { definePart, type DumpContext, kindState } from "../context.ts";
import { AmberError, withContext } from "../errors.ts";
import { MAX_IMAGE_BYTES } from "../images/codec.ts";
import { liveProcess, sysvTable } from "./ipcobj.ts";
import {
  dumpMsgQueue,
  msgConflict,
  msgLabel,
  MsgQueue,
  type MsgQueueImage,
  queuesUsedBy,
  restoreMsgQueue,
} from "./msg.ts";
import {
  dumpSemSet,
  OwnSems,
  ownSems,
  restoreOwnSems,
  restoreSemSet,
  semConflict,
  semLabel,
  SemSet,
  type SemSetImage,
  setsUsedBy,
} from "./sem.ts";

const SysvIpc = z.object({
  /** Sets and queues this process was the first of the tree to use: recorded whole. */
  sems: z.array(SemSet).max(1 << 15),
  msgs: z.array(MsgQueue).max(1 << 15),
  /** Semaphores this process operated on last (of any set the tree uses). */
  own: z.array(OwnSems).max(1 << 15),
});

interface Seen {
  pids: Set<number>;
  ids: Set<string>;
}

/**
 * Notes that `what` was also used last by `users`; one that is a live
 * process not (yet) seen in the tree stays pending, unless a later
 * process of the tree turns out to be it.
 */
function noteUsers(ctx: DumpContext, seen: Seen, what: string, users: number[]): void {
  for (const p of new Set(users)) {
    if (p === 0 || seen.pids.has(p) || !liveProcess(p)) continue;
    ctx.tree.pending.set(
      `sysvipc:${p}`,
      `pid ${ctx.pid}: sysvipc: ${what} is also used by pid ${p}, outside the dumped tree: ` +
        "not supported yet",
    );
  }
}

function dumpSysvIpc(ctx: DumpContext): z.input<typeof SysvIpc> {
  const { pid } = ctx;
  const seen = kindState(
    ctx.tree.kinds,
    "sysvipc",
    (): Seen => ({ pids: new Set(), ids: new Set() }),
  );
  seen.pids.add(pid);
  ctx.tree.pending.delete(`sysvipc:${pid}`);
  const out: z.input<typeof SysvIpc> = { sems: [], msgs: [], own: [] };
  for (const [id, pids] of setsUsedBy(pid, sysvTable("sem"))) {
    const set = dumpSemSet(id, pids);
    noteUsers(ctx, seen, semLabel(set), pids);
    if (!seen.ids.has(`sem:${id}`)) out.sems.push(set);
    seen.ids.add(`sem:${id}`);
    out.own.push(ownSems(pid, id, pids, set.values));
  }
  for (const id of queuesUsedBy(pid, sysvTable("msg"))) {
    if (seen.ids.has(`msg:${id}`)) continue;
    seen.ids.add(`msg:${id}`);
    const q = dumpMsgQueue(id);
    noteUsers(ctx, seen, msgLabel(q), [q.lspid, q.lrpid]);
    out.msgs.push(q);
  }
  return out;
}

export const sysvIpcPart = definePart({
  name: "sysvipc",
  version: 2,
  maxBytes: MAX_IMAGE_BYTES,
  schema: SysvIpc,
  dump: dumpSysvIpc,
  precheck({ sems, msgs }) {
    for (const s of sems) {
      const why = semConflict(s);
      if (why) throw new AmberError(why);
    }
    for (const q of msgs) {
      const why = msgConflict(q);
      if (why) throw new AmberError(why);
    }
  },
  restore(ctx, { sems, msgs, own }) {
    for (const s of sems as SemSetImage[]) withContext(semLabel(s), () => restoreSemSet(ctx, s));
    for (const q of msgs as MsgQueueImage[]) {
      withContext(msgLabel(q), () => restoreMsgQueue(ctx, q));
    }
    for (const o of own) {
      withContext(`SysV semaphore set id ${o.id}`, () => restoreOwnSems(ctx, o));
    }
  },
});

/** `show`'s lines for this part: each set and queue the process recorded. */
export function sysvIpcLines(image: unknown): string[] {
  const { sems = [], msgs = [] } = (image ?? {}) as Partial<z.output<typeof SysvIpc>>;
  const owner = (o: SemSetImage | MsgQueueImage) =>
    `owner ${o.uid}:${o.gid}, creator ${o.cuid}:${o.cgid}, mode ${o.mode.toString(8)}`;
  return [
    ...sems.map((s) => `  ${semLabel(s)}: values ${s.values.join(" ")}; ${owner(s)}`),
    ...msgs.map((q) => {
      const bytes = q.messages.reduce((n, m) => n + m.data.length, 0);
      return `  ${msgLabel(q)}: ${q.messages.length} messages, ${bytes} bytes ` +
        `(types ${q.messages.map((m) => m.type).join(" ") || "-"}); ${owner(q)}`;
    }),
  ];
}
