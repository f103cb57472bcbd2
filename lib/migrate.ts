/**
 * `amber migrate` and `amber migrate-receive` (issue 13): a running tree
 * moves to another amber over one TCP connection.
 *
 * The source runs pre-copy rounds while the tree runs (pre-dumps with
 * write tracking, lib/mm/tracking.ts), each one streamed (lib/images/stream.ts)
 * into the receiver's `DIR/round-N`, and each after the first holding only
 * the pages written since the round before, whose images (CBOR, no pages)
 * stay in memory here as its parent. Once a round is not smaller than the
 * one before (or after a bound), the final round freezes the tree, sends
 * the last dirty pages and the rest of the state as `DIR/round-N` with
 * `../round-(N-1)` as its parent, and the receiver restores the chain.
 *
 * On the wire, before each round's stream: a 16-byte header ("AMBERMIG",
 * the round number, 1 if final). After a pre-copy round the receiver
 * replies (streaming.ts's reply) once the round is stored. A final
 * round after pre-copy rounds waits, header sent, for the receiver's
 * word that it is ready (it builds the tree from the round before
 * meanwhile, lib/prebuilt.ts) before it freezes the tree; after it the
 * receiver replies twice: stored, then restored (its pids) or refused (why).
 * Between those two the sender says go (or why not: a post-dump action
 * script failed) in the same form, once its post-dump scripts ran, so
 * an address the source gives up is gone before the destination's
 * pre-restore scripts bring it up there; only then does the receiver
 * restore (a sender that timed out before the go resumes its tree, and
 * the receiver, never told to go, restores nothing).
 *
 * With --tcp-established the tree's TCP sockets move with it: each
 * round checkpoints them as a dump does, the final round under the
 * source's network lock; the receiver locks the connections again in its
 * own network before its pre-restore scripts run (lib/restore.ts), and
 * the source's lock goes once its sockets were closed in repair mode.
 * Moving the addresses is the operator's (--action-script).
 *
 * When the source tree ends: only once the receiver said the tree runs
 * there. Any failure said or seen before the go (a refusal, a closed
 * connection, a receiver that stops reading or answering for the timeout)
 * resumes the source tree, and the receiver, which never got the go,
 * removes what it received. A receiver that goes silent after the go may
 * have restored the tree or not: resuming could leave two copies running,
 * killing could leave none, so the source tree is left stopped (SIGSTOP)
 * and amber says so; whoever knows what the destination did sends it
 * SIGCONT or SIGKILL.
 */
import {
  AmberError,
  faultPointAsync,
  InterruptedError,
  RefusalError,
  UnknownOutcomeError,
} from "./errors.ts";
import { SignalGuard } from "./interrupt.ts";
import { runActionScripts } from "./actions.ts";
import { detailLog, type LogLine } from "./log.ts";
import { type DumpStats, dumpTree } from "./dump.ts";
import { warmUp } from "./warmup.ts";
import type { LazyStats } from "./mm/lazy.ts";
import {
  type BuiltTree,
  type Helper,
  imagesMappings,
  type RestoreResult,
  restoreTree,
  spawnHelper,
} from "./restore.ts";
import {
  buildAheadMismatch,
  buildAheadRefusal,
  canBuildAhead,
  patchOffsets,
  patchPages,
} from "./prebuilt.ts";
import { ImageDir } from "./images/dir.ts";
import type { RestoreOptions } from "./context.ts";
import { disarmTree, type Parent } from "./mm/tracking.ts";
import { listTree } from "./tree/seize.ts";
import { inventoryImage } from "./tree/pstree.ts";
import type { Images } from "./images/read.ts";
import {
  type ByteWriter,
  errnoOf,
  messageOf,
  RecordWriter,
  StreamImages,
} from "./images/stream.ts";
import {
  acceptOne,
  type PageServerAddress,
  readExactly,
  readReply,
  readReplyMessage,
  receiveImages,
  reply,
  within,
  writeReply,
} from "./streaming.ts";

