/**
 * SysV message queues. The first process of the tree that used a queue
 * records it: owner, creator, mode, its byte limit and every queued
 * message with its type, copied in order with msgrcv(MSG_COPY), which
 * leaves the queue as it was. Restore takes the queue over if it still
 * has its id and key (a dump that kills the tree leaves it), emptying it,
 * or makes it again under that id, and that process sends the messages
 * again in order. Its last sender and receiver become that process, so a
 * later dump sees the queue as the tree's again.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { msgPeek, msgStat, removeIpc } from "../../ffi/sysvipc.ts";
import type { RestoreContext } from "../context.ts";
import { AmberError } from "../errors.ts";
import { bytes } from "../images/codec.ts";
import { putBytes } from "../scratch.ts";
import {
  IPC_CREAT,
  IPC_EXCL,
  IPC_SET,
  ipcConflict,
  ipcExists,
  IpcOwner,
  keyHex,
  permBytes,
  putDs,
  recreate,
} from "./ipcobj.ts";

const IPC_NOWAIT = 0o4000, MSG_NOERROR = 0o10000;
const ENOMSG = 42n;

export const Message = z.object({ type: z.bigint().min(1n), data: bytes });

export const MsgQueue = IpcOwner.extend({
  /** The queue's limit in bytes (msg_qbytes). */
  qbytes: z.number().int().min(0),
  /** Last sender and receiver (not restored as such: see the module comment). */
  lspid: z.number().int().min(0),
  lrpid: z.number().int().min(0),
  messages: z.array(Message),
});
export type MsgQueueImage = z.output<typeof MsgQueue>;

export function msgLabel(q: { key: number; id: number }): string {
  return `SysV message queue ${keyHex(q.key)} (id ${q.id})`;
}

/** Queues whose last sender or receiver is `pid`. */
export function queuesUsedBy(pid: number, rows: Record<string, number>[]): number[] {
  return rows.filter((r) => r.lspid === pid || r.lrpid === pid).map((r) => r.msqid);
}

export function dumpMsgQueue(id: number): z.input<typeof MsgQueue> {
  const st = msgStat(id);
  const { cbytes, qnum, ...rest } = st;
  // One message is at most all the bytes queued.
  const messages = Array.from({ length: qnum }, (_, i) => msgPeek(id, i, cbytes));
  return { ...rest, id, messages };
}

/** Why queue `q` cannot be restored on this machine now, if it cannot. */
export function msgConflict(q: MsgQueueImage): string | undefined {
  return ipcConflict("msg", "message queue", q, (row) => row.key === q.key);
}

/** Sends one message from the restored process. */
function send(ctx: RestoreContext, q: MsgQueueImage, type: bigint, data: Uint8Array, i: number) {
  if (8 + data.length > ctx.scratch.size) {
    throw new AmberError(`message ${i}: ${data.length} bytes: more than amber's scratch area`);
  }
  const buf = new Uint8Array(8 + data.length);
  new DataView(buf.buffer).setBigInt64(0, type, true);
  buf.set(data, 8);
  const at = putBytes(ctx.pid, ctx.scratch, buf);
  ctx.injector.call(`msgsnd message ${i}`, NR.msgsnd, q.id, at, data.length, IPC_NOWAIT);
}

/** Takes queue `q` over (emptied) or makes it again, then sends its messages again in order. */
export function restoreMsgQueue(ctx: RestoreContext, q: MsgQueueImage): void {
  const inj = ctx.injector;
  const why = msgConflict(q);
  if (why) throw new AmberError(why);
  const exists = ipcExists("msg", q.id);
  if (!exists) {
    const flags = IPC_CREAT | IPC_EXCL | q.mode;
    recreate(ctx, "msg", q, () => inj.raw(NR.msgget, q.key, flags));
    ctx.tree.onEnd.push((ok) => {
      if (!ok) removeIpc("msg", q.id);
    });
  }
  // struct msqid64_ds: 120 bytes, msg_qbytes at 88 (above msgmnb needs CAP_SYS_RESOURCE).
  const ds = permBytes(q, 120);
  ds.setBigUint64(88, BigInt(q.qbytes), true);
  inj.call("msgctl(IPC_SET)", NR.msgctl, q.id, IPC_SET, putDs(ctx, ds));
  const room = ctx.scratch.addr;
  if (exists) {
    // What it holds now goes: the images say what it held (MSG_NOERROR: no room needed).
    for (;;) {
      const r = inj.raw(NR.msgrcv, q.id, room, 0, 0, IPC_NOWAIT | MSG_NOERROR);
      if (r === -ENOMSG) break;
      if (r < 0n) throw new AmberError(`emptying it: msgrcv: errno ${-r}`);
    }
  }
  if (q.lrpid) {
    // One message through it makes this process the last receiver.
    send(ctx, q, 1n, new Uint8Array(0), -1);
    inj.call("msgrcv", NR.msgrcv, q.id, room, 0, 0, IPC_NOWAIT | MSG_NOERROR);
  }
  q.messages.forEach((m, i) => send(ctx, q, m.type, m.data, i));
}
