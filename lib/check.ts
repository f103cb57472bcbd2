/**
 * `amber check`: probes, by doing them, the kernel features dump and
 * restore rely on. Nothing here forks Deno: the probe target is a `sleep`
 * started through a shell, and clone3 is only called with arguments the
 * kernel rejects before it creates anything.
 */
import { LAZY_FEATURES } from "../ffi/uffd.ts";
import { addressOf, check, libc, rawSyscall, SysError } from "../ffi/libc.ts";
import * as pt from "../ffi/ptrace.ts";
import { NR } from "../ffi/inject.ts";
import { probeLock } from "./net/netlock.ts";
import { msgPeek, removeIpc } from "../ffi/sysvipc.ts";
import { readMemoryProc } from "../ffi/memory.ts";
import { readTimerList } from "./task/sleeps.ts";

/** One kernel feature, as {@link checkKernel} found it. */
export interface CheckFeature {
  /** What was probed, e.g. "clone3 set_tid". */
  name: string;
  /** It works here. */
  ok: boolean;
  /** dump or restore cannot work without it. */
  required: boolean;
  /** What was seen, or why it does not work. */
  detail: string;
  /** What amber does with it. */
  enables: string;
  /** What does not work here because it is missing (empty when it works). */
  missing: string;
}

/** What {@link checkKernel} found. */
export interface CheckReport {
  /** True when every required feature works. */
  ok: boolean;
  /** Each feature probed. */
  features: CheckFeature[];
}

type Feature = CheckFeature;
type Probed = Omit<Feature, "enables" | "missing">;

/** What each feature is for: what it enables, and what is lost without it. */
const PURPOSE: Record<string, { enables: string; without: string }> = {
  "root capabilities": {
    enables: "seizing any process and setting its pids, memory layout and credentials",
    without: "dump and restore",
  },
  "ptrace seize/interrupt/detach": {
    enables: "freezing a tree without signals, injecting syscalls",
    without: "dump and restore",
  },
  "process_vm_readv": { enables: "copying memory pages at dump", without: "dump" },
  "/proc/PID/pagemap present bits": {
    enables: "storing only the pages that exist",
    without: "dump",
  },
  "/proc/PID/map_files": { enables: "identifying file-backed mappings", without: "dump" },
  "/proc/PID/task/TID/children": { enables: "finding a tree's processes", without: "dump" },
  "PTRACE_GET_RSEQ_CONFIGURATION": {
    enables: "restartable sequences (glibc registers one per thread)",
    without: "dump of any glibc program",
  },
  "NT_X86_XSTATE": { enables: "FPU/AVX registers", without: "dump and restore" },
  "clone3 set_tid": { enables: "restoring processes with their own pids", without: "restore" },
  "PR_SET_MM_MAP": { enables: "restoring mm fields (brk, auxv, exe link)", without: "restore" },
  "/proc/sys/kernel/ns_last_pid": {
    enables: "nothing yet (clone3 set_tid is used instead)",
    without: "nothing",
  },
  "userfaultfd": {
    enables: "lazy restore (restore --lazy-pages) and write tracking (pre-dump)",
    without: "restore --lazy-pages and pre-dump",
  },
  "userfaultfd events": {
    enables: "lazy restore of processes that fork, mremap, munmap or MADV_DONTNEED meanwhile",
    without: "restore --lazy-pages",
  },
  "userfaultfd WP async": {
    enables: "incremental dumps by write tracking, once amber has them",
    without: "nothing amber does yet (pre-dump will need it)",
  },
  "PAGEMAP_SCAN": {
    enables: "fast scans of written pages for incremental dumps, once amber has them",
    without: "nothing amber does yet",
  },
  "kcmp": { enables: "finding descriptors processes share", without: "dump" },
  "TCP_REPAIR": {
    enables: "established TCP connections (--tcp-established)",
    without: "dump and restore of TCP connections",
  },
  "nftables": {
    enables: "the network lock of established TCP connections (CRIU's nftables lock)",
    without: "dump --tcp-established",
  },
  "SysV IPC ids and MSG_COPY": {
    enables: "SysV semaphores, queues and shared memory made again under their ids, queues copied",
    without: "dump and restore of SysV IPC objects",
  },
  "AIO ring mremap": {
    enables: "AIO contexts restored at their ring's address",
    without: "restore of AIO contexts",
  },
  "/proc/timer_list": {
    enables: "sleeps without a remaining-time buffer (usleep, poll) ending at their deadline",
    without: "nothing: such sleeps sleep their whole length again after restore",
  },
  "time namespaces": {
    enables: "monotonic clocks that go on from where they were, once amber has them",
    without: "nothing amber does yet (CLOCK_MONOTONIC jumps after restore)",
  },
};

