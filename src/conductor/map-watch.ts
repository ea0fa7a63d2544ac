/**
 * Long-poll waiters for GET /map?since=E&waitMs=W. A waiter resolves `true` as soon as the map
 * epoch passes E, `false` when W ms pass first, and is dropped when its client goes away. Bounded:
 * beyond `waitersMax` a new waiter is refused with BUSY. All time goes through env.clock.
 */
import type { Clock, Timer } from '../env/env.ts';
import { ShaleError } from '../lib/errors.ts';

interface Waiter {
  since: number;
  timer: Timer;
  settle(changed: boolean | ShaleError): void;
}

export class MapWatch {
  readonly #clock: Clock;
  readonly #waitersMax: number;
  readonly #waiters = new Set<Waiter>();
  #epoch: number;
  #closed = false;

  constructor(clock: Clock, epoch: number, waitersMax: number) {
    this.#clock = clock;
    this.#epoch = epoch;
    this.#waitersMax = waitersMax;
  }

  get epoch(): number {
    return this.#epoch;
  }

  get waiting(): number {
    return this.#waiters.size;
  }

  /** Records a committed epoch and wakes every waiter it passes. */
  advance(epoch: number): void {
    if (epoch <= this.#epoch) return;
    this.#epoch = epoch;
    for (const waiter of [...this.#waiters]) {
      if (epoch > waiter.since) waiter.settle(true);
    }
  }

  /**
   * Waits until the epoch passes `since` (true) or `waitMs` pass (false). `onCancel` receives a
   * function that drops the waiter (for a client that disconnects). Errors: BUSY, SHUTTING_DOWN.
   */
  wait(since: number, waitMs: number, onCancel?: (cancel: () => void) => void): Promise<boolean> {
    if (this.#closed) return Promise.reject(new ShaleError('SHUTTING_DOWN', 'the conductor is stopping'));
    if (this.#epoch > since) return Promise.resolve(true);
    if (waitMs <= 0) return Promise.resolve(false);
    if (this.#waiters.size >= this.#waitersMax) {
      return Promise.reject(new ShaleError('BUSY', `too many map watchers (${this.#waitersMax}); retry later`));
    }
    return new Promise<boolean>((resolve, reject) => {
      const waiter: Waiter = {
        since,
        timer: this.#clock.after(waitMs, () => waiter.settle(false)).unref(),
        settle: (outcome) => {
          if (!this.#waiters.delete(waiter)) return;
          waiter.timer.cancel();
          if (outcome instanceof ShaleError) reject(outcome);
          else resolve(outcome);
        },
      };
      this.#waiters.add(waiter);
      onCancel?.(() => waiter.settle(false));
    });
  }

  /** Refuses new waiters and ends the current ones with SHUTTING_DOWN. */
  close(): void {
    this.#closed = true;
    for (const waiter of [...this.#waiters]) waiter.settle(new ShaleError('SHUTTING_DOWN', 'the conductor is stopping'));
  }
}
