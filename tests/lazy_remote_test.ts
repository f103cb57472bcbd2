/**
 * Lazy restore from a remote page source (issue 13): `dump --lazy-pages
 * --address A --port P` on one "host" writes every image but the private
 * anonymous pages and serves those from the frozen tree;
 * `restore --lazy-pages --page-server --address A --port P` on the other
 * fetches them as they are touched and the rest in the background. Hosts
 * are network namespaces (tests/_hosts.ts); the destination runs in a pid
 * namespace of its own, as the source tree holds the pids until the end.
 * Target: testdata/dirtier.c, which checks every byte of its memory on SIGUSR1.
 */
import assert from "node:assert/strict";
import {
  amber,
  amberInBackground,
  ask,
  assertChecksOk,
  assertExit,
  type Background,
  buildC,
  descendants,
  isAlive,
  killAndReap,
  procState,
  readLines,
  startWriter,
  tempDir,
  until,
  waitFor,
  waitForLines,
  waitGone,
  waitVanished,
  type Writer,
} from "./_util.ts";
import {
  hostPid,
  type Hosts,
  makeHosts,
  PORT,
  SRC_ADDR,
  startAtDestination,
  usable,
} from "./_hosts.ts";

const MIB = 128;

async function startDirtier(hosts: Hosts, dir: string): Promise<Writer> {
  const bin = await buildC("dirtier");
  const out = `${dir}/out.txt`;
  const inSrc = ["nsenter", `--net=/run/netns/${hosts.src}`, "--"];
  return await startWriter([...inSrc, bin, out, String(MIB), "16"], out, 3, 30_000);
}

/** `amber dump --lazy-pages` in the source namespace, once it serves the pages. */
async function dumpLazily(hosts: Hosts, w: Writer, img: string, env: Record<string, string> = {}) {
  const args = ["dump", "-t", String(w.pid), "-D", img, "--lazy-pages"];
  const src = amberInBackground(
    [...args, "--address", SRC_ADDR, "--port", String(PORT), "-v"],
    ["nsenter", `--net=/run/netns/${hosts.src}`, "--"],
    env,
  );
  await src.waitLine(/serving lazy pages on/);
  return src;
}

/** What each test has: a dirtier in the source namespace whose dump --lazy-pages serves. */
interface LazyDump {
  dir: string;
  hosts: Hosts;
  w: Writer;
  img: string;
  src: Background;
}

/** Runs `body` on a new lazy dump between two new hosts; ends all of it afterwards. */
async function withLazyDump(
  env: Record<string, string>,
  body: (d: LazyDump) => Promise<void>,
): Promise<void> {
  await using tmp = await tempDir();
  await using hosts = await makeHosts();
  const w = await startDirtier(hosts, tmp.path);
  const img = `${tmp.path}/img`;
  let src: Background | undefined;
  try {
    src = await dumpLazily(hosts, w, img, env);
    await body({ dir: tmp.path, hosts, w, img, src });
  } finally {
    if (src) await stop(src);
    await killAndReap(w.pid);
  }
}

async function stop(b: Background): Promise<void> {
  try {
    b.child.kill("SIGKILL");
  } catch { /* ended */ }
  await b.done.catch(() => {});
}

function restoreArgs(img: string): string[] {
  return [
    "restore",
    "-D",
    img,
    "--lazy-pages",
    "--page-server",
    "--address",
    SRC_ADDR,
    "--port",
    String(PORT),
  ];
}

Deno.test({
  name:
    "restore --lazy-pages --page-server: 128 MiB served from the dumping amber's frozen tree in the other namespace, every byte right; the source tree ends once all is in",
  ignore: !usable,
  fn: () =>
    withLazyDump({}, async ({ dir, hosts, w, img, src }) => {
      const pages = Deno.statSync(`${img}/pages-${w.pid}.img`).size;
      assert.ok(pages < MIB * 1024 * 1024 / 16, `anonymous memory left out of DIR (${pages})`);
      await using dst = await startAtDestination(hosts, dir, restoreArgs(img));
      const bin = await buildC("dirtier");
      const moved = await waitFor(
        () => hostPid(w.pid, bin),
        () => `the tree runs at the destination: ${dst.stderr()}${src.lines.join("\n")}`,
        60_000,
      );
      // Checked while pages may still be coming: the check faults them in from the source.
      await assertChecksOk(w, "during the lazy restore", moved);
      const st = await src.done;
      assert.equal(st.code, 0, `the source amber ends well:\n${src.lines.join("\n")}`);
      const served = src.lines.find((l) => /has every page/.test(l));
      assert.ok(served, src.lines.join("\n"));
      console.log(`  ${served.replace(/^.*lazy pages: /, "")}`);
      assert.ok(await waitGone(w.pid), "the source tree ends once the destination has every page");
      await assertChecksOk(w, "once every page is in", moved);
      assert.ok(isAlive(moved), `still runs: ${dst.stderr()}`);
    }),
});

