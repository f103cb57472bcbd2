/**
 * Streaming (issue 13): `dump --stream` to stdout and `restore --stream`
 * from stdin through a pipe (and zstd), and a dump sent to `amber
 * page-server` over TCP on 127.0.0.1. Target: testdata/counter.c, which
 * checks all its memory on SIGUSR1.
 */
import assert from "node:assert/strict";
import { crc32 } from "node:zlib";
import {
  amber,
  assertCounterGoesOn,
  assertCounterHealthy,
  assertExit,
  assertLeftNothing,
  assertOneLineError,
  assertRunningFree,
  childrenWithState,
  CLI,
  commandWorks,
  DENO,
  descendants,
  isAlive,
  killAndReap,
  killTree,
  listDir,
  processesNamed,
  readLines,
  reapZombies,
  ROOT,
  sleep,
  startCounter,
  startWriter,
  statusField,
  tempDir,
  TESTDATA,
  waitFor,
  waitGone,
  type Writer,
} from "./_util.ts";

const MIB = 32;
const AMBER = `${DENO} run -A ${CLI}`;

interface Pipeline {
  /** Exit status of each command of the pipeline. */
  statuses: number[];
  stderr: string;
}

/** Runs a bash pipeline from the checkout; the statuses of all its commands. */
async function pipeline(cmd: string, env: Record<string, string> = {}): Promise<Pipeline> {
  const r = await new Deno.Command("/bin/bash", {
    args: ["-c", `${cmd}; echo "statuses: \${PIPESTATUS[*]}" >&2`],
    cwd: ROOT,
    env: { NO_COLOR: "1", ...env },
    stdin: "null",
    stdout: "null",
    stderr: "piped",
    signal: AbortSignal.timeout(120_000),
  }).output();
  const stderr = new TextDecoder().decode(r.stderr);
  const m = /statuses: ([\d ]+)\n?$/.exec(stderr);
  assert.ok(m, `pipeline ended without its statuses:\n${stderr}`);
  return { statuses: m[1].trim().split(" ").map(Number), stderr: stderr.slice(0, m.index) };
}

/** The one "amber: ..." line a pipeline's amber printed. */
function amberLines(p: Pipeline): string[] {
  return p.stderr.split("\n").filter((l) => l.startsWith("amber: "));
}

/** Dumps the counter without -R into `file` as a stream; waits until it is gone. */
async function streamToFile(c: Writer, file: string): Promise<Uint8Array> {
  const p = await pipeline(`${AMBER} dump -t ${c.pid} --stream > ${file}`);
  assert.deepEqual(p.statuses, [0], p.stderr);
  assert.ok(await waitGone(c.pid), "the dumped counter ends");
  return await Deno.readFile(file);
}

/** restore --stream -d from a shell redirection (`< F`). */
async function restoreFrom(input: string, tmpdir: string): Promise<Pipeline> {
  const p = await pipeline(`${AMBER} restore --stream -d ${input}`, { TMPDIR: tmpdir });
  assert.equal(p.statuses.length, 1);
  return p;
}

Deno.test("dump --stream | zstd | zstd -d | restore --stream: the counter goes on with its memory right", async () => {
  await using tmp = await tempDir();
  const scratch = `${tmp.path}/scratch`;
  await Deno.mkdir(scratch);
  const c = await startCounter(tmp.path, MIB);
  try {
    const zstd = await commandWorks("zstd", "--version");
    const through = zstd ? " | zstd -q -c | zstd -dq -c" : "";
    const p = await pipeline(
      `${AMBER} dump -t ${c.pid} --stream${through} | ${AMBER} restore --stream -d`,
      { TMPDIR: scratch },
    );
    assert.ok(p.statuses.every((s) => s === 0), `pipeline ${p.statuses}: ${p.stderr}`);
    assert.equal(p.statuses.length, zstd ? 4 : 2);
    // No image file anywhere: not beside the target, and restore removed its unpacked copy.
    assert.deepEqual(listDir(tmp.path), ["counter.txt", "scratch"]);
    assert.deepEqual(listDir(scratch), [], "restore's private directory is gone once it runs");
    await assertRunningFree(c.pid, "restored counter");
    await assertCounterHealthy(c);
  } finally {
    await killAndReap(c.pid);
  }
});

