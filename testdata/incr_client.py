"""A redis client sending INCR counter on one connection, one at a time.

usage: incr_client.py OUT STOP ADDR PORT

Writes "connected", then "at N VALUE" every 100 replies to OUT, and "pause
MS" for each time between two replies longer than 100 ms; once the
file STOP exists, "done REPLIES LAST OUT_OF_SEQUENCE LONGEST_PAUSE_MS"; on
any error (a reset, end of file, an error reply) "error WHAT after N
replies", exit status 1. A reply out of sequence is one whose value is not
the one before plus one.
"""
import os
import socket
import sys
import time

out, stop, addr, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
f = open(out, "a", buffering=1)
n = wrong = 0
last = None
gap = 0.0
try:
    s = socket.create_connection((addr, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f.write("connected\n")
    buf = b""
    t = time.monotonic()
    while not os.path.exists(stop):
        s.sendall(b"INCR counter\r\n")
        while b"\r\n" not in buf:
            d = s.recv(256)
            if not d:
                raise EOFError("redis closed the connection")
            buf += d
        line, buf = buf.split(b"\r\n", 1)
        now = time.monotonic()
        if now - t > 0.1:
            f.write("pause %.1f\n" % ((now - t) * 1000))
        gap, t = max(gap, now - t), now
        if not line.startswith(b":"):
            raise ValueError("reply %r" % line)
        v = int(line[1:])
        if last is not None and v != last + 1:
            wrong += 1
        last, n = v, n + 1
        if n % 100 == 0:
            f.write("at %d %d\n" % (n, v))
    f.write("done %d %d %d %.1f\n" % (n, last, wrong, gap * 1000))
except Exception as e:
    f.write("error %r after %d replies\n" % (e, n))
    sys.exit(1)
