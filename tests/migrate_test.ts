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
import { RecordWriter } from "../lib/images/stream.ts";
import {
  amber,
  assertChecksOk,
  assertExit,
  buildC,
  CLI,
  DENO,
  isAlive,
  killAndReap,
  listDir,
  procState,
  readLines,
  ROOT,
  spawnTarget,
  startCounter,
  startWriter,
  tempDir,
  until,
  waitForLine,
  waitForLines,
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

function trackerFds(pid: number): string[] {
  return [...Deno.readDirSync(`/proc/${pid}/fd`)]
    .map((e) => Deno.readLinkSync(`/proc/${pid}/fd/${e.name}`))
    .filter((l) => l === "anon_inode:[userfaultfd]");
}

/** The receiver's -v lines say it ran the tree built ahead (lib/prebuilt.ts) with the final round. */
function assertBuiltAhead(lines: string[], pid: number): void {
  const said = lines.join("\n");
  assert.match(said, /migrate-receive: built ahead in /, said);
  assert.match(said, new RegExp(`pid ${pid}: built ahead: \\d+ newer pages`), said);
  assert.doesNotMatch(said, /the final round differs|not built ahead/, said);
}

function migrateArgs(pid: number): string[] {
  return ["migrate", "-t", String(pid), "--to", `${DST_ADDR}:${PORT}`, "--json"];
}

Deno.test({
  name:
    "migrate-receive --lazy-pages: the tree runs there, its memory served from the rounds, every byte right",
  ignore: !usable,
  async fn() {
    await using tmp = await tempDir();
    await using hosts = await makeHosts();
    await using recv = await startReceiver(hosts, tmp.path, ["--lazy-pages", "-v"]);
    const w = await startDirtier(hosts, tmp.path);
    try {
      assertExit(await amberIn(hosts.src, migrateArgs(w.pid)), 0, "migrate");
      // Built from the last pre-copy round while the source froze: the final round's
      // pages patched into it (the checks below read every byte).
      assertBuiltAhead(await readLines(`${tmp.path}/recv.err`), w.pid);
      assert.ok(await waitGone(w.pid), "no process left at the source");
      // The receiver answers once the tree runs, and exits once every page is in.
      const got = await recv.result();
      assert.equal(got.code, 0, JSON.stringify(got.json));
      assert.ok(got.json.lazy, `no lazy figures: ${JSON.stringify(got.json)}`);
      const moved = hostPid(w.pid, await buildC("dirtier"));
      assert.ok(moved, "the tree runs at the destination");
      await assertChecksOk(w, "after a lazy migration", moved);
      assert.equal(trackerFds(moved).length, 0, "no userfaultfd left in the migrated process");
    } finally {
      await killAndReap(w.pid);
    }
  },
});

Deno.test({
  name: "migrate moves a 256 MiB writing process to the other network namespace, every byte right",
  ignore: !usable,
  async fn() {
    await using tmp = await tempDir();
    await using hosts = await makeHosts();
    await using recv = await startReceiver(hosts, tmp.path, ["-v"]);
    const w = await startDirtier(hosts, tmp.path);
    try {
      const r = await amberIn(hosts.src, migrateArgs(w.pid));
      assertExit(r, 0, "migrate");
      const said = await readLines(`${tmp.path}/recv.err`);
      assertBuiltAhead(said, w.pid);
      const m = JSON.parse(r.stdout);
      assert.ok(m.preCopyRounds >= 2, `pre-copy rounds: ${m.preCopyRounds}`);
      // An eager receiver builds the tree once, from the first round, while the rounds go on,
      // and brings it to each later one (the final round's checks below read every byte).
      assert.equal(said.filter((l) => /migrate-receive: built ahead in /.test(l)).length, 1);
      const brought = said.filter((l) => /migrate-receive: built ahead, brought to /.test(l));
      assert.equal(brought.length, m.preCopyRounds - 1, said.join("\n"));
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
      await assertChecksOk(w, "after the migration", moved);
      assert.equal(trackerFds(moved).length, 0, "no tracker in the migrated process");
    } finally {
      await killAndReap(w.pid);
    }
  },
});

/** Python hashing while it rewrites 64 MiB; writes "started", then "digest HEX" to argv[1]. */
const HASHER = `
import hashlib, sys
out = open(sys.argv[1], "w", buffering=1)
out.write("started\\n")
buf = bytearray(64 << 20)
h = hashlib.sha256()
n = len(buf) // 4096
for i in range(6_000_000):
    p = (i * 7919) % n * 4096
    buf[p:p+8] = (i * 2654435761 % 2**64).to_bytes(8, "little")
    if i % 4096 == 0:
        h.update(buf[p:p+64])
h.update(hashlib.sha256(buf).digest())
out.write("digest " + h.hexdigest() + "\\n")
`;

Deno.test({
  name: "an unmodified python3 rewriting 64 MiB, migrated to an eager receiver (the tree built " +
    "ahead while the rounds go on), finishes there with the digest of a run never migrated",
  ignore: !usable,
  async fn() {
    await using tmp = await tempDir();
    await using hosts = await makeHosts();
    await using recv = await startReceiver(hosts, tmp.path, ["-v"]);
    const [ref, out] = [`${tmp.path}/ref.txt`, `${tmp.path}/moved.txt`];
    const never = spawnTarget(["setsid", "python3", "-c", HASHER, ref]);
    const net = ["nsenter", `--net=/run/netns/${hosts.src}`, "--"];
    const job = spawnTarget([...net, "setsid", "python3", "-c", HASHER, out]);
    try {
      await waitForLines(out, 1, 30_000);
      // (The interpreter as it runs: a python3 on PATH may exec another.)
      const argv0 = Deno.readTextFileSync(`/proc/${job.pid}/cmdline`).split("\0")[0];
      assertExit(await amberIn(hosts.src, migrateArgs(job.pid)), 0, "migrate");
      const said = await readLines(`${tmp.path}/recv.err`);
      assertBuiltAhead(said, job.pid);
      assert.ok(await waitGone(job.pid), "no process left at the source");
      assert.ok(hostPid(job.pid, argv0), "python3 runs at the destination");
      assert.equal((await recv.result()).code, 0);
      const digest = async (path: string) =>
        (await waitForLine(path, (ls) => ls.some((l) => l.startsWith("digest ")), 120_000))
          .find((l) => l.startsWith("digest "));
      assert.equal(await digest(out), await digest(ref), "the migrated run's digest");
    } finally {
      await killAndReap(job.pid);
      await killAndReap(never.pid);
    }
  },
});

for (const lazy of [true, false]) {
  Deno.test({
    name:
      "a tree whose mappings change between the rounds is restored from the start, not from the " +
      `tree built ahead, every byte right (${lazy ? "--lazy-pages" : "eager"})`,
    ignore: !usable,
    async fn() {
      await using tmp = await tempDir();
      await using hosts = await makeHosts();
      const flags = lazy ? ["--lazy-pages", "-v"] : ["-v"];
      await using recv = await startReceiver(hosts, tmp.path, flags);
      const bin = await buildC("sweeper");
      const out = `${tmp.path}/out.txt`;
      // --churn: regions mapped, moved, resized and unmapped each tick: no two rounds hold the
      // same mappings.
      const net = ["nsenter", `--net=/run/netns/${hosts.src}`, "--"];
      const w = await startWriter([...net, bin, out, "64", "--churn", "--setsid"], out, 3, 30_000);
      try {
        assertExit(await amberIn(hosts.src, migrateArgs(w.pid)), 0, "migrate");
        const said = (await readLines(`${tmp.path}/recv.err`)).join("\n");
        const differs = "differs in pid \\d+: (mappings|pagemap: pages came or went)";
        assert.match(said, /built ahead in /, said);
        // An eager receiver built it from the first round while the rounds went on, and
        // dropped it at the next one.
        if (!lazy) {
          assert.match(said, new RegExp(`not brought to .*round-\\d+: the round ${differs}`));
        }
        assert.match(said, new RegExp(`the final round ${differs}: restored `), said);
        assert.doesNotMatch(said, /built ahead: \d+ newer pages/);
        assert.equal((await recv.result()).code, 0);
        const moved = hostPid(w.pid, bin);
        assert.ok(moved, "the tree runs at the destination");
        await assertChecksOk(w, "after the migration", moved);
      } finally {
        await killAndReap(w.pid);
      }
    },
  });
}

Deno.test({
  name:
    "pre-copy rounds keep the tracker of the round before: only what was written since, every byte right",
  ignore: !usable,
  async fn() {
    await using tmp = await tempDir();
    await using hosts = await makeHosts();
    await using recv = await startReceiver(hosts, tmp.path);
    const w = await startDirtier(hosts, tmp.path);
    try {
      const r = await amberIn(hosts.src, [...migrateArgs(w.pid), "--max-rounds", "3", "-v"]);
      assertExit(r, 0, "migrate");
      const m = JSON.parse(r.stdout);
      const kept = r.stderr.split("\n").filter((l) =>
        new RegExp(`^pid ${w.pid}: write tracking kept \\(fd \\d+, `).test(l)
      );
      // Round 1 arms it; each later pre-copy round finds it and keeps it.
      assert.equal(kept.length, m.preCopyRounds - 1, r.stderr);
      assert.ok(m.preCopyRounds >= 2, `pre-copy rounds: ${m.preCopyRounds}`);
      for (const round of m.rounds.slice(1)) {
        assert.ok(
          round.pageBytes < MEMORY_MIB * 1024 * 1024 / 16,
          `round ${round.round}: ${round.pageBytes} bytes: only what was written since`,
        );
      }
      assert.ok(await waitGone(w.pid), "no process left at the source");
      assert.equal((await recv.result()).code, 0);
      const moved = hostPid(w.pid, await buildC("dirtier"));
      assert.ok(moved, "the tree runs at the destination");
      await assertChecksOk(w, "after the migration", moved);
      assert.equal(trackerFds(moved).length, 0, "no tracker in the migrated process");
    } finally {
      await killAndReap(w.pid);
    }
  },
});

/** The pid namespace of the receiver started with `dir` (its shell's, found by its command line). */
function receiverPidNs(dir: string): string {
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const cmd = Deno.readTextFileSync(`/proc/${e.name}/cmdline`);
      if (cmd.startsWith("sh\0-c\0") && cmd.includes(`${dir}/recv.out`)) {
        return Deno.readLinkSync(`/proc/${e.name}/ns/pid`);
      }
    } catch { /* gone */ }
  }
  throw new Error(`no receiver shell for ${dir}`);
}

