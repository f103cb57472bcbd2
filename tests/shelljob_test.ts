/**
 * Jobs attached to a terminal (--shell-job). The target (testdata/ttyjob.c)
 * runs with fds 0-2 on the slave of a real pseudo-terminal made by
 * util-linux `script`, writes a counter to a file and lines to the
 * terminal, and reads the terminal. It is dumped from there and restored by
 * amber running in another pseudo-terminal: it must get amber's terminal as
 * its fds 0-2, continue its counter, write to and read from that terminal.
 * Run with: deno test -A tests/shelljob_test.ts
 */
import assert from "node:assert/strict";
import {
  amber,
  type AmberResult,
  assertCounterFile,
  assertExit,
  assertLeftNothing,
  assertNoHelper,
  buildC,
  childrenWithState,
  CLI,
  CLOSE_FDS_AND_EXEC,
  commandWorks,
  DENO,
  descendants,
  dumpArgs,
  dumpKill,
  exists,
  isAlive,
  killAndReap,
  ownChildren,
  processesNamed,
  procState,
  procStatFields,
  readLines,
  statusField,
  tempDir,
  until,
  waitFor,
  waitForLine,
  waitForLines,
  waitVanished,
} from "./_util.ts";

// ---------------------------------------------------------------------------
// pseudo-terminals

/** util-linux `script` (Debian's bsdutils) makes the terminals. */
async function assertHaveScript(): Promise<void> {
  assert.ok(
    await commandWorks("script", "--version"),
    "these tests need util-linux `script` (Debian package bsdutils)",
  );
}

function shellQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

function commandLine(argv: string[]): string {
  return argv.map(shellQuote).join(" ");
}

/** `amber ARGS...` as a shell command line. */
function amberLine(...args: string[]): string {
  return commandLine([DENO, "run", "-A", CLI, ...args]);
}

/**
 * A shell command running on its own pseudo-terminal: `script -qfec CMD
 * TYPESCRIPT` (util-linux). script's child, `bash -c CMD`, is the session
 * leader of the terminal; everything written to the terminal is copied to
 * the typescript file; what is sent to script's stdin is typed on the
 * terminal. script exits with CMD's exit code.
 */
class Pty {
  readonly child: Deno.ChildProcess;
  readonly typescript: string;
  readonly #stdin: WritableStreamDefaultWriter<Uint8Array>;

  constructor(cmd: string, typescript: string) {
    this.typescript = typescript;
    this.child = new Deno.Command("/bin/bash", {
      args: ["-c", CLOSE_FDS_AND_EXEC, "amber-pty", "script", "-qfec", cmd, typescript],
      stdin: "piped",
      stdout: "null",
      stderr: "null",
      env: { SHELL: "/bin/bash", NO_COLOR: "1" },
    }).spawn();
    this.#stdin = this.child.stdin.getWriter();
  }

  get pid(): number {
    return this.child.pid;
  }

  /** The session leader on the terminal (script's child), once it exists. */
  async leader(): Promise<number> {
    return await waitFor(() => childOf(this.pid), `script ${this.pid}: no child`);
  }

  /** The terminal's slave, /dev/pts/N, once its session leader has it as fd 0. */
  async slave(): Promise<string> {
    const leader = await this.leader();
    return await waitFor(() => {
      // Right after script's fork, the child's fd 0 is still script's stdin.
      const path = Deno.readLinkSync(`/proc/${leader}/fd/0`);
      return /^\/dev\/pts\/\d+$/.test(path) ? path : undefined;
    }, `script ${this.pid}: its child ${leader} does not get the terminal as fd 0`);
  }

  /** Types `text` on the terminal. */
  async type(text: string): Promise<void> {
    await this.#stdin.write(new TextEncoder().encode(text));
  }

  /** The lines written to the terminal so far (CR LF made LF). */
  async output(): Promise<string[]> {
    return (await Deno.readTextFile(this.typescript)).replaceAll("\r\n", "\n").split("\n");
  }

