/**
 * Interactive shell jobs, driven through tmux as a person would: a program
 * runs in the foreground of a tmux pane's shell, is dumped with
 * --shell-job from outside, and is restored by typing `amber restore
 * --shell-job -D DIR` into the same pane. What is typed afterwards must
 * reach it at once, full-screen programs must redraw, job control must
 * work, and the shell's prompt must come back with amber's exit status.
 * Run with: deno test -A tests/tty_test.ts
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  assertLeftNothing,
  assertOneLineError,
  buildC,
  childrenOf,
  childrenWithState,
  CLI,
  CLOSE_FDS_AND_EXEC,
  commandWorks,
  DENO,
  descendants,
  dumpArgs,
  exists,
  isAlive,
  killAndReap,
  killTree,
  procState,
  procStatFields,
  readLines,
  sleep,
  spawnTarget,
  tempDir,
  until,
  waitForLine,
  waitForLines,
  waitVanished,
} from "./_util.ts";

function shellQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

/** `amber ARGS...` as a shell command line, as a person would type it. */
function amberLine(...args: string[]): string {
  return [DENO, "run", "-A", CLI, ...args].map(shellQuote).join(" ");
}

// After Ctrl-C the terminal echoed "^C" where the prompt then starts.
const PROMPT = /^(?:\^C)?rc=(\d+) \$$/;

/**
 * A tmux server of its own (socket in the test's directory) with one
 * session whose pane runs a plain bash with the prompt "rc=$? $ ".
 */
class Tmux {
  readonly socket: string;
  server = 0;

  constructor(readonly dir: string, name = "tmux") {
    this.socket = `${dir}/${name}.sock`;
  }

  /** The pane's shell: a plain bash, prompt "rc=$? $ ". */
  get shell(): string {
    return `env -i PATH=/usr/bin:/bin TERM=screen HOME=${shellQuote(this.dir)} ` +
      `LESSHISTFILE=- PS1='rc=$? $ ' bash --norc --noprofile`;
  }

  async run(...args: string[]): Promise<string> {
    const r = await new Deno.Command("/bin/bash", {
      args: [
        "-c",
        CLOSE_FDS_AND_EXEC,
        "tmux",
        "tmux",
        "-S",
        this.socket,
        "-f",
        "/dev/null",
        ...args,
      ],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      clearEnv: true,
      env: { PATH: "/usr/bin:/bin", TERM: "xterm" },
    }).output();
    const text = new TextDecoder().decode(r.stdout);
    if (!r.success) {
      throw new Error(`tmux ${args.join(" ")}: ${new TextDecoder().decode(r.stderr).trim()}`);
    }
    return text;
  }

  async start(cols = 80, rows = 24): Promise<void> {
    await this.run("new-session", "-d", "-s", "t", "-x", `${cols}`, "-y", `${rows}`, this.shell);
    this.server = Number(await this.run("display", "-p", "-t", "t", "#{pid}"));
    await this.waitPrompt(0, "the pane's first prompt");
  }

  async panePid(): Promise<number> {
    return Number(await this.run("display", "-p", "-t", "t", "#{pane_pid}"));
  }

  /** Presses keys (tmux key names: Enter, C-c, Escape...). */
  async keys(...keys: string[]): Promise<void> {
    await this.run("send-keys", "-t", "t", ...keys);
  }

  /** Types text literally. */
  async type(text: string): Promise<void> {
    await this.run("send-keys", "-t", "t", "-l", text);
  }

  /** Types a command line and Enter. */
  async command(line: string): Promise<void> {
    await this.type(line);
    await this.keys("Enter");
  }

  /** The pane's visible lines, trailing blanks trimmed. */
  async screen(pane = "t"): Promise<string[]> {
    return (await this.run("capture-pane", "-p", "-t", pane)).split("\n").map((l) => l.trimEnd());
  }

  /** Waits until `pred` holds for the screen; fails showing the last screen. */
  async waitScreen(
    pred: (lines: string[]) => boolean,
    what: string,
    ms = 20_000,
    pane = "t",
  ): Promise<void> {
    const deadline = Date.now() + ms;
    let lines: string[] = [];
    while (Date.now() < deadline) {
      lines = await this.screen(pane);
      if (pred(lines)) return;
      await sleep(50);
    }
    assert.fail(`${what}: not on the screen after ${ms} ms:\n${lines.join("\n")}`);
  }

  /** Waits for the shell's prompt, with exit status `rc`, on the cursor's line. */
  async waitPrompt(rc: number, what: string): Promise<void> {
    const deadline = Date.now() + 20_000;
    let lines: string[] = [];
    while (Date.now() < deadline) {
      const y = Number(await this.run("display", "-p", "-t", "t", "#{cursor_y}"));
      lines = await this.screen();
      if (PROMPT.exec(lines[y] ?? "")?.[1] === String(rc)) return;
      await sleep(50);
    }
    assert.fail(`${what}: no prompt "rc=${rc} $" at the cursor:\n${lines.join("\n")}`);
  }

  /** The first process named `name` under the pane's shell. */
  async job(name: string): Promise<number> {
    const shell = await this.panePid();
    let pid = 0;
    await until(() => {
      pid = descendants(shell).find((p) => comm(p) === name) ?? 0;
      return pid !== 0;
    }, `no ${name} in the pane`);
    return pid;
  }

  async close(): Promise<void> {
    const pids = this.server ? descendants(this.server) : [];
    await this.run("kill-server").catch(() => {});
    for (const p of pids.reverse()) await killAndReap(p);
  }
}

function comm(pid: number): string | undefined {
  try {
    return Deno.readTextFileSync(`/proc/${pid}/comm`).trim();
  } catch {
    return undefined;
  }
}

/** The terminal's foreground group as PID's /proc/PID/stat shows it (tpgid). */
function tpgid(pid: number): number {
  return Number(procStatFields(pid)[5]);
}

function pgid(pid: number): number {
  return Number(procStatFields(pid)[2]);
}

