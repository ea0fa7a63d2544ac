/**
 * The clustered MetaStore: every record is one JSON value in etcd under a key prefix (default
 * "/shale"), so several conductors share one state and one of them leads (etcd-election.ts).
 * The key space is versioned (`<prefix>/schema`) and described in docs/metadata.md.
 *
 * Transactions (optimistic, serializable):
 *  - A transaction starts by reading `<prefix>/txn`, the key every write transaction rewrites. All
 *    its reads are pinned to that read's revision, so they see one snapshot.
 *  - Writes are buffered (reads see them) and sent at the end as one etcd Txn whose compares are
 *      `mod_revision(<prefix>/txn) == the revision read` — nobody committed since the snapshot —
 *      `create_revision(<prefix>/leader) == the one this conductor created` — still the leader —
 *    and whose success branch puts every buffered record and a fresh id into `<prefix>/txn`.
 *    Because every write transaction rewrites the txn key, any two of them conflict: the first
 *    commits and the second re-runs its function on the new state (serializable, like SQLite).
 *  - A failed compare is told apart by reading both keys back: the leader key changed → this
 *    conductor was deposed (UNAVAILABLE, `details.notLeader`, and `onLostLeadership`); the txn key
 *    holds our own id → the commit went through on an earlier attempt (the client library retries
 *    lost replies); otherwise → a conflict: re-run, at most `conflictRetriesMax` times (BUSY).
 *  - A commit whose reply is lost is checked the same way: our id in the txn key → committed; the
 *    key unchanged since the snapshot → not committed (UNAVAILABLE, safe to retry); anything else
 *    → MAYBE_COMMITTED.
 * Write transactions of one process run one at a time (a FIFO), so a leader never conflicts with
 * itself; reads run concurrently, each on its own snapshot.
 *
 * Limits. etcd refuses a Txn of more than 128 operations or 1.5 MiB (its defaults), so PGs are
 * stored 512 to a key ("shards", compact arrays), and cluster-ops.ts caps pools (32) and PG
 * replicas (32 768): the largest transaction (every PG of every pool changes) stays near 100
 * operations and 1 MiB. `commit` checks the operation count before sending.
 *
 * Old revisions are compacted by the leader every `compactEveryCommits` commits, keeping the last
 * `compactKeepRevisions`, so etcd's database does not grow without bound.
 */
import { Etcd3, type ICompare, type IKeyValue, type IRequestOp, type ITxnResponse, type Watcher } from 'etcd3';
import type { Env } from '../../env/env.ts';
import { assert } from '../../lib/assert.ts';
import { ShaleError } from '../../lib/errors.ts';
import type { DiskReport, ReplicaState, StoreState } from '../api/types.ts';
import type {
  AccessKeyRecord, AccountRecord, BucketRecord, ClusterRecord, CounterName, DeletedVolumeRecord, MetaReadTx, MetaStore, MetaTx, PgRecord, PoolRecord, SnapshotRecord, StoreRecord, TokenRecord,
  VolumeRecord, WriteOptions,
} from './meta-store.ts';

/** PGs per etcd key. */
export const pgShardSize = 512;
/** etcd's default --max-txn-ops. */
export const txnOpsMax = 128;
export const conflictRetriesMax = 20;
export const rangePageSize = 1000;
export const compactEveryCommits = 1000;
export const compactKeepRevisions = 1000;

/** A key-space step: brings the prefix from `version - 1` to `version`, inside one transaction. */
export interface EtcdMigration {
  version: number;
  description: string;
  up(tx: RawTx): Promise<void>;
}

/** Raw access to keys under the prefix, for migrations. Keys are relative ("stores/0000000000000001"). */
export interface RawTx {
  get(key: string): Promise<string | undefined>;
  list(prefix: string): Promise<[string, string][]>;
  put(key: string, value: string): void;
  remove(key: string): void;
}

export const etcdMigrations: readonly EtcdMigration[] = [
  {
    version: 1,
    description: 'initial key space: cluster, counters, tokens, stores, pools, PG shards, volumes, deleted volumes',
    async up() {
      // Version 1 is what an empty prefix becomes: every key is created on first use.
    },
  },
];

export const ETCD_SCHEMA_VERSION = etcdMigrations[etcdMigrations.length - 1]!.version;

/** The leader key's identity: a commit is valid only while this key still has this create revision. */
export interface LeaderGuard {
  createRevision: string;
}

export interface EtcdMetaStoreOptions {
  /** "HOST:PORT" of each etcd member. */
  endpoints: readonly string[];
  /** Key prefix, default "/shale". */
  prefix?: string;
  /** Schema steps (tests pass their own to exercise migration). */
  migrations?: readonly EtcdMigration[];
  /** How long an etcd call may take. Default 5000. */
  callTimeoutMs?: number;
  /** Keys per range request (tests make it small to exercise paging). Default rangePageSize. */
  rangePageSize?: number;
}

