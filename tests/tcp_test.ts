/**
 * TCP sockets: listeners (IPv4 and IPv6) with their options and backlog,
 * unconnected sockets, and established connections checkpointed with
 * TCP_REPAIR under the nftables network lock. After every dump, restore
 * and failure the ruleset is read: no amber table may be left, except
 * between a dump that ended the tree and its restore.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  assertOneLineError,
  commandWorks,
  dumpArgs,
  freePort,
  isAlive,
  type Json,
  killTree,
  readLines,
  showJson,
  spawnTarget,
  type Target,
  tempDir,
  until,
  waitFor,
  waitForLine,
  waitForLines,
  waitVanished,
} from "./_util.ts";

const PYTHON = "/usr/bin/python3";
const HAVE_NFT = await commandWorks("nft", "list", "tables");
const HAVE_REDIS = await commandWorks("redis-server", "--version");

/** amber's lock tables in the ruleset (amber check's probe table left out: another test's). */
async function lockTables(): Promise<string[]> {
  const r = await new Deno.Command("nft", { args: ["list", "ruleset"], stdout: "piped" }).output();
  const text = new TextDecoder().decode(r.stdout);
  return [...text.matchAll(/^table inet (amber_\S+)/gm)].map((m) => m[1])
    .filter((t) => !t.startsWith("amber_check_"));
}

async function assertNoLock(what: string): Promise<void> {
  assert.deepEqual(await lockTables(), [], `${what}: an amber table is left in the ruleset`);
}

async function readAll(conn: Deno.Conn): Promise<string> {
  return await new Response(conn.readable).text();
}

/**
 * Listeners and an unconnected socket with options set; every connection
 * to the first listener gets a report of all of them (addresses, options,
 * backlog from TCP_INFO), so the test compares before and after.
 */
const LISTENERS_PY = `import json, socket, struct, sys
S, T = socket.SOL_SOCKET, socket.IPPROTO_TCP
def report(s):
    info = s.getsockopt(T, socket.TCP_INFO, 104)
    o = dict(name=s.getsockname(), state=info[0], backlog=struct.unpack_from("I", info, 28)[0],
             reuseaddr=s.getsockopt(S, socket.SO_REUSEADDR), reuseport=s.getsockopt(S, socket.SO_REUSEPORT),
             keepalive=s.getsockopt(S, socket.SO_KEEPALIVE), nodelay=s.getsockopt(T, socket.TCP_NODELAY),
             keepidle=s.getsockopt(T, socket.TCP_KEEPIDLE), rcvbuf=s.getsockopt(S, socket.SO_RCVBUF),
             blocking=s.getblocking(), linger=list(s.getsockopt(S, socket.SO_LINGER, 8)),
             cc=s.getsockopt(T, socket.TCP_CONGESTION, 16).rstrip(b"\\0").decode(),
             priority=s.getsockopt(S, socket.SO_PRIORITY), mss=s.getsockopt(T, socket.TCP_MAXSEG),
             defer=s.getsockopt(T, socket.TCP_DEFER_ACCEPT))
    if s.family == socket.AF_INET6:
        o["v6only"] = s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        o["hops"] = s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS)
    else:
        o["ttl"] = s.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
    return o
a = socket.socket()
a.setsockopt(S, socket.SO_REUSEADDR, 1)
a.setsockopt(T, socket.TCP_NODELAY, 1)
a.setsockopt(S, socket.SO_LINGER, struct.pack("ii", 1, 5))
a.setsockopt(T, socket.TCP_CONGESTION, b"reno")
a.setsockopt(S, socket.SO_PRIORITY, 3)
a.setsockopt(T, socket.TCP_MAXSEG, 1200)
a.bind(("127.0.0.1", int(sys.argv[1])))
a.listen(7)
b = socket.socket(socket.AF_INET6)
b.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
b.setsockopt(S, socket.SO_REUSEPORT, 1)
b.setsockopt(S, socket.SO_KEEPALIVE, 1)
b.setsockopt(T, socket.TCP_KEEPIDLE, 77)
b.setsockopt(S, socket.SO_RCVBUF, 65536)
b.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 9)
b.setsockopt(T, socket.TCP_DEFER_ACCEPT, 3)
b.bind(("::1", int(sys.argv[2])))
b.listen(3)
b.setblocking(False)
c = socket.socket()
c.setsockopt(S, socket.SO_KEEPALIVE, 1)
d = socket.socket(socket.AF_INET6)
d.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
d.bind(("::", 0))
while True:
    conn, _ = a.accept()
    conn.sendall(json.dumps([report(s) for s in (a, b, c, d)]).encode())
    conn.close()
`;

async function listenersReport(port: number): Promise<string> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  return await readAll(conn);
}

Deno.test("TCP listeners (IPv4, IPv6) and unconnected sockets come back with their options", async () => {
  await using tmp = await tempDir();
  const [p4, p6] = [freePort(), freePort()];
  const target = spawnTarget(["setsid", PYTHON, "-c", LISTENERS_PY, String(p4), String(p6)]);
  try {
    const before = await waitFor(
      () => listenersReport(p4).catch(() => undefined),
      "the target does not answer",
      30_000,
    );
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(target.pid, img)), 0, "dump");
    await target.child.status;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    assert.equal(await listenersReport(p4), before, "sockets after restore");
    // The IPv6 listener takes connections as well.
    const c6 = await Deno.connect({ hostname: "::1", port: p6 });
    c6.close();
  } finally {
    await killTree(target.pid);
  }
});

/** A listener nobody accepts from. */
const NO_ACCEPT_PY = `import socket, sys, time
a = socket.socket()
a.bind(("127.0.0.1", int(sys.argv[1])))
a.listen(5)
open(sys.argv[2], "w").write("ready\\n")
time.sleep(600)
`;