/** Dumps a whole tmux server into `img` and restores it -d: the same processes come back. */
async function dumpRestoreServer(t: Tmux, img: string): Promise<void> {
  const tree = descendants(t.server);
  assertExit(await amber(dumpArgs(t.server, img)), 0, "dump");
  await waitVanished(tree);
  assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore -d");
  assert.deepEqual(descendants(t.server), tree, "the restored server's processes");
}

/** Types a line to the pane's cat: it is on the screen twice, echoed by the terminal and written by cat. */
async function catWritesBack(t: Tmux, line: string): Promise<void> {
  await t.command(line);
  await t.waitScreen(
    (l) => l.filter((x) => x === line).length === 2,
    `"${line}" echoed and written back by cat`,
  );
}

/**
 * Runs `body` with a tmux pane whose shell has started `cmd` in its
 * foreground, then kills everything.
 */
async function inPane(
  body: (t: Tmux, dir: string) => Promise<void>,
  size?: [number, number],
): Promise<void> {
  assert.ok(await commandWorks("tmux", "-V"), "these tests need tmux (Debian package tmux)");
  await using tmp = await tempDir();
  const t = new Tmux(tmp.path);
  try {
    await t.start(...(size ?? []));
    await body(t, tmp.path);
  } finally {
    await t.close();
  }
}

/**
 * Dumps the pane's foreground job `pid` with --shell-job (the shell then
 * shows it killed), clears the screen so a redraw can be seen, and types
 * the restore into the pane. Returns once the job is back in the terminal's
 * foreground, a child of amber.
 */
async function dumpAndRestoreInPane(
  t: Tmux,
  dir: string,
  pid: number,
  between?: () => Promise<void>,
) {
  const img = `${dir}/img`;
  const group = pgid(pid);
  assertExit(await amber(dumpArgs(pid, img, "--shell-job")), 0, "dump --shell-job");
  await t.waitPrompt(128 + 9, "the dumped job ended");
  await waitVanished([pid]);
  await between?.();
  await t.command("clear");
  await t.waitScreen((l) => PROMPT.test(l[0]) && !l.slice(1).some((x) => x), "a clear screen");
  await t.command(amberLine("restore", "--shell-job", "-D", img));
  // Its own group, not the group it is born in while restore builds it (amber's, in the foreground).
  await until(
    () => isAlive(pid) && pgid(pid) === group && tpgid(pid) === group,
    "the job is not back in the foreground",
  );
  const shell = await t.panePid();
  const amberPid = childrenOf(shell)[0];
  assert.equal(Number(procStatFields(pid)[1]), amberPid, "the restored job's parent is not amber");
  assert.equal(comm(amberPid), "deno", "the pane shell's child is not amber");
  return amberPid;
}

Deno.test("raw-mode program restored in its tmux pane: keys reach it at once, Ctrl-C is a key, its exit status is the shell's", async () => {
  const bin = await buildC("rawkeys");
  await inPane(async (t, dir) => {
    const out = `${dir}/keys.txt`;
    await t.command(`${bin} ${out}`);
    await waitForLine(out, (l) => l.includes("ready"));
    const pid = await t.job("rawkeys");
    await t.type("a");
    await waitForLine(out, (l) => l.includes("key 61"));

    await dumpAndRestoreInPane(t, dir, pid);
    // No Enter: raw mode came back, and the job reads the terminal as its foreground.
    await t.type("b");
    await waitForLine(out, (l) => l.includes("key 62"));
    await t.waitScreen((l) => l.some((x) => x.includes("[62]")), "the key shown by the program");
    // ISIG is off as at the dump: Ctrl-C is a key, not a signal.
    await t.keys("C-c");
    await waitForLine(out, (l) => l.includes("key 03"));
    assert.ok(isAlive(pid), "Ctrl-C killed the raw-mode program");
    await t.type("q");
    await t.waitPrompt(7, "the program quit with 7");
    const lines = await readLines(out);
    assert.deepEqual(
      lines.filter((l) => l.startsWith("BAD")),
      [],
      "the program saw its terminal wrong",
    );
    assert.deepEqual(lines, ["ready", "key 61", "key 62", "key 03", "key 71"], "keys read");
    // Echo was off: the typed "b" never showed by itself.
    assert.ok(!(await t.screen()).some((l) => /b\[62\]/.test(l)), "the terminal echoed a key");
    const shell = await t.panePid();
    assert.equal(tpgid(shell), shell, "the shell did not get its terminal back");
  });
});

Deno.test("a restored raw-mode job killed by a signal: amber puts the shell's terminal settings back", async () => {
  const bin = await buildC("rawkeys");
  await inPane(async (t, dir) => {
    const out = `${dir}/keys.txt`;
    const tty = (await t.run("display", "-p", "-t", "t", "#{pane_tty}")).trim();
    await t.command(`${bin} ${out}`);
    await waitForLine(out, (l) => l.includes("ready"));
    const pid = await t.job("rawkeys");
    await dumpAndRestoreInPane(t, dir, pid);
    assert.match(await stty(tty, "-a"), /-icanon/, "the restored job's terminal is not raw");
    Deno.kill(pid, "SIGKILL");
    await t.waitPrompt(128 + 9, "the killed job");
    // At its prompt the shell's readline has its own mode (-icanon -echo), made from what it
    // found: rawkeys' -isig -ixon would have stayed.
    const modes = await stty(tty, "-a");
    assert.doesNotMatch(modes, /-isig|-ixon/, `the shell's settings: ${modes}`);
  });
});

Deno.test("cooked-mode job (cat) restored in its pane: lines echo, Ctrl-C ends it, amber exits 130", async () => {
  await inPane(async (t, dir) => {
    await t.command("cat");
    const pid = await t.job("cat");
    const amberPid = await dumpAndRestoreInPane(t, dir, pid);
    await catWritesBack(t, "hello there");
    await t.keys("C-c");
    await t.waitPrompt(130, "cat ended by Ctrl-C");
    await waitVanished([pid, amberPid]);
  });
});

