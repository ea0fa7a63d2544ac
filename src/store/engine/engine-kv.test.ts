/**
 * Key-value records (the S3 bucket index lives in them): ordered by key bytes per shard, applied
 * by the version rule per key, durable like any record (crash, replay, checkpoint, compaction).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ShaleError } from '../../lib/errors.ts';
import { KiB } from '../../lib/units.ts';
import { StoreEngine } from './engine.ts';
import { METADATA_AREA_BYTES } from './format.ts';
import { simEnv, stampedWrite } from './test-support.ts';

const PATH = '/disks/kv';

function hasCode(code: string) {
  return (error: unknown) => error instanceof ShaleError && error.code === code;
}

const keys = (entries: { key: Buffer }[]) => entries.map((entry) => entry.key.toString('utf8'));

test('kv: put, get, ordered list with prefix, startAfter and limit, delete, version rule', async () => {
  const env = simEnv(1);
  await StoreEngine.format(env, PATH, { sizeBytes: METADATA_AREA_BYTES + 16 * 64 * KiB, clusterId: 'c', segmentSizeBytes: 64 * KiB });
  const engine = await StoreEngine.open(env, PATH, { backgroundCompaction: false });
  const shard = 77;
  for (const [i, key] of ['photos/b.jpg', 'photos/a.jpg', 'docs/readme', 'photos/c/d.png', 'z'].entries()) {
    assert.deepEqual(await engine.kvPut(shard, key, Buffer.from(`value of ${key}`), { epoch: 1, seq: i + 1 }), { applied: true });
  }
  await engine.kvPut(shard + 1, 'photos/other-shard', Buffer.from('x'), { epoch: 1, seq: 1 });
  assert.equal(engine.kvGet(shard, 'docs/readme')?.value.toString(), 'value of docs/readme');
  assert.deepEqual(engine.kvGet(shard, 'photos/a.jpg')?.version, { epoch: 1, seq: 2 });
  assert.equal(engine.kvGet(shard, 'nothing'), undefined);
  assert.deepEqual(keys(engine.kvList(shard)), ['docs/readme', 'photos/a.jpg', 'photos/b.jpg', 'photos/c/d.png', 'z']);
  assert.deepEqual(keys(engine.kvList(shard, { prefix: 'photos/' })), ['photos/a.jpg', 'photos/b.jpg', 'photos/c/d.png']);
  assert.deepEqual(keys(engine.kvList(shard, { prefix: 'photos/', startAfter: 'photos/a.jpg', limit: 1 })), ['photos/b.jpg']);
  // Version rule: older or equal versions are not applied; a newer one is.
  assert.deepEqual(await engine.kvPut(shard, 'z', Buffer.from('old'), { epoch: 1, seq: 1 }), { applied: false });
  assert.deepEqual(await engine.kvPut(shard, 'z', Buffer.from('same'), { epoch: 1, seq: 5 }), { applied: false });
  assert.deepEqual(await engine.kvPut(shard, 'z', Buffer.from('new'), { epoch: 2, seq: 1 }), { applied: true });
  assert.equal(engine.kvGet(shard, 'z')?.value.toString(), 'new');
  // Delete is a versioned tombstone: a late older put does not bring the key back.
  assert.deepEqual(await engine.kvDelete(shard, 'photos/b.jpg', { epoch: 1, seq: 10 }), { applied: true });
  assert.deepEqual(await engine.kvPut(shard, 'photos/b.jpg', Buffer.from('late'), { epoch: 1, seq: 9 }), { applied: false });
  assert.equal(engine.kvGet(shard, 'photos/b.jpg'), undefined);
  assert.deepEqual(keys(engine.kvList(shard, { prefix: 'photos/' })), ['photos/a.jpg', 'photos/c/d.png']);
  // Binary keys order by bytes.
  await engine.kvPut(shard, Buffer.from([0xff, 0x00]), Buffer.alloc(0), { epoch: 1, seq: 1 });
  await engine.kvPut(shard, Buffer.from([0x7f]), Buffer.alloc(3), { epoch: 1, seq: 1 });
  assert.deepEqual(engine.kvList(shard).slice(-2).map((e) => [...e.key]), [[0x7f], [0xff, 0x00]]);
  assert.equal(engine.stats().kvEntries, 7);

  const expect = (e: StoreEngine, label: string) => {
    assert.deepEqual(keys(e.kvList(shard, { prefix: 'photos/' })), ['photos/a.jpg', 'photos/c/d.png'], label);
    assert.equal(e.kvGet(shard, 'z')?.value.toString(), 'new', label);
    assert.equal(e.kvGet(shard, 'photos/b.jpg'), undefined, label);
    assert.equal(e.kvGet(shard + 1, 'photos/other-shard')?.value.toString(), 'x', label);
  };
  // Crash (replay), clean close (checkpoint), compaction of everything, crash again.
  await engine.flush();
  env.disk.crash();
  const replayed = await StoreEngine.open(env, PATH, { backgroundCompaction: false });
  expect(replayed, 'after replay');
  for (let i = 0; i < 20; i++) await replayed.write(stampedWrite(1, 0, (i % 4) * 8, 8, 1, i + 1));
  for (let i = 0; i < 20 && (await replayed.compact()); i++);
  assert.ok(replayed.stats().compactedSegments > 0);
  expect(replayed, 'after compaction');
  await replayed.close();
  const checkpointed = await StoreEngine.open(env, PATH, { backgroundCompaction: false });
  expect(checkpointed, 'after a checkpoint');
  assert.deepEqual(await checkpointed.kvDelete(shard, 'docs/readme', { epoch: 3, seq: 1 }, { fua: true }), { applied: true });
  env.disk.crash();
  const last = await StoreEngine.open(env, PATH, { backgroundCompaction: false });
  expect(last, 'after a fua delete and a crash');
  assert.equal(last.kvGet(shard, 'docs/readme'), undefined);
  // Purging the shard's id drops it.
  await last.purgeVolume(shard);
  assert.deepEqual(last.kvList(shard), []);
  await assert.rejects(last.kvPut(shard, 'a', Buffer.alloc(1), { epoch: 9, seq: 9 }), hasCode('NOT_FOUND'));
  await last.close();
});

test('kv: bad keys, values and limits are refused with INVALID_ARGUMENT', async () => {
  const env = simEnv(2);
  await StoreEngine.format(env, PATH, { sizeBytes: METADATA_AREA_BYTES + 8 * 64 * KiB, clusterId: 'c', segmentSizeBytes: 64 * KiB });
  const engine = await StoreEngine.open(env, PATH, { backgroundCompaction: false });
  const version = { epoch: 1, seq: 1 };
  await assert.rejects(engine.kvPut(1, '', Buffer.alloc(1), version), hasCode('INVALID_ARGUMENT'));
  await assert.rejects(engine.kvPut(1, 'k'.repeat(1025), Buffer.alloc(1), version), hasCode('INVALID_ARGUMENT'));
  await assert.rejects(engine.kvPut(1, 'k', Buffer.alloc(32 * KiB + 1), version), hasCode('INVALID_ARGUMENT'));
  await assert.rejects(engine.kvPut(-1, 'k', Buffer.alloc(1), version), hasCode('INVALID_ARGUMENT'));
  await assert.rejects(engine.kvPut(1, 'k', Buffer.alloc(1), { epoch: 2 ** 32, seq: 1 }), hasCode('INVALID_ARGUMENT'));
  assert.throws(() => engine.kvList(1, { limit: 0 }), hasCode('INVALID_ARGUMENT'));
  // The largest record fits even the smallest segment.
  assert.deepEqual(await engine.kvPut(1, 'k'.repeat(1024), Buffer.alloc(32 * KiB, 7), version), { applied: true });
  assert.equal(engine.kvGet(1, 'k'.repeat(1024))?.value.length, 32 * KiB);
  await engine.close();
});
