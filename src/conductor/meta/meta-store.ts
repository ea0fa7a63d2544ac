/**
 * MetaStore: the conductor's durable state behind one small transactional interface, so the
 * embedded SQLite engine (sqlite-meta-store.ts) and the etcd engine (etcd-meta-store.ts) are
 * interchangeable and pass one test suite (meta-store.suite.ts).
 *
 * Shape. A transaction hands out *typed repository methods* (get/find/list/put/delete per record
 * kind) rather than raw keys: SQLite maps each kind to a real table, etcd maps each record to one
 * JSON value under a key prefix (`/shale/stores/<id>`, …) and runs the function optimistically
 * (re-run on conflict). Every method is async so both engines fit. docs/metadata.md has both
 * layouts and their versions.
 *
 * Rules every caller keeps (and both engines rely on):
 *  - A transaction function touches the outside world only through `tx`: it may be run more than
 *    once (etcd retries on conflict) and its effects count only if `write` resolves. Log, notify
 *    and answer requests after `write` resolves, never inside.
 *  - `write` resolves only after the commit is durable (SQLite synchronous=FULL; etcd quorum
 *    commit guarded by the leader key), so an id or epoch handed out is never handed out again,
 *    even after a crash. A conductor that is not the leader cannot commit: the etcd engine
 *    refuses with UNAVAILABLE (`details.notLeader`), SQLite holds an exclusive file lock.
 *  - A throw inside the function rolls everything back and `write` rejects with that error.
 *  - Transactions are serializable: each sees the effects of every transaction that resolved
 *    before it started, and none of a concurrent one.
 *  - Counters only grow (`allocate`); ids are 64-bit in storage and stay below 2^53 in JS.
 *
 * Records returned are plain copies: mutating one changes nothing until it is `put` back.
 */
import type { DiskReport, ReplicaState, StoreState } from '../api/types.ts';

/** The counters a MetaStore keeps. Each only grows. */
export type CounterName = 'storeId' | 'poolId' | 'volumeId' | 'mapEpoch' | 'bucketId' | 's3DataId';

export interface ClusterRecord {
  clusterId: string;
  /** ISO 8601 wall time. */
  createdAt: string;
}

export interface StoreRecord {
  id: number;
  /** uuid of the store's first disk: the store's identity across restarts. */
  diskUuid: string;
  address: string;
  domain: string;
  state: StoreState;
  capacityBytes: number;
  usedBytes: number;
  /** ISO wall time of the last heartbeat written to the MetaStore (registration counts). */
  lastHeartbeatAt: string | null;
  disks: DiskReport[];
  /** Map epoch at which `state` last changed. */
  stateEpoch: number;
  /**
   * Drained by an operator (`shale store drain`): placement leaves it out, so its PGs move to other
   * stores; it stays up and serving until they have. Absent in records written before healing.
   */
  draining?: boolean;
}

export interface PoolRecord {
  id: number;
  name: string;
  replicas: number;
  minReplicas: number;
  pgCount: number;
  /** The failure-domain level replicas are spread over: "host", "rack", … or "store" (any distinct stores). */
  domainLevel: string;
  createdAt: string;
}

/** An API token: only its SHA-256 is kept. */
export interface TokenRecord {
  /** "admin" for the cluster's admin token. */
  name: string;
  /** Lower-case hex SHA-256 of the token. */
  sha256: string;
  createdAt: string;
}

export interface ReplicaRecord {
  storeId: number;
  state: ReplicaState;
  /** Map epoch at which this replica entered `state` (used by mark-clean to refuse stale claims). */
  sinceEpoch: number;
}

export interface PgRecord {
  poolId: number;
  index: number;
  /** Map epoch at which the replica list or a replica state last changed. */
  epoch: number;
  /** Ordered; index 0 is preferred. */
  replicas: ReplicaRecord[];
  /**
   * Stores whose replicas were the last clean ones when the PG lost its last clean replica; empty
   * while the PG has a clean replica. One of them coming back is clean at once (it holds every
   * acknowledged write); anyone else comes back recovering and waits for it.
   */
  lastClean: number[];
}