Deno.test("vim restored in its pane: redraws, Ctrl-Z stops amber with it, fg continues both, :wq writes", async () => {
  await inPane(async (t, dir) => {
    const file = `${dir}/f.txt`;
    await Deno.writeTextFile(file, "alpha\nbeta\n");
    await t.command(`vim -u NONE -i NONE -N ${file}`);
    await t.waitScreen((l) => l[0] === "alpha" && l[1] === "beta", "vim's screen");
    const pid = await t.job("vim");

    const amberPid = await dumpAndRestoreInPane(t, dir, pid);
    await t.waitScreen((l) => l[0] === "alpha" && l[1] === "beta", "vim's redrawn screen");

    // Ctrl-Z: the job stops, and so does amber, so the shell shows it stopped.
    await t.keys("C-z");
    await until(() => procState(pid) === "T" && procState(amberPid) === "T", "vim and amber stop");
    await t.waitScreen((l) => l.some((x) => x.includes("Stopped")), "the shell's Stopped line");
    await t.waitPrompt(128 + 20, "the shell's prompt after Ctrl-Z");
    const shell = await t.panePid();
    assert.equal(
      tpgid(shell),
      shell,
      "the shell does not have the terminal while the job is stopped",
    );

    await t.command("fg");
    await until(
      () => procState(pid) === "S" && tpgid(pid) === pid,
      "vim runs in the foreground again",
    );
    await t.waitScreen((l) => l[0] === "alpha" && l[1] === "beta", "vim's screen after fg");
    await t.type("ggOnew line");
    await t.keys("Escape");
    await t.command(":wq");
    await t.waitPrompt(0, "vim quit");
    assert.equal(await Deno.readTextFile(file), "new line\nalpha\nbeta\n", "the file vim wrote");
    await waitVanished([pid, amberPid]);
  });
});

Deno.test("less restored in its pane: redraws, G moves at once, q quits", async () => {
  await inPane(async (t, dir) => {
    const file = `${dir}/nums.txt`;
    await Deno.writeTextFile(
      file,
      Array.from({ length: 200 }, (_, i) => `n${i + 1}`).join("\n") + "\n",
    );
    await t.command(`less ${file}`);
    await t.waitScreen((l) => l[0] === "n1", "less's first page");
    const pid = await t.job("less");

    await dumpAndRestoreInPane(t, dir, pid);
    await t.waitScreen((l) => l[0] === "n1" && l[1] === "n2", "less's redrawn page");
    await t.type("G");
    await t.waitScreen((l) => l.includes("n200"), "less at the end");
    await t.type("q");
    await t.waitPrompt(0, "less quit");
  });
});

Deno.test("vim restored in a pane resized since the dump redraws at the new size", async () => {
  await inPane(async (t, dir) => {
    const file = `${dir}/f.txt`;
    await Deno.writeTextFile(file, "alpha\nbeta\n");
    await t.command(`vim -u NONE -i NONE -N ${file}`);
    await t.waitScreen((l) => l[0] === "alpha", "vim's screen");
    const pid = await t.job("vim");

    await dumpAndRestoreInPane(t, dir, pid, async () => {
      await t.run("resize-window", "-t", "t", "-x", "100", "-y", "30");
      assert.equal(
        (await t.run("display", "-p", "-t", "t", "#{pane_width}x#{pane_height}")).trim(),
        "100x30",
      );
    });
    await t.waitScreen((l) => l[0] === "alpha", "vim's redrawn screen");
    await t.command(":echo &columns &lines");
    await t.waitScreen((l) => l.length >= 30 && l[29] === "100 30", "vim's size, on its last line");
    await t.command(":q");
    await t.waitPrompt(0, "vim quit");
  });
});

// ---------------------------------------------------------------------------
// ptys inside the tree

/** `stty -F DEV ARGS...` (coreutils): reads or sets a terminal from outside. */
async function stty(dev: string, ...args: string[]): Promise<string> {
  const r = await new Deno.Command("stty", { args: ["-F", dev, ...args], stdout: "piped" })
    .output();
  assert.ok(r.success, `stty -F ${dev} ${args.join(" ")} failed`);
  return new TextDecoder().decode(r.stdout).trim();
}

function fdLink(pid: number, fd: number): string {
  return Deno.readLinkSync(`/proc/${pid}/fd/${fd}`);
}

/** The pty index of pid's /dev/ptmx descriptor `fd` (fdinfo tty-index). */
function ptyIndex(pid: number, fd: number): number {
  const info = Deno.readTextFileSync(`/proc/${pid}/fdinfo/${fd}`);
  return Number(/^tty-index:\s*(\d+)$/m.exec(info)?.[1]);
}

