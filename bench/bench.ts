/**
 * deno task bench: dump and restore processes holding 64 MiB, 512 MiB and
 * 2 GiB of touched memory, a process of 100 threads and a tree of 50
 * processes, and a redis-server with its client's pause (redisPause);
 * prints figures, asserts nothing.
 *
 *   deno task bench [--vs-criu] [MiB ...]
 *   deno task bench redis        (only the redis pause)
 *   deno task bench migrate      (only the migration pause)
 *   deno task bench redis-migrate [MiB] (only redis-server migrated, default 2048 MiB)
 *   deno task bench lazy [MiB ...] (only the lazy restore rows)
 *
 * Then lazy restore (restore --lazy-pages -d) of the memory cases: until
 * the command returns, the process runs, and every page is in.
 *
 * Each case runs ROUNDS cycles of dump -R (frozen time as amber measures
 * it), dump (ends the tree), restore -d, and `dump --stream | restore
 * --stream -d` (the tree moved through a pipe, no image file on the
 * dumping side), each the whole command; the table shows the median and
 * the best round. With --vs-criu, CRIU
 * (CRIU_BIN, default the reference copy in ../shared/reference) dumps and
 * restores the same target in each round too, and the ratios amber/CRIU
 * are printed.
 */
import {
  amber,
  amberInBackground,
  buildC,
  CLI,
  commandWorks,
  DENO,
  descendants,
  dumpArgs,
  freePort,
  killAndReap,
  killTree,
  reapZombies,
  ROOT,
  sizeOf,
  spawnTarget,
  tempDir,
  waitForLines,
  waitVanished,
} from "../tests/_util.ts";
import {
  addClient,
  amberIn,
  DST_ADDR,
  hostPid,
  makeHosts,
  PORT,
  SRC_ADDR,
  startAtDestination,
  startReceiver,
  usable,
} from "../tests/_hosts.ts";
import { gapReport } from "./_gaps.ts";
import { haveRedis, movedRedis, redisCli, startRedis } from "../tests/_redis.ts";

const ROUNDS = 3;
const ONLY_REDIS = Deno.args.includes("redis");
const ONLY_MIGRATE = Deno.args.includes("migrate");
const ONLY_LAZY = Deno.args.includes("lazy");
const ONLY_REDIS_MIGRATE = Deno.args.includes("redis-migrate");
const ONLY = ONLY_REDIS || ONLY_MIGRATE || ONLY_LAZY || ONLY_REDIS_MIGRATE;
const args = Deno.args.filter((a) =>
  !["--vs-criu", "redis", "migrate", "lazy", "redis-migrate"].includes(a)
);
const VS_CRIU = Deno.args.includes("--vs-criu");
const CRIU = Deno.env.get("CRIU_BIN") ?? `${ROOT}/../shared/reference/criu`;

/**
 * The VM returns freed memory to its host, and touching such memory again is
 * several times slower than anything amber does (see FACTS.md): fill and
 * drop a file as large as what the next step allocates, so the figures
 * measure amber rather than the balloon.
 */
async function warmMemory(dir: string, bytes: number): Promise<void> {
  const chunk = new Uint8Array(64 * 1048576).fill(1);
  const path = `${dir}/warm`;
  {
    using f = await Deno.open(path, { write: true, create: true });
    for (let done = 0; done < bytes; done += chunk.length) await f.write(chunk);
  }
  await Deno.remove(path);
}

interface Round {
  frozenMs: number;
  /** The longest gap the target's 1 ms loop saw during dump -R (sweeper targets only). */
  feltMs?: number;
  criuFeltMs?: number;
  dumpRMs: number;
  dumpMs: number;
  restoreMs: number;
  streamMs: number;
  pageBytes: number;
  /** amber's peak resident memory (MiB) in the dump that ends the tree, and in restore -d. */
  dumpPeakMiB: number;
  restorePeakMiB: number;
  /** All image files, amber's and CRIU's, of that dump. */
  imageBytes: number;
  criuImageBytes?: number;
  criuDumpMs?: number;
  criuRestoreMs?: number;
  /** CRIU's dump followed by an fsync of each of its image files: images as durable as amber's. */
  criuDurableMs?: number;
  /** CRIU's restore with its pages files out of the page cache, as amber's are after its dump. */
  criuColdRestoreMs?: number;
}

/** Runs the CLI with -v, as an operator would; returns its wall time and what it printed. */
async function timed(args: string[]): Promise<{ ms: number; text: string }> {
  const t0 = performance.now();
  const r = await amber([...args, "-v"]);
  const ms = performance.now() - t0;
  if (r.code !== 0) throw new Error(`amber ${args.join(" ")}: ${r.stderr.trim()}`);
  return { ms, text: r.stderr };
}

