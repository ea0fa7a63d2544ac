/**
 * The conductor: Shale's control plane (DESIGN §5). It keeps cluster membership, pools and PG
 * placement, volumes and owners in a MetaStore, serves them over the HTTP API, and detects failed
 * stores by missed heartbeats. It is never on the data path: clients cache the map it publishes
 * and long-poll for changes, so I/O goes on while it restarts or fails over.
 *
 * One or several. With SQLite (`sqlite:PATH`) one conductor runs and always leads. With etcd
 * (`etcd://H:P,…`) several may run; they elect a leader (meta/etcd-election.ts). Only the leader
 * writes, detects failures and keeps heartbeat state; the others answer reads from etcd, wake
 * their long polls from an etcd watch of the map epoch, and redirect writes to the leader (HTTP
 * 307). Every commit is guarded by the leader key, so a deposed leader can never hand out an
 * epoch or id.
 *
 * State: the MetaStore is the truth; memory holds only what is leader-local and rebuilt whenever
 * this conductor starts to lead: heartbeat times (monotonic; every up store gets a fresh grace
 * period), the latest disk figures (persisted at most every diskPersistIntervalMs, so heartbeats
 * cost no commit), the serialized map of the current epoch, and the long-poll waiters.
 *
 * Ordering: every change is one MetaStore transaction (cluster-ops.ts); answers that carry a map
 * (report-down, mark-clean, open) are built after the commit, so a client never acts on an epoch
 * that a crash could undo. Failure detection runs every heartbeatTimeoutMs/4 on the leader and
 * marks every store silent for longer than heartbeatTimeoutMs down in one transaction.
 */
import { dirname } from 'node:path';
import type { Env, Listener, Timer } from '../env/env.ts';
import { parseAddress } from '../env/env.ts';
import { assert } from '../lib/assert.ts';
import { ShaleError } from '../lib/errors.ts';
import { StoreChannel } from '../proto/store-channel.ts';
import { Op } from '../proto/store-protocol.ts';

/** How long a scrub relayed to a store may take (it reads the whole disk). */
const scrubTimeoutMs = 6 * 3_600_000;
import { adminTokenName, newToken, TokenAuthenticator, tokenSha256 } from './api/auth.ts';
import { openApiDocument } from './api/openapi.ts';
import { S3Registry } from './s3-registry.ts';
import { type ConductorService, conductorRoutes, createHttpHandler, type Log, type MapSnapshot } from './api/server.ts';
import type {
  ClusterInfo, ClusterStatus, ConductorInfo, DiskInfo, DiskReport, OpenVolumeResponse, PoolDetail, PoolInfo, RegisterStoreResponse, SnapshotInfo,
  StoreInfo, VolumeInfo,
} from './api/types.ts';
import { ClusterOps, type ClusterConfig, type CreateVolumeInput, type PoolSpec, type RegisterInput } from './cluster-ops.ts';
import { type ConductorIdentity, type Leadership, SoleLeadership } from './leadership.ts';
import {
  acknowledgeSnapshots, cloneVolume, createSnapshot, deleteSnapshot, markFlattened, snapshotByName, snapshotInfo,
} from './snapshot-ops.ts';
import {
  buildMap, buildStatus, diskInfos, type LiveHeartbeat, poolCapacity, poolDetail, poolInfo, poolInfos, storeInfo, volumeInfo, volumeInfos,
  volumeInfoWithSnapshots, withLive,
} from './map-view.ts';
import { MapWatch } from './map-watch.ts';
import { EtcdElection } from './meta/etcd-election.ts';
import { EtcdMetaStore, parseEtcdUrl } from './meta/etcd-meta-store.ts';
import type { MetaStore } from './meta/meta-store.ts';
import { SqliteMetaStore } from './meta/sqlite-meta-store.ts';
import { pgCountMax, replicasMax } from './validate.ts';
import {
  applyMove, bytesPerReplicaEstimate, describePlan, fullnessLevel, fullnessOf, type MovePlan, planAfter, planMoves, volumePgs,
} from './healing.ts';
import { scrubReplicas } from './scrub.ts';
import type { RecoveryReport, RecoveryStatus, ScrubResult, VolumeHealth } from './api/types.ts';
import type { PgRecord, PoolRecord, StoreRecord } from './meta/meta-store.ts';

export interface AdminTokenOptions {
  /** A token the caller already holds (shale up keeps one in its data directory). */
  known?: string;
  /** Make a new admin token if the cluster's is not `known` (shale up, which owns its cluster). */
  replaceUnlessKnown?: boolean;
  /** Make a new admin token even if there is one: the old one stops working. */
  replace?: boolean;
  /** Called with a new token after it is committed and before the API serves; it should keep it (mode 0600). */
  onCreated?(token: string): Promise<void>;
}

export interface ConductorOptions {
  /** Metadata: "PATH" or "sqlite:PATH" (a SQLite file, created if missing), or "etcd://HOST:PORT[,HOST:PORT…][/prefix]". */
  metaPath: string;
  /** "HOST:PORT" to serve the API on; port 0 picks a free one. */
  listen: string;
  /** The URL other processes reach this conductor at (the leader key holds it). Default http://<bound address>. */
  advertiseUrl?: string;
  /** A store is marked down after this long without a heartbeat. Default 5000. */
  heartbeatTimeoutMs?: number;
  /** The period stores are told to heartbeat at. Default heartbeatTimeoutMs / 4. */
  heartbeatIntervalMs?: number;
  /** Replicas of the default pool, created once that many stores are up. Default 3. */
  defaultReplicas?: number;
  /** PGs per pool made without an explicit count. Default 256. */
  pgCount?: number;
  /** A store down this long is marked out and its PGs re-replicated elsewhere. Default 600 000 (10 minutes). */
  downOutIntervalMs?: number;
  /** The leader scrubs every volume's replicas this often; 0 = never (on demand only). Default 86 400 000 (a day). */
  scrubIntervalMs?: number;
  /** MiB per second each store reads for a periodic scrub (0: no limit). Default 64. */
  scrubMibPerSecond?: number;
  /**
   * "token": every request but the OpenAPI document needs the admin token (the CLI roles always
   * run so). "none" (the default, for in-process tests and embedders): no token is asked for.
   */
  auth?: 'none' | 'token';
  adminToken?: AdminTokenOptions;
  /** etcd only: the leader's lease TTL in whole seconds (default 5) and the election poll (default 250 ms). */
  leaseTtlSeconds?: number;
  electionPollMs?: number;
  log?: Log;
}

