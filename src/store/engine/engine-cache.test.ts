/**
 * The engine's read cache under overwrites: every read — asynchronous or synchronous, a hit or a
 * miss — returns the newest write of each block, while compaction moves blocks and reuses the
 * segments the cache has blocks of. On the simulated disk (only cache hits are synchronous) and on
 * a real file read synchronously (readNow reads the disk and fills the cache too).
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { nodeDiskWith, nodeEnv } from '../../env/node/node-env.ts';
import { giveBack } from '../../lib/buffer-pool.ts';
import { BLOCK_SIZE_BYTES, KiB } from '../../lib/units.ts';
import { StoreEngine, type EngineEnv } from './engine.ts';
import { METADATA_AREA_BYTES } from './format.ts';
import { isAllZero, readStamp, simEnv, stampedWrite } from './test-support.ts';

const SEGMENT_BYTES = 64 * KiB;
const SEGMENTS = 24;
/** 40 % of the segment area: overwrites make compaction reuse segments again and again. */
const WORKING_BLOCKS = 150;

async function overwriteAndRead(env: EngineEnv, path: string, seed: number): Promise<void> {
  await StoreEngine.format(env, path, { sizeBytes: METADATA_AREA_BYTES + SEGMENTS * SEGMENT_BYTES, clusterId: 'c', segmentSizeBytes: SEGMENT_BYTES, overwrite: true });
  // Smaller than the working set: blocks are evicted as well as found stale.
  const engine = await StoreEngine.open(env, path, { clusterId: 'c', cacheBytes: 64 * BLOCK_SIZE_BYTES });
  let state = seed;
  const below = (n: number): number => {
    state = (Math.imul(state, 1103515245) + 12345) >>> 0;
    return Math.floor((state / 2 ** 32) * n);
  };
  // Per block: the sequence of its newest write, 0 for zeros (never written, or zeroed).
  const newest = new Array<number>(WORKING_BLOCKS).fill(0);
  const check = (data: Buffer, offsetBlocks: number, countBlocks: number, how: string): void => {
    for (let i = 0; i < countBlocks; i++) {
      const bytes = data.subarray(i * BLOCK_SIZE_BYTES, (i + 1) * BLOCK_SIZE_BYTES);
      const want = newest[offsetBlocks + i]!;
      const where = `seed ${seed}: ${how} of block ${offsetBlocks + i}`;
      if (want === 0) assert.ok(isAllZero(bytes), `${where}: zeros expected`);
      else assert.deepEqual(readStamp(bytes), { volumeId: 1, chunkIndex: 0, block: offsetBlocks + i, epoch: 1, seq: want }, where);
    }
  };
  let seq = 0;
  for (let round = 0; round < 150; round++) {
    const writes: Promise<unknown>[] = [];
    for (let w = 0; w < 8; w++) {
      const countBlocks = 1 + below(3);
      const offsetBlocks = below(WORKING_BLOCKS - countBlocks);
      const version = { epoch: 1, seq: ++seq };
      if (below(10) === 0) {
        writes.push(engine.writeZeroes({ volumeId: 1, chunkIndex: 0, offsetBlocks, countBlocks, version, snapSeq: 0 }));
        newest.fill(0, offsetBlocks, offsetBlocks + countBlocks);
      } else {
        writes.push(engine.write(stampedWrite(1, 0, offsetBlocks, countBlocks, 1, version.seq)));
        newest.fill(version.seq, offsetBlocks, offsetBlocks + countBlocks);
      }
    }
    await Promise.all(writes);
    for (let r = 0; r < 24; r++) {
      const countBlocks = r % 3 === 0 ? 1 + below(4) : 1;
      const offsetBlocks = below(WORKING_BLOCKS - countBlocks);
      const now = engine.readNow(1, 0, offsetBlocks, countBlocks);
      if (now !== undefined) {
        check(now.data, offsetBlocks, countBlocks, 'readNow');
        giveBack(now.data);
      }
      const read = await engine.read(1, 0, offsetBlocks, countBlocks);
      check(read.data, offsetBlocks, countBlocks, 'read');
    }
  }
  const stats = engine.stats();
  await engine.close();
  const cache = stats.cache!;
  assert.ok(stats.compactedSegments > 10, `seed ${seed}: ${stats.compactedSegments} segments compacted: segments were reused`);
  assert.ok(cache.hits > 500 && cache.insertions > 500, `seed ${seed}: the cache was used: ${JSON.stringify(cache)}`);
  assert.ok(cache.evictions > 0, `seed ${seed}: the cache was full at times`);
  assert.equal(cache.pinned, 0, `seed ${seed}: every lent block came back`);
}

test('simulated disk: reads see every overwrite while compaction reuses cached segments (several seeds)', async () => {
  for (let seed = 1; seed <= 6; seed++) await overwriteAndRead(simEnv(seed), '/disk', seed);
});

test('file read synchronously: readNow fills the cache from the disk and sees every overwrite', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'shale-engine-cache-'));
  try {
    const env: EngineEnv = { ...nodeEnv, disk: nodeDiskWith(() => ({ useSync: () => true, record: () => {} })) };
    for (let seed = 1; seed <= 2; seed++) await overwriteAndRead(env, join(dir, `disk-${seed}`), seed);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('cacheBytes must be a whole number of bytes', async () => {
  const env = simEnv(1);
  await StoreEngine.format(env, '/disk', { sizeBytes: METADATA_AREA_BYTES + SEGMENTS * SEGMENT_BYTES, clusterId: 'c', segmentSizeBytes: SEGMENT_BYTES });
  await assert.rejects(StoreEngine.open(env, '/disk', { cacheBytes: -1 }), { code: 'INVALID_ARGUMENT' });
  await assert.rejects(StoreEngine.open(env, '/disk', { cacheBytes: 1.5 }), { code: 'INVALID_ARGUMENT' });
  const engine = await StoreEngine.open(env, '/disk', { cacheBytes: 0 });
  assert.equal(engine.stats().cache, undefined, '0: no cache');
  await engine.close();
});
