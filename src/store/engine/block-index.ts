/**
 * The engine's in-memory index: object key (volumeId, chunkIndex) → a table with one slot per
 * 4 KiB block of the object, held in typed arrays (DESIGN §4: never one JS object per block; a V8
 * Map tops out at 2^24 entries, so the maps hold objects, not blocks).
 *
 * Per block, the *head* (newest) version: the location of its record (u32 block number in the
 * segment area: the data block for DATA, the batch header's block for a ZERO tombstone; 0 means
 * absent — block 0 is always a segment header), the crc32c of its data, and a *context* byte. A
 * context is what blocks of an object share: (kind, owner epoch, sequence, snap stamp), in a small
 * reference-counted list per table. While an object has at most 255 distinct versions (large or
 * sequential writes: a 4 MiB chunk written in 1 MiB requests has four) a block costs 9 bytes.
 * Past that the table turns *wide*, once: contexts keep only the high 32 bits of the sequence and
 * a per-block u32 holds the low bits — 13 bytes a block (14 if an object ever needs more than 255
 * contexts even so). Tables grow in powers of two up to the highest block written.
 *
 * Older versions kept for live snapshots (*history*) live in a per-object pool of typed arrays,
 * chained per block from newest to oldest by write version, never by log position (compaction
 * moves old versions to new segments). Only objects with history pay for it.
 *
 * This module only stores; the version rule, the snapshot rule and the space accounting live in
 * the engine, which is the one writer of these arrays.
 */
import { assert } from '../../lib/assert.ts';
import { BlockState, type BlockStateValue } from '../../lib/block-state.ts';

export { BlockState, type BlockStateValue } from '../../lib/block-state.ts';

const TWO_32 = 2 ** 32;
const TABLE_BLOCKS_MIN = 16;
const HISTORY_ENTRIES_MIN = 16;
const CONTEXTS_NARROW_MAX = 255;
const CONTEXTS_MAX = 65535;

/** (epoch, seq) of a > (epoch, seq) of b: positive; equal: 0; lower: negative. */
export function compareVersions(epochA: number, seqA: number, epochB: number, seqB: number): number {
  return epochA !== epochB ? epochA - epochB : seqA - seqB;
}

export class ObjectTable {
  readonly volumeId: number;
  readonly chunkIndex: number;
  /** Slots allocated (a power of two, grown on demand). */
  capacity = 0;
  /** One past the highest block whose head was ever set. */
  highestBlocks = 0;
  /** Blocks whose head is not absent. */
  presentBlocks = 0;
  location: Uint32Array = new Uint32Array(0);
  crc: Uint32Array = new Uint32Array(0);
  /** Low 32 bits of each head's sequence; undefined while the table is compact (contexts hold whole sequences). */
  seqLow: Uint32Array | undefined;
  ctx: Uint8Array | Uint16Array = new Uint8Array(0);

  // Contexts; index 0 is "absent". Compact: (kind, epoch, sequence, stamp). Wide: (kind, epoch, sequence / 2^32, stamp).
  readonly ctxKind: number[] = [0];
  readonly ctxEpoch: number[] = [0];
  readonly ctxSeq: number[] = [0];
  readonly ctxStamp: number[] = [0];
  readonly ctxRefs: number[] = [0];
  readonly #ctxFree: number[] = [];
  /**
   * Lookup of held contexts: the first context of each sequence field, the others of the same
   * field chained through #ctxNext (0 ends a chain). Numbers, not a string key per lookup: a
   * random write acquires one context and releases another, and building and hashing those
   * strings showed in the store's profile.
   */
  readonly #ctxBySeq = new Map<number, number>();
  readonly #ctxNext: number[] = [0];
  #lastCtx = 0;

  // History pool.
  historyHead: Int32Array | undefined;
  hLocation: Uint32Array = new Uint32Array(0);
  hCrc: Uint32Array = new Uint32Array(0);
  /** Low 32 bits of each entry's sequence (wide tables only). */
  hSeqLow: Uint32Array = new Uint32Array(0);
  hCtx: Uint16Array = new Uint16Array(0);
  hNext: Int32Array = new Int32Array(0);
  #historyUsed = 0;
  #historyFree = -1;
  historyCount = 0;

