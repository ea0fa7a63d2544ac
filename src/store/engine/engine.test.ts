import { spawnSync } from 'node:child_process';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { blockChecksums, ZERO_BLOCK_CRC } from '../../lib/crc32c.ts';
import { ShaleError } from '../../lib/errors.ts';
import { BLOCK_SIZE_BYTES, KiB, MiB } from '../../lib/units.ts';
import { BlockState, StoreEngine } from './engine.ts';
import type { EngineOpenOptions, WriteRequest, WriteResult } from './engine.ts';
import {
  batchHeaderBlocks, decodeSuperblock, encodeSuperblock, METADATA_AREA_BYTES, RecordKind, scanSegment, sealBatchHeader,
  SEGMENT_HEADER_BLOCKS, SegmentKind, writeCrcEntry, writeRecordEntry,
} from './format.ts';
import { isAllZero, readStamp, simEnv, stampedWrite } from './test-support.ts';
import type { SimEnv } from './test-support.ts';

const PATH = '/disks/d0';
const CLUSTER = 'cluster-a';

function hasCode(code: string) {
  return (error: unknown) => error instanceof ShaleError && error.code === code;
}

async function fresh(seed: number, segments = 12, segmentSizeBytes = 256 * KiB, options: EngineOpenOptions = {}): Promise<{ env: SimEnv; engine: StoreEngine }> {
  const env = simEnv(seed);
  await StoreEngine.format(env, PATH, { sizeBytes: METADATA_AREA_BYTES + segments * segmentSizeBytes, clusterId: CLUSTER, segmentSizeBytes });
  const engine = await StoreEngine.open(env, PATH, { clusterId: CLUSTER, backgroundCompaction: false, ...options });
  return { env, engine };
}

async function reopen(env: SimEnv, engine: StoreEngine | undefined, options: EngineOpenOptions = {}): Promise<StoreEngine> {
  if (engine) await engine.close();
  return StoreEngine.open(env, PATH, { clusterId: CLUSTER, backgroundCompaction: false, ...options });
}

async function stampAt(engine: StoreEngine, volumeId: number, chunkIndex: number, block: number) {
  const result = await engine.read(volumeId, chunkIndex, block, 1);
  return { state: result.states[0], stamp: readStamp(result.data), epoch: result.versions.epochs[0], seq: result.versions.seqs[0] };
}

test('format then open: info, empty reads, close', async () => {
  const { engine } = await fresh(1);
  const info = engine.info;
  assert.equal(info.clusterId, CLUSTER);
  assert.equal(info.segmentCount, 12);
  assert.equal(info.segmentSizeBytes, 256 * KiB);
  assert.equal(info.formatVersion, 1);
  assert.match(info.diskUuid, /^[0-9a-f-]{36}$/);
  const read = await engine.read(7, 0, 0, 4);
  assert.ok(isAllZero(read.data));
  assert.deepEqual([...read.states], [0, 0, 0, 0]);
  assert.deepEqual([...read.checksums], [ZERO_BLOCK_CRC, ZERO_BLOCK_CRC, ZERO_BLOCK_CRC, ZERO_BLOCK_CRC]);
  const stats = engine.stats();
  assert.equal(stats.capacityBytes, 12 * 256 * KiB);
  assert.equal(stats.liveBytes, 0);
  assert.equal(stats.freeSegments, 12);
  await engine.close();
  await engine.close();
  await assert.rejects(engine.write(stampedWrite(1, 0, 0, 1, 1, 1)), hasCode('SHUTTING_DOWN'));
});

test('write then read returns the bytes, states, versions and checksums; survives reopen', async () => {
  const { env, engine } = await fresh(2);
  const request = stampedWrite(5, 3, 10, 4, 1, 100, 7);
  assert.deepEqual(await engine.write(request), { appliedBlocks: 4, skippedBlocks: 0 });
  const check = async (e: StoreEngine) => {
    const read = await e.read(5, 3, 9, 6);
    assert.deepEqual([...read.states], [0, 1, 1, 1, 1, 0]);
    assert.ok(read.data.subarray(BLOCK_SIZE_BYTES, 5 * BLOCK_SIZE_BYTES).equals(request.data));
    assert.ok(isAllZero(read.data.subarray(0, BLOCK_SIZE_BYTES)));
    assert.deepEqual([...read.checksums.subarray(1, 5)], [...request.checksums]);
    assert.deepEqual([...read.versions.epochs], [0, 1, 1, 1, 1, 0]);
    assert.deepEqual([...read.versions.seqs], [0, 100, 100, 100, 100, 0]);
  };
  await check(engine);
  assert.equal(engine.stats().liveBytes, 4 * BLOCK_SIZE_BYTES);
  const again = await reopen(env, engine);
  await check(again);
  assert.equal(again.stats().liveBytes, 4 * BLOCK_SIZE_BYTES);
  assert.equal(again.replayReport.batchesApplied, 0, 'a clean close checkpoints: nothing to replay');
  assert.ok(again.replayReport.checkpointSequence > 0);
  await again.close();
});

test('a write whose checksums do not match its data is refused with CHECKSUM and writes nothing', async () => {
  const { env, engine } = await fresh(3);
  const request = stampedWrite(1, 0, 0, 3, 1, 1);
  request.checksums[1] ^= 1;
  const writesBefore = env.disk.stats.writes;
  await assert.rejects(engine.write(request), (error: unknown) => hasCode('CHECKSUM')(error) && (error as ShaleError).details?.block === 1);
  assert.equal(env.disk.stats.writes, writesBefore);
  assert.deepEqual([...(await engine.read(1, 0, 0, 3)).states], [0, 0, 0]);
  await engine.close();
});

