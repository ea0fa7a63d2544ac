import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { applyMove, describePlan, fullnessLevel, planAfter, planMoves, volumePgs } from './healing.ts';
import type { PgRecord, PoolRecord, StoreRecord } from './meta/meta-store.ts';
import { placePool } from './placement/rendezvous.ts';
import { placementGroupOf } from '../lib/placement-hash.ts';

const GiB = 1024 ** 3;

function store(id: number, state: StoreRecord['state'] = 'up', extra: Partial<StoreRecord> = {}): StoreRecord {
  return {
    id, diskUuid: `disk-${id}`, address: `127.0.0.1:${1000 + id}`, domain: `host-${id}`, state, stateEpoch: 1,
    capacityBytes: 100 * GiB, usedBytes: 10 * GiB, lastHeartbeatAt: null, disks: [], ...extra,
  };
}

const pool: PoolRecord = { id: 1, name: 'default', replicas: 3, minReplicas: 2, pgCount: 128, domainLevel: 'host', createdAt: '' };

function placed(stores: StoreRecord[]): PgRecord[] {
  const candidates = stores.map((s) => ({ id: s.id, domain: s.domain, weight: s.capacityBytes }));
  return placePool(pool.id, pool.pgCount, pool.replicas, candidates).map((ids, index) => ({
    poolId: pool.id, index, epoch: 1, replicas: ids.map((storeId) => ({ storeId, state: 'clean' as const, sinceEpoch: 1 })), lastClean: [],
  }));
}

/** Applies every planned move, marks new replicas clean, and repeats until nothing is left. */
function converge(stores: StoreRecord[], pgs: PgRecord[]): { pgs: PgRecord[]; added: number; removed: number } {
  let added = 0;
  let removed = 0;
  for (let round = 0; round < 5; round++) {
    const moves = planMoves(stores, [{ pool, pgs }]).filter((move) => move.add.length > 0 || move.remove.length > 0);
    if (moves.length === 0) return { pgs, added, removed };
    for (const move of moves) {
      added += move.add.length;
      removed += move.remove.length;
      pgs[move.pgIndex] = applyMove(pgs[move.pgIndex]!, move, 10 + round);
    }
    for (const pg of pgs) for (const replica of pg.replicas) if (replica.state === 'recovering') replica.state = 'clean';
  }
  throw new Error('placement did not converge');
}

describe('healing placement', () => {
  it('moves nothing while every store is up or only down (a short outage)', () => {
    const stores = [1, 2, 3, 4].map((id) => store(id));
    const pgs = placed(stores);
    assert.deepEqual(planMoves(stores, [{ pool, pgs }]), []);
    stores[1]!.state = 'down';
    assert.deepEqual(planMoves(stores, [{ pool, pgs }]), [], 'a down store keeps its PGs until it is out');
  });

  it('an out store: each of its PGs gets one new recovering replica on another store; the out one is dropped once that is clean', () => {
    const stores = [1, 2, 3, 4, 5].map((id) => store(id));
    const pgs = placed(stores);
    const held = pgs.filter((pg) => pg.replicas.some((r) => r.storeId === 2)).length;
    stores[1]!.state = 'out';
    const moves = planMoves(stores, [{ pool, pgs }]);
    assert.equal(moves.length, held, 'only the PGs the out store held move');
    for (const move of moves) {
      assert.equal(move.add.length, 1);
      assert.deepEqual(move.remove, [], 'the out replica stays until the new one is clean');
      const after = applyMove(pgs[move.pgIndex]!, move, 7);
      assert.equal(after.epoch, 7);
      assert.equal(after.replicas.find((r) => r.storeId === move.add[0])!.state, 'recovering');
    }
    const result = converge(stores, pgs);
    assert.equal(result.added, held);
    assert.equal(result.removed, held);
    for (const pg of result.pgs) {
      assert.equal(pg.replicas.length, 3);
      assert.ok(pg.replicas.every((r) => r.storeId !== 2 && r.state === 'clean'));
    }
  });

  it('a new store takes about R/N of the replicas and nothing else moves (minimal movement)', () => {
    const stores = [1, 2, 3, 4].map((id) => store(id));
    const pgs = placed(stores);
    stores.push(store(5));
    const result = converge(stores, pgs);
    const onNew = result.pgs.filter((pg) => pg.replicas.some((r) => r.storeId === 5)).length;
    assert.equal(result.added, onNew, 'every added replica is on the new store');
    assert.equal(result.removed, onNew, 'one old holder leaves per moved PG');
    // Expected share 3/5 of 128 PGs ≈ 77.
    assert.ok(onNew > 55 && onNew < 100, `new store holds ${onNew} PGs`);
  });

  it('drain moves every replica off the store; a dry run (planAfter) changes nothing and counts what will move', () => {
    const stores = [1, 2, 3, 4].map((id) => store(id));
    const pgs = placed(stores);
    const held = pgs.filter((pg) => pg.replicas.some((r) => r.storeId === 4)).length;
    const { moves, dropsLater } = planAfter(stores, [{ pool, pgs }], (copy) => {
      copy.find((s) => s.id === 4)!.draining = true;
    });
    assert.equal(stores[3]!.draining, undefined, 'the records given are not changed');
    const plan = describePlan(moves, 1000, 0, dropsLater);
    assert.equal(plan.pgs, held);
    assert.equal(plan.replicas, held);
    assert.equal(plan.replicasRemoved, held);
    assert.equal(plan.bytes, held * 1000);
    assert.equal(plan.rateMeasured, false);
    assert.ok(plan.seconds > 0);
    assert.equal(plan.stores.find((s) => s.storeId === 4)!.givesUp, held);
    stores[3]!.draining = true;
    const result = converge(stores, pgs);
    assert.ok(result.pgs.every((pg) => pg.replicas.every((r) => r.storeId !== 4)));
  });

  it('no new replica goes to a store at or above backfillfull; the PG says why and keeps its replicas', () => {
    const stores = [1, 2, 3, 4].map((id) => store(id));
    const pgs = placed(stores);
    stores.push(store(5, 'up', { usedBytes: 91 * GiB }));
    const moves = planMoves(stores, [{ pool, pgs }]);
    assert.ok(moves.length > 0);
    for (const move of moves) {
      assert.deepEqual(move.add, []);
      assert.deepEqual(move.remove, []);
      assert.match(move.blocked[0]!.reason, /backfillfull/);
    }
    assert.equal(fullnessLevel(0.86), 'nearfull');
    assert.equal(fullnessLevel(0.9), 'backfillfull');
    assert.equal(fullnessLevel(0.97), 'full');
    assert.equal(fullnessLevel(0.5), 'ok');
  });

  it('volumePgs lists the PGs a volume\'s chunks map to', () => {
    const pgsOfSmall = volumePgs(7, 8 * 4 * 1024 * 1024, 4 * 1024 * 1024, 256);
    assert.deepEqual([...pgsOfSmall].sort((a, b) => a - b), [...new Set(Array.from({ length: 8 }, (_, i) => placementGroupOf(7, i, 256)))].sort((a, b) => a - b));
    assert.equal(volumePgs(7, 2 ** 40, 4 * 1024 * 1024, 256).size, 256);
  });
});