Deno.test({
  name:
    "restore --lazy-pages --page-server of a tree of two processes: fork, MADV_DONTNEED, mremap and munmap while pages come from the source, every byte right",
  ignore: !usable,
  async fn() {
    await using tmp = await tempDir();
    await using hosts = await makeHosts();
    const bin = await buildC("lazytree");
    const outs = [`${tmp.path}/parent.txt`, `${tmp.path}/child.txt`];
    const inSrc = ["nsenter", `--net=/run/netns/${hosts.src}`, "--"];
    const w = await startWriter([...inSrc, bin, tmp.path, "32"], outs[0], 3, 30_000);
    await waitForLines(outs[1], 3, 30_000);
    const pids = descendants(w.pid);
    let src: Background | undefined;
    try {
      src = await dumpLazily(hosts, w, `${tmp.path}/img`);
      const args = [...restoreArgs(`${tmp.path}/img`), "-v"];
      await using dst = await startAtDestination(hosts, tmp.path, args);
      const moved = await waitFor(
        () => {
          const there = pids.map((p) => hostPid(p, bin));
          return there.every((p) => p) ? there as number[] : undefined;
        },
        () => `the tree runs at the destination: ${dst.stderr()}`,
        60_000,
      );
      const each = (signal: Deno.Signal, what: string) =>
        Promise.all(moved.map((pid, i) => ask(pid, outs[i], signal, what)));
      assert.deepEqual(await each("SIGUSR2", "fork"), ["fork ok", "fork ok"], "forked now");
      assert.deepEqual(await each("SIGWINCH", "ops"), ["ops ok", "ops ok"], "dontneed, mremap");
      assert.equal((await src.done).code, 0, src.lines.join("\n"));
      await waitVanished(pids);
      assert.deepEqual(await each("SIGUSR1", "check"), ["check ok", "check ok"], "once all is in");
      // Whether the signals came while pages were missing (likely, not asserted): the log says.
      console.log(`  ${/lazy pages: all in .*/.exec(dst.stderr())?.[0] ?? dst.stderr()}`);
    } finally {
      if (src) await stop(src);
      for (const pid of pids.toReversed()) await killAndReap(pid);
    }
  },
});

Deno.test({
  name:
    "the source amber killed mid-serve: the restored tree is killed and restore says which pages of which pid were missing and why",
  ignore: !usable,
  fn: () =>
    withLazyDump(
      { AMBER_TEST_FAULT: "lazy-source-half:SIGKILL" },
      async ({ dir, hosts, w, img, src }) => {
        await using dst = await startAtDestination(hosts, dir, restoreArgs(img));
        const got = await dst.result();
        assert.equal(got.code, 1, dst.stderr());
        const lines = dst.stderr().trim().split("\n");
        assert.equal(lines.length, 1, `one line:\n${dst.stderr()}`);
        console.log(`  ${lines[0]}`);
        const source = `${SRC_ADDR.replaceAll(".", "\\.")}:${PORT}`;
        assert.match(
          lines[0],
          new RegExp(
            `^amber: lazy pages: pid ${w.pid}: pages [0-9a-f]+-[0-9a-f]+: page source ${source} ` +
              `\\(its pid ${w.pid}\\): .*(closed|ECONNRESET).*: \\d+ pages not in yet: killed ${w.pid} `,
          ),
        );
        const bin = await buildC("dirtier");
        await until(() => !hostPid(w.pid, bin), "the restored tree is killed");
        const bad = (await readLines(w.out)).filter((l) => l.includes("BAD"));
        assert.deepEqual(bad, [], "it never saw wrong memory");
        assert.notEqual((await src.done).code, 0, "the source amber was killed");
        // (Its tree, detached by the kernel as its tracer died, is left as the kernel leaves it.)
        console.log(
          `  the source tree after its amber died: ${isAlive(w.pid) ? procState(w.pid) : "gone"}`,
        );
      },
    ),
});

