/**
 * amber's command line: a thin layer over mod.ts with CRIU's flag names.
 * Each command lists its flags once; parsing, `--help` and the usage
 * errors all come from that list.
 */
import { stamp } from "./lib/log.ts";
import { parseArgs, type ParseArgsConfig } from "node:util";
import {
  AmberError,
  check,
  dump,
  type DumpRequest,
  formatCheck,
  InterruptedError,
  migrate,
  migrateReceive,
  pageServer,
  preDump,
  restore,
  run,
  show,
  UsageError,
} from "./mod.ts";
import { escapeText } from "./lib/errors.ts";
import { type ProgressLine, terminalProgress } from "./lib/progress.ts";
import { parseDuration } from "./lib/run.ts";
import { peakMemoryText } from "./lib/proc/read.ts";
import { diffImages, formatDiff } from "./lib/diff.ts";

interface Flag {
  long: string;
  short?: string;
  /** Name of its value; a flag without one is a switch. */
  value?: string;
  /** It may be given several times; its values come as a list. */
  multiple?: boolean;
  help: string;
}

type Values = Record<string, string | boolean | string[] | undefined>;

interface Command {
  name: string;
  args: string;
  summary: string;
  flags: Flag[];
  run(values: Values, positionals: string[]): Promise<number>;
}

const VERBOSE: Flag = {
  long: "verbose",
  short: "v",
  help: "print what each step does and how long it takes (CRIU's -v0..-v4 also work)",
};
const LOG_FILE: Flag = {
  long: "log-file",
  short: "o",
  value: "FILE",
  help: "also write those details to FILE (created 0600; relative to the current directory)",
};
const SHELL_JOB: Flag = {
  long: "shell-job",
  short: "j",
  help: "the tree is a job of a shell: its session or terminal is outside it",
};
const AIO_TIMEOUT: Flag = {
  long: "aio-timeout",
  value: "SECONDS",
  help: "how long AIO requests in flight are waited for, frozen, before refusing (default 5)",
};
const IMAGES_DIR: Flag = { long: "images-dir", short: "D", value: "DIR", help: "images directory" };
const JSON_OUT: Flag = {
  long: "json",
  help: "print the result as one JSON object on stdout (a failure too: code, pid, object, step)",
};
const FILE_LOCKS: Flag = {
  long: "file-locks",
  help: "accepted for CRIU's sake: amber always handles the file locks it finds",
};

const PREV_IMAGES_DIR: Flag = {
  long: "prev-images-dir",
  value: "DIR",
  help: "the pre-dump this one builds on (relative to -D unless absolute)",
};
const TCP_ESTABLISHED: Flag = {
  long: "tcp-established",
  help: "checkpoint established TCP connections (TCP_REPAIR, packets dropped meanwhile)",
};

const ACTION_SCRIPT: Flag = {
  long: "action-script",
  value: "SCRIPT",
  multiple: true,
  help: "run sh -c SCRIPT at each step, CRTOOLS_SCRIPT_ACTION naming it (docs/NETWORK.md)",
};
const actionScripts = (v: Values) => v["action-script"] as string[] | undefined;

const EXT_UNIX_SK: Flag = {
  long: "ext-unix-sk",
  help: "a unix socket whose outside peer has a name (/dev/log) is connected to it again",
};

const ADDRESS: Flag = {
  long: "address",
  value: "ADDR",
  help: "page server's address (IPv4 or IPv6 literal, or a host name)",
};
const PORT: Flag = { long: "port", value: "PORT", help: "page server's TCP port" };

/** --port: a TCP port (0, any free one, only where `zero` allows it). */
function portArg(v: unknown, command: string, zero = false): number {
  const n = typeof v === "string" && /^\d{1,5}$/.test(v) ? Number(v) : NaN;
  if (!(n <= 65535 && n >= (zero ? 0 : 1))) {
    throw new UsageError(
      `--port needs a TCP port number, got ${v ?? "nothing"}; see amber ${command} --help`,
    );
  }
  return n;
}

/** --timeout SEC: more than 0, at most a day; undefined if not given. */
function secondsArg(v: unknown): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!(n > 0 && n <= 86400)) {
    throw new UsageError(`--timeout needs seconds (more than 0), got ${v}`);
  }
  return n;
}

function addressArg(v: unknown, command: string): string {
  if (typeof v !== "string" || !v) {
    throw new UsageError(`--address ADDR is required; see amber ${command} --help`);
  }
  return v;
}

