import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { giveBack } from '../../lib/buffer-pool.ts';
import { BLOCK_SIZE_BYTES } from '../../lib/units.ts';
import { BlockCache } from './block-cache.ts';

const block = (fill: number): Buffer => Buffer.alloc(BLOCK_SIZE_BYTES, fill);

test('a cached block is found under its location, generation and crc, and reads back as added', () => {
  const cache = new BlockCache(16 * BLOCK_SIZE_BYTES);
  const source = Buffer.concat([block(1), block(2)]);
  cache.add(7, 3, 0xdead, source, BLOCK_SIZE_BYTES);
  const slot = cache.find(7, 3, 0xdead);
  assert.ok(slot >= 0);
  const out = Buffer.alloc(2 * BLOCK_SIZE_BYTES);
  cache.copyOut(slot, out, BLOCK_SIZE_BYTES);
  assert.deepEqual(out.subarray(BLOCK_SIZE_BYTES), block(2));
  const view = cache.view(slot);
  assert.deepEqual(view, block(2));
  giveBack(view);
  assert.equal(cache.find(8, 3, 0xdead), -1, 'another location');
  assert.deepEqual(cache.stats, {
    capacityBytes: 16 * BLOCK_SIZE_BYTES, cachedBytes: BLOCK_SIZE_BYTES, allocatedBytes: 16 * BLOCK_SIZE_BYTES, hits: 1, misses: 1, insertions: 1, evictions: 0, stale: 0, pinned: 0,
  });
});

test('an entry of an older generation (its segment reused) or another crc is dropped, never returned', () => {
  const cache = new BlockCache(16 * BLOCK_SIZE_BYTES);
  cache.add(5, 1, 111, block(1), 0);
  assert.equal(cache.find(5, 2, 111), -1, 'the segment was reused since');
  assert.equal(cache.find(5, 1, 111), -1, 'dropped at the first stale lookup');
  cache.add(5, 2, 222, block(2), 0);
  assert.equal(cache.find(5, 2, 333), -1, 'the index holds another block there');
  assert.equal(cache.stats.stale, 2);
  assert.equal(cache.stats.cachedBytes, 0);
  // Added again under the new generation: the new bytes, not the old.
  cache.add(5, 3, 444, block(3), 0);
  const view = cache.view(cache.find(5, 3, 444));
  assert.deepEqual(view, block(3));
  giveBack(view);
});

test('adding a block already cached keeps the first copy; a stale one is replaced', () => {
  const cache = new BlockCache(16 * BLOCK_SIZE_BYTES);
  cache.add(9, 1, 10, block(1), 0);
  cache.add(9, 1, 10, block(9), 0);
  assert.equal(cache.stats.insertions, 1);
  cache.add(9, 2, 20, block(2), 0);
  assert.equal(cache.stats.insertions, 2);
  assert.equal(cache.stats.stale, 1);
  const out = Buffer.alloc(BLOCK_SIZE_BYTES);
  cache.copyOut(cache.find(9, 2, 20), out, 0);
  assert.deepEqual(out, block(2));
});

test('full: CLOCK evicts blocks not read since the hand passed, and never a pinned one', () => {
  const cache = new BlockCache(4 * BLOCK_SIZE_BYTES);
  for (let location = 0; location < 4; location++) cache.add(location, 1, location, block(location), 0);
  // Lend block 0 and keep it; read block 1 (a second chance).
  const lent = cache.view(cache.find(0, 1, 0));
  assert.ok(cache.find(1, 1, 1) >= 0);
  cache.add(100, 1, 100, block(100), 0);
  cache.add(101, 1, 101, block(101), 0);
  assert.equal(cache.stats.evictions, 2);
  assert.ok(cache.find(0, 1, 0) >= 0, 'pinned: kept');
  assert.ok(cache.find(1, 1, 1) >= 0, 'read: kept');
  assert.equal(cache.find(2, 1, 2), -1);
  assert.equal(cache.find(3, 1, 3), -1);
  assert.deepEqual(lent, block(0), 'the lent bytes were never overwritten');
  assert.equal(cache.stats.pinned, 1);
  giveBack(lent.subarray(10, 20));
  assert.equal(cache.stats.pinned, 0, 'a view of the lent view gives the slot back');
  giveBack(lent);
  assert.equal(cache.stats.pinned, 0, 'a second give changes nothing');
});

test('a scan fills free and cold slots but never pushes out blocks small reads keep using', () => {
  const cache = new BlockCache(4 * BLOCK_SIZE_BYTES);
  cache.add(0, 1, 0, block(0), 0, true);
  cache.add(1, 1, 1, block(1), 0, true);
  assert.equal(cache.stats.insertions, 2, 'free room is taken by a scan');
  cache.add(2, 1, 2, block(2), 0);
  cache.add(3, 1, 3, block(3), 0);
  for (let location = 0; location < 4; location++) assert.ok(cache.find(location, 1, location) >= 0);
  // All four read since the hand passed: a scan finds no cold slot, takes none, clears nothing.
  for (let location = 10; location < 20; location++) cache.add(location, 1, location, block(location), 0, true);
  assert.equal(cache.stats.insertions, 4);
  // Their second chances are intact: a small read's insertion sweeps once, clearing them, then
  // evicts the first; after that the cold ones are a scan's to take.
  cache.add(30, 1, 30, block(30), 0);
  assert.equal(cache.stats.evictions, 1);
  cache.add(40, 1, 40, block(40), 0, true);
  assert.equal(cache.stats.evictions, 2, 'a cold slot is taken by a scan');
  assert.ok(cache.find(30, 1, 30) >= 0 && cache.find(40, 1, 40) >= 0);
});

