/**
 * How the writer forms its first batch: it starts once the current event-loop turn's callbacks
 * have run (Clock.afterIo), so requests that callbacks of the same turn submit (in a process, the
 * data every socket delivered) go in one batch with the request that started it, one write and one
 * header for all. In a simulation the writer starts at once, as nothing arrives during a turn.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { nodeEnv } from '../../env/node/node-env.ts';
import { KiB } from '../../lib/units.ts';
import { StoreEngine } from './engine.ts';
import { METADATA_AREA_BYTES } from './format.ts';
import { readStamp, simEnv, stampedWrite } from './test-support.ts';

const SEGMENT_BYTES = 256 * KiB;
const SEGMENTS = 16;

// A writer that never starts would leave the writes waiting: the timeouts make that a failure, not a hang.
test('writes submitted by callbacks of the same event-loop turn go in one batch', { timeout: 20_000 }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'shale-batching-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'disk.img');
  await StoreEngine.format(nodeEnv, path, { sizeBytes: METADATA_AREA_BYTES + SEGMENTS * SEGMENT_BYTES, clusterId: 'c', segmentSizeBytes: SEGMENT_BYTES });
  const engine = await StoreEngine.open(nodeEnv, path, { clusterId: 'c' });
  t.after(() => engine.close());

  const before = engine.stats().batchesWritten;
  // A callback already due in this turn (as a second socket's data would be) submits the second write...
  const second = new Promise<unknown>((resolve, reject) => {
    setImmediate(() => engine.write(stampedWrite(1, 0, 1, 1, 1, 2)).then(resolve, reject));
  });
  // ...after this one started the writer.
  const first = engine.write(stampedWrite(1, 0, 0, 1, 1, 1));
  await Promise.all([first, second]);
  assert.equal(engine.stats().batchesWritten - before, 1, 'both writes in one batch');
  const { data } = await engine.read(1, 0, 0, 2);
  assert.deepEqual(readStamp(data.subarray(0, 4096)), { volumeId: 1, chunkIndex: 0, block: 0, epoch: 1, seq: 1 });
  assert.deepEqual(readStamp(data.subarray(4096)), { volumeId: 1, chunkIndex: 0, block: 1, epoch: 1, seq: 2 });

  // A write submitted in a later turn gets a batch of its own.
  await engine.write(stampedWrite(1, 0, 2, 1, 1, 3));
  assert.equal(engine.stats().batchesWritten - before, 2);
});

test('in a simulation the writer starts without the clock being advanced', { timeout: 20_000 }, async () => {
  const env = simEnv(3);
  await StoreEngine.format(env, 'sim.img', { sizeBytes: METADATA_AREA_BYTES + SEGMENTS * SEGMENT_BYTES, clusterId: 'c', segmentSizeBytes: SEGMENT_BYTES });
  const engine = await StoreEngine.open(env, 'sim.img', { clusterId: 'c' });
  const before = engine.stats().batchesWritten;
  await Promise.all([engine.write(stampedWrite(1, 0, 0, 1, 1, 1)), engine.write(stampedWrite(1, 0, 1, 1, 1, 2))]);
  assert.equal(engine.stats().batchesWritten - before, 1);
  await engine.close();
});
