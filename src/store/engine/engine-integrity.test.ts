/**
 * Integrity and space: a bit flipped anywhere in a record is caught (CHECKSUM for data, a damaged
 * batch for a header) and never returned as data; scrub names every bad block, snapshot versions
 * included; space accounting adds up; a full disk refuses writes with NO_SPACE, keeps everything
 * written, reads on, and writes again once a trim or a purge frees space; FUA is durable.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ShaleError } from '../../lib/errors.ts';
import { BLOCK_SIZE_BYTES, KiB } from '../../lib/units.ts';
import { StoreEngine } from './engine.ts';
import { decodeSuperblock, METADATA_AREA_BYTES, scanSegment } from './format.ts';
import { readStamp, simEnv, stampedWrite } from './test-support.ts';
import type { SimEnv } from './test-support.ts';

const PATH = '/disks/integrity';

function hasCode(code: string) {
  return (error: unknown) => error instanceof ShaleError && error.code === code;
}

async function fresh(seed: number, segments = 12): Promise<{ env: SimEnv; engine: StoreEngine }> {
  const env = simEnv(seed);
  await StoreEngine.format(env, PATH, { sizeBytes: METADATA_AREA_BYTES + segments * 64 * KiB, clusterId: 'c', segmentSizeBytes: 64 * KiB });
  return { env, engine: await StoreEngine.open(env, PATH, { backgroundCompaction: false }) };
}

function formatIdOf(env: SimEnv): Buffer {
  const decoded = decodeSuperblock(env.disk.fileBytes(PATH));
  assert.ok(decoded.ok);
  return decoded.superblock.formatId;
}

test('a bit flipped anywhere in a record\'s data reads CHECKSUM (heads and snapshot versions) and scrub names exactly that block', async () => {
  const { env, engine } = await fresh(1);
  await engine.write(stampedWrite(1, 0, 0, 8, 1, 1, 0));
  await engine.setSnapshots(1, [1], { snapSeq: 1 });
  await engine.write(stampedWrite(1, 0, 4, 4, 1, 2, 1)); // blocks 4..7: head seq 2, snapshot 1 keeps seq 1
  await engine.flush();
  // Where each live data block lies: scan the log.
  const formatId = formatIdOf(env);
  const image = env.disk.fileBytes(PATH);
  const blocks: { offset: number; block: number; seq: number }[] = [];
  for (let s = 0; s < 12; s++) {
    const start = METADATA_AREA_BYTES + s * 64 * KiB;
    for (const batch of scanSegment(image.subarray(start, start + 64 * KiB), s, formatId).batches) {
      for (const record of batch.records) {
        for (let i = 0; i < record.countBlocks && record.kind === 1; i++) {
          blocks.push({ offset: start + (batch.positionBlocks + batch.headerBlocks + record.dataIndexBlocks + i) * BLOCK_SIZE_BYTES, block: record.offsetBlocks + i, seq: record.seq });
        }
      }
    }
  }
  assert.equal(blocks.length, 12);
  const random = env.disk.random.fork();
  for (let round = 0; round < 40; round++) {
    const target: { offset: number; block: number; seq: number } = blocks[random.below(blocks.length)]!;
    const offset = target.offset + random.below(BLOCK_SIZE_BYTES);
    const bit = random.below(8);
    env.disk.corrupt(PATH, offset, bit);
    const snapshotView = target.seq === 1 && target.block >= 4;
    // The damaged version's view fails on exactly that block; the other view and other blocks read fine.
    const damaged = snapshotView ? { snapshotId: 1 } : {};
    await assert.rejects(engine.read(1, 0, target.block, 1, damaged), (error: unknown) => hasCode('CHECKSUM')(error) && (error as ShaleError).details?.block === target.block);
    for (const view of [{}, { snapshotId: 1 }]) {
      for (let block = 0; block < 8; block++) {
        if (block === target.block && JSON.stringify(view) === JSON.stringify(damaged)) continue;
        if (target.seq === 1 && target.block < 4 && block === target.block) continue; // both views read the one version
        const read = await engine.read(1, 0, block, 1, view);
        assert.equal(readStamp(read.data)?.seq, read.versions.seqs[0], `round ${round}: whole, right bytes`);
      }
    }
    const scrub = await engine.scrub();
    assert.equal(scrub.blocks, 12);
    assert.equal(scrub.badBlocks, 1, `round ${round}`);
    assert.deepEqual([scrub.bad[0]!.block, scrub.bad[0]!.seq, scrub.bad[0]!.snapshotVersion], [target.block, target.seq, snapshotView]);
    env.disk.corrupt(PATH, offset, bit); // flip back
  }
  assert.equal((await engine.scrub()).badBlocks, 0);
  await engine.close();
});

test('a bit flipped anywhere in a durable batch header is detected at replay; its blocks never read as garbage', async () => {
  for (let round = 0; round < 12; round++) {
    const { env, engine } = await fresh(100 + round);
    await engine.write(stampedWrite(1, 0, 0, 4, 1, 1));
    await engine.flush();
    await engine.write(stampedWrite(1, 0, 0, 4, 1, 2)); // the batch whose header rots
    await engine.flush();
    await engine.write(stampedWrite(1, 0, 8, 1, 1, 3)); // its header says batch 2 was synced
    await engine.flush();
    env.disk.crash();
    const formatId = formatIdOf(env);
    const segment = env.disk.fileBytes(PATH).subarray(METADATA_AREA_BYTES, METADATA_AREA_BYTES + 64 * KiB);
    const victim = scanSegment(segment, 0, formatId).batches.find((batch) => batch.records[0]?.seq === 2)!;
    const headerStart = METADATA_AREA_BYTES + victim.positionBlocks * BLOCK_SIZE_BYTES;
    env.disk.corrupt(PATH, headerStart + env.disk.random.below(victim.headerBlocks * BLOCK_SIZE_BYTES));
    const again = await StoreEngine.open(env, PATH, { backgroundCompaction: false });
    assert.equal(again.replayReport.damagedHeaders, 1, `round ${round}: reported: this disk needs a resync`);
    const read = await again.read(1, 0, 0, 4);
    for (let b = 0; b < 4; b++) {
      assert.equal(readStamp(read.data.subarray(b * BLOCK_SIZE_BYTES, (b + 1) * BLOCK_SIZE_BYTES))?.seq, 1, 'the older whole version, never garbage');
    }
    await again.close();
  }
});

test('space accounting adds up: capacity, used, free, live per segment', async () => {
  const { engine } = await fresh(2);
  const check = () => {
    const stats = engine.stats();
    const segments = engine.segmentStats();
    assert.equal(stats.capacityBytes, stats.usedBytes + stats.freeBytes);
    assert.equal(segments.reduce((sum, s) => sum + s.liveDataBytes, 0), stats.liveBytes);
    assert.equal(segments.filter((s) => s.state === 'free').length, stats.freeSegments);
    return stats;
  };
  check();
  await engine.write(stampedWrite(1, 0, 0, 16, 1, 1));
  assert.equal(check().liveBytes, 16 * BLOCK_SIZE_BYTES);
  await engine.writeZeroes({ volumeId: 1, chunkIndex: 0, offsetBlocks: 4, countBlocks: 8, version: { epoch: 1, seq: 2 }, snapSeq: 0 });
  assert.equal(check().liveBytes, 8 * BLOCK_SIZE_BYTES, 'a trim frees its blocks at once');
  await engine.write(stampedWrite(2, 0, 0, 30, 1, 1));
  for (let i = 0; i < 10 && (await engine.compact()); i++) check();
  assert.equal(check().liveBytes, 38 * BLOCK_SIZE_BYTES);
  await engine.close();
});

test('full disk: NO_SPACE; data intact; reads work; a trim frees space and writes work again; compaction runs under NO_SPACE', async () => {
  const { env, engine } = await fresh(3, 10);
  const written: number[] = [];
  for (let i = 0; i < 500; i++) {
    try {
      await engine.write(stampedWrite(1, 0, i * 2, 2, 1, i + 1));
      written.push(i);
    } catch (error) {
      assert.ok(hasCode('NO_SPACE')(error), String(error));
      break;
    }
  }
  assert.ok(written.length > 20);
  await assert.rejects(engine.write(stampedWrite(2, 0, 0, 1, 1, 1)), hasCode('NO_SPACE'));
  for (const i of written) assert.equal(readStamp((await engine.read(1, 0, i * 2, 1)).data)?.seq, i + 1);
  // TRIM half of what is there: tombstones may use the reserve, and they free the data under them.
  await engine.writeZeroes({ volumeId: 1, chunkIndex: 0, offsetBlocks: 0, countBlocks: written.length, version: { epoch: 1, seq: 10_000 }, snapSeq: 0 });
  // Writes work again: the next one compacts (under NO_SPACE pressure) to make room.
  for (let i = 0; i < 8; i++) await engine.write(stampedWrite(2, 0, i * 2, 2, 1, i + 1));
  assert.ok(engine.stats().compactedSegments > 0);
  for (const i of written) {
    const read = await engine.read(1, 0, i * 2, 2);
    if (i * 2 + 2 <= written.length) assert.deepEqual([...read.states], [2, 2]);
    else if (i * 2 >= written.length) assert.equal(readStamp(read.data.subarray(BLOCK_SIZE_BYTES))?.seq, i + 1);
  }
  await engine.flush();
  env.disk.crash();
  const again = await StoreEngine.open(env, PATH, { backgroundCompaction: false });
  for (let i = 0; i < 8; i++) assert.equal(readStamp((await again.read(2, 0, i * 2, 1)).data)?.seq, i + 1);
  await again.close();
});

test('fua: a write resolves once it is durable', async () => {
  const { env, engine } = await fresh(4);
  await engine.write({ ...stampedWrite(1, 0, 0, 2, 1, 1), fua: true });
  assert.equal(env.disk.unsyncedWrites(PATH), 0);
  await engine.writeZeroes({ volumeId: 1, chunkIndex: 0, offsetBlocks: 0, countBlocks: 1, version: { epoch: 1, seq: 2 }, snapSeq: 0, fua: true });
  assert.equal(env.disk.unsyncedWrites(PATH), 0);
  env.disk.crash();
  const again = await StoreEngine.open(env, PATH, { backgroundCompaction: false });
  assert.deepEqual([...(await again.read(1, 0, 0, 2)).states], [2, 1]);
  await again.close();
});
