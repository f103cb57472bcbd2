/**
 * Unix sockets: pairs inside the tree keep talking with their queued bytes,
 * message boundaries and shutdown state; listeners on a path (owner and
 * mode kept) and on an abstract name accept new clients after restore; a
 * connection to a peer outside the tree is refused without harm.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertConsecutive,
  assertExit,
  assertOneLineError,
  descendants,
  dumpArgs,
  dumpKill,
  isAlive,
  killAndReap,
  killTree,
  readCounterLines,
  readLines,
  startWriter,
  tempDir,
  waitForLine,
  waitForLines,
} from "./_util.ts";

/**
 * A parent and its child over four socketpairs: a stream ping-pong that
 * writes a counter; a seqpacket pair holding three unread messages; a
 * stream pair with unread bytes and the writer's end shut down; a datagram
 * pair holding two unread datagrams. On
 * SIGUSR1 the child reads what was left waiting and writes it out.
 */
const PAIRS_PY = `import os, signal, socket, sys, time
out = sys.argv[1]
def log(s):
    with open(out, "a") as f:
        f.write(s + "\\n")
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
qa, qb = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
ea, eb = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
da, db = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
if os.fork() == 0:
    a.close(); qa.close(); ea.close(); da.close()
    go = []
    signal.signal(signal.SIGUSR1, lambda s, f: go.append(1))
    while True:
        data = b.recv(100)
        if not data:
            os._exit(0)
        b.sendall(data)
        if go:
            go.clear()
            msgs = [qb.recv(100).decode() for _ in range(3)]
            rest = b""
            while True:
                d = eb.recv(100)
                if not d:
                    break
                rest += d
            grams = [db.recv(100).decode() for _ in range(2)]
            log("queued " + "|".join(msgs) + " eof " + rest.decode() + " dgram " + "|".join(grams))
b.close(); qb.close(); eb.close(); db.close()
for m in (b"one", b"two", b"three"):
    qa.send(m)
ea.sendall(b"tail")
ea.shutdown(socket.SHUT_WR)
da.send(b"gram1")
da.send(b"gram2")
n = 0
while True:
    a.sendall(b"%d" % n)
    log(a.recv(100).decode())
    n += 1
    time.sleep(0.02)
`;

Deno.test("socketpairs between parent and child: queued data, boundaries, shutdown kept", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/pairs.txt`;
  const target = await startWriter(["setsid", "python3", "-c", PAIRS_PY, out], out, 5);
  const { pid } = target;
  let pids: number[] = [];
  try {
    pids = descendants(pid);
    assert.equal(pids.length, 2, "parent and child");
    const img = `${tmp.path}/img`;
    await dumpKill(pid, pids, img, "pairs");
    await target.child.status;
    const n = (await readLines(out)).length;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    await waitForLines(out, n + 10);
    Deno.kill(pids[1], "SIGUSR1");
    await waitForLine(out, (l) => l.some((x) => x.startsWith("queued")));
    const { numbers, other } = await readCounterLines(out);
    assertConsecutive(numbers, "the ping-pong counter");
    assert.deepEqual(
      other,
      ["queued one|two|three eof tail dgram gram1|gram2"],
      "what waited in the queues",
    );
  } finally {
    for (const p of pids.reverse()) await killAndReap(p);
  }
});

/**
 * Listens on argv[2] (mode 0640) and on an abstract name, waiting with the
 * selector argv[4]; answers each client with a count.
 */
const SERVER_PY = `import os, selectors, socket, sys
out, path, abstract, kind = sys.argv[1:5]
sel = getattr(selectors, kind)()
for name in (path, "\\0" + abstract):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(name)
    s.listen(8)
    sel.register(s, selectors.EVENT_READ)
os.chmod(path, 0o640)
with open(out, "a") as f:
    f.write("listening\\n")
n = 0
while True:
    for key, _ in sel.select():
        c, _ = key.fileobj.accept()
        c.sendall(b"hello %d\\n" % n)
        c.close()
        n += 1
`;

async function ask(path: string): Promise<string> {
  const conn = await Deno.connect({ transport: "unix", path });
  try {
    const buf = new Uint8Array(64);
    const n = await conn.read(buf);
    return new TextDecoder().decode(buf.subarray(0, n ?? 0)).trim();
  } finally {
    conn.close();
  }
}

/** A client through python, for the abstract name Deno cannot connect to. */
async function askAbstract(name: string): Promise<string> {
  const py = `import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\\0" + sys.argv[1])
print(s.recv(64).decode().strip())`;
  const r = await new Deno.Command("python3", { args: ["-c", py, name], stdout: "piped" }).output();
  return new TextDecoder().decode(r.stdout).trim();
}

for (const selector of ["SelectSelector", "EpollSelector"]) {
  Deno.test(`listening unix sockets (path and abstract), ${selector}: clients served after restore`, async () => {
    await using tmp = await tempDir();
    const out = `${tmp.path}/server.txt`, path = `${tmp.path}/server.sock`;
    const abstract = `amber-test-${crypto.randomUUID()}`;
    const target = await startWriter(
      ["setsid", "python3", "-c", SERVER_PY, out, path, abstract, selector],
      out,
      1,
    );
    const { pid } = target;
    try {
      assert.equal(await ask(path), "hello 0");
      assert.equal(await askAbstract(abstract), "hello 1");
      const mode = Deno.statSync(path).mode! & 0o7777;
      const img = `${tmp.path}/img`;
      await dumpKill(pid, [pid], img, "server");
      await target.child.status;
      assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
      assert.equal(await ask(path), "hello 2", "a client on the path after restore");
      assert.equal(await askAbstract(abstract), "hello 3", "a client on the abstract name");
      assert.equal(Deno.statSync(path).mode! & 0o7777, mode, "socket file mode");
    } finally {
      await killAndReap(pid);
    }
  });
}

/** Connects to argv[2] and counts into argv[1]. */
const CLIENT_PY = `import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[2])
n = 0
while True:
    with open(sys.argv[1], "a") as f:
        f.write("%d\\n" % n)
    n += 1
    time.sleep(0.02)
`;

Deno.test("a unix connection to a peer outside the tree: dump refuses, -R images do not restore", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/client.txt`, path = `${tmp.path}/outside.sock`;
  const listener = Deno.listen({ transport: "unix", path });
  const target = await startWriter(["setsid", "python3", "-c", CLIENT_PY, out, path], out, 3);
  const { pid } = target;
  try {
    const img = `${tmp.path}/img`;
    const r = await amber(dumpArgs(pid, img));
    const msg = assertOneLineError(r, 1, "dump of the client");
    assert.match(msg, /socket:\[\d+\].*outside the dumped tree/, msg);
    assert.ok(isAlive(pid), "the refused dump ended the client");
    assertExit(await amber(dumpArgs(pid, img, "-R")), 0, "dump -R");
    await killTree(pid);
    await target.child.status;
    const rr = await amber(["restore", "-D", img, "-d"]);
    assert.match(assertOneLineError(rr, 1, "restore"), /outside the dumped tree/);
    assert.ok(!isAlive(pid), "the refused restore left the client running");
  } finally {
    await killAndReap(pid);
    listener.close();
  }
});
