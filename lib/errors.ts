/**
 * Errors that say what failed and where: each layer adds the object it was
 * working on, so a message reads
 * `pid 812: mapping 7f3a..7f3b [heap]: process_vm_readv: EFAULT`.
 */

/** An error whose message is meant for the user, with its context chain. */
export class AmberError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "AmberError";
  }
}

/** A wrong command line or argument: exit code 2. */
export class UsageError extends AmberError {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** The work was stopped by a signal (or an AbortSignal) and undone: exit 128 + N. */
export class InterruptedError extends AmberError {
  constructor(readonly signal: string, readonly exitCode: number) {
    super(`interrupted by ${signal}`);
    this.name = "InterruptedError";
  }
}

function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Prefixes an error's message with `label: `, keeping its cause. */
export function wrapError(label: string, e: unknown): AmberError {
  // Neither is about the object being worked on.
  if (e instanceof UsageError || e instanceof InterruptedError) return e;
  return new AmberError(`${label}: ${messageOf(e)}`, { cause: e });
}

/** Runs fn; a failure is rethrown with `label: ` in front of its message. */
export function withContext<T>(label: string, fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    throw wrapError(label, e);
  }
}

/** Async variant of {@link withContext}. */
export async function withContextAsync<T>(label: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    throw wrapError(label, e);
  }
}

/** Longest text printed whole; longer values are cut, their length given. */
export const TEXT_MAX = 1000;

// deno-lint-ignore no-control-regex
const UNPRINTABLE = /[\x00-\x1f\x7f-\x9f\\]/g;

function escapeChars(s: string): string {
  return s.replace(
    UNPRINTABLE,
    (c) => c === "\\" ? "\\\\" : `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`,
  );
}

/**
 * `s` safe to print on a terminal: control characters (C0, DEL, C1) as
 * `\x1b`-style escapes and a backslash as `\\`. Text longer than `max` is
 * cut in the middle (an error's end names the errno), its length given.
 */
export function escapeText(s: string, max = TEXT_MAX): string {
  if (s.length <= max) return escapeChars(s);
  const tail = Math.floor(max / 4);
  return `${escapeChars(s.slice(0, max - tail))}...(${s.length} characters)...${
    escapeChars(s.slice(s.length - tail))
  }`;
}

/** Hex without 0x, as /proc/PID/maps prints addresses. */
export function hex(v: bigint | number): string {
  return v.toString(16);
}

/**
 * Test-only fault hook: when AMBER_TEST_FAULT names this point, the step
 * fails here, so tests can prove a failure mid-dump harms nothing; with
 * `POINT:SIGNAL` (e.g. `after-freeze:SIGINT`) amber sends itself that
 * signal there instead.
 */
export function faultPoint(name: string): void {
  const wanted = wantedFault();
  if (wanted === name) throw new AmberError(`injected test fault at ${name}`);
  const [point, signal] = wanted?.split(":") ?? [];
  if (point === name && signal?.startsWith("SIG")) Deno.kill(Deno.pid, signal as Deno.Signal);
}

/**
 * faultPoint, then time for a signal it sent to reach amber's listeners;
 * `POINT:pause` only waits there 2 s (for a test to act on the frozen tree).
 */
export async function faultPointAsync(name: string): Promise<void> {
  const wanted = wantedFault();
  if (wanted === `${name}:pause`) return await new Promise((r) => setTimeout(r, 2000));
  faultPoint(name);
  if (wanted?.startsWith(`${name}:`)) await new Promise((r) => setTimeout(r, 50));
}

function wantedFault(): string | undefined {
  try {
    return Deno.env.get("AMBER_TEST_FAULT");
  } catch {
    return undefined; // no env permission: no faults
  }
}
