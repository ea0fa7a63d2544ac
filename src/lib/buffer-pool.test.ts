import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BufferPool } from './buffer-pool.ts';

test('a buffer given back is handed out again, of the right length, for any size of its class', () => {
  const pool = new BufferPool();
  const first = pool.take(64 * 1024);
  assert.equal(first.length, 64 * 1024);
  pool.give(first);
  const second = pool.take(40 * 1024 + 1);
  assert.equal(second.length, 40 * 1024 + 1);
  assert.equal(second.buffer, first.buffer, 'the same memory, reused');
  assert.deepEqual(pool.counters, { allocated: 1, reused: 1 });
});

test('a view of a pooled buffer gives the whole buffer back', () => {
  const pool = new BufferPool();
  const taken = pool.take(8192);
  pool.give(taken.subarray(100, 200));
  assert.equal(pool.take(8192).buffer, taken.buffer);
});

test('strangers and second gives are ignored: a buffer is never handed to two takers', () => {
  const pool = new BufferPool();
  pool.give(Buffer.allocUnsafe(8192));
  pool.give(Buffer.allocUnsafeSlow(8192));
  const taken = pool.take(8192);
  assert.equal(pool.counters.reused, 0, 'nothing foreign entered the pool');
  pool.give(taken);
  pool.give(taken);
  const a = pool.take(8192);
  const b = pool.take(8192);
  assert.notEqual(a.buffer, b.buffer);
});

test('sizes outside 4 KiB..4 MiB are plain buffers, and the free list of a class is bounded', () => {
  const pool = new BufferPool(64 * 1024);
  const small = pool.take(100);
  const large = pool.take(8 * 1024 * 1024);
  assert.equal(small.length, 100);
  assert.equal(large.length, 8 * 1024 * 1024);
  pool.give(small);
  pool.give(large);
  assert.equal(pool.counters.allocated, 0, 'neither came from the pool');
  const many = Array.from({ length: 20 }, () => pool.take(4096));
  for (const buffer of many) pool.give(buffer);
  const again = Array.from({ length: 20 }, () => pool.take(4096));
  assert.equal(pool.counters.reused, 16, '64 KiB of 4 KiB buffers were kept');
  assert.equal(new Set(again.map((buffer) => buffer.buffer)).size, 20);
});
