/**
 * The copy-on-write snapshot of `dump -R` (lib/mm/snapshot.ts): the tree
 * runs while its private memory is copied, and the images hold the memory
 * as it was at the freeze. Target: testdata/sweeper.c, which keeps
 * writing every page with a sweep number (private, shared, DONTFORK and
 * WIPEONFORK memory) and checks that its memory is one instant of that
 * sweep, on the way and on SIGUSR1.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertChecksOk,
  assertExit,
  assertOneLineError,
  buildC,
  isAlive,
  killAndReap,
  readLines,
  startWriter,
  tempDir,
  waitForLine,
  waitGone,
  type Writer,
} from "./_util.ts";

/** Above the 32 MiB from which dump -R prepares a pages file (and snapshots). */
const MIB = 64;

async function startSweeper(dir: string, ...extra: string[]): Promise<Writer> {
  const bin = await buildC("sweeper");
  const out = `${dir}/out.txt`;
  return await startWriter([bin, out, String(MIB), "--setsid", ...extra], out, 3, 30_000);
}

/** The sweeper's status lines: [sweep, cursor, longest gap in µs, bad pages]. */
async function status(w: Writer): Promise<number[][]> {
  return (await readLines(w.out)).filter((l) => /^\d+ \d+ \d+ \d+$/.test(l)).map((l) =>
    l.split(" ").map(Number)
  );
}

/** Waits until the sweeper has written on (its cursor moved past where it was). */
async function writesOn(w: Writer): Promise<void> {
  await waitForLine(w.out, (ls) => ls.some((l) => /^\d+ \d+ \d+ \d+$/.test(l)), 20_000);
  const [g, c] = (await status(w)).at(-1)!;
  await waitForLine(w.out, (ls) =>
    ls.some((l) => {
      const [g2, c2] = l.split(" ").map(Number);
      return /^\d+ \d+ \d+ \d+$/.test(l) && (g2 > g || (g2 === g && c2 > c + 1024));
    }), 20_000);
}

/** Waits until the sweeper has written every page once more (a whole sweep). */
async function sweepsOn(w: Writer): Promise<void> {
  const [g] = (await status(w)).at(-1)!;
  await waitForLine(
    w.out,
    (ls) => ls.some((l) => /^\d+ \d+ \d+ \d+$/.test(l) && Number(l.split(" ")[0]) > g + 1),
    30_000,
  );
}

function userfaultfds(pid: number): number {
  return [...Deno.readDirSync(`/proc/${pid}/fd`)]
    .filter((e) => Deno.readLinkSync(`/proc/${pid}/fd/${e.name}`) === "anon_inode:[userfaultfd]")
    .length;
}

/** dump -R --json; returns what it printed. */
async function dumpR(w: Writer, img: string, env: Record<string, string> = {}) {
  const r = await amber(["dump", "-t", String(w.pid), "-D", img, "-R", "--json", "-v"], env);
  assertExit(r, 0, "dump -R");
  return { json: JSON.parse(r.stdout), log: r.stderr };
}

/** Ends the original, restores the images and checks the memory that came back. */
async function restoreAndCheck(w: Writer, img: string, what: string): Promise<void> {
  await killAndReap(w.pid);
  // What it wrote after the freeze goes: the restored process writes on from there.
  await Deno.truncate(w.out, 0);
  assertExit(
    await amber(["restore", "-D", img, "-d", "--allow-changed-files"]),
    0,
    `${what}: restore`,
  );
  await writesOn(w);
  await assertChecksOk(w, `${what}: after restore`);
}

Deno.test("dump -R of a process writing all the time: the image is its memory at the freeze, copied while it ran", async () => {
  await using tmp = await tempDir();
  const w = await startSweeper(tmp.path);
  try {
    await writesOn(w);
    const img = `${tmp.path}/img`;
    const { json } = await dumpR(w, img);
    assert.equal(typeof json.frozenMs, "number");
    assert.ok(
      json.snapshot?.bytes >= MIB * 1048576,
      `the private memory is copied after the freeze: ${JSON.stringify(json.snapshot)}`,
    );
    assert.equal(userfaultfds(w.pid), 0, "the target holds no userfaultfd");
    await writesOn(w);
    await assertChecksOk(w, "the original, after the dump");
    await restoreAndCheck(w, img, "snapshot");
  } finally {
    await killAndReap(w.pid);
  }
});

Deno.test("dump -R of a process that maps, mremaps and unmaps memory all the time: its image is one instant", async () => {
  await using tmp = await tempDir();
  const w = await startSweeper(tmp.path, "--churn");
  try {
    await writesOn(w);
    const img = `${tmp.path}/img`;
    const { json, log } = await dumpR(w, img);
    // Either the snapshot copied what was unmapped in time, or it saw it
    // lost and the dump was taken again frozen; both give one instant.
    assert.ok(
      json.snapshot || /dumping again, frozen/.test(log),
      `neither a snapshot nor a frozen retry: ${log}`,
    );
    await assertChecksOk(w, "the original, after the dump");
    await restoreAndCheck(w, img, "churn");
  } finally {
    await killAndReap(w.pid);
  }
});

Deno.test("dump -R of a process whose 4 threads all write: every thread's memory is of the freeze", async () => {
  await using tmp = await tempDir();
  const w = await startSweeper(tmp.path, "--threads", "3");
  try {
    await writesOn(w);
    const img = `${tmp.path}/img`;
    const { json } = await dumpR(w, img);
    assert.ok(json.snapshot, "copied after the freeze");
    await assertChecksOk(w, "the original, after the dump");
    await restoreAndCheck(w, img, "threads");
  } finally {
    await killAndReap(w.pid);
  }
});

Deno.test("amber killed in the middle of a snapshot copy: the target writes on, nothing left protected", async () => {
  await using tmp = await tempDir();
  const w = await startSweeper(tmp.path);
  try {
    await writesOn(w);
    const r = await amber(
      ["dump", "-t", String(w.pid), "-D", `${tmp.path}/img`, "-R"],
      { AMBER_TEST_FAULT: "mid-snapshot:SIGKILL" },
    );
    assert.equal(r.code, 137, `amber was killed at the fault point: ${r.stderr}`);
    assert.ok(isAlive(w.pid), "the target lives");
    // The sweeper writes every page of its row: a page still protected
    // with nobody to serve it would stop it for good.
    await sweepsOn(w);
    assert.equal(userfaultfds(w.pid), 0, "the target holds no userfaultfd");
    await assertChecksOk(w, "after amber died");
  } finally {
    await killAndReap(w.pid);
  }
});

Deno.test("a snapshot copy that fails leaves the target running and no images", async () => {
  await using tmp = await tempDir();
  const w = await startSweeper(tmp.path);
  try {
    await writesOn(w);
    const img = `${tmp.path}/img`;
    const r = await amber(
      ["dump", "-t", String(w.pid), "-D", img, "-R"],
      { AMBER_TEST_FAULT: "mid-snapshot" },
    );
    assert.match(assertOneLineError(r, 1, "dump -R"), /mid-snapshot/);
    let left: string[] = [];
    try {
      left = [...Deno.readDirSync(img)].map((e) => e.name);
    } catch { /* no directory at all */ }
    assert.ok(!left.some((n) => n.startsWith("pages-")), `images left: ${left}`);
    await writesOn(w);
    await writesOn(w);
    await assertChecksOk(w, "after the failed dump");
  } finally {
    await killAndReap(w.pid);
    assert.ok(await waitGone(w.pid));
  }
});
