"""Sets many per-process and per-thread attributes to non-default values,
then checks them itself whenever the file CHECK appears (after a restore):
writes "PASS" or "FAIL what..." to OUT, one line per check.

usage: attrs.py OUT CHECK [UID]
With UID, it then runs as that user (keeping its capabilities, as
SECBIT_NO_SETUID_FIXUP allows).
First line of OUT: "ready <json of what was set>" (what the kernel refused
to set here is left out, so the test knows what to expect).
"""
import ctypes, json, mmap, os, signal, sys, threading, time

OUT, CHECK = sys.argv[1], sys.argv[2]
UID = int(sys.argv[3]) if len(sys.argv) > 3 else None
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.prctl.restype = ctypes.c_int
UL = ctypes.c_ulong


def prctl(*args):
    a = [UL(x) for x in args] + [UL(0)] * (5 - len(args))
    return libc.prctl(*a)


def prctl_int(op):
    v = ctypes.c_int(0)
    assert libc.prctl(op, ctypes.byref(v), UL(0), UL(0), UL(0)) == 0
    return v.value


def syscall(nr, *args):
    return libc.syscall(ctypes.c_long(nr), *[UL(x) for x in args])


def addr_of(m):
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def write_proc(name, value):
    try:
        with open(f"/proc/self/{name}", "w") as f:
            f.write(value)
        return True
    except OSError:
        return False


set_ = {}
# Memory regions, each with one flag madvise/mlock/mseal gives it.
PAGE = 4096
regions = {}
for flag, advice in [("dc", 10), ("wf", 18), ("dd", 16), ("sr", 2), ("rr", 1), ("hg", 14), ("nh", 15), ("mg", 12), ("lo", None), ("sl", None)]:
    m = mmap.mmap(-1, 4 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[0:5] = flag.encode() + b"-ok"
    a = addr_of(m)
    if flag == "lo":
        ok = libc.mlock(ctypes.c_void_p(a), UL(4 * PAGE)) == 0
    elif flag == "sl":
        ok = syscall(462, a, 4 * PAGE, 0) == 0
    else:
        ok = libc.madvise(ctypes.c_void_p(a), UL(4 * PAGE), advice) == 0
    if ok:
        regions[flag] = (m, a)
set_["regions"] = {f: hex(a)[2:] for f, (m, a) in regions.items()}

# Credentials are per thread: set before the second thread inherits them.
prctl(24, 27)  # PR_CAPBSET_DROP CAP_MKNOD
prctl(28, 0x5)  # PR_SET_SECUREBITS: NOROOT | NO_SETUID_FIXUP
prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
if UID is not None:
    os.setgroups([])
    os.setresgid(UID, UID, UID)
    os.setresuid(UID, UID, UID)

# A second thread: real-time FIFO 1 after a nice of 3, its own pdeath signal and personality.
thread_ready = threading.Event()
thread_state = {}


def thread_main():
    thread_state["tid"] = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, 0, 3)
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    prctl(1, signal.SIGWINCH)  # PR_SET_PDEATHSIG
    prctl(29, 7777)  # PR_SET_TIMERSLACK (ignored: real-time threads have none)
    libc.personality(0x0200000)  # ADDR_COMPAT_LAYOUT
    thread_ready.set()
    while not os.path.exists(CHECK):
        time.sleep(0.02)
    bad = []
    if prctl_int(2) != signal.SIGWINCH:
        bad.append(f"thread pdeathsig={prctl_int(2)}")
    if libc.personality(0xFFFFFFFF) != 0x0200000:
        bad.append(f"thread personality={libc.personality(0xFFFFFFFF):#x}")
    if os.sched_getscheduler(0) != os.SCHED_FIFO:
        bad.append(f"thread policy={os.sched_getscheduler(0)}")
    thread_state["bad"] = bad
    while True:
        time.sleep(0.05)


threading.Thread(target=thread_main, daemon=True).start()
thread_ready.wait()
set_["thread"] = thread_state["tid"]

prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
# SIGURG is ignored by default: the helper amber restores through exits first.
prctl(1, signal.SIGURG)  # PR_SET_PDEATHSIG
prctl(4, 0)  # PR_SET_DUMPABLE
prctl(29, 123456)  # PR_SET_TIMERSLACK
prctl(41, 1)  # PR_SET_THP_DISABLE
prctl(33, 1, 1)  # PR_MCE_KILL SET EARLY
set_["ssb"] = prctl(53, 0, 4) == 0  # speculative store bypass: disable
libc.personality(0x0040000)  # ADDR_NO_RANDOMIZE
os.setpriority(os.PRIO_PROCESS, 0, 5)
os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
os.sched_setaffinity(0, {0})
syscall(251, 1, 0, (2 << 13) | 6)  # ioprio_set: best effort, level 6
write_proc("oom_score_adj", "321")
write_proc("coredump_filter", "0x37")
set_["loginuid"] = write_proc("loginuid", "1234")
set_["membarrier"] = syscall(324, 1 << 4, 0) == 0  # REGISTER_PRIVATE_EXPEDITED


def checks():
    bad = []

    def eq(what, got, want):
        if got != want:
            bad.append(f"{what}={got!r}, want {want!r}")

    eq("subreaper", prctl_int(37), 1)
    eq("pdeathsig", prctl_int(2), signal.SIGURG)
    eq("dumpable", prctl(3), 0)
    eq("timerslack", prctl(30), 123456)
    eq("thp_disable", prctl(42), 1)
    eq("mce_kill", prctl(34), 1)
    if set_["ssb"]:
        eq("ssb", prctl(52, 0) & ~1, 4)
    eq("personality", libc.personality(0xFFFFFFFF), 0x0040000)
    eq("nice", os.getpriority(os.PRIO_PROCESS, 0), 5)
    eq("policy", os.sched_getscheduler(0), os.SCHED_BATCH)
    eq("affinity", os.sched_getaffinity(0), {0})
    eq("ioprio", syscall(252, 1, 0), (2 << 13) | 6)
    eq("securebits", prctl(27), 0x5)
    eq("no_new_privs", prctl(39), 1)
    if set_["membarrier"]:
        eq("membarrier", syscall(324, 1 << 9, 0) & (1 << 4), 1 << 4)
    for flag, (m, a) in regions.items():
        eq(f"region {flag}", bytes(m[0:5]), flag.encode() + b"-ok")
    return bad


with open(OUT, "w") as out:
    out.write("ready " + json.dumps(set_) + "\n")
    out.flush()
    while not os.path.exists(CHECK):
        time.sleep(0.02)
    bad = checks()
    while "bad" not in thread_state:
        time.sleep(0.01)
    bad += thread_state["bad"]
    out.write(("PASS" if not bad else "FAIL " + "; ".join(bad)) + "\n")
    out.flush()
    while True:
        time.sleep(0.05)
