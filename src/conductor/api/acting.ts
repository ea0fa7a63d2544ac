/**
 * Questions about a map that clients and stores both ask (DESIGN §3): which replicas of a PG act
 * (take writes), and whether PGs keep their minimum of acting replicas without some stores — the
 * test for taking a store whose disk failed out of the acting sets instead of failing the I/O.
 */
import type { ClusterMap, PgEntry, PoolMapEntry } from './types.ts';

export function isUp(map: ClusterMap, storeId: number): boolean {
  return map.stores.some((store) => store.id === storeId && store.state === 'up');
}

/** A PG's acting replicas: those not down, on stores that are up. */
export function actingReplicas(map: ClusterMap, pg: PgEntry): PgEntry['replicas'] {
  return pg.replicas.filter((replica) => replica.state !== 'down' && isUp(map, replica.storeId));
}

/**
 * The first PG of `pool` in which one of `storeIds` acts and which would be left with fewer than
 * the pool's minimum of acting replicas without them, as "poolId.pg"; undefined if there is none.
 */
export function pgShortWithout(map: ClusterMap, pool: PoolMapEntry, storeIds: ReadonlySet<number>): string | undefined {
  for (let index = 0; index < pool.pgs.length; index++) {
    const acting = actingReplicas(map, pool.pgs[index]!);
    let left = 0;
    for (const replica of acting) if (!storeIds.has(replica.storeId)) left++;
    if (left < acting.length && left < pool.minReplicas) return `${pool.id}.${index}`;
  }
  return undefined;
}
