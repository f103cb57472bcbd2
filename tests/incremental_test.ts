/**
 * Incremental checkpoints (issue 13): `pre-dump` arms write tracking
 * (userfaultfd WP_ASYNC + PAGEMAP_SCAN) and later rounds with
 * --prev-images-dir store only the pages written since; restore reads the
 * chain. Target: testdata/dirtier.c, which keeps rewriting a few hot pages
 * and checks all its memory on SIGUSR1.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertChecksOk,
  assertExit,
  assertOneLineError,
  buildC,
  exists,
  isAlive,
  killAndReap,
  listDir,
  readLines,
  sizeOf,
  startWriter,
  tempDir,
  waitForLine,
  waitForLines,
  waitGone,
  type Writer,
} from "./_util.ts";

const COLD_MIB = 32;
const HOT_PAGES = 64;
const HOT_BYTES = HOT_PAGES * 4096;
/** Pages outside the tracked memory (libc data, stack...) a round stores again, at most. */
const OTHER_BYTES = 2 * 1024 * 1024;

async function startDirtier(dir: string): Promise<Writer> {
  const bin = await buildC("dirtier");
  const out = `${dir}/out.txt`;
  return await startWriter([bin, out, String(COLD_MIB), String(HOT_PAGES)], out, 3);
}

/** Waits until the target has rewritten every hot page at least once more. */
async function letItWrite(w: Writer): Promise<void> {
  const lines = await readLines(w.out);
  const last = Number(lines.filter((l) => /^\d+$/.test(l)).at(-1));
  await waitForLine(w.out, (ls) => ls.some((l) => /^\d+$/.test(l) && Number(l) > last + HOT_PAGES));
}

function pagesBytes(dir: string): number {
  return sizeOf(dir, /^pages-\d+\.img$/);
}

function trackerFds(pid: number): string[] {
  return [...Deno.readDirSync(`/proc/${pid}/fd`)]
    .map((e) => Deno.readLinkSync(`/proc/${pid}/fd/${e.name}`))
    .filter((l) => l === "anon_inode:[userfaultfd]");
}

Deno.test("3 pre-dumps and a final dump: the last rounds store only what was written, the chain restores every byte", async () => {
  await using tmp = await tempDir();
  const w = await startDirtier(tmp.path);
  try {
    const dirs = ["pre1", "pre2", "pre3", "final"].map((d) => `${tmp.path}/${d}`);
    assertExit(await amber(["pre-dump", "-t", String(w.pid), "-D", dirs[0]]), 0, "pre-dump 1");
    assert.ok(
      pagesBytes(dirs[0]) >= COLD_MIB * 1024 * 1024,
      "the first pre-dump copies everything",
    );
    assert.equal(trackerFds(w.pid).length, 1, "tracking armed in the target");
    for (const i of [1, 2]) {
      await letItWrite(w);
      const r = await amber([
        "pre-dump",
        "-t",
        String(w.pid),
        "-D",
        dirs[i],
        "--prev-images-dir",
        `../pre${i}`,
      ]);
      assertExit(r, 0, `pre-dump ${i + 1}`);
      const bytes = pagesBytes(dirs[i]);
      assert.ok(bytes >= HOT_BYTES, `pre-dump ${i + 1}: ${bytes} bytes, hot pages missing`);
      assert.ok(bytes < HOT_BYTES + OTHER_BYTES, `pre-dump ${i + 1}: ${bytes} bytes stored`);
    }
    await assertChecksOk(w, "after the pre-dumps");
    await letItWrite(w);
    const r = await amber([
      "dump",
      "-t",
      String(w.pid),
      "-D",
      dirs[3],
      "--prev-images-dir",
      "../pre3",
      "--track-mem",
    ]);
    assertExit(r, 0, "final dump");
    assert.ok(await waitGone(w.pid), "the dumped tree ends");
    const bytes = pagesBytes(dirs[3]);
    assert.ok(bytes >= HOT_BYTES && bytes < HOT_BYTES + OTHER_BYTES, `final dump: ${bytes} bytes`);

    const show = await amber(["show", dirs[3]]);
    assertExit(show, 0, "show");
    assert.match(show.stdout, /held here: .*final: \d+ runs/);
    for (const d of ["pre1", "pre2", "pre3"]) {
      assert.match(show.stdout, new RegExp(`from parent: .*${d}: \\d+ runs`), show.stdout);
    }

    // A missing link refuses before anything is created.
    await Deno.rename(dirs[1], `${dirs[1]}.away`);
    const refused = await amber(["restore", "-D", dirs[3], "-d"]);
    assert.match(assertOneLineError(refused, 1, "restore without pre2"), /pre2: does not exist/);
    assert.ok(!isAlive(w.pid), "nothing restored");
    await Deno.rename(`${dirs[1]}.away`, dirs[1]);

    const lastLine = Number((await readLines(w.out)).filter((l) => /^\d+$/.test(l)).at(-1));
    assertExit(await amber(["restore", "-D", dirs[3], "-d"]), 0, "restore from the chain");
    await waitForLine(w.out, (ls) => ls.some((l) => /^\d+$/.test(l) && Number(l) > lastLine));
    await assertChecksOk(w, "after the restore from the chain");
    assert.equal(trackerFds(w.pid).length, 0, "no tracker in the restored process");
  } finally {
    await killAndReap(w.pid);
  }
});

