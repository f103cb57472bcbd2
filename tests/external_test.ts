/**
 * Descriptors leading outside the tree: a job whose stdout is a pipe into
 * an outside `tee`. Dump refuses it unless told `--external pipe:[INO]`;
 * the images then need `--inherit-fd fd[N]:pipe:[INO]`, and the job's
 * output flows into amber's fd N, a new pipe to a new tee.
 */
import assert from "node:assert/strict";
import {
  amber,
  amberAfter,
  assertConsecutive,
  assertExit,
  assertNoHelper,
  childrenOf,
  CLI,
  DENO,
  dumpArgs,
  exists,
  killAndReap,
  killTree,
  procState,
  readCounterLines,
  readLines,
  showJson,
  spawnTarget,
  tempDir,
  until,
  waitForLines,
  waitVanished,
} from "./_util.ts";

/** Prints a counter; checks each time that its stdout is still a pipe (FAIL into argv[1] if not). */
const WRITER_PY = `import os, stat, sys, time
n = 0
while True:
    if not stat.S_ISFIFO(os.fstat(1).st_mode):
        open(sys.argv[1], "a").write("FAIL stdout is not a pipe\\n")
        sys.exit(1)
    print(n); n += 1; time.sleep(0.02)`;

/**
 * The counter of what two readers received, one after the other, as one
 * stream: a line the dump cut in two (its digits to the first reader, its
 * newline to the second) is whole again.
 */
async function numbersAcross(first: string, second: string): Promise<number[]> {
  const text = await Deno.readTextFile(first) + await Deno.readTextFile(second);
  return text.split("\n").slice(0, -1).flatMap((l) => /^\d+$/.test(l) ? [Number(l)] : []);
}

Deno.test("a job's stdout into an outside tee: --external at dump, --inherit-fd at restore", async () => {
  await using tmp = await tempDir();
  const out1 = `${tmp.path}/tee1.txt`, out2 = `${tmp.path}/tee2.txt`;
  const status = `${tmp.path}/status.txt`, teePid = `${tmp.path}/tee2.pid`;
  const script = `python3 -u -c '${WRITER_PY}' ${status} | tee ${out1} > /dev/null`;
  const { pid: shell, child } = spawnTarget(["setsid", "bash", "-c", script]);
  let writer: number | undefined;
  let tee2: number | undefined;
  try {
    await waitForLines(out1, 3, 30_000);
    writer = childrenOf(shell).find((c) =>
      Deno.readTextFileSync(`/proc/${c}/cmdline`).split("\0")[0].endsWith("python3")
    );
    assert.ok(writer, "no python writer under the shell (test bug)");
    const link = Deno.readLinkSync(`/proc/${writer}/fd/1`);
    const ino = /^pipe:\[(\d+)\]$/.exec(link)?.[1];
    assert.ok(ino, `the writer's stdout is ${link}, not a pipe (test bug)`);
    const img = `${tmp.path}/img`;

    const refused = await amber([...dumpArgs(writer, img), "--shell-job"]);
    assertExit(refused, 1, "dump without --external");
    assert.ok(refused.stderr.includes(`--external ${link}`), refused.stderr);
    assert.ok(["S", "R"].includes(procState(writer) ?? ""), "the writer runs on");

    assertExit(
      await amber([...dumpArgs(writer, img), "--shell-job", "--external", link]),
      0,
      "dump --external",
    );
    const doc = await showJson(img);
    assert.deepEqual(doc.unrestorable, [], "external pipes do not make the images unrestorable");
    // The tee sees the end of its input, and the shell ends with it.
    await child.status;

    const plain = await amber(["restore", "-D", img, "-d", "--shell-job"]);
    assertExit(plain, 1, "restore without --inherit-fd");
    assert.match(plain.stderr, /fd 1: /, plain.stderr);
    assert.ok(plain.stderr.includes(`--inherit-fd fd[N]:${link}`), plain.stderr);
    assert.equal(procState(writer), null, "the refused restore created nothing");
    assertNoHelper("refused restore");

    const wrongEnd = await amberAfter(`exec 7< <(sleep 30 2>/dev/null)`, [
      "restore",
      "-D",
      img,
      "-d",
      "--shell-job",
      "--inherit-fd",
      `fd[7]:${link}`,
    ]);
    assertExit(wrongEnd, 1, "restore onto a read end");
    assert.match(wrongEnd.stderr, /not the write end of a pipe/, wrongEnd.stderr);

    const restored = await amberAfter(
      `exec 7> >(echo $BASHPID > ${teePid}; exec tee ${out2} > /dev/null 2>&1)`,
      ["restore", "-D", img, "-d", "--shell-job", "--inherit-fd", `fd[7]:${link}`],
    );
    assertExit(restored, 0, "restore --inherit-fd");
    tee2 = Number((await Deno.readTextFile(teePid)).trim());
    await waitForLines(out2, 10, 30_000);
    const now = Deno.readLinkSync(`/proc/${writer}/fd/1`);
    assert.notEqual(now, link, "the restored writer writes into the new pipe");
    assert.equal(now, Deno.readLinkSync(`/proc/${tee2}/fd/0`), "the new tee reads what it writes");
    assertConsecutive(await numbersAcross(out1, out2), "what both tees received");
    assert.deepEqual(await readLines(status).catch(() => []), [], "the writer's own check");
  } finally {
    if (writer !== undefined) await killAndReap(writer);
    if (tee2 !== undefined) await killAndReap(tee2);
    await killTree(shell);
  }
});

