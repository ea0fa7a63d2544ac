/**
 * Requests awaiting their replies, found by request id without a hash table: the id picks a slot
 * in a ring (its low bits), and ids are handed out here, in order, skipping any whose slot is still
 * taken — so two pending requests never share a slot, and a reply is matched with one array read
 * and a comparison of the id.
 *
 * Why not a Map from id to request: it gained and lost an entry per request, like the Set of
 * callbacks that made V8 carry a fifth of a write's garbage into the old generation (lib/tickets.ts).
 * With the Map (and the volume client's Set of seqs, since replaced too), a 3-replica gateway kept
 * six times as much through each young-generation collection (docs/benchmarks.md, "A Set of
 * callbacks kept a fifth of a write's garbage alive").
 *
 * Invariants: ids are 1..0xffffffff (0 marks a free slot); at most half the slots are taken (the
 * ring doubles past that, and doubling keeps every id in a slot of its own, since ids that differ
 * in their low bits still differ in more of them).
 */
import { assert } from './assert.ts';

const ID_MAX = 0xffffffff;
const SLOTS_MIN = 64;

export class RequestSlots<T> {
  #ids = new Uint32Array(SLOTS_MIN);
  #values: (T | undefined)[] = new Array<T | undefined>(SLOTS_MIN).fill(undefined);
  #mask = SLOTS_MIN - 1;
  #size = 0;
  #nextId = 1;

  get size(): number {
    return this.#size;
  }

  /** Stores `value` under a new id and returns the id. */
  add(value: T): number {
    if (this.#size * 2 >= this.#ids.length) this.#grow();
    for (;;) {
      const id = this.#nextId;
      this.#nextId = id >= ID_MAX ? 1 : id + 1;
      const slot = id & this.#mask;
      if (this.#ids[slot] !== 0) continue;
      this.#ids[slot] = id;
      this.#values[slot] = value;
      this.#size++;
      return id;
    }
  }

  /** Removes and returns the value stored under `id`; undefined when there is none (never added, or taken already). */
  take(id: number): T | undefined {
    if (!(id > 0 && id <= ID_MAX)) return undefined;
    const slot = id & this.#mask;
    if (this.#ids[slot] !== id) return undefined;
    const value = this.#values[slot];
    this.#ids[slot] = 0;
    this.#values[slot] = undefined;
    this.#size--;
    return value;
  }

  /** Removes and returns, oldest id first, every value for which `pick` is true. */
  takeWhere(pick: (value: T) => boolean): T[] {
    const taken: { id: number; value: T }[] = [];
    for (let slot = 0; slot < this.#ids.length && taken.length < this.#size; slot++) {
      const id = this.#ids[slot]!;
      if (id !== 0 && pick(this.#values[slot]!)) taken.push({ id, value: this.#values[slot]! });
    }
    for (const entry of taken) this.take(entry.id);
    // Oldest first: ids ascend from just after the newest id handed out, wrapping past ID_MAX.
    const newest = this.#nextId === 1 ? ID_MAX : this.#nextId - 1;
    const age = (id: number): number => (newest - id + ID_MAX) % ID_MAX;
    return taken.sort((a, b) => age(b.id) - age(a.id)).map((entry) => entry.value);
  }

  #grow(): void {
    const length = this.#ids.length * 2;
    const ids = new Uint32Array(length);
    const values = new Array<T | undefined>(length).fill(undefined);
    const mask = length - 1;
    for (let slot = 0; slot < this.#ids.length; slot++) {
      const id = this.#ids[slot]!;
      if (id === 0) continue;
      assert(ids[id & mask] === 0, 'ids in distinct slots stay in distinct slots when the ring doubles');
      ids[id & mask] = id;
      values[id & mask] = this.#values[slot];
    }
    this.#ids = ids;
    this.#values = values;
    this.#mask = mask;
  }
}
