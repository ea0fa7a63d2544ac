/**
 * Keeps overlapping writes of one volume in order (DESIGN §3: "the client keeps overlapping writes
 * in order"): a write waits until every earlier write that overlaps its blocks has finished, so a
 * later write can never land under an earlier one on some replica. Reads take no lock.
 */
interface Held {
  start: number;
  end: number;
  done: Promise<void>;
}

export class RangeLock {
  #held: Held[] = [];

  /** Waits for overlapping holders, then holds [start, end) until the returned release is called. */
  async acquire(start: number, end: number): Promise<() => void> {
    const overlapping = this.#held.filter((held) => held.start < end && start < held.end).map((held) => held.done);
    let release!: () => void;
    const entry: Held = { start, end, done: new Promise<void>((resolve) => (release = resolve)) };
    this.#held.push(entry);
    if (overlapping.length > 0) await Promise.all(overlapping);
    return () => {
      const index = this.#held.indexOf(entry);
      if (index >= 0) this.#held.splice(index, 1);
      release();
    };
  }

  get size(): number {
    return this.#held.length;
  }
}
