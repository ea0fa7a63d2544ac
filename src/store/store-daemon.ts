/**
 * A store daemon: one disk, the store protocol server, and its life in the cluster — register with
 * the conductor (by disk uuid, so a returning store keeps its id), heartbeat, follow the map
 * (PG epochs, own replica states, owner fences, deleted volumes), resync recovering PGs.
 *
 * Start-up order: engine open (replay) → listen → register → first map applied → serve. Until the
 * first map is applied every request but PING gets NOT_READY (see store-view.ts).
 */
import type { Env, Timer } from '../env/env.ts';
import { ShaleError } from '../lib/errors.ts';
import { formatBytes } from '../lib/units.ts';
import { ConductorClient, MapWatcher } from '../proto/conductor-client.ts';
import type { LocalStores } from '../proto/local-channel.ts';
import { StoreChannel } from '../proto/store-channel.ts';
import { poolNeeds } from '../conductor/api/acting.ts';
import type { ClusterMap, DiskReport } from '../conductor/api/types.ts';
import type { BlockEngine } from './block-engine.ts';
import { Resyncer } from './resync.ts';
import { SnapshotGaps } from './snap-gaps.ts';
import { StoreServer } from './store-server.ts';
import { MapStoreView } from './store-view.ts';

export interface StoreDaemonOptions {
  diskPath: string;
  /** Size of a new disk file; a raw device or existing file keeps its size. */
  diskSizeBytes?: number;
  /** Format the disk if it has no Shale superblock yet. An existing Shale disk is never reformatted. */
  format: boolean;
  listen: string;
  conductorUrls: string | readonly string[];
  domain: string;
  /** Bytes per second a resync may copy into this store; 0 = unlimited. */
  resyncRateBytesPerSecond?: number;
  log: (message: string) => void;
  /** Awaited after the disk is open and the server listens, before registering (lets a supervisor order registrations). */
  beforeRegister?: () => Promise<void>;
  /** Register the server here so clients of this same process reach it without a socket. */
  localStores?: LocalStores;
  /** How often the store logs what its read cache did, when it did anything. Default 10 minutes. */
  cacheReportIntervalMs?: number;
  openEngine: (env: Env, options: { path: string; clusterId: string; format: boolean; sizeBytes?: number }) => Promise<BlockEngine>;
}

export interface StoreDaemon {
  readonly storeId: number;
  readonly address: string;
  readonly engine: BlockEngine;
  readonly resyncer: Resyncer;
  readonly snapshotGaps: SnapshotGaps;
  close(): Promise<void>;
}

