/**
 * Errors that say what failed and where: each layer adds the object it was
 * working on, so a message reads
 * `pid 812: mapping 7f3a..7f3b [heap]: process_vm_readv: EFAULT`.
 */

/** The structured pieces of an {@link AmberError}, as `--json` prints them. */
export interface ErrorFields {
  /**
   * What kind of failure: the errno of a failed system call ("EFAULT",
   * "ESRCH"...), or a word: "unsupported" (state amber refuses),
   * "usage", "interrupted", "failed" (anything else).
   */
  code?: string;
  /** The process the failure is about, when one is named. */
  pid?: number;
  /** The object being worked on, outermost first (e.g. "pagemap: mapping 7f3a..7f3b [heap]"). */
  object?: string;
  /** The step that failed, e.g. the system call "process_vm_readv". */
  step?: string;
}

/** A failed system call (ffi/libc.ts SysError), recognised without importing ffi. */
interface SysLike extends Error {
  call: string;
  code: string;
}

function isSysLike(e: unknown): e is SysLike {
  return e instanceof Error && e.name === "SysError" && typeof (e as SysLike).call === "string";
}

/** The causes of `e`, itself first. */
function causes(e: unknown): unknown[] {
  const out: unknown[] = [];
  for (let c = e; c !== undefined && out.length < 64; c = (c as Error).cause) {
    out.push(c);
    if (!(c instanceof Error)) break;
  }
  return out;
}

/**
 * The fields a message and its causes say: a leading "pid N" is the pid;
 * a failed system call at the root gives step and code; what lies between
 * is the object (the last piece of a message that is not a system call is
 * the reason itself, kept only in the message).
 */
function fieldsOf(message: string, cause: unknown): ErrorFields {
  const chain = causes(cause);
  const sys = chain.find(isSysLike);
  let rest = message;
  let step: string | undefined;
  let errnoText: string | undefined;
  // "...: process_vm_readv: EFAULT" written as text says the same as a SysError.
  const text = /^(?:(.*): )?([^:]+): (E[A-Z0-9]{2,})$/.exec(message);
  if (sys && message.endsWith(sys.message)) {
    rest = message.slice(0, message.length - sys.message.length).replace(/: $/, "");
    step = sys.call;
  } else if (text) {
    [rest, step, errnoText] = [text[1] ?? "", text[2], text[3]];
  } else {
    const cut = rest.lastIndexOf(": ");
    rest = cut < 0 ? "" : rest.slice(0, cut);
  }
  const m = /^pid (\d+)(?:: |$)/.exec(rest);
  // "pid 812 is in use by ..." names its process too.
  const named = m ?? /^pid (\d+)\b/.exec(message);
  const pid = named ? Number(named[1]) : undefined;
  if (m) rest = rest.slice(m[0].length);
  const inherited = chain.find((c) => c instanceof AmberError && c.code !== "failed") as
    | AmberError
    | undefined;
  const errno = chain.map((c) => (c as { code?: unknown })?.code)
    .find((c): c is string => typeof c === "string" && /^E[A-Z0-9]+$/.test(c));
  return {
    code: inherited?.code ?? sys?.code ?? errnoText ?? errno,
    pid,
    object: rest || undefined,
    step,
  };
}

/**
 * An error whose message is meant for the user, with its context chain.
 * The one-line message is what amber prints; {@link ErrorFields} are the
 * same facts, collected as each context layer wraps it.
 */
export class AmberError extends Error implements ErrorFields {
  code: string;
  pid?: number;
  object?: string;
  step?: string;

  /** `message` as printed; fields not given are taken from the message and its causes. */
  constructor(message: string, options?: ErrorOptions & ErrorFields) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = "AmberError";
    const found = fieldsOf(message, options?.cause);
    const inner = causes(options?.cause).find((c) => c instanceof AmberError) as
      | AmberError
      | undefined;
    this.code = options?.code ?? found.code ?? "failed";
    this.pid = options?.pid ?? found.pid ?? inner?.pid;
    this.object = options?.object ?? found.object;
    this.step = options?.step ?? found.step ?? inner?.step;
  }

  /** The error as plain data: message, code, and whichever of pid, object, step are known. */
  toJSON(): { message: string } & ErrorFields {
    const { code, pid, object, step } = this;
    return { message: this.message, code, pid, object, step };
  }
}

/** Images holding state amber cannot restore (yet): code "unsupported". */
export class RefusalError extends AmberError {
  /** `message` names the process, the object and why. */
  constructor(message: string) {
    super(message, { code: "unsupported" });
    this.name = "RefusalError";
  }
}

/**
 * A migration's destination stored the final round and went silent: it
 * may run the tree, so the source's copy is left stopped, its connections
 * locked (lib/migrate.ts).
 */
export class UnknownOutcomeError extends AmberError {}

/** A wrong command line or argument: exit code 2. */
export class UsageError extends AmberError {
  /** `message` says what is wrong and where the help is. */
  constructor(message: string) {
    super(message, { code: "usage" });
    this.name = "UsageError";
  }
}

/** The work was stopped by a signal (or an AbortSignal) and undone: exit 128 + N. */
export class InterruptedError extends AmberError {
  /** `signal`: the signal's name ("SIGINT"), or "abort" for an AbortSignal. */
  constructor(readonly signal: string, readonly exitCode: number) {
    super(`interrupted by ${signal}`, { code: "interrupted" });
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
