/**
 * The store engine's read cache: verified 4 KiB blocks in memory, found by where they lie on the
 * disk. DESIGN §9 names it as one way to keep reads off libuv's thread pool; measured, it also
 * takes a system call and a copy off every small read that hits (docs/benchmarks.md).
 *
 * - **Keyed by location.** A log-structured disk never rewrites a block in place: the bytes at a
 *   location stay the same until its segment is reused, and a reused segment gets a new generation.
 *   An entry holds the generation it was read under, and a lookup with another generation drops it.
 *   An entry also holds the block's crc32c, which must equal the index's: a second check that the
 *   entry is the block the index means. No write or trim needs to touch the cache for it to stay
 *   right; the engine calls `forget` when a block's data dies only so that its slot is free at once.
 * - **Only verified bytes enter.** The engine adds a block after it matched its crc32c on the way
 *   from the disk; the cache's memory is written nowhere else.
 * - **Lent, not copied.** `view` hands out the slot's own memory for a reply and pins the slot; the
 *   reader gives it back (`giveBack` in lib/buffer-pool.ts) once the reply is written, and a pinned
 *   slot is never evicted. A view that is never given back keeps its slot out of use, never wrong.
 * - **Bounded.** At most `capacityBytes`, allocated in arenas as it fills. Eviction is CLOCK
 *   (a second chance for blocks read since the hand last passed); blocks of large reads (`scan`)
 *   take only free or cold slots, so a sequential pass cannot flush what small reads use.
 *
 * Lookups go through an open-addressing hash table in typed arrays: no per-entry objects, so a
 * cache of a million blocks is two arrays for the garbage collector, and a hit reads one bucket
 * and one slot record (the table holds the keys; a slot's fields lie side by side).
 */

import { BLOCK_SIZE_BYTES } from '../../lib/units.ts';
import { markLender, type BufferLender } from '../../lib/buffer-pool.ts';
import { ShaleError } from '../../lib/errors.ts';

/** Blocks per arena (8 MiB): the unit in which the cache takes memory as it fills. */
const ARENA_BLOCKS = 2048;
const ARENA_SHIFT = 11;
const EMPTY = -1;
/** How far a scan's block looks for a free or cold slot before it gives up on being cached. */
const SCAN_STEPS = 8;
/** Slot arrays and the hash table start at this many slots and double as the cache fills. */
const INITIAL_SLOTS = 1024;

export interface BlockCacheStats {
  capacityBytes: number;
  /** Bytes of blocks held. */
  cachedBytes: number;
  /** Bytes of memory taken (whole arenas). */
  allocatedBytes: number;
  hits: number;
  misses: number;
  insertions: number;
  evictions: number;
  /** Entries found stale (segment reused, or crc not the index's) and dropped. */
  stale: number;
  /** Slots lent to replies not yet written. */
  pinned: number;
}

export class BlockCache implements BufferLender {
  readonly capacityBlocks: number;
  readonly #arenas: Buffer[] = [];
  /** Slots handed out so far; grows to capacityBlocks, then slots are reused by eviction. */
  #slots = 0;
  /** Slots emptied by `forget` or a stale lookup and not lent: taken before the clock runs. */
  readonly #free: number[] = [];
  /**
   * Per slot, side by side so a hit touches one cache line: location (EMPTY when the slot holds
   * nothing), generation, crc32c, and pins × 2 + the referenced bit.
   */
  #meta = newMeta(INITIAL_SLOTS);
  /** Buckets of [location as int32, slot], linear probing; slot EMPTY marks a free bucket. At most half full. */
  #table = newTable(2 * INITIAL_SLOTS);
  #mask = 2 * INITIAL_SLOTS - 1;
  /** 32 − log2(buckets): a bucket is the top bits of the key's Fibonacci hash. */
  #shift = 32 - Math.log2(2 * INITIAL_SLOTS);
  #entries = 0;
  #hand = 0;
  #pinned = 0;
  #hits = 0;
  #misses = 0;
  #insertions = 0;
  #evictions = 0;
  #stale = 0;
  #allocatedBytes = 0;

