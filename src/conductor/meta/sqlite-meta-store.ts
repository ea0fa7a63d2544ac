/**
 * The embedded MetaStore: one SQLite file (node:sqlite), for a single conductor with zero setup.
 *
 * Durability: WAL journal with `synchronous=FULL`, so a transaction is on stable storage when
 * COMMIT returns, and `write` resolves only after that. Exclusivity: the file is opened with
 * `locking_mode=EXCLUSIVE`, so a second conductor on the same file is refused (UNAVAILABLE)
 * instead of handing out the same ids: the lock is SQLite's stand-in for etcd's leader key.
 *
 * Concurrency: one connection, and a FIFO mutex runs transactions one at a time (a transaction
 * function is async for the sake of etcd, but nothing else touches the connection meanwhile).
 *
 * Schema: versioned in `meta.schema_version` and brought up to date by `migrate` on open, every
 * step in one transaction; a file newer than this code knows is refused (WRONG_CLUSTER).
 * docs/metadata.md describes every table.
 */
import { DatabaseSync, type SQLInputValue, type StatementSync } from 'node:sqlite';
import { assert } from '../../lib/assert.ts';
import { ShaleError } from '../../lib/errors.ts';
import type { DiskReport, ReplicaState, StoreState } from '../api/types.ts';
import type {
  ClusterRecord, CounterName, DeletedVolumeRecord, MetaReadTx, MetaStore, MetaTx, PgRecord, PoolRecord, ReplicaRecord,
  SnapshotRecord, StoreRecord, TokenRecord, VolumeRecord, WriteOptions, AccountRecord, AccessKeyRecord, BucketRecord,
} from './meta-store.ts';

/** One schema step: brings a file from `version - 1` to `version`. Runs inside the migration transaction. */
export interface Migration {
  version: number;
  description: string;
  up(db: DatabaseSync): void;
}