/** Wall time of `dump --stream | restore --stream -d`, reaping the dumped tree's orphans meanwhile. */
async function timedStream(root: number): Promise<number> {
  const amberCmd = `${DENO} run -A ${CLI}`;
  const pipe =
    `set -o pipefail; ${amberCmd} dump -t ${root} --stream | ${amberCmd} restore --stream -d`;
  const tree = descendants(root);
  const t0 = performance.now();
  let done = false;
  const child = new Deno.Command("/bin/bash", {
    args: ["-c", pipe],
    cwd: ROOT,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  // The tree's pids only (not the pipeline's bash: Deno reaps it, and fails if another did).
  const run = child.output().finally(() => done = true);
  while (!done) {
    reapZombies(tree);
    await new Promise((r) => setTimeout(r, 10));
  }
  const r = await run;
  const ms = performance.now() - t0;
  if (r.code !== 0) throw new Error(`stream: ${new TextDecoder().decode(r.stderr).trim()}`);
  return ms;
}

async function timedCriu(args: string[]): Promise<number> {
  const t0 = performance.now();
  const r = await new Deno.Command(CRIU, { args, stdin: "null", stdout: "null", stderr: "piped" })
    .output();
  const ms = performance.now() - t0;
  if (r.code !== 0) {
    throw new Error(`criu ${args.join(" ")}: ${new TextDecoder().decode(r.stderr).trim()}`);
  }
  return ms;
}

function figure(text: string, re: RegExp): number {
  const m = re.exec(text);
  if (!m) throw new Error(`no ${re} in: ${text}`);
  return Number(m[1]);
}

interface Target {
  root: number;
  pids: number[];
  /** Where a testdata/sweeper.c target reports its longest gap. */
  gaps?: string;
}

/**
 * Runs `step` and returns the longest gap the sweeper's 1 ms loop saw
 * meanwhile (its status line: "SWEEP CURSOR MAXGAP_US BAD"; SIGUSR2 resets).
 */
async function longestGap(t: Target, step: () => Promise<unknown>): Promise<number | undefined> {
  if (!t.gaps) {
    await step();
    return undefined;
  }
  Deno.kill(t.root, "SIGUSR2");
  await new Promise((r) => setTimeout(r, 50));
  await step();
  // The next status line (every 20 ms) holds the gap.
  await new Promise((r) => setTimeout(r, 60));
  const last = (await Deno.readTextFile(t.gaps)).trim().split("\n").at(-1) ?? "";
  const us = Number(last.split(" ")[2]);
  return Number.isFinite(us) ? us / 1000 : undefined;
}

/** One amber round on a target, which comes back each time. */
async function cycle(path: string, t: Target, bytes: number): Promise<Round> {
  await warmMemory(path, bytes * 2);
  let d = { ms: 0, text: "" };
  const feltMs = await longestGap(t, async () => {
    d = await timed(dumpArgs(t.root, `${path}/img-R`, "-R"));
  });
  const pageBytes = sizeOf(`${path}/img-R`, /^pages-/);
  await Deno.remove(`${path}/img-R`, { recursive: true });
  await warmMemory(path, bytes * 2);
  const k = await timed(dumpArgs(t.root, `${path}/img`));
  await waitVanished(t.pids);
  await warmMemory(path, bytes * 2);
  const imageBytes = sizeOf(`${path}/img`, /./);
  const r = await timed(["restore", "-D", `${path}/img`, "-d"]);
  await Deno.remove(`${path}/img`, { recursive: true });
  // Both ends on this machine: the restore side needs the memory as well.
  await warmMemory(path, bytes * 3);
  const streamMs = await timedStream(t.root);
  return {
    frozenMs: figure(d.text, /frozen (\d+) ms/),
    feltMs,
    dumpRMs: d.ms,
    dumpMs: k.ms,
    restoreMs: r.ms,
    streamMs,
    pageBytes,
    dumpPeakMiB: figure(k.text, /peak memory (\d+) MiB/),
    restorePeakMiB: figure(r.text, /peak memory (\d+) MiB/),
    imageBytes,
  };
}

/**
 * One CRIU round on a target of its own (CRIU restores into a time
 * namespace of its own, which amber would refuse to dump afterwards).
 */
async function criuCycle(path: string, t: Target, bytes: number, round: Round): Promise<void> {
  await Deno.mkdir(`${path}/criu-R`);
  await warmMemory(path, bytes * 2);
  round.criuFeltMs = await longestGap(
    t,
    () => timedCriu(["dump", "-R", "-t", String(t.root), "-D", `${path}/criu-R`]),
  );
  await Deno.remove(`${path}/criu-R`, { recursive: true });
  await Deno.mkdir(`${path}/criu`);
  await warmMemory(path, bytes * 2);
  round.criuDumpMs = await timedCriu(["dump", "-t", String(t.root), "-D", `${path}/criu`]);
  round.criuImageBytes = sizeOf(`${path}/criu`, /./);
  await waitVanished(t.pids);
  await warmMemory(path, bytes * 2);
  round.criuRestoreMs = await timedCriu(["restore", "-D", `${path}/criu`, "-d"]);
  await Deno.remove(`${path}/criu`, { recursive: true });
  // The same work as amber's: images durable before the tree ends, restored from the disk.
  await Deno.mkdir(`${path}/criu`);
  await warmMemory(path, bytes * 2);
  const dumpMs = await timedCriu(["dump", "-t", String(t.root), "-D", `${path}/criu`]);
  round.criuDurableMs = dumpMs + await timedSync(`${path}/criu`);
  await waitVanished(t.pids);
  await dropCached(`${path}/criu`, /^pages-/);
  await warmMemory(path, bytes * 2);
  round.criuColdRestoreMs = await timedCriu(["restore", "-D", `${path}/criu`, "-d"]);
  await Deno.remove(`${path}/criu`, { recursive: true });
}

/** Wall time of fsync on every file of `dir` and on `dir` itself (GNU sync FILE...). */
async function timedSync(dir: string): Promise<number> {
  const files = [...Deno.readDirSync(dir)].map((e) => `${dir}/${e.name}`);
  const t0 = performance.now();
  await run("sync", [...files, dir]);
  return performance.now() - t0;
}

/** Drops the (clean) page cache of the files of `dir` named like `re` (dd's nocache). */
async function dropCached(dir: string, re: RegExp): Promise<void> {
  for (const e of Deno.readDirSync(dir)) {
    if (re.test(e.name)) {
      await run("dd", [`if=${dir}/${e.name}`, "iflag=nocache", "count=0", "status=none"]);
    }
  }
}

async function run(cmd: string, args: string[]): Promise<void> {
  const r = await new Deno.Command(cmd, { args, stdout: "null", stderr: "piped" }).output();
  if (!r.success) throw new Error(`${cmd}: ${new TextDecoder().decode(r.stderr).trim()}`);
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const best = (xs: number[]) => Math.min(...xs);
const gbs = (bytes: number, ms: number) => (bytes / 1e9 / (ms / 1000)).toFixed(2);
const both = (xs: number[]) =>
  xs.some(Number.isNaN) ? "-" : `${median(xs).toFixed(0)} (${best(xs).toFixed(0)})`;

interface Case {
  name: string;
  bytes: number;
  /** Starts the target; returns its root and, once it runs, all its pids. */
  start(dir: string): Promise<Target>;
}

const sweeper = await buildC("sweeper");
const threads = await buildC("threads");
const tree = await buildC("tree");

function memoryCase(mib: number): Case {
  return {
    name: `${mib} MiB`,
    bytes: mib * 1048576,
    async start(dir) {
      await Deno.mkdir(dir, { recursive: true });
      const out = `${dir}/out.txt`;
      // It writes its memory all the time and reports its longest gap.
      const { pid } = spawnTarget([sweeper, out, String(mib), "--setsid"]);
      await waitForLines(out, 2, 120_000);
      return { root: pid, pids: [pid], gaps: out };
    },
  };
}

const CASES: Case[] = [
  ...(args.length ? args.map(Number) : [64, 512, 1024, 2048]).map(memoryCase),
  {
    name: "100 threads",
    bytes: 0,
    async start(dir) {
      await Deno.mkdir(dir, { recursive: true });
      const out = `${dir}/threads.txt`;
      const { pid } = spawnTarget(["setsid", threads, out, "100"]);
      await waitForLines(out, 300, 60_000);
      return { root: pid, pids: [pid] };
    },
  },
  {
    name: "50 processes",
    bytes: 0,
    async start(dir) {
      const out = `${dir}/tree`;
      await Deno.mkdir(out, { recursive: true });
      const { pid } = spawnTarget([tree, out, "1", "49", "--setsid"]);
      for (let i = 0; i < 500 && descendants(pid).length < 50; i++) {
        await new Promise((r) => setTimeout(r, 20));
      }
      await new Promise((r) => setTimeout(r, 200));
      return { root: pid, pids: descendants(pid) };
    },
  },
];

console.log(
  `amber bench, ${new Date().toISOString().slice(0, 10)}, ${Deno.osRelease()}, ` +
    `${navigator.hardwareConcurrency} CPUs: median (best) of ${ROUNDS} rounds, whole commands (ms).`,
);
console.log("frozen: dump -R as amber measures it; felt: the longest gap the target's 1 ms loop");
console.log("saw during dump -R (memory cases: testdata/sweeper.c, writing all the time);");
console.log("dump: a dump that ends the tree (images");
console.log("durable); restore: restore -d; GB/s: pages over the median; stream: dump --stream |");
console.log("restore --stream -d, the two at once; peak: amber's peak resident memory (MiB) in");
console.log("dump / restore -d; images: MiB of all image files of the dump.");
if (VS_CRIU) {
  console.log("CRIU dump / restore: as CRIU runs (its images left in the page cache, not yet on");
  console.log("the disk); CRIU dump+fsync: the same dump, then an fsync of each image file (as");
  console.log(
    "durable as amber's when the tree ends); CRIU restore (cold): from those images with",
  );
  console.log("the pages files out of the page cache (as amber's are, written past it).");
}
const header = [
  "case",
  "frozen",
  "felt",
  "dump -R",
  "dump",
  "dump GB/s",
  "restore",
  "restore GB/s",
  "stream",
  "peak",
  "images",
];
if (VS_CRIU) {
  header.push(
    "CRIU images",
    "CRIU felt",
    "felt ratio",
    "CRIU dump",
    "CRIU restore",
    "dump ratio",
    "restore ratio",
    "CRIU dump+fsync",
    "CRIU restore (cold)",
    "durable dump ratio",
    "cold restore ratio",
  );
}
if (!ONLY) console.log(header.join(" | "));
for (const c of ONLY ? [] : CASES) {
  await using tmp = await tempDir("amber-bench-");
  const targets: Target[] = [await c.start(`${tmp.path}/a`)];
  try {
    if (VS_CRIU) targets.push(await c.start(`${tmp.path}/c`));
    const rounds: Round[] = [];
    for (let i = 0; i < ROUNDS; i++) {
      const round = await cycle(`${tmp.path}/a`, targets[0], c.bytes);
      if (VS_CRIU) await criuCycle(`${tmp.path}/c`, targets[1], c.bytes, round);
      rounds.push(round);
    }
    const col = (f: (r: Round) => number | undefined) => rounds.map((r) => f(r) ?? NaN);
    const pages = rounds[0].pageBytes;
    const row = [
      c.name,
      both(col((r) => r.frozenMs)),
      both(col((r) => r.feltMs)),
      both(col((r) => r.dumpRMs)),
      both(col((r) => r.dumpMs)),
      gbs(pages, median(col((r) => r.dumpMs))),
      both(col((r) => r.restoreMs)),
      gbs(pages, median(col((r) => r.restoreMs))),
      both(col((r) => r.streamMs)),
      `${median(col((r) => r.dumpPeakMiB))} / ${median(col((r) => r.restorePeakMiB))}`,
      (median(col((r) => r.imageBytes)) / 1048576).toFixed(1),
    ];
    if (VS_CRIU) {
      const ratio = (a: (r: Round) => number | undefined, b: (r: Round) => number | undefined) =>
        col(a).some(Number.isNaN) ? "-" : (median(col(a)) / median(col(b))).toFixed(2) + "x";
      row.push(
        (median(col((r) => r.criuImageBytes)) / 1048576).toFixed(1),
        both(col((r) => r.criuFeltMs)),
        ratio((r) => r.feltMs, (r) => r.criuFeltMs),
        both(col((r) => r.criuDumpMs)),
        both(col((r) => r.criuRestoreMs)),
        ratio((r) => r.dumpMs, (r) => r.criuDumpMs),
        ratio((r) => r.restoreMs, (r) => r.criuRestoreMs),
        both(col((r) => r.criuDurableMs)),
        both(col((r) => r.criuColdRestoreMs)),
        ratio((r) => r.dumpMs, (r) => r.criuDurableMs),
        ratio((r) => r.restoreMs, (r) => r.criuColdRestoreMs),
      );
    }
    console.log(row.join(" | "));
  } finally {
    for (const t of targets) {
      await killTree(t.root).catch(() => {});
      await killAndReap(t.root).catch(() => {});
    }
  }
}

/**
 * A client outside the tree sending INCR on one TCP connection, one at a
 * time, as fast as replies come; it keeps the longest time between two
 * replies since the last reset, and counts replies that do not follow
 * the one before.
 */
class IncrClient {
  maxGapMs = 0;
  replies = 0;
  wrong = 0;
  #stop = false;
  #done: Promise<void>;

  constructor(private conn: Deno.Conn) {
    this.#done = this.#run();
  }

  async #run(): Promise<void> {
    const req = new TextEncoder().encode("INCR counter\r\n"), buf = new Uint8Array(64);
    let last = performance.now(), value = -1;
    while (!this.#stop) {
      await this.conn.write(req);
      let text = "";
      while (!text.endsWith("\r\n")) {
        const n = await this.conn.read(buf);
        if (n === null) throw new Error("redis closed the connection");
        text += new TextDecoder().decode(buf.subarray(0, n));
      }
      const now = performance.now();
      this.maxGapMs = Math.max(this.maxGapMs, now - last);
      last = now;
      const got = Number(/^:(\d+)/.exec(text)?.[1]);
      if (value >= 0 && got !== value + 1) this.wrong++;
      value = got;
      this.replies++;
    }
  }

  async stop(): Promise<void> {
    this.#stop = true;
    await this.#done;
    this.conn.close();
  }
}

/**
 * redis-server holding 20,000 keys, dumped (--tcp-established, ending it)
 * and restored ROUNDS times while IncrClient keeps its connection busy:
 * the time of dump + restore, and the longest pause between two replies
 * the client saw (the lock drops its packets, so this includes TCP's
 * retransmission backoff).
 */
async function redisPause(): Promise<void> {
  if (!(await commandWorks("redis-server", "--version"))) {
    console.log("redis: redis-server is not installed; skipped");
    return;
  }
  await using tmp = await tempDir("amber-bench-");
  const port = freePort();
  const cli = async (...a: string[]) => {
    const r = await new Deno.Command("redis-cli", { args: ["-p", String(port), ...a] }).output();
    return r.success ? new TextDecoder().decode(r.stdout).trim() : undefined;
  };
  const { pid } = spawnTarget([
    "setsid",
    "redis-server",
    ...["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    ...["--dir", tmp.path, "--enable-debug-command", "yes"],
  ]);
  try {
    for (let i = 0; i < 300 && await cli("PING") !== "PONG"; i++) {
      await new Promise((r) => setTimeout(r, 50));
    }
    await cli("DEBUG", "POPULATE", "20000", "key", "64");
    const client = new IncrClient(await Deno.connect({ hostname: "127.0.0.1", port }));
    const rounds: { ms: number; gap: number }[] = [];
    try {
      for (let i = 0; i < ROUNDS; i++) {
        await new Promise((r) => setTimeout(r, 300));
        client.maxGapMs = 0;
        const t0 = performance.now();
        await timed(dumpArgs(pid, `${tmp.path}/img`, "--tcp-established"));
        await waitVanished([pid]);
        await timed(["restore", "-D", `${tmp.path}/img`, "-d"]);
        const ms = performance.now() - t0;
        // The pause ends with the first reply after the restore.
        const seen = client.replies;
        while (client.replies < seen + 10) await new Promise((r) => setTimeout(r, 10));
        rounds.push({ ms, gap: client.maxGapMs });
        await Deno.remove(`${tmp.path}/img`, { recursive: true });
      }
    } finally {
      await client.stop();
    }
    const keys = await cli("DBSIZE");
    console.log(
      `redis-server, 20,000 keys, one client sending INCR (ms): dump+restore ` +
        `${both(rounds.map((r) => r.ms))}, longest pause between replies ` +
        `${both(rounds.map((r) => r.gap))}; ${client.replies} replies, ${client.wrong} out of ` +
        `sequence, DBSIZE ${keys} after`,
    );
  } finally {
    await killAndReap(pid).catch(() => {});
  }
}

/** Asks testdata/gaps.c for its longest gap since the last ask (ms), after it checked its memory. */
async function gapOf(pid: number, out: string): Promise<number> {
  return (await gapReport(pid, out)).ms;
}

/**
 * testdata/gaps.c (256 MiB, a 1 ms loop rewriting hot pages) moved
 * between two network namespaces with `amber migrate` (tests/_hosts.ts),
 * and on this host with a plain dump + restore: the longest gap its own
 * loop saw, which is the longest pause of all the rounds.
 */
async function migratePause(): Promise<void> {
  if (!usable) {
    console.log("migrate: needs root, ip netns and unshare --pid; skipped");
    return;
  }
  const bin = await buildC("gaps");
  const mib = 256;
  const plain: number[] = [], moved: number[] = [], lazily: number[] = [], rounds: string[] = [];
  const remote: number[] = [], served: string[] = [], criu: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    await using tmp = await tempDir("amber-bench-");
    await warmMemory(tmp.path, mib * 3 * 1048576);
    const a = spawnTarget([bin, `${tmp.path}/a.txt`, String(mib)]);
    try {
      await waitForLines(`${tmp.path}/a.txt`, 1, 60_000);
      await gapOf(a.pid, `${tmp.path}/a.txt`);
      await timed(dumpArgs(a.pid, `${tmp.path}/img`));
      await waitVanished([a.pid]);
      await timed(["restore", "-D", `${tmp.path}/img`, "-d"]);
      plain.push(await gapOf(a.pid, `${tmp.path}/a.txt`));
    } finally {
      await killAndReap(a.pid).catch(() => {});
    }
    if (VS_CRIU) criu.push(await criuPause(tmp.path, bin, mib));
    const eager = await migrateOnce(tmp.path, bin, mib, false);
    moved.push(eager.gap);
    rounds.push(eager.rounds);
    lazily.push((await migrateOnce(tmp.path, bin, mib, true)).gap);
    const r = await remoteLazyOnce(tmp.path, bin, mib);
    remote.push(r.gap);
    served.push(r.served);
  }
  console.log(
    `gaps, ${mib} MiB, 1 ms loop: longest pause it saw (ms): migrate between network namespaces ` +
      `${both(moved)} [${rounds.join("; ")}], with migrate-receive --lazy-pages ${both(lazily)}, ` +
      `dump --lazy-pages + restore --lazy-pages --page-server there ${both(remote)} ` +
      `[${served.join("; ")}], dump + restore ${both(plain)}` +
      (VS_CRIU ? `, CRIU 4.2 dump + restore -d ${both(criu)}` : ""),
  );
}

/**
 * Issue 13's own case: a process of `mib` MiB rewriting its memory at `rate` MiB/s (gaps.c
 * checks every word after), migrated eagerly and lazily; the longest pause it saw.
 */
async function migrateWritingPause(mib: number, rate: number): Promise<void> {
  if (!usable) return;
  const bin = await buildC("gaps");
  const eager: number[] = [], lazily: number[] = [], rounds: string[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    await using tmp = await tempDir("amber-bench-");
    await warmMemory(tmp.path, mib * 3 * 1048576);
    const e = await migrateOnce(tmp.path, bin, mib, false, rate);
    eager.push(e.gap);
    rounds.push(e.rounds);
    const l = await migrateOnce(tmp.path, bin, mib, true, rate);
    lazily.push(l.gap);
    rounds.push(`lazy: ${l.rounds}`);
  }
  console.log(
    `gaps, ${mib} MiB rewritten at ${rate} MiB/s, 1 ms loop: longest pause it saw (ms): ` +
      `migrate ${both(eager)}, with migrate-receive --lazy-pages ${both(lazily)} ` +
      `[${rounds.join("; ")}]`,
  );
}

/** The longest gap a new gaps target saw through `criu dump` and `criu restore -d` on this host. */
async function criuPause(dir: string, bin: string, mib: number): Promise<number> {
  const out = `${dir}/c.txt`;
  const c = spawnTarget([bin, out, String(mib)]);
  try {
    await waitForLines(out, 1, 60_000);
    await gapOf(c.pid, out);
    await Deno.mkdir(`${dir}/criu`);
    await timedCriu(["dump", "-t", String(c.pid), "-D", `${dir}/criu`]);
    await waitVanished([c.pid]);
    await timedCriu(["restore", "-D", `${dir}/criu`, "-d"]);
    return await gapOf(c.pid, out);
  } finally {
    await killAndReap(c.pid).catch(() => {});
    await Deno.remove(`${dir}/criu`, { recursive: true }).catch(() => {});
  }
}

/**
 * A new gaps target dumped with --lazy-pages in one namespace and restored
 * with --lazy-pages --page-server in the other: the longest gap it saw,
 * and what the source served.
 */
async function remoteLazyOnce(
  dir: string,
  bin: string,
  mib: number,
): Promise<{ gap: number; served: string }> {
  await using hosts = await makeHosts();
  const out = `${dir}/b-remote.txt`;
  const inSrc = ["nsenter", `--net=/run/netns/${hosts.src}`, "--"];
  const b = spawnTarget([...inSrc, bin, out, String(mib)]);
  const img = `${dir}/img-remote`;
  const at = ["--address", SRC_ADDR, "--port", String(PORT)];
  try {
    await waitForLines(out, 1, 60_000);
    await gapOf(b.pid, out);
    const src = amberInBackground(
      ["dump", "-t", String(b.pid), "-D", img, "--lazy-pages", ...at, "-v"],
      inSrc,
    );
    await src.waitLine(/serving lazy pages on/);
    const args = ["restore", "-D", img, "--lazy-pages", "--page-server", ...at];
    await using _dst = await startAtDestination(hosts, dir, args);
    const st = await src.done;
    if (st.code !== 0) throw new Error(`dump --lazy-pages: ${src.lines.join("\n")}`);
    const there = hostPid(b.pid, bin);
    if (!there) throw new Error("dump --lazy-pages: the tree does not run at the destination");
    const gap = await gapOf(there, out);
    const line = src.lines.find((l) => /has every page/.test(l)) ?? "";
    return { gap, served: line.replace(/^.*has every page: /, "") };
  } finally {
    await killAndReap(b.pid).catch(() => {});
    await Deno.remove(img, { recursive: true }).catch(() => {});
  }
}

/** One migration of a new gaps target between two new hosts: the longest gap it saw. */
async function migrateOnce(
  dir: string,
  bin: string,
  mib: number,
  lazy: boolean,
  writeMiBps?: number,
): Promise<{ gap: number; rounds: string }> {
  await using hosts = await makeHosts();
  await using _recv = await startReceiver(hosts, dir, lazy ? ["--lazy-pages"] : []);
  const out = `${dir}/b-${lazy ? "lazy" : "eager"}.txt`;
  const rate = writeMiBps ? [String(writeMiBps)] : [];
  const b = spawnTarget(
    ["nsenter", `--net=/run/netns/${hosts.src}`, "--", bin, out, String(mib), ...rate],
  );
  try {
    await waitForLines(out, 1, 60_000);
    await gapOf(b.pid, out);
    const to = `${DST_ADDR}:${PORT}`;
    const r = await amberIn(hosts.src, ["migrate", "-t", String(b.pid), "--to", to, "--json"]);
    if (r.code !== 0) throw new Error(`migrate: ${r.stderr.trim()}`);
    const m = JSON.parse(r.stdout);
    await waitVanished([b.pid]);
    const there = hostPid(b.pid, bin);
    if (!there) {
      const why = await Deno.readTextFile(`${dir}/recv.err`).catch(() => "");
      throw new Error(`migrate: the tree does not run at the destination: ${why.trim()}`);
    }
    const gap = await gapOf(there, out);
    const frozen = (m.rounds as { frozenMs: number }[]).map((x) => x.frozenMs.toFixed(0));
    return {
      gap,
      rounds: `${frozen.join("+")} ms frozen, final ${(m.finalPageBytes / 1024).toFixed(0)} KiB`,
    };
  } finally {
    await killAndReap(b.pid).catch(() => {});
  }
}

/** Bytes redis-server 7 holds per key of DEBUG POPULATE's with 256-byte values (measured). */
const REDIS_KEY_BYTES = 393;

/**
 * redis-server holding `mib` MiB of keys migrated (`migrate
 * --tcp-established`, tests/migrate_tcp_test.ts) between two network
 * namespaces with its service address, while a client in a third sends
 * INCR on one connection, ROUNDS times with a plain receiver and with
 * `migrate-receive --lazy-pages`, alternating: the longest pause between
 * two replies the client saw, and how long the final round froze redis.
 */
async function redisMigratePause(mib: number): Promise<void> {
  if (!haveRedis) {
    console.log("redis-migrate: needs root, ip netns, unshare --pid and redis-server; skipped");
    return;
  }
  const keys = Math.round(mib * 1048576 / REDIS_KEY_BYTES);
  const runs = { eager: [] as RedisMigration[], lazy: [] as RedisMigration[] };
  for (let i = 0; i < ROUNDS; i++) {
    for (const lazy of [false, true]) {
      await using tmp = await tempDir("amber-bench-");
      await warmMemory(tmp.path, mib * 3 * 1048576);
      runs[lazy ? "lazy" : "eager"].push(await redisMigrateOnce(tmp.path, keys, lazy));
    }
  }
  const all = [...runs.eager, ...runs.lazy];
  const line = (rs: RedisMigration[]) =>
    `longest pause ${both(rs.map((r) => r.gapMs))}, final round frozen ` +
    `${both(rs.map((r) => r.frozenMs))} [${rs.map((r) => r.rounds).join("; ")}]`;
  console.log(
    `redis-migrate: redis-server, ${mib} MiB (${keys} keys), migrated between network ` +
      `namespaces with its address, one client sending INCR (ms): ${line(runs.eager)}; with ` +
      `migrate-receive --lazy-pages ${line(runs.lazy)}; ` +
      `${all.reduce((n, r) => n + r.replies, 0)} replies, ` +
      `${all.reduce((n, r) => n + r.wrong, 0)} out of sequence or lost`,
  );
}

interface RedisMigration {
  gapMs: number;
  frozenMs: number;
  /** Pre-copy rounds, the final round's pages, the client's pauses over 100 ms. */
  rounds: string;
  replies: number;
  wrong: number;
}

/** One migration of a new redis-server between new hosts. */
async function redisMigrateOnce(dir: string, keys: number, lazy: boolean): Promise<RedisMigration> {
  await using hosts = await makeHosts();
  await using net = await addClient(hosts, dir);
  const recvArgs = ["--action-script", net.dstScript, ...(lazy ? ["--lazy-pages"] : [])];
  await using recv = await startReceiver(hosts, dir, recvArgs);
  await using redis = await startRedis(dir, hosts.src, net, keys);
  const r = await amberIn(hosts.src, [
    "migrate",
    ...["-t", String(redis.pid), "--to", `${DST_ADDR}:${PORT}`, "--tcp-established"],
    ...["--action-script", net.srcScript, "--json"],
  ]);
  if (r.code !== 0) throw new Error(`redis-migrate: ${r.stderr.trim()}`);
  if ((await recv.result()).code !== 0 || !movedRedis(redis.pid)) {
    throw new Error("redis-migrate: redis-server does not run at the destination");
  }
  const at = await redis.replies();
  while (await redis.replies() < at + 200) await new Promise((r) => setTimeout(r, 20));
  const c = await redis.stop();
  if (await redisCli(net, "DBSIZE") !== String(keys + 1)) throw new Error("redis-migrate: keys");
  const m = JSON.parse(r.stdout);
  return {
    gapMs: c.gapMs,
    frozenMs: m.frozenMs,
    rounds: `${m.preCopyRounds} pre-copy, final ${(m.finalPageBytes / 1024).toFixed(0)} KiB, ` +
      `pauses ${c.pauses.map((p) => p.toFixed(0)).join(" ")}`,
    replies: c.n,
    wrong: c.wrong + (c.last === c.n ? 0 : 1),
  };
}

/**
 * Lazy restore (restore --lazy-pages -d) of the counter target beside a
 * plain restore -d, from the same images, alternating: the time until the
 * restore command returns, until the process writes its next line (it
 * runs), and until the background server says every page is in.
 */
async function lazyRows(sizes: number[]): Promise<void> {
  console.log(
    "lazy restore (ms, from the command's start): restore -d | lazy: returns | " +
      "runs (next line) | all pages in",
  );
  for (const mib of sizes) {
    await using tmp = await tempDir("amber-bench-");
    const t = await memoryCase(mib).start(`${tmp.path}/a`);
    const out = `${tmp.path}/a/out.txt`;
    const img = `${tmp.path}/img`;
    const lines = async () => (await Deno.readTextFile(out)).split("\n").length;
    const rounds: { plain: number; back: number; runs: number; allIn: number }[] = [];
    try {
      for (let i = 0; i < ROUNDS; i++) {
        await timed(dumpArgs(t.root, img));
        await waitVanished(t.pids);
        await warmMemory(tmp.path, mib * 1048576 * 2);
        const plain = (await timed(["restore", "-D", img, "-d"])).ms;
        await Deno.remove(img, { recursive: true });
        await timed(dumpArgs(t.root, img));
        await waitVanished(t.pids);
        await warmMemory(tmp.path, mib * 1048576 * 2);
        const before = await lines();
        const log = `${tmp.path}/lazy-${i}.log`;
        const t0 = performance.now();
        const r = await amber(["restore", "-D", img, "-d", "--lazy-pages", "--json", "-o", log]);
        const back = performance.now() - t0;
        if (r.code !== 0) throw new Error(`restore --lazy-pages: ${r.stderr.trim()}`);
        let runs = NaN, allIn = NaN;
        while (Number.isNaN(allIn)) {
          if (Number.isNaN(runs) && await lines() > before) runs = performance.now() - t0;
          if (/lazy pages: all in/.test(await Deno.readTextFile(log))) {
            allIn = performance.now() - t0;
          }
          await new Promise((r) => setTimeout(r, 2));
        }
        if (Number.isNaN(runs)) runs = allIn;
        rounds.push({ plain, back, runs, allIn });
        await Deno.remove(img, { recursive: true });
      }
      const col = (f: (r: (typeof rounds)[0]) => number) => both(rounds.map(f));
      console.log(
        [
          `${mib} MiB`,
          col((r) => r.plain),
          col((r) => r.back),
          col((r) => r.runs),
          col((r) => r.allIn),
        ].join(" | "),
      );
    } finally {
      await killAndReap(t.root).catch(() => {});
    }
  }
}

if (!ONLY || ONLY_LAZY) await lazyRows(args.length ? args.map(Number) : [256, 1024]);
if (!ONLY || ONLY_REDIS) await redisPause();
if (!ONLY || ONLY_MIGRATE) await migratePause();
if (!ONLY || ONLY_MIGRATE) await migrateWritingPause(2048, 50);
if (!ONLY || ONLY_REDIS_MIGRATE) {
  await redisMigratePause(ONLY_REDIS_MIGRATE && args.length ? Number(args[0]) : 2048);
}
