/**
 * Lazy restore (issue 13): `restore --lazy-pages` lets the tree run before
 * its private anonymous memory is in, serves faults from the images over
 * userfaultfd and copies the rest meanwhile. Targets: testdata/dirtier.c
 * (patterned memory it checks itself on SIGUSR1) and testdata/tree.c.
 */
import assert from "node:assert/strict";
import {
  amber,
  amberInBackground,
  ask,
  assertConsecutive,
  assertExit,
  buildC,
  CLI,
  DENO,
  descendants,
  isAlive,
  killAndReap,
  readLines,
  readThreadLines,
  ROOT,
  startThreads,
  startWriter,
  tempDir,
  threadsOf,
  waitForLine,
  waitForLines,
  waitGone,
  waitVanished,
  type Writer,
} from "./_util.ts";

const MIB = 256;
const HOT_PAGES = 16;

async function startDirtier(dir: string, mib = MIB): Promise<Writer> {
  const bin = await buildC("dirtier");
  const out = `${dir}/out.txt`;
  return await startWriter([bin, out, String(mib), String(HOT_PAGES)], out, 3, 30_000);
}

/** A dirtier of MIB MiB dumped into DIR/img (and so ended). */
async function dumpedDirtier(dir: string): Promise<{ w: Writer; img: string }> {
  const w = await startDirtier(dir);
  const img = `${dir}/img`;
  try {
    Deno.writeTextFileSync(`${dir}/cmdline`, Deno.readTextFileSync(`/proc/${w.pid}/cmdline`));
    assertExit(await amber(["dump", "-t", String(w.pid), "-D", img]), 0, "dump");
    assert.ok(await waitGone(w.pid), "the dumped process ends");
  } catch (e) {
    await killAndReap(w.pid);
    throw e;
  }
  return { w, img };
}

/** Asks the target for a memory check and returns its verdict line. */
async function checkLine(w: Writer): Promise<string> {
  const before = (await readLines(w.out)).filter((l) => l.startsWith("check")).length;
  Deno.kill(w.pid, "SIGUSR1");
  const lines = await waitForLine(
    w.out,
    (ls) => ls.filter((l) => l.startsWith("check")).length > before,
    60_000,
  );
  return lines.filter((l) => l.startsWith("check")).at(-1)!;
}

/** The last generation the target wrote. */
async function generation(out: string): Promise<number> {
  const nums = (await readLines(out)).filter((l) => /^\d+$/.test(l));
  return Number(nums.at(-1) ?? -1);
}

Deno.test("restore --lazy-pages: 256 MiB of patterned memory runs before its pages are in, and every byte checks out", async () => {
  await using tmp = await tempDir();
  const { w, img } = await dumpedDirtier(tmp.path);
  try {
    const last = await generation(w.out);
    const cmdline = Deno.readTextFileSync(`${img}/../cmdline`);
    const t0 = performance.now();
    const bg = amberInBackground(["restore", "-D", img, "--lazy-pages", "-v"]);
    try {
      await waitForLine(w.out, (ls) => ls.some((l) => /^\d+$/.test(l) && Number(l) > last), 60_000);
      const runningMs = performance.now() - t0;
      const allInBefore = bg.lines.some((l) => /lazy pages: all in/.test(l));
      // ps and pgrep -f read it from the process's memory, which they cannot fault in.
      assert.equal(Deno.readTextFileSync(`/proc/${w.pid}/cmdline`), cmdline, "its cmdline");
      // A check while pages may still be missing: its reads fault them in from the images.
      assert.equal(await checkLine(w), "check ok", "memory check during lazy restore");
      const allIn = await bg.waitLine(/lazy pages: all in after \d+ ms/);
      const allInMs = performance.now() - t0;
      console.log(
        `  ${MIB} MiB: running after ${runningMs.toFixed(0)} ms (amber started), all pages in ` +
          `after ${allInMs.toFixed(0)} ms${allInBefore ? " (all in before it ran on)" : ""}; ${
            allIn.replace(/^.*lazy pages: /, "")
          }`,
      );
      assert.equal(await checkLine(w), "check ok", "memory check once every page is in");
      assert.deepEqual(uffdsOf(w.pid), [], "no userfaultfd left in the restored process");
      await killAndReap(w.pid);
      const st = await bg.done;
      assert.equal(st.code, 128 + 9, `amber exits with the root's status:\n${bg.lines.join("\n")}`);
    } finally {
      try {
        bg.child.kill("SIGKILL");
      } catch { /* ended */ }
      await bg.done;
    }
  } finally {
    await killAndReap(w.pid);
  }
});

function uffdsOf(pid: number): string[] {
  return [...Deno.readDirSync(`/proc/${pid}/fd`)]
    .map((e) => Deno.readLinkSync(`/proc/${pid}/fd/${e.name}`))
    .filter((l) => l === "anon_inode:[userfaultfd]");
}

