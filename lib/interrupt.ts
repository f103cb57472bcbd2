/**
 * SIGINT, SIGTERM and SIGHUP while amber dumps or restores: the work in
 * flight unwinds the way a failure does (a dumped tree resumes exactly as
 * it was and its partial images go; a restore kills what it created), then
 * amber exits 128 + the signal's number. Dying at once would leave threads
 * in the middle of an injected syscall.
 */
import { InterruptedError } from "./errors.ts";

const SIGNALS = { SIGHUP: 1, SIGINT: 2, SIGTERM: 15 } as const;
/**
 * A checkpoint lets the event loop poll at most this often: each poll (an
 * async stat) costs ~0.1-0.3 ms, and dump passes ~20 checkpoints a process.
 * A stop signal is still honoured within a few ms plus one part's work.
 */
const POLL_EVERY_MS = 5;
type StopSignal = keyof typeof SIGNALS;

/** Catches the stop signals for as long as it lives (`using`). */
export class SignalGuard implements Disposable {
  private caught?: StopSignal;
  private readonly listeners = new Map<StopSignal, () => void>();
  private polledAt = -Infinity;
  private readonly stop = Promise.withResolvers<never>();
  /**
   * Rejects with the InterruptedError once a stop is asked for: for a wait
   * that passes no checkpoint (a write to a pipe nobody reads).
   */
  readonly stopped: Promise<never> = this.stop.promise;

  constructor(private readonly abort?: AbortSignal) {
    this.stopped.catch(() => {}); // only those who wait with it care
    abort?.addEventListener("abort", () => this.stopNow(), { once: true });
    for (const sig of Object.keys(SIGNALS) as StopSignal[]) {
      const listener = () => {
        this.caught ??= sig;
        this.stopNow();
      };
      Deno.addSignalListener(sig, listener);
      this.listeners.set(sig, listener);
    }
  }

  /**
   * Lets signal listeners run (they only run when the event loop polls
   * its operations, which a settled promise does not do: one cheap async
   * stat does, at most every POLL_EVERY_MS), then throws if a stop was
   * asked for.
   */
  async checkpoint(): Promise<void> {
    const now = performance.now();
    if (now - this.polledAt >= POLL_EVERY_MS) {
      await Deno.stat("/");
      this.polledAt = performance.now();
    }
    this.throwIfStopped();
  }

  private stopNow(): void {
    try {
      this.throwIfStopped();
    } catch (e) {
      this.stop.reject(e);
    }
  }

  throwIfStopped(): void {
    if (this.caught) throw new InterruptedError(this.caught, 128 + SIGNALS[this.caught]);
    if (this.abort?.aborted) throw new InterruptedError("abort", 130);
  }

  [Symbol.dispose](): void {
    for (const [sig, listener] of this.listeners) Deno.removeSignalListener(sig, listener);
    this.listeners.clear();
  }
}
