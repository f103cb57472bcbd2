/**
 * File locks held by the tree come back with it, taken again before any
 * process runs: an outside process trying the conflicting lock is kept out
 * before the dump and after the restore. flock, POSIX record and OFD locks
 * from a Python target; POSIX locks of a real sqlite3 writer in the middle
 * of a transaction, which commits after the restore into a database that
 * passes its integrity check.
 */
import assert from "node:assert/strict";
import {
  amber,
  assertCounterGoesOn,
  assertExit,
  commandWorks,
  dumpArgs,
  exists,
  killTree,
  readLines,
  showJson,
  spawnTarget,
  startWriter,
  tempDir,
  until,
  waitGone,
  waitVanished,
} from "./_util.ts";

/** Takes an exclusive flock, a POSIX write lock on bytes 10..19, an OFD read lock; counts. */
const LOCKS_PY = `import fcntl, os, struct, sys, time
d, out = sys.argv[1], sys.argv[2]
def open_file(name, mode):
    with open(f"{d}/{name}", "w") as f:
        f.write("x" * 100)
    return os.open(f"{d}/{name}", mode)
a = open_file("flock.f", os.O_RDONLY)
fcntl.flock(a, fcntl.LOCK_EX)
b = open_file("posix.f", os.O_RDWR)
fcntl.lockf(b, fcntl.LOCK_EX, 10, 10)
c = open_file("ofd.f", os.O_RDONLY)
fcntl.fcntl(c, 37, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 0, 0, 0))  # F_OFD_SETLK
f = open(out, "w")
n = 0
while True:
    f.write("%d\\n" % n)
    f.flush()
    n += 1
    time.sleep(0.02)
`;

/** Tries, without waiting, the lock that conflicts with LOCKS_PY's on FILE; prints busy or free. */
const PROBE_PY = `import fcntl, os, struct, sys
kind, path = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
try:
    if kind == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    elif kind == "posix":
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 15)
    else:
        fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
    print("free")
except OSError:
    print("busy")
`;

async function probe(kind: string, path: string): Promise<string> {
  const r = await new Deno.Command("python3", { args: ["-c", PROBE_PY, kind, path] }).output();
  assert.ok(r.success, `lock probe failed: ${new TextDecoder().decode(r.stderr)}`);
  return new TextDecoder().decode(r.stdout).trim();
}

const KINDS = ["flock", "posix", "ofd"];

async function assertLocked(dir: string, what: string): Promise<void> {
  for (const kind of KINDS) {
    assert.equal(await probe(kind, `${dir}/${kind}.f`), "busy", `${what}: ${kind} lock`);
  }
}

Deno.test("flock, POSIX and OFD locks are held again after dump and restore", async () => {
  await using tmp = await tempDir();
  const out = `${tmp.path}/locks.txt`;
  const t = await startWriter(["setsid", "python3", "-c", LOCKS_PY, tmp.path, out], out, 3, 30_000);
  try {
    await assertLocked(tmp.path, "before the dump");
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(t.pid, img)), 0, "dump");
    await t.child.status;
    const doc = await showJson(img);
    const locks = doc.processes[0].images.locks.locks as { kind: string; type: string }[];
    assert.deepEqual(
      locks.map((l) => `${l.kind} ${l.type}`).sort(),
      ["flock write", "ofd read", "posix write"],
      "the locks in the images",
    );
    const n = (await readLines(out)).length;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    await assertLocked(tmp.path, "after the restore");
    await assertCounterGoesOn(out, n, 5, "after the restore");
    await killTree(t.pid);
    for (const kind of KINDS) {
      assert.equal(await probe(kind, `${tmp.path}/${kind}.f`), "free", `${kind} once it ended`);
    }
  } finally {
    await killTree(t.pid);
  }
});

/**
 * A sqlite3 writer in an exclusive transaction big enough to spill into
 * the database file (its rollback journal is hot), waiting for GO to exist
 * before it commits.
 */
const WRITER_SH = `db=$1; go=$2; {
  echo "PRAGMA journal_mode=DELETE; PRAGMA cache_size=10; BEGIN EXCLUSIVE;"
  echo "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000)"
  echo "INSERT INTO t SELECT randomblob(100) FROM c;"
  while [ ! -e "$go" ]; do sleep 0.05; done
  echo "COMMIT;"
} | sqlite3 "$db"`;

async function sqlite(db: string, sql: string): Promise<{ ok: boolean; out: string }> {
  const r = await new Deno.Command("sqlite3", { args: [db, sql] }).output();
  const dec = new TextDecoder();
  return { ok: r.success, out: (dec.decode(r.stdout) + dec.decode(r.stderr)).trim() };
}