  /** Waits for CMD to end; returns script's exit code. */
  async exitCode(): Promise<number> {
    const { code } = await this.child.status;
    await this.#stdin.close().catch(() => {});
    return code;
  }

  /** Kills everything on the terminal and script, and reaps them. */
  async close(): Promise<void> {
    const others = descendants(this.pid).slice(1);
    for (const p of others) kill(p);
    try {
      this.child.kill("SIGKILL");
    } catch {
      // exited already
    }
    await this.exitCode();
    for (const p of others) await killAndReap(p);
  }
}

/** Runs `amber ARGS...` on a new terminal until it exits. */
async function amberOnPty(
  tmp: string,
  name: string,
  ...args: string[]
): Promise<{ code: number; messages: string[] }> {
  const pty = new Pty(amberLine(...args), `${tmp}/${name}.typescript`);
  const code = await pty.exitCode();
  return { code, messages: (await pty.output()).filter((l) => l.startsWith("amber:")) };
}

/**
 * `amber ARGS...` on a new terminal whose shell stays once amber has exited
 * (so that the terminal stays too), writing amber's exit code to a file.
 */
class AmberPty extends Pty {
  readonly rcFile: string;

  constructor(tmp: string, name: string, ...args: string[]) {
    const rcFile = `${tmp}/${name}.rc`;
    super(
      `${amberLine(...args)}; echo $? >${shellQuote(rcFile)}; exec sleep 600`,
      `${tmp}/${name}.typescript`,
    );
    this.rcFile = rcFile;
  }

  /** amber's process (the shell's child), while it runs. */
  async amber(): Promise<number> {
    const shell = await this.leader();
    return await waitFor(() => childOf(shell), `terminal ${this.pid}: amber not started`);
  }

  /** Waits for amber to end; returns its exit code and its "amber:" lines. */
  async result(what: string, timeoutMs = 30_000): Promise<{ code: number; messages: string[] }> {
    const text = await waitFor(
      () => {
        try {
          return Deno.readTextFileSync(this.rcFile) || undefined;
        } catch {
          return undefined;
        }
      },
      `${what}: amber did not finish`,
      timeoutMs,
    );
    const messages = (await this.output()).filter((l) => l.startsWith("amber:"));
    return { code: Number(text.trim()), messages };
  }
}

// ---------------------------------------------------------------------------
// helpers

function kill(pid: number): void {
  try {
    Deno.kill(pid, "SIGKILL");
  } catch {
    // gone
  }
}

function childOf(pid: number): number | undefined {
  try {
    const text = Deno.readTextFileSync(`/proc/${pid}/task/${pid}/children`).trim();
    return text ? Number(text.split(/\s+/)[0]) : undefined;
  } catch {
    return undefined;
  }
}

/** The first descendant of `root` named `name`, once there. */
function waitForProcess(root: number, name: string): Promise<number> {
  return waitFor(
    () => processesNamed(root, name)[0],
    `no ${name} under ${root}`,
  );
}

function fdLinks(pid: number, fds: number[]): string[] {
  return fds.map((fd) => Deno.readLinkSync(`/proc/${pid}/fd/${fd}`));
}

/** ppid, pgid, sid and controlling terminal (tty_nr) of PID. */
function jobOf(pid: number): { ppid: number; pgid: number; sid: number; ttyNr: number } {
  const f = procStatFields(pid);
  return { ppid: Number(f[1]), pgid: Number(f[2]), sid: Number(f[3]), ttyNr: Number(f[4]) };
}

/** A failed amber run: exit 1 and one "amber: ..." line naming all of `mentions`. */
function assertFailure(code: number, messages: string[], mentions: string[], what: string): string {
  assert.equal(code, 1, `${what}: exit ${code}, expected 1; said ${JSON.stringify(messages)}`);
  assert.equal(messages.length, 1, `${what}: one "amber:" line expected: ${messages}`);
  const msg = messages[0];
  for (const m of mentions) assert.ok(msg.includes(m), `${what}: does not name ${m}: ${msg}`);
  // Each layer adds its context once: "fd 0: fd 0: ..." would be one too many.
  assert.doesNotMatch(msg, /(\bfd \d+: )\1/, `${what}: a context repeated: ${msg}`);
  return msg;
}

