/**
 * The real-program matrix: unmodified Debian programs are dumped in the
 * middle of real work (a few seconds of it, on bounded inputs), and each
 * must end in its honest outcome:
 * - "restores": a dump ends the job, `restore -d` brings it back, and the
 *   job finishes with exactly the result and exit status of a run never
 *   dumped;
 * - refused: a dump without -R exits 1 with one line matching the regex,
 *   and the job runs on unharmed to the same result as a run never dumped.
 *
 * A case marked `knownBroken` is dishonest today (a restore that hangs or
 * gives a wrong result, or a dump that ends a tree restore then refuses):
 * it keeps its honest expectation and runs with `ignore: true` until the fix
 * lands. AMBER_RUN_BROKEN=1 runs those too.
 * Run with: deno test -A tests/programs_test.ts
 */
import assert from "node:assert/strict";
import { SysError } from "../ffi/libc.ts";
import { readImages } from "../lib/images/read.ts";
import { waitpid, WALL, WNOHANG } from "../ffi/ptrace.ts";
import {
  amber,
  type AmberResult,
  assertExit,
  assertOneLineError,
  commandWorks,
  descendants,
  dumpArgs,
  exists,
  freePort,
  isAlive,
  killTree,
  procStatFields,
  readLines,
  sleep,
  spawnTarget,
  statusField,
  type Target,
  tempDir,
  threadsOf,
  until,
  waitFor,
  waitForLines,
  waitVanished,
} from "./_util.ts";

/** Debian's own interpreter (a python3 earlier on PATH may be someone else's build). */
const PYTHON = "/usr/bin/python3";

// ---------------------------------------------------------------------------
// the table's shape

type Outcome = "restores" | { refused: RegExp };

/** One run of a job: its own directory (its cwd, where its outputs go), and the shared inputs. */
interface Run {
  dir: string;
  input: string;
}

interface Case {
  /** The test's name: the program and what it does. */
  name: string;
  /** Commands the case runs (installed by .ci/run). */
  commands: string[];
  /** Python modules the job imports (Debian's python3, as PYTHON). */
  pythonModules?: string[];
  expect: Outcome;
  /** What goes wrong today instead; the case is ignored until it is fixed. */
  knownBroken?: string;
  /** Writes the inputs into `input`, once for both runs. */
  prepare?(input: string): Promise<void>;
  /** Prepares one run's directory before the job starts. */
  setup?(run: Run): Promise<void>;
  /** The job's argv, started in run.dir in its own session. */
  argv(run: Run): string[];
  env?: Record<string, string>;
  /** A process beside the job, outside the dumped tree (a second reader). */
  beside?(run: Run): string[];
  /**
   * Stop `beside` from the dump until the restore returns: between a kill
   * dump and its restore no process holds the job's file locks (as with
   * CRIU), so an outside process must wait that gap out.
   */
  pauseBeside?: boolean;
  /** Resolves once the job is in the middle of its work. */
  midWork(run: Run, pid: number): Promise<void>;
  /** Extra `amber dump` flags (e.g. --tcp-established for a client's connection). */
  dumpFlags?: string[];
  /** Extra `amber restore -d` flags (--lazy-pages). */
  restoreFlags?: string[];
  /**
   * How the job's images are taken: at once, ending it (default); by `dump -R`, the job
   * writing its memory while amber copies it (then ended, and restored from that
   * instant); or by a `pre-dump` while it runs and a final `dump --track-mem` holding
   * only what it wrote since.
   */
  taken?: "at-once" | "leave-running" | "pre-dump";
  /**
   * A refusal that depends on the instant of the freeze (a pty's buffer full because its
   * reader lagged): checked like any refusal (the job runs on, untouched), then the dump is
   * tried again, as an operator would.
   */
  transientRefusal?: RegExp;
  /** For jobs that never end by themselves: the rest of the work, then ends the job. */
  finish?(run: Run, pid: number): Promise<void>;
  /** The job's result once it has ended (and `beside` is stopped): bytes, checksums. */
  result(run: Run): Promise<string>;
  /** Exit status of a good run (default 0). */
  exitCode?: number;
}

// ---------------------------------------------------------------------------
// small helpers

/** Deterministic text: `lines` lines of 8..23 letters out of 20 (xorshift32). */
function genText(lines: number, seed: number): Uint8Array {
  let x = seed >>> 0 || 1;
  const next = () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
  const out = new Uint8Array(lines * 24);
  let o = 0;
  for (let i = 0; i < lines; i++) {
    const len = 8 + (next() % 16);
    for (let j = 0; j < len; j++) out[o++] = 97 + (next() % 20);
    out[o++] = 10;
  }
  return out.subarray(0, o);
}

async function sha256Hex(bytes: Uint8Array<ArrayBuffer>): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** "NAME SIZE SHA256" of each file. */
async function digests(...paths: string[]): Promise<string> {
  const out: string[] = [];
  for (const p of paths) {
    out.push(
      `${p.split("/").pop()} ${Deno.statSync(p).size} ${await sha256Hex(await Deno.readFile(p))}`,
    );
  }
  return out.join("\n");
}

function sizeOrZero(path: string): number {
  try {
    return Deno.statSync(path).size;
  } catch {
    return 0;
  }
}

/** Runs a command to its end (bounded); fails unless it exits 0; returns its stdout. */
async function runOk(cmd: string, args: string[], opts: { cwd?: string } = {}): Promise<string> {
  const r = await new Deno.Command(cmd, {
    args,
    cwd: opts.cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(60_000),
  }).output();
  const dec = new TextDecoder();
  assert.ok(r.success, `${cmd} ${args.join(" ")}: exit ${r.code}\n${dec.decode(r.stderr)}`);
  return dec.decode(r.stdout);
}

/** argv that runs `argv` (same pid, own session) with stdout to FILE. */
function toFile(file: string, argv: string[]): string[] {
  return ["setsid", "bash", "-c", 'f=$1; shift; exec "$@" > "$f"', "to-file", file, ...argv];
}

function hasAioRing(pid: number): boolean {
  try {
    return Deno.readTextFileSync(`/proc/${pid}/maps`).includes("/[aio]");
  } catch {
    return false;
  }
}

/**
 * fio writing 32 MiB through an AIO context (its job is a child of fio,
 * which holds the io_setup ring), dumped once a few MiB are written, then
 * verifying every block.
 */
function fioOnLibaio(name: string, extra: string[]): Case {
  return {
    name,
    commands: ["fio"],
    expect: "restores",
    argv: (r) => [
      "setsid",
      "fio",
      "--name=aio",
      "--ioengine=libaio",
      "--iodepth=8",
      "--rw=write",
      "--bs=4k",
      "--size=32M",
      `--filename=${r.dir}/data`,
      "--rate_iops=2000",
      "--verify=crc32c",
      ...extra,
      "--output-format=terse",
      `--output=${r.dir}/out.txt`,
    ],
    midWork: async (_r, pid) => {
      const job = () => descendants(pid).find((p) => p !== pid && hasAioRing(p));
      const written = () => {
        try {
          const io = Deno.readTextFileSync(`/proc/${job()}/io`);
          return Number(/write_bytes: (\d+)/.exec(io)?.[1] ?? 0);
        } catch {
          return 0; // not started yet, or just ended
        }
      };
      await until(
        () => written() > 4 << 20,
        "fio's job wrote nothing through its AIO context",
        30_000,
      );
    },
    // fio fails (and says so in its terse line's error field) if a block does not verify.
    result: async (r) => {
      const f = (await Deno.readTextFile(`${r.dir}/out.txt`)).trim().split(";");
      return `job ${f[2]} error ${f[4]}, ${Deno.statSync(`${r.dir}/data`).size} bytes`;
    },
  };
}

