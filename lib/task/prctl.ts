/**
 * prctl-style task attributes, read and set by syscalls injected into the
 * process (there is no way to read most of them from outside): per thread
 * pdeath signal, timer slack, personality, TSC mode, machine-check kill
 * policy, speculation controls, I/O flusher, NUMA policy; per process
 * child subreaper, dumpable, THP disable, membarrier registrations, KSM
 * merge-all and memory-deny-write-execute. Restored after creds, since a credential
 * change resets the pdeath signal and dumpable.
 */
import { z } from "zod";
import { Injector, NR } from "../../ffi/inject.ts";
import { SysError } from "../../ffi/libc.ts";
import { type BatchRun, batchTableBytes, type Syscall, withBatch } from "../batch.ts";
import { definePart, type Scratch } from "../context.ts";
import { AmberError, withContext } from "../errors.ts";
import { pidNumber, u64 } from "../images/codec.ts";
import { readStat } from "../proc/stat.ts";
import { getBytes } from "../scratch.ts";

const MEMBARRIER_CMD_GET_REGISTRATIONS = 1 << 9;
/** REGISTER_GLOBAL_EXPEDITED, _PRIVATE_EXPEDITED, _SYNC_CORE, _RSEQ. */
const MEMBARRIER_REGISTER_CMDS = [1 << 2, 1 << 4, 1 << 6, 1 << 8];
const EINVAL = -22n, EPERM = -1n;
/** PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE: what PR_SET_IO_FLUSHER sets. */
const PF_IO_FLUSHER = 0x00080000n | 0x00100000n;

/** Where an attribute's syscalls run: the thread, and scratch memory for pointer results. */
export interface Target {
  pid: number;
  inj: Injector;
  scratch: Scratch;
}

/**
 * How an attribute is read: one syscall, so many can go in one batch
 * (lib/batch.ts). `out` is scratch memory the call may store an int at.
 */
interface Query {
  call(out: bigint): Syscall;
  /** The call stores its result as an int at `out` rather than returning it. */
  stores?: boolean;
  /** The value from the call's result `r` (-errno) and the int at `out`; undefined: cannot tell. */
  value(r: bigint, stored: number, t: Target): bigint | undefined;
}

interface Attr extends Query {
  name: string;
  scope: "thread" | "process";
  set(t: Target, v: bigint): void;
  /** Why a value cannot be restored, if it cannot. */
  refuse?(v: bigint): string | undefined;
}

/** `r`, or the call `what`'s error if it failed. */
function must(what: string, r: bigint): bigint {
  if (r < 0n && r > -4096n) throw new SysError(what, Number(-r));
  return r;
}

/** Reads one attribute with its own injected call. */
function getOne(a: Query, t: Target): bigint | undefined {
  const r = t.inj.raw(...a.call(t.scratch.addr));
  return a.value(r, a.stores ? readInt(t, 0) : 0, t);
}

function readInt(t: Target, offset: number): number {
  const b = getBytes(t.pid, t.scratch, 4, offset);
  return new DataView(b.buffer, b.byteOffset).getInt32(0, true);
}

function prctl(t: Target, what: string, ...args: (number | bigint)[]): bigint {
  return t.inj.call(`prctl(${what})`, NR.prctl, ...args);
}

/** A prctl GET whose result is its return value, and the SET that takes it as arg2. */
function returned(name: string, scope: Attr["scope"], get: number, set: number): Attr {
  return {
    name,
    scope,
    call: () => [NR.prctl, get, 0, 0, 0, 0],
    value: (r) => must(`prctl(${get})`, r),
    set: (t, v) => void prctl(t, `${set}`, set, v, 0, 0, 0),
  };
}

/** A prctl GET that stores an int at arg2, and the SET that takes it as arg2. */
function pointed(name: string, scope: Attr["scope"], get: number, set: number): Attr {
  return {
    name,
    scope,
    call: (out) => [NR.prctl, get, out, 0, 0, 0],
    stores: true,
    value: (r, stored) => (must(`prctl(${get})`, r), BigInt(stored)),
    set: (t, v) => void prctl(t, `${set}`, set, v, 0, 0, 0),
  };
}