function resultMessages(r: AmberResult): string[] {
  return r.stderr.split("\n").filter((l) => l.startsWith("amber:"));
}

/** Waits until the terminal of `pty` shows "tty N" for some N >= from. */
async function waitForTtyLine(pty: Pty, from: number, what: string): Promise<void> {
  await waitFor(async () => {
    const lines = await pty.output();
    return lines.some((l) => /^tty \d+$/.test(l) && Number(l.slice(4)) >= from) ? true : undefined;
  }, `${what}: no "tty N" line with N >= ${from} on the terminal`);
}

/** A ttyjob.c started by ttyJobTest. */
interface Job {
  /** The temporary directory of the test. */
  tmp: string;
  /** The counter file the job writes. */
  out: string;
  pid: number;
  /** Every terminal made (terminal A first): all closed at the end. */
  ptys: Pty[];
}

/**
 * Starts testdata/ttyjob.c with `args` as a job of the shell of a new
 * terminal A; once it writes and has its fds 0-2 on A, runs `body`. Then,
 * whatever happened, kills the job and closes every terminal, and checks
 * the whole output: the counter and, besides, exactly the lines `typed`.
 */
async function ttyJobTest(
  args: string[],
  typed: string[],
  body: (job: Job, ptyA: Pty, ttyA: string) => Promise<void>,
): Promise<void> {
  await assertHaveScript();
  await using tmp = await tempDir();
  const bin = await buildC("ttyjob");
  const job: Job = { tmp: tmp.path, out: `${tmp.path}/ttyjob.txt`, pid: 0, ptys: [] };
  try {
    const ptyA = new Pty(
      `${commandLine([bin, job.out, ...args])}; exec sleep 600`,
      `${tmp.path}/a.typescript`,
    );
    job.ptys.push(ptyA);
    job.pid = await waitForProcess(ptyA.pid, "ttyjob");
    await waitForLines(job.out, 3);
    const ttyA = await ptyA.slave();
    const stdio = fdLinks(job.pid, [0, 1, 2]);
    assert.deepEqual(stdio, [ttyA, ttyA, ttyA], "the job's stdio (test bug)");
    await body(job, ptyA, ttyA);
  } finally {
    if (job.pid) await killAndReap(job.pid);
    for (const p of job.ptys.reverse()) await p.close();
  }
  await assertCounterFile(job.out, "the whole output", typed);
}

// ---------------------------------------------------------------------------
// tests

