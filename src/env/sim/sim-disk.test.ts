import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SimDisk } from './sim-disk.ts';
import { SimRandom } from './sim-random.ts';
import { SimClock } from './sim-clock.ts';

test('SimRandom is deterministic per seed and spreads values', () => {
  const a = new SimRandom(42);
  const b = new SimRandom(42);
  const c = new SimRandom(43);
  const fromA = Array.from({ length: 8 }, () => a.uint32());
  assert.deepEqual(fromA, Array.from({ length: 8 }, () => b.uint32()));
  assert.notDeepEqual(fromA, Array.from({ length: 8 }, () => c.uint32()));
  const buckets = new Array(10).fill(0);
  for (let i = 0; i < 10_000; i++) buckets[a.below(10)]++;
  for (const count of buckets) assert.ok(count > 800 && count < 1200, `bucket count ${count}`);
  assert.match(a.uuid(), /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
});

test('SimClock runs timers in time order only when advanced', () => {
  const clock = new SimClock();
  const fired: string[] = [];
  clock.after(20, () => fired.push('b'));
  clock.after(10, () => fired.push('a'));
  const cancelled = clock.after(15, () => fired.push('x'));
  cancelled.cancel();
  const every = clock.every(7, () => fired.push('e'));
  clock.advance(5);
  assert.deepEqual(fired, []);
  clock.advance(16);
  assert.deepEqual(fired, ['e', 'a', 'e', 'b', 'e']);
  every.cancel();
  assert.equal(clock.nowMs(), 21);
});

test('unsynced writes are lost or kept by a crash; synced writes always survive', async () => {
  let lost = 0;
  let kept = 0;
  for (let seed = 1; seed <= 40; seed++) {
    const disk = new SimDisk({ seed, tearProbability: 0 });
    const file = await disk.open('/d', { create: true, sizeBytes: 8192 });
    await file.writev([Buffer.alloc(4096, 1)], 0);
    await file.sync();
    await file.writev([Buffer.alloc(4096, 2)], 4096);
    const check = Buffer.alloc(4096);
    await file.read(check, 4096);
    assert.equal(check[0], 2, 'reads see unsynced writes');
    disk.crash();
    const after = disk.fileBytes('/d');
    assert.equal(after[0], 1, `seed ${seed}: synced write lost`);
    if (after[4096] === 2) kept++;
    else {
      assert.equal(after[4096], 0);
      lost++;
    }
    await assert.rejects(file.read(check, 0), /simulated crash/, 'old handles are dead');
  }
  assert.ok(lost > 0 && kept > 0, `expected both outcomes, lost ${lost} kept ${kept}`);
});

test('a crash can tear a write at sector granularity', async () => {
  let torn = 0;
  for (let seed = 1; seed <= 30; seed++) {
    const disk = new SimDisk({ seed, survivalProbability: 1, tearProbability: 1 });
    const file = await disk.open('/d', { create: true, sizeBytes: 4096 });
    await file.writev([Buffer.alloc(4096, 7)], 0);
    disk.crash();
    const bytes = disk.fileBytes('/d');
    for (let sector = 0; sector < 8; sector++) {
      const slice = bytes.subarray(sector * 512, (sector + 1) * 512);
      assert.ok(slice.every((b) => b === 7) || slice.every((b) => b === 0), 'a sector is whole or absent');
    }
    const landed = bytes.filter((b) => b === 7).length;
    if (landed > 0 && landed < 4096) torn++;
  }
  assert.ok(torn > 0);
});

test('sync covers only completed writes; corrupt flips one bit durably', async () => {
  const disk = new SimDisk({ seed: 5, completionTurnsMax: 0 });
  const file = await disk.open('/d', { create: true, sizeBytes: 4096 });
  await file.writev([Buffer.alloc(4096, 3)], 0);
  assert.equal(disk.unsyncedWrites('/d'), 1);
  await file.sync();
  assert.equal(disk.unsyncedWrites('/d'), 0);
  disk.corrupt('/d', 100, 0);
  disk.crash();
  const bytes = disk.fileBytes('/d');
  assert.equal(bytes[100], 3 ^ 1);
  assert.equal(bytes[101], 3);
  await assert.rejects(disk.open('/missing'), (error: { code?: string }) => error.code === 'NOT_FOUND');
});

test('files are sparse: a 64 GiB disk costs only what is written; reads and writes are counted', async () => {
  const disk = new SimDisk({ seed: 6, completionTurnsMax: 0 });
  const file = await disk.open('/big', { create: true, sizeBytes: 64 * 1024 ** 3 });
  assert.equal(file.sizeBytes, 64 * 1024 ** 3);
  const data = Buffer.alloc(10_000, 7);
  await file.writev([data.subarray(0, 6000), data.subarray(6000)], 40 * 1024 **3 - 3000);
  assert.deepEqual(disk.stats.writtenBytes, 10_000);
  const back = Buffer.alloc(12_000, 1);
  assert.equal(await file.read(back, 40 * 1024 ** 3 - 4000), 12_000);
  assert.ok(back.subarray(0, 1000).every((b) => b === 0), 'never written reads as zeros');
  assert.ok(back.subarray(1000, 11_000).every((b) => b === 7));
  assert.ok(back.subarray(11_000).every((b) => b === 0));
  assert.deepEqual([disk.stats.reads, disk.stats.readBytes], [1, 12_000]);
  // Unsynced and lost in a crash: zeros again; the pages written stay few.
  disk.crash();
  const again = await disk.open('/big');
  const after = Buffer.alloc(100, 1);
  await again.read(after, 40 * 1024 ** 3 - 3000 + 5 * 512 + 10); // inside one 512-byte sector of the write
  assert.ok(after.every((b) => b === 0) || after.every((b) => b === 7), 'a sector is lost or kept whole');
});

test('punchHoles zeros its ranges when it completes; a crash before a sync may undo a hole, whole, and never after', async () => {
  let undone = 0;
  let kept = 0;
  for (let seed = 1; seed <= 40; seed++) {
    const disk = new SimDisk({ seed });
    const file = await disk.open('/d', { create: true, sizeBytes: 64 * 1024 });
    const data = Buffer.alloc(64 * 1024, 0x5a);
    await file.writev([data], 0);
    await file.sync();
    const punching = file.punchHoles!([{ offsetBytes: 4096, lengthBytes: 8192 + 100 }]);
    assert.ok(disk.fileBytes('/d').equals(data), 'nothing changes before the call completes');
    await punching;
    const now = disk.fileBytes('/d');
    assert.ok(now.subarray(4096, 4096 + 8192 + 100).every((byte) => byte === 0), 'the range reads as zeros');
    assert.ok(now.subarray(0, 4096).equals(data.subarray(0, 4096)) && now.subarray(4096 + 8192 + 100).equals(data.subarray(4096 + 8192 + 100)), 'the rest is untouched');
    assert.equal(disk.stats.holesPunched, 1);
    if (seed % 2 === 0) await file.sync();
    disk.crash();
    const after = disk.fileBytes('/d');
    const hole = after.subarray(4096, 4096 + 8192 + 100);
    if (seed % 2 === 0 || hole.every((byte) => byte === 0)) {
      assert.ok(hole.every((byte) => byte === 0), `seed ${seed}: a synced hole survives the crash`);
      kept++;
    } else {
      assert.ok(hole.equals(data.subarray(4096, 4096 + 8192 + 100)), `seed ${seed}: an undone hole is undone whole`);
      undone++;
    }
  }
  assert.ok(undone > 0 && kept > 20, `undone ${undone}, kept ${kept}`);
});
