/**
 * A store whose disk fails. The failure is injected under one store's engine, into its real disk
 * file: once switched on, every write fails as on a full host file system (ENOSPC), every sync as
 * on a failing device (EIO), or every read of what was written before (EIO, as bad sectors).
 * - A write or sync that fails breaks the engine (DISK_FAILED from then on). A 3-replica volume's
 *   writes and FLUSHes go on with the other two replicas: the client reports the store down, in a
 *   committed map epoch, before it acknowledges without it, and the store does not register again.
 *   A 1-replica volume has no other copy: its write or FLUSH fails at once with the disk's error,
 *   rather than waiting for a store that will not come back by itself. S3 data writes alike.
 * - A store whose engine broke with no client there to meet it reports itself down, unless a PG
 *   needs it (a 1-replica store stays up for reads).
 * - A read that fails is read from another replica and the blocks rewritten on the failing store;
 *   a scrub finds and repairs them too. With no good copy anywhere, the read fails at once.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, describe, test } from 'node:test';
import type { DiskFile, Env } from '../src/env/env.ts';
import { DATA_CHUNK_BYTES, ObjectClient } from '../src/client/object-client.ts';
import type { VolumeClient } from '../src/client/volume-client.ts';
import { nodeEnv } from '../src/env/node/node-env.ts';
import { codeOf } from '../src/lib/errors.ts';
import { findBlock, flipBit, startLocalCluster, waitFor, type LocalCluster } from './harness.ts';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

/**
 * An environment whose disk files fail on demand: every write while `fail.writes` (as a full host
 * file system does, ENOSPC), every sync while `fail.syncs` (as a failing device does, EIO), every
 * read below `fail.readsBelow` bytes (as bad sectors do, EIO; `writtenEnd()` says how far writes went).
 */