export interface Conductor {
  /** The bound API address, "HOST:PORT". */
  readonly address: string;
  /** The advertised base URL. */
  readonly url: string;
  readonly id: string;
  readonly clusterId: string;
  /** The admin token made by this start (first start, or replaced), to show once; undefined otherwise. */
  readonly newAdminToken: string | undefined;
  readonly isLeader: boolean;
  close(): Promise<void>;
}

/** Mark-clean requests committed in one transaction at most. */
export const markCleanBatchMax = 512;
/** Most long polls waiting at once. */
export const mapWaitersMax = 10_000;
export { pgCountMax };
/** How often at most a store's changing disk figures are written to the MetaStore. */
export const diskPersistIntervalMs = 30_000;

function positiveInteger(value: number, name: string, maximum: number): number {
  if (!Number.isSafeInteger(value) || value < 1 || value > maximum) {
    throw new ShaleError('INVALID_ARGUMENT', `${name} must be a whole number from 1 to ${maximum} (got ${value})`);
  }
  return value;
}

/** The same disks (uuid, path, capacity) in the same order; usedBytes may differ. */
function sameDiskSet(a: readonly DiskReport[], b: readonly DiskReport[]): boolean {
  return a.length === b.length && a.every((disk, i) => disk.uuid === b[i]!.uuid && disk.path === b[i]!.path && disk.capacityBytes === b[i]!.capacityBytes);
}

class ConductorCore implements ConductorService {
  readonly #env: Env;
  readonly #meta: MetaStore;
  readonly #config: ClusterConfig;
  readonly #log: Log;
  readonly #identity: ConductorIdentity;
  readonly #leadership: Leadership;
  readonly clusterId: string;
  readonly heartbeatTimeoutMs: number;
  readonly heartbeatIntervalMs: number;
  /** Monotonic time of the last sign of life of each store believed up (leader only). */
  readonly #lastSeenMs = new Map<number, number>();
  /** Latest heartbeat of each up store (leader only). */
  readonly #live = new Map<number, LiveHeartbeat>();
  /** Monotonic time each store's disk figures were last written to the MetaStore. */
  readonly #persistedAtMs = new Map<number, number>();
  readonly watch: MapWatch;
  #cached: MapSnapshot | undefined;
  /** The build of the map under way, for the epoch it started at. */
  #building: { epoch: number; promise: Promise<MapSnapshot> } | undefined;
  readonly s3: S3Registry;
  #checking = false;
  /** Monotonic time each down store was first seen down by this leader (down-out timer). */
  readonly #downSinceMs = new Map<number, number>();
  /** Latest resync figures of each store (leader only). */
  readonly #recovery = new Map<number, RecoveryReport>();
  /** Why each store marked down while this conductor led went down, until it is back up (from ClusterOps.storeStateChanges). */
  readonly #downReasons = new Map<number, string>();
  readonly downOutIntervalMs: number;
  readonly scrubIntervalMs: number;
  readonly scrubMibPerSecond: number;
  #healing = false;
  readonly #cleanQueue: { poolId: number; pgIndex: number; storeId: number; pgEpoch: number; resolve: () => void; reject: (error: unknown) => void }[] = [];
  #cleaning = false;
  #scrubbing: Promise<ScrubResult> | undefined;
  #lastScrub: ScrubResult | null = null;
  #lastScrubAtMs: number | undefined;

  constructor(env: Env, meta: MetaStore, config: ClusterConfig, log: Log, identity: ConductorIdentity, leadership: Leadership, clusterId: string, epoch: number, timing: { timeoutMs: number; intervalMs: number; downOutIntervalMs: number; scrubIntervalMs: number; scrubMibPerSecond: number }) {
    this.downOutIntervalMs = timing.downOutIntervalMs;
    this.scrubIntervalMs = timing.scrubIntervalMs;
    this.scrubMibPerSecond = timing.scrubMibPerSecond;
    this.#env = env;
    this.#meta = meta;
    this.#config = config;
    this.#log = log;
    this.#identity = identity;
    this.#leadership = leadership;
    this.clusterId = clusterId;
    this.heartbeatTimeoutMs = timing.timeoutMs;
    this.heartbeatIntervalMs = timing.intervalMs;
    this.watch = new MapWatch(env.clock, epoch, mapWaitersMax);
    this.s3 = new S3Registry(env, meta);
  }

  #nowIso(): string {
    return new Date(this.#env.clock.wallMs()).toISOString();
  }

