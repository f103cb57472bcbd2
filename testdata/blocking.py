"""blocking.py OUTFILE

Test target for amber: CPython threads that spend nearly all their time in
blocking calls with a timeout. CPython retries a call interrupted by EINTR
itself, with the remaining time (PEP 475), so an interruption cannot show;
what must hold after a restore is that every thread is alive and goes on
counting. Each thread writes "T<NAME> N ok" (N from 0, one os.write per
line, under a lock) after each call, or "T<NAME> N BAD ..." if the call
returned something else or before its time. The threads:

    sleep    time.sleep(0.04)
    select   select.select([], [], [], 0.05)
    event    threading.Event().wait(0.06)  (never set: a timed lock wait)

The main thread waits in Thread.join.
"""

import os
import select
import sys
import threading
import time

lock = threading.Lock()


def emit(fd: int, line: str) -> None:
    data = line.encode("ascii")
    with lock:
        while data:
            data = data[os.write(fd, data) :]


def run(fd: int, name: str, seconds: float, call) -> None:
    n = 0
    while True:
        t0 = time.monotonic()
        result = call()
        took = time.monotonic() - t0
        if result is None and took >= seconds:
            emit(fd, f"T{name} {n} ok\n")
        else:
            emit(fd, f"T{name} {n} BAD {result!r} after {took:.6f} s\n")
        n += 1


def do_sleep():
    time.sleep(0.04)


def do_select():
    r = select.select([], [], [], 0.05)
    return None if r == ([], [], []) else r


never = threading.Event()


def do_event():
    return None if never.wait(0.06) is False else "set"


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(2)
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    threads = [
        threading.Thread(target=run, args=(fd, "sleep", 0.04, do_sleep), daemon=True),
        threading.Thread(target=run, args=(fd, "select", 0.05, do_select), daemon=True),
        threading.Thread(target=run, args=(fd, "event", 0.06, do_event), daemon=True),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
