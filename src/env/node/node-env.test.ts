import assert from 'node:assert/strict';
import { test } from 'node:test';
import { codeOf } from '../../lib/errors.ts';
import { nodeEnv, SyncReadPolicy } from './node-env.ts';

test('listening on an address another server holds is IN_USE, naming the address; the holder is unharmed', async (t) => {
  const holder = await nodeEnv.net.listen('127.0.0.1:0', (connection) => connection.end());
  t.after(() => holder.close());
  await assert.rejects(nodeEnv.net.listen(holder.address, () => {}), (error: unknown) =>
    codeOf(error) === 'IN_USE' && (error as Error).message === `cannot listen on ${holder.address}: the address is already in use`);
  await assert.rejects(nodeEnv.net.serveHttp(holder.address, () => {}), (error: unknown) => codeOf(error) === 'IN_USE');
  const connection = await nodeEnv.net.connect(holder.address);
  await new Promise<void>((resolve) => connection.onClose(() => resolve()));
});

test('write calls onWritten once the buffers are written, and at once on a closed connection', async (t) => {
  const received: Buffer[] = [];
  const server = await nodeEnv.net.listen('127.0.0.1:0', (connection) => connection.onData((chunk) => received.push(chunk)));
  t.after(() => server.close());
  const connection = await nodeEnv.net.connect(server.address);
  const written = await new Promise<boolean>((resolve) => {
    connection.write([Buffer.from('ab'), Buffer.from('cd'), Buffer.from('ef')], () => resolve(true));
  });
  assert.equal(written, true);
  connection.destroy();
  await new Promise<void>((resolve) => connection.onClose(() => resolve()));
  let called = false;
  assert.equal(connection.write(Buffer.from('late'), () => (called = true)), false);
  assert.equal(called, true, 'nothing holds the buffer of a write to a closed connection');
  while (Buffer.concat(received).length < 6) await new Promise((resolve) => setTimeout(resolve, 5));
  assert.equal(Buffer.concat(received).toString(), 'abcdef');
});

test('reads stay synchronous while the page cache serves them, and back off, longer each time, while they miss', () => {
  let now = 1000;
  const policy = new SyncReadPolicy(() => now);
  const fast = 0.01;
  const slow = 1;
  for (let i = 0; i < 31; i++) policy.record(fast);
  policy.record(slow);
  assert.ok(policy.useSync(), 'one slow read in a window is a stray, not misses');
  for (let i = 0; i < 40; i++) policy.record(fast);
  policy.record(slow);
  policy.record(slow);
  assert.ok(!policy.useSync(), 'two slow reads in a window: the thread pool');
  now += 249;
  assert.ok(!policy.useSync());
  now += 2;
  assert.ok(policy.useSync(), 'tried again after 250 ms');
  policy.record(slow);
  policy.record(slow);
  now += 499;
  assert.ok(!policy.useSync(), 'misses again: the back-off doubled');
  now += 2;
  assert.ok(policy.useSync());
  for (let i = 0; i < 32; i++) policy.record(fast);
  policy.record(slow);
  policy.record(slow);
  now += 251;
  assert.ok(policy.useSync(), 'after a fast window the back-off starts over at 250 ms');
  for (let round = 0; round < 10; round++) {
    policy.record(slow);
    policy.record(slow);
    now += 8001;
  }
  policy.record(slow);
  policy.record(slow);
  now += 7999;
  assert.ok(!policy.useSync(), 'backing off 8 s at most');
  now += 2;
  assert.ok(policy.useSync());
});

test('pollFor keeps the event loop polling without sleeping until its deadline, then lets it sleep', async () => {
  const utilization = async (ms: number): Promise<number> => {
    const start = performance.eventLoopUtilization();
    await new Promise((resolve) => setTimeout(resolve, ms));
    return performance.eventLoopUtilization(start).utilization;
  };
  // Idle: the loop sleeps in epoll_wait nearly the whole time.
  assert.ok(await utilization(150) < 0.5, 'an idle loop sleeps');
  // Polling: every turn polls with a zero timeout, so the loop never counts as idle.
  nodeEnv.clock.pollFor(100);
  nodeEnv.clock.pollFor(20); // an earlier deadline does not shorten the later one
  assert.ok(await utilization(80) > 0.8, 'a polling loop does not sleep');
  assert.ok(process.getActiveResourcesInfo().includes('Immediate'), 'still polling before the deadline');
  await new Promise((resolve) => setTimeout(resolve, 150));
  assert.ok(!process.getActiveResourcesInfo().includes('Immediate'), 'polling ends at the deadline');
  assert.ok(await utilization(150) < 0.5, 'the loop sleeps again');
  nodeEnv.clock.pollFor(0);
  assert.ok(!process.getActiveResourcesInfo().includes('Immediate'), 'pollFor(0) polls not at all');
});