/** --to HOST:PORT ([v6]:PORT for an IPv6 literal). */
function hostPortArg(v: unknown): { address: string; port: number } {
  const m = typeof v === "string" ? /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(v) : null;
  if (!m) {
    throw new UsageError(`--to needs HOST:PORT, got ${v ?? "nothing"}; see amber migrate --help`);
  }
  return { address: m[1] ?? m[2], port: portArg(m[3], "migrate") };
}

/** Where dump sends the images instead of -D: stdout (--stream) or a page server. */
function dumpElsewhere(v: Values): Pick<DumpRequest, "stream" | "pageServer" | "lazyPages"> {
  if (v["lazy-pages"]) {
    if (v["page-server"] || v.stream) {
      throw new UsageError(
        "--lazy-pages keeps the images in -D DIR and serves the pages itself: not with " +
          (v.stream ? "--stream" : "--page-server"),
      );
    }
    // CRIU's dump --lazy-pages: --address/--port are where this amber serves the pages.
    const address = addressArg(v.address, "dump");
    return {
      lazyPages: {
        address,
        port: portArg(v.port, "dump", true),
        listening: (p) =>
          console.error(`amber dump: serving lazy pages on ${address}:${p} (tree frozen)`),
      },
    };
  }
  if (v.stream) {
    if (v.json) {
      throw new UsageError("--json prints on stdout, which --stream writes the images to");
    }
    if (Deno.stdout.isTerminal()) {
      throw new UsageError(
        "--stream writes the images to stdout: send it to a pipe, not a terminal",
      );
    }
    return { stream: Deno.stdout };
  }
  if (v["page-server"]) {
    return {
      pageServer: { address: addressArg(v.address, "dump"), port: portArg(v.port, "dump") },
    };
  }
  if (v.address !== undefined || v.port !== undefined) {
    throw new UsageError("--address and --port go with --page-server; see amber dump --help");
  }
  return {};
}

/** -v0..-v4 (CRIU's levels) → -v for 3 and above, nothing below. */
function normalizeVerbosity(args: string[]): string[] {
  return args.flatMap((a) => {
    const m = /^-v([0-4])$/.exec(a) ?? /^--verbosity=([0-4])$/.exec(a);
    if (!m) return [a];
    return Number(m[1]) >= 3 ? ["-v"] : [];
  });
}

function parse(cmd: Command, args: string[]): { values: Values; positionals: string[] } {
  const options: ParseArgsConfig["options"] = { help: { type: "boolean", short: "h" } };
  for (const f of cmd.flags) {
    options[f.long] = {
      type: f.value ? "string" : "boolean",
      ...(f.short && { short: f.short }),
      ...(f.multiple && { multiple: true }),
    };
  }
  try {
    const r = parseArgs({
      args: normalizeVerbosity(args),
      options,
      allowPositionals: true,
      strict: true,
    });
    return { values: r.values as Values, positionals: r.positionals };
  } catch (e) {
    const text = e instanceof Error ? e.message : String(e);
    const option = /'([^']+)'/.exec(text)?.[1]?.split(/[ ,]/)[0] ?? "";
    const see = `see amber ${cmd.name} --help`;
    if (/unknown option/i.test(text)) throw new UsageError(`unknown option ${option}; ${see}`);
    if (/argument missing/i.test(text)) throw new UsageError(`${option} needs a value; ${see}`);
    throw new UsageError(`${text.split("\n")[0].replace(/\.$/, "")}; ${see}`);
  }
}

function pidArg(v: unknown): number {
  if (typeof v !== "string" || !/^\d+$/.test(v)) {
    throw new UsageError(`-t needs a numeric pid, got ${v ?? "nothing"}; see amber dump --help`);
  }
  return Number(v);
}

/** A size in bytes, with an optional K, M or G suffix (CRIU's --ghost-limit 10M). */
function sizeArg(v: unknown): number {
  const m = typeof v === "string" ? /^(\d+)([KMG]?)$/i.exec(v) : null;
  if (!m) throw new UsageError(`--ghost-limit needs a size like 1048576 or 10M, got ${v}`);
  return Number(m[1]) * ({ "": 1, K: 1 << 10, M: 1 << 20, G: 1 << 30 }[m[2].toUpperCase()] ?? 1);
}

/** `--aio-timeout SECONDS` (fractions allowed), in ms; undefined when not given. */
function aioTimeoutArg(v: Record<string, unknown>): number | undefined {
  const arg = v["aio-timeout"];
  if (arg === undefined) return undefined;
  const s = typeof arg === "string" && /^\d+(\.\d+)?$/.test(arg) ? Number(arg) : NaN;
  if (!(s <= 3600)) throw new UsageError(`--aio-timeout needs seconds like 5 or 0.5, got ${arg}`);
  return Math.round(s * 1000);
}