const MAGIC = new TextEncoder().encode("AMBERMIG");
const HEADER_BYTES = 16;
const FINAL = 1;
/** Pre-copy rounds at most, unless asked otherwise. */
export const DEFAULT_ROUNDS = 5;
/** A receiver's word after a pre-copy round: it builds the tree ahead still (eager restores). */
const BUILDING_AHEAD = "building ahead";
/** A chain the receiver accepts at most (each round is a directory). */
const MAX_ROUNDS = 32;
/** How long the receiver may take to read what is sent, or to answer, unless asked otherwise. */
export const DEFAULT_TIMEOUT_MS = 60_000;

/**
 * The connection as the rounds' streams write to it: a write the receiver
 * does not take within `ms` (it stopped reading) fails, and the round with it.
 */
function stallGuard(conn: Deno.TcpConn, ms: number, where: string): ByteWriter {
  return {
    write: (p) =>
      within(
        conn.write(p),
        ms,
        () => `${where}: the receiver read nothing for ${ms / 1000} s (it hangs)`,
      ),
  };
}

/** What `amber migrate` is asked to do (mod.ts `migrate`). */
export interface MigrateRequest {
  /** Root of the tree to move. */
  pid: number;
  /** The `amber migrate-receive` to move it to. */
  to: PageServerAddress;
  /**
   * Pre-copy rounds at most before the final one (default 5; without it,
   * up to 31 while an eager receiver still builds the tree ahead).
   */
  maxRounds?: number;
  /** The tree is a job of a shell (CRIU's --shell-job). */
  shellJob?: boolean;
  /**
   * TCP sockets move with the tree, established connections checkpointed
   * as `dump --tcp-established` does; their addresses must be in the
   * destination's network when it restores (an action script moves them).
   */
  tcpEstablished?: boolean;
  /**
   * Shell code run here at pre-dump (before the first round), network-lock
   * (the final round frozen), post-dump (the final round stored there,
   * before it restores) and network-unlock (the tree resumes here after a
   * failure) (CRIU's --action-script; lib/actions.ts).
   */
  actionScripts?: string[];
  /** Print the detail lines (per round, per part) on stderr. */
  verbose?: boolean;
  /** Receives every detail line (what -v prints). */
  log?: LogLine;
  /** Aborting it stops the migration as SIGINT does: the tree resumes here. */
  signal?: AbortSignal;
  /**
   * Milliseconds the receiver may take to read what is sent or to answer
   * (default 60 s); a receiver that hangs longer fails the migration, and
   * the tree resumes here if the receiver was not told to start it yet.
   */
  timeoutMs?: number;
}

/** One round of a migration, as the source saw it. */
export interface MigrateRound {
  /** Its number, from 1. */
  round: number;
  /** The round that froze the tree for the last time. */
  final: boolean;
  /** Bytes of memory pages sent in this round. */
  pageBytes: number;
  /** Milliseconds the tree was frozen for it. */
  frozenMs: number;
  /** Milliseconds the whole round took. */
  totalMs: number;
}

/** What a migration did (mod.ts `migrate`). */
export interface MigrateResult {
  /** The processes moved, root first (the same pids at the destination). */
  pids: number[];
  /** Every round, the final one last. */
  rounds: MigrateRound[];
  /** Rounds run while the tree ran, before the final one. */
  preCopyRounds: number;
  /** Bytes of pages sent in the final round, while the tree was frozen. */
  finalPageBytes: number;
  /** Milliseconds the tree was frozen in the final round (sending, restoring there). */
  frozenMs: number;
  /** Milliseconds the whole migration took. */
  totalMs: number;
  /** What the receiver said: the pids it runs, how long its restore took. */
  destination: { pids: number[]; restoreMs: number };
}

function roundHeader(round: number, final: boolean): Uint8Array {
  const h = new Uint8Array(HEADER_BYTES);
  h.set(MAGIC);
  const v = new DataView(h.buffer);
  v.setUint32(8, round, true);
  v.setUint32(12, final ? FINAL : 0, true);
  return h;
}