Deno.test("script -qfc CMD (a pty pair inside the tree) dumped and restored -d keeps running on the same pty", async () => {
  await using tmp = await tempDir();
  const ts = `${tmp.path}/typescript`;
  // CMD writes through /dev/tty, its controlling terminal: the pty's slave.
  const cmd = `exec 7<>/dev/tty; i=0; while :; do echo "line $i" >&7; i=$((i+1)); ` +
    `read -t 0.05 -u 7; done`;
  const target = spawnTarget(["setsid", "script", "-qfc", cmd, ts], {
    env: { SHELL: "/bin/bash", PATH: "/usr/bin:/bin" },
  });
  const script = target.pid;
  try {
    let job = 0;
    await until(() => {
      job = childrenOf(script)[0] ?? 0;
      return job !== 0 && /^\/dev\/pts\/\d+$/.test(fdLink(job, 1)) && exists7(job);
    }, "script's child does not run on the pty");
    const slave = fdLink(job, 1);
    const index = Number(slave.slice("/dev/pts/".length));
    const master = [...Deno.readDirSync(`/proc/${script}/fd`)].map((e) => Number(e.name))
      .find((fd) => fdLink(script, fd) === "/dev/ptmx")!;
    assert.equal(ptyIndex(script, master), index, "test bug: script's master");
    // Settings of its own, to be found again after the restore.
    await stty(slave, "rows", "33", "cols", "77", "-echo", "intr", "^K");
    const settings = await stty(slave, "-g");
    const before = { job: procStatFields(job), lines: (await Deno.readTextFile(ts)).length };
    await waitForText(ts, before.lines + 1);

    const img = `${tmp.path}/img`;
    // Lines in flight (written to /dev/tty, not read by script yet) are kept.
    assertExit(await amber(dumpArgs(script, img)), 0, "dump");
    await waitVanished([script, job]);
    const dumpedText = await Deno.readTextFile(ts);
    const last = Math.max(...[...dumpedText.matchAll(/line (\d+)/g)].map((m) => Number(m[1])));

    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore -d");
    assert.ok(isAlive(script) && isAlive(job), "script and its child are not back");
    assert.equal(fdLink(job, 1), slave, "the child's terminal is another pty");
    assert.equal(fdLink(job, 7), "/dev/tty", "fd 7 is not /dev/tty");
    assert.equal(fdLink(script, master), "/dev/ptmx", "script's master fd");
    assert.equal(ptyIndex(script, master), index, "the master's index");
    const now = procStatFields(job);
    // sid, tty_nr (controlling terminal) and tpgid (its foreground group).
    assert.deepEqual([now[2], now[3], now[4], now[5]], [
      before.job[2],
      before.job[3],
      before.job[4],
      before.job[5],
    ], "the child's group, session, controlling terminal and foreground group");
    assert.equal(await stty(slave, "-g"), settings, "the pty's termios");
    assert.equal(await stty(slave, "size"), "33 77", "the pty's window size");
    // What the child writes to /dev/tty goes through the pty to script again.
    await waitForLine(ts, (l) => l.some((x) => /^line (\d+)/.exec(x)?.[1] === `${last + 5}`));
    // None lost, none twice: what was in the pty at the dump came out after the restore.
    const numbers = [...(await Deno.readTextFile(ts)).matchAll(/line (\d+)/g)].map((m) =>
      Number(m[1])
    );
    assert.deepEqual(numbers, numbers.map((_, i) => i), "the lines script got through the pty");
  } finally {
    await killTree(script);
  }
});

function exists7(pid: number): boolean {
  try {
    return fdLink(pid, 7) === "/dev/tty";
  } catch {
    return false;
  }
}

async function waitForText(file: string, longerThan: number): Promise<void> {
  await until(() => {
    try {
      return Deno.readTextFileSync(file).length > longerThan;
    } catch {
      return false;
    }
  }, `${file} does not grow`);
}

Deno.test("a tmux server with two panes dumped and restored -d: its panes run on, and tmux attach works", async () => {
  assert.ok(await commandWorks("tmux", "-V"), "these tests need tmux (Debian package tmux)");
  await using tmp = await tempDir();
  const inner = new Tmux(tmp.path, "inner"), outer = new Tmux(tmp.path, "outer");
  try {
    await inner.start();
    await inner.run("split-window", "-t", "t", inner.shell);
    const panes = async () =>
      await inner.run("list-panes", "-t", "t", "-F", "#{pane_pid} #{pane_tty}");
    const before = await panes();
    assert.equal(before.trim().split("\n").length, 2, "test bug: two panes");
    for (const pane of ["t.0", "t.1"]) {
      await inner.run("send-keys", "-t", pane, "-l", `echo ${pane} before $((6*7))`);
      await inner.run("send-keys", "-t", pane, "Enter");
      await inner.waitScreen((l) => l.includes(`${pane} before 42`), pane, 20_000, pane);
    }

    await dumpRestoreServer(inner, `${tmp.path}/img`);
    // Its listening socket came back: a new client gets the same panes, on the same ptys.
    assert.equal(await panes(), before, "the panes' shells and ptys");
    for (const pane of ["t.0", "t.1"]) {
      await inner.run("send-keys", "-t", pane, "-l", `echo ${pane} after $((6*7))`);
      await inner.run("send-keys", "-t", pane, "Enter");
      await inner.waitScreen((l) => l.includes(`${pane} after 42`), pane, 20_000, pane);
    }

    // A person attaches to it from another terminal (a pane of another tmux).
    await outer.start();
    await outer.command(`tmux -S ${shellQuote(inner.socket)} attach -t t`);
    await outer.waitScreen(
      (l) => l.some((x) => x.includes("t.0 after 42")),
      "the attached session",
    );
    assert.match(await inner.run("list-clients"), /\S/, "no client attached");
  } finally {
    await outer.close();
    await inner.close();
  }
});

for (const how of ["kill", "-R"] as const) {
  Deno.test(
    `a tmux server inside the tree, a pane running cat: a half-typed line survives dump${
      how === "-R" ? " -R" : " and restore"
    }`,
    async () => {
      assert.ok(await commandWorks("tmux", "-V"), "these tests need tmux (Debian package tmux)");
      await using tmp = await tempDir();
      const inner = new Tmux(tmp.path, "inner");
      try {
        await inner.start();
        // cat is the pane's own process, the leader of the pty's session.
        await inner.run("split-window", "-t", "t", "cat");
        const cat = Number(await inner.run("display", "-p", "-t", "t.1", "#{pane_pid}"));
        await until(() => comm(cat) === "cat", "the pane does not run cat");
        // Typed into the pane's pty and echoed, but no line yet: cat has read nothing.
        await inner.run("send-keys", "-t", "t.1", "-l", "half typed");
        await inner.waitScreen((l) => l.includes("half typed"), "the partial line", 20_000, "t.1");
        const tree = descendants(inner.server);
        const img = `${tmp.path}/img`;
        const extra = how === "-R" ? ["-R"] : [];
        assertExit(await amber(dumpArgs(inner.server, img, ...extra)), 0, "dump");
        if (how === "kill") {
          await waitVanished(tree);
          assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore -d");
        }
        assert.ok(isAlive(cat), "cat is not running");
        await inner.run("send-keys", "-t", "t.1", "-l", ", then the rest");
        await inner.run("send-keys", "-t", "t.1", "Enter");
        // Echoed as typed, then written back by cat, which read the whole line.
        await inner.waitScreen(
          (l) => l.filter((x) => x === "half typed, then the rest").length === 2,
          "the line echoed and written back by cat",
          20_000,
          "t.1",
        );
      } finally {
        await inner.close();
      }
    },
  );
}

