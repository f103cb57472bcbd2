/**
 * `amber migrate --tcp-established` (issue 13's last item): redis-server
 * holding ~100 MiB of keys moves from one network namespace to another
 * while a client in a third sends INCR on one connection, one at a time;
 * the service address moves with it through action scripts
 * (tests/_hosts.ts addClient: the source drops it at post-dump, the
 * destination brings it up and switches the client's route at
 * pre-restore). The client checks every reply follows the one before.
 */
import assert from "node:assert/strict";
import {
  assertExit,
  commandWorks,
  readLines,
  spawnTarget,
  tempDir,
  waitForLine,
  waitGone,
} from "./_util.ts";
import { killAndReap } from "./_util.ts";
import {
  addClient,
  amberIn,
  type ClientNet,
  DST_ADDR,
  makeHosts,
  netnsId,
  PORT,
  SERVICE_ADDR,
  startReceiver,
  usable,
} from "./_hosts.ts";

const REDIS_PORT = 6379;
const KEYS = 400_000;
const haveRedis = usable && await commandWorks("redis-server", "--version");

/** One connection, INCR after INCR; a line every 100 replies, "done" or "error" at the end. */
const CLIENT = `
import os, socket, sys, time
out, stop, addr, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
f = open(out, "a", buffering=1)
n = wrong = 0
last = None
gap = 0.0
try:
    s = socket.create_connection((addr, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f.write("connected\\n")
    buf = b""
    t = time.monotonic()
    while not os.path.exists(stop):
        s.sendall(b"INCR counter\\r\\n")
        while b"\\r\\n" not in buf:
            d = s.recv(256)
            if not d:
                raise EOFError("redis closed the connection")
            buf += d
        line, buf = buf.split(b"\\r\\n", 1)
        now = time.monotonic()
        gap, t = max(gap, now - t), now
        if not line.startswith(b":"):
            raise ValueError("reply %r" % line)
        v = int(line[1:])
        if last is not None and v != last + 1:
            wrong += 1
        last, n = v, n + 1
        if n % 100 == 0:
            f.write("at %d %d\\n" % (n, v))
    f.write("done %d %d %d %.1f\\n" % (n, last, wrong, gap * 1000))
except Exception as e:
    f.write("error %r after %d replies\\n" % (e, n))
    sys.exit(1)
`;