export const migrations: readonly Migration[] = [
  {
    version: 1,
    description: 'initial schema: cluster, counters, stores, pools, pgs, volumes, deleted_volumes',
    up(db) {
      db.exec(`
        CREATE TABLE cluster (
          singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
          cluster_id TEXT NOT NULL,
          created_at TEXT NOT NULL
        );
        CREATE TABLE counters (
          name TEXT PRIMARY KEY,
          value INTEGER NOT NULL CHECK (value >= 0)
        );
        CREATE TABLE stores (
          id INTEGER PRIMARY KEY,
          disk_uuid TEXT NOT NULL UNIQUE,
          address TEXT NOT NULL,
          domain TEXT NOT NULL,
          state TEXT NOT NULL CHECK (state IN ('up', 'down', 'out')),
          state_epoch INTEGER NOT NULL,
          capacity_bytes INTEGER NOT NULL,
          used_bytes INTEGER NOT NULL,
          last_heartbeat_at TEXT,
          disks TEXT NOT NULL
        );
        CREATE TABLE pools (
          id INTEGER PRIMARY KEY,
          name TEXT NOT NULL UNIQUE,
          replicas INTEGER NOT NULL CHECK (replicas >= 1),
          min_replicas INTEGER NOT NULL CHECK (min_replicas >= 1 AND min_replicas <= replicas),
          pg_count INTEGER NOT NULL CHECK (pg_count >= 1),
          created_at TEXT NOT NULL
        );
        CREATE TABLE pgs (
          pool_id INTEGER NOT NULL REFERENCES pools (id),
          pg_index INTEGER NOT NULL,
          epoch INTEGER NOT NULL,
          replicas TEXT NOT NULL,
          last_clean TEXT NOT NULL DEFAULT '[]',
          PRIMARY KEY (pool_id, pg_index)
        ) WITHOUT ROWID;
        CREATE TABLE volumes (
          id INTEGER PRIMARY KEY,
          name TEXT NOT NULL UNIQUE,
          size_bytes INTEGER NOT NULL CHECK (size_bytes > 0),
          chunk_size_bytes INTEGER NOT NULL,
          pool_id INTEGER NOT NULL REFERENCES pools (id),
          owner TEXT,
          owner_epoch INTEGER NOT NULL,
          created_at TEXT NOT NULL
        );
        CREATE TABLE deleted_volumes (
          id INTEGER PRIMARY KEY,
          name TEXT NOT NULL,
          deleted_at TEXT NOT NULL,
          epoch INTEGER NOT NULL
        );
      `);
    },
  },
  {
    version: 2,
    description: 'pools.domain_level (failure-domain level of placement); tokens (API token hashes)',
    up(db) {
      // Pools made by version 1 spread replicas over the stores' plain domain labels, which
      // version 2 reads as the "host" level: the same placement.
      db.exec(`
        ALTER TABLE pools ADD COLUMN domain_level TEXT NOT NULL DEFAULT 'host';
        CREATE TABLE tokens (
          name TEXT PRIMARY KEY,
          sha256 TEXT NOT NULL CHECK (length(sha256) = 64),
          created_at TEXT NOT NULL
        );
      `);
    },
  },
  {
    version: 3,
    description: 'stores.draining (an operator drains a store: placement leaves it out)',
    up(db) {
      db.exec(`ALTER TABLE stores ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;`);
    },
  },
  {
    version: 4,
    description: 'snapshots and clones: volumes.snap_seq, volumes.parent_volume_id, volumes.parent_snapshot_id; snapshots',
    up(db) {
      db.exec(`
        ALTER TABLE volumes ADD COLUMN snap_seq INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE volumes ADD COLUMN parent_volume_id INTEGER;
        ALTER TABLE volumes ADD COLUMN parent_snapshot_id INTEGER;
        CREATE TABLE snapshots (
          volume_id INTEGER NOT NULL,
          id INTEGER NOT NULL,
          name TEXT NOT NULL,
          state TEXT NOT NULL CHECK (state IN ('creating', 'live')),
          size_bytes INTEGER NOT NULL,
          created_at TEXT NOT NULL,
          PRIMARY KEY (volume_id, id),
          UNIQUE (volume_id, name)
        ) WITHOUT ROWID;
      `);
    },
  },
  {
    version: 5,
    description: 'S3: accounts, access keys, buckets',
    up(db) {
      db.exec(`
        CREATE TABLE s3_accounts (
          name TEXT PRIMARY KEY,
          created_at TEXT NOT NULL
        );
        CREATE TABLE s3_access_keys (
          access_key TEXT PRIMARY KEY,
          secret_key TEXT NOT NULL,
          account TEXT NOT NULL,
          created_at TEXT NOT NULL
        );
        CREATE TABLE s3_buckets (
          name TEXT PRIMARY KEY,
          id INTEGER NOT NULL UNIQUE,
          account TEXT NOT NULL,
          pool_id INTEGER NOT NULL,
          shard_count INTEGER NOT NULL,
          public_read INTEGER NOT NULL DEFAULT 0,
          created_at TEXT NOT NULL
        );
      `);
    },
  },
];

export const SCHEMA_VERSION = migrations[migrations.length - 1]!.version;

type Row = Record<string, SQLInputValue>;

/** The schema version of an open file: 0 for an empty file. Refuses a file that is not Shale's. */
export function schemaVersionOf(db: DatabaseSync): number {
  const hasMeta = db.prepare(`SELECT 1 AS found FROM sqlite_master WHERE type = 'table' AND name = 'meta'`).get();
  if (!hasMeta) {
    const tables = db.prepare(`SELECT count(*) AS n FROM sqlite_master`).get() as { n: number };
    if (tables.n > 0) throw new ShaleError('WRONG_CLUSTER', 'the metadata file holds tables but no Shale schema version: not a Shale metadata file');
    return 0;
  }
  const row = db.prepare(`SELECT value FROM meta WHERE key = 'schema_version'`).get() as { value: string } | undefined;
  const version = row ? Number(row.value) : NaN;
  if (!Number.isSafeInteger(version) || version < 0) {
    throw new ShaleError('WRONG_CLUSTER', `the metadata file has an unreadable schema version (${row?.value})`);
  }
  return version;
}

/**
 * Brings the file up to the newest version of `steps`, every step and the version bump in one
 * transaction (all or nothing). Returns the version reached. Refuses a newer file.
 */
