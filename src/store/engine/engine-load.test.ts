/**
 * Compaction under sustained load: with writes always queued the writer never goes idle, yet a
 * disk whose live data is small must keep taking overwrites — the dead space has to be reclaimed
 * between client batches, not only when the engine rests — and a crash at any moment of that
 * (mid-copy, mid-sync, mid-checkpoint, mid-reuse) must lose nothing that was acknowledged and
 * flushed. Each failure prints its seed (`SHALE_LOAD_SEEDS` sets how many).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ShaleError } from '../../lib/errors.ts';
import { KiB } from '../../lib/units.ts';
import { StoreEngine } from './engine.ts';
import { METADATA_AREA_BYTES } from './format.ts';
import { readStamp, simEnv, stampedWrite, VersionModel } from './test-support.ts';

const PATH = '/disks/load';
const SEGMENT_BYTES = 64 * KiB;
/** Usable 4 KiB blocks per 64 KiB segment (two header blocks). */
const SEGMENT_BLOCKS = 14;

// Regression: with writes always queued, clients got NO_SPACE at ~30% live data. A foreground
// compaction's batch carried queued client writes along, which used the room it had just made;
// the engine saw "no more room than before" after one victim and answered NO_SPACE with most of
// the disk dead.
test('overwrites at queue depth 32 never hit NO_SPACE while dead space can be reclaimed', async () => {
  const env = simEnv(7);
  const segmentSizeBytes = 64 * KiB;
  await StoreEngine.format(env, '/disk', { sizeBytes: 1024 * KiB + 24 * segmentSizeBytes, clusterId: 'c', segmentSizeBytes });
  const engine = await StoreEngine.open(env, '/disk', { clusterId: 'c' });
  try {
    // A hot set overwritten again and again, with a cold block that stays live every 25th write:
    // every segment keeps some live data, so only compaction (copying) can free space.
    const hotBlocks = 32;
    const coldBlocksMax = 80; // with the hot set, under half of the 384-block segment area
    const writes = 24 * 16 * 10; // ten times the segment area, in 4 KiB blocks
    let issued = 0;
    let cold = 0;
    let seq = 0;
    const worker = async (): Promise<void> => {
      while (issued < writes) {
        issued++;
        const block = issued % 25 === 0 && cold < coldBlocksMax ? hotBlocks + cold++ : (issued * 7919) % hotBlocks;
        await engine.write(stampedWrite(1, 0, block, 1, 1, ++seq));
      }
    };
    await Promise.all(Array.from({ length: 32 }, worker));
    assert.ok(engine.stats().compactedSegments > 0, 'segments were compacted while writes were queued');
    // Every block written reads back as some version that was written.
    const workingSetBlocks = hotBlocks + cold;
    const read = await engine.read(1, 0, 0, workingSetBlocks);
    for (let block = 0; block < workingSetBlocks; block++) {
      assert.ok(readStamp(read.data.subarray(block * 4096, (block + 1) * 4096)), `block ${block} holds a whole written version`);
    }
  } finally {
    await engine.close();
  }
});

interface LoadOptions {
  seed: number;
  segments: number;
  /** Live blocks (cold + hot) as a fraction of the segment area. */
  liveFraction: number;
  depth: number;
  /** Writes over the whole run, as a multiple of the segment area. */
  turnover: number;
  backgroundCompaction: boolean;
  /** Power cuts at random disk operations; each is followed by reopen and a check against the model. */
  crashes: number;
}

interface LoadOutcome {
  compactedSegments: number;
  checkpointsStarved: number;
  crashes: number;
  blocksWritten: number;
}

/**
 * Sustained overwrites at queue depth `depth` over a working set of `liveFraction` of the disk
 * (one-block and multi-block writes, a few tombstones), with flushes now and then, and power cuts
 * at random disk operations. No write may see NO_SPACE; after every crash the engine must hold,
 * per block, a whole version at or above the last flushed one (VersionModel); at the end exactly
 * the newest acknowledged.
 */
