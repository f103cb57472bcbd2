/**
 * Inet gaps (issue 11): link-local IPv6 addresses keep their scope id,
 * multicast group memberships are refused rather than lost, and a lock
 * table whose dumping amber died is removed by the next amber run.
 * Run with: deno test -A tests/net_gaps_test.ts
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  assertOneLineError,
  commandWorks,
  dumpArgs,
  exists,
  isAlive,
  killAndReap,
  spawnTarget,
  tempDir,
  waitForLine,
  waitForLines,
  waitGone,
} from "./_util.ts";

/** A link-local IPv6 address of this machine and its interface, if it has one. */
function linkLocal(): { addr: string; ifname: string } | undefined {
  let text = "";
  try {
    text = Deno.readTextFileSync("/proc/net/if_inet6");
  } catch {
    return undefined;
  }
  for (const line of text.trim().split("\n")) {
    const [hex, , , scope, flags, ifname] = line.trim().split(/\s+/);
    // Scope 0x20 is link; flag 0x40 tentative (not bindable yet).
    if (scope !== "20" || parseInt(flags, 16) & 0x40) continue;
    const words = hex.match(/.{4}/g)!.map((w) => parseInt(w, 16).toString(16));
    return { addr: words.join(":"), ifname };
  }
}

const LL = linkLocal();
const HAVE_NFT = await commandWorks("nft", "list", "tables");

/** A UDP socket and a TCP listener bound to a link-local address; SIGUSR1 reports their names. */
const SCOPED_PY = `import json, signal, socket, sys, time
out, addr, ifname = sys.argv[1:4]
idx = socket.if_nametoindex(ifname)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.bind((addr, 0, 0, idx))
t = socket.socket(socket.AF_INET6)
t.bind((addr, 0, 0, idx))
t.listen()
def report(*a):
    with open(out, "a") as f:
        f.write(json.dumps([u.getsockname(), t.getsockname()]) + "\\n")
signal.signal(signal.SIGUSR1, report)
report()
while True:
    time.sleep(1)
`;

Deno.test({
  name: "sockets bound to a link-local IPv6 address come back with its scope id",
  ignore: LL === undefined,
  async fn() {
    await using tmp = await tempDir();
    const out = `${tmp.path}/names.txt`;
    const { pid } = spawnTarget(["setsid", "python3", "-c", SCOPED_PY, out, LL!.addr, LL!.ifname]);
    try {
      const [before] = await waitForLines(out, 1, 30_000);
      assert.match(before, /, [1-9]\d*\]/, "no scope id before the dump (test bug)");
      const img = `${tmp.path}/img`;
      assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
      assert.ok(await waitGone(pid), "the dumped target still runs");
      assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
      Deno.kill(pid, "SIGUSR1");
      const lines = await waitForLine(out, (l) => l.length >= 2, 10_000);
      assert.equal(lines[1], before, "the sockets' names after restore");
    } finally {
      await killAndReap(pid);
    }
  },
});

/**
 * UDP sockets that joined multicast groups on lo (IPv4, IPv6, and an IPv4
 * group on an IPv6 socket). On SIGUSR1 each joins again: EADDRINUSE says it
 * is still a member ("member"), success that it was not ("lost").
 */
const MCAST_PY = `import signal, socket, struct, sys, time
out = sys.argv[1]
lo = socket.if_nametoindex("lo")
g4 = struct.pack("4s4si", socket.inet_aton("239.255.77.1"), b"\\0" * 4, lo)
g6 = struct.pack("16si", socket.inet_pton(socket.AF_INET6, "ff15::77"), lo)
g46 = struct.pack("4s4si", socket.inet_aton("239.255.77.2"), b"\\0" * 4, lo)
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
b = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
joins = [(a, socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, g4),
         (b, socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, g6),
         (c, socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, g46)]
for s, level, opt, g in joins:
    s.setsockopt(level, opt, g)
def check(*_):
    res = []
    for s, level, opt, g in joins:
        try:
            s.setsockopt(level, opt, g)
            res.append("lost")
        except OSError as e:
            res.append("member" if e.errno == 98 else "errno %d" % e.errno)
    with open(out, "a") as f:
        f.write(" ".join(res) + "\\n")
signal.signal(signal.SIGUSR1, check)
with open(out, "a") as f:
    f.write("ready\\n")
while True:
    time.sleep(1)
`;