/** A command in namespace `ns`; its stdout. */
async function inNs(ns: string, ...argv: string[]): Promise<string> {
  const r = await new Deno.Command("nsenter", {
    args: [`--net=/run/netns/${ns}`, "--", ...argv],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(r.stdout).trim();
  if (!r.success) throw new Error(`${argv.join(" ")}: ${new TextDecoder().decode(r.stderr)}`);
  return text;
}

function redisCli(net: ClientNet, ...args: string[]): Promise<string> {
  return inNs(net.cli, "redis-cli", "-h", SERVICE_ADDR, "-p", String(REDIS_PORT), ...args);
}

/** The host pid of the redis-server that is `inner` in a child pid namespace. */
function movedRedis(inner: number): number | undefined {
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

async function lockTables(ns: string): Promise<string[]> {
  return (await inNs(ns, "nft", "list", "tables")).split("\n").filter((l) => l.includes("amber_"));
}

async function actions(log: string): Promise<string[]> {
  return (await readLines(log)).map((l) => l.split(" ")[0]);
}

/** redis-server on SERVICE_ADDR in the source namespace, KEYS keys, a client sending INCR. */
async function startRedis(dir: string, src: string, net: ClientNet) {
  const redis = spawnTarget([
    "setsid",
    "nsenter",
    `--net=/run/netns/${src}`,
    "--",
    "redis-server",
    ...["--bind", SERVICE_ADDR, "--port", String(REDIS_PORT), "--save", "", "--appendonly", "no"],
    ...["--dir", dir, "--enable-debug-command", "yes", "--protected-mode", "no"],
  ]);
  for (let i = 0; i < 200; i++) {
    if (await redisCli(net, "PING").catch(() => "") === "PONG") break;
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.equal(await redisCli(net, "DEBUG", "POPULATE", String(KEYS), "key", "256"), "OK");
  const out = `${dir}/client.txt`, stop = `${dir}/client.stop`;
  const client = new Deno.Command("nsenter", {
    args: [
      `--net=/run/netns/${net.cli}`,
      "--",
      "python3",
      "-c",
      CLIENT,
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
  return {
    pid: redis.pid,
    /** Replies so far. */
    async replies(): Promise<number> {
      const lines = await readLines(out);
      const bad = lines.find((l) => l.startsWith("error"));
      if (bad) throw new Error(`client: ${bad}`);
      return Number(lines.filter((l) => l.startsWith("at ")).at(-1)?.split(" ")[1] ?? 0);
    },
    /** Stops the client: its replies, last value, replies out of sequence, longest pause. */
    async stop() {
      Deno.writeTextFileSync(stop, "");
      await client.status;
      const lines = await readLines(out);
      const end = lines.find((l) => l.startsWith("done") || l.startsWith("error"));
      assert.ok(end?.startsWith("done"), `client: ${end}`);
      const [n, last, wrong, gapMs] = end!.split(" ").slice(1).map(Number);
      return { n, last, wrong, gapMs };
    },
    async [Symbol.asyncDispose]() {
      Deno.writeTextFileSync(stop, "");
      await client.status;
      await killAndReap(redis.pid).catch(() => {});
    },
  };
}

/** Waits until the client got 500 more replies, stops it: every reply in order, none lost. */
async function goesOn(redis: Redis) {
  const at = await redis.replies();
  for (let i = 0; i < 200 && await redis.replies() < at + 500; i++) {
    await new Promise((r) => setTimeout(r, 50));
  }
  const c = await redis.stop();
  assert.ok(c.n >= at + 500, `${c.n} replies, ${at} at the end of the migration`);
  assert.equal(c.wrong, 0, "every reply follows the one before");
  assert.equal(c.last, c.n, "each INCR was counted once and answered once");
  return c;
}

type Redis = Awaited<ReturnType<typeof startRedis>>;

Deno.test({
  name: "migrate --tcp-established moves redis-server and its address; its client sees every " +
    "INCR answered in order on one connection",
  ignore: !haveRedis,
  async fn() {
    await using tmp = await tempDir();
    await using hosts = await makeHosts();
    const net = await addClient(hosts, tmp.path);
    await using recv = await startReceiver(hosts, tmp.path, ["--action-script", net.dstScript]);
    await using redis = await startRedis(tmp.path, hosts.src, net);
    const r = await amberIn(hosts.src, [
      "migrate",
      ...["-t", String(redis.pid), "--to", `${DST_ADDR}:${PORT}`, "--tcp-established"],
      ...["--action-script", net.srcScript, "--json"],
    ]);
    assertExit(r, 0, "migrate");
    assert.ok(await waitGone(redis.pid), "no redis-server left at the source");
    const got = await recv.result();
    assert.equal(got.code, 0, JSON.stringify(got.json));
    const moved = movedRedis(redis.pid);
    assert.ok(moved, "redis-server runs at the destination");
    assert.equal(Deno.readLinkSync(`/proc/${moved}/ns/net`), netnsId(hosts.dst));

    // The client goes on over the same connection, now to the destination.
    const c = await goesOn(redis);
    assert.equal(await redisCli(net, "GET", "counter"), String(c.n));
    assert.equal(await redisCli(net, "DBSIZE"), String(KEYS + 1));

    assert.deepEqual(await actions(net.srcLog), ["pre-dump", "network-lock", "post-dump"]);
    assert.deepEqual(await actions(net.dstLog), [
      "network-lock",
      "pre-restore",
      "post-restore",
      "network-unlock",
    ]);
    const initPids = (await readLines(net.dstLog)).map((l) => l.split(" ")[1]);
    assert.deepEqual(new Set(initPids), new Set([String(redis.pid)]));
    assert.deepEqual(await lockTables(hosts.src), [], "no lock left at the source");
    assert.deepEqual(await lockTables(hosts.dst), [], "nor at the destination");
    console.log(`client: ${c.n} replies, longest pause ${c.gapMs} ms`);
  },
});

Deno.test({
  name: "a destination that refuses after the address left: network-unlock brings it back and " +
    "the source's redis-server goes on with its client",
  ignore: !haveRedis,
  async fn() {
    await using tmp = await tempDir();
    await using hosts = await makeHosts();
    const net = await addClient(hosts, tmp.path);
    await using recv = await startReceiver(hosts, tmp.path, ["--action-script", net.dstScript], {
      AMBER_TEST_FAULT: "migrate-before-restore",
    });
    await using redis = await startRedis(tmp.path, hosts.src, net);
    const r = await amberIn(hosts.src, [
      "migrate",
      ...["-t", String(redis.pid), "--to", `${DST_ADDR}:${PORT}`, "--tcp-established"],
      ...["--action-script", net.srcScript],
    ]);
    assertExit(r, 1, "migrate to a refusing destination");
    assert.match(r.stderr, /injected test fault at migrate-before-restore/);
    assert.equal((await recv.result()).code, 1);
    assert.deepEqual(await actions(net.srcLog), [
      "pre-dump",
      "network-lock",
      "post-dump",
      "network-unlock",
    ]);
    await goesOn(redis);
    assert.equal(await redisCli(net, "DBSIZE"), String(KEYS + 1));
    assert.equal(Deno.readLinkSync(`/proc/${redis.pid}/ns/net`), netnsId(hosts.src));
    assert.deepEqual(await lockTables(hosts.src), [], "no lock left at the source");
  },
});

Deno.test({
  name: "a destination where the address never came up fails its restore naming the " +
    "socket; the source's redis-server goes on with its client",
  ignore: !haveRedis,
  async fn() {
    await using tmp = await tempDir();
    await using hosts = await makeHosts();
    const net = await addClient(hosts, tmp.path);
    await using recv = await startReceiver(hosts, tmp.path);
    await using redis = await startRedis(tmp.path, hosts.src, net);
    const r = await amberIn(hosts.src, [
      "migrate",
      ...["-t", String(redis.pid), "--to", `${DST_ADDR}:${PORT}`, "--tcp-established"],
      ...["--action-script", net.srcScript],
    ]);
    assertExit(r, 1, "migrate to a destination without the address");
    assert.match(
      r.stderr,
      new RegExp(`restore: .*fd \\d+: tcp ${SERVICE_ADDR.replaceAll(".", "\\.")}:${REDIS_PORT}`),
    );
    assert.equal((await recv.result()).code, 1);
    assert.deepEqual((await actions(net.srcLog)).at(-1), "network-unlock");
    await goesOn(redis);
    assert.deepEqual(await lockTables(hosts.dst), [], "no lock left at the destination");
  },
});