Deno.test("--track-mem without a chain is refused; dump -R with one disarms tracking", async () => {
  await using tmp = await tempDir();
  const w = await startDirtier(tmp.path);
  try {
    const alone = await amber(["dump", "-t", String(w.pid), "-D", `${tmp.path}/x`, "--track-mem"]);
    assert.match(assertOneLineError(alone, 2, "--track-mem alone"), /--prev-images-dir/);
    const noParent = await amber([
      "dump",
      "-t",
      String(w.pid),
      "-D",
      `${tmp.path}/y`,
      "--track-mem",
      "--prev-images-dir",
      "../none",
    ]);
    assert.match(assertOneLineError(noParent, 1, "missing parent"), /none/);
    assert.ok(isAlive(w.pid), "the target runs on");

    // A pre-dump that fails leaves no tracking behind: while it copies the running tree's
    // pages (mid-pages), or after (before-commit).
    for (const point of ["mid-pages", "before-commit"]) {
      const failed = await amber(["pre-dump", "-t", String(w.pid), "-D", `${tmp.path}/f`], {
        AMBER_TEST_FAULT: point,
      });
      assert.match(assertOneLineError(failed, 1, `failed pre-dump (${point})`), new RegExp(point));
      assert.equal(
        trackerFds(w.pid).length,
        0,
        `a failed pre-dump (${point}) disarms its tracking`,
      );
      assert.ok(!exists(`${tmp.path}/f`) || listDir(`${tmp.path}/f`).length === 0, "no images");
      await assertChecksOk(w, `after the failed pre-dump (${point})`);
    }
    assertExit(await amber(["pre-dump", "-t", String(w.pid), "-D", `${tmp.path}/pre`]), 0, "pre");
    await letItWrite(w);
    const r = await amber([
      "dump",
      "-R",
      "-t",
      String(w.pid),
      "-D",
      `${tmp.path}/inc`,
      "--track-mem",
      "--prev-images-dir",
      "../pre",
    ]);
    assertExit(r, 0, "dump -R --track-mem");
    assert.ok(pagesBytes(`${tmp.path}/inc`) < HOT_BYTES + OTHER_BYTES, "incremental");
    assert.equal(trackerFds(w.pid).length, 0, "tracking disarmed once no chain needs it");
    await assertChecksOk(w, "after dump -R");
    // Without tracking the next round cannot build on pre: it copies everything again.
    await waitForLines(w.out, (await readLines(w.out)).length + 2);
    const again = await amber([
      "pre-dump",
      "-t",
      String(w.pid),
      "-D",
      `${tmp.path}/again`,
      "--prev-images-dir",
      "../pre",
    ]);
    assertExit(again, 0, "pre-dump after disarming");
    assert.ok(pagesBytes(`${tmp.path}/again`) >= COLD_MIB * 1024 * 1024, "full copy again");
  } finally {
    await killAndReap(w.pid);
  }
});

Deno.test("a pre-dump alone restores as one instant of a writing process (amber run restores one)", async () => {
  await using tmp = await tempDir();
  const w = await startDirtier(tmp.path);
  try {
    await letItWrite(w);
    const img = `${tmp.path}/pre`;
    assertExit(await amber(["pre-dump", "-t", String(w.pid), "-D", img]), 0, "pre-dump");
    await killAndReap(w.pid);
    await Deno.truncate(w.out, 0);
    const r = await amber(["restore", "-D", img, "-d", "--allow-changed-files"]);
    assertExit(r, 0, "restore of the pre-dump");
    await waitForLines(w.out, 3);
    // Its generation counter and the hot pages it names are of the same instant.
    await assertChecksOk(w, "restored from the pre-dump");
  } finally {
    await killAndReap(w.pid);
  }
});

Deno.test("without the walk begun at the freeze, each mapping is walked where needed: a round stores only what was written, the chain restores every byte", async () => {
  await using tmp = await tempDir();
  const w = await startDirtier(tmp.path);
  // The dump's one walk of private memory at the freeze fails: present and written pages
  // are then found by walking each mapping when the pagemap part needs it.
  const noWalk = { AMBER_TEST_FAULT: "scan-ahead" };
  try {
    const [pre, final] = [`${tmp.path}/pre`, `${tmp.path}/final`];
    assertExit(await amber(["pre-dump", "-t", String(w.pid), "-D", pre], noWalk), 0, "pre-dump");
    assert.ok(pagesBytes(pre) >= COLD_MIB * 1024 * 1024, "the pre-dump copies everything");
    await letItWrite(w);
    const r = await amber(
      ["dump", "-t", String(w.pid), "-D", final, "--prev-images-dir", "../pre", "--track-mem"],
      noWalk,
    );
    assertExit(r, 0, "final dump");
    assert.ok(await waitGone(w.pid), "the dumped tree ends");
    const bytes = pagesBytes(final);
    assert.ok(bytes >= HOT_BYTES && bytes < HOT_BYTES + OTHER_BYTES, `final dump: ${bytes} bytes`);
    const lastLine = Number((await readLines(w.out)).filter((l) => /^\d+$/.test(l)).at(-1));
    assertExit(await amber(["restore", "-D", final, "-d"]), 0, "restore from the chain");
    await waitForLine(w.out, (ls) => ls.some((l) => /^\d+$/.test(l) && Number(l) > lastLine));
    await assertChecksOk(w, "after the restore from the chain");
  } finally {
    await killAndReap(w.pid);
  }
});