function threadCount(pid: number): number {
  try {
    return threadsOf(pid).length;
  } catch {
    return 0;
  }
}

/** User + system CPU time of PID so far, in clock ticks (0 once it is gone). */
function cpuTicks(pid: number): number {
  try {
    const f = procStatFields(pid);
    return Number(f[11]) + Number(f[12]);
  } catch {
    return 0;
  }
}

/** Waits until FILE exists with at least `bytes` bytes. */
function untilFile(file: string, bytes = 1, timeoutMs = 30_000): Promise<void> {
  return until(
    () => exists(file) && sizeOrZero(file) >= bytes,
    `${file}: not there with ${bytes} bytes`,
    timeoutMs,
  );
}

/** One line per thread of PID and its descendants: state, wchan and syscall, to say where a job hangs. */
function describeTree(pid: number): string {
  const read = (p: string) => {
    try {
      return Deno.readTextFileSync(p).trim();
    } catch {
      return "?";
    }
  };
  const lines: string[] = [];
  for (const p of descendants(pid)) {
    let tids: number[] = [];
    try {
      tids = threadsOf(p);
    } catch {
      // gone
    }
    for (const t of tids) {
      const task = `/proc/${p}/task/${t}`;
      const stat = read(`${task}/stat`);
      const state = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0];
      lines.push(
        `  ${p}/${t} ${read(`${task}/comm`)} state ${state} wchan ${read(`${task}/wchan`)} ` +
          `syscall ${read(`${task}/syscall`).split(" ")[0]}`,
      );
    }
  }
  return lines.join("\n") || "  (no process left)";
}

/** Fetches PATH with a plain HTTP/1.0 GET (no connection pool); returns the body's sha256. */
async function httpGet(port: number, path: string): Promise<string> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await conn.write(new TextEncoder().encode(`GET ${path} HTTP/1.0\r\n\r\n`));
  } catch (e) {
    conn.close();
    throw e;
  }
  // The server closes the connection after the body (HTTP/1.0); reading it to the end closes ours.
  const [head, ...body] = (await new Response(conn.readable).text()).split("\r\n\r\n");
  assert.match(head, /^HTTP\/1\.\d 200/, `GET ${path}: ${head.split("\r\n")[0]}`);
  return await sha256Hex(new TextEncoder().encode(body.join("\r\n\r\n")));
}

/**
 * A client connection the test holds open across the dump (the client is
 * outside the dumped tree): requests written whole, replies read up to a
 * complete one. Kept per run directory, from midWork to finish.
 */
class KeptConn {
  #buf = new Uint8Array(0);
  constructor(readonly conn: Deno.TcpConn) {}

  static async open(port: number): Promise<KeptConn> {
    return new KeptConn(await Deno.connect({ hostname: "127.0.0.1", port }));
  }