  /** Runs one state-machine transaction; after the commit logs its events and publishes a new epoch. */
  async #commit<T>(run: (ops: ClusterOps) => Promise<T>): Promise<T> {
    let ops: ClusterOps | undefined;
    const result = await this.#meta.write(async (tx) => {
      ops = new ClusterOps(tx, this.#config, this.#nowIso());
      return run(ops);
    });
    assert(ops, 'the transaction ran');
    for (const event of ops.events) this.#log(event);
    for (const [storeId, downReason] of ops.storeStateChanges) {
      if (downReason === undefined) this.#downReasons.delete(storeId);
      else this.#downReasons.set(storeId, downReason);
    }
    if (ops.newEpoch !== undefined) {
      this.#cached = undefined;
      this.watch.advance(ops.newEpoch);
    }
    return result;
  }

  /**
   * The map of the current epoch, serialized once: when a change wakes every long poll at once,
   * they share one build (single flight) instead of each reading the whole map.
   */
  #snapshot(): Promise<MapSnapshot> {
    const cached = this.#cached;
    if (cached && cached.map.epoch === this.watch.epoch) return Promise.resolve(cached);
    const building = this.#building;
    if (building && building.epoch === this.watch.epoch) return building.promise;
    const epoch = this.watch.epoch;
    const promise = (async () => {
      const map = await this.#meta.read((tx) => buildMap(tx, this.clusterId));
      // A read may see an epoch the watch has not delivered yet (another conductor committed it).
      this.watch.advance(map.epoch);
      const snapshot = { map, json: JSON.stringify(map) };
      // Cache only the newest epoch: a read that raced a commit must not shadow it.
      if (map.epoch === this.watch.epoch) this.#cached = snapshot;
      return snapshot;
    })();
    const entry = { epoch, promise };
    this.#building = entry;
    const clear = (): void => {
      if (this.#building === entry) this.#building = undefined;
    };
    promise.then(clear, clear);
    return promise;
  }

  /**
   * This conductor starts or stops leading. Starting: every store the MetaStore says is up gets
   * a fresh grace period (its heartbeats went to the old leader), and the epoch is read afresh.
   * Stopping: the leader-local state is dropped; the next leader rebuilds its own.
   */
  async onLeading(leading: boolean): Promise<void> {
    this.#lastSeenMs.clear();
    this.#live.clear();
    this.#persistedAtMs.clear();
    this.#downSinceMs.clear();
    this.#recovery.clear();
    this.#downReasons.clear();
    this.#cached = undefined;
    if (!leading) return;
    const now = this.#env.clock.nowMs();
    this.#lastScrubAtMs = now;
    const { stores, epoch } = await this.#meta.read(async (tx) => ({ stores: await tx.stores(), epoch: await tx.counter('mapEpoch') }));
    for (const store of stores) {
      if (store.state === 'up') this.#lastSeenMs.set(store.id, now);
      // A down store gets a full down-out interval from this leader's start.
      if (store.state === 'down') this.#downSinceMs.set(store.id, now);
    }
    this.watch.advance(epoch);
  }

  /** Marks down every store silent for longer than the timeout. Runs on a timer on the leader; never overlaps itself. */
  async checkHeartbeats(): Promise<void> {
    if (this.#checking || !this.#leadership.isLeader) return;
    const expired = (): number[] => {
      const deadline = this.#env.clock.nowMs() - this.heartbeatTimeoutMs;
      return [...this.#lastSeenMs].filter(([, seen]) => seen < deadline).map(([id]) => id);
    };
    if (expired().length === 0) return;
    this.#checking = true;
    try {
      const down = await this.#commit(async (ops) => {
        const marked: number[] = [];
        for (const id of expired()) {
          const store = await ops.tx.store(id);
          if (store && store.state === 'up') {
            await ops.markStoreDown(id, `no heartbeat for ${this.heartbeatTimeoutMs} ms`);
            marked.push(id);
          } else {
            marked.push(id); // already down or unknown: stop watching it
          }
        }
        return marked;
      });
      for (const id of down) {
        this.#forget(id);
        if (!this.#downSinceMs.has(id)) this.#downSinceMs.set(id, this.#env.clock.nowMs());
      }
    } catch (error) {
      if (error instanceof ShaleError && (error.code === 'SHUTTING_DOWN' || error.details?.notLeader)) return;
      this.#log(`heartbeat check failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
    } finally {
      this.#checking = false;
    }
  }

  #forget(storeId: number): void {
    this.#lastSeenMs.delete(storeId);
    this.#live.delete(storeId);
    this.#persistedAtMs.delete(storeId);
    this.#recovery.delete(storeId);
  }

  // ---- healing (healing.ts) -------------------------------------------------------------------

  /**
   * One healing step on the leader, after each failure check: stores down for longer than the
   * down-out interval are marked out; then every PG move the placement rule asks for now is
   * committed (new recovering replicas, old holders dropped once the new ones are clean). Never
   * overlaps itself; a failure is logged and the next tick tries again.
   */
  async heal(): Promise<void> {
    if (this.#healing || !this.#leadership.isLeader) return;
    this.#healing = true;
    try {
      const now = this.#env.clock.nowMs();
      const dueOut = [...this.#downSinceMs].filter(([, since]) => now - since >= this.downOutIntervalMs).map(([id]) => id);
      if (dueOut.length > 0) {
        await this.#commit(async (ops) => {
          for (const id of dueOut) {
            const store = await ops.tx.store(id);
            if (!store || store.state !== 'down') continue;
            const epoch = await ops.epoch();
            await ops.tx.putStore({ ...store, state: 'out', stateEpoch: epoch });
            ops.events.push(`store ${id} (${store.address}) marked out at epoch ${epoch}: down for ${this.downOutIntervalMs} ms; its PGs get replicas elsewhere`);
          }
        });
        for (const id of dueOut) this.#downSinceMs.delete(id);
      }
      // Stores that came back are no longer on the down-out timer.
      const layout = await this.#meta.read((tx) => this.#layout(tx));
      for (const store of layout.stores) if (store.state !== 'down') this.#downSinceMs.delete(store.id);
      for (const store of layout.stores) if (store.state === 'down' && !this.#downSinceMs.has(store.id)) this.#downSinceMs.set(store.id, now);
      const moves = planMoves(layout.stores, layout.pools).filter((move) => move.add.length > 0 || move.remove.length > 0);
      if (moves.length === 0) return;
      await this.#commit(async (ops) => {
        const current = await this.#layout(ops.tx);
        const fresh = planMoves(current.stores, current.pools).filter((move) => move.add.length > 0 || move.remove.length > 0);
        if (fresh.length === 0) return;
        const epoch = await ops.epoch();
        let added = 0;
        let removed = 0;
        for (const move of fresh) {
          const pg = current.pools.find((entry) => entry.pool.id === move.poolId)!.pgs.find((candidate) => candidate.index === move.pgIndex)!;
          await ops.tx.putPg(applyMove(pg, move, epoch));
          added += move.add.length;
          removed += move.remove.length;
        }
        ops.events.push(`placement at epoch ${epoch}: ${added} new replicas recovering, ${removed} replicas removed (their replacements are clean), over ${fresh.length} PGs`);
      });
    } catch (error) {
      if (error instanceof ShaleError && (error.code === 'SHUTTING_DOWN' || error.details?.notLeader)) return;
      this.#log(`healing step failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
    } finally {
      this.#healing = false;
    }
    if (this.scrubIntervalMs > 0 && this.#lastScrubAtMs !== undefined && this.#env.clock.nowMs() - this.#lastScrubAtMs >= this.scrubIntervalMs && !this.#scrubbing) {
      this.#lastScrubAtMs = this.#env.clock.nowMs();
      this.scrub(null, this.scrubMibPerSecond).then(
        (result) => this.#log(`periodic scrub: ${result.pgs} PGs, ${result.blocks} blocks compared, ${result.inconsistentBlocks} inconsistent, ${result.repairedBlocks} repaired`),
        (error: unknown) => this.#log(`periodic scrub failed: ${(error as Error).message}`),
      );
    }
  }

  async #layout(tx: import('./meta/meta-store.ts').MetaReadTx): Promise<{ stores: StoreRecord[]; pools: { pool: PoolRecord; pgs: PgRecord[] }[] }> {
    const stores = (await tx.stores()).map((store) => withLive(store, this.#live));
    const pools: { pool: PoolRecord; pgs: PgRecord[] }[] = [];
    for (const pool of await tx.pools()) pools.push({ pool, pgs: await tx.pgs(pool.id) });
    return { stores, pools };
  }

  #measuredRecoveryRate(): number {
    let rate = 0;
    for (const report of this.#recovery.values()) rate += report.bytesPerSecond;
    return rate;
  }

  /** What `change` would move (dry run), from the current layout. */
  async #plan(change: (stores: StoreRecord[]) => void): Promise<MovePlan> {
    const layout = await this.#meta.read((tx) => this.#layout(tx));
    const { moves, dropsLater } = planAfter(layout.stores, layout.pools, change);
    return describePlan(moves, bytesPerReplicaEstimate(layout.stores, layout.pools), this.#measuredRecoveryRate(), dropsLater);
  }

  /** The moves placement wants now (what the next healing steps will do). */
  rebalance(dryRun: boolean): Promise<MovePlan> {
    const plan = this.#plan(() => {});
    if (!dryRun) void this.heal();
    return plan;
  }

  /**
   * Drains a store: placement leaves it out, so every PG it holds gets a replica elsewhere and then
   * drops it. `cancel` takes it back into placement. Errors: NOT_FOUND; NOT_READY (the other stores
   * cannot hold the pools' replicas).
   */
  async drainStore(storeId: number, options: { dryRun: boolean; cancel: boolean }): Promise<MovePlan> {
    const layout = await this.#meta.read((tx) => this.#layout(tx));
    const store = layout.stores.find((candidate) => candidate.id === storeId);
    if (!store) throw new ShaleError('NOT_FOUND', `no store ${storeId}`);
    if (!options.cancel) {
      const others = layout.stores.filter((other) => other.id !== storeId && (other.state === 'up' || other.state === 'down') && !other.draining).length;
      const widest = Math.max(0, ...layout.pools.map((entry) => entry.pool.replicas));
      if (others < widest) {
        throw new ShaleError('NOT_READY', `store ${storeId} cannot be drained: the other ${others} stores cannot hold ${widest} replicas of every PG; add a store first`);
      }
    }
    const plan = await this.#plan((stores) => {
      const target = stores.find((candidate) => candidate.id === storeId)!;
      target.draining = !options.cancel;
    });
    if (options.dryRun) return plan;
    await this.#commit(async (ops) => {
      const record = await ops.tx.store(storeId);
      if (!record) throw new ShaleError('NOT_FOUND', `no store ${storeId}`);
      const next: StoreRecord = { ...record };
      if (options.cancel) delete next.draining;
      else next.draining = true;
      await ops.tx.putStore(next);
      ops.events.push(options.cancel ? `store ${storeId}: drain cancelled` : `store ${storeId} draining: ${plan.replicas} replicas to place elsewhere (~${plan.bytes} bytes)`);
    });
    void this.heal();
    return plan;
  }

  /** Compares the replicas of a volume's PGs (or every volume's) and repairs what differs. One at a time: BUSY while one runs. */
  async scrub(volumeName: string | null, mibPerSecond: number): Promise<ScrubResult> {
    if (this.#scrubbing) throw new ShaleError('BUSY', 'a scrub is already running: wait for it (cluster status shows the last result)');
    const run = (async () => {
      const input = await this.#meta.read(async (tx) => {
        const layout = await this.#layout(tx);
        let volumes = await tx.volumes();
        if (volumeName !== null) {
          const volume = await tx.volumeByName(volumeName);
          if (!volume) throw new ShaleError('NOT_FOUND', `no volume named ${volumeName}`);
          volumes = [volume];
        }
        return { ...layout, volumes, volumeName, mibPerSecond };
      });
      const channels = new Map<string, StoreChannel>();
      try {
        return await scrubReplicas(this.#env, input, (address) => {
          let channel = channels.get(address);
          if (!channel) channels.set(address, (channel = new StoreChannel(this.#env, address, { timeoutMs: scrubTimeoutMs })));
          return channel;
        }, this.#log);
      } finally {
        for (const channel of channels.values()) channel.close();
      }
    })();
    this.#scrubbing = run;
    try {
      const result = await run;
      this.#lastScrub = result;
      return result;
    } finally {
      this.#scrubbing = undefined;
    }
  }

  #recoveryStatus(stores: readonly StoreRecord[], pools: readonly { pool: PoolRecord; pgs: readonly PgRecord[] }[]): RecoveryStatus {
    const moves = planMoves(stores, pools);
    let replicasRecovering = 0;
    let replicasToRemove = 0;
    const moving = new Set<string>();
    const heldByDraining = new Map<number, number>();
    const draining = new Set(stores.filter((store) => store.draining).map((store) => store.id));
    for (const { pool, pgs } of pools) {
      for (const pg of pgs) {
        for (const replica of pg.replicas) {
          if (replica.state === 'recovering') {
            replicasRecovering++;
            moving.add(`${pool.id}.${pg.index}`);
          }
          if (draining.has(replica.storeId)) heldByDraining.set(replica.storeId, (heldByDraining.get(replica.storeId) ?? 0) + 1);
        }
      }
    }
    const blocked: string[] = [];
    for (const move of moves) {
      replicasToRemove += move.remove.length;
      if (move.add.length > 0) moving.add(`${move.poolId}.${move.pgIndex}`);
      for (const why of move.blocked) if (blocked.length < 20) blocked.push(`PG ${move.poolId}.${move.pgIndex}: ${why.reason}`);
    }
    // Replicas on out or draining stores leave once their replacements are clean.
    const leaving = new Set(stores.filter((store) => store.state === 'out' || store.draining).map((store) => store.id));
    for (const { pgs } of pools) for (const pg of pgs) for (const replica of pg.replicas) if (leaving.has(replica.storeId)) replicasToRemove++;
    let bytesCopied = 0;
    let bytesPerSecond = 0;
    let bytesPending = 0;
    let pgsQueued = 0;
    for (const report of this.#recovery.values()) {
      bytesCopied += report.bytesCopied;
      bytesPerSecond += report.bytesPerSecond;
      bytesPending += report.bytesPending;
      pgsQueued += report.pgsQueued;
    }
    const perReplica = bytesPerReplicaEstimate(stores, pools);
    const bytesRemaining = replicasRecovering > 0 ? Math.round(bytesPending + pgsQueued * perReplica) : 0;
    const fullness: RecoveryStatus['fullness'] = [];
    for (const store of stores) {
      if (store.state !== 'up') continue;
      const ratio = fullnessOf(store);
      const level = fullnessLevel(ratio);
      if (level !== 'ok') fullness.push({ storeId: store.id, ratio, level });
    }
    return {
      replicasRecovering, replicasToRemove, pgsMoving: moving.size,
      storesOut: stores.filter((store) => store.state === 'out').map((store) => store.id),
      storesDraining: [...draining].map((storeId) => ({ storeId, replicasLeft: heldByDraining.get(storeId) ?? 0 })),
      bytesCopied, bytesPerSecond, bytesRemaining,
      etaSeconds: replicasRecovering === 0 ? 0 : bytesPerSecond > 0 ? bytesRemaining / bytesPerSecond : null,
      fullness, blocked,
    };
  }

  // ---- ConductorService ----------------------------------------------------------------------

  clusterInfo(): ClusterInfo {
    return { clusterId: this.clusterId, apiVersion: 1 };
  }

  conductorInfo(): ConductorInfo {
    return {
      id: this.#identity.id,
      url: this.#identity.url,
      leading: this.#leadership.isLeader,
      leaderUrl: this.#leadership.leaderUrl ?? null,
      meta: this.#meta.description,
    };
  }

  async registerStore(input: RegisterInput): Promise<RegisterStoreResponse> {
    const store = await this.#commit(async (ops) => {
      const registered = await ops.registerStore(input);
      // Inside the transaction so the failure check (serialized behind it) sees it; idempotent on a re-run.
      this.#lastSeenMs.set(registered.id, this.#env.clock.nowMs());
      return registered;
    });
    this.#live.set(store.id, { at: store.lastHeartbeatAt ?? this.#nowIso(), disks: store.disks });
    this.#persistedAtMs.set(store.id, this.#env.clock.nowMs());
    return { storeId: store.id, heartbeatIntervalMs: this.heartbeatIntervalMs, heartbeatTimeoutMs: this.heartbeatTimeoutMs };
  }

  async heartbeat(storeId: number, disks: DiskReport[], recovery?: RecoveryReport): Promise<void> {
    const now = this.#env.clock.nowMs();
    if (recovery) this.#recovery.set(storeId, recovery);
    const live = this.#live.get(storeId);
    // The common case costs no commit: a store known to be up, the same disks, figures written recently.
    if (this.#lastSeenMs.has(storeId) && live && sameDiskSet(live.disks, disks) && now - (this.#persistedAtMs.get(storeId) ?? -Infinity) < diskPersistIntervalMs) {
      this.#lastSeenMs.set(storeId, now);
      this.#live.set(storeId, { at: this.#nowIso(), disks });
      return;
    }
    await this.#commit(async (ops) => {
      await ops.heartbeat(storeId, disks);
      this.#lastSeenMs.set(storeId, this.#env.clock.nowMs());
    });
    this.#live.set(storeId, { at: this.#nowIso(), disks });
    this.#persistedAtMs.set(storeId, now);
  }

  async reportDown(storeId: number, reporter: string, reason: string): Promise<MapSnapshot> {
    const changed = await this.#commit((ops) => ops.markStoreDown(storeId, `reported by ${reporter}: ${reason}`));
    if (changed) this.#forget(storeId);
    return this.#snapshot();
  }

  async map(since: number | undefined, waitMs: number, onAbort: (cancel: () => void) => void): Promise<MapSnapshot> {
    if (since !== undefined) await this.watch.wait(since, waitMs, onAbort);
    return this.#snapshot();
  }

  /**
   * Mark-clean requests are group-committed: those that arrive while a commit runs share the next
   * one (one transaction, one map epoch). A rebuild marks hundreds of PGs clean within seconds, and
   * a commit per PG would mean an fsync and a new map epoch each (every client refreshing its map).
   */
  async markClean(poolId: number, pgIndex: number, storeId: number, pgEpoch: number): Promise<MapSnapshot> {
    await new Promise<void>((resolve, reject) => {
      this.#cleanQueue.push({ poolId, pgIndex, storeId, pgEpoch, resolve, reject });
      void this.#drainCleanQueue();
    });
    return this.#snapshot();
  }

  async #drainCleanQueue(): Promise<void> {
    if (this.#cleaning) return;
    this.#cleaning = true;
    try {
      while (this.#cleanQueue.length > 0) {
        const batch = this.#cleanQueue.splice(0, markCleanBatchMax);
        let outcomes: (unknown | null)[] = [];
        try {
          await this.#commit(async (ops) => {
            outcomes = [];
            for (const item of batch) {
              try {
                // Validation comes before any change in markClean, so a refusal leaves the transaction as it was.
                await ops.markClean(item.poolId, item.pgIndex, item.storeId, item.pgEpoch);
                outcomes.push(null);
              } catch (error) {
                if (!(error instanceof ShaleError)) throw error;
                outcomes.push(error);
              }
            }
          });
          batch.forEach((item, i) => (outcomes[i] ? item.reject(outcomes[i]) : item.resolve()));
        } catch (error) {
          for (const item of batch) item.reject(error);
        }
      }
    } finally {
      this.#cleaning = false;
    }
  }

  async openVolume(name: string, owner: string, takeover: boolean): Promise<OpenVolumeResponse> {
    const volume = await this.#commit(async (ops) => {
      const opened = await ops.openVolume(name, owner, takeover);
      const pool = await ops.tx.pool(opened.poolId);
      assert(pool, 'a volume lives in an existing pool');
      return volumeInfo(opened, pool);
    });
    const { map } = await this.#snapshot();
    return { volume, ownerEpoch: volume.ownerEpoch, map };
  }

  closeVolume(name: string, owner: string, ownerEpoch: number): Promise<boolean> {
    return this.#commit((ops) => ops.closeVolume(name, owner, ownerEpoch));
  }

  status(): Promise<ClusterStatus> {
    return this.#meta.read(async (tx) => {
      const status = await buildStatus(tx, this.clusterId, this.#config.defaultReplicas, this.#live, this.conductorInfo());
      const layout = await this.#layout(tx);
      const recovery = this.#recoveryStatus(layout.stores, layout.pools);
      if (recovery.replicasRecovering > 0) {
        const eta = recovery.etaSeconds === null ? 'ETA unknown' : `ETA ${Math.ceil(recovery.etaSeconds)} s`;
        status.messages.push(`recovery: ${recovery.replicasRecovering} replicas filling over ${recovery.pgsMoving} PGs, ${recovery.bytesRemaining} bytes to go at ${Math.round(recovery.bytesPerSecond)} B/s, ${eta}`);
      }
      for (const drain of recovery.storesDraining) status.messages.push(`store ${drain.storeId} draining: ${drain.replicasLeft} replicas left on it`);
      for (const entry of recovery.fullness) status.messages.push(`store ${entry.storeId} is ${entry.level} (${Math.round(entry.ratio * 100)}% used)`);
      for (const why of recovery.blocked.slice(0, 5)) status.messages.push(`cannot place: ${why}`);
      if (recovery.fullness.some((entry) => entry.level !== 'nearfull') || recovery.storesDraining.length > 0 || recovery.replicasToRemove > 0) {
        if (status.health === 'ok') status.health = 'degraded';
      }
      for (const store of layout.stores) {
        const why = this.#downReasons.get(store.id);
        if (why !== undefined && store.state !== 'up') status.messages.push(`store ${store.id} went down: ${why}`);
      }
      if (this.#lastScrub && this.#lastScrub.unrepairedBlocks > 0) {
        status.messages.push(`last scrub (${this.#lastScrub.finishedAt}) left ${this.#lastScrub.unrepairedBlocks} blocks unrepaired`);
        if (status.health === 'ok') status.health = 'degraded';
      }
      return { ...status, recovery, lastScrub: this.#lastScrub };
    });
  }

  async stores(): Promise<StoreInfo[]> {
    const records = await this.#meta.read((tx) => tx.stores());
    return records.map((s) => {
      const info = storeInfo(s, this.#live);
      const recovery = this.#recovery.get(s.id);
      const downReason = s.state === 'up' ? undefined : this.#downReasons.get(s.id);
      return { ...info, ...(s.draining ? { draining: true } : {}), ...(recovery && s.state === 'up' ? { recovery } : {}), ...(downReason === undefined ? {} : { downReason }) };
    });
  }

  async scrubStore(storeId: number, mibPerSecondMax: number): Promise<unknown> {
    const store = (await this.#meta.read((tx) => tx.stores())).find((candidate) => candidate.id === storeId);
    if (!store) throw new ShaleError('NOT_FOUND', `no store ${storeId}`);
    if (store.state !== 'up') throw new ShaleError('NOT_READY', `store ${storeId} is ${store.state}`);
    // An administrative relay, not the data path: one connection for the one request.
    const channel = new StoreChannel(this.#env, store.address, { timeoutMs: scrubTimeoutMs });
    try {
      const reply = await channel.request({ op: Op.SCRUB, countBlocks: mibPerSecondMax });
      return JSON.parse(reply.payload.toString('utf8'));
    } finally {
      channel.close();
    }
  }

  async disks(): Promise<DiskInfo[]> {
    return diskInfos(await this.#meta.read((tx) => tx.stores()), this.#live);
  }

  pools(): Promise<PoolInfo[]> {
    return this.#meta.read((tx) => poolInfos(tx));
  }

  pool(name: string): Promise<PoolDetail> {
    return this.#meta.read(async (tx) => {
      const pool = await tx.poolByName(name);
      if (!pool) throw new ShaleError('NOT_FOUND', `no pool named ${name}`);
      const pgs = await tx.pgs(pool.id);
      return poolDetail(pool, pgs, poolCapacity(pool, pgs, await tx.stores(), await tx.volumes()));
    });
  }

  createPool(spec: PoolSpec): Promise<PoolInfo> {
    const full: PoolSpec = { ...spec, pgCount: spec.pgCount > 0 ? spec.pgCount : this.#config.pgCount };
    return this.#commit(async (ops) => {
      const pool = await ops.createPool(full, true);
      return poolInfo(pool, await ops.tx.pgs(pool.id));
    });
  }

  createVolume(input: CreateVolumeInput): Promise<VolumeInfo> {
    return this.#commit(async (ops) => {
      const volume = await ops.createVolume(input);
      const pool = await ops.tx.pool(volume.poolId);
      assert(pool, 'a volume lives in an existing pool');
      return volumeInfo(volume, pool);
    });
  }

  volumes(): Promise<VolumeInfo[]> {
    return this.#meta.read((tx) => volumeInfos(tx));
  }

  volume(name: string): Promise<VolumeInfo> {
    return this.#meta.read(async (tx) => {
      const volume = await tx.volumeByName(name);
      if (!volume) throw new ShaleError('NOT_FOUND', `no volume named ${name}`);
      const pool = await tx.pool(volume.poolId);
      assert(pool, 'a volume lives in an existing pool');
      const pgs = await tx.pgs(pool.id);
      const mine = volumePgs(volume.id, volume.sizeBytes, volume.chunkSizeBytes, pool.pgCount);
      const health: VolumeHealth = { pgs: mine.size, pgsClean: 0, pgsRecovering: 0, pgsDegraded: 0 };
      for (const pg of pgs) {
        if (!mine.has(pg.index)) continue;
        const clean = pg.replicas.filter((replica) => replica.state === 'clean').length;
        if (pg.replicas.some((replica) => replica.state === 'recovering')) health.pgsRecovering++;
        if (clean === pg.replicas.length && clean === pool.replicas) health.pgsClean++;
        else health.pgsDegraded++;
      }
      return { ...(await volumeInfoWithSnapshots(tx, volume, pool)), health };
    });
  }

  resizeVolume(name: string, sizeBytes: number, force: boolean): Promise<VolumeInfo> {
    return this.#commit(async (ops) => {
      const volume = await ops.resizeVolume(name, sizeBytes, force);
      const pool = await ops.tx.pool(volume.poolId);
      assert(pool, 'a volume lives in an existing pool');
      return volumeInfo(volume, pool);
    });
  }

  async deleteVolume(name: string, force: boolean): Promise<void> {
    await this.#commit((ops) => ops.deleteVolume(name, force));
  }

  // ---- snapshots and clones (snapshot-ops.ts, docs/snapshots.md) -------------------------------

  /**
   * Takes a snapshot. With an owner, waits (up to snapshotAckTimeoutMs) until the owner has
   * switched its writes to the new snap context and drained the older one; then it is live.
   * Errors: NOT_FOUND, ALREADY_EXISTS, UNAVAILABLE (the owner did not acknowledge in time: the
   * snapshot stays `creating` and becomes live when the owner acknowledges or closes the volume).
   */
  async createSnapshot(volumeName: string, name: string): Promise<SnapshotInfo> {
    const { volume, snapshot } = await this.#commit((ops) => createSnapshot(ops, volumeName, name));
    const deadline = this.#env.clock.nowMs() + snapshotAckTimeoutMs;
    for (;;) {
      const current = await this.#meta.read(async (tx) => {
        const record = await tx.snapshot(volume.id, snapshot.id);
        return record ? snapshotInfo(tx, volume, record) : undefined;
      });
      if (!current) throw new ShaleError('NOT_FOUND', `snapshot ${volumeName}@${name} was deleted while being created`);
      if (current.state === 'live') return current;
      if (this.#env.clock.nowMs() >= deadline) {
        throw new ShaleError('UNAVAILABLE', `the owner of volume ${volumeName} (${volume.owner}) did not acknowledge snapshot ${name} within ${snapshotAckTimeoutMs} ms: it stays "creating" until the owner acknowledges, closes the volume, or another gateway takes the volume over`);
      }
      await this.#env.clock.sleep(snapshotAckPollMs);
    }
  }

  snapshots(volumeName: string): Promise<SnapshotInfo[]> {
    return this.#meta.read(async (tx) => {
      const volume = await tx.volumeByName(volumeName);
      if (!volume) throw new ShaleError('NOT_FOUND', `no volume named ${volumeName}`);
      const result: SnapshotInfo[] = [];
      for (const snapshot of await tx.snapshots(volume.id)) result.push(await snapshotInfo(tx, volume, snapshot));
      return result;
    });
  }

  snapshot(volumeName: string, name: string): Promise<SnapshotInfo> {
    return this.#meta.read(async (tx) => {
      const volume = await tx.volumeByName(volumeName);
      if (!volume) throw new ShaleError('NOT_FOUND', `no volume named ${volumeName}`);
      return snapshotInfo(tx, volume, await snapshotByName(tx, volume, name));
    });
  }

  async deleteSnapshot(volumeName: string, name: string): Promise<void> {
    await this.#commit((ops) => deleteSnapshot(ops, volumeName, name));
  }

  async acknowledgeSnapshots(volumeName: string, owner: string, ownerEpoch: number, snapSeq: number): Promise<void> {
    await this.#commit((ops) => acknowledgeSnapshots(ops, volumeName, owner, ownerEpoch, snapSeq));
  }

  cloneVolume(volumeName: string, snapshotName: string, newName: string): Promise<VolumeInfo> {
    return this.#commit(async (ops) => {
      const volume = await cloneVolume(ops, volumeName, snapshotName, newName);
      const pool = await ops.tx.pool(volume.poolId);
      assert(pool, 'a volume lives in an existing pool');
      return volumeInfoWithSnapshots(ops.tx, volume, pool);
    });
  }

  markFlattened(volumeName: string, owner: string, ownerEpoch: number): Promise<VolumeInfo> {
    return this.#commit(async (ops) => {
      const volume = await markFlattened(ops, volumeName, owner, ownerEpoch);
      const pool = await ops.tx.pool(volume.poolId);
      assert(pool, 'a volume lives in an existing pool');
      return volumeInfoWithSnapshots(ops.tx, volume, pool);
    });
  }
}