test('a forgotten block (overwritten on the disk) frees its slot at once; a lent one when it comes back', () => {
  const cache = new BlockCache(2 * BLOCK_SIZE_BYTES);
  cache.add(0, 1, 0, block(0), 0);
  cache.add(1, 1, 1, block(1), 0);
  assert.ok(cache.find(0, 1, 0) >= 0 && cache.find(1, 1, 1) >= 0);
  const lent = cache.view(cache.find(1, 1, 1));
  cache.forget(0);
  cache.forget(1);
  cache.forget(99);
  assert.equal(cache.find(0, 1, 0), -1);
  assert.equal(cache.stats.cachedBytes, 0);
  // Both blocks were read since the hand passed, yet a scan finds slot 0 free at once.
  cache.add(2, 1, 2, block(2), 0, true);
  assert.ok(cache.find(2, 1, 2) >= 0);
  cache.add(3, 1, 3, block(3), 0, true);
  assert.equal(cache.find(3, 1, 3), -1, 'the lent slot is not free yet');
  assert.deepEqual(lent, block(1));
  giveBack(lent);
  cache.add(3, 1, 3, block(3), 0, true);
  assert.ok(cache.find(3, 1, 3) >= 0, 'free once given back');
  assert.equal(cache.stats.evictions, 0);
});

test('every slot pinned: nothing is added and nothing lent is touched', () => {
  const cache = new BlockCache(2 * BLOCK_SIZE_BYTES);
  cache.add(0, 1, 0, block(1), 0);
  cache.add(1, 1, 1, block(2), 0);
  const a = cache.view(cache.find(0, 1, 0));
  const b = cache.view(cache.find(1, 1, 1));
  cache.add(2, 1, 2, block(3), 0);
  assert.equal(cache.find(2, 1, 2), -1);
  assert.deepEqual([a, b], [block(1), block(2)]);
  giveBack(a);
  cache.add(2, 1, 2, block(3), 0);
  assert.ok(cache.find(2, 1, 2) >= 0, 'room again once a view came back');
  assert.deepEqual(b, block(2));
  giveBack(b);
});

test('a buffer the cache did not lend is ignored by give', () => {
  const cache = new BlockCache(BLOCK_SIZE_BYTES);
  cache.add(0, 1, 0, block(1), 0);
  const view = cache.view(cache.find(0, 1, 0));
  cache.give(Buffer.alloc(BLOCK_SIZE_BYTES));
  cache.give(Buffer.from(view));
  assert.equal(cache.stats.pinned, 1);
  cache.give(view);
  assert.equal(cache.stats.pinned, 0);
});

test('bad sizes are refused', () => {
  assert.throws(() => new BlockCache(100), { code: 'INVALID_ARGUMENT' });
  assert.throws(() => new BlockCache(Number.NaN), { code: 'INVALID_ARGUMENT' });
});

test('property: against a model, with growth, eviction, stale generations and removals shifting probe runs', () => {
  fc.assert(fc.property(
    fc.integer({ min: 1, max: 1500 }),
    fc.array(fc.tuple(fc.constantFrom('add', 'add', 'find', 'bump', 'forget'), fc.oneof(fc.integer({ min: 0, max: 600 }), fc.integer({ min: 0, max: 2 ** 32 - 2 }))), { minLength: 500, maxLength: 3000 }),
    (capacityBlocks, ops) => {
      const cache = new BlockCache(capacityBlocks * BLOCK_SIZE_BYTES);
      // What each location holds now on "disk": generation and content byte.
      const disk = new Map<number, { generation: number; fill: number }>();
      let fill = 0;
      for (const [op, location] of ops) {
        const now = disk.get(location) ?? { generation: 1, fill: location % 251 };
        disk.set(location, now);
        if (op === 'forget') {
          cache.forget(location);
          assert.equal(cache.find(location, now.generation, now.fill), -1);
        } else if (op === 'bump') {
          disk.set(location, { generation: now.generation + 1, fill: (fill = (fill + 1) % 251) });
        } else if (op === 'add') {
          cache.add(location, now.generation, now.fill, block(now.fill), 0);
          assert.ok(cache.find(location, now.generation, now.fill) >= 0, 'found right after it was added');
        } else {
          const slot = cache.find(location, now.generation, now.fill);
          if (slot >= 0) {
            const out = Buffer.alloc(BLOCK_SIZE_BYTES);
            cache.copyOut(slot, out, 0);
            assert.ok(out.every((byte) => byte === now.fill), `location ${location} reads its current bytes`);
          }
        }
        const stats = cache.stats;
        assert.ok(stats.cachedBytes <= capacityBlocks * BLOCK_SIZE_BYTES);
      }
      // Every block the cache still returns is the current one, and every entry it counts can be
      // found (the stale ones are dropped as they are met): none was lost in the table.
      let found = 0;
      for (const [location, now] of disk) {
        const slot = cache.find(location, now.generation, now.fill);
        if (slot < 0) continue;
        found++;
        const out = Buffer.alloc(BLOCK_SIZE_BYTES);
        cache.copyOut(slot, out, 0);
        assert.ok(out.every((byte) => byte === now.fill));
      }
      assert.equal(cache.stats.cachedBytes, found * BLOCK_SIZE_BYTES);
    },
  ), { numRuns: 60 });
});
