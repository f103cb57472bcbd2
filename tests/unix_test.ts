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

/**
 * A listener and a client in parent and child (argv[4]: which is the
 * parent); the client connects and (argv[5] "data") sends three messages,
 * then waits for a reply. The server accepts only on SIGUSR1, reads what
 * waited, checks the connection's SO_PEERCRED pid is the client's and
 * replies.
 */
const BACKLOG_PY = `import os, signal, socket, struct, sys, time
out, path, kind, role, send = sys.argv[1:6]
typ = socket.SOCK_STREAM if kind == "stream" else socket.SOCK_SEQPACKET
msgs = [b"one", b"two", b"three"] if send == "data" else []
def log(s):
    with open(out, "a") as f:
        f.write(s + "\\n")
go = []
signal.signal(signal.SIGUSR1, lambda s, f: go.append(1))
def server(l, client_pid):
    while not go:
        time.sleep(0.02)
    c, _ = l.accept()
    got = []
    if typ == socket.SOCK_STREAM:
        want = sum(len(m) for m in msgs)
        data = b""
        while len(data) < want:
            data += c.recv(100)
        got = [data.decode()] if data else []
    else:
        c.setblocking(False)
        while True:
            try:
                got.append(c.recv(100).decode())
            except BlockingIOError:
                break
    cred = c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    pid = int.from_bytes(cred[:4], "little")
    log("accepted " + "|".join(got) + " peer " + ("client" if pid == client_pid else str(pid)))
    c.sendall(b"reply")
def client():
    c = socket.socket(socket.AF_UNIX, typ)
    c.connect(path)
    for m in msgs:
        c.send(m)
    if send == "fds":
        c.sendmsg([b"fd"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", 0))])
    log("connected")
    log("client got " + c.recv(100).decode())
if role == "server-parent":
    l = socket.socket(socket.AF_UNIX, typ); l.bind(path); l.listen(4)
    pid = os.fork()
    if pid == 0:
        client(); os._exit(0)
    server(l, pid)
    os.waitpid(pid, 0)
else:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        l = socket.socket(socket.AF_UNIX, typ); l.bind(path); l.listen(4)
        os.write(w, b"x"); os.close(w)
        server(l, os.getppid()); os._exit(0)
    os.close(w); os.read(r, 1); os.close(r)
    client()
    os.waitpid(pid, 0)
log("done")
time.sleep(600)
`;

interface Backlog {
  dir: string;
  out: string;
  path: string;
  target: Awaited<ReturnType<typeof startWriter>>;
  pids: number[];
  server: number;
}

/** Runs `fn` on a started BACKLOG_PY, whose processes are ended afterwards. */
async function withBacklog(
  kind: string,
  role: string,
  send: string,
  fn: (b: Backlog) => Promise<void>,
): Promise<void> {
  await using tmp = await tempDir();
  const out = `${tmp.path}/out.txt`, path = `${tmp.path}/backlog.sock`;
  const argv = ["setsid", "python3", "-c", BACKLOG_PY, out, path, kind, role, send];
  const target = await startWriter(argv, out, 1);
  const pids = descendants(target.pid);
  try {
    assert.equal(pids.length, 2, "parent and child");
    const server = role === "server-parent" ? pids[0] : pids[1];
    await fn({ dir: tmp.path, out, path, target, pids, server });
  } finally {
    for (const p of [...pids].reverse()) await killAndReap(p);
    await killAndReap(target.pid);
  }
}

/** Lets the server accept; checks it got `sent` from the client, and the client its reply. */
async function assertAccepted(out: string, server: number, sent: string, what: string) {
  Deno.kill(server, "SIGUSR1");
  const lines = await waitForLine(out, (l) => l.includes("done"));
  assert.deepEqual(
    lines.filter((l) => l !== "connected").sort(),
    [`accepted ${sent} peer client`, "client got reply", "done"],
    what,
  );
}

for (
  const [kind, role, send] of [
    ["stream", "server-parent", "none"],
    ["stream", "server-parent", "data"],
    ["seqpacket", "server-parent", "data"],
    ["stream", "client-parent", "data"],
  ]
) {
  Deno.test(`a ${kind} connection waiting in the backlog (${role}, ${send}): accepted after restore`, async () => {
    await withBacklog(kind, role, send, async ({ dir, out, target, pids, server }) => {
      const img = `${dir}/img`;
      await dumpKill(target.pid, pids, img, "backlog");
      await target.child.status;
      assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
      const sent = send === "none" ? "" : kind === "stream" ? "onetwothree" : "one|two|three";
      await assertAccepted(
        out,
        server,
        sent,
        "the server accepted the connection with what was sent, the client got the reply",
      );
    });
  });
}