/** A probe's result with what the feature is for. */
function described(f: Probed): Feature {
  const p = PURPOSE[f.name] ?? { enables: "", without: "" };
  return { ...f, enables: p.enables, missing: f.ok ? "" : p.without };
}

const SIGKILL = 9;
const CAP_SYS_PTRACE = 19;
const CAP_SYS_ADMIN = 21;
const CAP_CHECKPOINT_RESTORE = 40;
const PR_SET_MM = 35;
const PR_SET_MM_MAP_SIZE = 15;
const PRCTL_MM_MAP_SIZE = 104;
const KCMP_VM = 1;
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;
const UFFD_USER_MODE_ONLY = 1;
/** struct clone_args with set_tid and set_tid_size (CLONE_ARGS_SIZE_VER1). */
const CLONE_ARGS_SIZE_VER2 = 88;
const PM_PRESENT = 1n << 63n;
const PAGE = 4096n;

function why(e: unknown): string {
  if (e instanceof SysError) return e.message;
  return e instanceof Error ? e.message : String(e);
}

function errnoOf(e: unknown): string | undefined {
  return e instanceof SysError ? e.code : undefined;
}

function readText(path: string): string {
  return Deno.readTextFileSync(path);
}

/** Runs one probe; an exception is a failure whose detail is its message. */
function probe(name: string, required: boolean, fn: () => string): Probed {
  try {
    return { name, required, ok: true, detail: fn() };
  } catch (e) {
    return { name, required, ok: false, detail: why(e) };
  }
}

function capsProbe(): string {
  const status = readText("/proc/self/status");
  const field = (k: string) => new RegExp(`^${k}:\\s*(\\S+)`, "m").exec(status)?.[1] ?? "";
  const capEff = BigInt("0x" + (field("CapEff") || "0"));
  const uid = field("Uid");
  const has = (bit: number) => (capEff >> BigInt(bit)) & 1n ? true : false;
  const names = [
    has(CAP_SYS_ADMIN) && "CAP_SYS_ADMIN",
    has(CAP_CHECKPOINT_RESTORE) && "CAP_CHECKPOINT_RESTORE",
    has(CAP_SYS_PTRACE) && "CAP_SYS_PTRACE",
  ].filter(Boolean);
  const detail = `uid ${uid}, CapEff 0x${capEff.toString(16)}` +
    (names.length ? ` (${names.join(", ")})` : "");
  if (!has(CAP_SYS_ADMIN) && !has(CAP_CHECKPOINT_RESTORE)) {
    throw new Error(`${detail}: needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE`);
  }
  return detail;
}

/** clone3 exists: clone3(NULL, 0) is EINVAL (size below VER0) when it does. */
function clone3Probe(): string {
  try {
    rawSyscall("clone3(NULL, 0)", NR.clone3, 0, 0);
  } catch (e) {
    if (errnoOf(e) !== "EINVAL") throw e;
  }
  // set_tid: a non-null set_tid with set_tid_size 0 is EINVAL where set_tid
  // is known; older kernels see unknown non-zero trailing bytes: E2BIG.
  // exit_signal beyond CSIGNAL is invalid too, so nothing is ever created.
  const args = new BigUint64Array(CLONE_ARGS_SIZE_VER2 / 8);
  const tids = new Int32Array([1]);
  args[4] = 0x1000n; // exit_signal: invalid
  args[8] = addressOf(tids); // set_tid
  args[9] = 0n; // set_tid_size
  try {
    const r = rawSyscall("clone3(set_tid)", NR.clone3, addressOf(args), CLONE_ARGS_SIZE_VER2);
    throw new Error(`clone3 accepted invalid arguments (returned ${r})`);
  } catch (e) {
    if (errnoOf(e) === "EINVAL") return "clone3 with set_tid/set_tid_size accepted by the kernel";
    if (errnoOf(e) === "E2BIG") throw new Error("clone3: no set_tid support (E2BIG)");
    throw e;
  }
}