export function migrate(db: DatabaseSync, steps: readonly Migration[] = migrations): number {
  steps.forEach((step, i) => assert(step.version === i + 1, 'migrations are numbered 1, 2, 3, … in order'));
  const latest = steps.length;
  db.exec('BEGIN IMMEDIATE');
  try {
    const current = schemaVersionOf(db);
    if (current > latest) {
      throw new ShaleError('WRONG_CLUSTER', `the metadata file has schema version ${current}, newer than this Shale knows (${latest}): upgrade Shale`);
    }
    if (current === 0) db.exec(`CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)`);
    for (const step of steps.slice(current)) {
      step.up(db);
      db.prepare(`INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value`)
        .run(String(step.version));
    }
    db.exec('COMMIT');
    return latest;
  } catch (error) {
    if (db.isTransaction) db.exec('ROLLBACK');
    throw error;
  }
}

function sqliteError(error: unknown, path: string): ShaleError {
  if (error instanceof ShaleError) return error;
  const errcode = (error as { errcode?: number }).errcode;
  const message = error instanceof Error ? error.message : String(error);
  if (errcode === 5 || errcode === 6) {
    return new ShaleError('UNAVAILABLE', `metadata file ${path} is in use by another conductor (${message})`);
  }
  if (errcode === 26) return new ShaleError('WRONG_CLUSTER', `${path} is not a SQLite metadata file (${message})`);
  return new ShaleError('INTERNAL', `metadata file ${path}: ${message}`);
}

function num(row: Row, column: string): number {
  const value = row[column];
  assert(typeof value === 'number' && Number.isSafeInteger(value), `column ${column} holds a safe integer`);
  return value;
}

function str(row: Row, column: string): string {
  const value = row[column];
  assert(typeof value === 'string', `column ${column} holds text`);
  return value;
}

function strOrNull(row: Row, column: string): string | null {
  const value = row[column];
  assert(value === null || typeof value === 'string', `column ${column} holds text or null`);
  return value;
}

function json<T>(row: Row, column: string): T {
  return JSON.parse(str(row, column)) as T;
}

function storeFromRow(row: Row): StoreRecord {
  return {
    id: num(row, 'id'),
    diskUuid: str(row, 'disk_uuid'),
    address: str(row, 'address'),
    domain: str(row, 'domain'),
    state: str(row, 'state') as StoreState,
    stateEpoch: num(row, 'state_epoch'),
    capacityBytes: num(row, 'capacity_bytes'),
    usedBytes: num(row, 'used_bytes'),
    lastHeartbeatAt: strOrNull(row, 'last_heartbeat_at'),
    disks: json<DiskReport[]>(row, 'disks'),
    ...(num(row, 'draining') !== 0 ? { draining: true } : {}),
  };
}

function poolFromRow(row: Row): PoolRecord {
  return {
    id: num(row, 'id'),
    name: str(row, 'name'),
    replicas: num(row, 'replicas'),
    minReplicas: num(row, 'min_replicas'),
    pgCount: num(row, 'pg_count'),
    domainLevel: str(row, 'domain_level'),
    createdAt: str(row, 'created_at'),
  };
}

function pgFromRow(row: Row): PgRecord {
  const replicas = json<{ storeId: number; state: ReplicaState; sinceEpoch: number }[]>(row, 'replicas');
  return {
    poolId: num(row, 'pool_id'),
    index: num(row, 'pg_index'),
    epoch: num(row, 'epoch'),
    replicas: replicas.map((r): ReplicaRecord => ({ storeId: r.storeId, state: r.state, sinceEpoch: r.sinceEpoch })),
    lastClean: json<number[]>(row, 'last_clean'),
  };
}

function volumeFromRow(row: Row): VolumeRecord {
  return {
    id: num(row, 'id'),
    name: str(row, 'name'),
    sizeBytes: num(row, 'size_bytes'),
    chunkSizeBytes: num(row, 'chunk_size_bytes'),
    poolId: num(row, 'pool_id'),
    owner: strOrNull(row, 'owner'),
    ownerEpoch: num(row, 'owner_epoch'),
    createdAt: str(row, 'created_at'),
    snapSeq: num(row, 'snap_seq'),
    parentVolumeId: row.parent_volume_id === null ? null : num(row, 'parent_volume_id'),
    parentSnapshotId: row.parent_snapshot_id === null ? null : num(row, 'parent_snapshot_id'),
  };
}