Deno.test("UDP multicast memberships (IPv4, IPv6, IPv4 on an IPv6 socket) come back", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/mcast.txt`;
  const { pid } = spawnTarget(["setsid", "python3", "-c", MCAST_PY, out]);
  try {
    await waitForLines(out, 1, 30_000);
    Deno.kill(pid, "SIGUSR1");
    const [, before] = await waitForLines(out, 2, 10_000);
    assert.equal(before, "member member member", "before the dump (test bug)");
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    assert.ok(await waitGone(pid), "the dumped target still runs");
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    Deno.kill(pid, "SIGUSR1");
    const lines = await waitForLines(out, 3, 10_000);
    assert.equal(lines[2], "member member member", "memberships after restore");
  } finally {
    await killAndReap(pid);
  }
});

/** Joins 239.255.77.3 on lo with a source filter (IP_ADD_SOURCE_MEMBERSHIP). */
const MCAST_SOURCE_PY = `import socket, struct, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
mreq = struct.pack("4s4s4s", socket.inet_aton("239.255.77.3"), socket.inet_aton("127.0.0.1"),
                   socket.inet_aton("127.0.0.1"))
s.setsockopt(socket.IPPROTO_IP, 39, mreq)
open(__import__("sys").argv[1], "w").write("ready\\n")
time.sleep(600)
`;

Deno.test("a multicast membership with a source filter is refused, named", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/ready.txt`;
  const { pid } = spawnTarget(["setsid", "python3", "-c", MCAST_SOURCE_PY, out]);
  try {
    await waitForLines(out, 1, 30_000);
    const img = `${tmp.path}/img`;
    const msg = assertOneLineError(await amber(dumpArgs(pid, img)), 1, "dump");
    assert.match(
      msg,
      /udp 0\.0\.0\.0:0: multicast group 239\.255\.77\.3 on interface 1 with a source filter: not supported yet/,
    );
    assert.ok(isAlive(pid), "the refused dump ended the target");
    assert.ok(!exists(img), "the refused dump left images");
  } finally {
    await killAndReap(pid);
  }
});

/** Connects to 127.0.0.1:PORT and answers each line "ping N" with "pong N". */
const PONG_PY = `import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
f = c.makefile("rwb", buffering=0)
for line in f:
    c.sendall(line.replace(b"ping", b"pong"))
`;

async function lockTables(): Promise<string[]> {
  const r = await new Deno.Command("nft", { args: ["list", "tables"], stdout: "piped" }).output();
  return [...new TextDecoder().decode(r.stdout).matchAll(/^table inet (amber_\S+)$/gm)]
    .map((m) => m[1]).filter((t) => !t.startsWith("amber_check_"));
}

/** Sends "ping N" and reads the answer line, through `reader`. */
async function ping(conn: Deno.Conn, lines: AsyncIterator<string>, n: number): Promise<string> {
  await conn.write(new TextEncoder().encode(`ping ${n}\n`));
  return (await lines.next()).value ?? "";
}

async function* linesOf(conn: Deno.Conn): AsyncGenerator<string> {
  let buf = "";
  for await (const chunk of conn.readable.pipeThrough(new TextDecoderStream())) {
    buf += chunk;
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      yield buf.slice(0, i);
      buf = buf.slice(i + 1);
    }
  }
}

Deno.test({
  name:
    "amber SIGKILLed mid-dump: the connection is not left in repair mode; the next run removes the lock",
  ignore: !HAVE_NFT,
  async fn() {
    await using tmp = await tempDir();
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = (listener.addr as Deno.NetAddr).port;
    const { pid } = spawnTarget(["setsid", "python3", "-c", PONG_PY, String(port)]);
    let conn: Deno.Conn | undefined;
    try {
      conn = await listener.accept();
      const lines = linesOf(conn);
      assert.equal(await ping(conn, lines, 1), "pong 1", "before the dump");
      const before = await lockTables();
      const img = `${tmp.path}/img`;
      const r = await amber(dumpArgs(pid, img, "--tcp-established"), {
        AMBER_TEST_FAULT: "before-commit:SIGKILL",
      });
      assert.notEqual(r.code, 0, "the dump was not killed (test bug)");
      const stale = (await lockTables()).filter((t) => !before.includes(t));
      assert.equal(stale.length, 1, `the killed dump left no lock (test bug): ${stale}`);
      // Its tracer dead, the target runs on.
      assert.ok(isAlive(pid), "the target died with amber");
      const check = await amber(["check"]);
      // (Any amber run cleans up: another one on this machine may have been first.)
      if ((await lockTables()).includes(stale[0]) || !check.stdout.includes("removed stale")) {
        assert.match(check.stdout, new RegExp(`removed stale ${stale[0]} of a dump that died`));
      }
      const left = await lockTables();
      assert.ok(!left.includes(stale[0]), `check left the stale table ${stale[0]}`);
      // Neither in repair mode nor locked: the connection works as before.
      assert.equal(await ping(conn, lines, 2), "pong 2", "after the cleanup");
    } finally {
      conn?.close();
      listener.close();
      await killAndReap(pid);
    }
  },
});

