/**
 * The store's view of the cluster, kept from the conductor's map: PG epochs, this store's replica
 * state in every PG, deleted volumes. Until the first map has been applied the store serves
 * nothing (NOT_READY): it may have been down, and only the map says whether it is clean.
 */
import type { ClusterMap, ReplicaState } from '../conductor/api/types.ts';
import type { StoreView } from './store-server.ts';

export class MapStoreView implements StoreView {
  storeId = 0;
  #ready = false;
  /**
   * Per pool, the newest epoch known of each PG (indexed by PG id). Every request looks its PG up:
   * a pool's array is found by a small-integer key, where one key per PG (pgKey) is a heap
   * number V8 allocates and hashes on each lookup.
   */
  #pgEpochs = new Map<number, number[]>();
  /** This store's state per PG at the epoch of the map it came from. */
  #ownStates = new Map<number, { state: ReplicaState | 'none'; epoch: number }>();
  #deleted = new Set<number>();
  /** PGs being resynced here right now: no reads from them whatever a client believes. */
  readonly resyncing = new Set<number>();

  get ready(): boolean {
    return this.#ready;
  }

  apply(map: ClusterMap): void {
    for (const pool of map.pools) {
      pool.pgs.forEach((pg, pgId) => {
        const key = pgKey(pool.id, pgId);
        this.notePgEpoch(pool.id, pgId, pg.epoch);
        const own = pg.replicas.find((replica) => replica.storeId === this.storeId);
        const previous = this.#ownStates.get(key);
        if (!previous || previous.epoch <= pg.epoch) {
          this.#ownStates.set(key, { state: own ? own.state : 'none', epoch: pg.epoch });
        }
      });
    }
    for (const volumeId of map.deletedVolumes) this.#deleted.add(volumeId);
    this.#ready = true;
  }

  pgEpoch(poolId: number, pgId: number): number {
    return this.#pgEpochs.get(poolId)?.[pgId] ?? 0;
  }

  notePgEpoch(poolId: number, pgId: number, epoch: number): void {
    let epochs = this.#pgEpochs.get(poolId);
    if (epochs === undefined) {
      epochs = [];
      this.#pgEpochs.set(poolId, epochs);
    }
    if ((epochs[pgId] ?? 0) < epoch) epochs[pgId] = epoch;
  }

  canServeReads(poolId: number, pgId: number, pgEpoch: number): boolean {
    if (!this.#ready) return false;
    const key = pgKey(poolId, pgId);
    if (this.resyncing.has(key)) return false;
    const own = this.#ownStates.get(key);
    if (own && own.epoch >= pgEpoch) return own.state === 'clean';
    // A client acting on a newer map than ours read it from the conductor, and reads only clean replicas.
    return true;
  }

  isDeleted(volumeId: number): boolean {
    return this.#deleted.has(volumeId);
  }

  ownState(poolId: number, pgId: number): ReplicaState | 'none' | undefined {
    return this.#ownStates.get(pgKey(poolId, pgId))?.state;
  }
}

export function pgKey(poolId: number, pgId: number): number {
  return poolId * 0x1_0000_0000 + pgId;
}
