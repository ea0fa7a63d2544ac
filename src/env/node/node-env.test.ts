import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, lstatSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { codeOf } from '../../lib/errors.ts';
import { nodeEnv, SyncIoPolicy, threadDeviceReadBytes, threadRunQueueWaitMs } from './node-env.ts';

test('listening on an address another server holds is IN_USE, naming the address; the holder is unharmed', async (t) => {
  const holder = await nodeEnv.net.listen('127.0.0.1:0', (connection) => connection.end());
  t.after(() => holder.close());
  await assert.rejects(nodeEnv.net.listen(holder.address, () => {}), (error: unknown) =>
    codeOf(error) === 'IN_USE' && (error as Error).message === `cannot listen on ${holder.address}: the address is already in use`);
  await assert.rejects(nodeEnv.net.serveHttp(holder.address, () => {}), (error: unknown) => codeOf(error) === 'IN_USE');
  const connection = await nodeEnv.net.connect(holder.address);
  await new Promise<void>((resolve) => connection.onClose(() => resolve()));
});

test('a unix socket path: a live server there is IN_USE, a stale socket is replaced, a file there is refused and kept', { timeout: 20_000 }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'shale-unix-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 's.sock');
  const holder = await nodeEnv.net.listen(`unix:${path}`, (connection) => connection.end());
  await assert.rejects(nodeEnv.net.listen(`unix:${path}`, () => {}), (error: unknown) =>
    codeOf(error) === 'IN_USE' && (error as Error).message === `cannot listen on unix:${path}: the address is already in use`);
  // The holder still has its path and serves.
  const connection = await nodeEnv.net.connect(`unix:${path}`);
  await new Promise<void>((resolve) => connection.onClose(() => resolve()));
  await holder.close();

  // A socket left by a process killed with -9: nothing answers on it, so it is taken over.
  const killed = spawnSync(process.execPath, ['-e', `require('node:net').createServer().listen(${JSON.stringify(path)}, () => process.kill(process.pid, 'SIGKILL'))`]);
  assert.equal(killed.signal, 'SIGKILL');
  assert.ok(lstatSync(path).isSocket(), 'the killed server left its socket');
  const successor = await nodeEnv.net.listen(`unix:${path}`, (accepted) => accepted.end());
  t.after(() => successor.close());
  const again = await nodeEnv.net.connect(`unix:${path}`);
  await new Promise<void>((resolve) => again.onClose(() => resolve()));

  const file = join(dir, 'not-a-socket');
  writeFileSync(file, 'keep me');
  await assert.rejects(nodeEnv.net.listen(`unix:${file}`, () => {}), (error: unknown) =>
    codeOf(error) === 'INVALID_ARGUMENT' && (error as Error).message === `cannot listen on unix:${file}: ${file} exists and is not a socket`);
  assert.equal(readFileSync(file, 'utf8'), 'keep me');
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

test('an accepted connection reads into the buffers it is given, in order, paused and resumed, with onData silent', async (t) => {
  const sent = Buffer.alloc(3 * 1024 * 1024);
  for (let i = 0; i < sent.length; i += 4) sent.writeUInt32LE(i, i);
  const received = Buffer.alloc(sent.length);
  let filled = 0;
  let reads = 0;
  let dataEvents = 0;
  let taken: boolean | undefined;
  const done = Promise.withResolvers<void>();
  const server = await nodeEnv.net.listen('127.0.0.1:0', (connection) => {
    connection.onData(() => dataEvents++);
    // Targets of changing sizes, some straight into the result, some into a reused buffer copied out.
    const scratch = Buffer.alloc(1000);
    let intoResult = false;
    taken = connection.readInto?.(() => {
      intoResult = !intoResult;
      return intoResult ? received.subarray(filled, Math.min(sent.length, filled + 70_000)) : scratch;
    }, (bytes) => {
      reads++;
      if (!intoResult) scratch.copy(received, filled, 0, bytes);
      filled += bytes;
      if (reads % 50 === 0) {
        connection.pause();
        setTimeout(() => connection.resume(), 2);
      }
      if (filled === sent.length) done.resolve();
    });
  });
  t.after(() => server.close());
  const client = await nodeEnv.net.connect(server.address);
  client.write(sent);
  await done.promise;
  client.destroy();
  assert.equal(taken, true, 'this Node.js lets an accepted socket read into given buffers');
  assert.ok(received.equals(sent), 'every byte arrived, in order');
  assert.ok(reads > 50, `the reads were paused and resumed (${reads} reads)`);
  assert.equal(dataEvents, 0, 'onData got nothing once reads went into given buffers');
});

test('reads stay synchronous while the page cache serves them, and back off, longer each time, while they miss', () => {
  let now = 1000;
  const policy = new SyncIoPolicy(() => now, () => undefined);
  const fast = 0.01;
  const miss = 0.9;
  const read = (elapsedMs: number): void => {
    assert.ok(policy.useSync());
    policy.record(elapsedMs);
  };
  const misses = (count: number, elapsedMs = miss): void => {
    for (let i = 0; i < count; i++) read(elapsedMs);
  };
  for (let i = 0; i < 256; i++) read(fast);
  misses(2);
  assert.ok(policy.useSync(), 'two 0.9 ms misses in 256 reads cost less than the thread pool would');
  for (let i = 0; i < 40; i++) read(fast);
  read(miss);
  assert.ok(!policy.useSync(), 'a third in the window: over the budget, the thread pool');
  now += 249;
  assert.ok(!policy.useSync());
  now += 2;
  misses(3);
  now += 499;
  assert.ok(!policy.useSync(), 'misses again on the retry: the back-off doubled');
  now += 2;
  for (let i = 0; i < 256; i++) read(fast);
  misses(3);
  now += 251;
  assert.ok(policy.useSync(), 'after a window within its budget the back-off starts over at 250 ms');
  for (let round = 0; round < 10; round++) {
    misses(3);
    now += 8001;
  }
  misses(3);
  now += 7999;
  assert.ok(!policy.useSync(), 'backing off 8 s at most');
  now += 2;

  // Short misses: the budget is time, so they may be more frequent.
  for (let i = 0; i < 256; i++) read(fast);
  misses(25, 0.1);
  assert.ok(policy.useSync(), '25 misses of 0.1 ms in a window: still synchronous');
  read(0.1);
  assert.ok(!policy.useSync(), 'the 26th is over the budget');
  now += 300;
  for (let i = 0; i < 1000; i++) read(0.05);
  assert.ok(policy.useSync(), 'reads of 50 µs are not misses');
});

test('the time a slow read spent waiting for a CPU is not a miss; the time left over is', () => {
  let waitedMs = 0;
  const policy = new SyncIoPolicy(() => 1000, () => waitedMs);
  /** One read as NodeDiskFile does it: ask, read (the thread waits `preemptedMs` for a CPU), tell. */
  const read = (elapsedMs: number, preemptedMs = 0): void => {
    assert.ok(policy.useSync());
    waitedMs += preemptedMs;
    policy.record(elapsedMs);
  };
  for (let i = 0; i < 10; i++) read(0.01);
  for (let i = 0; i < 100; i++) read(4, 3.96);
  read(0.9);
  read(0.9);
  assert.ok(policy.useSync(), 'reads slowed by preemption are not misses; two 0.9 ms misses are within the budget');
  waitedMs += 0.9; // preempted between reads: excuses the next slow read, once
  read(0.9);
  assert.ok(policy.useSync());
  read(1.2, 0.3); // 0.9 ms of it was the disk's: 2.7 ms of misses in all
  assert.ok(!policy.useSync(), 'over the budget: the thread pool');

  // Where the kernel does not say, slow reads count whole.
  const blind = new SyncIoPolicy(() => 1000, () => undefined);
  for (const elapsed of [0.9, 0.9, 0.9]) {
    assert.ok(blind.useSync());
    blind.record(elapsed);
  }
  assert.ok(!blind.useSync());
});

test('a slow read for which no device read anything is not a miss; one with device reads counts whole', () => {
  let deviceBytes = 0;
  const policy = new SyncIoPolicy(() => 1000, () => 0, () => deviceBytes);
  /** One read as NodeDiskFile does it; the device reads `fromDevice` bytes for it (a miss, with read-ahead). */
  const read = (elapsedMs: number, fromDevice = 0): void => {
    assert.ok(policy.useSync());
    deviceBytes += fromDevice;
    policy.record(elapsedMs);
  };
  for (let i = 0; i < 10; i++) read(0.01);
  for (let i = 0; i < 20; i++) read(8);
  assert.ok(policy.useSync(), '20 reads of 8 ms from the page cache (the host held the vCPU back): not misses');
  read(1.5, 128 * 1024);
  assert.ok(policy.useSync(), 'one 1.5 ms read from the device: a miss, within the budget');
  read(1.2, 4096);
  assert.ok(!policy.useSync(), 'a second one: over the budget, the thread pool');

  // Where the kernel does not say, slow reads count whole.
  const blind = new SyncIoPolicy(() => 1000, () => 0, () => undefined);
  for (const elapsed of [1.5, 1.5]) {
    assert.ok(blind.useSync());
    blind.record(elapsed);
  }
  assert.ok(!blind.useSync());
});

test('the bytes devices read for this thread are read from the kernel and never go back', () => {
  const first = threadDeviceReadBytes();
  assert.equal(typeof first, 'number', 'Linux has /proc/thread-self/io');
  const buffer = Buffer.alloc(4096);
  const fd = openSync(process.execPath, 'r');
  try {
    readSync(fd, buffer, 0, buffer.length, 0);
  } finally {
    closeSync(fd);
  }
  const second = threadDeviceReadBytes();
  assert.ok(second !== undefined && second >= first!);
});

test('the run-queue wait of this thread is read from the kernel and never goes back', () => {
  const first = threadRunQueueWaitMs();
  assert.equal(typeof first, 'number', 'Linux keeps /proc/thread-self/schedstat');
  assert.ok(first! >= 0 && Number.isFinite(first));
  let spin = 0;
  for (let i = 0; i < 1e6; i++) spin += i;
  assert.ok(spin > 0);
  assert.ok(threadRunQueueWaitMs()! >= first!);
});

test('writevNow writes small batches synchronously and declines large ones, writing nothing', async (t) => {
  const directory = mkdtempSync(join(tmpdir(), 'shale-writev-now-'));
  t.after(() => rmSync(directory, { recursive: true, force: true }));
  const file = await nodeEnv.disk.open(join(directory, 'disk.img'), { create: true, sizeBytes: 4 * 1024 * 1024 });
  t.after(() => file.close());
  const a = Buffer.alloc(4096, 0xa1);
  const b = Buffer.alloc(8192, 0xb2);
  assert.equal(file.writevNow!([a, b], 4096), true);
  const back = Buffer.alloc(3 * 4096);
  assert.equal(await file.read(back, 4096), back.length);
  assert.ok(back.equals(Buffer.concat([a, b])), 'the bytes are in the file when writevNow returns');
  const large = Buffer.alloc(300 * 1024, 0xcc);
  assert.equal(file.writevNow!([large], 1024 * 1024), false, 'over 256 KiB: the caller uses writev');
  const untouched = Buffer.alloc(large.length);
  await file.read(untouched, 1024 * 1024);
  assert.ok(untouched.every((byte) => byte === 0), 'a declined write writes nothing');
});

test('punchHoles zeros each range and gives its blocks back, keeping the size and the bytes around it', async (t) => {
  const directory = mkdtempSync(join(tmpdir(), 'shale-punch-'));
  t.after(() => rmSync(directory, { recursive: true, force: true }));
  const path = join(directory, 'disk.img');
  const file = await nodeEnv.disk.open(path, { create: true, sizeBytes: 4 * 1024 * 1024 });
  t.after(() => file.close());
  const data = Buffer.alloc(4 * 1024 * 1024);
  for (let i = 0; i < data.length; i += 4096) data.fill(1 + ((i / 4096) % 250), i, i + 4096);
  await file.writev([data], 0);
  await file.sync();
  const before = statSync(path).blocks * 512;
  await file.punchHoles!([{ offsetBytes: 64 * 1024, lengthBytes: 1024 * 1024 }, { offsetBytes: 2 * 1024 * 1024, lengthBytes: 512 * 1024 }]);
  const after = statSync(path);
  assert.equal(after.size, 4 * 1024 * 1024, 'the file keeps its size');
  assert.ok(after.blocks * 512 <= before - 1536 * 1024, `allocated ${before} → ${after.blocks * 512} bytes`);
  const back = Buffer.alloc(data.length);
  await file.read(back, 0);
  const holes = [[64 * 1024, 64 * 1024 + 1024 * 1024], [2 * 1024 * 1024, 2 * 1024 * 1024 + 512 * 1024]];
  for (let i = 0; i < back.length; i += 4096) {
    const inHole = holes.some(([start, end]) => i >= start! && i < end!);
    assert.ok(back.subarray(i, i + 4096).equals(inHole ? Buffer.alloc(4096) : data.subarray(i, i + 4096)), `block at ${i}`);
  }
  // Not a regular file: NOT_SUPPORTED, and nothing run.
  const device = await nodeEnv.disk.open('/dev/zero', { readOnly: true });
  t.after(() => device.close());
  await assert.rejects(device.punchHoles!([{ offsetBytes: 0, lengthBytes: 4096 }]), (error: unknown) => codeOf(error) === 'NOT_SUPPORTED');
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
