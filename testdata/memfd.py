"""memfd target: python3 memfd.py OUT

A memfd "amber-memfd" (3 pages + 100 bytes, seals SHRINK|GROW, offset
1234) held by the parent and mapped shared; a forked child holds it too,
inherited and as its own descriptor opened through /proc (another open
file, the same memfd), and maps it. They play ping-pong on the first word
of the mapping; the child also writes a word with pwrite on its own
descriptor that the parent must see in its mapping. A second memfd
"amber-sealed" (WRITE|SEAL) holds fixed bytes. Each tick the parent checks
name, size, seals, offset, contents and that both see one memfd, and
writes N (or BAD N why) into OUT.
"""

import fcntl
import mmap
import os
import struct
import sys
import time

OUT = sys.argv[1]
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 1, 2, 4, 8
SIZE = 3 * 4096 + 100
PATTERN = bytes(range(256)) * 16  # one page

fd = os.memfd_create("amber-memfd", os.MFD_ALLOW_SEALING)
os.write(fd, b"\0" * 4096 + PATTERN + PATTERN + PATTERN[:100])
os.ftruncate(fd, SIZE)
fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
os.lseek(fd, 1234, os.SEEK_SET)
m = mmap.mmap(fd, 3 * 4096)

sealed = os.memfd_create("amber-sealed", os.MFD_ALLOW_SEALING)
os.write(sealed, b"sealed bytes")
fcntl.fcntl(sealed, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SEAL)

parent = os.getpid()
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.close(r)
    own = os.open(f"/proc/{parent}/fd/{fd}", os.O_RDWR)
    os.write(w, b"%d\n" % own)
    os.close(w)
    k = 0
    while True:
        v = struct.unpack_from("q", m, 0)[0]
        if v % 2 == 1:
            k += 1
            os.pwrite(own, struct.pack("q", k), 8)
            struct.pack_into("q", m, 0, v + 1)
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(0.001)
os.close(w)
child_fd = int(os.read(r, 100).decode())
os.close(r)


def check():
    for f, name in ((fd, "amber-memfd"), (sealed, "amber-sealed")):
        link = os.readlink(f"/proc/self/fd/{f}")
        if link != f"/memfd:{name} (deleted)":
            return f"fd {f} is {link}"
    if os.fstat(fd).st_size != SIZE:
        return f"size {os.fstat(fd).st_size}"
    if fcntl.fcntl(fd, F_GET_SEALS) != F_SEAL_SHRINK | F_SEAL_GROW:
        return f"seals {fcntl.fcntl(fd, F_GET_SEALS)}"
    if fcntl.fcntl(sealed, F_GET_SEALS) != F_SEAL_WRITE | F_SEAL_SEAL:
        return f"sealed: seals {fcntl.fcntl(sealed, F_GET_SEALS)}"
    try:
        os.pwrite(sealed, b"x", 0)
        return "a write-sealed memfd took a write"
    except PermissionError:
        pass
    if os.pread(sealed, 100, 0) != b"sealed bytes":
        return "sealed: contents"
    if os.lseek(fd, 0, os.SEEK_CUR) != 1234:
        return f"offset {os.lseek(fd, 0, os.SEEK_CUR)}"
    if m[4096:8192] != PATTERN or os.pread(fd, 4096, 8192) != PATTERN:
        return "contents"
    if os.pread(fd, 200, SIZE - 100) != PATTERN[:100]:
        return "tail"
    theirs = os.stat(f"/proc/{child}/fd/{child_fd}").st_ino
    if theirs != os.fstat(fd).st_ino:
        return "the child's descriptor is another memfd"
    # Ping: the child answers in the shared mapping and counts in its pwrite.
    v = struct.unpack_from("q", m, 0)[0]
    seen = struct.unpack_from("q", m, 8)[0]
    struct.pack_into("q", m, 0, v + 1)
    for _ in range(2000):
        if struct.unpack_from("q", m, 0)[0] == v + 2:
            break
        time.sleep(0.001)
    else:
        return "the child did not answer through the mapping"
    if struct.unpack_from("q", m, 8)[0] != seen + 1:
        return "the child's pwrite is not in the mapping"
    return ""


with open(OUT, "w", encoding="ascii") as out:
    n = 0
    while True:
        why = check()
        out.write(f"BAD {n} {why}\n" if why else f"{n}\n")
        out.flush()
        n += 1
        time.sleep(0.02)