Deno.test({
  name:
    "a source that hangs mid-serve: past restore --timeout the restored tree is killed and says so; the source, once it goes on, resumes its tree",
  ignore: !usable,
  fn: () =>
    withLazyDump(
      { AMBER_TEST_FAULT: "lazy-source-half:SIGSTOP" },
      async ({ dir, hosts, w, img, src }) => {
        const args = [...restoreArgs(img), "--timeout", "2"];
        await using dst = await startAtDestination(hosts, dir, args);
        const got = await dst.result();
        assert.equal(got.code, 1, dst.stderr());
        const lines = dst.stderr().trim().split("\n");
        assert.equal(lines.length, 1, `one line:\n${dst.stderr()}`);
        assert.match(
          lines[0],
          new RegExp(
            `^amber: lazy pages: pid ${w.pid}: pages [0-9a-f]+-[0-9a-f]+: page source .*: no ` +
              `answer for 2 s \\(the source hangs\\): \\d+ pages not in yet: killed ${w.pid} `,
          ),
        );
        Deno.kill(src.child.pid, "SIGCONT");
        assert.equal((await src.done).code, 1, src.lines.join("\n"));
        assert.match(src.lines.join("\n"), /resumes here, untouched/);
        assert.ok(isAlive(w.pid), "the source tree runs on");
        await assertChecksOk(w, "the resumed source");
      },
    ),
});

Deno.test({
  name: "the destination dying mid-restore resumes the source tree untouched, and dump says why",
  ignore: !usable,
  fn: () =>
    withLazyDump({}, async ({ dir, hosts, w, img, src }) => {
      await using _dst = await startAtDestination(hosts, dir, restoreArgs(img), {
        AMBER_TEST_FAULT: "lazy-half:SIGKILL",
      });
      const st = await src.done;
      assert.equal(st.code, 1, src.lines.join("\n"));
      const said = src.lines.filter((l) => l.startsWith("amber: "));
      assert.equal(said.length, 1, src.lines.join("\n"));
      console.log(`  ${said[0]}`);
      assert.match(
        said[0],
        new RegExp(
          `^amber: lazy page source .*: closed the connection before all pages were in; ` +
            `the tree \\(pids ${w.pid}\\) resumes here, untouched$`,
        ),
      );
      assert.ok(isAlive(w.pid), "the source tree runs on");
      await assertChecksOk(w, "the resumed source");
    }),
});

Deno.test("images of dump --lazy-pages are refused without --page-server, naming the pages left behind; SIGINT to the serving dump resumes its tree", async () => {
  await using tmp = await tempDir();
  const bin = await buildC("dirtier");
  const out = `${tmp.path}/out.txt`;
  const w = await startWriter([bin, out, "16", "16"], out, 3, 30_000);
  const img = `${tmp.path}/img`;
  const src = amberInBackground([
    "dump",
    "-t",
    String(w.pid),
    "-D",
    img,
    "--lazy-pages",
    "--address",
    "127.0.0.1",
    "--port",
    "0",
  ]);
  try {
    await src.waitLine(/serving lazy pages on 127\.0\.0\.1:\d+/);
    const r = await amber(["restore", "-D", img, "--lazy-pages"]);
    assertExit(r, 1, "restore without --page-server");
    assert.match(
      r.stderr,
      new RegExp(
        `^amber: pid ${w.pid}: pagemap: \\d+ pages were left in the dumped tree's memory ` +
          "\\(dump --lazy-pages\\): restore with --lazy-pages --page-server",
      ),
    );
    const shown = await amber(["show", img]);
    assertExit(shown, 0, "show");
    assert.match(shown.stdout, /^restorable: yes, with --lazy-pages --page-server/m);
    assert.match(shown.stdout, /^ {2}left in the dumped tree \(dump --lazy-pages\): \d+ pages$/m);
    const u = await amber(["restore", "-D", img, "--page-server", "--address", "127.0.0.1"]);
    assertExit(u, 2, "--page-server without --lazy-pages");
    src.child.kill("SIGINT");
    const st = await src.done;
    assert.equal(st.code, 130, src.lines.join("\n"));
    assert.ok(isAlive(w.pid), "the tree resumes");
    await assertChecksOk(w, "the tree after SIGINT to its serving dump");
  } finally {
    await stop(src);
    await killAndReap(w.pid);
  }
});
