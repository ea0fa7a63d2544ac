/**
 * The conductor's HTTP API: JSON under /api/v1/. These types are the contract between the
 * conductor and everything that talks to it (stores, gateways, the CLI); none of those import the
 * conductor itself. Errors come back as `{ code, message }` with the HTTP status of the error
 * table (src/lib/errors.ts). docs/api.md describes every endpoint; GET /api/v1/openapi.json
 * serves the same as an OpenAPI 3.1 document.
 *
 * Authentication: every endpoint but the OpenAPI document wants `Authorization: Bearer TOKEN`
 * (the cluster's admin token) when the conductor runs with tokens (always, from the CLI).
 * Several conductors (etcd): a standby answers reads itself and sends every request that
 * changes something to the leader with HTTP 307 and a Location header.
 *
 * Data-path endpoints (used by stores and the client library):
 *   GET  /api/v1/cluster                      -> ClusterInfo
 *   POST /api/v1/stores/register              RegisterStoreRequest -> RegisterStoreResponse
 *   POST /api/v1/stores/{id}/heartbeat        HeartbeatRequest -> { ok: true }
 *   GET  /api/v1/map?since=EPOCH&waitMs=MS     -> ClusterMap  (long poll: answers at once if the map's
 *                                                epoch > since, else when it changes or after waitMs)
 *   POST /api/v1/stores/{id}/report-down      ReportDownRequest -> ClusterMap (after the new epoch is committed)
 *   POST /api/v1/pgs/{poolId}/{pg}/clean      MarkCleanRequest -> ClusterMap
 *   POST /api/v1/volumes/{name}/open          OpenVolumeRequest -> OpenVolumeResponse
 *   POST /api/v1/volumes/{name}/close         CloseVolumeRequest -> { ok: true }
 *
 * Admin endpoints (used by the CLI):
 *   GET    /api/v1/status                     -> ClusterStatus
 *   GET    /api/v1/conductor                  -> ConductorInfo (this conductor and the leader)
 *   GET    /api/v1/stores                     -> { stores: StoreInfo[] }
 *   GET    /api/v1/disks                      -> { disks: DiskInfo[] }
 *   GET    /api/v1/pools                      -> { pools: PoolInfo[] }
 *   POST   /api/v1/pools                      CreatePoolRequest -> PoolInfo (201)
 *   GET    /api/v1/pools/{name}               -> PoolDetail (with the PG table)
 *   POST   /api/v1/volumes                    CreateVolumeRequest -> VolumeInfo (201)
 *   GET    /api/v1/volumes                    -> { volumes: VolumeInfo[] }
 *   GET    /api/v1/volumes/{name}             -> VolumeInfo
 *   PATCH  /api/v1/volumes/{name}             ResizeVolumeRequest -> VolumeInfo
 *   DELETE /api/v1/volumes/{name}?force=true  -> { ok: true }
 *   POST   /api/v1/volumes/{name}/snapshots   CreateSnapshotRequest -> SnapshotInfo (201; waits for the owner)
 *   GET    /api/v1/volumes/{name}/snapshots   -> { snapshots: SnapshotInfo[] }
 *   GET    /api/v1/volumes/{name}/snapshots/{snap}   -> SnapshotInfo
 *   DELETE /api/v1/volumes/{name}/snapshots/{snap}   -> { ok: true }
 *   POST   /api/v1/volumes/{name}/snapshots/{snap}/clone   CloneVolumeRequest -> VolumeInfo (201)
 *   POST   /api/v1/volumes/{name}/snapshot-ack   SnapshotAckRequest -> { ok: true }   (data path: the owner)
 *   POST   /api/v1/volumes/{name}/flattened      FlattenedRequest -> VolumeInfo        (the owner, after copying)
 *   GET    /api/v1/openapi.json               -> the OpenAPI document (no token needed)
 */

export type StoreState = 'up' | 'down' | 'out';
export type ReplicaState = 'clean' | 'recovering' | 'down';

