/**
 * Self-healing and scale-out on the conductor (DESIGN §3 "Repair"): where each PG's replicas
 * should be, and the moves that get them there. One rule serves re-replication, scale-out and
 * drain:
 *
 *   the wanted replica set of a PG = rendezvous placement (placement/rendezvous.ts) over the stores
 *   that are `up` or `down` — not `out`, not draining — weighted by capacity, on distinct failure
 *   domains of the pool's level.
 *
 * A store that is merely down stays in the wanted sets (nothing moves during a short outage); after
 * --down-out-interval it is marked `out` and drops out of them, so each of its PGs wants another
 * store. A store that registers joins the wanted sets of about R/N of the PGs (rendezvous moves no
 * others), and a draining store leaves all of its. Per PG, one decision table:
 *
 *   wanted store up, not in the PG, below backfillfull -> add it as `recovering` (it resyncs from the
 *                                                        clean holders, many PGs in parallel, then
 *                                                        asks to be marked clean)
 *   wanted store not up, or at/above backfillfull      -> nothing yet (status says why)
 *   every wanted store in the PG and clean             -> remove the replicas on stores not wanted
 *                                                        (the out, drained or displaced holder)
 *   otherwise                                          -> wait
 *
 * So a PG never has fewer clean replicas than before a move, and the old holder is dropped only once
 * the new ones are clean. Each applied step is one transaction with one new map epoch; the PG's
 * epoch moves, so stores refuse writers still on the older map and every write reaches the new
 * replica. Pure functions here; the conductor commits what `planMoves` returns.
 */
import type { PgRecord, PoolRecord, ReplicaRecord, StoreRecord } from './meta/meta-store.ts';
import { type PlacementCandidate, placePg } from './placement/rendezvous.ts';
import { placementGroupOf } from '../lib/placement-hash.ts';

/** Fractions of a store's capacity (DESIGN §3): warn; no new replica or resync fills past it; clients get NO_SPACE. */
export const fullnessThresholds = { nearfull: 0.85, backfillfull: 0.9, full: 0.95 } as const;

/** When nothing was measured yet, the recovery rate a time estimate assumes (bytes per second, per receiving store). */
export const assumedRecoveryBytesPerSecond = 64 * 1024 * 1024;

export interface PgMove {
  poolId: number;
  pgIndex: number;
  /** Stores that get a new recovering replica. */
  add: number[];
  /** Stores whose replica is removed (the wanted ones are all clean). */
  remove: number[];
  /** Stores in the wanted set that cannot take the PG now, with why. */
  blocked: { storeId: number; reason: string }[];
}

export function fullnessOf(store: { capacityBytes: number; usedBytes: number }): number {
  return store.capacityBytes > 0 ? store.usedBytes / store.capacityBytes : 0;
}

export function fullnessLevel(ratio: number): 'ok' | 'nearfull' | 'backfillfull' | 'full' {
  if (ratio >= fullnessThresholds.full) return 'full';
  if (ratio >= fullnessThresholds.backfillfull) return 'backfillfull';
  if (ratio >= fullnessThresholds.nearfull) return 'nearfull';
  return 'ok';
}

/** The stores placement may use: up or down (a short outage moves nothing), not out, not draining. */
export function placementCandidates(stores: readonly StoreRecord[]): PlacementCandidate[] {
  return stores
    .filter((store) => (store.state === 'up' || store.state === 'down') && !store.draining)
    .map((store) => ({ id: store.id, domain: store.domain, weight: Math.max(store.capacityBytes, 1) }));
}