async function startLazyTree(
  dir: string,
  mib: number,
): Promise<{ pids: number[]; outs: string[] }> {
  const bin = await buildC("lazytree");
  const outs = [`${dir}/parent.txt`, `${dir}/child.txt`];
  const w = await startWriter([bin, dir, String(mib)], outs[0], 3, 30_000);
  await waitForLines(outs[1], 3, 30_000);
  return { pids: [w.pid, ...descendants(w.pid).filter((p) => p !== w.pid)], outs };
}

Deno.test("restore --lazy-pages -d: a tree of two processes runs at once; MADV_DONTNEED, mremap, munmap and fork while pages are missing; a background amber serves until all is in", async () => {
  await using tmp = await tempDir();
  const { pids, outs } = await startLazyTree(tmp.path, 64);
  const img = `${tmp.path}/img`;
  const log = `${tmp.path}/lazy.log`;
  let server = 0;
  try {
    assertExit(await amber(["dump", "-t", String(pids[0]), "-D", img]), 0, "dump");
    await waitVanished(pids);
    const r = await amber(["restore", "-D", img, "--lazy-pages", "-d", "--json", "-o", log]);
    assertExit(r, 0, "restore --lazy-pages -d");
    const result = JSON.parse(r.stdout);
    assert.deepEqual(result.pids, pids, "same pids");
    server = result.lazyServer;
    assert.ok(server > 0, `the background server: ${r.stdout}`);
    // Both at once, while their pages are still coming in (likely, not asserted: the log says).
    const each = (signal: Deno.Signal, what: string) =>
      Promise.all(pids.map((pid, i) => ask(pid, outs[i], signal, what)));
    // The fork and the ops asked together: the ops (200 mremaps of a quarter amber may be copying
    // into, testdata/lazytree.c) follow the fork at once, while pages are likelier to be missing.
    const [forks, ops] = await Promise.all([each("SIGUSR2", "fork"), each("SIGWINCH", "ops")]);
    assert.deepEqual(forks, ["fork ok", "fork ok"], "forked now: checks");
    assert.deepEqual(ops, ["ops ok", "ops ok"], "dontneed, mremap");
    assert.deepEqual(await each("SIGUSR1", "check"), ["check ok", "check ok"], "check");
    assert.ok(await waitGone(server, 60_000), "the background server ends once all is in");
    const text = await Deno.readTextFile(log);
    const allIn = /lazy pages: all in after .*/.exec(text);
    assert.ok(allIn, `the log says all pages are in:\n${text}`);
    console.log(`  2 x 64 MiB: ${allIn[0]}`);
    for (const [i, pid] of pids.entries()) {
      assert.equal(
        await ask(pid, outs[i], "SIGUSR1", "check"),
        "check ok",
        `pid ${pid}: check after`,
      );
      assert.equal(await ask(pid, outs[i], "SIGUSR2", "fork"), "fork ok", `pid ${pid}: fork after`);
      assert.deepEqual(uffdsOf(pid), [], `pid ${pid}: no userfaultfd left`);
    }
  } finally {
    for (const pid of pids.toReversed()) await killAndReap(pid);
    if (server && isAlive(server)) Deno.kill(server, "SIGKILL");
  }
});

for (
  const [fault, why] of [
    [
      "lazy-half",
      /^amber: lazy pages: injected test fault at lazy-half: \d+ pages not in yet: killed \d+/,
    ],
    [
      "lazy-half:SIGTERM",
      /^amber: lazy pages: interrupted by SIGTERM.*: \d+ pages not in yet: killed \d+/,
    ],
    [
      "lazy-half:SIGKILL",
      /^amber: lazy pages: amber \(pid \d+\) died with pages missing: killed \d+/,
    ],
  ] as const
) {
  Deno.test(`restore --lazy-pages: the page server failing half-way (${fault}) kills the restored process and says why`, async () => {
    await using tmp = await tempDir();
    const { w, img } = await dumpedDirtier(tmp.path);
    try {
      const r = await amber(["restore", "-D", img, "--lazy-pages"], { AMBER_TEST_FAULT: fault });
      assert.notEqual(r.code, 0, `amber fails: ${r.stderr}`);
      const lines = r.stderr.trim().split("\n");
      assert.ok(lines.some((l) => why.test(l)), `says why:\n${r.stderr}`);
      assert.ok(await waitGone(w.pid), "the restored process is killed");
      const bad = (await readLines(w.out)).filter((l) => l.includes("BAD"));
      assert.deepEqual(bad, [], "it never saw wrong memory");
    } finally {
      await killAndReap(w.pid);
    }
  });
}

