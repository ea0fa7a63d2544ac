import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { ClusterMap, PgEntry } from '../conductor/api/types.ts';
import { MapStoreView } from './store-view.ts';

function pool(id: number, epochs: number[], storeId: number): ClusterMap['pools'][number] {
  const pgs: PgEntry[] = epochs.map((epoch) => ({ epoch, replicas: [{ storeId, state: 'clean' }] }));
  return { id, name: `pool-${id}`, replicas: 1, minReplicas: 1, pgCount: pgs.length, pgs };
}

function map(pools: ClusterMap['pools']): ClusterMap {
  return { clusterId: 'c', epoch: 1, stores: [], pools, owners: [], deletedVolumes: [], volumeSizes: [] };
}

test('PG epochs: per pool and PG, raised by maps and requests, never lowered', () => {
  const view = new MapStoreView();
  view.storeId = 1;
  assert.equal(view.pgEpoch(1, 0), 0, 'unknown before any map');
  view.apply(map([pool(1, [3, 5], 1), pool(2, [7], 1)]));
  assert.equal(view.pgEpoch(1, 0), 3);
  assert.equal(view.pgEpoch(1, 1), 5);
  assert.equal(view.pgEpoch(2, 0), 7, 'pools keep their own PGs');
  assert.equal(view.pgEpoch(2, 1), 0, 'a PG no map named');
  assert.equal(view.pgEpoch(9, 0), 0, 'a pool no map named');

  view.notePgEpoch(1, 0, 4);
  assert.equal(view.pgEpoch(1, 0), 4, 'a request at a newer epoch raises it');
  view.notePgEpoch(1, 0, 2);
  assert.equal(view.pgEpoch(1, 0), 4, 'an older one does not lower it');
  view.apply(map([pool(1, [3, 6], 1)]));
  assert.equal(view.pgEpoch(1, 0), 4, 'nor does an older map');
  assert.equal(view.pgEpoch(1, 1), 6);
  view.notePgEpoch(3, 1_000_000, 2);
  assert.equal(view.pgEpoch(3, 1_000_000), 2, 'a far PG id of a new pool');
  assert.equal(view.pgEpoch(3, 0), 0);
});