function mmMapProbe(): string {
  const size = new Uint32Array(1);
  check(
    "prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE)",
    libc().prctl(PR_SET_MM, BigInt(PR_SET_MM_MAP_SIZE), addressOf(size), 0n, 0n),
  );
  if (size[0] !== PRCTL_MM_MAP_SIZE) {
    throw new Error(`struct prctl_mm_map is ${size[0]} bytes, amber knows ${PRCTL_MM_MAP_SIZE}`);
  }
  return `struct prctl_mm_map ${size[0]} bytes`;
}

/** _IOWR(0xAA, 0x3F, struct uffdio_api): 24 bytes. */
const UFFDIO_API = 0xc018aa3fn;
const UFFD_API = 0xaan;
const UFFD_FEATURE_WP_ASYNC = 1n << 15n;
/** _IOWR('f', 16, struct pm_scan_arg): 96 bytes. */
const PAGEMAP_SCAN = 0xc0606610n;
const AF_INET = 2;
const SOCK_STREAM = 1;
const IPPROTO_TCP = 6;
const TCP_REPAIR = 19;

function withFd<T>(fd: bigint, fn: (fd: bigint) => T): T {
  try {
    return fn(fd);
  } finally {
    rawSyscall("close", NR.close, fd);
  }
}

/** UFFDIO_API with no features asked for reports those the kernel has. */
function uffdWpAsyncProbe(): string {
  const fd = rawSyscall("userfaultfd", NR.userfaultfd, O_CLOEXEC | O_NONBLOCK);
  return withFd(fd, () => {
    const api = new BigUint64Array([UFFD_API, 0n, 0n]);
    rawSyscall("ioctl(UFFDIO_API)", NR.ioctl, fd, UFFDIO_API, addressOf(api));
    if (!(api[1] & UFFD_FEATURE_WP_ASYNC)) {
      throw new Error(`features 0x${api[1].toString(16)}: no UFFD_FEATURE_WP_ASYNC (Linux 6.7+)`);
    }
    return `features 0x${api[1].toString(16)}`;
  });
}

/** The non-cooperative events lazy restore asks for (lib/mm/lazy.ts). */
function uffdEventsProbe(): string {
  const fd = rawSyscall("userfaultfd", NR.userfaultfd, O_CLOEXEC | O_NONBLOCK);
  return withFd(fd, () => {
    const api = new BigUint64Array([UFFD_API, 0n, 0n]);
    rawSyscall("ioctl(UFFDIO_API)", NR.ioctl, fd, UFFDIO_API, addressOf(api));
    const lacking = LAZY_FEATURES & ~api[1];
    if (lacking) {
      throw new Error(`features 0x${api[1].toString(16)}: lacks 0x${lacking.toString(16)}`);
    }
    return "fork, remap, remove and unmap events";
  });
}

/**
 * PAGEMAP_SCAN exists when the pagemap ioctl does: a kernel without it
 * answers ENOTTY; one with it checks the (here empty) arguments.
 */
function pagemapScanProbe(): string {
  const path = new TextEncoder().encode("/proc/self/pagemap\0");
  const fd = rawSyscall("open(/proc/self/pagemap)", NR.open, addressOf(path), O_CLOEXEC);
  return withFd(fd, () => {
    const arg = new BigUint64Array(12);
    arg[0] = 96n; // size
    try {
      rawSyscall("ioctl(PAGEMAP_SCAN)", NR.ioctl, fd, PAGEMAP_SCAN, addressOf(arg));
    } catch (e) {
      if (errnoOf(e) === "ENOTTY") throw new Error("no PAGEMAP_SCAN ioctl (Linux 6.7+)");
      if (errnoOf(e) !== "EINVAL") throw e;
    }
    return "the pagemap ioctl answers";
  });
}

function tcpRepairProbe(): string {
  const fd = rawSyscall("socket(AF_INET, SOCK_STREAM)", NR.socket, AF_INET, SOCK_STREAM, 0);
  return withFd(fd, () => {
    const one = new Int32Array([1]);
    rawSyscall(
      "setsockopt(TCP_REPAIR)",
      NR.setsockopt,
      fd,
      IPPROTO_TCP,
      TCP_REPAIR,
      addressOf(one),
      4,
    );
    return "a socket can enter repair mode";
  });
}

