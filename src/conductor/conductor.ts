/**
 * The conductor: Shale's control plane (DESIGN §5). It keeps cluster membership, pools and PG
 * placement, volumes and owners in a MetaStore, serves them over the HTTP API, and detects failed
 * stores by missed heartbeats. It is never on the data path: clients cache the map it publishes
 * and long-poll for changes.
 *
 * State: the MetaStore is the truth; memory holds only what is leader-local and rebuilt on start:
 * heartbeat times (monotonic; every up store gets a fresh grace period after a restart), the
 * serialized map of the current epoch, and the long-poll waiters.
 *
 * Ordering: every change is one MetaStore transaction (cluster-ops.ts); answers that carry a map
 * (report-down, mark-clean, open) are built after the commit, so a client never acts on an epoch
 * that a crash could undo. Failure detection runs every heartbeatTimeoutMs/4 and marks every store
 * silent for longer than heartbeatTimeoutMs down in one transaction.
 */
import { dirname } from 'node:path';
import type { Env, Listener, Timer } from '../env/env.ts';
import { parseAddress } from '../env/env.ts';
import { assert } from '../lib/assert.ts';
import { ShaleError } from '../lib/errors.ts';
import { type ConductorService, conductorRoutes, createHttpHandler, type Log, type MapSnapshot } from './api/server.ts';
import type {
  ClusterInfo, ClusterStatus, DiskReport, OpenVolumeResponse, PoolInfo, RegisterStoreResponse, StoreInfo, VolumeInfo,
} from './api/types.ts';
import { ClusterOps, type ClusterConfig, type CreateVolumeInput, type RegisterInput } from './cluster-ops.ts';
import { buildMap, buildStatus, poolInfos, storeInfo, volumeInfo, volumeInfos } from './map-view.ts';
import { MapWatch } from './map-watch.ts';
import type { MetaStore } from './meta/meta-store.ts';
import { SqliteMetaStore } from './meta/sqlite-meta-store.ts';
import { replicasMax } from './validate.ts';

export interface ConductorOptions {
  /** "PATH" or "sqlite:PATH" of the SQLite metadata file (created if missing). */
  metaPath: string;
  /** "HOST:PORT" to serve the API on; port 0 picks a free one. */
  listen: string;
  /** A store is marked down after this long without a heartbeat. Default 5000. */
  heartbeatTimeoutMs?: number;
  /** The period stores are told to heartbeat at. Default heartbeatTimeoutMs / 4. */
  heartbeatIntervalMs?: number;
  /** Replicas of the default pool, created once that many stores are up. Default 3. */
  defaultReplicas?: number;
  /** PGs per new pool. Default 256. */
  pgCount?: number;
  log?: Log;
}

export interface Conductor {
  /** The bound API address, "HOST:PORT". */
  readonly address: string;
  readonly clusterId: string;
  close(): Promise<void>;
}

/** Most long polls waiting at once. */
export const mapWaitersMax = 10_000;
export const pgCountMax = 65_536;

function metaFilePath(metaPath: string): string {
  if (metaPath.startsWith('etcd://') || metaPath.startsWith('etcd:')) {
    throw new ShaleError('NOT_SUPPORTED', `--meta ${metaPath}: the etcd MetaStore is not implemented yet; use sqlite:PATH`);
  }
  const path = metaPath.startsWith('sqlite:') ? metaPath.slice('sqlite:'.length) : metaPath;
  if (path.length === 0) throw new ShaleError('INVALID_ARGUMENT', 'metaPath: empty path');
  return path;
}

function positiveInteger(value: number, name: string, maximum: number): number {
  if (!Number.isSafeInteger(value) || value < 1 || value > maximum) {
    throw new ShaleError('INVALID_ARGUMENT', `${name} must be a whole number from 1 to ${maximum} (got ${value})`);
  }
  return value;
}

