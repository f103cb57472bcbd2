/**
 * Progress of a dump or restore: which process and part is being worked
 * on, pages moved so far, and the time each part took (summed over the
 * tree, for `--json`). Embedders get it through a callback; the command
 * line draws it on a terminal (see {@link terminalProgress}).
 */

/** One report of how far a dump or restore is. */
export interface Progress {
  /** Which work this is. */
  operation: "dump" | "restore";
  /** Process being worked on (0 before the first one). */
  pid: number;
  /** Part (kind of kernel object) being worked on, e.g. "pagemap". */
  part: string;
  /** Pages copied (dump) or filled (restore) so far. */
  pagesDone: number;
  /** Pages of the processes reached so far (a restore knows all at once). */
  pagesTotal: number;
  /** Milliseconds since the work began. */
  elapsedMs: number;
  /** The last report: the work is done (a restored tree runs from here on). */
  done: boolean;
}

/** Receives progress reports: at each part of each process, and as pages move. */
export type ProgressCallback = (p: Progress) => void;

const PAGE_SIZE = 4096;
/** Where a tracker lives in a tree state's `kinds` map, so the pages part can find it. */
const KEY = "progress";

/** Collects progress and per-part times of one dump or restore. */
export class Tracker {
  /** Milliseconds spent in each part, summed over the processes. */
  readonly partMs: Record<string, number> = {};
  private pid = 0;
  private part = "";
  private pagesDone = 0;
  private pagesTotal = 0;
  private readonly t0 = performance.now();

  constructor(
    readonly operation: "dump" | "restore",
    private readonly callback?: ProgressCallback,
  ) {}

  /** Puts it where lib/mm/pages.ts finds it ({@link trackerIn}). */
  attach(kinds: Map<string, unknown>): this {
    kinds.set(KEY, this);
    return this;
  }

  /** `bytes` more of pages to move. */
  addTotal(bytes: number): void {
    this.pagesTotal += Math.ceil(bytes / PAGE_SIZE);
  }

  /** Work on `part` of `pid` begins. */
  at(pid: number, part: string): void {
    this.pid = pid;
    this.part = part;
    this.report();
  }

  /** `part` took `ms` (in one process). */
  took(part: string, ms: number): void {
    this.partMs[part] = (this.partMs[part] ?? 0) + ms;
  }

  /** `bytes` of pages were moved. */
  pages(bytes: number): void {
    this.pagesDone += Math.ceil(bytes / PAGE_SIZE);
    this.report();
  }

  /** The work is over: one last report with `done`. */
  finish(): void {
    this.report(true);
  }

  private report(done = false): void {
    this.callback?.({
      operation: this.operation,
      pid: this.pid,
      part: this.part,
      pagesDone: this.pagesDone,
      pagesTotal: Math.max(this.pagesTotal, this.pagesDone),
      elapsedMs: performance.now() - this.t0,
      done,
    });
  }
}

/** The tracker of the dump or restore whose tree state holds `kinds`, if any. */
export function trackerIn(kinds: Map<string, unknown>): Tracker | undefined {
  const t = kinds.get(KEY);
  return t instanceof Tracker ? t : undefined;
}

/** Operations shorter than this show no progress line. */
const SHOW_AFTER_MS = 500;
const REDRAW_MS = 200;

/** A progress line on a terminal, redrawn in place; `clear` before printing anything else. */
export interface ProgressLine {
  callback: ProgressCallback;
  clear(): void;
  [Symbol.dispose](): void;
}

function line(p: Progress): string {
  const secs = p.elapsedMs / 1000;
  const mib = (p.pagesDone * PAGE_SIZE) / 1048576;
  const pct = p.pagesTotal ? ` (${((100 * p.pagesDone) / p.pagesTotal).toFixed(0)}%)` : "";
  const where = p.pid ? `pid ${p.pid} ${p.part}` : "starting";
  return `amber ${p.operation}: ${where}: ${p.pagesDone}/${p.pagesTotal} pages${pct}, ` +
    `${secs > 0 ? (mib / secs).toFixed(0) : "0"} MiB/s, ${secs.toFixed(1)} s`;
}

/**
 * A progress line on stderr when stderr is a terminal (nothing otherwise):
 * shown once the work has taken half a second, redrawn every 200 ms and on
 * each report, erased at the end.
 */
export function terminalProgress(): ProgressLine | undefined {
  if (!Deno.stderr.isTerminal()) return undefined;
  const enc = new TextEncoder();
  let last: Progress | undefined;
  let shown = false;
  const t0 = performance.now();
  const write = (s: string) => Deno.stderr.writeSync(enc.encode(s));
  const draw = () => {
    if (!last || performance.now() - t0 < SHOW_AFTER_MS) return;
    write(`\r\x1b[K${line({ ...last, elapsedMs: performance.now() - t0 })}`);
    shown = true;
  };
  const timer = setInterval(draw, REDRAW_MS);
  Deno.unrefTimer(timer);
  const clear = () => {
    if (shown) write("\r\x1b[K");
    shown = false;
  };
  let stopped = false;
  const stop = () => {
    stopped = true;
    clearInterval(timer);
    clear();
  };
  let lastDraw = 0;
  return {
    callback(p) {
      if (p.done) return stop();
      if (stopped) return;
      last = p;
      // Reports come per chunk of pages: redraw at most every 100 ms.
      if (performance.now() - lastDraw >= 100) {
        lastDraw = performance.now();
        draw();
      }
    },
    clear,
    [Symbol.dispose]: stop,
  };
}
