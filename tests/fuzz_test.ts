/**
 * Fuzzing the image reader and restore's checks with mutations of a real
 * small image: bit flips, truncations, swapped and missing files, huge
 * numbers and array headers claiming billions of elements. Every mutation
 * must end in one AmberError line, or in images the checks accept; never
 * another kind of exception, a hang, or unbounded memory. Most run in this
 * process (readImages + the restore precheck, which start no process); a
 * few go through the whole `amber restore`, which must then fail with one
 * line or restore a process, and leave nothing else behind.
 */
import assert from "node:assert/strict";
import { decode, Encoder } from "cbor-x";
import { readImages } from "../mod.ts";
import { AmberError, escapeText } from "../lib/errors.ts";
import { ImageDir } from "../lib/images/dir.ts";
import { precheck } from "../lib/restore.ts";
import {
  amber,
  assertLeftNothing,
  childrenWithState,
  dumpKill,
  isAlive,
  killAndReap,
  listDir,
  startCounter,
  tempDir,
} from "./_util.ts";

const MUTATIONS = 600;
const THROUGH_CLI = 6;
const cbor = new Encoder({ useRecords: false, mapsAsObjects: true });

/** A small deterministic PRNG (mulberry32), so a failure can be replayed by its seed. */
function prng(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

type Rand = () => number;
const pick = <T>(r: Rand, list: T[]): T => list[Math.floor(r() * list.length)];

// deno-lint-ignore no-explicit-any
type Doc = any;

/** Paths (key lists) to every value in `v` matching `want`. */
function pathsOf(
  v: Doc,
  want: (x: Doc) => boolean,
  at: (string | number)[] = [],
): (string | number)[][] {
  const out = want(v) && at.length ? [at] : [];
  if (v && typeof v === "object" && !(v instanceof Uint8Array)) {
    for (const [k, x] of Object.entries(v)) {
      out.push(...pathsOf(x, want, [...at, Array.isArray(v) ? Number(k) : k]));
    }
  }
  return out;
}

function setAt(doc: Doc, path: (string | number)[], value: Doc): void {
  let o = doc;
  for (const k of path.slice(0, -1)) o = o[k];
  o[path.at(-1)!] = value;
}

const HUGE_NUMBERS: Doc[] = [
  2 ** 31,
  2 ** 32,
  2 ** 53 - 1,
  -1,
  1e300,
  2n ** 64n - 1n,
  -(2 ** 40),
  0.5,
];

/** A mutation of the working copy: returns what it did, for the failure message. */
type Mutation = (dir: string, r: Rand) => string;

function files(dir: string, re = /./): string[] {
  return listDir(dir).filter((n) => re.test(n));
}

/**
 * Changes one image document of CBOR file `name` with `change` (which
 * may return the document's new bytes): the file's own, or half the time
 * in a process image, one of the part images inside it.
 */
function changeDoc(
  dir: string,
  name: string,
  r: Rand,
  change: (doc: Doc) => Uint8Array | void,
): string {
  const file = `${dir}/${name}`;
  const outer = decode(Deno.readFileSync(file));
  if (!name.startsWith("process-") || r() < 0.5) {
    Deno.writeFileSync(file, change(outer) ?? cbor.encode(outer));
    return name;
  }
  const part = pick(r, Object.keys(outer.body));
  const inner = decode(outer.body[part]);
  outer.body[part] = change(inner) ?? cbor.encode(inner);
  Deno.writeFileSync(file, cbor.encode(outer));
  return `${name}, part ${part}`;
}

function flipBits(bytes: Uint8Array, n: number, r: Rand): Uint8Array {
  for (let i = 0; i < n && bytes.length; i++) {
    bytes[Math.floor(r() * bytes.length)] ^= 1 << Math.floor(r() * 8);
  }
  return bytes;
}

const mutations: Mutation[] = [
  function bitFlips(dir, r) {
    const name = pick(r, files(dir));
    const n = 1 + Math.floor(r() * 8);
    if (name.startsWith("process-") && r() < 0.5) {
      // In one part's bytes: the container stays valid, the part does not.
      const file = `${dir}/${name}`;
      const outer = decode(Deno.readFileSync(file));
      const part = pick(r, Object.keys(outer.body));
      outer.body[part] = flipBits(outer.body[part], n, r);
      Deno.writeFileSync(file, cbor.encode(outer));
      return `${n} bit flips in ${name}, part ${part}`;
    }
    Deno.writeFileSync(`${dir}/${name}`, flipBits(Deno.readFileSync(`${dir}/${name}`), n, r));
    return `${n} bit flips in ${name}`;
  },
  function truncation(dir, r) {
    const name = pick(r, files(dir));
    const size = Deno.statSync(`${dir}/${name}`).size;
    const to = Math.floor(r() * size);
    Deno.truncateSync(`${dir}/${name}`, to);
    return `${name} cut to ${to} of ${size} bytes`;
  },
  function swap(dir, r) {
    const a = pick(r, files(dir)), b = pick(r, files(dir));
    const da = Deno.readFileSync(`${dir}/${a}`), db = Deno.readFileSync(`${dir}/${b}`);
    Deno.writeFileSync(`${dir}/${a}`, db);
    Deno.writeFileSync(`${dir}/${b}`, da);
    return `${a} and ${b} swapped`;
  },
  function missing(dir, r) {
    const name = pick(r, files(dir));
    Deno.removeSync(`${dir}/${name}`);
    return `${name} removed`;
  },
  function hugeNumber(dir, r) {
    let said = "";
    const name = changeDoc(dir, pick(r, files(dir, /\.cbor$/)), r, (doc) => {
      const paths = pathsOf(doc, (x) => typeof x === "number" || typeof x === "bigint");
      const path = pick(r, paths), value = pick(r, HUGE_NUMBERS);
      setAt(doc, path, value);
      said = `${path.join(".")} = ${value}`;
    });
    return `${name}: ${said}`;
  },
  function hugeArrayHeader(dir, r) {
    // A 5-byte placeholder string re-encoded as an array header of 2^32-1 or 2^31-1 elements.
    let said = "";
    const name = changeDoc(dir, pick(r, files(dir, /\.cbor$/)), r, (doc) => {
      const path = pick(r, pathsOf(doc, (x) => Array.isArray(x) || typeof x === "object"));
      setAt(doc, path, "HUGE");
      const bytes = cbor.encode(doc);
      const at = bytes.findIndex((_, i) =>
        bytes[i] === 0x64 && String.fromCharCode(...bytes.subarray(i + 1, i + 5)) === "HUGE"
      );
      const count = r() < 0.5 ? 0xffffffff : 0x7fffffff;
      bytes.set([0x9a, count >>> 24, (count >> 16) & 0xff, (count >> 8) & 0xff, count & 0xff], at);
      said = `${path.join(".")} claims ${count} elements`;
      return bytes;
    });
    return `${name}: ${said}`;
  },
];

/** What the checks say of `dir`: "ok", or the AmberError's one line; anything else throws. */
async function checkImages(dir: string, what: string): Promise<string> {
  try {
    const images = readImages(dir);
    using d = new ImageDir(dir);
    await precheck(images, {
      detached: true,
      shellJob: false,
      verbose: false,
      allowChangedFiles: false,
    }, d);
    return "ok";
  } catch (e) {
    if (!(e instanceof AmberError)) {
      throw new Error(`${what}: not an AmberError: ${e instanceof Error ? e.stack : e}`);
    }
    assert.ok(!e.message.includes("\n"), `${what}: a message of several lines: ${e.message}`);
    return e.message;
  }
}

/** Puts the working copy back as the original images. */
function reset(work: string, img: string): void {
  for (const n of listDir(work)) Deno.removeSync(`${work}/${n}`);
  for (const n of listDir(img)) Deno.copyFileSync(`${img}/${n}`, `${work}/${n}`);
}

Deno.test("mutated images give one clear line or pass every check; no crash, hang or blow-up", async () => {
  await using tmp = await tempDir();
  const { pid } = await startCounter(tmp.path, 1);
  const img = `${tmp.path}/img`;
  const work = `${tmp.path}/work`;
  try {
    await dumpKill(pid, [pid], img, "counter");
    Deno.mkdirSync(work, { mode: 0o700 });
    reset(work, img);
    assert.equal(await checkImages(work, "the unmutated images"), "ok");

    const before = childrenWithState();
    const seed = Number(Deno.env.get("AMBER_FUZZ_SEED") ?? 20261201);
    const r = prng(seed);
    const outcomes = new Map<string, number>();
    const forCli: string[] = [];
    let peakRss = 0;
    for (let i = 0; i < MUTATIONS; i++) {
      const m = mutations[i % mutations.length];
      const what = `mutation ${i} (seed ${seed}): ${m(work, r)}`;
      const said = await checkImages(work, what);
      const kind = said === "ok" ? "accepted" : "refused";
      if (Deno.env.get("AMBER_FUZZ_VERBOSE") && kind === "accepted") console.log(what);
      outcomes.set(`${m.name} ${kind}`, (outcomes.get(`${m.name} ${kind}`) ?? 0) + 1);
      // A few go through the real restore too: some the checks accept, some they refuse.
      if (forCli.length < THROUGH_CLI && (kind === "accepted" || i % 50 === 7)) {
        const copy = `${tmp.path}/cli${forCli.length}`;
        Deno.mkdirSync(copy, { mode: 0o700 });
        for (const n of listDir(work)) Deno.copyFileSync(`${work}/${n}`, `${copy}/${n}`);
        forCli.push(`${copy}\t${what}\t${said}`);
      }
      peakRss = Math.max(peakRss, Deno.memoryUsage().rss);
      reset(work, img);
    }
    assertLeftNothing(before, "in-process checks");
    // The reader bounds what it allocates by the files' sizes (a few MiB here).
    assert.ok(peakRss < 1024 ** 3, `peak RSS ${peakRss} bytes`);
    console.log([...outcomes].map(([k, n]) => `${k}: ${n}`).join(", "));

    for (const line of forCli) {
      const [copy, what, said] = line.split("\t");
      const r = await amber(["restore", "-D", copy, "-d"], {}, 60_000);
      console.log(`${what}: restore exit ${r.code} ${r.stderr.trim()}`);
      if (r.code === 0) {
        const pids = readImages(copy).processes.map((p) => p.entry.pid);
        assert.ok(pids.some(isAlive), `${what}: restore said 0 but none of ${pids} is there`);
        for (const p of pids.reverse()) await killAndReap(p);
      } else {
        assert.equal(r.code, 1, `${what}: exit ${r.code}: ${r.stderr}`);
        const msg = r.stderr.trim();
        assert.match(msg, /^amber: /, `${what}: ${r.stderr}`);
        assert.equal(msg.split("\n").length, 1, `${what}: ${r.stderr}`);
        if (said !== "ok") {
          const expected = escapeText(said.replaceAll(work, copy));
          assert.equal(msg, `amber: ${expected}`, `${what}: CLI and checks differ`);
        }
      }
      assertLeftNothing(before, what);
    }
  } finally {
    await killAndReap(pid);
  }
});