/** Processes of pid namespace `ns` other than its init: "PID COMM". */
function othersInPidNs(ns: string): string[] {
  const out: string[] = [];
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      if (Deno.readLinkSync(`/proc/${e.name}/ns/pid`) !== ns) continue;
      const inner = /^NSpid:.*\s(\d+)$/m.exec(Deno.readTextFileSync(`/proc/${e.name}/status`));
      if (inner?.[1] === "1") continue;
      out.push(`${e.name} ${Deno.readTextFileSync(`/proc/${e.name}/comm`).trim()}`);
    } catch { /* gone */ }
  }
  return out;
}

for (const lazy of [false, true]) {
  Deno.test({
    name: `a destination that refuses before it restores${
      lazy ? " (--lazy-pages)" : ""
    }, its tree built ahead, leaves the source running unharmed`,
    ignore: !usable,
    async fn() {
      await using tmp = await tempDir();
      await using hosts = await makeHosts();
      const kept = `${tmp.path}/dest`;
      const extra = ["-D", kept, "-v", ...(lazy ? ["--lazy-pages"] : [])];
      await using recv = await startReceiver(hosts, tmp.path, extra, {
        AMBER_TEST_FAULT: "migrate-before-restore",
      });
      const ns = receiverPidNs(tmp.path);
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
        await assertChecksOk(w, "after the refused migration");
        assert.equal((await recv.result()).code, 1);
        // The refusal came after the tree was built ahead: it was killed with what was received.
        assert.match((await readLines(`${tmp.path}/recv.err`)).join("\n"), /built ahead in /);
        assert.deepEqual(listDir(kept), [], "the destination removed what it received");
        // Its restore helper, started during the pre-copy rounds, and the tree built ahead went.
        await until(
          () => othersInPidNs(ns).length === 0,
          () => `left running at the destination: ${othersInPidNs(ns).join(", ")}`,
          5000,
        );
      } finally {
        await killAndReap(w.pid);
      }
    },
  });
}

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
      await assertChecksOk(w, "after the failed migration");
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
      await assertChecksOk(w, "the copy at the destination", moved);
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

