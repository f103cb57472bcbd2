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
  type AmberResult,
  assertExit,
  buildC,
  CLI,
  commandWorks,
  DENO,
  isAlive,
  killAndReap,
  listDir,
  procState,
  readLines,
  ROOT,
  startWriter,
  tempDir,
  until,
  waitFor,
  waitForLine,
  waitGone,
  type Writer,
} from "./_util.ts";

const MEMORY_MIB = 256;
const HOT_PAGES = 64;
const SRC_ADDR = "10.213.0.1", DST_ADDR = "10.213.0.2";
const PORT = 27013;

const usable = Deno.uid() === 0 && await commandWorks("ip", "netns", "list") &&
  await commandWorks("unshare", "--pid", "--fork", "--mount-proc", "true");

interface Hosts extends AsyncDisposable {
  src: string;
  dst: string;
}

let hostsMade = 0;

async function ip(...args: string[]): Promise<void> {
  const r = await new Deno.Command("ip", { args, stdout: "null", stderr: "piped" }).output();
  if (!r.success) throw new Error(`ip ${args.join(" ")}: ${new TextDecoder().decode(r.stderr)}`);
}

/** Two network namespaces joined by a veth pair, SRC_ADDR on one side, DST_ADDR on the other. */
async function makeHosts(): Promise<Hosts> {
  const tag = `amig${Deno.pid}x${hostsMade++}`;
  const src = `${tag}s`, dst = `${tag}d`;
  await ip("netns", "add", src);
  await ip("netns", "add", dst);
  const hosts: Hosts = {
    src,
    dst,
    async [Symbol.asyncDispose]() {
      await ip("netns", "del", src).catch(() => {});
      await ip("netns", "del", dst).catch(() => {});
    },
  };
  try {
    await ip(
      "link",
      "add",
      `${tag}a`,
      "netns",
      src,
      "type",
      "veth",
      "peer",
      "name",
      `${tag}b`,
      "netns",
      dst,
    );
    await ip("-n", src, "addr", "add", `${SRC_ADDR}/24`, "dev", `${tag}a`);
    await ip("-n", dst, "addr", "add", `${DST_ADDR}/24`, "dev", `${tag}b`);
    for (const [ns, dev] of [[src, `${tag}a`], [dst, `${tag}b`]]) {
      await ip("-n", ns, "link", "set", dev, "up");
      await ip("-n", ns, "link", "set", "lo", "up");
    }
  } catch (e) {
    await hosts[Symbol.asyncDispose]();
    throw e;
  }
  return hosts;
}

function netnsId(name: string): string {
  return `net:[${Deno.statSync(`/run/netns/${name}`).ino}]`;
}

/** amber in network namespace `ns`, as amber() runs it elsewhere. */
async function amberIn(ns: string, args: string[]): Promise<AmberResult> {
  const r = await new Deno.Command("nsenter", {
    args: [`--net=/run/netns/${ns}`, "--", DENO, "run", "-A", CLI, ...args],
    cwd: ROOT,
    env: { NO_COLOR: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: r.code, stdout: dec.decode(r.stdout), stderr: dec.decode(r.stderr) };
}

/** `amber migrate-receive` on the destination "host", in a pid namespace of its own. */
interface Receiver extends AsyncDisposable {
  /** Its --json line and exit status, once it ended. */
  result(): Promise<{ code: number; json: Record<string, unknown> }>;
}

async function startReceiver(
  hosts: Hosts,
  dir: string,
  extra: string[] = [],
  env: Record<string, string> = {},
): Promise<Receiver> {
  const out = `${dir}/recv.out`, err = `${dir}/recv.err`, rc = `${dir}/recv.rc`;
  // The shell stays as the pid namespace's init: the restored tree lives on after amber exits.
  const script = `"$@" >${out} 2>${err}; echo $? >${rc}; exec sleep 1000000`;
  const child = new Deno.Command("nsenter", {
    args: [
      `--net=/run/netns/${hosts.dst}`,
      "--",
      "unshare",
      "--pid",
      "--fork",
      "--mount-proc",
      "--kill-child",
      "--",
      "sh",
      "-c",
      script,
      "receiver",
      DENO,
      "run",
      "-A",
      CLI,
      "migrate-receive",
      "--address",
      DST_ADDR,
      "--port",
      String(PORT),
      "--json",
      ...extra,
    ],
    cwd: ROOT,
    env: { NO_COLOR: "1", ...env },
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  await waitFor(
    async () => (await readLines(err)).some((l) => l.includes("listening on")) || undefined,
    () => `migrate-receive listening: ${Deno.readTextFileSync(err)}`,
    60_000,
  ).catch(async (e) => {
    child.kill("SIGKILL");
    await child.status;
    throw e;
  });
  return {
    async result() {
      await waitFor(async () => (await readLines(rc)).length > 0 || undefined, "receiver", 60_000);
      const code = Number((await readLines(rc))[0]);
      const json = JSON.parse((await readLines(out)).at(-1) ?? "{}");
      return { code, json };
    },
    async [Symbol.asyncDispose]() {
      // Its pid namespace's init goes, and with it whatever runs there.
      child.kill("SIGKILL");
      await child.status;
    },
  };
}

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

/** The host's pid of the process that is `inner` in a child pid namespace, running `argv0`. */
function hostPid(inner: number, argv0: string): number | undefined {
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const ns = /^NSpid:\s*(.*)$/m.exec(Deno.readTextFileSync(`/proc/${e.name}/status`))?.[1];
      const ids = ns?.trim().split(/\s+/).map(Number) ?? [];
      const argv = Deno.readTextFileSync(`/proc/${e.name}/cmdline`).split("\0");
      if (ids.length > 1 && ids.at(-1) === inner && argv[0] === argv0) return Number(e.name);
    } catch { /* gone */ }
  }
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
    "a socket bound in the source's network namespace is refused by the destination, the source runs on",
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