export interface VolumeRecord {
  id: number;
  name: string;
  sizeBytes: number;
  chunkSizeBytes: number;
  poolId: number;
  /** The gateway that has the volume open, or null. */
  owner: string | null;
  /** The highest owner epoch ever handed out for this volume (0: never opened). Never decreases. */
  ownerEpoch: number;
  createdAt: string;
  /**
   * The volume's snap sequence: the id of its newest snapshot (0: none yet). Snapshot ids are
   * allocated from it and never reused. Optional in storage (older records): read as 0.
   */
  snapSeq?: number;
  /** A clone reads the blocks it never wrote from this volume at `parentSnapshotId` (null: no parent). */
  parentVolumeId?: number | null;
  parentSnapshotId?: number | null;
}

/** A snapshot of a volume (DESIGN §2): id from the volume's snap sequence, never reused. */
export interface SnapshotRecord {
  volumeId: number;
  id: number;
  /** Unique among the volume's snapshots. */
  name: string;
  /**
   * creating: the volume's snap context already carries it (stores keep what it needs) but the
   * owner has not yet acknowledged that the writes of the older context drained; not readable.
   * live: readable.
   */
  state: 'creating' | 'live';
  /** The volume's size when the snapshot was taken. */
  sizeBytes: number;
  createdAt: string;
}

export interface DeletedVolumeRecord {
  id: number;
  name: string;
  deletedAt: string;
  /** Map epoch of the deletion. */
  epoch: number;
}

/** An S3 account: owns buckets; its access keys sign requests. */
export interface AccountRecord {
  name: string;
  createdAt: string;
}

/** An S3 access key. The secret is kept as is: SigV4 needs it to compute signatures. */
export interface AccessKeyRecord {
  accessKey: string;
  secretKey: string;
  account: string;
  createdAt: string;
}

/** An S3 bucket. Its index (key → manifest) lives on the stores in `shardCount` key-value shards. */
export interface BucketRecord {
  id: number;
  name: string;
  /** The owning account. */
  account: string;
  poolId: number;
  shardCount: number;
  /** Anonymous GET/HEAD of objects allowed (the minimal "public read" policy). */
  publicRead: boolean;
  createdAt: string;
}

/** What a read-only transaction may do. */
export interface MetaReadTx {
  cluster(): Promise<ClusterRecord | undefined>;
  /** Current value of a counter (0 if never allocated). */
  counter(name: CounterName): Promise<number>;

  store(id: number): Promise<StoreRecord | undefined>;
  storeByDisk(diskUuid: string): Promise<StoreRecord | undefined>;
  /** Ordered by id. */
  stores(): Promise<StoreRecord[]>;

  pool(id: number): Promise<PoolRecord | undefined>;
  poolByName(name: string): Promise<PoolRecord | undefined>;
  /** Ordered by id. */
  pools(): Promise<PoolRecord[]>;

  pg(poolId: number, index: number): Promise<PgRecord | undefined>;
  /** Ordered by index. */
  pgs(poolId: number): Promise<PgRecord[]>;

  volume(id: number): Promise<VolumeRecord | undefined>;
  /** A live volume by name (names are unique among live volumes). */
  volumeByName(name: string): Promise<VolumeRecord | undefined>;
  /** Live volumes ordered by id. */
  volumes(): Promise<VolumeRecord[]>;
  /** Ordered by id. */
  deletedVolumes(): Promise<DeletedVolumeRecord[]>;

  snapshot(volumeId: number, id: number): Promise<SnapshotRecord | undefined>;
  /** The volume's snapshots ordered by id. */
  snapshots(volumeId: number): Promise<SnapshotRecord[]>;
  /** Every snapshot of every volume, ordered by (volumeId, id). */
  allSnapshots(): Promise<SnapshotRecord[]>;

  token(name: string): Promise<TokenRecord | undefined>;

