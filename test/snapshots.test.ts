/**
 * Snapshots and clones end to end on a cluster in one process (conductor on SQLite, three store
 * daemons on files, the client library): crash-consistent creation while writes run, reads at a
 * snapshot after overwrites, delete, clone read-through, rollback, flatten, diff.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { SnapshotView } from '../src/client/snapshot-view.ts';
import { startLocalCluster, type LocalCluster } from './harness.ts';

const MiB = 1024 * 1024;

describe('snapshots on a cluster in one process', () => {
  let cluster: LocalCluster;
  before(async () => {
    cluster = await startLocalCluster();
  });
  after(async () => {
    await cluster?.close();
  });

  test('a snapshot keeps what was written before it; the volume moves on', async () => {
    assert.equal((await cluster.call('POST', '/volumes', { name: 'base', size: 16 * MiB, chunkSize: '1M' })).status, 201);
    const gateway = await cluster.client('gw-base');
    const volume = await gateway.openVolume('base');
    const before = randomBytes(16 * MiB);
    await volume.write(0, before.subarray(0, 8 * MiB));
    await volume.write(8 * MiB, before.subarray(8 * MiB));
    await volume.writeZeroes(4 * MiB, MiB);
    before.fill(0, 4 * MiB, 5 * MiB);
    const created = await cluster.call('POST', '/volumes/base/snapshots', { name: 's1' });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    assert.equal(created.body.state, 'live');
    assert.equal(created.body.id, 1);
    const after = Buffer.from(before);
    const overwrite = randomBytes(3 * MiB);
    overwrite.copy(after, 2 * MiB);
    await volume.write(2 * MiB, overwrite);
    await volume.writeZeroes(10 * MiB, 2 * MiB);
    after.fill(0, 10 * MiB, 12 * MiB);
    assert.ok((await volume.read(0, 16 * MiB)).equals(after));
    const reader = await cluster.client('reader');
    const view = await SnapshotView.open(reader, 'base', 's1');
    const seen = Buffer.alloc(16 * MiB);
    for (let at = 0; at < 16 * MiB; at += 4 * MiB) (await view.read(at, 4 * MiB)).copy(seen, at);
    assert.ok(seen.equals(before), 'the snapshot reads the bytes written before it');
    // Block status of the snapshot: the trimmed MiB is a hole, the rest data.
    assert.deepEqual((await view.blockStatus(4 * MiB, MiB)).map((e) => [e.lengthBytes, e.hole]), [[MiB, true]]);
    assert.deepEqual((await view.blockStatus(3 * MiB, MiB)).map((e) => [e.lengthBytes, e.hole]), [[MiB, false]]);

    const second = await cluster.call('POST', '/volumes/base/snapshots', { name: 's2' });
    assert.equal(second.body.id, 2);
    assert.equal((await cluster.call('POST', '/volumes/base/snapshots', { name: 's2' })).body.code, 'ALREADY_EXISTS');
    const list = await cluster.call('GET', '/volumes/base/snapshots');
    assert.deepEqual(list.body.snapshots.map((s: { name: string; id: number }) => [s.name, s.id]), [['s1', 1], ['s2', 2]]);
    assert.equal((await cluster.call('DELETE', '/volumes/base/snapshots/s1')).status, 200);
    await assert.rejects(SnapshotView.open(reader, 'base', 's1'), (error: { code?: string }) => error.code === 'NOT_FOUND');
    const third = await cluster.call('POST', '/volumes/base/snapshots', { name: 's1' });
    assert.equal(third.body.id, 3, 'snapshot ids are never reused');
    const view2 = await SnapshotView.open(reader, 'base', 's2');
    assert.ok((await view2.read(0, 4 * MiB)).equals(after.subarray(0, 4 * MiB)));
  });

  test('every write acknowledged before snapshot create is in it, none started after it returned, while writes run', async () => {
    assert.equal((await cluster.call('POST', '/volumes', { name: 'busy', size: 4 * MiB, chunkSize: '1M' })).status, 201);
    const gateway = await cluster.client('gw-busy');
    const volume = await gateway.openVolume('busy');
    const blocks = 1024;
    const acknowledged = new Uint32Array(blocks);
    let stop = false;
    let counter = 0;
    const writers = Array.from({ length: 8 }, async () => {
      while (!stop) {
        const block = Math.floor(Math.random() * blocks);
        const value = ++counter;
        const data = Buffer.alloc(4096);
        data.writeUInt32LE(value, 0);
        await volume.write(block * 4096, data);
        if (acknowledged[block]! < value) acknowledged[block] = value;
      }
    });
    await new Promise((resolve) => setTimeout(resolve, 300));
    const floor = Uint32Array.from(acknowledged);
    const created = await cluster.call('POST', '/volumes/busy/snapshots', { name: 'mid' });
    assert.equal(created.body.state, 'live', JSON.stringify(created.body));
    const ceiling = counter;
    await new Promise((resolve) => setTimeout(resolve, 200));
    stop = true;
    await Promise.all(writers);
    const view = await SnapshotView.open(await cluster.client('reader-busy'), 'busy', 'mid');
    const image = await view.read(0, 4 * MiB);
    for (let block = 0; block < blocks; block++) {
      const value = image.readUInt32LE(block * 4096);
      assert.ok(value >= floor[block]!, `block ${block}: ${value} is older than the acknowledged ${floor[block]}`);
      assert.ok(value <= ceiling, `block ${block}: ${value} was written after the snapshot returned (${ceiling})`);
    }
  });
});