function snapshotFromRow(row: Row): SnapshotRecord {
  return {
    volumeId: num(row, 'volume_id'),
    id: num(row, 'id'),
    name: str(row, 'name'),
    state: str(row, 'state') as SnapshotRecord['state'],
    sizeBytes: num(row, 'size_bytes'),
    createdAt: str(row, 'created_at'),
  };
}

function deletedFromRow(row: Row): DeletedVolumeRecord {
  return { id: num(row, 'id'), name: str(row, 'name'), deletedAt: str(row, 'deleted_at'), epoch: num(row, 'epoch') };
}

function checkId(id: number, what: string): void {
  assert(Number.isSafeInteger(id) && id > 0, `${what} is a positive safe integer`);
}

class SqliteTx implements MetaTx {
  readonly #store: SqliteMetaStore;
  readonly #writable: boolean;
  active = true;

  constructor(store: SqliteMetaStore, writable: boolean) {
    this.#store = store;
    this.#writable = writable;
  }

  #get(sql: string, ...params: SQLInputValue[]): Row | undefined {
    assert(this.active, 'a transaction is used only while it runs');
    return this.#store.statement(sql).get(...params) as Row | undefined;
  }

  #all(sql: string, ...params: SQLInputValue[]): Row[] {
    assert(this.active, 'a transaction is used only while it runs');
    return this.#store.statement(sql).all(...params) as Row[];
  }

  #run(sql: string, ...params: SQLInputValue[]): void {
    assert(this.active, 'a transaction is used only while it runs');
    assert(this.#writable, 'writes happen only in a write transaction');
    this.#store.statement(sql).run(...params);
  }

  async cluster(): Promise<ClusterRecord | undefined> {
    const row = this.#get(`SELECT cluster_id, created_at FROM cluster WHERE singleton = 1`);
    return row ? { clusterId: str(row, 'cluster_id'), createdAt: str(row, 'created_at') } : undefined;
  }

  async counter(name: CounterName): Promise<number> {
    const row = this.#get(`SELECT value FROM counters WHERE name = ?`, name);
    return row ? num(row, 'value') : 0;
  }

  async store(id: number): Promise<StoreRecord | undefined> {
    const row = this.#get(`SELECT * FROM stores WHERE id = ?`, id);
    return row ? storeFromRow(row) : undefined;
  }

  async storeByDisk(diskUuid: string): Promise<StoreRecord | undefined> {
    const row = this.#get(`SELECT * FROM stores WHERE disk_uuid = ?`, diskUuid);
    return row ? storeFromRow(row) : undefined;
  }

  async stores(): Promise<StoreRecord[]> {
    return this.#all(`SELECT * FROM stores ORDER BY id`).map(storeFromRow);
  }

  async pool(id: number): Promise<PoolRecord | undefined> {
    const row = this.#get(`SELECT * FROM pools WHERE id = ?`, id);
    return row ? poolFromRow(row) : undefined;
  }

  async poolByName(name: string): Promise<PoolRecord | undefined> {
    const row = this.#get(`SELECT * FROM pools WHERE name = ?`, name);
    return row ? poolFromRow(row) : undefined;
  }

  async pools(): Promise<PoolRecord[]> {
    return this.#all(`SELECT * FROM pools ORDER BY id`).map(poolFromRow);
  }

  async pg(poolId: number, index: number): Promise<PgRecord | undefined> {
    const row = this.#get(`SELECT * FROM pgs WHERE pool_id = ? AND pg_index = ?`, poolId, index);
    return row ? pgFromRow(row) : undefined;
  }

  async pgs(poolId: number): Promise<PgRecord[]> {
    return this.#all(`SELECT * FROM pgs WHERE pool_id = ? ORDER BY pg_index`, poolId).map(pgFromRow);
  }

  async volume(id: number): Promise<VolumeRecord | undefined> {
    const row = this.#get(`SELECT * FROM volumes WHERE id = ?`, id);
    return row ? volumeFromRow(row) : undefined;
  }

  async volumeByName(name: string): Promise<VolumeRecord | undefined> {
    const row = this.#get(`SELECT * FROM volumes WHERE name = ?`, name);
    return row ? volumeFromRow(row) : undefined;
  }

  async volumes(): Promise<VolumeRecord[]> {
    return this.#all(`SELECT * FROM volumes ORDER BY id`).map(volumeFromRow);
  }

  async deletedVolumes(): Promise<DeletedVolumeRecord[]> {
    return this.#all(`SELECT * FROM deleted_volumes ORDER BY id`).map(deletedFromRow);
  }

  async token(name: string): Promise<TokenRecord | undefined> {
    const row = this.#get(`SELECT * FROM tokens WHERE name = ?`, name);
    return row ? { name: str(row, 'name'), sha256: str(row, 'sha256'), createdAt: str(row, 'created_at') } : undefined;
  }

  async putToken(record: TokenRecord): Promise<void> {
    assert(/^[0-9a-f]{64}$/.test(record.sha256), 'a token is kept as a hex SHA-256');
    this.#run(
      `INSERT INTO tokens (name, sha256, created_at) VALUES (?, ?, ?)
       ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256, created_at = excluded.created_at`,
      record.name, record.sha256, record.createdAt,
    );
  }

  async account(name: string): Promise<AccountRecord | undefined> {
    const row = this.#get(`SELECT * FROM s3_accounts WHERE name = ?`, name);
    return row ? { name: str(row, 'name'), createdAt: str(row, 'created_at') } : undefined;
  }

  async accounts(): Promise<AccountRecord[]> {
    return this.#all(`SELECT * FROM s3_accounts ORDER BY name`).map((row) => ({ name: str(row, 'name'), createdAt: str(row, 'created_at') }));
  }

  async accessKey(accessKey: string): Promise<AccessKeyRecord | undefined> {
    const row = this.#get(`SELECT * FROM s3_access_keys WHERE access_key = ?`, accessKey);
    return row ? accessKeyFromRow(row) : undefined;
  }

  async accessKeys(): Promise<AccessKeyRecord[]> {
    return this.#all(`SELECT * FROM s3_access_keys ORDER BY access_key`).map(accessKeyFromRow);
  }

  async bucket(name: string): Promise<BucketRecord | undefined> {
    const row = this.#get(`SELECT * FROM s3_buckets WHERE name = ?`, name);
    return row ? bucketFromRow(row) : undefined;
  }

  async buckets(): Promise<BucketRecord[]> {
    return this.#all(`SELECT * FROM s3_buckets ORDER BY name`).map(bucketFromRow);
  }

  async allocateRange(name: CounterName, count: number): Promise<number> {
    assert(Number.isSafeInteger(count) && count >= 1, 'a range has at least one value');
    const first = (await this.counter(name)) + 1;
    assert(Number.isSafeInteger(first + count), `counter ${name} stays below 2^53`);
    this.#run(`INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value`, name, first + count - 1);
    return first;
  }

  async putAccount(record: AccountRecord): Promise<void> {
    this.#run(`INSERT INTO s3_accounts (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET created_at = excluded.created_at`, record.name, record.createdAt);
  }

  async putAccessKey(record: AccessKeyRecord): Promise<void> {
    this.#run(
      `INSERT INTO s3_access_keys (access_key, secret_key, account, created_at) VALUES (?, ?, ?, ?)
       ON CONFLICT (access_key) DO UPDATE SET secret_key = excluded.secret_key, account = excluded.account, created_at = excluded.created_at`,
      record.accessKey, record.secretKey, record.account, record.createdAt,
    );
  }

  async deleteAccessKey(accessKey: string): Promise<boolean> {
    const existing = await this.accessKey(accessKey);
    if (!existing) return false;
    this.#run(`DELETE FROM s3_access_keys WHERE access_key = ?`, accessKey);
    return true;
  }

  async putBucket(record: BucketRecord): Promise<void> {
    this.#run(
      `INSERT INTO s3_buckets (name, id, account, pool_id, shard_count, public_read, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)
       ON CONFLICT (name) DO UPDATE SET id = excluded.id, account = excluded.account, pool_id = excluded.pool_id,
         shard_count = excluded.shard_count, public_read = excluded.public_read, created_at = excluded.created_at`,
      record.name, record.id, record.account, record.poolId, record.shardCount, record.publicRead ? 1 : 0, record.createdAt,
    );
  }

  async deleteBucket(name: string): Promise<boolean> {
    const existing = await this.bucket(name);
    if (!existing) return false;
    this.#run(`DELETE FROM s3_buckets WHERE name = ?`, name);
    return true;
  }

  async putCluster(record: ClusterRecord): Promise<void> {
    const existing = await this.cluster();
    assert(!existing || existing.clusterId === record.clusterId, 'the cluster id never changes');
    this.#run(
      `INSERT INTO cluster (singleton, cluster_id, created_at) VALUES (1, ?, ?)
       ON CONFLICT (singleton) DO UPDATE SET created_at = excluded.created_at`,
      record.clusterId, record.createdAt,
    );
  }

  async allocate(name: CounterName): Promise<number> {
    const next = (await this.counter(name)) + 1;
    assert(Number.isSafeInteger(next), `counter ${name} stays below 2^53`);
    this.#run(`INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value`, name, next);
    return next;
  }

  async putStore(record: StoreRecord): Promise<void> {
    checkId(record.id, 'store id');
    const holder = await this.storeByDisk(record.diskUuid);
    assert(!holder || holder.id === record.id, 'a disk uuid belongs to one store id');
    this.#run(
      `INSERT INTO stores (id, disk_uuid, address, domain, state, state_epoch, capacity_bytes, used_bytes, last_heartbeat_at, disks, draining)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
       ON CONFLICT (id) DO UPDATE SET disk_uuid = excluded.disk_uuid, address = excluded.address, domain = excluded.domain,
         state = excluded.state, state_epoch = excluded.state_epoch, capacity_bytes = excluded.capacity_bytes,
         used_bytes = excluded.used_bytes, last_heartbeat_at = excluded.last_heartbeat_at, disks = excluded.disks, draining = excluded.draining`,
      record.id, record.diskUuid, record.address, record.domain, record.state, record.stateEpoch, record.capacityBytes,
      record.usedBytes, record.lastHeartbeatAt, JSON.stringify(record.disks), record.draining ? 1 : 0,
    );
  }

  async putPool(record: PoolRecord): Promise<void> {
    checkId(record.id, 'pool id');
    const holder = await this.poolByName(record.name);
    if (holder && holder.id !== record.id) throw new ShaleError('ALREADY_EXISTS', `a pool named ${record.name} already exists`);
    this.#run(
      `INSERT INTO pools (id, name, replicas, min_replicas, pg_count, domain_level, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)
       ON CONFLICT (id) DO UPDATE SET name = excluded.name, replicas = excluded.replicas, min_replicas = excluded.min_replicas,
         pg_count = excluded.pg_count, domain_level = excluded.domain_level, created_at = excluded.created_at`,
      record.id, record.name, record.replicas, record.minReplicas, record.pgCount, record.domainLevel, record.createdAt,
    );
  }

  async putPg(record: PgRecord): Promise<void> {
    assert(Number.isSafeInteger(record.index) && record.index >= 0, 'pg index is a whole number');
    const replicas = record.replicas.map((r) => ({ storeId: r.storeId, state: r.state, sinceEpoch: r.sinceEpoch }));
    this.#run(
      `INSERT INTO pgs (pool_id, pg_index, epoch, replicas, last_clean) VALUES (?, ?, ?, ?, ?)
       ON CONFLICT (pool_id, pg_index) DO UPDATE SET epoch = excluded.epoch, replicas = excluded.replicas, last_clean = excluded.last_clean`,
      record.poolId, record.index, record.epoch, JSON.stringify(replicas), JSON.stringify(record.lastClean),
    );
  }

  async putVolume(record: VolumeRecord): Promise<void> {
    checkId(record.id, 'volume id');
    const holder = await this.volumeByName(record.name);
    if (holder && holder.id !== record.id) throw new ShaleError('ALREADY_EXISTS', `a volume named ${record.name} already exists`);
    const deleted = this.#get(`SELECT 1 AS found FROM deleted_volumes WHERE id = ?`, record.id);
    assert(!deleted, 'a deleted volume id is never used again');
    this.#run(
      `INSERT INTO volumes (id, name, size_bytes, chunk_size_bytes, pool_id, owner, owner_epoch, created_at, snap_seq, parent_volume_id, parent_snapshot_id)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
       ON CONFLICT (id) DO UPDATE SET name = excluded.name, size_bytes = excluded.size_bytes, chunk_size_bytes = excluded.chunk_size_bytes,
         pool_id = excluded.pool_id, owner = excluded.owner, owner_epoch = excluded.owner_epoch, created_at = excluded.created_at,
         snap_seq = excluded.snap_seq, parent_volume_id = excluded.parent_volume_id, parent_snapshot_id = excluded.parent_snapshot_id`,
      record.id, record.name, record.sizeBytes, record.chunkSizeBytes, record.poolId, record.owner, record.ownerEpoch, record.createdAt,
      record.snapSeq ?? 0, record.parentVolumeId ?? null, record.parentSnapshotId ?? null,
    );
  }

  async snapshot(volumeId: number, id: number): Promise<SnapshotRecord | undefined> {
    const row = this.#get(`SELECT * FROM snapshots WHERE volume_id = ? AND id = ?`, volumeId, id);
    return row ? snapshotFromRow(row) : undefined;
  }

  async snapshots(volumeId: number): Promise<SnapshotRecord[]> {
    return this.#all(`SELECT * FROM snapshots WHERE volume_id = ? ORDER BY id`, volumeId).map(snapshotFromRow);
  }

  async allSnapshots(): Promise<SnapshotRecord[]> {
    return this.#all(`SELECT * FROM snapshots ORDER BY volume_id, id`).map(snapshotFromRow);
  }

  async putSnapshot(record: SnapshotRecord): Promise<void> {
    checkId(record.volumeId, 'volume id');
    checkId(record.id, 'snapshot id');
    const holder = this.#get(`SELECT id FROM snapshots WHERE volume_id = ? AND name = ?`, record.volumeId, record.name);
    if (holder && num(holder, 'id') !== record.id) throw new ShaleError('ALREADY_EXISTS', `volume ${record.volumeId} already has a snapshot named ${record.name}`);
    this.#run(
      `INSERT INTO snapshots (volume_id, id, name, state, size_bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)
       ON CONFLICT (volume_id, id) DO UPDATE SET name = excluded.name, state = excluded.state, size_bytes = excluded.size_bytes, created_at = excluded.created_at`,
      record.volumeId, record.id, record.name, record.state, record.sizeBytes, record.createdAt,
    );
  }

  async deleteSnapshot(volumeId: number, id: number): Promise<void> {
    if (!(await this.snapshot(volumeId, id))) throw new ShaleError('NOT_FOUND', `volume ${volumeId} has no snapshot ${id}`);
    this.#run(`DELETE FROM snapshots WHERE volume_id = ? AND id = ?`, volumeId, id);
  }

  async deleteVolume(id: number, deleted: DeletedVolumeRecord): Promise<void> {
    assert(deleted.id === id, 'the deleted record names the volume deleted');
    const existing = await this.volume(id);
    if (!existing) throw new ShaleError('NOT_FOUND', `no volume with id ${id}`);
    this.#run(`DELETE FROM volumes WHERE id = ?`, id);
    this.#run(`DELETE FROM snapshots WHERE volume_id = ?`, id);
    this.#run(`INSERT INTO deleted_volumes (id, name, deleted_at, epoch) VALUES (?, ?, ?, ?)`, id, deleted.name, deleted.deletedAt, deleted.epoch);
  }
}