Deno.test("a listener with a connection waiting to be accepted is refused, the tree runs on", async () => {
  await using tmp = await tempDir();
  const port = freePort();
  const ready = `${tmp.path}/ready`;
  const target = spawnTarget(["setsid", PYTHON, "-c", NO_ACCEPT_PY, String(port), ready]);
  try {
    await waitForLines(ready, 1, 30_000);
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    try {
      const msg = assertOneLineError(
        await amber(dumpArgs(target.pid, `${tmp.path}/img`)),
        1,
        "dump",
      );
      assert.match(msg, new RegExp(`tcp 127\\.0\\.0\\.1:${port} \\(LISTEN\\): 1 connection`));
      assert.ok(isAlive(target.pid), "the target runs on");
    } finally {
      conn.close();
    }
  } finally {
    await killTree(target.pid);
  }
});

/**
 * Echoes one connection, checking that what it receives is the byte
 * pattern i % 251; prints "PASS n" or "FAIL at n" at the end.
 */
const ECHO_PY = `import socket, sys
host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
l = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if host == "::":
    l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
l.bind((host, int(sys.argv[1])))
l.listen(4)
open(sys.argv[2], "w").write("ready\\n")
c, _ = l.accept()
n = 0
verdict = None
while True:
    b = c.recv(65536)
    if not b:
        break
    if verdict is None and b != bytes((n + i) % 251 for i in range(len(b))):
        verdict = "FAIL at %d" % n
    n += len(b)
    c.sendall(b)
open(sys.argv[2], "a").write((verdict or "PASS %d" % n) + "\\n")
`;

function pattern(from: number, len: number): Uint8Array {
  return Uint8Array.from({ length: len }, (_, i) => (from + i) % 251);
}

/** Streams `total` patterned bytes through `conn` while reading the echo; resolves to the bytes checked. */
function streamThrough(conn: Deno.Conn, total: number, progress: { got: number }) {
  const writer = (async () => {
    for (let sent = 0; sent < total;) {
      const chunk = pattern(sent, Math.min(16384, total - sent));
      for (let at = 0; at < chunk.length;) at += await conn.write(chunk.subarray(at));
      sent += chunk.length;
      await new Promise((r) => setTimeout(r, 2));
    }
  })();
  const reader = (async () => {
    const buf = new Uint8Array(65536);
    while (progress.got < total) {
      const n = await conn.read(buf);
      if (n === null) throw new Error(`the echo ended after ${progress.got} bytes`);
      const want = pattern(progress.got, n);
      if (!buf.subarray(0, n).every((b, i) => b === want[i])) {
        throw new Error(`the echo differs from what was sent at byte ${progress.got}`);
      }
      progress.got += n;
    }
  })();
  return Promise.all([writer, reader]);
}

async function startEcho(
  dir: string,
  host = "127.0.0.1",
): Promise<{ target: Target; port: number; out: string }> {
  const port = freePort();
  const out = `${dir}/echo.txt`;
  const target = spawnTarget(["setsid", PYTHON, "-c", ECHO_PY, String(port), out, host]);
  await waitForLines(out, 1, 30_000);
  return { target, port, out };
}

Deno.test({
  name:
    "an established connection is refused without --tcp-established, with it the stream stays exact",
  ignore: !HAVE_NFT,
  async fn() {
    await using tmp = await tempDir();
    const { target, port, out } = await startEcho(tmp.path);
    try {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      const total = 4 << 20;
      const progress = { got: 0 };
      const stream = streamThrough(conn, total, progress);
      try {
        await until(() => progress.got > 256 << 10, "no echo", 30_000);
        const img = `${tmp.path}/img`;
        const msg = assertOneLineError(await amber(dumpArgs(target.pid, img)), 1, "plain dump");
        assert.match(
          msg,
          /fd \d+: tcp 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+ \(ESTABLISHED\).*--tcp-established/,
        );
        await assertNoLock("after a refused dump");
        assertExit(await amber(dumpArgs(target.pid, img, "--tcp-established")), 0, "dump");
        await target.child.status;
        assert.equal((await lockTables()).length, 1, "the lock table between dump and restore");
        const during = progress.got;
        assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
        await assertNoLock("after restore");
        await stream;
        assert.ok(progress.got > during, "the echo went on after restore");
      } finally {
        conn.close();
      }
      const lines = await waitForLines(out, 2, 30_000);
      assert.equal(lines[1], `PASS ${total}`, "what the server received");
    } finally {
      await killTree(target.pid);
      await assertNoLock("at the end");
    }
  },
});

for (const [listen, connect] of [["::1", "::1"], ["::", "127.0.0.1"]]) {
  Deno.test({
    name: `an IPv6 connection (listening on ${listen}, client to ${connect}) keeps its stream`,
    ignore: !HAVE_NFT,
    async fn() {
      await using tmp = await tempDir();
      const { target, port, out } = await startEcho(tmp.path, listen);
      try {
        const conn = await Deno.connect({ hostname: connect, port });
        const total = 2 << 20;
        const progress = { got: 0 };
        const stream = streamThrough(conn, total, progress);
        try {
          await until(() => progress.got > 128 << 10, "no echo", 30_000);
          const img = `${tmp.path}/img`;
          assertExit(await amber(dumpArgs(target.pid, img, "--tcp-established")), 0, "dump");
          await target.child.status;
          assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
          await assertNoLock("after restore");
          await stream;
        } finally {
          conn.close();
        }
        assert.equal((await waitForLines(out, 2, 30_000))[1], `PASS ${total}`);
      } finally {
        await killTree(target.pid);
      }
    },
  });
}

