/**
 * deno task bench: dump (-R) and restore processes holding 64 MiB, 512 MiB
 * and 2 GiB of touched memory; prints figures, asserts nothing.
 *
 *   deno task bench [MiB ...]
 *
 * Each size runs ROUNDS cycles of dump -R (timed), dump (ends the process)
 * and restore -d (timed); the table shows the median and the best round.
 */
import {
  amber,
  buildC,
  dumpArgs,
  killAndReap,
  sizeOf,
  spawnTarget,
  tempDir,
  waitForLines,
  waitGone,
} from "../tests/_util.ts";

const ROUNDS = 3;

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
  dumpMs: number;
  restoreMs: number;
  restoreWallMs: number;
  pageBytes: number;
  imageBytes: number;
}

/** Runs the CLI with -v, as an operator would; returns its wall time and what it printed. */
async function timed(args: string[]): Promise<{ ms: number; text: string }> {
  const t0 = performance.now();
  const r = await amber([...args, "-v"]);
  const ms = performance.now() - t0;
  if (r.code !== 0) throw new Error(`amber ${args.join(" ")}: ${r.stderr.trim()}`);
  return { ms, text: r.stderr };
}

function figure(text: string, re: RegExp): number {
  const m = re.exec(text);
  if (!m) throw new Error(`no ${re} in: ${text}`);
  return Number(m[1]);
}

async function cycle(path: string, pid: number, size: number): Promise<Round> {
  const bytes = size * 1048576;
  await warmMemory(path, bytes * 2);
  const d = await timed(dumpArgs(pid, `${path}/img-R`, "-R"));
  const imageBytes = sizeOf(`${path}/img-R`, /./);
  const pageBytes = sizeOf(`${path}/img-R`, /^pages-/);
  await Deno.remove(`${path}/img-R`, { recursive: true });
  await timed(dumpArgs(pid, `${path}/img`));
  await waitGone(pid);
  await warmMemory(path, bytes * 2);
  const r = await timed(["restore", "-D", `${path}/img`, "-d"]);
  await Deno.remove(`${path}/img`, { recursive: true });
  return {
    frozenMs: figure(d.text, /frozen (\d+) ms/),
    dumpMs: d.ms,
    restoreMs: figure(r.text, / in (\d+) ms/),
    restoreWallMs: r.ms,
    pageBytes,
    imageBytes,
  };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const best = (xs: number[]) => Math.min(...xs);
const gbs = (bytes: number, ms: number) => (bytes / 1e9 / (ms / 1000)).toFixed(2);
const cell = (v: string, w: number) => v.padStart(w);

const sizes = Deno.args.length ? Deno.args.map(Number) : [64, 512, 2048];
const counter = await buildC("counter");
console.log(`amber bench: median (best) of ${ROUNDS} rounds; images in /tmp (page cache).`);
console.log("dump ms / restore ms: wall time of the whole command (Deno start-up included);");
console.log("dump GB/s: pages over the frozen time, until the page cache holds them (the");
console.log("fsync follows with the tree running); restore GB/s: pages over the restore itself.");
console.log(
  "MiB  | frozen ms     | dump ms       | dump GB/s   | image MiB | restore ms    | restore GB/s",
);
for (const size of sizes) {
  await using tmp = await tempDir("amber-bench-");
  const out = `${tmp.path}/out.txt`;
  const target = spawnTarget([counter, out, String(size), "--setsid"]);
  try {
    await waitForLines(out, 2, 120_000);
    const rounds: Round[] = [];
    // The restored process keeps the pid; its parent is now this process.
    for (let i = 0; i < ROUNDS; i++) rounds.push(await cycle(tmp.path, target.pid, size));
    const col = (f: (r: Round) => number) => rounds.map(f);
    const both = (xs: number[]) => `${median(xs).toFixed(0)} (${best(xs).toFixed(0)})`;
    const pages = rounds[0].pageBytes;
    /** GB/s of the pages over the times `f`: median (best). */
    const rate = (f: (r: Round) => number) =>
      `${gbs(pages, median(col(f)))} (${gbs(pages, best(col(f)))})`;
    console.log(
      [
        String(size).padEnd(4),
        cell(both(col((r) => r.frozenMs)), 13),
        cell(both(col((r) => r.dumpMs)), 13),
        cell(rate((r) => r.frozenMs), 11),
        cell((rounds[0].imageBytes / 1048576).toFixed(0), 9),
        cell(both(col((r) => r.restoreWallMs)), 13),
        cell(rate((r) => r.restoreMs), 12),
      ].join(" | "),
    );
  } finally {
    await killAndReap(target.pid).catch(() => {});
  }
}