function timeNsProbe(): string {
  return `${Deno.readLinkSync("/proc/self/ns/time")}`;
}

function userfaultfdProbe(): string {
  let fd: bigint;
  let note = "";
  try {
    fd = rawSyscall("userfaultfd", NR.userfaultfd, O_CLOEXEC | O_NONBLOCK);
  } catch (e) {
    if (errnoOf(e) !== "EPERM") throw e;
    // vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE: user-mode only works.
    try {
      fd = rawSyscall("userfaultfd", NR.userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
      note = " (user-mode faults only)";
    } catch (e2) {
      if (errnoOf(e2) === "EPERM") return "exists, but EPERM for this user";
      throw e2;
    }
  }
  rawSyscall("close", NR.close, fd);
  return "available" + note;
}

function kcmpProbe(): string {
  const r = rawSyscall("kcmp", NR.kcmp, Deno.pid, Deno.pid, KCMP_VM, 0, 0);
  if (r !== 0n) throw new Error(`kcmp(self, self, KCMP_VM) returned ${r}, expected 0`);
  return "available";
}

/** *_next_id files, and a message copied out of a queue of amber's own without taking it. */
function sysvProbe(): string {
  for (const k of ["sem", "msg", "shm"]) readText(`/proc/sys/kernel/${k}_next_id`);
  const IPC_CREAT = 0o1000;
  const q = Number(rawSyscall("msgget", NR.msgget, 0, IPC_CREAT | 0o600));
  try {
    const msg = new Uint8Array(9);
    msg[0] = 7;
    msg[8] = 42;
    rawSyscall("msgsnd", NR.msgsnd, q, addressOf(msg), 1, 0o4000);
    const got = msgPeek(q, 0, 1);
    if (got.type !== 7n || got.data[0] !== 42) throw new Error("MSG_COPY returned another message");
    return "available";
  } finally {
    removeIpc("msg", q);
  }
}

/** An io_setup ring of amber's own, moved by mremap and still found by io_getevents. */
function aioProbe(): string {
  const idBuf = new BigUint64Array(1);
  rawSyscall("io_setup", NR.io_setup, 1, addressOf(idBuf));
  let id = idBuf[0];
  try {
    const nr = new DataView(readMemoryProc(Deno.pid, id, 8).buffer).getUint32(4, true);
    const size = BigInt(Math.ceil((32 + nr * 32) / 4096) * 4096);
    // A hole reserved, then the ring moved over it.
    const hole = rawSyscall("mmap", NR.mmap, 0, size, 0, 0x22, -1, 0);
    id = rawSyscall("mremap", NR.mremap, id, size, size, 3, hole);
    rawSyscall("io_getevents", NR.io_getevents, id, 0, 0, 0, 0);
    return "available";
  } finally {
    rawSyscall("io_destroy", NR.io_destroy, id);
  }
}

function nsLastPidProbe(): string {
  const v = readText("/proc/sys/kernel/ns_last_pid").trim();
  return `present (last pid ${v})`;
}

/** A `sleep 10` that is not Deno's child (Deno reaps its own children itself). */
function startTarget(): number {
  const out = new Deno.Command("sh", {
    args: ["-c", "sleep 10 </dev/null >/dev/null 2>&1 & echo $!"],
    stdin: "null",
    stdout: "piped",
    stderr: "null",
  }).outputSync();
  const pid = Number(new TextDecoder().decode(out.stdout).trim());
  if (!out.success || !Number.isInteger(pid) || pid <= 0) {
    throw new Error("could not start `sleep 10` as a probe target");
  }
  // The shell may still be between fork and exec: wait for sleep itself.
  for (let i = 0; i < 200; i++) {
    try {
      if (readText(`/proc/${pid}/comm`).trim() === "sleep") return pid;
    } catch { /* not yet */ }
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 5); // sleep 5 ms
  }
  libc().kill(pid, SIGKILL);
  throw new Error(`probe target ${pid} did not start sleep`);
}

