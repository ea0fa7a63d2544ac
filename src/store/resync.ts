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
 * Until then the PG serves no reads here.
 *
 * Healing (issue 8): the same path fills a brand-new replica placed by the conductor (re-replication
 * after a store is out, scale-out, drain) — a new replica simply lacks everything. Many-to-many:
 * each PG picks its source among the PG's clean replicas by PG number, so the PGs a store fills
 * are read from every healthy holder, and every new holder fills its own PGs in parallel. Throttled
 * by --resync-rate; paused while the disk is at or above backfillfull (0.90 of capacity). A
 * persisted cursor (per PG: the replica's recovering-since epoch and the last object done) lets a
 * restarted store skip the objects it finished, as long as it has not been down meanwhile (then
 * its replica recovers from a new epoch and the cursor no longer applies).
 * Both directions: a block this replica holds at a version no clean replica has, written by an
 * owner that is gone, is rolled back to the clean content (#rollBack).
 */
import type { Env } from '../env/env.ts';
import { ShaleError } from '../lib/errors.ts';
import { BLOCK_SIZE_BYTES } from '../lib/units.ts';
import type { ConductorClient } from '../proto/conductor-client.ts';
import type { StoreChannel } from '../proto/store-channel.ts';
import {
  BLOCKS_PER_REQUEST_MAX, BlockState, compareVersions, decodeBlockVersions, decodeListReply, decodeReadReply, encodeVolumeIds, Flag, Op, type ListedObject,
  decodeKvPgRecords, encodeKvPgCursor, engineObjectId, Namespace, namespacedId,
} from '../proto/store-protocol.ts';
import { crc32c } from '../lib/crc32c.ts';
import type { ClusterMap, PoolMapEntry } from '../conductor/api/types.ts';
import type { BlockEngine } from './block-engine.ts';
import { pgKey, type MapStoreView } from './store-view.ts';
import { placementGroupOf } from '../lib/placement-hash.ts';
import { isSnapshotGapError, type SnapshotGaps } from './snap-gaps.ts';

/** Blocks copied per READ from the peer. */
export const RESYNC_RUN_BLOCKS_MAX = 256;
/** Key-value records asked per KV_LIST_PG page. */
export const RESYNC_KV_PAGE = 1000;
/** PGs resynced at once. */
export const RESYNC_PARALLEL_MAX = 8;
/** Fraction of the disk above which resync waits instead of copying (DESIGN §3 backfillfull). */
export const BACKFILL_FULL_RATIO = 0.9;
/** How often at most the resume cursor is written. */
export const CURSOR_PERSIST_INTERVAL_MS = 1000;

interface CursorEntry {
  /** The replica's recovering-since epoch the cursor belongs to. */
  since: number;
  /** Objects up to and including this (volume id, chunk index), in listing order, are copied. */
  volumeId: number;
  chunkIndex: number;
}

export interface ResyncDeps {
  env: Env;
  /** Bytes per second resync may copy on this store; 0 = unlimited. */
  rateBytesPerSecond?: number;
  /** Where the resume cursor is kept (a small JSON file beside the disk); none: not persisted. */
  cursorPath?: string;
  /** Whether this store is serving client I/O now: resync then waits a little before each copy. */
  clientBusy?: () => boolean;
  engine: BlockEngine;
  view: MapStoreView;
  conductor: ConductorClient;
  channel: (address: string) => StoreChannel;
  log: (message: string) => void;
  /** Where snapshots this store cannot serve correctly are recorded (none: snapshots are not checked). */
  snapshotGaps?: SnapshotGaps;
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
  /** Bytes the PGs under way still need, per PG. */
  readonly #pending = new Map<number, number>();
  /** Copy-rate window: bytes and start of the current and previous windows. */
  #rateWindow = { startMs: 0, bytes: 0, lastRate: 0 };
  #paused: string | undefined;
  #cursor = new Map<string, CursorEntry>();
  #cursorLoaded = false;
  #cursorDirty = false;
  #cursorWrittenMs = 0;
  #cursorWriting: Promise<void> | undefined;
  /** Objects skipped thanks to the cursor (for tests and logs). */
  objectsResumed = 0;
  /** Divergent blocks rolled back to the clean replicas' content. */
  blocksRolledBack = 0;
  /** S3 index records (puts and delete tombstones) copied in. */
  kvRecordsCopied = 0;
  /** Older versions copied in for live snapshots (a snapshot taken while this replica was away). */
  snapshotVersionsCopied = 0;
  /** (volume, snapshot) pairs found incomplete here and recorded (snap-gaps.ts). */
  snapshotGapsFound = 0;
  readonly #volumePools = new Map<number, number>();
  #volumeFetch: Promise<void> | undefined;

  constructor(deps: ResyncDeps) {
    this.#deps = deps;
  }

  /** Figures for the heartbeat (progress and ETA in cluster status). */
  report(): { pgsQueued: number; pgsActive: number; bytesCopied: number; bytesPerSecond: number; bytesPending: number; paused?: string } {
    const now = this.#deps.env.clock.nowMs();
    const window = this.#rateWindow;
    const elapsed = now - window.startMs;
    const rate = elapsed >= 1000 ? (window.bytes * 1000) / elapsed : window.lastRate;
    if (elapsed >= 2000) {
      window.lastRate = rate;
      window.startMs = now;
      window.bytes = 0;
    }
    let pending = 0;
    for (const bytes of this.#pending.values()) pending += bytes;
    return {
      pgsQueued: this.#queue.length, pgsActive: this.#active, bytesCopied: this.bytesCopied,
      bytesPerSecond: this.#active > 0 || this.#queue.length > 0 ? rate : 0, bytesPending: pending, ...(this.#paused ? { paused: this.#paused } : {}),
    };
  }

  async #loadCursor(): Promise<void> {
    if (this.#cursorLoaded) return;
    this.#cursorLoaded = true;
    const path = this.#deps.cursorPath;
    if (!path) return;
    try {
      const text = await this.#deps.env.disk.readFile(path);
      if (!text) return;
      const parsed = JSON.parse(text.toString('utf8')) as { version?: number; pgs?: Record<string, CursorEntry> };
      if (parsed.version !== 1 || !parsed.pgs) return;
      for (const [key, entry] of Object.entries(parsed.pgs)) this.#cursor.set(key, entry);
    } catch (error) {
      this.#deps.log(`resync cursor ${path} unreadable, starting over: ${(error as Error).message}`);
    }
  }

  async #persistCursor(force: boolean): Promise<void> {
    const path = this.#deps.cursorPath;
    if (!path || !this.#cursorDirty) return;
    const now = this.#deps.env.clock.nowMs();
    if (!force && now - this.#cursorWrittenMs < CURSOR_PERSIST_INTERVAL_MS) return;
    // One write at a time (they share a temporary file), each with the cursor as it is when it starts.
    const previous = this.#cursorWriting ?? Promise.resolve();
    const write = previous.then(async () => {
      if (!this.#cursorDirty) return;
      this.#cursorDirty = false;
      this.#cursorWrittenMs = this.#deps.env.clock.nowMs();
      const body = JSON.stringify({ version: 1, pgs: Object.fromEntries(this.#cursor) });
      await this.#deps.env.disk.writeFileAtomic(path, body).catch((error: unknown) => {
        this.#deps.log(`writing the resync cursor: ${(error as Error).message}`);
      });
    });
    this.#cursorWriting = write;
    await write;
    if (this.#cursorWriting === write) this.#cursorWriting = undefined;
  }

  /** Waits while the disk is at or above backfillfull: a resync must not fill its target. */
  async #waitForRoom(): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      const stats = this.#deps.engine.stats();
      const ratio = stats.capacityBytes > 0 ? stats.usedBytes / stats.capacityBytes : 0;
      if (ratio < BACKFILL_FULL_RATIO) {
        this.#paused = undefined;
        return;
      }
      this.#paused = `disk ${Math.round(ratio * 100)}% full, at or above backfillfull (${BACKFILL_FULL_RATIO * 100}%)`;
      if (attempt % 60 === 0) this.#deps.log(`resync paused: ${this.#paused}`);
      await this.#deps.env.clock.sleep(1000);
    }
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
      // Many-to-many: PGs spread their reads over every clean holder (by PG number, moving on at each retry).
      const holders = pg.replicas
        .filter((replica) => replica.state === 'clean')
        .map((replica) => map.stores.find((store) => store.id === replica.storeId))
        .filter((store) => store !== undefined && store.state === 'up');
      const peer = holders.length > 0 ? holders[(pgId + attempt) % holders.length] : undefined;
      const since = own.sinceEpoch ?? 0;
      try {
        if (peer) {
          const owners = new Map(map.owners);
          await this.#copyFrom(peer.address, pool, pgId, pg.epoch, since, holders.map((holder) => holder!.address), owners);
        } else if (pg.replicas.some((replica) => replica.state === 'clean')) {
          throw new ShaleError('UNAVAILABLE', 'no clean replica is up');
        }
        // No clean replica at all (every copy was down together): this one is as good as any.
        await conductor.markClean(poolId, pgId, { storeId: this.#deps.view.storeId, pgEpoch: pg.epoch });
        this.#pending.delete(pgKey(poolId, pgId));
        if (this.#cursor.delete(`${poolId}.${pgId}`)) {
          this.#cursorDirty = true;
          await this.#persistCursor(false);
        }
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

  /**
   * Copying in the other direction: a divergent block (divergentBlocks) is rolled back to what the
   * clean replicas hold. The engine keeps the highest version, so the clean content is written
   * under a version just above the divergent one — (its epoch, its seq + 1), still below every
   * version of the current owner — here and on every clean replica, which then all agree. A
   * current-owner write racing it is higher and wins everywhere.
   */
  async #rollBack(peerObjects: readonly ListedObject[], local: ReadonlyMap<string, ListedObject>, owners: ReadonlyMap<number, number>, peer: StoreChannel,
    cleanAddresses: readonly string[], common: { poolId: number; pgId: number; pgCount: number; pgEpoch: number }): Promise<void> {
    const peers = new Map(peerObjects.map((object) => [`${object.volumeId}:${object.chunkIndex}`, object]));
    const { engine } = this.#deps;
    let rolledBack = 0;
    for (const [objectKey, mine] of local) {
      const ownerEpoch = owners.get(mine.volumeId) ?? 0;
      if (ownerEpoch === 0) continue;
      if (placementGroupOf(mine.volumeId, mine.chunkIndex, common.pgCount) !== common.pgId) continue;
      for (const block of divergentBlocks(peers.get(objectKey), mine, ownerEpoch)) {
        const version = { epoch: block.epoch, seq: block.seq + 1 };
        const header = { ...common, volumeId: block.volumeId, chunkIndex: block.chunkIndex, offsetBlocks: block.block, countBlocks: 1, ownerEpoch: version.epoch, versionSeq: version.seq };
        let data: Buffer | undefined;
        let checksum = 0;
        if (block.peerState === BlockState.DATA) {
          const reply = await peer.request({ op: Op.READ, flags: Flag.REPAIR, ...header });
          const read = decodeReadReply(reply.payload, 1);
          if (read.states[0] === BlockState.DATA) {
            data = Buffer.from(read.data.subarray(0, BLOCK_SIZE_BYTES));
            checksum = read.checksums[0]!;
          }
        }
        for (const address of cleanAddresses) {
          const channel = this.#deps.channel(address);
          if (data) {
            const sums = Buffer.allocUnsafe(4);
            sums.writeUInt32LE(checksum, 0);
            await channel.request({ op: Op.WRITE, flags: Flag.REPAIR, ...header }, [sums, data]);
          } else {
            await channel.request({ op: Op.WRITE_ZEROES, flags: Flag.REPAIR, ...header });
          }
        }
        if (data) {
          await engine.write({ volumeId: block.volumeId, chunkIndex: block.chunkIndex, offsetBlocks: block.block, data, checksums: Uint32Array.of(checksum), version, snapSeq: 0 });
        } else {
          await engine.writeZeroes({ volumeId: block.volumeId, chunkIndex: block.chunkIndex, offsetBlocks: block.block, countBlocks: 1, version, snapSeq: 0 });
        }
        this.blocksRolledBack++;
        rolledBack++;
      }
    }
    if (rolledBack > 0) this.#deps.log(`resync of PG ${common.poolId}.${common.pgId}: rolled back ${rolledBack} blocks written by an earlier owner that no clean replica has`);
  }

  /**
   * The pool of every volume that can hold data, without asking the conductor for each PG (a
   * rebuild starts hundreds). A volume's pool never changes and ids are never reused, so what is
   * known stays true; a volume holds data only once opened, and every opened volume is in the map's
   * owners — so a fetch is needed only when the map names a volume not known yet.
   */
  async #volumes(conductor: ConductorClient): Promise<{ id: number; poolId: number }[]> {
    const owners = this.#latest?.owners ?? [];
    if (owners.some(([volumeId]) => !this.#volumePools.has(volumeId)) || this.#volumePools.size === 0) {
      this.#volumeFetch ??= conductor.volumes().then((answer) => {
        for (const volume of answer.volumes) this.#volumePools.set(volume.id, volume.poolId);
      }).finally(() => {
        this.#volumeFetch = undefined;
      });
      await this.#volumeFetch;
    }
    const deleted = new Set(this.#latest?.deletedVolumes ?? []);
    return [...this.#volumePools].filter(([id]) => !deleted.has(id)).map(([id, poolId]) => ({ id, poolId }));
  }

  /** Keeps resync at or below the configured rate (a simple budget over a sliding second). */
  async #throttle(bytes: number): Promise<void> {
    const rate = this.#deps.rateBytesPerSecond ?? 0;
    if (rate <= 0) {
      this.#rateWindow.bytes += bytes;
      return;
    }
    const clock = this.#deps.env.clock;
    const now = clock.nowMs();
    if (now - this.#startedMs > 1000) {
      this.#startedMs = now;
      this.#budgetBytes = 0;
    }
    this.#budgetBytes += bytes;
    this.#rateWindow.bytes += bytes;
    const dueMs = this.#startedMs + (this.#budgetBytes / rate) * 1000;
    if (dueMs > now) await clock.sleep(dueMs - now);
  }

  async #copyFrom(address: string, pool: PoolMapEntry, pgId: number, pgEpoch: number, since: number, cleanAddresses: readonly string[] = [address], owners: ReadonlyMap<number, number> = new Map()): Promise<void> {
    const { engine, conductor } = this.#deps;
    await this.#loadCursor();
    await this.#waitForRoom();
    const cursorKey = `${pool.id}.${pgId}`;
    const saved = this.#cursor.get(cursorKey);
    const resumeAfter = saved && since > 0 && saved.since === since ? saved : undefined;
    const volumeIds = (await this.#volumes(conductor)).filter((volume) => volume.poolId === pool.id).map((volume) => volume.id);
    const channel = this.#deps.channel(address);
    const common = { poolId: pool.id, pgId, pgCount: pool.pgCount, pgEpoch };
    await this.#copyS3Data(channel, common);
    await this.#copyS3Index(channel, common);
    if (volumeIds.length === 0) {
      await engine.flush();
      return;
    }
    const listing = await channel.request({ op: Op.LIST_PG, ...common }, [encodeVolumeIds(volumeIds)]);
    const peerObjects = decodeListReply(listing.payload);
    const local = new Map<string, ListedObject>();
    // Only this PG's objects: listing every object of the pool for each PG would cost O(PGs × data) on the event loop.
    for (const object of engine.listObjects(new Set(volumeIds), (volumeId, chunkIndex) => placementGroupOf(volumeId, chunkIndex, pool.pgCount) === pgId)) {
      local.set(`${object.volumeId}:${object.chunkIndex}`, object);
    }
    peerObjects.sort((a, b) => a.volumeId - b.volumeId || a.chunkIndex - b.chunkIndex);
    const key = pgKey(pool.id, pgId);
    let pendingBytes = 0;
    const plans = peerObjects.map((peerObject) => {
      const skip = resumeAfter !== undefined && (peerObject.volumeId < resumeAfter.volumeId ||
        (peerObject.volumeId === resumeAfter.volumeId && peerObject.chunkIndex <= resumeAfter.chunkIndex));
      const runs = skip ? [] : newerRuns(peerObject, local.get(`${peerObject.volumeId}:${peerObject.chunkIndex}`));
      if (skip) this.objectsResumed++;
      for (const run of runs) if (run.state === BlockState.DATA) pendingBytes += run.count * BLOCK_SIZE_BYTES;
      return { peerObject, runs, skip };
    });
    this.#pending.set(key, pendingBytes);
    await this.#rollBack(peerObjects, local, owners, channel, cleanAddresses, common);
    for (const { peerObject, runs, skip } of plans) {
      for (const run of runs) {
        await this.#waitForRoom();
        // Client I/O first: a copy waits (up to 20 ms) while this store serves clients.
        for (let waited = 0; waited < 20 && this.#deps.clientBusy?.(); waited += 2) await this.#deps.env.clock.sleep(2);
        const header = { ...common, volumeId: peerObject.volumeId, chunkIndex: peerObject.chunkIndex, offsetBlocks: run.start, countBlocks: run.count };
        const version = { epoch: run.epoch, seq: run.seq };
        if (run.state === BlockState.ZERO) {
          await engine.writeZeroes({ volumeId: header.volumeId, chunkIndex: header.chunkIndex, offsetBlocks: run.start, countBlocks: run.count, version, snapSeq: 0 });
          continue;
        }
        const reply = await channel.request({ op: Op.READ, flags: Flag.REPAIR, ...header });
        const read = decodeReadReply(reply.payload, run.count);
        // Blocks as the peer holds them now (it may have moved on since the listing; the version rule
        // keeps whatever is newer here). Consecutive data blocks of one version go in one write.
        let at = 0;
        let i = 0;
        while (i < run.count) {
          if (read.states[i] !== BlockState.DATA) {
            i++;
            continue;
          }
          let end = i + 1;
          while (end < run.count && read.states[end] === BlockState.DATA && read.epochs[end] === read.epochs[i] && read.seqs[end] === read.seqs[i] && read.stamps[end] === read.stamps[i]) end++;
          const count = end - i;
          await engine.write({
            volumeId: header.volumeId, chunkIndex: header.chunkIndex, offsetBlocks: run.start + i, data: read.data.subarray(at * BLOCK_SIZE_BYTES, (at + count) * BLOCK_SIZE_BYTES),
            // The copy keeps the version's snap stamp (READ descriptors carry it), so snapshots see it as on the peer.
            checksums: read.checksums.slice(i, end), version: { epoch: read.epochs[i]!, seq: read.seqs[i]! }, snapSeq: read.stamps[i]!,
          });
          this.bytesCopied += count * BLOCK_SIZE_BYTES;
          at += count;
          i = end;
        }
        if (run.state === BlockState.DATA) this.#pending.set(key, Math.max(0, (this.#pending.get(key) ?? 0) - run.count * BLOCK_SIZE_BYTES));
        await this.#throttle(run.count * BLOCK_SIZE_BYTES);
      }
      if (!skip) {
        const mine = local.get(`${peerObject.volumeId}:${peerObject.chunkIndex}`);
        await this.#checkSnapshots(channel, common, peerObject.volumeId, peerObject.chunkIndex, Math.max(peerObject.states.length, mine?.states.length ?? 0));
      }
      if (runs.length > 0 && since > 0 && this.#deps.env.clock.nowMs() - this.#cursorWrittenMs >= CURSOR_PERSIST_INTERVAL_MS) {
        // Durable first: the cursor must never claim an object whose copy a crash could lose.
        await engine.flush();
        this.#cursor.set(cursorKey, { since, volumeId: peerObject.volumeId, chunkIndex: peerObject.chunkIndex });
        this.#cursorDirty = true;
        await this.#persistCursor(true);
      }
    }
    // Objects only this replica holds: a live snapshot must not read anything there the clean holder lacks.
    const listed = new Set(peerObjects.map((object) => `${object.volumeId}:${object.chunkIndex}`));
    for (const [objectKey, mine] of local) {
      if (!listed.has(objectKey)) await this.#checkSnapshots(channel, common, mine.volumeId, mine.chunkIndex, mine.states.length);
    }
    await engine.flush();
    await this.#persistCursor(true);
  }

  /**
   * S3 data (namespace 1) of the PG: LIST_PG with namespace 1 lists every data chunk the peer holds
   * in the PG; blocks where the peer's version is newer (written (1, 1), freed (1, 2)) are copied
   * with their version. Chunks are immutable, so the newest version is the right one everywhere.
   */
  async #copyS3Data(channel: StoreChannel, common: { poolId: number; pgId: number; pgCount: number; pgEpoch: number }): Promise<void> {
    const { engine } = this.#deps;
    const listing = await channel.request({ op: Op.LIST_PG, namespace: Namespace.S3_DATA, ...common });
    const peerObjects = decodeListReply(listing.payload);
    if (peerObjects.length === 0) return;
    const local = new Map<string, ListedObject>();
    const inPg = (engineId: number, chunkIndex: number): boolean => {
      const local = namespacedId(engineId);
      return local?.namespace === Namespace.S3_DATA && placementGroupOf(local.id, chunkIndex, common.pgCount) === common.pgId;
    };
    for (const object of engine.listObjects(undefined, inPg)) local.set(`${namespacedId(object.volumeId)!.id}:${object.chunkIndex}`, object);
    for (const peerObject of peerObjects) {
      const engineId = engineObjectId(Namespace.S3_DATA, peerObject.volumeId);
      for (const run of newerRuns(peerObject, local.get(`${peerObject.volumeId}:${peerObject.chunkIndex}`))) {
        await this.#waitForRoom();
        for (let waited = 0; waited < 20 && this.#deps.clientBusy?.(); waited += 2) await this.#deps.env.clock.sleep(2);
        const where = { volumeId: engineId, chunkIndex: peerObject.chunkIndex };
        if (run.state === BlockState.ZERO) {
          await engine.writeZeroes({ ...where, offsetBlocks: run.start, countBlocks: run.count, version: { epoch: run.epoch, seq: run.seq }, snapSeq: 0 });
          continue;
        }
        const reply = await channel.request({
          op: Op.READ, flags: Flag.REPAIR, namespace: Namespace.S3_DATA, ...common, volumeId: peerObject.volumeId, chunkIndex: peerObject.chunkIndex, offsetBlocks: run.start, countBlocks: run.count,
        });
        const read = decodeReadReply(reply.payload, run.count);
        let at = 0;
        for (let i = 0; i < run.count; i++) {
          if (read.states[i] !== BlockState.DATA) continue;
          // Checked here too: a copy never spreads a block that went bad on the peer.
          const data = read.data.subarray(at * BLOCK_SIZE_BYTES, (at + 1) * BLOCK_SIZE_BYTES);
          at++;
          if (crc32c(data) !== read.checksums[i]) throw new ShaleError('CHECKSUM', `S3 data ${peerObject.volumeId} chunk ${peerObject.chunkIndex} block ${run.start + i} failed its crc32c on the peer`);
          await engine.write({ ...where, offsetBlocks: run.start + i, data, checksums: Uint32Array.of(read.checksums[i]!), version: { epoch: read.epochs[i]!, seq: read.seqs[i]! }, snapSeq: 0 });
          this.bytesCopied += BLOCK_SIZE_BYTES;
        }
        await this.#throttle(run.count * BLOCK_SIZE_BYTES);
      }
    }
  }

  /**
   * S3 index (namespace 2) of the PG: KV_LIST_PG pages through every record of the PG's shards on
   * the peer, delete tombstones too; each one newer than this replica's is applied with its version.
   */
  async #copyS3Index(channel: StoreChannel, common: { poolId: number; pgId: number; pgCount: number; pgEpoch: number }): Promise<void> {
    const { engine } = this.#deps;
    let after: { shardId: number; key: Buffer } | undefined;
    const mine = new Map<number, Map<string, { epoch: number; seq: number }>>();
    const versionsOf = (shardId: number): Map<string, { epoch: number; seq: number }> => {
      let versions = mine.get(shardId);
      if (!versions) {
        versions = new Map(engine.kvRecords(engineObjectId(Namespace.S3_INDEX, shardId)).map((record) => [record.key.toString('latin1'), record.version]));
        mine.set(shardId, versions);
      }
      return versions;
    };
    for (;;) {
      const reply = await channel.request({ op: Op.KV_LIST_PG, namespace: Namespace.S3_INDEX, ...common, countBlocks: RESYNC_KV_PAGE }, [encodeKvPgCursor(after)]);
      const records = decodeKvPgRecords(reply.payload);
      for (const record of records) {
        const known = versionsOf(record.shardId).get(record.key.toString('latin1'));
        if (known && compareVersions(record.epoch, record.seq, known.epoch, known.seq) <= 0) continue;
        const shard = engineObjectId(Namespace.S3_INDEX, record.shardId);
        const version = { epoch: record.epoch, seq: record.seq };
        if (record.value) await engine.kvPut(shard, Buffer.from(record.key), Buffer.from(record.value), version);
        else await engine.kvDelete(shard, Buffer.from(record.key), version);
        this.kvRecordsCopied++;
        await this.#throttle(record.key.length + (record.value?.length ?? 0));
      }
      if (records.length < RESYNC_KV_PAGE) return;
      const last = records[records.length - 1]!;
      after = { shardId: last.shardId, key: Buffer.from(last.key) };
    }
  }

  /**
   * Snapshots versus resync (docs/healing.md): for each live snapshot k of the volume, this
   * replica's version of each block at k must be the clean holder's. Where it differs (a snapshot
   * taken while this replica was away needs a version it never had), the holder's version at k is
   * copied in with its snap stamp — the engine keeps an older version as history when a snapshot
   * needs it. A snapshot still differing afterwards is recorded incomplete on this store
   * (snap-gaps.ts): it serves no reads of it from then on.
   */
  async #checkSnapshots(channel: StoreChannel, common: { poolId: number; pgId: number; pgCount: number; pgEpoch: number }, volumeId: number, chunkIndex: number, blocks: number): Promise<void> {
    const gaps = this.#deps.snapshotGaps;
    const { engine } = this.#deps;
    if (!gaps || blocks === 0) return;
    const ids = (engine.snapshots(volumeId)?.ids ?? []).filter((id) => !gaps.has(volumeId, id));
    if (ids.length === 0) return;
    // Pass 0 copies in what differs; pass 1 compares again and records what still differs.
    for (let pass = 0; pass < 2; pass++) {
      for (const snapshotId of ids) {
        if (gaps.has(volumeId, snapshotId)) continue;
        for (let offset = 0; offset < blocks; offset += BLOCKS_PER_REQUEST_MAX) {
          const count = Math.min(BLOCKS_PER_REQUEST_MAX, blocks - offset);
          const header = { ...common, volumeId, chunkIndex, offsetBlocks: offset, countBlocks: count, snapSeq: snapshotId };
          let theirs: { states: Uint8Array; epochs: Uint32Array; seqs: Float64Array };
          let mine: { states: Uint8Array; epochs: ArrayLike<number>; seqs: ArrayLike<number> };
          try {
            const reply = await channel.request({ op: Op.BLOCK_VERSIONS, flags: Flag.REPAIR, ...header });
            theirs = decodeBlockVersions(reply.payload, count);
            mine = engine.blockVersions(volumeId, chunkIndex, offset, count, snapshotId);
          } catch (error) {
            if (error instanceof ShaleError && error.code === 'NOT_FOUND') break; // the snapshot (or volume) was deleted meanwhile
            if (isSnapshotGapError(error)) {
              // The holder's own copy of the snapshot is incomplete: nothing here can be checked against it.
              await this.#recordGap(volumeId, snapshotId, `the clean holder's copy is incomplete too`);
              break;
            }
            throw error;
          }
          const differing: number[] = [];
          for (let i = 0; i < count; i++) if (!sameVersion(theirs, mine, i)) differing.push(i);
          if (differing.length === 0) continue;
          if (pass === 1) {
            await this.#recordGap(volumeId, snapshotId, `chunk ${chunkIndex} block ${offset + differing[0]!}: ${differing.length} block(s) differ from the clean holder`);
            break;
          }
          for (const i of differing) await this.#copyVersionAt(channel, { ...header, offsetBlocks: offset + i, countBlocks: 1 });
        }
      }
    }
  }

  /** Copies the holder's version of one block at a snapshot (with its snap stamp) into this replica's history. */
  async #copyVersionAt(channel: StoreChannel, header: { poolId: number; pgId: number; pgCount: number; pgEpoch: number; volumeId: number; chunkIndex: number; offsetBlocks: number; countBlocks: 1; snapSeq: number }): Promise<void> {
    const { engine } = this.#deps;
    let read: ReturnType<typeof decodeReadReply>;
    try {
      const reply = await channel.request({ op: Op.READ_SNAP, flags: Flag.REPAIR, ...header });
      read = decodeReadReply(reply.payload, 1);
    } catch (error) {
      if ((error instanceof ShaleError && error.code === 'NOT_FOUND') || isSnapshotGapError(error)) return; // the second pass decides
      throw error;
    }
    const version = { epoch: read.epochs[0]!, seq: read.seqs[0]! };
    const where = { volumeId: header.volumeId, chunkIndex: header.chunkIndex, offsetBlocks: header.offsetBlocks };
    if (read.states[0] === BlockState.DATA) {
      await engine.write({ ...where, data: Buffer.from(read.data.subarray(0, BLOCK_SIZE_BYTES)), checksums: Uint32Array.of(read.checksums[0]!), version, snapSeq: read.stamps[0]! });
    } else if (read.states[0] === BlockState.ZERO) {
      await engine.writeZeroes({ ...where, countBlocks: 1, version, snapSeq: read.stamps[0]! });
    } else {
      return; // absent at the snapshot on the holder: nothing to copy in (the second pass records it if this replica has something there)
    }
    this.snapshotVersionsCopied++;
  }

  async #recordGap(volumeId: number, snapshotId: number, reason: string): Promise<void> {
    await this.#deps.snapshotGaps!.mark(volumeId, snapshotId, reason);
    this.snapshotGapsFound++;
    this.#deps.log(`snapshot ${snapshotId} of volume ${volumeId} is incomplete on this store (${reason}); other replicas serve it`);
  }
}

/** Same state and, unless absent, the same version. */
function sameVersion(a: { states: Uint8Array; epochs: ArrayLike<number>; seqs: ArrayLike<number> }, b: { states: Uint8Array; epochs: ArrayLike<number>; seqs: ArrayLike<number> }, i: number): boolean {
  if (a.states[i] !== b.states[i]) return false;
  return a.states[i] === BlockState.ABSENT || (a.epochs[i] === b.epochs[i] && a.seqs[i] === b.seqs[i]);
}

/** A block this replica holds at a version the clean replicas never got. */
interface Divergent {
  volumeId: number;
  chunkIndex: number;
  block: number;
  epoch: number;
  seq: number;
  /** What the clean replica holds there (DATA: copy its data; else zeros). */
  peerState: number;
}

/**
 * Blocks where `mine` is newer than the peer's (or the peer has nothing) and written under an owner
 * epoch older than the volume's current one: writes of a writer that is gone, which reached this
 * replica and none of the clean ones (the next owner's reconciliation did not see them: this store
 * was down). A write of the current owner is never one: it is in flight to every replica.
 */
export function divergentBlocks(peer: ListedObject | undefined, mine: ListedObject, currentOwnerEpoch: number): Divergent[] {
  const result: Divergent[] = [];
  for (let i = 0; i < mine.states.length; i++) {
    if (mine.states[i] === BlockState.ABSENT) continue;
    const epoch = mine.epochs[i]!;
    if (epoch >= currentOwnerEpoch) continue;
    const peerState = peer && i < peer.states.length ? peer.states[i]! : BlockState.ABSENT;
    const newer = peerState === BlockState.ABSENT || compareVersions(epoch, mine.seqs[i]!, peer!.epochs[i]!, peer!.seqs[i]!) > 0;
    if (newer) result.push({ volumeId: mine.volumeId, chunkIndex: mine.chunkIndex, block: i, epoch, seq: mine.seqs[i]!, peerState });
  }
  return result;
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
