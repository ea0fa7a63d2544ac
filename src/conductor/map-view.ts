/**
 * Read-side views: the ClusterMap, status and list answers of the API, built from one read
 * transaction (so every answer is one consistent snapshot). Pure over the records given.
 */
import type {
  ClusterMap, ClusterStatus, ConductorInfo, DiskInfo, DiskReport, PoolDetail, PoolInfo, PoolMapEntry, StoreInfo, VolumeInfo,
} from './api/types.ts';
import type { MetaReadTx, PgRecord, PoolRecord, StoreRecord, VolumeRecord } from './meta/meta-store.ts';
import { defaultPoolName } from './cluster-ops.ts';
import { snapContexts } from './snapshot-ops.ts';
import { domainAt } from './placement/rendezvous.ts';

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
      pgs: pgs.map((pg) => ({ epoch: pg.epoch, replicas: pg.replicas.map((r) => ({ storeId: r.storeId, state: r.state, sinceEpoch: r.sinceEpoch })) })),
    });
  }
  const owners: [number, number][] = [];
  const volumeSizes: [number, number][] = [];
  const volumes = await tx.volumes();
  for (const volume of volumes) {
    if (volume.ownerEpoch > 0) owners.push([volume.id, volume.ownerEpoch]);
    if (volume.ownerEpoch > 0) volumeSizes.push([volume.id, volume.sizeBytes]);
  }
  return {
    clusterId,
    epoch: await tx.counter('mapEpoch'),
    stores: stores.map((s) => ({ id: s.id, address: s.address, domain: s.domain, state: s.state })),
    pools,
    owners,
    deletedVolumes: (await tx.deletedVolumes()).map((d) => d.id),
    volumeSizes,
    snapContexts: await snapContexts(tx, volumes),
  };
}

/** volumeInfo with the snapshot count and the parent's names (one more read). */
export async function volumeInfoWithSnapshots(tx: MetaReadTx, volume: VolumeRecord, pool: PoolRecord): Promise<VolumeInfo> {
  const info = volumeInfo(volume, pool);
  info.snapshots = (await tx.snapshots(volume.id)).length;
  if (volume.parentVolumeId && volume.parentSnapshotId) {
    const parent = await tx.volume(volume.parentVolumeId);
    const snapshot = await tx.snapshot(volume.parentVolumeId, volume.parentSnapshotId);
    info.parent = { volumeId: volume.parentVolumeId, volume: parent?.name ?? '?', snapshotId: volume.parentSnapshotId, snapshot: snapshot?.name ?? '?' };
  }
  return info;
}

export function volumeInfo(volume: VolumeRecord, pool: PoolRecord, snapshots = 0): VolumeInfo {
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
    snapSeq: volume.snapSeq ?? 0,
    snapshots,
    parent: volume.parentVolumeId ? { volumeId: volume.parentVolumeId, volume: '', snapshotId: volume.parentSnapshotId ?? 0, snapshot: '' } : null,
  };
}

export async function volumeInfos(tx: MetaReadTx): Promise<VolumeInfo[]> {
  const pools = new Map((await tx.pools()).map((p) => [p.id, p]));
  const counts = new Map<number, number>();
  for (const snapshot of await tx.allSnapshots()) counts.set(snapshot.volumeId, (counts.get(snapshot.volumeId) ?? 0) + 1);
  const result: VolumeInfo[] = [];
  for (const volume of await tx.volumes()) {
    result.push(volume.parentVolumeId ? await volumeInfoWithSnapshots(tx, volume, pools.get(volume.poolId)!) : volumeInfo(volume, pools.get(volume.poolId)!, counts.get(volume.id) ?? 0));
  }
  return result;
}

/**
 * What the leading conductor keeps in memory from heartbeats, more recent than the MetaStore's
 * copy (which is refreshed at most every diskPersistIntervalMs): time and disk figures.
 */
export interface LiveHeartbeat {
  at: string;
  disks: DiskReport[];
}

export type LiveHeartbeats = ReadonlyMap<number, LiveHeartbeat>;

function totals(disks: readonly DiskReport[]): { capacityBytes: number; usedBytes: number } {
  return disks.reduce((sum, disk) => ({ capacityBytes: sum.capacityBytes + disk.capacityBytes, usedBytes: sum.usedBytes + disk.usedBytes }), { capacityBytes: 0, usedBytes: 0 });
}

/** A store record with the live heartbeat figures laid over it (only while it is up). */
export function withLive(store: StoreRecord, live: LiveHeartbeats): StoreRecord {
  const beat = store.state === 'up' ? live.get(store.id) : undefined;
  return beat ? { ...store, ...totals(beat.disks), disks: beat.disks, lastHeartbeatAt: beat.at } : store;
}

export function storeInfo(store: StoreRecord, live: LiveHeartbeats): StoreInfo {
  const current = withLive(store, live);
  return {
    id: current.id,
    address: current.address,
    domain: current.domain,
    state: current.state,
    capacityBytes: current.capacityBytes,
    usedBytes: current.usedBytes,
    lastHeartbeatAt: current.lastHeartbeatAt,
    disks: current.disks,
  };
}