export interface ClusterInfo {
  clusterId: string;
  /** The API's semantic version, for clients to check compatibility. */
  apiVersion: 1;
}

export interface DiskReport {
  uuid: string;
  path: string;
  capacityBytes: number;
  usedBytes: number;
  /**
   * Bytes of data still live in the used segments (the rest of `usedBytes` is garbage that
   * compaction will reclaim). Optional: older stores do not send it.
   */
  liveBytes?: number;
}

export interface RegisterStoreRequest {
  /** uuid of the store's (first) disk: a store that comes back with the same disk gets the same id. */
  diskUuid: string;
  clusterId: string;
  /** Address clients use for the store protocol: "HOST:PORT" or "unix:/path". */
  address: string;
  domain: string;
  disks: DiskReport[];
}

export interface RegisterStoreResponse {
  storeId: number;
  /** Heartbeat period; the store is marked down after heartbeatTimeoutMs without one. */
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
}

export interface HeartbeatRequest {
  disks: DiskReport[];
  /** The store's resync figures, for progress and ETA in status (healing). */
  recovery?: RecoveryReport;
}

/** What a store reports of the PG replicas it is filling (src/store/resync.ts). */
export interface RecoveryReport {
  /** PGs waiting for their turn and being copied now. */
  pgsQueued: number;
  pgsActive: number;
  /** Bytes copied into this store by resync since it started. */
  bytesCopied: number;
  /** Recent copy rate. */
  bytesPerSecond: number;
  /** Bytes the PGs being copied still need (known once a PG's listing is compared). */
  bytesPending: number;
  /** Why copying waits, if it does (e.g. the disk is past backfillfull). */
  paused?: string;
}

/** Recovery and rebalancing in `cluster status` (healing.ts). */
export interface RecoveryStatus {
  /** Replicas being filled (recovering) and replicas waiting to be removed once their replacements are clean. */
  replicasRecovering: number;
  replicasToRemove: number;
  /** PGs with a replica recovering or to be added. */
  pgsMoving: number;
  storesOut: number[];
  storesDraining: { storeId: number; replicasLeft: number }[];
  bytesCopied: number;
  bytesPerSecond: number;
  /** Estimated bytes still to copy, and seconds at the current rate (null: no rate yet). */
  bytesRemaining: number;
  etaSeconds: number | null;
  /** Stores at or above nearfull (0.85), backfillfull (0.90) or full (0.95). */
  fullness: { storeId: number; ratio: number; level: 'nearfull' | 'backfillfull' | 'full' }[];
  /** PGs that cannot get a replica now, with why. */
  blocked: string[];
}

/** One scrub's result (conductor scrub.ts): replicas compared block by block by crc32c and version. */
export interface ScrubResult {
  /** The volume scrubbed, or null for every volume. */
  volume: string | null;
  startedAt: string;
  finishedAt: string;
  pgs: number;
  /** PGs skipped (fewer than two clean replicas up, or a replica did not answer). */
  pgsSkipped: number;
  objects: number;
  blocks: number;
  /** Blocks whose replicas differed (or read back bad) and were rewritten from a good copy. */
  inconsistentBlocks: number;
  repairedBlocks: number;
  /** Blocks found bad or divergent that could not be repaired (see errors). */
  unrepairedBlocks: number;
  /** Per store, how many of its blocks were rewritten. */
  repairedByStore: { storeId: number; blocks: number }[];
  errors: string[];
}

/** Per volume in `volume info`: how many of its PGs are degraded or moving. */
export interface VolumeHealth {
  pgs: number;
  pgsClean: number;
  pgsRecovering: number;
  pgsDegraded: number;
}

export interface StoreMapEntry {
  id: number;
  address: string;
  domain: string;
  state: StoreState;
}

export interface ReplicaEntry {
  storeId: number;
  state: ReplicaState;
  /** The map epoch at which the replica entered its state (a resync's resume cursor belongs to one). */
  sinceEpoch?: number;
}

