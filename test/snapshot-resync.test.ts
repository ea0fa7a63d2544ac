/**
 * Snapshots versus resync (docs/healing.md "Snapshots and resync"): a replica that was away while
 * a snapshot was taken gets the versions the snapshot needs copied in during resync, so READ_SNAP
 * from it returns the snapshot's bytes; a replica that stays incomplete for a snapshot answers
 * NOT_READY and clients read another one (none left: NO_QUORUM after the I/O timeout, never wrong
 * bytes); a snapshot taken before a rolling restart stays served by the restarted store.
 * A cluster in one process: conductor on SQLite, three store daemons on files, the client library.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ClusterClient } from '../src/client/cluster-client.ts';
import { SnapshotView } from '../src/client/snapshot-view.ts';
import type { VolumeClient } from '../src/client/volume-client.ts';
import { startConductor, type Conductor } from '../src/conductor/conductor.ts';
import { nodeEnv } from '../src/env/node/node-env.ts';
import { ShaleError } from '../src/lib/errors.ts';
import { placementGroupOf } from '../src/lib/placement-hash.ts';
import { decodeReadReply, Op } from '../src/proto/store-protocol.ts';
import { openLogEngine } from '../src/store/open-engine.ts';
import { startStoreDaemon, type StoreDaemon } from '../src/store/store-daemon.ts';
import { temporaryDirectory, waitFor } from './harness.ts';

const MiB = 1024 * 1024;
const CHUNK_BLOCKS = 256; // 1 MiB chunks
const quiet = (): void => {};

describe('snapshots and resync', () => {
  const dir = temporaryDirectory('snapshot-resync');
  let conductor: Conductor;
  let api: string;
  const stores: (StoreDaemon | undefined)[] = [];
  const clients: ClusterClient[] = [];

  const startStore = async (index: number): Promise<StoreDaemon> => {
    const daemon = await startStoreDaemon(nodeEnv, {
      diskPath: join(dir.path, `disk-${index}.img`), diskSizeBytes: 128 * MiB, format: true, listen: '127.0.0.1:0',
      conductorUrls: api, domain: `d${index}`, log: quiet, openEngine: openLogEngine,
    });
    stores[index] = daemon;
    return daemon;
  };
  const client = async (ownerId: string, ioTimeoutMs = 0): Promise<ClusterClient> => {
    const created = new ClusterClient(nodeEnv, { conductorUrls: api, ownerId, requestTimeoutMs: 5000, ioTimeoutMs, log: quiet });
    await created.start();
    clients.push(created);
    return created;
  };
  const call = async (method: string, path: string, body?: unknown): Promise<{ status: number; body: any }> => {
    const response = await fetch(`${api}/api/v1${path}`, body === undefined ? { method } : { method, headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    return { status: response.status, body: await response.json() };
  };
  const allClean = (gateway: ClusterClient) => async (): Promise<boolean> => {
    await gateway.watcher.refresh().catch(() => {});
    const map = gateway.map;
    return map.stores.every((store) => store.state === 'up') && map.pools[0]!.pgs.every((pg) => pg.replicas.every((replica) => replica.state === 'clean'));
  };
  /** Snapshot `snapshotId` of the volume as one store serves it (READ_SNAP straight to it), or its error. */
  const readSnapFrom = async (gateway: ClusterClient, volume: VolumeClient, storeId: number, snapshotId: number, chunks: number): Promise<Buffer> => {
    const out = Buffer.alloc(chunks * MiB);
    const map = gateway.map;
    const pool = map.pools.find((candidate) => candidate.id === volume.info.poolId)!;
    for (let chunkIndex = 0; chunkIndex < chunks; chunkIndex++) {
      const pgId = placementGroupOf(volume.info.id, chunkIndex, pool.pgCount);
      const reply = await gateway.channel(storeId).request({
        op: Op.READ_SNAP, volumeId: volume.info.id, chunkIndex, poolId: pool.id, pgId, pgCount: pool.pgCount, pgEpoch: pool.pgs[pgId]!.epoch,
        offsetBlocks: 0, countBlocks: CHUNK_BLOCKS, snapSeq: snapshotId,
      });
      const read = decodeReadReply(reply.payload, CHUNK_BLOCKS);
      let at = 0;
      for (let i = 0; i < CHUNK_BLOCKS; i++) {
        if (read.states[i] !== 1) continue;
        read.data.copy(out, chunkIndex * MiB + i * 4096, at * 4096, (at + 1) * 4096);
        at++;
      }
    }
    return out;
  };

  before(async () => {
    conductor = await startConductor(nodeEnv, { metaPath: join(dir.path, 'meta.db'), listen: '127.0.0.1:0', heartbeatTimeoutMs: 1500, defaultReplicas: 3, pgCount: 16 });
    api = `http://${conductor.address}`;
    for (let index = 0; index < 3; index++) await startStore(index);
    await waitFor('the default pool', async () => (await call('GET', '/pools')).body.pools.length > 0);
  });

  after(async () => {
    for (const created of clients) await created.close().catch(() => {});
    for (const daemon of stores) await daemon?.close().catch(() => {});
    await conductor?.close();
    dir.remove();
  });

  test('a store down while a snapshot was taken serves it right after resync; incomplete copies are never served', async () => {
    assert.equal((await call('POST', '/volumes', { name: 'away', size: 4 * MiB, chunkSize: '1M' })).status, 201);
    const gateway = await client('gw-away');
    const volume = await gateway.openVolume('away');
    await volume.write(0, randomBytes(4 * MiB));
    await volume.flush();

    await stores[2]!.close();
    stores[2] = undefined;
    const atSnapshot = randomBytes(4 * MiB);
    await volume.write(0, atSnapshot); // store 2 misses it: reported down, the write completes on the others
    const snap = await call('POST', '/volumes/away/snapshots', { name: 's' });
    assert.equal(snap.body.state, 'live', JSON.stringify(snap.body));
    const snapshotId = snap.body.id as number;
    const head = Buffer.from(atSnapshot);
    const later = randomBytes(3 * MiB);
    later.copy(head, 0);
    await volume.write(0, later); // the first 3 MiB move on: store 2 must keep, for the snapshot, a version it never had

    const returned = await startStore(2);
    await waitFor('every replica clean again', allClean(gateway), 60_000);
    assert.ok((await volume.read(0, 4 * MiB)).equals(head), 'the volume reads its newest bytes');
    // Straight from the returned store: the snapshot's bytes, not the ones it held before going away.
    const served = await readSnapFrom(gateway, volume, returned.storeId, snapshotId, 4);
    assert.ok(served.equals(atSnapshot), 'the returned store serves the snapshot as it was taken');
    assert.ok(returned.resyncer.snapshotVersionsCopied >= 3 * CHUNK_BLOCKS, `versions copied in for the snapshot: ${returned.resyncer.snapshotVersionsCopied}`);
    assert.deepEqual(returned.snapshotGaps.list(), [], 'nothing left incomplete');
    // Through the client, many times (round robin over every clean replica).
    const reader = await client('reader-away');
    const view = await SnapshotView.open(reader, 'away', 's');
    for (let round = 0; round < 6; round++) assert.ok((await view.read(0, 4 * MiB)).equals(atSnapshot), `snapshot read ${round}`);

    // A copy recorded incomplete is not served: NOT_READY straight from the store, the right bytes through the client.
    await returned.snapshotGaps.mark(volume.info.id, snapshotId, 'test');
    await assert.rejects(readSnapFrom(gateway, volume, returned.storeId, snapshotId, 1), (error: unknown) => error instanceof ShaleError && error.code === 'NOT_READY');
    for (let round = 0; round < 6; round++) assert.ok((await view.read(0, 4 * MiB)).equals(atSnapshot), `snapshot read ${round} with one copy incomplete`);
    // No complete copy left: an error after the I/O timeout, never wrong bytes.
    for (const daemon of stores) await daemon!.snapshotGaps.mark(volume.info.id, snapshotId, 'test');
    const impatient = await client('reader-impatient', 1500);
    const doomed = await SnapshotView.open(impatient, 'away', 's');
    await assert.rejects(doomed.read(0, 4096), (error: unknown) => error instanceof ShaleError && error.code === 'NO_QUORUM');
    // Deleting the snapshot drops the records.
    assert.equal((await call('DELETE', '/volumes/away/snapshots/s')).status, 200);
    await waitFor('the gap records dropped', async () => stores.every((daemon) => daemon!.snapshotGaps.list().length === 0), 20_000);
    await volume.close();
  });

  test('rolling restart: a snapshot taken before a store went away and came back is still served by it', async () => {
    assert.equal((await call('POST', '/volumes', { name: 'roll', size: 4 * MiB, chunkSize: '1M' })).status, 201);
    const gateway = await client('gw-roll');
    await waitFor('every replica clean', allClean(gateway), 60_000);
    const volume = await gateway.openVolume('roll');
    const atSnapshot = randomBytes(4 * MiB);
    await volume.write(0, atSnapshot);
    const snap = await call('POST', '/volumes/roll/snapshots', { name: 'before' });
    assert.equal(snap.body.state, 'live', JSON.stringify(snap.body));
    await stores[1]!.close();
    stores[1] = undefined;
    await volume.write(0, randomBytes(4 * MiB));
    const returned = await startStore(1);
    await waitFor('every replica clean again', allClean(gateway), 60_000);
    assert.ok((await readSnapFrom(gateway, volume, returned.storeId, snap.body.id, 4)).equals(atSnapshot), 'the restarted store serves the snapshot');
    assert.deepEqual(returned.snapshotGaps.list(), [], 'not recorded incomplete');
    assert.equal(returned.resyncer.snapshotVersionsCopied, 0, 'it had every version the snapshot needs');
    await volume.close();
  });

  test('a store resyncing from holders whose copy of a snapshot is incomplete records its own copy incomplete', async () => {
    assert.equal((await call('POST', '/volumes', { name: 'chain', size: MiB, chunkSize: '1M' })).status, 201);
    const gateway = await client('gw-chain');
    await waitFor('every replica clean', allClean(gateway), 60_000);
    const volume = await gateway.openVolume('chain');
    await volume.write(0, randomBytes(MiB));
    const snap = await call('POST', '/volumes/chain/snapshots', { name: 'x' });
    assert.equal(snap.body.state, 'live', JSON.stringify(snap.body));
    await stores[0]!.snapshotGaps.mark(volume.info.id, snap.body.id, 'test');
    await stores[1]!.snapshotGaps.mark(volume.info.id, snap.body.id, 'test');
    await stores[2]!.close();
    stores[2] = undefined;
    await volume.write(0, randomBytes(MiB));
    const returned = await startStore(2);
    await waitFor('every replica clean again', allClean(gateway), 60_000);
    assert.deepEqual(returned.snapshotGaps.list(), [[volume.info.id, snap.body.id]], 'it could not check its copy: recorded incomplete');
    await assert.rejects(readSnapFrom(gateway, volume, returned.storeId, snap.body.id, 1), (error: unknown) => error instanceof ShaleError && error.code === 'NOT_READY');
    await volume.close();
  });
});
