/**
 * The conductor through its real HTTP API on 127.0.0.1 (port 0), with a temporary SQLite file.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { ErrorCodes, type ErrorCode } from '../lib/errors.ts';
import type { ClusterMap, ClusterStatus, OpenVolumeResponse, PoolInfo, StoreInfo, VolumeInfo } from './api/types.ts';
import { clock, eventually, expectError, type Reply, startCluster } from './testing/conductor-harness.ts';

describe('conductor: stores, pools and placement', () => {
  it('registers stores, creates the default pool once three are up, places R distinct stores per PG', async () => {
    const cluster = await startCluster({ pgCount: 128 });
    try {
      const info = await cluster.call('GET', '/cluster');
      assert.deepEqual(info.body, { clusterId: cluster.conductor.clusterId, apiVersion: 1 });

      assert.equal(await cluster.register(1), 1);
      assert.equal(await cluster.register(2), 2);
      let map = await cluster.map();
      assert.equal(map.pools.length, 0, 'no pool with two stores');
      const status = (await cluster.call<ClusterStatus>('GET', '/status')).body;
      assert.equal(status.health, 'degraded');
      assert.ok(status.messages.some((m) => /default pool waits for 3 stores/.test(m)), status.messages.join('; '));

      assert.equal(await cluster.register(3), 3);
      map = await cluster.map();
      assert.equal(map.pools.length, 1);
      const pool = map.pools[0]!;
      assert.deepEqual({ name: pool.name, replicas: pool.replicas, minReplicas: pool.minReplicas, pgCount: pool.pgCount }, { name: 'default', replicas: 3, minReplicas: 2, pgCount: 128 });
      assert.equal(pool.pgs.length, 128);
      for (const pg of pool.pgs) {
        assert.equal(new Set(pg.replicas.map((r) => r.storeId)).size, 3);
        assert.ok(pg.replicas.every((r) => r.state === 'clean'));
        assert.ok(pg.epoch <= map.epoch);
      }
      assert.deepEqual(map.stores.map((s) => [s.id, s.state]), [[1, 'up'], [2, 'up'], [3, 'up']]);

      // The same disk uuid keeps its id; a new address bumps the epoch.
      const before = map.epoch;
      assert.equal(await cluster.register(2, { address: '127.0.0.1:29999' }), 2);
      map = await cluster.map();
      assert.equal(map.epoch, before + 1);
      assert.equal(map.stores.find((s) => s.id === 2)!.address, '127.0.0.1:29999');
      assert.equal(map.stores.length, 3);

      const okStatus = (await cluster.call<ClusterStatus>('GET', '/status')).body;
      assert.equal(okStatus.health, 'ok');
      assert.deepEqual(okStatus.stores, { total: 3, up: 3, down: 0 });
      assert.equal(okStatus.capacityBytes, 300 * 2 ** 30);
      const stores = (await cluster.call<{ stores: StoreInfo[] }>('GET', '/stores')).body.stores;
      assert.equal(stores.length, 3);
      assert.equal(stores[0]!.disks[0]!.uuid, 'disk-1');
      assert.ok(stores[0]!.lastHeartbeatAt);
      // A heartbeat refreshes the disk figures without changing the map.
      const epochBeforeBeat = (await cluster.map()).epoch;
      const beat = await cluster.call('POST', '/stores/1/heartbeat', { disks: [{ uuid: 'disk-1', path: '/disks/1', capacityBytes: 100 * 2 ** 30, usedBytes: 5 * 2 ** 30 }] });
      assert.deepEqual(beat.body, { ok: true });
      const refreshed = (await cluster.call<{ stores: StoreInfo[] }>('GET', '/stores')).body.stores;
      assert.equal(refreshed[0]!.usedBytes, 5 * 2 ** 30);
      assert.equal((await cluster.map()).epoch, epochBeforeBeat);
      const pools = (await cluster.call<{ pools: PoolInfo[] }>('GET', '/pools')).body.pools;
      assert.deepEqual(pools.map((p) => [p.name, p.pgsClean, p.pgsDegraded]), [['default', 128, 0]]);
    } finally {
      await cluster.close();
    }
  });

  it('spreads a pool over more stores roughly evenly and on distinct domains', async () => {
    const cluster = await startCluster();
    try {
      for (let n = 1; n <= 6; n++) await cluster.register(n, { domain: `rack-${n % 3}` });
      const created = await cluster.call<VolumeInfo>('POST', '/volumes', { name: 'two', size: '1G', replicas: 2 });
      assert.equal(created.status, 201);
      assert.equal(created.body.poolName, 'replicas-2');
      const map = await cluster.map();
      const pool = map.pools.find((p) => p.name === 'replicas-2')!;
      assert.equal(pool.minReplicas, 1);
      const counts = new Map<number, number>();
      for (const pg of pool.pgs) {
        const ids = pg.replicas.map((r) => r.storeId);
        assert.equal(new Set(ids).size, 2);
        assert.notEqual(ids[0]! % 3, ids[1]! % 3, 'two replicas on two racks');
        for (const id of ids) counts.set(id, (counts.get(id) ?? 0) + 1);
      }
      // 256 × 2 / 6 ≈ 85 each.
      for (const [id, count] of counts) assert.ok(count > 55 && count < 115, `store ${id} holds ${count}`);
      assert.equal(counts.size, 6);
    } finally {
      await cluster.close();
    }
  });

  it('refuses a store of another cluster and changes nothing', async () => {
    const cluster = await startCluster();
    try {
      await cluster.register(1);
      const before = await cluster.map();
      const reply = await cluster.call('POST', '/stores/register', {
        diskUuid: 'disk-9', clusterId: 'another-cluster', address: '127.0.0.1:1', domain: 'x', disks: [],
      });
      expectError(reply, 'WRONG_CLUSTER', /another-cluster/);
      const replyKnown = await cluster.call('POST', '/stores/register', {
        diskUuid: 'disk-1', clusterId: 'another-cluster', address: '127.0.0.1:2', domain: 'x', disks: [],
      });
      expectError(replyKnown, 'WRONG_CLUSTER');
      assert.deepEqual(await cluster.map(), before);
    } finally {
      await cluster.close();
    }
  });

  it('says NOT_READY with a clear message when too few stores are up for a volume', async () => {
    const cluster = await startCluster();
    try {
      await cluster.register(1);
      expectError(await cluster.call('POST', '/volumes', { name: 'v', size: '1G' }), 'NOT_READY', /default pool needs 3 stores up and 1 is/);
      expectError(await cluster.call('POST', '/volumes', { name: 'v', size: '1G', replicas: 2 }), 'NOT_READY', /needs 2 stores up .* but 1 is up/);
      const single = await cluster.call<VolumeInfo>('POST', '/volumes', { name: 'v', size: '1G', replicas: 1 });
      assert.equal(single.status, 201);
      assert.equal(single.body.poolName, 'replicas-1');
      assert.equal(single.body.replicas, 1);
    } finally {
      await cluster.close();
    }
  });
});

describe('conductor: failure detection and recovery', () => {
  it('marks a silent store down after the heartbeat timeout, then recovering, then clean', async () => {
    // Stores 1 and 2 beat all along (and 3 once it is back), so that only store 3's silence
    // changes the map, however slowly a loaded machine runs the rest of the test.
    const cluster = await startCluster({ heartbeatTimeoutMs: 600, pgCount: 32 });
    const beat = (id: number) => cluster.call('POST', `/stores/${id}/heartbeat`, { disks: [] });
    let store3Beats = false;
    const alive = clock.every(50, () => {
      void beat(1).catch(() => {});
      void beat(2).catch(() => {});
      if (store3Beats) void beat(3).catch(() => {});
    });
    try {
      for (const n of [1, 2, 3]) await cluster.register(n);
      const registered = await cluster.map();
      assert.equal((await beat(1)).status, 200);
      // Long poll until store 3 is down.
      const down = await eventually('store 3 down', async () => {
        const reply = await cluster.call<ClusterMap>('GET', `/map?since=${registered.epoch}&waitMs=2000`);
        return reply.body.stores.find((s) => s.id === 3)?.state === 'down' ? reply.body : undefined;
      });
      assert.equal(down.epoch, registered.epoch + 1);
      assert.deepEqual(down.stores.filter((s) => s.state === 'down').map((s) => s.id), [3]);
      for (const pg of down.pools[0]!.pgs) {
        assert.equal(pg.replicas.find((r) => r.storeId === 3)!.state, 'down');
        assert.equal(pg.epoch, down.epoch);
        assert.ok(pg.replicas.filter((r) => r.storeId !== 3).every((r) => r.state === 'clean'));
      }
      const status = (await cluster.call<ClusterStatus>('GET', '/status')).body;
      assert.equal(status.health, 'degraded');
      assert.ok(status.messages.some((m) => /store 3 .* down/.test(m)), status.messages.join('; '));
      assert.ok(status.messages.includes('store 3 went down: no heartbeat for 600 ms'), status.messages.join('; '));
      assert.ok(cluster.logs.some((line) => /store 3 .*marked down/.test(line)));
      const downReason = async (id: number) => (await cluster.call<{ stores: StoreInfo[] }>('GET', '/stores')).body.stores.find((s) => s.id === id)!.downReason;
      assert.equal(await downReason(3), 'no heartbeat for 600 ms');
      assert.equal(await downReason(1), undefined, 'a store that is up has none');

      // A heartbeat from a store marked down is refused: it must register again.
      expectError(await beat(3), 'NOT_FOUND', /register again/);
      // Re-registration: its replicas become recovering in a new epoch.
      assert.equal(await cluster.register(3), 3);
      assert.equal(await downReason(3), undefined, 'back up: the reason is gone');
      store3Beats = true;
      const back = await cluster.map();
      assert.ok(back.epoch > down.epoch);
      const pg0 = back.pools[0]!.pgs[0]!;
      assert.equal(pg0.replicas.find((r) => r.storeId === 3)!.state, 'recovering');
      assert.equal(pg0.epoch, back.epoch);

      // mark-clean: stale (before it started recovering), future, and right.
      const poolId = back.pools[0]!.id;
      expectError(await cluster.call('POST', `/pgs/${poolId}/0/clean`, { storeId: 3, pgEpoch: down.epoch }), 'STALE_PG_EPOCH');
      expectError(await cluster.call('POST', `/pgs/${poolId}/0/clean`, { storeId: 3, pgEpoch: back.epoch + 5 }), 'INVALID_ARGUMENT');
      expectError(await cluster.call('POST', `/pgs/${poolId}/0/clean`, { storeId: 99, pgEpoch: back.epoch }), 'NOT_FOUND');
      expectError(await cluster.call('POST', `/pgs/${poolId}/9999/clean`, { storeId: 3, pgEpoch: back.epoch }), 'NOT_FOUND');
      const cleaned = await cluster.call<ClusterMap>('POST', `/pgs/${poolId}/0/clean`, { storeId: 3, pgEpoch: pg0.epoch });
      assert.equal(cleaned.status, 200);
      assert.equal(cleaned.body.epoch, back.epoch + 1);
      assert.equal(cleaned.body.pools[0]!.pgs[0]!.replicas.find((r) => r.storeId === 3)!.state, 'clean');
      assert.equal(cleaned.body.pools[0]!.pgs[0]!.epoch, cleaned.body.epoch);
      assert.equal(cleaned.body.pools[0]!.pgs[1]!.replicas.find((r) => r.storeId === 3)!.state, 'recovering');
      // Idempotent: a retry changes nothing.
      const again = await cluster.call<ClusterMap>('POST', `/pgs/${poolId}/0/clean`, { storeId: 3, pgEpoch: pg0.epoch });
      assert.equal(again.body.epoch, cleaned.body.epoch);
      // Another replica's change since does not make the claim stale: only this replica's own history does.
      await cluster.call('POST', '/stores/1/report-down', { reporter: 'test', reason: 'unplugged' });
      const other = await cluster.call<ClusterMap>('POST', `/pgs/${poolId}/1/clean`, { storeId: 3, pgEpoch: pg0.epoch });
      assert.equal(other.status, 200, JSON.stringify(other.body));
      assert.equal(other.body.pools[0]!.pgs[1]!.replicas.find((r) => r.storeId === 3)!.state, 'clean');
    } finally {
      alive.cancel();
      await cluster.close();
    }
  });

  it('report-down marks a store down at once, answers with the committed map, and is idempotent', async () => {
    const cluster = await startCluster({ pgCount: 16 });
    try {
      for (const n of [1, 2, 3]) await cluster.register(n);
      const before = await cluster.map();
      const reply = await cluster.call<ClusterMap>('POST', '/stores/2/report-down', { reporter: 'gw-1', reason: 'connection reset' });
      assert.equal(reply.status, 200);
      assert.equal(reply.body.epoch, before.epoch + 1);
      assert.equal(reply.body.stores.find((s) => s.id === 2)!.state, 'down');
      assert.ok(reply.body.pools[0]!.pgs.every((pg) => pg.replicas.find((r) => r.storeId === 2)!.state === 'down'));
      assert.deepEqual(await cluster.map(), reply.body);
      const again = await cluster.call<ClusterMap>('POST', '/stores/2/report-down', { reporter: 'gw-2', reason: 'timeout' });
      assert.deepEqual(again.body, reply.body);
      const stores = (await cluster.call<{ stores: StoreInfo[] }>('GET', '/stores')).body.stores;
      assert.equal(stores.find((s) => s.id === 2)!.downReason, 'reported by gw-1: connection reset', 'the report that marked it down, not a later one');
      expectError(await cluster.call('POST', '/stores/77/report-down', { reporter: 'gw', reason: 'x' }), 'NOT_FOUND');
      assert.ok(cluster.logs.some((line) => /reported by gw-1: connection reset/.test(line)));
    } finally {
      await cluster.close();
    }
  });

  it('when every replica went down, the last clean one returns clean and the others wait for it', async () => {
    const cluster = await startCluster({ pgCount: 8 });
    try {
      for (const n of [1, 2, 3]) await cluster.register(n);
      const poolId = (await cluster.map()).pools[0]!.id;
      for (const id of [1, 2, 3]) await cluster.call('POST', `/stores/${id}/report-down`, { reporter: 't', reason: 'power' });
      let map = await cluster.map();
      assert.ok(map.pools[0]!.pgs.every((pg) => pg.replicas.every((r) => r.state === 'down')));
      assert.equal((await cluster.call<ClusterStatus>('GET', '/status')).body.health, 'error');

      // Store 1 missed the writes stores 2 and 3 took: it comes back recovering and may not claim clean.
      await cluster.register(1);
      map = await cluster.map();
      const pg = map.pools[0]!.pgs[0]!;
      assert.equal(pg.replicas.find((r) => r.storeId === 1)!.state, 'recovering');
      expectError(await cluster.call('POST', `/pgs/${poolId}/0/clean`, { storeId: 1, pgEpoch: pg.epoch }), 'NOT_READY', /waits for store 3/);
      // Store 3 was the last clean replica: it is clean at once.
      await cluster.register(3);
      map = await cluster.map();
      for (const each of map.pools[0]!.pgs) {
        assert.equal(each.replicas.find((r) => r.storeId === 3)!.state, 'clean');
        assert.equal(each.replicas.find((r) => r.storeId === 1)!.state, 'recovering');
      }
      // Store 2 returns recovering (there is a clean replica now).
      await cluster.register(2);
      map = await cluster.map();
      assert.equal(map.pools[0]!.pgs[0]!.replicas.find((r) => r.storeId === 2)!.state, 'recovering');
      const ok = await cluster.call('POST', `/pgs/${poolId}/0/clean`, { storeId: 1, pgEpoch: map.pools[0]!.pgs[0]!.epoch });
      assert.equal(ok.status, 200);
    } finally {
      await cluster.close();
    }
  });

  it('after a restart every up store gets a grace period; stores that time out together are all authoritative', async () => {
    const first = await startCluster({ pgCount: 8 });
    for (const n of [1, 2, 3]) await first.register(n);
    await first.close();
    // The restarted conductor starts every up store's clock at once, so all three expire in one check.
    const cluster = await startCluster({ metaPath: first.metaPath, heartbeatTimeoutMs: 200 });
    try {
      assert.ok((await cluster.map()).stores.every((s) => s.state === 'up'), 'up during the grace period');
      await eventually('all stores down', async () => {
        const map = await cluster.map();
        return map.stores.every((s) => s.state === 'down') ? map : undefined;
      });
      await cluster.register(1);
      const map = await cluster.map();
      // Stores 1..3 went down in the same epoch (one check): store 1 holds everything.
      assert.ok(map.pools[0]!.pgs.every((pg) => pg.replicas.find((r) => r.storeId === 1)!.state === 'clean'));
    } finally {
      await cluster.close();
    }
  });

  it('a new store on a taken address takes it over: the old one is marked down', async () => {
    const cluster = await startCluster();
    try {
      await cluster.register(1);
      await cluster.register(2, { address: '127.0.0.1:20001' });
      const map = await cluster.map();
      assert.deepEqual(map.stores.map((s) => [s.id, s.state]), [[1, 'down'], [2, 'up']]);
      const stores = (await cluster.call<{ stores: StoreInfo[] }>('GET', '/stores')).body.stores;
      assert.equal(stores.find((s) => s.id === 1)!.downReason, 'its address 127.0.0.1:20001 was taken by store 2');
    } finally {
      await cluster.close();
    }
  });
});

describe('conductor: volumes', () => {
  it('creates, lists, shows and deletes volumes; a name is reused with a new id', async () => {
    const cluster = await startCluster({ pgCount: 16 });
    try {
      for (const n of [1, 2, 3]) await cluster.register(n);
      const created = await cluster.call<VolumeInfo>('POST', '/volumes', { name: 'vm-disk.1', size: '10G' });
      assert.equal(created.status, 201);
      assert.deepEqual({ ...created.body, createdAt: undefined }, {
        id: 1, name: 'vm-disk.1', sizeBytes: 10 * 2 ** 30, chunkSizeBytes: 4 * 2 ** 20, poolId: 1, poolName: 'default', replicas: 3,
        owner: null, ownerEpoch: 0, createdAt: undefined, snapSeq: 0, snapshots: 0, parent: null,
      });
      assert.ok(!Number.isNaN(Date.parse(created.body.createdAt)));
      const small = await cluster.call<VolumeInfo>('POST', '/volumes', { name: 'small', size: 1 << 20, chunkSize: '64K', replicas: 3 });
      assert.equal(small.body.chunkSizeBytes, 65536);
      assert.equal(small.body.poolName, 'default');

      const list = await cluster.call<{ volumes: VolumeInfo[] }>('GET', '/volumes');
      assert.deepEqual(list.body.volumes.map((v) => v.name), ['vm-disk.1', 'small']);
      const info = await cluster.call<VolumeInfo>('GET', '/volumes/vm-disk.1');
      // GET adds the health of the volume's PGs (healing); the rest is the volume as created.
      const { health, ...rest } = info.body;
      assert.deepEqual(rest, created.body);
      assert.equal(health!.pgsDegraded, 0);
      assert.equal(health!.pgsClean, health!.pgs);
      const status = (await cluster.call<ClusterStatus>('GET', '/status')).body;
      assert.equal(status.volumes, 2);
      assert.equal(status.provisionedBytes, 10 * 2 ** 30 + 2 ** 20);

      const before = await cluster.map();
      assert.deepEqual((await cluster.call('DELETE', '/volumes/vm-disk.1')).body, { ok: true });
      const afterDelete = await cluster.map();
      assert.equal(afterDelete.epoch, before.epoch + 1);
      assert.deepEqual(afterDelete.deletedVolumes, [1]);
      expectError(await cluster.call('GET', '/volumes/vm-disk.1'), 'NOT_FOUND');
      expectError(await cluster.call('DELETE', '/volumes/vm-disk.1'), 'NOT_FOUND');

      const again = await cluster.call<VolumeInfo>('POST', '/volumes', { name: 'vm-disk.1', size: '1G' });
      assert.equal(again.status, 201);
      assert.equal(again.body.id, 3, 'a fresh id, never 1 again');
    } finally {
      await cluster.close();
    }
  });

  it('refuses bad input with the right code and status, and changes nothing', async () => {
    const cluster = await startCluster({ pgCount: 8 });
    try {
      for (const n of [1, 2, 3]) await cluster.register(n);
      await cluster.call('POST', '/volumes', { name: 'taken', size: '1G' });
      const snapshot = async () => [
        await cluster.map(),
        (await cluster.call('GET', '/volumes')).body,
        (await cluster.call('GET', '/stores')).body.stores.map((s: StoreInfo) => ({ ...s, lastHeartbeatAt: null })),
      ];
      const before = await snapshot();
      const cases: [string, string, string, unknown, ErrorCode][] = [
        ['unknown volume', 'GET', '/volumes/nope', undefined, 'NOT_FOUND'],
        ['duplicate name', 'POST', '/volumes', { name: 'taken', size: '1G' }, 'ALREADY_EXISTS'],
        ['size 0', 'POST', '/volumes', { name: 'v', size: 0 }, 'INVALID_ARGUMENT'],
        ['size "0G"', 'POST', '/volumes', { name: 'v', size: '0G' }, 'INVALID_ARGUMENT'],
        ['size not a multiple of 4096', 'POST', '/volumes', { name: 'v', size: 4097 }, 'INVALID_ARGUMENT'],
        ['size 1000', 'POST', '/volumes', { name: 'v', size: '1000' }, 'INVALID_ARGUMENT'],
        ['size too large', 'POST', '/volumes', { name: 'v', size: '2P' }, 'INVALID_ARGUMENT'],
        ['size negative', 'POST', '/volumes', { name: 'v', size: -4096 }, 'INVALID_ARGUMENT'],
        ['size garbage', 'POST', '/volumes', { name: 'v', size: 'lots' }, 'INVALID_ARGUMENT'],
        ['size missing', 'POST', '/volumes', { name: 'v' }, 'INVALID_ARGUMENT'],
        ['size a boolean', 'POST', '/volumes', { name: 'v', size: true }, 'INVALID_ARGUMENT'],
        ['name with @', 'POST', '/volumes', { name: 'vol@snap', size: '1G' }, 'INVALID_ARGUMENT'],
        ['name starting with .', 'POST', '/volumes', { name: '.hidden', size: '1G' }, 'INVALID_ARGUMENT'],
        ['name starting with -', 'POST', '/volumes', { name: '-rf', size: '1G' }, 'INVALID_ARGUMENT'],
        ['name too long', 'POST', '/volumes', { name: 'x'.repeat(65), size: '1G' }, 'INVALID_ARGUMENT'],
        ['name empty', 'POST', '/volumes', { name: '', size: '1G' }, 'INVALID_ARGUMENT'],
        ['name with slash', 'POST', '/volumes', { name: 'a/b', size: '1G' }, 'INVALID_ARGUMENT'],
        ['name a number', 'POST', '/volumes', { name: 7, size: '1G' }, 'INVALID_ARGUMENT'],
        ['chunk size not a power of two', 'POST', '/volumes', { name: 'v', size: '1G', chunkSize: '96K' }, 'INVALID_ARGUMENT'],
        ['chunk size too small', 'POST', '/volumes', { name: 'v', size: '1G', chunkSize: '32K' }, 'INVALID_ARGUMENT'],
        ['chunk size too large', 'POST', '/volumes', { name: 'v', size: '1G', chunkSize: '2G' }, 'INVALID_ARGUMENT'],
        ['replicas 0', 'POST', '/volumes', { name: 'v', size: '1G', replicas: 0 }, 'INVALID_ARGUMENT'],
        ['replicas 2.5', 'POST', '/volumes', { name: 'v', size: '1G', replicas: 2.5 }, 'INVALID_ARGUMENT'],
        ['replicas as text', 'POST', '/volumes', { name: 'v', size: '1G', replicas: '3' }, 'INVALID_ARGUMENT'],
        ['more replicas than stores', 'POST', '/volumes', { name: 'v', size: '1G', replicas: 5 }, 'NOT_READY'],
        ['body an array', 'POST', '/volumes', [1, 2], 'INVALID_ARGUMENT'],
        ['body a string', 'POST', '/volumes', 'hello', 'INVALID_ARGUMENT'],
        ['bad volume name in path', 'GET', '/volumes/.x', undefined, 'INVALID_ARGUMENT'],
        ['bad percent-encoding', 'GET', '/volumes/%E0%A4%A', undefined, 'INVALID_ARGUMENT'],
        ['unknown route', 'GET', '/nothing/here', undefined, 'NOT_FOUND'],
        ['wrong method', 'PUT', '/volumes', { name: 'v', size: '1G' }, 'NOT_FOUND'],
        ['heartbeat of unknown store', 'POST', '/stores/42/heartbeat', { disks: [] }, 'NOT_FOUND'],
        ['heartbeat with bad store id', 'POST', '/stores/abc/heartbeat', { disks: [] }, 'INVALID_ARGUMENT'],
        ['heartbeat without disks', 'POST', '/stores/1/heartbeat', {}, 'INVALID_ARGUMENT'],
        ['heartbeat with bad disk', 'POST', '/stores/1/heartbeat', { disks: [{ uuid: 'd', path: '/', capacityBytes: -1, usedBytes: 0 }] }, 'INVALID_ARGUMENT'],
        ['register without address', 'POST', '/stores/register', { diskUuid: 'd', clusterId: 'c', domain: '', disks: [] }, 'INVALID_ARGUMENT'],
        ['register with bad address', 'POST', '/stores/register', { diskUuid: 'd', clusterId: 'c', address: 'nowhere', domain: '', disks: [] }, 'INVALID_ARGUMENT'],
        ['register with port 0', 'POST', '/stores/register', { diskUuid: 'd', clusterId: 'c', address: '127.0.0.1:0', domain: '', disks: [] }, 'INVALID_ARGUMENT'],
        ['register with empty unix path', 'POST', '/stores/register', { diskUuid: 'd', clusterId: 'c', address: 'unix:', domain: '', disks: [] }, 'INVALID_ARGUMENT'],
        ['map with bad since', 'GET', '/map?since=-1', undefined, 'INVALID_ARGUMENT'],
        ['map with too long a wait', 'GET', '/map?since=0&waitMs=999999999', undefined, 'INVALID_ARGUMENT'],
        ['open without owner', 'POST', '/volumes/taken/open', {}, 'INVALID_ARGUMENT'],
        ['open unknown volume', 'POST', '/volumes/nope/open', { owner: 'gw' }, 'NOT_FOUND'],
        ['clean without pgEpoch', 'POST', '/pgs/1/0/clean', { storeId: 1 }, 'INVALID_ARGUMENT'],
        ['delete with bad force', 'DELETE', '/volumes/taken?force=maybe', undefined, 'INVALID_ARGUMENT'],
        ['volume in an unknown pool', 'POST', '/volumes', { name: 'v', size: '1G', pool: 'nope' }, 'NOT_FOUND'],
        ['volume with a bad pool name', 'POST', '/volumes', { name: 'v', size: '1G', pool: 'a/b' }, 'INVALID_ARGUMENT'],
        ['volume replicas not those of its pool', 'POST', '/volumes', { name: 'v', size: '1G', pool: 'default', replicas: 2 }, 'INVALID_ARGUMENT'],
        ['resize unknown volume', 'PATCH', '/volumes/nope', { size: '2G' }, 'NOT_FOUND'],
        ['resize to 0', 'PATCH', '/volumes/taken', { size: 0 }, 'INVALID_ARGUMENT'],
        ['resize beyond the limit', 'PATCH', '/volumes/taken', { size: '2P' }, 'INVALID_ARGUMENT'],
        ['resize without size', 'PATCH', '/volumes/taken', {}, 'INVALID_ARGUMENT'],
        ['shrink (not supported until stores discard beyond the end)', 'PATCH', '/volumes/taken', { size: '512M' }, 'NOT_SUPPORTED'],
        ['resize with bad force', 'PATCH', '/volumes/taken', { size: '512M', force: 'yes' }, 'INVALID_ARGUMENT'],
        ['pool without replicas', 'POST', '/pools', { name: 'p' }, 'INVALID_ARGUMENT'],
        ['pool with 0 replicas', 'POST', '/pools', { name: 'p', replicas: 0 }, 'INVALID_ARGUMENT'],
        ['pool with min above replicas', 'POST', '/pools', { name: 'p', replicas: 2, minReplicas: 3 }, 'INVALID_ARGUMENT'],
        ['pool with 0 PGs', 'POST', '/pools', { name: 'p', replicas: 2, pgCount: 0 }, 'INVALID_ARGUMENT'],
        ['pool with too many PGs', 'POST', '/pools', { name: 'p', replicas: 2, pgCount: 100_000 }, 'INVALID_ARGUMENT'],
        ['pool over the cluster PG limit', 'POST', '/pools', { name: 'p', replicas: 3, pgCount: 16_384 }, 'INVALID_ARGUMENT'],
        ['pool with a bad domain level', 'POST', '/pools', { name: 'p', replicas: 2, domainLevel: 'Rack!' }, 'INVALID_ARGUMENT'],
        ['pool with a bad name', 'POST', '/pools', { name: '.p', replicas: 2 }, 'INVALID_ARGUMENT'],
        ['duplicate pool', 'POST', '/pools', { name: 'default', replicas: 3 }, 'ALREADY_EXISTS'],
        ['pool with more replicas than stores', 'POST', '/pools', { name: 'p', replicas: 4 }, 'NOT_READY'],
        ['unknown pool', 'GET', '/pools/nope', undefined, 'NOT_FOUND'],
      ];
      for (const [what, method, path, body, code] of cases) {
        const reply = body === undefined ? await cluster.call(method, path) : await cluster.call(method, path, body);
        assert.equal(reply.body?.code, code, `${what}: ${JSON.stringify(reply.body)}`);
        assert.equal(reply.status, ErrorCodes[code].httpStatus, what);
      }
      expectError(await cluster.raw('POST', '/volumes', '{"name": "v", "size": '), 'INVALID_ARGUMENT', /malformed JSON/);
      expectError(await cluster.raw('POST', '/stores/register', 'not json at all'), 'INVALID_ARGUMENT', /malformed JSON/);
      expectError(await cluster.raw('POST', '/volumes', `{"name": "${'x'.repeat(2 * 1024 * 1024)}"}`), 'INVALID_ARGUMENT', /larger than the limit/);
      assert.deepEqual(await snapshot(), before);
      // Each error logged once.
      assert.equal(cluster.logs.filter((line) => line.includes('GET /api/v1/volumes/nope')).length, 1);
      // And the server still answers.
      assert.equal((await cluster.call('GET', '/status')).status, 200);
    } finally {
      await cluster.close();
    }
  });

  it('resizes: grows an open volume online (its owner learns the size from the map); shrinking is refused as not supported', async () => {
    const cluster = await startCluster({ pgCount: 8 });
    try {
      for (const n of [1, 2, 3]) await cluster.register(n);
      const created = (await cluster.call<VolumeInfo>('POST', '/volumes', { name: 'grow', size: '1G' })).body;
      const opened = await cluster.call<OpenVolumeResponse>('POST', '/volumes/grow/open', { owner: 'gw' });
      assert.deepEqual(opened.body.map.volumeSizes, [[created.id, 2 ** 30]]);
      const before = opened.body.map.epoch;
      const grown = await cluster.call<VolumeInfo>('PATCH', '/volumes/grow', { size: '2GiB' });
      assert.equal(grown.status, 200, JSON.stringify(grown.body));
      assert.equal(grown.body.sizeBytes, 2 * 2 ** 30);
      const map = await cluster.map();
      assert.equal(map.epoch, before + 1, 'a new epoch tells the owner');
      assert.deepEqual(map.volumeSizes, [[created.id, 2 * 2 ** 30]]);
      // The same size again changes nothing.
      assert.equal((await cluster.call<VolumeInfo>('PATCH', '/volumes/grow', { size: 2 * 2 ** 30 })).status, 200);
      assert.equal((await cluster.map()).epoch, map.epoch);

      // Shrinking is refused, open or not, forced or not: stores cannot discard beyond the new end yet.
      expectError(await cluster.call('PATCH', '/volumes/grow', { size: '1G' }), 'NOT_SUPPORTED', /not supported yet/);
      await cluster.call('POST', '/volumes/grow/close', { owner: 'gw', ownerEpoch: opened.body.ownerEpoch });
      expectError(await cluster.call('PATCH', '/volumes/grow', { size: '512M', force: true }), 'NOT_SUPPORTED', /growing it again would expose/);
      const shrunkMap = await cluster.map();
      assert.equal(shrunkMap.epoch, map.epoch, 'a refused shrink changes nothing');
      assert.deepEqual(shrunkMap.volumeSizes, [[created.id, 2 * 2 ** 30]]);
      // A volume never opened is not in the map: resizing it changes no epoch.
      await cluster.call('POST', '/volumes', { name: 'cold', size: '1G' });
      await cluster.call('PATCH', '/volumes/cold', { size: '3G' });
      assert.equal((await cluster.map()).epoch, shrunkMap.epoch);
      assert.ok(cluster.logs.some((line) => /resized from 1073741824 to 2147483648 bytes/.test(line)));
    } finally {
      await cluster.close();
    }
  });

  it('serializes concurrent requests: one winner per name, distinct owner epochs', async () => {
    const cluster = await startCluster({ pgCount: 8 });
    try {
      for (const n of [1, 2, 3]) await cluster.register(n);
      const creates = await Promise.all(Array.from({ length: 20 }, () => cluster.call('POST', '/volumes', { name: 'race', size: '1G' })));
      assert.equal(creates.filter((r) => r.status === 201).length, 1);
      assert.ok(creates.filter((r) => r.status !== 201).every((r) => r.body.code === 'ALREADY_EXISTS'));
      const opens = await Promise.all(Array.from({ length: 10 }, () => cluster.call<OpenVolumeResponse>('POST', '/volumes/race/open', { owner: 'gw' })));
      assert.deepEqual(opens.map((r) => r.body.ownerEpoch).sort((a, b) => a - b), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    } finally {
      await cluster.close();
    }
  });

  it('survives garbage on every endpoint without an internal error', async () => {
    const cluster = await startCluster({ pgCount: 8 });
    try {
      for (const n of [1, 2, 3]) await cluster.register(n);
      await cluster.call('POST', '/volumes', { name: 'v', size: '1G' });
      const paths = [
        ['POST', '/stores/register'], ['POST', '/stores/1/heartbeat'], ['POST', '/stores/1/report-down'], ['POST', '/pgs/1/0/clean'],
        ['POST', '/volumes/v/open'], ['POST', '/volumes/v/close'], ['POST', '/volumes'], ['DELETE', '/volumes/v?force=no'],
      ];
      const bodies = [
        'null', '[]', '"x"', '123', 'true', '{"a":1}', '{', '\u0000\u00ff', '['.repeat(100_000),
        '{"disks":"x","owner":5,"storeId":"1","pgEpoch":-1,"name":{},"size":[],"reporter":[],"reason":{}}',
        '{"disks":[null],"owner":"","takeover":"yes","ownerEpoch":1.5,"size":"1e9G","chunkSize":-1,"replicas":1e300}',
        '{"diskUuid":"d","clusterId":"c","address":"unix:","domain":"x","disks":[{"uuid":"u","path":"p","capacityBytes":1e20,"usedBytes":0}]}',
      ];
      for (const [method, path] of paths) {
        for (const body of bodies) {
          const reply = await cluster.raw(method!, path!, body);
          assert.ok(reply.status >= 400 && reply.status < 500 || reply.body.code === 'NOT_READY' || reply.status === 200,
            `${method} ${path} ${body.slice(0, 40)} -> ${reply.status} ${JSON.stringify(reply.body)}`);
          assert.notEqual(reply.body?.code, 'INTERNAL');
        }
      }
      assert.equal((await cluster.call('GET', '/status')).status, 200);
      assert.ok(!cluster.logs.some((line) => line.includes('INTERNAL')));
    } finally {
      await cluster.close();
    }
  });

  it('hands out increasing owner epochs; refuses a second owner unless it takes over; close clears', async () => {
    const cluster = await startCluster({ pgCount: 8 });
    try {
      for (const n of [1, 2, 3]) await cluster.register(n);
      const volume = (await cluster.call<VolumeInfo>('POST', '/volumes', { name: 'db', size: '1G' })).body;
      const epochBefore = (await cluster.map()).epoch;

      const first = await cluster.call<OpenVolumeResponse>('POST', '/volumes/db/open', { owner: 'gw-a' });
      assert.equal(first.status, 200);
      assert.equal(first.body.ownerEpoch, 1);
      assert.equal(first.body.volume.owner, 'gw-a');
      assert.equal(first.body.map.epoch, epochBefore + 1);
      assert.deepEqual(first.body.map.owners, [[volume.id, 1]]);

      const reopened = await cluster.call<OpenVolumeResponse>('POST', '/volumes/db/open', { owner: 'gw-a' });
      assert.equal(reopened.body.ownerEpoch, 2, 'the same owner reopening gets a new epoch');

      expectError(await cluster.call('POST', '/volumes/db/open', { owner: 'gw-b' }), 'FENCED', /open by gw-a/);
      expectError(await cluster.call('DELETE', '/volumes/db'), 'FENCED', /open by gw-a/);

      const takeover = await cluster.call<OpenVolumeResponse>('POST', '/volumes/db/open', { owner: 'gw-b', takeover: true });
      assert.equal(takeover.body.ownerEpoch, 3);
      assert.deepEqual(takeover.body.map.owners, [[volume.id, 3]]);
      assert.ok(cluster.logs.some((line) => /taken over by gw-b from gw-a/.test(line)));

      // The old owner closing does nothing; the current owner closing clears the owner.
      assert.deepEqual((await cluster.call('POST', '/volumes/db/close', { owner: 'gw-a', ownerEpoch: 2 })).body, { ok: true, cleared: false });
      assert.equal((await cluster.call<VolumeInfo>('GET', '/volumes/db')).body.owner, 'gw-b');
      assert.deepEqual((await cluster.call('POST', '/volumes/db/close', { owner: 'gw-b', ownerEpoch: 3 })).body, { ok: true, cleared: true });
      const closed = (await cluster.call<VolumeInfo>('GET', '/volumes/db')).body;
      assert.equal(closed.owner, null);
      assert.equal(closed.ownerEpoch, 3);

      const next = await cluster.call<OpenVolumeResponse>('POST', '/volumes/db/open', { owner: 'gw-c' });
      assert.equal(next.body.ownerEpoch, 4, 'higher than any epoch before, even after close');
      // force deletes an open volume.
      assert.equal((await cluster.call('DELETE', '/volumes/db?force=true')).status, 200);
      const map = await cluster.map();
      assert.deepEqual(map.owners, []);
      assert.deepEqual(map.deletedVolumes, [volume.id]);
    } finally {
      await cluster.close();
    }
  });
});

describe('conductor: pools', () => {
  it('creates pools with replicas, min replicas, PG count and domain level; shows the PG table; volumes pick a pool', async () => {
    const cluster = await startCluster({ pgCount: 16 });
    try {
      for (let n = 1; n <= 6; n++) await cluster.register(n, { domain: `rack=r${n % 3},host=h${n}` });
      const created = await cluster.call<PoolInfo>('POST', '/pools', { name: 'fast', replicas: 3, minReplicas: 3, pgCount: 64, domainLevel: 'rack' });
      assert.equal(created.status, 201, JSON.stringify(created.body));
      assert.deepEqual({ ...created.body, createdAt: undefined, id: undefined }, {
        id: undefined, name: 'fast', replicas: 3, minReplicas: 3, pgCount: 64, domainLevel: 'rack', pgsClean: 64, pgsDegraded: 0, createdAt: undefined,
      });
      const detail = (await cluster.call('GET', '/pools/fast')).body;
      assert.equal(detail.pgs.length, 64);
      for (const pg of detail.pgs) {
        const racks = pg.replicas.map((r: { storeId: number }) => r.storeId % 3);
        assert.equal(new Set(racks).size, 3, `PG ${pg.index} spans 3 racks`);
        assert.ok(pg.replicas.every((r: { state: string }) => r.state === 'clean'));
      }
      assert.equal(detail.stores.reduce((sum: number, s: { pgs: number }) => sum + s.pgs, 0), 64 * 3);
      // Default min replicas is R - floor(R/2); default PG count is the conductor's.
      const plain = (await cluster.call<PoolInfo>('POST', '/pools', { name: 'plain', replicas: 2 })).body;
      assert.deepEqual([plain.minReplicas, plain.pgCount, plain.domainLevel], [1, 16, 'host']);
      const volume = await cluster.call<VolumeInfo>('POST', '/volumes', { name: 'db', size: '1G', pool: 'fast' });
      assert.equal(volume.status, 201);
      assert.equal(volume.body.poolName, 'fast');
      assert.equal(volume.body.replicas, 3);
      const pools = (await cluster.call<{ pools: PoolInfo[] }>('GET', '/pools')).body.pools;
      assert.deepEqual(pools.map((p) => p.name), ['default', 'fast', 'plain']);
      assert.ok(cluster.logs.some((line) => /pool \d+ "fast" created: 3 replicas \(min 3\), 64 PGs/.test(line)));
    } finally {
      await cluster.close();
    }
  });

  it('places PGs in proportion to capacity', async () => {
    const cluster = await startCluster();
    try {
      for (let n = 1; n <= 4; n++) {
        const capacityBytes = (n === 4 ? 300 : 100) * 2 ** 30;
        await cluster.register(n, { disks: [{ uuid: `disk-${n}`, path: `/d${n}`, capacityBytes, usedBytes: 0 }] });
      }
      const created = await cluster.call('POST', '/pools', { name: 'weighted', replicas: 1, pgCount: 1200 });
      assert.equal(created.status, 201, JSON.stringify(created.body));
      const detail = (await cluster.call('GET', '/pools/weighted')).body as { stores: { storeId: number; pgs: number }[] };
      const share = new Map(detail.stores.map((s) => [s.storeId, s.pgs]));
      // Weights 1:1:1:3 of 1200 PGs: 200, 200, 200, 600.
      for (const id of [1, 2, 3]) assert.ok(share.get(id)! > 150 && share.get(id)! < 250, `store ${id}: ${share.get(id)}`);
      assert.ok(share.get(4)! > 530 && share.get(4)! < 670, `store 4: ${share.get(4)}`);
    } finally {
      await cluster.close();
    }
  });

  it('says when replicas share a failure domain', async () => {
    const cluster = await startCluster({ pgCount: 8 });
    try {
      for (const n of [1, 2, 3]) await cluster.register(n, { domain: 'same-host' });
      const status = (await cluster.call<ClusterStatus>('GET', '/status')).body;
      assert.equal(status.health, 'degraded');
      assert.ok(status.messages.some((m) => /pool default: 8 PGs keep two replicas in one "host" failure domain/.test(m)), status.messages.join('; '));
      // An operator's pool create is strict; "store" level accepts any distinct stores.
      expectError(await cluster.call('POST', '/pools', { name: 'strict', replicas: 2 }), 'NOT_READY', /needs 2 distinct "host" failure domains/);
      assert.equal((await cluster.call('POST', '/pools', { name: 'anywhere', replicas: 2, domainLevel: 'store' })).status, 201);
    } finally {
      await cluster.close();
    }
  });
});

describe('conductor: membership', () => {
  it('lists disks; heartbeats update figures at once without a commit per beat', async () => {
    const cluster = await startCluster({ pgCount: 8 });
    try {
      for (const n of [1, 2, 3]) await cluster.register(n);
      const disks = (await cluster.call('GET', '/disks')).body.disks;
      assert.deepEqual(disks.map((d: { storeId: number; uuid: string; storeState: string }) => [d.storeId, d.uuid, d.storeState]), [[1, 'disk-1', 'up'], [2, 'disk-2', 'up'], [3, 'disk-3', 'up']]);
      assert.equal(disks[0].capacityBytes, 100 * 2 ** 30);
      const epoch = (await cluster.map()).epoch;
      for (let used = 1; used <= 5; used++) {
        const beat = await cluster.call('POST', '/stores/2/heartbeat', { disks: [{ uuid: 'disk-2', path: '/disks/2', capacityBytes: 100 * 2 ** 30, usedBytes: used * 2 ** 30, liveBytes: used * 2 ** 29 }] });
        assert.equal(beat.status, 200);
      }
      const store = (await cluster.call<{ stores: StoreInfo[] }>('GET', '/stores')).body.stores.find((s) => s.id === 2)!;
      assert.equal(store.usedBytes, 5 * 2 ** 30, 'the latest figure shows at once');
      assert.equal((await cluster.call('GET', '/disks')).body.disks[1].usedBytes, 5 * 2 ** 30);
      assert.equal((await cluster.call('GET', '/disks')).body.disks[1].liveBytes, 5 * 2 ** 29, 'live bytes as the store reported them');
      assert.equal((await cluster.call('GET', '/disks')).body.disks[0].liveBytes, undefined, 'absent when a store does not report them');
      expectError(await cluster.call('POST', '/stores/2/heartbeat', { disks: [{ uuid: 'disk-2', path: '/disks/2', capacityBytes: 100 * 2 ** 30, usedBytes: 0, liveBytes: -5 }] }), 'INVALID_ARGUMENT');
      assert.equal((await cluster.call<ClusterStatus>('GET', '/status')).body.usedBytes, (1 + 5 * 1024 + 3) * 2 ** 20);
      assert.equal((await cluster.map()).epoch, epoch, 'heartbeats do not change the map');
      // A new disk set is written at once.
      const grown = await cluster.call('POST', '/stores/2/heartbeat', { disks: [{ uuid: 'disk-2', path: '/disks/2', capacityBytes: 200 * 2 ** 30, usedBytes: 0 }] });
      assert.equal(grown.status, 200);
      assert.equal((await cluster.call<{ stores: StoreInfo[] }>('GET', '/stores')).body.stores[1]!.capacityBytes, 200 * 2 ** 30);
    } finally {
      await cluster.close();
    }
  });
});

describe('conductor: tokens', () => {
  it('makes an admin token at first start, asks for it everywhere but the OpenAPI document, and keeps it across restarts', async () => {
    const made: string[] = [];
    const cluster = await startCluster({ auth: 'token', pgCount: 8, adminToken: { onCreated: async (token) => void made.push(token) } });
    let metaPath = cluster.metaPath;
    try {
      assert.equal(made.length, 1);
      assert.match(made[0]!, /^shale_[A-Za-z0-9_-]{43}$/);
      assert.equal(cluster.conductor.newAdminToken, made[0]);
      for (const n of [1, 2, 3]) await cluster.register(n);
      const before = await cluster.map();
      const cases: [string, Record<string, string>][] = [
        ['no token', { authorization: '' }],
        ['wrong token', { authorization: 'Bearer shale_wrong' }],
        ['not bearer', { authorization: `Basic ${made[0]}` }],
        ['too long', { authorization: `Bearer ${'x'.repeat(300)}` }],
      ];
      for (const [what, headers] of cases) {
        for (const [method, path, body] of [['GET', '/volumes', undefined], ['POST', '/volumes', { name: 'v', size: '1G' }], ['GET', '/map', undefined], ['POST', '/stores/register', {}]] as const) {
          const reply = await cluster.raw(method, path, body === undefined ? undefined : JSON.stringify(body), headers);
          expectError(reply, 'UNAUTHENTICATED');
          assert.equal(reply.status, 401, `${what} ${method} ${path}`);
        }
      }
      assert.deepEqual(await cluster.map(), before, 'nothing changed');
      assert.equal((await cluster.call('GET', '/volumes')).body.volumes.length, 0);
      assert.ok(!cluster.logs.some((line) => line.includes(made[0]!)), 'the token never appears in the log');
      assert.equal(cluster.logs.filter((line) => line.includes('UNAUTHENTICATED')).length, 16, 'each refusal logged once');
      const openapi = await cluster.raw('GET', '/openapi.json', undefined, { authorization: 'Bearer nope' });
      assert.equal(openapi.status, 200);
      assert.equal(openapi.body.openapi, '3.1.0');
      await cluster.close();

      const again = await startCluster({ auth: 'token', metaPath, token: made[0], adminToken: { onCreated: async (token) => void made.push(token) } });
      try {
        assert.equal(made.length, 1, 'no new token on a restart');
        assert.equal((await again.call('GET', '/volumes')).status, 200);
      } finally {
        await again.close();
      }
      // Replacing makes a new token; the old one stops working.
      const replaced = await startCluster({ auth: 'token', metaPath, adminToken: { replace: true, onCreated: async (token) => void made.push(token) } });
      metaPath = replaced.metaPath;
      try {
        assert.equal(made.length, 2);
        assert.equal((await replaced.call('GET', '/volumes')).status, 200);
        expectError(await replaced.call('GET', '/volumes', undefined, { authorization: `Bearer ${made[0]}` }), 'UNAUTHENTICATED');
      } finally {
        await replaced.close();
      }
    } finally {
      await cluster.close();
    }
  });

  it('serves an OpenAPI document that lists exactly the routes the server has', async () => {
    const { conductorRoutes } = await import('./api/server.ts');
    const { operations } = await import('./api/openapi.ts');
    const routes = conductorRoutes({} as never).map((route) => `${route.method.toLowerCase()} ${route.path}`).sort();
    const documented = Object.entries(operations).flatMap(([path, methods]) => Object.keys(methods).map((method) => `${method} ${path}`)).sort();
    assert.deepEqual(documented, routes);
    const cluster = await startCluster();
    try {
      const document = (await cluster.call('GET', '/openapi.json')).body;
      assert.equal(document.paths['/volumes'].post.requestBody.content['application/json'].schema.$ref, '#/components/schemas/CreateVolumeRequest');
      for (const [name, schema] of Object.entries(document.components.schemas)) assert.ok(schema, name);
      const refs = JSON.stringify(document).match(/#\/components\/schemas\/[A-Za-z]+/g)!;
      for (const target of new Set(refs)) assert.ok(document.components.schemas[target.split('/').pop()!], `${target} is defined`);
    } finally {
      await cluster.close();
    }
  });
});

describe('conductor: map long poll', () => {
  it('answers at once when newer, wakes on a change, and times out with the same map', async () => {
    const cluster = await startCluster({ pgCount: 8 });
    try {
      for (const n of [1, 2, 3]) await cluster.register(n);
      await cluster.call('POST', '/volumes', { name: 'v', size: '1G' });
      const current = await cluster.map();

      const immediate = await cluster.call<ClusterMap>('GET', `/map?since=${current.epoch - 1}&waitMs=10000`);
      assert.equal(immediate.body.epoch, current.epoch);

      const started = clock.nowMs();
      const timedOut = await cluster.call<ClusterMap>('GET', `/map?since=${current.epoch}&waitMs=150`);
      const waited = clock.nowMs() - started;
      assert.ok(waited >= 140 && waited < 2000, `waited ${waited} ms`);
      assert.deepEqual(timedOut.body, current);

      const polling = cluster.call<ClusterMap>('GET', `/map?since=${current.epoch}&waitMs=20000`);
      const polling2 = cluster.call<ClusterMap>('GET', `/map?since=${current.epoch}&waitMs=20000`);
      await clock.sleep(50);
      const changeAt = clock.nowMs();
      await cluster.call('POST', '/volumes/v/open', { owner: 'gw' });
      const [woken, woken2] = await Promise.all([polling, polling2]);
      assert.ok(clock.nowMs() - changeAt < 1000);
      assert.equal(woken.body.epoch, current.epoch + 1);
      assert.deepEqual(woken2.body, woken.body);
    } finally {
      await cluster.close();
    }
  });

  it('answers pending long polls with SHUTTING_DOWN on close', async () => {
    const cluster = await startCluster();
    const epoch = (await cluster.map()).epoch;
    const polling = cluster.call('GET', `/map?since=${epoch}&waitMs=20000`).catch((error: unknown) => error);
    await clock.sleep(50);
    await cluster.close();
    const outcome = await polling;
    // Either the answer got out before the socket closed, or the connection was cut.
    if (!(outcome instanceof Error)) expectError(outcome as Reply, 'SHUTTING_DOWN');
  });
});

describe('conductor: restart', () => {
  it('keeps cluster id, stores, pools, volumes, owners and epochs across a restart on the same file', async () => {
    const first = await startCluster({ pgCount: 16 });
    for (const n of [1, 2, 3]) await first.register(n);
    await first.call('POST', '/volumes', { name: 'keep', size: '2G' });
    await first.call('POST', '/volumes', { name: 'gone', size: '1G' });
    await first.call('POST', '/volumes/keep/open', { owner: 'gw' });
    await first.call('DELETE', '/volumes/gone');
    const mapBefore = await first.map();
    const volumesBefore = (await first.call('GET', '/volumes')).body;
    const clusterId = first.conductor.clusterId;
    await first.close();

    // A second conductor cannot open the file while the first runs; after close it can.
    const second = await startCluster({ metaPath: first.metaPath, pgCount: 16 });
    try {
      assert.equal(second.conductor.clusterId, clusterId);
      assert.deepEqual(await second.map(), mapBefore);
      assert.deepEqual((await second.call('GET', '/volumes')).body, volumesBefore);
      // Ids keep growing after the restart: the next volume is 3, the next store 4.
      assert.equal((await second.call<VolumeInfo>('POST', '/volumes', { name: 'gone', size: '1G' })).body.id, 3);
      assert.equal(await second.register(4), 4);
      assert.equal(await second.register(1), 1);
      const reopened = await second.call<OpenVolumeResponse>('POST', '/volumes/keep/open', { owner: 'gw' });
      assert.equal(reopened.body.ownerEpoch, 2);
    } finally {
      await second.close();
    }
  });

  it('refuses a second conductor on a file in use', async () => {
    const first = await startCluster();
    try {
      await assert.rejects(startCluster({ metaPath: first.metaPath }), (error: any) => error.code === 'UNAVAILABLE' && /in use by another conductor/.test(error.message));
    } finally {
      await first.close();
    }
  });

  it('refuses bad options and the etcd MetaStore with a clear code', async () => {
    await assert.rejects(startCluster({ metaPath: 'etcd://127.0.0.1:1' }), (error: any) => error.code === 'UNAVAILABLE' && /etcd/.test(error.message));
    await assert.rejects(startCluster({ metaPath: 'etcd://nohost' }), (error: any) => error.code === 'INVALID_ARGUMENT');
    await assert.rejects(startCluster({ pgCount: 0 }), (error: any) => error.code === 'INVALID_ARGUMENT' && /pgCount/.test(error.message));
    await assert.rejects(startCluster({ listen: 'nowhere' }), (error: any) => error.code === 'INVALID_ARGUMENT' && /listen/.test(error.message));
  });
});