function failingDisk(): {
  env: Env; fail: { writes: boolean; syncs: boolean; readsBelow: number }; writtenEnd: () => number;
  failedWrites: () => number; failedSyncs: () => number; failedReads: () => number;
} {
  const state = { writes: false, syncs: false, readsBelow: 0 };
  let failedWrites = 0;
  let failedSyncs = 0;
  let failedReads = 0;
  let writtenEnd = 0;
  const noSpace = (): Error => {
    failedWrites++;
    return Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC', errno: -28, syscall: 'write' });
  };
  const unreadable = (): Error => {
    failedReads++;
    return Object.assign(new Error('EIO: i/o error, read'), { code: 'EIO', errno: -5, syscall: 'read' });
  };
  const wrote = (buffers: readonly Buffer[], offsetBytes: number): void => {
    let end = offsetBytes;
    for (const buffer of buffers) end += buffer.length;
    if (end > writtenEnd) writtenEnd = end;
  };
  const wrap = (file: DiskFile): DiskFile => ({
    path: file.path,
    sizeBytes: file.sizeBytes,
    read: (target, offsetBytes) => (offsetBytes < state.readsBelow ? Promise.reject(unreadable()) : file.read(target, offsetBytes)),
    readNow: file.readNow && ((target, offsetBytes) => {
      if (offsetBytes < state.readsBelow) throw unreadable();
      return file.readNow!(target, offsetBytes);
    }),
    writev: (buffers, offsetBytes) => {
      if (state.writes) return Promise.reject(noSpace());
      wrote(buffers, offsetBytes);
      return file.writev(buffers, offsetBytes);
    },
    writevNow: file.writevNow && ((buffers, offsetBytes) => {
      if (state.writes) throw noSpace();
      wrote(buffers, offsetBytes);
      return file.writevNow!(buffers, offsetBytes);
    }),
    sync: () => {
      if (!state.syncs) return file.sync();
      failedSyncs++;
      return Promise.reject(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO', errno: -5, syscall: 'fdatasync' }));
    },
    close: () => file.close(),
  });
  const env: Env = { ...nodeEnv, disk: { ...nodeEnv.disk, open: async (path, options) => wrap(await nodeEnv.disk.open(path, options)) } };
  return { env, fail: state, writtenEnd: () => writtenEnd, failedWrites: () => failedWrites, failedSyncs: () => failedSyncs, failedReads: () => failedReads };
}

/** A store's state in the conductor's map. */
async function storeState(cluster: LocalCluster, storeId: number): Promise<string> {
  return (await cluster.call('GET', '/stores')).body.stores.find((store: { id: number }) => store.id === storeId).state;
}

describe('a store whose disk fails', () => {
  const clusters: LocalCluster[] = [];
  after(async () => {
    for (const cluster of clusters) await cluster.close();
  });

  /** A cluster of `stores` stores, store `failingIndex`'s disk on a failing disk, and an open volume of `replicas` replicas. */
  async function volumeWithFailingStore(stores: number, failingIndex: number, replicas: number): Promise<{ cluster: LocalCluster; disk: ReturnType<typeof failingDisk>; failing: LocalCluster['stores'][number]; volume: VolumeClient }> {
    const disk = failingDisk();
    const cluster = await startLocalCluster({ stores, envFor: (index) => (index === failingIndex ? disk.env : undefined) });
    clusters.push(cluster);
    const name = `vol-${clusters.length}`;
    assert.equal((await cluster.call('POST', '/volumes', { name, size: SIZE, replicas })).status, 201);
    const gateway = await cluster.client(`gw-${name}`);
    return { cluster, disk, failing: cluster.stores[failingIndex]!, volume: await gateway.openVolume(name) };
  }

  test('3 replicas: writes go on with the other two, the store is reported down and stays down', async () => {
    const { cluster, disk, failing, volume } = await volumeWithFailingStore(3, 1, 3);

    const before = randomBytes(SIZE / 2);
    await volume.write(0, before);
    disk.fail.writes = true;
    // Every PG has a replica on each of the 3 stores: every chunk written reaches the failing disk.
    const during = randomBytes(SIZE / 2);
    await volume.write(SIZE / 2, during);
    assert.ok(disk.failedWrites() > 0, 'the failing store was asked to write');
    assert.equal(codeOf(failing.engine.failure()), 'DISK_FAILED', `the engine says why it stopped: ${failing.engine.failure()?.message}`);
    assert.match(failing.engine.failure()!.message, /file system holding the disk file is full/);

    assert.equal(await storeState(cluster, failing.storeId), 'down', 'reported down before the write was acknowledged without it');
    assert.ok((await volume.read(0, SIZE)).equals(Buffer.concat([before, during])), 'the volume reads back every acknowledged write');
    await volume.flush();

    // Heartbeats now answer NOT_FOUND; a store whose disk failed must not register again.
    await new Promise((resolve) => setTimeout(resolve, 2500));
    assert.equal(await storeState(cluster, failing.storeId), 'down', 'still down after more than one heartbeat period');
    const again = randomBytes(64 * 1024);
    await volume.write(0, again);
    assert.ok((await volume.read(0, again.length)).equals(again), 'writes still work');
  });

  test('1 replica: the write fails at once with DISK_FAILED, and reads still answer', async () => {
    const { cluster, disk, volume } = await volumeWithFailingStore(1, 0, 1);
    const data = randomBytes(MiB);
    await volume.write(0, data);
    disk.fail.writes = true;
    const started = Date.now();
    await assert.rejects(volume.write(MiB, randomBytes(MiB)), (error: unknown) => codeOf(error) === 'DISK_FAILED');
    assert.ok(Date.now() - started < 5000, `failed at once, not after waiting (${Date.now() - started} ms)`);
    assert.ok((await volume.read(0, MiB)).equals(data), 'what was written before still reads');
    assert.equal((await cluster.call('GET', '/stores')).body.stores[0].state, 'up', 'not reported down: no other replica could take the write');
    // Nor does the store take itself down: it holds the only copy, and keeps answering reads.
    await new Promise((resolve) => setTimeout(resolve, 2000));
    assert.equal((await cluster.call('GET', '/stores')).body.stores[0].state, 'up', 'still up after more than two heartbeat periods');
    assert.ok((await volume.read(0, MiB)).equals(data), 'and still reads');
  });

  test('3 replicas: a FLUSH whose sync fails on one store finishes on the other two, which hold every write', async () => {
    const { cluster, disk, failing, volume } = await volumeWithFailingStore(3, 2, 3);

    const data = randomBytes(SIZE / 4);
    await volume.write(0, data);
    disk.fail.syncs = true;
    const more = randomBytes(SIZE / 4);
    await volume.write(SIZE / 4, more);
    await volume.flush();
    assert.ok(disk.failedSyncs() > 0, 'the failing store was asked to sync');
    assert.equal(codeOf(failing.engine.failure()), 'DISK_FAILED', `the engine says why it stopped: ${failing.engine.failure()?.message}`);
    assert.equal(await storeState(cluster, failing.storeId), 'down', 'reported down before the FLUSH was acknowledged without it');
    assert.ok((await volume.read(0, SIZE / 2)).equals(Buffer.concat([data, more])), 'the volume reads back every acknowledged write');
  });

  test('1 replica: a FLUSH whose sync fails answers DISK_FAILED at once', async () => {
    const { cluster, disk, volume } = await volumeWithFailingStore(1, 0, 1);
    await volume.write(0, randomBytes(MiB));
    disk.fail.syncs = true;
    const started = Date.now();
    await assert.rejects(volume.flush(), (error: unknown) => codeOf(error) === 'DISK_FAILED' && /fdatasync/.test((error as Error).message));
    assert.ok(Date.now() - started < 5000, `failed at once, not after waiting (${Date.now() - started} ms)`);
    assert.equal((await cluster.call('GET', '/stores')).body.stores[0].state, 'up', 'not reported down: no other replica holds the writes');
  });

  test('3 replicas: blocks one store\'s disk cannot read are read from another and rewritten on it', async () => {
    const { disk, failing, volume } = await volumeWithFailingStore(3, 1, 3);
    const PIECE = 64 * 1024;
    const data = randomBytes(16 * PIECE);
    await volume.write(0, data);
    await volume.flush();
    // Everything the store has written so far turns unreadable; what it writes from now on reads.
    disk.fail.readsBelow = disk.writtenEnd();
    // Each range read three times in a row: round robin asks each of the three replicas once.
    const readEachRangeOnEveryReplica = async (): Promise<void> => {
      for (let at = 0; at < data.length; at += PIECE) {
        for (let turn = 0; turn < 3; turn++) {
          assert.ok((await volume.read(at, PIECE)).equals(data.subarray(at, at + PIECE)), `range ${at} reads back`);
        }
      }
    };
    await readEachRangeOnEveryReplica();
    assert.ok(disk.failedReads() > 0, 'the failing store was asked to read');
    assert.equal(failing.engine.failure(), undefined, 'a failed read does not stop the engine');
    await waitFor('every range repaired', async () => volume.repairs >= data.length / PIECE, 10_000);
    const failedBefore = disk.failedReads();
    await readEachRangeOnEveryReplica();
    assert.equal(disk.failedReads(), failedBefore, 'the store reads every range from where the repair wrote it');
  });

  test('1 replica: a read of a block the disk cannot read, or of one that fails its checksum, fails at once', async () => {
    const { cluster, disk, volume } = await volumeWithFailingStore(1, 0, 1);
    const rotten = randomBytes(4096);
    await volume.write(0, Buffer.concat([randomBytes(64 * 1024), rotten]));
    await volume.flush();
    // Rot: one bit flipped in the only copy of the block at 64 KiB.
    flipBit(`${cluster.dir}/disk-0.img`, findBlock(`${cluster.dir}/disk-0.img`, rotten) + 100);
    const failsWithin = async (read: Promise<Buffer>, code: string): Promise<void> => {
      const started = Date.now();
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<never>((_resolve, reject) => {
        timer = setTimeout(() => reject(new Error('still waiting after 5 s')), 5000);
      });
      try {
        await assert.rejects(Promise.race([read, timeout]), (error: unknown) => codeOf(error) === code);
      } finally {
        clearTimeout(timer);
      }
      assert.ok(Date.now() - started < 5000, `failed at once (${Date.now() - started} ms)`);
    };
    await failsWithin(volume.read(64 * 1024, 4096), 'CHECKSUM');
    assert.equal(disk.failedReads(), 0);
    // Bad sectors: everything written so far unreadable.
    disk.fail.readsBelow = disk.writtenEnd();
    await failsWithin(volume.read(0, 4096), 'DISK_FAILED');
    assert.ok(disk.failedReads() > 0, 'the store was asked to read');
  });

  test('3 replicas: a scrub finds the blocks one store\'s disk cannot read and rewrites them from a good copy', async () => {
    const { cluster, disk, failing, volume } = await volumeWithFailingStore(3, 1, 3);
    const data = randomBytes(MiB);
    await volume.write(0, data);
    await volume.flush();
    disk.fail.readsBelow = disk.writtenEnd();
    const blocks = data.length / 4096;

    const storeScrub = await cluster.call('POST', `/stores/${failing.storeId}/scrub`);
    assert.equal(storeScrub.status, 200, JSON.stringify(storeScrub.body));
    assert.equal(storeScrub.body.badBlocks, blocks, `the store's own scrub reports every block bad: ${JSON.stringify(storeScrub.body)}`);
    assert.equal(storeScrub.body.unreadableBlocks, blocks, 'and unreadable');

    const scrub = await cluster.call('POST', `/scrub?volume=${volume.info.name}`);
    assert.equal(scrub.status, 200, JSON.stringify(scrub.body));
    assert.equal(scrub.body.pgsSkipped, 0, JSON.stringify(scrub.body.errors));
    assert.equal(scrub.body.repairedBlocks, blocks, JSON.stringify(scrub.body));
    assert.deepEqual(scrub.body.repairedByStore, [{ storeId: failing.storeId, blocks }]);
    const again = await cluster.call('POST', `/scrub?volume=${volume.info.name}`);
    assert.equal(again.body.inconsistentBlocks, 0, `a second scrub finds nothing: ${JSON.stringify(again.body)}`);
    assert.equal((await cluster.call('POST', `/stores/${failing.storeId}/scrub`)).body.badBlocks, 0, 'the store reads every block where the repair wrote it');
    assert.equal(failing.engine.failure(), undefined, 'failed reads do not stop the engine');
  });

  test('a store whose disk fails with no client write to meet it reports itself down', async () => {
    const disk = failingDisk();
    // Missed heartbeats would take a minute to mark the store down: within the test's wait, only its own report can.
    const cluster = await startLocalCluster({ stores: 3, envFor: (index) => (index === 1 ? disk.env : undefined), heartbeatTimeoutMs: 60_000, heartbeatIntervalMs: 200 });
    clusters.push(cluster);
    const failing = cluster.stores[1]!;
    disk.fail.writes = true;
    // Something in the store meets the failure: here a fence record it writes for itself; in life compaction, a checkpoint, a resync.
    await assert.rejects(failing.engine.fence(999, 1), (error: unknown) => codeOf(error) === 'DISK_FAILED');
    await waitFor('the store reported down', async () => (await storeState(cluster, failing.storeId)) === 'down', 5000);
    const listed = (await cluster.call('GET', '/stores')).body.stores.find((store: { id: number }) => store.id === failing.storeId);
    assert.match(listed.downReason, new RegExp(`^reported by store ${failing.storeId}: its disk failed: .*ENOSPC`), 'the store list says why');
    assert.ok(cluster.stores.every((store) => store === failing || store.engine.failure() === undefined), 'the other stores are fine');
    const up = (await cluster.call('GET', '/stores')).body.stores.filter((store: { state: string }) => store.state === 'up').length;
    assert.equal(up, 2, 'the other two stay up');
  });

  test('S3 data: a chunk written while one store\'s disk fails lands on the other two', async () => {
    const disk = failingDisk();
    const cluster = await startLocalCluster({ stores: 3, envFor: (index) => (index === 0 ? disk.env : undefined) });
    clusters.push(cluster);
    const gateway = await cluster.client('s3-disk-failure');
    const objects = new ObjectClient(gateway, { ioTimeoutMs: 10_000 });
    const poolId = gateway.map.pools[0]!.id;
    const failing = cluster.stores[0]!;
    disk.fail.writes = true;
    const dataId = await objects.newDataId();
    const data = randomBytes(DATA_CHUNK_BYTES);
    await objects.writeChunk(poolId, dataId, 0, data);
    assert.ok(disk.failedWrites() > 0, 'the failing store was asked to write');
    assert.equal(await storeState(cluster, failing.storeId), 'down', 'reported down before the chunk was acknowledged without it');
    assert.ok((await objects.readChunk(poolId, dataId, 0, 0, DATA_CHUNK_BYTES / 4096)).equals(data), 'the chunk reads back from the other two');
  });
});
