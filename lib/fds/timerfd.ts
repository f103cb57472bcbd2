/**
 * timerfd: clock, interval, time left and expirations not yet read, from
 * fdinfo. Restored like CRIU does: the time left counts from the restore
 * (a TFD_TIMER_ABSTIME timer gets "now + time left" on its clock), and
 * the unread expirations are put back with TFD_IOC_SET_TICKS.
 */
import { z } from "zod";
import { NR } from "../../ffi/inject.ts";
import { AmberError } from "../errors.ts";
import { u64 } from "../images/codec.ts";
import { readProcText } from "../proc/read.ts";
import { getBytes, putBytes, u64Bytes } from "../scratch.ts";
import { defineFdKind, O_CLOEXEC } from "./kind.ts";

const O_NONBLOCK = 0o4000;
const TFD_TIMER_ABSTIME = 1;
/** _IOW('T', 0, u64) */
const TFD_IOC_SET_TICKS = 0x40085400;
const NS = 1_000_000_000n;

const Timespec = z.object({ sec: u64, nsec: u64 });

/** "(12, 345)" → seconds and nanoseconds. */
function pair(info: string, name: string): { sec: bigint; nsec: bigint } {
  const m = new RegExp(`^${name}:\\s*\\((\\d+),\\s*(\\d+)\\)`, "m").exec(info);
  if (!m) throw new AmberError(`fdinfo shows no ${name}`);
  return { sec: BigInt(m[1]), nsec: BigInt(m[2]) };
}

function num(info: string, name: string, radix = 10): number {
  const m = new RegExp(`^${name}:\\s*(\\d+)`, "m").exec(info);
  if (!m) throw new AmberError(`fdinfo shows no ${name}`);
  return parseInt(m[1], radix);
}

export const timerFd = defineFdKind({
  name: "timerfd",
  schema: z.object({
    kind: z.literal("timerfd"),
    fd: z.number().int().min(0),
    flags: z.number().int().min(0),
    clockid: z.number().int().min(0),
    ticks: u64,
    settimeFlags: z.number().int().min(0),
    value: Timespec,
    interval: Timespec,
  }),
  matches: (p) => p.link === "anon_inode:[timerfd]",
  dump(p) {
    const info = readProcText(p.pid, `fdinfo/${p.fd}`);
    return {
      kind: "timerfd" as const,
      fd: p.fd,
      flags: p.flags,
      clockid: num(info, "clockid"),
      ticks: BigInt(num(info, "ticks")),
      settimeFlags: num(info, "settime flags", 8),
      value: pair(info, "it_value"),
      interval: pair(info, "it_interval"),
    };
  },
  restore(ctx, e) {
    const inj = ctx.injector;
    const flags = (e.flags & O_NONBLOCK) | O_CLOEXEC;
    const fd = Number(inj.call("timerfd_create", NR.timerfd_create, e.clockid, flags));
    let { sec, nsec } = e.value;
    // A periodic timer that expired and was not read yet shows no time
    // left (the kernel re-arms it on read): it goes on one interval from now.
    const expired = !sec && !nsec && e.ticks > 0n;
    if (expired) ({ sec, nsec } = e.interval);
    if (sec || nsec) {
      if (e.settimeFlags & TFD_TIMER_ABSTIME) {
        const at = putBytes(ctx.pid, ctx.scratch, new Uint8Array(16));
        inj.call("clock_gettime", NR.clock_gettime, e.clockid, at);
        const [nowSec, nowNsec] = new BigUint64Array(
          getBytes(ctx.pid, ctx.scratch, 16).slice().buffer,
        );
        const total = (sec + nowSec) * NS + nsec + nowNsec;
        sec = total / NS;
        nsec = total % NS;
      }
      const spec = u64Bytes([e.interval.sec, e.interval.nsec, sec, nsec]);
      const at = putBytes(ctx.pid, ctx.scratch, spec);
      inj.call("timerfd_settime", NR.timerfd_settime, fd, e.settimeFlags, at, 0);
    }
    if (e.ticks) {
      const at = putBytes(ctx.pid, ctx.scratch, u64Bytes([e.ticks]));
      inj.call("ioctl(TFD_IOC_SET_TICKS)", NR.ioctl, fd, TFD_IOC_SET_TICKS, at);
    }
    return fd;
  },
});