/** `--inherit-fd fd[N]:RESOURCE` (CRIU's syntax), each. */
function inheritFdArgs(v: unknown): { fd: number; resource: string }[] {
  return ((v ?? []) as string[]).map((a) => {
    const m = /^fd\[(\d+)\]:(.+)$/.exec(a);
    if (!m) {
      throw new UsageError(`--inherit-fd needs fd[N]:RESOURCE like fd[7]:pipe:[1234], got ${a}`);
    }
    return { fd: Number(m[1]), resource: m[2] };
  });
}

/** `--external RESOURCE`, each: a pipe, or a unix socket (CRIU's unix[INO], or socket:[INO]). */
function externalArgs(v: unknown): string[] {
  return ((v ?? []) as string[]).map((a) => {
    const unix = /^unix\[(\d+)\]$/.exec(a);
    if (unix) return `socket:[${unix[1]}]`;
    if (!/^(pipe|socket):\[\d+\]$/.test(a)) {
      throw new UsageError(
        `--external takes pipe:[INO], unix[INO] or socket:[INO] (as /proc/PID/fd shows it), ` +
          `got ${a}`,
      );
    }
    return a;
  });
}

function dirArg(v: unknown, command: string): string {
  if (typeof v !== "string" || !v) {
    throw new UsageError(`-D DIR is required; see amber ${command} --help`);
  }
  return v;
}

function noPositionals(command: string, positionals: string[]): void {
  if (positionals.length) {
    throw new UsageError(`unexpected argument ${positionals[0]}; see amber ${command} --help`);
  }
}

/** The -o log: appended to, never through a symlink, 0600. */
function openLog(path: Values[string]): Deno.FsFile | undefined {
  if (typeof path !== "string") return undefined;
  try {
    if (Deno.lstatSync(path).isSymlink) throw new AmberError(`log file ${path}: is a symlink`);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  return Deno.openSync(path, { append: true, create: true, mode: 0o600 });
}

function logWriter(file: Deno.FsFile | undefined): ((line: string) => void) | undefined {
  if (!file) return undefined;
  const enc = new TextEncoder();
  return (line) => {
    file.writeSync(enc.encode(`${new Date().toISOString()} ${line}\n`));
  };
}

/** What a dump or restore reports to: the -o log, -v on stderr, and the progress line. */
interface Output {
  /** Detail lines: to the -o log, and to stderr with -v. */
  detail: (line: string) => void;
  /** The -o log only. */
  log?: (line: string) => void;
  progress?: ProgressLine;
}

/**
 * Runs fn with the -o log open, if any, and a progress line on a terminal;
 * the log gets the command line and any failure.
 */
async function withLog<T>(v: Values, fn: (out: Output) => Promise<T>): Promise<T> {
  using file = openLog(v["log-file"]);
  const log = logWriter(file);
  using progress = terminalProgress();
  const detail = (line: string) => {
    log?.(line);
    if (!v.verbose) return;
    progress?.clear();
    console.error(stamp(line));
  };
  log?.(`amber ${Deno.args.join(" ")}`);
  try {
    return await fn({ detail, log, progress });
  } catch (e) {
    log?.(`failed: ${e instanceof Error ? e.message : e}`);
    throw e;
  }
}

/** Set in the background amber that `restore --lazy-pages -d` starts. */
const LAZY_DAEMON_ENV = "AMBER_LAZY_DAEMON";

/**
 * restore --lazy-pages -d: the tree must run and this command return while
 * its pages are still being served, so the whole restore runs in a second
 * amber (same arguments but -d), in its own session, which stays until
 * every page is in. This one waits until the tree runs and then returns,
 * as -d does. The other's messages go to the -o log, and to stderr only if
 * that is a terminal; so a failed restore is told here by the code only.
 */
async function startLazyDaemon(json: boolean): Promise<number> {
  const args = Deno.args.filter((a) => a !== "-d" && a !== "--restore-detached");
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "--config",
      new URL("./deno.json", import.meta.url).pathname,
      new URL(import.meta.url).pathname,
      ...args,
    ],
    env: { [LAZY_DAEMON_ENV]: "1" },
    stdin: args.includes("--stream") ? "inherit" : "null",
    stdout: "piped",
    // Not a pipe of the caller's: it would stay open, and `amber restore -d | ...` never end.
    // Its failures are in the -o log (and on the terminal).
    stderr: Deno.stderr.isTerminal() ? "inherit" : "null",
    detached: true,
  }).spawn();
  const reader = child.stdout.getReader();
  let text = "";
  while (!text.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) break;
    text += new TextDecoder().decode(value);
  }
  reader.releaseLock();
  await child.stdout.cancel();
  if (!text.includes("\n")) {
    const code = (await child.status).code || 1;
    if (!Deno.stderr.isTerminal()) {
      console.error(
        "amber: restore --lazy-pages -d: the restore failed (its reason is in the -o log)",
      );
    }
    return code;
  }
  child.unref();
  const result = JSON.parse(text.slice(0, text.indexOf("\n")));
  if (json) printJson({ ...result, lazyServer: child.pid });
  return 0;
}

