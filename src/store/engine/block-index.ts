/**
 * The engine's in-memory index: object key (volumeId, chunkIndex) → a table with one slot per
 * 4 KiB block of the object, held in typed arrays (DESIGN §4: never one JS object per block; a V8
 * Map tops out at 2^24 entries, so the maps hold objects, not blocks).
 *
 * Per block: state (absent / data / zero), version (epoch u32, seq f64 — exact to 2^53), the
 * location of the record holding it (a u32 block number in the segment area: the data block for
 * DATA, the batch's header block for a ZERO tombstone) and the crc32c of its data. That is 21
 * bytes per block slot; format 1 keeps only the newest version of each block.
 *
 * This module only stores; the version rule and the space accounting live in the engine, which
 * is the one writer of these arrays.
 */
import { assert } from '../../lib/assert.ts';
import { BlockState, type BlockStateValue } from '../../lib/block-state.ts';

export { BlockState, type BlockStateValue } from '../../lib/block-state.ts';

const SLOT_BYTES = 8 + 4 + 4 + 4 + 1;
const TABLE_BLOCKS_MIN = 16;

export class ObjectTable {
  readonly volumeId: number;
  readonly chunkIndex: number;
  /** Slots allocated (a power of two, grown on demand). */
  capacity = 0;
  /** One past the highest block ever set. */
  highestBlocks = 0;
  /** Blocks not absent. */
  presentBlocks = 0;
  seq: Float64Array = new Float64Array(0);
  epoch: Uint32Array = new Uint32Array(0);
  location: Uint32Array = new Uint32Array(0);
  crc: Uint32Array = new Uint32Array(0);
  state: Uint8Array = new Uint8Array(0);

  constructor(volumeId: number, chunkIndex: number) {
    this.volumeId = volumeId;
    this.chunkIndex = chunkIndex;
  }

  /** Makes room for blocks [0, blocks). One ArrayBuffer backs all five arrays. */
  ensure(blocks: number): void {
    if (blocks <= this.capacity) return;
    let capacity = Math.max(TABLE_BLOCKS_MIN, this.capacity);
    while (capacity < blocks) capacity *= 2;
    const memory = new ArrayBuffer(capacity * SLOT_BYTES);
    const seq = new Float64Array(memory, 0, capacity);
    const epoch = new Uint32Array(memory, capacity * 8, capacity);
    const location = new Uint32Array(memory, capacity * 12, capacity);
    const crc = new Uint32Array(memory, capacity * 16, capacity);
    const state = new Uint8Array(memory, capacity * 20, capacity);
    seq.set(this.seq);
    epoch.set(this.epoch);
    location.set(this.location);
    crc.set(this.crc);
    state.set(this.state);
    this.seq = seq;
    this.epoch = epoch;
    this.location = location;
    this.crc = crc;
    this.state = state;
    this.capacity = capacity;
  }

  stateAt(block: number): BlockStateValue {
    return (block < this.capacity ? this.state[block]! : BlockState.ABSENT) as BlockStateValue;
  }
}

export class BlockIndex {
  readonly #volumes = new Map<number, Map<number, ObjectTable>>();
  #objectCount = 0;

  get objectCount(): number {
    return this.#objectCount;
  }

  get(volumeId: number, chunkIndex: number): ObjectTable | undefined {
    return this.#volumes.get(volumeId)?.get(chunkIndex);
  }

  /** The table of the object, created if missing, with room for blocks [0, blocks). */
  getOrCreate(volumeId: number, chunkIndex: number, blocks: number): ObjectTable {
    let chunks = this.#volumes.get(volumeId);
    if (!chunks) {
      chunks = new Map();
      this.#volumes.set(volumeId, chunks);
    }
    let table = chunks.get(chunkIndex);
    if (!table) {
      table = new ObjectTable(volumeId, chunkIndex);
      chunks.set(chunkIndex, table);
      this.#objectCount++;
    }
    table.ensure(blocks);
    return table;
  }

  /** Removes every object of the volume and returns their tables (for the caller's accounting). */
  deleteVolume(volumeId: number): ObjectTable[] {
    const chunks = this.#volumes.get(volumeId);
    if (!chunks) return [];
    this.#volumes.delete(volumeId);
    this.#objectCount -= chunks.size;
    assert(this.#objectCount >= 0, 'object count went negative');
    return [...chunks.values()];
  }

  *objects(): IterableIterator<ObjectTable> {
    for (const chunks of this.#volumes.values()) yield* chunks.values();
  }

  *volumeIds(): IterableIterator<number> {
    yield* this.#volumes.keys();
  }
}