async function writeAll(conn: ByteWriter, data: Uint8Array, where: string): Promise<void> {
  try {
    for (let done = 0; done < data.length;) done += await conn.write(data.subarray(done));
  } catch (e) {
    throw new AmberError(`${where}: send: ${errnoOf(e)}`, { cause: e });
  }
}

/** The receiver's word on the restore, once the final round is stored. */
const Restored = {
  parse(text: string, where: string): { pids: number[]; restoreMs: number } {
    try {
      const v = JSON.parse(text);
      if (
        Array.isArray(v.pids) && v.pids.every((p: unknown) => Number.isSafeInteger(p)) &&
        typeof v.restoreMs === "number"
      ) return { pids: v.pids, restoreMs: v.restoreMs };
    } catch { /* below */ }
    throw new AmberError(`${where}: malformed restore reply`);
  },
};

/**
 * A receiver that stored the final round and then went silent: the tree
 * may run there. Stopped here, neither resumed nor killed (see the top).
 */
function leaveStopped(pid: number, where: string, e: unknown): AmberError {
  const pids = listTree(pid);
  for (const p of pids) {
    try {
      Deno.kill(p, "SIGSTOP");
    } catch { /* gone */ }
  }
  return new UnknownOutcomeError(
    `${where}: ${
      messageOf(e).replace(`${where}: `, "")
    } after it stored the final round: it may run the tree; ` +
      `the tree is left stopped here (pids ${pids.join(" ")}): kill -CONT them if it does ` +
      "not run there, kill -KILL if it does",
    { cause: e },
  );
}

/**
 * The final round is stored there: post-dump runs here, then the receiver
 * hears go, or why not (it then removes what it received; the tree
 * resumes here).
 */
async function sayGo(
  conn: Deno.TcpConn,
  out: ByteWriter,
  scripts: string[] | undefined,
  env: { initPid: number },
  where: string,
): Promise<void> {
  try {
    runActionScripts(scripts, "post-dump", env);
  } catch (e) {
    await writeReply(conn, reply(false, messageOf(e))).catch(() => {});
    throw e;
  }
  await writeAll(out, reply(true), where);
}