Deno.test("two processes sharing memfds (ghost copies, shared memory) go through the stream and check themselves", async () => {
  await using tmp = await tempDir();
  const scratch = `${tmp.path}/scratch`;
  await Deno.mkdir(scratch);
  const out = `${tmp.path}/memfd.txt`;
  const t = await startWriter(["setsid", "python3", `${TESTDATA}/memfd.py`, out], out, 5, 30_000);
  try {
    const tree = descendants(t.pid);
    assert.equal(tree.length, 2, "parent and child (test bug)");
    // The dumped child is a zombie of ours (the subreaper) until reaped: restore waits for its pid.
    // Only the tree's pids: the pipeline's bash is Deno's to reap.
    let done = false;
    const run = pipeline(`${AMBER} dump -t ${t.pid} --stream | ${AMBER} restore --stream -d`, {
      TMPDIR: scratch,
    }).finally(() => done = true);
    while (!done) {
      reapZombies(tree);
      await sleep(10);
    }
    const p = await run;
    assert.deepEqual(p.statuses, [0, 0], p.stderr);
    assert.deepEqual(listDir(scratch), [], "no unpacked images left");
    await assertCounterGoesOn(out, (await readLines(out)).length, 20, "after the streamed restore");
    assert.equal(descendants(t.pid).length, 2, "both processes back");
  } finally {
    await killTree(t.pid);
  }
});

Deno.test("restore --stream -D DIR keeps the unpacked images there, as a dump would have written them", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, MIB);
  try {
    const stream = await streamToFile(c, `${tmp.path}/s`);
    assert.ok(stream.length > MIB * 1024 * 1024, "the pages are in the stream");
    const img = `${tmp.path}/img`;
    const p = await pipeline(`${AMBER} restore --stream -D ${img} -d < ${tmp.path}/s`);
    assert.deepEqual(p.statuses, [0], p.stderr);
    assert.equal(Deno.statSync(img).mode! & 0o777, 0o700);
    for (const name of listDir(img)) {
      assert.equal(Deno.statSync(`${img}/${name}`).mode! & 0o777, 0o600, name);
    }
    assert.ok(listDir(img).includes(`pages-${c.pid}.img`));
    await assertCounterHealthy(c);
  } finally {
    await killAndReap(c.pid);
  }
});

Deno.test("a stream cut short (head -c 1000) fails the dump and the counter runs on unharmed", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, MIB);
  try {
    const p = await pipeline(`${AMBER} dump -t ${c.pid} --stream | head -c 1000 > /dev/null`);
    assert.deepEqual(p.statuses, [1, 0], p.stderr);
    const lines = amberLines(p);
    assert.equal(lines.length, 1, p.stderr);
    assert.match(lines[0], /stream: write: EPIPE/);
    assert.ok(isAlive(c.pid), "the counter runs on");
    await assertRunningFree(c.pid, "after the broken pipe");
    await assertCounterHealthy(c);
    // Not a terminal, not with --json, not with -D.
    const json = await amber(["dump", "-t", String(c.pid), "--stream", "--json"]);
    assert.match(assertOneLineError(json, 2, "--stream --json"), /stdout/);
  } finally {
    await killAndReap(c.pid);
  }
});

/** One record of the stream format (lib/images/stream.ts), checksum right. */
function record(n: number, name: string, payload: Uint8Array): Uint8Array {
  const nameBytes = new TextEncoder().encode(name);
  const h = new Uint8Array(16);
  const v = new DataView(h.buffer);
  v.setUint8(0, 1);
  v.setUint8(1, nameBytes.length);
  v.setUint32(4, payload.length, true);
  v.setUint32(12, n, true);
  v.setUint32(8, crc32(payload, crc32(nameBytes, crc32(h))) >>> 0, true);
  const out = new Uint8Array(16 + nameBytes.length + payload.length);
  out.set(h);
  out.set(nameBytes, 16);
  out.set(payload, 16 + nameBytes.length);
  return out;
}