  /** Writes REQ, then reads until `complete` says how long the reply is (bytes), bounded. */
  async ask(req: string, complete: (text: string) => number | undefined): Promise<string> {
    await this.conn.write(new TextEncoder().encode(req));
    const timer = setTimeout(() => this.conn.close(), 30_000);
    try {
      for (;;) {
        const text = new TextDecoder().decode(this.#buf);
        const len = complete(text);
        if (len !== undefined) {
          const reply = text.slice(0, len);
          this.#buf = this.#buf.slice(new TextEncoder().encode(reply).length);
          return reply;
        }
        const chunk = new Uint8Array(65536);
        const n = await this.conn.read(chunk);
        if (n === null) {
          throw new Error(`the kept connection ended before a reply to ${req.trim()}`);
        }
        const grown = new Uint8Array(this.#buf.length + n);
        grown.set(this.#buf);
        grown.set(chunk.subarray(0, n), this.#buf.length);
        this.#buf = grown;
      }
    } finally {
      clearTimeout(timer);
    }
  }

  close(): void {
    try {
      this.conn.close();
    } catch {
      // already closed
    }
  }
}

const keptConns = new Map<string, KeptConn>();

/** The length of a complete HTTP/1.1 response with Content-Length at the start of TEXT. */
function httpComplete(text: string): number | undefined {
  const end = text.indexOf("\r\n\r\n");
  if (end < 0) return undefined;
  const m = /\r\ncontent-length: *(\d+)/i.exec(text.slice(0, end));
  assert.ok(m, `a response without Content-Length: ${text.slice(0, end)}`);
  const len = end + 4 + Number(m[1]);
  return text.length >= len ? len : undefined;
}

/** The status line and body of a keep-alive response (its Date header differs between runs). */
function httpStatusAndBody(resp: string): string {
  return `${resp.split("\r\n")[0]} | ${resp.slice(resp.indexOf("\r\n\r\n") + 4)}`;
}

/** The length of one complete RESP line reply (`:N`, `+OK`, `-ERR`) at the start of TEXT. */
function respLineComplete(text: string): number | undefined {
  const end = text.indexOf("\r\n");
  return end < 0 ? undefined : end + 2;
}

// ---------------------------------------------------------------------------
// inputs some cases build

/** A C file with one function long enough that gcc -O2 takes a moment over it. */
function genCFunction(k: number, statements: number): string {
  const body: string[] = [];
  for (let i = 0; i < statements; i++) {
    body.push(
      `  x = (x ^ (x >> ${7 + (i % 23)})) * ${0x9E3779B9 + i * 2 + k * 4096}UL + ${i};`,
      `  if (x % ${i + 3}) x += y;`,
      `  y = y * 31 + (x >> ${1 + (i % 50)});`,
    );
  }
  return `unsigned long f${k}(unsigned long x, unsigned long y) {\n${body.join("\n")}\n` +
    `  return x ^ y;\n}\n`;
}

const MAKE_UNITS = 6;

async function prepareMake(input: string): Promise<void> {
  const decls: string[] = [];
  const calls: string[] = [];
  for (let k = 0; k < MAKE_UNITS; k++) {
    await Deno.writeTextFile(`${input}/f${k}.c`, genCFunction(k, 400));
    decls.push(`unsigned long f${k}(unsigned long, unsigned long);`);
    calls.push(`    s = f${k}(s, i);`);
  }
  await Deno.writeTextFile(
    `${input}/main.c`,
    `#include <stdio.h>\n${decls.join("\n")}\nint main(void) {\n  unsigned long s = 1;\n` +
      `  for (unsigned long i = 0; i < 1000; i++) {\n${calls.join("\n")}\n  }\n` +
      `  printf("%lu\\n", s);\n  return 0;\n}\n`,
  );
  const objs = [...Array(MAKE_UNITS).keys()].map((k) => `f${k}.o`).join(" ");
  await Deno.writeTextFile(
    `${input}/Makefile`,
    `vpath %.c ${input}\nprog: main.o ${objs}\n\tgcc -o $@ $^\n%.o: %.c\n\tgcc -O2 -c -o $@ $<\n`,
  );
}

const SO_MAIN = `#include <stdio.h>
unsigned long work(unsigned long x);
int main(int argc, char **argv) {
  FILE *f = fopen(argv[1], "w");
  if (!f) return 2;
  unsigned long x = 1;
  for (int i = 0; i < 60000; i++) {
    x = work(x);
    if (i % 1000 == 0) { fprintf(f, "%d %lu\\n", i, x); fflush(f); }
  }
  fprintf(f, "done %lu\\n", x);
  return fclose(f) ? 3 : 0;
}
`;

/** The library; VERSION changes what work() computes, so the replaced copy is told apart. */
const SO_LIB = `unsigned long work(unsigned long x) {
  for (int i = 0; i < 20000; i++) x = x * 6364136223846793005UL + VERSION + (x >> 29);
  return x;
}
`;

async function prepareSo(input: string): Promise<void> {
  await Deno.writeTextFile(`${input}/main.c`, SO_MAIN);
  await Deno.writeTextFile(`${input}/work.c`, SO_LIB);
  for (const v of [1, 2]) {
    const so = `libwork${v}.so`;
    await runOk("gcc", ["-O1", "-shared", "-fPIC", `-DVERSION=${v}`, "-o", so, "work.c"], {
      cwd: input,
    });
  }
  await Deno.copyFile(`${input}/libwork1.so`, `${input}/libwork.so`);
  // It loads libwork.so from its own directory: each run has its own copy to replace.
  await runOk("gcc", ["-O1", "-o", "prog", "main.c", "-L.", "-lwork", "-Wl,-rpath,$ORIGIN"], {
    cwd: input,
  });
}

const THREADS_PY = `import hashlib, threading
def work(i, out, progress):
    h = hashlib.sha256(str(i).encode()).digest()
    for n in range(700000):
        h = hashlib.sha256(h).digest()
        if n % 50000 == 0:
            with lock:
                progress.write(f"{i} {n}\\n"); progress.flush()
    out[i] = h.hex()
lock = threading.Lock()
out = {}
with open("progress", "w") as progress:
    ts = [threading.Thread(target=work, args=(i, out, progress)) for i in range(2)]
    for t in ts: t.start()
    for t in ts: t.join()
with open("result.txt", "w") as f:
    for i in sorted(out): f.write(f"{i} {out[i]}\\n")
`;

const NUMPY_PY = `import hashlib, numpy as np
a = np.random.default_rng(1).random((1200, 1200))
b = a.copy()
for i in range(30):
    b = a @ b
    b /= np.abs(b).max()
    if i == 2: open("started", "w").close()
with open("result.txt", "w") as f:
    f.write(hashlib.sha256(b.tobytes()).hexdigest() + "\\n")
`;

/** How long POLL_PY's poll waits, and how long it runs before the dump. */
const POLL_MS = 6000, POLL_DUMP_AFTER_MS = 2000;

/**
 * A relative poll() with no fds (the kernel keeps its deadline only in the
 * restart block): "on time" when it returns within a second of its 6 s,
 * "late" when it waited its whole length again after the restore, which
 * comes more than POLL_DUMP_AFTER_MS into it.
 */
const POLL_PY = `import select, time
p = select.poll()
t0 = time.monotonic()
open("polling", "w").close()
r = p.poll(${POLL_MS})
dt = (time.monotonic() - t0) * 1000
verdict = "early" if dt < ${POLL_MS} else "on time" if dt < ${POLL_MS + 1000} else "late"
with open("result.txt", "w") as f: f.write(f"poll returned {r}, {verdict}\\n")
`;

const POOL_PY = `import hashlib, multiprocessing as mp
def f(i):
    h = str(i).encode()
    for _ in range(15000): h = hashlib.sha256(h).digest()
    return h.hex()
if __name__ == "__main__":
    res = []
    with mp.Pool(2) as p, open("progress", "w") as prog:
        for i, r in enumerate(p.imap(f, range(240))):
            res.append(r); prog.write(f"{i}\\n"); prog.flush()
    with open("result.txt", "w") as out:
        out.write(hashlib.sha256("".join(res).encode()).hexdigest() + "\\n")
`;

const PERL = `use Digest::MD5 qw(md5_hex);
open(my $f, ">", $ARGV[0]) or exit 2;
$f->autoflush(1);
my $h = "0";
for my $i (1 .. 8000000) {
  $h = md5_hex($h);
  print $f "$i $h\\n" if $i % 200000 == 0;
}
print $f "done $h\\n";
close($f) or exit 3;
`;

const NODE_JS = `const { createHash } = require("crypto");
const fs = require("fs");
const out = fs.openSync(process.argv[1], "w");
let h = Buffer.from("0");
let i = 0;
function chunk() {
  for (let j = 0; j < 100000; j++, i++) h = createHash("sha256").update(h).digest();
  fs.writeSync(out, i + " " + h.toString("hex") + "\\n");
  if (i < 3000000) setImmediate(chunk); else fs.closeSync(out);
}
chunk();
`;

/** An HTTP server counting its requests; idle keep-alive connections are never timed out. */
const NODE_HTTP_JS = `const http = require("http");
let n = 0;
const server = http.createServer((req, res) => {
  const body = "request " + ++n + " " + req.url + "\\n";
  res.setHeader("Content-Length", Buffer.byteLength(body));
  res.end(body);
});
server.keepAliveTimeout = 0;
server.listen(Number(process.argv[1]), "127.0.0.1");
process.on("SIGTERM", () => process.exit(0));
`;

/** Sends GET PATH on the run's kept connection; returns its status line and body. */
async function keptGet(r: Run, path: string): Promise<string> {
  const conn = keptConns.get(r.dir);
  assert.ok(conn, "no kept connection");
  return httpStatusAndBody(
    await conn.ask(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`, httpComplete),
  );
}

const runPort = (r: Run) => Number(Deno.readTextFileSync(`${r.dir}/port`));

/** Whether a UDP socket is bound to PORT (/proc/net/udp). */
function udpBound(port: number): boolean {
  const hex = `:${port.toString(16).toUpperCase().padStart(4, "0")} `;
  return Deno.readTextFileSync("/proc/net/udp").includes(hex);
}

/** Sends `grams` to 127.0.0.1:PORT, alternately from two source ports. */
async function udpSend(port: number, grams: string[]): Promise<void> {
  const py = `import socket, sys
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
for i, g in enumerate(sys.argv[2:]):
    socks[i % 2].sendto(g.encode(), ("127.0.0.1", int(sys.argv[1])))`;
  await runOk(PYTHON, ["-c", py, String(port), ...grams]);
}

/** N INCRs on the run's kept connection, one at a time: their replies, in one line. */
async function redisIncrs(r: Run, n: number): Promise<string> {
  const conn = keptConns.get(r.dir);
  assert.ok(conn, "no kept connection");
  const replies: string[] = [];
  for (let i = 0; i < n; i++) {
    replies.push((await conn.ask("INCR counter\r\n", respLineComplete)).trim());
  }
  return `${replies.join(" ")}\n`;
}

/** Debian's PostgreSQL binaries (/usr/lib/postgresql/VERSION/bin, the newest installed). */
const PG_BIN = (() => {
  try {
    const versions = [...Deno.readDirSync("/usr/lib/postgresql")].map((e) => e.name);
    versions.sort((a, b) => Number(b) - Number(a));
    return versions.length ? `/usr/lib/postgresql/${versions[0]}/bin` : "/usr/lib/postgresql/none";
  } catch {
    return "/usr/lib/postgresql/none";
  }
})();

/** argv that runs ARGV as user postgres (exec, same pid). */
const asPostgres = (
  argv: string[],
) => ["setpriv", "--reuid", "postgres", "--regid", "postgres", "--init-groups", ...argv];

/** A psql session outside the dumped tree, over TCP, fed line by line; its output read as it comes. */
class PsqlSession {
  #out = "";
  #reader: Promise<void>;
  #writer: WritableStreamDefaultWriter<Uint8Array>;
  readonly child: Deno.ChildProcess;

  constructor(port: number) {
    const child = new Deno.Command("psql", {
      args: ["-X", "-h", "127.0.0.1", "-p", String(port), "-U", "postgres", "-d", "postgres"],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(JOB_TIMEOUT_MS),
    }).spawn();
    this.child = child;
    this.#writer = child.stdin.getWriter();
    this.#reader = (async () => {
      for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
        this.#out += chunk;
      }
    })();
  }

  /** Sends SQL, then waits until the output so far ends with `until` (30 s at most). */
  async send(sql: string, until: string): Promise<void> {
    await this.#writer.write(new TextEncoder().encode(sql));
    const deadline = Date.now() + 30_000;
    while (!this.#out.endsWith(until)) {
      assert.ok(
        Date.now() < deadline,
        `psql: no ${until.trim()} after ${sql.trim()}: ${this.#out}`,
      );
      await sleep(20);
    }
  }

  get output(): string {
    return this.#out;
  }

  /** Ends the session (EOF on its input); returns its exit status. */
  async end(): Promise<number> {
    await this.#writer.close().catch(() => {});
    await this.#reader;
    return (await this.child.status).code;
  }

  kill(): void {
    try {
      this.child.kill("SIGKILL");
    } catch {
      // already ended
    }
  }
}

const psqlSessions = new Map<string, PsqlSession>();

/** psql -c SQL (unaligned, tuples only) against the run's server, as a new connection. */
const psqlC = (r: Run, sql: string) =>
  runOk("psql", ["-X", "-h", "127.0.0.1", "-p", String(runPort(r)), "-U", "postgres", "-tAc", sql]);

const SQLITE_ROWS = 3_000_000;

/** Reader lines that are consistent with the writer's one transaction. */
function badReaderLines(lines: string[]): string[] {
  return lines.filter((l) =>
    !(l === "ok" || l === "0" || l === String(SQLITE_ROWS) || /database is locked/.test(l))
  );
}

// ---------------------------------------------------------------------------
// the matrix

/** The generated text input of a case. */
const words = (r: Run) => `${r.input}/words.txt`;

const CASES: Case[] = [
  {
    name: "sort --parallel=2 (3M lines)",
    commands: ["sort"],
    expect: "restores",
    prepare: (input) => Deno.writeFile(`${input}/words.txt`, genText(3_000_000, 1)),
    argv: (r) => ["setsid", "sort", "--parallel=2", "-S", "500M", "-o", "sorted.txt", words(r)],
    env: { LC_ALL: "C" },
    midWork: (_r, pid) => until(() => threadCount(pid) > 1, "sort started no thread", 30_000),
    result: (r) => digests(`${r.dir}/sorted.txt`),
  },
  {
    name: "zstd -T2 -12",
    commands: ["zstd"],
    expect: "restores",
    prepare: (input) => Deno.writeFile(`${input}/words.txt`, genText(2_000_000, 2)),
    argv: (r) => ["setsid", "zstd", "-q", "-T2", "-12", words(r), "-o", "out.zst"],
    midWork: async (r, pid) => {
      await untilFile(`${r.dir}/out.zst`);
      await until(() => threadCount(pid) > 1, "zstd started no thread");
    },
    result: (r) => digests(`${r.dir}/out.zst`),
  },
  {
    name: "xz -T2 -0",
    commands: ["xz"],
    expect: "restores",
    prepare: (input) => Deno.writeFile(`${input}/words.txt`, genText(1_500_000, 3)),
    argv: (r) =>
      toFile(`${r.dir}/out.xz`, [
        "xz",
        "-T2",
        "-0",
        "--block-size=2MiB",
        "-c",
        words(r),
      ]),
    midWork: async (r, pid) => {
      await untilFile(`${r.dir}/out.xz`);
      await until(() => threadCount(pid) > 1, "xz started no thread");
    },
    result: (r) => digests(`${r.dir}/out.xz`),
  },
  {
    name: "gzip -6",
    commands: ["gzip"],
    expect: "restores",
    prepare: (input) => Deno.writeFile(`${input}/words.txt`, genText(1_200_000, 7)),
    argv: (r) => toFile(`${r.dir}/out.gz`, ["gzip", "-6", "-n", "-c", words(r)]),
    midWork: (r) => untilFile(`${r.dir}/out.gz`, 65536),
    result: (r) => digests(`${r.dir}/out.gz`),
  },
  {
    // script's shell leads the pty's session; gzip, its job, has the pty as controlling terminal.
    name: "script -qefc 'gzip -6 ...; true' (gzip on script's pty, not its session's leader)",
    commands: ["script", "gzip"],
    expect: "restores",
    prepare: (input) => Deno.writeFile(`${input}/words.txt`, genText(1_200_000, 7)),
    env: { SHELL: "/bin/bash", PATH: "/usr/bin:/bin" },
    argv: (r) => [
      "setsid",
      "script",
      "-qefc",
      `gzip -6 -n -c ${words(r)} > ${r.dir}/out.gz; true`,
      `${r.dir}/typescript`,
    ],
    midWork: (r) => untilFile(`${r.dir}/out.gz`, 65536),
    result: (r) => digests(`${r.dir}/out.gz`),
  },
  {
    name: "python3 threads (hashlib in 2 threads, joined)",
    commands: [PYTHON],
    expect: "restores",
    argv: () => ["setsid", PYTHON, "-c", THREADS_PY],
    midWork: async (r) => {
      await waitForLines(`${r.dir}/progress`, 4, 30_000);
    },
    result: async (r) => await Deno.readTextFile(`${r.dir}/result.txt`),
  },
  {
    name: "python3 numpy matmul on 2 OpenBLAS threads",
    commands: [PYTHON],
    pythonModules: ["numpy"],
    expect: "restores",
    env: { OPENBLAS_NUM_THREADS: "2" },
    argv: () => ["setsid", PYTHON, "-c", NUMPY_PY],
    midWork: async (r, pid) => {
      await untilFile(`${r.dir}/started`, 0);
      assert.ok(
        threadCount(pid) >= 2,
        `numpy runs ${threadCount(pid)} thread(s), not OpenBLAS's 2`,
      );
    },
    result: async (r) => await Deno.readTextFile(`${r.dir}/result.txt`),
  },
  {
    name: "python3 select.poll().poll(6000) with no fds (a relative sleep without a buffer)",
    commands: [PYTHON],
    expect: "restores",
    argv: () => ["setsid", PYTHON, "-c", POLL_PY],
    midWork: async (r) => {
      await untilFile(`${r.dir}/polling`, 0);
      await sleep(POLL_DUMP_AFTER_MS);
    },
    result: async (r) => await Deno.readTextFile(`${r.dir}/result.txt`),
  },
  {
    name: "python3 multiprocessing.Pool(2)",
    commands: [PYTHON],
    expect: "restores",
    argv: () => ["setsid", PYTHON, "-c", POOL_PY],
    midWork: async (r) => {
      await waitForLines(`${r.dir}/progress`, 10, 30_000);
    },
    result: async (r) => await Deno.readTextFile(`${r.dir}/result.txt`),
  },
  {
    name: "make -j2 (gcc on a few C files)",
    commands: ["make", "gcc"],
    expect: "restores",
    prepare: prepareMake,
    argv: (r) => ["setsid", "make", "-j2", "-f", `${r.input}/Makefile`],
    midWork: (r) =>
      until(
        () => [...Deno.readDirSync(r.dir)].some((e) => e.name.endsWith(".o")),
        "make built no object yet",
        30_000,
      ),
    result: async (r) => {
      const objs = ["main.o", ...[...Array(MAKE_UNITS).keys()].map((k) => `f${k}.o`), "prog"];
      return `${await digests(...objs.map((o) => `${r.dir}/${o}`))}\nprints ${await runOk(
        `${r.dir}/prog`,
        [],
      )}`;
    },
  },
  {
    name: "sqlite3 writer in a transaction, a second reader beside it",
    commands: ["sqlite3"],
    expect: "restores",
    setup: async (r) => {
      await runOk("sqlite3", [`${r.dir}/db`, "CREATE TABLE t(x INTEGER PRIMARY KEY, y TEXT);"]);
    },
    argv: (r) => [
      "setsid",
      "sqlite3",
      `${r.dir}/db`,
      `BEGIN; WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ${SQLITE_ROWS}) ` +
      "INSERT INTO t SELECT x, printf('%.30d', x * x) FROM c; COMMIT;",
    ],
    beside: (r) => [
      "bash",
      "-c",
      'while :; do sqlite3 "$0" "PRAGMA quick_check; SELECT count(*) FROM t;"; sleep 0.05; done ' +
      '>> "$1" 2>&1',
      `${r.dir}/db`,
      `${r.dir}/reader.log`,
    ],
    pauseBeside: true,
    // The writer spilled pages into the database: it holds the exclusive lock.
    midWork: (r) => untilFile(`${r.dir}/db-journal`, 8192, 30_000),
    result: async (r) => {
      const bad = badReaderLines(await readLines(`${r.dir}/reader.log`));
      const check = await runOk("sqlite3", [
        `${r.dir}/db`,
        "PRAGMA integrity_check; SELECT count(*), sum(x), max(y) FROM t;",
      ]);
      return `${check}reader saw: ${
        bad.length ? bad.slice(0, 5).join(" | ") : "only consistent states"
      }`;
    },
  },
  {
    name: "perl (md5 chain)",
    commands: ["perl"],
    expect: "restores",
    argv: (r) => ["setsid", "perl", "-e", PERL, `${r.dir}/out.txt`],
    midWork: async (r) => {
      await waitForLines(`${r.dir}/out.txt`, 3, 30_000);
    },
    result: async (r) => await Deno.readTextFile(`${r.dir}/out.txt`),
  },
  {
    name: "bash pipeline (seq | awk | tr)",
    commands: ["bash", "seq", "awk", "tr"],
    expect: "restores",
    argv: () => [
      "setsid",
      "bash",
      "-c",
      "seq 1 8000000 | awk '{ s = (s + $1 * $1) % 1000003 } " +
      'NR % 500000 == 0 { print NR, s > "progress"; fflush("progress") } END { print s }\' ' +
      "| tr 0-9 a-j > out.txt",
    ],
    midWork: async (r) => {
      await waitForLines(`${r.dir}/progress`, 2, 30_000);
    },
    result: async (r) =>
      `${await Deno.readTextFile(`${r.dir}/out.txt`)}${await Deno.readTextFile(
        `${r.dir}/progress`,
      )}`,
  },
  {
    name: "vim -es (substitute and sort a big file, then write it)",
    commands: ["vim"],
    expect: "restores",
    prepare: (input) => Deno.writeFile(`${input}/words.txt`, genText(500_000, 8)),
    setup: (r) => Deno.copyFile(words(r), `${r.dir}/edit.txt`),
    argv: () => [
      "setsid",
      "vim",
      "-Nu",
      "NONE",
      "-i",
      "NONE",
      "-n",
      "-es",
      "-c",
      "%s/\\v(a+)(b)/\\2\\1/g",
      "-c",
      "sort",
      "-c",
      "wq",
      "edit.txt",
    ],
    // It writes nothing before the end: mid-work is half a second of its CPU time.
    midWork: (_r, pid) => until(() => cpuTicks(pid) >= 50, "vim did not get to work", 30_000),
    result: (r) => digests(`${r.dir}/edit.txt`),
  },
  {
    name: "a program whose shared library was replaced on disk while it runs",
    commands: ["gcc"],
    expect: "restores",
    prepare: prepareSo,
    setup: async (r) => {
      await runOk("cp", [`${r.input}/prog`, `${r.input}/libwork.so`, r.dir]);
    },
    argv: (r) => ["setsid", `${r.dir}/prog`, `${r.dir}/out.txt`],
    midWork: async (r) => {
      await waitForLines(`${r.dir}/out.txt`, 2, 30_000);
      // As a package upgrade does: a new file renamed over the old one.
      await runOk("cp", [`${r.input}/libwork2.so`, `${r.dir}/libwork.so.new`]);
      await Deno.rename(`${r.dir}/libwork.so.new`, `${r.dir}/libwork.so`);
    },
    result: async (r) => await Deno.readTextFile(`${r.dir}/out.txt`),
  },
  {
    name: "node (sha256 chain on the event loop)",
    commands: ["node"],
    expect: "restores",
    argv: (r) => ["setsid", "node", "-e", NODE_JS, `${r.dir}/out.txt`],
    midWork: async (r) => {
      await waitForLines(`${r.dir}/out.txt`, 2, 30_000);
    },
    result: async (r) => await Deno.readTextFile(`${r.dir}/out.txt`),
  },
  {
    name: "redis-server (a populated dataset, on a unix socket)",
    commands: ["redis-server", "redis-cli"],
    expect: "restores",
    argv: (r) => [
      "setsid",
      "redis-server",
      "--port",
      "0",
      "--unixsocket",
      `${r.dir}/redis.sock`,
      "--save",
      "",
      "--appendonly",
      "no",
      "--dir",
      r.dir,
      "--enable-debug-command",
      "yes",
    ],
    midWork: async (r) => {
      await untilFile(`${r.dir}/redis.sock`, 0, 30_000);
      await runOk("redis-cli", [
        "-s",
        `${r.dir}/redis.sock`,
        "DEBUG",
        "POPULATE",
        "200000",
        "key",
        "64",
      ]);
    },
    finish: async (r) => {
      const cli = (...a: string[]) => runOk("redis-cli", ["-s", `${r.dir}/redis.sock`, ...a]);
      const dataset = `${await cli("DBSIZE")}${await cli("DEBUG", "DIGEST")}${await cli(
        "GET",
        "key:4242",
      )}`;
      await Deno.writeTextFile(`${r.dir}/result.txt`, dataset);
      await cli("SHUTDOWN", "NOSAVE").catch(() => ""); // the connection ends with the server
    },
    result: async (r) => await Deno.readTextFile(`${r.dir}/result.txt`),
  },
  {
    name: "redis-server stopped while a redis-cli of the same tree waits in its backlog (SET sent)",
    commands: ["redis-server", "redis-cli", "sh"],
    expect: "restores",
    // The shell starts redis, stops it once it serves, and asks it a SET:
    // the connection and the command wait in redis's backlog until SIGCONT.
    argv: (r) => [
      "setsid",
      "sh",
      "-c",
      `redis-server --port 0 --unixsocket ${r.dir}/r.sock --save '' --appendonly no --dir . >/dev/null & ` +
      `until redis-cli -s ${r.dir}/r.sock PING >/dev/null 2>&1; do sleep 0.05; done; ` +
      `kill -STOP $!; echo $! > redis.pid; redis-cli -s ${r.dir}/r.sock SET k v > set.txt; ` +
      `redis-cli -s ${r.dir}/r.sock GET k >> set.txt; redis-cli -s ${r.dir}/r.sock SHUTDOWN NOSAVE; wait`,
    ],
    midWork: async (r) => {
      await untilFile(`${r.dir}/set.txt`, 0, 30_000);
      const redis = Number(await Deno.readTextFile(`${r.dir}/redis.pid`));
      // The SET is sent once redis-cli waits for its answer (in recvfrom, read or poll).
      const shell = Number(procStatFields(redis)[1]);
      await until(
        () => {
          const cli = descendants(shell)
            .filter((p) => Deno.readTextFileSync(`/proc/${p}/comm`).trim() === "redis-cli");
          return cli.length === 1 &&
            /^(0|7|45) /.test(Deno.readTextFileSync(`/proc/${cli[0]}/syscall`));
        },
        "redis-cli does not wait for redis",
        30_000,
      );
    },
    finish: async (r) =>
      Deno.kill(Number(await Deno.readTextFile(`${r.dir}/redis.pid`)), "SIGCONT"),
    result: async (r) => await Deno.readTextFile(`${r.dir}/set.txt`),
  },
  {
    name: "socat receiving UDP, stopped with datagrams from two senders waiting in its queue",
    commands: ["socat"],
    expect: "restores",
    setup: async (r) => await Deno.writeTextFile(`${r.dir}/port`, String(freePort())),
    // -T 3: it ends 3 s after the last datagram.
    argv: (r) => [
      "setsid",
      "socat",
      "-u",
      "-T",
      "3",
      `UDP-RECV:${runPort(r)},bind=127.0.0.1`,
      `OPEN:${r.dir}/out.txt,creat,append`,
    ],
    midWork: async (r, pid) => {
      await until(() => udpBound(runPort(r)), "socat does not listen", 30_000);
      await udpSend(runPort(r), ["first\n"]);
      await untilFile(`${r.dir}/out.txt`);
      Deno.kill(pid, "SIGSTOP");
      await until(() => procStatFields(pid)[0] === "T", "socat did not stop", 10_000);
      await udpSend(runPort(r), ["a1\n", "b1\n", "a2\n"]);
    },
    finish: (_r, pid) => Promise.resolve(Deno.kill(pid, "SIGCONT")),
    result: async (r) => await Deno.readTextFile(`${r.dir}/out.txt`),
  },
  {
    name: "redis-server on TCP with a client connection kept through the dump (INCR)",
    commands: ["redis-server", "redis-cli"],
    expect: "restores",
    dumpFlags: ["--tcp-established"],
    setup: async (r) => await Deno.writeTextFile(`${r.dir}/port`, String(freePort())),
    argv: (r) => [
      "setsid",
      "redis-server",
      "--port",
      String(runPort(r)),
      "--bind",
      "127.0.0.1",
      "--save",
      "",
      "--appendonly",
      "no",
      "--dir",
      r.dir,
      "--enable-debug-command",
      "yes",
    ],
    midWork: async (r) => {
      const cli = (...a: string[]) => runOk("redis-cli", ["-p", String(runPort(r)), ...a]);
      await waitFor(() => cli("PING").catch(() => undefined), "redis does not answer", 30_000);
      await cli("DEBUG", "POPULATE", "20000", "key", "64");
      keptConns.set(r.dir, await KeptConn.open(runPort(r)));
      await Deno.writeTextFile(`${r.dir}/result.txt`, await redisIncrs(r, 100));
    },
    finish: async (r) => {
      const cli = (...a: string[]) => runOk("redis-cli", ["-p", String(runPort(r)), ...a]);
      try {
        const after = await redisIncrs(r, 100);
        const dataset = `${await cli("GET", "counter")}${await cli("DBSIZE")}${await cli(
          "DEBUG",
          "DIGEST-VALUE",
          "key:4242",
        )}`;
        await Deno.writeTextFile(`${r.dir}/result.txt`, after + dataset, { append: true });
      } finally {
        keptConns.get(r.dir)?.close();
        keptConns.delete(r.dir);
      }
      await cli("SHUTDOWN", "NOSAVE").catch(() => ""); // the connection ends with the server
    },
    result: async (r) => await Deno.readTextFile(`${r.dir}/result.txt`),
  },
  {
    name: "postgres with a psql session in the middle of a transaction (over TCP)",
    commands: [`${PG_BIN}/postgres`, `${PG_BIN}/initdb`, "psql", "setpriv"],
    expect: "restores",
    dumpFlags: ["--tcp-established"],
    setup: async (r) => {
      // postgres runs as its own user: it must reach its directory.
      await Deno.chmod(r.dir.slice(0, r.dir.lastIndexOf("/")), 0o755);
      await Deno.writeTextFile(`${r.dir}/port`, String(freePort()));
      await Deno.mkdir(`${r.dir}/pg`);
      await runOk("chown", ["postgres:postgres", `${r.dir}/pg`]);
      const [cmd, ...args] = asPostgres([
        `${PG_BIN}/initdb`,
        "-D",
        `${r.dir}/pg/data`,
        "-A",
        "trust",
        "-U",
        "postgres",
      ]);
      await runOk(cmd, args);
    },
    argv: (r) => [
      "setsid",
      ...asPostgres([
        `${PG_BIN}/postgres`,
        "-D",
        `${r.dir}/pg/data`,
        "-k",
        `${r.dir}/pg`,
        "-p",
        String(runPort(r)),
        "-c",
        "listen_addresses=127.0.0.1",
      ]),
    ],
    midWork: async (r) => {
      await waitFor(
        () => psqlC(r, "CREATE TABLE t(x int PRIMARY KEY)").catch(() => undefined),
        "postgres does not answer",
        30_000,
      );
      const session = new PsqlSession(runPort(r));
      psqlSessions.set(r.dir, session);
      await session.send("BEGIN;\n", "BEGIN\n");
      await session.send("INSERT INTO t SELECT generate_series(1, 1000);\n", "INSERT 0 1000\n");
      // Not committed: a new connection does not see it yet.
      await Deno.writeTextFile(
        `${r.dir}/result.txt`,
        `before ${await psqlC(r, "SELECT count(*) FROM t")}`,
      );
    },
    finish: async (r, pid) => {
      const session = psqlSessions.get(r.dir);
      assert.ok(session, "no psql session");
      try {
        await session.send("INSERT INTO t VALUES (1001);\n", "INSERT 0 1\n");
        await session.send("COMMIT;\n", "COMMIT\n");
        const code = await session.end();
        const seen = await psqlC(r, "SELECT count(*), sum(x) FROM t");
        await Deno.writeTextFile(
          `${r.dir}/result.txt`,
          `session:\n${session.output}exit ${code}\nafter ${seen}`,
          { append: true },
        );
      } finally {
        session.kill();
        psqlSessions.delete(r.dir);
      }
      Deno.kill(pid, "SIGINT"); // a fast shutdown: the postmaster exits 0
    },
    result: async (r) => await Deno.readTextFile(`${r.dir}/result.txt`),
  },
  {
    name: "python3 -m http.server",
    commands: [PYTHON],
    expect: "restores",
    prepare: (input) => Deno.writeFile(`${input}/data.txt`, genText(100_000, 4)),
    setup: async (r) => await Deno.writeTextFile(`${r.dir}/port`, String(freePort())),
    argv: (r) => [
      "setsid",
      PYTHON,
      "-m",
      "http.server",
      "--bind",
      "127.0.0.1",
      "--directory",
      r.input,
      Deno.readTextFileSync(`${r.dir}/port`),
    ],
    midWork: async (r) => {
      const port = Number(await Deno.readTextFile(`${r.dir}/port`));
      const body = await waitFor(
        () => httpGet(port, "/data.txt").catch(() => undefined),
        "http.server does not answer",
        30_000,
      );
      await Deno.writeTextFile(`${r.dir}/result.txt`, `before ${body}\n`);
    },
    finish: async (r, pid) => {
      const port = Number(await Deno.readTextFile(`${r.dir}/port`));
      await Deno.writeTextFile(
        `${r.dir}/result.txt`,
        `after ${await httpGet(port, "/data.txt")}\n`,
        {
          append: true,
        },
      );
      Deno.kill(pid, "SIGINT"); // it says "Keyboard interrupt received, exiting." and exits 0
    },
    result: async (r) => await Deno.readTextFile(`${r.dir}/result.txt`),
  },
  {
    name: "node http.createServer with a keep-alive connection opened before the dump",
    commands: ["node"],
    expect: "restores",
    dumpFlags: ["--tcp-established"],
    setup: async (r) => await Deno.writeTextFile(`${r.dir}/port`, String(freePort())),
    argv: (r) => ["setsid", "node", "-e", NODE_HTTP_JS, String(runPort(r))],
    midWork: async (r) => {
      const port = runPort(r);
      const conn = await waitFor(
        () => KeptConn.open(port).catch(() => undefined),
        "node does not listen",
        30_000,
      );
      keptConns.set(r.dir, conn);
      const lines = [await keptGet(r, "/a"), await keptGet(r, "/b")];
      await Deno.writeTextFile(`${r.dir}/result.txt`, lines.join("\n") + "\n");
    },
    finish: async (r, pid) => {
      try {
        const lines = [await keptGet(r, "/c"), await keptGet(r, "/d")];
        lines.push(`new connection ${await httpGet(runPort(r), "/e")}`, await keptGet(r, "/f"));
        await Deno.writeTextFile(`${r.dir}/result.txt`, lines.join("\n") + "\n", {
          append: true,
        });
      } finally {
        keptConns.get(r.dir)?.close();
        keptConns.delete(r.dir);
      }
      Deno.kill(pid, "SIGTERM");
    },
    result: async (r) => await Deno.readTextFile(`${r.dir}/result.txt`),
  },
  {
    name: "tail -f (follows a growing file)",
    commands: ["tail"],
    expect: "restores",
    setup: (r) => Deno.writeFile(`${r.dir}/log`, genText(1000, 5)),
    argv: (r) => toFile(`${r.dir}/out.txt`, ["tail", "-n", "+1", "-f", `${r.dir}/log`]),
    midWork: async (r) => {
      await waitForLines(`${r.dir}/out.txt`, 1000, 30_000);
    },
    finish: async (r, pid) => {
      await Deno.writeFile(`${r.dir}/log`, genText(1000, 6), { append: true });
      await Deno.writeTextFile(`${r.dir}/log`, "END\n", { append: true });
      await waitForLines(`${r.dir}/out.txt`, 2001, 30_000);
      Deno.kill(pid, "SIGTERM");
    },
    result: (r) => digests(`${r.dir}/out.txt`),
    exitCode: 128 + 15,
  },
  fioOnLibaio("fio on libaio: 32 MiB written at iodepth 8, then verified (crc32c)", []),
  // Writes that bypass the page cache can be in flight at the freeze (dump waits for them), and
  // fio reaps their completions from the ring itself, which dump had used and put back.
  fioOnLibaio(
    "fio on libaio, O_DIRECT, completions reaped from the ring in user space",
    ["--direct=1", "--userspace_reap=1", "--iodepth_batch_complete=0"],
  ),
  {
    // A pty pair inside the tree: the output in flight between bash and script (and the VEOF
    // script types once its stdin, /dev/null, ends) must come through neither lost nor twice.
    name: "script -qfc (a shell's output through a pty inside the tree)",
    commands: ["script", "bash"],
    expect: "restores",
    argv: () => [
      "setsid",
      "script",
      "-qfc",
      "i=0; while [ $i -lt 200000 ]; do echo line $i; i=$((i+1)); done",
      "typescript",
    ],
    env: { SHELL: "/bin/bash", PATH: "/usr/bin:/bin" },
    midWork: (r) => untilFile(`${r.dir}/typescript`, 65536),
    // bash writes as fast as it can: a script lagging at the freeze leaves the pty full.
    transientRefusal: /its buffer is full/,
    // Between script's dated first and last lines, what went through the pty.
    result: async (r) => {
      const lines = (await Deno.readTextFile(`${r.dir}/typescript`)).split("\n");
      const body = lines.filter((l) => !l.startsWith("Script ")).join("\n");
      return `${lines.length} lines, sha256 ${await sha256Hex(new TextEncoder().encode(body))}`;
    },
  },
];

// ---------------------------------------------------------------------------
// running a case

/** Bound on every job, from start to exit. */
const JOB_TIMEOUT_MS = 60_000;

interface JobEnd {
  exit: string;
  result: string;
  dishonest?: string;
}

function exitText(code: number): string {
  return code > 128 ? `killed by signal ${code - 128}` : `exit ${code}`;
}

/** Waits for the job Deno started to exit; null on timeout. */
async function waitChild(child: Deno.ChildProcess, timeoutMs: number): Promise<string | null> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<null>((resolve) =>
    timer = setTimeout(() => resolve(null), timeoutMs)
  );
  try {
    // (Deno reports a death by signal N as code 128 + N.)
    const s = await Promise.race([child.status, timeout]);
    return s ? exitText(s.code) : null;
  } finally {
    clearTimeout(timer);
  }
}

/** Waits for a restored process (our child as the subreaper) to exit; null on timeout. */
async function waitRestored(pid: number, timeoutMs: number): Promise<string | null> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const s = waitpid(pid, WNOHANG | WALL);
      if (s) return exitText(s.exited ? s.exitCode : 128 + s.termSignal);
    } catch (e) {
      if (!(e instanceof SysError && e.code === "ECHILD")) throw e;
      if (!isAlive(pid)) return "ended (not our child: status unknown)";
    }
    if (Date.now() > deadline) return null;
    await sleep(20);
  }
}

