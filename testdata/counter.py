"""counter.py OUTFILE

Test target for amber: a CPython process holding ~10 MB of state (a list of
ints and a dict of strings) built at start. Every 20 ms it bumps one list
element and one dict entry, recomputes a checksum over all the state, and
writes "N checksum" to OUTFILE (flushed). The checksum is a pure function of
N, so corrupted memory after a restore shows up as a wrong value:

    checksum(N) = BASE + 2 * (N + 1)   where BASE = checksum before tick 0

The script also checks itself and writes "BAD N" if the value is off.
"""

import sys
import time

ITEMS = 300_000


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(2)
    data = [i * 7 + 1000 for i in range(ITEMS)]
    table = {f"key-{i:07d}": i for i in range(ITEMS // 4)}
    keys = list(table)
    base = sum(data) + sum(table.values())
    with open(sys.argv[1], "w", encoding="ascii") as out:
        n = 0
        while True:
            data[n % ITEMS] += 1
            table[keys[n % len(keys)]] += 1
            checksum = sum(data) + sum(table.values())
            if checksum != base + 2 * (n + 1):
                out.write(f"BAD {n}\n")
            out.write(f"{n} {checksum}\n")
            out.flush()
            n += 1
            time.sleep(0.02)


if __name__ == "__main__":
    main()
