/**
 * For operators: `--json` results (and failures) of dump, restore, check
 * and run; `amber run` checkpointing a job, SIGUSR1, a SIGKILL in the middle
 * of a checkpoint, and `restore -D DIR/latest` finishing the job; the
 * progress line on a terminal and not on a pipe.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  childrenOf,
  CLI,
  CLOSE_FDS_AND_EXEC,
  DENO,
  descendants,
  dumpArgs,
  exists,
  isAlive,
  type Json,
  killAndReap,
  killTree,
  listDir,
  readLines,
  reapZombies,
  ROOT,
  spawnTarget,
  startCounter,
  tempDir,
  trackChild,
  until,
  unusedPid,
  waitFor,
  waitForLines,
  waitGone,
} from "./_util.ts";

/** The one JSON object an amber --json run printed. */
function jsonOf(stdout: string, what: string): Json {
  const lines = stdout.trim().split("\n");
  assert.equal(lines.length, 1, `${what}: one line of JSON expected:\n${stdout}`);
  return JSON.parse(lines[0]);
}

function assertErrorJson(doc: Json, command: string, what: string): void {
  assert.equal(doc.ok, false, what);
  assert.equal(doc.command, command, what);
  assert.equal(typeof doc.error.message, "string", what);
  assert.equal(typeof doc.error.code, "string", what);
}

Deno.test("--json: dump, restore and check print one object; failures name code and pid", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, 16);
  const img = `${tmp.path}/img`;
  try {
    const d = await amber(dumpArgs(c.pid, img, "--json"));
    assertExit(d, 0, "dump --json");
    const dumped = jsonOf(d.stdout, "dump");
    assert.equal(dumped.ok, true);
    assert.equal(dumped.command, "dump");
    assert.deepEqual(dumped.pids, [c.pid]);
    for (const k of ["frozenMs", "totalMs", "pageBytes", "imageBytes"]) {
      assert.equal(typeof dumped[k], "number", `dump --json: ${k}`);
    }
    assert.ok(dumped.pageBytes >= 16 << 20, `pageBytes ${dumped.pageBytes}`);
    assert.equal(dumped.imagesDir, img);
    assert.equal(typeof dumped.partMs.pagemap, "number", "per-part times");
    assert.ok(await waitGone(c.pid), "dump without -R ends the target");

    // The pid is free again only once the original is reaped.
    const r = await amber(["restore", "-D", img, "-d", "--json"]);
    assertExit(r, 0, "restore -d --json");
    const restored = jsonOf(r.stdout, "restore");
    assert.equal(restored.ok, true);
    assert.deepEqual(restored.pids, [c.pid]);
    assert.equal(typeof restored.restoreMs, "number");
    assert.equal(typeof restored.totalMs, "number");
    assert.equal(typeof restored.partMs.pagemap, "number");
    assert.equal(restored.imagesDir, img);
    assert.ok(isAlive(c.pid), "restored");

    // While it runs, another restore is refused: the pid is named.
    const busy = await amber(["restore", "-D", img, "--json", "--allow-changed-files"]);
    assertExit(busy, 1, "restore of a running tree");
    const refused = jsonOf(busy.stdout, "restore refused");
    assertErrorJson(refused, "restore", "restore refused");
    assert.equal(refused.error.pid, c.pid, busy.stdout);
    assert.match(busy.stderr, /^amber: pid \d+ is in use/, "the one-line message stays");

    const missing = unusedPid();
    const m = await amber(dumpArgs(missing, `${tmp.path}/none`, "--json"));
    assertExit(m, 1, "dump of a missing pid");
    const failed = jsonOf(m.stdout, "dump of a missing pid");
    assertErrorJson(failed, "dump", "dump of a missing pid");
    assert.equal(failed.error.pid, missing);

    const u = await amber(["dump", "-t", "x", "-D", img, "--json"]);
    assertExit(u, 2, "usage error");
    assert.equal(jsonOf(u.stdout, "usage").error.code, "usage");

    const k = await amber(["check", "--json"]);
    const checked = jsonOf(k.stdout, "check");
    assert.equal(k.code, checked.ok ? 0 : 1);
    assert.ok(checked.features.length > 5);
    for (const f of checked.features) {
      assert.equal(typeof f.name, "string");
      assert.equal(typeof f.ok, "boolean");
      assert.equal(typeof f.required, "boolean");
      assert.ok(f.enables.length > 0, `${f.name}: what it enables`);
      assert.equal(f.missing === "", f.ok, `${f.name}: what is missing, only when it fails`);
    }
    const names = checked.features.map((f: Json) => f.name);
    for (const n of ["userfaultfd WP async", "PAGEMAP_SCAN", "TCP_REPAIR", "time namespaces"]) {
      assert.ok(names.includes(n), `check probes ${n}`);
    }
    const text = await amber(["check"]);
    assert.match(text.stdout, /^ok {4}clone3 set_tid: .*\n {6}for: restoring processes/m);
  } finally {
    await killAndReap(c.pid);
  }
});