Deno.test("a tmux server inside the tree, cat in the foreground of a pane's shell: keys reach cat after restore -d, Ctrl-C ends it and the shell prompts", async () => {
  assert.ok(await commandWorks("tmux", "-V"), "these tests need tmux (Debian package tmux)");
  await using tmp = await tempDir();
  const inner = new Tmux(tmp.path, "inner");
  try {
    await inner.start();
    // cat is a job of the pane's shell: a member of the pty's session, in its own group.
    await inner.command("cat");
    const cat = await inner.job("cat");
    const shell = await inner.panePid();
    await until(() => tpgid(cat) === pgid(cat), "cat is not in the pane's foreground");
    await catWritesBack(inner, "before dump");
    const before = procStatFields(cat);
    await dumpRestoreServer(inner, `${tmp.path}/img`);
    const now = procStatFields(cat);
    // Its group, session, controlling terminal and the terminal's foreground group.
    assert.deepEqual(now.slice(2, 6), before.slice(2, 6), "cat's group, session and terminal");
    assert.notEqual(pgid(cat), pgid(shell), "cat is in its shell's group");
    // Typed keys reach cat.
    await catWritesBack(inner, "after restore");
    // Ctrl-C is the pty's interrupt: it ends cat, its shell takes the terminal back.
    await inner.keys("C-c");
    await inner.waitPrompt(130, "cat ended by Ctrl-C");
    await waitVanished([cat]);
    await inner.command("echo shell $((6*7))");
    await inner.waitScreen((l) => l.includes("shell 42"), "the shell's next command");
    assert.equal(tpgid(shell), pgid(shell), "the shell is not in the foreground again");
  } finally {
    await inner.close();
  }
});

Deno.test("a tmux server inside the tree, vim in the foreground of a pane's shell: after restore -d it takes keys at once and :wq writes the file", async () => {
  assert.ok(await commandWorks("tmux", "-V"), "these tests need tmux (Debian package tmux)");
  assert.ok(await commandWorks("vim", "--version"), "this test needs vim (Debian package vim)");
  await using tmp = await tempDir();
  const inner = new Tmux(tmp.path, "inner");
  const file = `${tmp.path}/note.txt`;
  try {
    await inner.start();
    await inner.command(`vim -u NONE -N -n ${shellQuote(file)}`);
    const vim = await inner.job("vim");
    await until(() => tpgid(vim) === pgid(vim), "vim is not in the pane's foreground");
    await inner.type("ibefore dump");
    await inner.keys("Escape");
    await inner.waitScreen((l) => l[0] === "before dump", "vim's buffer");
    await dumpRestoreServer(inner, `${tmp.path}/img`);
    // Raw mode came back: each key reaches vim without Enter.
    await inner.type("A, after restore");
    await inner.keys("Escape");
    await inner.waitScreen((l) => l[0] === "before dump, after restore", "the keys typed to vim");
    await inner.command(":wq");
    await inner.waitPrompt(0, "vim ended by :wq");
    assert.equal(
      await Deno.readTextFile(file),
      "before dump, after restore\n",
      "the file vim wrote",
    );
  } finally {
    await inner.close();
  }
});

/** A pane's program that reads its terminal only once DIR/go appears, logging each read (JSON). */
const PY_PANE_READER = `
import json, os, sys, time
d = sys.argv[1]
open(d + "/reader.ready", "w").close()
while not os.path.exists(d + "/go"):
    time.sleep(0.02)
with open(d + "/reads.txt", "a") as log:
    while True:
        log.write(json.dumps(os.read(0, 4096).decode()) + "\\n")
        log.flush()
`;

for (const how of ["kill", "-R"] as const) {
  Deno.test(
    `a tmux pane's program that has read nothing yet gets a typed line and a half-typed one after dump${
      how === "-R" ? " -R" : " and restore"
    }`,
    async () => {
      assert.ok(await commandWorks("tmux", "-V"), "these tests need tmux (Debian package tmux)");
      await using tmp = await tempDir();
      const dir = tmp.path;
      const inner = new Tmux(dir, "inner");
      try {
        await inner.start();
        // Given as separate words, tmux runs the program itself: it leads the pane's session.
        await inner.run("split-window", "-t", "t", "python3", "-c", PY_PANE_READER, dir);
        await until(() => exists(`${dir}/reader.ready`), "the pane's program did not start");
        await inner.run("send-keys", "-t", "t.1", "-l", "first line");
        await inner.run("send-keys", "-t", "t.1", "Enter");
        await inner.run("send-keys", "-t", "t.1", "-l", "half typed");
        await inner.waitScreen((l) => l.includes("half typed"), "the typing", 20_000, "t.1");
        const tree = descendants(inner.server);
        const img = `${dir}/img`;
        const extra = how === "-R" ? ["-R"] : [];
        assertExit(await amber(dumpArgs(inner.server, img, ...extra)), 0, "dump");
        if (how === "kill") {
          await waitVanished(tree);
          assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore -d");
        }
        await Deno.writeTextFile(`${dir}/go`, "");
        await waitForLines(`${dir}/reads.txt`, 1, 20_000);
        await inner.run("send-keys", "-t", "t.1", "-l", ", then the rest");
        await inner.run("send-keys", "-t", "t.1", "Enter");
        const reads = (await waitForLines(`${dir}/reads.txt`, 2, 20_000)).map((l) => JSON.parse(l));
        assert.deepEqual(reads, ["first line\n", "half typed, then the rest\n"], "the reads");
      } finally {
        await inner.close();
      }
    },
  );
}

// ---------------------------------------------------------------------------
// refusals