/** Moves the tree at `req.pid` to the amber at `req.to`. */
export async function migrate(req: MigrateRequest): Promise<MigrateResult> {
  const t0 = performance.now();
  const log = detailLog(req);
  // Between rounds too, SIGINT stops it as it stops a dump: the tree resumes here, untracked.
  using guard = new SignalGuard(req.signal);
  const maxRounds = req.maxRounds ?? DEFAULT_ROUNDS;
  if (!Number.isSafeInteger(maxRounds) || maxRounds < 0 || maxRounds >= MAX_ROUNDS) {
    throw new AmberError(`--max-rounds ${maxRounds}: from 0 to ${MAX_ROUNDS - 1}`);
  }
  const where = `migrate-receive ${req.to.address}:${req.to.port}`;
  const timeoutMs = req.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  if (!(timeoutMs > 0)) throw new AmberError(`--timeout ${timeoutMs / 1000}: more than 0 s`);
  /** An answer the receiver owes, within the timeout. */
  const answer = <T>(p: Promise<T>, what: string) =>
    within(
      Promise.race([p, guard.stopped]),
      timeoutMs,
      () => `${where}: no answer ${what} for ${timeoutMs / 1000} s (the receiver hangs)`,
    );
  let conn: Deno.TcpConn;
  try {
    conn = await Deno.connect({ hostname: req.to.address, port: req.to.port });
  } catch (e) {
    throw new AmberError(`${where}: connect: ${errnoOf(e)}`, { cause: e });
  }
  // The final round's small images and the words between the ends go at once, not after
  // an acknowledgement of the segment before (Nagle's wait, up to a delayed ACK's 40 ms).
  conn.setNoDelay(true);
  // A receiver that refused says why before it closes: a better reason than EPIPE.
  const explain = async (e: unknown) => {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const got = await Promise.race([
      readReplyMessage(conn, where).catch(() => undefined),
      new Promise<undefined>((r) => timer = setTimeout(() => r(undefined), 2000)),
    ]);
    clearTimeout(timer);
    return got && !got.ok ? new AmberError(`${where}: ${got.text}`) : e;
  };
  const out = stallGuard(conn, timeoutMs, where);
  const rounds: MigrateRound[] = [];
  const scriptEnv = { initPid: req.pid };
  let destination: MigrateResult["destination"] | undefined;
  let parent: Parent | undefined;
  let last: DumpStats | undefined;
  /** The receiver said, after the last round, that it still builds the tree ahead. */
  let receiverBuilding = false;
  try {
    runActionScripts(req.actionScripts, "pre-dump", scriptEnv);
    await warmUp(dumpTree, log, req.signal);
    for (let round = 1;; round++) {
      await guard.checkpoint();
      const pre = rounds.filter((r) => !r.final);
      const stalled = pre.length >= 2 &&
        pre[pre.length - 1].pageBytes >= pre[pre.length - 2].pageBytes;
      // A receiver still building the tree ahead gets more rounds, up to the bound: the final
      // round would otherwise wait for it, the tree here writing on meanwhile.
      // (Without --max-rounds, up to the most a chain may hold while it builds.)
      const bound = receiverBuilding && req.maxRounds === undefined ? MAX_ROUNDS - 1 : maxRounds;
      const final = pre.length >= bound || (stalled && !receiverBuilding);
      await writeAll(out, roundHeader(round, final), where);
      // The receiver builds the tree from the round before while it still runs here
      // (lib/prebuilt.ts): the freeze waits for its word that it is ready.
      if (final && round > 1) await answer(readReply(conn, where), "before the final round");
      const into: StreamImages = new StreamImages(
        new RecordWriter(out, where, explain),
        final
          ? async () => {
            // Stored there: until the go, any failure (SIGINT, a timeout) resumes the tree here.
            await answer(readReply(conn, where), "after the final round");
            await sayGo(conn, out, req.actionScripts, scriptEnv, where);
            let said: { ok: boolean; text: string };
            try {
              said = await answer(readReplyMessage(conn, where), "after the go");
            } catch (e) {
              throw leaveStopped(req.pid, where, e);
            }
            if (!said.ok) throw new AmberError(`${where}: restore: ${said.text}`);
            try {
              destination = Restored.parse(said.text, where);
            } catch (e) {
              // It said the tree runs, in words amber cannot read: it may well run.
              throw leaveStopped(req.pid, where, e);
            }
          }
          : async () => {
            const said = await answer(readReply(conn, where), `after round ${round}`);
            receiverBuilding = said === BUILDING_AHEAD;
          },
      );
      if (parent) into.withParent(parent.path, parent.dir as StreamImages);
      last = await dumpTree({
        pid: req.pid,
        shellJob: req.shellJob,
        tcpEstablished: req.tcpEstablished,
        actionScripts: req.actionScripts,
        verbose: req.verbose,
        log: req.log,
        signal: req.signal,
        preDump: !final,
        migrationRound: { into, parent },
      });
      rounds.push({
        round,
        final,
        pageBytes: last.pageBytes,
        frozenMs: last.frozenMs,
        totalMs: last.totalMs,
      });
      log(
        `migrate: round ${round}${final ? " (final)" : ""}: ${last.pageBytes} bytes of pages, ` +
          `frozen ${last.frozenMs.toFixed(1)} ms`,
      );
      if (final) break;
      // What the receiver would refuse (a socket of this network namespace) stops it now,
      // not after every page has been sent again.
      const refused = into.read(inventoryImage).verdict?.[0];
      if (refused) throw new AmberError(`${refused}; not migrated, the tree runs on here`);
      parent = {
        path: `../round-${round}`,
        dir: into,
        createdAt: into.read(inventoryImage).createdAt,
      };
    }
  } catch (e) {
    // The tree runs on here: without the trackers the pre-copy rounds armed.
    if (!(e instanceof UnknownOutcomeError)) {
      try {
        disarmTree(req.pid);
      } catch (d) {
        log(`migrate: pid ${req.pid}: closing write tracking: ${messageOf(d)}`);
      }
    }
    throw e;
  } finally {
    try {
      conn.close();
    } catch { /* closed */ }
  }
  const finalRound = rounds[rounds.length - 1];
  return {
    pids: last!.pids,
    rounds,
    preCopyRounds: rounds.length - 1,
    finalPageBytes: finalRound.pageBytes,
    frozenMs: finalRound.frozenMs,
    totalMs: performance.now() - t0,
    destination: destination!,
  };
}

