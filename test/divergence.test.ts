/**
 * Resync in both directions (DESIGN §3 "Repair"): a store that comes back holding a write no clean
 * replica has — a write of a writer that crashed, which reached only this store before it went
 * down — has it rolled back to the clean content, so it never becomes visible. A real cluster in
 * one process: conductor on SQLite, three store daemons on files, client libraries, real sockets.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ClusterClient } from '../src/client/cluster-client.ts';
import { startConductor, type Conductor } from '../src/conductor/conductor.ts';
import type { ScrubResult } from '../src/conductor/api/types.ts';
import { nodeEnv } from '../src/env/node/node-env.ts';
import { crc32c } from '../src/lib/crc32c.ts';
import { placementGroupOf } from '../src/lib/placement-hash.ts';
import { StoreChannel } from '../src/proto/store-channel.ts';
import { decodeReadReply, Flag, Op } from '../src/proto/store-protocol.ts';
import { openLogEngine } from '../src/store/open-engine.ts';
import { startStoreDaemon, type StoreDaemon } from '../src/store/store-daemon.ts';
import { temporaryDirectory, waitFor } from './harness.ts';

const MiB = 1024 * 1024;
const quiet = (): void => {};

describe('resync rolls back a divergent write', () => {
  const dir = temporaryDirectory('divergence');
  let conductor: Conductor;
  let api: string;
  const stores: (StoreDaemon | undefined)[] = [];
  const clients: ClusterClient[] = [];

  const startStore = async (index: number): Promise<StoreDaemon> => {
    const daemon = await startStoreDaemon(nodeEnv, {
      diskPath: join(dir.path, `disk-${index}.img`), diskSizeBytes: 256 * MiB, format: true, listen: '127.0.0.1:0',
      conductorUrls: api, domain: `d${index}`, log: quiet, openEngine: openLogEngine,
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
    conductor = await startConductor(nodeEnv, {
      metaPath: join(dir.path, 'meta.db'), listen: '127.0.0.1:0', heartbeatTimeoutMs: 1000, defaultReplicas: 3, pgCount: 16, scrubIntervalMs: 0,
    });
    api = `http://${conductor.address}`;
    for (let index = 0; index < 3; index++) await startStore(index);
    await waitFor('the default pool', async () => ((await (await fetch(`${api}/api/v1/pools`)).json()) as { pools: unknown[] }).pools.length > 0);
  });

  after(async () => {
    for (const created of clients) await created.close().catch(() => {});
    for (const daemon of stores) await daemon?.close().catch(() => {});
    await conductor?.close();
    dir.remove();
  });

  test('a write only the returning store has, from an owner that is gone, is rolled back on it and never read', async () => {
    const response = await fetch(`${api}/api/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'div', size: 4 * MiB }) });
    assert.equal(response.status, 201);
    const first = await (await client('gw-a')).openVolume('div');
    const acknowledged = Buffer.alloc(8192, 0x11);
    await first.write(0, acknowledged);
    await first.flush();

    // The writer sends one more write that reaches only store 0, then crashes; store 0 goes down.
    const gateway = await client('gw-b');
    const map = gateway.map;
    const pool = map.pools[0]!;
    const pgId = placementGroupOf(first.info.id, 0, pool.pgCount);
    const header = { volumeId: first.info.id, chunkIndex: 0, poolId: pool.id, pgId, pgCount: pool.pgCount, pgEpoch: pool.pgs[pgId]!.epoch };
    const loneStore = stores[0]!;
    const lone = new StoreChannel(nodeEnv, loneStore.address);
    const divergent = Buffer.alloc(4096, 0x22);
    const sum = Buffer.allocUnsafe(4);
    sum.writeUInt32LE(crc32c(divergent), 0);
    await lone.request({ op: Op.WRITE, ...header, ownerEpoch: first.ownerEpoch, versionSeq: 1000, watermark: 1, offsetBlocks: 1, countBlocks: 1, flags: Flag.FUA }, [sum, divergent]);
    lone.close();
    await loneStore.close();
    stores[0] = undefined;
    await waitFor('store 0 marked down', async () => gateway.map.stores.find((store) => store.id === loneStore.storeId)?.state === 'down' ||
      (await gateway.watcher.refresh().then(() => false)), 20_000, 100);

    // The next owner opens without it: its reconciliation cannot see the write.
    const next = await gateway.openVolume('div', { takeover: true });
    assert.ok((await next.read(4096, 4096)).equals(acknowledged.subarray(4096)), 'the next owner reads the acknowledged data');

    // Store 0 returns and resyncs: the divergent block must be rolled back.
    const returned = await startStore(0);
    await waitFor('every replica clean', async () => {
      await gateway.watcher.refresh().catch(() => {});
      return gateway.map.pools[0]!.pgs.every((pg) => pg.replicas.every((replica) => replica.state === 'clean'));
    }, 60_000, 100);
    assert.equal(returned.resyncer.blocksRolledBack, 1, 'exactly the one divergent block was rolled back');
    const current = gateway.map.pools[0]!.pgs[pgId]!;
    for (const replica of current.replicas) {
      const address = gateway.map.stores.find((store) => store.id === replica.storeId)!.address;
      const direct = new StoreChannel(nodeEnv, address);
      const reply = await direct.request({ op: Op.READ, flags: Flag.REPAIR, ...header, pgEpoch: current.epoch, ownerEpoch: next.ownerEpoch, offsetBlocks: 0, countBlocks: 2 });
      direct.close();
      const read = decodeReadReply(reply.payload, 2);
      assert.ok(read.data.equals(acknowledged), `store ${replica.storeId} holds the acknowledged data, not the divergent write`);
    }
    // With the two others gone, the returned store alone answers: the acknowledged data.
    const survivors = [1, 2].map((index) => stores[index]!);
    for (const daemon of survivors) await daemon.close();
    stores[1] = stores[2] = undefined;
    assert.ok((await next.read(0, 8192)).equals(acknowledged), 'the returned store serves the acknowledged data');
    await startStore(1);
    await startStore(2);
    await waitFor('every replica clean again', async () => {
      await gateway.watcher.refresh().catch(() => {});
      return gateway.map.pools[0]!.pgs.every((pg) => pg.replicas.every((replica) => replica.state === 'clean'));
    }, 60_000, 100);
    const scrub = (await (await fetch(`${api}/api/v1/scrub?volume=div`, { method: 'POST' })).json()) as ScrubResult;
    assert.equal(scrub.inconsistentBlocks, 0, JSON.stringify(scrub));
    assert.ok(scrub.blocks >= 2);
  });
});
