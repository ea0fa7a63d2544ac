import assert from 'node:assert/strict';
import { test } from 'node:test';
import { RangeLock } from './range-lock.ts';

const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

test('acquire waits for every earlier overlapping holder, in any release order; others go at once', async () => {
  const lock = new RangeLock();
  const first = await lock.acquire(0, 10);
  const second = await lock.acquire(20, 30);
  const order: string[] = [];
  const waiting = lock.acquire(5, 25).then((release) => {
    order.push('both released');
    return release;
  });
  const apart = await lock.acquire(40, 50);
  order.push('apart');
  second();
  await turn();
  assert.deepEqual(order, ['apart'], 'still waits for the first holder');
  first();
  const third = await waiting;
  assert.deepEqual(order, ['apart', 'both released']);
  assert.equal(lock.size, 2);
  third();
  apart();
  apart();
  assert.equal(lock.size, 0, 'a second release changes nothing');
});

test('tryHold holds at once or declines without holding anything', async () => {
  const lock = new RangeLock();
  const held = lock.tryHold(8, 16);
  assert.ok(held);
  assert.equal(lock.tryHold(15, 20), undefined);
  assert.equal(lock.tryHold(0, 9), undefined);
  assert.equal(lock.size, 1, 'a declined try holds nothing');
  const beside = lock.tryHold(16, 24);
  assert.ok(beside, 'adjacent ranges do not overlap');
  // A waiter blocks later tries too, and wakes when the holder goes.
  let woke = false;
  const waiting = lock.acquire(0, 10).then((release) => {
    woke = true;
    return release;
  });
  lock.release(held!);
  assert.equal(lock.tryHold(0, 4), undefined, 'the waiter holds its range while it waits');
  const release = await waiting;
  assert.ok(woke);
  release();
  lock.release(beside!);
  assert.equal(lock.size, 0);
  lock.release(beside!);
  assert.equal(lock.size, 0, 'a second release changes nothing');
  assert.ok(lock.tryHold(0, 24), 'released ranges can be held again');
});