Deno.test("shell job: dump and restore need --shell-job; restored onto amber's terminal, attached then -d", async () => {
  // The job: a child of the shell on terminal A, in that shell's session.
  await ttyJobTest(
    [],
    ["in hello B", "in hello C"],
    async ({ tmp, out, pid, ptys }, ptyA, ttyA) => {
      const leaderA = await ptyA.leader();
      assert.equal(jobOf(pid).sid, leaderA, "the job's session (test bug)");
      await waitForTtyLine(ptyA, 2, "terminal A");

      // Its session leader is outside the tree: dump refuses without --shell-job.
      const img1 = `${tmp}/img1`;
      const refused = await amber(dumpArgs(pid, img1));
      assertFailure(
        refused.code,
        resultMessages(refused),
        ["--shell-job", String(leaderA)],
        "dump without --shell-job",
      );
      assert.ok(isAlive(pid), "the job died in a refused dump");
      assert.equal(
        statusField(pid, "TracerPid"),
        "0",
        "the job is still traced after a refused dump",
      );
      await waitForLines(out, (await readLines(out)).length + 3);

      await dumpKill(pid, [pid], img1, "dump 1", "--shell-job");
      let n = (await assertCounterFile(out, "at dump 1")).numbers.length;

      // Restore without --shell-job, on a terminal: refused before anything is made.
      const before = childrenWithState();
      const noFlag = await amberOnPty(tmp, "noflag", "restore", "-D", img1, "-d");
      const msg = assertFailure(
        noFlag.code,
        noFlag.messages,
        ["--shell-job"],
        "restore without it",
      );
      // Its session is not in the images (the first check); or its terminal fd.
      assert.match(msg, /session|fd 0/, `restore without --shell-job: ${msg}`);
      assert.equal(procState(pid), null, "restore without --shell-job left the job behind");
      assertLeftNothing(before, "restore without --shell-job");
      assert.equal((await readLines(out)).length, n, "the job wrote after a refused restore");

      // Restore attached, by amber on terminal B: the job is amber's child,
      // in the session of terminal B, on terminal B.
      const ptyB = new AmberPty(tmp, "b", "restore", "-D", img1, "--shell-job");
      ptys.push(ptyB);
      const ttyB = await ptyB.slave();
      assert.notEqual(ttyB, ttyA, "test bug: terminal A is closed");
      const shellB = await ptyB.leader();
      const amberB = await ptyB.amber();
      await until(() => isAlive(pid), "the job is not back on terminal B");
      await waitForLines(out, n + 5);
      assert.deepEqual(fdLinks(pid, [0, 1, 2]), [ttyB, ttyB, ttyB], "fds 0-2 after restore 1");
      const jobB = jobOf(pid);
      assert.equal(jobB.ppid, amberB, "the attached job's parent is not amber");
      assert.equal(jobB.sid, shellB, "the job is not in terminal B's session");
      assert.equal(jobB.ttyNr, jobOf(shellB).ttyNr, "the job's controlling terminal is not B");
      assertNoHelper("the attached restore");
      await waitForTtyLine(ptyB, n, "terminal B");
      await ptyB.type("hello B\n");
      await waitForLine(out, (l) => l.includes("in hello B"));
      n = (await assertCounterFile(out, "after restore 1", ["in hello B"])).numbers.length;

      // Dump again: the attached amber exits with the job's fate (SIGKILL).
      const img2 = `${tmp}/img2`;
      assertExit(await amber(dumpArgs(pid, img2, "--shell-job")), 0, "dump 2");
      const attached = await ptyB.result("attached restore");
      assert.equal(attached.code, 128 + 9, `attached amber's exit code: ${attached.messages}`);
      await waitVanished([pid]);
      n = (await assertCounterFile(out, "at dump 2", ["in hello B"])).numbers.length;

      // restore -d by amber on terminal C: the job is then the subreaper's
      // child, in the session of terminal C, on terminal C.
      const childrenBeforeC = ownChildren();
      const ptyC = new AmberPty(tmp, "c", "restore", "-D", img2, "-d", "--shell-job");
      ptys.push(ptyC);
      const detached = await ptyC.result("restore -d on terminal C");
      assert.equal(detached.code, 0, `restore -d on terminal C: ${detached.messages}`);
      const ttyC = await ptyC.slave();
      assert.ok(![ttyA, ttyB].includes(ttyC), "test bug: terminal A or B is closed");
      const shellC = await ptyC.leader();
      assert.ok(isAlive(pid), "the job is not running after restore -d");
      assert.deepEqual(fdLinks(pid, [0, 1, 2]), [ttyC, ttyC, ttyC], "fds 0-2 after restore 2");
      const jobC = jobOf(pid);
      assert.equal(jobC.ppid, Deno.pid, "the detached job's parent is not the subreaper");
      assert.deepEqual(
        ownChildren().filter((p) => !childrenBeforeC.includes(p)),
        [ptyC.pid, pid].sort((a, b) => a - b),
        "new children of the test process",
      );
      assert.equal(jobC.sid, shellC, "the job is not in terminal C's session");
      assert.equal(jobC.ttyNr, jobOf(shellC).ttyNr, "the job's controlling terminal is not C");
      assertNoHelper("restore -d");
      await waitForLines(out, n + 5);
      await waitForTtyLine(ptyC, n, "terminal C");
      await ptyC.type("hello C\n");
      await waitForLine(out, (l) => l.includes("in hello C"));
      await assertCounterFile(out, "after restore 2", ["in hello B", "in hello C"]);
    },
  );
});