const PY_PTY = `
import fcntl, os, struct, sys, termios, time
m, s = os.openpty()
mode = sys.argv[1]
if mode == "extproc":
    t = termios.tcgetattr(s)
    t[3] |= 0o200000
    termios.tcsetattr(s, termios.TCSANOW, t)
    os.write(m, b"typed\\n")
elif mode == "packet status":
    fcntl.ioctl(m, termios.TIOCPKT, struct.pack("i", 1))
    t = termios.tcgetattr(s)
    t[0] &= ~termios.IXON
    termios.tcsetattr(s, termios.TCSANOW, t)
elif mode == "packet flow":
    fcntl.ioctl(m, termios.TIOCPKT, struct.pack("i", 1))
    t = termios.tcgetattr(s)
    t[3] &= ~termios.ICANON
    termios.tcsetattr(s, termios.TCSANOW, t)
    os.write(m, b"typed")
elif mode == "async":
    fcntl.fcntl(s, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(s, fcntl.F_SETFL, fcntl.fcntl(s, fcntl.F_GETFL) | os.O_ASYNC)
os.open("/dev/null", os.O_RDONLY)
time.sleep(600)
`;

/**
 * A python3 holding a pty pair (fds 3 and 4), in `mode`: "extproc" leaves
 * bytes typed under EXTPROC, "packet status" a packet-mode status byte,
 * unread; "async" puts its slave in O_ASYNC mode; "packet flow" types on
 * a non-canonical slave with IXON whose master is in packet mode. Its fd 5 says it is ready.
 */
async function startPtyHolder(mode: string): Promise<{ pid: number; slave: string }> {
  const t = spawnTarget(["setsid", "python3", "-c", PY_PTY, mode]);
  let slave = "";
  await until(() => {
    try {
      slave = fdLink(t.pid, 4);
      return SLAVE_RE.test(slave) && fdLink(t.pid, 5) === "/dev/null";
    } catch {
      return false;
    }
  }, "python3 does not hold its pty");
  return { pid: t.pid, slave };
}

Deno.test("pty state amber cannot keep exactly (EXTPROC, a packet status byte, O_ASYNC, IXON in packet mode) is refused, named, the tree left running", async () => {
  await using tmp = await tempDir();
  for (
    const [mode, said] of [
      [
        "extproc",
        /fd 4: pty \d+: 6 bytes typed on its master side and not read yet would be lost: with EXTPROC on/,
      ],
      [
        "packet status",
        /fd 3: pty \d+: packet mode with a status byte its master's holder has not read/,
      ],
      ["async", /fd 4: pty \d+: O_ASYNC \(signal-driven I\/O\): not supported yet/],
      [
        "packet flow",
        /fd 4: pty \d+: 5 bytes typed on its master side and not read yet would be lost: in packet mode with IXON/,
      ],
    ] as const
  ) {
    const { pid } = await startPtyHolder(mode);
    try {
      const img = `${tmp.path}/img-${mode}`;
      const msg = assertOneLineError(await amber(dumpArgs(pid, img)), 1, `dump (${mode})`);
      assert.match(msg, said, `dump (${mode}): ${msg}`);
      assert.ok(isAlive(pid), `the refused dump (${mode}) ended the tree`);
      assert.ok(!exists(img), `the refused dump (${mode}) left images`);
    } finally {
      await killAndReap(pid);
    }
  }
});

const SLAVE_RE = /^\/dev\/pts\/\d+$/;

/**
 * A pty pair of its own: the parent holds the master and "types" into it
 * what the test puts in DIR/type.N, and reads what the slave side wrote
 * only when DIR/drain appears (into DIR/output.json). The child holds the
 * slave (canonical, or raw), writes a line to it, and once DIR/go appears
 * logs each read of the slave, one JSON array of bytes a line, to
 * DIR/reads.txt.
 */
const PY_TYPIST = `
import json, os, sys, termios, time, tty
d, mode = sys.argv[1], sys.argv[2]
m, s = os.openpty()
if os.fork() == 0:
    os.close(m)
    if mode != "canonical":
        tty.setraw(s)
    if mode == "raw, VMIN 0":
        t = termios.tcgetattr(s)
        t[6][termios.VMIN] = t[6][termios.VTIME] = 0
        termios.tcsetattr(s, termios.TCSANOW, t)
    os.write(s, b"hello from the slave\\n")
    open(d + "/child.ready", "w").close()
    while not os.path.exists(d + "/go"):
        time.sleep(0.02)
    with open(d + "/reads.txt", "a") as log:
        while True:
            b = os.read(s, 4096)
            if b or mode == "canonical":  # VMIN 0 reads 0 bytes when there are none
                log.write(json.dumps(list(b)) + "\\n")
                log.flush()
            else:
                time.sleep(0.01)
os.close(s)
n = 0
while True:
    if os.path.exists(f"{d}/type.{n}"):
        with open(f"{d}/type.{n}", "rb") as f:
            os.write(m, f.read())
        open(f"{d}/typed.{n}", "w").close()
        n += 1
    elif os.path.exists(d + "/drain"):
        os.set_blocking(m, False)
        out = b""
        try:
            while True:
                out += os.read(m, 4096)
        except BlockingIOError:
            pass
        with open(d + "/output.tmp", "w") as f:
            f.write(json.dumps(list(out)))
        os.rename(d + "/output.tmp", d + "/output.json")
        time.sleep(600)
    time.sleep(0.02)
`;

/** What is typed before the dump, the reads the slave's reader must get, what is typed after. */
const TYPING = {
  // Canonical: a line, one ended by ^D, an empty one (^D alone), and a partial line with a
  // ^V-quoted ^C in it and a ^V still pending at its end: after restore the ^C typed first is
  // taken literally (a lost ^V would make it flush the queue, ISIG being on).
  canonical: {
    before: "first line\nab\x04\x04par\x16\x03tial\x16",
    reads: ["first line\n", "ab", ""],
    after: "\x03rest\n",
    last: "par\x03tial\x03rest\n",
  },
  // Raw: the bytes as they are, control characters included.
  raw: {
    before: "abc\x03\x16def\n\x7f",
    reads: ["abc\x03\x16def\n\x7f"],
    after: "ghi",
    last: "ghi",
  },
  // Raw with VMIN and VTIME 0: a read finding nothing returns 0 bytes at once.
  "raw, VMIN 0": { before: "abc\x04\n", reads: ["abc\x04\n"], after: "ghi", last: "ghi" },
};

