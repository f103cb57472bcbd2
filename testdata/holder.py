"""holder.py OUTFILE WORKDIR CASE

Test target for amber: holds one kind of kernel object (CASE, below), then
every 20 ms uses it and writes "N" to OUTFILE (flushed); if using it fails
it writes "BAD N <why>" instead. WORKDIR is where it may create files.

Cases:
  replaced-so   a copy of libz mapped by ctypes, then replaced on disk
  mp-lock       multiprocessing.Lock (a deleted /dev/shm/sem.* mapping)
  aio           an io_setup context (the /[aio] ring mapping)
  hugetlb       2 MiB of MAP_HUGETLB anonymous memory (/anon_hugepage)
  uffd-wp       48 MiB of private anonymous memory, written, registered in
                write-protect mode on a userfaultfd of its own (kept open)
  memfd-hugetlb a memfd of huge pages (MFD_HUGETLB), held as a descriptor
  memfd         a memfd mapped, its descriptor closed
  memfd-fd      a memfd open (not mapped)
  sysv-shm      a SysV shared memory segment attached, marked for removal,
                shared with a forked child; each checks the other's writes
                and that the segment keeps its id (in WORKDIR/shmid)
  sysv-shm-kept the same, not marked for removal (it outlives the process)
  sysv-shm-ro   a SysV segment attached read-only by the process and by one
                child (mprotect to writable must still fail), written by another
  ptmx          a pseudo-terminal pair from os.openpty()
  proc-child    /proc/CHILD/status of its forked child, open
  proc-self     /proc/PID/status of itself, open (read again every tick)
  deleted-file  a file opened, written, then unlinked
  opath-dangling  an O_PATH descriptor on a symlink to nothing
  lease         a read lease on a file of WORKDIR
  deleted-big   a 2 MiB file opened, then unlinked
  mp-value      a multiprocessing.Value (a deleted /dev/shm arena, open and
                mapped) and its lock, shared with a multiprocessing.Process
                child that answers each tick by making the value even
  fifo          a FIFO of WORKDIR open at both ends (read end non-blocking),
                8-byte records written one tick ahead of reading them
  signalfd      SIGUSR1 blocked and taken through a non-blocking signalfd
  timerfd       a 10 ms periodic timerfd (each tick reads an expiration) and
                a one-hour one-shot one whose time left must stay under an hour
  epoll         an epoll watching a pipe's read end (edge-triggered, data 77)
                and an eventfd, inside a second epoll that watches the first
  epoll-reused  an epoll watching an eventfd under an fd number that now holds
                another eventfd (the watched one lives on as a dup)
  epoll-child-fd an epoll watching an eventfd the process closed, which its
                child still holds
  inotify       inotify watching WORKDIR/watched for IN_CREATE as wd 2 (wd 1
                removed); each tick creates a file there and reads its event
  inotify-queued  the same, with one event left unread
  fanotify      a fanotify group marking WORKDIR/fan for FAN_CLOSE_WRITE of its
                files, with an ignored mask on fan/quiet; each tick writes both
                and reads exactly one event, fan/loudN's
  fanotify-queued the same, with one event left unread
  fanotify-perm a fanotify group of the permission class FAN_CLASS_CONTENT
  fanotify-mount the same, with a mount mark and a filesystem mark too (ignored
                masks), each tick checking its fdinfo still shows every mark
  inotify-flags inotify watches with IN_ONESHOT and IN_EXCL_UNLINK, checked
                in its own fdinfo each tick
  pidfd         a pidfd of its forked child, signalled (0) every tick
  pidfd-outside a pidfd of its parent, outside the dumped tree
  shared-ro-map a file opened read-write, mapped shared read-only; each tick
                makes the mapping writable, writes through it, and back
  eventfd       an eventfd in semaphore mode, non-blocking, count 5
  shm-split     8 KiB of shared anonymous memory, forked; the parent then
                unmaps its second page (the child's mapping is wider)
"""

import ctypes
import mmap
import os
import shutil
import stat
import sys
import time

OUT, WORK, CASE = sys.argv[1], sys.argv[2], sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]