Deno.test("session leader with its stdio on a terminal: restore names the fd; --shell-job needs a terminal", async () => {
  // setsid: the job is its own session's leader, no controlling terminal,
  // but its fds 0-2 are terminal A.
  await ttyJobTest(["--setsid"], ["in hello B"], async ({ tmp, out, pid, ptys }, _ptyA, ttyA) => {
    await until(() => jobOf(pid).sid === pid, "the job did not setsid");
    assert.equal(jobOf(pid).ttyNr, 0, "test bug: the job has a controlling terminal");

    // The whole session is in the tree, but its terminal is not: a dump
    // without --shell-job would end a job restore then refuses, so it fails.
    const img = `${tmp}/img`;
    const refused = await amber(dumpArgs(pid, img));
    assertFailure(refused.code, resultMessages(refused), ["fd 0", ttyA, "--shell-job"], "dump");
    assert.ok(!exists(img), "the refused dump left images");
    assert.ok(isAlive(pid), "the refused dump ended the job");
    await dumpKill(pid, [pid], img, "the session", "--shell-job");
    const n = (await assertCounterFile(out, "at the dump")).numbers.length;

    // Without --shell-job the terminal fd is refused, named.
    let before = childrenWithState();
    const noFlag = await amberOnPty(tmp, "noflag", "restore", "-D", img, "-d");
    assertFailure(
      noFlag.code,
      noFlag.messages,
      ["fd 0", ttyA, "--shell-job"],
      "restore without --shell-job",
    );
    assert.equal(procState(pid), null, "restore without --shell-job left the job behind");
    assert.deepEqual(childrenWithState(), before, "restore without --shell-job left children");

    // With --shell-job but amber not on a terminal: fails once the process
    // exists, and must take it away again.
    before = childrenWithState();
    const noTty = await amber(["restore", "-D", img, "-d", "--shell-job"]);
    assertFailure(
      noTty.code,
      resultMessages(noTty),
      ["--shell-job", "terminal"],
      "restore --shell-job off a terminal",
    );
    assert.equal(procState(pid), null, "a failed --shell-job restore left the job behind");
    assertLeftNothing(before, "a failed --shell-job restore");
    assert.equal((await readLines(out)).length, n, "the job wrote during failed restores");

    // On terminal B it comes back: session leader again, fds 0-2 on B.
    const ptyB = new AmberPty(tmp, "b", "restore", "-D", img, "-d", "--shell-job");
    ptys.push(ptyB);
    const restored = await ptyB.result("restore -d on terminal B");
    assert.equal(restored.code, 0, `restore -d on terminal B: ${restored.messages}`);
    const ttyB = await ptyB.slave();
    assert.notEqual(ttyB, ttyA, "test bug: terminal A is closed");
    assert.ok(isAlive(pid), "the job is not running after restore -d");
    assert.deepEqual(fdLinks(pid, [0, 1, 2]), [ttyB, ttyB, ttyB], "fds 0-2 after the restore");
    const job = jobOf(pid);
    assert.deepEqual([job.sid, job.pgid, job.ttyNr], [pid, pid, 0], "sid, pgid, tty_nr");
    await waitForLines(out, n + 5);
    await waitForTtyLine(ptyB, n, "terminal B");
    // Not its controlling terminal, but its stdin all the same.
    await ptyB.type("hello B\n");
    await waitForLine(out, (l) => l.includes("in hello B"));
    await assertCounterFile(out, "after the restore", ["in hello B"]);
  });
});