Deno.test("a round that names a parent other than the round before is refused by migrate-receive", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, 8);
  try {
    const pid = String(c.pid);
    assertExit(await amber(["pre-dump", "-t", pid, "-D", `${tmp.path}/pre`]), 0, "pre-dump");
    const final = `${tmp.path}/final`;
    const inc = ["--prev-images-dir", "../pre", "--track-mem"];
    assertExit(await amber(["dump", "-R", "-t", pid, "-D", final, ...inc]), 0, "dump");
    const kept = `${tmp.path}/kept`;
    const recv = new Deno.Command(DENO, {
      args: [
        "run",
        "-A",
        CLI,
        "migrate-receive",
        "--address",
        "127.0.0.1",
        "--port",
        "0",
        "-D",
        kept,
      ],
      cwd: ROOT,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const reader = recv.stderr.pipeThrough(new TextDecoderStream()).getReader();
    let said = "";
    let port = 0;
    while (!port) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`migrate-receive ended: ${said}`);
      said += value;
      port = Number(/listening on 127\.0\.0\.1:(\d+)/.exec(said)?.[1] ?? 0);
    }
    // A hostile sender: round 1, final, whose pages come from ../pre on the receiver's disk.
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    const head = new Uint8Array(16);
    head.set(new TextEncoder().encode("AMBERMIG"));
    new DataView(head.buffer).setUint32(8, 1, true);
    new DataView(head.buffer).setUint32(12, 1, true);
    await conn.write(head);
    const w = new RecordWriter(conn, "test sender");
    const names = listDir(final).filter((n) => n !== "inventory.cbor");
    for (const n of [...names, "inventory.cbor"]) {
      await w.send(n, Deno.readFileSync(`${final}/${n}`));
    }
    await w.end();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      said += value;
    }
    conn.close();
    assert.equal((await recv.status).code, 1, said);
    assert.match(said, /round 1: pid \d+: parent images \.\.\/pre: only none \(refused\)/);
    assert.deepEqual(listDir(kept), [], "nothing kept");
    assert.ok(isAlive(c.pid), "the counter runs on");
  } finally {
    await killAndReap(c.pid);
  }
});

