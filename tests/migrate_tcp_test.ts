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
import { assertExit, procState, readLines, tempDir, waitGone } from "./_util.ts";
import {
  addClient,
  amberIn,
  DST_ADDR,
  makeHosts,
  netnsId,
  PORT,
  SERVICE_ADDR,
  startReceiver,
} from "./_hosts.ts";
import {
  haveRedis,
  inNs,
  movedRedis,
  type Redis,
  REDIS_PORT,
  redisCli,
  startRedis,
} from "./_redis.ts";

const KEYS = 400_000;

async function lockTables(ns: string): Promise<string[]> {
  return (await inNs(ns, "nft", "list", "tables")).split("\n").filter((l) => l.includes("amber_"));
}

async function actions(log: string): Promise<string[]> {
  return (await readLines(log)).map((l) => l.split(" ")[0]);
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

/** The three hosts, the receiver and redis-server with its client, as one test uses them. */
async function scene(dir: string, opts: { dstScript?: boolean; fault?: string } = {}) {
  await using stack = new AsyncDisposableStack();
  const hosts = stack.use(await makeHosts());
  const net = stack.use(await addClient(hosts, dir));
  const recv = stack.use(
    await startReceiver(
      hosts,
      dir,
      opts.dstScript === false ? [] : ["--action-script", net.dstScript],
      opts.fault ? { AMBER_TEST_FAULT: opts.fault } : {},
    ),
  );
  const redis = stack.use(await startRedis(dir, hosts.src, net, KEYS));
  const resources = stack.move();
  return {
    hosts,
    net,
    recv,
    redis,
    /** amber migrate --tcp-established with the source's script, from the source. */
    migrate: (...extra: string[]) =>
      amberIn(hosts.src, [
        "migrate",
        ...["-t", String(redis.pid), "--to", `${DST_ADDR}:${PORT}`, "--tcp-established"],
        ...["--action-script", net.srcScript, ...extra],
      ]),
    [Symbol.asyncDispose]: () => resources.disposeAsync(),
  };
}

Deno.test({
  name: "migrate --tcp-established moves redis-server and its address; its client sees every " +
    "INCR answered in order on one connection",
  ignore: !haveRedis,
  async fn() {
    await using tmp = await tempDir();
    await using sc = await scene(tmp.path);
    const { hosts, net, recv, redis } = sc;
    const r = await sc.migrate("--json");
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
  },
});

Deno.test({
  name: "a destination that refuses after the address left: network-unlock brings it back and " +
    "the source's redis-server goes on with its client",
  ignore: !haveRedis,
  async fn() {
    await using tmp = await tempDir();
    await using sc = await scene(tmp.path, { fault: "migrate-before-restore" });
    const { hosts, net, recv, redis } = sc;
    const r = await sc.migrate();
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
    await using sc = await scene(tmp.path, { dstScript: false });
    const { hosts, net, recv, redis } = sc;
    const r = await sc.migrate();
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

Deno.test({
  name: "a destination that dies after restoring, before answering: the source's redis-server " +
    "is left stopped with its connections locked, the client goes on with the destination",
  ignore: !haveRedis,
  async fn() {
    await using tmp = await tempDir();
    await using sc = await scene(tmp.path, { fault: "migrate-after-restore:SIGKILL" });
    const { hosts, net, redis } = sc;
    const r = await sc.migrate();
    assertExit(r, 1, "migrate, no answer");
    const table = /its connections stay locked \(nft table inet (amber_\w+)\)/.exec(r.stderr)?.[1];
    assert.ok(table, r.stderr);
    assert.match(r.stderr, /it may run the tree; the tree is left stopped here/);
    assert.equal(procState(redis.pid), "T");
    assert.deepEqual(await lockTables(hosts.src), [`table inet ${table}`]);
    assert.deepEqual(await actions(net.srcLog), ["pre-dump", "network-lock", "post-dump"]);
    assert.ok(movedRedis(redis.pid), "the destination runs it");
    await goesOn(redis);
  },
});