/**
 * The job: counts to N (a line each, 50 ms apart), then waits for the file
 * GO, writes "done SUM" and exits 3.
 */
const JOB = `
import os, sys, time
out = open(sys.argv[1], "w")
n = int(sys.argv[2])
total = 0
for i in range(n):
    total += i
    out.write(f"{i}\\n")
    out.flush()
    time.sleep(0.05)
while not os.path.exists(sys.argv[3]):
    time.sleep(0.05)
out.write(f"done {total}\\n")
out.flush()
sys.exit(3)
`;

interface Run {
  child: Deno.ChildProcess;
  pid: number;
  stdout: string;
  stderr: string;
}

/** `amber run ARGS -- python3 job.py OUT N GO`, its output into files (the job's with it). */
function startRun(dir: string, args: string[], n: number, env: Record<string, string> = {}): Run {
  Deno.writeTextFileSync(`${dir}/job.py`, JOB);
  const stdout = `${dir}/run.out`, stderr = `${dir}/run.err`;
  const child = new Deno.Command("/bin/bash", {
    args: [
      "-c",
      `exec >${stdout} 2>${stderr}; ${CLOSE_FDS_AND_EXEC}`,
      "amber",
      DENO,
      "run",
      "-A",
      CLI,
      "run",
      ...args,
      "--",
      "python3",
      `${dir}/job.py`,
      `${dir}/out.txt`,
      String(n),
      `${dir}/go`,
    ],
    cwd: ROOT,
    stdin: "null",
    env: { NO_COLOR: "1", ...env },
  }).spawn();
  // killTree(run.pid) must wait for its status, not reap it from under Deno.
  trackChild(child);
  return { child, pid: child.pid, stdout, stderr };
}

/** The job of an amber run: its python child. */
function jobOf(run: Run): Promise<number> {
  return waitFor(() => {
    for (const p of childrenOf(run.pid)) {
      try {
        if (Deno.readTextFileSync(`/proc/${p}/cmdline`).includes("job.py")) return p;
      } catch { /* gone */ }
    }
  }, "amber run started no job");
}