test('bad arguments are refused with INVALID_ARGUMENT or OUT_OF_RANGE', async () => {
  const { engine } = await fresh(4);
  const good = stampedWrite(1, 0, 0, 1, 1, 1);
  await assert.rejects(engine.write({ ...good, volumeId: -1 }), hasCode('INVALID_ARGUMENT'));
  await assert.rejects(engine.write({ ...good, data: Buffer.alloc(100), checksums: new Uint32Array(1) }), hasCode('INVALID_ARGUMENT'));
  await assert.rejects(engine.write({ ...good, version: { epoch: 2 ** 32, seq: 1 } }), hasCode('INVALID_ARGUMENT'));
  await assert.rejects(engine.write({ ...good, checksums: new Uint32Array(2) }), hasCode('INVALID_ARGUMENT'));
  await assert.rejects(engine.write({ ...good, offsetBlocks: 262_144 }), hasCode('OUT_OF_RANGE'));
  await assert.rejects(engine.read(1, 0, 262_143, 2), hasCode('OUT_OF_RANGE'));
  await assert.rejects(engine.read(1, 0, 0, 0), hasCode('INVALID_ARGUMENT'));
  await assert.rejects(engine.writeZeroes({ volumeId: 1, chunkIndex: 0, offsetBlocks: 0, countBlocks: 0, version: { epoch: 1, seq: 1 }, snapSeq: 0 }), hasCode('INVALID_ARGUMENT'));
  await engine.close();
});

test('version rule: only a higher (epoch, seq) is applied, per block; equal is a duplicate', async () => {
  const { env, engine } = await fresh(5);
  assert.deepEqual(await engine.write(stampedWrite(1, 0, 0, 4, 2, 10)), { appliedBlocks: 4, skippedBlocks: 0 });
  assert.deepEqual(await engine.write(stampedWrite(1, 0, 0, 4, 2, 10)), { appliedBlocks: 0, skippedBlocks: 4 }, 'duplicate');
  assert.deepEqual(await engine.write(stampedWrite(1, 0, 0, 2, 2, 9)), { appliedBlocks: 0, skippedBlocks: 2 }, 'older seq');
  assert.deepEqual(await engine.write(stampedWrite(1, 0, 0, 2, 1, 99)), { appliedBlocks: 0, skippedBlocks: 2 }, 'older epoch wins nothing');
  assert.deepEqual(await engine.write(stampedWrite(1, 0, 3, 3, 3, 1)), { appliedBlocks: 3, skippedBlocks: 0 }, 'higher epoch, lower seq');
  assert.deepEqual(await engine.write(stampedWrite(1, 0, 2, 3, 2, 11)), { appliedBlocks: 1, skippedBlocks: 2 }, 'partly newer');
  const expect = async (e: StoreEngine) => {
    const read = await e.read(1, 0, 0, 6);
    assert.deepEqual([...read.versions.epochs], [2, 2, 2, 3, 3, 3]);
    assert.deepEqual([...read.versions.seqs], [10, 10, 11, 1, 1, 1]);
    for (let b = 0; b < 6; b++) {
      const stamp = readStamp(read.data.subarray(b * BLOCK_SIZE_BYTES, (b + 1) * BLOCK_SIZE_BYTES));
      assert.deepEqual(stamp && [stamp.epoch, stamp.seq, stamp.block], [read.versions.epochs[b], read.versions.seqs[b], b]);
    }
  };
  await expect(engine);
  const again = await reopen(env, engine);
  await expect(again);
  assert.equal(again.stats().liveBytes, 6 * BLOCK_SIZE_BYTES);
  await again.close();
});

test('tombstones read as zeros with state ZERO, are versions, and survive reopen', async () => {
  const { env, engine } = await fresh(6);
  await engine.write(stampedWrite(1, 0, 0, 4, 1, 1));
  const zero = { volumeId: 1, chunkIndex: 0, offsetBlocks: 1, countBlocks: 2, version: { epoch: 1, seq: 5 }, snapSeq: 0 };
  assert.deepEqual(await engine.writeZeroes(zero), { appliedBlocks: 2, skippedBlocks: 0 });
  assert.deepEqual(await engine.write(stampedWrite(1, 0, 0, 4, 1, 3)), { appliedBlocks: 2, skippedBlocks: 2 }, 'older data does not replace a newer tombstone');
  assert.deepEqual(await engine.writeZeroes({ ...zero, offsetBlocks: 10, countBlocks: 3 }), { appliedBlocks: 3, skippedBlocks: 0 }, 'tombstones over absent blocks');
  const expect = async (e: StoreEngine) => {
    const read = await e.read(1, 0, 0, 14);
    assert.deepEqual([...read.states], [1, 2, 2, 1, 0, 0, 0, 0, 0, 0, 2, 2, 2, 0]);
    assert.ok(isAllZero(read.data.subarray(BLOCK_SIZE_BYTES, 3 * BLOCK_SIZE_BYTES)));
    assert.equal(read.checksums[1], ZERO_BLOCK_CRC);
    assert.deepEqual([read.versions.epochs[1], read.versions.seqs[1]], [1, 5]);
    assert.equal(readStamp(read.data.subarray(0, BLOCK_SIZE_BYTES))?.seq, 3);
  };
  await expect(engine);
  assert.equal(engine.stats().liveBytes, 2 * BLOCK_SIZE_BYTES);
  const again = await reopen(env, engine);
  await expect(again);
  assert.deepEqual(await again.write(stampedWrite(1, 0, 1, 1, 1, 6)), { appliedBlocks: 1, skippedBlocks: 0 }, 'a newer write replaces a tombstone');
  await again.close();
});