  constructor(capacityBytes: number) {
    if (!Number.isSafeInteger(capacityBytes) || capacityBytes < BLOCK_SIZE_BYTES) {
      throw new ShaleError('INVALID_ARGUMENT', `a block cache needs at least ${BLOCK_SIZE_BYTES} bytes, got ${capacityBytes}`);
    }
    this.capacityBlocks = Math.floor(capacityBytes / BLOCK_SIZE_BYTES);
  }

  /**
   * The slot holding the block at `location` read under `generation` with crc32c `crc`, or -1.
   * An entry of an older generation or another crc is dropped (and is a miss).
   */
  find(location: number, generation: number, crc: number): number {
    const slot = this.#lookup(location);
    if (slot === EMPTY) {
      this.#misses++;
      return EMPTY;
    }
    const meta = this.#meta;
    const at = slot * FIELDS;
    if (meta[at + GENERATION] !== generation || meta[at + CRC] !== crc) {
      this.#stale++;
      this.#misses++;
      this.#drop(slot);
      return EMPTY;
    }
    const pinsRef = meta[at + PINS_REF]!;
    if (pinsRef % 2 === 0) meta[at + PINS_REF] = pinsRef + 1;
    this.#hits++;
    return slot;
  }

  /** Copies the block in `slot` (from `find`) into `target` at `targetOffset`. */
  copyOut(slot: number, target: Buffer, targetOffset: number): void {
    const arena = this.#arenas[slot >>> ARENA_SHIFT]!;
    const start = (slot & (ARENA_BLOCKS - 1)) * BLOCK_SIZE_BYTES;
    arena.copy(target, targetOffset, start, start + BLOCK_SIZE_BYTES);
  }

