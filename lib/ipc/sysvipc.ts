/**
 * SysV semaphore sets and message queues the tree uses: refused until
 * supported. They belong to the IPC namespace, not to a process (CRIU
 * dumps them only with a whole IPC namespace), and amber restores into its
 * own namespace (lib/task/ns.ts refuses another), so what can be refused
 * is what a process of the tree used: a queue whose last msgsnd/msgrcv
 * (lspid/lrpid in /proc/sysvipc/msg) or a semaphore whose last semop or
 * SETVAL (semctl GETPID) was this process's. A set or queue created but
 * never used by it is not seen. SysV shared memory is restored
 * (lib/mm/sysvshm.ts).
 */
import { z } from "zod";
import { semLastPids } from "../../ffi/sysvipc.ts";
import { definePart } from "../context.ts";

const Used = z.object({
  what: z.enum(["semaphore set", "message queue"]),
  key: z.string(),
  id: z.number().int(),
});

/** Rows of a /proc/sysvipc table as column → value. */
function table(name: string): Record<string, string>[] {
  let text: string;
  try {
    text = Deno.readTextFileSync(`/proc/sysvipc/${name}`);
  } catch {
    return []; // no SysV IPC in this kernel
  }
  const [head, ...rows] = text.trim().split("\n").map((l) => l.trim().split(/\s+/));
  return rows.map((r) => Object.fromEntries(head.map((h, i) => [h, r[i]])));
}

function usedBy(pid: number): z.input<typeof Used>[] {
  const key = (k: string) => `0x${(Number(k) >>> 0).toString(16).padStart(8, "0")}`;
  const sems = table("sem").filter((r) => {
    try {
      return semLastPids(Number(r.semid), Number(r.nsems)).includes(pid);
    } catch {
      return false; // removed since the table was read
    }
  }).map((r) => ({ what: "semaphore set" as const, key: key(r.key), id: Number(r.semid) }));
  const msgs = table("msg").filter((r) => Number(r.lspid) === pid || Number(r.lrpid) === pid)
    .map((r) => ({ what: "message queue" as const, key: key(r.key), id: Number(r.msqid) }));
  return [...sems, ...msgs];
}

export const sysvIpcPart = definePart({
  name: "sysvipc",
  version: 1,
  schema: z.object({ used: z.array(Used).max(1 << 16) }),
  dump: ({ pid }) => ({ used: usedBy(pid) }),
  unrestorable({ used }) {
    const u = used[0];
    if (u) return `SysV ${u.what} ${u.key} (id ${u.id}), used by this process: not supported yet`;
  },
  restore() {},
});