/** How long snapshot create waits for the volume's owner to switch its snap context. */
export const snapshotAckTimeoutMs = 30_000;
const snapshotAckPollMs = 10;

const silent: Log = () => {};

/** Opens the MetaStore named by `metaPath`. */
async function openMeta(env: Env, metaPath: string): Promise<MetaStore> {
  if (metaPath.startsWith('etcd:')) {
    const { endpoints, prefix } = parseEtcdUrl(metaPath);
    return EtcdMetaStore.open(env, { endpoints, prefix });
  }
  const path = metaPath.startsWith('sqlite:') ? metaPath.slice('sqlite:'.length) : metaPath;
  if (path.length === 0) throw new ShaleError('INVALID_ARGUMENT', 'metaPath: empty path (expected sqlite:PATH or etcd://HOST:PORT)');
  if (path !== ':memory:') await env.disk.mkdir(dirname(path));
  return SqliteMetaStore.open(path);
}

/** "http://h:p" for a bound "h:p" (0.0.0.0 and :: cannot be reached: use 127.0.0.1). */
function defaultUrl(address: string): string {
  const parsed = parseAddress(address);
  if (parsed.kind === 'unix') return `http://localhost`;
  const host = parsed.host === '0.0.0.0' || parsed.host === '::' ? '127.0.0.1' : parsed.host;
  return `http://${host.includes(':') ? `[${host}]` : host}:${parsed.port}`;
}