/** Refused unless `normal` (setting the I/O flusher or KSM flags needs CAP_SYS_RESOURCE). */
function notYet(attr: Attr, normal: bigint): Attr {
  return {
    ...attr,
    refuse: (v) => v === normal ? undefined : `${attr.name} ${v}: not supported yet`,
  };
}

/** PR_{GET,SET}_SPECULATION_CTRL for one misfeature: PR_SPEC_* state bits. */
function speculation(name: string, which: number): Attr {
  const PR_SPEC_PRCTL = 1n, ENABLE = 2n, DISABLE = 4n, FORCE_DISABLE = 8n, DISABLE_NOEXEC = 16n;
  return {
    name,
    scope: "thread",
    call: () => [NR.prctl, 52, which, 0, 0, 0],
    // Not on this CPU or kernel (EINVAL, ENODEV...): nothing to keep.
    value: (r) => r < 0n ? undefined : r,
    set(t, v) {
      const now = getOne(this, t);
      if (now === undefined || (now & ~PR_SPEC_PRCTL) === (v & ~PR_SPEC_PRCTL)) return;
      const ctrl = [FORCE_DISABLE, DISABLE_NOEXEC, DISABLE, ENABLE].find((b) => v & b);
      if (ctrl === undefined || !(now & PR_SPEC_PRCTL)) {
        throw new AmberError(`${name}: state 0x${v.toString(16)} cannot be set on this kernel`);
      }
      prctl(t, "SET_SPECULATION_CTRL", 53, which, ctrl, 0, 0);
    },
  };
}

const ATTRS: Attr[] = [
  pointed("pdeath signal", "thread", 2, 1),
  returned("timer slack", "thread", 30, 29),
  {
    name: "personality",
    scope: "thread",
    call: () => [NR.personality, 0xffffffff],
    value: (r) => must("personality", r),
    set: (t, v) => void t.inj.call("personality", NR.personality, v),
  },
  pointed("TSC mode", "thread", 25, 26),
  {
    name: "machine-check kill policy",
    scope: "thread",
    call: () => [NR.prctl, 34, 0, 0, 0, 0],
    value: (r) => must("prctl(MCE_KILL_GET)", r),
    // PR_MCE_KILL_DEFAULT (2) is undone with PR_MCE_KILL_CLEAR, the others set with _SET.
    set: (t, v) => void prctl(t, "MCE_KILL", 33, v === 2n ? 0 : 1, v === 2n ? 0 : v, 0, 0),
  },
  notYet({
    name: "NUMA memory policy",
    scope: "thread",
    call: (out) => [NR.get_mempolicy, out, 0, 0, 0, 0],
    stores: true,
    value: (r, stored) => (must("get_mempolicy", r), BigInt(stored)),
    set() {},
  }, 0n),
  speculation("speculative store bypass", 0),
  speculation("indirect branch speculation", 1),
  speculation("L1D flush", 2),
  pointed("child subreaper", "process", 37, 36),
  {
    ...returned("dumpable", "process", 3, 4),
    // 2 (SUID_DUMP_ROOT) is set only by the kernel, on exec of a setuid program.
    refuse: (v) => v > 1n ? `dumpable ${v} (set by a setuid exec): not supported yet` : undefined,
  },
  {
    name: "THP disable",
    scope: "process",
    call: () => [NR.prctl, 42, 0, 0, 0, 0],
    value: (r) => must("prctl(GET_THP_DISABLE)", r),
    // Bit 0: disabled; the other bits are the PR_THP_DISABLE_* flags of arg3.
    set: (t, v) => void prctl(t, "SET_THP_DISABLE", 41, v & 1n, v & ~1n, 0, 0),
  },
  {
    name: "membarrier registrations",
    scope: "process",
    call: () => [NR.membarrier, MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0],
    value(r) {
      // Kernels before 6.3 cannot tell (EINVAL): nothing to compare then.
      if (r === EINVAL) return undefined;
      if (r < 0n) throw new AmberError(`membarrier(GET_REGISTRATIONS): errno ${-r}`);
      return r;
    },
    set(t, v) {
      for (const cmd of MEMBARRIER_REGISTER_CMDS) {
        if (v & BigInt(cmd)) {
          t.inj.call(`membarrier(register 0x${cmd.toString(16)})`, NR.membarrier, cmd, 0, 0);
        }
      }
    },
    refuse(v) {
      const known = MEMBARRIER_REGISTER_CMDS.reduce((m, c) => m | BigInt(c), 0n);
      if (v & ~known) return `membarrier registrations 0x${v.toString(16)}: not supported yet`;
    },
  },
  notYet({
    ...returned("I/O flusher", "thread", 58, 57),
    value(r, _, t) {
      if (r >= 0n) return r;
      if (r !== EPERM) throw new AmberError(`prctl(GET_IO_FLUSHER): errno ${-r}`);
      // Reading it needs CAP_SYS_RESOURCE too: see the task flags it stands for.
      const flags = BigInt(readStat(t.pid, t.inj.tid).flags);
      return (flags & PF_IO_FLUSHER) === PF_IO_FLUSHER ? 1n : 0n;
    },
  }, 0n),
  notYet(returned("KSM merge-all", "process", 68, 67), 0n),
  // Last: once set, memory-deny-write-execute forbids making memory executable.
  returned("memory-deny-write-execute", "process", 66, 65),
];

