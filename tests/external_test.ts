/**
 * Descriptors leading outside the tree: a job whose stdout is a pipe into
 * an outside `tee`. Dump refuses it unless told `--external pipe:[INO]`;
 * the images then need `--inherit-fd fd[N]:pipe:[INO]`, and the job's
 * output flows into amber's fd N, a new pipe to a new tee.
 */
import assert from "node:assert/strict";
import {
  amber,
  amberAfter,
  assertConsecutive,
  assertExit,
  assertNoHelper,
  childrenOf,
  dumpArgs,
  killAndReap,
  killTree,
  procState,
  readCounterLines,
  readLines,
  showJson,
  spawnTarget,
  tempDir,
  waitForLines,
} from "./_util.ts";

/** Prints a counter; checks each time that its stdout is still a pipe (FAIL into argv[1] if not). */
const WRITER_PY = `import os, stat, sys, time
n = 0
while True:
    if not stat.S_ISFIFO(os.fstat(1).st_mode):
        open(sys.argv[1], "a").write("FAIL stdout is not a pipe\\n")
        sys.exit(1)
    print(n); n += 1; time.sleep(0.02)`;

Deno.test("a job's stdout into an outside tee: --external at dump, --inherit-fd at restore", async () => {
  await using tmp = await tempDir();
  const out1 = `${tmp.path}/tee1.txt`, out2 = `${tmp.path}/tee2.txt`;
  const status = `${tmp.path}/status.txt`, teePid = `${tmp.path}/tee2.pid`;
  const script = `python3 -u -c '${WRITER_PY}' ${status} | tee ${out1} > /dev/null`;
  const { pid: shell, child } = spawnTarget(["setsid", "bash", "-c", script]);
  let writer: number | undefined;
  let tee2: number | undefined;
  try {
    await waitForLines(out1, 3, 30_000);
    writer = childrenOf(shell).find((c) =>
      Deno.readTextFileSync(`/proc/${c}/cmdline`).split("\0")[0].endsWith("python3")
    );
    assert.ok(writer, "no python writer under the shell (test bug)");
    const link = Deno.readLinkSync(`/proc/${writer}/fd/1`);
    const ino = /^pipe:\[(\d+)\]$/.exec(link)?.[1];
    assert.ok(ino, `the writer's stdout is ${link}, not a pipe (test bug)`);
    const img = `${tmp.path}/img`;

    const refused = await amber([...dumpArgs(writer, img), "--shell-job"]);
    assertExit(refused, 1, "dump without --external");
    assert.ok(refused.stderr.includes(`--external ${link}`), refused.stderr);
    assert.ok(["S", "R"].includes(procState(writer) ?? ""), "the writer runs on");

    assertExit(
      await amber([...dumpArgs(writer, img), "--shell-job", "--external", link]),
      0,
      "dump --external",
    );
    const doc = await showJson(img);
    assert.deepEqual(doc.unrestorable, [], "external pipes do not make the images unrestorable");
    // The tee sees the end of its input, and the shell ends with it.
    await child.status;
    const before = await readCounterLines(out1);

    const plain = await amber(["restore", "-D", img, "-d", "--shell-job"]);
    assertExit(plain, 1, "restore without --inherit-fd");
    assert.match(plain.stderr, /fd 1: /, plain.stderr);
    assert.ok(plain.stderr.includes(`--inherit-fd fd[N]:${link}`), plain.stderr);
    assert.equal(procState(writer), null, "the refused restore created nothing");
    assertNoHelper("refused restore");

    const wrongEnd = await amberAfter(`exec 7< <(sleep 30)`, [
      "restore",
      "-D",
      img,
      "-d",
      "--shell-job",
      "--inherit-fd",
      `fd[7]:${link}`,
    ]);
    assertExit(wrongEnd, 1, "restore onto a read end");
    assert.match(wrongEnd.stderr, /not the write end of a pipe/, wrongEnd.stderr);

    const restored = await amberAfter(
      `exec 7> >(echo $BASHPID > ${teePid}; exec tee ${out2} > /dev/null 2>&1)`,
      ["restore", "-D", img, "-d", "--shell-job", "--inherit-fd", `fd[7]:${link}`],
    );
    assertExit(restored, 0, "restore --inherit-fd");
    tee2 = Number((await Deno.readTextFile(teePid)).trim());
    await waitForLines(out2, 10, 30_000);
    const now = Deno.readLinkSync(`/proc/${writer}/fd/1`);
    assert.notEqual(now, link, "the restored writer writes into the new pipe");
    assert.equal(now, Deno.readLinkSync(`/proc/${tee2}/fd/0`), "the new tee reads what it writes");
    const after = await readCounterLines(out2);
    assertConsecutive([...before.numbers, ...after.numbers], "what both tees received");
    assert.deepEqual(await readLines(status).catch(() => []), [], "the writer's own check");
  } finally {
    if (writer !== undefined) await killAndReap(writer);
    if (tee2 !== undefined) await killAndReap(tee2);
    await killTree(shell);
  }
});