test('group commit: writes submitted together share batches and one writev each; concurrent flushes share a sync', async () => {
  const { env, engine } = await fresh(7);
  const batchesBefore = engine.stats().batchesWritten;
  const writesBefore = env.disk.stats.writes;
  const results = await Promise.all(Array.from({ length: 64 }, (_, i) => engine.write(stampedWrite(1, 0, i, 1, 1, i + 1))));
  assert.ok(results.every((r) => r.appliedBlocks === 1));
  const batches = engine.stats().batchesWritten - batchesBefore;
  assert.ok(batches <= 2, `64 writes took ${batches} batches`);
  assert.equal(env.disk.stats.writes - writesBefore, batches, 'one writev per batch');
  const syncsBefore = env.disk.stats.syncs;
  await Promise.all([engine.flush(), engine.flush(), engine.flush()]);
  assert.equal(env.disk.stats.syncs - syncsBefore, 1);
  assert.equal(env.disk.unsyncedWrites(PATH), 0);
  await engine.flush();
  assert.equal(env.disk.stats.syncs - syncsBefore, 1, 'nothing new written: no sync');
  await engine.close();
});

/** engine.writeNow as a promise of [error, result], and whether `done` came before the call returned. */
function writeNowSettled(engine: StoreEngine, request: WriteRequest): { ended: Promise<[Error | undefined, WriteResult | undefined]>; early: () => boolean } {
  let returned = false;
  let early = false;
  const ended = new Promise<[Error | undefined, WriteResult | undefined]>((resolve) => {
    engine.writeNow(request, (error, result) => {
      if (!returned) early = true;
      resolve([error, result]);
    });
  });
  returned = true;
  return { ended, early: () => early };
}

test('writeNow: settles through its callback, joins batches with write(), throws what write() rejects at once', async () => {
  const { env, engine } = await fresh(8);
  const batchesBefore = engine.stats().batchesWritten;
  const now = Array.from({ length: 32 }, (_, i) => writeNowSettled(engine, stampedWrite(1, 0, i, 1, 1, i + 1)));
  const promised = Array.from({ length: 32 }, (_, i) => engine.write(stampedWrite(1, 0, 32 + i, 1, 1, 33 + i)));
  for (const write of now) {
    const [error, result] = await write.ended;
    assert.equal(error, undefined);
    assert.equal(result?.appliedBlocks, 1);
    assert.equal(write.early(), false, 'done is never called before writeNow returns');
  }
  assert.ok((await Promise.all(promised)).every((result) => result.appliedBlocks === 1));
  assert.ok(engine.stats().batchesWritten - batchesBefore <= 2, 'the two kinds share batches');
  for (let block = 0; block < 64; block++) assert.equal((await stampAt(engine, 1, 0, block)).stamp?.seq, block + 1);
  // The version rule holds as for write(): an older version is skipped.
  const [, older] = await writeNowSettled(engine, stampedWrite(1, 0, 0, 1, 1, 1)).ended;
  assert.equal(older?.appliedBlocks, 0);

  const good = stampedWrite(1, 0, 100, 1, 1, 100);
  const callback = (): void => assert.fail('a refused writeNow settles nothing');
  assert.throws(() => engine.writeNow({ ...good, data: Buffer.alloc(100), checksums: new Uint32Array(1) }, callback), hasCode('INVALID_ARGUMENT'));
  assert.throws(() => engine.writeNow({ ...good, offsetBlocks: 262_144 }, callback), hasCode('OUT_OF_RANGE'));
  assert.throws(() => engine.writeNow({ ...good, fua: true }, callback), hasCode('INVALID_ARGUMENT'));
  await engine.fence(1, 5);
  assert.throws(() => engine.writeNow({ ...good, ownerEpoch: 4 }, callback), hasCode('FENCED'));

  // Its checksums are the caller's, computed from the same bytes: not checked again. Were they
  // wrong, the block would read as CHECKSUM, never as data.
  const wrong = stampedWrite(1, 0, 200, 1, 5, 1);
  wrong.checksums[0] ^= 1;
  const [wrongError] = await writeNowSettled(engine, wrong).ended;
  assert.equal(wrongError, undefined);
  await assert.rejects(engine.read(1, 0, 200, 1), hasCode('CHECKSUM'));

  await engine.close();
  assert.throws(() => engine.writeNow(stampedWrite(1, 0, 0, 1, 9, 1), callback), hasCode('SHUTTING_DOWN'));
  assert.equal(env.disk.unsyncedWrites(PATH), 0);
});

test('writeNow: a callback that throws is the caller\'s bug: it surfaces uncaught, and the rest of its batch is still answered', () => {
  // In a child process: the throw ends it, as any uncaught exception would.
  const script = `
    import { StoreEngine } from ${JSON.stringify(new URL('./engine.ts', import.meta.url).href)};
    import { simEnv, stampedWrite } from ${JSON.stringify(new URL('./test-support.ts', import.meta.url).href)};
    const env = simEnv(1);
    await StoreEngine.format(env, '/d', { sizeBytes: 16 * 1024 * 1024, clusterId: 'c', segmentSizeBytes: 256 * 1024 });
    const engine = await StoreEngine.open(env, '/d', { clusterId: 'c', backgroundCompaction: false });
    engine.writeNow(stampedWrite(1, 0, 0, 1, 1, 1), () => { throw new Error('caller bug'); });
    engine.writeNow(stampedWrite(1, 0, 1, 1, 1, 2), (error, result) => console.log('second write', error ?? result.appliedBlocks));
  `;
  const child = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 30_000 });
  assert.notEqual(child.status, 0, 'the throw is uncaught');
  assert.match(child.stderr, /caller bug/);
  assert.match(child.stdout, /second write 1/, 'the write batched with it was answered');
  assert.doesNotMatch(child.stderr, /store engine writer|INTERNAL|DISK_FAILED/, 'not taken for a disk failure');
});

test('a write larger than a segment and a batch is split and reads back whole', async () => {
  const { env, engine } = await fresh(8, 40, 64 * KiB);
  const request = stampedWrite(2, 1, 5, 100, 1, 1);
  assert.deepEqual(await engine.write(request), { appliedBlocks: 100, skippedBlocks: 0 });
  assert.ok((await engine.read(2, 1, 5, 100)).data.equals(request.data));
  const again = await reopen(env, engine);
  assert.ok((await again.read(2, 1, 5, 100)).data.equals(request.data));
  await again.close();
});