Deno.test("a truncated, corrupted or hostile stream is refused naming the record, and nothing runs", async () => {
  await using tmp = await tempDir();
  const scratch = `${tmp.path}/scratch`;
  await Deno.mkdir(scratch);
  const c = await startCounter(tmp.path, MIB);
  try {
    const file = `${tmp.path}/s`;
    const stream = await streamToFile(c, file);
    const before = childrenWithState();

    await Deno.writeFile(`${tmp.path}/cut`, stream.subarray(0, stream.length - 100));
    const cut = await restoreFrom(`< ${tmp.path}/cut`, scratch);
    assert.deepEqual(cut.statuses, [1], cut.stderr);
    assert.match(
      amberLines(cut).join("\n"),
      /^amber: image stream: record \d+ \(inventory\.cbor\): ends after \d+ of its \d+ bytes \(truncated\)$/,
    );

    // One byte of the pages flipped, deep inside the first record's payload.
    const bad = stream.slice();
    bad[16 + 16 + `pages-${c.pid}.img`.length + 5000] ^= 0x40;
    await Deno.writeFile(`${tmp.path}/bad`, bad);
    const flipped = await restoreFrom(`< ${tmp.path}/bad`, scratch);
    assert.deepEqual(flipped.statuses, [1], flipped.stderr);
    assert.match(
      amberLines(flipped).join("\n"),
      new RegExp(`^amber: image stream: record 1 \\(pages-${c.pid}\\.img\\): checksum mismatch`),
    );

    // A name that is no image file (a path) is refused before its bytes are read.
    const header = stream.subarray(0, 16);
    const evil = new Uint8Array([...header, ...record(1, "../../etc/cron.d/x", new Uint8Array(8))]);
    await Deno.writeFile(`${tmp.path}/evil`, evil);
    const named = await restoreFrom(`< ${tmp.path}/evil`, scratch);
    assert.match(
      amberLines(named).join("\n"),
      /^amber: image stream: record 1: not the name of an image file amber writes \(refused\)$/,
    );
    assert.deepEqual(listDir(scratch), [], "nothing unpacked is left");
    assert.ok(!isAlive(c.pid), "nothing restored");
    assertLeftNothing(before, "refused streams");

    // The intact stream restores.
    const good = await restoreFrom(`< ${file}`, scratch);
    assert.deepEqual(good.statuses, [0], good.stderr);
    await assertCounterHealthy(c);
  } finally {
    await killAndReap(c.pid);
  }
});

/** `amber page-server` on 127.0.0.1, any free port, once it listens. */
async function startPageServer(dir: string) {
  const child = new Deno.Command(DENO, {
    args: ["run", "-A", CLI, "page-server", "--address", "127.0.0.1", "--port", "0", "-D", dir],
    cwd: ROOT,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const reader = child.stderr.getReader();
  let text = "";
  let port = 0;
  while (!port) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`page server ended: ${text}`);
    text += new TextDecoder().decode(value);
    port = Number(/listening on 127\.0\.0\.1:(\d+)/.exec(text)?.[1] ?? 0);
  }
  const finished = (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += new TextDecoder().decode(value);
    }
    const out = new TextDecoder().decode(await new Response(child.stdout).arrayBuffer());
    return { code: (await child.status).code, stdout: out, stderr: text };
  })();
  return { port, finished };
}

/** `amber dump -t PID --page-server` to the page server on 127.0.0.1:PORT. */
function dumpTo(pid: number, port: number, env: Record<string, string> = {}) {
  const args = ["--page-server", "--address", "127.0.0.1", "--port", String(port)];
  return amber(["dump", "-t", String(pid), ...args], env);
}