def replaced_so():
    path = f"{WORK}/libz-copy.so"
    shutil.copy("/usr/lib/x86_64-linux-gnu/libz.so.1", path)
    z = ctypes.CDLL(path)
    z.crc32.restype = ctypes.c_ulong
    # A package upgrade: a new file renamed over the old name.
    shutil.copy(path, path + ".new")
    os.rename(path + ".new", path)
    want = z.crc32(0, b"amber", 5)
    return lambda: z.crc32(0, b"amber", 5) == want


def mp_lock():
    import multiprocessing
    lock = multiprocessing.Lock()

    def use():
        with lock:
            return True
    return use


def aio():
    ctx = ctypes.c_ulong(0)
    if libc.syscall(206, 8, ctypes.byref(ctx)) != 0:  # io_setup
        raise OSError(ctypes.get_errno(), "io_setup")
    # io_getevents for no event: 0 while this process has the context at that id
    return lambda: libc.syscall(208, ctypes.c_ulong(ctx.value), 0, 0, None, None) == 0


def memfd_hugetlb():
    # memfd_create(name, MFD_HUGETLB): a descriptor only, never mapped
    fd = libc.syscall(319, b"huge", 4)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "memfd_create MFD_HUGETLB")
    os.ftruncate(fd, 2 << 20)
    return lambda: os.fstat(fd).st_size == 2 << 20


def hugetlb():
    size = 2 << 20
    # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_HUGETLB
    addr = libc.mmap(None, size, 3, 0x02 | 0x20 | 0x40000, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap MAP_HUGETLB")
    buf = (ctypes.c_char * size).from_address(addr)
    buf[0] = b"h"
    return lambda: buf[0] == b"h"


def uffd_wp():
    size = 48 << 20
    addr = libc.mmap(None, size, 3, 0x02 | 0x20, -1, 0)  # MAP_PRIVATE|MAP_ANONYMOUS
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    buf = (ctypes.c_char * size).from_address(addr)
    for off in range(0, size, 4096):
        buf[off] = b"u"
    fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)  # userfaultfd
    if fd < 0:
        raise OSError(ctypes.get_errno(), "userfaultfd")
    api = (ctypes.c_uint64 * 3)(0xAA, 0, 0)
    if libc.ioctl(fd, ctypes.c_ulong(0xC018AA3F), api) != 0:  # UFFDIO_API
        raise OSError(ctypes.get_errno(), "UFFDIO_API")
    reg = (ctypes.c_uint64 * 4)(addr, size, 2, 0)  # UFFDIO_REGISTER_MODE_WP
    if libc.ioctl(fd, ctypes.c_ulong(0xC020AA00), reg) != 0:  # UFFDIO_REGISTER
        raise OSError(ctypes.get_errno(), "UFFDIO_REGISTER")

    def use():
        os.fstat(fd)
        return buf[size - 4096] == b"u"
    return use


def memfd():
    fd = os.memfd_create("amber-test")
    os.ftruncate(fd, 4096)
    m = mmap.mmap(fd, 4096)
    os.close(fd)
    m[0:5] = b"memfd"
    return lambda: m[0:5] == b"memfd"


