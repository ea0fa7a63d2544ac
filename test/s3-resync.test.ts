/**
 * Resync of S3 data and index (docs/healing.md, docs/s3.md), on a real cluster in one process
 * (conductor with SQLite, store daemons with log engines, real sockets):
 *   - a store that was stopped while S3 data chunks were written and freed and index records were
 *     put, overwritten and deleted comes back, resyncs to clean, and then holds exactly what the
 *     others hold: every chunk's blocks with their versions, every record with its version,
 *     delete tombstones too;
 *   - a 4th store joins, takes PGs (rebalance) and holds the S3 data and index of those PGs.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ClusterClient } from '../src/client/cluster-client.ts';
import { ObjectClient } from '../src/client/object-client.ts';
import { startConductor, type Conductor } from '../src/conductor/conductor.ts';
import { nodeEnv } from '../src/env/node/node-env.ts';
import { placementGroupOf } from '../src/lib/placement-hash.ts';
import { BlockState, decodeReadReply, encodeKvKey, engineObjectId, Flag, Namespace, Op } from '../src/proto/store-protocol.ts';
import { StoreChannel } from '../src/proto/store-channel.ts';
import { openLogEngine } from '../src/store/open-engine.ts';
import { startStoreDaemon, type StoreDaemon } from '../src/store/store-daemon.ts';
import { temporaryDirectory, waitFor } from './harness.ts';

const MiB = 1024 * 1024;
const quiet = (): void => {};
const PG_COUNT = 16;

interface Chunk {
  dataId: number;
  data: Buffer;
  freed: boolean;
}

describe('resync of S3 data and index', () => {
  const dir = temporaryDirectory('s3-resync');
  let conductor: Conductor;
  let api: string;
  const stores: (StoreDaemon | undefined)[] = [];
  let cluster: ClusterClient;
  let objects: ObjectClient;
  let poolId: number;
  const chunks: Chunk[] = [];
  /** shard → key → expected value (undefined: deleted). */
  const records = new Map<number, Map<string, string | undefined>>();
  const shards = [101, 202, 303, 404, 505, 606];
  let seq = 0;

  const startStore = async (index: number): Promise<StoreDaemon> => {
    const daemon = await startStoreDaemon(nodeEnv, {
      diskPath: join(dir.path, `disk-${index}.img`), diskSizeBytes: 256 * MiB, format: true, listen: '127.0.0.1:0',
      conductorUrls: api, domain: `d${index}`, log: quiet, openEngine: openLogEngine, resyncRateBytesPerSecond: 0,
    });
    stores[index] = daemon;
    return daemon;
  };

  const writeChunks = async (count: number): Promise<void> => {
    for (let i = 0; i < count; i++) {
      const dataId = await objects.newDataId();
      const data = randomBytes(64 * 1024 + i * 4096);
      await objects.writeChunk(poolId, dataId, 0, data);
      chunks.push({ dataId, data, freed: false });
    }
  };

  const put = async (shard: number, key: string, value: string): Promise<void> => {
    await objects.kvPut(poolId, shard, Buffer.from(key), Buffer.from(value), { epoch: 1, seq: ++seq });
    if (!records.has(shard)) records.set(shard, new Map());
    records.get(shard)!.set(key, value);
  };

  const remove = async (shard: number, key: string): Promise<void> => {
    await objects.kvDelete(poolId, shard, Buffer.from(key), { epoch: 1, seq: ++seq });
    records.get(shard)!.set(key, undefined);
  };

  const allClean = (): boolean => cluster.map.pools[0]!.pgs.every((pg) => pg.replicas.every((replica) => replica.state === 'clean'));

  /** What a store's engine holds of a chunk: per block state, version and data. */
  const chunkOn = async (store: StoreDaemon, chunk: Chunk): Promise<{ states: number[]; versions: string[]; data: Buffer }> => {
    const blocks = Math.ceil(chunk.data.length / 4096);
    const read = await store.engine.read(engineObjectId(Namespace.S3_DATA, chunk.dataId), 0, 0, blocks);
    return { states: [...read.states], versions: Array.from({ length: blocks }, (_, i) => `${read.epochs[i]}.${read.seqs[i]}`), data: read.data };
  };

  /** Every record (tombstones too) of a shard on a store, with versions. */
  const shardOn = (store: StoreDaemon, shard: number): string[] =>
    store.engine.kvRecords(engineObjectId(Namespace.S3_INDEX, shard)).map((record) => `${record.key}=${record.value?.toString() ?? '<deleted>'}@${record.version.epoch}.${record.version.seq}`);

  const holders = (dataId: number): number[] => {
    const pool = cluster.map.pools[0]!;
    return pool.pgs[placementGroupOf(dataId, 0, pool.pgCount)]!.replicas.map((replica) => replica.storeId);
  };

  const storeById = (storeId: number): StoreDaemon => stores.find((store) => store?.storeId === storeId)!;

  /** Every replica of each chunk's and shard's PG holds the same thing, and it is what was written. */
  const checkReplicas = async (): Promise<void> => {
    for (const chunk of chunks) {
      const ids = holders(chunk.dataId);
      assert.equal(ids.length, 3);
      const copies = await Promise.all(ids.map((id) => chunkOn(storeById(id), chunk)));
      for (const [i, copy] of copies.entries()) {
        const blocks = copy.states.length;
        assert.deepEqual(copy.states, new Array(blocks).fill(chunk.freed ? BlockState.ZERO : BlockState.DATA), `data ${chunk.dataId} on store ${ids[i]}`);
        assert.deepEqual(copy.versions, copies[0]!.versions, `versions of data ${chunk.dataId} on store ${ids[i]}`);
        if (!chunk.freed) assert.ok(copy.data.equals(chunk.data), `bytes of data ${chunk.dataId} on store ${ids[i]}`);
      }
    }
    for (const [shard, expected] of records) {
      const ids = holders(shard);
      const copies = ids.map((id) => shardOn(storeById(id), shard));
      for (const [i, copy] of copies.entries()) assert.deepEqual(copy, copies[0], `records of shard ${shard} on store ${ids[i]}`);
      const live = new Map(storeById(ids[0]!).engine.kvRecords(engineObjectId(Namespace.S3_INDEX, shard)).map((record) => [record.key.toString(), record.value?.toString()]));
      assert.deepEqual(live, expected, `shard ${shard} holds what was written`);
    }
  };

  before(async () => {
    conductor = await startConductor(nodeEnv, { metaPath: join(dir.path, 'meta.db'), listen: '127.0.0.1:0', heartbeatTimeoutMs: 1500, defaultReplicas: 3, pgCount: PG_COUNT });
    api = `http://${conductor.address}`;
    for (let index = 0; index < 3; index++) await startStore(index);
    await waitFor('the default pool', async () => {
      const response = await fetch(`${api}/api/v1/pools`);
      return ((await response.json()) as { pools: unknown[] }).pools.length > 0;
    });
    cluster = new ClusterClient(nodeEnv, { conductorUrls: api, ownerId: 's3-resync-test', requestTimeoutMs: 5000, log: quiet });
    await cluster.start();
    objects = new ObjectClient(cluster, { ioTimeoutMs: 15_000 });
    poolId = cluster.map.pools[0]!.id;
  });

  after(async () => {
    await cluster?.close().catch(() => {});
    for (const store of stores) await store?.close().catch(() => {});
    await conductor?.close();
    dir.remove();
  });

  test('a store back from an outage receives the S3 data chunks and index records (puts, overwrites, deletes) written while it was away', async () => {
    await writeChunks(6);
    for (const shard of shards) for (const key of ['a', 'b', 'c', 'd']) await put(shard, `${key}/${shard}`, `v1 of ${key}`);

    const away = stores[2]!;
    const awayId = away.storeId;
    await away.close();
    stores[2] = undefined;
    const mapBefore = cluster.map.epoch;
    // While it is away: new chunks (the first write reports it down), one old chunk freed, records overwritten, deleted, added.
    await writeChunks(12);
    assert.equal(cluster.map.stores.find((store) => store.id === awayId)?.state, 'down');
    assert.ok(cluster.map.epoch > mapBefore);
    await objects.freeChunk(poolId, chunks[0]!.dataId, 0, Math.ceil(chunks[0]!.data.length / 4096));
    chunks[0]!.freed = true;
    for (const shard of shards) {
      await put(shard, `a/${shard}`, 'v2 of a');
      await remove(shard, `b/${shard}`);
      await put(shard, `e/${shard}`, 'v1 of e');
    }

    const back = await startStore(2);
    assert.equal(back.storeId, awayId, 'the same store comes back');
    await waitFor('the returned store to be recovering somewhere', async () =>
      cluster.map.pools[0]!.pgs.some((pg) => pg.replicas.some((replica) => replica.storeId === awayId && replica.state === 'recovering')) || undefined, 30_000, 50)
      .catch(() => undefined); // it may be clean again already
    await waitFor('every replica clean', async () => allClean() || undefined, 30_000);
    assert.ok(back.resyncer.kvRecordsCopied >= shards.length * 3, `records copied: ${back.resyncer.kvRecordsCopied}`);

    await checkReplicas();

    // Straight to the returned store over the protocol: a chunk written while it was away, and a deleted record.
    const pool = cluster.map.pools[0]!;
    const late = chunks.find((chunk) => !chunk.freed && chunk !== chunks[0] && holders(chunk.dataId).includes(awayId) && chunks.indexOf(chunk) >= 6)!;
    const channel = new StoreChannel(nodeEnv, back.address, { timeoutMs: 5000 });
    try {
      const pgId = placementGroupOf(late.dataId, 0, pool.pgCount);
      const blocks = Math.ceil(late.data.length / 4096);
      const reply = await channel.request({
        op: Op.READ, flags: Flag.REPAIR, namespace: Namespace.S3_DATA, volumeId: late.dataId, chunkIndex: 0, poolId, pgId, pgCount: pool.pgCount, pgEpoch: pool.pgs[pgId]!.epoch, offsetBlocks: 0, countBlocks: blocks,
      });
      const read = decodeReadReply(reply.payload, blocks);
      assert.ok(read.data.subarray(0, late.data.length).equals(late.data), 'the chunk written while the store was away reads back from it');
      const shard = shards.find((candidate) => holders(candidate).includes(awayId))!;
      const shardPg = placementGroupOf(shard, 0, pool.pgCount);
      const get = async (key: string) => channel.request({
        op: Op.KV_GET, namespace: Namespace.S3_INDEX, volumeId: shard, poolId, pgId: shardPg, pgCount: pool.pgCount, pgEpoch: pool.pgs[shardPg]!.epoch,
      }, encodeKvKey(Buffer.from(key)));
      assert.equal((await get(`b/${shard}`)).header.countBlocks, 0, 'the record deleted while it was away is deleted there');
      assert.equal((await get(`a/${shard}`)).payload.toString(), 'v2 of a', 'the record overwritten while it was away has the new value there');
      assert.equal((await get(`e/${shard}`)).payload.toString(), 'v1 of e', 'the record added while it was away is there');
    } finally {
      channel.close();
    }
  });

  test('a 4th store takes PGs and holds their S3 data and index', async () => {
    const before = new Map(cluster.map.pools[0]!.pgs.map((pg, index) => [index, pg.replicas.map((replica) => replica.storeId).join(',')]));
    const joined = await startStore(3);
    await waitFor('the new store to take PGs and every replica to be clean', async () => {
      const pool = cluster.map.pools[0]!;
      const taken = pool.pgs.some((pg) => pg.replicas.some((replica) => replica.storeId === joined.storeId));
      return taken && allClean() && pool.pgs.every((pg) => pg.replicas.length === 3) || undefined;
    }, 60_000);
    const moved = cluster.map.pools[0]!.pgs.filter((pg, index) => pg.replicas.map((replica) => replica.storeId).join(',') !== before.get(index));
    assert.ok(moved.length > 0, 'PGs moved');
    const onNew = chunks.filter((chunk) => holders(chunk.dataId).includes(joined.storeId));
    const shardsOnNew = shards.filter((shard) => holders(shard).includes(joined.storeId));
    assert.ok(onNew.length + shardsOnNew.length > 0, 'the new store holds some S3 PG');
    await checkReplicas();
  });
});
