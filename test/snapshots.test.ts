/**
 * Snapshots and clones end to end on a cluster in one process (conductor on SQLite, three store
 * daemons on files, the client library): crash-consistent creation while writes run, reads at a
 * snapshot after overwrites, delete, clone read-through, rollback, flatten, diff.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { SnapshotView } from '../src/client/snapshot-view.ts';
import { placementGroupOf } from '../src/lib/placement-hash.ts';
import { decodeReadReply, Op } from '../src/proto/store-protocol.ts';
import { diffVolume, flattenVolume, rollbackVolume, volumeUsage } from '../src/client/volume-ops.ts';
import { startLocalCluster, waitFor, type LocalCluster } from './harness.ts';

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

  test('clones read through to their parent, clones of clones too; zero tombstones stop the read-through; flatten copies the rest in', async () => {
    assert.equal((await cluster.call('POST', '/volumes', { name: 'gold', size: 8 * MiB, chunkSize: '1M' })).status, 201);
    const gateway = await cluster.client('gw-gold');
    const gold = await gateway.openVolume('gold');
    const golden = randomBytes(8 * MiB);
    golden.fill(0, 6 * MiB, 7 * MiB); // never written: absent in the parent
    await gold.write(0, golden.subarray(0, 6 * MiB));
    await gold.write(7 * MiB, golden.subarray(7 * MiB));
    await gold.close();
    // No owner: the conductor takes the snapshot directly.
    const snap = await cluster.call('POST', '/volumes/gold/snapshots', { name: 'v1' });
    assert.equal(snap.body.state, 'live');
    const clone = await cluster.call('POST', '/volumes/gold/snapshots/v1/clone', { name: 'vm1' });
    assert.equal(clone.status, 201, JSON.stringify(clone.body));
    assert.equal(clone.body.parent.volume, 'gold');
    assert.equal(clone.body.parent.snapshot, 'v1');

    const client = await cluster.client('gw-vm1');
    const vm1 = await client.openVolume('vm1');
    assert.ok((await vm1.read(0, 8 * MiB)).equals(golden), 'a fresh clone reads its parent');
    const model = Buffer.from(golden);
    const own = randomBytes(MiB);
    await vm1.write(MiB + 4096, own);
    own.copy(model, MiB + 4096);
    await vm1.write(100, Buffer.from('unaligned'));
    Buffer.from('unaligned').copy(model, 100);
    await vm1.writeZeroes(3 * MiB, MiB);
    model.fill(0, 3 * MiB, 4 * MiB);
    assert.ok((await vm1.read(0, 8 * MiB)).equals(model), 'own writes, trims and read-through agree');
    // Block status: a hole only where the block reads as zeros through the whole chain.
    assert.deepEqual((await vm1.blockStatus(3 * MiB, MiB)).map((e) => e.hole), [true], 'trimmed in the clone');
    assert.deepEqual((await vm1.blockStatus(5 * MiB, MiB)).map((e) => e.hole), [false], 'data in the parent only');
    assert.deepEqual((await vm1.blockStatus(6 * MiB, MiB)).map((e) => e.hole), [true], 'nowhere in the chain');
    // The parent never changes.
    const goldReader = await SnapshotView.open(await cluster.client('reader-gold'), 'gold', 'v1');
    assert.ok((await goldReader.read(0, 8 * MiB)).equals(golden));

    // A clone of the clone.
    assert.equal((await cluster.call('POST', '/volumes/vm1/snapshots', { name: 'c1' })).body.state, 'live');
    assert.equal((await cluster.call('POST', '/volumes/vm1/snapshots/c1/clone', { name: 'vm2' })).status, 201);
    const vm2 = await (await cluster.client('gw-vm2')).openVolume('vm2');
    assert.ok((await vm2.read(0, 8 * MiB)).equals(model), 'a clone of a clone reads through two levels');
    await vm1.write(5 * MiB, Buffer.alloc(MiB, 7));
    assert.ok((await vm2.read(0, 8 * MiB)).equals(model), 'a clone never sees its parent change');

    // Deleting what clones read through is refused.
    assert.equal((await cluster.call('DELETE', '/volumes/gold/snapshots/v1')).body.code, 'IN_USE');
    assert.equal((await cluster.call('DELETE', '/volumes/vm1/snapshots/c1')).body.code, 'IN_USE');
    assert.equal((await cluster.call('DELETE', '/volumes/gold')).body.code, 'IN_USE');

    // A clone with snapshots of its own is not flattened: they read through to the parent too.
    assert.equal((await cluster.call('POST', '/volumes/vm1/snapshots', { name: 'mine' })).status, 201);
    await vm1.close();
    await assert.rejects(flattenVolume(await cluster.client('cli-vm1'), 'vm1'), (error: { code?: string }) => error.code === 'IN_USE');
    // Flatten vm2 (refused while open), then the snapshot it read through can go.
    await assert.rejects(flattenVolume(await cluster.client('cli-busy'), 'vm2'), (error: { code?: string }) => error.code === 'IN_USE');
    await vm2.close();
    const cli = await cluster.client('cli-flatten');
    const progress: number[] = [];
    const flattened = await flattenVolume(cli, 'vm2', (done) => progress.push(done));
    assert.ok(flattened.copiedBytes > 0);
    assert.equal(progress[progress.length - 1], 8 * MiB);
    assert.equal((await cluster.call('GET', '/volumes/vm2')).body.parent, null);
    assert.equal((await cluster.call('DELETE', '/volumes/vm1/snapshots/c1')).status, 200);
    const vm2Again = await (await cluster.client('gw-vm2-again')).openVolume('vm2');
    assert.ok((await vm2Again.read(0, 8 * MiB)).equals(model), 'a flattened clone keeps its bytes');
    await vm2Again.close();
  });

  test('rollback brings back the snapshot, refused while open; diff lists what changed', async () => {
    assert.equal((await cluster.call('POST', '/volumes', { name: 'rb', size: 8 * MiB, chunkSize: '1M' })).status, 201);
    const gateway = await cluster.client('gw-rb');
    const rb = await gateway.openVolume('rb');
    const original = randomBytes(8 * MiB);
    original.fill(0, 2 * MiB, 3 * MiB);
    await rb.write(0, original.subarray(0, 2 * MiB));
    await rb.write(3 * MiB, original.subarray(3 * MiB));
    assert.equal((await cluster.call('POST', '/volumes/rb/snapshots', { name: 'good' })).body.state, 'live');
    await rb.write(MiB, Buffer.alloc(8192, 1));
    await rb.write(2 * MiB + 4096, Buffer.alloc(4096, 2));
    await rb.writeZeroes(5 * MiB, MiB);
    const diff = await diffVolume(await cluster.client('cli-diff'), 'rb', 'good', undefined);
    assert.deepEqual(diff.ranges, [
      { offsetBytes: MiB, lengthBytes: 8192 }, { offsetBytes: 2 * MiB + 4096, lengthBytes: 4096 }, { offsetBytes: 5 * MiB, lengthBytes: MiB },
    ]);
    await assert.rejects(rollbackVolume(await cluster.client('cli-rb-busy'), 'rb', 'good'), (error: { code?: string }) => error.code === 'IN_USE');
    await rb.close();
    const result = await rollbackVolume(await cluster.client('cli-rb'), 'rb', 'good');
    assert.equal(result.changedBytes, 8192 + 4096 + MiB);
    const after = await (await cluster.client('gw-rb-2')).openVolume('rb');
    assert.ok((await after.read(0, 8 * MiB)).equals(original), 'the volume reads as the snapshot did');
    assert.deepEqual((await after.blockStatus(2 * MiB, MiB)).map((e) => e.hole), [true], 'a block absent at the snapshot is a hole again');
    await after.close();
  });

  test('thin provisioning: usage counts written blocks and what each snapshot alone keeps; pools report overcommit', async () => {
    assert.equal((await cluster.call('POST', '/volumes', { name: 'thin', size: '1T' })).status, 201);
    const volume = await (await cluster.client('gw-thin')).openVolume('thin');
    await volume.write(0, randomBytes(MiB));
    await volume.write(512 * 1024 * MiB, randomBytes(64 * 1024));
    await cluster.call('POST', '/volumes/thin/snapshots', { name: 'a' });
    await volume.write(0, randomBytes(256 * 1024)); // the snapshot alone keeps the old 256 KiB
    await volume.writeZeroes(MiB - 128 * 1024, 128 * 1024);
    await volume.close();
    const usage = await volumeUsage(await cluster.client('cli-usage'), 'thin');
    assert.equal(usage.provisionedBytes, 1024 * 1024 * MiB);
    assert.equal(usage.writtenBytes, MiB - 128 * 1024 + 64 * 1024);
    assert.equal(usage.zeroBytes, 128 * 1024);
    assert.deepEqual(usage.snapshots.map((s) => [s.name, s.exclusiveBytes, s.sharedBytes]), [['a', 256 * 1024 + 128 * 1024, MiB - 384 * 1024 + 64 * 1024]]);
    assert.equal(usage.rawBytes, (usage.writtenBytes + 384 * 1024) * 3);
    const pools = (await cluster.call('GET', '/pools')).body.pools as { provisionedBytes: number; usableBytes: number; overcommitRatio: number }[];
    assert.ok(pools[0]!.provisionedBytes >= 1024 * 1024 * MiB);
    assert.ok(pools[0]!.overcommitRatio > 1000, `a 1 TiB volume on 3 × 256 MiB disks is overcommitted (${pools[0]!.overcommitRatio})`);
  });

  test('every replica stamps a write with the snap seq it carried, and READ replies carry the stamp for copies to keep', async () => {
    assert.equal((await cluster.call('POST', '/volumes', { name: 'stamps', size: 4 * MiB, chunkSize: '1M' })).status, 201);
    const gateway = await cluster.client('gw-stamps');
    const volume = await gateway.openVolume('stamps');
    await volume.write(0, Buffer.alloc(8192, 1));
    await cluster.call('POST', '/volumes/stamps/snapshots', { name: 'one' });
    await cluster.call('POST', '/volumes/stamps/snapshots', { name: 'two' });
    await volume.write(4096, Buffer.alloc(4096, 2));
    const map = gateway.map;
    const pool = map.pools.find((candidate) => candidate.id === volume.info.poolId)!;
    const pgId = placementGroupOf(volume.info.id, 0, pool.pgCount);
    const pg = pool.pgs[pgId]!;
    assert.equal(pg.replicas.length, 3);
    for (const replica of pg.replicas) {
      const reply = await gateway.channel(replica.storeId).request({
        op: Op.READ, volumeId: volume.info.id, chunkIndex: 0, poolId: pool.id, pgId, pgCount: pool.pgCount, pgEpoch: pg.epoch, offsetBlocks: 0, countBlocks: 2,
      });
      const read = decodeReadReply(reply.payload, 2);
      assert.deepEqual([...read.stamps], [0, 2], `store ${replica.storeId}: the first block predates both snapshots, the second was written under seq 2`);
    }
    await volume.close();
  });

  test('an owner that never acknowledges: the snapshot waits; a gateway taking the volume over acknowledges it', async () => {
    assert.equal((await cluster.call('POST', '/volumes', { name: 'hung', size: 4 * MiB, chunkSize: '1M' })).status, 201);
    const writer = await (await cluster.client('gw-writer')).openVolume('hung');
    await writer.write(0, Buffer.alloc(MiB, 0x11));
    await writer.close();
    // A gateway opens the volume and dies: it owns the volume and will never acknowledge anything.
    assert.equal((await cluster.call('POST', '/volumes/hung/open', { owner: 'ghost' })).status, 200);
    const pending = cluster.call('POST', '/volumes/hung/snapshots', { name: 'pending' });
    await new Promise((resolve) => setTimeout(resolve, 300));
    const listed = await cluster.call('GET', '/volumes/hung/snapshots/pending');
    assert.equal(listed.body.state, 'creating', 'not readable before the owner switched');
    await assert.rejects(SnapshotView.open(await cluster.client('reader-hung'), 'hung', 'pending'), (error: { code?: string }) => error.code === 'NOT_READY');
    // Another gateway takes the volume over: it fences the old owner, reconciles, then acknowledges.
    const taken = await (await cluster.client('gw-rescuer')).openVolume('hung', { takeover: true });
    const created = await pending;
    assert.equal(created.status, 201, JSON.stringify(created.body));
    assert.equal(created.body.state, 'live');
    await taken.write(0, Buffer.alloc(MiB, 0x33));
    const view = await SnapshotView.open(await cluster.client('reader-hung-2'), 'hung', 'pending');
    assert.ok((await view.read(0, MiB)).equals(Buffer.alloc(MiB, 0x11)));
    assert.ok((await taken.read(0, MiB)).equals(Buffer.alloc(MiB, 0x33)));
    await taken.close();
  });

  test('deleting a snapshot has every store trim the versions only it kept', async () => {
    assert.equal((await cluster.call('POST', '/volumes', { name: 'trim', size: 4 * MiB, chunkSize: '1M' })).status, 201);
    const volume = await (await cluster.client('gw-trim')).openVolume('trim');
    const kept = (): number[] => cluster.stores.map((store) => (store.engine.stats() as unknown as { snapshotVersions: number }).snapshotVersions);
    const before = kept();
    await volume.write(0, Buffer.alloc(MiB, 1));
    await cluster.call('POST', '/volumes/trim/snapshots', { name: 'old' });
    await volume.write(0, Buffer.alloc(MiB, 2));
    const during = kept();
    for (let i = 0; i < during.length; i++) assert.equal(during[i]! - before[i]!, 256, `store ${i} keeps the 256 overwritten blocks for the snapshot`);
    assert.equal((await cluster.call('DELETE', '/volumes/trim/snapshots/old')).status, 200);
    await waitFor('every store to trim', async () => kept().every((count, i) => count === before[i]), 10_000, 50);
    assert.ok((await volume.read(0, MiB)).equals(Buffer.alloc(MiB, 2)));
    await volume.close();
  });
});

describe('thin provisioning on small disks', () => {
  let cluster: LocalCluster;
  before(async () => {
    cluster = await startLocalCluster({ diskSizeBytes: 96 * MiB, pgCount: 8 });
  });
  after(async () => {
    await cluster?.close();
  });

  test('an overcommitted volume fills the disks: writes fail with NO_SPACE, acknowledged data and snapshots read back intact', async () => {
    assert.equal((await cluster.call('POST', '/volumes', { name: 'big', size: '1G' })).status, 201);
    const pools = (await cluster.call('GET', '/pools')).body.pools as { overcommitRatio: number }[];
    assert.ok(pools[0]!.overcommitRatio > 3, `1 GiB on 96 MiB disks is overcommitted (${pools[0]!.overcommitRatio})`);
    const volume = await (await cluster.client('gw-big')).openVolume('big');
    const first = randomBytes(8 * MiB);
    await volume.write(0, first);
    assert.equal((await cluster.call('POST', '/volumes/big/snapshots', { name: 'early' })).status, 201);
    const written: Buffer[] = [];
    let failure: { code?: string } | undefined;
    for (let i = 0; i < 200 && !failure; i++) {
      const data = randomBytes(MiB);
      try {
        await volume.write((16 + i) * MiB, data);
        written.push(data);
      } catch (error) {
        failure = error as { code?: string };
      }
    }
    assert.equal(failure?.code, 'NO_SPACE', `the disks fill up: ${JSON.stringify(failure)}`);
    assert.ok(written.length > 3, `${written.length} MiB were written before the disks filled`);
    for (let i = 0; i < written.length; i++) assert.ok((await volume.read((16 + i) * MiB, MiB)).equals(written[i]!), `acknowledged MiB ${i} reads back`);
    assert.ok((await volume.read(0, 8 * MiB)).equals(first));
    const view = await SnapshotView.open(await cluster.client('reader-big'), 'big', 'early');
    assert.ok((await view.read(0, 8 * MiB)).equals(first), 'the snapshot reads back');
    // TRIM still works on a full disk (tombstones use the reserve) and reads as zeros.
    await volume.writeZeroes(16 * MiB, 4 * MiB);
    assert.ok((await volume.read(16 * MiB, 4 * MiB)).equals(Buffer.alloc(4 * MiB)));
    await volume.close();
  });
});