  constructor(volumeId: number, chunkIndex: number) {
    this.volumeId = volumeId;
    this.chunkIndex = chunkIndex;
  }

  /** Sequences are split over a per-block array (the table outgrew 255 whole-version contexts). */
  get wideSeq(): boolean {
    return this.seqLow !== undefined;
  }

  /** Makes room for blocks [0, blocks). */
  ensure(blocks: number): void {
    if (blocks <= this.capacity) return;
    let capacity = Math.max(TABLE_BLOCKS_MIN, this.capacity);
    while (capacity < blocks) capacity *= 2;
    const location = new Uint32Array(capacity);
    const crc = new Uint32Array(capacity);
    const ctx = this.ctx instanceof Uint16Array ? new Uint16Array(capacity) : new Uint8Array(capacity);
    location.set(this.location);
    crc.set(this.crc);
    ctx.set(this.ctx);
    this.location = location;
    this.crc = crc;
    this.ctx = ctx;
    if (this.seqLow) {
      const seqLow = new Uint32Array(capacity);
      seqLow.set(this.seqLow);
      this.seqLow = seqLow;
    }
    if (this.historyHead) {
      const head = new Int32Array(capacity).fill(-1);
      head.set(this.historyHead);
      this.historyHead = head;
    }
    this.capacity = capacity;
  }

  /** Bytes of typed arrays this table holds. */
  get memoryBytes(): number {
    const perBlock = 8 + this.ctx.BYTES_PER_ELEMENT + (this.seqLow ? 4 : 0) + (this.historyHead ? 4 : 0);
    return this.capacity * perBlock + this.hLocation.length * 18;
  }

  /**
   * Loads a table from a checkpoint image: contexts (index 0 excluded; `seq` whole or high bits
   * as `seqLow` is absent or present) and the head arrays for blocks [0, highest). Reference
   * counts, the present count and the lookup are rebuilt.
   */
  restore(contexts: { kind: number; epoch: number; seq: number; stamp: number }[], highest: number, location: Uint32Array, crc: Uint32Array,
    seqLow: Uint32Array | undefined, ctx: Uint8Array | Uint16Array): void {
    assert(this.capacity === 0 && this.ctxKind.length === 1, 'restore into a used table');
    for (const context of contexts) {
      this.ctxKind.push(context.kind);
      this.ctxEpoch.push(context.epoch);
      this.ctxSeq.push(context.seq);
      this.ctxStamp.push(context.stamp);
      this.ctxRefs.push(0);
      this.#ctxNext.push(0);
    }
    if (this.ctxKind.length - 1 > CONTEXTS_NARROW_MAX) this.ctx = new Uint16Array(0);
    if (seqLow) this.seqLow = new Uint32Array(0);
    this.ensure(highest);
    this.location.set(location.subarray(0, highest));
    this.crc.set(crc.subarray(0, highest));
    if (seqLow) this.seqLow!.set(seqLow.subarray(0, highest));
    this.ctx.set(ctx.subarray(0, highest));
    for (let block = 0; block < highest; block++) {
      const index = this.ctx[block]!;
      if (index === 0) continue;
      assert(index < this.ctxKind.length, 'checkpoint refers to a missing context');
      this.ctxRefs[index]!++;
      this.presentBlocks++;
      this.highestBlocks = block + 1;
    }
  }

  /** Appends a history entry at the end of the block's chain (checkpoint load: entries come newest first). */
  restoreHistory(block: number, location: number, crc: number, seqLow: number, ctx: number): void {
    assert(block < this.capacity && ctx > 0 && ctx < this.ctxKind.length, 'history entry out of range');
    if (!this.historyHead) this.historyHead = new Int32Array(this.capacity).fill(-1);
    const entry = this.#allocateEntry();
    this.hCtx[entry] = ctx;
    this.ctxRefs[ctx]!++;
    this.hSeqLow[entry] = seqLow;
    this.hLocation[entry] = location;
    this.hCrc[entry] = crc;
    this.hNext[entry] = -1;
    let last = this.historyHead[block]!;
    if (last < 0) this.historyHead[block] = entry;
    else {
      while (this.hNext[last]! >= 0) last = this.hNext[last]!;
      this.hNext[last] = entry;
    }
    this.historyCount++;
  }