Deno.test({
  name: "dump -R --tcp-established: the connection goes on, the lock is gone at once",
  ignore: !HAVE_NFT,
  async fn() {
    await using tmp = await tempDir();
    const { target, port, out } = await startEcho(tmp.path);
    try {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      const total = 2 << 20;
      const progress = { got: 0 };
      const stream = streamThrough(conn, total, progress);
      try {
        await until(() => progress.got > 128 << 10, "no echo", 30_000);
        const img = `${tmp.path}/img`;
        assertExit(await amber(dumpArgs(target.pid, img, "-R", "--tcp-established")), 0, "dump");
        await assertNoLock("after dump -R");
        await stream;
      } finally {
        conn.close();
      }
      assert.equal((await waitForLines(out, 2, 30_000))[1], `PASS ${total}`);
    } finally {
      await killTree(target.pid);
    }
  },
});

for (const fault of ["before-commit", "before-commit:SIGINT"]) {
  Deno.test({
    name: `a dump that fails (${fault}) unlocks at once; the connection goes on`,
    ignore: !HAVE_NFT,
    async fn() {
      await using tmp = await tempDir();
      const { target, port, out } = await startEcho(tmp.path);
      try {
        const conn = await Deno.connect({ hostname: "127.0.0.1", port });
        const total = 1 << 20;
        const progress = { got: 0 };
        const stream = streamThrough(conn, total, progress);
        try {
          await until(() => progress.got > 64 << 10, "no echo", 30_000);
          const r = await amber(dumpArgs(target.pid, `${tmp.path}/img`, "--tcp-established"), {
            AMBER_TEST_FAULT: fault,
          });
          assert.notEqual(r.code, 0, "the dump fails");
          await assertNoLock("after a failed dump");
          assert.ok(isAlive(target.pid), "the target runs on");
          await stream;
        } finally {
          conn.close();
        }
        assert.equal((await waitForLines(out, 2, 30_000))[1], `PASS ${total}`);
      } finally {
        await killTree(target.pid);
      }
    },
  });
}

Deno.test({
  name: "a restore that fails removes the lock and leaves nothing running",
  ignore: !HAVE_NFT,
  async fn() {
    await using tmp = await tempDir();
    const { target, port } = await startEcho(tmp.path);
    try {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      try {
        await conn.write(pattern(0, 1000));
        const img = `${tmp.path}/img`;
        assertExit(await amber(dumpArgs(target.pid, img, "--tcp-established")), 0, "dump");
        await target.child.status;
        await waitVanished([target.pid]);
        const r = await amber(["restore", "-D", img, "-d"], {
          AMBER_TEST_FAULT: "before-detach",
        });
        assertOneLineError(r, 1, "restore");
        await assertNoLock("after a failed restore");
        assert.ok(!isAlive(target.pid), "nothing of the tree runs");
      } finally {
        conn.close();
      }
    } finally {
      await killTree(target.pid);
    }
  },
});

/** Sends the byte pattern to one connection as fast as it is taken, then waits. */
const PUSH_PY = `import socket, sys, time
l = socket.socket()
l.bind(("127.0.0.1", int(sys.argv[1])))
l.listen(1)
open(sys.argv[2], "w").write("ready\\n")
c, _ = l.accept()
c.sendall(bytes(i % 251 for i in range(int(sys.argv[3]))))
time.sleep(600)
`;

/** Every tcp entry of the images, from show --json. */
function tcpEntries(doc: Json): Json[] {
  const out: Json[] = [];
  const walk = (v: Json) => {
    if (Array.isArray(v)) v.forEach(walk);
    else if (v && typeof v === "object") {
      if (v.kind === "tcp") out.push(v);
      Object.values(v).forEach(walk);
    }
  };
  walk(doc);
  return out;
}

Deno.test({
  name: "bytes a connection could not send yet (its peer did not read) are sent after restore",
  ignore: !HAVE_NFT,
  async fn() {
    await using tmp = await tempDir();
    const port = freePort(), total = 16 << 20;
    const ready = `${tmp.path}/ready`;
    const target = spawnTarget([
      "setsid",
      PYTHON,
      "-c",
      PUSH_PY,
      String(port),
      ready,
      String(total),
    ]);
    try {
      await waitForLines(ready, 1, 30_000);
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      try {
        // Nothing is read: the server's send queue fills and stays full.
        await until(
          () => Deno.readTextFileSync(`/proc/${target.pid}/wchan`) === "wait_woken",
          "the server does not block in send",
          30_000,
        );
        const img = `${tmp.path}/img`;
        assertExit(await amber(dumpArgs(target.pid, img, "--tcp-established")), 0, "dump");
        await target.child.status;
        const queued = tcpEntries(await showJson(img)).find((e) => e.state === 1)?.repair;
        assert.ok(queued?.unsent > 0, "the dump saw never-sent bytes in the send queue");
        assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
        await assertNoLock("after restore");
        const buf = new Uint8Array(65536);
        for (let got = 0; got < total;) {
          const n = await conn.read(buf);
          if (n === null) throw new Error(`the stream ended after ${got} bytes`);
          const want = pattern(got, n);
          assert.ok(buf.subarray(0, n).every((b, i) => b === want[i]), `byte ${got} differs`);
          got += n;
        }
      } finally {
        conn.close();
      }
    } finally {
      await killTree(target.pid);
    }
  },
});

/**
 * A parent and its child talking over loopback TCP, both checking the
 * other's byte pattern; each appends its received total to its own file.
 */