class ConductorCore implements ConductorService {
  readonly #env: Env;
  readonly #meta: MetaStore;
  readonly #config: ClusterConfig;
  readonly #log: Log;
  readonly clusterId: string;
  readonly heartbeatTimeoutMs: number;
  readonly heartbeatIntervalMs: number;
  /** Monotonic time of the last sign of life of each store believed up. */
  readonly #lastSeenMs = new Map<number, number>();
  /** Wall time of the last heartbeat of each store, for display. */
  readonly #heartbeatTimes = new Map<number, string>();
  readonly watch: MapWatch;
  #cached: MapSnapshot | undefined;
  #checking = false;

  constructor(env: Env, meta: MetaStore, config: ClusterConfig, log: Log, clusterId: string, epoch: number, timing: { timeoutMs: number; intervalMs: number }) {
    this.#env = env;
    this.#meta = meta;
    this.#config = config;
    this.#log = log;
    this.clusterId = clusterId;
    this.heartbeatTimeoutMs = timing.timeoutMs;
    this.heartbeatIntervalMs = timing.intervalMs;
    this.watch = new MapWatch(env.clock, epoch, mapWaitersMax);
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
    if (ops.newEpoch !== undefined) {
      this.#cached = undefined;
      this.watch.advance(ops.newEpoch);
    }
    return result;
  }

  async #snapshot(): Promise<MapSnapshot> {
    const cached = this.#cached;
    if (cached && cached.map.epoch === this.watch.epoch) return cached;
    const map = await this.#meta.read((tx) => buildMap(tx, this.clusterId));
    const snapshot = { map, json: JSON.stringify(map) };
    // Cache only the newest epoch: a read that raced a commit must not shadow it.
    if (map.epoch === this.watch.epoch) this.#cached = snapshot;
    return snapshot;
  }

  /** Gives every store the MetaStore says is up a fresh grace period (at start). */
  async adoptUpStores(): Promise<void> {
    const now = this.#env.clock.nowMs();
    for (const store of await this.#meta.read((tx) => tx.stores())) {
      if (store.state === 'up') this.#lastSeenMs.set(store.id, now);
    }
  }

  /** Marks down every store silent for longer than the timeout. Runs on a timer; never overlaps itself. */
  async checkHeartbeats(): Promise<void> {
    if (this.#checking) return;
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
      for (const id of down) this.#lastSeenMs.delete(id);
    } catch (error) {
      if (error instanceof ShaleError && error.code === 'SHUTTING_DOWN') return;
      this.#log(`heartbeat check failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
    } finally {
      this.#checking = false;
    }
  }

  // ---- ConductorService ----------------------------------------------------------------------

  clusterInfo(): ClusterInfo {
    return { clusterId: this.clusterId, apiVersion: 1 };
  }

  async registerStore(input: RegisterInput): Promise<RegisterStoreResponse> {
    const store = await this.#commit(async (ops) => {
      const registered = await ops.registerStore(input);
      // Inside the transaction so the failure check (serialized behind it) sees it; idempotent on retry.
      this.#lastSeenMs.set(registered.id, this.#env.clock.nowMs());
      return registered;
    });
    this.#heartbeatTimes.set(store.id, store.lastHeartbeatAt ?? this.#nowIso());
    return { storeId: store.id, heartbeatIntervalMs: this.heartbeatIntervalMs, heartbeatTimeoutMs: this.heartbeatTimeoutMs };
  }

  async heartbeat(storeId: number, disks: DiskReport[]): Promise<void> {
    await this.#commit(async (ops) => {
      await ops.heartbeat(storeId, disks);
      this.#lastSeenMs.set(storeId, this.#env.clock.nowMs());
    });
    this.#heartbeatTimes.set(storeId, this.#nowIso());
  }

  async reportDown(storeId: number, reporter: string, reason: string): Promise<MapSnapshot> {
    const changed = await this.#commit((ops) => ops.markStoreDown(storeId, `reported by ${reporter}: ${reason}`));
    if (changed) this.#lastSeenMs.delete(storeId);
    return this.#snapshot();
  }

  async map(since: number | undefined, waitMs: number, onAbort: (cancel: () => void) => void): Promise<MapSnapshot> {
    if (since !== undefined) await this.watch.wait(since, waitMs, onAbort);
    return this.#snapshot();
  }

  async markClean(poolId: number, pgIndex: number, storeId: number, pgEpoch: number): Promise<MapSnapshot> {
    await this.#commit((ops) => ops.markClean(poolId, pgIndex, storeId, pgEpoch));
    return this.#snapshot();
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
    return this.#meta.read((tx) => buildStatus(tx, this.clusterId, this.#config.defaultReplicas));
  }

  async stores(): Promise<StoreInfo[]> {
    const records = await this.#meta.read((tx) => tx.stores());
    return records.map((s) => storeInfo(s, this.#heartbeatTimes));
  }

  pools(): Promise<PoolInfo[]> {
    return this.#meta.read((tx) => poolInfos(tx));
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
      return volumeInfo(volume, pool);
    });
  }

  async deleteVolume(name: string, force: boolean): Promise<void> {
    await this.#commit((ops) => ops.deleteVolume(name, force));
  }
}