const pad = (id: number): string => String(id).padStart(16, '0');

/** The end of the range of keys starting with `prefix` (the prefix with its last byte + 1). */
function prefixEnd(prefix: string): Buffer {
  const end = Buffer.from(prefix);
  assert(end.length > 0 && end[end.length - 1]! < 0xff, 'a prefix ends in a byte below 0xff');
  end[end.length - 1]! += 1;
  return end;
}

/** "etcd://h:p,h:p/prefix" (or "etcd:h:p,…") → endpoints and prefix. Errors: INVALID_ARGUMENT. */
export function parseEtcdUrl(text: string): { endpoints: string[]; prefix: string } {
  const match = /^etcd:(?:\/\/)?([^/]*)(\/.*)?$/.exec(text);
  if (!match) throw new ShaleError('INVALID_ARGUMENT', `--meta ${text}: expected etcd://HOST:PORT[,HOST:PORT…][/prefix]`);
  const endpoints = match[1]!.split(',').map((part) => part.trim()).filter((part) => part.length > 0);
  if (endpoints.length === 0) throw new ShaleError('INVALID_ARGUMENT', `--meta ${text}: no etcd endpoint given (example: etcd://127.0.0.1:2379)`);
  for (const endpoint of endpoints) {
    if (!/^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/.test(endpoint)) {
      throw new ShaleError('INVALID_ARGUMENT', `--meta ${text}: "${endpoint}" is not HOST:PORT`);
    }
  }
  const prefix = (match[2] ?? '/shale').replace(/\/+$/, '');
  if (prefix.length < 2 || /[\u0000-\u001f\u007f\u00ff]/.test(prefix)) {
    throw new ShaleError('INVALID_ARGUMENT', `--meta ${text}: the key prefix must be a non-empty path such as /shale`);
  }
  return { endpoints, prefix };
}

// ---- record codecs ------------------------------------------------------------------------------

const replicaStateCodes: Record<ReplicaState, string> = { clean: 'c', recovering: 'r', down: 'd' };
const replicaStates: Record<string, ReplicaState> = { c: 'clean', r: 'recovering', d: 'down' };

/** One PG in a shard: [index, epoch, [[storeId, state letter, sinceEpoch], …], lastClean]. */
type PgTuple = [number, number, [number, string, number][], number[]];

function encodePg(pg: PgRecord): PgTuple {
  return [pg.index, pg.epoch, pg.replicas.map((r) => [r.storeId, replicaStateCodes[r.state], r.sinceEpoch]), [...pg.lastClean]];
}

function decodePg(poolId: number, tuple: PgTuple): PgRecord {
  const [index, epoch, replicas, lastClean] = tuple;
  return {
    poolId,
    index,
    epoch,
    replicas: replicas.map(([storeId, code, sinceEpoch]) => {
      const state = replicaStates[code];
      assert(state, 'a PG shard holds known replica states');
      return { storeId, state, sinceEpoch };
    }),
    lastClean: [...lastClean],
  };
}

interface StoreJson {
  id: number;
  diskUuid: string;
  address: string;
  domain: string;
  state: StoreState;
  stateEpoch: number;
  capacityBytes: number;
  usedBytes: number;
  lastHeartbeatAt: string | null;
  disks: DiskReport[];
  draining?: boolean;
}

function checkId(id: number, what: string): void {
  assert(Number.isSafeInteger(id) && id >= 1, `${what} is a positive safe integer`);
}

function etcdError(error: unknown, what: string): ShaleError {
  if (error instanceof ShaleError) return error;
  const message = error instanceof Error ? error.message : String(error);
  return new ShaleError('UNAVAILABLE', `etcd ${what}: ${message}`);
}

// ---- the transaction ----------------------------------------------------------------------------

class EtcdTx implements MetaTx, RawTx {
  readonly #store: EtcdMetaStore;
  readonly #writable: boolean;
  /** Revision every read is pinned to (the snapshot). */
  readonly revision: string;
  /** Pending writes by full key: a value, or null for a delete. */
  readonly writes = new Map<string, string | null>();
  /** Ranges read, by prefix: key → value at the snapshot. */
  readonly #ranges = new Map<string, Map<string, string>>();
  /** Point reads at the snapshot (undefined: absent). */
  readonly #points = new Map<string, string | undefined>();
  /** Decoded PG shards by full key (the pending version once changed). */
  readonly #shards = new Map<string, Map<number, PgTuple>>();
  readonly dirtyShards = new Set<string>();
  active = true;

