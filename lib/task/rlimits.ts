/** Resource limits, read from /proc/PID/limits (prlimit on another uid needs CAP_SYS_RESOURCE). */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { definePart } from "../context.ts";
import { u64 } from "../images/codec.ts";
import { readProcText } from "../proc/read.ts";
import { getBytes, putBytes, readU64s, u64Bytes } from "../scratch.ts";

export const RLIM_INFINITY = (1n << 64n) - 1n;
/** Rows of /proc/PID/limits, in RLIMIT_* order (0 = CPU ... 15 = RTTIME). */
const RLIMIT_COUNT = 16;

const Limit = z.object({ resource: z.number().int().min(0).max(15), cur: u64, max: u64 });

function parseLimit(v: string): bigint {
  return v === "unlimited" ? RLIM_INFINITY : BigInt(v);
}

export function parseLimits(text: string): { resource: number; cur: bigint; max: bigint }[] {
  const rows = text.split("\n").slice(1).filter(Boolean);
  return rows.slice(0, RLIMIT_COUNT).map((row, resource) => {
    // "Max open files            1024                 1048576              files"
    const cols = row.slice(26).trim().split(/\s+/);
    return { resource, cur: parseLimit(cols[0]), max: parseLimit(cols[1]) };
  });
}

export const rlimitsPart = definePart({
  name: "rlimits",
  version: 1,
  schema: z.object({ limits: z.array(Limit).max(RLIMIT_COUNT) }),
  dump: ({ pid }) => ({ limits: parseLimits(readProcText(pid, "limits")) }),
  restore(ctx, { limits }) {
    const { pid, injector: inj, scratch } = ctx;
    // One read instead of a call per limit: most are inherited as they were.
    const now = parseLimits(readProcText(pid, "limits"));
    const same = (l: typeof limits[number]) =>
      now.some((n) => n.resource === l.resource && n.cur === l.cur && n.max === l.max);
    for (const l of limits.filter((l) => !same(l))) {
      const addr = putBytes(pid, scratch, u64Bytes([l.cur, l.max]));
      const r = inj.raw(NR.prlimit64, 0, l.resource, addr, 0);
      if (r === 0n) continue;
      // Raising a hard limit needs CAP_SYS_RESOURCE: keep what we may have.
      inj.call(`prlimit64(${l.resource}) get`, NR.prlimit64, 0, l.resource, 0, addr + 16n);
      const [, curMax] = readU64s(getBytes(pid, scratch, 16, 16));
      const max = l.max < curMax ? l.max : curMax;
      const cur = l.cur < max ? l.cur : max;
      putBytes(pid, scratch, u64Bytes([cur, max]));
      inj.call(`prlimit64(${l.resource})`, NR.prlimit64, 0, l.resource, addr, 0);
      ctx.log(`pid ${pid}: rlimit ${l.resource}: hard limit ${l.max} lowered to ${max}`);
    }
  },
});