/**
 * Opens the MetaStore (creating the cluster on first start), serves the API on `listen`, takes
 * part in the election (etcd) and starts failure detection. Errors: INVALID_ARGUMENT (options),
 * UNAVAILABLE (metadata file locked by another conductor, etcd unreachable, or the address is
 * taken), WRONG_CLUSTER (metadata that is not Shale's or is newer).
 */
export async function startConductor(env: Env, options: ConductorOptions): Promise<Conductor> {
  const log = options.log ?? silent;
  const heartbeatTimeoutMs = positiveInteger(options.heartbeatTimeoutMs ?? 5000, 'heartbeatTimeoutMs', 3_600_000);
  const heartbeatIntervalMs = positiveInteger(options.heartbeatIntervalMs ?? Math.max(1, Math.floor(heartbeatTimeoutMs / 4)), 'heartbeatIntervalMs', heartbeatTimeoutMs);
  const config: ClusterConfig = {
    defaultReplicas: positiveInteger(options.defaultReplicas ?? 3, 'defaultReplicas', replicasMax),
    pgCount: positiveInteger(options.pgCount ?? 256, 'pgCount', pgCountMax),
  };
  const downOutIntervalMs = positiveInteger(options.downOutIntervalMs ?? 600_000, 'downOutIntervalMs', 365 * 86_400_000);
  const scrubIntervalMs = options.scrubIntervalMs ?? 86_400_000;
  if (!Number.isSafeInteger(scrubIntervalMs) || scrubIntervalMs < 0) throw new ShaleError('INVALID_ARGUMENT', `scrubIntervalMs must be a whole number ≥ 0 (got ${scrubIntervalMs})`);
  const scrubMibPerSecond = options.scrubMibPerSecond ?? 64;
  if (!Number.isSafeInteger(scrubMibPerSecond) || scrubMibPerSecond < 0) throw new ShaleError('INVALID_ARGUMENT', `scrubMibPerSecond must be a whole number ≥ 0 (got ${scrubMibPerSecond})`);
  const leaseTtlSeconds = positiveInteger(options.leaseTtlSeconds ?? 5, 'leaseTtlSeconds', 3600);
  const electionPollMs = positiveInteger(options.electionPollMs ?? 250, 'electionPollMs', 60_000);
  try {
    parseAddress(options.listen);
  } catch (error) {
    throw new ShaleError('INVALID_ARGUMENT', `listen: ${(error as Error).message}`);
  }
  if (options.advertiseUrl !== undefined && !/^https?:\/\/[^/\s]+$/.test(options.advertiseUrl)) {
    throw new ShaleError('INVALID_ARGUMENT', `advertiseUrl: "${options.advertiseUrl}" must be http://HOST:PORT`);
  }
  const auth = options.auth ?? 'none';
  const meta = await openMeta(env, options.metaPath);
  let listener: Listener | undefined;
  let timer: Timer | undefined;
  let leadership: Leadership | undefined;
  let stopWatch: (() => void) | undefined;
  try {
    const tokenOptions = options.adminToken ?? {};
    const { clusterId, epoch, tokenHash, createdToken } = await meta.write(async (tx) => {
      let cluster = await tx.cluster();
      if (!cluster) {
        cluster = { clusterId: env.random.uuid(), createdAt: new Date(env.clock.wallMs()).toISOString() };
        await tx.putCluster(cluster);
      }
      let token = await tx.token(adminTokenName);
      let made: string | undefined;
      if (auth === 'token') {
        const knownMatches = token !== undefined && tokenOptions.known !== undefined && tokenSha256(tokenOptions.known) === token.sha256;
        if (!token || tokenOptions.replace || (tokenOptions.replaceUnlessKnown && !knownMatches)) {
          made = tokenOptions.replaceUnlessKnown && tokenOptions.known && !token ? tokenOptions.known : newToken(env.random);
          token = { name: adminTokenName, sha256: tokenSha256(made), createdAt: new Date(env.clock.wallMs()).toISOString() };
          await tx.putToken(token);
        }
      }
      return { clusterId: cluster.clusterId, epoch: await tx.counter('mapEpoch'), tokenHash: token?.sha256, createdToken: made };
    }, { unguarded: true });
    if (createdToken !== undefined) {
      log(`a new admin token was made for cluster ${clusterId}`);
      await tokenOptions.onCreated?.(createdToken);
    }

    const identity: ConductorIdentity = { id: env.random.uuid().slice(0, 8), url: '' };
    let closing = false;
    let core: ConductorCore | undefined;
    const leadershipView = {
      get isLeader() {
        return leadership?.isLeader ?? false;
      },
      get leaderUrl() {
        return leadership?.leaderUrl;
      },
    };
    const service = new Proxy({} as ConductorService, {
      get: (_, name: keyof ConductorService) => {
        if (!core) throw new ShaleError('UNAVAILABLE', 'the conductor is starting: retry in a moment');
        const value = core[name];
        return typeof value === 'function' ? value.bind(core) : value;
      },
    });
    const handler = createHttpHandler(conductorRoutes(service, openApiDocument), {
      log, isClosing: () => closing,
      auth: auth === 'token' ? new TokenAuthenticator(meta, env.clock, tokenHash) : undefined,
      leadership: leadershipView,
    });
    try {
      listener = await env.net.serveHttp(options.listen, handler);
    } catch (error) {
      if (error instanceof ShaleError) throw error;
      throw new ShaleError('UNAVAILABLE', `cannot serve the API on ${options.listen}: ${(error as Error).message}`);
    }
    identity.url = options.advertiseUrl ?? defaultUrl(listener.address);
    if (meta instanceof EtcdMetaStore) {
      leadership = new EtcdElection(env, meta, { identity, leaseTtlSeconds, pollMs: electionPollMs, log });
    } else {
      leadership = new SoleLeadership(identity.url);
    }
    const ready = new ConductorCore(env, meta, config, log, identity, leadership, clusterId, epoch, { timeoutMs: heartbeatTimeoutMs, intervalMs: heartbeatIntervalMs, downOutIntervalMs, scrubIntervalMs, scrubMibPerSecond });
    // Leadership changes are applied one after the other, in the order they happen.
    let leadingChanges = Promise.resolve();
    leadership.onChange((leading) => {
      leadingChanges = leadingChanges.then(() => ready.onLeading(leading)).catch((error: unknown) => log(`taking up leadership: ${(error as Error).message}`));
    });
    stopWatch = meta.watchCounter('mapEpoch', (value) => ready.watch.advance(value));
    if (leadership instanceof EtcdElection) await leadership.start();
    else await ready.onLeading(true);
    await leadingChanges;
    core = ready;
    timer = env.clock.every(Math.max(1, Math.floor(heartbeatTimeoutMs / 4)), () => void ready.checkHeartbeats().then(() => ready.heal()));
    log(`cluster ${clusterId}: conductor ${identity.id} at ${identity.url}, metadata ${meta.description} (schema ${meta.schemaVersion}), map epoch ${epoch}${leadership.isLeader ? ', leading' : ', standby'}`);
    const bound = listener;
    const ticking = timer;
    const elected = leadership;
    const unwatch = stopWatch;
    let closed: Promise<void> | undefined;
    return {
      address: bound.address,
      url: identity.url,
      id: identity.id,
      clusterId,
      newAdminToken: createdToken,
      get isLeader() {
        return elected.isLeader;
      },
      close: () => {
        closed ??= (async () => {
          closing = true;
          ticking.cancel();
          unwatch();
          ready.watch.close();
          await elected.close();
          await bound.close();
          await meta.close();
        })();
        return closed;
      },
    };
  } catch (error) {
    timer?.cancel();
    stopWatch?.();
    await leadership?.close().catch(() => {});
    await listener?.close();
    await meta.close();
    throw error;
  }
}