test('fence: durable, survives reopen, refuses older epochs and writes from older owners', async () => {
  const { env, engine } = await fresh(9);
  assert.equal(engine.ownerEpoch(4), 0);
  await engine.fence(4, 3);
  assert.equal(env.disk.unsyncedWrites(PATH), 0, 'fence is durable when it resolves');
  assert.equal(engine.ownerEpoch(4), 3);
  await engine.fence(4, 3);
  await assert.rejects(engine.fence(4, 2), hasCode('FENCED'));
  await assert.rejects(engine.write({ ...stampedWrite(4, 0, 0, 1, 2, 1), ownerEpoch: 2 }), hasCode('FENCED'));
  assert.equal((await engine.write({ ...stampedWrite(4, 0, 0, 1, 3, 1), ownerEpoch: 3 })).appliedBlocks, 1);
  env.disk.crash();
  const again = await reopen(env, undefined);
  assert.equal(again.ownerEpoch(4), 3);
  await again.fence(4, 5);
  const third = await reopen(env, again);
  assert.equal(third.ownerEpoch(4), 5);
  assert.equal(third.ownerEpoch(5), 0);
  await third.close();
});

test('purge: the volume is gone at once, durably, and its space becomes garbage', async () => {
  const { env, engine } = await fresh(10);
  await engine.write(stampedWrite(8, 0, 0, 10, 1, 1));
  await engine.write(stampedWrite(8, 1, 0, 10, 1, 2));
  await engine.write(stampedWrite(9, 0, 0, 2, 1, 1));
  await engine.fence(8, 2);
  assert.equal(engine.stats().liveBytes, 22 * BLOCK_SIZE_BYTES);
  await engine.purgeVolume(8);
  assert.equal(env.disk.unsyncedWrites(PATH), 0, 'purge is durable when it resolves');
  assert.ok(engine.isPurged(8));
  assert.deepEqual([...(await engine.read(8, 0, 0, 2)).states], [0, 0]);
  await assert.rejects(engine.write(stampedWrite(8, 0, 0, 1, 9, 9)), hasCode('NOT_FOUND'));
  assert.equal(engine.stats().liveBytes, 2 * BLOCK_SIZE_BYTES);
  assert.deepEqual([...engine.listObjects()], [{ volumeId: 9, chunkIndex: 0 }]);
  await engine.purgeVolume(8);
  env.disk.crash();
  const again = await reopen(env, undefined);
  assert.ok(again.isPurged(8));
  assert.equal(again.ownerEpoch(8), 0);
  assert.deepEqual([...(await again.read(8, 1, 0, 1)).states], [0]);
  assert.equal(again.stats().liveBytes, 2 * BLOCK_SIZE_BYTES);
  assert.equal((await again.read(9, 0, 0, 1)).states[0], BlockState.DATA);
  // Compaction carries the PURGE record forward (it must outlive every record of the volume).
  for (let i = 0; i < 6; i++) await again.write(stampedWrite(9, 1, i * 10, 10, 1, i + 1));
  for (let i = 0; i < 20 && (await again.compact()); i++);
  assert.equal(again.stats().damagedSegments, 0);
  assert.ok(again.stats().compactedSegments > 0);
  const third = await reopen(env, again);
  assert.ok(third.isPurged(8));
  assert.deepEqual([...(await third.read(8, 0, 0, 2)).states], [0, 0]);
  await third.close();
});

test('listObjects and objectVersions describe what is held, for resync', async () => {
  const { engine } = await fresh(11);
  await engine.write(stampedWrite(1, 0, 2, 2, 1, 4));
  await engine.writeZeroes({ volumeId: 1, chunkIndex: 0, offsetBlocks: 5, countBlocks: 1, version: { epoch: 1, seq: 6 }, snapSeq: 0 });
  await engine.write(stampedWrite(2, 7, 0, 1, 3, 1));
  const keys = [...engine.listObjects()].sort((a, b) => a.volumeId - b.volumeId);
  assert.deepEqual(keys, [{ volumeId: 1, chunkIndex: 0 }, { volumeId: 2, chunkIndex: 7 }]);
  const versions = engine.objectVersions(1, 0)!;
  assert.deepEqual([...versions.states], [0, 0, 1, 1, 0, 2]);
  assert.deepEqual([...versions.seqs], [0, 0, 4, 4, 0, 6]);
  assert.equal(engine.objectVersions(3, 0), undefined);
  await engine.close();
});

test('full disk: NO_SPACE before compaction is starved, data intact, reads work; purge and compaction free space', async () => {
  // 8 segments of 64 KiB (14 usable blocks each), 2 reserved.
  const { env, engine } = await fresh(12, 8, 64 * KiB);
  const written: number[] = [];
  let error: unknown;
  for (let i = 0; i < 200; i++) {
    try {
      await engine.write(stampedWrite(1, 0, i * 4, 4, 1, i + 1));
      written.push(i);
    } catch (caught) {
      error = caught;
      break;
    }
  }
  assert.ok(hasCode('NO_SPACE')(error), `expected NO_SPACE, got ${String(error)}`);
  assert.ok(written.length >= 10, `wrote ${written.length} writes before NO_SPACE`);
  assert.ok(engine.stats().freeSegments >= 1, 'the reserve is left');
  for (const i of written) {
    const read = await engine.read(1, 0, i * 4, 4);
    assert.equal(readStamp(read.data.subarray(0, BLOCK_SIZE_BYTES))?.seq, i + 1);
  }
  // Zeroes also need log space; a purge may use the reserve.
  await engine.write(stampedWrite(2, 0, 0, 1, 1, 1)).catch(() => undefined);
  await engine.purgeVolume(1);
  assert.equal(engine.stats().liveBytes <= BLOCK_SIZE_BYTES, true);
  // Writes work again: the purged segments are reclaimed (one segment now holds the checkpoint image).
  const again_ = written.length - 3;
  for (let i = 0; i < again_; i++) await engine.write(stampedWrite(3, 0, i * 4, 4, 1, i + 1));
  for (let i = 0; i < again_; i++) assert.equal((await stampAt(engine, 3, 0, i * 4)).stamp?.seq, i + 1);
  const again = await reopen(env, engine);
  for (let i = 0; i < again_; i++) assert.equal((await stampAt(again, 3, 0, i * 4)).stamp?.seq, i + 1);
  await again.close();
});