  constructor(store: EtcdMetaStore, writable: boolean, revision: string) {
    this.#store = store;
    this.#writable = writable;
    this.revision = revision;
  }

  #key(relative: string): string {
    return `${this.#store.prefix}/${relative}`;
  }

  async #read(key: string): Promise<string | undefined> {
    assert(this.active, 'a transaction is used only while it runs');
    if (this.writes.has(key)) return this.writes.get(key) ?? undefined;
    if (this.#points.has(key)) return this.#points.get(key);
    const response = await this.#store.call('read', () => this.#store.client.kv.range({ key: Buffer.from(key), revision: this.revision }));
    const value = response.kvs[0]?.value.toString('utf8');
    this.#points.set(key, value);
    return value;
  }

  /** Every key under `prefix` at the snapshot, with this transaction's writes applied, in key order. */
  async #list(prefix: string): Promise<[string, string][]> {
    assert(this.active, 'a transaction is used only while it runs');
    let snapshot = this.#ranges.get(prefix);
    if (!snapshot) {
      snapshot = new Map();
      const end = prefixEnd(prefix);
      let from = Buffer.from(prefix);
      for (;;) {
        const response = await this.#store.call('read', () => this.#store.client.kv.range({
          key: from, range_end: end, revision: this.revision, limit: this.#store.rangePageSize,
        }));
        for (const kv of response.kvs) snapshot.set(kv.key.toString('utf8'), kv.value.toString('utf8'));
        if (!response.more || response.kvs.length === 0) break;
        from = Buffer.concat([response.kvs[response.kvs.length - 1]!.key, Buffer.from([0])]);
      }
      this.#ranges.set(prefix, snapshot);
    }
    const merged = new Map(snapshot);
    for (const [key, value] of this.writes) {
      if (!key.startsWith(prefix)) continue;
      if (value === null) merged.delete(key);
      else merged.set(key, value);
    }
    return [...merged].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  }

  #write(key: string, value: string | null): void {
    assert(this.active, 'a transaction is used only while it runs');
    assert(this.#writable, 'writes happen only in a write transaction');
    this.writes.set(key, value);
  }

  async #json<T>(relative: string): Promise<T | undefined> {
    const value = await this.#read(this.#key(relative));
    return value === undefined ? undefined : (JSON.parse(value) as T);
  }

  async #jsonList<T>(relativePrefix: string): Promise<T[]> {
    return (await this.#list(this.#key(relativePrefix))).map(([, value]) => JSON.parse(value) as T);
  }

  // ---- RawTx (migrations) ----

  get(key: string): Promise<string | undefined> {
    return this.#read(this.#key(key));
  }

  async list(prefix: string): Promise<[string, string][]> {
    const base = `${this.#store.prefix}/`;
    return (await this.#list(this.#key(prefix))).map(([key, value]) => [key.slice(base.length), value]);
  }

  put(key: string, value: string): void {
    this.#write(this.#key(key), value);
  }

  remove(key: string): void {
    this.#write(this.#key(key), null);
  }

  // ---- MetaReadTx ----

  cluster(): Promise<ClusterRecord | undefined> {
    return this.#json<ClusterRecord>('cluster');
  }

  async counter(name: CounterName): Promise<number> {
    const value = await this.#read(this.#key(`counters/${name}`));
    if (value === undefined) return 0;
    const parsed = Number(value);
    assert(Number.isSafeInteger(parsed) && parsed >= 0, `counter ${name} holds a whole number`);
    return parsed;
  }

  store(id: number): Promise<StoreRecord | undefined> {
    return this.#json<StoreJson>(`stores/${pad(id)}`);
  }

  async storeByDisk(diskUuid: string): Promise<StoreRecord | undefined> {
    const id = await this.#read(this.#key(`stores-by-disk/${diskUuid}`));
    return id === undefined ? undefined : this.store(Number(id));
  }

  stores(): Promise<StoreRecord[]> {
    return this.#jsonList<StoreJson>('stores/');
  }

  pool(id: number): Promise<PoolRecord | undefined> {
    return this.#json<PoolRecord>(`pools/${pad(id)}`);
  }

  async poolByName(name: string): Promise<PoolRecord | undefined> {
    const id = await this.#read(this.#key(`pools-by-name/${name}`));
    return id === undefined ? undefined : this.pool(Number(id));
  }

  pools(): Promise<PoolRecord[]> {
    return this.#jsonList<PoolRecord>('pools/');
  }

  #shardKey(poolId: number, index: number): string {
    return this.#key(`pgs/${pad(poolId)}/${String(Math.floor(index / pgShardSize)).padStart(6, '0')}`);
  }

  async #shard(key: string): Promise<Map<number, PgTuple>> {
    let shard = this.#shards.get(key);
    if (!shard) {
      const value = await this.#read(key);
      shard = new Map();
      if (value !== undefined) {
        for (const tuple of (JSON.parse(value) as { pgs: PgTuple[] }).pgs) shard.set(tuple[0], tuple);
      }
      this.#shards.set(key, shard);
    }
    return shard;
  }

  async pg(poolId: number, index: number): Promise<PgRecord | undefined> {
    const tuple = (await this.#shard(this.#shardKey(poolId, index))).get(index);
    return tuple ? decodePg(poolId, tuple) : undefined;
  }

  async pgs(poolId: number): Promise<PgRecord[]> {
    const result: PgRecord[] = [];
    for (const [key] of await this.#list(this.#key(`pgs/${pad(poolId)}/`))) {
      const shard = await this.#shard(key);
      for (const index of [...shard.keys()].sort((a, b) => a - b)) result.push(decodePg(poolId, shard.get(index)!));
    }
    return result;
  }

  volume(id: number): Promise<VolumeRecord | undefined> {
    return this.#json<VolumeRecord>(`volumes/${pad(id)}`);
  }

  async volumeByName(name: string): Promise<VolumeRecord | undefined> {
    const id = await this.#read(this.#key(`volumes-by-name/${name}`));
    return id === undefined ? undefined : this.volume(Number(id));
  }

  volumes(): Promise<VolumeRecord[]> {
    return this.#jsonList<VolumeRecord>('volumes/');
  }

  deletedVolumes(): Promise<DeletedVolumeRecord[]> {
    return this.#jsonList<DeletedVolumeRecord>('deleted-volumes/');
  }

  snapshot(volumeId: number, id: number): Promise<SnapshotRecord | undefined> {
    return this.#json<SnapshotRecord>(`snapshots/${pad(volumeId)}/${pad(id)}`);
  }

  snapshots(volumeId: number): Promise<SnapshotRecord[]> {
    return this.#jsonList<SnapshotRecord>(`snapshots/${pad(volumeId)}/`);
  }

  allSnapshots(): Promise<SnapshotRecord[]> {
    return this.#jsonList<SnapshotRecord>('snapshots/');
  }

  token(name: string): Promise<TokenRecord | undefined> {
    return this.#json<TokenRecord>(`tokens/${encodeURIComponent(name)}`);
  }

  account(name: string): Promise<AccountRecord | undefined> {
    return this.#json<AccountRecord>(`s3-accounts/${encodeURIComponent(name)}`);
  }

  accounts(): Promise<AccountRecord[]> {
    return this.#jsonList<AccountRecord>('s3-accounts/');
  }

  accessKey(accessKey: string): Promise<AccessKeyRecord | undefined> {
    return this.#json<AccessKeyRecord>(`s3-keys/${encodeURIComponent(accessKey)}`);
  }

  accessKeys(): Promise<AccessKeyRecord[]> {
    return this.#jsonList<AccessKeyRecord>('s3-keys/');
  }

  bucket(name: string): Promise<BucketRecord | undefined> {
    return this.#json<BucketRecord>(`s3-buckets/${name}`);
  }

  buckets(): Promise<BucketRecord[]> {
    return this.#jsonList<BucketRecord>('s3-buckets/');
  }

  // ---- MetaTx ----

  async allocateRange(name: CounterName, count: number): Promise<number> {
    assert(Number.isSafeInteger(count) && count >= 1, 'a range has at least one value');
    const first = (await this.counter(name)) + 1;
    assert(Number.isSafeInteger(first + count), `counter ${name} stays below 2^53`);
    this.#write(this.#key(`counters/${name}`), String(first + count - 1));
    return first;
  }

  async putAccount(record: AccountRecord): Promise<void> {
    this.#write(this.#key(`s3-accounts/${encodeURIComponent(record.name)}`), JSON.stringify({ name: record.name, createdAt: record.createdAt }));
  }

  async putAccessKey(record: AccessKeyRecord): Promise<void> {
    this.#write(this.#key(`s3-keys/${encodeURIComponent(record.accessKey)}`), JSON.stringify({
      accessKey: record.accessKey, secretKey: record.secretKey, account: record.account, createdAt: record.createdAt,
    }));
  }

  async deleteAccessKey(accessKey: string): Promise<boolean> {
    if (!(await this.accessKey(accessKey))) return false;
    this.#write(this.#key(`s3-keys/${encodeURIComponent(accessKey)}`), null);
    return true;
  }

  async putBucket(record: BucketRecord): Promise<void> {
    this.#write(this.#key(`s3-buckets/${record.name}`), JSON.stringify({
      id: record.id, name: record.name, account: record.account, poolId: record.poolId, shardCount: record.shardCount,
      publicRead: record.publicRead, createdAt: record.createdAt,
    }));
  }

  async deleteBucket(name: string): Promise<boolean> {
    if (!(await this.bucket(name))) return false;
    this.#write(this.#key(`s3-buckets/${name}`), null);
    return true;
  }

  async putCluster(record: ClusterRecord): Promise<void> {
    const existing = await this.cluster();
    assert(!existing || existing.clusterId === record.clusterId, 'the cluster id never changes');
    this.#write(this.#key('cluster'), JSON.stringify({ clusterId: record.clusterId, createdAt: record.createdAt }));
  }

  async allocate(name: CounterName): Promise<number> {
    const next = (await this.counter(name)) + 1;
    assert(Number.isSafeInteger(next), `counter ${name} stays below 2^53`);
    this.#write(this.#key(`counters/${name}`), String(next));
    return next;
  }

  async putStore(record: StoreRecord): Promise<void> {
    checkId(record.id, 'store id');
    const holder = await this.storeByDisk(record.diskUuid);
    assert(!holder || holder.id === record.id, 'a disk uuid belongs to one store id');
    const existing = await this.store(record.id);
    if (existing && existing.diskUuid !== record.diskUuid) this.#write(this.#key(`stores-by-disk/${existing.diskUuid}`), null);
    const json: StoreJson = {
      id: record.id, diskUuid: record.diskUuid, address: record.address, domain: record.domain, state: record.state,
      stateEpoch: record.stateEpoch, capacityBytes: record.capacityBytes, usedBytes: record.usedBytes,
      lastHeartbeatAt: record.lastHeartbeatAt, disks: record.disks.map((d) => ({ uuid: d.uuid, path: d.path, capacityBytes: d.capacityBytes, usedBytes: d.usedBytes })),
      ...(record.draining ? { draining: true } : {}),
    };
    this.#write(this.#key(`stores/${pad(record.id)}`), JSON.stringify(json));
    this.#write(this.#key(`stores-by-disk/${record.diskUuid}`), String(record.id));
  }

  async putPool(record: PoolRecord): Promise<void> {
    checkId(record.id, 'pool id');
    const holder = await this.poolByName(record.name);
    if (holder && holder.id !== record.id) throw new ShaleError('ALREADY_EXISTS', `a pool named ${record.name} already exists`);
    assert(record.replicas >= 1 && record.minReplicas >= 1 && record.minReplicas <= record.replicas && record.pgCount >= 1, 'a pool has sane counts');
    const existing = await this.pool(record.id);
    if (existing && existing.name !== record.name) this.#write(this.#key(`pools-by-name/${existing.name}`), null);
    const json: PoolRecord = {
      id: record.id, name: record.name, replicas: record.replicas, minReplicas: record.minReplicas, pgCount: record.pgCount,
      domainLevel: record.domainLevel, createdAt: record.createdAt,
    };
    this.#write(this.#key(`pools/${pad(record.id)}`), JSON.stringify(json));
    this.#write(this.#key(`pools-by-name/${record.name}`), String(record.id));
  }

  async putPg(record: PgRecord): Promise<void> {
    assert(Number.isSafeInteger(record.index) && record.index >= 0, 'pg index is a whole number');
    assert(await this.pool(record.poolId), 'a PG belongs to an existing pool');
    const key = this.#shardKey(record.poolId, record.index);
    const shard = await this.#shard(key);
    shard.set(record.index, encodePg(record));
    this.dirtyShards.add(key);
  }

  async putVolume(record: VolumeRecord): Promise<void> {
    checkId(record.id, 'volume id');
    const holder = await this.volumeByName(record.name);
    if (holder && holder.id !== record.id) throw new ShaleError('ALREADY_EXISTS', `a volume named ${record.name} already exists`);
    const deleted = await this.#read(this.#key(`deleted-volumes/${pad(record.id)}`));
    assert(deleted === undefined, 'a deleted volume id is never used again');
    assert(record.sizeBytes > 0, 'a volume has a size');
    assert(await this.pool(record.poolId), 'a volume lives in an existing pool');
    const existing = await this.volume(record.id);
    if (existing && existing.name !== record.name) this.#write(this.#key(`volumes-by-name/${existing.name}`), null);
    const json: VolumeRecord = {
      id: record.id, name: record.name, sizeBytes: record.sizeBytes, chunkSizeBytes: record.chunkSizeBytes, poolId: record.poolId,
      owner: record.owner, ownerEpoch: record.ownerEpoch, createdAt: record.createdAt,
      snapSeq: record.snapSeq ?? 0, parentVolumeId: record.parentVolumeId ?? null, parentSnapshotId: record.parentSnapshotId ?? null,
    };
    this.#write(this.#key(`volumes/${pad(record.id)}`), JSON.stringify(json));
    this.#write(this.#key(`volumes-by-name/${record.name}`), String(record.id));
  }

  async deleteVolume(id: number, deleted: DeletedVolumeRecord): Promise<void> {
    assert(deleted.id === id, 'the deleted record names the volume deleted');
    const existing = await this.volume(id);
    if (!existing) throw new ShaleError('NOT_FOUND', `no volume with id ${id}`);
    this.#write(this.#key(`volumes/${pad(id)}`), null);
    this.#write(this.#key(`volumes-by-name/${existing.name}`), null);
    for (const snapshot of await this.snapshots(id)) this.#write(this.#key(`snapshots/${pad(id)}/${pad(snapshot.id)}`), null);
    const record: DeletedVolumeRecord = { id, name: deleted.name, deletedAt: deleted.deletedAt, epoch: deleted.epoch };
    this.#write(this.#key(`deleted-volumes/${pad(id)}`), JSON.stringify(record));
  }

  async putSnapshot(record: SnapshotRecord): Promise<void> {
    checkId(record.volumeId, 'volume id');
    checkId(record.id, 'snapshot id');
    const holder = (await this.snapshots(record.volumeId)).find((other) => other.name === record.name);
    if (holder && holder.id !== record.id) throw new ShaleError('ALREADY_EXISTS', `volume ${record.volumeId} already has a snapshot named ${record.name}`);
    const json: SnapshotRecord = {
      volumeId: record.volumeId, id: record.id, name: record.name, state: record.state, sizeBytes: record.sizeBytes, createdAt: record.createdAt,
    };
    this.#write(this.#key(`snapshots/${pad(record.volumeId)}/${pad(record.id)}`), JSON.stringify(json));
  }

  async deleteSnapshot(volumeId: number, id: number): Promise<void> {
    if (!(await this.snapshot(volumeId, id))) throw new ShaleError('NOT_FOUND', `volume ${volumeId} has no snapshot ${id}`);
    this.#write(this.#key(`snapshots/${pad(volumeId)}/${pad(id)}`), null);
  }

  async putToken(record: TokenRecord): Promise<void> {
    assert(/^[0-9a-f]{64}$/.test(record.sha256), 'a token is kept as a hex SHA-256');
    this.#write(this.#key(`tokens/${encodeURIComponent(record.name)}`), JSON.stringify({ name: record.name, sha256: record.sha256, createdAt: record.createdAt }));
  }

  /** The operations of the commit: every pending write and every changed shard. */
  operations(): IRequestOp[] {
    const ops: IRequestOp[] = [];
    for (const key of this.dirtyShards) {
      const shard = this.#shards.get(key)!;
      const pgs = [...shard.values()].sort((a, b) => a[0] - b[0]);
      this.writes.set(key, JSON.stringify({ pgs }));
    }
    for (const [key, value] of this.writes) {
      ops.push(value === null
        ? { request_delete_range: { key: Buffer.from(key) } }
        : { request_put: { key: Buffer.from(key), value: Buffer.from(value) } });
    }
    return ops;
  }
}

