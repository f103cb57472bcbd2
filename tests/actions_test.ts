/**
 * --action-script (CRIU's) on dump and restore: each script runs at its
 * point with CRTOOLS_SCRIPT_ACTION, CRTOOLS_IMAGE_DIR and CRTOOLS_INIT_PID
 * set, and one that fails fails its step, named. (network-lock and
 * network-unlock, with --tcp-established: tests/migrate_tcp_test.ts.)
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  isAlive,
  killAndReap,
  readLines,
  startCounter,
  tempDir,
  waitForLine,
  waitGone,
} from "./_util.ts";

/** A script that notes "ACTION DIR PID" and fails at `failAt`. */
function script(path: string, log: string, failAt = "none"): string {
  Deno.writeTextFileSync(
    path,
    "#!/bin/sh\n" +
      `echo "$CRTOOLS_SCRIPT_ACTION $CRTOOLS_IMAGE_DIR $CRTOOLS_INIT_PID" >> ${log}\n` +
      `[ "$CRTOOLS_SCRIPT_ACTION" != ${failAt} ]\n`,
    { mode: 0o755 },
  );
  return path;
}

Deno.test("dump and restore run their action scripts in order, with the images dir and the root pid", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, 8);
  const log = `${tmp.path}/actions.txt`, dir = `${tmp.path}/img`;
  const s = script(`${tmp.path}/s.sh`, log);
  try {
    assertExit(
      await amber(["dump", "-t", String(c.pid), "-D", dir, "--action-script", s]),
      0,
      "dump",
    );
    assert.ok(await waitGone(c.pid));
    // Shell code, as CRIU runs it: a second script, inline.
    const inline = `echo "inline $CRTOOLS_SCRIPT_ACTION" >> ${log}`;
    const args = ["restore", "-D", dir, "-d", "--action-script", s, "--action-script", inline];
    assertExit(await amber(args), 0, "restore");
    const seen = (await readLines(c.out)).length;
    await waitForLine(c.out, (ls) => ls.length > seen);
    assert.deepEqual(await readLines(log), [
      `pre-dump ${dir} ${c.pid}`,
      `post-dump ${dir} ${c.pid}`,
      `pre-restore ${dir} ${c.pid}`,
      "inline pre-restore",
      `post-restore ${dir} ${c.pid}`,
      "inline post-restore",
    ]);
  } finally {
    await killAndReap(c.pid);
  }
});

Deno.test("a post-dump script that fails fails the dump, named; the tree runs on", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, 8);
  const log = `${tmp.path}/actions.txt`, dir = `${tmp.path}/img`;
  try {
    const s = script(`${tmp.path}/s.sh`, log, "post-dump");
    const r = await amber(["dump", "-t", String(c.pid), "-D", dir, "--action-script", s]);
    assertExit(r, 1, "dump with a failing post-dump");
    assert.equal(
      r.stderr.trim(),
      `amber: action script ${s}: post-dump: exit status 1; the images are complete in ${dir}, ` +
        "the tree runs on",
    );
    assert.ok(isAlive(c.pid));
    const seen = (await readLines(c.out)).length;
    await waitForLine(c.out, (ls) => ls.length > seen);
  } finally {
    await killAndReap(c.pid);
  }
});

Deno.test("a pre-restore script that fails fails the restore before anything is created", async () => {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, 8);
  const log = `${tmp.path}/actions.txt`, dir = `${tmp.path}/img`;
  try {
    assertExit(await amber(["dump", "-t", String(c.pid), "-D", dir]), 0, "dump");
    assert.ok(await waitGone(c.pid));
    const s = script(`${tmp.path}/s.sh`, log, "pre-restore");
    const r = await amber(["restore", "-D", dir, "-d", "--action-script", s]);
    assertExit(r, 1, "restore with a failing pre-restore");
    assert.match(r.stderr, /action script .*: pre-restore: exit status 1$/m);
    assert.ok(!isAlive(c.pid), "nothing restored");
    assertExit(await amber(["restore", "-D", dir, "-d"]), 0, "restore without it");
    assert.ok(isAlive(c.pid));
  } finally {
    await killAndReap(c.pid);
  }
});
