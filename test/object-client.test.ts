/**
 * The object client on a real cluster in one process (conductor with SQLite, three store daemons
 * with log engines, real sockets): S3 data objects in their own namespace, key-value records
 * merged over replicas, reads that fail over past a replica missing data, data ids that never
 * repeat, and the S3 gateway's collector freeing replaced data after the grace period.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ClusterClient } from '../src/client/cluster-client.ts';
import { DATA_CHUNK_BYTES, ObjectClient } from '../src/client/object-client.ts';
import { startConductor, type Conductor } from '../src/conductor/conductor.ts';
import { nodeEnv } from '../src/env/node/node-env.ts';
import { ShaleError } from '../src/lib/errors.ts';
import { placementGroupOf } from '../src/lib/placement-hash.ts';
import { Namespace, Op } from '../src/proto/store-protocol.ts';
import { StoreChannel } from '../src/proto/store-channel.ts';
import { ObjectStore } from '../src/s3/object-store.ts';
import { openLogEngine } from '../src/store/open-engine.ts';
import { startStoreDaemon, type StoreDaemon } from '../src/store/store-daemon.ts';
import { temporaryDirectory, waitFor } from './harness.ts';

const MiB = 1024 * 1024;
const quiet = (): void => {};

describe('object client on a cluster in one process', () => {
  const dir = temporaryDirectory('objects');
  let conductor: Conductor;
  let api: string;
  const stores: StoreDaemon[] = [];
  let cluster: ClusterClient;
  let objects: ObjectClient;
  let poolId: number;

  before(async () => {
    conductor = await startConductor(nodeEnv, { metaPath: join(dir.path, 'meta.db'), listen: '127.0.0.1:0', heartbeatTimeoutMs: 1500, defaultReplicas: 3, pgCount: 16 });
    api = `http://${conductor.address}`;
    for (let index = 0; index < 3; index++) {
      stores.push(await startStoreDaemon(nodeEnv, {
        diskPath: join(dir.path, `disk-${index}.img`), diskSizeBytes: 256 * MiB, format: true, listen: '127.0.0.1:0',
        conductorUrls: api, domain: `d${index}`, log: quiet, openEngine: openLogEngine, resyncRateBytesPerSecond: 0,
      }));
    }
    await waitFor('the default pool', async () => {
      const response = await fetch(`${api}/api/v1/pools`);
      return ((await response.json()) as { pools: unknown[] }).pools.length > 0;
    });
    cluster = new ClusterClient(nodeEnv, { conductorUrls: api, ownerId: 'objects-test', requestTimeoutMs: 5000, log: quiet });
    await cluster.start();
    objects = new ObjectClient(cluster, { ioTimeoutMs: 10_000 });
    poolId = cluster.map.pools[0]!.id;
  });

  after(async () => {
    await cluster?.close().catch(() => {});
    for (const store of stores) await store.close().catch(() => {});
    await conductor?.close();
    dir.remove();
  });

  test('data ids come from the conductor in ranges and never repeat', async () => {
    const ids = new Set<number>();
    for (let i = 0; i < 600; i++) ids.add(await objects.newDataId());
    assert.equal(ids.size, 600);
    const other = new ObjectClient(cluster);
    const more = await other.newDataId();
    assert.ok(!ids.has(more), 'a second client gets a fresh range');
  });

  test('a data chunk is on every replica, in its own namespace, and reads back checked', async () => {
    const dataId = await objects.newDataId();
    const data = randomBytes(DATA_CHUNK_BYTES - 1000);
    await objects.writeChunk(poolId, dataId, 0, data);
    const back = await objects.readChunk(poolId, dataId, 0, 0, Math.ceil(data.length / 4096));
    assert.ok(back.subarray(0, data.length).equals(data));
    assert.ok(back.subarray(data.length).equals(Buffer.alloc(back.length - data.length)), 'the tail is zero padding');
    // Every replica of the chunk's PG holds it; the same id read as a block volume holds nothing.
    const map = cluster.map;
    const pool = map.pools.find((entry) => entry.id === poolId)!;
    const pgId = placementGroupOf(dataId, 0, pool.pgCount);
    const pg = pool.pgs[pgId]!;
    assert.equal(pg.replicas.length, 3);
    for (const replica of pg.replicas) {
      const address = map.stores.find((store) => store.id === replica.storeId)!.address;
      const channel = new StoreChannel(nodeEnv, address, { timeoutMs: 5000 });
      const states = async (namespace: number) => (await channel.request({
        op: Op.BLOCK_STATES, namespace, volumeId: dataId, chunkIndex: 0, poolId, pgId, pgCount: pool.pgCount, pgEpoch: pg.epoch, offsetBlocks: 0, countBlocks: 4,
      })).payload;
      assert.deepEqual([...(await states(Namespace.S3_DATA))], [1, 1, 1, 1], `store ${replica.storeId} has the data`);
      assert.deepEqual([...(await states(Namespace.VOLUME))], [0, 0, 0, 0], `store ${replica.storeId}: namespaces do not meet`);
      channel.close();
    }
    // A chunk that was never written is not returned as zeros: reading it fails, at once (no
    // replica has it, and no map to come would bring it), long before the client's I/O timeout.
    const started = Date.now();
    await assert.rejects(new ObjectClient(cluster, { ioTimeoutMs: 10_000 }).readChunk(poolId, dataId + 1_000_000, 0, 0, 1),
      (error: unknown) => error instanceof ShaleError && error.code === 'CHECKSUM' && /missing/.test(error.message));
    assert.ok(Date.now() - started < 5000, `failed at once (${Date.now() - started} ms)`);
  });

  test('key-value records: version rule, ordered listing with prefix and start-after, merged over replicas', async () => {
    const shard = 12_345;
    const put = (key: string, value: string, seq: number) => objects.kvPut(poolId, shard, Buffer.from(key), Buffer.from(value), { epoch: 1, seq });
    await put('photos/b', 'B', 10);
    await put('photos/a', 'A', 11);
    await put('docs/x', 'X', 12);
    await put('photos/b', 'old', 5);
    assert.equal((await objects.kvGet(poolId, shard, Buffer.from('photos/b')))?.value.toString(), 'B', 'an older version is not applied');
    await put('photos/b', 'B2', 20);
    assert.equal((await objects.kvGet(poolId, shard, Buffer.from('photos/b')))?.value.toString(), 'B2');
    const listed = await objects.kvList(poolId, shard, { prefix: Buffer.from('photos/'), limit: 10 });
    assert.deepEqual(listed.map((record) => record.key.toString()), ['photos/a', 'photos/b']);
    const after = await objects.kvList(poolId, shard, { startAfter: Buffer.from('docs/x'), limit: 1 });
    assert.deepEqual(after.map((record) => record.key.toString()), ['photos/a']);
    await objects.kvDelete(poolId, shard, Buffer.from('photos/a'), { epoch: 1, seq: 30 });
    assert.equal(await objects.kvGet(poolId, shard, Buffer.from('photos/a')), undefined);
    // One replica holds an older value (as if it missed a write): reads still see the newest.
    const map = cluster.map;
    const pool = map.pools.find((entry) => entry.id === poolId)!;
    const pgId = placementGroupOf(shard, 0, pool.pgCount);
    const pg = pool.pgs[pgId]!;
    const lagging = map.stores.find((store) => store.id === pg.replicas[1]!.storeId)!;
    const channel = new StoreChannel(nodeEnv, lagging.address, { timeoutMs: 5000 });
    const key = Buffer.from('only/on/one');
    const payload = [Buffer.from([key.length, 0]), key, Buffer.from('newest')];
    await channel.request({ op: Op.KV_PUT, namespace: Namespace.S3_INDEX, volumeId: shard, poolId, pgId, pgCount: pool.pgCount, pgEpoch: pg.epoch, ownerEpoch: 2, versionSeq: 1 }, payload);
    channel.close();
    assert.equal((await objects.kvGet(poolId, shard, key))?.value.toString(), 'newest');
    assert.ok((await objects.kvList(poolId, shard, { prefix: Buffer.from('only/'), limit: 5 })).some((record) => record.value.toString() === 'newest'));
  });

  test('object store: a replaced object\'s data is freed only after the grace period', async () => {
    const store = new ObjectStore(nodeEnv, objects, { graceMs: 1500 });
    const bucket = { id: 77, name: 'grace', poolId, shardCount: 2 };
    const first = randomBytes(3 * MiB);
    async function* once(data: Buffer) {
      yield data;
    }
    const written = await store.writeData(bucket, once(first));
    await store.commit(bucket, 'k', { v: 1, size: first.length, etag: 'e1', lastModified: new Date().toISOString(), parts: [[written.dataId, written.size]] }, [written.dataId]);
    const manifest = (await store.head(bucket, 'k'))!;
    const second = randomBytes(1000);
    const replacement = await store.writeData(bucket, once(second));
    await store.commit(bucket, 'k', { v: 1, size: second.length, etag: 'e2', lastModified: new Date().toISOString(), parts: [[replacement.dataId, replacement.size]] }, [replacement.dataId]);
    // A reader holding the old manifest still reads the old bytes: nothing is freed yet.
    assert.equal(await store.collect(bucket, 86_400_000), 0);
    const old: Buffer[] = [];
    for await (const data of store.read(bucket, manifest, 0, manifest.size)) old.push(Buffer.from(data));
    assert.ok(Buffer.concat(old).equals(first));
    await new Promise((resolve) => setTimeout(resolve, 1700));
    assert.equal(await store.collect(bucket, 86_400_000), 1);
    await assert.rejects(new ObjectClient(cluster, { ioTimeoutMs: 1000 }).readChunk(poolId, written.dataId, 0, 0, 1), (error: unknown) => error instanceof ShaleError);
    const current: Buffer[] = [];
    const now = (await store.head(bucket, 'k'))!;
    for await (const data of store.read(bucket, now, 0, now.size)) current.push(Buffer.from(data));
    assert.ok(Buffer.concat(current).equals(second));
  });

  test('a write waits out a stopped store: it is marked down and the write completes on the rest', async () => {
    const dataId = await objects.newDataId();
    await stores[2]!.close();
    const data = randomBytes(256 * 1024);
    await objects.writeChunk(poolId, dataId, 0, data);
    const back = await objects.readChunk(poolId, dataId, 0, 0, 64);
    assert.ok(back.equals(data));
  });
});