def sysv_shm(keep=False):
    shmid = libc.shmget(0, 8192, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
    if shmid < 0:
        raise OSError(ctypes.get_errno(), "shmget")
    with open(f"{WORK}/shmid", "w") as f:
        f.write(str(shmid))
    addr = libc.shmat(shmid, None, 0)
    if not keep:
        libc.shmctl(shmid, 0, None)  # IPC_RMID: gone once detached
    counters = (ctypes.c_int64 * 2).from_address(addr)
    page2 = (ctypes.c_char * 4096).from_address(addr + 4096)
    page2[0] = b"s"
    if os.fork() == 0:
        # The child answers each odd value of counter 0 in counter 1.
        while True:
            if counters[0] % 2 == 1 and counters[1] != counters[0]:
                counters[1] = counters[0]
            time.sleep(0.001)
    stat = ctypes.create_string_buffer(112)

    def use():
        counters[0] += 2 if counters[0] % 2 else 1
        while counters[1] != counters[0]:
            time.sleep(0.001)
        return page2[0] == b"s" and libc.shmctl(shmid, 2, stat) == 0  # IPC_STAT
    return use


def sysv_shm_ro():
    shmid = libc.shmget(0, 4096, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
    if shmid < 0:
        raise OSError(ctypes.get_errno(), "shmget")
    SHM_RDONLY, PROT_RW, EACCES = 0o10000, 3, 13

    def writable(addr):
        if libc.mprotect(ctypes.c_void_p(addr), 4096, PROT_RW) == 0:
            return True
        return ctypes.get_errno() != EACCES
    for role in ("writer", "reader"):
        if os.fork() == 0:
            addr = libc.shmat(shmid, None, SHM_RDONLY if role == "reader" else 0)
            counter = ctypes.c_int64.from_address(addr)
            while not (role == "reader" and writable(addr)):
                if role == "writer":
                    counter.value += 1
                time.sleep(0.01)
            os._exit(1)  # the reader's read-only attachment became writable
    addr = libc.shmat(shmid, None, SHM_RDONLY)
    libc.shmctl(shmid, 0, None)  # IPC_RMID: gone once detached
    counter = ctypes.c_int64.from_address(addr)
    last = [counter.value]

    def use():
        time.sleep(0.05)
        moved = counter.value != last[0]
        last[0] = counter.value
        return moved and not writable(addr)
    return use


def ptmx():
    master, slave = os.openpty()
    return lambda: os.isatty(slave)


def proc_child():
    child = os.fork()
    if child == 0:
        while True:
            time.sleep(1)
    fd = os.open(f"/proc/{child}/status", os.O_RDONLY)
    return lambda: b"Pid:" in os.pread(fd, 4096, 0)


def proc_self():
    fd = os.open(f"/proc/{os.getpid()}/status", os.O_RDONLY)
    want = f"Pid:\t{os.getpid()}\n".encode()
    return lambda: want in os.pread(fd, 4096, 0)


def deleted_file():
    path = f"{WORK}/deleted.txt"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, b"still here")
    os.unlink(path)
    return lambda: os.pread(fd, 10, 0) == b"still here"


def deleted_big():
    path = f"{WORK}/big.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, b"b" * (2 << 20))
    os.unlink(path)
    return lambda: os.pread(fd, 4, (2 << 20) - 4) == b"bbbb"


def answer(v):
    while True:
        with v.get_lock():
            if v.value % 2 == 1:
                v.value += 1
        time.sleep(0.001)


def mp_value():
    import multiprocessing
    v = multiprocessing.Value("q", 0)
    multiprocessing.Process(target=answer, args=(v,), daemon=True).start()

    def use():
        with v.get_lock():
            v.value += 1
        # Waits for the child's answer through the shared memory.
        while True:
            with v.get_lock():
                if v.value % 2 == 0:
                    return True
            time.sleep(0.001)
    return use


def opath_dangling():
    path = f"{WORK}/dangling"
    os.symlink(f"{WORK}/nothing-here", path)
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    return lambda: stat.S_ISLNK(os.fstat(fd).st_mode) and \
        os.readlink(f"/proc/self/fd/{fd}") == path


def lease():
    import fcntl
    path = f"{WORK}/leased.txt"
    with open(path, "w") as f:
        f.write("leased")
    fd = os.open(path, os.O_RDONLY)
    fcntl.fcntl(fd, 1024, fcntl.F_RDLCK)  # F_SETLEASE
    return lambda: fcntl.fcntl(fd, 1025) == fcntl.F_RDLCK  # F_GETLEASE


def shm_split():
    size = 8192
    addr = libc.mmap(None, size, 3, 0x01 | 0x20, -1, 0)  # MAP_SHARED|MAP_ANONYMOUS
    buf = (ctypes.c_char * 4096).from_address(addr)
    buf[0] = b"m"
    if os.fork() == 0:
        while True:
            time.sleep(1)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap(addr + 4096, 4096)
    return lambda: buf[0] == b"m"


def eventfd():
    efd = os.eventfd(12, os.EFD_SEMAPHORE | os.EFD_NONBLOCK)

    def use():
        # Semaphore mode: each read takes 1; the 13th finds the count at 0.
        if [os.eventfd_read(efd) for _ in range(12)] != [1] * 12:
            return False
        try:
            os.eventfd_read(efd)
            return False
        except BlockingIOError:
            os.eventfd_write(efd, 12)
            return True
    return use


def fifo():
    path = f"{WORK}/fifo"
    os.mkfifo(path)
    r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(path, os.O_WRONLY)
    n = [0]
    os.write(w, b"%07d\n" % 0)

    def use():
        # The record written last tick is waiting in the FIFO.
        want = b"%07d\n" % n[0]
        n[0] += 1
        os.write(w, b"%07d\n" % n[0])
        return os.read(r, 8) == want and not os.get_blocking(r) and os.get_blocking(w)
    return use


def signalfd():
    import signal
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    mask = ctypes.c_uint64(1 << (signal.SIGUSR1 - 1) | 1 << (signal.SIGUSR2 - 1))
    sfd = libc.signalfd(-1, ctypes.byref(mask), os.O_NONBLOCK)
    if sfd < 0:
        raise OSError(ctypes.get_errno(), "signalfd")

    def use():
        os.kill(os.getpid(), signal.SIGUSR1)
        info = os.read(sfd, 128)  # struct signalfd_siginfo, ssi_signo first
        return int.from_bytes(info[:4], "little") == signal.SIGUSR1
    return use


class Itimerspec(ctypes.Structure):
    _fields_ = [("interval_sec", ctypes.c_long), ("interval_nsec", ctypes.c_long),
                ("value_sec", ctypes.c_long), ("value_nsec", ctypes.c_long)]


def timerfd():
    fast = libc.timerfd_create(1, 0)  # CLOCK_MONOTONIC
    slow = libc.timerfd_create(1, 0)
    libc.timerfd_settime(fast, 0, ctypes.byref(Itimerspec(0, 10_000_000, 0, 10_000_000)), None)
    libc.timerfd_settime(slow, 0, ctypes.byref(Itimerspec(0, 0, 3600, 0)), None)

    def use():
        expirations = int.from_bytes(os.read(fast, 8), "little")
        left = Itimerspec()
        libc.timerfd_gettime(slow, ctypes.byref(left))
        return expirations >= 1 and 0 < left.value_sec < 3600
    return use


class EpollEvent(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]


def epoll():
    import select
    ep = select.epoll()
    r, w = os.pipe()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    ev = EpollEvent(select.EPOLLIN | select.EPOLLET, 77)
    if libc.epoll_ctl(ep.fileno(), 1, r, ctypes.byref(ev)) != 0:
        raise OSError(ctypes.get_errno(), "epoll_ctl")
    ep.register(efd, select.EPOLLIN)
    outer = select.epoll()
    outer.register(ep.fileno(), select.EPOLLIN)
    got = (EpollEvent * 4)()

    def use():
        os.write(w, b"x")
        os.eventfd_write(efd, 1)
        if outer.poll(0) != [(ep.fileno(), select.EPOLLIN)]:
            return False
        n = libc.epoll_wait(ep.fileno(), got, 4, 0)
        seen = sorted((got[i].data, got[i].events) for i in range(n))
        os.read(r, 1)
        os.eventfd_read(efd)
        return seen == sorted([(77, select.EPOLLIN), (efd, select.EPOLLIN)])
    return use


def epoll_reused():
    import select
    ep = select.epoll()
    watched = os.eventfd(0, os.EFD_NONBLOCK)
    ep.register(watched, select.EPOLLIN)
    kept = os.dup(watched)
    os.close(watched)
    other = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    assert other == watched

    def use():
        os.eventfd_write(kept, 1)
        ready = ep.poll(0)
        os.eventfd_read(kept)
        os.eventfd_write(other, 5)
        return ready == [(watched, select.EPOLLIN)] and ep.poll(0) == [] and \
            os.eventfd_read(other) == 5 and os.get_inheritable(other) is False
    return use


def epoll_child_fd():
    import select
    ep = select.epoll()
    watched = os.eventfd(0, os.EFD_NONBLOCK)
    ep.register(watched, select.EPOLLIN)
    if os.fork() == 0:
        while True:
            time.sleep(1)
    os.close(watched)
    return lambda: ep.poll(0) == []


def inotify(leave_one=False):
    import struct
    d = f"{WORK}/watched"
    os.mkdir(d)
    ifd = libc.inotify_init1(0)
    first = libc.inotify_add_watch(ifd, WORK.encode(), 0x100)
    wd = libc.inotify_add_watch(ifd, d.encode(), 0x100)  # IN_CREATE
    libc.inotify_rm_watch(ifd, first)
    ignored = os.read(ifd, 4096)  # the IN_IGNORED of the removed watch
    n = [0]
    if leave_one:
        def use_leaving_one():
            # Reads what is queued, then queues one event for the next tick.
            ev = os.read(ifd, 4096)
            open(f"{d}/p{n[0]}", "w").close()
            n[0] += 1
            return len(ev) >= 16
        open(f"{d}/first", "w").close()
        return use_leaving_one

    def use():
        name = f"f{n[0]}"
        n[0] += 1
        open(f"{d}/{name}", "w").close()
        ev = os.read(ifd, 4096)
        w, mask, _, length = struct.unpack("iIII", ev[:16])
        return bool(ignored) and w == wd == 2 and mask == 0x100 and \
            ev[16:16 + length].rstrip(b"\0") == name.encode()
    return use


def inotify_flags():
    ifd = libc.inotify_init1(0)
    for d in ("oneshot", "excl"):
        os.mkdir(f"{WORK}/{d}")
    oneshot = libc.inotify_add_watch(ifd, f"{WORK}/oneshot".encode(), 0x100 | 0x80000000)
    excl = libc.inotify_add_watch(ifd, f"{WORK}/excl".encode(), 0x100 | 0x04000000)
    want = {oneshot: 0x80000100, excl: 0x04000100}

    def use():
        got = {}
        with open(f"/proc/self/fdinfo/{ifd}") as f:
            for line in f:
                if line.startswith("inotify "):
                    words = line.split(" ")
                    got[int(words[1][3:], 16)] = int(words[4][5:], 16)
        return got == want
    return use


def fanotify_perm():
    fan = libc.fanotify_init(0x4, os.O_RDONLY)  # FAN_CLASS_CONTENT
    if fan < 0:
        raise OSError(ctypes.get_errno(), "fanotify_init")
    return lambda: os.fstat(fan) is not None


def fanotify(leave_one=False, mount=False):
    import struct
    libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64,
                                   ctypes.c_int, ctypes.c_char_p]
    FAN_CLOSE_WRITE, FAN_EVENT_ON_CHILD, FAN_OPEN_EXEC = 0x8, 0x08000000, 0x1000
    ADD, MOUNT, IGNORED, SURV = 0x1, 0x10, 0x20, 0x40
    d = f"{WORK}/fan"
    os.mkdir(d)
    open(f"{d}/quiet", "w").close()
    fan = libc.fanotify_init(0, os.O_RDONLY)
    if fan < 0:
        raise OSError(ctypes.get_errno(), "fanotify_init")
    marks = [(ADD, FAN_CLOSE_WRITE | FAN_EVENT_ON_CHILD, d),
             (ADD | IGNORED | SURV, FAN_CLOSE_WRITE, f"{d}/quiet")]
    if mount:  # ignored masks only: no events from the rest of the machine
        FILESYSTEM = 0x100
        marks.append((ADD | MOUNT | IGNORED | SURV, FAN_OPEN_EXEC, WORK))
        marks.append((ADD | FILESYSTEM | IGNORED | SURV, FAN_OPEN_EXEC, WORK))
    for flags, mask, path in marks:
        if libc.fanotify_mark(fan, flags, mask, -100, path.encode()) != 0:
            raise OSError(ctypes.get_errno(), "fanotify_mark")
    n = [0]

    def write(name):
        with open(f"{d}/{name}", "w") as f:
            f.write("x")

    # leave_one: an event is always queued (each tick reads one, the one before its own).
    last = ["left"]
    if leave_one:
        write("left")

    def use():
        write("quiet")
        name = f"loud{n[0]}"
        n[0] += 1
        write(name)
        ev = os.read(fan, 24 if leave_one else 4096)
        if leave_one:
            name, last[0] = last[0], name
        seen = []
        for at in range(0, len(ev), 24):
            length, _, _, _, mask, fd, pid = struct.unpack("IBBHQii", ev[at:at + 24])
            seen.append((length, mask, pid, os.readlink(f"/proc/self/fd/{fd}")))
            os.close(fd)
        want = (24, FAN_CLOSE_WRITE, os.getpid())
        return seen == [(*want, f"{d}/{name}")] and marks_now() == marks_then
    marks_now = lambda: sorted(line.split(" ", 1)[0] + " " + " ".join(
        w for w in line.split() if w.split(":")[0] in ("mflags", "mask", "ignored_mask"))
        for line in open(f"/proc/self/fdinfo/{fan}") if line.startswith("fanotify "))
    marks_then = marks_now()
    return use


