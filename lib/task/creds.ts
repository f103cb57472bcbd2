/**
 * Credentials: uids, gids, groups, capabilities, no_new_privs. Restored
 * last, per thread (a raw setresuid changes only the calling thread).
 */
import { z } from "zod";
import { type Injector, NR } from "../../ffi/inject.ts";
import { definePart } from "../context.ts";
import { u64 } from "../images/codec.ts";
import { readStatus, statusHex, statusNumbers } from "../proc/status.ts";
import { putBytes } from "../scratch.ts";

const PR = {
  SET_KEEPCAPS: 8,
  CAPBSET_DROP: 24,
  SET_NO_NEW_PRIVS: 38,
  CAP_AMBIENT: 47,
} as const;
const CAP_AMBIENT_RAISE = 2;
const CAP_AMBIENT_CLEAR_ALL = 4;
const LINUX_CAPABILITY_VERSION_3 = 0x20080522;
const LAST_CAP = 40;

const Ids = z.array(z.number().int().min(0).max(0xffffffff)).length(4);

export const CredsSchema = z.object({
  uids: Ids,
  gids: Ids,
  groups: z.array(z.number().int().min(0).max(0xffffffff)).max(65536),
  capInh: u64,
  capPrm: u64,
  capEff: u64,
  capBnd: u64,
  capAmb: u64,
  noNewPrivs: z.boolean(),
});
export type Creds = z.output<typeof CredsSchema>;

export function readCreds(pid: number, tid?: number): Creds {
  const st = readStatus(pid, tid);
  return {
    uids: statusNumbers(st, "Uid"),
    gids: statusNumbers(st, "Gid"),
    groups: statusNumbers(st, "Groups"),
    capInh: statusHex(st, "CapInh"),
    capPrm: statusHex(st, "CapPrm"),
    capEff: statusHex(st, "CapEff"),
    capBnd: statusHex(st, "CapBnd"),
    capAmb: statusHex(st, "CapAmb"),
    noNewPrivs: st.get("NoNewPrivs") === "1",
  };
}

function capBits(mask: bigint): number[] {
  const out = [];
  for (let c = 0; c <= LAST_CAP; c++) if (mask & (1n << BigInt(c))) out.push(c);
  return out;
}

/** Applies creds to the thread behind `inj`, in the order the kernel allows. */
function applyCreds(
  inj: Injector,
  ctx: { pid: number; scratch: { addr: bigint; size: number } },
  c: Creds,
  current: Creds,
): void {
  for (const cap of capBits(current.capBnd & ~c.capBnd)) {
    inj.call(`prctl(CAPBSET_DROP ${cap})`, NR.prctl, PR.CAPBSET_DROP, cap);
  }
  if (c.groups.join() !== current.groups.join()) {
    const groups = new Uint8Array(new Uint32Array(c.groups).buffer);
    const addr = groups.length ? putBytes(ctx.pid, ctx.scratch, groups) : 0n;
    inj.call("setgroups", NR.setgroups, c.groups.length, addr);
  }
  if (c.gids.join() !== current.gids.join()) {
    inj.call("setresgid", NR.setresgid, c.gids[0], c.gids[1], c.gids[2]);
    inj.call("setfsgid", NR.setfsgid, c.gids[3]);
  }
  const uidChange = c.uids.join() !== current.uids.join();
  const capChange = c.capEff !== current.capEff || c.capPrm !== current.capPrm ||
    c.capInh !== current.capInh;
  if (uidChange) {
    inj.call("prctl(SET_KEEPCAPS)", NR.prctl, PR.SET_KEEPCAPS, 1);
    inj.call("setresuid", NR.setresuid, c.uids[0], c.uids[1], c.uids[2]);
    inj.call("setfsuid", NR.setfsuid, c.uids[3]);
    inj.call("prctl(SET_KEEPCAPS)", NR.prctl, PR.SET_KEEPCAPS, 0);
  }
  if (uidChange || capChange) {
    // struct __user_cap_header_struct + two __user_cap_data_struct (low, high words).
    const lo = (m: bigint) => Number(m & 0xffffffffn);
    const hi = (m: bigint) => Number(m >> 32n);
    const data = new Uint32Array([
      LINUX_CAPABILITY_VERSION_3,
      0,
      lo(c.capEff),
      lo(c.capPrm),
      lo(c.capInh),
      hi(c.capEff),
      hi(c.capPrm),
      hi(c.capInh),
    ]);
    const addr = putBytes(ctx.pid, ctx.scratch, new Uint8Array(data.buffer));
    inj.call("capset", NR.capset, addr, addr + 8n);
  }
  if (c.capAmb !== current.capAmb) {
    inj.call("prctl(CAP_AMBIENT)", NR.prctl, PR.CAP_AMBIENT, CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    for (const cap of capBits(c.capAmb)) {
      inj.call(
        `prctl(CAP_AMBIENT_RAISE ${cap})`,
        NR.prctl,
        PR.CAP_AMBIENT,
        CAP_AMBIENT_RAISE,
        cap,
        0,
        0,
      );
    }
  }
  if (c.noNewPrivs && !current.noNewPrivs) {
    inj.call("prctl(SET_NO_NEW_PRIVS)", NR.prctl, PR.SET_NO_NEW_PRIVS, 1, 0, 0, 0);
  }
}

function credsKey(c: Creds): string {
  return JSON.stringify(c, (_, v) => typeof v === "bigint" ? String(v) : v);
}

/** Credentials are per thread: those of threads that differ from the leader's. */
const ThreadCreds = z.object({ tid: z.number().int().min(1), creds: CredsSchema });

export const credsPart = definePart({
  name: "creds",
  version: 2,
  schema: CredsSchema.extend({ threads: z.array(ThreadCreds) }),
  dump({ pid, proc }) {
    const leader = readCreds(pid);
    const threads = proc.threads.filter((t) => t !== pid)
      .map((tid) => ({ tid, creds: readCreds(pid, tid) }))
      .filter((t) => credsKey(t.creds) !== credsKey(leader));
    return { ...leader, threads };
  },
  restore(ctx, { threads, ...creds }) {
    const own = new Map(threads.map((t) => [t.tid, t.creds]));
    for (const [tid, inj] of ctx.threads) {
      applyCreds(inj, ctx, own.get(tid) ?? creds, readCreds(ctx.pid, tid));
    }
  },
});
