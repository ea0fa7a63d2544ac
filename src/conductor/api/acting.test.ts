import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { actingReplicas, pgNeeds, poolNeeds } from './acting.ts';
import type { ClusterMap, PgEntry, PoolMapEntry, ReplicaState, StoreState } from './types.ts';

/** A map of stores 1..n in the given states, and one pool whose PGs hold the given replicas. */
function mapOf(stores: StoreState[], minReplicas: number, pgs: [number, ReplicaState][][]): { map: ClusterMap; pool: PoolMapEntry } {
  const pool: PoolMapEntry = {
    id: 7, name: 'p', replicas: 3, minReplicas, pgCount: pgs.length,
    pgs: pgs.map((replicas): PgEntry => ({ epoch: 1, replicas: replicas.map(([storeId, state]) => ({ storeId, state })) })),
  };
  const map = {
    clusterId: 'c', epoch: 1, stores: stores.map((state, index) => ({ id: index + 1, address: `a${index + 1}`, domain: `d${index + 1}`, state })),
    pools: [pool], owners: [], deletedVolumes: [], volumeSizes: [],
  } as unknown as ClusterMap;
  return { map, pool };
}

describe('acting replicas and what a PG can do without', () => {
  it('acting replicas are those not down, on stores that are up', () => {
    const { map, pool } = mapOf(['up', 'down', 'up'], 1, [[[1, 'clean'], [2, 'clean'], [3, 'down']]]);
    assert.deepEqual(actingReplicas(map, pool.pgs[0]!).map((replica) => replica.storeId), [1]);
  });

  it('a PG of three clean replicas, minimum 2, can do without one store but not two', () => {
    const { map, pool } = mapOf(['up', 'up', 'up'], 2, [[[1, 'clean'], [2, 'clean'], [3, 'clean']]]);
    assert.equal(pgNeeds(map, pool, 0, new Set([2])), undefined);
    assert.match(pgNeeds(map, pool, 0, new Set([2, 3]))!, /PG 7\.0 would have fewer than 2 acting replica/);
    assert.equal(pgNeeds(map, pool, 0, new Set([9])), undefined, 'a store not in the PG changes nothing');
  });

  it('a PG at its minimum already cannot lose a replica, and stores already down do not count', () => {
    const { map, pool } = mapOf(['up', 'down', 'up'], 2, [[[1, 'clean'], [2, 'clean'], [3, 'clean']]]);
    assert.match(pgNeeds(map, pool, 0, new Set([1]))!, /fewer than 2/);
    assert.equal(pgNeeds(map, pool, 0, new Set([2])), undefined, 'store 2 is not acting: nothing leaves');
  });

  it('the only clean replica is needed even where a recovering one keeps the minimum', () => {
    const { map, pool } = mapOf(['up', 'up'], 1, [[[1, 'clean'], [2, 'recovering']]]);
    assert.match(pgNeeds(map, pool, 0, new Set([1]))!, /PG 7\.0 would have no clean replica left/);
    assert.equal(pgNeeds(map, pool, 0, new Set([2])), undefined, 'the recovering one may go');
    const twoClean = mapOf(['up', 'up', 'up'], 1, [[[1, 'clean'], [2, 'recovering'], [3, 'clean']]]);
    assert.equal(pgNeeds(twoClean.map, twoClean.pool, 0, new Set([1])), undefined, 'another clean replica remains');
    const otherDown = mapOf(['up', 'up', 'down'], 1, [[[1, 'clean'], [2, 'recovering'], [3, 'clean']]]);
    assert.match(pgNeeds(otherDown.map, otherDown.pool, 0, new Set([1]))!, /no clean replica left/, 'a clean replica on a down store does not count');
  });

  it('poolNeeds names the first PG that cannot do without the stores', () => {
    const { map, pool } = mapOf(['up', 'up', 'up'], 1, [[[1, 'clean'], [2, 'clean']], [[2, 'clean'], [3, 'clean']], [[1, 'clean']]]);
    assert.equal(poolNeeds(map, pool, new Set([2])), undefined);
    assert.match(poolNeeds(map, pool, new Set([1]))!, /PG 7\.2 would have fewer than 1 acting replica/);
    assert.match(poolNeeds(map, pool, new Set([2, 3]))!, /PG 7\.1/);
  });
});