Deno.test("restore --lazy-pages: a process of 4 threads, stacks served lazily, counts on in every thread", async () => {
  await using tmp = await tempDir();
  const t = await startThreads(tmp.path, 4);
  const img = `${tmp.path}/img`;
  try {
    assertExit(await amber(["dump", "-t", String(t.pid), "-D", img]), 0, "dump");
    assert.ok(await waitGone(t.pid), "the dumped process ends");
    const r = await amber(["restore", "-D", img, "--lazy-pages", "-d", "--json"]);
    assertExit(r, 0, "restore --lazy-pages -d");
    const server = JSON.parse(r.stdout).lazyServer;
    assert.deepEqual(threadsOf(t.pid), t.tids, "same threads");
    const before = (await readLines(t.out)).length;
    await waitForLines(t.out, before + 4 * 10);
    assert.ok(await waitGone(server, 60_000), "the background server ends once all is in");
    for (const [i, counts] of await readThreadLines(t.out)) assertConsecutive(counts, `T${i}`);
  } finally {
    await killAndReap(t.pid);
  }
});

Deno.test("restore --lazy-pages from a chain of pre-dumps: pages come from whichever image holds them", async () => {
  await using tmp = await tempDir();
  const w = await startDirtier(tmp.path, 32);
  const pre = `${tmp.path}/pre`, fin = `${tmp.path}/final`;
  try {
    assertExit(await amber(["pre-dump", "-t", String(w.pid), "-D", pre]), 0, "pre-dump");
    const g = await generation(w.out);
    await waitForLine(w.out, (ls) => ls.some((l) => /^\d+$/.test(l) && Number(l) > g + HOT_PAGES));
    const args = ["-t", String(w.pid), "-D", fin, "--prev-images-dir", "../pre", "--track-mem"];
    assertExit(await amber(["dump", ...args]), 0, "final dump");
    assert.ok(await waitGone(w.pid), "the dumped process ends");
    const r = await amber(["restore", "-D", fin, "--lazy-pages", "-d", "--json"]);
    assertExit(r, 0, "restore --lazy-pages -d from the chain");
    assert.equal(await checkLine(w), "check ok", "memory check while pages come in");
    assert.ok(await waitGone(JSON.parse(r.stdout).lazyServer, 60_000), "the server ends");
    assert.equal(await checkLine(w), "check ok", "memory check once all is in");
  } finally {
    await killAndReap(w.pid);
  }
});

Deno.test("dump --stream | restore --stream --lazy-pages -d: the unpacked images serve the pages", async () => {
  await using tmp = await tempDir();
  const w = await startDirtier(tmp.path, 64);
  try {
    const cmd = `${DENO} run -A ${CLI}`;
    const r = await new Deno.Command("/bin/bash", {
      args: [
        "-c",
        `set -o pipefail; ${cmd} dump -t ${w.pid} --stream | ${cmd} restore --stream --lazy-pages -d --json`,
      ],
      cwd: ROOT,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    const dec = new TextDecoder();
    assert.equal(r.code, 0, dec.decode(r.stderr));
    const result = JSON.parse(dec.decode(r.stdout));
    assert.deepEqual(result.pids, [w.pid]);
    assert.equal(await checkLine(w), "check ok", "memory check while pages come in");
    assert.ok(await waitGone(result.lazyServer, 60_000), "the server ends");
    assert.equal(await checkLine(w), "check ok", "memory check once all is in");
  } finally {
    await killAndReap(w.pid);
  }
});

Deno.test("restore --lazy-pages of a process of uid 65534: no userfaultfd for it here, so it is filled before it runs, and says so", async () => {
  await using tmp = await tempDir();
  await Deno.chmod(tmp.path, 0o755);
  const out = `${tmp.path}/out.txt`;
  await Deno.writeTextFile(out, "");
  await Deno.chmod(out, 0o666);
  const bin = await buildC("dirtier");
  const nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"];
  const w = await startWriter([...nobody, bin, out, "16", String(HOT_PAGES)], out, 3, 30_000);
  const img = `${tmp.path}/img`;
  try {
    assertExit(await amber(["dump", "-t", String(w.pid), "-D", img]), 0, "dump");
    assert.ok(await waitGone(w.pid), "the dumped process ends");
    const log = `${tmp.path}/lazy.log`;
    const r = await amber(["restore", "-D", img, "--lazy-pages", "-d", "--json", "-o", log]);
    assertExit(r, 0, "restore --lazy-pages -d");
    assert.match(
      await Deno.readTextFile(log),
      new RegExp(`pid ${w.pid}: lazy pages: userfaultfd: EPERM .*: filled before it runs`),
    );
    assert.equal(await checkLine(w), "check ok", "memory check");
  } finally {
    await killAndReap(w.pid);
  }
});
