/**
 * Giving freed segments back to the file system (`discardFreedSegments`): on a real sparse file
 * the blocks of segments the log no longer needs are returned (the file's allocated size falls
 * while what it holds stays readable, also after a reopen); a disk that cannot punch holes turns
 * it off and nothing else changes. The races with the writer reopening segments are in the
 * property test (engine-property.test.ts).
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { nodeEnv } from '../../env/node/node-env.ts';
import type { DiskFile } from '../../env/env.ts';
import { ShaleError } from '../../lib/errors.ts';
import { BLOCK_SIZE_BYTES, KiB } from '../../lib/units.ts';
import { StoreEngine, type EngineEnv, type EngineOpenOptions } from './engine.ts';
import { METADATA_AREA_BYTES } from './format.ts';
import { readStamp, simEnv, stampedWrite } from './test-support.ts';

const SEGMENT_BYTES = 64 * KiB;
const SEGMENTS = 64;
/** The range overwritten round after round: 8 segments' worth. */
const RANGE_BLOCKS = 128;
const ROUNDS = 12;

/** Overwrites the same range ROUNDS times, a checkpoint after each, and checks every block reads its newest stamp. */
async function overwriteRounds(env: EngineEnv, path: string, options: EngineOpenOptions): Promise<StoreEngine> {
  await StoreEngine.format(env, path, { sizeBytes: METADATA_AREA_BYTES + SEGMENTS * SEGMENT_BYTES, clusterId: 'c', segmentSizeBytes: SEGMENT_BYTES, overwrite: true });
  const engine = await StoreEngine.open(env, path, { clusterId: 'c', ...options });
  for (let round = 1; round <= ROUNDS; round++) {
    const writes: Promise<unknown>[] = [];
    for (let at = 0; at < RANGE_BLOCKS; at += 16) writes.push(engine.write(stampedWrite(1, 0, at, 16, 1, round)));
    await Promise.all(writes);
    await engine.flush();
    await engine.checkpoint();
  }
  await checkNewest(engine, ROUNDS);
  return engine;
}

async function checkNewest(engine: StoreEngine, seq: number): Promise<void> {
  const { data } = await engine.read(1, 0, 0, RANGE_BLOCKS);
  for (let block = 0; block < RANGE_BLOCKS; block++) {
    const stamp = readStamp(data.subarray(block * BLOCK_SIZE_BYTES, (block + 1) * BLOCK_SIZE_BYTES));
    assert.deepEqual(stamp, { volumeId: 1, chunkIndex: 0, block, epoch: 1, seq }, `block ${block}`);
  }
}

/** Waits (real time) until no freed segment waits to be given back and no call runs. */
async function discardsSettled(engine: StoreEngine): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const discard = engine.stats().discard!;
    if (discard.waitingSegments === 0) {
      await nodeEnv.clock.sleep(50);
      if (engine.stats().discard!.waitingSegments === 0) return;
    }
    await nodeEnv.clock.sleep(25);
  }
  assert.fail(`freed segments still waiting: ${JSON.stringify(engine.stats().discard)}`);
}

test('on a sparse file, segments freed by overwrites are given back: the file shrinks and its data stays', async (t) => {
  const directory = mkdtempSync(join(tmpdir(), 'shale-discard-'));
  t.after(() => rmSync(directory, { recursive: true, force: true }));
  const allocatedBytes = (path: string): number => statSync(path).blocks * 512;

  // Without: every segment the log went through stays allocated.
  const keptPath = join(directory, 'kept.img');
  const kept = await overwriteRounds(nodeEnv, keptPath, {});
  assert.equal(kept.stats().discard, undefined);
  await kept.close();
  const keptBytes = allocatedBytes(keptPath);

  const path = join(directory, 'disk.img');
  const engine = await overwriteRounds(nodeEnv, path, { discardFreedSegments: true, discardDelayMs: 20 });
  await discardsSettled(engine);
  const stats = engine.stats().discard!;
  assert.equal(stats.enabled, true, stats.failure);
  assert.ok(stats.discardedSegments >= 8, `only ${stats.discardedSegments} segments given back`);
  assert.ok(stats.calls >= 1 && stats.calls <= stats.discardedSegments);
  const shrunkBytes = allocatedBytes(path);
  // 12 rounds of 512 KiB went through the log (6 MiB on a 4 MiB segment area, so segments were
  // reused); what stays allocated is the live range, the open and checkpoint segments and the
  // metadata area, not every segment the log used.
  assert.ok(keptBytes >= (SEGMENTS * SEGMENT_BYTES) / 2, `without giving back only ${keptBytes} bytes are allocated`);
  assert.ok(shrunkBytes < keptBytes / 2, `given back: ${shrunkBytes} bytes allocated against ${keptBytes} kept`);
  await checkNewest(engine, ROUNDS);
  await engine.close();

  // Reopened, the data is all there, and writes go on into segments that were given back.
  const reopened = await StoreEngine.open(nodeEnv, path, { clusterId: 'c', discardFreedSegments: true, discardDelayMs: 20 });
  await checkNewest(reopened, ROUNDS);
  for (let round = ROUNDS + 1; round <= ROUNDS + 4; round++) {
    await reopened.write(stampedWrite(1, 0, 0, RANGE_BLOCKS, 1, round));
    await reopened.checkpoint();
  }
  await checkNewest(reopened, ROUNDS + 4);
  await discardsSettled(reopened);
  await reopened.close();
  const again = await StoreEngine.open(nodeEnv, path, { clusterId: 'c' });
  await checkNewest(again, ROUNDS + 4);
  await again.close();
});

/** The simulated disk with its files' punchHoles replaced (undefined: a disk without the method). */
function withHoles(env: EngineEnv, punchHoles: DiskFile['punchHoles']): EngineEnv {
  return {
    ...env,
    disk: {
      ...env.disk,
      open: async (path, options) => {
        const file = await env.disk.open(path, options);
        return {
          path: file.path,
          sizeBytes: file.sizeBytes,
          read: (target, offsetBytes) => file.read(target, offsetBytes),
          writev: (buffers, offsetBytes) => file.writev(buffers, offsetBytes),
          sync: () => file.sync(),
          close: () => file.close(),
          ...(punchHoles === undefined ? {} : { punchHoles }),
        };
      },
    },
  };
}

test('a disk that cannot punch holes turns giving back off and says why; writes and reads go on', async () => {
  const env = simEnv(7);
  const refusing = withHoles(env, () => Promise.reject(new ShaleError('NOT_SUPPORTED', 'this file system has no holes')));
  const engine = await overwriteRounds(refusing, '/disks/refusing', { discardFreedSegments: true, discardDelayMs: 0 });
  const stats = engine.stats().discard!;
  assert.equal(stats.enabled, false);
  assert.match(stats.failure ?? '', /no holes/);
  assert.equal(stats.discardedSegments, 0);
  assert.equal(stats.waitingSegments, 0);
  await checkNewest(engine, ROUNDS);
  await engine.close();
  assert.equal(env.disk.stats.holesPunched, 0);

  // A disk without the method at all: off from the start, and the same.
  const without = await overwriteRounds(withHoles(simEnv(8), undefined), '/disks/without', { discardFreedSegments: true, discardDelayMs: 0 });
  assert.deepEqual(without.stats().discard, { enabled: false, discardedSegments: 0, calls: 0, waitingSegments: 0, failure: 'the disk cannot punch holes' });
  await checkNewest(without, ROUNDS);
  await without.close();
});