export async function startStoreDaemon(env: Env, options: StoreDaemonOptions): Promise<StoreDaemon> {
  const { log } = options;
  const conductor = new ConductorClient(env, options.conductorUrls);
  const cluster = await retryUntilReachable(env, () => conductor.cluster(), log);
  const engine = await options.openEngine(env, {
    path: options.diskPath, clusterId: cluster.clusterId, format: options.format, sizeBytes: options.diskSizeBytes,
  });
  const view = new MapStoreView();
  const snapshotGaps = new SnapshotGaps(env, engine);
  const server = new StoreServer(env, { engine, view, log, snapshotGaps });
  const address = await server.listen(options.listen);
  options.localStores?.add(address, server);
  const diskReport = (): DiskReport[] => {
    const stats = engine.stats();
    return [{ uuid: engine.diskUuid, path: engine.path, capacityBytes: stats.capacityBytes, usedBytes: stats.usedBytes, liveBytes: stats.liveBytes }];
  };
  await options.beforeRegister?.();
  const registration = await retryUntilReachable(env, () => conductor.register({
    diskUuid: engine.diskUuid, clusterId: cluster.clusterId, address, domain: options.domain, disks: diskReport(),
  }), log);
  view.storeId = registration.storeId;
  log(`store ${registration.storeId} serving ${options.diskPath} on ${address}`);

  const channels = new Map<string, StoreChannel>();
  const channel = (peerAddress: string): StoreChannel => {
    let existing = channels.get(peerAddress);
    if (!existing) {
      existing = new StoreChannel(env, peerAddress, { timeoutMs: 30_000 });
      channels.set(peerAddress, existing);
    }
    return existing;
  };
  const resyncer = new Resyncer({
    env, engine, view, conductor, channel, log, rateBytesPerSecond: options.resyncRateBytesPerSecond ?? 0,
    cursorPath: options.diskPath.startsWith('/dev/') ? undefined : `${options.diskPath}.resync-cursor.json`,
    clientBusy: () => server.clientBusy(),
    snapshotGaps,
  });

  let applying = Promise.resolve();
  const applyMap = async (map: ClusterMap): Promise<void> => {
    // Owner fences and deletions the store missed while away are made durable before it serves.
    for (const [volumeId, ownerEpoch] of map.owners) {
      if (engine.ownerEpoch(volumeId) < ownerEpoch) await engine.fence(volumeId, ownerEpoch);
    }
    for (const volumeId of map.deletedVolumes) {
      if (!engine.isPurged(volumeId)) await engine.purgeVolume(volumeId);
    }
    await applySnapContexts(engine, map);
    await snapshotGaps.prune(map);
    view.apply(map);
    resyncer.onMap(map);
  };
  const watcher = new MapWatcher(env, conductor);
  watcher.onMap((map) => {
    applying = applying.then(() => applyMap(map)).catch((error: unknown) => log(`applying map ${map.epoch}: ${(error as Error).message}`));
  });
  await watcher.start();
  await applying;

  const cacheReport = startCacheReport(env, engine, options.cacheReportIntervalMs ?? CACHE_REPORT_INTERVAL_MS, log);
  const discardReport = startDiscardReport(env, engine, log);

  let heartbeatFailures = 0;
  // A store whose disk failed a write or sync (its engine says so, whoever met it: a client's
  // write, a resync, compaction, a checkpoint) takes itself out of service where every PG can do
  // without it (acting.ts): it reports itself down and stops heartbeating, so that the conductor
  // can re-replicate its PGs even when no client write meets the failure. Rejoining would only
  // take writes it fails; a restart, once the disk is fixed, brings it back. Where a PG needs it
  // (neededFor) it stays up, answering reads and failing writes, and looks again each period.
  let outOfService = false;
  let keptUpFor: string | undefined;
  const takeOutOfService = (failure: ShaleError, reportDown: boolean): void => {
    outOfService = true;
    heartbeat.cancel();
    log(`out of service: ${failure.message}; restart this store once its disk is fixed`);
    if (!reportDown) return;
    // Unreachable conductor: missed heartbeats mark it down all the same.
    conductor.reportDown(registration.storeId, { reporter: `store ${registration.storeId}`, reason: `its disk failed: ${failure.message}` })
      .catch((error: unknown) => log(`reporting itself down: ${(error as Error).message}; the conductor will find its heartbeats missing`));
  };
  const heartbeat: Timer = env.clock.every(registration.heartbeatIntervalMs, () => {
    const failure = engine.failure();
    if (failure && !outOfService) {
      const needed = neededFor(watcher.map, registration.storeId);
      if (needed === undefined) {
        takeOutOfService(failure, true);
        return;
      }
      if (keptUpFor !== needed) log(`disk failed (${failure.message}), staying up for reads: ${needed}`);
      keptUpFor = needed;
    }
    conductor.heartbeat(registration.storeId, { disks: diskReport(), recovery: resyncer.report() }).then(
      () => {
        heartbeatFailures = 0;
      },
      (error: unknown) => {
        if (outOfService) return;
        if (heartbeatFailures++ % 20 === 0) log(`heartbeat: ${(error as Error).message}`);
        const forgotten = error instanceof ShaleError && error.code === 'NOT_FOUND';
        const failure = engine.failure();
        // Marked down after its disk failed (a client reported it on DISK_FAILED): stay down.
        if (forgotten && failure) {
          takeOutOfService(failure, false);
          return;
        }
        // The conductor may have forgotten us (marked down and restarted): register again.
        if (forgotten) {
          void conductor.register({ diskUuid: engine.diskUuid, clusterId: cluster.clusterId, address, domain: options.domain, disks: diskReport() }).catch(() => {});
        }
      },
    );
  });

  return {
    storeId: registration.storeId,
    address,
    engine,
    resyncer,
    snapshotGaps,
    async close(): Promise<void> {
      heartbeat.cancel();
      cacheReport?.cancel();
      discardReport?.cancel();
      watcher.stop();
      options.localStores?.remove(address);
      await server.close();
      for (const existing of channels.values()) existing.close();
      await engine.close();
    },
  };
}