test('overwriting a full disk keeps working: foreground compaction reclaims garbage', async () => {
  const { env, engine } = await fresh(13, 8, 64 * KiB);
  // Cold blocks written once, interleaved with hot blocks overwritten again and again: every
  // segment ends up part live, part garbage, and only compaction can free one.
  let seq = 0;
  for (let round = 0; round < 120; round++) {
    if (round < 30) await engine.write(stampedWrite(1, 0, 100 + round, 1, 1, ++seq));
    await engine.write(stampedWrite(1, 0, 0, 2, 1, ++seq));
  }
  assert.ok(engine.stats().compactedSegments > 0);
  assert.equal(engine.stats().liveBytes, 32 * BLOCK_SIZE_BYTES);
  const expect = async (e: StoreEngine) => {
    for (let round = 0; round < 30; round++) assert.equal((await stampAt(e, 1, 0, 100 + round)).stamp?.seq, 2 * round + 1);
    assert.equal((await stampAt(e, 1, 0, 1)).stamp?.seq, seq);
  };
  await expect(engine);
  const again = await reopen(env, engine);
  await expect(again);
  await again.close();
});

test('compaction moves live data keeping versions and snap stamps, and frees the segment', async () => {
  const { env, engine } = await fresh(14, 12, 64 * KiB);
  // No snapshot (nothing older is kept); tombstones kept (as for a clone), so compaction copies them.
  await engine.setSnapshots(1, [], { snapSeq: 100, keepTombstones: true });
  await engine.write(stampedWrite(1, 0, 0, 8, 1, 1, 42));
  await engine.writeZeroes({ volumeId: 1, chunkIndex: 0, offsetBlocks: 20, countBlocks: 4, version: { epoch: 1, seq: 2 }, snapSeq: 43 });
  await engine.fence(1, 1);
  await engine.write(stampedWrite(1, 0, 0, 6, 1, 3, 44)); // most of the first record is now garbage
  for (let i = 0; i < 4; i++) await engine.write(stampedWrite(2, 0, i * 10, 10, 1, i + 1)); // fill more segments
  await engine.flush();
  const before = engine.stats();
  assert.equal(await engine.compact(), true);
  const after = engine.stats();
  assert.equal(after.compactedSegments, before.compactedSegments + 1);
  assert.equal(after.liveBytes, before.liveBytes);
  const expect = async (e: StoreEngine) => {
    const read = await e.read(1, 0, 0, 24);
    assert.deepEqual([...read.versions.seqs.subarray(0, 8)], [3, 3, 3, 3, 3, 3, 1, 1]);
    assert.equal(readStamp(read.data.subarray(7 * BLOCK_SIZE_BYTES, 8 * BLOCK_SIZE_BYTES))?.seq, 1);
    assert.deepEqual([...read.states.subarray(20, 24)], [2, 2, 2, 2]);
    assert.equal(e.ownerEpoch(1), 1);
  };
  await expect(engine);
  // The live copies carry the original snap stamps: find them on disk.
  const image = env.disk.fileBytes(PATH);
  const snapOf = new Map<string, number>();
  const formatId = decodeSuperblock(image).ok ? (decodeSuperblock(image) as { superblock: { formatId: Buffer } }).superblock.formatId : Buffer.alloc(16);
  for (let s = 0; s < 12; s++) {
    const start = METADATA_AREA_BYTES + s * 64 * KiB;
    const scan = scanSegment(image.subarray(start, start + 64 * KiB), s, formatId);
    for (const batch of scan.batches) for (const r of batch.records) snapOf.set(`${r.kind}:${r.volumeId}:${r.seq}`, r.snapSeq);
  }
  assert.equal(snapOf.get(`${RecordKind.DATA}:1:1`), 42);
  assert.equal(snapOf.get(`${RecordKind.ZERO}:1:2`), 43);
  const again = await reopen(env, engine);
  await expect(again);
  assert.equal(again.stats().liveBytes, after.liveBytes);
  await again.close();
});

test('a flipped bit in a record\'s data: that block reads CHECKSUM, live and after reopen; its neighbours read fine', async () => {
  const { env, engine } = await fresh(15);
  await engine.write(stampedWrite(1, 0, 0, 4, 1, 1));
  await engine.flush();
  // First write of a fresh disk: segment 0, header ×2, one batch header block, then data.
  const dataStart = METADATA_AREA_BYTES + (SEGMENT_HEADER_BLOCKS + 1) * BLOCK_SIZE_BYTES;
  env.disk.corrupt(PATH, dataStart + 2 * BLOCK_SIZE_BYTES + 77);
  await assert.rejects(engine.read(1, 0, 0, 4), (error: unknown) => hasCode('CHECKSUM')(error) && (error as ShaleError).details?.block === 2);
  assert.equal((await stampAt(engine, 1, 0, 3)).stamp?.seq, 1);
  // After a clean close the checkpoint holds the crcs: the read still fails, and scrub names the block.
  const again = await reopen(env, engine);
  assert.equal(again.replayReport.tornBatches, 0);
  await assert.rejects(again.read(1, 0, 2, 1), hasCode('CHECKSUM'));
  const scrub = await again.scrub();
  assert.equal(scrub.badBlocks, 1);
  assert.deepEqual(scrub.bad.map((b) => [b.volumeId, b.chunkIndex, b.block, b.seq]), [[1, 0, 2, 1]]);
  assert.equal(scrub.blocks, 4);
  assert.equal((await stampAt(again, 1, 0, 1)).stamp?.seq, 1);
  // Compaction copies the damage with its crc: still detected, never laundered.
  await again.write(stampedWrite(2, 0, 0, 40, 1, 1));
  await again.compact();
  await assert.rejects(again.read(1, 0, 2, 1), hasCode('CHECKSUM'));
  // A newer write repairs the block (what a peer's repair does).
  await again.write(stampedWrite(1, 0, 2, 1, 1, 2));
  assert.equal((await stampAt(again, 1, 0, 2)).stamp?.seq, 2);
  await again.close();
});

