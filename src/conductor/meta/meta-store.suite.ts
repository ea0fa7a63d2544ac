/**
 * One test suite for every MetaStore engine (sqlite-meta-store.test.ts and
 * etcd-meta-store.test.ts run it): what the conductor relies on — records round-trip, a throw
 * rolls back, ids are never reused, names are unique, transactions are serializable and run in
 * order, reads see one snapshot, close refuses further use.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { ShaleError } from '../../lib/errors.ts';
import type { MetaStore, PgRecord, PoolRecord, StoreRecord, VolumeRecord } from './meta-store.ts';

export interface MetaStoreFixture {
  /** A fresh, empty store. */
  open(): Promise<MetaStore>;
  /** The same store opened again after close (a restart). */
  reopen(closed: MetaStore): Promise<MetaStore>;
  /** A second handle on the same data while the first is open, if the engine allows several writers. */
  second?(first: MetaStore): Promise<MetaStore>;
}

export function storeRecord(id: number, diskUuid = `disk-${id}`): StoreRecord {
  return {
    id, diskUuid, address: `127.0.0.1:${9000 + id}`, domain: `host-${id}`, state: 'up', stateEpoch: 1,
    capacityBytes: 1000, usedBytes: 10, lastHeartbeatAt: null, disks: [{ uuid: diskUuid, path: '/d', capacityBytes: 1000, usedBytes: 10 }],
  };
}

export function volumeRecord(id: number, name: string, poolId = 1): VolumeRecord {
  return {
    id, name, sizeBytes: 4096, chunkSizeBytes: 4 << 20, poolId, owner: null, ownerEpoch: 0, createdAt: '2024-01-01T00:00:00.000Z',
    snapSeq: 0, parentVolumeId: null, parentSnapshotId: null,
  };
}

export function poolRecord(id: number, name = 'default'): PoolRecord {
  return { id, name, replicas: 3, minReplicas: 2, pgCount: 4, domainLevel: 'host', createdAt: '2024-01-01T00:00:00.000Z' };
}

async function withPool(meta: MetaStore): Promise<void> {
  await meta.write(async (tx) => {
    await tx.putPool(poolRecord(await tx.allocate('poolId')));
  });
}

export function isCode(code: string): (error: unknown) => boolean {
  return (error) => error instanceof ShaleError && error.code === code;
}