def memfd_fd():
    fd = os.memfd_create("amber-fd")
    os.write(fd, b"memfd")
    return lambda: os.pread(fd, 5, 0) == b"memfd"


def pidfd():
    import signal
    child = os.fork()
    if child == 0:
        while True:
            time.sleep(1)
    pfd = os.pidfd_open(child)

    def use():
        signal.pidfd_send_signal(pfd, 0)
        return os.waitid(os.P_PIDFD, pfd, os.WEXITED | os.WNOHANG) is None
    return use


def pidfd_outside():
    import signal
    pfd = os.pidfd_open(os.getppid())
    return lambda: signal.pidfd_send_signal(pfd, 0) is None


def shared_ro_map():
    path = f"{WORK}/mapped.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 4096)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    addr = libc.mmap(None, 4096, 1, 0x01, fd, 0)  # PROT_READ, MAP_SHARED
    os.close(fd)
    n = [0]

    def use():
        if libc.mprotect(addr, 4096, 3) != 0:
            raise OSError(ctypes.get_errno(), "mprotect(PROT_WRITE)")
        n[0] = (n[0] + 1) % 256
        ctypes.memset(addr, n[0], 1)
        libc.mprotect(addr, 4096, 1)
        with open(path, "rb") as f:
            return f.read(1)[0] == n[0]
    return use