for (const reads of [false, true]) {
  Deno.test(`a receiver that ${reads ? "reads the final round but never answers" : "accepts and never reads"}: past --timeout the frozen source resumes and keeps working`, async () => {
    await using tmp = await tempDir();
    const bin = await buildC("dirtier");
    const out = `${tmp.path}/out.txt`;
    const w = await startWriter([bin, out, "64", String(HOT_PAGES)], out, 3, 30_000);
    // A receiver that hangs: it takes the connection, then does nothing (or only reads).
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const held: Deno.Conn[] = [];
    const hanging = (async () => {
      const conn = await listener.accept();
      held.push(conn);
      const buf = new Uint8Array(1 << 20);
      while (reads && await conn.read(buf).catch(() => null) !== null) { /* swallowed */ }
    })();
    try {
      const port = (listener.addr as Deno.NetAddr).port;
      const args = ["migrate", "-t", String(w.pid), "--to", `127.0.0.1:${port}`];
      const r = await amber([...args, "--max-rounds", "0", "--timeout", "2"]);
      assertExit(r, 1, "migrate to a hung receiver");
      assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
      assert.match(
        r.stderr,
        reads
          ? /^amber: migrate-receive 127\.0\.0\.1:\d+: no answer after the final round for 2 s \(the receiver hangs\)/
          : /^amber: (pid \d+: pagemap: )?migrate-receive 127\.0\.0\.1:\d+: the receiver read nothing for 2 s \(it hangs\)/,
      );
      assert.ok(isAlive(w.pid), "the source tree runs on");
      assert.notEqual(procState(w.pid), "T", "and is not left stopped");
      const last = Number((await readLines(out)).filter((l) => /^\d+$/.test(l)).at(-1));
      await waitForLine(out, (ls) => ls.some((l) => /^\d+$/.test(l) && Number(l) > last));
      await assertChecksOk(w, "after the hung migration");
    } finally {
      listener.close();
      for (const c of held) c.close();
      await hanging.catch(() => {});
      await killAndReap(w.pid);
    }
  });
}
