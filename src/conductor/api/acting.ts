/**
 * Questions about a map that clients and stores both ask (DESIGN §3): which replicas of a PG act
 * (take writes), and whether a PG can do without some stores — the test for taking a store whose
 * disk failed out of service instead of failing the I/O: the PG must keep its minimum of acting
 * replicas, and a clean replica (the only kind reads use) if one of those stores holds one.
 */
import type { ClusterMap, PgEntry, PoolMapEntry } from './types.ts';

export function isUp(map: ClusterMap, storeId: number): boolean {
  return map.stores.some((store) => store.id === storeId && store.state === 'up');
}

/** Whether a replica acts (takes writes): it is not down, and its store is up. */
export function acts(map: ClusterMap, replica: PgEntry['replicas'][number]): boolean {
  return replica.state !== 'down' && isUp(map, replica.storeId);
}

/** A PG's acting replicas. */
export function actingReplicas(map: ClusterMap, pg: PgEntry): PgEntry['replicas'] {
  return pg.replicas.filter((replica) => acts(map, replica));
}

/** Why PG `pgIndex` of `pool` cannot do without `storeIds`, or undefined if it can. */
export function pgNeeds(map: ClusterMap, pool: PoolMapEntry, pgIndex: number, storeIds: ReadonlySet<number>): string | undefined {
  const acting = actingReplicas(map, pool.pgs[pgIndex]!);
  let left = 0;
  let cleanLeft = 0;
  let cleanLeaving = 0;
  for (const replica of acting) {
    const leaving = storeIds.has(replica.storeId);
    if (!leaving) left++;
    if (replica.state === 'clean') {
      if (leaving) cleanLeaving++;
      else cleanLeft++;
    }
  }
  if (left < acting.length && left < pool.minReplicas) return `PG ${pool.id}.${pgIndex} would have fewer than ${pool.minReplicas} acting replica(s)`;
  if (cleanLeaving > 0 && cleanLeft === 0) return `PG ${pool.id}.${pgIndex} would have no clean replica left`;
  return undefined;
}

/** The first PG of `pool` that cannot do without `storeIds`, and why; undefined if every one can. */
export function poolNeeds(map: ClusterMap, pool: PoolMapEntry, storeIds: ReadonlySet<number>): string | undefined {
  for (let index = 0; index < pool.pgs.length; index++) {
    const why = pgNeeds(map, pool, index, storeIds);
    if (why !== undefined) return why;
  }
  return undefined;
}