const bytesOf = (s: string) => [...new TextEncoder().encode(s)];

/** Puts `text` in DIR/type.N for the parent to type, and waits until it has. */
async function typeInto(dir: string, n: number, text: string): Promise<void> {
  await Deno.writeFile(`${dir}/type.tmp`, new TextEncoder().encode(text));
  await Deno.rename(`${dir}/type.tmp`, `${dir}/type.${n}`);
  await until(() => exists(`${dir}/typed.${n}`), `the parent did not type ${JSON.stringify(text)}`);
}

async function readsOf(dir: string, n: number): Promise<number[][]> {
  return (await waitForLines(`${dir}/reads.txt`, n, 20_000)).map((l) => JSON.parse(l));
}

/**
 * Types into the pty, then dumps (`how`: not at all, a killing dump and a
 * restore, or dump -R), types the rest, and returns the reads the slave's
 * reader made and the bytes the master's holder read afterwards.
 */
async function typeAcrossDump(
  mode: keyof typeof TYPING,
  how: "none" | "kill" | "-R",
  tmp: string,
): Promise<{ reads: number[][]; output: number[] }> {
  const dir = `${tmp}/${mode}-${how}`;
  await Deno.mkdir(dir);
  const t = TYPING[mode];
  const target = spawnTarget(["setsid", "python3", "-c", PY_TYPIST, dir, mode]);
  try {
    await until(() => exists(`${dir}/child.ready`), "the child did not start");
    await typeInto(dir, 0, t.before);
    const pids = [target.pid, ...childrenOf(target.pid)];
    const img = `${dir}/img`;
    if (how === "kill") {
      assertExit(await amber(dumpArgs(target.pid, img)), 0, `${mode}: dump`);
      await waitVanished(pids);
      assertExit(await amber(["restore", "-D", img, "-d"]), 0, `${mode}: restore -d`);
    } else if (how === "-R") {
      assertExit(await amber(dumpArgs(target.pid, img, "-R")), 0, `${mode}: dump -R`);
    }
    assert.ok(pids.every(isAlive), `${mode} ${how}: the tree does not run`);
    await Deno.writeTextFile(`${dir}/go`, "");
    await readsOf(dir, t.reads.length);
    await typeInto(dir, 1, t.after);
    const reads = await readsOf(dir, t.reads.length + 1);
    await Deno.writeTextFile(`${dir}/drain`, "");
    await until(() => exists(`${dir}/output.json`), "the parent did not read its master");
    return { reads, output: JSON.parse(await Deno.readTextFile(`${dir}/output.json`)) };
  } finally {
    await killTree(target.pid);
  }
}

for (const mode of ["canonical", "raw", "raw, VMIN 0"] as const) {
  Deno.test(`pty bytes not read yet (${mode} slave, a partial line too) are kept: by dump and restore, and by dump -R`, async () => {
    await using tmp = await tempDir();
    const t = TYPING[mode];
    // The same typing, never dumped: what the master's holder reads then (echoes included).
    const control = await typeAcrossDump(mode, "none", tmp.path);
    const hello = mode === "canonical" ? "hello from the slave\r\n" : "hello from the slave\n";
    assert.deepEqual(
      control.output.slice(0, hello.length),
      bytesOf(hello),
      "test bug: the slave's line",
    );
    for (const how of ["kill", "-R"] as const) {
      const got = await typeAcrossDump(mode, how, tmp.path);
      assert.deepEqual(
        got.reads,
        [...t.reads, t.last].map(bytesOf),
        `${how}: the slave's reader read what was typed, line by line`,
      );
      assert.deepEqual(got.output, control.output, `${how}: what the master's holder read`);
    }
  });
}

Deno.test("bytes a pty's slave wrote before it was closed are kept: the master's holder reads them after restore", async () => {
  await using tmp = await tempDir();
  const dir = tmp.path;
  const py = `
import os, sys, time
d = sys.argv[1]
m, s = os.openpty()
os.write(s, b"left by the slave\\n")
os.close(s)
open(d + "/ready", "w").close()
while not os.path.exists(d + "/go"):
    time.sleep(0.02)
os.set_blocking(m, False)
out = b""
try:
    while True:
        out += os.read(m, 4096)
except OSError:  # EAGAIN, or EIO: the slave is closed
    pass
with open(d + "/out.tmp", "wb") as f:
    f.write(out)
os.rename(d + "/out.tmp", d + "/out")
time.sleep(600)
`;
  const { pid } = spawnTarget(["setsid", "python3", "-c", py, dir]);
  try {
    await until(() => exists(`${dir}/ready`), "python3 did not start");
    assertExit(await amber(dumpArgs(pid, `${dir}/img`)), 0, "dump");
    await waitVanished([pid]);
    assertExit(await amber(["restore", "-D", `${dir}/img`, "-d"]), 0, "restore -d");
    await Deno.writeTextFile(`${dir}/go`, "");
    await until(() => exists(`${dir}/out`), "python3 did not read its master");
    assert.equal(await Deno.readTextFile(`${dir}/out`), "left by the slave\r\n");
  } finally {
    await killAndReap(pid);
  }
});

/**
 * A pty whose slave side wrote until the pty took no more (the master's
 * buffer full, the rest in its flip buffer) and whose master's holder has
 * read nothing; once DIR/go appears it reads everything and writes to
 * DIR/result whether it got exactly the bytes written (ONLCR applied).
 */