/** Seizes and interrupts `pid`, waiting for the PTRACE_EVENT_STOP. */
function freeze(pid: number): void {
  pt.seize(pid);
  pt.interrupt(pid);
  for (;;) {
    const st = pt.waitpid(pid);
    if (!st || !st.stopped) {
      throw new Error(`probe target exited (status 0x${st?.raw.toString(16)})`);
    }
    if (st.event === pt.PTRACE_EVENT.STOP) return;
    pt.cont(pid, st.event ? 0 : st.stopSignal);
  }
}

function stackOf(pid: number): { start: bigint; end: bigint } {
  const line = readText(`/proc/${pid}/maps`).split("\n").find((l) => l.endsWith("[stack]"));
  const m = line && /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
  if (!m) throw new Error(`/proc/${pid}/maps: no [stack]`);
  return { start: BigInt("0x" + m[1]), end: BigInt("0x" + m[2]) };
}

function vmReadvProbe(pid: number): string {
  const { end } = stackOf(pid);
  const len = 64;
  const buf = new Uint8Array(len);
  const local = new BigUint64Array([addressOf(buf), BigInt(len)]);
  const remote = new BigUint64Array([end - BigInt(len), BigInt(len)]);
  const n = check("process_vm_readv", libc().process_vm_readv(pid, local, 1n, remote, 1n, 0n));
  if (n !== BigInt(len)) throw new Error(`process_vm_readv: read ${n} of ${len} bytes`);
  if (buf.every((b) => b === 0)) {
    throw new Error("process_vm_readv: top of the stack reads as zeros");
  }
  return `read ${len} bytes of the target's stack`;
}

function pagemapProbe(pid: number): string {
  const { end } = stackOf(pid);
  const page = (end - PAGE) / PAGE;
  using f = Deno.openSync(`/proc/${pid}/pagemap`, { read: true });
  f.seekSync(Number(page * 8n), Deno.SeekMode.Start);
  const entry = new BigUint64Array(1);
  const bytes = new Uint8Array(entry.buffer);
  if (f.readSync(bytes) !== 8) throw new Error("pagemap: short read");
  if (!(entry[0] & PM_PRESENT)) throw new Error("pagemap: top stack page not reported present");
  return "present bits readable";
}

function mapFilesProbe(pid: number): string {
  const dir = `/proc/${pid}/map_files`;
  let n = 0;
  let opened = "";
  for (const e of Deno.readDirSync(dir)) {
    n++;
    if (!opened) {
      const target = Deno.readLinkSync(`${dir}/${e.name}`);
      Deno.statSync(`${dir}/${e.name}`);
      opened = target;
    }
  }
  if (!n) throw new Error(`${dir}: empty`);
  return `${n} entries, opened ${opened}`;
}

function childrenProbe(pid: number): string {
  const ppid = Number(/^\d+ \(.*\) \S (\d+)/s.exec(readText(`/proc/${pid}/stat`))?.[1]);
  for (const t of Deno.readDirSync(`/proc/${ppid}/task`)) {
    const list = readText(`/proc/${ppid}/task/${t.name}/children`).split(/\s+/);
    if (list.includes(String(pid))) return `lists ${pid} under its parent ${ppid}`;
  }
  throw new Error(`/proc/${ppid}/task/*/children does not list its child ${pid}`);
}

function rseqProbe(pid: number): string {
  const c = pt.getRseqConfig(pid);
  return c.address
    ? `registered at 0x${c.address.toString(16)}, ${c.length} bytes, signature 0x${
      c.signature.toString(16)
    }`
    : "works (target has no rseq registered)";
}

function xstateProbe(pid: number): string {
  const n = pt.getRegset(pid, pt.NT_X86_XSTATE, 64 * 1024).length;
  if (n < 512) throw new Error(`xstate is ${n} bytes`);
  return `${n} bytes`;
}