Deno.test("dump --page-server to amber page-server on 127.0.0.1: images stored there, the counter restores", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, MIB);
  try {
    const img = `${tmp.path}/received`;
    const server = await startPageServer(img);
    const r = await dumpTo(c.pid, server.port);
    assertExit(r, 0, "dump --page-server");
    const s = await server.finished;
    assert.equal(s.code, 0, s.stderr);
    assert.match(s.stdout, /^received \d+ files, \d+ bytes from 127\.0\.0\.1:\d+ into /);
    assert.ok(await waitGone(c.pid), "the dumped counter ends");
    assert.deepEqual(listDir(tmp.path), ["counter.txt", "received"], "no image beside the target");
    assert.equal(Deno.statSync(img).mode! & 0o777, 0o700);
    assert.ok(listDir(img).includes("inventory.cbor"));
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    await assertCounterHealthy(c);
  } finally {
    await killAndReap(c.pid);
  }
});

Deno.test("a dump that fails on its way to the page server leaves the counter running and no images there", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, MIB);
  try {
    const img = `${tmp.path}/received`;
    const server = await startPageServer(img);
    const r = await dumpTo(c.pid, server.port, { AMBER_TEST_FAULT: "before-commit" });
    assertOneLineError(r, 1, "failed dump");
    const s = await server.finished;
    assert.equal(s.code, 1, s.stderr);
    const from = `page server 127\\.0\\.0\\.1:${server.port}: dump from [\\d.:]+`;
    assert.match(s.stderr, new RegExp(`^amber: ${from}: ends after record \\d+ .*truncated`, "m"));
    assert.deepEqual(listDir(img), [], "nothing published by the page server");
    await assertRunningFree(c.pid, "after the failed dump");
    await assertCounterHealthy(c);
    // Nobody listening: the dump fails before it freezes anything.
    const none = await dumpTo(c.pid, server.port);
    assert.match(assertOneLineError(none, 1, "no server"), /connect: ECONNREFUSED/);
    assert.ok(isAlive(c.pid));
  } finally {
    await killAndReap(c.pid);
  }
});

/** Whether a thread of `pid` sleeps in a pipe write (its reader does not read). */
function blockedInPipeWrite(pid: number): boolean {
  return [...Deno.readDirSync(`/proc/${pid}/task`)].some((t) => {
    try {
      return Deno.readTextFileSync(`/proc/${pid}/task/${t.name}/wchan`).includes("pipe_write");
    } catch {
      return false;
    }
  });
}

Deno.test("SIGINT to a dump --stream stuck on a reader that does not read: the counter resumes", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, MIB);
  try {
    const child = new Deno.Command("/bin/bash", {
      args: [
        "-c",
        `${AMBER} dump -t ${c.pid} --stream | sleep 60; echo "statuses: \${PIPESTATUS[*]}" >&2`,
      ],
      cwd: ROOT,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    // The dumping amber is the target's tracer; it fills the pipe and waits in write.
    const tracer = await waitFor(
      () => {
        const t = Number(statusField(c.pid, "TracerPid"));
        return t && blockedInPipeWrite(t) ? t : undefined;
      },
      "the dump waiting in a pipe write",
      60_000,
    );
    Deno.kill(tracer, "SIGINT");
    assert.ok(await waitGone(tracer), "the dump ends at once");
    for (const p of processesNamed(child.pid, "sleep")) Deno.kill(p, "SIGTERM");
    const stderr = new TextDecoder().decode((await child.output()).stderr);
    assert.match(stderr, /^amber: interrupted by SIGINT; what was started was undone$/m);
    assert.match(stderr, /statuses: 130 /);
    await assertRunningFree(c.pid, "after the interrupted dump");
    await assertCounterHealthy(c);
  } finally {
    await killAndReap(c.pid);
  }
});

