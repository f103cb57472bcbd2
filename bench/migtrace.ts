/**
 * One `amber migrate` of testdata/gaps.c (256 MiB, or MIB) between two
 * network namespaces, with -v and AMBER_LOG_TIME=1 on both ends: prints
 * both ends' detail lines as one timeline (ms from the start of the
 * longest pause the process saw, placed on it). For finding where the
 * final round's pause goes. RAW=1 also prints the source's lines as they
 * came, KEEP=DIR keeps the received rounds (migrate-receive -D DIR),
 * SRCFLAGS adds deno flags for the source (--cpu-prof ...).
 *
 *   deno run -A bench/migtrace.ts [--lazy] [MIB] [--rate MIB_PER_S]
 *
 * --rate: the target also rewrites its memory at that rate (gaps.c's third argument).
 */
import {
  buildC,
  CLI,
  DENO,
  killAndReap,
  readLines,
  ROOT,
  spawnTarget,
  tempDir,
  waitForLines,
  waitVanished,
} from "../tests/_util.ts";
import { gapReport } from "./_gaps.ts";
import { DST_ADDR, hostPid, makeHosts, PORT, startReceiver } from "../tests/_hosts.ts";

const lazy = Deno.args.includes("--lazy");
const rateAt = Deno.args.indexOf("--rate");
const rate = rateAt >= 0 ? [Deno.args[rateAt + 1]] : [];
const mib = Number(Deno.args.find((a, i) => /^\d+$/.test(a) && i !== rateAt + 1) ?? 256);

const bin = await buildC("gaps");
await using tmp = await tempDir("amber-trace-");
await using hosts = await makeHosts();
const env = { AMBER_LOG_TIME: "1" };
await using _recv = await startReceiver(
  hosts,
  tmp.path,
  [
    ...(lazy ? ["--lazy-pages"] : []),
    "-v",
    ...(Deno.env.get("KEEP") ? ["-D", Deno.env.get("KEEP")!] : []),
  ],
  env,
);
const out = `${tmp.path}/b.txt`;
const b = spawnTarget(
  ["nsenter", `--net=/run/netns/${hosts.src}`, "--", bin, out, String(mib), ...rate],
);
try {
  await waitForLines(out, 1, 60_000);
  await gapReport(b.pid, out);
  const r = await new Deno.Command("nsenter", {
    args: [
      `--net=/run/netns/${hosts.src}`,
      "--",
      DENO,
      "run",
      "-A",
      ...(Deno.env.get("SRCFLAGS")?.split(" ") ?? []),
      CLI,
      "migrate",
      "-t",
      String(b.pid),
      "--to",
      `${DST_ADDR}:${PORT}`,
      "-v",
    ],
    cwd: ROOT,
    env: { NO_COLOR: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const srcLines = new TextDecoder().decode(r.stderr).split("\n").filter(Boolean);
  if (!r.success) throw new Error(`migrate: ${srcLines.join("\n")}`);
  await waitVanished([b.pid]);
  const there = hostPid(b.pid, bin);
  if (!there) throw new Error("not running at the destination");
  const gap = await gapReport(there, out);
  if (Deno.env.get("RAW")) console.log(srcLines.join("\n"));
  const dstLines = (await readLines(`${tmp.path}/recv.err`)).filter(Boolean);
  const all: [number, string][] = [];
  for (const [side, ls] of [["src", srcLines], ["dst", dstLines]] as const) {
    for (const l of ls) {
      const m = /^(\d+\.\d+) (.*)$/.exec(l);
      if (m) all.push([Number(m[1]), `${side} ${m[2]}`]);
    }
  }
  all.push([gap.endMs - gap.ms, `*** pause starts (${gap.ms.toFixed(1)} ms)`]);
  all.push([gap.endMs, "*** pause ends"]);
  all.sort((a, b) => a[0] - b[0]);
  const start = gap.endMs - gap.ms;
  for (const [t, l] of all) {
    console.log(`${(t - start).toFixed(1).padStart(8)} ${l}`);
  }
  console.log(`longest pause ${gap.ms.toFixed(1)} ms${lazy ? " (lazy)" : ""}`);
} finally {
  await killAndReap(b.pid).catch(() => {});
}
