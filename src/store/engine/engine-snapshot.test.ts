/**
 * Versions for snapshots: every version is stamped with the snap sequence its write carried;
 * snapshot s reads, per block, the newest version stamped below s; an older version is kept only
 * while a snapshot that may be live needs it; deleting a snapshot trims what only it needed;
 * compaction, checkpoints and replay keep what is kept; tombstones are dropped only when nothing
 * older survives and no snapshot reads them.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ShaleError } from '../../lib/errors.ts';
import { BLOCK_SIZE_BYTES, KiB } from '../../lib/units.ts';
import { StoreEngine } from './engine.ts';
import { METADATA_AREA_BYTES } from './format.ts';
import { readStamp, simEnv, stampedWrite } from './test-support.ts';
import type { SimEnv } from './test-support.ts';

const PATH = '/disks/snap';

function hasCode(code: string) {
  return (error: unknown) => error instanceof ShaleError && error.code === code;
}

async function fresh(seed: number, segments = 16): Promise<{ env: SimEnv; engine: StoreEngine }> {
  const env = simEnv(seed);
  await StoreEngine.format(env, PATH, { sizeBytes: METADATA_AREA_BYTES + segments * 64 * KiB, clusterId: 'c', segmentSizeBytes: 64 * KiB });
  return { env, engine: await StoreEngine.open(env, PATH, { backgroundCompaction: false }) };
}

/** The seq stamped in each block's content as snapshot `snapshotId` (or the head) sees it; 0 for zeros. */
async function seqs(engine: StoreEngine, volumeId: number, countBlocks: number, snapshotId?: number): Promise<number[]> {
  const read = await engine.read(volumeId, 0, 0, countBlocks, snapshotId === undefined ? {} : { snapshotId });
  const out: number[] = [];
  for (let b = 0; b < countBlocks; b++) {
    const stamp = readStamp(read.data.subarray(b * BLOCK_SIZE_BYTES, (b + 1) * BLOCK_SIZE_BYTES));
    if (read.states[b] === 1) assert.equal(stamp?.seq, read.versions.seqs[b], `block ${b}: content and version agree`);
    else assert.equal(stamp, undefined, `block ${b}: zeros`);
    out.push(stamp?.seq ?? 0);
  }
  return out;
}