function printJson(v: unknown): void {
  console.log(JSON.stringify(v));
}

/** A failure as `--json` prints it. */
function errorJson(e: unknown): object {
  return e instanceof AmberError
    ? e.toJSON()
    : { message: e instanceof Error ? e.message : String(e), code: "failed" };
}

const COMMANDS: Command[] = [
  {
    name: "dump",
    args: "-t PID -D DIR",
    summary: "freeze PID and its descendants and write their images into DIR; then end them",
    flags: [
      { long: "tree", short: "t", value: "PID", help: "root of the tree to dump" },
      IMAGES_DIR,
      {
        long: "leave-running",
        short: "R",
        help: "let the tree run on after the dump (it is killed otherwise)",
      },
      SHELL_JOB,
      {
        long: "ghost-limit",
        value: "SIZE",
        help: "largest deleted file whose contents go into the images (default 1M; K, M, G)",
      },
      AIO_TIMEOUT,
      FILE_LOCKS,
      TCP_ESTABLISHED,
      ACTION_SCRIPT,
      EXT_UNIX_SK,
      {
        long: "external",
        value: "RESOURCE",
        multiple: true,
        help: "pipe:[INO] or unix[INO] (a socket:[INO]) leading outside the tree: recorded as " +
          "external",
      },
      PREV_IMAGES_DIR,
      {
        long: "track-mem",
        help: "store only the pages written since --prev-images-dir (a pre-dump) was dumped",
      },
      {
        long: "stream",
        help: "write the images to stdout as one stream, no -D (for restore --stream)",
      },
      {
        long: "page-server",
        help: "send the images to amber page-server at --address/--port, no -D",
      },
      {
        long: "lazy-pages",
        help: "leave anonymous memory out of DIR and serve it on --address/--port to restore " +
          "--lazy-pages --page-server; the tree stays frozen, ends once all is there, resumes " +
          "if the connection ends before",
      },
      ADDRESS,
      PORT,
      VERBOSE,
      LOG_FILE,
      JSON_OUT,
    ],
    run(v, positionals) {
      noPositionals("dump", positionals);
      const elsewhere = dumpElsewhere(v);
      const pid = pidArg(v.tree);
      const dir = (elsewhere.stream || elsewhere.pageServer) && !elsewhere.lazyPages
        ? v["images-dir"] as string | undefined
        : dirArg(v["images-dir"], "dump");
      return withLog(v, async ({ detail, progress }) => {
        const stats = await dump({
          pid,
          dir,
          ...elsewhere,
          leaveRunning: !!v["leave-running"],
          shellJob: !!v["shell-job"],
          ghostLimit: v["ghost-limit"] === undefined ? undefined : sizeArg(v["ghost-limit"]),
          aioTimeoutMs: aioTimeoutArg(v),
          tcpEstablished: !!v["tcp-established"],
          external: externalArgs(v.external),
          extUnixSk: !!v["ext-unix-sk"],
          prevImagesDir: v["prev-images-dir"] as string | undefined,
          trackMem: !!v["track-mem"],
          actionScripts: actionScripts(v),
          log: detail,
          progress: progress?.callback,
          // The command ends right after: the kernel finishes the tree's teardown.
          noWaitForEnd: true,
        });
        progress?.clear();
        detail(
          `dumped ${stats.pids.length} process(es) ${stats.pids.join(" ")}: ` +
            `${(stats.pageBytes / 1048576).toFixed(1)} MiB of pages, ` +
            `frozen ${stats.frozenMs.toFixed(0)} ms, total ${stats.totalMs.toFixed(0)} ms, ` +
            peakMemoryText(stats.peakMemoryBytes),
        );
        const { dir: imagesDir, ...rest } = stats;
        if (v.json) printJson({ ok: true, command: "dump", ...rest, imagesDir });
        return 0;
      });
    },
  },
  {
    name: "pre-dump",
    args: "-t PID -D DIR",
    summary:
      "dump PID's tree and let it run with write tracking armed, for a later --track-mem dump",
    flags: [
      { long: "tree", short: "t", value: "PID", help: "root of the tree to pre-dump" },
      IMAGES_DIR,
      PREV_IMAGES_DIR,
      {
        long: "track-mem",
        help: "accepted for CRIU's sake: a pre-dump always tracks memory",
      },
      SHELL_JOB,
      FILE_LOCKS,
      TCP_ESTABLISHED,
      AIO_TIMEOUT,
      VERBOSE,
      LOG_FILE,
      JSON_OUT,
    ],
    run(v, positionals) {
      noPositionals("pre-dump", positionals);
      const pid = pidArg(v.tree), dir = dirArg(v["images-dir"], "pre-dump");
      return withLog(v, async ({ detail, progress }) => {
        const stats = await preDump({
          pid,
          dir,
          prevImagesDir: v["prev-images-dir"] as string | undefined,
          shellJob: !!v["shell-job"],
          tcpEstablished: !!v["tcp-established"],
          aioTimeoutMs: aioTimeoutArg(v),
          log: detail,
          progress: progress?.callback,
        });
        progress?.clear();
        detail(
          `pre-dumped ${stats.pids.length} process(es): ` +
            `${(stats.pageBytes / 1048576).toFixed(1)} MiB of pages, frozen ${
              stats.frozenMs.toFixed(0)
            } ms`,
        );
        const { dir: imagesDir, ...rest } = stats;
        if (v.json) printJson({ ok: true, command: "pre-dump", ...rest, imagesDir });
        return 0;
      });
    },
  },
  {
    name: "restore",
    args: "-D DIR",
    summary: "rebuild the tree saved in DIR with the same pids; wait for its root unless -d",
    flags: [
      IMAGES_DIR,
      {
        long: "restore-detached",
        short: "d",
        help: "return once the tree runs instead of waiting for its root",
      },
      { long: "pidfile", value: "FILE", help: "write the root's pid into FILE" },
      SHELL_JOB,
      {
        long: "allow-changed-files",
        help: "restore even if open files changed since the dump (they are used as they are now)",
      },
      FILE_LOCKS,
      TCP_ESTABLISHED,
      ACTION_SCRIPT,
      { ...EXT_UNIX_SK, help: "accepted as CRIU's (the images say which sockets reconnect)" },
      {
        long: "inherit-fd",
        value: "fd[N]:RESOURCE",
        multiple: true,
        help:
          "amber's fd N takes the place of the external RESOURCE (fd[7]:pipe:[12], fd[7]:socket:[12])",
      },
      {
        long: "stream",
        help: "read the images from stdin (dump --stream); -D DIR keeps them there",
      },
      {
        long: "lazy-pages",
        help: "run the tree at once and serve its anonymous memory as it is touched, " +
          "copying the rest meanwhile; amber (with -d, a background amber) stays until all is in",
      },
      {
        long: "page-server",
        help: "with --lazy-pages: take the pages dump --lazy-pages left out from that amber " +
          "at --address/--port",
      },
      { ...ADDRESS, help: "the dumping amber's address (dump --lazy-pages)" },
      { ...PORT, help: "the dumping amber's TCP port" },
      {
        long: "timeout",
        value: "SEC",
        help: "with --page-server: how long the dumping amber may take to answer (default 30); " +
          "past it the tree is killed",
      },
      VERBOSE,
      LOG_FILE,
      JSON_OUT,
    ],
    run(v, positionals) {
      noPositionals("restore", positionals);
      if (v.stream && Deno.stdin.isTerminal()) {
        throw new UsageError(
          "--stream reads the images from stdin: give it a pipe, not a terminal",
        );
      }
      const dir = v.stream
        ? v["images-dir"] as string | undefined
        : dirArg(v["images-dir"], "restore");
      const lazyPages = !!v["lazy-pages"];
      const timeout = secondsArg(v.timeout);
      const pageServer = v["page-server"]
        ? {
          address: addressArg(v.address, "restore"),
          port: portArg(v.port, "restore"),
          timeoutMs: timeout === undefined ? undefined : timeout * 1000,
        }
        : undefined;
      if (!pageServer && timeout !== undefined) {
        throw new UsageError("--timeout goes with --page-server; see amber restore --help");
      }
      if (!pageServer && (v.address !== undefined || v.port !== undefined)) {
        throw new UsageError(
          "--address and --port go with --page-server; see amber restore --help",
        );
      }
      if (pageServer && !lazyPages) {
        throw new UsageError("--page-server serves lazy pages: it needs --lazy-pages");
      }
      const daemon = lazyPages && Deno.env.get(LAZY_DAEMON_ENV) === "1";
      if (lazyPages && v["restore-detached"] && !daemon) return startLazyDaemon(!!v.json);
      return withLog(v, async ({ detail, log, progress }) => {
        const t0 = performance.now();
        const result = await restore({
          lazyPages,
          pageServer,
          dir,
          stream: v.stream ? Deno.stdin : undefined,
          // The background amber of -d: the tree is not its child, it waits only for the pages.
          detached: !!v["restore-detached"] || daemon,
          pidfile: v.pidfile as string | undefined,
          shellJob: !!v["shell-job"],
          allowChangedFiles: !!v["allow-changed-files"],
          inheritFds: inheritFdArgs(v["inherit-fd"]),
          actionScripts: actionScripts(v),
          log: detail,
          progress: progress?.callback,
        });
        log?.(`restored ${result.pids.join(" ")}`);
        const { lazy: _, ...shown } = result;
        if (daemon) {
          // To the amber that started this one (restore -d): the tree runs.
          printJson({ ok: true, command: "restore", ...shown, totalMs: performance.now() - t0 });
          const stats = await result.lazy!;
          log?.(`lazy pages: all in after ${stats.allInMs.toFixed(0)} ms`);
          return 0;
        }
        if (v.json) {
          printJson({
            ok: true,
            command: "restore",
            ...shown,
            totalMs: performance.now() - t0,
            imagesDir: dir,
          });
        }
        return result.exitCode ?? 0;
      });
    },
  },
  {
    name: "page-server",
    args: "--address ADDR --port PORT -D DIR",
    summary: "receive one dump (dump --page-server) over TCP into DIR, then exit",
    flags: [
      { ...ADDRESS, help: "address to listen on (no default: choose the network it is open to)" },
      { ...PORT, help: "TCP port to listen on (0: any free one, printed)" },
      { ...IMAGES_DIR, help: "images directory the dump is written into" },
      JSON_OUT,
    ],
    async run(v, positionals) {
      noPositionals("page-server", positionals);
      const address = addressArg(v.address, "page-server");
      const port = portArg(v.port, "page-server", true);
      const dir = dirArg(v["images-dir"], "page-server");
      const got = await pageServer({
        address,
        port,
        dir,
        // On stderr, as progress is: stdout is for the result.
        listening: (p) => console.error(`amber page-server: listening on ${address}:${p}`),
      });
      if (v.json) printJson({ ok: true, command: "page-server", ...got });
      else {console.log(
          `received ${got.files} files, ${got.bytes} bytes from ${got.peer} into ${dir}`,
        );}
      return 0;
    },
  },
  {
    name: "migrate",
    args: "-t PID --to HOST:PORT",
    summary: "move PID's running tree to amber migrate-receive at HOST:PORT (pre-copy rounds)",
    flags: [
      { long: "tree", short: "t", value: "PID", help: "root of the tree to move" },
      { long: "to", value: "HOST:PORT", help: "where amber migrate-receive listens" },
      {
        long: "max-rounds",
        value: "N",
        help: "pre-copy rounds at most before the final one (default 5, up to 31 while an " +
          "eager receiver still builds the tree ahead; 0: none)",
      },
      {
        long: "timeout",
        value: "SEC",
        help: "how long the receiver may go without reading or answering (default 60); past " +
          "it the tree resumes here",
      },
      SHELL_JOB,
      {
        ...TCP_ESTABLISHED,
        help: "TCP sockets move too (TCP_REPAIR); their addresses must be up there by its " +
          "restore (--action-script)",
      },
      ACTION_SCRIPT,
      VERBOSE,
      LOG_FILE,
      JSON_OUT,
    ],
    run(v, positionals) {
      noPositionals("migrate", positionals);
      const pid = pidArg(v.tree);
      const to = hostPortArg(v.to);
      const rounds = v["max-rounds"];
      if (rounds !== undefined && !/^\d{1,2}$/.test(String(rounds))) {
        throw new UsageError(`--max-rounds needs a number, got ${rounds}`);
      }
      const timeout = secondsArg(v.timeout);
      return withLog(v, async ({ detail }) => {
        const r = await migrate({
          pid,
          to,
          timeoutMs: timeout === undefined ? undefined : timeout * 1000,
          maxRounds: rounds === undefined ? undefined : Number(rounds),
          shellJob: !!v["shell-job"],
          tcpEstablished: !!v["tcp-established"],
          actionScripts: actionScripts(v),
          log: detail,
        });
        detail(
          `migrated ${r.pids.join(" ")} after ${r.preCopyRounds} pre-copy round(s): ` +
            `${r.finalPageBytes} bytes of pages in the final round, frozen ` +
            `${r.frozenMs.toFixed(0)} ms`,
        );
        if (v.json) printJson({ ok: true, command: "migrate", ...r });
        return 0;
      });
    },
  },
  {
    name: "migrate-receive",
    args: "--port PORT [-D DIR]",
    summary: "wait for one amber migrate, restore the tree it sends here, then exit",
    flags: [
      { ...ADDRESS, help: "address to listen on (default 0.0.0.0)" },
      { ...PORT, help: "TCP port to listen on (0: any free one, printed)" },
      { ...IMAGES_DIR, help: "keep the rounds in DIR/round-N (default: a private one, removed)" },
      {
        long: "lazy-pages",
        help: "run the tree before its anonymous memory is in and serve it from the rounds as " +
          "it is touched (restore --lazy-pages); exit once all is in",
      },
      ACTION_SCRIPT,
      VERBOSE,
      LOG_FILE,
      JSON_OUT,
    ],
    run(v, positionals) {
      noPositionals("migrate-receive", positionals);
      const address = typeof v.address === "string" && v.address ? v.address : "0.0.0.0";
      const port = portArg(v.port, "migrate-receive", true);
      return withLog(v, async ({ detail }) => {
        const got = await migrateReceive({
          address,
          port,
          dir: v["images-dir"] as string | undefined,
          lazyPages: !!v["lazy-pages"],
          actionScripts: actionScripts(v),
          log: detail,
          listening: (p) => console.error(`amber migrate-receive: listening on ${address}:${p}`),
        });
        if (v.json) printJson({ ok: true, command: "migrate-receive", ...got });
        else console.log(`restored ${got.pids.join(" ")} from ${got.peer} (${got.rounds} rounds)`);
        return 0;
      });
    },
  },
  {
    name: "show",
    args: "DIR",
    summary: "print a summary of the images in DIR and whether they can be restored here",
    flags: [
      { long: "json", help: "every image decoded (or the --diff), as one JSON document" },
      {
        long: "tree",
        help: "one line per process: threads, memory, descriptor kinds, why not restorable",
      },
      {
        long: "diff",
        value: "DIR2",
        help: "what changed from DIR to DIR2 (two checkpoints of one job): processes, " +
          "mappings, descriptors, pages",
      },
    ],
    async run(v, positionals) {
      if (positionals.length !== 1) {
        throw new UsageError("show takes one images directory; see amber show --help");
      }
      if (typeof v.diff === "string") {
        const d = await diffImages(positionals[0], v.diff);
        console.log(v.json ? JSON.stringify(d, null, 2) : formatDiff(d));
        return 0;
      }
      console.log(await show(positionals[0], { json: !!v.json, tree: !!v.tree }));
      return 0;
    },
  },
  {
    name: "run",
    args: "--every PERIOD -D DIR -- CMD [ARGS...]",
    summary: "start CMD and checkpoint it every PERIOD into DIR/ckpt-N; exit with its status",
    flags: [
      {
        long: "every",
        value: "PERIOD",
        help: "time between checkpoints: 10m, 30s, 500ms, 2h (like dmtcp_launch --interval)",
      },
      { long: "keep", value: "K", help: "keep the newest K complete checkpoints (default 3)" },
      {
        ...IMAGES_DIR,
        help: "checkpoints directory: DIR/ckpt-N, DIR/latest names the newest complete one",
      },
      {
        ...SHELL_JOB,
        help: "the job keeps amber's session and stdin (dumped with --shell-job)",
      },
      VERBOSE,
      LOG_FILE,
      JSON_OUT,
    ],
    run(v, positionals) {
      const everyText = v.every;
      if (typeof everyText !== "string") {
        throw new UsageError("--every PERIOD is required; see amber run --help");
      }
      const keepText = (v.keep as string | undefined) ?? "3";
      if (!/^\d+$/.test(keepText) || Number(keepText) < 1) {
        throw new UsageError(`--keep needs a number, at least 1, got ${keepText}`);
      }
      const dir = dirArg(v["images-dir"], "run");
      if (!positionals.length) {
        throw new UsageError("run needs -- CMD [ARGS...]; see amber run --help");
      }
      return withLog(v, async ({ detail, progress }) => {
        progress?.[Symbol.dispose](); // the job owns the terminal
        const result = await run({
          command: positionals,
          dir,
          everyMs: parseDuration(everyText),
          keep: Number(keepText),
          shellJob: !!v["shell-job"],
          log: detail,
          onCheckpoint: (c) => {
            if (!c.ok) {
              console.error(`amber run: checkpoint ${c.n} failed: ${escapeText(c.error ?? "")}`);
            } else detail(`checkpoint ${c.n} complete: ${c.dir}`);
          },
        });
        if (v.json) printJson({ ok: true, command: "run", ...result });
        return result.exitCode;
      });
    },
  },
  {
    name: "check",
    args: "",
    summary: "test each kernel feature amber needs; exit 0 only if dump and restore can work",
    flags: [JSON_OUT],
    run(v, positionals) {
      noPositionals("check", positionals);
      const report = check();
      if (v.json) printJson({ command: "check", ...report });
      else console.log(formatCheck(report));
      return Promise.resolve(report.ok ? 0 : 1);
    },
  },
];

