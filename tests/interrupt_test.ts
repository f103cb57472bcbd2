/**
 * SIGINT, SIGTERM and SIGHUP to amber during a dump: the target resumes
 * exactly as it was (running, untraced, same signal mask and handlers,
 * memory intact), no partial image is left, and amber exits 128 + N.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertCounterHealthy,
  assertExit,
  assertRunningFree,
  CLI,
  DENO,
  dumpArgs,
  exists,
  isAlive,
  killAndReap,
  listDir,
  ROOT,
  sleep,
  startCounter,
  statusField,
  tempDir,
  type Writer,
} from "./_util.ts";

const SIGNAL_NUMBERS = { SIGHUP: 1, SIGINT: 2, SIGTERM: 15 } as const;

function signalState(pid: number): string[] {
  return ["SigBlk", "SigCgt", "SigIgn"].map((f) => `${f} ${statusField(pid, f)}`);
}

/** The target as it must be after an interrupted dump, and no images in `img`. */
async function assertUnharmed(c: Writer, before: string[], img: string, what: string) {
  assert.ok(isAlive(c.pid), `${what}: the target died`);
  await assertRunningFree(c.pid, what);
  assert.deepEqual(signalState(c.pid), before, `${what}: signal mask or dispositions changed`);
  assert.deepEqual(exists(img) ? listDir(img) : [], [], `${what}: images left in ${img}`);
  await assertCounterHealthy(c, 5);
}

async function withCounter(body: (c: Writer, dir: string) => Promise<void>): Promise<void> {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, 64);
  try {
    await body(c, tmp.path);
  } finally {
    await killAndReap(c.pid);
  }
}

// Deterministic: amber signals itself at each step of the dump.
const CASES: [string, keyof typeof SIGNAL_NUMBERS][] = [
  ["after-freeze", "SIGINT"],
  ["mid-pages", "SIGINT"],
  ["before-commit", "SIGINT"],
  ["mid-pages", "SIGTERM"],
  ["after-freeze", "SIGHUP"],
];
for (const [point, signal] of CASES) {
  Deno.test(`${signal} at ${point}, with and without -R: target unharmed, no images`, () =>
    withCounter(async (c, dir) => {
      const before = signalState(c.pid);
      for (const extra of [["-R"], []]) {
        const img = `${dir}/img${extra.join("")}`;
        const r = await amber(dumpArgs(c.pid, img, ...extra), {
          AMBER_TEST_FAULT: `${point}:${signal}`,
        });
        const what = `dump ${extra.join(" ")} with ${signal} at ${point}`;
        assertExit(r, 128 + SIGNAL_NUMBERS[signal], what);
        assert.match(r.stderr.trim(), new RegExp(`^amber: interrupted by ${signal}\\b[^\n]*$`));
        await assertUnharmed(c, before, img, what);
      }
    }));
}

// Asynchronous: SIGINT from outside at spread-out moments of a running dump.
Deno.test("SIGINT from outside at many moments of dump -R: target unharmed every time", () =>
  withCounter(async (c, dir) => {
    const before = signalState(c.pid);
    for (let i = 0; i < 8; i++) {
      const img = `${dir}/img${i}`;
      const child = new Deno.Command(DENO, {
        args: ["run", "-A", CLI, ...dumpArgs(c.pid, img, "-R")],
        cwd: ROOT,
        stdin: "null",
        stdout: "null",
        stderr: "piped",
      }).spawn();
      // Deno starts in ~100 ms; the dump itself takes a few hundred more.
      await sleep(80 + i * 40);
      try {
        child.kill("SIGINT");
      } catch { /* already done */ }
      const r = await child.output();
      const what = `dump -R interrupted after ${80 + i * 40} ms`;
      if (r.code === 0) {
        // It finished first: a complete image, and the target runs on.
        assert.ok(exists(`${img}/inventory.cbor`), `${what}: exit 0 without an image`);
        Deno.removeSync(img, { recursive: true });
      } else {
        assert.ok(
          r.code === 130,
          `${what}: exit ${r.code}: ${new TextDecoder().decode(r.stderr)}`,
        );
      }
      await assertUnharmed(c, before, img, what);
    }
  }));