/** SigIgn and SigCgt of PID: what a refused dump must leave as it was. */
function dispositions(pid: number): string {
  return `SigIgn ${statusField(pid, "SigIgn")} SigCgt ${statusField(pid, "SigCgt")}`;
}

/** Threads of `pids` that are still there: none traced or stopped. */
function assertAllFree(pids: number[], what: string): void {
  for (const p of pids.filter(isAlive)) {
    let tids: number[] = [];
    try {
      tids = threadsOf(p);
    } catch {
      continue; // ended meanwhile
    }
    for (const t of tids) {
      let state: string, tracer: string;
      try {
        state = statusField(p, "State", t)[0];
        tracer = statusField(p, "TracerPid", t);
      } catch {
        continue;
      }
      assert.ok(!["T", "t"].includes(state), `${what}: thread ${t} of ${p} is stopped (${state})`);
      assert.equal(tracer, "0", `${what}: thread ${t} of ${p} is still traced`);
    }
  }
}

/** How a dumped run went, besides its end. */
interface Dumped {
  /** The job was ended and restored: its pid is now our child. */
  restored: boolean;
  /** Set when a dump that had to refuse ended the job instead. */
  dishonest?: string;
}

/** The pids of the processes the images at `img` hold. */
function imagePids(img: string): number[] {
  return readImages(img).processes.map((p) => p.entry.pid);
}