/** Probes that need a live, ptrace-stopped target. */
function targetProbes(): Probed[] {
  const names: [string, boolean, (pid: number) => string][] = [
    ["process_vm_readv", true, vmReadvProbe],
    ["/proc/PID/pagemap present bits", true, pagemapProbe],
    ["/proc/PID/map_files", true, mapFilesProbe],
    ["/proc/PID/task/TID/children", true, childrenProbe],
    ["PTRACE_GET_RSEQ_CONFIGURATION", true, rseqProbe],
    ["NT_X86_XSTATE", true, xstateProbe],
  ];
  const ptraceName = "ptrace seize/interrupt/detach";
  let pid: number;
  try {
    pid = startTarget();
  } catch (e) {
    return [
      { name: ptraceName, required: true, ok: false, detail: why(e) },
      ...names.map(([name, required]) => ({
        name,
        required,
        ok: false,
        detail: "no probe target",
      })),
    ];
  }
  let attached = false;
  const out: Probed[] = [];
  try {
    let ptraceOk: Probed;
    try {
      freeze(pid);
      attached = true;
      ptraceOk = { name: ptraceName, required: true, ok: true, detail: `stopped sleep ${pid}` };
    } catch (e) {
      ptraceOk = { name: ptraceName, required: true, ok: false, detail: why(e) };
    }
    out.push(ptraceOk);
    for (const [name, required, fn] of names) {
      if (!attached && (name.startsWith("PTRACE") || name.startsWith("NT_"))) {
        out.push({ name, required, ok: false, detail: "needs ptrace" });
        continue;
      }
      out.push(probe(name, required, () => fn(pid)));
    }
    if (attached) {
      try {
        pt.detach(pid);
        attached = false;
      } catch (e) {
        ptraceOk.ok = false;
        ptraceOk.detail = why(e);
      }
    }
  } finally {
    libc().kill(pid, SIGKILL);
    // As tracer, collect the exit; when amber is the parent (a subreaper)
    // this also reaps it, else its parent (init) does.
    let reap = attached;
    try {
      reap ||= Number(/^\d+ \(.*\) \S (\d+)/s.exec(readText(`/proc/${pid}/stat`))?.[1]) ===
        Deno.pid;
    } catch { /* already gone */ }
    if (reap) {
      try {
        pt.waitpid(pid);
      } catch { /* already reaped */ }
    }
  }
  return out;
}

function timerListProbe(): string {
  return `${readTimerList().wakeups.size} sleepers' timers`;
}

/** Probes every kernel feature amber needs; `ok` when all required ones work. */
export function checkKernel(): CheckReport {
  const features: Feature[] = [
    probe("root capabilities", true, capsProbe),
    ...targetProbes(),
    probe("clone3 set_tid", true, clone3Probe),
    probe("PR_SET_MM_MAP", true, mmMapProbe),
    probe("/proc/sys/kernel/ns_last_pid", false, nsLastPidProbe),
    probe("userfaultfd", false, userfaultfdProbe),
    probe("userfaultfd WP async", false, uffdWpAsyncProbe),
    probe("userfaultfd events", false, uffdEventsProbe),
    probe("PAGEMAP_SCAN", false, pagemapScanProbe),
    // Dump finds descriptors that processes share with kcmp(KCMP_FILE).
    probe("kcmp", true, kcmpProbe),
    probe("TCP_REPAIR", false, tcpRepairProbe),
    // Established TCP connections are dumped under an nftables lock.
    probe("nftables", false, probeLock),
    probe("SysV IPC ids and MSG_COPY", false, sysvProbe),
    probe("AIO ring mremap", false, aioProbe),
    probe("time namespaces", false, timeNsProbe),
    probe("/proc/timer_list", false, timerListProbe),
  ].map(described);
  return { ok: features.every((f) => f.ok || !f.required), features };
}

/** One line per feature ("ok", "FAIL", or "warn" for optional ones) and a verdict. */
export function formatCheckReport(r: CheckReport): string {
  const lines = r.features.flatMap((f) => {
    const tag = f.ok ? "ok" : f.required ? "FAIL" : "warn";
    const head = `${tag.padEnd(6)}${f.name}${f.detail ? `: ${f.detail}` : ""}${
      !f.ok && !f.required ? " (optional)" : ""
    }`;
    return [
      head,
      ...(f.enables ? [`      for: ${f.enables}`] : []),
      ...(f.missing ? [`      missing here: ${f.missing}`] : []),
    ];
  });
  const failed = r.features.filter((f) => !f.ok && f.required).map((f) => f.name);
  lines.push(
    r.ok
      ? "amber can dump and restore here"
      : `amber cannot dump and restore here (missing: ${failed.join(", ")})`,
  );
  return lines.join("\n");
}