const Values = z.record(z.string(), u64);

/** The attributes of `scope`, in table order. */
const inScope = (scope: Attr["scope"]) => ATTRS.filter((a) => a.scope === scope);

/**
 * The current values of `attrs` (undefined where the kernel cannot tell),
 * all asked in one batch when `run` is given, else one call each.
 */
function readValues(t: Target, attrs: Attr[], run?: BatchRun): (bigint | undefined)[] {
  if (!run) return attrs.map((a) => withContext(a.name, () => getOne(a, t)));
  const base = batchTableBytes(attrs.length);
  const results = run(callsOf(attrs, t.scratch.addr + BigInt(base)));
  return valuesOf(attrs, t, results, getBytes(t.pid, t.scratch, 4 * attrs.length, base));
}

/** The batch entries asking `attrs`, the ints they store going to `at` (4 bytes each). */
function callsOf(attrs: Attr[], at: bigint): Syscall[] {
  return attrs.map((a, i) => a.call(at + BigInt(4 * i)));
}

/** The values of `attrs` from their calls' `results` and the ints they stored. */
function valuesOf(
  attrs: Attr[],
  t: Target,
  results: bigint[],
  stored: Uint8Array,
): (bigint | undefined)[] {
  const ints = new DataView(stored.buffer, stored.byteOffset, stored.length);
  return attrs.map((a, i) =>
    withContext(a.name, () => a.value(results[i], a.stores ? ints.getInt32(4 * i, true) : 0, t))
  );
}

/**
 * A thread's attributes asked inside another part's batch on that thread
 * (threads: one visit a thread for both parts, not two): the calls, their
 * ints stored at `at`, and the values from the calls' results and those
 * `bytes` bytes. prctl's dump takes them from ctx.threadAttrs.
 */
export function threadAttrQuery(at: bigint) {
  const attrs = inScope("thread");
  return {
    calls: callsOf(attrs, at),
    bytes: 4 * attrs.length,
    values(t: Target, results: bigint[], stored: Uint8Array): Record<string, bigint> {
      const values = valuesOf(attrs, t, results, stored);
      const out: Record<string, bigint> = {};
      attrs.forEach((a, i) => {
        if (values[i] !== undefined) out[a.name] = values[i];
      });
      return out;
    },
  };
}