/** What `amber migrate-receive` is asked to do (mod.ts `migrateReceive`). */
export interface MigrateReceiveRequest {
  /** Address to listen on. */
  address: string;
  /** TCP port to listen on (0: any free one, given to `listening`). */
  port: number;
  /**
   * Where the rounds are written (`DIR/round-N`) and kept after the
   * restore; without it a private directory, removed once the tree runs.
   */
  dir?: string;
  /** Called once it listens, with the port. */
  listening?: (port: number) => void;
  /** Print the detail lines on stderr. */
  verbose?: boolean;
  /** Receives every detail line (what -v prints). */
  log?: LogLine;
  /** Aborting it stops the receiver as SIGINT does: what was received is removed. */
  signal?: AbortSignal;
  /**
   * Shell code run at the restore's network-lock, pre-restore,
   * post-restore and network-unlock (restore's actionScripts).
   */
  actionScripts?: string[];
  /**
   * Restore the tree with lazy pages (restore --lazy-pages): it runs as
   * soon as all but its anonymous memory is in, which the receiver then
   * serves from the received rounds as it is touched, returning once
   * every page is in. If serving fails the tree is killed (its source
   * copy is gone by then): the pause is shorter, the risk is that one.
   */
  lazyPages?: boolean;
}

/** What a receiver did. */
export interface MigrateReceiveResult {
  /** Who sent the tree (address:port). */
  peer: string;
  /** Rounds received, the final one included. */
  rounds: number;
  /** Bytes received over all rounds. */
  bytes: number;
  /** The pids now running here. */
  pids: number[];
  /** Milliseconds the restore took. */
  restoreMs: number;
  /** Where the rounds are kept (with `dir`). */
  dir?: string;
  /** With lazyPages: what serving the memory took. */
  lazy?: LazyStats;
}

/** Reads the next round's header; throws naming what is wrong. */
async function readRoundHeader(
  conn: Deno.Conn,
  expected: number,
  where: string,
): Promise<{ final: boolean }> {
  const h = await readExactly(conn, HEADER_BYTES, where);
  if (MAGIC.some((b, i) => h[i] !== b)) throw new AmberError(`${where}: not an amber migration`);
  const v = new DataView(h.buffer);
  const round = v.getUint32(8, true), flags = v.getUint32(12, true);
  if (round !== expected) {
    throw new AmberError(`${where}: round ${round} sent, round ${expected} expected (refused)`);
  }
  if (flags > FINAL) throw new AmberError(`${where}: round ${round}: unknown flags ${flags}`);
  if (round > MAX_ROUNDS) {
    throw new AmberError(`${where}: more than ${MAX_ROUNDS} rounds (refused)`);
  }
  return { final: flags === FINAL };
}

/**
 * A round may build only on the round before it, in this receiver's own
 * directory: a parent path from the sender is hostile input like any other.
 */
function checkChain(images: Images, round: number, where: string): void {
  const want = `../round-${round - 1}`;
  for (const p of images.processes) {
    const got = (p.parts.pagemap as { parent?: { dir: string } } | undefined)?.parent?.dir;
    if (got !== undefined && (round === 1 || got !== want)) {
      throw new AmberError(
        `${where}: round ${round}: pid ${p.entry.pid}: parent images ${got}: only ` +
          `${round === 1 ? "none" : want} (refused)`,
      );
    }
  }
}