/** The images of the job in `img`, taken as the case says. */
async function takeImages(c: Case, job: Target, img: string): Promise<AmberResult> {
  const flags = c.dumpFlags ?? [];
  if (c.taken === "leave-running") return await amber(dumpArgs(job.pid, img, "-R", ...flags));
  if (c.taken !== "pre-dump") return await amber(dumpArgs(job.pid, img, ...flags));
  const first = `${img}-pre`;
  const pre = await amber(["pre-dump", "-t", String(job.pid), "-D", first, ...flags]);
  assertExit(pre, 0, `${c.name}: pre-dump`);
  // It goes on working (and writing its memory) between the two.
  await sleep(300);
  return await amber(
    dumpArgs(job.pid, img, "--prev-images-dir", first, "--track-mem", ...flags),
  );
}

/** Dumps the job mid-work, checking the outcome the case expects. */
async function dumpMidWork(c: Case, job: Target, img: string): Promise<Dumped> {
  const pids = descendants(job.pid);
  const before = dispositions(job.pid);
  let r = await takeImages(c, job, img);
  for (let i = 0; i < 5 && r.code === 1 && c.transientRefusal?.test(r.stderr); i++) {
    assert.ok(isAlive(job.pid), `${c.name}: the refused dump ended the job`);
    assertAllFree(pids, `${c.name}: after a refusal of the instant`);
    await sleep(100);
    r = await takeImages(c, job, img);
  }
  if (c.expect === "restores" || r.code === 0) {
    assertExit(r, 0, `${c.name}: dump`);
    // dump -R left the job running: it ends here, and comes back as it was at the dump.
    if (c.taken === "leave-running") await killTree(job.pid);
    await job.child.status;
    // Also the children the job forked after `pids` was read (make's next gcc): the images list them.
    await waitVanished([...new Set([...pids, ...imagePids(img)])]);
    const rr = await amber(["restore", "-D", img, "-d", ...(c.restoreFlags ?? [])]);
    if (c.expect !== "restores") {
      // Say what became of the job, for whoever fixes it.
      const dishonest = `the dump ended the job instead of refusing, then restore -d ${
        rr.code ? `failed: ${rr.stderr.trim()}` : "succeeded"
      }`;
      assert.equal(rr.code, 0, `${c.name}: ${dishonest}`);
      return { restored: true, dishonest };
    }
    assertExit(rr, 0, `${c.name}: restore`);
    return { restored: true };
  }
  const line = assertOneLineError(r, 1, `${c.name}: dump`);
  assert.match(line, c.expect.refused, `${c.name}: refusal: ${line}`);
  assert.ok(isAlive(job.pid), `${c.name}: the refused dump ended the job`);
  assertAllFree(pids, `${c.name}: after the refused dump`);
  assert.equal(dispositions(job.pid), before, `${c.name}: signal dispositions changed`);
  return { restored: false };
}

