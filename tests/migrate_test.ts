/**
 * `amber migrate` (issue 13) between two "hosts": network namespaces with
 * a veth pair between them. The destination amber also runs in a pid
 * namespace of its own (unshare --pid --mount-proc): on one machine the
 * tree's pids are still held by the source tree while the destination
 * restores, as they would not be on another machine. Target:
 * testdata/dirtier.c with 256 MiB of patterned memory and hot pages it
 * keeps rewriting; it checks every byte on SIGUSR1.
 */
import assert from "node:assert/strict";
import {
  assertExit,
  buildC,
  isAlive,
  killAndReap,
  listDir,
  procState,
  readLines,
  startWriter,
  tempDir,
  until,
  waitForLine,
  waitGone,
  type Writer,
} from "./_util.ts";
import {
  amberIn,
  DST_ADDR,
  hostPid,
  type Hosts,
  makeHosts,
  netnsId,
  PORT,
  SRC_ADDR,
  startReceiver,
  usable,
} from "./_hosts.ts";

const MEMORY_MIB = 256;
const HOT_PAGES = 64;

async function startDirtier(hosts: Hosts, dir: string): Promise<Writer> {
  const bin = await buildC("dirtier");
  const out = `${dir}/out.txt`;
  return await startWriter(
    [
      "nsenter",
      `--net=/run/netns/${hosts.src}`,
      "--",
      bin,
      out,
      String(MEMORY_MIB),
      String(HOT_PAGES),
    ],
    out,
    3,
    30_000,
  );
}

/** Asks the target (by pid) for a memory check and asserts it passed. */
async function assertChecksOk(pid: number, out: string, what: string): Promise<void> {
  const before = (await readLines(out)).filter((l) => l.startsWith("check")).length;
  Deno.kill(pid, "SIGUSR1");
  const lines = await waitForLine(
    out,
    (ls) => ls.filter((l) => l.startsWith("check")).length > before,
  );
  const checks = lines.filter((l) => l.startsWith("check"));
  assert.deepEqual(checks, Array(checks.length).fill("check ok"), `${what}: ${checks.at(-1)}`);
}

function trackerFds(pid: number): string[] {
  return [...Deno.readDirSync(`/proc/${pid}/fd`)]
    .map((e) => Deno.readLinkSync(`/proc/${pid}/fd/${e.name}`))
    .filter((l) => l === "anon_inode:[userfaultfd]");
}

function migrateArgs(pid: number): string[] {
  return ["migrate", "-t", String(pid), "--to", `${DST_ADDR}:${PORT}`, "--json"];
}

Deno.test({
  name: "migrate moves a 256 MiB writing process to the other network namespace, every byte right",
  ignore: !usable,
  async fn() {
    await using tmp = await tempDir();
    await using hosts = await makeHosts();
    await using recv = await startReceiver(hosts, tmp.path);
    const w = await startDirtier(hosts, tmp.path);
    try {
      const r = await amberIn(hosts.src, migrateArgs(w.pid));
      assertExit(r, 0, "migrate");
      const m = JSON.parse(r.stdout);
      assert.ok(m.preCopyRounds >= 1, `pre-copy rounds: ${m.preCopyRounds}`);
      assert.equal(m.rounds.length, m.preCopyRounds + 1);
      assert.ok(m.rounds[0].pageBytes >= MEMORY_MIB * 1024 * 1024, "round 1 copies everything");
      assert.ok(
        m.finalPageBytes < MEMORY_MIB * 1024 * 1024 / 16,
        `final round ${m.finalPageBytes} bytes: only what was written since`,
      );
      assert.ok(await waitGone(w.pid), "no process left at the source");
      const got = await recv.result();
      assert.equal(got.code, 0, JSON.stringify(got.json));
      assert.deepEqual(got.json.pids, [w.pid]);
      assert.deepEqual(m.destination.pids, [w.pid]);

      const moved = hostPid(w.pid, await buildC("dirtier"));
      assert.ok(moved, "the tree runs at the destination");
      assert.equal(Deno.readLinkSync(`/proc/${moved}/ns/net`), netnsId(hosts.dst));
      const last = Number((await readLines(w.out)).filter((l) => /^\d+$/.test(l)).at(-1));
      await waitForLine(w.out, (ls) => ls.some((l) => /^\d+$/.test(l) && Number(l) > last));
      await assertChecksOk(moved, w.out, "after the migration");
      assert.equal(trackerFds(moved).length, 0, "no tracker in the migrated process");
    } finally {
      await killAndReap(w.pid);
    }
  },
});

