/**
 * Two "hosts" on this machine for migration (issue 13): network
 * namespaces joined by a veth pair, amber run in one of them, and
 * `amber migrate-receive` run in the other, in a pid namespace of its own
 * (on one machine the source tree holds the pids until the end). Used by
 * tests/migrate_test.ts and bench/bench.ts.
 */
import {
  type AmberResult,
  amberVia,
  CLI,
  commandWorks,
  DENO,
  readLines,
  ROOT,
  waitFor,
} from "./_util.ts";

export const SRC_ADDR = "10.213.0.1", DST_ADDR = "10.213.0.2";
export const PORT = 27013;

export const usable = Deno.uid() === 0 && await commandWorks("ip", "netns", "list") &&
  await commandWorks("unshare", "--pid", "--fork", "--mount-proc", "true");

export interface Hosts extends AsyncDisposable {
  src: string;
  dst: string;
}

let hostsMade = 0;

async function ip(...args: string[]): Promise<void> {
  const r = await new Deno.Command("ip", { args, stdout: "null", stderr: "piped" }).output();
  if (!r.success) throw new Error(`ip ${args.join(" ")}: ${new TextDecoder().decode(r.stderr)}`);
}

/** Two network namespaces joined by a veth pair, SRC_ADDR on one side, DST_ADDR on the other. */
export async function makeHosts(): Promise<Hosts> {
  const tag = `amig${Deno.pid}x${hostsMade++}`;
  const src = `${tag}s`, dst = `${tag}d`;
  await ip("netns", "add", src);
  await ip("netns", "add", dst);
  const hosts: Hosts = {
    src,
    dst,
    async [Symbol.asyncDispose]() {
      await ip("netns", "del", src).catch(() => {});
      await ip("netns", "del", dst).catch(() => {});
    },
  };
  try {
    await ip(
      "link",
      "add",
      `${tag}a`,
      "netns",
      src,
      "type",
      "veth",
      "peer",
      "name",
      `${tag}b`,
      "netns",
      dst,
    );
    await ip("-n", src, "addr", "add", `${SRC_ADDR}/24`, "dev", `${tag}a`);
    await ip("-n", dst, "addr", "add", `${DST_ADDR}/24`, "dev", `${tag}b`);
    for (const [ns, dev] of [[src, `${tag}a`], [dst, `${tag}b`]]) {
      await ip("-n", ns, "link", "set", dev, "up");
      await ip("-n", ns, "link", "set", "lo", "up");
    }
  } catch (e) {
    await hosts[Symbol.asyncDispose]();
    throw e;
  }
  return hosts;
}

/** The address a service moves with it between the hosts (on lo, /32). */
export const SERVICE_ADDR = "10.213.9.1";
const CLIENT_ADDR = "10.213.1.1", SRC_SIDE = "10.213.1.2";
const CLIENT_ADDR2 = "10.213.2.1", DST_SIDE = "10.213.2.2";

/** A third namespace whose clients reach SERVICE_ADDR, and how to move it (disposing deletes it). */
export interface ClientNet extends AsyncDisposable {
  /** The client's network namespace. */
  cli: string;
  /** Action script moving SERVICE_ADDR out of the source (`amber migrate --action-script`). */
  srcScript: string;
  /** Action script bringing it up at the destination (`migrate-receive --action-script`). */
  dstScript: string;
  /** Where the scripts note each action they were run for, one line each ("ACTION PID"). */
  srcLog: string;
  dstLog: string;
}

/**
 * A client "host" beside the two: a namespace with a veth pair to each,
 * routing SERVICE_ADDR (on the source's lo) through the source. The
 * scripts, written into `dir`, move the address as an operator would: the
 * source drops it at post-dump (and takes it back at network-unlock, when
 * the tree resumes there), the destination brings it up and switches the
 * client's route at pre-restore.
 */
export async function addClient(hosts: Hosts, dir: string): Promise<ClientNet> {
  const cli = `${hosts.src.slice(0, -1)}c`;
  await ip("netns", "add", cli);
  const remove = () => ip("netns", "del", cli).catch(() => {});
  try {
    return await setUpClient(hosts, dir, cli, remove);
  } catch (e) {
    await remove();
    throw e;
  }
}