CASES = {
    "shared-ro-map": shared_ro_map,
    "pidfd": pidfd,
    "pidfd-outside": pidfd_outside,
    "memfd-fd": memfd_fd,
    "inotify": inotify,
    "inotify-queued": lambda: inotify(True),
    "inotify-flags": inotify_flags,
    "fanotify": fanotify,
    "fanotify-queued": lambda: fanotify(leave_one=True),
    "fanotify-mount": lambda: fanotify(mount=True),
    "fanotify-perm": fanotify_perm,
    "epoll": epoll,
    "epoll-reused": epoll_reused,
    "epoll-child-fd": epoll_child_fd,
    "signalfd": signalfd,
    "timerfd": timerfd,
    "fifo": fifo,
    "deleted-big": deleted_big,
    "mp-value": mp_value,
    "eventfd": eventfd,
    "shm-split": shm_split,
    "lease": lease,
    "replaced-so": replaced_so,
    "mp-lock": mp_lock,
    "aio": aio,
    "hugetlb": hugetlb,
    "uffd-wp": uffd_wp,
    "memfd-hugetlb": memfd_hugetlb,
    "memfd": memfd,
    "sysv-shm": sysv_shm,
    "sysv-shm-ro": sysv_shm_ro,
    "sysv-shm-kept": lambda: sysv_shm(True),
    "ptmx": ptmx,
    "proc-child": proc_child,
    "proc-self": proc_self,
    "deleted-file": deleted_file,
    "opath-dangling": opath_dangling,
}


def main():
    use = CASES[CASE]()
    with open(OUT, "w", encoding="ascii") as out:
        n = 0
        while True:
            try:
                ok = use()
                why = ""
            except OSError as e:
                ok, why = False, str(e)
            out.write(f"{n}\n" if ok else f"BAD {n} {why}\n")
            out.flush()
            n += 1
            time.sleep(0.02)


main()