async function sustainedOverwrites(options: LoadOptions): Promise<LoadOutcome> {
  const { seed, segments, depth } = options;
  const env = simEnv(seed, { survivalProbability: 0.5, tearProbability: 0.3 });
  const random = env.disk.random.fork();
  await StoreEngine.format(env, PATH, { sizeBytes: METADATA_AREA_BYTES + segments * SEGMENT_BYTES, clusterId: 'c', segmentSizeBytes: SEGMENT_BYTES });
  const open = async () => {
    const engine = await StoreEngine.open(env, PATH, { clusterId: 'c', backgroundCompaction: options.backgroundCompaction, checkpointIntervalBytes: 512 * KiB });
    const report = engine.replayReport;
    assert.equal(report.corruptBatches + report.damagedHeaders + report.lostBlocks, 0, `seed=${seed}: a crash looked like corruption: ${JSON.stringify(report)}`);
    return engine;
  };
  const model = new VersionModel(`seed=${seed}`);
  const areaBlocks = segments * SEGMENT_BLOCKS;
  const workingSet = Math.floor(areaBlocks * options.liveFraction);
  const totalWrites = Math.floor(areaBlocks * options.turnover);
  const crashAt = new Set<number>();
  while (crashAt.size < options.crashes) crashAt.add(1 + random.below(totalWrites - 1));
  let engine = await open();
  let compactedSegments = 0;
  let checkpointsStarved = 0;
  let crashes = 0;
  let blocksWritten = 0;
  let seq = 0;
  let epoch = 1;
  let issued = 0;
  let noSpace: unknown;
  let crashing = false;
  // A crash is triggered from a writer's loop at a chosen write count, at the next disk operation
  // (inside whatever the engine is doing then: a batch, a copy, a sync, a root, a checkpoint).
  let crashArmed = false;
  env.disk.onOperation = () => {
    if (!crashArmed) return;
    crashArmed = false;
    crashing = true;
    env.disk.crash();
  };
  while (issued < totalWrites && noSpace === undefined) {
    const current = engine;
    const inFlight = new Set<Promise<void>>();
    const worker = async (): Promise<void> => {
      while (issued < totalWrites && !crashing && noSpace === undefined) {
        issued++;
        if (crashAt.has(issued)) crashArmed = true;
        const roll = random.below(100);
        if (roll < 4) {
          const flushed = model.flushIssued();
          await current.flush().then(flushed, () => undefined);
          continue;
        }
        // Two working sets: 1/8 of the blocks hot, the rest cold (rewritten rarely): every segment
        // ends part live, part dead.
        const hot = random.chance(0.85);
        const hotBlocks = Math.max(4, workingSet >> 3);
        const countBlocks = random.chance(0.2) ? 1 + random.below(4) : 1;
        const base = hot ? random.below(hotBlocks) : hotBlocks + random.below(Math.max(1, workingSet - hotBlocks));
        const offsetBlocks = Math.min(base, workingSet - countBlocks);
        const zero = roll < 7;
        const version = { epoch, seq: ++seq };
        const ack = model.issue(1, 0, offsetBlocks, countBlocks, version.epoch, version.seq, zero);
        try {
          if (zero) await current.writeZeroes({ volumeId: 1, chunkIndex: 0, offsetBlocks, countBlocks, version, snapSeq: 0 });
          else await current.write(stampedWrite(1, 0, offsetBlocks, countBlocks, version.epoch, version.seq));
          ack();
          blocksWritten += countBlocks;
        } catch (error) {
          if (error instanceof ShaleError && error.code === 'NO_SPACE' && !crashing) noSpace = error;
          else if (!crashing) throw error;
        }
      }
    };
    for (let w = 0; w < depth; w++) {
      const running = worker();
      inFlight.add(running);
    }
    await Promise.all(inFlight);
    if (noSpace !== undefined) break;
    compactedSegments += current.stats().compactedSegments;
    checkpointsStarved += current.stats().checkpointsStarved;
    if (!crashing) break;
    // The power was cut: reopen and check what survived.
    crashes++;
    crashing = false;
    engine = await open();
    await model.verify(engine, { exact: false, settle: true });
    // A takeover after a restart, as the client would do: a higher epoch, the sequence restarts.
    epoch++;
    seq = 0;
  }
  env.disk.onOperation = undefined;
  if (noSpace !== undefined) {
    const stats = engine.stats();
    await engine.close().catch(() => undefined);
    assert.fail(`seed=${seed}: NO_SPACE after ${blocksWritten} blocks with ${workingSet} of ${areaBlocks} blocks live: ${(noSpace as Error).message} ${JSON.stringify(stats)}`);
  }
  await engine.flush();
  await model.verify(engine, { exact: true, settle: false });
  await engine.close();
  const reopened = await open();
  await model.verify(reopened, { exact: true, settle: false });
  await reopened.close();
  return { compactedSegments, checkpointsStarved, crashes, blocksWritten };
}

test('sustained overwrites at 30-50% live reclaim space without NO_SPACE, background compaction on or off (many seeds)', async () => {
  const seeds = Number(process.env.SHALE_LOAD_SEEDS ?? 24);
  for (let seed = 1; seed <= seeds; seed++) {
    const options: LoadOptions = {
      seed,
      segments: [16, 24, 48][seed % 3]!,
      liveFraction: [0.3, 0.4, 0.5][(seed >> 1) % 3]!,
      depth: [1, 8, 32][(seed >> 2) % 3]!,
      turnover: 6,
      backgroundCompaction: seed % 2 === 0,
      crashes: 0,
    };
    let outcome: LoadOutcome;
    try {
      outcome = await sustainedOverwrites(options);
    } catch (error) {
      assert.fail(`seed=${seed} ${JSON.stringify(options)}: ${(error as Error).stack}`);
    }
    // Six times the disk was written over a working set under half of it: space was reclaimed.
    assert.ok(outcome.blocksWritten >= options.segments * SEGMENT_BLOCKS * 5, `seed=${seed}: wrote ${outcome.blocksWritten} blocks`);
    assert.ok(outcome.compactedSegments > 0, `seed=${seed}: compaction ran`);
    assert.equal(outcome.checkpointsStarved, 0, `seed=${seed}: every checkpoint found room for its image`);
  }
});