export interface PgEntry {
  /** The map epoch at which this PG's replica list or states last changed. */
  epoch: number;
  /** Ordered; index 0 is the preferred replica. */
  replicas: ReplicaEntry[];
}

export interface PoolMapEntry {
  id: number;
  name: string;
  replicas: number;
  minReplicas: number;
  pgCount: number;
  pgs: PgEntry[];
}

/** Everything the data path needs, versioned by one epoch that grows on every change. */
export interface ClusterMap {
  clusterId: string;
  epoch: number;
  stores: StoreMapEntry[];
  pools: PoolMapEntry[];
  /** Owner epoch of every volume that has one, as [volumeId, ownerEpoch]. */
  owners: [number, number][];
  /** Ids of deleted volumes; stores purge their objects. Never shrinks. */
  deletedVolumes: number[];
  /**
   * Size in bytes of every volume ever opened (those in `owners`), as [volumeId, sizeBytes]: a
   * resize of such a volume is a new epoch, so its owner learns the new size with the map.
   */
  volumeSizes: [number, number][];
  /**
   * The snap context of every volume that has a snapshot or a parent (docs/snapshots.md). Writers
   * stamp their writes with `seq`; stores keep the old versions the listed snapshots need and,
   * for clones, every tombstone. Optional so older conductors' maps still parse.
   */
  snapContexts?: SnapContextEntry[];
}

/** A volume's snap context, as the data path sees it. */
export interface SnapContextEntry {
  volumeId: number;
  /** The volume's snap sequence (the newest snapshot's id): every write carries it. */
  seq: number;
  /** Ids of the snapshots that exist (live or being created), ascending. */
  snapshots: number[];
  /** Ids of the snapshots still being created: their owner has not acknowledged the switch yet. */
  creating: number[];
  /** A clone reads the blocks it never wrote from this volume at this snapshot (of this size). */
  parent: { volumeId: number; snapshotId: number; sizeBytes: number } | null;
}

export interface ReportDownRequest {
  /** Who reports (a gateway id or store id), for the log. */
  reporter: string;
  reason: string;
}

export interface MarkCleanRequest {
  storeId: number;
  /** The PG epoch at which the store started its resync; refused with STALE_PG_EPOCH if the PG changed since. */
  pgEpoch: number;
}

export interface OpenVolumeRequest {
  /** An id for the gateway, shown as the owner. */
  owner: string;
  /** Take the volume over from a current owner. Without it, opening an owned volume is refused unless the owner is the same. */
  takeover?: boolean;
}

export interface VolumeInfo {
  id: number;
  name: string;
  sizeBytes: number;
  chunkSizeBytes: number;
  poolId: number;
  poolName: string;
  replicas: number;
  owner: string | null;
  ownerEpoch: number;
  createdAt: string;
  /** The volume's snap sequence (0: never snapshotted). */
  snapSeq?: number;
  /** Number of snapshots. */
  snapshots?: number;
  /** A clone's parent: the volume and snapshot it reads through to (null once flattened). */
  parent?: { volumeId: number; volume: string; snapshotId: number; snapshot: string } | null;
  /** Only in GET /volumes/{name}: its PGs' health and any recovery under way. */
  health?: VolumeHealth;
}

export interface SnapshotInfo {
  volumeId: number;
  volume: string;
  id: number;
  name: string;
  /** creating: waiting for the owner to acknowledge the switch of snap context; live: readable. */
  state: 'creating' | 'live';
  sizeBytes: number;
  createdAt: string;
  /** Volumes cloned from this snapshot that still read through to it. */
  clones: string[];
}

export interface CreateSnapshotRequest {
  name: string;
}

export interface CloneVolumeRequest {
  /** The new volume's name. */
  name: string;
}

/** The owner has switched to the snap context `snapSeq` and every write under an older one completed. */
export interface SnapshotAckRequest {
  owner: string;
  ownerEpoch: number;
  snapSeq: number;
}

