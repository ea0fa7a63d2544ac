/**
 * What the store server needs from a disk engine. The log-structured engine (engine/) implements
 * it; the interface keeps the protocol side independent of how blocks are laid out on disk.
 *
 * Ordering and durability: a write resolves once it is in the log (possibly in a volatile cache);
 * `flush` resolves once every write that resolved before the call is on stable storage. The
 * version rule holds per block: a write applies only where its (epoch, seq) is higher than the
 * block's; the result says how many blocks it applied.
 */
import type { ShaleError } from '../lib/errors.ts';
import type { LocalReadResult } from '../proto/store-channel.ts';
import type { ScrubReport } from '../proto/store-protocol.ts';
import type { BlockCacheStats } from './engine/block-cache.ts';
import type { DiscardStats } from './engine/engine.ts';

export interface BlockVersion {
  epoch: number;
  seq: number;
}

export interface BlockReadResult {
  /** countBlocks × 4 KiB; absent and zero blocks read as zeros. */
  data: Buffer;
  checksums: Uint32Array;
  /** Per block: 0 absent, 1 data, 2 zero (BlockState in the store protocol). */
  states: Uint8Array;
  epochs: ArrayLike<number>;
  seqs: ArrayLike<number>;
}

/**
 * Per block of a range, the head version a synchronous read saw, as a READ reply describes it:
 * absent blocks have state 0, version 0 and stamp 0; absent and zero blocks the zero block's crc32c.
 * Arrays of at least the range's length, filled by readNow.
 */
export interface HeadVersions {
  states: Uint8Array;
  checksums: Uint32Array;
  epochs: Uint32Array;
  seqs: Float64Array;
  stamps: Float64Array;
}

export interface ObjectVersions {
  volumeId: number;
  chunkIndex: number;
  states: Uint8Array;
  epochs: Uint32Array;
  seqs: Float64Array;
}

export interface EngineStats {
  capacityBytes: number;
  usedBytes: number;
  freeBytes: number;
  liveBytes: number;
  /** The read cache, when the engine has one. */
  cache?: BlockCacheStats;
  /** Giving freed segments back to the file system, when asked for. */
  discard?: DiscardStats;
}

export interface BlockEngine {
  readonly diskUuid: string;
  readonly clusterId: string;
  readonly path: string;
  /** With `ownerEpoch`, refused with FENCED if the volume is fenced above it (checked when queued, so a fence can't race it). */
  write(request: { volumeId: number; chunkIndex: number; offsetBlocks: number; data: Buffer; checksums: Uint32Array; version: BlockVersion; snapSeq: number; ownerEpoch?: number }): Promise<{ appliedBlocks: number }>;
  /**
   * Optional: the same write from a caller that computed its checksums from `data` or checked
   * them against it (not checked again), settled through `done` instead of a Promise. Throws, with
   * nothing queued, what write() would reject at once (bad request, FENCED, BUSY, closing).
   */
  writeNow?(request: Parameters<BlockEngine['write']>[0], done: (error: Error | undefined, result: { appliedBlocks: number } | undefined) => void): void;
  writeZeroes(request: { volumeId: number; chunkIndex: number; offsetBlocks: number; countBlocks: number; version: BlockVersion; snapSeq: number; ownerEpoch?: number }): Promise<{ appliedBlocks: number }>;
  /** With `snapshotId`, reads as that snapshot saw the blocks (NOT_FOUND if the snapshot was deleted). */
  read(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, options?: { snapshotId?: number }): Promise<BlockReadResult>;
  /** State and version of each block at the head or at a snapshot, from the index (no data read). */
  blockVersions(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, snapshotId?: number): { states: Uint8Array; epochs: ArrayLike<number>; seqs: ArrayLike<number>; stamps: ArrayLike<number> };
  /**
   * Tells the engine the volume's snapshots (durably): versions only deleted snapshots needed are
   * trimmed; `snapSeq` is the volume's snap sequence; `keepTombstones` for clones.
   */
  setSnapshots(volumeId: number, liveSnapIds: readonly number[], options: { snapSeq: number; keepTombstones: boolean }): Promise<void>;
  /** What the engine was last told of the volume's snapshots, or undefined. */
  snapshots(volumeId: number): { ids: number[]; snapSeq: number; keepTombstones: boolean } | undefined;
  /**
   * The same head read done synchronously when the disk can (page-cached data), else undefined;
   * the bytes verified. With `versions`, also the state and version of each block read.
   */
  readNow?(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, versions?: HeadVersions): LocalReadResult | undefined;
  flush(): Promise<void>;
  fence(volumeId: number, ownerEpoch: number): Promise<void>;
  ownerEpoch(volumeId: number): number;
  purgeVolume(volumeId: number): Promise<void>;
  isPurged(volumeId: number): boolean;
  /** The state of each block of the range (absent, data, zero) without reading data. */
  blockStates(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number): Uint8Array;
  /** Per-block versions of every object whose volume is in `volumeIds` (undefined: any id) and which `filter` accepts. */
  listObjects(volumeIds: ReadonlySet<number> | undefined, filter: (volumeId: number, chunkIndex: number) => boolean): ObjectVersions[];
  stats(): EngineStats;
  /** Why the engine takes no more writes (its disk failed a write or sync: DISK_FAILED), or undefined. */
  failure(): ShaleError | undefined;
  /**
   * Small ordered key-value records per shard (engine.ts), by the version rule per key; `fua` makes
   * the change durable. The store keeps its own in STORE_INTERNAL_SHARD (snap-gaps.ts); the S3
   * bucket index lives in shards of namespace 2 (store-server.ts). Live records list in key order.
   */
  kvPut(shardId: number, key: Buffer | string, value: Buffer, version: BlockVersion, options?: { fua?: boolean }): Promise<{ applied: boolean }>;
  kvDelete(shardId: number, key: Buffer | string, version: BlockVersion, options?: { fua?: boolean }): Promise<{ applied: boolean }>;
  kvGet(shardId: number, key: Buffer | string): { key: Buffer; value: Buffer; version: BlockVersion } | undefined;
  kvList(shardId: number, options?: { prefix?: Buffer | string; startAfter?: Buffer | string; limit?: number }): { key: Buffer; value: Buffer; version: BlockVersion }[];
  /** Ids of the shards holding any record, tombstones too (resync of the S3 index). */
  kvShardIds(): number[];
  /** Every record of the shard in key order, delete tombstones too (value undefined), with versions. */
  kvRecords(shardId: number): { key: Buffer; value: Buffer | undefined; version: BlockVersion }[];
  /** Reads every live block and checks its crc32c; reports bad ones (repair is the client's). */
  scrub(options?: { bytesPerSecondMax?: number }): Promise<ScrubReport>;
  close(): Promise<void>;
}