  account(name: string): Promise<AccountRecord | undefined>;
  /** Ordered by name. */
  accounts(): Promise<AccountRecord[]>;
  accessKey(accessKey: string): Promise<AccessKeyRecord | undefined>;
  /** Ordered by access key. */
  accessKeys(): Promise<AccessKeyRecord[]>;
  bucket(name: string): Promise<BucketRecord | undefined>;
  /** Ordered by name. */
  buckets(): Promise<BucketRecord[]>;
}

/** What a read-write transaction may do in addition. */
export interface MetaTx extends MetaReadTx {
  /** Sets the cluster record once; a second call with another id is a bug. */
  putCluster(record: ClusterRecord): Promise<void>;
  /** Increments a counter and returns its new value (the first allocation returns 1). */
  allocate(name: CounterName): Promise<number>;

  /** Inserts or replaces by id. A diskUuid held by another store id is refused (a bug). */
  putStore(record: StoreRecord): Promise<void>;
  putPool(record: PoolRecord): Promise<void>;
  /** Inserts or replaces by (poolId, index). */
  putPg(record: PgRecord): Promise<void>;
  /** Inserts or replaces by id. A name held by another live volume is ALREADY_EXISTS. */
  putVolume(record: VolumeRecord): Promise<void>;
  /** Removes a live volume and records its id on the deleted list, in one step. */
  deleteVolume(id: number, deleted: DeletedVolumeRecord): Promise<void>;
  /** Inserts or replaces by (volumeId, id). A name held by another snapshot of the volume is ALREADY_EXISTS. */
  putSnapshot(record: SnapshotRecord): Promise<void>;
  /** Removes a snapshot (its id is never used again: the volume's snapSeq only grows). */
  deleteSnapshot(volumeId: number, id: number): Promise<void>;
  /** Inserts or replaces by name. */
  putToken(record: TokenRecord): Promise<void>;
  /** Adds `count` to a counter and returns the first of the `count` values it handed out. */
  allocateRange(name: CounterName, count: number): Promise<number>;
  /** Inserts or replaces by name. */
  putAccount(record: AccountRecord): Promise<void>;
  /** Inserts or replaces by access key. */
  putAccessKey(record: AccessKeyRecord): Promise<void>;
  /** Removes an access key; false if there was none. */
  deleteAccessKey(accessKey: string): Promise<boolean>;
  /** Inserts or replaces by name. */
  putBucket(record: BucketRecord): Promise<void>;
  /** Removes a bucket; false if there was none. */
  deleteBucket(name: string): Promise<boolean>;
}

export interface WriteOptions {
  /**
   * Commit without holding leadership. Only for steps any conductor may race on safely because
   * they create what is missing and change nothing that exists (the cluster record and the first
   * admin token at start); conflicts are still detected and the function re-run.
   */
  unguarded?: boolean;
}

export interface MetaStore {
  /** A human-readable description for logs: "sqlite:/var/lib/shale/meta.db". */
  readonly description: string;
  /** The schema version of the open store. */
  readonly schemaVersion: number;
  /**
   * Runs `fn` in a read-write transaction; resolves with its result once the commit is durable.
   * Errors: what `fn` throws; UNAVAILABLE (engine unreachable, or not the leader: nothing was
   * committed); MAYBE_COMMITTED (the commit was sent and its outcome is unknown); BUSY (the
   * function kept conflicting with other writers).
   */
  write<T>(fn: (tx: MetaTx) => Promise<T>, options?: WriteOptions): Promise<T>;
  /** Runs `fn` in a read-only transaction over one consistent snapshot. */
  read<T>(fn: (tx: MetaReadTx) => Promise<T>): Promise<T>;
  /**
   * Calls `listener` with a counter's value whenever another process commits a change to it (a
   * standby conductor learns new map epochs so). The engine may also call it for this process's
   * own commits and with values seen before. Returns a function that stops the watch. SQLite has
   * a single writer, so it never calls back.
   */
  watchCounter(name: CounterName, listener: (value: number) => void): () => void;
  /** Waits for the running transaction and closes. Later calls reject with SHUTTING_DOWN. */
  close(): Promise<void>;
}