export function metaStoreSuite(engine: string, fixture: MetaStoreFixture): void {
  describe(`MetaStore contract: ${engine}`, () => {
    it('round-trips every record kind', async () => {
      const meta = await fixture.open();
      try {
        await withPool(meta);
        const pg3: PgRecord = { poolId: 1, index: 3, epoch: 7, replicas: [{ storeId: 1, state: 'recovering', sinceEpoch: 6 }, { storeId: 2, state: 'down', sinceEpoch: 7 }], lastClean: [2] };
        // An index far from 3 lands in another etcd shard.
        const pg700: PgRecord = { poolId: 1, index: 700, epoch: 2, replicas: [{ storeId: 2, state: 'clean', sinceEpoch: 2 }], lastClean: [] };
        await meta.write(async (tx) => {
          await tx.putCluster({ clusterId: 'c-1', createdAt: 'then' });
          await tx.putStore(storeRecord(1));
          await tx.putStore({ ...storeRecord(2), state: 'down', domain: 'rack=r1,host=h2', lastHeartbeatAt: '2024-05-01T00:00:00.000Z' });
          await tx.putPg(pg700);
          await tx.putPg(pg3);
          await tx.putVolume({ ...volumeRecord(1, 'a'), owner: 'gw', ownerEpoch: 3 });
          await tx.putToken({ name: 'admin', sha256: 'ab'.repeat(32), createdAt: 'now' });
        });
        await meta.read(async (tx) => {
          assert.deepEqual(await tx.cluster(), { clusterId: 'c-1', createdAt: 'then' });
          assert.deepEqual(await tx.store(1), storeRecord(1));
          assert.deepEqual(await tx.storeByDisk('disk-1'), storeRecord(1));
          assert.equal(await tx.storeByDisk('nope'), undefined);
          assert.deepEqual((await tx.stores()).map((s) => [s.id, s.state, s.domain]), [[1, 'up', 'host-1'], [2, 'down', 'rack=r1,host=h2']]);
          assert.deepEqual(await tx.pg(1, 3), pg3);
          assert.deepEqual(await tx.pg(1, 700), pg700);
          assert.equal(await tx.pg(1, 4), undefined);
          assert.deepEqual(await tx.pgs(1), [pg3, pg700]);
          assert.deepEqual(await tx.pool(1), poolRecord(1));
          assert.deepEqual(await tx.poolByName('default'), poolRecord(1));
          assert.deepEqual(await tx.pools(), [poolRecord(1)]);
          assert.deepEqual(await tx.volumeByName('a'), { ...volumeRecord(1, 'a'), owner: 'gw', ownerEpoch: 3 });
          assert.deepEqual(await tx.volumes(), [{ ...volumeRecord(1, 'a'), owner: 'gw', ownerEpoch: 3 }]);
          assert.deepEqual(await tx.token('admin'), { name: 'admin', sha256: 'ab'.repeat(32), createdAt: 'now' });
          assert.equal(await tx.token('other'), undefined);
          assert.equal(await tx.counter('poolId'), 1);
          assert.equal(await tx.counter('storeId'), 0);
        });
        // Records handed out are copies.
        await meta.read(async (tx) => {
          const pg = (await tx.pg(1, 3))!;
          pg.replicas[0]!.state = 'clean';
          assert.equal((await tx.pg(1, 3))!.replicas[0]!.state, 'recovering');
        });
      } finally {
        await meta.close();
      }
    });

    it('sees its own writes inside a transaction, in lists too', async () => {
      const meta = await fixture.open();
      try {
        await withPool(meta);
        await meta.write(async (tx) => {
          await tx.putVolume(volumeRecord(1, 'one'));
          await tx.putVolume(volumeRecord(2, 'two'));
          assert.deepEqual((await tx.volumes()).map((v) => v.name), ['one', 'two']);
          await tx.putVolume({ ...volumeRecord(1, 'renamed') });
          assert.equal(await tx.volumeByName('one'), undefined);
          assert.equal((await tx.volumeByName('renamed'))?.id, 1);
          await tx.deleteVolume(2, { id: 2, name: 'two', deletedAt: 'now', epoch: 1 });
          assert.deepEqual((await tx.volumes()).map((v) => v.name), ['renamed']);
          assert.deepEqual((await tx.deletedVolumes()).map((d) => d.id), [2]);
          assert.equal(await tx.allocate('mapEpoch'), 1);
          assert.equal(await tx.allocate('mapEpoch'), 2);
          assert.equal(await tx.counter('mapEpoch'), 2);
        });
        await meta.read(async (tx) => {
          assert.deepEqual((await tx.volumes()).map((v) => v.name), ['renamed']);
          assert.equal(await tx.volumeByName('two'), undefined);
          assert.equal(await tx.counter('mapEpoch'), 2);
        });
      } finally {
        await meta.close();
      }
    });

    it('rolls a transaction back when its function throws', async () => {
      const meta = await fixture.open();
      try {
        await meta.write(async (tx) => {
          await tx.putStore(storeRecord(await tx.allocate('storeId')));
        });
        await assert.rejects(
          meta.write(async (tx) => {
            await tx.allocate('storeId');
            await tx.putStore(storeRecord(2));
            await tx.allocate('mapEpoch');
            throw new ShaleError('INVALID_ARGUMENT', 'changed my mind');
          }),
          isCode('INVALID_ARGUMENT'),
        );
        await meta.read(async (tx) => {
          assert.equal((await tx.stores()).length, 1);
          assert.equal(await tx.storeByDisk('disk-2'), undefined);
          assert.equal(await tx.counter('storeId'), 1);
          assert.equal(await tx.counter('mapEpoch'), 0);
        });
        // The next transaction works normally.
        assert.equal(await meta.write((tx) => tx.allocate('storeId')), 2);
      } finally {
        await meta.close();
      }
    });

    it('never reuses a volume id or lets a deleted one come back, across a restart, and frees the name', async () => {
      let meta = await fixture.open();
      await withPool(meta);
      const first = await meta.write(async (tx) => {
        const id = await tx.allocate('volumeId');
        await tx.putVolume(volumeRecord(id, 'vol'));
        return id;
      });
      await meta.write((tx) => tx.deleteVolume(first, { id: first, name: 'vol', deletedAt: 'now', epoch: 5 }));
      await meta.close();
      meta = await fixture.reopen(meta);
      try {
        const second = await meta.write(async (tx) => {
          const id = await tx.allocate('volumeId');
          await tx.putVolume(volumeRecord(id, 'vol'));
          return id;
        });
        assert.ok(second > first);
        await meta.read(async (tx) => {
          assert.deepEqual(await tx.deletedVolumes(), [{ id: first, name: 'vol', deletedAt: 'now', epoch: 5 }]);
          assert.equal((await tx.volumeByName('vol'))?.id, second);
        });
        await assert.rejects(meta.write((tx) => tx.putVolume(volumeRecord(first, 'zombie'))), /deleted volume id is never used again/);
        await assert.rejects(meta.write((tx) => tx.deleteVolume(999, { id: 999, name: 'x', deletedAt: 'now', epoch: 1 })), isCode('NOT_FOUND'));
      } finally {
        await meta.close();
      }
    });

    it('refuses a second live volume or pool with the same name', async () => {
      const meta = await fixture.open();
      try {
        await withPool(meta);
        await meta.write((tx) => tx.putVolume(volumeRecord(1, 'x')));
        await assert.rejects(meta.write((tx) => tx.putVolume(volumeRecord(2, 'x'))), isCode('ALREADY_EXISTS'));
        await assert.rejects(meta.write((tx) => tx.putPool(poolRecord(2, 'default'))), isCode('ALREADY_EXISTS'));
        await meta.read(async (tx) => {
          assert.equal((await tx.volumes()).length, 1);
          assert.equal((await tx.pools()).length, 1);
        });
      } finally {
        await meta.close();
      }
    });

    it('runs the transactions of one process one at a time, in order', async () => {
      const meta = await fixture.open();
      try {
        const order: number[] = [];
        await Promise.all([1, 2, 3, 4, 5].map(() => meta.write(async (tx) => {
          const value = await tx.allocate('mapEpoch');
          await new Promise((resolve) => setTimeout(resolve, 1));
          order.push(value);
        })));
        assert.deepEqual(order, [1, 2, 3, 4, 5]);
      } finally {
        await meta.close();
      }
    });

    it('gives a read transaction one snapshot while writes commit', async () => {
      const meta = await fixture.open();
      try {
        await meta.write(async (tx) => {
          await tx.allocate('storeId');
        });
        let writeDone: Promise<unknown> | undefined;
        const seen = await meta.read(async (tx) => {
          const before = await tx.counter('storeId');
          writeDone = meta.write(async (wtx) => {
            await wtx.allocate('storeId');
            await wtx.putStore(storeRecord(2));
          });
          await new Promise((resolve) => setTimeout(resolve, 50));
          return { before, after: await tx.counter('storeId'), stores: (await tx.stores()).length };
        });
        await writeDone;
        assert.deepEqual(seen, { before: 1, after: 1, stores: 0 });
        assert.equal(await meta.read((tx) => tx.counter('storeId')), 2);
      } finally {
        await meta.close();
      }
    });

    it('keeps snapshots per volume: round trip, unique names, delete, gone with their volume', async () => {
      const meta = await fixture.open();
      try {
        await withPool(meta);
        const snapshot = (volumeId: number, id: number, name: string) => ({
          volumeId, id, name, state: 'live' as const, sizeBytes: 4096, createdAt: '2024-01-02T00:00:00.000Z',
        });
        await meta.write(async (tx) => {
          await tx.putVolume({ ...volumeRecord(1, 'a'), snapSeq: 2 });
          await tx.putVolume({ ...volumeRecord(2, 'clone'), parentVolumeId: 1, parentSnapshotId: 2 });
          await tx.putSnapshot({ ...snapshot(1, 1, 's1'), state: 'creating' });
          await tx.putSnapshot(snapshot(1, 2, 's2'));
          await tx.putSnapshot(snapshot(2, 1, 's1'));
          assert.deepEqual((await tx.snapshots(1)).map((s) => s.name), ['s1', 's2']);
        });
        await meta.read(async (tx) => {
          assert.deepEqual(await tx.snapshot(1, 1), { ...snapshot(1, 1, 's1'), state: 'creating' });
          assert.deepEqual((await tx.allSnapshots()).map((s) => [s.volumeId, s.id]), [[1, 1], [1, 2], [2, 1]]);
          assert.deepEqual(await tx.volume(2), { ...volumeRecord(2, 'clone'), parentVolumeId: 1, parentSnapshotId: 2 });
          assert.equal((await tx.volume(1))!.snapSeq, 2);
        });
        await assert.rejects(meta.write((tx) => tx.putSnapshot(snapshot(1, 3, 's2'))), isCode('ALREADY_EXISTS'));
        await assert.rejects(meta.write((tx) => tx.deleteSnapshot(1, 9)), isCode('NOT_FOUND'));
        await meta.write(async (tx) => {
          await tx.putSnapshot(snapshot(1, 1, 's1'));
          await tx.deleteSnapshot(1, 2);
          await tx.deleteVolume(2, { id: 2, name: 'clone', deletedAt: 'now', epoch: 1 });
        });
        await meta.read(async (tx) => {
          assert.deepEqual((await tx.snapshots(1)).map((s) => [s.id, s.state]), [[1, 'live']]);
          assert.deepEqual(await tx.snapshots(2), []);
          assert.equal(await tx.snapshot(1, 2), undefined);
        });
      } finally {
        await meta.close();
      }
    });

    it('rejects use after close with SHUTTING_DOWN', async () => {
      const meta = await fixture.open();
      await meta.close();
      await assert.rejects(meta.write((tx) => tx.allocate('mapEpoch')), isCode('SHUTTING_DOWN'));
      await meta.close();
    });

    it('keeps S3 accounts, access keys and buckets; ranges of ids never overlap', async () => {
      const meta = await fixture.open();
      try {
        await meta.write(async (tx) => {
          await tx.putAccount({ name: 'alice', createdAt: 't1' });
          await tx.putAccount({ name: 'bob', createdAt: 't2' });
          await tx.putAccessKey({ accessKey: 'AKALICE', secretKey: 'secret/with+chars', account: 'alice', createdAt: 't1' });
          await tx.putAccessKey({ accessKey: 'AKBOB', secretKey: 's2', account: 'bob', createdAt: 't2' });
          await tx.putBucket({ id: await tx.allocate('bucketId'), name: 'photos', account: 'alice', poolId: 1, shardCount: 4, publicRead: false, createdAt: 't3' });
          await tx.putBucket({ id: await tx.allocate('bucketId'), name: 'a.b-c', account: 'bob', poolId: 1, shardCount: 1, publicRead: true, createdAt: 't4' });
        });
        await meta.close();
        const reopened = await fixture.reopen(meta);
        try {
          await reopened.read(async (tx) => {
            assert.deepEqual((await tx.accounts()).map((account) => account.name), ['alice', 'bob']);
            assert.deepEqual(await tx.accessKey('AKALICE'), { accessKey: 'AKALICE', secretKey: 'secret/with+chars', account: 'alice', createdAt: 't1' });
            assert.equal(await tx.accessKey('AKNONE'), undefined);
            assert.deepEqual((await tx.accessKeys()).map((key) => key.accessKey), ['AKALICE', 'AKBOB']);
            assert.deepEqual(await tx.bucket('photos'), { id: 1, name: 'photos', account: 'alice', poolId: 1, shardCount: 4, publicRead: false, createdAt: 't3' });
            assert.deepEqual((await tx.buckets()).map((bucket) => [bucket.name, bucket.id, bucket.publicRead]), [['a.b-c', 2, true], ['photos', 1, false]]);
          });
          assert.equal(await reopened.write((tx) => tx.deleteAccessKey('AKBOB')), true);
          assert.equal(await reopened.write((tx) => tx.deleteAccessKey('AKBOB')), false);
          assert.equal(await reopened.write((tx) => tx.deleteBucket('photos')), true);
          assert.equal(await reopened.read((tx) => tx.bucket('photos')), undefined);
          const first = await reopened.write((tx) => tx.allocateRange('s3DataId', 1000));
          const second = await reopened.write((tx) => tx.allocateRange('s3DataId', 10));
          const single = await reopened.write((tx) => tx.allocate('s3DataId'));
          assert.deepEqual([first, second, single], [1, 1001, 1011]);
          // The bucket id counter is not reused after a delete.
          assert.equal(await reopened.write((tx) => tx.allocate('bucketId')), 3);
        } finally {
          await reopened.close();
        }
      } catch (error) {
        await meta.close().catch(() => {});
        throw error;
      }
    });

    if (fixture.second) {
      it('serializes writers in different processes: no lost update, no id handed out twice', async () => {
        const meta = await fixture.open();
        const other = await fixture.second!(meta);
        try {
          const ids = await Promise.all(Array.from({ length: 20 }, (_, i) => (i % 2 === 0 ? meta : other).write(async (tx) => {
            const id = await tx.allocate('volumeId');
            await new Promise((resolve) => setTimeout(resolve, Math.floor(Math.random() * 3)));
            return id;
          }, { unguarded: true })));
          assert.deepEqual([...ids].sort((a, b) => a - b), Array.from({ length: 20 }, (_, i) => i + 1));
          assert.equal(await other.read((tx) => tx.counter('volumeId')), 20);
        } finally {
          await other.close();
          await meta.close();
        }
      });
    }
  });
}