/** Flags of dump, pre-dump and restore spelled (and meaning) as CRIU's own. */
const CRIU_FLAGS = new Set([
  "tree",
  "images-dir",
  "leave-running",
  "shell-job",
  "verbose",
  "log-file",
  "file-locks",
  "prev-images-dir",
  "track-mem",
  "tcp-established",
  "action-script",
  "ext-unix-sk",
  "ghost-limit",
  "external",
  "restore-detached",
  "pidfile",
  "inherit-fd",
  "stream",
  "lazy-pages",
  "page-server",
  "address",
  "port",
]);
const CRIU_COMMANDS = new Set(["dump", "pre-dump", "restore", "page-server"]);

function commandHelp(cmd: Command): string {
  const lines = [
    `usage: amber ${cmd.name}${cmd.args ? " " + cmd.args : ""} [options]`,
    "",
    cmd.summary,
  ];
  if (cmd.flags.length) lines.push("", "options:");
  for (const f of cmd.flags) {
    const names = `${f.short ? `-${f.short}, ` : "    "}--${f.long}${f.value ? " " + f.value : ""}`;
    const criu = CRIU_COMMANDS.has(cmd.name) && CRIU_FLAGS.has(f.long) ? " (CRIU's)" : "";
    lines.push(`  ${names.padEnd(28)} ${f.help}${criu}`);
  }
  if (CRIU_COMMANDS.has(cmd.name)) {
    lines.push(
      "",
      "(CRIU's): spelled and meaning as in `criu " + cmd.name + "`; docs/COMMANDS.md compares.",
    );
  }
  lines.push("", "exit codes: 0 success, 1 failure, 2 usage error");
  return lines.join("\n");
}