function latestOf(ck: string): number | undefined {
  try {
    const m = /^ckpt-(\d+)$/.exec(Deno.readLinkSync(`${ck}/latest`));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

function complete(ck: string): number[] {
  return listDir(ck).filter((n) => /^ckpt-\d+$/.test(n) && exists(`${ck}/${n}/inventory.cbor`))
    .map((n) => Number(n.slice(5))).sort((a, b) => a - b);
}

const SUM = (n: number) => (n * (n - 1)) / 2;

Deno.test("amber run: SIGUSR1 asks for a checkpoint; the job's exit status is amber's; --json", async () => {
  await using tmp = await tempDir();
  const ck = `${tmp.path}/ck`;
  const run = startRun(tmp.path, ["--every", "1h", "--keep", "1", "-D", ck, "--json"], 20);
  try {
    const job = await jobOf(run);
    await waitFor(
      async () => (await readLines(`${tmp.path}/out.txt`)).length >= 3 || undefined,
      "the job writes",
    );
    Deno.kill(run.pid, "SIGUSR1");
    await waitFor(() => latestOf(ck), "a checkpoint after SIGUSR1", 60_000);
    Deno.kill(run.pid, "SIGUSR1");
    await waitFor(() => latestOf(ck) === 2 || undefined, "a second one", 60_000);
    // The older one goes once latest names the newer.
    await until(
      () => complete(ck).join() === "2",
      () => `--keep 1 keeps the newest only: ${complete(ck)}`,
    );
    Deno.writeTextFileSync(`${tmp.path}/go`, "");
    const st = await run.child.status;
    assert.equal(
      st.code,
      3,
      `amber run exits with the job's status; stderr:\n${Deno.readTextFileSync(run.stderr)}`,
    );
    const doc = jsonOf(
      Deno.readTextFileSync(run.stdout).split("\n").filter((l) => l.startsWith("{")).join("\n"),
      "run",
    );
    assert.equal(doc.command, "run");
    assert.equal(doc.exitCode, 3);
    assert.equal(doc.pid, job);
    assert.deepEqual(doc.checkpoints.map((c: Json) => [c.n, c.ok]), [[1, true], [2, true]]);
    assert.deepEqual(doc.checkpoints[0].dump.pids, [job]);
    assert.equal(doc.latest, `${ck}/ckpt-2`);
    assert.equal((await readLines(`${tmp.path}/out.txt`)).pop(), `done ${SUM(20)}`);
  } finally {
    await killTree(run.pid);
    await run.child.status;
  }
});

Deno.test("amber run: SIGKILL in the middle of a checkpoint; restore -D DIR/latest finishes the job", async () => {
  await using tmp = await tempDir();
  const ck = `${tmp.path}/ck`;
  const N = 400;
  Deno.writeTextFileSync(`${tmp.path}/go`, "");
  // Each dump stays frozen 2 s after the freeze: a window to kill it in.
  const run = startRun(tmp.path, ["--every", "1s", "--keep", "2", "-D", ck], N, {
    AMBER_TEST_FAULT: "after-freeze:pause",
  });
  let job = 0;
  try {
    job = await jobOf(run);
    // Two complete checkpoints, and a third being written.
    const busy = await waitFor(
      () => {
        const latest = latestOf(ck);
        if (latest === undefined || latest < 2) return undefined;
        const next = `${ck}/ckpt-${latest + 1}`;
        return listDir(next).some((n) => n.startsWith(".amber-dump-")) ? latest : undefined;
      },
      () => `two checkpoints and a third under way: ${listDir(ck)}`,
      60_000,
    );
    // The node dies: amber run, its dump, and the job, at once.
    const all = [run.pid, ...descendants(run.pid)];
    for (const p of all) {
      try {
        Deno.kill(p, "SIGKILL");
      } catch { /* gone */ }
    }
    await run.child.status;
    for (const p of all) await waitGone(p);
    reapZombies(all);
    assert.ok(!isAlive(job), "the job is gone");
    const latest = latestOf(ck)!;
    assert.equal(latest, busy, "latest still names the last complete checkpoint");
    assert.ok(exists(`${ck}/ckpt-${latest}/inventory.cbor`), "latest is complete");
    // --keep 2: the two newest, and the earlier ones they take pages from.
    assert.ok(complete(ck).length <= 4, `--keep 2: ${complete(ck)}`);
    // Checkpoints after the first of a chain store only what the job wrote since.
    const shows = await Promise.all(complete(ck).map((n) => amber(["show", `${ck}/ckpt-${n}`])));
    assert.ok(
      shows.some((r) => /from parent/.test(r.stdout)),
      `no checkpoint took pages from an earlier one: ${complete(ck)}`,
    );
    const before = (await readLines(`${tmp.path}/out.txt`)).length;
    assert.ok(before < N, "the job was killed before it finished");

    // The job wrote on after the checkpoint: it rewrites the same lines.
    const r = await amber(["restore", "-D", `${ck}/latest`, "--allow-changed-files"], {}, 120_000);
    assertExit(r, 3, "restore -D DIR/latest runs the job to its end");
    const lines = await readLines(`${tmp.path}/out.txt`);
    assert.deepEqual(lines.slice(0, N), Array.from({ length: N }, (_, i) => String(i)));
    assert.deepEqual(lines.slice(N), [`done ${SUM(N)}`]);
  } finally {
    await killTree(run.pid).catch(() => {});
    if (job) await killAndReap(job).catch(() => {});
  }
});

Deno.test("restore follows no other symlink: one to a directory that is not a checkpoint", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, 8);
  try {
    assertExit(await amber(dumpArgs(c.pid, `${tmp.path}/img`, "-R")), 0, "dump -R");
    Deno.symlinkSync("img", `${tmp.path}/link`);
    const r = await amber(["restore", "-D", `${tmp.path}/link`]);
    assertExit(r, 1, "restore through a symlink");
    assert.match(r.stderr, /is a symlink; refusing to follow it/);
  } finally {
    await killAndReap(c.pid);
  }
});

function shellQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

