/**
 * The client library's side of S3 storage: immutable data objects and replicated key-value
 * records on the stores, for the S3 gateway (DESIGN §2, §3). Built on ClusterClient's map and
 * channels; volumes are untouched.
 *
 * Data objects (namespace S3_DATA). Every upload or part gets a fresh data id (handed out by the
 * conductor in ranges, never reused). Its bytes are cut into chunks of DATA_CHUNK_BYTES; chunk i
 * is the store object (S3_DATA, id, i), placed by the same PG hash as a volume chunk. A chunk is
 * written once, with version (1, 1), to every replica of its PG that is clean or recovering, with
 * FUA: it is acknowledged only when durable on all of them (a failed replica is first marked down
 * by the conductor, as for volumes; never fewer than the pool's minimum). Freeing writes tombstones
 * with version (1, 2), which compaction drops.
 *
 * Reads come from one clean replica, round robin; every block's crc32c is checked here, and a
 * block that is not DATA (a replica that missed the write while it was away) counts as a failure:
 * the next clean replica is tried, so a partly stored chunk is never returned. When no clean
 * replica has a good copy, the read fails at once (CHECKSUM, or DISK_FAILED).
 *
 * Key-value records (namespace S3_INDEX): written like data (every clean or recovering replica,
 * FUA), versioned by the caller; reads ask every clean replica and keep the highest version of
 * each key, so a replica that missed writes while it was away cannot hide a newer record.
 *
 * Decision table for a replica's answer to a write (as volume-client.ts):
 *   ok → counted; STALE_PG_EPOCH → refresh the map, resend; NOT_READY, BUSY, CHECKSUM → wait, resend;
 *   UNAVAILABLE, MAYBE_COMMITTED, SHUTTING_DOWN → report the store down, resend to the new acting set;
 *   DISK_FAILED → the same where the PG can do without the replica (acting.ts: pgNeeds), else fail;
 *   anything else → fail. Writes are idempotent (equal versions are duplicates), so resending is safe.
 */
import { blockChecksums, blockCrc32c } from '../lib/crc32c.ts';
import { ShaleError } from '../lib/errors.ts';
import { placementGroupOf } from '../lib/placement-hash.ts';
import { BLOCK_SIZE_BYTES, MiB } from '../lib/units.ts';
import {
  BlockState, decodeKvRecords, decodeReadParts, decodeReadReply, encodeKvKey, encodeKvListRequest, encodeChecksums, Flag, Namespace, Op, type Frame,
  type FrameHeader, type KvRecord,
} from '../proto/store-protocol.ts';
import type { ClusterMap, PgEntry, PoolMapEntry } from '../conductor/api/types.ts';
import type { ClusterClient } from './cluster-client.ts';
import { diskFailedSpare, handleReplicaFailures, noQuorum, waitForMapChange, type ReplicaFailure } from './replica-retry.ts';
import { actingReplicas, isUp, pgNeeds } from '../conductor/api/acting.ts';

/** Bytes of one data chunk (one store object). */
export const DATA_CHUNK_BYTES = 4 * MiB;
export const DATA_CHUNK_BLOCKS = DATA_CHUNK_BYTES / BLOCK_SIZE_BYTES;
/** Data ids asked of the conductor at once. */
export const DATA_ID_RANGE = 256;
/** How long an S3 request waits for enough replicas before NO_QUORUM. */
export const OBJECT_IO_TIMEOUT_MS_DEFAULT = 30_000;

const DATA_VERSION = { epoch: 1, seq: 1 };
const FREED_VERSION = { epoch: 1, seq: 2 };


export interface KvVersion {
  epoch: number;
  seq: number;
}

export class ObjectClient {
  readonly #cluster: ClusterClient;
  readonly #ioTimeoutMs: number;
  #ids: { next: number; end: number } = { next: 0, end: 0 };
  #allocating: Promise<void> | undefined;
  #readTurn = 0;

  constructor(cluster: ClusterClient, options: { ioTimeoutMs?: number } = {}) {
    this.#cluster = cluster;
    this.#ioTimeoutMs = options.ioTimeoutMs ?? OBJECT_IO_TIMEOUT_MS_DEFAULT;
  }