test('a damaged header of a durable batch is reported (its records are lost to this disk), not mistaken for a crash', async () => {
  const { env, engine } = await fresh(23);
  await engine.write(stampedWrite(1, 0, 0, 2, 1, 1));
  await engine.write(stampedWrite(1, 0, 2, 2, 1, 2));
  await engine.flush();
  await engine.write(stampedWrite(1, 0, 8, 1, 1, 3)); // its header says the first two are durable
  await engine.flush();
  env.disk.crash(); // no checkpoint: open replays the three batches
  // The first batch's header is block 2 of segment 0.
  env.disk.corrupt(PATH, METADATA_AREA_BYTES + 2 * BLOCK_SIZE_BYTES + 300);
  const again = await reopen(env, undefined);
  assert.equal(again.replayReport.damagedHeaders, 1);
  assert.deepEqual([...(await again.read(1, 0, 0, 4)).states], [0, 0, 1, 1]);
  await again.close();
});

test('a torn, never-durable batch at the tail is ignored: old data stays', async () => {
  let sawTorn = 0;
  for (let seed = 1; seed <= 20; seed++) {
    const env = simEnv(seed, { survivalProbability: 1, tearProbability: 1 });
    await StoreEngine.format(env, PATH, { sizeBytes: METADATA_AREA_BYTES + 8 * 256 * KiB, clusterId: CLUSTER, segmentSizeBytes: 256 * KiB });
    const engine = await StoreEngine.open(env, PATH, { backgroundCompaction: false });
    await engine.write(stampedWrite(1, 0, 0, 8, 1, 1));
    await engine.flush();
    await engine.write(stampedWrite(1, 0, 0, 8, 1, 2));
    env.disk.crash();
    const again = await StoreEngine.open(env, PATH, { backgroundCompaction: false });
    sawTorn += again.replayReport.tornBatches;
    const read = await again.read(1, 0, 0, 8);
    const seqs = new Set<number>();
    for (let b = 0; b < 8; b++) {
      const stamp = readStamp(read.data.subarray(b * BLOCK_SIZE_BYTES, (b + 1) * BLOCK_SIZE_BYTES));
      assert.ok(stamp, `seed ${seed}: block ${b} is not a whole version`);
      assert.equal(stamp.seq, read.versions.seqs[b]);
      seqs.add(stamp.seq);
    }
    assert.equal(seqs.size, 1, `seed ${seed}: a batch is all or nothing`);
    await again.close();
  }
  assert.ok(sawTorn > 0, 'no seed tore the tail batch');
});

test('a disk of another cluster, an unknown version, garbage or a truncated file is refused and left untouched', async () => {
  const { env, engine } = await fresh(16);
  await engine.write(stampedWrite(1, 0, 0, 1, 1, 1));
  await engine.close();
  const original = env.disk.fileBytes(PATH);
  await assert.rejects(StoreEngine.open(env, PATH, { clusterId: 'cluster-b' }), hasCode('WRONG_CLUSTER'));
  assert.ok(env.disk.fileBytes(PATH).equals(original));

  // Unknown format version (a valid-looking superblock of version 2, both copies).
  const decoded = decodeSuperblock(original);
  assert.ok(decoded.ok);
  const v2 = encodeSuperblock({ ...decoded.superblock, formatVersion: 2 });
  env.disk.plant('/disks/v2', 0, Buffer.concat([v2, v2, Buffer.alloc(METADATA_AREA_BYTES)]));
  await assert.rejects(StoreEngine.open(env, '/disks/v2'), (error: unknown) => hasCode('WRONG_CLUSTER')(error) && /version 2/.test((error as Error).message));

  const garbage = env.random.bytes(2 * MiB);
  env.disk.plant('/disks/garbage', 0, garbage);
  await assert.rejects(StoreEngine.open(env, '/disks/garbage'), hasCode('WRONG_CLUSTER'));
  assert.ok(env.disk.fileBytes('/disks/garbage').equals(garbage));

  env.disk.plant('/disks/short', 0, original.subarray(0, 100));
  await assert.rejects(StoreEngine.open(env, '/disks/short'), hasCode('WRONG_CLUSTER'));
  env.disk.plant('/disks/cut', 0, original.subarray(0, original.length - 4096));
  await assert.rejects(StoreEngine.open(env, '/disks/cut'), (error: unknown) => hasCode('WRONG_CLUSTER')(error) && /truncated/.test((error as Error).message));
  assert.equal(env.disk.fileBytes('/disks/cut').length, original.length - 4096);

  await assert.rejects(StoreEngine.open(env, '/disks/missing'), hasCode('NOT_FOUND'));

  // One damaged superblock copy is not fatal: the other one is used.
  env.disk.corrupt(PATH, 50);
  const survivor = await StoreEngine.open(env, PATH, { clusterId: CLUSTER });
  assert.equal((await stampAt(survivor, 1, 0, 0)).stamp?.seq, 1);
  await survivor.close();
});

