/**
 * Operations in flight, tracked by ticket: each operation takes the next ticket when it begins and
 * hands it back when it ends, in any order. `low` is the lowest ticket not yet ended (every ticket
 * below it has ended), and `drained()` resolves once every ticket taken before the call has ended.
 *
 * Why not a Set of the operations: the store server kept the callbacks of its writes in flight in
 * a Set, an entry added and deleted per write, and with it V8 carried about a fifth of everything
 * a write allocated through each young-generation collection into the old one, to be freed only by
 * the next full collection (docs/benchmarks.md, "A Set of callbacks kept a fifth of a write's
 * garbage alive"). Here, ending a ticket sets a flag in a ring of bytes; nothing is allocated per
 * operation, and no reference to one is kept.
 *
 * Invariants: low ≤ next; every ticket in [low, next) is either in flight or ended with its flag
 * set, and the ticket `low` itself is in flight whenever low < next; the ring holds next - low
 * flags and doubles when it is full.
 */
import { assert } from './assert.ts';

const RING_SLOTS_MIN = 64;

export class Tickets {
  #ended = new Uint8Array(RING_SLOTS_MIN);
  #mask = RING_SLOTS_MIN - 1;
  #next: number;
  #low: number;
  #inFlight = 0;
  /** Waiting for `low` to reach `ticket`; tickets ascend along the array, as they were taken. */
  #waiters: { ticket: number; resolve: () => void }[] = [];

  /** `first`: the ticket the first begin() returns. */
  constructor(first = 0) {
    assert(Number.isSafeInteger(first) && first >= 0, 'the first ticket is a non-negative integer');
    this.#next = first;
    this.#low = first;
  }

  /** Tickets begun and not yet ended. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** The lowest ticket not yet ended: every ticket below it has ended (the next ticket when none is in flight). */
  get low(): number {
    return this.#low;
  }

  /** The ticket the next begin() returns. */
  get next(): number {
    return this.#next;
  }

  begin(): number {
    if (this.#next - this.#low === this.#ended.length) this.#grow();
    this.#inFlight++;
    return this.#next++;
  }

  end(ticket: number): void {
    // The message is built only on failure: a template literal here cost a number-to-string per call.
    if (!(ticket >= this.#low && ticket < this.#next && this.#ended[ticket & this.#mask] === 0)) assert(false, `ticket ${ticket} is in flight`);
    this.#inFlight--;
    if (ticket !== this.#low) {
      this.#ended[ticket & this.#mask] = 1;
      return;
    }
    let low = ticket + 1;
    while (low < this.#next && this.#ended[low & this.#mask] === 1) {
      this.#ended[low & this.#mask] = 0;
      low++;
    }
    this.#low = low;
    if (this.#waiters.length > 0 && this.#waiters[0]!.ticket <= low) this.#wake();
  }

  /** Resolves once every ticket begun before this call has ended. */
  drained(): Promise<void> {
    if (this.#low === this.#next) return Promise.resolve();
    return new Promise((resolve) => this.#waiters.push({ ticket: this.#next, resolve }));
  }

  #wake(): void {
    let woken = 0;
    while (woken < this.#waiters.length && this.#waiters[woken]!.ticket <= this.#low) woken++;
    for (const waiter of this.#waiters.splice(0, woken)) waiter.resolve();
  }

  #grow(): void {
    const ended = new Uint8Array(this.#ended.length * 2);
    const mask = ended.length - 1;
    for (let ticket = this.#low; ticket < this.#next; ticket++) ended[ticket & mask] = this.#ended[ticket & this.#mask]!;
    this.#ended = ended;
    this.#mask = mask;
  }
}