const silent: Log = () => {};

/**
 * Opens the MetaStore (creating the cluster on first start), serves the API on `listen` and
 * starts failure detection. Errors: INVALID_ARGUMENT (options), NOT_SUPPORTED (etcd),
 * UNAVAILABLE (metadata file locked by another conductor, or the address is taken),
 * WRONG_CLUSTER (a metadata file that is not Shale's or is newer).
 */
export async function startConductor(env: Env, options: ConductorOptions): Promise<Conductor> {
  const log = options.log ?? silent;
  const heartbeatTimeoutMs = positiveInteger(options.heartbeatTimeoutMs ?? 5000, 'heartbeatTimeoutMs', 3_600_000);
  const heartbeatIntervalMs = positiveInteger(options.heartbeatIntervalMs ?? Math.max(1, Math.floor(heartbeatTimeoutMs / 4)), 'heartbeatIntervalMs', heartbeatTimeoutMs);
  const config: ClusterConfig = {
    defaultReplicas: positiveInteger(options.defaultReplicas ?? 3, 'defaultReplicas', replicasMax),
    pgCount: positiveInteger(options.pgCount ?? 256, 'pgCount', pgCountMax),
  };
  try {
    parseAddress(options.listen);
  } catch (error) {
    throw new ShaleError('INVALID_ARGUMENT', `listen: ${(error as Error).message}`);
  }
  const path = metaFilePath(options.metaPath);
  if (path !== ':memory:') await env.disk.mkdir(dirname(path));
  const meta = SqliteMetaStore.open(path);
  let listener: Listener | undefined;
  let timer: Timer | undefined;
  try {
    const { clusterId, epoch } = await meta.write(async (tx) => {
      let cluster = await tx.cluster();
      if (!cluster) {
        cluster = { clusterId: env.random.uuid(), createdAt: new Date(env.clock.wallMs()).toISOString() };
        await tx.putCluster(cluster);
      }
      return { clusterId: cluster.clusterId, epoch: await tx.counter('mapEpoch') };
    });
    const core = new ConductorCore(env, meta, config, log, clusterId, epoch, { timeoutMs: heartbeatTimeoutMs, intervalMs: heartbeatIntervalMs });
    await core.adoptUpStores();
    let closing = false;
    const handler = createHttpHandler(conductorRoutes(core), { log, isClosing: () => closing });
    try {
      listener = await env.net.serveHttp(options.listen, handler);
    } catch (error) {
      if (error instanceof ShaleError) throw error;
      throw new ShaleError('UNAVAILABLE', `cannot serve the API on ${options.listen}: ${(error as Error).message}`);
    }
    timer = env.clock.every(Math.max(1, Math.floor(heartbeatTimeoutMs / 4)), () => void core.checkHeartbeats());
    log(`cluster ${clusterId}: metadata ${meta.description} (schema ${meta.schemaVersion}), map epoch ${epoch}, API on http://${listener.address}/api/v1`);
    const bound = listener;
    const ticking = timer;
    let closed: Promise<void> | undefined;
    return {
      address: bound.address,
      clusterId,
      close: () => {
        closed ??= (async () => {
          closing = true;
          ticking.cancel();
          core.watch.close();
          await bound.close();
          await meta.close();
        })();
        return closed;
      },
    };
  } catch (error) {
    timer?.cancel();
    await listener?.close();
    await meta.close();
    throw error;
  }
}
