import assert from 'node:assert/strict';
import { test } from 'node:test';
import { objectHash, placementGroupOf, stableMod } from './placement-hash.ts';

test('stable_mod keeps objects in place or moves them to one new PG when the PG count doubles', () => {
  for (let x = 0; x < 5000; x++) {
    const before = stableMod(objectHash(x, x % 7), 48);
    const after = stableMod(objectHash(x, x % 7), 96);
    assert.ok(before < 48 && after < 96);
    assert.ok(after === before || after === before + 48 || after === before + 64 || after >= 48, `object ${x}: ${before} -> ${after}`);
  }
});

test('objects spread evenly over placement groups', () => {
  const counts = new Array<number>(256).fill(0);
  for (let volume = 1; volume <= 16; volume++) for (let chunk = 0; chunk < 4096; chunk++) counts[placementGroupOf(volume, chunk, 256)]!++;
  const mean = (16 * 4096) / 256;
  for (const count of counts) assert.ok(Math.abs(count - mean) < mean * 0.35, `PG count ${count} near ${mean}`);
});

test('the hash is a pure function of the object id', () => {
  assert.equal(objectHash(42, 7), objectHash(42, 7));
  assert.notEqual(objectHash(42, 7), objectHash(42, 8));
  assert.notEqual(objectHash(2 ** 33 + 1, 0), objectHash(1, 0));
});
