/** Detail lines (per-part timings...): to stderr with -v, and to the embedder's or -o's log. */
export type LogLine = (line: string) => void;

/**
 * AMBER_LOG_TIME=1 puts the wall-clock time (ms, 3 decimals) before each
 * detail line, so the -v logs of two ambers (a migration's two ends) make
 * one timeline.
 */
const stamped = (() => {
  try {
    return Deno.env.get("AMBER_LOG_TIME") === "1";
  } catch {
    return false; // no env permission: plain lines
  }
})();

export function stamp(line: string): string {
  return stamped ? `${(performance.timeOrigin + performance.now()).toFixed(3)} ${line}` : line;
}

export function detailLog(req: { verbose?: boolean; log?: LogLine }): LogLine {
  return (line) => {
    req.log?.(line);
    if (req.verbose) console.error(stamp(line));
  };
}