/** Prints a counter; checks each time that its stdout is still a unix socket (FAIL into argv[1] if not). */
const SOCKET_WRITER_PY = `import os, stat, sys, time
n = 0
while True:
    if not stat.S_ISSOCK(os.fstat(1).st_mode):
        open(sys.argv[1], "a").write("FAIL stdout is not a socket\\n")
        sys.exit(1)
    print(n); n += 1; time.sleep(0.02)`;

/**
 * An outside reader: makes a socketpair, runs argv[3:] with one end as its
 * stdout (in a session of its own) or, with argv[1] "exec", as fd 3 in
 * place of itself after forking the reader; the reader copies what comes
 * to argv[2]. The job's (or the reader's) pid goes to argv[2].pid.
 */
const SOCKET_READER_PY = `import os, socket, subprocess, sys
mode, out, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
a, b = socket.socketpair()
def copy():
    with open(out, "ab") as f:
        while True:
            data = a.recv(65536)
            if not data:
                return
            f.write(data); f.flush()
if mode == "job":
    job = subprocess.Popen(argv, stdout=b, stderr=subprocess.DEVNULL, start_new_session=True)
    b.close()
    open(out + ".pid", "w").write(str(job.pid))
    copy()
    sys.exit(0)
if os.fork() == 0:
    b.close()
    # Not amber's output pipes: amber's caller waits for them to close.
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 1); os.dup2(null, 2)
    open(out + ".pid", "w").write(str(os.getpid()))
    copy()
    os._exit(0)
a.close()
os.dup2(b.fileno(), 3)
os.execvp(argv[0], argv)`;