  /** A fresh data id, never handed out before (ranges come from the conductor). */
  async newDataId(): Promise<number> {
    while (this.#ids.next >= this.#ids.end) {
      this.#allocating ??= this.#cluster.conductor.call<{ first: number; count: number }>('POST', '/s3/ids', { count: DATA_ID_RANGE }).then(
        (range) => {
          this.#ids = { next: range.first, end: range.first + range.count };
          this.#allocating = undefined;
        },
        (error: unknown) => {
          this.#allocating = undefined;
          throw error;
        },
      );
      await this.#allocating;
    }
    return this.#ids.next++;
  }

  #pool(map: ClusterMap, poolId: number): PoolMapEntry {
    const pool = map.pools.find((candidate) => candidate.id === poolId);
    if (!pool) throw new ShaleError('NOT_READY', `pool ${poolId} is not in the map`);
    return pool;
  }

  #placement(map: ClusterMap, poolId: number, id: number, chunkIndex: number): { pool: PoolMapEntry; pgId: number; pg: PgEntry } {
    const pool = this.#pool(map, poolId);
    const pgId = placementGroupOf(id, chunkIndex, pool.pgCount);
    return { pool, pgId, pg: pool.pgs[pgId]! };
  }

  /**
   * Writes one chunk of a data object (at most DATA_CHUNK_BYTES; a short last chunk is padded
   * with zeros to whole blocks), durable on every acting replica when it resolves.
   */
  async writeChunk(poolId: number, dataId: number, chunkIndex: number, data: Buffer): Promise<void> {
    if (data.length === 0 || data.length > DATA_CHUNK_BYTES) throw new ShaleError('INVALID_ARGUMENT', `chunk of ${data.length} bytes`);
    const countBlocks = Math.ceil(data.length / BLOCK_SIZE_BYTES);
    let padded = data;
    if (data.length !== countBlocks * BLOCK_SIZE_BYTES) {
      padded = Buffer.alloc(countBlocks * BLOCK_SIZE_BYTES);
      data.copy(padded);
    }
    const checksums = blockChecksums(padded);
    const sums = encodeChecksums(checksums);
    await this.#toActing(poolId, dataId, chunkIndex, {
      op: Op.WRITE, flags: Flag.FUA, namespace: Namespace.S3_DATA, ownerEpoch: DATA_VERSION.epoch, versionSeq: DATA_VERSION.seq,
      offsetBlocks: 0, countBlocks,
    }, [sums, padded]);
  }

  /** Frees one chunk of a data object: tombstones above its version (compaction reclaims the space). */
  async freeChunk(poolId: number, dataId: number, chunkIndex: number, countBlocks: number): Promise<void> {
    await this.#toActing(poolId, dataId, chunkIndex, {
      op: Op.WRITE_ZEROES, flags: 0, namespace: Namespace.S3_DATA, ownerEpoch: FREED_VERSION.epoch, versionSeq: FREED_VERSION.seq,
      offsetBlocks: 0, countBlocks,
    }, []);
  }

  /** Reads `countBlocks` blocks of a chunk from a clean replica, every block checked; never a partly stored chunk. */
  async readChunk(poolId: number, dataId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number): Promise<Buffer> {
    const deadline = this.#deadline();
    let lastError: ShaleError | undefined;
    for (;;) {
      const map = this.#cluster.map;
      const { pool, pgId, pg } = this.#placement(map, poolId, dataId, chunkIndex);
      const clean = pg.replicas.filter((replica) => replica.state === 'clean' && isUp(map, replica.storeId));
      const turn = this.#readTurn++;
      let stale = false;
      let badCopies = 0;
      for (let i = 0; i < clean.length && !stale; i++) {
        const storeId = clean[(turn + i) % clean.length]!.storeId;
        try {
          const reply = await this.#cluster.channel(storeId).request({
            op: Op.READ, namespace: Namespace.S3_DATA, volumeId: dataId, chunkIndex, poolId: pool.id, pgId, pgCount: pool.pgCount,
            pgEpoch: pg.epoch, offsetBlocks, countBlocks,
          });
          return checkedData(reply, countBlocks, storeId);
        } catch (error) {
          lastError = toError(error);
          if (lastError.code === 'INVALID_ARGUMENT') throw lastError;
          if (lastError.code === 'STALE_PG_EPOCH') stale = true;
          if (lastError.code === 'CHECKSUM' || lastError.code === 'DISK_FAILED') badCopies++;
          this.#cluster.log(`s3 data ${dataId} chunk ${chunkIndex} on store ${storeId}: ${lastError.message}; trying another replica`);
        }
      }
      // No clean replica has a good copy (each failed its checksums, could not be read, or lacks
      // blocks): no map to come brings one, so the read fails now rather than waiting.
      if (badCopies > 0 && badCopies === clean.length) throw lastError!;
      if (stale) await this.#cluster.watcher.refresh().catch(() => {});
      else await waitForMapChange(this.#cluster, map, deadline, lastError, 'S3 I/O');
    }
  }

  async kvPut(poolId: number, shardId: number, key: Buffer, value: Buffer, version: KvVersion): Promise<void> {
    await this.#toActing(poolId, shardId, 0, {
      op: Op.KV_PUT, flags: Flag.FUA, namespace: Namespace.S3_INDEX, ownerEpoch: version.epoch, versionSeq: version.seq,
    }, encodeKvKey(key, value));
  }

  async kvDelete(poolId: number, shardId: number, key: Buffer, version: KvVersion): Promise<void> {
    await this.#toActing(poolId, shardId, 0, {
      op: Op.KV_DELETE, flags: Flag.FUA, namespace: Namespace.S3_INDEX, ownerEpoch: version.epoch, versionSeq: version.seq,
    }, encodeKvKey(key));
  }

  /** The record of `key` with the highest version any clean replica holds, or undefined. */
  async kvGet(poolId: number, shardId: number, key: Buffer): Promise<KvRecord | undefined> {
    const replies = await this.#fromCleanReplicas(poolId, shardId, { op: Op.KV_GET, namespace: Namespace.S3_INDEX }, encodeKvKey(key));
    let best: KvRecord | undefined;
    for (const reply of replies) {
      if (reply.header.countBlocks !== 1) continue;
      const record = { key, value: payloadOf(reply), epoch: reply.header.ownerEpoch, seq: reply.header.versionSeq };
      if (!best || compare(record, best) > 0) best = record;
    }
    return best;
  }

  /**
   * Up to `limit` records of the shard in key order (bytes), with `prefix`, after `startAfter`,
   * merged over every clean replica (the highest version of each key).
   */
  async kvList(poolId: number, shardId: number, options: { prefix?: Buffer; startAfter?: Buffer; limit: number }): Promise<KvRecord[]> {
    const replies = await this.#fromCleanReplicas(poolId, shardId, { op: Op.KV_LIST, namespace: Namespace.S3_INDEX, countBlocks: options.limit },
      [encodeKvListRequest(options.prefix ?? Buffer.alloc(0), options.startAfter)]);
    const merged = new Map<string, KvRecord>();
    for (const reply of replies) {
      for (const record of decodeKvRecords(payloadOf(reply))) {
        const id = record.key.toString('latin1');
        const known = merged.get(id);
        if (!known || compare(record, known) > 0) merged.set(id, { ...record, key: Buffer.from(record.key), value: Buffer.from(record.value) });
      }
    }
    return [...merged.values()].sort((a, b) => Buffer.compare(a.key, b.key)).slice(0, options.limit);
  }

  /** Sends a request to every clean replica of the object's PG; at least one must answer. */
  async #fromCleanReplicas(poolId: number, id: number, fields: Partial<FrameHeader> & { op: number }, payload: Buffer[]): Promise<Frame[]> {
    const deadline = this.#deadline();
    let lastError: ShaleError | undefined;
    for (;;) {
      const map = this.#cluster.map;
      const { pool, pgId, pg } = this.#placement(map, poolId, id, 0);
      const clean = pg.replicas.filter((replica) => replica.state === 'clean' && isUp(map, replica.storeId));
      const header = { ...fields, volumeId: id, chunkIndex: 0, poolId: pool.id, pgId, pgCount: pool.pgCount, pgEpoch: pg.epoch };
      const settled = await Promise.allSettled(clean.map((replica) => this.#cluster.channel(replica.storeId).request(header, payload)));
      const answers = settled.flatMap((result) => (result.status === 'fulfilled' ? [result.value] : []));
      // Every clean replica is asked; one that failed is skipped (it holds nothing the others lack
      // once it has been written to with the rest) — but at least one must have answered.
      if (answers.length > 0 && answers.length === clean.length) return answers;
      let stale = false;
      for (const result of settled) {
        if (result.status === 'rejected') {
          lastError = toError(result.reason);
          if (lastError.code === 'INVALID_ARGUMENT' || lastError.code === 'PROTOCOL') throw lastError;
          if (lastError.code === 'STALE_PG_EPOCH') stale = true;
        }
      }
      if (answers.length > 0 && !stale) return answers;
      if (stale) await this.#cluster.watcher.refresh().catch(() => {});
      else await waitForMapChange(this.#cluster, map, deadline, lastError, 'S3 I/O');
    }
  }

  /** Sends a write to every clean or recovering replica of the object's PG until all of them acknowledged. */
  async #toActing(poolId: number, id: number, chunkIndex: number, fields: Partial<FrameHeader> & { op: number }, payload: Buffer[]): Promise<void> {
    const deadline = this.#deadline();
    let lastError: ShaleError | undefined;
    for (;;) {
      const map = this.#cluster.map;
      const { pool, pgId, pg } = this.#placement(map, poolId, id, chunkIndex);
      const acting = actingReplicas(map, pg);
      if (acting.length < pool.minReplicas) {
        lastError = new ShaleError('NO_QUORUM', `PG ${pool.id}.${pgId} has ${acting.length} of ${pool.minReplicas} replicas needed`);
        await waitForMapChange(this.#cluster, map, deadline, lastError, 'S3 I/O');
        continue;
      }
      const header = { ...fields, volumeId: id, chunkIndex, poolId: pool.id, pgId, pgCount: pool.pgCount, pgEpoch: pg.epoch };
      const results = await Promise.all(acting.map(async (replica): Promise<ReplicaFailure | undefined> => {
        try {
          await this.#cluster.channel(replica.storeId).request(header, payload);
          return undefined;
        } catch (error) {
          return { storeId: replica.storeId, error: toError(error) };
        }
      }));
      const failures = results.filter((failure): failure is ReplicaFailure => failure !== undefined);
      if (failures.length === 0) return;
      // A replica whose disk failed leaves the acting set where the PG can do without it.
      lastError = await handleReplicaFailures(this.#cluster, failures, diskFailedSpare(failures, (storeIds) => pgNeeds(map, pool, pgId, storeIds)));
      if (this.#cluster.env.clock.nowMs() >= deadline) throw noQuorum(lastError, 'S3 I/O');
    }
  }

  #deadline(): number {
    return this.#ioTimeoutMs > 0 ? this.#cluster.env.clock.nowMs() + this.#ioTimeoutMs : Number.POSITIVE_INFINITY;
  }
}

function compare(a: KvRecord, b: KvRecord): number {
  return a.epoch !== b.epoch ? a.epoch - b.epoch : a.seq - b.seq;
}

function payloadOf(frame: Frame): Buffer {
  return frame.parts ? Buffer.concat(frame.parts) : frame.payload;
}

function toError(error: unknown): ShaleError {
  return error instanceof ShaleError ? error : new ShaleError('INTERNAL', String(error));
}

/** The data of a READ reply whose every block is DATA with a good crc32c; else CHECKSUM (try another replica). */
function checkedData(frame: Frame, countBlocks: number, storeId: number): Buffer {
  const parts = frame.parts;
  const read = parts && parts.length === 2 ? decodeReadParts(parts[0]!, parts[1]!, countBlocks) : decodeReadReply(frame.payload, countBlocks);
  for (let i = 0; i < countBlocks; i++) {
    if (read.states[i] !== BlockState.DATA) throw new ShaleError('CHECKSUM', `block ${i} is missing on store ${storeId}`);
    if (frame.verified !== true && blockCrc32c(read.data, i) !== read.checksums[i]) {
      throw new ShaleError('CHECKSUM', `block ${i} from store ${storeId} failed its crc32c in transit`);
    }
  }
  return read.data;
}