Deno.test({
  name: "a destination that refuses before it restores leaves the source running unharmed",
  ignore: !usable,
  async fn() {
    await using tmp = await tempDir();
    await using hosts = await makeHosts();
    const kept = `${tmp.path}/dest`;
    await using recv = await startReceiver(hosts, tmp.path, ["-D", kept], {
      AMBER_TEST_FAULT: "migrate-before-restore",
    });
    const w = await startDirtier(hosts, tmp.path);
    try {
      const r = await amberIn(hosts.src, migrateArgs(w.pid));
      assertExit(r, 1, "migrate to a refusing destination");
      assert.match(
        r.stderr,
        /^amber: migrate-receive .*injected test fault at migrate-before-restore/,
      );
      assert.ok(isAlive(w.pid), "the source tree runs on");
      assert.equal(trackerFds(w.pid).length, 0, "no tracking left in the source");
      await assertChecksOk(w.pid, w.out, "after the refused migration");
      assert.equal((await recv.result()).code, 1);
      assert.deepEqual(listDir(kept), [], "the destination removed what it received");
    } finally {
      await killAndReap(w.pid);
    }
  },
});

Deno.test({
  name: "a destination killed mid-way (round 2) leaves the source running, its tracking closed",
  ignore: !usable,
  async fn() {
    await using tmp = await tempDir();
    await using hosts = await makeHosts();
    await using _recv = await startReceiver(hosts, tmp.path, [], {
      AMBER_TEST_FAULT: "migrate-round-2:SIGKILL",
    });
    const w = await startDirtier(hosts, tmp.path);
    try {
      const r = await amberIn(hosts.src, migrateArgs(w.pid));
      assertExit(r, 1, "migrate to a destination that dies");
      assert.ok(isAlive(w.pid), "the source tree runs on");
      assert.equal(trackerFds(w.pid).length, 0, "the pre-copy round's tracking is closed");
      await assertChecksOk(w.pid, w.out, "after the failed migration");
    } finally {
      await killAndReap(w.pid);
    }
  },
});

Deno.test({
  name: "a destination that dies after restoring, before answering: the source is left stopped",
  ignore: !usable,
  async fn() {
    await using tmp = await tempDir();
    await using hosts = await makeHosts();
    await using _recv = await startReceiver(hosts, tmp.path, [], {
      AMBER_TEST_FAULT: "migrate-after-restore:SIGKILL",
    });
    const w = await startDirtier(hosts, tmp.path);
    try {
      const r = await amberIn(hosts.src, migrateArgs(w.pid));
      assertExit(r, 1, "migrate, no answer");
      assert.match(r.stderr, /it may run the tree; the tree is left stopped here/);
      await until(() => procState(w.pid) === "T", "the source tree stopped");
      const moved = hostPid(w.pid, await buildC("dirtier"));
      assert.ok(moved, "the destination runs it");
      await assertChecksOk(moved, w.out, "the copy at the destination");
    } finally {
      await killAndReap(w.pid);
    }
  },
});

Deno.test({
  name:
    "a socket bound in the source's network namespace is refused, named, and the source runs on",
  ignore: !usable,
  async fn() {
    await using tmp = await tempDir();
    await using hosts = await makeHosts();
    await using _recv = await startReceiver(hosts, tmp.path);
    const out = `${tmp.path}/ready.txt`;
    const code = "import socket, sys, time\n" +
      "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n" +
      `s.bind(("${SRC_ADDR}", 5013))\n` +
      "open(sys.argv[1], 'w').write('ready\\n')\n" +
      "while True: time.sleep(1)\n";
    const w = await startWriter(
      ["setsid", "nsenter", `--net=/run/netns/${hosts.src}`, "--", "python3", "-c", code, out],
      out,
      1,
    );
    try {
      const r = await amberIn(hosts.src, migrateArgs(w.pid));
      assertExit(r, 1, "migrate with a bound udp socket");
      assert.match(
        r.stderr,
        new RegExp(
          `udp ${SRC_ADDR.replaceAll(".", "\\.")}:5013: bound in the source's network namespace`,
        ),
      );
      assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
      assert.ok(isAlive(w.pid), "the source runs on");
      assert.equal(procState(w.pid) === "T", false, "and is not stopped");
    } finally {
      await killAndReap(w.pid);
    }
  },
});