export interface SqliteMetaStoreOptions {
  /** How long to wait for a lock held by another process before refusing, in ms. */
  lockTimeoutMs?: number;
  /** Schema steps (tests pass their own to exercise migration). */
  migrations?: readonly Migration[];
}

export class SqliteMetaStore implements MetaStore {
  readonly description: string;
  readonly schemaVersion: number;
  readonly #path: string;
  readonly #db: DatabaseSync;
  readonly #statements = new Map<string, StatementSync>();
  #queue: Promise<unknown> = Promise.resolve();
  #closed = false;

  private constructor(path: string, db: DatabaseSync, schemaVersion: number) {
    this.#path = path;
    this.#db = db;
    this.description = `sqlite:${path}`;
    this.schemaVersion = schemaVersion;
  }

  /** Opens (creating if missing) and migrates the file at `path`. Errors: UNAVAILABLE (locked), WRONG_CLUSTER (not ours or newer). */
  static open(path: string, options: SqliteMetaStoreOptions = {}): SqliteMetaStore {
    let db: DatabaseSync | undefined;
    try {
      db = new DatabaseSync(path, { timeout: options.lockTimeoutMs ?? 1000 });
      // EXCLUSIVE before WAL: no shared-memory index, and the lock taken by the first write is
      // held until close, so a second conductor on this file is refused.
      db.exec('PRAGMA locking_mode = EXCLUSIVE');
      const mode = db.prepare('PRAGMA journal_mode = WAL').get() as { journal_mode: string };
      assert(mode.journal_mode === 'wal', 'SQLite accepts WAL mode on a local file');
      db.exec('PRAGMA synchronous = FULL');
      db.exec('PRAGMA foreign_keys = ON');
      const version = migrate(db, options.migrations ?? migrations);
      return new SqliteMetaStore(path, db, version);
    } catch (error) {
      try {
        db?.close();
      } catch {
        // already failing; the first error is the one to report
      }
      throw sqliteError(error, path);
    }
  }