/** The move one PG needs now, or undefined when it is where it should be (or cannot be placed). */
export function planPg(pool: PoolRecord, pg: PgRecord, storesById: ReadonlyMap<number, StoreRecord>, candidates: readonly PlacementCandidate[]): PgMove | undefined {
  if (candidates.length < pool.replicas) return undefined;
  const wanted = placePg(pool.id, pg.index, pool.replicas, candidates, pool.domainLevel);
  const present = new Map(pg.replicas.map((replica) => [replica.storeId, replica]));
  const add: number[] = [];
  const blocked: PgMove['blocked'] = [];
  for (const storeId of wanted) {
    if (present.has(storeId)) continue;
    const store = storesById.get(storeId);
    if (!store || store.state !== 'up') continue;
    if (fullnessOf(store) >= fullnessThresholds.backfillfull) {
      blocked.push({ storeId, reason: `store ${storeId} is ${Math.round(fullnessOf(store) * 100)}% full (backfillfull ${fullnessThresholds.backfillfull * 100}%)` });
      continue;
    }
    add.push(storeId);
  }
  const wantedClean = add.length === 0 && wanted.every((storeId) => present.get(storeId)?.state === 'clean');
  const remove = wantedClean ? pg.replicas.filter((replica) => !wanted.includes(replica.storeId)).map((replica) => replica.storeId) : [];
  if (add.length === 0 && remove.length === 0 && blocked.length === 0) return undefined;
  return { poolId: pool.id, pgIndex: pg.index, add, remove, blocked };
}

/** Every move the cluster needs now. */
export function planMoves(stores: readonly StoreRecord[], pools: readonly { pool: PoolRecord; pgs: readonly PgRecord[] }[]): PgMove[] {
  const storesById = new Map(stores.map((store) => [store.id, store]));
  const candidates = placementCandidates(stores);
  const moves: PgMove[] = [];
  for (const { pool, pgs } of pools) {
    for (const pg of pgs) {
      const move = planPg(pool, pg, storesById, candidates);
      if (move) moves.push(move);
    }
  }
  return moves;
}

/** The PG's replica list after a move: the new replicas recovering since `epoch`, removed ones gone. */
export function applyMove(pg: PgRecord, move: PgMove, epoch: number): PgRecord {
  const replicas: ReplicaRecord[] = pg.replicas.filter((replica) => !move.remove.includes(replica.storeId));
  for (const storeId of move.add) replicas.push({ storeId, state: 'recovering', sinceEpoch: epoch });
  return { ...pg, replicas, epoch, lastClean: pg.lastClean.filter((storeId) => !move.remove.includes(storeId)) };
}

/** Bytes one PG replica holds on average: what the up stores use over the replicas they hold. */
export function bytesPerReplicaEstimate(stores: readonly StoreRecord[], pools: readonly { pgs: readonly PgRecord[] }[]): number {
  const up = new Set(stores.filter((store) => store.state === 'up').map((store) => store.id));
  let replicas = 0;
  for (const { pgs } of pools) for (const pg of pgs) for (const replica of pg.replicas) if (up.has(replica.storeId) && replica.state === 'clean') replicas++;
  const usedBytes = stores.filter((store) => up.has(store.id)).reduce((sum, store) => sum + store.usedBytes, 0);
  return replicas > 0 ? usedBytes / replicas : 0;
}

/** What a data-moving command would move: printed by --dry-run, and the size of a move under way. */
export interface MovePlan {
  /** PGs that get a new replica. */
  pgs: number;
  /** New replicas to fill. */
  replicas: number;
  /** Replicas removed once their replacements are clean. */
  replicasRemoved: number;
  /** Estimated bytes to copy. */
  bytes: number;
  /** Estimated seconds at `bytesPerSecond`. */
  seconds: number;
  bytesPerSecond: number;
  /** Whether the rate was measured on running recoveries (else assumed). */
  rateMeasured: boolean;
  /** Per store: replicas it receives and gives up. */
  stores: { storeId: number; receives: number; givesUp: number }[];
  /** PGs that cannot move now, with why (a full store). */
  blocked: string[];
  moves: { poolId: number; pgIndex: number; add: number[]; remove: number[] }[];
}