const PAIR_PY = `import os, socket, sys, time
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(1)
port = l.getsockname()[1]
def run(s, out):
    s.setblocking(False)
    sent = got = 0
    while True:
        try:
            sent += s.send(bytes((sent + i) % 251 for i in range(4096)))
        except BlockingIOError:
            pass
        try:
            b = s.recv(65536)
            if not b:
                out.write("EOF\\n"); return
            if b != bytes((got + i) % 251 for i in range(len(b))):
                out.write("FAIL at %d\\n" % got); return
            got += len(b)
            out.write("%d\\n" % got); out.flush()
        except BlockingIOError:
            pass
        time.sleep(0.005)
if os.fork() == 0:
    l.close()
    s = socket.create_connection(("127.0.0.1", port))
    run(s, open(sys.argv[2], "w"))
else:
    s, _ = l.accept()
    run(s, open(sys.argv[1], "w"))
`;

async function lastCount(file: string): Promise<string> {
  return (await readLines(file)).at(-1) ?? "";
}

Deno.test({
  name: "a loopback connection between a parent and its child keeps its byte stream exact",
  ignore: !HAVE_NFT,
  async fn() {
    await using tmp = await tempDir();
    const [a, b] = [`${tmp.path}/parent.txt`, `${tmp.path}/child.txt`];
    const target = spawnTarget(["setsid", PYTHON, "-c", PAIR_PY, a, b]);
    let pids: number[] = [];
    try {
      await waitForLines(a, 5, 30_000);
      await waitForLines(b, 5, 30_000);
      pids = [
        target.pid,
        ...(await waitFor(() => {
          const kids = Deno.readTextFileSync(`/proc/${target.pid}/task/${target.pid}/children`)
            .trim();
          return kids ? kids.split(" ").map(Number) : undefined;
        }, "no child")),
      ];
      const img = `${tmp.path}/img`;
      assertExit(await amber(dumpArgs(target.pid, img, "--tcp-established")), 0, "dump");
      await waitVanished(pids);
      const at = [Number(await lastCount(a)), Number(await lastCount(b))];
      assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
      await assertNoLock("after restore");
      for (const [i, f] of [a, b].entries()) {
        await until(
          () => {
            const last = Deno.readTextFileSync(f).trim().split("\n").at(-1) ?? "";
            if (!/^\d+$/.test(last)) throw new Error(`${f}: ${last}`);
            return Number(last) > at[i] + (256 << 10);
          },
          `${f}: the stream does not go on`,
          60_000,
        );
      }
    } finally {
      for (const p of pids) await killTree(p);
      await killTree(target.pid);
    }
  },
});

/** RESP: one INCR command, and its reply read off the stream. */
const INCR = new TextEncoder().encode("*2\r\n$4\r\nINCR\r\n$7\r\ncounter\r\n");