function overview(): string {
  return [
    "amber: checkpoint/restore of running Linux process trees (flags follow CRIU's)",
    "",
    ...COMMANDS.map((c) => `  amber ${`${c.name} ${c.args}`.padEnd(22)} ${c.summary}`),
    "",
    "amber help COMMAND, or amber COMMAND --help, lists a command's options.",
  ].join("\n");
}

/** CRIU's commands amber does not have as such, and what does their work here. */
const CRIU_ELSEWHERE: Record<string, string> = {
  "lazy-pages": "restore serves lazy pages itself: amber restore -D DIR --lazy-pages " +
    "[--page-server --address A --port P]",
};

function findCommand(name: string): Command {
  const cmd = COMMANDS.find((c) => c.name === name);
  if (!cmd && Object.hasOwn(CRIU_ELSEWHERE, name)) {
    throw new UsageError(`no command ${name}: ${CRIU_ELSEWHERE[name]}`);
  }
  if (!cmd) throw new UsageError(`unknown command ${name}; see amber help`);
  return cmd;
}

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (!name) throw new UsageError("no command given; see amber help");
  if (name === "help" || name === "--help" || name === "-h") {
    console.log(rest[0] ? commandHelp(findCommand(rest[0])) : overview());
    return 0;
  }
  const cmd = findCommand(name);
  // After `--` come a job's own arguments (amber run).
  const dashes = rest.indexOf("--");
  const own = dashes < 0 ? rest : rest.slice(0, dashes);
  const json = own.includes("--json") && cmd.flags.some((f) => f.long === "json");
  try {
    const { values, positionals } = parse(cmd, rest);
    if (values.help) {
      console.log(commandHelp(cmd));
      return 0;
    }
    return await cmd.run(values, positionals);
  } catch (e) {
    if (json) printJson({ ok: false, command: cmd.name, error: errorJson(e) });
    throw e;
  }
}

if (import.meta.main) {
  let code: number;
  try {
    code = await main(Deno.args);
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`amber: ${escapeText(e.message)}`);
      code = 2;
    } else if (e instanceof InterruptedError) {
      console.error(`amber: ${e.message}; what was started was undone`);
      code = e.exitCode;
    } else {
      // Messages quote image contents: never let them drive the terminal.
      console.error(`amber: ${escapeText(e instanceof Error ? e.message : String(e))}`);
      if (Deno.env.get("AMBER_DEBUG")) console.error(e);
      code = 1;
    }
  }
  Deno.exit(code);
}