Deno.test("a page server sent a damaged stream replies why, keeps the image already in DIR, and exits 1", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, MIB);
  try {
    const img = `${tmp.path}/img`;
    assertExit(await amber(["dump", "-R", "-t", String(c.pid), "-D", img]), 0, "dump -R");
    const inventory = await Deno.readFile(`${img}/inventory.cbor`);
    const server = await startPageServer(img);
    using conn = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
    const header = new Uint8Array(16);
    header.set(new TextEncoder().encode("AMBERSTM"));
    new DataView(header.buffer).setUint32(8, 1, true);
    const good = record(1, `pages-${c.pid}.img`, new Uint8Array(4096).fill(7));
    const bad = record(2, `pages-${c.pid}.img`, new Uint8Array(4096).fill(7));
    bad[bad.length - 1] ^= 1;
    for (const part of [header, good, bad]) await conn.write(part);
    const reply = new Uint8Array(4096);
    let got = 0;
    for (;;) {
      const n = await conn.read(reply.subarray(got));
      if (n === null) break;
      got += n;
    }
    assert.equal(new TextDecoder().decode(reply.subarray(0, 8)), "AMBERACK");
    assert.equal(new DataView(reply.buffer).getUint32(8, true), 1, "the reply says: refused");
    assert.match(
      new TextDecoder().decode(reply.subarray(16, got)),
      new RegExp(`^record 2 \\(pages-${c.pid}\\.img\\): checksum mismatch \\(corrupted\\)$`),
    );
    const s = await server.finished;
    assert.equal(s.code, 1, s.stderr);
    assert.deepEqual(await Deno.readFile(`${img}/inventory.cbor`), inventory, "earlier image kept");
    assert.ok(!listDir(img).some((n) => n.startsWith(".amber-dump-")), "no staging left");
    assertExit(await amber(["show", img]), 0, "the earlier image still reads");
  } finally {
    await killAndReap(c.pid);
  }
});

const LIBRARY_SCRIPT = `
import { dump, restore } from ${JSON.stringify(`${ROOT}/mod.ts`)};
import type { ByteReader, ByteWriter } from ${JSON.stringify(`${ROOT}/mod.ts`)};

const pid = Number(Deno.args[0]);
const chunks: Uint8Array[] = [];
const writer: ByteWriter = { write: (b) => (chunks.push(b.slice()), Promise.resolve(b.length)) };
const stats = await dump({ pid, stream: writer });
const all = new Uint8Array(chunks.reduce((s, c) => s + c.length, 0));
let at = 0;
for (const c of chunks) all.set(c, at), at += c.length;
let off = 0;
const reader: ByteReader = {
  read(p) {
    if (off === all.length) return Promise.resolve(null);
    const n = Math.min(p.length, all.length - off, 65536);
    p.set(all.subarray(off, off + n));
    off += n;
    return Promise.resolve(n);
  },
};
while (true) {
  try {
    Deno.statSync("/proc/" + pid);
    await new Promise((r) => setTimeout(r, 20));
  } catch {
    break;
  }
}
const restored = await restore({ stream: reader, detached: true });
console.log(JSON.stringify({ dir: stats.dir, bytes: all.length, pageBytes: stats.pageBytes, pids: restored.pids }));
`;

Deno.test("mod.ts: dump with a stream and restore from one, in memory, in a program of its own", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, MIB);
  try {
    const script = `${tmp.path}/lib.ts`;
    await Deno.writeTextFile(script, LIBRARY_SCRIPT);
    const r = await new Deno.Command(DENO, {
      args: ["run", "-A", "--config", `${ROOT}/deno.json`, script, String(c.pid)],
      cwd: tmp.path,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stderr = new TextDecoder().decode(r.stderr);
    assert.equal(r.code, 0, stderr);
    const out = JSON.parse(new TextDecoder().decode(r.stdout));
    assert.deepEqual(out.pids, [c.pid]);
    assert.ok(out.pageBytes >= MIB * 1024 * 1024 && out.bytes > out.pageBytes, JSON.stringify(out));
    await assertCounterHealthy(c);
  } finally {
    await killAndReap(c.pid);
  }
});