/** One run of the job: undumped (img undefined) or dumped into img mid-work. */
async function runJob(c: Case, run: Run, img?: string): Promise<JobEnd> {
  await Deno.mkdir(run.dir);
  await c.setup?.(run);
  const beside = c.beside ? spawnTarget(c.beside(run), { cwd: run.dir }) : undefined;
  const job = spawnTarget(c.argv(run), { cwd: run.dir, env: c.env });
  const what = `${c.name}${img ? " (dumped)" : " (never dumped)"}`;
  try {
    await c.midWork(run, job.pid);
    const pause = (sig: Deno.Signal) => {
      if (!beside || !c.pauseBeside || !img) return;
      for (const p of descendants(beside.pid)) {
        try {
          Deno.kill(p, sig);
        } catch { /* a reader that just ended */ }
      }
    };
    pause("SIGSTOP");
    const dumped = img ? await dumpMidWork(c, job, img) : { restored: false };
    pause("SIGCONT");
    await c.finish?.(run, job.pid);
    const exit = dumped.restored
      ? await waitRestored(job.pid, JOB_TIMEOUT_MS)
      : await waitChild(job.child, JOB_TIMEOUT_MS);
    if (exit === null) {
      assert.fail(
        `${what}: ${dumped.dishonest ? `${dumped.dishonest}; ` : ""}did not finish in ` +
          `${JOB_TIMEOUT_MS} ms; where it is:\n${describeTree(job.pid)}`,
      );
    }
    if (beside) await killTree(beside.pid);
    return { exit, result: await c.result(run), dishonest: dumped.dishonest };
  } finally {
    await killTree(job.pid);
    if (beside) await killTree(beside.pid);
  }
}