/** Whether PID holds a POSIX write lock (/proc/locks). */
function holdsWriteLock(pid: number): boolean {
  return Deno.readTextFileSync("/proc/locks").split("\n").some((l) =>
    new RegExp(`POSIX\\s+ADVISORY\\s+WRITE\\s+${pid}\\s`).test(l)
  );
}

Deno.test("sqlite3 writer mid-transaction keeps its lock across dump and restore, then commits", async () => {
  assert.ok(await commandWorks("sqlite3", "-version"), "this test needs sqlite3 (Debian sqlite3)");
  await using tmp = await tempDir();
  const db = `${tmp.path}/t.db`;
  const go = `${tmp.path}/go`;
  assert.ok((await sqlite(db, "CREATE TABLE t(x); INSERT INTO t VALUES (1);")).ok, "setup");
  const { pid, child } = spawnTarget(["setsid", "bash", "-c", WRITER_SH, "writer", db, go]);
  try {
    const sq = () =>
      (Deno.readTextFileSync(`/proc/${pid}/task/${pid}/children`).trim().split(/\s+/).map(Number))
        .find((p) => p && Deno.readTextFileSync(`/proc/${p}/comm`).trim() === "sqlite3");
    let writer = 0;
    await until(() => !!(writer = sq() ?? 0) && holdsWriteLock(writer), "no write lock", 30_000);
    // The transaction has spilled into the database: a hot journal exists.
    await until(() => Deno.statSync(`${db}-journal`).size > 0, "no journal", 30_000);
    const reader = "SELECT count(*) FROM t;";
    assert.match((await sqlite(db, reader)).out, /locked/, "a reader gets in before the dump");

    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
    await child.status;
    // The orphaned zombies are ours to reap (subreaper) before their pids come back.
    await waitVanished((await showJson(img)).processes.map((p: { pid: number }) => p.pid));
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    assert.ok(holdsWriteLock(writer), "the restored writer holds no write lock");
    assert.match((await sqlite(db, reader)).out, /locked/, "a reader gets in after the restore");

    Deno.writeTextFileSync(go, "");
    assert.ok(await waitGone(pid, 30_000), "the restored writer did not finish");
    const check = await sqlite(db, "PRAGMA integrity_check; SELECT count(*) FROM t;");
    assert.equal(check.out, "ok\n20001", "the database after the commit");
  } finally {
    await killTree(pid);
  }
});

/** Takes an exclusive flock on argv[1] (waiting for it), then logs "got" to argv[2] and sleeps. */
const WAITER_PY = `import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
with open(sys.argv[2], "w") as f:
    f.write("got\\n")
while True:
    time.sleep(1)
`;

/** Holds an exclusive flock on argv[1] until killed; logs "held" to argv[2] once it has it. */
const HOLDER_PY = `import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
open(sys.argv[2], "w").write("held\\n")
while True:
    time.sleep(1)
`;

Deno.test("a process waiting for a lock held outside the tree waits again after restore", async () => {
  await using tmp = await tempDir();
  const file = `${tmp.path}/lock.f`;
  Deno.writeTextFileSync(file, "x");
  const held = `${tmp.path}/held.txt`, got = `${tmp.path}/got.txt`;
  const holder = await startWriter(["setsid", "python3", "-c", HOLDER_PY, file, held], held, 1);
  const waiter = spawnTarget(["setsid", "python3", "-c", WAITER_PY, file, got]);
  try {
    await until(
      () =>
        /flock/.test(Deno.readTextFileSync(`/proc/${waiter.pid}/wchan`)) ||
        /locks_lock_inode_wait|flock/.test(Deno.readTextFileSync(`/proc/${waiter.pid}/stack`)),
      "the waiter is not waiting for the lock",
      30_000,
    );
    const img = `${tmp.path}/img`;
    assertExit(await amber(dumpArgs(waiter.pid, img)), 0, "dump of the waiter");
    await waiter.child.status;
    assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
    await waitUntraced(waiter.pid);
    assert.equal(await readLines(got).then((l) => l.length), 0, "it got the lock while held");
    await killTree(holder.pid);
    await until(() => exists(got), "the restored waiter never got the lock once released");
  } finally {
    await killTree(holder.pid);
    await killTree(waiter.pid);
  }
});

/** Waits until amber has let go of PID (it may be blocked, so not "running"). */
async function waitUntraced(pid: number): Promise<void> {
  await until(
    () => /^TracerPid:\s*0$/m.test(Deno.readTextFileSync(`/proc/${pid}/status`)),
    `${pid} is still traced`,
  );
}