function removeQuietly(path: string): void {
  try {
    Deno.removeSync(path, { recursive: true });
  } catch { /* gone */ }
}

/**
 * Waits for one migration on `address:port`, stores its rounds, restores
 * the tree from them, and tells the sender whether it runs here.
 */
export async function migrateReceive(req: MigrateReceiveRequest): Promise<MigrateReceiveResult> {
  using guard = new SignalGuard(req.signal);
  const log = detailLog(req);
  const own = req.dir === undefined;
  const root = req.dir ?? Deno.makeTempDirSync({ prefix: "amber-migrate-" });
  let where = `migrate-receive ${req.address}:${req.port}`;
  const received: string[] = [];
  // What was received goes, whatever failed (the tree, once it runs, no longer needs it with no -D).
  const removeReceived = () => {
    for (const d of received.splice(0)) removeQuietly(d);
    if (own) removeQuietly(root);
  };
  let listener: Deno.TcpListener;
  try {
    // Checked before listening: a directory that cannot take the rounds fails before a sender waits.
    Deno.mkdirSync(root, { recursive: true, mode: 0o700 });
    const probe = Deno.makeTempDirSync({ dir: root, prefix: ".probe-" });
    Deno.removeSync(probe);
    listener = Deno.listen({ hostname: req.address, port: req.port });
  } catch (e) {
    if (own) removeQuietly(root);
    throw new AmberError(`${where}: ${root}: ${errnoOf(e)}`, { cause: e });
  }
  const port = (listener.addr as Deno.NetAddr).port;
  where = `migrate-receive ${req.address}:${port}`;
  const { conn, peer } = await acceptOne(
    listener,
    guard.stopped,
    where,
    () => own && removeQuietly(root),
    () => req.listening?.(port),
  );
  conn.setNoDelay(true); // its words go at once (see migrate's)
  const from = `${where}: migration from ${peer}`;
  let bytes = 0, rounds = 0;
  /** The restore's helper, started during the pre-copy rounds: not within the final pause. */
  let helper: Helper | undefined;
  /** Helpers handed to a restore, killed here whatever it did with them. */
  const handed: Helper[] = [];
  /** The last pre-copy round, stored. */
  let previous: { dir: string; images: Images } | undefined;
  /** The tree built ahead from it, held until the final round is in. */
  let ahead: Ahead | undefined;
  /**
   * An eager receiver's tree, built ahead from the first pre-copy round it
   * can build from, and brought to each later round as it comes in (its
   * pages patched in): restoring every page takes seconds, which the
   * final round would otherwise wait for.
   */
  let early: Promise<Ahead | undefined> | undefined;
  let earlyBuilt = false;
  /** Builds the tree ahead from `round` (the first time) or brings it to `round`. */
  const buildEarly = (
    held: Promise<Ahead | undefined> | undefined,
    round: { dir: string; images: Images },
  ): Promise<Ahead | undefined> | undefined => {
    if (!held) {
      if (!canBuildAhead(round.images, req.actionScripts)) return undefined;
      if (helper) handed.push(helper);
      const h = helper;
      helper = undefined;
      // (Built or not, the sender no longer waits for it.)
      return buildAhead(round, h, req, log).catch(() => undefined).then((a) => {
        earlyBuilt = true;
        return a;
      });
    }
    return held.then(async (a) => {
      try {
        await a?.advance(round.images, round.dir, log);
        return a;
      } catch (e) {
        log(`migrate-receive: built ahead, not brought to ${round.dir}: ${messageOf(e)}`);
        await a?.drop();
        return undefined;
      }
    });
  };
  try {
    for (let round = 1;; round++) {
      const { final } = await Promise.race([readRoundHeader(conn, round, from), guard.stopped]);
      await faultPointAsync(`migrate-round-${round}`);
      if (final && early) {
        ahead = await early;
        early = undefined;
      }
      if (final && !ahead && previous && canBuildAhead(previous.images, req.actionScripts)) {
        // Its restore takes the helper, whatever becomes of it.
        if (helper) handed.push(helper);
        ahead = await buildAhead(previous, helper, req, log);
        helper = undefined;
      }
      if (final && round > 1) {
        // Ready: the source may freeze the tree.
        await writeReply(conn, reply(true));
      }
      log(`migrate-receive: round ${round}${final ? " (final)" : ""}: receiving`);
      const dir = `${root}/round-${round}`;
      received.push(dir);
      const got = await receiveImages({
        input: conn,
        dir,
        where: `${from}: round ${round}`,
        expectEof: false,
        stopped: guard.stopped,
        durable: !own,
        log,
      });
      checkChain(got.images, round, from);
      bytes += got.bytes;
      rounds = round;
      log(`migrate-receive: round ${round}${final ? " (final)" : ""}: ${got.bytes} bytes`);
      if (!final) {
        previous = { dir, images: got.images };
        if (!req.lazyPages) {
          // (The first build takes the helper: one is made for it first.)
          if (!early) helper ??= await spawnHelper(imagesMappings(got.images));
          early = buildEarly(early, previous);
        }
        await writeReply(conn, reply(true, early && !earlyBuilt ? BUILDING_AHEAD : ""));
        // Clear of this round's mappings; restore checks the final round's again.
        helper ??= await spawnHelper(imagesMappings(got.images));
        continue;
      }
      await writeReply(conn, reply(true));
      // The sender's post-dump scripts ran (or failed: its word says why); the restore checks
      // the images meanwhile, and does nothing else before this word.
      const go = (async () => {
        try {
          await Promise.race([readReply(conn, `${from}: sender`), guard.stopped]);
        } catch (e) {
          if (e instanceof InterruptedError) throw e;
          throw new AmberError(
            `${messageOf(e)} (the sender did not say to start the tree: not restored)`,
            { cause: e },
          );
        }
        await faultPointAsync("migrate-before-restore");
        log("migrate-receive: go");
      })();
      go.catch(() => {}); // a restore that failed its checks first no longer waits for it
      const mismatch = ahead && buildAheadMismatch(previous!.images, got.images);
      if (ahead && mismatch) {
        log(`migrate-receive: the final round differs in ${mismatch}: restored from the start`);
        await ahead.drop();
        ahead = undefined;
      }
      const restored = ahead ? await ahead.finish(got.images, dir, go, log) : await restoreTree({
        dir,
        detached: true,
        migrated: true,
        // Read and checked as they came in; the helper waits since the first round.
        prepared: { images: got.images, helper, go },
        lazyPages: req.lazyPages,
        actionScripts: req.actionScripts,
        verbose: req.verbose,
        log: req.log,
        signal: req.signal,
      });
      ahead = undefined;
      // (A test's receiver that dies here: the tree runs, the sender never hears it.)
      await faultPointAsync("migrate-after-restore");
      const word = JSON.stringify({ pids: restored.pids, restoreMs: restored.restoreMs });
      // The tree runs here now: a sender gone by now stopped its own copy, see the top.
      await writeReply(conn, reply(true, word)).catch(() => {});
      // The rounds are the page source of a lazy tree until every page is in.
      const lazy = restored.lazy ? await restored.lazy : undefined;
      if (own) removeReceived();
      return {
        peer,
        rounds,
        bytes,
        pids: restored.pids,
        restoreMs: restored.restoreMs,
        dir: req.dir,
        lazy,
      };
    }
  } catch (e) {
    await ahead?.drop();
    await (await early?.catch(() => undefined))?.drop();
    removeReceived();
    // The sender resumes its tree on this word (or on the closed connection).
    const why = messageOf(e).replace(`${from}: `, "");
    await writeReply(conn, reply(false, why)).catch(() => {});
    throw e;
  } finally {
    try {
      conn.close();
    } catch { /* closed */ }
    // A restore that used the helper killed it; one that failed before did not.
    for (const h of [...handed, ...(helper ? [helper] : [])]) await killHelper(h);
  }
}

