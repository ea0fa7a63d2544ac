/**
 * Where an object lives: its placement group is stable_mod(hash(objectId), pgCount) (DESIGN §2).
 * stable_mod is Ceph's: when pgCount grows from P to 2P, an object either stays in its PG or moves
 * to exactly one new PG, so PGs can later split without moving everything.
 * Pure functions; the client, the stores and the conductor must agree on them bit for bit.
 */
import { assert } from './assert.ts';

/** A 32-bit mix of a 64-bit volume id and a 32-bit chunk index (murmur3's finaliser over both halves). */
export function objectHash(volumeId: number, chunkIndex: number): number {
  assert(Number.isSafeInteger(volumeId) && volumeId >= 0, 'volumeId is a non-negative safe integer');
  let h = Math.imul(volumeId >>> 0, 0xcc9e2d51) ^ Math.imul(Math.floor(volumeId / 2 ** 32) >>> 0, 0x1b873593);
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h ^= Math.imul(chunkIndex >>> 0, 0xe6546b64);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** Ceph's stable_mod: x mod b, stable as b grows; `mask` is the next power of two ≥ b, minus 1. */
export function stableMod(x: number, b: number): number {
  assert(Number.isInteger(b) && b > 0, 'pgCount is a positive integer');
  let mask = 1;
  while (mask < b) mask <<= 1;
  mask -= 1;
  return (x & mask) < b ? x & mask : x & (mask >>> 1);
}

export function placementGroupOf(volumeId: number, chunkIndex: number, pgCount: number): number {
  return stableMod(objectHash(volumeId, chunkIndex), pgCount);
}
