/**
 * Resync of a recovering replica (DESIGN §3 "Repair"), first version: the recovering store pulls
 * from one clean peer what it lacks. Per PG:
 *   1. LIST_PG on the peer at the PG's current epoch. The peer notes that epoch, so from then on it
 *      refuses writers still on the older map (where this replica was down); it answers only after
 *      the writes it accepted before are in its index. Every later write reaches this replica too.
 *   2. For each block where the peer's version is higher than ours, copy it (data or tombstone)
 *      with its original version. The version rule makes the copy harmless when a newer client
 *      write has already landed here.
 *   3. Ask the conductor to mark the replica clean at that same PG epoch; if the PG changed in the
 *      meantime the conductor refuses (STALE_PG_EPOCH) and the next map starts the PG over.
 * Until then the PG serves no reads here. Left for later (issue 8): copying in both directions to
 * roll back divergent writes, a persisted cursor, throttling, and choosing between full and delta copy.
 */
import type { Env } from '../env/env.ts';
import { ShaleError } from '../lib/errors.ts';
import { BLOCK_SIZE_BYTES } from '../lib/units.ts';
import type { ConductorClient } from '../proto/conductor-client.ts';
import type { StoreChannel } from '../proto/store-channel.ts';
import {
  BlockState, compareVersions, decodeListReply, decodeReadReply, encodeVolumeIds, Flag, Op, type ListedObject,
} from '../proto/store-protocol.ts';
import type { ClusterMap, PoolMapEntry } from '../conductor/api/types.ts';
import type { BlockEngine } from './block-engine.ts';
import { pgKey, type MapStoreView } from './store-view.ts';

/** Blocks copied per READ from the peer. */
export const RESYNC_RUN_BLOCKS_MAX = 256;
/** PGs resynced at once. */
export const RESYNC_PARALLEL_MAX = 4;

export interface ResyncDeps {
  env: Env;
  /** Bytes per second resync may copy on this store; 0 = unlimited. */
  rateBytesPerSecond?: number;
  engine: BlockEngine;
  view: MapStoreView;
  conductor: ConductorClient;
  channel: (address: string) => StoreChannel;
  log: (message: string) => void;
}

export class Resyncer {
  readonly #deps: ResyncDeps;
  #running = new Set<number>();
  #queue: { pool: PoolMapEntry; pgId: number }[] = [];
  #active = 0;
  #latest: ClusterMap | undefined;
  #startedMs = 0;
  #budgetBytes = 0;
  bytesCopied = 0;

  constructor(deps: ResyncDeps) {
    this.#deps = deps;
  }

