/**
 * Keeps overlapping writes of one volume in order (DESIGN §3: "the client keeps overlapping writes
 * in order"): a write waits until every earlier write that overlaps its blocks has finished, so a
 * later write can never land under an earlier one on some replica. Reads take no lock.
 */
export interface Held {
  start: number;
  end: number;
  released: boolean;
  /** Acquirers waiting for this holder; made only when someone waits. */
  waiters: (() => void)[] | undefined;
}

export class RangeLock {
  #held: Held[] = [];

  /** Waits for overlapping holders, then holds [start, end) until the returned release is called. */
  async acquire(start: number, end: number): Promise<() => void> {
    const overlapping = this.#held.filter((held) => held.start < end && start < held.end);
    const entry = this.#hold(start, end);
    for (const held of overlapping) {
      if (!held.released) await new Promise<void>((resolve) => (held.waiters ??= []).push(resolve));
    }
    return () => this.#release(entry);
  }

  /**
   * Holds [start, end) at once and returns the hold, for `release`; undefined (nothing held) if a
   * holder overlaps it. No closure per hold: this is every fast-path write's lock.
   */
  tryHold(start: number, end: number): Held | undefined {
    for (const held of this.#held) if (held.start < end && start < held.end) return undefined;
    return this.#hold(start, end);
  }

  /** Ends a hold from `tryHold` (a second release changes nothing). */
  release(hold: Held): void {
    this.#release(hold);
  }

  get size(): number {
    return this.#held.length;
  }

  #hold(start: number, end: number): Held {
    const entry: Held = { start, end, released: false, waiters: undefined };
    this.#held.push(entry);
    return entry;
  }

  #release(entry: Held): void {
    if (entry.released) return;
    entry.released = true;
    // Order among holders does not matter: the last takes the released one's place (a splice
    // would allocate the array of what it removed, once per write).
    const held = this.#held;
    const index = held.indexOf(entry);
    if (index >= 0) {
      held[index] = held[held.length - 1]!;
      held.pop();
    }
    if (entry.waiters !== undefined) for (const wake of entry.waiters) wake();
  }
}
