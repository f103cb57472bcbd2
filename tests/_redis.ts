/**
 * redis-server on SERVICE_ADDR in a "host" of tests/_hosts.ts, and a
 * client (testdata/incr_client.py) in the client namespace sending INCR
 * on one connection. Used by tests/migrate_tcp_test.ts and bench/bench.ts.
 */
import assert from "node:assert/strict";
import {
  commandWorks,
  killAndReap,
  readLines,
  spawnTarget,
  TESTDATA,
  waitForLine,
} from "./_util.ts";
import { type ClientNet, SERVICE_ADDR, usable } from "./_hosts.ts";

export const REDIS_PORT = 6379;

export const haveRedis = usable && await commandWorks("redis-server", "--version");

/** A command in network namespace `ns`; its stdout. */
export async function inNs(ns: string, ...argv: string[]): Promise<string> {
  const r = await new Deno.Command("nsenter", {
    args: [`--net=/run/netns/${ns}`, "--", ...argv],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(r.stdout).trim();
  if (!r.success) throw new Error(`${argv.join(" ")}: ${new TextDecoder().decode(r.stderr)}`);
  return text;
}

/** redis-cli from the client's namespace, to SERVICE_ADDR. */
export function redisCli(net: ClientNet, ...args: string[]): Promise<string> {
  return inNs(net.cli, "redis-cli", "-h", SERVICE_ADDR, "-p", String(REDIS_PORT), ...args);
}

/** The host pid of the redis-server that is `inner` in a child pid namespace. */
export function movedRedis(inner: number): number | undefined {
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const status = Deno.readTextFileSync(`/proc/${e.name}/status`);
      const ids = /^NSpid:\s*(.*)$/m.exec(status)?.[1].trim().split(/\s+/).map(Number) ?? [];
      const comm = Deno.readTextFileSync(`/proc/${e.name}/comm`).trim();
      if (ids.length > 1 && ids.at(-1) === inner && comm === "redis-server") return Number(e.name);
    } catch { /* gone */ }
  }
}

/** What the client saw, once stopped. */
export interface ClientEnd {
  /** Replies. */
  n: number;
  /** The last value INCR answered. */
  last: number;
  /** Replies that were not the one before plus one. */
  wrong: number;
  /** The longest time between two replies, ms. */
  gapMs: number;
  /** Every time between two replies longer than 100 ms, ms, in order. */
  pauses: number[];
}

export interface Redis extends AsyncDisposable {
  pid: number;
  /** Replies so far (throws if the client failed). */
  replies(): Promise<number>;
  /** Stops the client; throws if it failed. */
  stop(): Promise<ClientEnd>;
}

/**
 * redis-server on SERVICE_ADDR in namespace `src`, `keys` keys of 256
 * bytes (DEBUG POPULATE), and the client connected and answered.
 */
export async function startRedis(
  dir: string,
  src: string,
  net: ClientNet,
  keys: number,
): Promise<Redis> {
  const redis = spawnTarget([
    "setsid",
    "nsenter",
    `--net=/run/netns/${src}`,
    "--",
    "redis-server",
    ...["--bind", SERVICE_ADDR, "--port", String(REDIS_PORT), "--save", "", "--appendonly", "no"],
    ...["--dir", dir, "--enable-debug-command", "yes", "--protected-mode", "no"],
  ]);
  const out = `${dir}/client.txt`, stop = `${dir}/client.stop`;
  let client: Deno.ChildProcess | undefined;
  const end = async () => {
    Deno.writeTextFileSync(stop, "");
    await client?.status;
  };
  try {
    for (let i = 0; i < 200; i++) {
      if (await redisCli(net, "PING").catch(() => "") === "PONG") break;
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(await redisCli(net, "DEBUG", "POPULATE", String(keys), "key", "256"), "OK");
    client = new Deno.Command("nsenter", {
      args: [
        `--net=/run/netns/${net.cli}`,
        "--",
        "python3",
        `${TESTDATA}/incr_client.py`,
        out,
        stop,
        SERVICE_ADDR,
        String(REDIS_PORT),
      ],
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).spawn();
    await waitForLine(out, (ls) => ls.some((l) => l.startsWith("at ")), 20_000);
  } catch (e) {
    await end();
    await killAndReap(redis.pid).catch(() => {});
    throw e;
  }
  return {
    pid: redis.pid,
    async replies() {
      const lines = await readLines(out);
      const bad = lines.find((l) => l.startsWith("error"));
      if (bad) throw new Error(`client: ${bad}`);
      return Number(lines.filter((l) => l.startsWith("at ")).at(-1)?.split(" ")[1] ?? 0);
    },
    async stop() {
      await end();
      const lines = await readLines(out);
      const last = lines.find((l) => l.startsWith("done") || l.startsWith("error"));
      if (!last?.startsWith("done")) throw new Error(`client: ${last}`);
      const [n, value, wrong, gapMs] = last.split(" ").slice(1).map(Number);
      const pauses = lines.filter((l) => l.startsWith("pause ")).map((l) => Number(l.slice(6)));
      return { n, last: value, wrong, gapMs, pauses };
    },
    async [Symbol.asyncDispose]() {
      await end();
      await killAndReap(redis.pid).catch(() => {});
    },
  };
}