  /** Looks at a new map and starts a resync for every PG where this store is recovering. */
  onMap(map: ClusterMap): void {
    this.#latest = map;
    for (const pool of map.pools) {
      pool.pgs.forEach((pg, pgId) => {
        const own = pg.replicas.find((replica) => replica.storeId === this.#deps.view.storeId);
        const key = pgKey(pool.id, pgId);
        if (own?.state === 'recovering' && !this.#running.has(key)) {
          this.#running.add(key);
          this.#deps.view.resyncing.add(key);
          this.#queue.push({ pool, pgId });
        }
      });
    }
    this.#pump();
  }

  #pump(): void {
    while (this.#active < RESYNC_PARALLEL_MAX && this.#queue.length > 0) {
      const { pool, pgId } = this.#queue.shift()!;
      this.#active++;
      void this.#resyncPg(pool.id, pgId).finally(() => {
        this.#active--;
        const key = pgKey(pool.id, pgId);
        this.#running.delete(key);
        this.#deps.view.resyncing.delete(key);
        this.#pump();
      });
    }
  }

  async #resyncPg(poolId: number, pgId: number): Promise<void> {
    const { env, conductor, log } = this.#deps;
    for (let attempt = 0; ; attempt++) {
      const map = this.#latest!;
      const pool = map.pools.find((candidate) => candidate.id === poolId);
      const pg = pool?.pgs[pgId];
      const own = pg?.replicas.find((replica) => replica.storeId === this.#deps.view.storeId);
      if (!pool || !pg || own?.state !== 'recovering') return;
      const peer = pg.replicas
        .filter((replica) => replica.state === 'clean')
        .map((replica) => map.stores.find((store) => store.id === replica.storeId))
        .find((store) => store !== undefined && store.state === 'up');
      try {
        if (peer) {
          await this.#copyFrom(peer.address, pool, pgId, pg.epoch);
        } else if (pg.replicas.some((replica) => replica.state === 'clean')) {
          throw new ShaleError('UNAVAILABLE', 'no clean replica is up');
        }
        // No clean replica at all (every copy was down together): this one is as good as any.
        await conductor.markClean(poolId, pgId, { storeId: this.#deps.view.storeId, pgEpoch: pg.epoch });
        return;
      } catch (error) {
        if (attempt % 10 === 0) log(`resync of PG ${poolId}.${pgId} from ${peer?.address ?? 'nobody'}: ${(error as Error).message}; retrying`);
        await env.clock.sleep(Math.min(200 * (attempt + 1), 2000));
        if (error instanceof ShaleError && error.code === 'STALE_PG_EPOCH') {
          // Our map is behind; the watcher brings the new one and onMap restarts what is needed.
          if (this.#latest === map) await env.clock.sleep(500);
        }
      }
    }
  }

  /** Keeps resync at or below the configured rate (a simple budget over a sliding second). */
  async #throttle(bytes: number): Promise<void> {
    const rate = this.#deps.rateBytesPerSecond ?? 0;
    if (rate <= 0) return;
    const clock = this.#deps.env.clock;
    const now = clock.nowMs();
    if (now - this.#startedMs > 1000) {
      this.#startedMs = now;
      this.#budgetBytes = 0;
    }
    this.#budgetBytes += bytes;
    const dueMs = this.#startedMs + (this.#budgetBytes / rate) * 1000;
    if (dueMs > now) await clock.sleep(dueMs - now);
  }

  async #copyFrom(address: string, pool: PoolMapEntry, pgId: number, pgEpoch: number): Promise<void> {
    const { engine, conductor } = this.#deps;
    const volumeIds = (await conductor.volumes()).volumes.filter((volume) => volume.poolId === pool.id).map((volume) => volume.id);
    if (volumeIds.length === 0) return;
    const channel = this.#deps.channel(address);
    const common = { poolId: pool.id, pgId, pgCount: pool.pgCount, pgEpoch };
    const listing = await channel.request({ op: Op.LIST_PG, ...common }, [encodeVolumeIds(volumeIds)]);
    const peerObjects = decodeListReply(listing.payload);
    const local = new Map<string, ListedObject>();
    for (const object of engine.listObjects(new Set(volumeIds), () => true)) local.set(`${object.volumeId}:${object.chunkIndex}`, object);
    for (const peerObject of peerObjects) {
      const mine = local.get(`${peerObject.volumeId}:${peerObject.chunkIndex}`);
      for (const run of newerRuns(peerObject, mine)) {
        const header = { ...common, volumeId: peerObject.volumeId, chunkIndex: peerObject.chunkIndex, offsetBlocks: run.start, countBlocks: run.count };
        const version = { epoch: run.epoch, seq: run.seq };
        if (run.state === BlockState.ZERO) {
          await engine.writeZeroes({ volumeId: header.volumeId, chunkIndex: header.chunkIndex, offsetBlocks: run.start, countBlocks: run.count, version, snapSeq: 0 });
          continue;
        }
        const reply = await channel.request({ op: Op.READ, flags: Flag.REPAIR, ...header });
        const read = decodeReadReply(reply.payload, run.count);
        // The peer may have moved on since the listing; copy only blocks still at the listed version.
        let at = 0;
        for (let i = 0; i < run.count; i++) {
          if (read.states[i] !== BlockState.DATA) continue;
          const data = read.data.subarray(at * BLOCK_SIZE_BYTES, (at + 1) * BLOCK_SIZE_BYTES);
          at++;
          await engine.write({
            volumeId: header.volumeId, chunkIndex: header.chunkIndex, offsetBlocks: run.start + i, data,
            checksums: Uint32Array.of(read.checksums[i]!), version: { epoch: read.epochs[i]!, seq: read.seqs[i]! }, snapSeq: 0,
          });
          this.bytesCopied += BLOCK_SIZE_BYTES;
        }
        await this.#throttle(run.count * BLOCK_SIZE_BYTES);
      }
    }
    await engine.flush();
  }
}

interface Run {
  start: number;
  count: number;
  state: number;
  epoch: number;
  seq: number;
}

/** Runs of consecutive blocks where the peer holds a newer version than we do, with one version and state per run. */
export function newerRuns(peer: ListedObject, mine: ListedObject | undefined): Run[] {
  const runs: Run[] = [];
  let current: Run | undefined;
  for (let i = 0; i < peer.states.length; i++) {
    const peerState = peer.states[i]!;
    const newer = peerState !== BlockState.ABSENT && (
      !mine || i >= mine.states.length || mine.states[i] === BlockState.ABSENT ||
      compareVersions(peer.epochs[i]!, peer.seqs[i]!, mine.epochs[i]!, mine.seqs[i]!) > 0);
    if (!newer) {
      current = undefined;
      continue;
    }
    if (current && current.state === peerState && current.epoch === peer.epochs[i] && current.seq === peer.seqs[i] && current.count < RESYNC_RUN_BLOCKS_MAX) {
      current.count++;
    } else {
      current = { start: i, count: 1, state: peerState, epoch: peer.epochs[i]!, seq: peer.seqs[i]! };
      runs.push(current);
    }
  }
  return runs;
}
