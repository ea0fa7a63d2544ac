/**
 * S3 objects on the stores: data objects written once through the object client, and the
 * bucket index as key-value records, sharded per bucket (docs/s3.md has the layout).
 *
 * Index shards of a bucket with id B (namespace S3_INDEX): shard s of the object index is
 * B·512 + s, shard s of the bucket's bookkeeping (uploads, parts, intents, garbage) is
 * B·512 + 256 + s. An object key lives in shard crc32c(key) mod shardCount; its record is
 * key → manifest (JSON), or a deletion marker, versioned (1, wall-ms·1024 + counter): the last
 * writer wins by time, everywhere the same.
 *
 * Durability and atomicity (DESIGN §7 invariant 7):
 *   1. an upload first writes an intent record "i<dataId>" (its data can be found and reclaimed
 *      if the gateway dies mid-way);
 *   2. the data chunks are written (FUA, every acting replica);
 *   3. the manifest is written in one key-value record (FUA): readers see the old object or the
 *      new one, never a mix; the PUT is acknowledged only now;
 *   4. the old manifest's data goes on the garbage list "g<dueMs><dataId>" and is freed after the
 *      grace period, so a GET already streaming it is not cut off; the intent is removed.
 * A crashed upload leaves an intent older than the grace period: the collector frees its data.
 */
import { createHash } from 'node:crypto';
import { crc32c } from '../lib/crc32c.ts';
import { ShaleError } from '../lib/errors.ts';
import { BLOCK_SIZE_BYTES } from '../lib/units.ts';
import type { Env } from '../env/env.ts';
import { DATA_CHUNK_BLOCKS, DATA_CHUNK_BYTES, type ObjectClient } from '../client/object-client.ts';
import type { ChecksumAlgorithm } from './body.ts';

export const SHARD_STRIDE = 512;
export const BOOKKEEPING_OFFSET = 256;
/** Largest single PUT or part. */
export const OBJECT_BYTES_MAX = 5 * 1024 * 1024 * 1024;
/** Smallest part of a multipart upload other than the last. */
export const PART_BYTES_MIN = 5 * 1024 * 1024;
/** Most parts one multipart upload may complete with (the manifest is one record of at most 32 KiB). */
export const PARTS_MAX = 1000;
export const PART_NUMBER_MAX = 10_000;
/** Chunk writes of one upload in flight at once. */
const WRITES_IN_FLIGHT_MAX = 4;
/** Records asked of one shard per listing step. */
const LIST_PAGE = 1000;

export interface BucketRef {
  id: number;
  name: string;
  poolId: number;
  shardCount: number;
}

/** One piece of an object's bytes: a data object and its length. */
export type DataPart = [dataId: number, sizeBytes: number];

export interface Manifest {
  v: 1;
  size: number;
  etag: string;
  lastModified: string;
  parts: DataPart[];
  /** For multipart objects: the size of each part as uploaded (GetObject partNumber). */
  partSizes?: number[];
  contentType?: string;
  headers?: Record<string, string>;
  meta?: Record<string, string>;
  checksum?: { algorithm: ChecksumAlgorithm; value: string };
}

interface Deleted {
  v: 1;
  deleted: true;
  at: string;
}

export interface UploadRecord {
  key: string;
  uploadId: string;
  initiated: string;
  contentType?: string;
  headers?: Record<string, string>;
  meta?: Record<string, string>;
  checksumAlgorithm?: ChecksumAlgorithm;
}

/** What a completed upload leaves behind for a repeated completion. */
export interface CompletedUpload {
  completed: true;
  key: string;
  etag: string;
  at: number;
}

export interface PartRecord {
  partNumber: number;
  dataId: number;
  size: number;
  etag: string;
  lastModified: string;
  checksum?: { algorithm: ChecksumAlgorithm; value: string };
}

/** What an upload's data is for: an object key, or a part of a multipart upload (of that key). */
export type IntentOwner = { key: string } | { uploadId: string; partNumber: number; key?: string };

export interface ListedObject {
  key: string;
  manifest: Manifest;
}

function json(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value), 'utf8');
}

function parse<T>(value: Buffer): T {
  return JSON.parse(value.toString('utf8')) as T;
}