test('a snapshot reads the newest version stamped below it; the head reads the newest; deleting it trims', async () => {
  const { env, engine } = await fresh(1);
  await engine.write(stampedWrite(1, 0, 0, 4, 1, 1, 0));
  await engine.setSnapshots(1, [1], { snapSeq: 1 }); // snapshot 1 taken
  await engine.write(stampedWrite(1, 0, 0, 2, 1, 2, 1)); // stamped 1: not seen by snapshot 1
  await engine.setSnapshots(1, [1, 2], { snapSeq: 2 }); // snapshot 2 taken
  await engine.write(stampedWrite(1, 0, 1, 2, 1, 3, 2));
  await engine.writeZeroes({ volumeId: 1, chunkIndex: 0, offsetBlocks: 3, countBlocks: 1, version: { epoch: 1, seq: 4 }, snapSeq: 2 });
  const expect = async (e: StoreEngine) => {
    assert.deepEqual(await seqs(e, 1, 4), [2, 3, 3, 0]);
    assert.deepEqual(await seqs(e, 1, 4, 1), [1, 1, 1, 1]);
    assert.deepEqual(await seqs(e, 1, 4, 2), [2, 2, 1, 1]);
    assert.deepEqual([...(await e.read(1, 0, 0, 4, { snapshotId: 2 })).states], [1, 1, 1, 1]);
    assert.deepEqual([...(await e.read(1, 0, 0, 4)).states], [1, 1, 1, 2]);
  };
  await expect(engine);
  assert.equal(engine.stats().snapshotVersions, 5);
  assert.equal(engine.stats().liveBytes, 8 * BLOCK_SIZE_BYTES);
  // Survives a crash (replay), a clean close (checkpoint) and compaction of everything.
  await engine.flush();
  env.disk.crash();
  const replayed = await StoreEngine.open(env, PATH, { backgroundCompaction: false });
  await expect(replayed);
  for (let i = 0; i < 30 && (await replayed.compact()); i++);
  assert.ok(replayed.stats().compactedSegments > 0);
  await expect(replayed);
  await replayed.close();
  const checkpointed = await StoreEngine.open(env, PATH, { backgroundCompaction: false });
  await expect(checkpointed);
  // Deleting snapshot 1 trims what only it needed; snapshot 2 and the head are unchanged.
  await checkpointed.setSnapshots(1, [2], { snapSeq: 2 });
  await assert.rejects(checkpointed.read(1, 0, 0, 4, { snapshotId: 1 }), hasCode('NOT_FOUND'));
  assert.deepEqual(await seqs(checkpointed, 1, 4, 2), [2, 2, 1, 1]);
  assert.deepEqual(await seqs(checkpointed, 1, 4), [2, 3, 3, 0]);
  assert.equal(checkpointed.stats().snapshotVersions, 3, 'blocks 1, 2 and 3 keep what snapshot 2 reads');
  assert.equal(checkpointed.stats().liveBytes, 6 * BLOCK_SIZE_BYTES);
  await checkpointed.setSnapshots(1, [], { snapSeq: 2 });
  assert.equal(checkpointed.stats().snapshotVersions, 0);
  assert.equal(checkpointed.stats().liveBytes, 3 * BLOCK_SIZE_BYTES);
  env.disk.crash();
  const last = await StoreEngine.open(env, PATH, { backgroundCompaction: false });
  assert.equal(last.stats().snapshotVersions, 0);
  assert.deepEqual(last.snapshots(1), { ids: [], snapSeq: 2, keepTombstones: false });
  await last.close();
});

test('a write stamped above what the engine was told keeps the version it replaces, until told', async () => {
  const { engine } = await fresh(2);
  await engine.write(stampedWrite(1, 0, 0, 2, 1, 1, 0));
  // Snapshot 3 was taken somewhere; this store has not heard of it yet, but a write carries it.
  await engine.write(stampedWrite(1, 0, 0, 1, 1, 2, 3));
  assert.deepEqual(await seqs(engine, 1, 2, 3), [1, 1], 'snapshot 3 sees the old version');
  assert.equal(engine.stats().snapshotVersions, 1);
  // Now it hears: snapshot 3 was deleted again (nothing live up to 3).
  await engine.setSnapshots(1, [], { snapSeq: 3 });
  assert.equal(engine.stats().snapshotVersions, 0);
  await assert.rejects(engine.read(1, 0, 0, 1, { snapshotId: 3 }), hasCode('NOT_FOUND'));
  // Writes stamped at or below the known sequence keep nothing.
  await engine.write(stampedWrite(1, 0, 1, 1, 1, 3, 3));
  assert.equal(engine.stats().snapshotVersions, 0);
  await engine.close();
});

test('a late older write is kept for the snapshot that needs it (versions ordered by write version, not arrival)', async () => {
  const { engine } = await fresh(3);
  await engine.setSnapshots(1, [5], { snapSeq: 5 });
  // Version 10 (stamped 5, after the snapshot) arrives first; version 8 (stamped 4, before it) late.
  await engine.write(stampedWrite(1, 0, 0, 1, 1, 10, 5));
  assert.deepEqual(await engine.write(stampedWrite(1, 0, 0, 1, 1, 8, 4)), { appliedBlocks: 0, skippedBlocks: 1 });
  assert.deepEqual(await seqs(engine, 1, 1), [10]);
  assert.deepEqual(await seqs(engine, 1, 1, 5), [8]);
  // An even older one is not needed by anyone: snapshot 5 sees 8.
  await engine.write(stampedWrite(1, 0, 0, 1, 1, 7, 4));
  assert.equal(engine.stats().snapshotVersions, 1);
  await engine.close();
});

