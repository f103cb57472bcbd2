/**
 * Inet gaps (issue 11): link-local IPv6 addresses keep their scope id,
 * multicast group memberships are refused rather than lost, and a lock
 * table whose dumping amber died is removed by the next amber run.
 * Run with: deno test -A tests/net_gaps_test.ts
 */
import assert from "node:assert/strict";
import {
  amber,
  assertExit,
  assertOneLineError,
  commandWorks,
  dumpArgs,
  exists,
  isAlive,
  killAndReap,
  readLines,
  spawnTarget,
  tempDir,
  waitForLine,
  waitForLines,
  waitGone,
} from "./_util.ts";

/** A link-local IPv6 address of this machine and its interface, if it has one. */
function linkLocal(): { addr: string; ifname: string } | undefined {
  let text = "";
  try {
    text = Deno.readTextFileSync("/proc/net/if_inet6");
  } catch {
    return undefined;
  }
  for (const line of text.trim().split("\n")) {
    const [hex, , , scope, flags, ifname] = line.trim().split(/\s+/);
    // Scope 0x20 is link; flag 0x40 tentative (not bindable yet).
    if (scope !== "20" || parseInt(flags, 16) & 0x40) continue;
    const words = hex.match(/.{4}/g)!.map((w) => parseInt(w, 16).toString(16));
    return { addr: words.join(":"), ifname };
  }
}

const LL = linkLocal();
const HAVE_NFT = await commandWorks("nft", "list", "tables");

/** A UDP socket and a TCP listener bound to a link-local address; SIGUSR1 reports their names. */
const SCOPED_PY = `import json, signal, socket, sys, time
out, addr, ifname = sys.argv[1:4]
idx = socket.if_nametoindex(ifname)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.bind((addr, 0, 0, idx))
t = socket.socket(socket.AF_INET6)
t.bind((addr, 0, 0, idx))
t.listen()
def report(*a):
    with open(out, "a") as f:
        f.write(json.dumps([u.getsockname(), t.getsockname()]) + "\\n")
signal.signal(signal.SIGUSR1, report)
report()
while True:
    time.sleep(1)
`;

Deno.test({
  name: "sockets bound to a link-local IPv6 address come back with its scope id",
  ignore: LL === undefined,
  async fn() {
    await using tmp = await tempDir();
    const out = `${tmp.path}/names.txt`;
    const { pid } = spawnTarget(["setsid", "python3", "-c", SCOPED_PY, out, LL!.addr, LL!.ifname]);
    try {
      const [before] = await waitForLines(out, 1, 30_000);
      assert.match(before, /, [1-9]\d*\]/, "no scope id before the dump (test bug)");
      const img = `${tmp.path}/img`;
      assertExit(await amber(dumpArgs(pid, img)), 0, "dump");
      assert.ok(await waitGone(pid), "the dumped target still runs");
      assertExit(await amber(["restore", "-D", img, "-d"]), 0, "restore");
      Deno.kill(pid, "SIGUSR1");
      const lines = await waitForLine(out, (l) => l.length >= 2, 10_000);
      assert.equal(lines[1], before, "the sockets' names after restore");
    } finally {
      await killAndReap(pid);
    }
  },
});