test('format refuses to clobber a formatted disk unless asked, and validates its options', async () => {
  const env = simEnv(17);
  const size = METADATA_AREA_BYTES + 8 * 256 * KiB;
  await StoreEngine.format(env, PATH, { sizeBytes: size, clusterId: CLUSTER, segmentSizeBytes: 256 * KiB });
  await assert.rejects(StoreEngine.format(env, PATH, { sizeBytes: size, clusterId: 'other', segmentSizeBytes: 256 * KiB }), hasCode('ALREADY_EXISTS'));
  const info = await StoreEngine.format(env, PATH, { sizeBytes: size, clusterId: 'other', segmentSizeBytes: 256 * KiB, overwrite: true, diskUuid: '0f0e0d0c-0b0a-4908-8706-050403020100' });
  assert.equal(info.diskUuid, '0f0e0d0c-0b0a-4908-8706-050403020100');
  await assert.rejects(StoreEngine.format(env, '/x', { sizeBytes: 1.5 * MiB, clusterId: 'c', segmentSizeBytes: 256 * KiB }), hasCode('INVALID_ARGUMENT'));
  await assert.rejects(StoreEngine.format(env, '/x', { sizeBytes: size, clusterId: '', segmentSizeBytes: 256 * KiB }), hasCode('INVALID_ARGUMENT'));
  await assert.rejects(StoreEngine.format(env, '/x', { sizeBytes: size, clusterId: 'x'.repeat(65) }), hasCode('INVALID_ARGUMENT'));
  await assert.rejects(StoreEngine.format(env, '/x', { sizeBytes: size, clusterId: 'c', segmentSizeBytes: 5000 }), hasCode('INVALID_ARGUMENT'));
  // A reformatted disk's old records (other format id) are never replayed.
  const engine = await StoreEngine.open(env, PATH, { clusterId: 'other' });
  assert.equal(engine.replayReport.batchesApplied, 0);
  await engine.close();
});

/** Everything observable about the index, for comparing two engines. */
async function dump(engine: StoreEngine): Promise<string> {
  const lines: string[] = [];
  const keys = [...engine.listObjects()].sort((a, b) => a.volumeId - b.volumeId || a.chunkIndex - b.chunkIndex);
  for (const { volumeId, chunkIndex } of keys) {
    const versions = engine.objectVersions(volumeId, chunkIndex)!;
    const read = await engine.read(volumeId, chunkIndex, 0, versions.states.length);
    lines.push(`${volumeId}/${chunkIndex} ${[...versions.states].join('')} ${[...versions.epochs].join(',')} ${[...versions.seqs].join(',')} ${read.data.toString('base64').length}:${[...read.checksums].join(',')}`);
  }
  for (const volumeId of [1, 2, 3, 4, 5]) lines.push(`owner ${volumeId} ${engine.ownerEpoch(volumeId)} purged ${engine.isPurged(volumeId)}`);
  const stats = engine.stats();
  lines.push(`live ${stats.liveBytes} free ${stats.freeSegments}`);
  return lines.join('\n');
}

test('checkpoint + replay rebuild exactly the index the engine had (crash after flush, checkpoints at any point)', async () => {
  for (const checkpointAt of [-1, 0, 2, 4, 5]) {
    const { env, engine } = await fresh(18, 16, 64 * KiB);
    let seq = 0;
    for (let round = 0; round < 6; round++) {
      if (round === checkpointAt) await engine.checkpoint();
      for (let volume = 1; volume <= 3; volume++) {
        await engine.write(stampedWrite(volume, round % 2, (round * 3) % 20, 5, 1 + (round >> 2), ++seq));
      }
      await engine.writeZeroes({ volumeId: 2, chunkIndex: 0, offsetBlocks: round, countBlocks: 2, version: { epoch: 1, seq: ++seq }, snapSeq: 0 });
      await engine.write(stampedWrite(1, 0, 0, 2, 1, seq - 3)); // mostly stale: version rule
      if (round === 2) await engine.fence(3, 4);
      if (round === 3) await engine.purgeVolume(4);
      if (round === 4) await engine.compact();
    }
    // The same version twice (a retry) lands in two places.
    const retry = stampedWrite(5, 0, 0, 3, 9, 1);
    await engine.write(retry);
    await engine.write(retry);
    await engine.compact();
    await engine.flush();
    const expected = await dump(engine);
    env.disk.crash();
    const again = await reopen(env, undefined);
    assert.equal(await dump(again), expected, `checkpoint at round ${checkpointAt}`);
    // And once more from the root the reopen wrote (same checkpoint, the replayed segments listed).
    env.disk.crash();
    const third = await reopen(env, undefined);
    assert.equal(await dump(third), expected, `second replay, checkpoint at round ${checkpointAt}`);
    const fourth = await reopen(env, third);
    assert.equal(await dump(fourth), expected, `after a clean close, checkpoint at round ${checkpointAt}`);
    assert.equal(fourth.replayReport.batchesApplied, 0, 'a clean close leaves nothing to replay');
    await fourth.close();
  }
});

/**
 * Runs one seeded scenario: segment 0 is filled, compacted away and reused (new generation) by
 * later batches; then a crash. A batch is forged at the end of segment 0 that would win
 * everywhere (epoch 99): with the old generation, or (the control) with the current one.
 */