export function describePlan(moves: readonly PgMove[], bytesPerReplica: number, measuredBytesPerSecond: number, allReplicasOut: ReadonlyMap<string, number[]> = new Map()): MovePlan {
  const perStore = new Map<number, { receives: number; givesUp: number }>();
  const entry = (storeId: number): { receives: number; givesUp: number } => {
    let found = perStore.get(storeId);
    if (!found) perStore.set(storeId, (found = { receives: 0, givesUp: 0 }));
    return found;
  };
  let replicas = 0;
  let replicasRemoved = 0;
  let pgs = 0;
  const blocked: string[] = [];
  const listed: MovePlan['moves'] = [];
  for (const move of moves) {
    // A PG whose new replica is placed now also drops its old holder later: count it on both sides.
    const later = allReplicasOut.get(`${move.poolId}.${move.pgIndex}`) ?? [];
    const remove = [...new Set([...move.remove, ...later])];
    if (move.add.length > 0) pgs++;
    replicas += move.add.length;
    replicasRemoved += remove.length;
    for (const storeId of move.add) entry(storeId).receives++;
    for (const storeId of remove) entry(storeId).givesUp++;
    for (const why of move.blocked) blocked.push(`PG ${move.poolId}.${move.pgIndex}: ${why.reason}`);
    if (move.add.length > 0 || remove.length > 0) listed.push({ poolId: move.poolId, pgIndex: move.pgIndex, add: move.add, remove });
  }
  const receivers = [...perStore.values()].filter((counts) => counts.receives > 0).length;
  const rateMeasured = measuredBytesPerSecond > 0;
  const bytesPerSecond = rateMeasured ? measuredBytesPerSecond : assumedRecoveryBytesPerSecond * Math.max(1, receivers);
  const bytes = Math.round(replicas * bytesPerReplica);
  return {
    pgs, replicas, replicasRemoved, bytes, seconds: bytes / bytesPerSecond, bytesPerSecond, rateMeasured,
    stores: [...perStore].sort(([a], [b]) => a - b).map(([storeId, counts]) => ({ storeId, ...counts })),
    blocked, moves: listed,
  };
}

/**
 * The moves a hypothetical change would start: `change` edits copies of the store records (drain
 * a store, mark one out); the plan lists the replicas added now and, per PG, the stores that will
 * be dropped once those are clean.
 */
export function planAfter(stores: readonly StoreRecord[], pools: readonly { pool: PoolRecord; pgs: readonly PgRecord[] }[], change: (stores: StoreRecord[]) => void): { moves: PgMove[]; dropsLater: Map<string, number[]> } {
  const changed = stores.map((store) => ({ ...store }));
  change(changed);
  const moves = planMoves(changed, pools);
  const storesById = new Map(changed.map((store) => [store.id, store]));
  const candidates = placementCandidates(changed);
  const dropsLater = new Map<string, number[]>();
  for (const { pool, pgs } of pools) {
    if (candidates.length < pool.replicas) continue;
    for (const pg of pgs) {
      const wanted = placePg(pool.id, pg.index, pool.replicas, candidates, pool.domainLevel);
      const leaving = pg.replicas.filter((replica) => !wanted.includes(replica.storeId)).map((replica) => replica.storeId);
      if (leaving.length > 0) dropsLater.set(`${pool.id}.${pg.index}`, leaving);
    }
  }
  void storesById;
  return { moves, dropsLater };
}

/** The volume's PGs (those its chunks map to), for per-volume progress. Large volumes touch every PG. */
export function volumePgs(volumeId: number, sizeBytes: number, chunkSizeBytes: number, pgCount: number): Set<number> {
  const chunks = Math.ceil(sizeBytes / chunkSizeBytes);
  const result = new Set<number>();
  if (chunks > pgCount * 32) {
    for (let pg = 0; pg < pgCount; pg++) result.add(pg);
    return result;
  }
  for (let chunk = 0; chunk < chunks; chunk++) result.add(placementGroupOf(volumeId, chunk, pgCount));
  return result;
}