/** amber ARGS with stderr (and stdout) on a pseudo-terminal made by `script`; what it printed. */
async function amberOnTerminal(args: string[], env: Record<string, string>): Promise<string> {
  const cmd = [DENO, "run", "-A", CLI, ...args].map(shellQuote).join(" ");
  const r = await new Deno.Command("script", {
    args: ["-qfec", cmd, "/dev/null"],
    cwd: ROOT,
    env: { NO_COLOR: "1", ...env },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(r.stdout);
  assert.equal(r.code, 0, `amber ${args.join(" ")} under script:\n${text}`);
  return text;
}

const PROGRESS = (op: string) =>
  new RegExp(`amber ${op}: pid \\d+ \\w+: \\d+/\\d+ pages \\(\\d+%\\), \\d+ MiB/s`);

Deno.test("progress: a line on a terminal during a long dump and restore, none on a pipe", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, 32);
  try {
    // Each waits 2 s at its end (a long operation), once all parts were reported.
    const slowDump = { AMBER_TEST_FAULT: "before-commit:pause" };
    const tty = await amberOnTerminal(dumpArgs(c.pid, `${tmp.path}/a`, "-R"), slowDump);
    assert.match(tty, PROGRESS("dump"), `dump on a terminal:\n${JSON.stringify(tty)}`);
    assert.ok(tty.endsWith("\r\x1b[K"), `the line is erased at the end: ${JSON.stringify(tty)}`);

    const pipe = await amber(dumpArgs(c.pid, `${tmp.path}/b`, "-R"), slowDump);
    assertExit(pipe, 0, "dump on a pipe");
    assert.equal(pipe.stderr, "", "nothing on a pipe");

    await killAndReap(c.pid);
    const slowRestore = { AMBER_TEST_FAULT: "before-detach:pause" };
    const restored = await amberOnTerminal(
      ["restore", "-D", `${tmp.path}/a`, "-d", "--allow-changed-files"],
      slowRestore,
    );
    assert.match(restored, PROGRESS("restore"), `restore on a terminal:\n${restored}`);
    await killAndReap(c.pid);
    const quiet = await amber(
      ["restore", "-D", `${tmp.path}/b`, "-d", "--allow-changed-files"],
      slowRestore,
    );
    assertExit(quiet, 0, "restore on a pipe");
    assert.equal(quiet.stderr, "", "nothing on a pipe");
  } finally {
    await killAndReap(c.pid);
  }
});

/**
 * A Python target with 64 pages of its own (an anonymous mmap): it prints
 * their address, and on SIGUSR1 changes page 5 only and says so.
 */
const PAGES_PY = `
import ctypes, mmap, signal, sys, time
buf = mmap.mmap(-1, 64 * 4096)
for i in range(64):
    buf[i * 4096] = 1
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
def bump(*_):
    buf[5 * 4096 + 7] = 2
    with open(sys.argv[1], "a") as f:
        f.write("bumped\\n")
signal.signal(signal.SIGUSR1, bump)
with open(sys.argv[1], "w") as f:
    f.write(f"{addr:x}\\n")
while True:
    time.sleep(0.05)
`;

Deno.test("show --diff names the page a process changed between two checkpoints; show --tree", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/addr.txt`;
  const t = spawnTarget(["setsid", "python3", "-c", PAGES_PY, out]);
  try {
    const [addrText] = await waitForLines(out, 1, 30_000);
    const base = BigInt("0x" + addrText);
    assertExit(await amber(dumpArgs(t.pid, `${tmp.path}/a`, "-R")), 0, "first dump");
    Deno.kill(t.pid, "SIGUSR1");
    await waitForLines(out, 2);
    assertExit(await amber(dumpArgs(t.pid, `${tmp.path}/b`, "-R")), 0, "second dump");

    const r = await amber(["show", `${tmp.path}/a`, "--diff", `${tmp.path}/b`, "--json"]);
    assertExit(r, 0, "show --diff --json");
    const d = JSON.parse(r.stdout);
    assert.deepEqual([d.processesAdded, d.processesRemoved], [[], []]);
    const p = d.processes.find((x: Json) => x.pid === t.pid);
    const changed = p.pagesChanged.flatMap((x: Json) => {
      const pages: bigint[] = [];
      for (let a = BigInt("0x" + x.start); a < BigInt("0x" + x.end); a += 4096n) pages.push(a);
      return pages;
    });
    const page = (i: number) => base + BigInt(i * 4096);
    assert.ok(changed.includes(page(5)), `page 5 of the buffer is named: ${r.stdout}`);
    for (let i = 0; i < 64; i++) {
      if (i !== 5) assert.ok(!changed.includes(page(i)), `page ${i} did not change`);
    }
    assert.ok(p.pagesCompared > 64);

    const text = await amber(["show", `${tmp.path}/a`, "--diff", `${tmp.path}/b`]);
    assertExit(text, 0, "show --diff");
    assert.match(text.stdout, new RegExp(`^  pages changed: ${page(5).toString(16)}-`, "m"));

    const tree = await amber(["show", `${tmp.path}/b`, "--tree"]);
    assertExit(tree, 0, "show --tree");
    assert.match(tree.stdout, /: restorable\n/);
    assert.match(
      tree.stdout,
      new RegExp(`^${t.pid} python3: 1 thread\\(s\\), [\\d.]+ MiB, fds: `, "m"),
    );
  } finally {
    await killAndReap(t.pid);
  }
});
