/**
 * The consistency rules of DESIGN §3 on a real cluster in one process: a conductor with SQLite,
 * three store daemons with log engines on files, and client libraries — real sockets, no mocks.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ClusterClient } from '../src/client/cluster-client.ts';
import { startConductor, type Conductor } from '../src/conductor/conductor.ts';
import { nodeEnv } from '../src/env/node/node-env.ts';
import { crc32c } from '../src/lib/crc32c.ts';
import { ShaleError } from '../src/lib/errors.ts';
import { placementGroupOf } from '../src/lib/placement-hash.ts';
import { StoreChannel } from '../src/proto/store-channel.ts';
import { decodeReadReply, Flag, Op } from '../src/proto/store-protocol.ts';
import { openLogEngine } from '../src/store/open-engine.ts';
import { startStoreDaemon, type StoreDaemon } from '../src/store/store-daemon.ts';
import { findBlock, flipBit, temporaryDirectory, waitFor } from './harness.ts';

const MiB = 1024 * 1024;
const quiet = (): void => {};

describe('a cluster in one process', () => {
  const dir = temporaryDirectory('cluster');
  let conductor: Conductor;
  let api: string;
  const stores: (StoreDaemon | undefined)[] = [];
  const clients: ClusterClient[] = [];

  const startStore = async (index: number, resyncRateBytesPerSecond = 0): Promise<StoreDaemon> => {
    const daemon = await startStoreDaemon(nodeEnv, {
      diskPath: join(dir.path, `disk-${index}.img`), diskSizeBytes: 256 * MiB, format: true, listen: '127.0.0.1:0',
      conductorUrls: api, domain: `d${index}`, log: quiet, openEngine: openLogEngine, resyncRateBytesPerSecond,
    });
    stores[index] = daemon;
    return daemon;
  };

  const client = async (ownerId: string): Promise<ClusterClient> => {
    const created = new ClusterClient(nodeEnv, { conductorUrls: api, ownerId, requestTimeoutMs: 5000, log: quiet });
    await created.start();
    clients.push(created);
    return created;
  };

  before(async () => {
    conductor = await startConductor(nodeEnv, { metaPath: join(dir.path, 'meta.db'), listen: '127.0.0.1:0', heartbeatTimeoutMs: 1500, defaultReplicas: 3, pgCount: 32 });
    api = `http://${conductor.address}`;
    for (let index = 0; index < 3; index++) await startStore(index);
    await waitFor('the default pool', async () => {
      const response = await fetch(`${api}/api/v1/pools`);
      return ((await response.json()) as { pools: unknown[] }).pools.length > 0;
    });
  });

  after(async () => {
    for (const created of clients) await created.close().catch(() => {});
    for (const daemon of stores) await daemon?.close().catch(() => {});
    await conductor?.close();
    dir.remove();
  });

  const createVolume = async (name: string, size: number): Promise<void> => {
    const response = await fetch(`${api}/api/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name, size }) });
    assert.equal(response.status, 201, await response.text());
  };

  test('unaligned writes read back exactly, across chunk boundaries', async () => {
    await createVolume('bytes', 16 * MiB);
    const gateway = await client('gw-bytes');
    const volume = await gateway.openVolume('bytes');
    const model = Buffer.alloc(16 * MiB);
    for (let i = 0; i < 40; i++) {
      const length = 1 + Math.floor(Math.random() * 20_000);
      const offset = Math.floor(Math.random() * (model.length - length));
      const data = randomBytes(length);
      data.copy(model, offset);
      await volume.write(offset, data);
    }
    await volume.writeZeroes(4 * MiB - 100, 9000);
    model.fill(0, 4 * MiB - 100, 4 * MiB - 100 + 9000);
    assert.ok((await volume.read(0, model.length)).equals(model), 'the volume equals the model');
    await assert.rejects(volume.read(16 * MiB - 10, 11), (error: unknown) => error instanceof ShaleError && error.code === 'OUT_OF_RANGE');
    await assert.rejects(volume.write(-1, Buffer.alloc(1)), (error: unknown) => error instanceof ShaleError && error.code === 'INVALID_ARGUMENT');
  });

  test('a volume grown while open takes its new size from the map, online', async () => {
    await createVolume('grow', 4 * MiB);
    const volume = await (await client('gw-grow')).openVolume('grow');
    await assert.rejects(volume.write(6 * MiB, Buffer.alloc(4096, 1)), (error: unknown) => error instanceof ShaleError && error.code === 'OUT_OF_RANGE');
    const response = await fetch(`${api}/api/v1/volumes/grow`, { method: 'PATCH', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ size: '8M' }) });
    assert.equal(response.status, 200, await response.text());
    await waitFor('the new size', async () => volume.info.sizeBytes === 8 * MiB, 10_000, 20);
    await volume.write(6 * MiB, Buffer.alloc(4096, 1));
    assert.ok((await volume.read(6 * MiB, 4096)).equals(Buffer.alloc(4096, 1)));
  });

  test('a takeover fences the old owner on every store: its writes fail with FENCED and never land', async () => {
    await createVolume('fenced', 8 * MiB);
    const first = await (await client('gw-a')).openVolume('fenced');
    await first.write(0, Buffer.alloc(4096, 1));
    // Without --takeover a second gateway is refused.
    const second = await client('gw-b');
    await assert.rejects(second.openVolume('fenced'), (error: unknown) => error instanceof ShaleError);
    const taken = await second.openVolume('fenced', { takeover: true });
    assert.ok(taken.ownerEpoch > first.ownerEpoch);
    await assert.rejects(first.write(0, Buffer.alloc(4096, 2)), (error: unknown) => error instanceof ShaleError && error.code === 'FENCED');
    const seen = await taken.read(0, 4096);
    assert.ok(seen.equals(Buffer.alloc(4096, 1)), 'the new owner sees the last write of the old one, not the fenced one');
    await taken.write(0, Buffer.alloc(4096, 3));
    assert.ok((await taken.read(0, 4096)).equals(Buffer.alloc(4096, 3)));
  });

  test('a write a crashed writer left on one replica is rolled forward to all by the next owner before it serves', async () => {
    await createVolume('crashed', 4 * MiB);
    const first = await (await client('gw-crash-a')).openVolume('crashed');
    const before = Buffer.alloc(8192, 0x11);
    await first.write(0, before);
    await first.flush();
    // The writer crashes with a write in flight that reached only one replica.
    const gateway = await client('gw-crash-b');
    const map = gateway.map;
    const pool = map.pools[0]!;
    const pgId = placementGroupOf(first.info.id, 0, pool.pgCount);
    const pg = pool.pgs[pgId]!;
    const address = (storeId: number): string => map.stores.find((store) => store.id === storeId)!.address;
    const lone = new StoreChannel(nodeEnv, address(pg.replicas[1]!.storeId));
    const inFlight = Buffer.alloc(4096, 0x22);
    const header = { volumeId: first.info.id, chunkIndex: 0, poolId: pool.id, pgId, pgCount: pool.pgCount, pgEpoch: pg.epoch };
    await lone.request({ op: Op.WRITE, ...header, ownerEpoch: first.ownerEpoch, versionSeq: 1000, watermark: 1, offsetBlocks: 1, countBlocks: 1 }, [checksumOf(inFlight), inFlight]);
    lone.close();

    const next = await gateway.openVolume('crashed', { takeover: true });
    assert.equal(next.reconciledBlocks, 1, 'the one block in flight was rolled forward, nothing else');
    for (const replica of pg.replicas) {
      const direct = new StoreChannel(nodeEnv, address(replica.storeId));
      const reply = await direct.request({ op: Op.READ, flags: Flag.REPAIR, ...header, ownerEpoch: next.ownerEpoch, offsetBlocks: 0, countBlocks: 2 });
      direct.close();
      const data = decodeReadReply(reply.payload, 2).data;
      assert.ok(data.subarray(0, 4096).equals(before.subarray(0, 4096)), `store ${replica.storeId} keeps block 0`);
      assert.ok(data.subarray(4096).equals(inFlight), `store ${replica.storeId} has the rolled-forward block 1`);
    }
    assert.ok((await next.read(4096, 4096)).equals(inFlight));
  });

  test('a block that rots on one replica is never returned: another replica answers and the bad copy is repaired', async () => {
    await createVolume('rot', 4 * MiB);
    const gateway = await client('gw-rot');
    const volume = await gateway.openVolume('rot');
    const data = randomBytes(64 * 1024);
    await volume.write(0, data);
    await volume.flush();
    // Flip one bit of the first block's copy in store 0's disk file (the page cache serves the change).
    const victim = stores[0]!;
    const offset = findBlock(join(dir.path, 'disk-0.img'), data.subarray(0, 4096));
    flipBit(join(dir.path, 'disk-0.img'), offset + 100);
    for (let i = 0; i < 6; i++) assert.ok((await volume.read(0, data.length)).equals(data), `read ${i} returns the written bytes`);
    await waitFor('the repair', async () => volume.repairs > 0, 10_000);
    const map = gateway.map;
    const pool = map.pools[0]!;
    const pgId = placementGroupOf(volume.info.id, 0, pool.pgCount);
    const direct = new StoreChannel(nodeEnv, victim.address);
    const reply = await direct.request({
      op: Op.READ, flags: Flag.REPAIR, volumeId: volume.info.id, chunkIndex: 0, poolId: pool.id, pgId, pgCount: pool.pgCount,
      pgEpoch: pool.pgs[pgId]!.epoch, offsetBlocks: 0, countBlocks: 16,
    });
    direct.close();
    assert.ok(decodeReadReply(reply.payload, 16).data.equals(data), 'the rotten replica holds the right bytes again');
    const status = await volume.blockStatus(0, 4 * MiB);
    assert.deepEqual(status, [{ lengthBytes: 64 * 1024, hole: false, zero: false }, { lengthBytes: 4 * MiB - 64 * 1024, hole: true, zero: true }]);
  });

  test('scrub finds a rotten block on one store; after read repair a second scrub finds none', async () => {
    await createVolume('scrubbed', 4 * MiB);
    const volume = await (await client('gw-scrub')).openVolume('scrubbed');
    const data = randomBytes(32 * 1024);
    await volume.write(0, data);
    await volume.flush();
    const victim = stores[0]!;
    flipBit(join(dir.path, 'disk-0.img'), findBlock(join(dir.path, 'disk-0.img'), data.subarray(8192, 12288)) + 7);
    const scrub = async (storeId: number): Promise<{ badBlocks: number; blocks: number; bad: { volumeId: number; block: number }[] }> => {
      const response = await fetch(`${api}/api/v1/stores/${storeId}/scrub`, { method: 'POST' });
      assert.equal(response.status, 200);
      return (await response.json()) as { badBlocks: number; blocks: number; bad: { volumeId: number; block: number }[] };
    };
    const found = await scrub(victim.storeId);
    assert.equal(found.badBlocks, 1, JSON.stringify(found));
    assert.equal(found.bad[0]!.volumeId, volume.info.id);
    assert.equal(found.bad[0]!.block, 2);
    assert.equal((await scrub(stores[1]!.storeId)).badBlocks, 0, 'the other replicas are sound');
    for (let i = 0; i < 6; i++) assert.ok((await volume.read(0, data.length)).equals(data));
    await waitFor('the repair', async () => volume.repairs > 0, 10_000);
    const after = await scrub(victim.storeId);
    assert.equal(after.badBlocks, 0, JSON.stringify(after));
    const missing = await fetch(`${api}/api/v1/stores/999/scrub`, { method: 'POST' });
    assert.equal(missing.status, 404);
  });

  test('below min replicas writes wait, then fail with NO_QUORUM after the I/O timeout; reads go on from a clean replica', async () => {
    await createVolume('quorum', 4 * MiB);
    const gateway = new ClusterClient(nodeEnv, { conductorUrls: api, ownerId: 'gw-quorum', requestTimeoutMs: 2000, ioTimeoutMs: 1500, log: quiet });
    await gateway.start();
    clients.push(gateway);
    const volume = await gateway.openVolume('quorum');
    const data = randomBytes(8192);
    await volume.write(0, data);
    await stores[1]!.close();
    await stores[2]!.close();
    stores[1] = stores[2] = undefined;
    const startedMs = Date.now();
    await assert.rejects(volume.write(0, Buffer.alloc(4096)), (error: unknown) => error instanceof ShaleError && error.code === 'NO_QUORUM');
    const waitedMs = Date.now() - startedMs;
    assert.ok(waitedMs >= 1400, `the write waited ${waitedMs} ms before failing`);
    // The failed write may have landed on the replica that took it (a failed NBD write leaves its
    // range undefined); the block next to it must be intact and readable from the one clean replica.
    assert.ok((await volume.read(4096, 4096)).equals(data.subarray(4096)), 'reads go on from the one clean replica');
    await startStore(1);
    await startStore(2);
    await waitFor('every replica clean', async () => gateway.map.pools[0]!.pgs.every((candidate) => candidate.replicas.every((replica) => replica.state === 'clean')), 60_000);
    await volume.write(0, Buffer.alloc(4096, 9));
    assert.ok((await volume.read(0, 4096)).equals(Buffer.alloc(4096, 9)), 'writes work again once the stores are back');
  });

  test('a store that missed writes is recovering: it takes writes, refuses reads, and catches up', async () => {
    await createVolume('recover', 8 * MiB);
    const gateway = await client('gw-recover');
    const volume = await gateway.openVolume('recover');
    const before = randomBytes(8 * MiB);
    await volume.write(0, before);
    await volume.flush();

    await stores[2]!.close();
    stores[2] = undefined;
    const after = randomBytes(8 * MiB);
    await volume.write(0, after); // store 2 fails: it is reported down and the write completes on the others
    const downMap = gateway.map;
    assert.equal(downMap.stores.find((store) => store.id === 3)?.state, 'down');

    const returned = await startStore(2, 1 * MiB); // slow resync: 8 MiB takes seconds
    const map = await gateway.watcher.waitForEpoch(downMap.epoch + 1);
    const pool = map.pools[0]!;
    const pgId = placementGroupOf(volume.info.id, 0, pool.pgCount);
    const pg = await waitFor('the replica to be recovering', async () => {
      const current = gateway.map.pools[0]!.pgs[pgId]!;
      return current.replicas.find((replica) => replica.storeId === returned.storeId)?.state === 'recovering' ? current : undefined;
    });
    // Straight to the recovering store: a read is refused, never answered with stale data.
    const direct = new StoreChannel(nodeEnv, returned.address);
    await assert.rejects(direct.request({
      op: Op.READ, volumeId: volume.info.id, chunkIndex: 0, poolId: pool.id, pgId, pgCount: pool.pgCount, pgEpoch: pg.epoch, offsetBlocks: 0, countBlocks: 1,
    }), (error: unknown) => error instanceof ShaleError && error.code === 'NOT_READY');
    direct.close();
    // Reads through the client meanwhile see the new data.
    assert.ok((await volume.read(0, 8 * MiB)).equals(after));
    await waitFor('every replica clean', async () => gateway.map.pools[0]!.pgs.every((candidate) => candidate.replicas.every((replica) => replica.state === 'clean')), 60_000);
    assert.ok(returned.resyncer.bytesCopied >= 8 * MiB * 0.9, `resync copied ${returned.resyncer.bytesCopied} bytes`);
    // With the two others gone, the returned store alone serves the new data.
    await stores[0]!.close();
    await stores[1]!.close();
    stores[0] = stores[1] = undefined;
    assert.ok((await volume.read(0, 8 * MiB)).equals(after), 'the returned store holds every write it missed');
    await startStore(0);
    await startStore(1);
  });
});

/** The byte offset of the first 4 KiB-aligned block of `path` equal to `block`. */
function checksumOf(block: Buffer): Buffer {
  const out = Buffer.allocUnsafe(4);
  out.writeUInt32LE(crc32c(block), 0);
  return out;
}