// ---- the store ----------------------------------------------------------------------------------

export class EtcdMetaStore implements MetaStore {
  readonly description: string;
  schemaVersion = 0;
  readonly client: Etcd3;
  readonly prefix: string;
  readonly #env: Env;
  readonly #callTimeoutMs: number;
  readonly rangePageSize: number;
  #guard: LeaderGuard | undefined;
  #queue: Promise<unknown> = Promise.resolve();
  #closed = false;
  #commits = 0;
  readonly #watchers = new Set<Watcher>();
  /** Called when a commit finds that this conductor no longer leads. */
  onLostLeadership: (() => void) | undefined;

  private constructor(env: Env, options: EtcdMetaStoreOptions, prefix: string) {
    this.#env = env;
    this.prefix = prefix;
    this.#callTimeoutMs = options.callTimeoutMs ?? 5000;
    this.rangePageSize = options.rangePageSize ?? rangePageSize;
    this.description = `etcd://${options.endpoints.join(',')}${prefix}`;
    this.client = new Etcd3({ hosts: options.endpoints.map((endpoint) => `http://${endpoint}`), dialTimeout: this.#callTimeoutMs });
  }

  /**
   * Connects, and brings the key space up to date (or creates it). Errors: UNAVAILABLE (etcd
   * unreachable), WRONG_CLUSTER (a newer key space, or a prefix holding keys that are not Shale's).
   */
  static async open(env: Env, options: EtcdMetaStoreOptions): Promise<EtcdMetaStore> {
    const prefix = options.prefix ?? '/shale';
    const store = new EtcdMetaStore(env, options, prefix);
    try {
      store.schemaVersion = await store.#migrate(options.migrations ?? etcdMigrations);
      return store;
    } catch (error) {
      store.client.close();
      throw error;
    }
  }

  get leaderKey(): string {
    return `${this.prefix}/leader`;
  }

  get #txnKey(): string {
    return `${this.prefix}/txn`;
  }

  /** Set by the election: commits are guarded by this leader key identity; undefined refuses guarded commits. */
  setGuard(guard: LeaderGuard | undefined): void {
    this.#guard = guard;
  }

  get guard(): LeaderGuard | undefined {
    return this.#guard;
  }

  /** Runs one etcd call with a deadline; failures become UNAVAILABLE. */
  async call<T>(what: string, run: () => Promise<T>): Promise<T> {
    if (this.#closed) throw new ShaleError('SHUTTING_DOWN', `metadata store ${this.description} is closed`);
    let timer: ReturnType<Env['clock']['after']> | undefined;
    try {
      return await Promise.race([
        run(),
        new Promise<never>((_, reject) => {
          timer = this.#env.clock.after(this.#callTimeoutMs, () => reject(new ShaleError('UNAVAILABLE', `etcd ${what}: no answer within ${this.#callTimeoutMs} ms from ${this.description}`)));
        }),
      ]);
    } catch (error) {
      throw etcdError(error, what);
    } finally {
      timer?.cancel();
    }
  }

  async #readKey(key: string): Promise<IKeyValue | undefined> {
    const response = await this.call('read', () => this.client.kv.range({ key: Buffer.from(key) }));
    return response.kvs[0];
  }

  async #migrate(steps: readonly EtcdMigration[]): Promise<number> {
    steps.forEach((step, i) => assert(step.version === i + 1, 'migrations are numbered 1, 2, 3, … in order'));
    const latest = steps.length;
    const versionOf = (value: string | undefined): number => {
      if (value === undefined) return 0;
      let parsed: { version?: unknown } = {};
      try {
        parsed = JSON.parse(value) as { version?: unknown };
      } catch {
        // reported below
      }
      if (typeof parsed.version !== 'number' || !Number.isSafeInteger(parsed.version) || parsed.version < 1) {
        throw new ShaleError('WRONG_CLUSTER', `${this.prefix}/schema in etcd holds no Shale key-space version: not Shale's prefix`);
      }
      return parsed.version;
    };
    const schema = await this.#readKey(`${this.prefix}/schema`);
    if (!schema) {
      const any = await this.call('read', () => this.client.kv.range({ key: Buffer.from(`${this.prefix}/`), range_end: prefixEnd(`${this.prefix}/`), limit: 1, keys_only: true }));
      if (any.kvs.length > 0) {
        throw new ShaleError('WRONG_CLUSTER', `etcd prefix ${this.prefix}/ holds keys but no Shale key-space version: not Shale's (pick another prefix: etcd://…/prefix)`);
      }
    }
    // Every missing step and the version bump in one transaction. Two conductors starting at once
    // conflict on the txn key: the second re-runs, finds the new version and does nothing.
    await this.#run(async (tx) => {
      const current = versionOf(await tx.get('schema'));
      if (current > latest) {
        throw new ShaleError('WRONG_CLUSTER', `the etcd key space ${this.prefix} has version ${current}, newer than this Shale knows (${latest}): upgrade Shale`);
      }
      if (current === latest) return;
      for (const step of steps.slice(current)) await step.up(tx);
      tx.put('schema', JSON.stringify({ version: latest }));
    }, { unguarded: true });
    return latest;
  }

  #serialize<T>(run: () => Promise<T>): Promise<T> {
    const result = this.#queue.then(() => {
      if (this.#closed) throw new ShaleError('SHUTTING_DOWN', `metadata store ${this.description} is closed`);
      return run();
    });
    this.#queue = result.catch(() => undefined);
    return result;
  }

  /** Starts a transaction: reads the txn key, whose revision pins every read. */
  async #begin(writable: boolean): Promise<{ tx: EtcdTx; txnModRevision: string }> {
    const response = await this.call('read', () => this.client.kv.range({ key: Buffer.from(this.#txnKey) }));
    const tx = new EtcdTx(this, writable, response.header.revision);
    return { tx, txnModRevision: response.kvs[0]?.mod_revision ?? '0' };
  }

  write<T>(fn: (tx: MetaTx) => Promise<T>, options: WriteOptions = {}): Promise<T> {
    return this.#serialize(() => this.#run(fn, options));
  }

  async #run<T>(fn: (tx: EtcdTx) => Promise<T>, options: WriteOptions): Promise<T> {
    for (let attempt = 0; attempt <= conflictRetriesMax; attempt++) {
      const guard = this.#guard;
      if (!options.unguarded && !guard) {
        throw new ShaleError('UNAVAILABLE', 'this conductor is not the leader: it cannot commit', { notLeader: true });
      }
      const { tx, txnModRevision } = await this.#begin(true);
      let result: T;
      try {
        result = await fn(tx);
      } finally {
        tx.active = false;
      }
      const ops = tx.operations();
      if (ops.length === 0) return result;
      const txnId = this.#env.random.uuid();
      ops.push({ request_put: { key: Buffer.from(this.#txnKey), value: Buffer.from(txnId) } });
      if (ops.length > txnOpsMax) {
        throw new ShaleError('INTERNAL', `a metadata transaction of ${ops.length} operations is over etcd's limit of ${txnOpsMax}`);
      }
      const compare: ICompare[] = [{ key: Buffer.from(this.#txnKey), target: 'Mod', result: 'Equal', mod_revision: txnModRevision }];
      if (!options.unguarded) compare.push({ key: Buffer.from(this.leaderKey), target: 'Create', result: 'Equal', create_revision: guard!.createRevision });
      let response: ITxnResponse | undefined;
      try {
        response = await this.call('commit', () => this.client.kv.txn({
          compare,
          success: ops,
          failure: [{ request_range: { key: Buffer.from(this.leaderKey) } }, { request_range: { key: Buffer.from(this.#txnKey) } }],
        }));
      } catch (error) {
        const outcome = await this.#outcome(txnId, txnModRevision);
        if (outcome === 'committed') {
          this.#afterCommit();
          return result;
        }
        if (outcome === 'not committed') throw etcdError(error, 'commit');
        throw new ShaleError('MAYBE_COMMITTED', `etcd commit: ${(error as Error).message}; whether it took effect is unknown`);
      }
      if (response.succeeded) {
        this.#afterCommit();
        return result;
      }
      const leader = response.responses[0]?.response_range.kvs[0];
      const txn = response.responses[1]?.response_range.kvs[0];
      if (txn?.value.toString('utf8') === txnId) {
        this.#afterCommit();
        return result;
      }
      if (!options.unguarded && leader?.create_revision !== guard!.createRevision) {
        if (this.#guard === guard) {
          this.#guard = undefined;
          this.onLostLeadership?.();
        }
        throw new ShaleError('UNAVAILABLE', 'this conductor is no longer the leader: nothing was committed', { notLeader: true });
      }
      // A conflict: someone committed since the snapshot. Run the function again on the new state.
    }
    throw new ShaleError('BUSY', `the metadata transaction conflicted ${conflictRetriesMax} times in a row; retry`);
  }

  /** After a lost reply: did the commit with `txnId` happen? */
  async #outcome(txnId: string, txnModRevision: string): Promise<'committed' | 'not committed' | 'unknown'> {
    try {
      const txn = await this.#readKey(this.#txnKey);
      if (txn?.value.toString('utf8') === txnId) return 'committed';
      if ((txn?.mod_revision ?? '0') === txnModRevision) return 'not committed';
      return 'unknown';
    } catch {
      return 'unknown';
    }
  }

  #afterCommit(): void {
    if (++this.#commits % compactEveryCommits !== 0) return;
    // Compact old revisions in the background; a failure only delays it to the next round.
    void (async () => {
      const response = await this.client.kv.range({ key: Buffer.from(this.#txnKey) });
      const revision = Number(response.header.revision) - compactKeepRevisions;
      if (revision > 0) await this.client.kv.compact({ revision, events: [] } as never);
    })().catch(() => {});
  }

  async read<T>(fn: (tx: MetaReadTx) => Promise<T>): Promise<T> {
    const { tx } = await this.#begin(false);
    try {
      return await fn(tx);
    } finally {
      tx.active = false;
    }
  }

  watchCounter(name: CounterName, listener: (value: number) => void): () => void {
    let watcher: Watcher | undefined;
    let stopped = false;
    void this.client.watch().key(`${this.prefix}/counters/${name}`).create().then((created) => {
      if (stopped) {
        void created.cancel().catch(() => {});
        return;
      }
      watcher = created;
      this.#watchers.add(created);
      created.on('put', (kv: IKeyValue) => {
        const value = Number(kv.value.toString('utf8'));
        if (Number.isSafeInteger(value)) listener(value);
      });
      // The client re-establishes a broken watch itself; errors here are only noise.
      created.on('error', () => {});
    }, () => {});
    return () => {
      stopped = true;
      if (watcher) {
        this.#watchers.delete(watcher);
        void watcher.cancel().catch(() => {});
      }
    };
  }

  async close(): Promise<void> {
    await this.#serialize(async () => {
      this.#closed = true;
    }).catch(() => {});
    this.#closed = true;
    for (const watcher of this.#watchers) await watcher.cancel().catch(() => {});
    this.#watchers.clear();
    this.client.close();
  }
}