async function runCase(c: Case): Promise<void> {
  for (const cmd of c.commands) {
    const found = cmd.startsWith("/")
      ? exists(cmd)
      : await commandWorks("sh", "-c", `command -v ${cmd}`);
    assert.ok(found, `${cmd} is not installed (.ci/run installs it)`);
  }
  for (const m of c.pythonModules ?? []) {
    const found = await commandWorks(PYTHON, "-c", `import ${m}`);
    assert.ok(found, `python3 module ${m} is not installed (.ci/run installs it)`);
  }
  await using tmp = await tempDir("amber-programs-");
  const input = `${tmp.path}/in`;
  await Deno.mkdir(input);
  await c.prepare?.(input);
  const ref = await runJob(c, { dir: `${tmp.path}/ref`, input });
  assert.equal(ref.exit, exitText(c.exitCode ?? 0), `${c.name}: the run never dumped`);
  const dumped = await runJob(c, { dir: `${tmp.path}/dumped`, input }, `${tmp.path}/img`);
  if (dumped.dishonest) {
    const same = dumped.exit === ref.exit && dumped.result === ref.result;
    assert.fail(
      `${c.name}: ${dumped.dishonest}; the restored job ended with ${dumped.exit} and ${
        same ? "the right result" : `this result:\n${dumped.result}\ninstead of:\n${ref.result}`
      }`,
    );
  }
  assert.equal(dumped.exit, ref.exit, `${c.name}: exit status after the dump`);
  assert.equal(dumped.result, ref.result, `${c.name}: result after the dump`);
}