/** Why some PG needs the store (acting.ts: poolNeeds), or undefined if none does. */
function neededFor(map: ClusterMap | undefined, storeId: number): string | undefined {
  if (map === undefined) return 'no map yet';
  const self = new Set([storeId]);
  for (const pool of map.pools) {
    const why = poolNeeds(map, pool, self);
    if (why !== undefined) return `${why} without it`;
  }
  return undefined;
}

const CACHE_REPORT_INTERVAL_MS = 10 * 60_000;

/**
 * Logs the read cache's size at start, then every `intervalMs` in which it was used: how much it
 * holds and how many block lookups hit since the last line. Undefined without a cache.
 */
function startCacheReport(env: Env, engine: BlockEngine, intervalMs: number, log: (message: string) => void): Timer | undefined {
  const first = engine.stats().cache;
  if (first === undefined) return undefined;
  log(`read cache: up to ${formatBytes(first.capacityBytes)} (--cache-size), taken as blocks are read`);
  let last = first;
  return env.clock.every(intervalMs, () => {
    const now = engine.stats().cache!;
    const lookups = now.hits + now.misses - last.hits - last.misses;
    if (lookups > 0) {
      const hits = now.hits - last.hits;
      log(`read cache: ${formatBytes(now.cachedBytes)} of ${formatBytes(now.capacityBytes)} held; ${hits} of ${lookups} block lookups hit ` +
        `(${Math.round((100 * hits) / lookups)} %), ${now.evictions - last.evictions} evicted, ${now.pinned} lent to replies not yet written`);
    }
    last = now;
  });
}

/** How often a store asked to give freed segments back looks whether its disk refused. */
const DISCARD_CHECK_INTERVAL_MS = 5_000;

/**
 * With `--discard`: logs, soon after it happens, that the disk refused to have freed segments
 * given back (a block device, a file system without holes). A disk refuses at the first call or
 * not at all, so looking stops once a call went through (the engine's stats keep any later
 * refusal). Undefined without `--discard`.
 */
function startDiscardReport(env: Env, engine: BlockEngine, log: (message: string) => void): Timer | undefined {
  if (engine.stats().discard === undefined) return undefined;
  const timer = env.clock.every(DISCARD_CHECK_INTERVAL_MS, () => {
    const discard = engine.stats().discard!;
    if (discard.failure !== undefined) log(`--discard: freed segments are not given back to the file system: ${discard.failure}`);
    if (discard.failure !== undefined || discard.calls > 0) timer.cancel();
  });
  return timer;
}

/**
 * Tells the engine each volume's live snapshots and snap sequence (it trims what only deleted
 * snapshots needed) and which volumes are clones (their tombstones must stay: an absent block
 * would read through to the parent). Only changes are written; the map never goes back.
 */
export async function applySnapContexts(engine: BlockEngine, map: ClusterMap): Promise<void> {
  const deleted = new Set(map.deletedVolumes);
  for (const context of map.snapContexts ?? []) {
    if (deleted.has(context.volumeId) || engine.isPurged(context.volumeId)) continue;
    const known = engine.snapshots(context.volumeId);
    const keepTombstones = context.parent !== null;
    if (known && known.snapSeq > context.seq) continue; // an older map than the engine has seen
    if (known && known.snapSeq === context.seq && known.keepTombstones === keepTombstones && sameIds(known.ids, context.snapshots)) continue;
    await engine.setSnapshots(context.volumeId, context.snapshots, { snapSeq: context.seq, keepTombstones });
  }
}

function sameIds(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((id, i) => id === b[i]);
}

async function retryUntilReachable<T>(env: Env, call: () => Promise<T>, log: (message: string) => void): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await call();
    } catch (error) {
      if (!(error instanceof ShaleError) || !['UNAVAILABLE', 'NOT_READY', 'SHUTTING_DOWN'].includes(error.code)) throw error;
      if (attempt % 20 === 0) log(`waiting for the conductor: ${error.message}`);
      await env.clock.sleep(Math.min(100 * 2 ** attempt, 1000));
    }
  }
}