/** The owner copied every block of the parent chain in: the clone forgets its parent. */
export interface FlattenedRequest {
  owner: string;
  ownerEpoch: number;
}

export interface OpenVolumeResponse {
  volume: VolumeInfo;
  /** The new owner epoch: higher than any before; every write carries it. */
  ownerEpoch: number;
  map: ClusterMap;
}

export interface CloseVolumeRequest {
  owner: string;
  ownerEpoch: number;
}

export interface CreateVolumeRequest {
  name: string;
  /** Bytes, or a string with a unit ("10G"). */
  size: number | string;
  replicas?: number;
  chunkSize?: number | string;
  /** Pool name; default: the default pool (or replicas-N when `replicas` differs from it). */
  pool?: string;
}

export interface ResizeVolumeRequest {
  /** The new size: bytes, or a string with a unit ("20G"). */
  size: number | string;
  /** Needed to shrink (data beyond the new end is lost). */
  force?: boolean;
}

export interface CreatePoolRequest {
  name: string;
  replicas: number;
  /** Default replicas − ⌊replicas/2⌋. */
  minReplicas?: number;
  /** Default: the conductor's --pgs (256). */
  pgCount?: number;
  /** Failure-domain level replicas spread over: "host" (default), "rack", … or "store". */
  domainLevel?: string;
}

export interface StoreInfo extends StoreMapEntry {
  capacityBytes: number;
  usedBytes: number;
  lastHeartbeatAt: string | null;
  disks: DiskReport[];
  /** Drained by an operator: its PGs move elsewhere. */
  draining?: boolean;
  /** Resync figures from its last heartbeat (leader only). */
  recovery?: RecoveryReport;
  /**
   * Why it was marked down ("no heartbeat for …"; "reported by WHO: …", such as a store whose disk
   * failed; "its address … was taken by store N"), while it is not up. Leader memory only: absent
   * after a leader change.
   */
  downReason?: string;
}

export interface PoolInfo {
  id: number;
  name: string;
  replicas: number;
  minReplicas: number;
  pgCount: number;
  domainLevel: string;
  /** PGs whose every replica is clean. */
  pgsClean: number;
  /** PGs with a replica recovering or down. */
  pgsDegraded: number;
  createdAt: string;
  /** Thin provisioning (pool list and info): Σ sizes of the pool's volumes. */
  provisionedBytes?: number;
  /** Capacity of the pool's stores divided by its replicas: what its volumes could hold in all. */
  usableBytes?: number;
  /** provisionedBytes / usableBytes (above 1: overcommitted). */
  overcommitRatio?: number;
}

export interface PgInfo {
  index: number;
  epoch: number;
  replicas: ReplicaEntry[];
}

export interface PoolDetail extends PoolInfo {
  /** Replicas per store: how many PGs of the pool each store holds. */
  stores: { storeId: number; pgs: number; preferred: number }[];
  pgs: PgInfo[];
}

export interface DiskInfo extends DiskReport {
  storeId: number;
  storeAddress: string;
  storeState: StoreState;
  domain: string;
}

export interface ConductorInfo {
  /** This conductor's id and URL. */
  id: string;
  url: string;
  leading: boolean;
  /** The leader's URL, or null while no one leads. */
  leaderUrl: string | null;
  /** "sqlite:/path" or "etcd://h:p,…/prefix". */
  meta: string;
}

export interface ClusterStatus {
  clusterId: string;
  epoch: number;
  health: 'ok' | 'degraded' | 'error';
  stores: { total: number; up: number; down: number };
  pools: PoolInfo[];
  volumes: number;
  capacityBytes: number;
  usedBytes: number;
  provisionedBytes: number;
  messages: string[];
  /** The conductor that answered, and the leader. */
  conductor: ConductorInfo;
  recovery?: RecoveryStatus;
  /** The last scrub this conductor ran, if any. */
  lastScrub?: ScrubResult | null;
}

export interface ApiErrorBody {
  code: string;
  message: string;
}