/** The values of `scopes`' attributes (those the kernel can tell), one record per scope. */
function readScopes(
  t: Target,
  scopes: Attr["scope"][],
  run?: BatchRun,
): Record<string, bigint>[] {
  const attrs = scopes.flatMap(inScope);
  const values = readValues(t, attrs, run);
  const out = scopes.map(() => ({} as Record<string, bigint>));
  attrs.forEach((a, i) => {
    if (values[i] !== undefined) out[scopes.indexOf(a.scope)][a.name] = values[i];
  });
  return out;
}

function readAttrs(t: Target, scope: Attr["scope"], run?: BatchRun): Record<string, bigint> {
  return readScopes(t, [scope], run)[0];
}

/** Sets what differs from the thread's current values `now` (readAttrs), in table order. */
function applyAttrs(
  t: Target,
  scope: Attr["scope"],
  want: Record<string, bigint>,
  now: Record<string, bigint>,
): void {
  for (const a of inScope(scope)) {
    const v = want[a.name];
    if (v === undefined) continue;
    withContext(`${a.name} ${v}`, () => {
      if (now[a.name] !== v) a.set(t, v);
    });
  }
}

/** Runs fn with an injector on thread `tid` (the part's own for the leader). */
function onThread<T>(pid: number, tid: number, leader: Injector, fn: (inj: Injector) => T): T {
  if (tid === pid) return fn(leader);
  const inj = new Injector(tid, leader.syscallAddr, { restAtTrap: true });
  try {
    return fn(inj);
  } finally {
    inj.end();
  }
}

function refusal(values: Record<string, bigint>): string | undefined {
  for (const a of ATTRS) {
    const v = values[a.name];
    const why = v === undefined ? undefined : a.refuse?.(v);
    if (why) return why;
  }
}

export const prctlPart = definePart({
  name: "prctl",
  version: 1,
  schema: z.object({
    process: Values,
    threads: z.array(z.object({ tid: pidNumber, values: Values })).min(1),
  }),
  dump(ctx) {
    const { pid, proc, injector, scratch } = ctx;
    // ~16 calls a thread: one batch each instead of two stops a call.
    return withBatch(ctx, (run, batchOn) => {
      // The process's attributes and its leader's in one batch.
      const leader = { pid, inj: injector, scratch };
      const [process, own] = readScopes(leader, ["process", "thread"], run);
      const threads = proc.threads.map((tid) =>
        withContext(`tid ${tid}`, () => ({
          tid,
          // (Another thread's were asked by threads, in its batch there, where it could batch.)
          values: tid === pid ? own : ctx.threadAttrs?.get(tid) ??
            onThread(pid, tid, injector, (inj) =>
              readAttrs({ pid, inj, scratch }, "thread", batchOn?.(inj))),
        }))
      );
      return { process, threads };
    });
  },
  unrestorable({ process, threads }) {
    const why = refusal(process);
    if (why) return why;
    for (const t of threads) {
      const w = refusal(t.values);
      if (w) return `tid ${t.tid}: ${w}`;
    }
  },
  restore(ctx, { process, threads }) {
    const { pid, scratch } = ctx;
    const injectors = threads.map((t) => {
      const inj = ctx.threads.get(t.tid);
      if (!inj) throw new AmberError(`tid ${t.tid}: thread not created`);
      return inj;
    });
    // Every current value first, in batches; then one call per value that differs.
    const [nowThreads, nowProcess] = withBatch(ctx, (run, batchOn) => [
      threads.map((t, i) =>
        withContext(
          `tid ${t.tid}`,
          () => readAttrs({ pid, inj: injectors[i], scratch }, "thread", batchOn?.(injectors[i])),
        )
      ),
      readAttrs({ pid, inj: ctx.injector, scratch }, "process", run),
    ]);
    threads.forEach((t, i) =>
      withContext(
        `tid ${t.tid}`,
        () => applyAttrs({ pid, inj: injectors[i], scratch }, "thread", t.values, nowThreads[i]),
      )
    );
    applyAttrs({ pid, inj: ctx.injector, scratch }, "process", process, nowProcess);
  },
});