test('tombstones are dropped by compaction only when nothing older survives, no snapshot reads them, and the volume is no clone', async () => {
  const { engine } = await fresh(4, 24);
  // Volume 1: plain; volume 2: a clone (keepTombstones); volume 3: a live snapshot reads the tombstone.
  await engine.setSnapshots(2, [], { keepTombstones: true });
  await engine.setSnapshots(3, [1], { snapSeq: 1 });
  let seq = 0;
  for (const volumeId of [1, 2, 3]) {
    await engine.write(stampedWrite(volumeId, 0, 0, 4, 1, ++seq, 0));
    await engine.writeZeroes({ volumeId, chunkIndex: 0, offsetBlocks: 0, countBlocks: 4, version: { epoch: 1, seq: ++seq }, snapSeq: 0 });
  }
  // Volume 3's tombstone is stamped 0 < 1: snapshot 1 reads it. Volume 1's data under it is dead.
  for (let i = 0; i < 12; i++) await engine.write(stampedWrite(9, 0, i * 4, 4, 1, i + 1)); // fill
  for (let i = 0; i < 30 && (await engine.compact()); i++);
  assert.deepEqual([...(await engine.read(1, 0, 0, 4)).states], [0, 0, 0, 0], 'plain volume: dropped');
  assert.deepEqual([...(await engine.read(2, 0, 0, 4)).states], [2, 2, 2, 2], 'clone: kept');
  assert.deepEqual([...(await engine.read(3, 0, 0, 4)).states], [2, 2, 2, 2], 'read by a live snapshot: kept');
  assert.deepEqual([...(await engine.read(3, 0, 0, 4, { snapshotId: 1 })).states], [2, 2, 2, 2]);
  assert.equal(engine.stats().droppedTombstoneBlocks, 4);
  // Once the snapshot is gone, compaction may drop volume 3's tombstone too (the filler is made
  // garbage so that its segment is worth compacting).
  await engine.setSnapshots(3, [], { snapSeq: 1 });
  await engine.purgeVolume(9);
  for (let i = 0; i < 30 && (await engine.compact()); i++);
  assert.deepEqual([...(await engine.read(3, 0, 0, 4)).states], [0, 0, 0, 0]);
  await engine.close();
});

test('purging a volume removes its snapshot versions and list', async () => {
  const { env, engine } = await fresh(5);
  await engine.write(stampedWrite(1, 0, 0, 4, 1, 1, 0));
  await engine.setSnapshots(1, [1], { snapSeq: 1 });
  await engine.write(stampedWrite(1, 0, 0, 4, 1, 2, 1));
  assert.equal(engine.stats().snapshotVersions, 4);
  await engine.purgeVolume(1);
  assert.equal(engine.stats().snapshotVersions, 0);
  assert.equal(engine.stats().liveBytes, 0);
  assert.equal(engine.snapshots(1), undefined);
  await assert.rejects(engine.setSnapshots(1, [1]), hasCode('NOT_FOUND'));
  env.disk.crash();
  const again = await StoreEngine.open(env, PATH, { backgroundCompaction: false });
  assert.equal(again.stats().snapshotVersions, 0);
  assert.deepEqual([...(await again.read(1, 0, 0, 4, { snapshotId: 1 })).states], [0, 0, 0, 0]);
  await again.close();
});

test('setSnapshots validates its input', async () => {
  const { engine } = await fresh(6);
  await assert.rejects(engine.setSnapshots(1, [-1]), hasCode('INVALID_ARGUMENT'));
  await assert.rejects(engine.setSnapshots(1, [5], { snapSeq: 4 }), hasCode('INVALID_ARGUMENT'));
  await assert.rejects(engine.setSnapshots(1, new Array(5000).fill(0).map((_, i) => i + 1)), hasCode('INVALID_ARGUMENT'));
  await engine.setSnapshots(1, [3, 1, 3]);
  assert.deepEqual(engine.snapshots(1), { ids: [1, 3], snapSeq: 3, keepTombstones: false });
  await engine.close();
});