export class ObjectStore {
  readonly #env: Env;
  readonly #client: ObjectClient;
  readonly graceMs: number;
  #counter = 0;

  constructor(env: Env, client: ObjectClient, options: { graceMs: number }) {
    this.#env = env;
    this.#client = client;
    this.graceMs = options.graceMs;
  }

  /** A version above every earlier one from this gateway, ordered by wall time across gateways. */
  version(): { epoch: number; seq: number } {
    this.#counter = (this.#counter + 1) % 1024;
    return { epoch: 1, seq: Math.floor(this.#env.clock.wallMs()) * 1024 + this.#counter };
  }

  #indexShard(bucket: BucketRef, key: string): number {
    return bucket.id * SHARD_STRIDE + (crc32c(Buffer.from(key, 'utf8')) % bucket.shardCount);
  }

  #bookShard(bucket: BucketRef, name: string): number {
    return bucket.id * SHARD_STRIDE + BOOKKEEPING_OFFSET + (crc32c(Buffer.from(name, 'utf8')) % bucket.shardCount);
  }

  // ---- data ----------------------------------------------------------------------------------

  /**
   * Streams `chunks` into a fresh data object (intent record first). Resolves with its id and
   * size once every chunk is durable; on failure the intent stays and the collector frees it.
   */
  async writeData(bucket: BucketRef, chunks: AsyncIterable<Buffer>, owner?: IntentOwner): Promise<{ dataId: number; size: number }> {
    const dataId = await this.#client.newDataId();
    await this.#putIntent(bucket, dataId, owner);
    // Incoming pieces are kept as they come and joined once per chunk (one copy; a small object
    // costs its own size, not a 4 MiB buffer).
    let pieces: Buffer[] = [];
    let buffered = 0;
    let chunkIndex = 0;
    let size = 0;
    const inFlight = new Set<Promise<void>>();
    let failure: unknown;
    const flush = async (bytes: number): Promise<void> => {
      if (bytes === 0) return;
      const joined = pieces.length === 1 ? pieces[0]! : Buffer.concat(pieces, buffered);
      const data = joined.subarray(0, bytes);
      const rest = joined.subarray(bytes);
      pieces = rest.length > 0 ? [rest] : [];
      buffered = rest.length;
      const index = chunkIndex++;
      const write = this.#client.writeChunk(bucket.poolId, dataId, index, data).catch((error: unknown) => {
        failure ??= error;
      });
      inFlight.add(write);
      void write.finally(() => inFlight.delete(write));
      while (inFlight.size >= WRITES_IN_FLIGHT_MAX) await Promise.race(inFlight);
      if (failure) throw failure;
    };
    for await (const data of chunks) {
      if (data.length === 0) continue;
      pieces.push(data);
      buffered += data.length;
      size += data.length;
      while (buffered >= DATA_CHUNK_BYTES) await flush(DATA_CHUNK_BYTES);
    }
    await flush(buffered);
    await Promise.all(inFlight);
    if (failure) throw failure;
    return { dataId, size };
  }

  /** Copies a byte range of an object into a fresh data object (CopyObject, UploadPartCopy). */
  async copyData(bucket: BucketRef, source: { bucket: BucketRef; manifest: Manifest }, start: number, end: number, owner?: IntentOwner): Promise<{ dataId: number; size: number; md5Hex: string }> {
    const md5 = createHash('md5');
    const reader = this.read(source.bucket, source.manifest, start, end);
    const self = this;
    async function* hashed(): AsyncGenerator<Buffer> {
      for await (const data of reader) {
        md5.update(data);
        yield data;
      }
    }
    const written = await self.writeData(bucket, hashed(), owner);
    return { ...written, md5Hex: md5.digest('hex') };
  }

  /** The bytes [start, end) of an object, chunk by chunk from the stores, each checked. */
  async *read(bucket: BucketRef, manifest: Manifest, start: number, end: number): AsyncGenerator<Buffer> {
    let partStart = 0;
    for (const [dataId, partSize] of manifest.parts) {
      const partEnd = partStart + partSize;
      if (partEnd > start && partStart < end) {
        const from = Math.max(start, partStart) - partStart;
        const to = Math.min(end, partEnd) - partStart;
        let offset = from;
        while (offset < to) {
          const chunkIndex = Math.floor(offset / DATA_CHUNK_BYTES);
          const chunkStart = chunkIndex * DATA_CHUNK_BYTES;
          const inChunkFrom = offset - chunkStart;
          const inChunkTo = Math.min(to - chunkStart, DATA_CHUNK_BYTES);
          const firstBlock = Math.floor(inChunkFrom / BLOCK_SIZE_BYTES);
          const lastBlock = Math.ceil(inChunkTo / BLOCK_SIZE_BYTES);
          const data = await this.#client.readChunk(bucket.poolId, dataId, chunkIndex, firstBlock, lastBlock - firstBlock);
          const skip = inChunkFrom - firstBlock * BLOCK_SIZE_BYTES;
          yield data.subarray(skip, skip + (inChunkTo - inChunkFrom));
          offset = chunkStart + inChunkTo;
        }
      }
      partStart = partEnd;
      if (partStart >= end) break;
    }
  }

  /** Frees a data object of `size` bytes (tombstones on every chunk). */
  async freeData(bucket: BucketRef, dataId: number, size: number): Promise<void> {
    const chunks = Math.ceil(size / DATA_CHUNK_BYTES);
    for (let index = 0; index < chunks; index++) {
      const bytes = Math.min(DATA_CHUNK_BYTES, size - index * DATA_CHUNK_BYTES);
      await this.#client.freeChunk(bucket.poolId, dataId, index, Math.min(DATA_CHUNK_BLOCKS, Math.ceil(bytes / BLOCK_SIZE_BYTES)));
    }
  }

  async #putIntent(bucket: BucketRef, dataId: number, owner: IntentOwner | undefined): Promise<void> {
    const name = `i${dataId}`;
    await this.#client.kvPut(bucket.poolId, this.#bookShard(bucket, name), Buffer.from(name), json({ dataId, at: this.#env.clock.wallMs(), ...(owner ? { owner } : {}) }), this.version());
  }

  /**
   * Drops intents once their data is referenced, after the reply: an intent left behind (a crash
   * right here) is harmless, since the collector frees an intent's data only if nothing refers to it.
   */
  #dropIntentsLater(bucket: BucketRef, dataIds: readonly number[]): void {
    void (async () => {
      for (const dataId of dataIds) await this.#dropIntent(bucket, dataId);
    })().catch(() => {});
  }

  /** Whether the data of an old intent is referenced by what its upload was for. */
  async #isReferenced(bucket: BucketRef, dataId: number, owner: IntentOwner | undefined): Promise<boolean> {
    if (!owner) return false;
    if (!('uploadId' in owner)) return (await this.head(bucket, owner.key))?.parts.some(([id]) => id === dataId) ?? false;
    const name = `p${owner.uploadId}-${String(owner.partNumber).padStart(5, '0')}`;
    const record = await this.#client.kvGet(bucket.poolId, this.#bookShard(bucket, `u${owner.uploadId}`), Buffer.from(name));
    if (record && parse<PartRecord>(record.value).dataId === dataId) return true;
    // A completed upload: its parts live on in the object.
    return owner.key !== undefined && ((await this.head(bucket, owner.key))?.parts.some(([id]) => id === dataId) ?? false);
  }

  async #dropIntent(bucket: BucketRef, dataId: number): Promise<void> {
    const name = `i${dataId}`;
    await this.#client.kvDelete(bucket.poolId, this.#bookShard(bucket, name), Buffer.from(name), this.version());
  }

  /** Puts data on the garbage list, to be freed once the grace period is over. */
  async #discard(bucket: BucketRef, parts: readonly DataPart[]): Promise<void> {
    const due = Math.floor(this.#env.clock.wallMs()) + this.graceMs;
    for (const [dataId, size] of parts) {
      const name = `g${String(due).padStart(15, '0')}-${dataId}`;
      await this.#client.kvPut(bucket.poolId, this.#bookShard(bucket, name), Buffer.from(name), json({ dataId, size }), this.version());
    }
  }

  // ---- objects -------------------------------------------------------------------------------

  async head(bucket: BucketRef, key: string): Promise<Manifest | undefined> {
    const record = await this.#client.kvGet(bucket.poolId, this.#indexShard(bucket, key), Buffer.from(key, 'utf8'));
    if (!record) return undefined;
    const value = parse<Manifest | Deleted>(record.value);
    return 'deleted' in value ? undefined : value;
  }

  /** Makes `manifest` the object `key` (atomically), then discards the data it replaced and the intents. */
  async commit(bucket: BucketRef, key: string, manifest: Manifest, intents: readonly number[]): Promise<void> {
    const previous = await this.head(bucket, key);
    await this.#client.kvPut(bucket.poolId, this.#indexShard(bucket, key), Buffer.from(key, 'utf8'), json(manifest), this.version());
    if (previous) await this.#discard(bucket, previous.parts.filter(([id]) => !manifest.parts.some(([kept]) => kept === id)));
    this.#dropIntentsLater(bucket, intents);
  }

  async delete(bucket: BucketRef, key: string): Promise<void> {
    const previous = await this.head(bucket, key);
    if (!previous) return;
    const marker: Deleted = { v: 1, deleted: true, at: new Date(this.#env.clock.wallMs()).toISOString() };
    await this.#client.kvPut(bucket.poolId, this.#indexShard(bucket, key), Buffer.from(key, 'utf8'), json(marker), this.version());
    await this.#discard(bucket, previous.parts);
  }

  /**
   * Objects in key order (UTF-8 bytes) after `startAfter` with `prefix`: a merge of every shard's
   * ordered records. With a delimiter, keys that share a common prefix are folded into it and the
   * shards skip past it. Stops after `limit` entries (objects + common prefixes).
   */
  async list(bucket: BucketRef, options: { prefix: string; delimiter?: string; startAfter?: string; limit: number }): Promise<{ objects: ListedObject[]; prefixes: string[]; truncated: boolean; lastKey?: string }> {
    const prefix = Buffer.from(options.prefix, 'utf8');
    // A marker that is a common prefix (a page ended on it) resumes after everything under it.
    let startAfter: Buffer | undefined = options.startAfter ? Buffer.from(options.startAfter, 'utf8') : undefined;
    if (startAfter && options.delimiter && options.startAfter!.startsWith(options.prefix) && options.startAfter!.endsWith(options.delimiter)
      && options.startAfter!.indexOf(options.delimiter, options.prefix.length) === options.startAfter!.length - options.delimiter.length) {
      startAfter = Buffer.concat([startAfter, Buffer.alloc(4, 0xff)]);
    }
    const shards = Array.from({ length: bucket.shardCount }, (_, s) => ({
      shardId: bucket.id * SHARD_STRIDE + s, buffer: [] as { key: Buffer; value: Buffer }[], after: startAfter as Buffer<ArrayBufferLike> | undefined, done: false,
    }));
    const fill = async (shard: (typeof shards)[number]): Promise<void> => {
      if (shard.buffer.length > 0 || shard.done) return;
      const records = await this.#client.kvList(bucket.poolId, shard.shardId, { prefix, startAfter: shard.after, limit: LIST_PAGE });
      shard.buffer = records.map((record) => ({ key: record.key, value: record.value }));
      if (records.length < LIST_PAGE) shard.done = true;
      if (records.length > 0) shard.after = records[records.length - 1]!.key;
    };
    const objects: ListedObject[] = [];
    const prefixes: string[] = [];
    let lastKey: string | undefined;
    for (;;) {
      await Promise.all(shards.map(fill));
      let smallest: (typeof shards)[number] | undefined;
      for (const shard of shards) {
        if (shard.buffer.length > 0 && (!smallest || Buffer.compare(shard.buffer[0]!.key, smallest.buffer[0]!.key) < 0)) smallest = shard;
      }
      if (!smallest) return { objects, prefixes, truncated: false, lastKey };
      const entry = smallest.buffer[0]!;
      const key = entry.key.toString('utf8');
      const value = parse<Manifest | Deleted>(entry.value);
      if ('deleted' in value) {
        smallest.buffer.shift();
        continue;
      }
      if (objects.length + prefixes.length >= options.limit) return { objects, prefixes, truncated: true, lastKey };
      if (options.delimiter) {
        const at = key.indexOf(options.delimiter, options.prefix.length);
        if (at >= 0) {
          const common = key.slice(0, at + options.delimiter.length);
          prefixes.push(common);
          lastKey = common;
          // Skip every key under the common prefix: none is greater than it followed by 0xff bytes.
          const skipTo = Buffer.concat([Buffer.from(common, 'utf8'), Buffer.alloc(4, 0xff)]);
          for (const shard of shards) {
            while (shard.buffer.length > 0 && Buffer.compare(shard.buffer[0]!.key, skipTo) < 0) shard.buffer.shift();
            if (shard.buffer.length === 0 && !shard.done && (!shard.after || Buffer.compare(shard.after, skipTo) < 0)) shard.after = skipTo;
          }
          continue;
        }
      }
      smallest.buffer.shift();
      objects.push({ key, manifest: value });
      lastKey = key;
    }
  }

  /** Whether the bucket holds no object (unfinished uploads do not count, as in S3). */
  async isEmpty(bucket: BucketRef): Promise<boolean> {
    const listed = await this.list(bucket, { prefix: '', limit: 1 });
    return listed.objects.length === 0;
  }

  // ---- multipart -----------------------------------------------------------------------------

  async createUpload(bucket: BucketRef, record: Omit<UploadRecord, 'uploadId' | 'initiated'>): Promise<UploadRecord> {
    const uploadId = this.#env.random.bytes(16).toString('hex');
    const full: UploadRecord = { ...record, uploadId, initiated: new Date(this.#env.clock.wallMs()).toISOString() };
    const name = `u${uploadId}`;
    await this.#client.kvPut(bucket.poolId, this.#bookShard(bucket, name), Buffer.from(name), json(full), this.version());
    return full;
  }

  async upload(bucket: BucketRef, uploadId: string, key?: string): Promise<UploadRecord> {
    if (!/^[0-9a-f]{32}$/.test(uploadId)) throw new ShaleError('NO_SUCH_UPLOAD', `no upload ${uploadId.slice(0, 64)}`);
    const name = `u${uploadId}`;
    const record = await this.#client.kvGet(bucket.poolId, this.#bookShard(bucket, name), Buffer.from(name));
    const upload = record ? parse<UploadRecord | Deleted | CompletedUpload>(record.value) : undefined;
    if (!upload || 'deleted' in upload || 'completed' in upload || (key !== undefined && upload.key !== key)) throw new ShaleError('NO_SUCH_UPLOAD', `no upload ${uploadId}`);
    return upload;
  }

  /** The record a completed upload left behind, if `uploadId` completed as `key`. */
  async completedUpload(bucket: BucketRef, uploadId: string, key: string): Promise<CompletedUpload | undefined> {
    if (!/^[0-9a-f]{32}$/.test(uploadId)) return undefined;
    const name = `u${uploadId}`;
    const record = await this.#client.kvGet(bucket.poolId, this.#bookShard(bucket, name), Buffer.from(name));
    const value = record ? parse<UploadRecord | CompletedUpload>(record.value) : undefined;
    return value && 'completed' in value && value.key === key ? value : undefined;
  }

  async uploads(bucket: BucketRef): Promise<UploadRecord[]> {
    const out: UploadRecord[] = [];
    for (let s = 0; s < bucket.shardCount; s++) {
      let after: Buffer<ArrayBufferLike> | undefined;
      for (;;) {
        const records = await this.#client.kvList(bucket.poolId, bucket.id * SHARD_STRIDE + BOOKKEEPING_OFFSET + s, { prefix: Buffer.from('u'), startAfter: after, limit: LIST_PAGE });
        for (const record of records) {
          const upload = parse<UploadRecord | Deleted | CompletedUpload>(record.value);
          if ('completed' in upload) {
            if (Math.floor(this.#env.clock.wallMs()) - upload.at > this.graceMs) {
              await this.#client.kvDelete(bucket.poolId, bucket.id * SHARD_STRIDE + BOOKKEEPING_OFFSET + s, record.key, this.version());
            }
            continue;
          }
          if (!('deleted' in upload)) out.push(upload);
        }
        if (records.length < LIST_PAGE) break;
        after = records[records.length - 1]!.key;
      }
    }
    return out.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : a.initiated < b.initiated ? -1 : 1));
  }

  async putPart(bucket: BucketRef, upload: UploadRecord, part: PartRecord): Promise<void> {
    const name = `p${upload.uploadId}-${String(part.partNumber).padStart(5, '0')}`;
    const shard = this.#bookShard(bucket, `u${upload.uploadId}`);
    const previous = await this.#client.kvGet(bucket.poolId, shard, Buffer.from(name));
    await this.#client.kvPut(bucket.poolId, shard, Buffer.from(name), json(part), this.version());
    if (previous) {
      const old = parse<PartRecord>(previous.value);
      if (old.dataId !== part.dataId) await this.#discard(bucket, [[old.dataId, old.size]]);
    }
    this.#dropIntentsLater(bucket, [part.dataId]);
  }

  async parts(bucket: BucketRef, upload: UploadRecord): Promise<PartRecord[]> {
    const shard = this.#bookShard(bucket, `u${upload.uploadId}`);
    const records = await this.#client.kvList(bucket.poolId, shard, { prefix: Buffer.from(`p${upload.uploadId}-`), limit: PART_NUMBER_MAX });
    return records.map((record) => parse<PartRecord>(record.value));
  }

  /**
   * Ends an upload (completed or aborted): its part records go; `discard` parts' data is freed
   * later. A completed upload leaves a small record (key and ETag) so that a repeated completion
   * answers as the first one did; the collector removes it after the grace period.
   */
  async endUpload(bucket: BucketRef, upload: UploadRecord, discard: readonly PartRecord[], completed?: { etag: string }): Promise<void> {
    const shard = this.#bookShard(bucket, `u${upload.uploadId}`);
    await this.#discard(bucket, discard.map((part) => [part.dataId, part.size]));
    if (completed) {
      const record: CompletedUpload = { completed: true, key: upload.key, etag: completed.etag, at: Math.floor(this.#env.clock.wallMs()) };
      await this.#client.kvPut(bucket.poolId, shard, Buffer.from(`u${upload.uploadId}`), json(record), this.version());
    } else {
      await this.#client.kvDelete(bucket.poolId, shard, Buffer.from(`u${upload.uploadId}`), this.version());
    }
    for (const part of await this.parts(bucket, upload)) {
      await this.#client.kvDelete(bucket.poolId, shard, Buffer.from(`p${upload.uploadId}-${String(part.partNumber).padStart(5, '0')}`), this.version());
    }
  }

  // ---- garbage collection ---------------------------------------------------------------------

  /**
   * One pass of the collector over a bucket: frees data on the garbage list whose time has come,
   * turns intents older than the grace period (crashed uploads) into garbage, and aborts multipart
   * uploads older than `uploadAgeMsMax`. Returns how many data objects it freed.
   */
  async collect(bucket: BucketRef, uploadAgeMsMax: number): Promise<number> {
    const now = Math.floor(this.#env.clock.wallMs());
    let freed = 0;
    for (let s = 0; s < bucket.shardCount; s++) {
      const shardId = bucket.id * SHARD_STRIDE + BOOKKEEPING_OFFSET + s;
      for (const record of await this.#client.kvList(bucket.poolId, shardId, { prefix: Buffer.from('g'), limit: LIST_PAGE })) {
        const due = Number(record.key.toString('latin1').slice(1, 16));
        if (due > now) break;
        const { dataId, size } = parse<{ dataId: number; size: number }>(record.value);
        await this.freeData(bucket, dataId, size);
        await this.#client.kvDelete(bucket.poolId, shardId, record.key, this.version());
        freed++;
      }
      for (const record of await this.#client.kvList(bucket.poolId, shardId, { prefix: Buffer.from('i'), limit: LIST_PAGE })) {
        const { dataId, at, owner } = parse<{ dataId: number; at: number; owner?: IntentOwner }>(record.value);
        if (now - at < this.graceMs + 3_600_000) continue;
        // A crashed upload: its size is unknown, so every chunk up to the largest object is freed.
        if (!(await this.#isReferenced(bucket, dataId, owner))) await this.#discard(bucket, [[dataId, OBJECT_BYTES_MAX]]);
        await this.#client.kvDelete(bucket.poolId, shardId, record.key, this.version());
      }
    }
    for (const upload of await this.uploads(bucket)) {
      if (now - Date.parse(upload.initiated) > uploadAgeMsMax) await this.endUpload(bucket, upload, await this.parts(bucket, upload));
    }
    return freed;
  }
}