const PY_FULL = `
import os, sys, time
d = sys.argv[1]
m, s = os.openpty()
os.set_blocking(s, False)
sent, i = b"", 0
while True:
    line = b"line %d\\n" % i
    try:
        n = os.write(s, line)
    except BlockingIOError:
        break
    sent += line[:n]
    i += 1
with open(d + "/sent.tmp", "w") as f:
    f.write(str(len(sent)))
os.rename(d + "/sent.tmp", d + "/sent")
while not os.path.exists(d + "/go"):
    time.sleep(0.02)
want = sent.replace(b"\\n", b"\\r\\n")
got = b""
os.set_blocking(m, False)
deadline = time.time() + 20
while len(got) < len(want) and time.time() < deadline:
    try:
        got += os.read(m, 65536)
    except BlockingIOError:
        time.sleep(0.01)
with open(d + "/result.tmp", "w") as f:
    f.write("ok" if got == want else "got %d bytes, wanted %d" % (len(got), len(want)))
os.rename(d + "/result.tmp", d + "/result")
time.sleep(600)
`;

Deno.test("a pty whose master's buffer is full is refused, named, its bytes all left in place", async () => {
  await using tmp = await tempDir();
  const dir = tmp.path;
  const { pid } = spawnTarget(["setsid", "python3", "-c", PY_FULL, dir]);
  try {
    await until(() => exists(`${dir}/sent`), "python3 did not fill its pty");
    const sent = Number(await Deno.readTextFile(`${dir}/sent`));
    assert.ok(sent > 8192, `test bug: only ${sent} bytes went into the pty`);
    const said =
      /fd 3: pty \d+: 4095 bytes written on its slave side and not read yet would be lost: its buffer is full/;
    const img = `${dir}/img`;
    assert.match(assertOneLineError(await amber(dumpArgs(pid, img)), 1, "dump"), said);
    // dump -R keeps the tree running and writes images that restore refuses.
    assertExit(await amber(dumpArgs(pid, img, "-R")), 0, "dump -R");
    const r = await amber(["restore", "-D", img, "-d"]);
    assert.match(assertOneLineError(r, 1, "restore of the dump -R images"), said);
    assert.ok(isAlive(pid), "the refused dump ended the tree");
    await Deno.writeTextFile(`${dir}/go`, "");
    await until(() => exists(`${dir}/result`), "python3 did not read its master", 30_000);
    assert.equal(await Deno.readTextFile(`${dir}/result`), "ok", `${sent} bytes written`);
  } finally {
    await killAndReap(pid);
  }
});

Deno.test("a pty whose index is taken at restore: refused clearly, nothing left; restored once it is free", async () => {
  await using tmp = await tempDir();
  const { pid, slave } = await startPtyHolder("quiet");
  const index = Number(slave.slice("/dev/pts/".length));
  const img = `${tmp.path}/img`;
  let holder = 0;
  try {
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    await waitVanished([pid]);
    // Someone else's pty now has that number.
    const take = `
import fcntl, os, struct, time
held = []
while True:
    fd = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
    held.append(fd)
    if struct.unpack("i", fcntl.ioctl(fd, 0x80045430, b"0000"))[0] >= ${index}:
        break
time.sleep(600)
`;
    holder = spawnTarget(["python3", "-c", take]).pid;
    await until(() => exists(slave), `${slave} is not taken`);
    const before = childrenWithState();
    const msg = assertOneLineError(await amber(["restore", "-D", img, "-d"]), 1, "restore");
    assert.ok(msg.includes(`pty ${index}: ${slave} is in use`), `restore: ${msg}`);
    assert.equal(procState(pid), null, "the refused restore left the process");
    assertLeftNothing(before, "the refused restore");

    await killAndReap(holder);
    holder = 0;
    await until(() => !exists(slave), `${slave} is not free again`);
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore once it is free");
    assert.equal(fdLink(pid, 4), slave, "the restored slave");
  } finally {
    if (holder) await killAndReap(holder);
    await killAndReap(pid);
  }
});

Deno.test("consoles, virtual consoles and serial lines are refused, named", async () => {
  await using tmp = await tempDir();
  const devices = [
    ["/dev/console", "console"],
    ["/dev/tty1", "virtual console"],
    ["/dev/ttyS0", "serial line"],
  ].filter(([dev]) => exists(dev));
  assert.ok(devices.length > 0, "this machine has none of the devices (test bug)");
  for (const [dev, kind] of devices) {
    const hold = `import os, time; os.open("${dev}", os.O_RDWR | os.O_NOCTTY); time.sleep(600)`;
    const pid = spawnTarget(["python3", "-c", hold]).pid;
    try {
      await until(() => {
        try {
          return fdLink(pid, 3) === dev;
        } catch {
          return false;
        }
      }, `python3 does not hold ${dev}`);
      const img = `${tmp.path}/img`;
      const r = await amber(dumpArgs(pid, img, "--shell-job"));
      const msg = assertOneLineError(r, 1, `dump holding ${dev}`);
      assert.ok(msg.includes(`fd 3: ${dev} is a ${kind}: not supported`), msg);
      assert.ok(isAlive(pid), `the refused dump (${dev}) ended the process`);
    } finally {
      await killAndReap(pid);
    }
  }
});

Deno.test("a pty's session leader that holds no descriptor on it is refused, named", async () => {
  await using tmp = await tempDir();
  // The child makes the slave its controlling terminal, then closes it.
  const py = `
import fcntl, os, termios, time
m, s = os.openpty()
if os.fork() == 0:
    os.setsid()
    fcntl.ioctl(s, termios.TIOCSCTTY, 0)
    os.close(s)
    os.close(m)
    time.sleep(600)
os.close(s)
time.sleep(600)
`;
  const t = spawnTarget(["setsid", "python3", "-c", py]);
  try {
    let child = 0;
    await until(() => {
      child = childrenOf(t.pid)[0] ?? 0;
      return child !== 0 && Number(procStatFields(child)[3]) === child &&
        Number(procStatFields(child)[4]) !== 0;
    }, "the child has no controlling terminal");
    const img = `${tmp.path}/img`;
    const msg = assertOneLineError(await amber(dumpArgs(t.pid, img)), 1, "dump");
    assert.match(
      msg,
      new RegExp(
        `pty \\d+: its session leader ${child} holds no descriptor on it: not supported yet`,
      ),
    );
    assert.ok(isAlive(t.pid) && isAlive(child), "the refused dump ended the tree");
  } finally {
    await killTree(t.pid);
  }
});