/** A tree built ahead from the last pre-copy round (lib/prebuilt.ts), held stopped. */
interface Ahead {
  /** Runs it with the final round's images (their pages patched in) once the sender says go. */
  finish(
    images: Images,
    dir: string,
    go: Promise<void>,
    log: (line: string) => void,
  ): Promise<RestoreResult>;
  /**
   * Brings it to a later pre-copy round (its pages patched in); throws if
   * that round differs in more than pages (the caller drops it then).
   */
  advance(images: Images, dir: string, log: (line: string) => void): Promise<void>;
  /** Kills it. */
  drop(): Promise<void>;
}

/**
 * Restores `previous` up to the threads' final state and holds it there;
 * undefined if its restore failed (the final round is then restored from
 * the start).
 */
async function buildAhead(
  previous: { dir: string; images: Images },
  helper: Helper | undefined,
  req: MigrateReceiveRequest,
  log: (line: string) => void,
): Promise<Ahead | undefined> {
  const t0 = performance.now();
  log(`migrate-receive: building ${previous.dir} ahead`);
  const held = Promise.withResolvers<BuiltTree>();
  const decided = Promise.withResolvers<{ images: Images; since: number }>();
  decided.promise.catch(() => {});
  const done = restoreTree({
    dir: previous.dir,
    detached: true,
    migrated: true,
    prepared: {
      images: previous.images,
      helper,
      hold: (built) => {
        held.resolve(built);
        return decided.promise;
      },
    },
    lazyPages: req.lazyPages,
    // A file the tree writes has grown since that round: the final round's images are
    // checked against it (buildAheadRefusal) and its offset patched in.
    allowChangedFiles: true,
    verbose: req.verbose,
    log: req.log,
    signal: req.signal,
  });
  done.catch(() => {});
  const built = await Promise.race([held.promise, done.then(() => undefined, (e) => e)]);
  if (!built || built instanceof Error || !("kinds" in built)) {
    log(`migrate-receive: not built ahead: ${built ? messageOf(built) : "no tree"}`);
    return undefined;
  }
  log(`migrate-receive: built ahead in ${(performance.now() - t0).toFixed(1)} ms`);
  const options: RestoreOptions = {
    detached: true,
    shellJob: false,
    verbose: req.verbose ?? false,
    allowChangedFiles: false,
    inheritFds: [],
    migrated: true,
    lazyPages: req.lazyPages ?? false,
    pageSource: false,
    movedTcp: false,
  };
  /** The round the held tree is at. */
  let current = previous;
  /** Its files and pages brought to `images` (checked first, as restore checks them). */
  const bringTo = async (images: Images, dir: string, log: (line: string) => void) => {
    using imageDir = new ImageDir(dir);
    const why = buildAheadRefusal(images, imageDir, options);
    if (why) throw new RefusalError(why);
    patchOffsets(current.images, images, built.injectors, log);
    await patchPages(images, imageDir, built.kinds, log);
    current = { dir, images };
  };
  return {
    async advance(images, dir, log) {
      const mismatch = buildAheadMismatch(current.images, images);
      if (mismatch) throw new AmberError(`the round differs in ${mismatch}`);
      await bringTo(images, dir, log);
      log(`migrate-receive: built ahead, brought to ${dir}`);
    },
    async finish(images, dir, go, log) {
      const since = performance.now();
      try {
        // Into the held tree while the go comes: it runs only after.
        await bringTo(images, dir, log);
        await go;
        decided.resolve({ images: { ...images, dir }, since });
      } catch (e) {
        decided.reject(e);
      }
      return await done;
    },
    async drop() {
      decided.reject(new AmberError("not used"));
      await done.catch(() => {});
    },
  };
}

async function killHelper(helper: Helper): Promise<void> {
  try {
    helper.child.kill("SIGKILL");
  } catch { /* gone already */ }
  await helper.child.status;
}