Deno.test("a job whose stdout is a unix socket to an outside reader: --external unix[INO] at dump, --inherit-fd fd[N]:socket:[INO] at restore onto a new socketpair", async () => {
  await using tmp = await tempDir();
  const out1 = `${tmp.path}/read1.txt`, out2 = `${tmp.path}/read2.txt`;
  const status = `${tmp.path}/status.txt`;
  const reader1 = spawnTarget([
    "python3",
    "-c",
    SOCKET_READER_PY,
    "job",
    out1,
    "python3",
    "-u",
    "-c",
    SOCKET_WRITER_PY,
    status,
  ]);
  let writer: number | undefined;
  let reader2: number | undefined;
  try {
    await waitForLines(out1, 3, 30_000);
    writer = Number(await Deno.readTextFile(`${out1}.pid`));
    const link = Deno.readLinkSync(`/proc/${writer}/fd/1`);
    const ino = /^socket:\[(\d+)\]$/.exec(link)?.[1];
    assert.ok(ino, `the writer's stdout is ${link}, not a socket (test bug)`);
    const img = `${tmp.path}/img`;

    const refused = await amber(dumpArgs(writer, img));
    assertExit(refused, 1, "dump without --external");
    assert.ok(refused.stderr.includes(`--external unix[${ino}]`), refused.stderr);
    assert.ok(["S", "R"].includes(procState(writer) ?? ""), "the writer runs on");

    assertExit(
      await amber([...dumpArgs(writer, img), "--external", `unix[${ino}]`]),
      0,
      "dump --external",
    );
    const shown = await amber(["show", img]);
    assert.ok(shown.stdout.includes(`restore needs --inherit-fd fd[N]:${link}`), shown.stdout);
    // The reader sees the end of the connection and ends.
    await reader1.child.status;
    // Its parent ended without waiting: the zombie is ours to reap (the subreaper).
    await waitVanished([writer]);

    const plain = await amber(["restore", "-D", img, "-d"]);
    assertExit(plain, 1, "restore without --inherit-fd");
    assert.match(plain.stderr, /fd 1: /, plain.stderr);
    assert.ok(plain.stderr.includes(`--inherit-fd fd[N]:${link}`), plain.stderr);
    assert.equal(procState(writer), null, "the refused restore created nothing");
    assertNoHelper("refused restore");

    const notSocket = await amberAfter(`exec 7< <(sleep 30 2>/dev/null)`, [
      "restore",
      "-D",
      img,
      "-d",
      "--inherit-fd",
      `fd[7]:${link}`,
    ]);
    assertExit(notSocket, 1, "restore onto a pipe");
    assert.match(notSocket.stderr, /not a unix stream socket/, notSocket.stderr);

    // amber runs with fd 3 the end of a new socketpair whose other end a new reader reads.
    const restored = await new Deno.Command("python3", {
      args: [
        "-c",
        SOCKET_READER_PY,
        "exec",
        out2,
        DENO,
        "run",
        "-A",
        CLI,
        "restore",
        "-D",
        img,
        "-d",
        "--inherit-fd",
        `fd[3]:${link}`,
      ],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stderr = new TextDecoder().decode(restored.stderr);
    assert.equal(restored.code, 0, `restore --inherit-fd: ${stderr}`);
    reader2 = Number(await Deno.readTextFile(`${out2}.pid`));
    await waitForLines(out2, 10, 30_000);
    const now = Deno.readLinkSync(`/proc/${writer}/fd/1`);
    assert.notEqual(now, link, "the restored writer writes into the new socket");
    assertConsecutive(await numbersAcross(out1, out2), "what both readers received");
    assert.deepEqual(await readLines(status).catch(() => []), [], "the writer's own check");
  } finally {
    if (writer !== undefined) await killAndReap(writer);
    if (reader2 !== undefined) await killAndReap(reader2);
    await killTree(reader1.pid);
  }
});

/** A log receiver outside the tree: a datagram socket bound at argv[1], each message a line of argv[2]. */
const LOG_SERVER_PY = `import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "ab") as f:
    while True:
        f.write(s.recv(4096) + b"\\n"); f.flush()`;

/** Logs a counter to the datagram socket at argv[1], connected once; FAIL into argv[2] on an error. */
const LOGGER_PY = `import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(sys.argv[1])
n = 0
while True:
    try:
        s.send(str(n).encode())
    except OSError as e:
        open(sys.argv[2], "a").write(f"FAIL {e}\\n")
        sys.exit(1)
    n += 1; time.sleep(0.02)`;

Deno.test("a process logging to an outside datagram socket at a path: --ext-unix-sk connects it to that name again, it keeps logging", async () => {
  await using tmp = await tempDir();
  const sock = `${tmp.path}/log.sock`, log = `${tmp.path}/log.txt`;
  const status = `${tmp.path}/status.txt`;
  const server = spawnTarget(["python3", "-c", LOG_SERVER_PY, sock, log]);
  let logger: number | undefined;
  try {
    await until(() => exists(sock), "the log server is not bound");
    logger = spawnTarget(["setsid", "python3", "-c", LOGGER_PY, sock, status]).pid;
    await waitForLines(log, 3, 30_000);
    const img = `${tmp.path}/img`;

    const refused = await amber(dumpArgs(logger, img));
    assertExit(refused, 1, "dump without --ext-unix-sk");
    assert.match(refused.stderr, /unix datagram socket:\[\d+\].*--ext-unix-sk/, refused.stderr);
    assert.ok(["S", "R"].includes(procState(logger) ?? ""), "the logger runs on");

    assertExit(await amber([...dumpArgs(logger, img), "--ext-unix-sk"]), 0, "dump --ext-unix-sk");
    const shown = await amber(["show", img]);
    assert.ok(shown.stdout.includes(`connected again to ${sock} (--ext-unix-sk)`), shown.stdout);
    await waitVanished([logger]);
    const before = (await readCounterLines(log)).numbers.length;
    assertExit(await amber(["restore", "-D", img, "-d", "--ext-unix-sk"]), 0, "restore");
    await waitForLines(log, before + 10, 30_000);
    assertConsecutive((await readCounterLines(log)).numbers, "what the log server received");
    assert.deepEqual(await readLines(status).catch(() => []), [], "the logger's own check");
  } finally {
    if (logger !== undefined) await killAndReap(logger);
    await killAndReap(server.pid);
  }
});

/**
 * A listener outside the tree at argv[1]: each connection's lines go to
 * argv[2] as "K LINE" (K counts connections), then "K end" at its end.
 */
const LINE_SERVER_PY = `import socket, sys, threading
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l.bind(sys.argv[1]); l.listen()
out = open(sys.argv[2], "a")
lock = threading.Lock()
def serve(c, k):
    for line in c.makefile("r"):
        with lock:
            out.write(f"{k} {line}"); out.flush()
    with lock:
        out.write(f"{k} end\\n"); out.flush()
k = 0
while True:
    c, _ = l.accept(); k += 1
    threading.Thread(target=serve, args=(c, k)).start()`;

/** Sends a counter, a line at a time, on one connection to the listener at argv[1]. */
const LINE_CLIENT_PY = `import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
n = 0
while True:
    s.sendall(f"{n}\\n".encode()); n += 1; time.sleep(0.02)`;

Deno.test("a stream connection to an outside listener: --ext-unix-sk makes a new connection to its path; the listener sees the old one end, then the new one", async () => {
  await using tmp = await tempDir();
  const sock = `${tmp.path}/srv.sock`, log = `${tmp.path}/srv.txt`;
  const server = spawnTarget(["python3", "-c", LINE_SERVER_PY, sock, log]);
  let client: number | undefined;
  try {
    await until(() => exists(sock), "the listener is not bound");
    client = spawnTarget(["setsid", "python3", "-c", LINE_CLIENT_PY, sock]).pid;
    await waitForLines(log, 3, 30_000);
    const img = `${tmp.path}/img`;
    assertExit(await amber([...dumpArgs(client, img), "--ext-unix-sk"]), 0, "dump --ext-unix-sk");
    await waitVanished([client]);
    // The old connection ends with the tree: the listener read what it had sent, then EOF.
    await until(() => Deno.readTextFileSync(log).includes("1 end\n"), "the old connection's end");
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    const count = (await readLines(log)).length;
    await waitForLines(log, count + 10, 30_000);
    const lines = await readLines(log);
    const end = lines.indexOf("1 end");
    assert.ok(end > 0 && lines.slice(end + 1).every((l) => l.startsWith("2 ")), lines.join("|"));
    const numbers = lines.filter((l) => !l.endsWith(" end")).map((l) => Number(l.split(" ")[1]));
    assertConsecutive(numbers, "the lines over both connections");
  } finally {
    if (client !== undefined) await killAndReap(client);
    await killAndReap(server.pid);
  }
});

Deno.test("an external unix socket with bytes from its outside peer waiting is refused, named, the job left running", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/read.txt`;
  // The reader sends first; sleep, the job, never reads its stdout socket.
  const sender = `import socket, subprocess, sys, time
a, b = socket.socketpair()
a.sendall(b"unread")
job = subprocess.Popen(["sleep", "600"], stdout=b, start_new_session=True)
b.close()
open(sys.argv[1] + ".pid", "w").write(str(job.pid))
time.sleep(600)`;
  const outside = spawnTarget(["python3", "-c", sender, out]);
  let job: number | undefined;
  try {
    await until(() => exists(`${out}.pid`), "the job did not start");
    job = Number(await Deno.readTextFile(`${out}.pid`));
    const link = Deno.readLinkSync(`/proc/${job}/fd/1`);
    const ino = /^socket:\[(\d+)\]$/.exec(link)![1];
    const img = `${tmp.path}/img`;
    const r = await amber([...dumpArgs(job, img), "--external", `unix[${ino}]`]);
    assertExit(r, 1, "dump --external");
    assert.match(
      r.stderr,
      new RegExp(
        `fd 1: unix stream ${link.replace(/[[\]]/g, "\\$&")} .*6 bytes from its peer ` +
          "outside the tree wait in its queue and would be lost",
      ),
      r.stderr,
    );
    assert.ok(["S", "R"].includes(procState(job) ?? ""), "the refused dump harmed the job");
    assert.ok(!exists(img), "the refused dump left images");
  } finally {
    if (job !== undefined) await killAndReap(job);
    await killTree(outside.pid);
  }
});