Deno.test("a connection waiting in the backlog with data: dump -R refuses it, a failed dump takes nothing", async () => {
  await withBacklog(
    "stream",
    "server-parent",
    "data",
    async ({ dir, out, target, pids, server }) => {
      const img = `${dir}/img`;
      assertExit(await amber(dumpArgs(target.pid, img, "-R")), 0, "dump -R");
      const rr = await amber(["restore", "-D", img, "-d"]);
      const msg = assertOneLineError(rr, 1, "restore of the -R images");
      assert.match(msg, /waiting to be accepted has sent data.*dump without -R/, msg);
      // A kill dump interrupted, or failing, at its last step takes nothing either.
      for (const fault of ["before-commit:SIGINT", "before-commit"]) {
        const r = await amber(dumpArgs(target.pid, `${dir}/img2`), { AMBER_TEST_FAULT: fault });
        assert.notEqual(r.code, 0, `dump with ${fault}`);
        assert.ok(pids.every(isAlive), `the tree runs on after ${fault}`);
      }
      await assertAccepted(
        out,
        server,
        "onetwothree",
        "the server still accepts it with what was sent",
      );
    },
  );
});

Deno.test("a backlog connection from outside the tree, or carrying descriptors: dump refuses, the tree runs on", async () => {
  await withBacklog(
    "stream",
    "server-parent",
    "fds",
    async ({ dir, out, path, target, pids, server }) => {
      const outside = await Deno.connect({ transport: "unix", path });
      try {
        const r = await amber(dumpArgs(target.pid, `${dir}/img`));
        const msg = assertOneLineError(r, 1, "dump");
        assert.match(msg, /carry 1 descriptor\(s\) \(SCM_RIGHTS\)/, msg);
        assert.ok(pids.every(isAlive), "the tree runs on");
        // Once the server took that one, the waiting connection is the outside one.
        Deno.kill(server, "SIGUSR1");
        await waitForLine(out, (l) => l.includes("done"));
        const r2 = await amber(dumpArgs(target.pid, `${dir}/img`));
        const msg2 = assertOneLineError(r2, 1, "dump");
        assert.match(msg2, /waiting in its backlog comes from socket:\[\d+\], held outside/, msg2);
        assert.ok(isAlive(pids[0]), "the server runs on");
      } finally {
        outside.close();
      }
    },
  );
});

Deno.test("an out-of-band byte waiting in a unix stream is refused, named; the tree runs on", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/oob.txt`;
  const py = `import socket, sys, time
a, b = socket.socketpair()
a.send(b"abc"); a.send(b"x", socket.MSG_OOB); a.send(b"def")
open(sys.argv[1], "w").write("ready\\n")
time.sleep(600)
`;
  const target = await startWriter(["setsid", "python3", "-c", py, out], out, 1);
  try {
    const msg = assertOneLineError(
      await amber(dumpArgs(target.pid, `${tmp.path}/img`)),
      1,
      "dump",
    );
    assert.match(msg, /unix stream socket:\[\d+\].*out-of-band byte \(MSG_OOB\)/, msg);
    assert.ok(isAlive(target.pid), "the tree runs on");
  } finally {
    await killAndReap(target.pid);
  }
});

/**
 * A server's accepted connection whose client sent its last words and
 * exited before the server read them (the kernel shows its peer as 0); on
 * SIGUSR1 the server reads to the end of file and writes to the dead peer.
 */
const CLOSED_PEER_PY = `import os, signal, socket, sys, time
out, path = sys.argv[1:3]
def log(s):
    with open(out, "a") as f:
        f.write(s + "\\n")
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(1)
if os.fork() == 0:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    c.sendall(b"last words")
    os._exit(0)
conn, _ = srv.accept()
os.wait()
go = []
signal.signal(signal.SIGUSR1, lambda s, f: go.append(1))
n = 0
while not go:
    log(str(n))
    n += 1
    time.sleep(0.02)
got = b""
while True:
    d = conn.recv(100)
    if not d:
        break
    got += d
try:
    conn.send(b"x")
    sent = "sent"
except BrokenPipeError:
    sent = "EPIPE"
log("read " + got.decode() + " then eof, write " + sent)
`;

Deno.test("an accepted connection whose client closed before its last bytes were read: restored, bytes then EOF", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/closed.txt`;
  const path = `${tmp.path}/s.sock`;
  const target = await startWriter(["setsid", "python3", "-c", CLOSED_PEER_PY, out, path], out, 3);
  const { pid } = target;
  try {
    const img = `${tmp.path}/img`;
    await dumpKill(pid, [pid], img, "closed peer");
    await target.child.status;
    const n = (await readLines(out)).length;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    await waitForLines(out, n + 5);
    Deno.kill(pid, "SIGUSR1");
    await waitForLine(out, (l) => l.some((x) => x.startsWith("read")));
    const { numbers, other } = await readCounterLines(out);
    assertConsecutive(numbers, "the counter");
    assert.deepEqual(other, ["read last words then eof, write EPIPE"], "the connection");
  } finally {
    await killAndReap(pid);
  }
});
