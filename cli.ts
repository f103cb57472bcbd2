/**
 * amber's command line: a thin layer over mod.ts with CRIU's flag names.
 *
 *   amber dump -t PID -D DIR [-R|--leave-running] [--shell-job] [--ghost-limit SIZE] [-v]
 *   amber restore -D DIR [-d|--restore-detached] [--pidfile FILE] [--shell-job]
 *                [--allow-changed-files] [-v]
 *   amber show DIR [--json]
 *   amber check
 */
import { parseArgs, type ParseArgsConfig } from "node:util";
import { check, dump, formatCheck, restore, show, UsageError } from "./mod.ts";

const USAGE = `usage:
  amber dump -t PID -D DIR [-R|--leave-running] [--shell-job] [--ghost-limit SIZE] [-v]
  amber restore -D DIR [-d|--restore-detached] [--pidfile FILE] [--shell-job]
                [--allow-changed-files] [-v]
  amber show DIR [--json]
  amber check`;

type Values = Record<string, string | boolean | undefined>;

function parse(
  args: string[],
  options: ParseArgsConfig["options"],
): { values: Values; positionals: string[] } {
  try {
    const r = parseArgs({ args, options, allowPositionals: true, strict: true });
    return { values: r.values as Values, positionals: r.positionals };
  } catch (e) {
    throw new UsageError(e instanceof Error ? e.message : String(e));
  }
}

function pidArg(v: unknown): number {
  if (typeof v !== "string" || !/^\d+$/.test(v)) {
    throw new UsageError(`-t needs a numeric pid, got ${v ?? "nothing"}`);
  }
  return Number(v);
}

/** A size in bytes, with an optional K, M or G suffix (CRIU's --ghost-limit 10M). */
function sizeArg(v: unknown): number {
  const m = typeof v === "string" ? /^(\d+)([KMG]?)$/i.exec(v) : null;
  if (!m) throw new UsageError(`--ghost-limit needs a size like 1048576 or 10M, got ${v}`);
  return Number(m[1]) * ({ "": 1, K: 1 << 10, M: 1 << 20, G: 1 << 30 }[m[2].toUpperCase()] ?? 1);
}

function dirArg(v: unknown, flag = "-D"): string {
  if (typeof v !== "string" || !v) throw new UsageError(`${flag} DIR is required`);
  return v;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case "dump": {
      const { values: v, positionals } = parse(rest, {
        tree: { type: "string", short: "t" },
        "images-dir": { type: "string", short: "D" },
        "leave-running": { type: "boolean", short: "R" },
        "shell-job": { type: "boolean" },
        "ghost-limit": { type: "string" },
        verbose: { type: "boolean", short: "v" },
      });
      if (positionals.length) throw new UsageError(`unexpected argument ${positionals[0]}`);
      const stats = await dump({
        pid: pidArg(v.tree),
        dir: dirArg(v["images-dir"]),
        leaveRunning: !!v["leave-running"],
        shellJob: !!v["shell-job"],
        ghostLimit: v["ghost-limit"] === undefined ? undefined : sizeArg(v["ghost-limit"]),
        verbose: !!v.verbose,
      });
      if (v.verbose) {
        console.error(
          `dumped ${stats.pids.length} process(es) ${stats.pids.join(" ")}: ` +
            `${(stats.pageBytes / 1048576).toFixed(1)} MiB of pages, frozen ${
              stats.frozenMs.toFixed(0)
            } ms, ` +
            `total ${stats.totalMs.toFixed(0)} ms`,
        );
      }
      return 0;
    }
    case "restore": {
      const { values: v, positionals } = parse(rest, {
        "images-dir": { type: "string", short: "D" },
        "restore-detached": { type: "boolean", short: "d" },
        pidfile: { type: "string" },
        "shell-job": { type: "boolean" },
        "allow-changed-files": { type: "boolean" },
        verbose: { type: "boolean", short: "v" },
      });
      if (positionals.length) throw new UsageError(`unexpected argument ${positionals[0]}`);
      const result = await restore({
        dir: dirArg(v["images-dir"]),
        detached: !!v["restore-detached"],
        pidfile: v.pidfile as string | undefined,
        shellJob: !!v["shell-job"],
        allowChangedFiles: !!v["allow-changed-files"],
        verbose: !!v.verbose,
      });
      return result.exitCode ?? 0;
    }
    case "show": {
      const { values: v, positionals } = parse(rest, { json: { type: "boolean" } });
      if (positionals.length !== 1) throw new UsageError("show takes one images directory");
      console.log(await show(positionals[0], { json: !!v.json }));
      return 0;
    }
    case "check": {
      parse(rest, {});
      const report = check();
      console.log(formatCheck(report));
      return report.ok ? 0 : 1;
    }
    case "-h":
    case "--help":
    case "help":
      console.log(USAGE);
      return 0;
    default:
      throw new UsageError(command ? `unknown command ${command}` : "no command given");
  }
}

if (import.meta.main) {
  let code: number;
  try {
    code = await main(Deno.args);
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`amber: ${e.message}\n${USAGE}`);
      code = 2;
    } else {
      console.error(`amber: ${e instanceof Error ? e.message : e}`);
      if (Deno.env.get("AMBER_DEBUG")) console.error(e);
      code = 1;
    }
  }
  Deno.exit(code);
}