  /**
   * The block in `slot` (from `find`) as a view of the cache's own memory, lent: the slot stays
   * pinned until the view (or a view of it) comes back through `give`. Nothing may write to it.
   */
  view(slot: number): Buffer {
    const at = slot * FIELDS + PINS_REF;
    if (this.#meta[at]! < 2) this.#pinned++;
    this.#meta[at]! += 2;
    const arena = this.#arenas[slot >>> ARENA_SHIFT]!;
    return Buffer.from(arena.buffer, (slot & (ARENA_BLOCKS - 1)) * BLOCK_SIZE_BYTES, BLOCK_SIZE_BYTES);
  }

  /** A lent view (or a view of one) is back: its slot may be evicted again. */
  give(buffer: Buffer): void {
    const arenaIndex = (buffer.buffer as ArenaBuffer)[ARENA_INDEX];
    if (arenaIndex === undefined || this.#arenas[arenaIndex]?.buffer !== buffer.buffer) return;
    const slot = arenaIndex * ARENA_BLOCKS + Math.floor(buffer.byteOffset / BLOCK_SIZE_BYTES);
    const at = slot * FIELDS + PINS_REF;
    if (this.#meta[at]! < 2) return;
    this.#meta[at]! -= 2;
    if (this.#meta[at]! >= 2) return;
    this.#pinned--;
    if (this.#meta[slot * FIELDS + LOCATION] === EMPTY) this.#free.push(slot);
  }

  /** The block at `location` is no longer live (overwritten, trimmed, moved): its slot is free again. */
  forget(location: number): void {
    const slot = this.#lookup(location);
    if (slot !== EMPTY) this.#drop(slot);
  }

  /**
   * Keeps a copy of one verified block: `source[sourceOffset, +4 KiB)`, which lies at `location`,
   * read under `generation`, with crc32c `crc`. Does nothing if that block is cached already or if
   * every slot is pinned. A `scan` block (of a large, sequential read) takes only a slot that is
   * free or holds a block not read since the hand last passed, found within a few steps, and
   * clears no second chance on its way: a scan fills the room it finds but cannot push out the
   * blocks that small reads keep using.
   */
  add(location: number, generation: number, crc: number, source: Buffer, sourceOffset: number, scan = false): void {
    const present = this.#lookup(location);
    if (present !== EMPTY) {
      const at = present * FIELDS;
      if (this.#meta[at + GENERATION] === generation && this.#meta[at + CRC] === crc) return;
      this.#drop(present);
      this.#stale++;
    }
    const slot = this.#freeSlot(scan);
    if (slot === EMPTY) return;
    source.copy(this.#arenas[slot >>> ARENA_SHIFT]!, (slot & (ARENA_BLOCKS - 1)) * BLOCK_SIZE_BYTES, sourceOffset, sourceOffset + BLOCK_SIZE_BYTES);
    const meta = this.#meta;
    const at = slot * FIELDS;
    meta[at + LOCATION] = location;
    meta[at + GENERATION] = generation;
    meta[at + CRC] = crc;
    // A new entry starts without its second chance; pins (of an evicted, unpinned slot) are 0.
    meta[at + PINS_REF] = 0;
    this.#insert(location, slot);
    this.#insertions++;
  }

  get stats(): BlockCacheStats {
    return {
      capacityBytes: this.capacityBlocks * BLOCK_SIZE_BYTES,
      cachedBytes: this.#entries * BLOCK_SIZE_BYTES,
      allocatedBytes: this.#allocatedBytes,
      hits: this.#hits,
      misses: this.#misses,
      insertions: this.#insertions,
      evictions: this.#evictions,
      stale: this.#stale,
      pinned: this.#pinned,
    };
  }

  // -------------------------------------------------------------------------------------------

  /**
   * A slot to fill: a new one while the cache grows, else CLOCK's victim; EMPTY if all are pinned
   * (or, for a scan, if none is free or cold within SCAN_STEPS).
   */
  #freeSlot(scan: boolean): number {
    while (this.#free.length > 0) {
      const slot = this.#free.pop()!;
      // Taken by the clock since it was freed, or lent again: not free any more.
      if (this.#meta[slot * FIELDS + LOCATION] === EMPTY && this.#meta[slot * FIELDS + PINS_REF]! < 2) return slot;
    }
    if (this.#slots < this.capacityBlocks) {
      const slot = this.#slots++;
      if (slot * FIELDS >= this.#meta.length) this.#growSlots();
      if ((slot >>> ARENA_SHIFT) >= this.#arenas.length) this.#addArena();
      return slot;
    }
    // Two sweeps clear every second chance; a third finds any slot not pinned.
    const meta = this.#meta;
    const steps = scan ? Math.min(SCAN_STEPS, this.#slots) : 3 * this.#slots;
    for (let step = 0; step < steps; step++) {
      const slot = this.#hand;
      this.#hand = slot + 1 === this.#slots ? 0 : slot + 1;
      const at = slot * FIELDS;
      const pinsRef = meta[at + PINS_REF]!;
      if (pinsRef >= 2) continue;
      if (pinsRef === 1) {
        if (!scan) meta[at + PINS_REF] = 0;
        continue;
      }
      if (meta[at + LOCATION] !== EMPTY) {
        this.#drop(slot, false);
        this.#evictions++;
      }
      return slot;
    }
    return EMPTY;
  }

  /** Forgets what `slot` holds; it goes on the free list unless it is lent (then when it comes back) or `free` is false. */
  #drop(slot: number, free = true): void {
    const at = slot * FIELDS;
    this.#remove(this.#meta[at + LOCATION]!);
    this.#meta[at + LOCATION] = EMPTY;
    if (free && this.#meta[at + PINS_REF]! < 2) this.#free.push(slot);
  }

  /** Arenas come from allocUnsafeSlow: each owns its ArrayBuffer from offset 0, which `give` relies on. */
  #addArena(): void {
    const blocks = Math.min(ARENA_BLOCKS, this.capacityBlocks - this.#arenas.length * ARENA_BLOCKS);
    const arena = Buffer.allocUnsafeSlow(blocks * BLOCK_SIZE_BYTES);
    (arena.buffer as ArenaBuffer)[ARENA_INDEX] = this.#arenas.length;
    markLender(arena.buffer, this);
    this.#arenas.push(arena);
    this.#allocatedBytes += arena.length;
  }

  #growSlots(): void {
    const slots = Math.min(this.capacityBlocks, (this.#meta.length / FIELDS) * 2);
    const meta = newMeta(slots);
    meta.set(this.#meta);
    this.#meta = meta;
    // Keep the table at most half full.
    const buckets = 2 ** Math.ceil(Math.log2(2 * slots));
    if (buckets > this.#mask + 1) {
      const old = this.#table;
      this.#table = newTable(buckets);
      this.#mask = buckets - 1;
      this.#shift = 32 - Math.log2(buckets);
      this.#entries = 0;
      for (let b = 0; b < old.length; b += 2) if (old[b + 1] !== EMPTY) this.#insert(meta[old[b + 1]! * FIELDS + LOCATION]!, old[b + 1]!);
    }
  }

  #bucket(location: number): number {
    return Math.imul(location | 0, 0x9e3779b1) >>> this.#shift;
  }

  #lookup(location: number): number {
    const table = this.#table;
    const mask = this.#mask;
    const key = location | 0;
    for (let bucket = this.#bucket(location); ; bucket = (bucket + 1) & mask) {
      const slot = table[2 * bucket + 1]!;
      if (slot === EMPTY || table[2 * bucket] === key) return slot;
    }
  }

  #insert(location: number, slot: number): void {
    const table = this.#table;
    const mask = this.#mask;
    let bucket = this.#bucket(location);
    while (table[2 * bucket + 1] !== EMPTY) bucket = (bucket + 1) & mask;
    table[2 * bucket] = location | 0;
    table[2 * bucket + 1] = slot;
    this.#entries++;
  }

  /** Removes `location` from the table, shifting later entries of its probe run back (no tombstones). */
  #remove(location: number): void {
    const table = this.#table;
    const mask = this.#mask;
    const key = location | 0;
    let bucket = this.#bucket(location);
    while (table[2 * bucket + 1] !== EMPTY && table[2 * bucket] !== key) bucket = (bucket + 1) & mask;
    if (table[2 * bucket + 1] === EMPTY) return;
    this.#entries--;
    let hole = bucket;
    for (let next = (hole + 1) & mask; table[2 * next + 1] !== EMPTY; next = (next + 1) & mask) {
      const home = this.#bucket(table[2 * next]! >>> 0);
      // An entry may move back into the hole unless its home bucket lies cyclically in (hole, next].
      if ((next > hole && (home <= hole || home > next)) || (next < hole && home <= hole && home > next)) {
        table[2 * hole] = table[2 * next]!;
        table[2 * hole + 1] = table[2 * next + 1]!;
        hole = next;
      }
    }
    table[2 * hole + 1] = EMPTY;
  }
}

const FIELDS = 4;
const LOCATION = 0;
const GENERATION = 1;
const CRC = 2;
const PINS_REF = 3;

function newMeta(slots: number): Float64Array {
  const meta = new Float64Array(slots * FIELDS);
  for (let at = LOCATION; at < meta.length; at += FIELDS) meta[at] = EMPTY;
  return meta;
}

function newTable(buckets: number): Int32Array {
  return new Int32Array(2 * buckets).fill(EMPTY);
}

const ARENA_INDEX = Symbol('shale.block-cache.arena');
type ArenaBuffer = ArrayBufferLike & { [ARENA_INDEX]?: number };