test('power cuts during compaction under sustained overwrites lose nothing acknowledged and flushed (many seeds)', async () => {
  const seeds = Number(process.env.SHALE_LOAD_SEEDS ?? 24);
  let crashes = 0;
  for (let seed = 1001; seed <= 1000 + seeds; seed++) {
    const options: LoadOptions = {
      seed,
      segments: [16, 24][seed % 2]!,
      liveFraction: [0.3, 0.45][(seed >> 1) % 2]!,
      depth: [4, 32][(seed >> 2) % 2]!,
      turnover: 5,
      backgroundCompaction: seed % 3 !== 0,
      crashes: 4,
    };
    try {
      crashes += (await sustainedOverwrites(options)).crashes;
    } catch (error) {
      assert.fail(`seed=${seed} ${JSON.stringify(options)}: ${(error as Error).stack}`);
    }
  }
  assert.ok(crashes >= seeds * 2, `power was cut ${crashes} times`);
});

test('a disk filled at queue depth 32: NO_SPACE harms nothing, reads go on, trim and delete make writes work again', async () => {
  const env = simEnv(77);
  await StoreEngine.format(env, PATH, { sizeBytes: METADATA_AREA_BYTES + 24 * SEGMENT_BYTES, clusterId: 'c', segmentSizeBytes: SEGMENT_BYTES });
  let engine = await StoreEngine.open(env, PATH, { clusterId: 'c' });
  // Volume 1 and volume 2 (to be deleted) fill the disk with new blocks, 32 writes at a time.
  const acked = new Map<string, number>();
  let next = 0;
  let seq = 0;
  let full: unknown;
  const worker = async (): Promise<void> => {
    while (full === undefined) {
      const i = next++;
      const volumeId = 1 + (i % 2);
      const version = ++seq;
      try {
        await engine.write(stampedWrite(volumeId, 0, i >> 1, 1, 1, version));
        acked.set(`${volumeId}/${i >> 1}`, version);
      } catch (error) {
        full = error;
      }
    }
  };
  await Promise.all(Array.from({ length: 32 }, worker));
  assert.ok(full instanceof ShaleError && full.code === 'NO_SPACE', `the disk filled up with NO_SPACE, got ${String(full)}`);
  assert.ok(acked.size > 200, `${acked.size} writes before NO_SPACE`);
  await assert.rejects(engine.write(stampedWrite(3, 0, 0, 1, 1, 1)), (error: unknown) => error instanceof ShaleError && error.code === 'NO_SPACE');
  // Nothing acknowledged was harmed, and reads, flushes and fences keep working.
  const check = async (against: StoreEngine, volumes: number[]) => {
    for (const [key, version] of acked) {
      const [volumeId, block] = key.split('/').map(Number) as [number, number];
      if (!volumes.includes(volumeId)) continue;
      const read = await against.read(volumeId, 0, block, 1);
      assert.equal(readStamp(read.data)?.seq, version, `${key} reads what was acknowledged`);
    }
  };
  await check(engine, [1, 2]);
  await engine.flush();
  await engine.fence(1, 2);
  // TRIM of volume 1's first 64 blocks (tombstones may use part of the reserve) and the delete of
  // volume 2 free space; writes work again, at queue depth 32, compacting as they need.
  await engine.writeZeroes({ volumeId: 1, chunkIndex: 0, offsetBlocks: 0, countBlocks: 64, version: { epoch: 2, seq: 1 }, snapSeq: 0, ownerEpoch: 2 });
  for (let block = 0; block < 64; block++) acked.delete(`1/${block}`);
  await engine.purgeVolume(2);
  const again = Array.from({ length: 96 }, (_, i) => engine.write(stampedWrite(4, 0, i, 1, 1, i + 1)).then(() => acked.set(`4/${i}`, i + 1)));
  await Promise.all(again);
  assert.ok(engine.stats().compactedSegments > 0, 'compaction reclaimed the freed space');
  await check(engine, [1, 4]);
  assert.deepEqual([...(await engine.read(1, 0, 0, 4)).states], [2, 2, 2, 2], 'trimmed blocks read as zeros');
  // And all of it survives a power cut after a flush.
  await engine.flush();
  env.disk.crash();
  engine = await StoreEngine.open(env, PATH, { clusterId: 'c' });
  await check(engine, [1, 4]);
  assert.equal(engine.isPurged(2), true);
  assert.equal(engine.ownerEpoch(1), 2);
  await engine.close();
});