  /** After restore: unused contexts go to the free list, used ones to the lookup. */
  finishRestore(): void {
    for (let index = 1; index < this.ctxKind.length; index++) {
      if (this.ctxRefs[index] === 0) this.#ctxFree.push(index);
      else this.#link(index);
    }
  }

  // -------------------------------------------------------------------------------------------
  // Contexts

  /** A context for (kind, epoch, sequence, stamp), referenced once more. May turn the table wide. */
  #acquire(kind: number, epoch: number, seq: number, stamp: number): number {
    const field = this.seqLow ? Math.floor(seq / TWO_32) : seq;
    const last = this.#lastCtx;
    if (last !== 0 && this.ctxKind[last] === kind && this.ctxEpoch[last] === epoch && this.ctxSeq[last] === field && this.ctxStamp[last] === stamp) {
      this.ctxRefs[last]!++;
      return last;
    }
    let index = this.#find(kind, epoch, field, stamp);
    if (index === 0) {
      index = this.#ctxFree.pop() ?? this.ctxKind.length;
      if (index > CONTEXTS_NARROW_MAX && !this.seqLow) {
        // Too many distinct versions for whole-version contexts: split sequences out, then retry.
        this.#widen();
        return this.#acquire(kind, epoch, seq, stamp);
      }
      assert(index <= CONTEXTS_MAX, 'an object needs more than 65535 version contexts');
      if (index > CONTEXTS_NARROW_MAX && !(this.ctx instanceof Uint16Array)) {
        const wide = new Uint16Array(this.capacity);
        wide.set(this.ctx);
        this.ctx = wide;
      }
      this.ctxKind[index] = kind;
      this.ctxEpoch[index] = epoch;
      this.ctxSeq[index] = field;
      this.ctxStamp[index] = stamp;
      this.ctxRefs[index] = 0;
      this.#link(index);
    }
    this.ctxRefs[index]!++;
    this.#lastCtx = index;
    return index;
  }

  #release(index: number): void {
    assert(index > 0 && this.ctxRefs[index]! > 0, 'released a context that is not held');
    if (--this.ctxRefs[index]! > 0) return;
    this.#unlink(index);
    this.#ctxFree.push(index);
    if (this.#lastCtx === index) this.#lastCtx = 0;
  }

  /** The held context (kind, epoch, sequence field, stamp), or 0. */
  #find(kind: number, epoch: number, field: number, stamp: number): number {
    for (let index = this.#ctxBySeq.get(field) ?? 0; index !== 0; index = this.#ctxNext[index]!) {
      if (this.ctxKind[index] === kind && this.ctxEpoch[index] === epoch && this.ctxStamp[index] === stamp) return index;
    }
    return 0;
  }

  #link(index: number): void {
    const field = this.ctxSeq[index]!;
    this.#ctxNext[index] = this.#ctxBySeq.get(field) ?? 0;
    this.#ctxBySeq.set(field, index);
  }

  #unlink(index: number): void {
    const field = this.ctxSeq[index]!;
    const next = this.#ctxNext[index]!;
    let at = this.#ctxBySeq.get(field) ?? 0;
    if (at === index) {
      if (next === 0) this.#ctxBySeq.delete(field);
      else this.#ctxBySeq.set(field, next);
    } else {
      while (at !== 0 && this.#ctxNext[at] !== index) at = this.#ctxNext[at]!;
      assert(at !== 0, 'a held context is in the lookup');
      this.#ctxNext[at] = next;
    }
    this.#ctxNext[index] = 0;
  }

  /** Compact → wide: every head and history entry gets its low sequence bits and a high-bits context. */
  #widen(): void {
    assert(!this.seqLow, 'widened twice');
    const kinds = this.ctxKind.splice(1);
    const epochs = this.ctxEpoch.splice(1);
    const seqs = this.ctxSeq.splice(1);
    const stamps = this.ctxStamp.splice(1);
    this.ctxRefs.splice(1);
    this.#ctxNext.splice(1);
    this.#ctxFree.length = 0;
    this.#ctxBySeq.clear();
    this.#lastCtx = 0;
    this.seqLow = new Uint32Array(this.capacity);
    const remap = (old: number): { ctx: number; low: number } => {
      const seq = seqs[old - 1]!;
      const ctx = this.#acquire(kinds[old - 1]!, epochs[old - 1]!, seq, stamps[old - 1]!);
      return { ctx, low: seq - Math.floor(seq / TWO_32) * TWO_32 };
    };
    for (let block = 0; block < this.highestBlocks; block++) {
      const old = this.ctx[block]!;
      if (old === 0) continue;
      const { ctx, low } = remap(old);
      this.ctx[block] = ctx;
      this.seqLow[block] = low;
    }
    if (this.historyHead) {
      for (let block = 0; block < this.capacity; block++) {
        for (let entry = this.historyHead[block]!; entry >= 0; entry = this.hNext[entry]!) {
          const { ctx, low } = remap(this.hCtx[entry]!);
          this.hCtx[entry] = ctx;
          this.hSeqLow[entry] = low;
        }
      }
    }
  }

  // -------------------------------------------------------------------------------------------
  // Head versions

  stateAt(block: number): BlockStateValue {
    if (block >= this.capacity) return BlockState.ABSENT;
    return this.ctxKind[this.ctx[block]!] as BlockStateValue;
  }

  epochAt(block: number): number {
    return this.ctxEpoch[this.ctx[block]!]!;
  }

  seqAt(block: number): number {
    const field = this.ctxSeq[this.ctx[block]!]!;
    return this.seqLow ? field * TWO_32 + this.seqLow[block]! : field;
  }

  stampAt(block: number): number {
    return this.ctxStamp[this.ctx[block]!]!;
  }

  /** Sets the head of `block` (room must have been made with `ensure`). */
  setHead(block: number, kind: number, epoch: number, seq: number, stamp: number, location: number, crc: number): void {
    assert(block < this.capacity && location > 0, 'head set outside the table or at location 0');
    const next = this.#acquire(kind, epoch, seq, stamp);
    const previous = this.ctx[block]!;
    if (previous !== 0) this.#release(previous);
    else {
      this.presentBlocks++;
      if (block + 1 > this.highestBlocks) this.highestBlocks = block + 1;
    }
    this.ctx[block] = next;
    if (this.seqLow) this.seqLow[block] = seq - Math.floor(seq / TWO_32) * TWO_32;
    this.location[block] = location;
    this.crc[block] = crc;
  }

  clearHead(block: number): void {
    const previous = this.ctx[block]!;
    assert(previous !== 0, 'cleared an absent head');
    this.#release(previous);
    this.ctx[block] = 0;
    this.location[block] = 0;
    this.crc[block] = 0;
    if (this.seqLow) this.seqLow[block] = 0;
    this.presentBlocks--;
  }

  // -------------------------------------------------------------------------------------------
  // History (older versions kept for snapshots), newest first per block

  hasHistory(block: number): boolean {
    return this.historyHead !== undefined && block < this.capacity && this.historyHead[block]! >= 0;
  }

  firstHistory(block: number): number {
    return this.historyHead && block < this.capacity ? this.historyHead[block]! : -1;
  }

  entryKind(entry: number): number {
    return this.ctxKind[this.hCtx[entry]!]!;
  }

  entryEpoch(entry: number): number {
    return this.ctxEpoch[this.hCtx[entry]!]!;
  }

  entrySeq(entry: number): number {
    const field = this.ctxSeq[this.hCtx[entry]!]!;
    return this.seqLow ? field * TWO_32 + this.hSeqLow[entry]! : field;
  }

  entryStamp(entry: number): number {
    return this.ctxStamp[this.hCtx[entry]!]!;
  }

  /** Inserts a version into the block's history at its place by write version. Returns the entry. */
  insertHistory(block: number, kind: number, epoch: number, seq: number, stamp: number, location: number, crc: number): number {
    assert(block < this.capacity, 'history outside the table');
    if (!this.historyHead) this.historyHead = new Int32Array(this.capacity).fill(-1);
    // The context first: acquiring may widen the table, which rewrites every entry.
    const ctx = this.#acquire(kind, epoch, seq, stamp);
    const entry = this.#allocateEntry();
    this.hCtx[entry] = ctx;
    this.hSeqLow[entry] = this.seqLow ? seq - Math.floor(seq / TWO_32) * TWO_32 : 0;
    this.hLocation[entry] = location;
    this.hCrc[entry] = crc;
    let previous = -1;
    let current = this.historyHead[block]!;
    while (current >= 0 && compareVersions(this.entryEpoch(current), this.entrySeq(current), epoch, seq) > 0) {
      previous = current;
      current = this.hNext[current]!;
    }
    this.hNext[entry] = current;
    if (previous < 0) this.historyHead[block] = entry;
    else this.hNext[previous] = entry;
    this.historyCount++;
    return entry;
  }

  /** Unlinks `entry` (whose predecessor in the block's chain is `previous`, or -1). */
  removeHistory(block: number, entry: number, previous: number): void {
    assert(this.historyHead !== undefined, 'removed history from a table without any');
    const next = this.hNext[entry]!;
    if (previous < 0) {
      assert(this.historyHead[block] === entry, 'history chain broken');
      this.historyHead[block] = next;
    } else {
      this.hNext[previous] = next;
    }
    this.#release(this.hCtx[entry]!);
    this.hCtx[entry] = 0;
    this.hNext[entry] = this.#historyFree;
    this.#historyFree = entry;
    this.historyCount--;
  }

  #allocateEntry(): number {
    if (this.#historyFree >= 0) {
      const entry = this.#historyFree;
      this.#historyFree = this.hNext[entry]!;
      return entry;
    }
    if (this.#historyUsed === this.hLocation.length) {
      const capacity = Math.max(HISTORY_ENTRIES_MIN, this.hLocation.length * 2);
      const grow = <T extends Uint32Array | Uint16Array | Int32Array>(from: T, make: (n: number) => T): T => {
        const to = make(capacity);
        to.set(from);
        return to;
      };
      this.hLocation = grow(this.hLocation, (n) => new Uint32Array(n));
      this.hCrc = grow(this.hCrc, (n) => new Uint32Array(n));
      this.hSeqLow = grow(this.hSeqLow, (n) => new Uint32Array(n));
      this.hCtx = grow(this.hCtx, (n) => new Uint16Array(n));
      this.hNext = grow(this.hNext, (n) => new Int32Array(n));
    }
    return this.#historyUsed++;
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

  /** Adds a table built elsewhere (checkpoint load). */
  adopt(table: ObjectTable): void {
    let chunks = this.#volumes.get(table.volumeId);
    if (!chunks) {
      chunks = new Map();
      this.#volumes.set(table.volumeId, chunks);
    }
    if (!chunks.has(table.chunkIndex)) this.#objectCount++;
    chunks.set(table.chunkIndex, table);
  }

  /** Removes one object (when it holds nothing any more). */
  delete(volumeId: number, chunkIndex: number): void {
    const chunks = this.#volumes.get(volumeId);
    if (!chunks?.delete(chunkIndex)) return;
    this.#objectCount--;
    if (chunks.size === 0) this.#volumes.delete(volumeId);
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

  *objectsOf(volumeId: number): IterableIterator<ObjectTable> {
    const chunks = this.#volumes.get(volumeId);
    if (chunks) yield* chunks.values();
  }

  *volumeIds(): IterableIterator<number> {
    yield* this.#volumes.keys();
  }

  /** Bytes of typed arrays held by every table. */
  get memoryBytes(): number {
    let bytes = 0;
    for (const table of this.objects()) bytes += table.memoryBytes;
    return bytes;
  }
}