async function redisCli(port: number, ...args: string[]): Promise<string> {
  const r = await new Deno.Command("redis-cli", {
    args: ["-p", String(port), ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.ok(r.success, `redis-cli ${args.join(" ")}: ${new TextDecoder().decode(r.stderr)}`);
  return new TextDecoder().decode(r.stdout).trim();
}

Deno.test({
  name: "redis-server on TCP: one client connection sends INCR through dump and restore",
  ignore: !HAVE_NFT || !HAVE_REDIS,
  async fn() {
    await using tmp = await tempDir();
    const port = freePort();
    const target = spawnTarget([
      "setsid",
      "redis-server",
      "--port",
      String(port),
      "--bind",
      "127.0.0.1",
      "--save",
      "",
      "--appendonly",
      "no",
      "--dir",
      tmp.path,
      "--enable-debug-command",
      "yes",
    ]);
    try {
      await waitFor(() => redisCli(port, "PING").catch(() => undefined), "no redis", 30_000);
      await redisCli(port, "DEBUG", "POPULATE", "20000", "key", "64");
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      let replies = 0, stop = false;
      const client = (async () => {
        const buf = new Uint8Array(64);
        let pending = "";
        while (!stop) {
          await conn.write(INCR);
          while (!pending.includes("\r\n")) {
            const n = await conn.read(buf);
            if (n === null) throw new Error(`the connection ended after ${replies} replies`);
            pending += new TextDecoder().decode(buf.subarray(0, n));
          }
          const [line, rest] = [
            pending.slice(0, pending.indexOf("\r\n")),
            pending.slice(pending.indexOf("\r\n") + 2),
          ];
          pending = rest;
          assert.equal(line, `:${replies + 1}`, "the reply to INCR");
          replies++;
        }
      })();
      try {
        await until(() => replies > 200, "no replies", 30_000);
        const img = `${tmp.path}/img`;
        assertExit(await amber(dumpArgs(target.pid, img, "--tcp-established")), 0, "dump");
        await target.child.status;
        const during = replies;
        assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
        await assertNoLock("after restore");
        await until(() => replies > during + 200, "no replies after restore", 60_000);
        stop = true;
        await client;
      } finally {
        stop = true;
        conn.close();
        await client.catch(() => {});
      }
      assert.equal(await redisCli(port, "GET", "counter"), String(replies), "the counter");
      assert.equal(await redisCli(port, "DBSIZE"), "20001", "the dataset");
    } finally {
      await killTree(target.pid);
    }
  },
});

/**
 * UDP echo on 127.0.0.1 and ::1 (one socket each), plus a socket connected
 * to the v4 one that sends "ping" through it when asked on the v4 echo.
 */
const UDP_PY = `import select, socket, sys
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
a.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
a.bind(("127.0.0.1", int(sys.argv[1])))
b = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
b.bind(("::1", int(sys.argv[2])))
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.connect(("127.0.0.1", int(sys.argv[1])))
open(sys.argv[3], "w").write("ready\\n")
while True:
    for s in select.select([a, b, c], [], [])[0]:
        data, src = s.recvfrom(65536)
        if s is c:
            continue
        if data == b"via c":
            c.send(b"from c")
            data = s.recv(65536) + b" " + repr(c.getpeername()).encode()
        s.sendto(data + b" " + repr(s.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST)).encode(), src)
`;

async function udpAsk(family: "4" | "6", port: number, msg: string): Promise<string> {
  const [af, host] = family === "4" ? ["AF_INET", "127.0.0.1"] : ["AF_INET6", "::1"];
  const py = `import socket, sys
s = socket.socket(socket.${af}, socket.SOCK_DGRAM)
s.settimeout(20)
s.sendto(sys.argv[1].encode(), ("${host}", ${port}))
print(s.recv(65536).decode())`;
  const r = await new Deno.Command(PYTHON, { args: ["-c", py, msg], stdout: "piped" }).output();
  assert.ok(r.success, `udp ${family} ${msg}: no answer`);
  return new TextDecoder().decode(r.stdout).trim();
}

Deno.test("UDP sockets come back bound, connected and with their options", async () => {
  await using tmp = await tempDir();
  const [p4, p6] = [freePort(), freePort()];
  const ready = `${tmp.path}/ready`;
  const target = spawnTarget(["setsid", PYTHON, "-c", UDP_PY, String(p4), String(p6), ready]);
  try {
    await waitForLines(ready, 1, 30_000);
    const before = [
      await udpAsk("4", p4, "hello"),
      await udpAsk("6", p6, "hi"),
      await udpAsk("4", p4, "via c"),
    ];
    assert.equal(before[0], "hello 1");
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(target.pid, img)), 0, "dump");
    await target.child.status;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    const after = [
      await udpAsk("4", p4, "hello"),
      await udpAsk("6", p6, "hi"),
      await udpAsk("4", p4, "via c"),
    ];
    assert.deepEqual(after, before);
  } finally {
    await killTree(target.pid);
  }
});

/** A UDP socket holding corked data (second argument "udp"), or a netlink socket ("netlink"). */
const IDLE_PY = `import socket, sys, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", int(sys.argv[1])))
if sys.argv[2] == "udp":
    u.setsockopt(socket.IPPROTO_UDP, 1, 1)  # UDP_CORK
    u.sendto(b"corked", ("127.0.0.1", 9))
if sys.argv[2] == "netlink":
    n = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    n.bind((0, 1))
open(sys.argv[3], "w").write("ready\\n")
time.sleep(600)
`;

for (
  const [what, arg, refusal] of [
    [
      "corked data on a UDP socket",
      "udp",
      /udp 127\.0\.0\.1:\d+: corked data not yet sent/,
    ],
    ["a netlink socket", "netlink", /netlink raw NETLINK_ROUTE socket:\[\d+\]: netlink sockets/],
  ] as const
) {
  Deno.test(`${what} is refused, naming it; the tree runs on`, async () => {
    await using tmp = await tempDir();
    const port = freePort();
    const ready = `${tmp.path}/ready`;
    const target = spawnTarget(["setsid", PYTHON, "-c", IDLE_PY, String(port), arg, ready]);
    try {
      await waitForLines(ready, 1, 30_000);
      const msg = assertOneLineError(
        await amber(dumpArgs(target.pid, `${tmp.path}/img`)),
        1,
        "dump",
      );
      assert.match(msg, refusal);
      assert.ok(isAlive(target.pid), "the target runs on");
    } finally {
      await killTree(target.pid);
    }
  });
}

Deno.test({
  name: "amber check says whether the network lock works",
  ignore: !HAVE_NFT,
  async fn() {
    const r = await amber(["check"]);
    assert.match(
      r.stdout,
      /^ok +nftables: an nftables table dropping a connection.s packets can be added and removed/m,
      r.stdout,
    );
  },
});

/**
 * The tree's side of a connection that is half-closed when dumped
 * (argv: port, its output file, a go file, the state to reach, and "sent"
 * for a FIN of ours sent but not acknowledged). It accepts one connection
 * and sends the byte pattern: a little, or, for the states whose FIN waits
 * behind unsent bytes, until the peer's window is full. With "sent" it
 * writes "drop" once its bytes are acknowledged and waits for GO.shut
 * (the test then drops what it sends). It shuts down its side where the
 * state wants it ("fin" in CLOSING, for the peer to close then), writes
 * "ready SENT" once the socket is in that state, and after restore (the go
 * file) reads everything until EOF and closes: "done RECEIVED ok|FAIL".
 */
const HALF_PY = `import os, socket, sys, time
port, out, go, state = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
fin_sent = sys.argv[5:] == ["sent"]
NAMES = ["", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
         "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING"]
def log(line):
    with open(out, "a") as f:
        f.write(line + "\\n")
def wait_state(s, *names):
    while NAMES[s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]] not in names:
        time.sleep(0.01)
def pattern(at, n):
    return bytes((at + i) % 251 for i in range(n))
host = os.environ.get("HALF_HOST", "127.0.0.1")
l = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
if host == "::":
    l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
l.bind((host, port))
l.listen(1)
log("listening")
c, _ = l.accept()
sent = 0
def fill():
    global sent
    c.setblocking(False)
    try:
        while True:
            sent += c.send(pattern(sent, 65536))
    except BlockingIOError:
        pass
    c.setblocking(True)
if state in ("CLOSE_WAIT", "FIN_WAIT2") or fin_sent:
    c.sendall(pattern(0, 1000))
    sent = 1000
if state == "LAST_ACK":
    wait_state(c, "CLOSE_WAIT")
if fin_sent:
    import array, fcntl
    outq = array.array("i", [1])
    while outq[0]:
        fcntl.ioctl(c, 0x5411, outq)  # SIOCOUTQ
        time.sleep(0.01)
    log("drop")
    while not os.path.exists(go + ".shut"):
        time.sleep(0.01)
elif state in ("FIN_WAIT1", "LAST_ACK", "CLOSING"):
    fill()
if state != "CLOSE_WAIT":
    c.shutdown(socket.SHUT_WR)
if state == "CLOSING":
    log("fin")
wait_state(c, state)
log("ready %d" % sent)
while not os.path.exists(go):
    time.sleep(0.02)
got, ok = 0, True
while True:
    b = c.recv(65536)
    if not b:
        break
    ok = ok and b == pattern(got, len(b))
    got += len(b)
c.close()
log("done %d %s" % (got, "ok" if ok else "FAIL"))
time.sleep(600)
`;

/** Python: reads socket c until EOF, checking the pattern: "RECEIVED ok|FAIL EOF|error:ERRNO". */
const READ_ALL_PY = `def read_all(c):
    got, ok, end = 0, True, "EOF"
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            ok = ok and b == bytes((got + i) % 251 for i in range(len(b)))
            got += len(b)
    except OSError as e:
        end = "error:%s" % e.errno
    return "%d %s %s" % (got, "ok" if ok else "FAIL", end)
`;

/**
 * The peer outside the tree, driven line by line on stdin: "send N" sends
 * N bytes of the pattern, "shut" shuts its side down, "read" reads until
 * EOF ("read RECEIVED ok|FAIL EOF|error"), "status" prints SO_ERROR and
 * what one more recv returns.
 */
const PEER_PY = `import socket, sys
${READ_ALL_PY}c = socket.create_connection((sys.argv[2], int(sys.argv[1])))
sent = 0
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "send":
        c.sendall(bytes((sent + i) % 251 for i in range(int(cmd[1]))))
        sent += int(cmd[1])
        print("sent")
    elif cmd[0] == "shut":
        c.shutdown(socket.SHUT_WR)
        print("shut")
    elif cmd[0] == "read":
        print("read " + read_all(c))
    elif cmd[0] == "status":
        err = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        try:
            more = repr(c.recv(10))
        except OSError as e:
            more = "error:%s" % e.errno
        print("status %d %s" % (err, more))
    sys.stdout.flush()
`;

/** A line-driven child process: `ask` writes one command and returns its answer line. */
function linePeer(argv: string[]) {
  const child = new Deno.Command(argv[0], {
    args: argv.slice(1),
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const writer = child.stdin.getWriter(), reader = child.stdout.getReader();
  let pending = "";
  const ask = async (cmd: string): Promise<string> => {
    await writer.write(new TextEncoder().encode(cmd + "\n"));
    while (!pending.includes("\n")) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`peer: no answer to ${cmd}`);
      pending += new TextDecoder().decode(value);
    }
    const line = pending.slice(0, pending.indexOf("\n"));
    pending = pending.slice(line.length + 1);
    return line;
  };
  const stop = async () => {
    await writer.close().catch(() => {});
    reader.releaseLock();
    await child.stdout.cancel().catch(() => {});
    child.kill("SIGKILL");
    await child.status;
  };
  return { ask, stop };
}

const PEER_BYTES = 5000;
const TCP_STATE_NUMBER = { FIN_WAIT1: 4, FIN_WAIT2: 5, CLOSE_WAIT: 8, LAST_ACK: 9, CLOSING: 11 };

/** Removes the lock tables of dumps of `pid` (after a failed test, which did not restore them). */
async function removeLocksOf(pid: number): Promise<void> {
  for (const t of (await lockTables()).filter((t) => t.startsWith(`amber_${pid}_`))) {
    await new Deno.Command("nft", { args: ["delete", "table", "inet", t] }).output();
  }
}

/** Drops what the tree's side at `port` sends as it arrives (so it counts as sent), in a table of the test's own. */
async function dropFrom(port: number): Promise<AsyncDisposable> {
  const table = `tcptest_${Deno.pid}_${port}`;
  const nft = async (cmd: string) => {
    const r = await new Deno.Command("nft", { args: [cmd], stderr: "piped" }).output();
    assert.ok(r.success, `nft ${cmd}: ${new TextDecoder().decode(r.stderr)}`);
  };
  await nft(
    `add table inet ${table} ; add chain inet ${table} in { type filter hook input priority 0 ; } ; ` +
      `add rule inet ${table} in tcp sport ${port} drop`,
  );
  return { [Symbol.asyncDispose]: () => nft(`delete table inet ${table}`) };
}

/** State, how our FIN stands, where the tree's side listens and where the peer connects. */
const HALF_CLOSED = [
  ["CLOSE_WAIT", "", "127.0.0.1", "127.0.0.1"],
  ["FIN_WAIT2", "", "127.0.0.1", "127.0.0.1"],
  ["FIN_WAIT1", "its FIN behind unsent bytes", "127.0.0.1", "127.0.0.1"],
  ["LAST_ACK", "its FIN behind unsent bytes", "127.0.0.1", "127.0.0.1"],
  ["CLOSING", "its FIN behind unsent bytes", "127.0.0.1", "127.0.0.1"],
  ["FIN_WAIT1", "sent", "127.0.0.1", "127.0.0.1"],
  ["LAST_ACK", "sent", "127.0.0.1", "127.0.0.1"],
  ["CLOSING", "sent", "127.0.0.1", "127.0.0.1"],
  ["CLOSE_WAIT", "", "::1", "::1"],
  ["LAST_ACK", "sent", "::1", "::1"],
  ["FIN_WAIT2", "", "::", "127.0.0.1"],
  // dump -R: the tree runs on, the lock is gone at once.
  ["CLOSE_WAIT", "", "127.0.0.1", "127.0.0.1", "-R"],
  ["FIN_WAIT1", "sent", "127.0.0.1", "127.0.0.1", "-R"],
] as const;

for (const [state, how, listen, connect, leaveRunning] of HALF_CLOSED) {
  const sentFin = how === "sent";
  const label = (how ? ` (${sentFin ? "its FIN sent, not acknowledged" : how})` : "") +
    (listen === "127.0.0.1" ? "" : ` over IPv6 (listening on ${listen}, peer to ${connect})`) +
    (leaveRunning ? ", dumped with -R," : "");
  Deno.test({
    name: `a connection in ${state}${label} with its peer outside ${
      leaveRunning ? "runs on" : "is restored"
    } and closes as it would have`,
    ignore: !HAVE_NFT,
    async fn() {
      await using tmp = await tempDir();
      const port = freePort();
      const [out, go] = [`${tmp.path}/half.txt`, `${tmp.path}/go`];
      const argv = [
        PYTHON,
        "-c",
        HALF_PY,
        String(port),
        out,
        go,
        state,
        ...(sentFin ? ["sent"] : []),
      ];
      const target = spawnTarget(["setsid", ...argv], { env: { HALF_HOST: listen } });
      let peer: ReturnType<typeof linePeer> | undefined;
      let drop: AsyncDisposable | undefined;
      let done = false;
      const line = async (prefix: string) =>
        (await waitForLine(out, (ls) => ls.some((l) => l.startsWith(prefix)), 30_000))
          .find((l) => l.startsWith(prefix))!;
      try {
        await line("listening");
        peer = linePeer([PYTHON, "-c", PEER_PY, String(port), connect]);
        // The peer closes its side first where its FIN came before ours, or after (CLOSING).
        const peerFirst = state === "CLOSE_WAIT" || state === "LAST_ACK";
        if (peerFirst) {
          await peer.ask(`send ${PEER_BYTES}`);
          await peer.ask("shut");
        }
        if (sentFin) {
          // Our FIN leaves, but never reaches the peer: nothing acknowledges it.
          await line("drop");
          drop = await dropFrom(port);
          await Deno.writeTextFile(`${go}.shut`, "");
        }
        if (state === "CLOSING") {
          await line("fin");
          await peer.ask(`send ${PEER_BYTES}`);
          await peer.ask("shut");
        }
        const sent = Number((await line("ready")).split(" ")[1]);
        const img = `${tmp.path}/img`;
        const flags = ["--tcp-established", ...(leaveRunning ? [leaveRunning] : [])];
        assertExit(await amber(dumpArgs(target.pid, img, ...flags)), 0, "dump");
        if (!leaveRunning) await target.child.status;
        await drop?.[Symbol.asyncDispose]();
        drop = undefined;
        const entry = tcpEntries(await showJson(img)).find((e) => e.peer);
        assert.equal(entry?.state, TCP_STATE_NUMBER[state], "the state dumped");
        assert.equal(entry?.repair?.finUnsent ?? false, how !== "" && !sentFin, "an unsent FIN");
        if (leaveRunning) await assertNoLock("after dump -R");
        else {
          assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
          await assertNoLock("after restore");
        }
        await Deno.writeTextFile(go, "");
        if (!peerFirst && state !== "CLOSING") {
          await peer.ask(`send ${PEER_BYTES}`);
          await peer.ask("shut");
        }
        assert.equal(await peer.ask("read"), `read ${sent} ok EOF`, "what the peer received");
        assert.equal(await line("done"), `done ${PEER_BYTES} ok`, "what the tree's side received");
        // Both sides closed without a reset: no error, and recv still says EOF.
        assert.equal(await peer.ask("status"), "status 0 b''", "the peer after the close");
        done = true;
      } finally {
        await drop?.[Symbol.asyncDispose]();
        await peer?.stop();
        await killTree(target.pid);
        // A failure between dump and restore leaves the dump's lock: not amber's fault, not to be kept.
        if (!done) await removeLocksOf(target.pid);
      }
      await assertNoLock("at the end");
    },
  });
}

/**
 * A listener outside the tree whose accept queue is full (it holds one
 * connection of its own, with backlog 0), so SYNs to it are dropped and a
 * client stays in SYN_SENT; it watches every other SYN arriving on loopback.
 * Commands: "syns" (the SYNs seen so far as "syns PORT:SEQ ..."), "free"
 * (accepts its own connection: the queue has room again), "serve" (accepts
 * the next, reads until EOF: "served RECEIVED ok|FAIL EOF|error").
 */
const LISTEN_PY = `import socket, struct, sys, threading
${READ_ALL_PY}l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(0)
port = l.getsockname()[1]
cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
cap.bind(("lo", 0x0800))
syns = []
def watch():
    while True:
        pkt, addr = cap.recvfrom(65536)
        if addr[2] != socket.PACKET_HOST or pkt[9] != 6:
            continue
        t = pkt[(pkt[0] & 15) * 4:]
        sport, dport, seq = struct.unpack("!HHI", t[:8])
        if dport == port and t[13] & 0x12 == 0x02:
            syns.append("%d:%d" % (sport, seq))
threading.Thread(target=watch, daemon=True).start()
mine = socket.create_connection(("127.0.0.1", port))
own = "%d:" % mine.getsockname()[1]
print(port)
sys.stdout.flush()
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "syns":
        print("syns " + " ".join(x for x in syns if not x.startswith(own)))
    elif cmd == "free":
        l.accept()[0].close()
        mine.close()
        print("free")
    elif cmd == "serve":
        print("served " + read_all(l.accept()[0]))
    sys.stdout.flush()
`;

/** Connects to argv[1] (blocking, or "nonblocking" and waiting for it), then sends argv[3] bytes of the pattern. */
const CONNECT_PY = `import select, socket, sys
port, out, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = socket.socket()
open(out, "a").write("connecting\\n")
if sys.argv[4] == "nonblocking":
    s.setblocking(False)
    assert s.connect_ex(("127.0.0.1", port)) == 115  # EINPROGRESS
    select.select([], [s], [])
    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    s.setblocking(True)
else:
    s.connect(("127.0.0.1", port))
    err = 0
open(out, "a").write("connected %d %d\\n" % (err, s.getsockname()[1]))
s.sendall(bytes(i % 251 for i in range(n)))
s.close()
open(out, "a").write("sent\\n")
`;

for (const mode of ["blocking", "nonblocking"]) {
  Deno.test({
    name:
      `a ${mode} connect() in progress (SYN_SENT) is restored: the peer sees the same SYN again`,
    ignore: !HAVE_NFT,
    async fn() {
      await using tmp = await tempDir();
      const out = `${tmp.path}/connect.txt`;
      const listener = linePeer([PYTHON, "-c", LISTEN_PY]);
      let target: Target | undefined;
      let done = false;
      try {
        const port = Number(await listener.ask(""));
        await listener.ask("syns"); // (the empty line's answer: the port)
        target = spawnTarget([
          "setsid",
          PYTHON,
          "-c",
          CONNECT_PY,
          String(port),
          out,
          "100000",
          mode,
        ]);
        await waitForLines(out, 1, 30_000);
        // Its SYN was dropped (the queue is full): it is connecting, and retransmits.
        const first = await waitFor(
          async () => {
            const syns = (await listener.ask("syns")).split(" ").slice(1);
            return syns.length ? syns[0] : undefined;
          },
          "no SYN from the target",
          30_000,
        );
        const img = `${tmp.path}/img`;
        assertExit(await amber(dumpArgs(target.pid, img, "--tcp-established")), 0, "dump");
        await target.child.status;
        const entry = tcpEntries(await showJson(img)).find((e) => e.peer);
        assert.equal(entry?.state, 2, "dumped in SYN_SENT");
        assert.equal(await listener.ask("free"), "free");
        assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
        await assertNoLock("after restore");
        assert.equal(await listener.ask("serve"), "served 100000 ok EOF", "what the peer received");
        const lines = await waitForLines(out, 3, 30_000);
        assert.equal(
          lines[1],
          `connected 0 ${first.split(":")[0]}`,
          "the connect, as the target saw it",
        );
        // Every SYN from that port, before and after the dump, is the same one.
        const syns = (await listener.ask("syns")).split(" ").slice(1);
        assert.ok(syns.length >= 2, `SYNs seen: ${syns}`);
        assert.deepEqual(new Set(syns), new Set([first]), "the SYNs the peer saw");
        done = true;
      } finally {
        await listener.stop();
        if (target) {
          await killTree(target.pid);
          if (!done) await removeLocksOf(target.pid);
        }
      }
      await assertNoLock("at the end");
    },
  });
}

/** A server that closes each connection first (so its side lingers in TIME_WAIT); argv[2] "reuse" sets SO_REUSEADDR. */
const CLOSE_FIRST_PY = `import socket, sys
l = socket.socket()
if sys.argv[2] == "reuse":
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1])))
l.listen(4)
n = 0
while True:
    c, _ = l.accept()
    n += 1
    c.sendall(b"hello %d" % n)
    c.close()
`;

/** Whether a TIME_WAIT connection on local port `port` is in this network's /proc/net/tcp. */
function timeWaitOn(port: number): boolean {
  const hex = port.toString(16).toUpperCase().padStart(4, "0");
  return Deno.readTextFileSync("/proc/net/tcp").split("\n").some((l) => {
    const f = l.trim().split(/\s+/);
    return f[1]?.endsWith(`:${hex}`) && f[3] === "06";
  });
}

for (const reuse of ["reuse", "no-reuse"]) {
  Deno.test(`a listener (${reuse}) whose port holds TIME_WAIT connections is bound again`, async () => {
    const port = freePort();
    const target = spawnTarget(["setsid", PYTHON, "-c", CLOSE_FIRST_PY, String(port), reuse]);
    await using tmp = await tempDir();
    try {
      const ask = async () => await readAll(await Deno.connect({ hostname: "127.0.0.1", port }));
      assert.equal(
        await waitFor(() => ask().catch(() => undefined), "no server", 30_000),
        "hello 1",
      );
      assert.ok(timeWaitOn(port), "the server's side of the connection is in TIME_WAIT");
      const img = `${tmp.path}/img`;
      assertExit(await amber(dumpArgs(target.pid, img)), 0, "dump");
      await target.child.status;
      assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
      assert.equal(await ask(), "hello 2", "a new connection after restore");
    } finally {
      await killTree(target.pid);
    }
  });
}

/** Connects to argv[1], reads until the peer's EOF, shuts its side down and keeps the closed socket. */
const ENDED_PY = `import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
while s.recv(100):
    pass
s.shutdown(socket.SHUT_WR)
while s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] != 7:  # TCP_CLOSE
    time.sleep(0.01)
open(sys.argv[2], "w").write("closed\\n")
time.sleep(600)
`;

Deno.test("a socket whose connection has ended (CLOSE, descriptor still open) is refused, naming it", async () => {
  await using tmp = await tempDir();
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const ready = `${tmp.path}/ready`;
  const port = (listener.addr as Deno.NetAddr).port;
  const target = spawnTarget(["setsid", PYTHON, "-c", ENDED_PY, String(port), ready]);
  try {
    const conn = await listener.accept();
    conn.close();
    await waitForLines(ready, 1, 30_000);
    const msg = assertOneLineError(
      await amber(dumpArgs(target.pid, `${tmp.path}/img`, "--tcp-established")),
      1,
      "dump",
    );
    assert.match(msg, /fd \d+: tcp 127\.0\.0\.1:\d+ \(CLOSE\): a connection that has ended/);
    assert.ok(isAlive(target.pid), "the target runs on");
  } finally {
    listener.close();
    await killTree(target.pid);
  }
});
