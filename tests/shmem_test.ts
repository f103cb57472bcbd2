/**
 * Anonymous memory shared across fork (MAP_SHARED | MAP_ANONYMOUS) comes
 * back as one shared object at the same address in every holder: after
 * the restore each process still sees the other's writes, and a page only
 * the child ever touched keeps its contents.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertCounterFile,
  assertExit,
  childrenOf,
  dumpArgs,
  type Json,
  killTree,
  procMaps,
  readLines,
  showJson,
  startWriter,
  tempDir,
  waitFor,
  waitForLines,
  waitVanished,
} from "./_util.ts";

/**
 * Parent and child write their counters into the shared page (slots 0 and
 * 8) and log "N OTHER" (OTHER: the other's counter as read from the page)
 * to argv[1].P / argv[1].C every 20 ms. The child also keeps its counter in
 * the third page, which the parent never touches, and checks it each tick.
 */
const SHARE_PY = `import mmap, os, sys, time
m = mmap.mmap(-1, 12288)
m[4096:4100] = b"page"
tag = "C" if os.fork() == 0 else "P"
slot, oslot = (0, 8) if tag == "P" else (8, 0)
f = open("%s.%s" % (sys.argv[1], tag), "a")
i = 0
while True:
    m[slot:slot + 8] = i.to_bytes(8, "little")
    other = int.from_bytes(m[oslot:oslot + 8], "little")
    ok = m[4096:4100] == b"page"
    if tag == "C":
        ok = ok and int.from_bytes(m[8192:8200], "little") == max(i - 1, 0)
        m[8192:8200] = i.to_bytes(8, "little")
    f.write("%d %d\\n" % (i, other) if ok else "BAD %d\\n" % i)
    f.flush()
    i += 1
    time.sleep(0.02)
`;

const isShared = (m: { perms: string; path: string; start: bigint; end: bigint }) =>
  m.perms[3] === "s" && m.path.startsWith("/dev/zero") && m.end - m.start === 12288n;

/** The "OTHER" values of a log's lines. */
async function others(out: string): Promise<number[]> {
  return (await readLines(out)).map((l) => Number(l.split(" ")[1]));
}

Deno.test("shared anonymous memory of parent and child stays shared after dump and restore", async () => {
  await using tmp = await tempDir();
  const base = `${tmp.path}/mem`;
  const outP = `${base}.P`, outC = `${base}.C`;
  const t = await startWriter(["setsid", "python3", "-c", SHARE_PY, base], outP, 3, 30_000);
  const root = t.pid;
  let pids = [root];
  try {
    await waitForLines(outC, 3);
    const [child] = childrenOf(root);
    pids = [root, child];
    const start = procMaps(child).find(isShared)!.start;

    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(root, img)), 0, "dump");
    await t.child.status;
    await waitVanished(pids);
    const doc = await showJson(img);
    const mapping = (pid: number): Json =>
      doc.processes.find((p: Json) => p.pid === pid).images.mappings.mappings.find((m: Json) =>
        BigInt(m.start) === start
      );
    assert.equal(mapping(child)?.sharedWith, root, "the child's mapping is the parent's memory");
    assert.equal(mapping(root)?.sharedWith, undefined, "the parent holds it first");
    const seen = [Math.max(...await others(outP)), Math.max(...await others(outC))];

    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    const ino = (pid: number) => procMaps(pid).find((m) => m.start === start && isShared(m))?.inode;
    assert.ok(ino(root), "the parent has no shared mapping at its address after restore");
    assert.equal(ino(child), ino(root), "parent and child map different objects after restore");
    const n = [(await readLines(outP)).length, (await readLines(outC)).length];
    await waitForLines(outP, n[0] + 20);
    await waitForLines(outC, n[1] + 20);
    // Each one sees the other's counter go on beyond what it saw before the dump.
    const after = [Math.max(...await others(outP)), Math.max(...await others(outC))];
    assert.ok(
      after[0] > seen[0] + 5,
      `the parent sees the child's counter ${seen[0]} → ${after[0]}`,
    );
    assert.ok(
      after[1] > seen[1] + 5,
      `the child sees the parent's counter ${seen[1]} → ${after[1]}`,
    );
  } finally {
    for (const pid of pids) await killTree(pid);
  }
  await assertCounterFile(outP, "the parent's log");
  await assertCounterFile(outC, "the child's log");
});

/**
 * Writes a pattern into 256 pages of shared memory, drops them from its
 * page tables (MADV_DONTNEED keeps a shared object's data), then counts;
 * on SIGUSR1 it checks the pattern, as postgres's buffers must survive.
 */
const DROPPED_PY = `import mmap, signal, sys, time
N = 256 * 4096
m = mmap.mmap(-1, N)
for p in range(256):
    m[p * 4096:p * 4096 + 8] = (p * 7919 + 1).to_bytes(8, "little")
m.madvise(mmap.MADV_DONTNEED)
out = open(sys.argv[1], "a")
def check(s, f):
    bad = [p for p in range(256) if m[p * 4096:p * 4096 + 8] != (p * 7919 + 1).to_bytes(8, "little")]
    out.write("check %s\\n" % ("ok" if not bad else "BAD %d" % bad[0]))
    out.flush()
    m.madvise(mmap.MADV_DONTNEED)
signal.signal(signal.SIGUSR1, check)
i = 0
while True:
    out.write("%d\\n" % i)
    out.flush()
    i += 1
    time.sleep(0.02)
`;

Deno.test("shared memory pages no process has in its page tables keep their contents", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/dropped.txt`;
  const target = await startWriter(["setsid", "python3", "-c", DROPPED_PY, out], out, 3);
  const { pid } = target;
  try {
    Deno.kill(pid, "SIGUSR1");
    await waitForLines(out, (await readLines(out)).length + 2);
    assert.ok(
      (await readLines(out)).includes("check ok"),
      "the pattern before the dump (test bug)",
    );
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    await target.child.status;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    const n = (await readLines(out)).length;
    await waitForLines(out, n + 3);
    Deno.kill(pid, "SIGUSR1");
    const lines = await waitFor(async () => {
      const l = await readLines(out);
      return l.filter((x) => x.startsWith("check")).length >= 2 ? l : undefined;
    }, "no check after the restore");
    assert.deepEqual(lines.filter((x) => x.startsWith("check")), ["check ok", "check ok"]);
  } finally {
    await killTree(pid);
  }
});
