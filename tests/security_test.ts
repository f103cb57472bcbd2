/**
 * Images and the images directory handled safely (issue 7): restore and
 * show refuse images another user could have written, links, special and
 * oversized files, and references that point outside the images; dump
 * writes only into a directory of its own, through no planted link, and
 * never destroys an earlier complete image; strings from images are
 * printed escaped; the restore helper cannot outlive amber.
 *
 * Each refusal is checked for its text, exit code 1, nothing changed
 * outside the images directory, and no process left behind.
 */
import assert from "node:assert/strict";
import { decode } from "cbor-x";
import {
  amber,
  assertCounterGoesOn,
  assertExit,
  assertLeftNothing,
  assertNoLiveHelper,
  assertOneLineError,
  childrenWithState,
  CLI,
  DENO,
  dumpArgs,
  dumpKill,
  editPart,
  exists,
  helperProcesses,
  isAlive,
  killAndReap,
  listDir,
  processFile,
  readLines,
  ROOT,
  sleep,
  startCounter,
  tempDir,
  unusedPid,
  waitFor,
  type Writer,
} from "./_util.ts";

const NOBODY = 65534;
/** Control characters other than tab and newline, as a terminal would act on them. */
// deno-lint-ignore no-control-regex
const RAW_CONTROL = /[\x00-\x08\x0b-\x1f\x7f]/;
// deno-lint-ignore no-explicit-any
type Body = any;

/** Copies the files of `from` into a new directory `to`, 0700 like dump makes it. */
async function copyImages(from: string, to: string): Promise<void> {
  await Deno.mkdir(to, { mode: 0o700 });
  for (const name of listDir(from)) await Deno.copyFile(`${from}/${name}`, `${to}/${name}`);
}

/** Everything under `root` except `skip`: name, type, mode, size, mtime, content of small files. */
function snapshot(root: string, skip: string): string[] {
  const out: string[] = [];
  const walk = (dir: string) => {
    for (const e of Deno.readDirSync(dir)) {
      const path = `${dir}/${e.name}`;
      if (path === skip || path.startsWith(`${skip}/`)) continue;
      const st = Deno.lstatSync(path);
      let content = "";
      if (st.isFile && st.size < 4096) content = Deno.readTextFileSync(path);
      if (st.isSymlink) content = Deno.readLinkSync(path);
      out.push(`${path} ${st.mode} ${st.uid} ${st.size} ${st.mtime?.getTime()} ${content}`);
      if (st.isDirectory) walk(path);
    }
  };
  walk(root);
  return out.sort();
}