const RUN_BROKEN = Deno.env.get("AMBER_RUN_BROKEN") === "1";

/** Cases run again restored with --lazy-pages: their memory comes in while they work on. */
for (const name of ["sort --parallel=2 (3M lines)", "python3 multiprocessing.Pool(2)"]) {
  const c = CASES.find((x) => x.name === name)!;
  CASES.push({ ...c, name: `${name}, restore --lazy-pages`, restoreFlags: ["--lazy-pages"] });
}

/**
 * Cases whose images are taken while they run: dump -R's snapshot, and pre-dump + dump. A
 * job that writes its output as it goes is not one for dump -R: the original, running on,
 * changes the file, and restore refuses it (as it should) unless --allow-changed-files.
 */
for (
  const [name, taken] of [
    ["python3 numpy matmul on 2 OpenBLAS threads", "leave-running"],
    ["redis-server (a populated dataset, on a unix socket)", "leave-running"],
    ["python3 multiprocessing.Pool(2)", "pre-dump"],
  ] as const
) {
  const c = CASES.find((x) => x.name === name)!;
  const how = taken === "leave-running" ? "dump -R" : "pre-dump, then dump --track-mem";
  CASES.push({ ...c, name: `${name}, ${how}`, taken });
}

for (const c of CASES) {
  const outcome = c.expect === "restores" ? "restores" : `refused ${c.expect.refused}`;
  Deno.test({
    name: `${c.name}: ${outcome}${c.knownBroken ? " (known broken)" : ""}`,
    ignore: !!c.knownBroken && !RUN_BROKEN,
    fn: () => runCase(c),
  });
}