/**
 * An IPv4 socket on 127.0.0.1, a dual-stack IPv6 one on [::], and one
 * connected to a socket of its own that sent it a datagram; a TCP
 * connection to itself, so that a --tcp-established dump locks the
 * network meanwhile. On SIGUSR1 it reads what waits in the three and
 * writes each datagram with its sender (recvfrom).
 */
const UDP_QUEUE_PY = `import signal, socket, sys, time
out = sys.argv[1]
def log(s):
    with open(out, "a") as f:
        f.write(s + "\\n")
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s4.bind(("127.0.0.1", 0))
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s6.bind(("::", 0))
sc = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sc.bind(("127.0.0.1", 0))
peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
peer.bind(("127.0.0.1", 0))
sc.connect(peer.getsockname())
peer.sendto(b"p1", sc.getsockname())
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen()
t = socket.create_connection(l.getsockname()); t2, _ = l.accept()
go = []
signal.signal(signal.SIGUSR1, lambda s, f: go.append(1))
log("ports %d %d %d" % (s4.getsockname()[1], s6.getsockname()[1], peer.getsockname()[1]))
while True:
    while not go:
        time.sleep(0.02)
    go.clear()
    for name, s in (("v4", s4), ("v6", s6), ("connected", sc)):
        s.setblocking(False)
        while True:
            try:
                data, addr = s.recvfrom(100)
            except BlockingIOError:
                break
            log("%s %s %s %d" % (name, data.decode(), addr[0], addr[1]))
    log("read")
`;

/** Sends to the target from two ports of each family; prints the ports. */
const UDP_SEND_PY = `import socket, sys
p4, p6 = int(sys.argv[1]), int(sys.argv[2])
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.bind(("127.0.0.1", 0))
b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); b.bind(("127.0.0.1", 0))
c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); c.bind(("::1", 0))
a.sendto(b"a1", ("127.0.0.1", p4)); b.sendto(b"b1", ("127.0.0.1", p4)); a.sendto(b"a2", ("127.0.0.1", p4))
c.sendto(b"c1", ("::1", p6)); b.sendto(b"d1", ("127.0.0.1", p6)); c.sendto(b"c2", ("::1", p6))
a.sendto(b"", ("127.0.0.1", p4))
print(a.getsockname()[1], b.getsockname()[1], c.getsockname()[1])
`;

Deno.test("UDP datagrams waiting in the queue (IPv4, IPv6, IPv4 on IPv6, connected) come back in order with their senders, under a network lock", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/udp.txt`;
  const { pid } = spawnTarget(["setsid", "python3", "-c", UDP_QUEUE_PY, out]);
  try {
    const [ports] = await waitForLines(out, 1);
    const [, p4, p6, pp] = ports.split(" ");
    const sent = await new Deno.Command("python3", {
      args: ["-c", UDP_SEND_PY, p4, p6],
      stdout: "piped",
    }).output();
    assert.ok(sent.success, "the sender");
    const [a, b, c] = new TextDecoder().decode(sent.stdout).trim().split(" ");
    const img = `${tmp.path}/img`;
    // The lock of the TCP connection stays in place while the datagrams are handed back.
    assertExit(await amber(dumpArgs(pid, img, "--tcp-established")), 0, "dump");
    assert.ok(await waitGone(pid), "the dumped target still runs");
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    Deno.kill(pid, "SIGUSR1");
    const lines = await waitForLine(out, (l) => l.includes("read"));
    assert.deepEqual(lines.slice(1), [
      `v4 a1 127.0.0.1 ${a}`,
      `v4 b1 127.0.0.1 ${b}`,
      `v4 a2 127.0.0.1 ${a}`,
      `v4  127.0.0.1 ${a}`,
      `v6 c1 ::1 ${c}`,
      `v6 d1 ::ffff:127.0.0.1 ${b}`,
      `v6 c2 ::1 ${c}`,
      `connected p1 127.0.0.1 ${pp}`,
      "read",
    ], "the datagrams, in order, with their senders");
  } finally {
    await killAndReap(pid);
  }
});
