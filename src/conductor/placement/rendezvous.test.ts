import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { defaultMinReplicas, distinctDomains, domainAt, placePg, placePool, type PlacementCandidate, rendezvousScore } from './rendezvous.ts';

const stores = (count: number, domains?: (id: number) => string): PlacementCandidate[] =>
  Array.from({ length: count }, (_, i) => ({ id: i + 1, domain: domains ? domains(i + 1) : `host-${i + 1}` }));

describe('rendezvous placement', () => {
  it('gives every PG R distinct stores', () => {
    for (const replicas of [1, 2, 3, 5]) {
      for (const set of placePool(1, 256, replicas, stores(7))) {
        assert.equal(set.length, replicas);
        assert.equal(new Set(set).size, replicas);
      }
    }
  });

  it('is deterministic and depends on the pool', () => {
    assert.deepEqual(placePool(1, 64, 3, stores(6)), placePool(1, 64, 3, stores(6)));
    assert.notDeepEqual(placePool(1, 64, 3, stores(6)), placePool(2, 64, 3, stores(6)));
    assert.equal(rendezvousScore(1, 2, 3), rendezvousScore(1, 2, 3));
    // Large ids (beyond 32 bits) hash by all their bits.
    assert.notEqual(rendezvousScore(1, 0, 2 ** 40 + 1), rendezvousScore(1, 0, 1));
  });

  it('balances PGs and preferred replicas roughly evenly', () => {
    const placement = placePool(1, 256, 3, stores(6));
    const members = new Map<number, number>();
    const preferred = new Map<number, number>();
    for (const set of placement) {
      for (const id of set) members.set(id, (members.get(id) ?? 0) + 1);
      preferred.set(set[0]!, (preferred.get(set[0]!) ?? 0) + 1);
    }
    // 256 PGs × 3 replicas / 6 stores = 128 each; 256 / 6 ≈ 43 preferred each.
    for (const id of [1, 2, 3, 4, 5, 6]) {
      assert.ok(members.get(id)! > 128 * 0.75 && members.get(id)! < 128 * 1.25, `store ${id} holds ${members.get(id)} PGs`);
      assert.ok(preferred.get(id)! > 43 * 0.6 && preferred.get(id)! < 43 * 1.4, `store ${id} is preferred in ${preferred.get(id)} PGs`);
    }
  });

  it('moves few PGs when a store is added, and only onto it', () => {
    const before = placePool(1, 256, 3, stores(6));
    const after = placePool(1, 256, 3, stores(7));
    let moved = 0;
    for (let pg = 0; pg < 256; pg++) {
      const gone = before[pg]!.filter((id) => !after[pg]!.includes(id));
      const added = after[pg]!.filter((id) => !before[pg]!.includes(id));
      assert.ok(gone.length <= 1, `PG ${pg} lost at most one store`);
      assert.deepEqual(added, gone.length === 0 ? [] : [7]);
      moved += gone.length;
    }
    // Expect about 256 × 3/7 ≈ 110 replica moves; nowhere near a reshuffle (768).
    assert.ok(moved > 70 && moved < 150, `moved ${moved}`);
  });

  it('puts replicas on distinct failure domains where it can', () => {
    // Six stores on three hosts: every PG must span three hosts.
    const candidates = stores(6, (id) => `host-${(id % 3) + 1}`);
    for (const set of placePool(1, 256, 3, candidates)) {
      const domains = new Set(set.map((id) => candidates.find((c) => c.id === id)!.domain));
      assert.equal(domains.size, 3);
    }
    // Two hosts, three replicas: two distinct hosts, then the best remaining store.
    const two = stores(4, (id) => `host-${id % 2}`);
    for (const set of placePool(1, 64, 3, two)) {
      assert.equal(new Set(set.map((id) => two.find((c) => c.id === id)!.domain)).size, 2);
      assert.equal(new Set(set).size, 3);
    }
    // An empty domain counts as a domain of its own.
    assert.equal(placePg(1, 0, 3, stores(3, () => '')).length, 3);
  });

  it('derives min replicas as R - floor(R/2)', () => {
    assert.deepEqual([1, 2, 3, 4, 5].map(defaultMinReplicas), [1, 1, 2, 2, 3]);
  });

  it('reads domain levels from labels: a plain name is the host, pairs name their levels', () => {
    assert.equal(domainAt('h3', 'host'), 'h3');
    assert.equal(domainAt('h3', 'rack'), undefined);
    assert.equal(domainAt('rack=r1,host=h3', 'rack'), 'r1');
    assert.equal(domainAt('rack=r1, host = h3', 'host'), 'h3');
    assert.equal(domainAt('rack=r1', 'host'), undefined);
    assert.equal(domainAt('h3', 'store'), undefined);
    assert.equal(domainAt('', 'host'), undefined);
    const candidates = [1, 2, 3, 4].map((id) => ({ id, domain: `rack=r${id % 2},host=h${id}` }));
    assert.equal(distinctDomains(candidates, 'rack'), 2);
    assert.equal(distinctDomains(candidates, 'host'), 4);
    for (const set of placePool(1, 64, 2, candidates, 'rack')) assert.notEqual(set[0]! % 2, set[1]! % 2, 'two racks');
  });

  it('gives a store PGs in proportion to its weight, and equal weights the unweighted order', () => {
    const weighted = [1, 2, 3, 4].map((id) => ({ id, domain: `h${id}`, weight: id === 4 ? 3 : 1 }));
    const counts = new Map<number, number>();
    for (const [id] of placePool(7, 3000, 1, weighted)) counts.set(id!, (counts.get(id!) ?? 0) + 1);
    assert.ok(counts.get(4)! > 1350 && counts.get(4)! < 1650, `store 4 holds ${counts.get(4)} of 3000 (expect 1500)`);
    const plain = stores(5);
    assert.deepEqual(placePool(3, 64, 3, plain), placePool(3, 64, 3, plain.map((s) => ({ ...s, weight: 42 }))));
  });
});
