/**
 * A manual `Clock` for simulations: time stands still until the test calls `advance(ms)`, which
 * runs every due timer in time order (ties in the order they were set). `soon` callbacks run on
 * the next `advance` (also `advance(0)`), after the timers due at the current time.
 * Deterministic: nothing here reads the real clock.
 */
import type { Clock, Timer } from '../env.ts';

interface SimTimer {
  atMs: number;
  order: number;
  intervalMs: number | undefined;
  callback: () => void;
  cancelled: boolean;
}

export class SimClock implements Clock {
  #nowMs = 0;
  #order = 0;
  readonly #timers: SimTimer[] = [];
  readonly #soon: (() => void)[] = [];
  readonly #wallBaseMs: number;

  constructor(wallBaseMs = 1_700_000_000_000) {
    this.#wallBaseMs = wallBaseMs;
  }

  nowMs(): number {
    return this.#nowMs;
  }

  wallMs(): number {
    return this.#wallBaseMs + this.#nowMs;
  }

  after(delayMs: number, callback: () => void): Timer {
    return this.#add(delayMs, undefined, callback);
  }

  every(intervalMs: number, callback: () => void): Timer {
    return this.#add(intervalMs, Math.max(1, intervalMs), callback);
  }

  sleep(delayMs: number): Promise<void> {
    return new Promise((resolve) => {
      this.after(delayMs, resolve);
    });
  }

  /** Simulated time passes only when the test says so: nothing to poll for. */
  pollFor(_durationMs: number): void {}

  soon(callback: () => void): void {
    this.#soon.push(callback);
  }

  afterIo(callback: () => void): void {
    queueMicrotask(callback);
  }

  /** Number of timers still pending (cancelled ones excluded). */
  get pendingTimers(): number {
    return this.#timers.filter((timer) => !timer.cancelled).length;
  }

  /** Moves time forward by `deltaMs`, running due timers and `soon` callbacks in order. */
  advance(deltaMs: number): void {
    const targetMs = this.#nowMs + Math.max(0, deltaMs);
    for (;;) {
      this.#timers.sort((a, b) => a.atMs - b.atMs || a.order - b.order);
      const next = this.#timers[0];
      if (next === undefined || next.atMs > targetMs) break;
      this.#timers.shift();
      if (next.cancelled) continue;
      this.#nowMs = Math.max(this.#nowMs, next.atMs);
      if (next.intervalMs !== undefined) {
        next.atMs += next.intervalMs;
        next.order = this.#order++;
        this.#timers.push(next);
      }
      next.callback();
    }
    this.#nowMs = targetMs;
    const soon = this.#soon.splice(0);
    for (const callback of soon) callback();
  }

  #add(delayMs: number, intervalMs: number | undefined, callback: () => void): Timer {
    const entry: SimTimer = { atMs: this.#nowMs + Math.max(0, delayMs), order: this.#order++, intervalMs, callback, cancelled: false };
    this.#timers.push(entry);
    const timer: Timer = {
      cancel: () => {
        entry.cancelled = true;
      },
      unref: () => timer,
    };
    return timer;
  }
}