/** Runs amber under python3 to learn its peak RSS (KiB) from getrusage. */
async function amberMaxRss(args: string[]): Promise<{ code: number; stderr: string; kib: number }> {
  const py = "import resource, subprocess, sys\n" +
    "p = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL, capture_output=True, timeout=120)\n" +
    "sys.stderr.buffer.write(p.stderr)\n" +
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n" +
    "sys.exit(p.returncode)";
  const r = await new Deno.Command("python3", {
    args: ["-c", py, DENO, "run", "-A", CLI, ...args],
    cwd: ROOT,
    env: { NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: r.code, stderr: dec.decode(r.stderr), kib: Number(dec.decode(r.stdout).trim()) };
}

interface Refusal {
  name: string;
  /** Damages a copy of the images in `dir`; may return the directory to pass instead. */
  damage: (dir: string, pid: number, tmp: string) => Promise<string | void>;
  /** Text the one-line message must contain. */
  says: (dir: string, pid: number) => string[];
  /** Whether `show` must refuse it the same way (default: yes). */
  show?: boolean;
}

const REFUSALS: Refusal[] = [
  {
    name: "images directory owned by another user, creds edited to uid 0",
    damage: async (dir, pid) => {
      await editPart(dir, pid, "creds", (b) => {
        for (const k of Object.keys(b)) {
          if (Array.isArray(b[k]) && b[k].length === 4) b[k] = [0, 0, 0, 0];
        }
      });
      for (const name of listDir(dir)) await Deno.chown(`${dir}/${name}`, NOBODY, NOBODY);
      await Deno.chown(dir, NOBODY, NOBODY);
    },
    says: (dir) => [`images directory ${dir}: owned by uid ${NOBODY}, not by uid 0`],
  },
  {
    name: "one image file owned by another user",
    damage: (dir, pid) => Deno.chown(processFile(dir, pid), NOBODY, NOBODY),
    says: (dir, pid) => [`${processFile(dir, pid)}: owned by uid ${NOBODY}, not by uid 0`],
  },
  {
    name: "image file mode 0666",
    damage: (dir, pid) => Deno.chmod(processFile(dir, pid), 0o666),
    says: (dir, pid) => [`${processFile(dir, pid)}: mode 0666 lets others write it`],
  },
  {
    name: "group-writable images directory",
    damage: (dir) => Deno.chmod(dir, 0o770),
    says: (dir) => [`images directory ${dir}: mode 0770 lets others write it`],
  },
  {
    name: "symlinked images directory",
    damage: async (dir, _pid, tmp) => {
      const link = `${tmp}/link-to-images`;
      await Deno.symlink(dir, link);
      return link;
    },
    says: (_dir, _pid) => ["link-to-images: is a symlink; refusing to follow it"],
  },
  {
    name: "symlinked image file",
    damage: async (dir, pid, tmp) => {
      await Deno.rename(processFile(dir, pid), `${tmp}/process-elsewhere.cbor`);
      await Deno.symlink(`${tmp}/process-elsewhere.cbor`, processFile(dir, pid));
    },
    says: (dir, pid) => [`${processFile(dir, pid)}: is a symlink; refusing to follow it`],
  },
  {
    name: "FIFO planted as an image file",
    damage: async (dir, pid) => {
      await Deno.remove(processFile(dir, pid));
      await mkfifo(processFile(dir, pid));
    },
    says: (dir, pid) => [`${processFile(dir, pid)}: a FIFO, not a regular file`],
  },
  {
    name: "symlink to /dev/zero as an image file",
    damage: async (dir, pid) => {
      await Deno.remove(processFile(dir, pid));
      await Deno.symlink("/dev/zero", processFile(dir, pid));
    },
    says: (dir, pid) => [`${processFile(dir, pid)}: is a symlink`],
  },
  {
    name: "/dev/zero's device node as an image file",
    damage: async (dir, pid) => {
      await Deno.remove(processFile(dir, pid));
      await run("mknod", "-m", "600", processFile(dir, pid), "c", "1", "5");
    },
    says: (dir, pid) => [`${processFile(dir, pid)}: a character device, not a regular file`],
  },
  {
    name: "a file per part, as an older amber wrote them",
    damage: async (dir, pid) => {
      const outer = decode(await Deno.readFile(processFile(dir, pid)));
      for (const [part, bytes] of Object.entries(outer.body)) {
        await Deno.writeFile(`${dir}/${part}-${pid}.cbor`, bytes as Uint8Array, { mode: 0o600 });
      }
      await Deno.remove(processFile(dir, pid));
    },
    says: (dir, pid) => [`${processFile(dir, pid)}: missing: the images have a file per part`],
  },
  {
    name: "one part of a process image larger than that part's limit",
    damage: (dir, pid) => editPart(dir, pid, "creds", () => {}, () => new Uint8Array(5 << 20)),
    says: (dir, pid) => [`${processFile(dir, pid)}: creds: ${5 << 20} bytes is larger than`],
  },
  {
    name: "shared-descriptor entry naming a pid outside the tree",
    damage: (dir, pid) =>
      editPart(dir, pid, "fds", (b) => {
        b.shared.push({ fd: b.fds.at(-1).fd, pid: 1, ownerFd: 0 });
      }),
    says: (dir, pid) => [
      `${processFile(dir, pid)}: fds:`,
      "shared with pid 1, which is not in the tree",
    ],
  },
  {
    name: "extra thread that pstree does not list",
    damage: (dir, pid) =>
      editPart(dir, pid, "threads", (b) => {
        b.threads.push({ ...b.threads[0], tid: unusedPid() });
      }),
    says: (dir, pid) => [`${processFile(dir, pid)}: threads:`, "are not pstree's"],
  },
  {
    name: "page run that is not page-aligned",
    damage: (dir, pid) =>
      editPart(dir, pid, "pagemap", (b) => {
        const a = b.runs[0].addr;
        b.runs[0].addr = typeof a === "bigint" ? a + 8n : a + 8;
      }),
    says: (dir, pid) => [`${processFile(dir, pid)}: pagemap:`, "run address is not page-aligned"],
  },
  {
    name: "page run outside every dumped mapping",
    damage: (dir, pid) =>
      editPart(dir, pid, "pagemap", (b) => {
        b.runs[0].addr = 0x1000;
      }),
    says: () => ["pagemap: run 1000..", "is outside any writable mapping"],
    show: false, // a restore check: show prints what the images say
  },
  {
    name: "huge page count",
    damage: (dir, pid) =>
      editPart(dir, pid, "pagemap", (b) => {
        b.runs[0].pages = 2 ** 50;
        b.totalPages = 2 ** 50;
      }),
    says: (dir, pid) => [`${processFile(dir, pid)}: pagemap:`, "runs[0].pages"],
  },
  {
    name: "descriptor entry naming a FIFO",
    damage: async (dir, pid, tmp) => {
      const fifo = `${tmp}/planted-fifo`;
      if (!exists(fifo)) await mkfifo(fifo);
      await editPart(dir, pid, "fds", (b) => {
        const f = b.fds.find((e: Body) => e.kind === "file" && e.type === "regular");
        f.path = fifo;
      });
    },
    says: (_dir, _pid) => ["planted-fifo: now a FIFO or socket, was a regular"],
    show: false,
  },
];

async function run(cmd: string, ...args: string[]): Promise<void> {
  const r = await new Deno.Command(cmd, { args, stdout: "null", stderr: "piped" }).output();
  if (!r.success) {
    throw new Error(`${cmd} ${args.join(" ")}: ${new TextDecoder().decode(r.stderr)}`);
  }
}

function mkfifo(path: string): Promise<void> {
  return run("mkfifo", "-m", "600", path);
}

/** A counter dumped (and so ended): its images, its pid (free again) and its output file. */
async function dumpedCounter(dir: string): Promise<{ img: string; pid: number; out: string }> {
  const { pid, out } = await startCounter(dir, 1);
  const img = `${dir}/img`;
  await dumpKill(pid, [pid], img, "counter");
  return { img, pid, out };
}

Deno.test("restore and show refuse untrusted, special, oversized and inconsistent images", async (t) => {
  await using tmp = await tempDir();
  const { img, pid } = await dumpedCounter(tmp.path);
  await Deno.writeTextFile(`${tmp.path}/victim`, "victim\n");
  try {
    for (const [i, c] of REFUSALS.entries()) {
      await t.step(c.name, async () => {
        const dir = `${tmp.path}/case${i}`;
        await copyImages(img, dir);
        const target = (await c.damage(dir, pid, tmp.path)) ?? dir;
        const outside = snapshot(tmp.path, dir);
        const before = childrenWithState();
        const runs = [["restore", "-D", target, "-d"]];
        if (c.show !== false) runs.push(["show", target]);
        for (const args of runs) {
          const r = await amber(args, {}, 60_000);
          const msg = assertOneLineError(r, 1, `${args[0]} of ${c.name}`);
          for (const s of c.says(dir, pid)) {
            assert.ok(msg.includes(s), `${args[0]}, ${c.name}: no "${s}" in: ${msg}`);
          }
          assert.equal(r.stdout, "", `${args[0]} printed something`);
        }
        assert.ok(!isAlive(pid), `${c.name}: pid ${pid} was restored`);
        assertLeftNothing(before, c.name);
        assert.deepEqual(snapshot(tmp.path, dir), outside, `${c.name}: something outside changed`);
      });
    }
  } finally {
    await killAndReap(pid);
  }
});

Deno.test("a huge sparse image file is refused by its size, without reading it", async () => {
  await using tmp = await tempDir();
  const { img, pid } = await dumpedCounter(tmp.path);
  const file = processFile(img, pid);
  const size = 3 * 1024 * 1024 * 1024;
  await Deno.truncate(file, size);
  for (const args of [["restore", "-D", img, "-d"], ["show", img]]) {
    const r = await amberMaxRss(args);
    assert.equal(r.code, 1, `${args[0]}: exit ${r.code}: ${r.stderr}`);
    assert.ok(
      r.stderr.includes(`${file}: ${size} bytes is larger than its limit of`),
      `${args[0]}: ${r.stderr}`,
    );
    // Reading it would take 3 GiB; Deno itself needs about a tenth of one.
    assert.ok(r.kib < 1024 * 1024, `${args[0]} used ${r.kib} KiB`);
  }
  assert.ok(!isAlive(pid));
});

Deno.test("strings from images are printed escaped, long ones cut", async () => {
  await using tmp = await tempDir();
  const { img, pid } = await dumpedCounter(tmp.path);
  const evil = "/nonexistent/\x1b[2J\x1b]0;owned\x07";
  const long = "A".repeat(1 << 20);
  await editPart(img, pid, "fds", (b) => {
    b.fds.find((e: Body) => e.kind === "file" && e.type === "regular").path = evil + long;
  });
  await editPart(img, pid, "mappings", (b) => {
    const m = b.mappings.find((m: Body) => m.path === "[heap]") ?? b.mappings.at(-1);
    m.path = `[heap]\x1b[2J\r\n${long}`;
  });
  const before = childrenWithState();
  const r = await amber(["restore", "-D", img, "-d"], {}, 60_000);
  const msg = assertOneLineError(r, 1, "restore of an fd path with escapes");
  assert.ok(
    !RAW_CONTROL.test(r.stderr),
    `raw control characters: ${JSON.stringify(msg)}`,
  );
  assert.ok(msg.includes("/nonexistent/\\x1b[2J\\x1b]0;owned\\x07"), msg);
  assert.match(msg, /\.\.\.\(\d{7} characters\)\.\.\./, "the long path is not cut");
  assert.ok(msg.length < 4096, `message of ${msg.length} characters`);
  assertLeftNothing(before, "restore with escapes");

  const s = await amber(["show", img], {}, 60_000);
  assertExit(s, 0, "show");
  assert.ok(!RAW_CONTROL.test(s.stdout), "show printed raw control characters");
  assert.ok(s.stdout.includes("[heap]\\x1b[2J\\x0d\\x0a"), "show does not print the escaped path");
  assert.ok(s.stdout.length < 64 * 1024, `show printed ${s.stdout.length} characters`);
});

// ---------------------------------------------------------------------------
// dump

async function withCounter(body: (c: Writer, dir: string) => Promise<void>): Promise<void> {
  await using tmp = await tempDir();
  const c = await startCounter(tmp.path, 4);
  try {
    await body(c, tmp.path);
  } finally {
    await killAndReap(c.pid);
  }
}

async function assertCounting(c: Writer, what: string): Promise<void> {
  assert.ok(isAlive(c.pid), `${what}: counter died`);
  await assertCounterGoesOn(c.out, (await readLines(c.out)).length, 5, what);
}

Deno.test("dump refuses a directory of another user, and writes through none of its links", () =>
  withCounter(async (c, tmp) => {
    const victim = `${tmp}/victim`;
    await Deno.writeTextFile(victim, "victim\n", { mode: 0o600 });
    const dir = `${tmp}/theirs`;
    await Deno.mkdir(dir, { mode: 0o755 });
    for (
      const n of [
        "inventory.cbor.tmp",
        `pages-${c.pid}.img.tmp`,
        `process-${c.pid}.cbor.tmp`,
        "inventory.cbor",
      ]
    ) {
      await Deno.symlink(victim, `${dir}/${n}`);
    }
    await Deno.chown(dir, NOBODY, NOBODY);
    const outside = snapshot(tmp, `${tmp}/counter.txt`);
    const msg = assertOneLineError(await amber(dumpArgs(c.pid, dir, "-R")), 1, "dump into theirs");
    assert.ok(msg.includes(`images directory ${dir}: owned by uid ${NOBODY}, not by uid 0`), msg);
    assert.deepEqual(snapshot(tmp, `${tmp}/counter.txt`), outside, "dump changed something");
    await assertCounting(c, "after the refused dump");
  }));

Deno.test("dump into its own directory replaces planted links, never writes through them", () =>
  withCounter(async (c, tmp) => {
    const victim = `${tmp}/victim`;
    await Deno.writeTextFile(victim, "victim\n", { mode: 0o600 });
    const dir = `${tmp}/img`;
    await Deno.mkdir(dir, { mode: 0o700 });
    const names = ["inventory.cbor", `pages-${c.pid}.img`, `process-${c.pid}.cbor`];
    for (const n of names) await Deno.symlink(victim, `${dir}/${n}`);
    assertExit(await amber(dumpArgs(c.pid, dir, "-R")), 0, "dump -R");
    assert.equal(await Deno.readTextFile(victim), "victim\n", "the victim was written");
    for (const n of names) {
      const st = Deno.lstatSync(`${dir}/${n}`);
      assert.ok(st.isFile && (st.mode! & 0o777) === 0o600, `${n} is not a private file`);
    }
    await assertCounting(c, "after the dump");
  }));

Deno.test("dump refuses a world-writable or symlinked directory and leaves its mode alone", () =>
  withCounter(async (c, tmp) => {
    const open = `${tmp}/open`;
    await Deno.mkdir(open);
    await Deno.chmod(open, 0o1777);
    const msg = assertOneLineError(await amber(dumpArgs(c.pid, open, "-R")), 1, "dump into 1777");
    assert.ok(msg.includes(`images directory ${open}: mode 1777 lets others write it`), msg);
    assert.equal(Deno.statSync(open).mode! & 0o7777, 0o1777, "dump changed the mode");
    assert.deepEqual(listDir(open), []);

    const real = `${tmp}/real`, link = `${tmp}/link`;
    await Deno.mkdir(real, { mode: 0o700 });
    await Deno.symlink(real, link);
    const m2 = assertOneLineError(await amber(dumpArgs(c.pid, link, "-R")), 1, "dump into a link");
    assert.ok(m2.includes(`images directory ${link}: is a symlink`), m2);
    assert.deepEqual(listDir(real), []);
    await assertCounting(c, "after the refused dumps");
  }));

/** File name → content, of every file in `dir`. */
function contents(dir: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const n of listDir(dir).filter((n) => !n.startsWith("."))) {
    const bytes = Deno.readFileSync(`${dir}/${n}`);
    out.set(n, `${bytes.length}:${bytes.reduce((h, b) => (h * 31 + b) >>> 0, 7)}`);
  }
  return out;
}

for (const point of ["after-freeze", "mid-pages", "before-commit"]) {
  Deno.test(`an earlier complete image survives a dump that fails at ${point}`, () =>
    withCounter(async (c, tmp) => {
      const dir = `${tmp}/img`;
      assertExit(await amber(dumpArgs(c.pid, dir, "-R")), 0, "first dump -R");
      const first = contents(dir);
      const r = await amber(dumpArgs(c.pid, dir), { AMBER_TEST_FAULT: point });
      const msg = assertOneLineError(r, 1, `dump with a fault at ${point}`);
      assert.ok(msg.includes(point), msg);
      assert.deepEqual(contents(dir), first, "the earlier image changed");
      assertExit(await amber(["show", dir]), 0, "show of the earlier image");
      await assertCounting(c, `after the fault at ${point}`);
    }));
}

Deno.test("an earlier image survives a dump killed midway; the next dump clears what it left", async () => {
  await using tmp = await tempDir();
  const dir = `${tmp.path}/img`;
  const c = await startCounter(tmp.path, 4);
  try {
    assertExit(await amber(dumpArgs(c.pid, dir, "-R")), 0, "first dump -R");
    const first = contents(dir);
    const child = new Deno.Command(DENO, {
      args: ["run", "-A", CLI, ...dumpArgs(c.pid, dir, "-R")],
      stdout: "null",
      stderr: "null",
    }).spawn();
    await waitFor(
      () => listDir(dir).some((n) => n.startsWith(".amber-dump-")) || undefined,
      "the second dump's staging directory",
    );
    child.kill("SIGKILL");
    await child.status;
    assert.deepEqual(contents(dir), first, "the earlier image changed");
    assertExit(await amber(["show", dir]), 0, "show of the earlier image");
  } finally {
    await killAndReap(c.pid);
  }
  // The killed dump may have harmed its target (not this test's business): dump another.
  await Deno.mkdir(`${tmp.path}/second`);
  const d = await startCounter(`${tmp.path}/second`, 1);
  try {
    assertExit(await amber(dumpArgs(d.pid, dir, "-R")), 0, "dump after the killed one");
    assert.deepEqual(listDir(dir).filter((n) => n.startsWith(".")), [], "staging left");
    const pids = new Set(listDir(dir).flatMap((n) => /-(\d+)\./.exec(n)?.[1] ?? []));
    assert.deepEqual([...pids], [String(d.pid)], "files of the earlier image left");
  } finally {
    await killAndReap(d.pid);
  }
});

Deno.test("a second dump into a directory being dumped into fails at once", () =>
  withCounter(async (c, tmp) => {
    const dir = `${tmp}/img`;
    assertExit(await amber(dumpArgs(c.pid, dir, "-R")), 0, "first dump -R");
    const first = contents(dir);
    // Hold the lock a running dump holds.
    const py = "import fcntl, os, sys, time\n" +
      "fd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_EX)\n" +
      "print('locked', flush=True)\ntime.sleep(60)";
    const holder = new Deno.Command("python3", { args: ["-c", py, dir], stdout: "piped" }).spawn();
    try {
      const reader = holder.stdout.getReader();
      const { value } = await reader.read();
      reader.releaseLock();
      assert.match(new TextDecoder().decode(value), /locked/);
      const r = await amber(dumpArgs(c.pid, dir, "-R"));
      const msg = assertOneLineError(r, 1, "dump into a locked directory");
      assert.ok(
        msg.includes(`images directory ${dir}: another amber dump is writing into it`),
        msg,
      );
      assert.deepEqual(contents(dir), first, "the earlier image changed");
    } finally {
      holder.kill("SIGKILL");
      await holder.status;
      await holder.stdout.cancel().catch(() => {});
    }
    // Two real dumps at once: each ends with a complete image or the lock's error.
    const both = await Promise.all([1, 2].map(() => amber(dumpArgs(c.pid, dir, "-R"))));
    for (const r of both) {
      if (r.code !== 0) {
        const msg = assertOneLineError(r, 1, "concurrent dump");
        assert.ok(msg.includes("another amber dump is writing into it"), msg);
      }
    }
    assert.ok(both.some((r) => r.code === 0), "neither concurrent dump worked");
    assertExit(await amber(["show", dir]), 0, "show after concurrent dumps");
    assert.deepEqual(listDir(dir).filter((n) => n.startsWith(".")), [], "staging left");
    await assertCounting(c, "after the concurrent dumps");
  }));

/**
 * A dump of the counter (with `extra` options) onto a tmpfs of `size`,
 * too small for its images: one line naming ENOSPC (returned), nothing
 * left on the disk, the counter running on.
 */
async function dumpOntoSmallDisk(size: string, ...extra: string[]): Promise<string> {
  let msg = "";
  await withCounter(async (c, tmp) => {
    const mnt = `${tmp}/small`;
    await Deno.mkdir(mnt);
    await run("mount", "-t", "tmpfs", "-o", `size=${size},mode=0700`, "tmpfs", mnt);
    try {
      const r = await amber(dumpArgs(c.pid, `${mnt}/img`, ...extra));
      msg = assertOneLineError(r, 1, "dump onto a full disk");
      assert.ok(msg.includes("ENOSPC"), msg);
      assert.deepEqual(listDir(mnt), [], "images left on the full disk");
      await assertCounting(c, "after ENOSPC");
    } finally {
      await run("umount", mnt);
    }
  });
  return msg;
}

Deno.test("a full disk says ENOSPC and leaves the target running", async () => {
  await dumpOntoSmallDisk("1m", "-R");
});

Deno.test("a dump that would end the tree onto a too small disk fails before the copy", async () => {
  // tmpfs takes O_DIRECT: the pages file is allocated ahead, as on ext4, and that fails.
  const msg = await dumpOntoSmallDisk("2m");
  assert.match(msg, /pages-\d+\.img: fallocate .*ENOSPC/, msg);
});

// ---------------------------------------------------------------------------
// restore

Deno.test("--pidfile replaces a planted symlink instead of writing through it", async () => {
  await using tmp = await tempDir();
  const { img, pid, out } = await dumpedCounter(tmp.path);
  const victim = `${tmp.path}/victim`;
  await Deno.writeTextFile(victim, "victim\n");
  const pidfile = `${tmp.path}/restored.pid`;
  await Deno.symlink(victim, pidfile);
  try {
    const n = (await readLines(out)).length;
    assertExit(await amber(["restore", "-D", img, "-d", "--pidfile", pidfile]), 0, "restore");
    assert.equal(await Deno.readTextFile(victim), "victim\n", "pidfile written through the link");
    assert.ok(Deno.lstatSync(pidfile).isFile, "pidfile is not a regular file");
    assert.equal(await Deno.readTextFile(pidfile), `${pid}\n`);
    assert.deepEqual(listDir(tmp.path).filter((n) => n.includes(".amber-")), [], "temp file left");
    await assertCounterGoesOn(out, n, 5, "restored counter");
  } finally {
    await killAndReap(pid);
  }
});

/** Starts the helper from a throwaway Deno, SIGKILLs that Deno, and expects the helper gone. */
Deno.test("the restore helper dies with the amber that started it", async () => {
  const script = `import { writeHelperElf } from "${ROOT}/ffi/helper_elf.ts";
const path = writeHelperElf();
const child = new Deno.Command(path).spawn();
console.log(child.pid);
await new Promise(() => {});`;
  const starter = new Deno.Command(DENO, {
    args: ["eval", script],
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const reader = starter.stdout.getReader();
  const { value } = await reader.read();
  reader.releaseLock();
  const helper = Number(new TextDecoder().decode(value).trim());
  try {
    assert.ok(isAlive(helper), "helper did not start");
  } finally {
    starter.kill("SIGKILL");
    await starter.status;
    await starter.stdout.cancel().catch(() => {});
  }
  await waitFor(() => !isAlive(helper) || undefined, "the helper to die with its starter");
  assertNoLiveHelper("after its starter was killed");
});

Deno.test("a restore SIGKILLed while its helper runs leaves no helper", async () => {
  await using tmp = await tempDir();
  const { img, pid } = await dumpedCounter(tmp.path);
  let seenOnce = false;
  try {
    for (let i = 0; i < 3; i++) {
      const child = new Deno.Command(DENO, {
        args: ["run", "-A", CLI, "restore", "-D", img, "-d"],
        stdout: "null",
        stderr: "null",
      }).spawn();
      let seen = false;
      for (let j = 0; j < 20000 && !seen; j++) {
        seen = helperProcesses().length > 0;
        if (!seen) await sleep(1);
      }
      child.kill("SIGKILL");
      await child.status;
      seenOnce ||= seen;
      await waitFor(
        () => helperProcesses().filter(isAlive).length === 0 || undefined,
        "the helper to die with amber",
      );
      assertNoLiveHelper(`restore killed (helper seen: ${seen})`);
      // Killed before it detached, the tree dies with amber; killed after, it runs.
      await killAndReap(pid);
    }
    assert.ok(seenOnce, "no helper was ever seen: nothing was tested");
  } finally {
    await killAndReap(pid);
  }
});