async function setUpClient(
  hosts: Hosts,
  dir: string,
  cli: string,
  remove: () => Promise<void>,
): Promise<ClientNet> {
  const tag = cli.slice(0, -1);
  const pair = async (ns: string, dev: string, mine: string, theirs: string) => {
    await ip(
      "link",
      "add",
      `${dev}c`,
      "netns",
      cli,
      "type",
      "veth",
      "peer",
      "name",
      dev,
      "netns",
      ns,
    );
    await ip("-n", cli, "addr", "add", `${mine}/24`, "dev", `${dev}c`);
    await ip("-n", ns, "addr", "add", `${theirs}/24`, "dev", dev);
    await ip("-n", cli, "link", "set", `${dev}c`, "up");
    await ip("-n", ns, "link", "set", dev, "up");
  };
  await pair(hosts.src, `${tag}e`, CLIENT_ADDR, SRC_SIDE);
  await pair(hosts.dst, `${tag}f`, CLIENT_ADDR2, DST_SIDE);
  await ip("-n", cli, "link", "set", "lo", "up");
  await ip("-n", hosts.src, "addr", "add", `${SERVICE_ADDR}/32`, "dev", "lo");
  await ip("-n", cli, "route", "add", `${SERVICE_ADDR}/32`, "via", SRC_SIDE);
  // The client's address is on its side of the source's pair: the destination answers it
  // through its own.
  await ip("-n", hosts.dst, "route", "add", `${CLIENT_ADDR}/32`, "via", CLIENT_ADDR2);
  const srcLog = `${dir}/src-actions.txt`, dstLog = `${dir}/dst-actions.txt`;
  const script = (path: string, log: string, cases: string) => {
    Deno.writeTextFileSync(
      path,
      `#!/bin/sh\necho "$CRTOOLS_SCRIPT_ACTION $CRTOOLS_INIT_PID" >> ${log}\n` +
        `case "$CRTOOLS_SCRIPT_ACTION" in\n${cases}esac\n`,
      { mode: 0o755 },
    );
    return path;
  };
  const route = (via: string) => `ip -n ${cli} route replace ${SERVICE_ADDR}/32 via ${via}`;
  return {
    cli,
    srcLog,
    dstLog,
    [Symbol.asyncDispose]: remove,
    srcScript: script(
      `${dir}/src-actions.sh`,
      srcLog,
      `post-dump) ip addr del ${SERVICE_ADDR}/32 dev lo ;;\n` +
        `network-unlock) ip addr replace ${SERVICE_ADDR}/32 dev lo && ${route(SRC_SIDE)} ;;\n`,
    ),
    dstScript: script(
      `${dir}/dst-actions.sh`,
      dstLog,
      `pre-restore) ip addr add ${SERVICE_ADDR}/32 dev lo && ${route(DST_SIDE)} ;;\n`,
    ),
  };
}

export function netnsId(name: string): string {
  return `net:[${Deno.statSync(`/run/netns/${name}`).ino}]`;
}

/** amber in network namespace `ns`, as amber() runs it elsewhere. */
export function amberIn(ns: string, args: string[]): Promise<AmberResult> {
  return amberVia(["nsenter", `--net=/run/netns/${ns}`, "--"], args);
}

/** An amber on the destination "host", in a pid namespace of its own. */
export interface Receiver extends AsyncDisposable {
  /** Its --json line and exit status, once it ended. */
  result(): Promise<{ code: number; json: Record<string, unknown> }>;
  /** What it wrote on stderr so far. */
  stderr(): string;
}

/** `amber migrate-receive` on the destination "host", listening on DST_ADDR:PORT. */
export function startReceiver(
  hosts: Hosts,
  dir: string,
  extra: string[] = [],
  env: Record<string, string> = {},
): Promise<Receiver> {
  const args = ["migrate-receive", "--address", DST_ADDR, "--port", String(PORT), "--json"];
  return startAtDestination(hosts, dir, [...args, ...extra], env, "listening on");
}

/**
 * `amber ARGS` on the destination "host" in a pid namespace of its own;
 * returns once its stderr has a line with `ready` (if given).
 */
export async function startAtDestination(
  hosts: Hosts,
  dir: string,
  args: string[],
  env: Record<string, string> = {},
  ready?: string,
): Promise<Receiver> {
  const out = `${dir}/recv.out`, err = `${dir}/recv.err`, rc = `${dir}/recv.rc`;
  Deno.writeTextFileSync(err, "");
  // The shell stays as the pid namespace's init: the restored tree lives on after amber exits.
  const script = `"$@" >${out} 2>${err}; echo $? >${rc}; exec sleep 1000000`;
  const child = new Deno.Command("nsenter", {
    args: [
      `--net=/run/netns/${hosts.dst}`,
      "--",
      "unshare",
      "--pid",
      "--fork",
      "--mount-proc",
      "--kill-child",
      "--",
      "sh",
      "-c",
      script,
      "receiver",
      DENO,
      "run",
      "-A",
      CLI,
      ...args,
    ],
    cwd: ROOT,
    // What it keeps in temporary directories (a receiver's rounds: GiBs) goes with `dir` if it
    // is killed before it can remove them.
    env: { NO_COLOR: "1", TMPDIR: dir, ...env },
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  if (ready) {
    await waitFor(
      async () => (await readLines(err)).some((l) => l.includes(ready)) || undefined,
      () => `${args[0]} ${ready}: ${Deno.readTextFileSync(err)}`,
      60_000,
    ).catch(async (e) => {
      child.kill("SIGKILL");
      await child.status;
      throw e;
    });
  }
  return {
    async result() {
      await waitFor(async () => (await readLines(rc)).length > 0 || undefined, "receiver", 60_000);
      const code = Number((await readLines(rc))[0]);
      const json = JSON.parse((await readLines(out)).at(-1) ?? "{}");
      return { code, json };
    },
    stderr: () => Deno.readTextFileSync(err),
    async [Symbol.asyncDispose]() {
      // Its pid namespace's init goes, and with it whatever runs there.
      child.kill("SIGKILL");
      await child.status;
    },
  };
}

/** The host's pid of the process that is `inner` in a child pid namespace, running `argv0`. */
export function hostPid(inner: number, argv0: string): number | undefined {
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const ns = /^NSpid:\s*(.*)$/m.exec(Deno.readTextFileSync(`/proc/${e.name}/status`))?.[1];
      const ids = ns?.trim().split(/\s+/).map(Number) ?? [];
      const argv = Deno.readTextFileSync(`/proc/${e.name}/cmdline`).split("\0");
      if (ids.length > 1 && ids.at(-1) === inner && argv[0] === argv0) return Number(e.name);
    } catch { /* gone */ }
  }
}
