/** Detail lines (per-part timings...): to stderr with -v, and to the embedder's or -o's log. */
export type LogLine = (line: string) => void;

export function detailLog(req: { verbose?: boolean; log?: LogLine }): LogLine {
  return (line) => {
    req.log?.(line);
    if (req.verbose) console.error(line);
  };
}