  statement(sql: string): StatementSync {
    let statement = this.#statements.get(sql);
    if (!statement) {
      statement = this.#db.prepare(sql);
      this.#statements.set(sql, statement);
    }
    return statement;
  }

  #serialize<T>(run: () => Promise<T>): Promise<T> {
    const result = this.#queue.then(() => {
      if (this.#closed) throw new ShaleError('SHUTTING_DOWN', `metadata store ${this.#path} is closed`);
      return run();
    });
    this.#queue = result.catch(() => undefined);
    return result;
  }

  #transaction<T>(writable: boolean, fn: (tx: SqliteTx) => Promise<T>): Promise<T> {
    return this.#serialize(async () => {
      const tx = new SqliteTx(this, writable);
      this.#db.exec(writable ? 'BEGIN IMMEDIATE' : 'BEGIN');
      try {
        const result = await fn(tx);
        tx.active = false;
        this.#db.exec('COMMIT');
        return result;
      } catch (error) {
        tx.active = false;
        if (this.#db.isTransaction) this.#db.exec('ROLLBACK');
        if (error instanceof ShaleError || !(error as { errcode?: number }).errcode) throw error;
        throw sqliteError(error, this.#path);
      }
    });
  }

  /** The exclusive file lock stands in for leadership, so `unguarded` changes nothing here. */
  write<T>(fn: (tx: MetaTx) => Promise<T>, _options?: WriteOptions): Promise<T> {
    return this.#transaction(true, fn);
  }

  /** One process owns the file: no other writer can change a counter, so there is nothing to watch. */
  watchCounter(_name: CounterName, _listener: (value: number) => void): () => void {
    return () => {};
  }

  read<T>(fn: (tx: MetaReadTx) => Promise<T>): Promise<T> {
    return this.#transaction(false, fn);
  }

  async close(): Promise<void> {
    await this.#serialize(async () => {
      this.#closed = true;
      this.#statements.clear();
      this.#db.close();
    }).catch((error: unknown) => {
      if (!(error instanceof ShaleError && error.code === 'SHUTTING_DOWN')) throw error;
    });
  }
}

function accessKeyFromRow(row: Row): AccessKeyRecord {
  return { accessKey: str(row, 'access_key'), secretKey: str(row, 'secret_key'), account: str(row, 'account'), createdAt: str(row, 'created_at') };
}

function bucketFromRow(row: Row): BucketRecord {
  return {
    name: str(row, 'name'), id: num(row, 'id'), account: str(row, 'account'), poolId: num(row, 'pool_id'), shardCount: num(row, 'shard_count'),
    publicRead: num(row, 'public_read') === 1, createdAt: str(row, 'created_at'),
  };
}
