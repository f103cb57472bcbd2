/**
 * Credentials: uids, gids, groups, capabilities, securebits,
 * no_new_privs. Restored last, per thread (a raw setresuid changes only
 * the calling thread): the image holds the main thread's and those of the
 * threads whose credentials differ from it.
 */
import { z } from "zod";
import { type Injector, NR } from "../../ffi/inject.ts";
import { definePart } from "../context.ts";
import { PID_MAX, pidNumber, u64 } from "../images/codec.ts";
import { readStatus, statusHex, statusNumbers } from "../proc/status.ts";
import { putBytes } from "../scratch.ts";

const PR = {
  SET_KEEPCAPS: 8,
  GET_SECUREBITS: 27,
  SET_SECUREBITS: 28,
  CAPBSET_DROP: 24,
  SET_NO_NEW_PRIVS: 38,
  CAP_AMBIENT: 47,
} as const;
const CAP_AMBIENT_RAISE = 2;
const CAP_AMBIENT_CLEAR_ALL = 4;
const LINUX_CAPABILITY_VERSION_3 = 0x20080522;
const LAST_CAP = 40;
const CAP_SETPCAP = 8;
const SECBIT_NO_SETUID_FIXUP = 1 << 2;
const SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6;
/** Every SECBIT_*_LOCKED bit. */
const SECBIT_LOCKS = 0xaaa;

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
  /** PR_GET_SECUREBITS (of the main thread: every thread keeps that one). */
  securebits: z.number().int().min(0).default(0),
});
export type Creds = z.output<typeof CredsSchema>;

type StatusCreds = Omit<Creds, "securebits">;

/** Credentials of a thread that differ from the main thread's. */
const ThreadCreds = z.object({ tid: pidNumber, creds: CredsSchema });

export function readCreds(pid: number, tid?: number): StatusCreds {
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

const big = (_: string, v: unknown) => typeof v === "bigint" ? v.toString() : v;

function capBits(mask: bigint): number[] {
  const out = [];
  for (let c = 0; c <= LAST_CAP; c++) if (mask & (1n << BigInt(c))) out.push(c);
  return out;
}

type Where = { pid: number; scratch: { addr: bigint; size: number } };

function capset(inj: Injector, ctx: Where, eff: bigint, prm: bigint, inh: bigint): void {
  // struct __user_cap_header_struct + two __user_cap_data_struct (low, high words).
  const lo = (m: bigint) => Number(m & 0xffffffffn);
  const hi = (m: bigint) => Number(m >> 32n);
  const data = new Uint32Array([
    LINUX_CAPABILITY_VERSION_3,
    0,
    lo(eff),
    lo(prm),
    lo(inh),
    hi(eff),
    hi(prm),
    hi(inh),
  ]);
  const addr = putBytes(ctx.pid, ctx.scratch, new Uint8Array(data.buffer));
  inj.call("capset", NR.capset, addr, addr + 8n);
}

function setSecurebits(inj: Injector, bits: number): void {
  inj.call(
    `prctl(SET_SECUREBITS 0x${bits.toString(16)})`,
    NR.prctl,
    PR.SET_SECUREBITS,
    bits,
    0,
    0,
    0,
  );
}

/**
 * Applies creds to the thread behind `inj`, in the order the kernel allows.
 * Securebits need CAP_SETPCAP and may forbid the later steps, so they are
 * first set unlocked and without NO_CAP_AMBIENT_RAISE (with NO_SETUID_FIXUP,
 * so the uid change keeps every capability), and set exactly once the
 * capabilities are in place but CAP_SETPCAP is still held.
 */
function applyCreds(
  inj: Injector,
  ctx: Where,
  c: Creds,
  current: StatusCreds,
  securebits: number,
): void {
  const bitsChange = c.securebits !== securebits;
  if (bitsChange) {
    setSecurebits(
      inj,
      (c.securebits & ~(SECBIT_LOCKS | SECBIT_NO_CAP_AMBIENT_RAISE)) | SECBIT_NO_SETUID_FIXUP,
    );
  }
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
  const setpcap = bitsChange ? 1n << BigInt(CAP_SETPCAP) : 0n;
  if (uidChange || capChange || bitsChange) {
    capset(inj, ctx, c.capEff | setpcap, c.capPrm | setpcap, c.capInh);
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
  if (bitsChange) {
    setSecurebits(inj, c.securebits);
    if (~c.capEff & setpcap) capset(inj, ctx, c.capEff, c.capPrm, c.capInh);
  }
  if (c.noNewPrivs && !current.noNewPrivs) {
    inj.call("prctl(SET_NO_NEW_PRIVS)", NR.prctl, PR.SET_NO_NEW_PRIVS, 1, 0, 0, 0);
  }
}

export const credsPart = definePart({
  name: "creds",
  version: 2,
  schema: CredsSchema.extend({ threads: z.array(ThreadCreds).max(PID_MAX) }),
  dump({ pid, proc, injector }) {
    const main = readCreds(pid);
    const key = (t: StatusCreds) => JSON.stringify(t, big);
    const securebits = Number(injector.call("prctl(GET_SECUREBITS)", NR.prctl, PR.GET_SECUREBITS));
    const threads = proc.threads.filter((t) => t !== pid)
      .map((tid) => ({ tid, creds: readCreds(pid, tid) }))
      .filter((t) => key(t.creds) !== key(main))
      .map((t) => ({ tid: t.tid, creds: { ...t.creds, securebits } }));
    return { ...main, securebits, threads };
  },
  restore(ctx, { threads, ...creds }) {
    const own = new Map(threads.map((t) => [t.tid, t.creds]));
    // Every thread was cloned from the leader (threads part) with the creds it has now, so
    // one read tells all their securebits (not in /proc), before the leader's change.
    const bits = Number(ctx.injector.call("prctl(GET_SECUREBITS)", NR.prctl, PR.GET_SECUREBITS));
    for (const [tid, inj] of ctx.threads) {
      applyCreds(inj, ctx, own.get(tid) ?? creds, readCreds(ctx.pid, tid), bits);
    }
  },
});