async function reusedSegmentScenario(forge: 'old' | 'current'): Promise<{ epoch: number; stale: number; seq: number | undefined }> {
  const { env, engine } = await fresh(19, 8, 256 * KiB);
  await engine.write(stampedWrite(1, 0, 0, 10, 1, 1));
  await engine.write(stampedWrite(1, 0, 0, 10, 1, 2));
  await engine.write(stampedWrite(2, 0, 0, 10, 1, 1));
  await engine.flush();
  const superblock = decodeSuperblock(env.disk.fileBytes(PATH));
  assert.ok(superblock.ok);
  const formatId = superblock.superblock.formatId;
  const segmentStart = (s: number) => METADATA_AREA_BYTES + s * 256 * KiB;
  const scan0 = () => scanSegment(env.disk.fileBytes(PATH).subarray(segmentStart(0), segmentStart(1)), 0, formatId);
  const oldGeneration = scan0().header!.generation;
  let seq = 2;
  for (let i = 0; i < 6; i++) await engine.write(stampedWrite(3, 0, (i % 5) * 8, 8, 1, ++seq));
  assert.equal(await engine.compact(), true);
  let reused = scan0();
  for (let i = 0; i < 400 && !(reused.header?.kind === SegmentKind.LOG && reused.header.generation > oldGeneration && reused.batches.length >= 2); i++) {
    await engine.write(stampedWrite(3, 0, (i % 5) * 8, 8, 1, ++seq));
    reused = scan0();
  }
  assert.ok(reused.header?.kind === SegmentKind.LOG && reused.header.generation > oldGeneration, 'segment 0 was reused as a log segment with a new generation');
  // Stop writing into segment 0: a crash now, with everything flushed.
  await engine.flush();
  reused = scan0();
  env.disk.crash();

  const header = Buffer.alloc(batchHeaderBlocks(1, 1) * BLOCK_SIZE_BYTES);
  const data = Buffer.alloc(BLOCK_SIZE_BYTES, 0xab);
  writeRecordEntry(header, 0, { kind: RecordKind.DATA, volumeId: 2, chunkIndex: 0, offsetBlocks: 0, countBlocks: 1, epoch: 99, seq: 1, snapSeq: 0, dataIndexBlocks: 0 });
  writeCrcEntry(header, 1, 0, blockChecksums(data)[0]!);
  const last = reused.batches[reused.batches.length - 1]!;
  const position = last.positionBlocks + last.headerBlocks + last.dataBlocks;
  assert.ok(position + 2 <= 64, 'room left in segment 0 for the forged batch');
  const sequence = 2 ** 40; // above anything leased
  sealBatchHeader(header, {
    segmentIndex: 0, headerBlocks: 1, generation: forge === 'old' ? oldGeneration : reused.header!.generation, sequence,
    incarnationFirstSequence: sequence, durableSequence: sequence, formatId, positionBlocks: position, recordCount: 1, dataBlocks: 1,
  });
  env.disk.plant(PATH, segmentStart(0) + position * BLOCK_SIZE_BYTES, Buffer.concat([header, data]));
  const again = await reopen(env, undefined);
  const got = await stampAt(again, 2, 0, 0);
  const result = { epoch: got.epoch!, stale: again.replayReport.staleBatches, seq: got.stamp?.seq };
  await again.close();
  return result;
}

test('a reused segment full of stale records with valid checksums is not replayed as live', async () => {
  const stale = await reusedSegmentScenario('old');
  assert.ok(stale.stale >= 1, 'the forged batch is seen as stale');
  assert.deepEqual([stale.epoch, stale.seq], [1, 1], 'the stale record was not applied');
  const control = await reusedSegmentScenario('current');
  assert.equal(control.epoch, 99, 'control: the same record with the current generation is applied');
});

test('background compaction keeps segments free while writes go on, and finishes when the engine is idle', async () => {
  const { env, engine } = await fresh(20, 12, 64 * KiB, { backgroundCompaction: true, compactionIdleDelayMs: 50, compactionFreeSegmentsMin: 8 });
  let seq = 0;
  let cold = 0;
  // Writes one at a time keep the writer busy; without compaction these 600 blocks would need 43 segments.
  for (let round = 0; round < 200; round++) {
    if (round % 4 === 0) await engine.write(stampedWrite(1, 0, 100 + cold++, 1, 1, ++seq));
    await engine.write(stampedWrite(1, 0, 0, 3, 1, ++seq));
  }
  const during = engine.stats();
  assert.ok(during.backgroundCompactedSegments > 0, 'compaction ran while writes were going on');
  assert.ok(during.foregroundCompactions * 4 <= during.backgroundCompactedSegments, `clients rarely waited for a foreground compaction: ${JSON.stringify(during)}`);
  await engine.flush();
  for (let i = 0; i < 20 && engine.stats().freeSegments < 8; i++) {
    env.clock.advance(100);
    for (let turn = 0; turn < 200; turn++) await null;
  }
  assert.ok(engine.stats().freeSegments >= 6, `free segments after idling: ${engine.stats().freeSegments}`);
  const last = seq;
  assert.equal((await stampAt(engine, 1, 0, 2)).stamp?.seq, last);
  for (let i = 0; i < cold; i++) assert.equal((await stampAt(engine, 1, 0, 100 + i)).stamp?.seq, 5 * i + 1);
  await engine.close();
});

test('close waits for writes in flight and makes them durable', async () => {
  const { env, engine } = await fresh(21);
  const pending = Array.from({ length: 10 }, (_, i) => engine.write(stampedWrite(1, 0, i, 1, 1, 1)));
  const closing = engine.close();
  await assert.rejects(engine.write(stampedWrite(1, 0, 20, 1, 1, 1)), hasCode('SHUTTING_DOWN'));
  await Promise.all(pending);
  await closing;
  assert.equal(env.disk.unsyncedWrites(PATH), 0);
  env.disk.crash();
  const again = await reopen(env, undefined);
  assert.deepEqual([...(await again.read(1, 0, 0, 10)).states], new Array(10).fill(1));
  await again.close();
});

test('a disk error breaks the engine: queued writes fail, nothing is acknowledged falsely', async () => {
  const { env, engine } = await fresh(22);
  await engine.write(stampedWrite(1, 0, 0, 1, 1, 1));
  await engine.flush();
  env.disk.crash(); // the handle is now dead: every later disk call fails
  assert.equal(engine.failure(), undefined);
  await assert.rejects(engine.write(stampedWrite(1, 0, 1, 1, 1, 2)), hasCode('DISK_FAILED'));
  await assert.rejects(engine.write(stampedWrite(1, 0, 2, 1, 1, 3)), hasCode('DISK_FAILED'));
  await assert.rejects(engine.flush(), hasCode('DISK_FAILED'));
  assert.equal(engine.failure()?.code, 'DISK_FAILED', 'the engine says why it takes no more writes');
  await engine.close().catch(() => undefined);
  const again = await reopen(env, undefined);
  assert.equal((await stampAt(again, 1, 0, 0)).stamp?.seq, 1);
  await again.close();
});
