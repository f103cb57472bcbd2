/**
 * The command line as CRIU users type it: -j, -v0..-v4, -o FILE,
 * --file-locks, help, one-line usage errors, and a thread id given to -t.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertCounterHealthy,
  assertExit,
  assertOneLineError,
  dumpArgs,
  exists,
  isAlive,
  killAndReap,
  showJson,
  startCounter,
  startThreads,
  tempDir,
} from "./_util.ts";

Deno.test("-t with a thread id: names the process, leaves it running", async () => {
  await using tmp = await tempDir();
  const t = await startThreads(tmp.path, 2);
  try {
    const tid = t.tids.find((x) => x !== t.pid)!;
    for (const extra of [[], ["-R"]]) {
      const img = `${tmp.path}/img`;
      const r = await amber(dumpArgs(tid, img, ...extra), {}, 30_000);
      const msg = assertOneLineError(r, 1, `dump -t ${tid} ${extra.join(" ")}`);
      assert.ok(msg.includes(`${tid} is a thread of process ${t.pid}`), msg);
      assert.ok(isAlive(t.pid), "the process died");
      assert.ok(!exists(img), "images left behind");
    }
  } finally {
    await killAndReap(t.pid);
  }
});

Deno.test("CRIU spellings: -j, -v0, -v4, -o FILE, --file-locks", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, 8);
  try {
    const quiet = await amber(dumpArgs(c.pid, `${tmp.path}/a`, "-R", "-j", "-v0", "--file-locks"));
    assertExit(quiet, 0, "dump -R -j -v0 --file-locks");
    assert.equal(quiet.stderr, "", "-v0 prints nothing");
    assert.equal((await showJson(`${tmp.path}/a`)).inventory.shellJob, true, "-j is --shell-job");

    const log = `${tmp.path}/dump.log`;
    const loud = await amber(dumpArgs(c.pid, `${tmp.path}/b`, "-R", "-v4", "-o", log));
    assertExit(loud, 0, "dump -R -v4 -o");
    assert.match(loud.stderr, /pid \d+: mappings: [\d.]+ ms/, "-v4 prints the per-part times");
    const text = Deno.readTextFileSync(log);
    assert.match(text, /pid \d+: pagemap: [\d.]+ ms/, `-o log: ${text}`);
    assert.match(text, /dumped 1 process/, `-o log: ${text}`);
    assert.equal(Deno.statSync(log).mode! & 0o777, 0o600, "log file mode");

    // A log that is a symlink is not followed.
    const link = `${tmp.path}/link.log`;
    Deno.symlinkSync(`${tmp.path}/target`, link);
    const r = await amber(dumpArgs(c.pid, `${tmp.path}/c`, "-R", "-o", link));
    assert.ok(assertOneLineError(r, 1, "-o symlink").includes("symlink"));
    assert.ok(!exists(`${tmp.path}/target`), "the symlink was followed");
    await assertCounterHealthy(c, 5);
  } finally {
    await killAndReap(c.pid);
  }
});

Deno.test("usage: one line for unknown options; help for every command", async () => {
  const unknown = await amber(["dump", "-x", "-t", "1", "-D", "/tmp/none"]);
  assert.equal(
    assertOneLineError(unknown, 2, "unknown option"),
    "amber: unknown option -x; see amber dump --help",
  );
  // CRIU's lazy-pages daemon is restore's own work here: the message says how.
  const lazy = await amber(["lazy-pages", "--page-server", "--address", "10.0.0.1"]);
  assert.match(
    assertOneLineError(lazy, 2, "amber lazy-pages"),
    /^amber: no command lazy-pages: .*amber restore -D DIR --lazy-pages \[--page-server/,
  );
  const none = ["-D", "/tmp/none"], at = ["--address", "a", "--port", "1"];
  const misuses: [string[], string][] = [
    [["restore", ...none, "--page-server", ...at], "needs --lazy-pages"],
    [["dump", "-t", "1", ...none, "--lazy-pages", "--port", "1"], "--address"],
    [["dump", "-t", "1", ...none, "--lazy-pages", "-R", ...at], "not with -R"],
  ];
  for (const [args, why] of misuses) {
    assert.ok(assertOneLineError(await amber(args), 2, args.join(" ")).includes(why), why);
  }
  for (const cmd of ["dump", "restore", "show", "check"]) {
    for (const args of [["help", cmd], [cmd, "--help"]]) {
      const r = await amber(args);
      assertExit(r, 0, `amber ${args.join(" ")}`);
      assert.match(r.stdout, new RegExp(`^usage: amber ${cmd}\\b`), r.stdout);
    }
  }
  const help = await amber(["help"]);
  assertExit(help, 0, "amber help");
  for (const cmd of ["dump", "restore", "show", "check"]) assert.ok(help.stdout.includes(cmd));
  const timeout = await amber(["dump", "-t", "1", "-D", "/tmp/none", "--aio-timeout", "soon"]);
  assert.equal(
    assertOneLineError(timeout, 2, "--aio-timeout soon"),
    "amber: --aio-timeout needs seconds like 5 or 0.5, got soon",
  );
  const dumpHelp = (await amber(["help", "dump"])).stdout;
  assert.match(dumpHelp, /-j, --shell-job .*\(CRIU's\)/, "CRIU's flags are marked");
});
