/**
 * Read-side views: the ClusterMap, status and list answers of the API, built from one read
 * transaction (so every answer is one consistent snapshot). Pure over the records given.
 */
import type {
  ClusterMap, ClusterStatus, PoolInfo, PoolMapEntry, StoreInfo, VolumeInfo,
} from './api/types.ts';
import type { MetaReadTx, PgRecord, PoolRecord, StoreRecord, VolumeRecord } from './meta/meta-store.ts';
import { defaultPoolName } from './cluster-ops.ts';

export async function buildMap(tx: MetaReadTx, clusterId: string): Promise<ClusterMap> {
  const stores = await tx.stores();
  const pools: PoolMapEntry[] = [];
  for (const pool of await tx.pools()) {
    const pgs = await tx.pgs(pool.id);
    pools.push({
      id: pool.id,
      name: pool.name,
      replicas: pool.replicas,
      minReplicas: pool.minReplicas,
      pgCount: pool.pgCount,
      pgs: pgs.map((pg) => ({ epoch: pg.epoch, replicas: pg.replicas.map((r) => ({ storeId: r.storeId, state: r.state })) })),
    });
  }
  const owners: [number, number][] = [];
  for (const volume of await tx.volumes()) {
    if (volume.ownerEpoch > 0) owners.push([volume.id, volume.ownerEpoch]);
  }
  return {
    clusterId,
    epoch: await tx.counter('mapEpoch'),
    stores: stores.map((s) => ({ id: s.id, address: s.address, domain: s.domain, state: s.state })),
    pools,
    owners,
    deletedVolumes: (await tx.deletedVolumes()).map((d) => d.id),
  };
}

export function volumeInfo(volume: VolumeRecord, pool: PoolRecord): VolumeInfo {
  return {
    id: volume.id,
    name: volume.name,
    sizeBytes: volume.sizeBytes,
    chunkSizeBytes: volume.chunkSizeBytes,
    poolId: pool.id,
    poolName: pool.name,
    replicas: pool.replicas,
    owner: volume.owner,
    ownerEpoch: volume.ownerEpoch,
    createdAt: volume.createdAt,
  };
}

export async function volumeInfos(tx: MetaReadTx): Promise<VolumeInfo[]> {
  const pools = new Map((await tx.pools()).map((p) => [p.id, p]));
  return (await tx.volumes()).map((v) => volumeInfo(v, pools.get(v.poolId)!));
}

/** Live heartbeat times the conductor keeps in memory (more recent than the MetaStore's). */
export type HeartbeatTimes = ReadonlyMap<number, string>;

export function storeInfo(store: StoreRecord, heartbeats: HeartbeatTimes): StoreInfo {
  return {
    id: store.id,
    address: store.address,
    domain: store.domain,
    state: store.state,
    capacityBytes: store.capacityBytes,
    usedBytes: store.usedBytes,
    lastHeartbeatAt: heartbeats.get(store.id) ?? store.lastHeartbeatAt,
    disks: store.disks,
  };
}

interface PgHealth {
  clean: number;
  degraded: number;
  /** PGs with fewer than minReplicas replicas up (clean or recovering): writes wait. */
  belowMin: number;
  /** PGs with no clean replica: reads wait. */
  unreadable: number;
}

function pgHealth(pool: PoolRecord, pgs: readonly PgRecord[]): PgHealth {
  const health: PgHealth = { clean: 0, degraded: 0, belowMin: 0, unreadable: 0 };
  for (const pg of pgs) {
    const clean = pg.replicas.filter((r) => r.state === 'clean').length;
    const available = pg.replicas.filter((r) => r.state !== 'down').length;
    if (clean === pg.replicas.length && clean === pool.replicas) health.clean++;
    else health.degraded++;
    if (available < pool.minReplicas) health.belowMin++;
    if (clean === 0) health.unreadable++;
  }
  return health;
}

export function poolInfo(pool: PoolRecord, pgs: readonly PgRecord[]): PoolInfo {
  const health = pgHealth(pool, pgs);
  return {
    id: pool.id,
    name: pool.name,
    replicas: pool.replicas,
    minReplicas: pool.minReplicas,
    pgCount: pool.pgCount,
    pgsClean: health.clean,
    pgsDegraded: health.degraded,
  };
}

export async function poolInfos(tx: MetaReadTx): Promise<PoolInfo[]> {
  const result: PoolInfo[] = [];
  for (const pool of await tx.pools()) result.push(poolInfo(pool, await tx.pgs(pool.id)));
  return result;
}

function plural(count: number, word: string): string {
  return `${count} ${word}${count === 1 ? '' : 's'}`;
}

/**
 * health: `error` when some PG cannot serve (no clean replica, or fewer than minReplicas up) or
 * there are no stores; `degraded` when a store is down, a PG is not fully clean, or the default
 * pool is still waiting for stores; `ok` otherwise.
 */
export async function buildStatus(tx: MetaReadTx, clusterId: string, defaultReplicas: number): Promise<ClusterStatus> {
  const stores = await tx.stores();
  const up = stores.filter((s) => s.state === 'up').length;
  const messages: string[] = [];
  let errors = 0;
  let degraded = 0;
  if (stores.length === 0) {
    messages.push('no stores registered yet');
    errors++;
  }
  for (const store of stores) {
    if (store.state !== 'up') {
      messages.push(`store ${store.id} (${store.address}) ${store.state} since epoch ${store.stateEpoch}`);
      degraded++;
    }
  }
  const pools: PoolInfo[] = [];
  for (const pool of await tx.pools()) {
    const pgs = await tx.pgs(pool.id);
    const health = pgHealth(pool, pgs);
    pools.push(poolInfo(pool, pgs));
    if (health.degraded > 0) {
      messages.push(`pool ${pool.name}: ${health.degraded} of ${pool.pgCount} PGs degraded`);
      degraded++;
    }
    if (health.belowMin > 0) {
      messages.push(`pool ${pool.name}: ${plural(health.belowMin, 'PG')} below ${pool.minReplicas} available replicas: writes there wait`);
      errors++;
    }
    if (health.unreadable > 0) {
      messages.push(`pool ${pool.name}: ${plural(health.unreadable, 'PG')} without a clean replica: reads there wait`);
      errors++;
    }
  }
  if (stores.length > 0 && !(await tx.poolByName(defaultPoolName))) {
    messages.push(`default pool waits for ${defaultReplicas} stores up (${up} up)`);
    degraded++;
  }
  const volumes = await tx.volumes();
  return {
    clusterId,
    epoch: await tx.counter('mapEpoch'),
    health: errors > 0 ? 'error' : degraded > 0 ? 'degraded' : 'ok',
    stores: { total: stores.length, up, down: stores.length - up },
    pools,
    volumes: volumes.length,
    capacityBytes: stores.reduce((sum, s) => sum + s.capacityBytes, 0),
    usedBytes: stores.reduce((sum, s) => sum + s.usedBytes, 0),
    provisionedBytes: volumes.reduce((sum, v) => sum + v.sizeBytes, 0),
    messages,
  };
}