/** Every disk of every store, ordered by store id. */
export function diskInfos(stores: readonly StoreRecord[], live: LiveHeartbeats): DiskInfo[] {
  const result: DiskInfo[] = [];
  for (const store of stores.map((s) => withLive(s, live))) {
    for (const disk of store.disks) {
      result.push({
        uuid: disk.uuid, path: disk.path, capacityBytes: disk.capacityBytes, usedBytes: disk.usedBytes,
        ...(disk.liveBytes === undefined ? {} : { liveBytes: disk.liveBytes }),
        storeId: store.id, storeAddress: store.address, storeState: store.state, domain: store.domain,
      });
    }
  }
  return result;
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
    domainLevel: pool.domainLevel,
    pgsClean: health.clean,
    pgsDegraded: health.degraded,
    createdAt: pool.createdAt,
  };
}

export function poolDetail(pool: PoolRecord, pgs: readonly PgRecord[], capacity?: ReturnType<typeof poolCapacity>): PoolDetail {
  const perStore = new Map<number, { pgs: number; preferred: number }>();
  for (const pg of pgs) {
    pg.replicas.forEach((replica, i) => {
      const entry = perStore.get(replica.storeId) ?? { pgs: 0, preferred: 0 };
      entry.pgs++;
      if (i === 0) entry.preferred++;
      perStore.set(replica.storeId, entry);
    });
  }
  return {
    ...poolInfo(pool, pgs),
    ...(capacity ?? {}),
    stores: [...perStore].sort(([a], [b]) => a - b).map(([storeId, counts]) => ({ storeId, ...counts })),
    pgs: pgs.map((pg) => ({ index: pg.index, epoch: pg.epoch, replicas: pg.replicas.map((r) => ({ storeId: r.storeId, state: r.state })) })),
  };
}

/** PGs of the pool with two replicas in one failure domain of the pool's level. */
function pgsSharingDomain(pool: PoolRecord, pgs: readonly PgRecord[], stores: ReadonlyMap<number, StoreRecord>): number {
  if (pool.domainLevel === 'store') return 0;
  let shared = 0;
  for (const pg of pgs) {
    const domains = pg.replicas.map((r) => {
      const store = stores.get(r.storeId);
      return (store && domainAt(store.domain, pool.domainLevel)) ?? `\u0000store-${r.storeId}`;
    });
    if (new Set(domains).size < domains.length) shared++;
  }
  return shared;
}

export async function poolInfos(tx: MetaReadTx): Promise<PoolInfo[]> {
  const result: PoolInfo[] = [];
  const stores = await tx.stores();
  const volumes = await tx.volumes();
  for (const pool of await tx.pools()) {
    const pgs = await tx.pgs(pool.id);
    result.push({ ...poolInfo(pool, pgs), ...poolCapacity(pool, pgs, stores, volumes) });
  }
  return result;
}

/** Thin provisioning figures of a pool: provisioned bytes against usable capacity. */
export function poolCapacity(pool: PoolRecord, pgs: readonly PgRecord[], stores: readonly StoreRecord[], volumes: readonly VolumeRecord[]): { provisionedBytes: number; usableBytes: number; overcommitRatio: number } {
  const storeIds = new Set<number>();
  for (const pg of pgs) for (const replica of pg.replicas) storeIds.add(replica.storeId);
  const rawBytes = stores.filter((store) => storeIds.has(store.id)).reduce((sum, store) => sum + store.capacityBytes, 0);
  const usableBytes = Math.floor(rawBytes / Math.max(1, pool.replicas));
  const provisionedBytes = volumes.filter((volume) => volume.poolId === pool.id).reduce((sum, volume) => sum + volume.sizeBytes, 0);
  return { provisionedBytes, usableBytes, overcommitRatio: usableBytes > 0 ? Math.round((provisionedBytes / usableBytes) * 1000) / 1000 : 0 };
}

function plural(count: number, word: string): string {
  return `${count} ${word}${count === 1 ? '' : 's'}`;
}

/**
 * health: `error` when some PG cannot serve (no clean replica, or fewer than minReplicas up) or
 * there are no stores; `degraded` when a store is down, a PG is not fully clean, or the default
 * pool is still waiting for stores; `ok` otherwise.
 */
export async function buildStatus(tx: MetaReadTx, clusterId: string, defaultReplicas: number, live: LiveHeartbeats, conductor: ConductorInfo): Promise<ClusterStatus> {
  const stores = (await tx.stores()).map((s) => withLive(s, live));
  const storesById = new Map(stores.map((s) => [s.id, s]));
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
    const shared = pgsSharingDomain(pool, pgs, storesById);
    if (shared > 0) {
      messages.push(`pool ${pool.name}: ${plural(shared, 'PG')} keep two replicas in one "${pool.domainLevel}" failure domain: give stores distinct --domain labels`);
      degraded++;
    }
  }
  if (!conductor.leaderUrl) {
    messages.push('no conductor leads: changes wait until one is elected');
    degraded++;
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
    conductor,
  };
}
