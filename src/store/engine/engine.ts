/**
 * StoreEngine: the log-structured engine of one store disk (DESIGN §4), format version 1.
 *
 * What it is. One disk file or raw device, opened by path through `env.disk`: a superblock, two
 * checkpoint root slots, then fixed-size segments. Every change — data, a tombstone (TRIM /
 * WRITE_ZEROES), a FENCE, a PURGE, a volume's live snapshots, a dropped tombstone, a key-value
 * record — is a record appended to the open segment in a *batch*: header block(s) listing the
 * records with a crc32c per 4 KiB data block, then the data, all in one `writev` (group commit:
 * what arrives while a batch is being written goes out together in the next one). The index lives
 * in memory (block-index.ts). It is *checkpointed* — an image of everything in memory
 * (checkpoint.ts) written into free segments and named by a root in one of two alternating slots
 * — every `checkpointIntervalBytes` of log and at close; open loads the image and replays only
 * the batches written after it. docs/format.md describes the bytes and the rules.
 *
 * Invariants.
 * - Version rule: a block's head takes a record only if the record's version (epoch, seq) is
 *   higher, lexicographically. An equal version is the same write again (a retry, or a copy made
 *   by compaction): not counted as applied, but the copy later in the log becomes the live one.
 *   A lower version is kept only if a live snapshot needs it (see "Snapshots" below).
 * - Snapshots: every version is stamped with the snap-context sequence its write carried. Snapshot
 *   s reads, per block, the newest version (by write version) whose stamp is below s. A version
 *   other than the head is kept only while some snapshot that may be live needs it: a known live
 *   id (setSnapshots), or any id above the snap sequence the engine was last told about (so a
 *   snapshot the engine has not heard of yet never loses its data).
 * - PURGE wins over every record of its volume (ids are never reused); FENCE keeps the highest
 *   owner epoch; SNAPSHOTS records carry their own version (the sequence of the batch that first
 *   wrote them), so a stale copy never undoes a newer one.
 * - Sequences: batches are numbered disk-wide, +1 each; a root leases a range of them and the next
 *   instance starts above the lease, so a sequence is never reused, not even one that was lost.
 * - Segments are opened only from the *queue* the durable root lists, with the generation it
 *   planned for them; replay reads exactly those segments (plus the ones opened since the
 *   checkpoint), so a never-used segment is never read and a segment whose new header was lost
 *   is never reused with the same generation (its planned generation counts as used).
 * - A segment is reused only after (a) nothing in the index points into it, (b) a sync has covered
 *   the writes that made it so, and (c) if it was opened after the durable checkpoint, a newer
 *   checkpoint is durable (replay must be able to read every batch after the checkpoint).
 * - Data is checksummed before the write (the client's crcs are verified) and after every read; a
 *   block whose crc fails is never returned (CHECKSUM). Compaction copies bytes and the original
 *   crcs, so damage stays detectable and is never laundered.
 * - Free segments are held back in tiers: clients' data and key-value puts get NO_SPACE while only
 *   `reserveSegments` plus the next checkpoint's share are free; tombstones (TRIM frees space),
 *   FENCE, PURGE, SNAPSHOTS and the background compactor's copies may use half of
 *   `reserveSegments`; the foreground compaction's copies and DROPs all of it; only a checkpoint
 *   takes its own share. A victim's live records fit in one segment, so the foreground compaction
 *   can always empty one, and the checkpoint that frees it always has room.
 * - Compaction runs in the background under load too (a compactor reads victims outside the
 *   writer; the writer interleaves their copies with client batches, a bounded amount per batch),
 *   and in the foreground when a client finds no room: that client compacts until progress is
 *   made before it is refused with NO_SPACE.
 * - Tombstones are dropped by compaction (a DROP record, so replay agrees) only when nothing older
 *   of the block is kept, no known live snapshot reads them, and the volume keeps no tombstones (a
 *   clone, told through setSnapshots, reads through its absent blocks to a parent).
 *
 * Crash model. Any unsynced write may be lost, whole or in 512-byte sectors, in any subset.
 * - A write resolves when its batch is written (volatile, like a disk cache; with `fua`, when it
 *   is durable); `flush()` resolves when every write that resolved before it is durable.
 * - The newest valid root (of two slots) names the checkpoint image (crc-checked) and the log
 *   segments that may hold later batches. Replay takes a batch only if its header is valid, its
 *   generation is the segment's and its sequence is above the checkpoint's; batches are applied
 *   in sequence order. A batch whose data crcs fail is *torn* (never durable: ignored whole)
 *   unless some header of its own instance says it was synced, in which case it is *corrupt*
 *   (applied; reads of its bad blocks fail with CHECKSUM).
 * - A checkpoint is committed by its root only after one sync covers the image and every batch up
 *   to its sequence; a root is written only after the log it relies on is durable.
 *
 * API (all numbers are safe integers; volume ids < 2^53, epochs < 2^32):
 *   StoreEngine.format(env, path, { sizeBytes, clusterId, diskUuid?, segmentSizeBytes?, overwrite? }) → DiskInfo
 *       Errors: INVALID_ARGUMENT (bad option, disk too small/large), ALREADY_EXISTS (already
 *       formatted and `overwrite` not set).
 *   StoreEngine.open(env, path, { clusterId?, reserveSegments?, checkpointIntervalBytes?, … }) → StoreEngine
 *       Errors: NOT_FOUND (no such file), WRONG_CLUSTER (no valid superblock, unknown format
 *       version, other cluster, truncated) — the disk is left untouched; CHECKSUM (both roots or
 *       the checkpoint image damaged: the disk's metadata needs repair; nothing is changed).
 *   engine.write({ volumeId, chunkIndex, offsetBlocks, data, checksums, version, snapSeq, ownerEpoch?, fua? })
 *       → { appliedBlocks, skippedBlocks }. `data` is not copied: do not change it until the
 *       promise settles. Errors: INVALID_ARGUMENT, OUT_OF_RANGE, CHECKSUM (crcs do not match the
 *       data; nothing written), FENCED (ownerEpoch below the volume's), NOT_FOUND (volume purged),
 *       NO_SPACE (a write split over several batches may then be partly applied: each block holds
 *       the old or the new version), BUSY (queue full), SHUTTING_DOWN, DISK_FAILED (a write or
 *       sync of the disk failed: the engine is broken from then on, `failure()` says why; reads
 *       still work, writes and flushes fail with the same error).
 *   engine.writeZeroes({ volumeId, chunkIndex, offsetBlocks, countBlocks, version, snapSeq, ownerEpoch?, fua? })
 *       → same, writes a tombstone.
 *   engine.read(volumeId, chunkIndex, offsetBlocks, countBlocks, { snapshotId? }) → { data, checksums, states, versions }
 *       Absent and zero blocks read as zeros. Errors: CHECKSUM (names the block), INVALID_ARGUMENT,
 *       OUT_OF_RANGE, NOT_FOUND (a snapshot the engine knows was deleted).
 *   engine.blockStates(volumeId, chunkIndex, offsetBlocks, countBlocks) → Uint8Array (head states, no I/O).
 *   engine.setSnapshots(volumeId, liveSnapIds, { snapSeq?, keepTombstones? }) (durable); engine.snapshots(volumeId).
 *   engine.kvPut(shardId, key, value, version) / kvDelete(shardId, key, version) → { applied };
 *   engine.kvGet(shardId, key); engine.kvList(shardId, { prefix?, startAfter?, limit? }).
 *   engine.flush(); engine.fence(volumeId, ownerEpoch) (durable; FENCED if older than seen);
 *   engine.ownerEpoch(volumeId); engine.purgeVolume(volumeId) (durable; also drops key-value
 *   shard `volumeId`); engine.isPurged(volumeId); engine.listObjects(); engine.objectVersions();
 *   engine.stats(); engine.segmentStats(); engine.compact() (one segment now); engine.checkpoint();
 *   engine.scrub(); engine.close(); engine.info; engine.replayReport.
 * Ordering: writes to the same block that are in flight together are applied by the version
 * rule, not by arrival; a write and a read in flight together may see either.
 */
import { assert } from '../../lib/assert.ts';
import { ioBuffers } from '../../lib/buffer-pool.ts';
import { BlockCache, type BlockCacheStats } from './block-cache.ts';
import { blockCrc32c, crc32c, ZERO_BLOCK_CRC } from '../../lib/crc32c.ts';
import { ShaleError } from '../../lib/errors.ts';
import { BLOCK_SIZE_BYTES, GiB } from '../../lib/units.ts';
import type { DiskFile, Env, Timer } from '../../env/env.ts';
import type { LocalReadResult } from '../../proto/store-channel.ts';
import type { HeadVersions } from '../block-engine.ts';
import { BlockIndex, BlockState, compareVersions, type ObjectTable } from './block-index.ts';
import { decodeImage, encodeImage, ImageError, imageBytesPerSegment } from './checkpoint.ts';
import type { CheckpointState, ImageKvEntry, ImageVolume } from './checkpoint.ts';
import { Fifo } from './fifo.ts';
import {
  badDataBlocks, BATCH_PAYLOAD_BYTES_MAX, batchHeaderBlocks, CHUNK_BLOCKS_MAX, CLUSTER_ID_BYTES_MAX, decodeKvPayload, decodeRoot,
  decodeSegmentHeaders, decodeSnapshotIds, decodeSuperblock, encodeKvPayload, encodeRoot, encodeSegmentHeader, encodeSnapshotIds,
  encodeSuperblock, FORMAT_VERSION, KV_KEY_BYTES_MAX, KV_VALUE_BYTES_MAX, RECORD_ENTRY_BYTES, RecordKind, ROOT_SLOT_OFFSET_BYTES, ROOT_SLOTS,
  rootLength, rootSlotSizeBytes, scanSegment, sealBatchHeader, SEGMENT_AREA_BLOCKS_MAX, SEGMENT_HEADER_BLOCKS, SEGMENT_SIZE_BYTES_DEFAULT,
  SEGMENT_SIZE_BYTES_MAX, SEGMENT_SIZE_BYTES_MIN, segmentAreaOffsetBytes, SegmentKind, SNAPSHOT_IDS_MAX, SnapshotFlags, SUPERBLOCK_COPIES,
  uuidToBytes, writeCrcEntry, writeRecordEntry,
} from './format.ts';
import type { DecodedBatch, RecordKindValue, Root, RootEntry, SegmentHeader, SegmentKindValue, Superblock } from './format.ts';

export { BlockState } from './block-index.ts';
export type { BlockStateValue } from './block-index.ts';

/** Data blocks in one batch (4 MiB). */
export const batchDataBlocksMax = 1024;
/** Records in one batch. */
export const batchRecordsMax = 256;
/** Blocks in one write or read request (32 MiB); a write is split over batches as needed. */
export const requestBlocksMax = 8192;
/** Requests waiting for a batch; past this, BUSY. */
export const queuedOpsMax = 16384;
export const reserveSegmentsDefault = 2;
/** Background compaction picks only segments at most this full (so each one frees real space). */
export const compactionLiveFractionMax = 0.75;
export const compactionIdleDelayMsDefault = 200;
/**
 * Background compaction under load: while client writes are queued, each batch carries at most
 * this many blocks of compaction copies (1 MiB), so a client write waits for at most that much
 * extra I/O. When the free segments fall to within two of what clients may not take, the limit is
 * lifted (clients would otherwise soon wait for a foreground compaction, which is worse).
 */
export const compactionBatchBlocksMax = 256;
/** The background compactor syncs once this many emptied segments wait for a sync (sooner when short of room). */
export const compactorSyncSegments = 4;
/** Segments a client that hit the wall waits for compaction to copy before it gets NO_SPACE. */
export const makeSpaceCompactionsMax = 8;
/** A checkpoint is written after this much log (or `checkpointImageFactor` × the last image, if more). */
export const checkpointIntervalBytesDefault = 1 * GiB;
/** Freed segments wait this long to be given back, so one process start covers many (`discardFreedSegments`). */
export const discardDelayMsDefault = 1000;
export const checkpointImageFactor = 4;
/** Free segments a root plans ahead (the queue), at least; replay reads their headers at open. */
export const queueSegmentsDefault = 32;
/** …or as many as hold this much, if more: a root (and its sync) per about half of it written. */
export const queueBytesDefault = 2 * GiB;
/** Batch sequences a root leases to this instance. */
export const sequenceLeaseBatchesDefault = 2 ** 20;
/** Segment headers read at once when open scans every segment after finding a damaged root. */
export const fallbackScanParallel = 64;
/** Bytes in flight while scrubbing. */
export const scrubReadBytesMax = 4 * 1024 * 1024;
/** Bad blocks a scrub report lists (it counts them all). */
export const scrubReportBadMax = 1024;
/** Key-value records one kvList returns at most. */
export const kvListLimitMax = 10_000;
/** Reads of at most this many blocks fill the read cache as they please; larger (sequential) reads only take room no small read uses, so a scan can't flush it. */
export const cacheReadBlocksMax = 16;

const TWO_32 = 2 ** 32;
/** Units of live "metadata" per segment (tombstone block, FENCE, PURGE, SNAPSHOTS, key-value bytes / 64). */
const META_UNIT_BYTES = RECORD_ENTRY_BYTES;
/** Rough bytes a block, a history entry and an object add to the checkpoint image. */
const IMAGE_BYTES_PER_BLOCK = 13;
const IMAGE_BYTES_PER_HISTORY = 18;
const IMAGE_BYTES_PER_OBJECT = 64;

export type EngineEnv = Pick<Env, 'disk' | 'clock' | 'random'>;

export interface Version {
  /** Owner epoch of the writer (< 2^32). */
  epoch: number;
  /** Per-volume sequence number (< 2^53). */
  seq: number;
}

export interface WriteRequest {
  volumeId: number;
  chunkIndex: number;
  offsetBlocks: number;
  /** A whole number of 4 KiB blocks, at most `requestBlocksMax`. Not copied. */
  data: Buffer;
  /** crc32c of each 4 KiB block of `data`, as computed by the client. */
  checksums: Uint32Array;
  version: Version;
  /** The snap-context sequence the write carried; stamped on the version. */
  snapSeq: number;
  /** The writer's owner epoch; refused with FENCED if lower than the highest fenced for the volume. */
  ownerEpoch?: number;
  /** Resolve only once the write, and every write resolved before it, is durable (FUA). */
  fua?: boolean;
}

export interface WriteZeroesRequest {
  volumeId: number;
  chunkIndex: number;
  offsetBlocks: number;
  countBlocks: number;
  version: Version;
  snapSeq: number;
  ownerEpoch?: number;
  fua?: boolean;
}

export interface WriteResult {
  /** Blocks whose head took this write's version. */
  appliedBlocks: number;
  /** Blocks that kept a version equal or higher (version rule), or whose volume was purged. */
  skippedBlocks: number;
}

export interface BlockVersions {
  /** Per block; 0 for absent blocks. */
  epochs: Uint32Array;
  seqs: Float64Array;
}

export interface ReadOptions {
  /** Read as snapshot `snapshotId` saw the object: per block the newest version stamped below it. */
  snapshotId?: number;
}

export interface ReadResult {
  /** countBlocks × 4 KiB; absent and zero blocks are zeros. */
  data: Buffer;
  /** crc32c of each returned block (verified). */
  checksums: Uint32Array;
  /** Per block: BlockState (0 absent, 1 data, 2 zero). */
  states: Uint8Array;
  versions: BlockVersions;
}

export interface ObjectKey {
  volumeId: number;
  chunkIndex: number;
}

export interface ObjectVersions extends BlockVersions {
  volumeId: number;
  chunkIndex: number;
  /** Per block from 0 to the highest block ever written: BlockState. */
  states: Uint8Array;
}

export interface SnapshotOptions {
  /** The volume's snap sequence the list is complete up to (default: the highest id given, or the previous value). */
  snapSeq?: number;
  /** The volume's absent blocks read through to a parent (a clone): its tombstones are never dropped. */
  keepTombstones?: boolean;
}

export interface VolumeSnapshots {
  ids: number[];
  snapSeq: number;
  keepTombstones: boolean;
}

export interface KvEntry {
  key: Buffer;
  value: Buffer;
  version: Version;
}

export interface KvListOptions {
  prefix?: Buffer | string;
  /** Return keys strictly after this one. */
  startAfter?: Buffer | string;
  /** Default and maximum `kvListLimitMax`. */
  limit?: number;
}

export interface EngineStats {
  /** Bytes of the segment area. */
  capacityBytes: number;
  /** Bytes of segments in use (open, sealed, checkpoint, or waiting to be free). */
  usedBytes: number;
  /** Bytes of free segments (including the reserve). */
  freeBytes: number;
  /** Bytes of data blocks the index points at (head and snapshot versions). */
  liveBytes: number;
  /** Bytes clients can still write before NO_SPACE, without compaction. */
  writableBytes: number;
  segmentSizeBytes: number;
  segmentCount: number;
  freeSegments: number;
  pendingFreeSegments: number;
  checkpointSegments: number;
  reserveSegments: number;
  /** Free segments kept for the next checkpoint image. */
  checkpointReserveSegments: number;
  /** Segments compaction gave up on (a record in them could not be parsed). */
  damagedSegments: number;
  objectCount: number;
  /** Versions kept for snapshots (not heads). */
  snapshotVersions: number;
  /** Bytes of typed arrays the index holds. */
  indexMemoryBytes: number;
  kvEntries: number;
  compactedSegments: number;
  /** Of those, compacted by the background compactor (idle or under load). */
  backgroundCompactedSegments: number;
  /** Client requests that waited for a foreground compaction (the disk was full for clients). */
  foregroundCompactions: number;
  droppedTombstoneBlocks: number;
  batchesWritten: number;
  syncs: number;
  checkpointsWritten: number;
  /** Checkpoints that found no room for their image: the tiers of free segments should keep this 0. */
  checkpointsStarved: number;
  lastCheckpointImageBytes: number;
  rootsWritten: number;
  logBytesSinceCheckpoint: number;
  /** The read cache, when the engine has one. */
  cache?: BlockCacheStats;
  /** Giving freed segments back to the file system (`discardFreedSegments`), when asked for. */
  discard?: DiscardStats;
}

export interface DiscardStats {
  /** False once the disk refused (see `failure`). */
  enabled: boolean;
  /** Segments given back since open, and the calls that did so. */
  discardedSegments: number;
  calls: number;
  /** Freed segments waiting to be given back. */
  waitingSegments: number;
  failure?: string;
}

export interface SegmentStat {
  segment: number;
  state: 'free' | 'open' | 'sealed' | 'pending-free' | 'checkpoint';
  generation: number;
  liveDataBytes: number;
  /** Live tombstones, fences, purges, snapshot lists and key-value bytes, in 64-byte units. */
  liveMetaUnits: number;
  damaged: boolean;
}

export interface ReplayReport {
  /** Root sequence and checkpoint sequence open started from. */
  rootSequence: number;
  checkpointSequence: number;
  imageBytes: number;
  /** Segment headers read to find what was opened after the checkpoint. */
  headersRead: number;
  /**
   * The other root slot held a damaged (or torn) root: open used the valid one and read the header
   * of every segment, to replay those a lost newer root had opened (`segmentsFoundByScan`).
   */
  rootFallback: boolean;
  segmentsFoundByScan: number;
  segmentsScanned: number;
  bytesRead: number;
  batchesApplied: number;
  /** Valid batches left from an older generation of a reused segment (ignored). */
  staleBatches: number;
  /** Batches whose data failed its crcs and that were never known durable (ignored). */
  tornBatches: number;
  /** Batches known durable whose data failed its crcs (kept; reads of the bad blocks fail). */
  corruptBatches: number;
  corruptBlocks: number;
  /**
   * Durable batches whose header is unreadable (detected by the gap before a later durable batch
   * of the same segment): their records are lost to this disk. The disk needs a resync from peers.
   */
  damagedHeaders: number;
  /** Index entries dropped because their segment was reused after a lost record (disk needs a resync). */
  lostBlocks: number;
  nextSequence: number;
  durationMs: number;
}

export interface ScrubBadBlock {
  volumeId: number;
  chunkIndex: number;
  block: number;
  epoch: number;
  seq: number;
  /** A version kept for a snapshot, not the head. */
  snapshotVersion: boolean;
}

export interface ScrubReport {
  objects: number;
  blocks: number;
  bytesRead: number;
  badBlocks: number;
  /** Of the bad blocks, those the disk could not read at all (the rest failed their crc32c). */
  unreadableBlocks: number;
  /** The first `scrubReportBadMax` bad blocks. */
  bad: ScrubBadBlock[];
  durationMs: number;
}

export interface ScrubOptions {
  /** Read at most this many bytes per second (default: unthrottled). */
  bytesPerSecondMax?: number;
}

export interface DiskInfo {
  path: string;
  diskUuid: string;
  clusterId: string;
  formatVersion: number;
  segmentSizeBytes: number;
  segmentCount: number;
  /** Bytes of the segment area. */
  capacityBytes: number;
  formattedWallMs: number;
}

export interface FormatOptions {
  sizeBytes: number;
  clusterId: string;
  diskUuid?: string;
  /** Default 16 MiB; a multiple of 4 KiB from 64 KiB to 1 GiB. */
  segmentSizeBytes?: number;
  /** Format even if the disk already holds a Shale superblock. */
  overwrite?: boolean;
  /** A file created or extended to sizeBytes gets its blocks allocated (fallocate) instead of staying sparse. */
  preallocate?: boolean;
}

export interface EngineOpenOptions {
  /** Refuse (WRONG_CLUSTER) a disk of another cluster. */
  clusterId?: string;
  /** Free segments clients cannot take (≥ 1), besides those kept for the next checkpoint. Default 2. */
  reserveSegments?: number;
  /** Background compaction runs (under load too) while fewer segments than this are free or emptied. Default max(reserve + 3, 10 %). */
  compactionFreeSegmentsMin?: number;
  /** Default true. */
  backgroundCompaction?: boolean;
  /** An idle engine still short of free segments restarts the background compactor after this long. Default 200 ms. */
  compactionIdleDelayMs?: number;
  /** Log bytes between checkpoints (restart replays at most about this much). Default 1 GiB. */
  checkpointIntervalBytes?: number;
  /** Free segments each root plans ahead. Default max(32, 2 GiB of segments). */
  queueSegments?: number;
  /** Batch sequences each root leases. Default 2^20. */
  sequenceLeaseBatches?: number;
  /** Bytes of memory for the read cache (block-cache.ts); 0 or absent: none. */
  cacheBytes?: number;
  /**
   * Give freed segments back to the file system (`DiskFile.punchHoles`): a sparse disk file then
   * shrinks as data is overwritten or deleted, and the page cache drops what the log no longer
   * needs. Segments wait `discardDelayMs` (default 1 s; 0: at once) so one call covers many; one
   * call at a time; a segment being given back is not opened until that is done. The first
   * failure (a block device, a file system without holes) turns it off (`stats().discard`).
   * Default false.
   */
  discardFreedSegments?: boolean;
  discardDelayMs?: number;
}

const SegmentState = {
  FREE: 0,
  OPEN: 1,
  SEALED: 2,
  /** Empty, waiting for a sync (and, if opened after the durable checkpoint, a newer checkpoint). */
  PENDING_FREE: 3,
  /** Holds a piece of the durable checkpoint image, or of one being written. */
  CHECKPOINT: 4,
} as const;
const stateNames = ['free', 'open', 'sealed', 'pending-free', 'checkpoint'] as const;

/**
 * A request waiting for (or in) a batch. A class, so that every op is built by one constructor
 * with one shape: built as an object literal, ops were sometimes made with a map V8 had since
 * deprecated, and the writer migrated each of them (MigrateToMap) when it first touched them.
 */
class PendingOp {
  readonly kind: RecordKindValue;
  readonly volumeId: number;
  readonly chunkIndex: number;
  readonly offsetBlocks: number;
  /** Blocks covered (0 for records without blocks). */
  readonly countBlocks: number;
  readonly epoch: number;
  seq: number;
  readonly snapSeq: number;
  readonly data: Buffer | undefined;
  readonly checksums: Uint32Array | undefined;
  payload: Buffer | undefined = undefined;
  flags = 0;
  /** DATA: blocks already handed to a batch. */
  placedBlocks = 0;
  /** How much of the reserve the op may use: Tier.CLIENT none, Tier.META and BACKGROUND half, Tier.COMPACTION all. */
  readonly tier: number;
  appliedBlocks = 0;
  skippedBlocks = 0;
  resolve: ((result: WriteResult) => void) | undefined = undefined;
  reject: ((error: Error) => void) | undefined = undefined;
  /** A writeNow caller's callback, settled instead of resolve or reject (no closures per write). */
  done: WriteNowDone | undefined = undefined;

  constructor(
    kind: RecordKindValue, volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, epoch: number, seq: number,
    snapSeq: number, data: Buffer | undefined, checksums: Uint32Array | undefined, tier: number,
  ) {
    this.kind = kind;
    this.volumeId = volumeId;
    this.chunkIndex = chunkIndex;
    this.offsetBlocks = offsetBlocks;
    this.countBlocks = countBlocks;
    this.epoch = epoch;
    this.seq = seq;
    this.snapSeq = snapSeq;
    this.data = data;
    this.checksums = checksums;
    this.tier = tier;
  }
}

type WriteNowDone = (error: Error | undefined, result: WriteResult | undefined) => void;

interface BatchPiece {
  op: PendingOp;
  /** First block of the op in this piece (DATA), relative to op.offsetBlocks. */
  firstBlock: number;
  countBlocks: number;
  /** Index of the piece's first data block in the batch's data area. */
  dataIndexBlocks: number;
  /** The op is complete once this piece is written. */
  last: boolean;
}

interface Batch {
  sequence: number;
  segment: number;
  positionBlocks: number;
  headerBlocks: number;
  dataBlocks: number;
  pieces: BatchPiece[];
  /** The batch header's blocks, an I/O pool buffer given back once the batch is written. */
  header: Buffer;
  buffers: Buffer[];
  offsetBytes: number;
  bytes: number;
}

interface SnapshotSet {
  /** Live ids, ascending. */
  ids: number[];
  /** The list is complete up to this snap sequence: any id above it may be live. */
  knownSeq: number;
  keepTombstones: boolean;
  /** The record's version: the sequence of the batch that first wrote it. */
  version: number;
  /** Header location of the live SNAPSHOTS record (-1: being written). */
  location: number;
}

interface KvShard {
  entries: Map<string, ImageKvEntry>;
  /** Every key of `entries` (tombstones too), ascending. */
  sorted: string[];
  liveCount: number;
}

interface CheckpointRef {
  sequence: number;
  imageBytes: number;
  imageCrc: number;
  segments: RootEntry[];
}

interface CheckpointRun {
  promise: Promise<void>;
  snapshotTaken: boolean;
  started: boolean;
  take: () => Promise<void>;
}

interface CheckpointSnapshot {
  sequence: number;
  image: Buffer;
  segments: RootEntry[];
  logBytes: number;
}

/** Who may take free segments from the reserve (the checkpoint's share is never taken). */
const Tier = {
  /** Client data and key-value records. */
  CLIENT: 0,
  /** Tombstones (a TRIM frees space), FENCE, PURGE, SNAPSHOTS: half the reserve. */
  META: 1,
  /** Compaction copies and DROPs made for a client that hit the wall: all of it. */
  COMPACTION: 2,
  /**
   * The background compactor's copies: half the reserve, like tombstones (so an idle engine pulls
   * a full disk back above the clients' limit). The rest is for the foreground compaction that
   * must succeed when clients are out of room: one segment holds any victim's live records.
   * Background copies that find no room are dropped (their victim stays as it was).
   */
  BACKGROUND: 3,
} as const;

const FORM_IDLE = 0;
const FORM_BLOCKED = 1;
const FORM_NEED_SPACE = 2;
const FORM_NEED_ROOT = 3;
const FORM_PINNED = 4;

/** Per segment, giving it back to the file system: waiting for the next call, or in the running one. */
const DISCARD_WAITING = 1;
const DISCARD_RUNNING = 2;
type FormResult = Batch | typeof FORM_IDLE | typeof FORM_BLOCKED | typeof FORM_NEED_SPACE | typeof FORM_NEED_ROOT | typeof FORM_PINNED;

function invalid(message: string): ShaleError {
  return new ShaleError('INVALID_ARGUMENT', message);
}

function checkVolumeId(volumeId: number): void {
  if (!Number.isSafeInteger(volumeId) || volumeId < 0) throw invalid(`volumeId ${volumeId} is not a whole number in [0, 2^53)`);
}

function checkU32(name: string, value: number): void {
  if (!Number.isInteger(value) || value < 0 || value >= TWO_32) throw invalid(`${name} ${value} is not a whole number in [0, 2^32)`);
}

function checkSafe(name: string, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0) throw invalid(`${name} ${value} is not a whole number in [0, 2^53)`);
}

function checkVersion(version: Version): void {
  if (typeof version !== 'object' || version === null) throw invalid('version is missing');
  checkU32('version.epoch', version.epoch);
  checkSafe('version.seq', version.seq);
}

function checkBlockRange(offsetBlocks: number, countBlocks: number): void {
  checkU32('offsetBlocks', offsetBlocks);
  if (!Number.isInteger(countBlocks) || countBlocks < 1 || countBlocks > requestBlocksMax) {
    throw invalid(`countBlocks ${countBlocks} is not in [1, ${requestBlocksMax}]`);
  }
  if (offsetBlocks + countBlocks > CHUNK_BLOCKS_MAX) {
    throw new ShaleError('OUT_OF_RANGE', `blocks ${offsetBlocks}..${offsetBlocks + countBlocks} lie past the largest object (${CHUNK_BLOCKS_MAX} blocks)`);
  }
}

function toKey(key: Buffer | string, name = 'key'): string {
  const bytes = typeof key === 'string' ? Buffer.from(key, 'utf8') : key;
  if (!Buffer.isBuffer(bytes) || bytes.length < 1 || bytes.length > KV_KEY_BYTES_MAX) throw invalid(`${name} must be 1..${KV_KEY_BYTES_MAX} bytes`);
  return bytes.toString('latin1');
}

/**
 * What a failed read, write or sync of the disk becomes: DISK_FAILED, with the cause (errors the
 * engine raised itself pass through). A full host file system under a sparse disk file is said so.
 */
function toDiskError(error: unknown, what: string): ShaleError {
  if (error instanceof ShaleError) return error;
  const full = (error as NodeJS.ErrnoException | undefined)?.code === 'ENOSPC' ? ' (the file system holding the disk file is full)' : '';
  return new ShaleError('DISK_FAILED', `${what}: ${error instanceof Error ? error.message : String(error)}${full}`);
}

/** First index in ascending `sorted` whose value is > `value`. */
function upperBound(sorted: readonly number[], value: number): number {
  let low = 0;
  let high = sorted.length;
  while (low < high) {
    const middle = (low + high) >>> 1;
    if (sorted[middle]! <= value) low = middle + 1;
    else high = middle;
  }
  return low;
}

/** First index in ascending `sorted` whose value is >= `value`. */
function lowerBoundString(sorted: readonly string[], value: string): number {
  let low = 0;
  let high = sorted.length;
  while (low < high) {
    const middle = (low + high) >>> 1;
    if (sorted[middle]! < value) low = middle + 1;
    else high = middle;
  }
  return low;
}

export class StoreEngine {
  readonly #env: EngineEnv;
  readonly #file: DiskFile;
  readonly #cache: BlockCache | undefined;
  readonly #superblock: Superblock;
  readonly #formatId: Buffer;
  readonly #segmentCount: number;
  readonly #segmentSizeBytes: number;
  readonly #blocksPerSegment: number;
  readonly #segmentAreaOffsetBytes: number;
  readonly #reserveSegments: number;
  readonly #compactionFreeSegmentsMin: number;
  readonly #backgroundCompaction: boolean;
  readonly #compactionIdleDelayMs: number;
  readonly #checkpointIntervalBytes: number;
  readonly #queueSegments: number;
  readonly #sequenceLeaseBatches: number;

  // Per segment.
  readonly #segmentState: Uint8Array;
  /** Generation of the segment's current contents (0: never used). */
  readonly #generation: Float64Array;
  /** Highest generation ever used or planned for the segment: the next plan takes one more. */
  readonly #generationMax: Float64Array;
  /** Sequence of the first batch of the current generation: orders segments by age. */
  readonly #firstSequence: Float64Array;
  readonly #emptiedAtSequence: Float64Array;
  readonly #liveDataBlocks: Int32Array;
  readonly #liveMetaUnits: Int32Array;
  readonly #readPins: Int32Array;
  readonly #damaged: Uint8Array;
  /** 1: in the usable queue; 2: planned by a root being written. */
  readonly #queued: Uint8Array;
  /** Opened after the durable checkpoint: replay needs it until a newer checkpoint. */
  readonly #since: Uint8Array;
  #freeCount = 0;
  #pendingFreeCount = 0;
  /** PENDING_FREE segments opened after the durable checkpoint. */
  #pendingSinceCount = 0;
  #checkpointSegmentCount = 0;
  #liveDataTotal = 0;

  #openSegment = -1;
  #openPositionBlocks = 0;
  #nextSequence = 1;
  #incarnationFirstSequence = 1;
  #lastWrittenSequence = 0;
  #durableSequence = 0;
  #syncInFlight: { promise: Promise<void>; covers: number; index: number } | undefined;
  #syncsStarted = 0;

  // Roots and checkpoints.
  #rootSequence = 0;
  #leaseEnd = 0;
  #checkpoint: CheckpointRef = { sequence: 0, imageBytes: 0, imageCrc: 0, segments: [] };
  /** Planned segments the durable root lists and nothing has opened yet. */
  #queue: RootEntry[] = [];
  /** Log segments opened after the durable checkpoint, in order. */
  #sinceList: RootEntry[] = [];
  /** While a checkpoint is being written: log segments opened after its snapshot (and the one open then). */
  #sinceNext: RootEntry[] | undefined;
  /** Segments taken for a checkpoint image not committed yet: other roots list them, so their generation stays used. */
  #imageSegmentsPending: RootEntry[] = [];
  #rootChain: Promise<void> = Promise.resolve();
  #rootRefillPending = false;
  #checkpointing: CheckpointRun | undefined;
  /** A checkpoint found no room for its image; cleared when anything is freed. */
  #checkpointStarved = false;
  #logBytesSinceCheckpoint = 0;
  #lastImageBytes = 0;
  /** Upper bound of how much the image grew since the last snapshot. */
  #imageGrowthBytes = 0;
  #checkpointsWritten = 0;
  /** Checkpoints that found no room for their image (the reserve should make this never happen). */
  #checkpointsStarved = 0;
  #rootsWritten = 0;

  readonly #index = new BlockIndex();
  /** Volume → the live FENCE record (highest epoch, latest copy). */
  readonly #fences = new Map<number, { epoch: number; location: number }>();
  /** Volume → highest owner epoch seen, raised when fence() is called (before it is durable). */
  readonly #ownerEpochs = new Map<number, number>();
  /** Volume → location of its live PURGE record; -1 while the record is being written. */
  readonly #purged = new Map<number, number>();
  readonly #purging = new Map<number, Promise<void>>();
  readonly #snapshots = new Map<number, SnapshotSet>();
  readonly #kv = new Map<number, KvShard>();

  readonly #queue_ = new Fifo<PendingOp>();
  readonly #compactionQueue = new Fifo<PendingOp>();
  readonly #tasks: (() => Promise<void>)[] = [];
  readonly #pinWaiters: (() => void)[] = [];
  #writerRunning = false;
  #compacting = false;
  /** Set when making space failed; cleared when anything is freed. Fails client writes fast meanwhile. */
  #outOfSpace = false;
  #replaying = false;
  #closing = false;
  #closed = false;
  #closePromise: Promise<void> | undefined;
  #broken: ShaleError | undefined;
  readonly #idleWaiters: (() => void)[] = [];
  #compactionTimer: Timer | undefined;
  #compactionBuffer: Buffer | undefined;
  /** The background compactor's run (at most one), its victim and its read buffer. */
  #compactor: Promise<void> | undefined;
  #compactorVictim = -1;
  /** Per segment: background compactions in a row whose copies were written yet left it not empty. */
  readonly #compactorMisses: Uint8Array;
  #compactorBuffer: Buffer | undefined;
  #backgroundCompactedSegments = 0;
  #foregroundCompactions = 0;
  #compactedSegments = 0;
  /** Client (not compaction) records written: makeSpace's measure of progress. */
  #clientRecordsWritten = 0;
  #droppedTombstoneBlocks = 0;
  #batchesWritten = 0;
  #syncs = 0;
  #replayReport: ReplayReport | undefined;
  /** Per segment: 0, DISCARD_WAITING or DISCARD_RUNNING. */
  readonly #discard: Uint8Array;
  #discardEnabled: boolean;
  readonly #discardAsked: boolean;
  readonly #discardDelayMs: number;
  #discardWaiting = 0;
  #discardTimer: Timer | undefined;
  #discardRun: Promise<void> | undefined;
  #discardedSegments = 0;
  #discardCalls = 0;
  #discardFailure: string | undefined;

  /** Use StoreEngine.open. */
  private constructor(env: EngineEnv, file: DiskFile, superblock: Superblock, options: EngineOpenOptions) {
    this.#env = env;
    this.#file = file;
    this.#superblock = superblock;
    this.#formatId = superblock.formatId;
    this.#segmentCount = superblock.segmentCount;
    this.#segmentSizeBytes = superblock.segmentSizeBytes;
    this.#blocksPerSegment = superblock.segmentSizeBytes / BLOCK_SIZE_BYTES;
    this.#segmentAreaOffsetBytes = superblock.segmentAreaOffsetBytes;
    const count = this.#segmentCount;
    this.#reserveSegments = options.reserveSegments ?? Math.min(reserveSegmentsDefault, Math.max(1, count - 3));
    if (!Number.isInteger(this.#reserveSegments) || this.#reserveSegments < 1 || this.#reserveSegments >= count - 1) {
      throw invalid(`reserveSegments ${options.reserveSegments} must be in [1, ${count - 2}]`);
    }
    this.#compactionFreeSegmentsMin = options.compactionFreeSegmentsMin ?? Math.max(this.#reserveSegments + 3, Math.ceil(count / 10));
    this.#backgroundCompaction = options.backgroundCompaction ?? true;
    this.#compactionIdleDelayMs = options.compactionIdleDelayMs ?? compactionIdleDelayMsDefault;
    this.#checkpointIntervalBytes = options.checkpointIntervalBytes ?? checkpointIntervalBytesDefault;
    if (!Number.isSafeInteger(this.#checkpointIntervalBytes) || this.#checkpointIntervalBytes < 1) throw invalid('checkpointIntervalBytes must be a positive whole number');
    this.#queueSegments = options.queueSegments ?? Math.min(count, Math.max(queueSegmentsDefault, Math.ceil(queueBytesDefault / this.#segmentSizeBytes)));
    if (!Number.isInteger(this.#queueSegments) || this.#queueSegments < 2) throw invalid('queueSegments must be at least 2');
    this.#sequenceLeaseBatches = options.sequenceLeaseBatches ?? sequenceLeaseBatchesDefault;
    if (!Number.isInteger(this.#sequenceLeaseBatches) || this.#sequenceLeaseBatches < 4) throw invalid('sequenceLeaseBatches must be at least 4');
    const cacheBytes = options.cacheBytes ?? 0;
    if (!Number.isSafeInteger(cacheBytes) || cacheBytes < 0) throw invalid(`cacheBytes ${options.cacheBytes} must be a whole number of bytes, 0 for none`);
    this.#cache = cacheBytes >= BLOCK_SIZE_BYTES ? new BlockCache(cacheBytes) : undefined;
    this.#segmentState = new Uint8Array(count);
    this.#generation = new Float64Array(count);
    this.#generationMax = new Float64Array(count);
    this.#firstSequence = new Float64Array(count);
    this.#emptiedAtSequence = new Float64Array(count);
    this.#liveDataBlocks = new Int32Array(count);
    this.#liveMetaUnits = new Int32Array(count);
    this.#readPins = new Int32Array(count);
    this.#damaged = new Uint8Array(count);
    this.#queued = new Uint8Array(count);
    this.#since = new Uint8Array(count);
    this.#compactorMisses = new Uint8Array(count);
    this.#discard = new Uint8Array(count);
    this.#discardAsked = options.discardFreedSegments ?? false;
    this.#discardEnabled = this.#discardAsked && file.punchHoles !== undefined;
    if (this.#discardAsked && !this.#discardEnabled) this.#discardFailure = 'the disk cannot punch holes';
    this.#discardDelayMs = options.discardDelayMs ?? discardDelayMsDefault;
    if (!Number.isSafeInteger(this.#discardDelayMs) || this.#discardDelayMs < 0) throw invalid('discardDelayMs must be a whole number of milliseconds');
  }

  // -------------------------------------------------------------------------------------------
  // Format and open

  /**
   * Writes a new superblock (two copies) and a first root (an empty checkpoint and a queue of
   * segments to open) on a new or existing file, extended (sparse) to sizeBytes.
   */
  static async format(env: EngineEnv, path: string, options: FormatOptions): Promise<DiskInfo> {
    const { sizeBytes, clusterId } = options;
    const segmentSizeBytes = options.segmentSizeBytes ?? SEGMENT_SIZE_BYTES_DEFAULT;
    checkSafe('sizeBytes', sizeBytes);
    const clusterIdBytes = Buffer.byteLength(clusterId ?? '', 'utf8');
    if (typeof clusterId !== 'string' || clusterIdBytes < 1 || clusterIdBytes > CLUSTER_ID_BYTES_MAX) {
      throw invalid(`clusterId must be 1..${CLUSTER_ID_BYTES_MAX} bytes of UTF-8`);
    }
    if (!Number.isInteger(segmentSizeBytes) || segmentSizeBytes % BLOCK_SIZE_BYTES !== 0 ||
      segmentSizeBytes < SEGMENT_SIZE_BYTES_MIN || segmentSizeBytes > SEGMENT_SIZE_BYTES_MAX) {
      throw invalid(`segmentSizeBytes ${segmentSizeBytes} must be a multiple of 4 KiB in [64 KiB, 1 GiB]`);
    }
    const diskUuid = options.diskUuid ?? env.random.uuid();
    if (!uuidToBytes(diskUuid)) throw invalid(`diskUuid "${diskUuid}" is not a uuid`);
    let segmentCount = Math.max(0, Math.floor((sizeBytes - segmentAreaOffsetBytes(1)) / segmentSizeBytes));
    while (segmentCount > 0 && segmentAreaOffsetBytes(segmentCount) + segmentCount * segmentSizeBytes > sizeBytes) segmentCount--;
    if (segmentCount < 5) {
      throw invalid(`sizeBytes ${sizeBytes} is too small: it must hold the metadata area and at least 5 segments of ${segmentSizeBytes} bytes`);
    }
    if ((segmentCount * segmentSizeBytes) / BLOCK_SIZE_BYTES > SEGMENT_AREA_BLOCKS_MAX) {
      throw invalid(`sizeBytes ${sizeBytes} is too large for format ${FORMAT_VERSION} (at most 16 TiB of segments)`);
    }

    // Look first, without changing anything: never clobber a formatted disk unasked.
    const probe = await env.disk.open(path, { create: true });
    try {
      const head = Buffer.alloc(SUPERBLOCK_COPIES * BLOCK_SIZE_BYTES);
      await probe.read(head, 0);
      for (let copy = 0; copy < SUPERBLOCK_COPIES; copy++) {
        const decoded = decodeSuperblock(head, copy * BLOCK_SIZE_BYTES);
        if ((decoded.ok || decoded.reason === 'unknown-version') && !options.overwrite) {
          const owner = decoded.ok ? `cluster "${decoded.superblock.clusterId}"` : `format version ${decoded.version}`;
          throw new ShaleError('ALREADY_EXISTS', `${path} is already a Shale disk (${owner}); pass overwrite to format it again`);
        }
      }
    } finally {
      await probe.close();
    }

    const file = await env.disk.open(path, { create: true, sizeBytes, preallocate: options.preallocate });
    try {
      if (file.sizeBytes < sizeBytes) throw invalid(`${path} holds only ${file.sizeBytes} bytes, less than sizeBytes ${sizeBytes}`);
      const superblock: Superblock = {
        formatVersion: FORMAT_VERSION,
        segmentSizeBytes,
        segmentCount,
        segmentAreaOffsetBytes: segmentAreaOffsetBytes(segmentCount),
        sizeBytes,
        formattedWallMs: Math.floor(env.clock.wallMs()),
        diskUuid: diskUuid.toLowerCase(),
        formatId: env.random.bytes(16),
        clusterId,
        rootSlotOffsetBytes: ROOT_SLOT_OFFSET_BYTES,
        rootSlotSizeBytes: rootSlotSizeBytes(segmentCount),
      };
      const root: Root = {
        rootSequence: 1,
        formatId: superblock.formatId,
        checkpointSequence: 0,
        sequenceLeaseEnd: sequenceLeaseBatchesDefault,
        imageBytes: 0,
        imageCrc: 0,
        checkpointSegments: [],
        logSegments: Array.from({ length: Math.min(queueSegmentsDefault, segmentCount) }, (_, segment) => ({ segment, startBlocks: SEGMENT_HEADER_BLOCKS, generation: 1 })),
      };
      const block = encodeSuperblock(superblock);
      await file.writev([block, block], 0);
      // The other slot is cleared: a root left by an earlier format never matches anyway (format
      // id), but a clear slot makes the state obvious.
      const slot = root.rootSequence % ROOT_SLOTS;
      await file.writev([encodeRoot(root, slot)], ROOT_SLOT_OFFSET_BYTES + slot * superblock.rootSlotSizeBytes);
      await file.writev([Buffer.alloc(BLOCK_SIZE_BYTES)], ROOT_SLOT_OFFSET_BYTES + (1 - slot) * superblock.rootSlotSizeBytes);
      await file.sync();
      return diskInfo(path, superblock);
    } finally {
      await file.close();
    }
  }

  /** Opens a formatted disk: loads its checkpoint and replays what was written after it. Refused disks are left untouched. */
  static async open(env: EngineEnv, path: string, options: EngineOpenOptions = {}): Promise<StoreEngine> {
    const file = await env.disk.open(path);
    try {
      const head = Buffer.alloc(SUPERBLOCK_COPIES * BLOCK_SIZE_BYTES);
      await file.read(head, 0);
      let superblock: Superblock | undefined;
      let unknownVersion: number | undefined;
      for (let copy = 0; copy < SUPERBLOCK_COPIES && !superblock; copy++) {
        const decoded = decodeSuperblock(head, copy * BLOCK_SIZE_BYTES);
        if (decoded.ok) superblock = decoded.superblock;
        else if (decoded.reason === 'unknown-version') unknownVersion = decoded.version;
      }
      if (!superblock) {
        if (unknownVersion !== undefined) {
          throw new ShaleError('WRONG_CLUSTER', `${path} has on-disk format version ${unknownVersion}; this Shale knows version ${FORMAT_VERSION}`);
        }
        throw new ShaleError('WRONG_CLUSTER', `${path} has no valid Shale superblock (not formatted, or damaged)`);
      }
      if (options.clusterId !== undefined && superblock.clusterId !== options.clusterId) {
        throw new ShaleError('WRONG_CLUSTER', `${path} belongs to cluster "${superblock.clusterId}", not "${options.clusterId}"`,
          { diskClusterId: superblock.clusterId });
      }
      const endBytes = superblock.segmentAreaOffsetBytes + superblock.segmentCount * superblock.segmentSizeBytes;
      if (file.sizeBytes < endBytes) {
        throw new ShaleError('WRONG_CLUSTER', `${path} is ${file.sizeBytes} bytes but its superblock describes ${endBytes}: truncated`);
      }
      const engine = new StoreEngine(env, file, superblock, options);
      await engine.#load();
      return engine;
    } catch (error) {
      await file.close().catch(() => {});
      throw error;
    }
  }

  get info(): DiskInfo {
    return diskInfo(this.#file.path, this.#superblock);
  }

  get replayReport(): ReplayReport {
    assert(this.#replayReport, 'replay report read before replay');
    return { ...this.#replayReport };
  }

  // -------------------------------------------------------------------------------------------
  // Writes

  write(request: WriteRequest): Promise<WriteResult> {
    let op: PendingOp;
    try {
      op = this.#dataOp(request, true);
    } catch (error) {
      return Promise.reject(error);
    }
    return this.#durableIf(request.fua, this.#enqueue(op));
  }

  /**
   * The same write for a caller that computed `checksums` from these very bytes (the volume client
   * next to its store, DESIGN §9) or checked them against them (the store server, for a frame from
   * a socket): they are not computed again, and the outcome comes to `done` without a Promise. A
   * bad request, a full queue or a closing engine throw here, before anything is queued;
   * everything later comes to `done`, exactly once. `fua` is not taken: such a write goes through
   * write().
   */
  writeNow(request: WriteRequest, done: WriteNowDone): void {
    if (request.fua) throw invalid('writeNow does not take fua');
    const op = this.#dataOp(request, false);
    op.done = done;
    this.#admit(op);
  }

  /** A DATA op for `request`, after its checks; with `verify`, each block's crc32c is checked against the data. */
  #dataOp(request: WriteRequest, verify: boolean): PendingOp {
    this.#checkAcceptingWrites();
    const { volumeId, chunkIndex, offsetBlocks, data, checksums, version, snapSeq } = request;
    checkVolumeId(volumeId);
    checkU32('chunkIndex', chunkIndex);
    if (!Buffer.isBuffer(data) || data.length === 0 || data.length % BLOCK_SIZE_BYTES !== 0) {
      throw invalid(`data must be a non-empty whole number of ${BLOCK_SIZE_BYTES}-byte blocks`);
    }
    const countBlocks = data.length / BLOCK_SIZE_BYTES;
    checkBlockRange(offsetBlocks, countBlocks);
    if (!(checksums instanceof Uint32Array) || checksums.length !== countBlocks) {
      throw invalid(`checksums must be a Uint32Array with one crc32c per block (${countBlocks})`);
    }
    checkVersion(version);
    checkSafe('snapSeq', snapSeq);
    for (let i = 0; verify && i < countBlocks; i++) {
      if (blockCrc32c(data, i) !== checksums[i]) {
        throw new ShaleError('CHECKSUM', `write to volume ${volumeId} chunk ${chunkIndex}: block ${offsetBlocks + i} does not match its crc32c; nothing written`,
          { volumeId, chunkIndex, block: offsetBlocks + i });
      }
    }
    this.#checkWriter(volumeId, request.ownerEpoch);
    return new PendingOp(RecordKind.DATA, volumeId, chunkIndex, offsetBlocks, countBlocks, version.epoch, version.seq, snapSeq, data, checksums, Tier.CLIENT);
  }

  writeZeroes(request: WriteZeroesRequest): Promise<WriteResult> {
    let op: PendingOp;
    try {
      this.#checkAcceptingWrites();
      const { volumeId, chunkIndex, offsetBlocks, countBlocks, version, snapSeq } = request;
      checkVolumeId(volumeId);
      checkU32('chunkIndex', chunkIndex);
      checkU32('offsetBlocks', offsetBlocks);
      if (!Number.isInteger(countBlocks) || countBlocks < 1) throw invalid(`countBlocks ${countBlocks} must be at least 1`);
      if (offsetBlocks + countBlocks > CHUNK_BLOCKS_MAX) {
        throw new ShaleError('OUT_OF_RANGE', `blocks ${offsetBlocks}..${offsetBlocks + countBlocks} lie past the largest object (${CHUNK_BLOCKS_MAX} blocks)`);
      }
      checkVersion(version);
      checkSafe('snapSeq', snapSeq);
      this.#checkWriter(volumeId, request.ownerEpoch);
      // A tombstone may use half the reserve: on a full disk, TRIM is how a client frees space.
      op = new PendingOp(RecordKind.ZERO, volumeId, chunkIndex, offsetBlocks, countBlocks, version.epoch, version.seq, snapSeq, undefined, undefined, Tier.META);
    } catch (error) {
      return Promise.reject(error);
    }
    return this.#durableIf(request.fua, this.#enqueue(op));
  }

  #durableIf<T>(fua: boolean | undefined, written: Promise<T>): Promise<T> {
    if (!fua) return written;
    return written.then(async (result) => {
      await this.#syncUpTo(this.#lastWrittenSequence);
      return result;
    });
  }

  /** Resolves when every write that resolved before this call is durable. Concurrent flushes share a sync. */
  async flush(): Promise<void> {
    if (this.#closed) throw new ShaleError('SHUTTING_DOWN', 'store engine is closed');
    // A broken engine promises nothing any more, not even for what it synced before.
    if (this.#broken) throw this.#broken;
    await this.#syncUpTo(this.#lastWrittenSequence);
  }

  /**
   * Raises the volume's owner epoch, durably. From the call on, writes carrying a lower
   * `ownerEpoch` are refused with FENCED. Errors: FENCED if `ownerEpoch` is below the highest seen,
   * NOT_FOUND if the volume was purged.
   */
  async fence(volumeId: number, ownerEpoch: number): Promise<void> {
    this.#checkAcceptingWrites();
    checkVolumeId(volumeId);
    checkU32('ownerEpoch', ownerEpoch);
    if (this.#purged.has(volumeId)) throw new ShaleError('NOT_FOUND', `volume ${volumeId} was deleted`);
    const highest = this.#ownerEpochs.get(volumeId) ?? 0;
    if (ownerEpoch < highest) {
      throw new ShaleError('FENCED', `volume ${volumeId}: owner epoch ${ownerEpoch} is older than ${highest}`, { volumeId, ownerEpoch: highest });
    }
    this.#ownerEpochs.set(volumeId, ownerEpoch);
    const persisted = this.#fences.get(volumeId);
    if (!persisted || persisted.epoch < ownerEpoch) {
      await this.#enqueue(new PendingOp(RecordKind.FENCE, volumeId, 0, 0, 0, ownerEpoch, 0, 0, undefined, undefined, Tier.META));
    }
    await this.#syncUpTo(this.#lastWrittenSequence);
  }

  /** Highest owner epoch seen for the volume (0 if never fenced). */
  ownerEpoch(volumeId: number): number {
    return this.#ownerEpochs.get(volumeId) ?? 0;
  }

  /**
   * Deletes every block, snapshot version and key-value record of the volume (and of the
   * key-value shard with the same id), durably; the space becomes garbage for compaction. From
   * the call on, reads see nothing and writes are refused (NOT_FOUND). Idempotent.
   */
  purgeVolume(volumeId: number): Promise<void> {
    try {
      this.#checkAcceptingWrites();
      checkVolumeId(volumeId);
    } catch (error) {
      return Promise.reject(error);
    }
    const inFlight = this.#purging.get(volumeId);
    if (inFlight) return inFlight;
    // -1 without a purge in flight: an earlier attempt failed before its record was written; write it now.
    if ((this.#purged.get(volumeId) ?? -1) >= 0) return this.#syncUpTo(this.#lastWrittenSequence);
    this.#purged.set(volumeId, -1);
    const done = this.#enqueue(new PendingOp(RecordKind.PURGE, volumeId, 0, 0, 0, 0, 0, 0, undefined, undefined, Tier.META))
      .then(() => this.#syncUpTo(this.#lastWrittenSequence))
      .finally(() => this.#purging.delete(volumeId));
    this.#purging.set(volumeId, done);
    return done;
  }

  isPurged(volumeId: number): boolean {
    return this.#purged.has(volumeId);
  }

  /**
   * Tells the engine which snapshots of the volume are live, durably. Versions only deleted
   * snapshots needed are trimmed at once (their space becomes garbage). `snapSeq` says up to which
   * snap sequence the list is complete: a write stamped above it keeps the version it replaces, in
   * case a snapshot the engine has not heard of needs it. With `keepTombstones`, the volume's
   * tombstones are never dropped by compaction (a clone: its absent blocks read through to a parent).
   */
  async setSnapshots(volumeId: number, liveSnapIds: readonly number[], options: SnapshotOptions = {}): Promise<void> {
    this.#checkAcceptingWrites();
    checkVolumeId(volumeId);
    if (!Array.isArray(liveSnapIds) || liveSnapIds.length > SNAPSHOT_IDS_MAX) throw invalid(`liveSnapIds must be an array of at most ${SNAPSHOT_IDS_MAX} ids`);
    const ids = [...new Set(liveSnapIds)].sort((a, b) => a - b);
    for (const id of ids) checkSafe('snapshot id', id);
    if (this.#purged.has(volumeId)) throw new ShaleError('NOT_FOUND', `volume ${volumeId} was deleted`, { volumeId });
    const previous = this.#snapshots.get(volumeId);
    const snapSeq = options.snapSeq ?? Math.max(ids[ids.length - 1] ?? 0, previous?.knownSeq ?? 0);
    checkSafe('snapSeq', snapSeq);
    if (ids.length > 0 && ids[ids.length - 1]! > snapSeq) throw invalid(`snapSeq ${snapSeq} is below live snapshot ${ids[ids.length - 1]}`);
    const keepTombstones = options.keepTombstones ?? previous?.keepTombstones ?? false;
    const op = new PendingOp(RecordKind.SNAPSHOTS, volumeId, 0, 0, 0, 0, 0, snapSeq, undefined, undefined, Tier.META);
    op.payload = encodeSnapshotIds(ids);
    op.flags = keepTombstones ? SnapshotFlags.KEEP_TOMBSTONES : 0;
    await this.#enqueue(op);
    await this.#syncUpTo(this.#lastWrittenSequence);
  }

  /** What the engine knows of the volume's snapshots, or undefined if it was never told. */
  snapshots(volumeId: number): VolumeSnapshots | undefined {
    const set = this.#snapshots.get(volumeId);
    return set ? { ids: [...set.ids], snapSeq: set.knownSeq, keepTombstones: set.keepTombstones } : undefined;
  }

  /**
   * Puts a key-value record in shard `shardId` (ordered by key bytes), applied by the version
   * rule per key. Resolves once written (`fua`: durable). Errors: INVALID_ARGUMENT (key 1..1 KiB,
   * value ≤ 32 KiB), NOT_FOUND (shard purged), NO_SPACE, SHUTTING_DOWN.
   */
  kvPut(shardId: number, key: Buffer | string, value: Buffer, version: Version, options: { fua?: boolean } = {}): Promise<{ applied: boolean }> {
    let op: PendingOp;
    try {
      this.#checkAcceptingWrites();
      checkVolumeId(shardId);
      const keyString = toKey(key);
      if (!Buffer.isBuffer(value) || value.length > KV_VALUE_BYTES_MAX) throw invalid(`value must be a Buffer of at most ${KV_VALUE_BYTES_MAX} bytes`);
      checkVersion(version);
      if (this.#purged.has(shardId)) throw new ShaleError('NOT_FOUND', `shard ${shardId} was deleted`, { shardId });
      op = new PendingOp(RecordKind.KV_PUT, shardId, 0, 0, 0, version.epoch, version.seq, 0, undefined, undefined, Tier.CLIENT);
      op.payload = encodeKvPayload(Buffer.from(keyString, 'latin1'), value);
    } catch (error) {
      return Promise.reject(error);
    }
    return this.#durableIf(options.fua, this.#enqueue(op)).then((result) => ({ applied: result.appliedBlocks > 0 }));
  }

  /** Deletes a key (a tombstone with this version). Same rules as kvPut. */
  kvDelete(shardId: number, key: Buffer | string, version: Version, options: { fua?: boolean } = {}): Promise<{ applied: boolean }> {
    let op: PendingOp;
    try {
      this.#checkAcceptingWrites();
      checkVolumeId(shardId);
      const keyString = toKey(key);
      checkVersion(version);
      if (this.#purged.has(shardId)) throw new ShaleError('NOT_FOUND', `shard ${shardId} was deleted`, { shardId });
      op = new PendingOp(RecordKind.KV_DELETE, shardId, 0, 0, 0, version.epoch, version.seq, 0, undefined, undefined, Tier.META);
      op.payload = encodeKvPayload(Buffer.from(keyString, 'latin1'), undefined);
    } catch (error) {
      return Promise.reject(error);
    }
    return this.#durableIf(options.fua, this.#enqueue(op)).then((result) => ({ applied: result.appliedBlocks > 0 }));
  }

  kvGet(shardId: number, key: Buffer | string): KvEntry | undefined {
    checkVolumeId(shardId);
    const entry = this.#kv.get(shardId)?.entries.get(toKey(key));
    if (!entry?.value) return undefined;
    return { key: Buffer.from(entry.key, 'latin1'), value: Buffer.from(entry.value), version: { epoch: entry.epoch, seq: entry.seq } };
  }

  /** Ids of the shards holding any record (tombstones too), for resync of the S3 index. */
  kvShardIds(): number[] {
    return [...this.#kv.keys()];
  }

  /** Every record of the shard in key order, delete tombstones too (value undefined), with versions: what resync copies. */
  kvRecords(shardId: number): { key: Buffer; value: Buffer | undefined; version: Version }[] {
    checkVolumeId(shardId);
    const shard = this.#kv.get(shardId);
    if (!shard) return [];
    return shard.sorted.map((key) => {
      const entry = shard.entries.get(key)!;
      return { key: Buffer.from(key, 'latin1'), value: entry.value ? Buffer.from(entry.value) : undefined, version: { epoch: entry.epoch, seq: entry.seq } };
    });
  }

  /** Live records of the shard in key order. */
  kvList(shardId: number, options: KvListOptions = {}): KvEntry[] {
    checkVolumeId(shardId);
    const limit = options.limit ?? kvListLimitMax;
    if (!Number.isInteger(limit) || limit < 1 || limit > kvListLimitMax) throw invalid(`limit must be in [1, ${kvListLimitMax}]`);
    const shard = this.#kv.get(shardId);
    if (!shard) return [];
    const prefix = options.prefix === undefined ? '' : typeof options.prefix === 'string' ? Buffer.from(options.prefix, 'utf8').toString('latin1') : options.prefix.toString('latin1');
    let start = lowerBoundString(shard.sorted, prefix);
    if (options.startAfter !== undefined) {
      const after = toKey(options.startAfter, 'startAfter');
      start = Math.max(start, lowerBoundString(shard.sorted, `${after}\u0000`));
    }
    const out: KvEntry[] = [];
    for (let i = start; i < shard.sorted.length && out.length < limit; i++) {
      const key = shard.sorted[i]!;
      if (!key.startsWith(prefix)) break;
      const entry = shard.entries.get(key)!;
      if (entry.value) out.push({ key: Buffer.from(key, 'latin1'), value: Buffer.from(entry.value), version: { epoch: entry.epoch, seq: entry.seq } });
    }
    return out;
  }

  #checkAcceptingWrites(): void {
    if (this.#closing || this.#closed) throw new ShaleError('SHUTTING_DOWN', 'store engine is closing');
    if (this.#broken) throw this.#broken;
  }

  #checkWriter(volumeId: number, ownerEpoch: number | undefined): void {
    if (this.#purged.has(volumeId)) throw new ShaleError('NOT_FOUND', `volume ${volumeId} was deleted`, { volumeId });
    if (ownerEpoch !== undefined) {
      checkU32('ownerEpoch', ownerEpoch);
      const highest = this.#ownerEpochs.get(volumeId) ?? 0;
      if (ownerEpoch < highest) {
        throw new ShaleError('FENCED', `volume ${volumeId}: owner epoch ${ownerEpoch} is older than ${highest}`, { volumeId, ownerEpoch: highest });
      }
    }
  }

  #enqueue(op: PendingOp): Promise<WriteResult> {
    // A full queue throws in the executor: the promise rejects with BUSY.
    return new Promise<WriteResult>((resolve, reject) => {
      op.resolve = resolve;
      op.reject = reject;
      this.#admit(op);
    });
  }

  /** Queues a client op whose resolve and reject are set, or throws BUSY when the queue is full. */
  #admit(op: PendingOp): void {
    if (this.#queue_.length >= queuedOpsMax) throw new ShaleError('BUSY', `store engine queue is full (${queuedOpsMax} requests)`);
    this.#queue_.push(op);
    this.#pump();
  }

  // -------------------------------------------------------------------------------------------
  // Reads

  async read(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, options: ReadOptions = {}): Promise<ReadResult> {
    const located = this.#locate(volumeId, chunkIndex, offsetBlocks, countBlocks, options);
    const { data, states, locations, checksums } = located;
    // Blocks in the cache are copied from it; the rest are read from the disk, then cached.
    const cache = this.#cache;
    let cached: Uint8Array | undefined;
    if (cache !== undefined) {
      for (let b = 0; b < countBlocks; b++) {
        if (states[b] !== BlockState.DATA) continue;
        const slot = this.#findCached(cache, locations[b]!, checksums[b]!);
        if (slot < 0) continue;
        cache.copyOut(slot, data, b * BLOCK_SIZE_BYTES);
        (cached ??= new Uint8Array(countBlocks))[b] = 1;
      }
    }
    const reads: Promise<number>[] = [];
    const readLengths: number[] = [];
    const pinned: number[] = [];
    let i = 0;
    while (i < countBlocks) {
      if (states[i] !== BlockState.DATA || cached?.[i] === 1) {
        i++;
        continue;
      }
      const start = i;
      const startLocation = locations[i]!;
      const segment = Math.floor(startLocation / this.#blocksPerSegment);
      i = this.#runEnd(states, locations, start, countBlocks, cached);
      this.#readPins[segment]!++;
      pinned.push(segment);
      readLengths.push((i - start) * BLOCK_SIZE_BYTES);
      reads.push(this.#file.read(data.subarray(start * BLOCK_SIZE_BYTES, i * BLOCK_SIZE_BYTES), this.#locationOffsetBytes(startLocation)));
    }
    if (reads.length > 0) {
      let lengths: number[];
      try {
        lengths = reads.length === 1 ? [await reads[0]!] : await Promise.all(reads);
      } catch (error) {
        throw toDiskError(error, `read of volume ${volumeId} chunk ${chunkIndex}`);
      } finally {
        for (const segment of pinned) this.#readPins[segment]!--;
        this.#afterUnpin();
      }
      for (let r = 0; r < lengths.length; r++) {
        if (lengths[r] !== readLengths[r]) {
          throw new ShaleError('CHECKSUM', `volume ${volumeId} chunk ${chunkIndex}: short read from the disk`, { volumeId, chunkIndex });
        }
      }
      this.#verify(located, volumeId, chunkIndex, offsetBlocks, countBlocks);
      // Verified, and still under the generation read: a segment is reused only by the writer, which
      // has not run since the pins above were dropped.
      if (cache !== undefined) {
        const scan = countBlocks > cacheReadBlocksMax;
        for (let b = 0; b < countBlocks; b++) {
          if (states[b] !== BlockState.DATA || cached?.[b] === 1) continue;
          const location = locations[b]!;
          cache.add(location, this.#generation[Math.floor(location / this.#blocksPerSegment)]!, checksums[b]!, data, b * BLOCK_SIZE_BYTES, scan);
        }
      }
    }
    return { data, checksums, states, versions: located.versions };
  }

  /**
   * A head read done synchronously, or undefined when the disk would rather be read through the
   * thread pool (DiskFile.readNow declines: not likely in the page cache, or too large). The hot
   * path of a gateway with its store in the same process: no Promise, no event-loop turn, and no
   * per-block arrays — only the bytes (absent and zero blocks as zeros, every data block checked
   * against its crc32c) and whether any block was never written (a clone reads those through).
   */
  readNow(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, versions?: HeadVersions): LocalReadResult | undefined {
    const file = this.#file;
    const cache = this.#cache;
    if (file.readNow === undefined && cache === undefined) return undefined;
    if (this.#closed) throw new ShaleError('SHUTTING_DOWN', 'store engine is closed');
    checkVolumeId(volumeId);
    checkU32('chunkIndex', chunkIndex);
    checkBlockRange(offsetBlocks, countBlocks);
    const table = this.#purged.has(volumeId) ? undefined : this.#index.get(volumeId, chunkIndex);
    if (versions !== undefined) describeHead(table, offsetBlocks, countBlocks, versions);
    // One cached block is lent as it lies in the cache: no copy, no system call. The reader gives
    // it back (giveBack) once the reply carrying it is written.
    if (cache !== undefined && countBlocks === 1 && table !== undefined && table.stateAt(offsetBlocks) === BlockState.DATA) {
      const slot = this.#findCached(cache, table.location[offsetBlocks]!, table.crc[offsetBlocks]!);
      if (slot >= 0) return { data: cache.view(slot), absent: false };
    }
    // From the read pool: the NBD gateway gives it back once the reply carrying it is written.
    const data = ioBuffers.take(countBlocks * BLOCK_SIZE_BYTES);
    let absent = false;
    let b = 0;
    while (b < countBlocks) {
      const state = table === undefined ? BlockState.ABSENT : table.stateAt(offsetBlocks + b);
      if (state !== BlockState.DATA) {
        if (state === BlockState.ABSENT) absent = true;
        data.fill(0, b * BLOCK_SIZE_BYTES, (b + 1) * BLOCK_SIZE_BYTES);
        b++;
        continue;
      }
      const startLocation = table!.location[offsetBlocks + b]!;
      if (cache !== undefined && countBlocks > 1) {
        const slot = this.#findCached(cache, startLocation, table!.crc[offsetBlocks + b]!);
        if (slot >= 0) {
          cache.copyOut(slot, data, b * BLOCK_SIZE_BYTES);
          b++;
          continue;
        }
      }
      if (file.readNow === undefined) {
        ioBuffers.give(data);
        return undefined;
      }
      // A run of blocks next to each other in one segment: one disk read. Nothing can move a
      // segment between here and the end of this synchronous read: no pin is needed.
      const start = b;
      const segment = Math.floor(startLocation / this.#blocksPerSegment);
      b++;
      while (b < countBlocks && table!.stateAt(offsetBlocks + b) === BlockState.DATA && table!.location[offsetBlocks + b] === startLocation + (b - start) &&
        Math.floor((startLocation + (b - start)) / this.#blocksPerSegment) === segment) b++;
      const target = start === 0 && b === countBlocks ? data : data.subarray(start * BLOCK_SIZE_BYTES, b * BLOCK_SIZE_BYTES);
      let length: number | undefined;
      try {
        length = file.readNow(target, this.#locationOffsetBytes(startLocation));
      } catch (error) {
        throw toDiskError(error, `read of volume ${volumeId} chunk ${chunkIndex}`);
      }
      if (length === undefined) {
        ioBuffers.give(data);
        return undefined;
      }
      if (length !== target.length) {
        throw new ShaleError('CHECKSUM', `volume ${volumeId} chunk ${chunkIndex}: short read from the disk`, { volumeId, chunkIndex });
      }
      // Every data block read must match its crc32c: a mismatch is CHECKSUM, never wrong bytes.
      for (let k = start; k < b; k++) {
        const bytes = b - start === 1 ? target : data.subarray(k * BLOCK_SIZE_BYTES, (k + 1) * BLOCK_SIZE_BYTES);
        const crc = table!.crc[offsetBlocks + k]!;
        if (crc32c(bytes) !== crc) {
          const block = offsetBlocks + k;
          throw new ShaleError('CHECKSUM', `volume ${volumeId} chunk ${chunkIndex} block ${block}: data does not match its crc32c`,
            { volumeId, chunkIndex, block });
        }
        cache?.add(startLocation + (k - start), this.#generation[segment]!, crc, data, k * BLOCK_SIZE_BYTES, countBlocks > cacheReadBlocksMax);
      }
    }
    return { data, absent };
  }

  /** The cache slot of the block at `location` with crc32c `crc`, as its segment's current generation holds it, or -1. */
  #findCached(cache: BlockCache, location: number, crc: number): number {
    return cache.find(location, this.#generation[Math.floor(location / this.#blocksPerSegment)]!, crc);
  }

  /** The end of the run of data blocks from `start` that lie next to each other in one segment, none of them `cached`: one disk read. */
  #runEnd(states: Uint8Array, locations: Uint32Array, start: number, countBlocks: number, cached?: Uint8Array): number {
    const startLocation = locations[start]!;
    const segment = Math.floor(startLocation / this.#blocksPerSegment);
    let end = start + 1;
    while (end < countBlocks && states[end] === BlockState.DATA && cached?.[end] !== 1 && locations[end] === startLocation + (end - start) &&
      Math.floor((startLocation + (end - start)) / this.#blocksPerSegment) === segment) end++;
    return end;
  }

  /** Where each block's wanted version lies (at a snapshot with `snapshotId`); absent and zero blocks' data zero-filled. */
  #locate(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, options: ReadOptions): ReadResult & { locations: Uint32Array } {
    if (this.#closed) throw new ShaleError('SHUTTING_DOWN', 'store engine is closed');
    checkVolumeId(volumeId);
    checkU32('chunkIndex', chunkIndex);
    checkBlockRange(offsetBlocks, countBlocks);
    const snapshotId = options.snapshotId;
    if (snapshotId !== undefined) {
      checkSafe('snapshotId', snapshotId);
      const set = this.#snapshots.get(volumeId);
      if (set && snapshotId <= set.knownSeq && upperBound(set.ids, snapshotId - 1) === upperBound(set.ids, snapshotId)) {
        throw new ShaleError('NOT_FOUND', `snapshot ${snapshotId} of volume ${volumeId} was deleted`, { volumeId, snapshotId });
      }
    }
    // From the read pool: the NBD gateway gives it back once the reply carrying it is written.
    const data = ioBuffers.take(countBlocks * BLOCK_SIZE_BYTES);
    const checksums = new Uint32Array(countBlocks);
    const states = new Uint8Array(countBlocks);
    const epochs = new Uint32Array(countBlocks);
    const seqs = new Float64Array(countBlocks);
    const locations = new Uint32Array(countBlocks);
    const table = this.#purged.has(volumeId) ? undefined : this.#index.get(volumeId, chunkIndex);
    for (let i = 0; i < countBlocks; i++) {
      const block = offsetBlocks + i;
      if (!table || table.stateAt(block) === BlockState.ABSENT) continue;
      if (snapshotId === undefined || table.stampAt(block) < snapshotId) {
        states[i] = table.stateAt(block);
        epochs[i] = table.epochAt(block);
        seqs[i] = table.seqAt(block);
        locations[i] = table.location[block]!;
        checksums[i] = table.crc[block]!;
        continue;
      }
      for (let entry = table.firstHistory(block); entry >= 0; entry = table.hNext[entry]!) {
        if (table.entryStamp(entry) >= snapshotId) continue;
        states[i] = table.entryKind(entry);
        epochs[i] = table.entryEpoch(entry);
        seqs[i] = table.entrySeq(entry);
        locations[i] = table.hLocation[entry]!;
        checksums[i] = table.hCrc[entry]!;
        break;
      }
    }
    for (let i = 0; i < countBlocks; i++) {
      if (states[i] === BlockState.DATA) continue;
      data.fill(0, i * BLOCK_SIZE_BYTES, (i + 1) * BLOCK_SIZE_BYTES);
      checksums[i] = ZERO_BLOCK_CRC;
    }
    return { data, checksums, states, versions: { epochs, seqs }, locations };
  }

  /** Every data block read must match its crc32c: a mismatch is CHECKSUM, never wrong bytes. */
  #verify(located: ReadResult, volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number): void {
    const { data, states, checksums } = located;
    for (let b = 0; b < countBlocks; b++) {
      if (states[b] !== BlockState.DATA) continue;
      if (blockCrc32c(data, b) !== checksums[b]) {
        const block = offsetBlocks + b;
        throw new ShaleError('CHECKSUM', `volume ${volumeId} chunk ${chunkIndex} block ${block}: data does not match its crc32c`,
          { volumeId, chunkIndex, block });
      }
    }
  }

  /** The head state of each block of the range (absent, data, zero), without reading data. */
  blockStates(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number): Uint8Array {
    checkVolumeId(volumeId);
    checkU32('chunkIndex', chunkIndex);
    checkBlockRange(offsetBlocks, countBlocks);
    const states = new Uint8Array(countBlocks);
    const table = this.#purged.has(volumeId) ? undefined : this.#index.get(volumeId, chunkIndex);
    if (table) for (let i = 0; i < countBlocks; i++) states[i] = table.stateAt(offsetBlocks + i);
    return states;
  }

  /**
   * State and version of each block of the range as a read would see them — at the head, or at
   * snapshot `snapshotId` (the newest version stamped below it) — from the index alone, no I/O.
   * For block status and diffs of snapshots. Errors: as read (NOT_FOUND for a deleted snapshot).
   */
  blockVersionsAt(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, snapshotId?: number): { states: Uint8Array; epochs: Uint32Array; seqs: Float64Array; stamps: Float64Array } {
    checkVolumeId(volumeId);
    checkU32('chunkIndex', chunkIndex);
    checkBlockRange(offsetBlocks, countBlocks);
    if (snapshotId !== undefined) {
      checkSafe('snapshotId', snapshotId);
      const set = this.#snapshots.get(volumeId);
      if (set && snapshotId <= set.knownSeq && upperBound(set.ids, snapshotId - 1) === upperBound(set.ids, snapshotId)) {
        throw new ShaleError('NOT_FOUND', `snapshot ${snapshotId} of volume ${volumeId} was deleted`, { volumeId, snapshotId });
      }
    }
    const states = new Uint8Array(countBlocks);
    const epochs = new Uint32Array(countBlocks);
    const seqs = new Float64Array(countBlocks);
    const stamps = new Float64Array(countBlocks);
    const table = this.#purged.has(volumeId) ? undefined : this.#index.get(volumeId, chunkIndex);
    if (!table) return { states, epochs, seqs, stamps };
    for (let i = 0; i < countBlocks; i++) {
      const block = offsetBlocks + i;
      if (table.stateAt(block) === BlockState.ABSENT) continue;
      if (snapshotId === undefined || table.stampAt(block) < snapshotId) {
        states[i] = table.stateAt(block);
        epochs[i] = table.epochAt(block);
        seqs[i] = table.seqAt(block);
        stamps[i] = table.stampAt(block);
        continue;
      }
      for (let entry = table.firstHistory(block); entry >= 0; entry = table.hNext[entry]!) {
        if (table.entryStamp(entry) >= snapshotId) continue;
        states[i] = table.entryKind(entry);
        epochs[i] = table.entryEpoch(entry);
        seqs[i] = table.entrySeq(entry);
        stamps[i] = table.entryStamp(entry);
        break;
      }
    }
    return { states, epochs, seqs, stamps };
  }

  /** Every object holding at least one block (data or tombstone). Safe to interleave with writes. */
  *listObjects(): IterableIterator<ObjectKey> {
    for (const table of this.#index.objects()) {
      if (table.presentBlocks > 0 && !this.#purged.has(table.volumeId)) yield { volumeId: table.volumeId, chunkIndex: table.chunkIndex };
    }
  }

  /** State and head version of every block of the object up to the highest written (copies), or undefined. */
  objectVersions(volumeId: number, chunkIndex: number): ObjectVersions | undefined {
    if (this.#purged.has(volumeId)) return undefined;
    const table = this.#index.get(volumeId, chunkIndex);
    if (!table || table.presentBlocks === 0) return undefined;
    const blocks = table.highestBlocks;
    const states = new Uint8Array(blocks);
    const epochs = new Uint32Array(blocks);
    const seqs = new Float64Array(blocks);
    for (let block = 0; block < blocks; block++) {
      const state = table.stateAt(block);
      if (state === BlockState.ABSENT) continue;
      states[block] = state;
      epochs[block] = table.epochAt(block);
      seqs[block] = table.seqAt(block);
    }
    return { volumeId, chunkIndex, states, epochs, seqs };
  }

  /** Why the engine takes no more writes (a disk write or sync failed), or undefined while it does. */
  failure(): ShaleError | undefined {
    return this.#broken;
  }

  stats(): EngineStats {
    const segmentBytes = this.#segmentSizeBytes;
    let damaged = 0;
    let snapshotVersions = 0;
    for (let s = 0; s < this.#segmentCount; s++) damaged += this.#damaged[s]!;
    for (const table of this.#index.objects()) snapshotVersions += table.historyCount;
    let kvEntries = 0;
    for (const shard of this.#kv.values()) kvEntries += shard.liveCount;
    return {
      capacityBytes: this.#segmentCount * segmentBytes,
      usedBytes: (this.#segmentCount - this.#freeCount) * segmentBytes,
      freeBytes: this.#freeCount * segmentBytes,
      liveBytes: this.#liveDataTotal * BLOCK_SIZE_BYTES,
      writableBytes: this.#writableBlocks() * BLOCK_SIZE_BYTES,
      segmentSizeBytes: segmentBytes,
      segmentCount: this.#segmentCount,
      freeSegments: this.#freeCount,
      pendingFreeSegments: this.#pendingFreeCount,
      checkpointSegments: this.#checkpointSegmentCount,
      reserveSegments: this.#reserveSegments,
      checkpointReserveSegments: this.#checkpointReserveSegments(),
      damagedSegments: damaged,
      objectCount: this.#index.objectCount,
      snapshotVersions,
      indexMemoryBytes: this.#index.memoryBytes,
      kvEntries,
      compactedSegments: this.#compactedSegments,
      backgroundCompactedSegments: this.#backgroundCompactedSegments,
      foregroundCompactions: this.#foregroundCompactions,
      droppedTombstoneBlocks: this.#droppedTombstoneBlocks,
      batchesWritten: this.#batchesWritten,
      syncs: this.#syncs,
      checkpointsWritten: this.#checkpointsWritten,
      checkpointsStarved: this.#checkpointsStarved,
      lastCheckpointImageBytes: this.#lastImageBytes,
      rootsWritten: this.#rootsWritten,
      logBytesSinceCheckpoint: this.#logBytesSinceCheckpoint,
      ...(this.#cache === undefined ? {} : { cache: this.#cache.stats }),
      ...(this.#discardAsked ? { discard: this.#discardStats() } : {}),
    };
  }

  /** Per segment: state, generation and live bytes. */
  segmentStats(): SegmentStat[] {
    const out: SegmentStat[] = [];
    for (let s = 0; s < this.#segmentCount; s++) {
      out.push({
        segment: s,
        state: stateNames[this.#segmentState[s]!]!,
        generation: this.#generation[s]!,
        liveDataBytes: this.#liveDataBlocks[s]! * BLOCK_SIZE_BYTES,
        liveMetaUnits: this.#liveMetaUnits[s]!,
        damaged: this.#damaged[s] === 1,
      });
    }
    return out;
  }

  /** Compacts the segment with the least live data now, if that frees anything. Resolves true if one was freed. */
  compact(): Promise<boolean> {
    if (this.#closing || this.#closed) return Promise.reject(new ShaleError('SHUTTING_DOWN', 'store engine is closing'));
    return this.#runTask(async () => {
      const victim = this.#pickVictim(false);
      return victim >= 0 ? this.#compactSegment(victim) : false;
    });
  }

  /** Writes a checkpoint now (restart then replays nothing written before this call). */
  checkpoint(): Promise<void> {
    if (this.#closing || this.#closed) return Promise.reject(new ShaleError('SHUTTING_DOWN', 'store engine is closing'));
    if (this.#broken) return Promise.reject(this.#broken);
    const running = this.#checkpointing;
    // One already under way may have taken its snapshot before this call: run another after it.
    return (running ? running.promise.catch(() => {}) : Promise.resolve()).then(() => this.#startCheckpoint());
  }

  /**
   * Reads every live data block (heads and snapshot versions) and checks it against its crc32c.
   * Bad blocks (those that fail it, and those the disk cannot read) are reported, never repaired
   * here (a peer's copy repairs them). Runs alongside I/O.
   */
  async scrub(options: ScrubOptions = {}): Promise<ScrubReport> {
    if (this.#closed) throw new ShaleError('SHUTTING_DOWN', 'store engine is closed');
    const rate = options.bytesPerSecondMax;
    if (rate !== undefined && (!Number.isFinite(rate) || rate <= 0)) throw invalid('bytesPerSecondMax must be positive');
    const startMs = this.#env.clock.nowMs();
    const report: ScrubReport = { objects: 0, blocks: 0, bytesRead: 0, badBlocks: 0, unreadableBlocks: 0, bad: [], durationMs: 0 };
    const keys = [...this.#index.objects()].map((table) => ({ volumeId: table.volumeId, chunkIndex: table.chunkIndex }));
    const buffer = Buffer.allocUnsafe(scrubReadBytesMax);
    for (const key of keys) {
      if (this.#closed || this.#closing) break;
      if (this.#purged.has(key.volumeId)) continue;
      // Collect this object's live data versions now; re-check each one after its read (it may have moved).
      const table = this.#index.get(key.volumeId, key.chunkIndex);
      if (!table) continue;
      report.objects++;
      const items: { block: number; location: number; crc: number; epoch: number; seq: number; history: boolean }[] = [];
      for (let block = 0; block < table.highestBlocks; block++) {
        if (table.stateAt(block) === BlockState.DATA) {
          items.push({ block, location: table.location[block]!, crc: table.crc[block]!, epoch: table.epochAt(block), seq: table.seqAt(block), history: false });
        }
        for (let entry = table.firstHistory(block); entry >= 0; entry = table.hNext[entry]!) {
          if (table.entryKind(entry) !== BlockState.DATA) continue;
          items.push({ block, location: table.hLocation[entry]!, crc: table.hCrc[entry]!, epoch: table.entryEpoch(entry), seq: table.entrySeq(entry), history: true });
        }
      }
      items.sort((a, b) => a.location - b.location);
      let i = 0;
      while (i < items.length) {
        const start = i;
        const segment = Math.floor(items[start]!.location / this.#blocksPerSegment);
        do i++;
        while (i < items.length && items[i]!.location === items[start]!.location + (i - start) && (i - start) * BLOCK_SIZE_BYTES < scrubReadBytesMax &&
          Math.floor(items[i]!.location / this.#blocksPerSegment) === segment);
        const bytes = (i - start) * BLOCK_SIZE_BYTES;
        this.#readPins[segment]!++;
        // A run the disk cannot read (a bad sector, say) is bad like a run that fails its crc32c.
        let length = 0;
        let unreadable = false;
        try {
          length = await this.#file.read(buffer.subarray(0, bytes), this.#locationOffsetBytes(items[start]!.location));
        } catch (error) {
          if (this.#closing || this.#closed) throw new ShaleError('SHUTTING_DOWN', `store engine closed during the scrub (${(error as Error).message})`);
          unreadable = true;
        } finally {
          this.#readPins[segment]!--;
          this.#afterUnpin();
        }
        report.bytesRead += bytes;
        for (let k = start; k < i; k++) {
          const item = items[k]!;
          report.blocks++;
          const at = (k - start) * BLOCK_SIZE_BYTES;
          const good = at + BLOCK_SIZE_BYTES <= length && crc32c(buffer.subarray(at, at + BLOCK_SIZE_BYTES)) === item.crc;
          if (good || !this.#stillAt(key.volumeId, key.chunkIndex, item.block, item.location)) continue;
          report.badBlocks++;
          if (unreadable) report.unreadableBlocks++;
          if (report.bad.length < scrubReportBadMax) {
            report.bad.push({ volumeId: key.volumeId, chunkIndex: key.chunkIndex, block: item.block, epoch: item.epoch, seq: item.seq, snapshotVersion: item.history });
          }
        }
        if (rate !== undefined) await this.#env.clock.sleep((bytes / rate) * 1000);
      }
    }
    report.durationMs = this.#env.clock.nowMs() - startMs;
    return report;
  }

  /** The block still has a version (head or history) at `location`. */
  #stillAt(volumeId: number, chunkIndex: number, block: number, location: number): boolean {
    if (this.#purged.has(volumeId)) return false;
    const table = this.#index.get(volumeId, chunkIndex);
    if (!table) return false;
    if (table.stateAt(block) === BlockState.DATA && table.location[block] === location) return true;
    for (let entry = table.firstHistory(block); entry >= 0; entry = table.hNext[entry]!) {
      if (table.entryKind(entry) === BlockState.DATA && table.hLocation[entry] === location) return true;
    }
    return false;
  }

  /** Waits for queued writes, syncs, writes a checkpoint (restart replays nothing) and closes the file. Idempotent. */
  close(): Promise<void> {
    if (this.#closePromise) return this.#closePromise;
    this.#closing = true;
    this.#compactionTimer?.cancel();
    this.#compactionTimer = undefined;
    this.#discardTimer?.cancel();
    this.#discardTimer = undefined;
    this.#closePromise = (async () => {
      await this.#whenIdle();
      // The background compactor queues nothing more once closing; its last copies are written by now or soon.
      await this.#compactor;
      await this.#whenIdle();
      try {
        if (!this.#broken) {
          await this.#checkpointing?.promise.catch(() => {});
          await this.#syncUpTo(this.#lastWrittenSequence);
          if (!this.#broken && (this.#sinceList.length > 0 || this.#logBytesSinceCheckpoint > 0 || this.#openSegment >= 0)) {
            await this.#startCheckpoint();
          }
          await this.#rootChain;
        }
      } finally {
        this.#closed = true;
        await this.#discardRun;
        await this.#file.close();
      }
    })();
    return this.#closePromise;
  }

  // -------------------------------------------------------------------------------------------
  // The writer: one batch at a time

  #pump(): void {
    if (this.#writerRunning) return;
    this.#writerRunning = true;
    void this.#runWriter();
  }

  async #runWriter(): Promise<void> {
    try {
      // Let every request read in this event-loop turn join the first batch: what all sockets
      // delivered, not only the callback that started the writer (docs/benchmarks.md).
      await new Promise<void>((resolve) => this.#env.clock.afterIo(resolve));
      for (;;) {
        if (this.#broken) break;
        const task = this.#tasks.shift();
        if (task) {
          await task();
          continue;
        }
        if (!(await this.#writeNext())) break;
      }
    } catch (error) {
      // The disk's own failures arrive here as ShaleErrors (DISK_FAILED); anything else is a bug.
      this.#setBroken(error instanceof ShaleError ? error : new ShaleError('INTERNAL', `store engine writer: ${error instanceof Error ? error.message : String(error)}`));
    } finally {
      this.#writerRunning = false;
    }
    if (this.#broken) this.#rejectQueued(this.#broken);
    // Work may have arrived while the last (empty) turn was settling (the background compactor's copies too).
    if (!this.#broken && (this.#tasks.length > 0 || !this.#queue_.isEmpty || !this.#compactionQueue.isEmpty)) {
      this.#pump();
      return;
    }
    for (const waiter of this.#idleWaiters.splice(0)) waiter();
    this.#maybeScheduleCompaction();
  }

  /** Runs `work` as the writer (between batches), resolving with its result. */
  #runTask<T>(work: () => Promise<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.#tasks.push(async () => {
        if (this.#broken) {
          reject(this.#broken);
          return;
        }
        try {
          resolve(await work());
        } catch (error) {
          reject(error);
        }
      });
      this.#pump();
    });
  }

  #whenIdle(): Promise<void> {
    if (!this.#writerRunning && this.#queue_.isEmpty && this.#tasks.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /** Forms and writes one batch. False when there is nothing (more) to write. */
  async #writeNext(): Promise<boolean> {
    const plan = this.#formBatch();
    if (plan === FORM_IDLE || plan === FORM_BLOCKED) return false;
    if (plan === FORM_NEED_ROOT) {
      await this.#writeRoot();
      return true;
    }
    if (plan === FORM_PINNED) {
      await new Promise<void>((resolve) => this.#pinWaiters.push(resolve));
      return true;
    }
    if (plan === FORM_NEED_SPACE) {
      if (!this.#outOfSpace && (await this.#makeSpace())) return true;
      this.#outOfSpace = true;
      const op = this.#queue_.shift();
      assert(op, 'need-space without a queued request');
      rejectOp(op, new ShaleError('NO_SPACE', `disk ${this.#file.path} is full: no free segment left for client writes`,
        { freeSegments: this.#freeCount, reserveSegments: this.#reserveSegments + this.#checkpointReserveSegments() }));
      return true;
    }
    await this.#writeBatch(plan);
    this.#afterBatch();
    return true;
  }

  /** Starts what a batch may have made due: a root (lease, queue) or a checkpoint. */
  #afterBatch(): void {
    if (this.#nextSequence > this.#leaseEnd - this.#sequenceLeaseBatches / 2) this.#requestRoot();
    this.#maybeStartCompactor();
    if (this.#checkpointing || this.#closing) return;
    const due = this.#logBytesSinceCheckpoint >= Math.max(this.#checkpointIntervalBytes, checkpointImageFactor * this.#lastImageBytes);
    // Segments emptied since the checkpoint come back only with the next one: do not let them pile up.
    const pressure = !this.#checkpointStarved && this.#waitingForCheckpoint() >= Math.max(2, Math.ceil(this.#segmentCount / 8));
    if (due || pressure) this.#backgroundCheckpoint();
  }

  #backgroundCheckpoint(): void {
    this.#startCheckpoint().catch((error: unknown) => {
      if (error instanceof ShaleError && error.code === 'NO_SPACE') {
        this.#checkpointStarved = true;
        this.#checkpointsStarved++;
      }
      else this.#setBroken(toDiskError(error, 'checkpoint'));
    });
  }

  /**
   * Takes requests (compaction copies first) into one batch, bounded by batchDataBlocksMax,
   * batchRecordsMax, BATCH_PAYLOAD_BYTES_MAX and the room left in the open segment; opens a new
   * segment when needed and allowed. A request too large for the room left is split over batches.
   */
  #formBatch(): FormResult {
    if (this.#nextSequence > this.#leaseEnd) return FORM_NEED_ROOT;
    const pieces: BatchPiece[] = [];
    let records = 0;
    let dataBlocks = 0;
    let payloadBytes = 0;
    let segmentHeader: Buffer | undefined;
    const compactionLimit = this.#compactionBatchLimit();
    let compactionBlocks = 0;
    while (records < batchRecordsMax) {
      const fromCompaction = !this.#compactionQueue.isEmpty && (compactionBlocks < compactionLimit || this.#queue_.isEmpty);
      const queue = fromCompaction ? this.#compactionQueue : this.#queue_;
      const op = queue.peek();
      if (op === undefined) break;
      let take = this.#openSegment < 0 ? 0 : this.#fit(op, records, dataBlocks, payloadBytes);
      if (fromCompaction && op.kind === RecordKind.DATA && !this.#queue_.isEmpty) take = Math.min(take, Math.max(1, compactionLimit - compactionBlocks));
      if (take === 0) {
        if (pieces.length > 0) break;
        const may = this.#mayOpenSegment(op.tier);
        if (may === 'need-root') return FORM_NEED_ROOT;
        if (may === 'pinned') return FORM_PINNED;
        if (may === 'no-space' && fromCompaction && !this.#compacting) {
          // The background compactor's copies found no room: it gives up this victim; clients
          // go on (and compact in the foreground if they need to).
          this.#dropCompactionQueue();
          continue;
        }
        if (may === 'no-space') return fromCompaction || this.#compacting ? FORM_BLOCKED : FORM_NEED_SPACE;
        segmentHeader = this.#openNewSegment();
        assert(this.#fit(op, 0, 0, 0) > 0, 'a request does not fit in an empty segment');
        continue;
      }
      let last = true;
      if (op.kind === RecordKind.DATA) {
        pieces.push({ op, firstBlock: op.placedBlocks, countBlocks: take, dataIndexBlocks: dataBlocks, last: false });
        op.placedBlocks += take;
        dataBlocks += take;
        if (fromCompaction) compactionBlocks += take;
        last = op.placedBlocks === op.countBlocks;
        pieces[pieces.length - 1]!.last = last;
      } else {
        pieces.push({ op, firstBlock: 0, countBlocks: op.countBlocks, dataIndexBlocks: 0, last: true });
        payloadBytes += op.payload?.length ?? 0;
        if (fromCompaction) compactionBlocks++;
      }
      records++;
      if (last) queue.shift();
    }
    if (pieces.length === 0) return FORM_IDLE;

    const sequence = this.#nextSequence++;
    const segment = this.#openSegment;
    const positionBlocks = this.#openPositionBlocks;
    const headerBlocks = batchHeaderBlocks(records, dataBlocks, payloadBytes);
    assert(positionBlocks + headerBlocks + dataBlocks <= this.#blocksPerSegment, 'batch overflows its segment');
    // From the I/O pool and back to it once written: a new zeroed buffer per batch is memory outside
    // V8's heap that its collector must track and free.
    const header = ioBuffers.take(headerBlocks * BLOCK_SIZE_BYTES).fill(0);
    const buffers: Buffer[] = segmentHeader ? [segmentHeader, header] : [header];
    let payloadOffset = 0;
    for (let r = 0; r < pieces.length; r++) {
      const piece = pieces[r]!;
      const op = piece.op;
      // A SNAPSHOTS record's version is the sequence of the batch that first writes it.
      if (op.kind === RecordKind.SNAPSHOTS && op.seq === 0) op.seq = sequence;
      writeRecordEntry(header, r, {
        kind: op.kind,
        volumeId: op.volumeId,
        chunkIndex: op.chunkIndex,
        offsetBlocks: op.offsetBlocks + piece.firstBlock,
        countBlocks: piece.countBlocks,
        epoch: op.epoch,
        seq: op.seq,
        snapSeq: op.snapSeq,
        dataIndexBlocks: piece.dataIndexBlocks,
        flags: op.flags,
        payload: op.payload,
      }, { recordCount: records, dataBlocks, payloadOffset });
      payloadOffset += op.payload?.length ?? 0;
      if (op.kind === RecordKind.DATA) {
        const checksums = op.checksums!;
        for (let b = 0; b < piece.countBlocks; b++) writeCrcEntry(header, records, piece.dataIndexBlocks + b, checksums[piece.firstBlock + b]!);
        const data = op.data!;
        // Data that is exactly the piece goes as it is: a subarray is a new typed array per write.
        buffers.push(piece.firstBlock === 0 && data.length === piece.countBlocks * BLOCK_SIZE_BYTES ? data
          : data.subarray(piece.firstBlock * BLOCK_SIZE_BYTES, (piece.firstBlock + piece.countBlocks) * BLOCK_SIZE_BYTES));
      }
    }
    sealBatchHeader(header, {
      segmentIndex: segment,
      headerBlocks,
      generation: this.#generation[segment]!,
      sequence,
      incarnationFirstSequence: this.#incarnationFirstSequence,
      durableSequence: this.#durableSequence,
      formatId: this.#formatId,
      positionBlocks,
      recordCount: records,
      dataBlocks,
      payloadBytes,
    });
    this.#openPositionBlocks += headerBlocks + dataBlocks;
    const segmentStart = this.#segmentOffsetBytes(segment);
    const offsetBytes = segmentHeader ? segmentStart : segmentStart + positionBlocks * BLOCK_SIZE_BYTES;
    const bytes = (headerBlocks + dataBlocks) * BLOCK_SIZE_BYTES + (segmentHeader?.length ?? 0);
    return { sequence, segment, positionBlocks, headerBlocks, dataBlocks, pieces, header, buffers, offsetBytes, bytes };
  }

  /** How much of `op` fits in the open segment next to what the batch holds: DATA blocks, or 1 for a record without data; 0 if nothing. */
  #fit(op: PendingOp, records: number, dataBlocks: number, payloadBytes: number): number {
    const remaining = this.#blocksPerSegment - this.#openPositionBlocks;
    if (op.kind !== RecordKind.DATA) {
      const payload = payloadBytes + (op.payload?.length ?? 0);
      if (payload > BATCH_PAYLOAD_BYTES_MAX) return 0;
      return batchHeaderBlocks(records + 1, dataBlocks, payload) + dataBlocks <= remaining ? 1 : 0;
    }
    let take = Math.min(op.countBlocks - op.placedBlocks, batchDataBlocksMax - dataBlocks, remaining - dataBlocks - 1);
    while (take > 0 && batchHeaderBlocks(records + 1, dataBlocks + take, payloadBytes) + dataBlocks + take > remaining) take--;
    return Math.max(0, take);
  }

  /**
   * Free segments kept for the next checkpoint image: checkpoints hold room for two images in all
   * (the durable one and the next), so before the first one twice the estimate is kept free.
   */
  #checkpointReserveSegments(): number {
    const estimate = this.#lastImageBytes + this.#imageGrowthBytes + 4096;
    const segments = Math.ceil((estimate * 1.25) / imageBytesPerSegment(this.#segmentSizeBytes));
    return Math.max(segments, 2 * segments - this.#checkpointSegmentCount);
  }

  #mayOpenSegment(tier: number): 'ok' | 'no-space' | 'need-root' | 'pinned' {
    const reserve = tier === Tier.CLIENT ? this.#reserveSegments : tier === Tier.META || tier === Tier.BACKGROUND ? Math.floor(this.#reserveSegments / 2) : 0;
    const keep = this.#checkpointReserveSegments() + reserve;
    if (this.#freeCount <= keep) return 'no-space';
    if (this.#pickQueued() >= 0) return 'ok';
    if (this.#queue.length > 0) return 'pinned';
    return 'need-root';
  }

  /** Index in the queue of a planned segment no read is using, or -1. */
  #pickQueued(): number {
    for (let i = 0; i < this.#queue.length; i++) {
      const segment = this.#queue[i]!.segment;
      assert(this.#segmentState[segment] === SegmentState.FREE && this.#queued[segment] === 1, 'a queued segment is not free');
      if (this.#readPins[segment] === 0 && this.#discard[segment] !== DISCARD_RUNNING) return i;
    }
    return -1;
  }

  /** Takes a planned segment out of the queue for `kind`, with the generation the durable root planned. */
  #takeQueued(kind: SegmentKindValue, firstSequence: number): RootEntry {
    const at = this.#pickQueued();
    assert(at >= 0, 'no planned segment to open');
    const entry = this.#queue.splice(at, 1)[0]!;
    const segment = entry.segment;
    assert(this.#liveDataBlocks[segment] === 0 && this.#liveMetaUnits[segment] === 0, 'a free segment holds live records');
    assert(entry.generation > this.#generation[segment]! && entry.generation <= this.#generationMax[segment]!, 'planned generation out of order');
    this.#queued[segment] = 0;
    this.#freeCount--;
    if (this.#discard[segment] === DISCARD_WAITING) {
      // About to be written over: giving it back first would only cost a call.
      this.#discard[segment] = 0;
      this.#discardWaiting--;
    }
    this.#segmentState[segment] = kind === SegmentKind.LOG ? SegmentState.OPEN : SegmentState.CHECKPOINT;
    this.#generation[segment] = entry.generation;
    this.#firstSequence[segment] = firstSequence;
    this.#damaged[segment] = 0;
    this.#compactorMisses[segment] = 0;
    // Refill at half, with a useful number of segments at once (each root costs a sync), or when nearly empty.
    if (this.#queue.length < this.#queueSegments / 2) {
      const unplanned = this.#unqueuedFree(Math.ceil(this.#queueSegments / 4));
      if (unplanned >= Math.ceil(this.#queueSegments / 4) || (unplanned > 0 && this.#queue.length < 4)) this.#requestRoot();
    }
    return entry;
  }

  /** Seals the open segment and opens a planned one. Returns its header (two copies). */
  #openNewSegment(): Buffer {
    this.#sealOpenSegment();
    const entry = this.#takeQueued(SegmentKind.LOG, this.#nextSequence);
    const segment = entry.segment;
    this.#openSegment = segment;
    this.#openPositionBlocks = SEGMENT_HEADER_BLOCKS;
    this.#since[segment] = 1;
    const since: RootEntry = { segment, startBlocks: SEGMENT_HEADER_BLOCKS, generation: entry.generation };
    this.#sinceList.push(since);
    this.#sinceNext?.push(since);
    const copy = encodeSegmentHeader({ segmentIndex: segment, kind: SegmentKind.LOG, generation: entry.generation, firstSequence: this.#nextSequence, formatId: this.#formatId });
    return Buffer.concat([copy, copy]);
  }

  #sealOpenSegment(): void {
    const segment = this.#openSegment;
    if (segment < 0) return;
    this.#openSegment = -1;
    this.#segmentState[segment] = SegmentState.SEALED;
    if (this.#liveDataBlocks[segment] === 0 && this.#liveMetaUnits[segment] === 0) this.#markPendingFree(segment);
  }

  async #writeBatch(batch: Batch): Promise<void> {
    try {
      // Into the page cache synchronously when the disk can: no thread-pool round trip per batch.
      if (this.#file.writevNow?.(batch.buffers, batch.offsetBytes) !== true) await this.#file.writev(batch.buffers, batch.offsetBytes);
    } catch (error) {
      const failure = toDiskError(error, `write of batch ${batch.sequence} to ${this.#file.path}`);
      for (const piece of batch.pieces) rejectOp(piece.op, failure);
      this.#setBroken(failure);
      throw failure;
    }
    // Only after a write that completed: a failed one may still be in the kernel's hands.
    ioBuffers.give(batch.header);
    assert(batch.sequence === this.#lastWrittenSequence + 1, 'batches written out of order');
    this.#lastWrittenSequence = batch.sequence;
    this.#batchesWritten++;
    this.#logBytesSinceCheckpoint += batch.bytes;
    const headerLocation = batch.segment * this.#blocksPerSegment + batch.positionBlocks;
    const dataLocation = headerLocation + batch.headerBlocks;
    for (const piece of batch.pieces) {
      const op = piece.op;
      const applied = this.#applyRecord(op.kind, op.volumeId, op.chunkIndex, op.offsetBlocks + piece.firstBlock, piece.countBlocks, op.epoch,
        op.seq, op.snapSeq, op.flags, op.payload, headerLocation, dataLocation + piece.dataIndexBlocks, op.checksums, piece.firstBlock);
      op.appliedBlocks += applied;
      op.skippedBlocks += piece.countBlocks - Math.min(applied, piece.countBlocks);
      if (op.tier !== Tier.COMPACTION && op.tier !== Tier.BACKGROUND) this.#clientRecordsWritten++;
      if (piece.last) resolveOp(op, { appliedBlocks: op.appliedBlocks, skippedBlocks: op.skippedBlocks });
    }
  }

  #setBroken(error: ShaleError): void {
    if (this.#broken) return;
    this.#broken = error;
    this.#compactionTimer?.cancel();
    this.#compactionTimer = undefined;
  }

  #rejectQueued(error: Error): void {
    for (const op of this.#queue_.drain()) rejectOp(op, error);
    for (const op of this.#compactionQueue.drain()) rejectOp(op, error);
    for (const task of this.#tasks.splice(0)) void task();
  }

  // -------------------------------------------------------------------------------------------
  // Durability

  #startSync(): { promise: Promise<void>; covers: number; index: number } {
    const covers = this.#lastWrittenSequence;
    const index = ++this.#syncsStarted;
    const promise = this.#file.sync().then(
      () => {
        this.#syncs++;
        if (covers > this.#durableSequence) this.#durableSequence = covers;
        this.#releasePendingFree();
      },
      (error: unknown) => {
        // After a failed fsync the kernel may have dropped the dirty pages: nothing is trusted any more.
        const failure = toDiskError(error, `sync of ${this.#file.path}`);
        this.#setBroken(failure);
        throw failure;
      },
    );
    const inFlight = { promise, covers, index };
    this.#syncInFlight = inFlight;
    promise.then(
      () => {
        if (this.#syncInFlight === inFlight) this.#syncInFlight = undefined;
      },
      () => {
        if (this.#syncInFlight === inFlight) this.#syncInFlight = undefined;
      },
    );
    return inFlight;
  }

  /** Resolves once every batch up to `sequence` (all written) is durable. One sync serves many callers. */
  async #syncUpTo(sequence: number): Promise<void> {
    assert(sequence <= this.#lastWrittenSequence, 'asked to sync a batch not yet written');
    while (this.#durableSequence < sequence) {
      if (this.#broken) throw this.#broken;
      const inFlight = this.#syncInFlight;
      if (inFlight) {
        await inFlight.promise;
        continue;
      }
      await this.#startSync().promise;
    }
  }

  /** Resolves after a sync that started after this call (covers every write completed before it, log or not). */
  async #forceSync(): Promise<void> {
    const after = this.#syncsStarted;
    for (;;) {
      if (this.#broken) throw this.#broken;
      const inFlight = this.#syncInFlight;
      if (inFlight && inFlight.index > after) {
        await inFlight.promise;
        return;
      }
      if (inFlight) {
        await inFlight.promise.catch(() => {});
        continue;
      }
      await this.#startSync().promise;
      return;
    }
  }

  #markPendingFree(segment: number): void {
    this.#segmentState[segment] = SegmentState.PENDING_FREE;
    this.#emptiedAtSequence[segment] = this.#lastWrittenSequence;
    this.#pendingFreeCount++;
    if (this.#since[segment]) this.#pendingSinceCount++;
    this.#outOfSpace = false;
    this.#releasePendingFree();
  }

  /** Frees the empty segments whose emptying is durable and that replay no longer needs. */
  #releasePendingFree(): void {
    if (this.#pendingFreeCount === 0) return;
    for (let s = 0; s < this.#segmentCount; s++) {
      if (this.#segmentState[s] === SegmentState.PENDING_FREE && this.#emptiedAtSequence[s]! <= this.#durableSequence && this.#since[s] === 0) {
        this.#segmentState[s] = SegmentState.FREE;
        this.#pendingFreeCount--;
        this.#freeCount++;
        this.#outOfSpace = false;
        this.#checkpointStarved = false;
        this.#discardLater(s);
      }
    }
  }

  // -------------------------------------------------------------------------------------------
  // Giving freed segments back to the file system

  /**
   * Queues a segment that just became free (and was ever written) to be given back. Never while
   * replaying: segment states are only known once replay is done (open then queues the free ones).
   */
  #discardLater(segment: number): void {
    if (!this.#discardEnabled || this.#replaying || this.#discard[segment] !== 0 || this.#generation[segment] === 0) return;
    this.#discard[segment] = DISCARD_WAITING;
    this.#discardWaiting++;
    this.#scheduleDiscard();
  }

  #scheduleDiscard(): void {
    if (this.#discardTimer !== undefined || this.#discardRun !== undefined || this.#discardWaiting === 0 || this.#closing || !this.#discardEnabled) return;
    if (this.#discardDelayMs === 0) {
      this.#discardRun = Promise.resolve().then(() => this.#discardNow());
      return;
    }
    this.#discardTimer = this.#env.clock.after(this.#discardDelayMs, () => {
      this.#discardTimer = undefined;
      this.#discardRun = this.#discardNow();
    }).unref();
  }

  /**
   * One call giving back every waiting segment that is still free and that no read pins (a read
   * that found its block before the block was overwritten may still be reading it), adjacent
   * segments as one range. They are not opened until the call returns.
   */
  async #discardNow(): Promise<void> {
    const taken: number[] = [];
    const ranges: { offsetBytes: number; lengthBytes: number }[] = [];
    if (!this.#closing && !this.#broken && this.#discardEnabled) {
      for (let s = 0; s < this.#segmentCount; s++) {
        if (this.#discard[s] !== DISCARD_WAITING || this.#readPins[s] !== 0) continue;
        this.#discard[s] = DISCARD_RUNNING;
        this.#discardWaiting--;
        assert(this.#segmentState[s] === SegmentState.FREE, 'a segment waiting to be given back is not free');
        const offsetBytes = this.#segmentAreaOffsetBytes + s * this.#segmentSizeBytes;
        const last = ranges[ranges.length - 1];
        if (last !== undefined && taken[taken.length - 1] === s - 1) last.lengthBytes += this.#segmentSizeBytes;
        else ranges.push({ offsetBytes, lengthBytes: this.#segmentSizeBytes });
        taken.push(s);
      }
    }
    try {
      if (ranges.length > 0) {
        await this.#file.punchHoles!(ranges);
        this.#discardCalls++;
        this.#discardedSegments += taken.length;
      }
    } catch (error) {
      // The disk cannot (or no longer can): stop asking; the segments are free all the same.
      this.#discardEnabled = false;
      this.#discardFailure = error instanceof Error ? error.message : String(error);
      for (let s = 0; s < this.#segmentCount; s++) {
        if (this.#discard[s] === DISCARD_WAITING) this.#discard[s] = 0;
      }
      this.#discardWaiting = 0;
    } finally {
      for (const s of taken) this.#discard[s] = 0;
      this.#discardRun = undefined;
      // Segments left waiting are pinned by reads: the last read to let go asks again.
      if (taken.length > 0) {
        if (this.#pinWaiters.length > 0) for (const waiter of this.#pinWaiters.splice(0)) waiter();
        this.#scheduleDiscard();
      }
    }
  }

  /** A read let go of its segments: the writer and the discarder may take them now. */
  #afterUnpin(): void {
    if (this.#pinWaiters.length > 0) for (const waiter of this.#pinWaiters.splice(0)) waiter();
    if (this.#discardWaiting > 0) this.#scheduleDiscard();
  }

  #discardStats(): DiscardStats {
    return {
      enabled: this.#discardEnabled,
      discardedSegments: this.#discardedSegments,
      calls: this.#discardCalls,
      waitingSegments: this.#discardWaiting,
      ...(this.#discardFailure === undefined ? {} : { failure: this.#discardFailure }),
    };
  }

  // -------------------------------------------------------------------------------------------
  // Roots and checkpoints

  /** Writes a root (serialised with other root writes); `commit` makes a written checkpoint image the durable one. */
  #writeRoot(commit?: { checkpoint: CheckpointRef }): Promise<void> {
    const run = this.#rootChain.then(() => this.#doWriteRoot(commit));
    this.#rootChain = run.catch(() => {});
    return run;
  }

  /** A root write in the background to extend the queue or the sequence lease. */
  #requestRoot(): void {
    if (this.#rootRefillPending || this.#broken || this.#replaying) return;
    this.#rootRefillPending = true;
    this.#writeRoot()
      .catch((error: unknown) => this.#setBroken(toDiskError(error, 'root write')))
      .finally(() => {
        this.#rootRefillPending = false;
      });
  }

  async #doWriteRoot(commit: { checkpoint: CheckpointRef } | undefined): Promise<void> {
    if (this.#broken) throw this.#broken;
    const checkpoint = commit ? commit.checkpoint : this.#checkpoint;
    const since = commit ? this.#sinceNext! : this.#sinceList;
    assert(since !== undefined, 'checkpoint commit without its segment list');
    // Plan more free segments, lowest first (a young disk then only ever touches its start).
    const additions: RootEntry[] = [];
    const checkpointSegments = new Set(checkpoint.segments.map((entry) => entry.segment));
    for (let s = 0; s < this.#segmentCount && this.#queue.length + additions.length < this.#queueSegments; s++) {
      if (this.#segmentState[s] !== SegmentState.FREE || this.#queued[s] !== 0 || checkpointSegments.has(s)) continue;
      const generation = this.#generationMax[s]! + 1;
      this.#generationMax[s] = generation;
      this.#queued[s] = 2;
      additions.push({ segment: s, startBlocks: SEGMENT_HEADER_BLOCKS, generation });
    }
    const leaseEnd = Math.max(this.#leaseEnd, this.#nextSequence + this.#sequenceLeaseBatches);
    const root: Root = {
      rootSequence: this.#rootSequence + 1,
      formatId: this.#formatId,
      checkpointSequence: checkpoint.sequence,
      sequenceLeaseEnd: leaseEnd,
      imageBytes: checkpoint.imageBytes,
      imageCrc: checkpoint.imageCrc,
      checkpointSegments: checkpoint.segments,
      logSegments: [...since, ...(commit ? [] : this.#imageSegmentsPending), ...this.#queue, ...additions],
    };
    const slot = root.rootSequence % ROOT_SLOTS;
    const buffer = encodeRoot(root, slot);
    assert(buffer.length <= this.#superblock.rootSlotSizeBytes, 'root does not fit its slot');
    try {
      await this.#file.writev([buffer], this.#superblock.rootSlotOffsetBytes + slot * this.#superblock.rootSlotSizeBytes);
      await this.#forceSync();
    } catch (error) {
      const failure = toDiskError(error, 'root write');
      this.#setBroken(failure);
      throw failure;
    }
    // Durable from here on.
    this.#rootSequence = root.rootSequence;
    this.#leaseEnd = leaseEnd;
    this.#rootsWritten++;
    for (const entry of additions) {
      this.#queued[entry.segment] = 1;
      this.#queue.push(entry);
    }
    if (commit) {
      for (const entry of this.#checkpoint.segments) {
        assert(this.#segmentState[entry.segment] === SegmentState.CHECKPOINT, 'old checkpoint segment changed state');
        this.#segmentState[entry.segment] = SegmentState.FREE;
        this.#checkpointSegmentCount--;
        this.#freeCount++;
        this.#discardLater(entry.segment);
      }
      this.#checkpoint = commit.checkpoint;
      this.#imageSegmentsPending = [];
      for (const entry of this.#sinceList) this.#since[entry.segment] = 0;
      for (const entry of since) this.#since[entry.segment] = 1;
      this.#sinceList = since;
      this.#sinceNext = undefined;
      this.#outOfSpace = false;
      this.#countPendingSince();
      this.#releasePendingFree();
    }
  }

  /** Starts a checkpoint (one at a time); its snapshot is taken by the writer between batches. */
  #startCheckpoint(): Promise<void> {
    return this.#checkpointState_().promise;
  }

  #checkpointState_(): CheckpointRun {
    if (this.#checkpointing) return this.#checkpointing;
    let resolveSnapshot!: (snapshot: CheckpointSnapshot) => void;
    let rejectSnapshot!: (error: unknown) => void;
    const snapshot = new Promise<CheckpointSnapshot>((resolve, reject) => {
      resolveSnapshot = resolve;
      rejectSnapshot = reject;
    });
    const run: CheckpointRun = {
      promise: Promise.resolve(),
      snapshotTaken: false,
      started: false,
      // Whoever is the writer first — the queued task, or a writer that needs the checkpoint now — takes it.
      take: async () => {
        if (run.started) return;
        run.started = true;
        try {
          if (this.#broken) throw this.#broken;
          resolveSnapshot(await this.#takeCheckpointSnapshot());
        } catch (error) {
          rejectSnapshot(error);
        }
      },
    };
    run.promise = snapshot.then(async (taken) => {
      run.snapshotTaken = true;
      await this.#finishCheckpoint(taken);
    }).finally(() => {
      if (this.#checkpointing === run) this.#checkpointing = undefined;
    });
    this.#checkpointing = run;
    this.#tasks.push(run.take);
    this.#pump();
    return run;
  }

  /** For code running as the writer: a checkpoint now (taking its snapshot here if it is not taken yet). */
  async #checkpointAsWriter(): Promise<void> {
    const run = this.#checkpointState_();
    await run.take();
    await run.promise;
  }

  /** Empty segments that only a newer checkpoint can free. */
  #waitingForCheckpoint(): number {
    return this.#pendingSinceCount;
  }

  #countPendingSince(): void {
    this.#pendingSinceCount = 0;
    for (let s = 0; s < this.#segmentCount; s++) if (this.#segmentState[s] === SegmentState.PENDING_FREE && this.#since[s]) this.#pendingSinceCount++;
  }

  /** Runs as the writer: serialises the state and takes the segments the image goes to. */
  async #takeCheckpointSnapshot(): Promise<CheckpointSnapshot> {
    // At close nothing follows: seal the open segment so the next open replays nothing.
    if (this.#closing) this.#sealOpenSegment();
    const sequence = this.#lastWrittenSequence;
    // Sized from the last image and what was added since (an upper bound): the image is built in one
    // buffer of about its size, not by doubling — a large transient allocation the allocator keeps.
    const image = encodeImage(this.#checkpointState(sequence), (this.#lastImageBytes + this.#imageGrowthBytes) * 1.05 + 64 * 1024);
    const perSegment = imageBytesPerSegment(this.#segmentSizeBytes);
    const count = Math.max(1, Math.ceil(image.length / perSegment));
    // Planned segments being given back to the file system are usable again in a moment.
    if (this.#usableQueued() < count && this.#discardRun !== undefined) await this.#discardRun;
    for (let attempt = 0; attempt < 2 && this.#usableQueued() < count; attempt++) await this.#writeRoot();
    if (this.#usableQueued() < count) {
      throw new ShaleError('NO_SPACE', `disk ${this.#file.path}: no room for a checkpoint image of ${image.length} bytes (${count} segments)`);
    }
    const segments: RootEntry[] = [];
    for (let i = 0; i < count; i++) {
      const entry = this.#takeQueued(SegmentKind.CHECKPOINT, sequence);
      this.#checkpointSegmentCount++;
      segments.push({ segment: entry.segment, startBlocks: 0, generation: entry.generation });
    }
    this.#imageSegmentsPending = segments.map((entry) => ({ ...entry, startBlocks: SEGMENT_HEADER_BLOCKS }));
    this.#sinceNext = this.#openSegment >= 0
      ? [{ segment: this.#openSegment, startBlocks: this.#openPositionBlocks, generation: this.#generation[this.#openSegment]! }]
      : [];
    const logBytes = this.#logBytesSinceCheckpoint;
    this.#lastImageBytes = image.length;
    this.#imageGrowthBytes = 0;
    return { sequence, image, segments, logBytes };
  }

  /** Free segments no root has planned yet (counting stops at `enough`). */
  #unqueuedFree(enough: number): number {
    if (this.#freeCount <= this.#queue.length) return 0;
    let count = 0;
    for (let s = 0; s < this.#segmentCount && count < enough; s++) if (this.#segmentState[s] === SegmentState.FREE && this.#queued[s] === 0) count++;
    return count;
  }

  #usableQueued(): number {
    let usable = 0;
    for (const entry of this.#queue) if (this.#readPins[entry.segment] === 0 && this.#discard[entry.segment] !== DISCARD_RUNNING) usable++;
    return usable;
  }

  /** Writes the image, one sync covers it and the log up to its sequence, then the root commits it. */
  async #finishCheckpoint(snapshot: CheckpointSnapshot): Promise<void> {
    const perSegment = imageBytesPerSegment(this.#segmentSizeBytes);
    try {
      await Promise.all(snapshot.segments.map((entry, i) => {
        const header = encodeSegmentHeader({
          segmentIndex: entry.segment, kind: SegmentKind.CHECKPOINT, generation: entry.generation, firstSequence: snapshot.sequence, formatId: this.#formatId,
        });
        const piece = snapshot.image.subarray(i * perSegment, (i + 1) * perSegment);
        return this.#file.writev([header, header, piece], this.#segmentOffsetBytes(entry.segment));
      }));
      await this.#forceSync();
    } catch (error) {
      const failure = toDiskError(error, 'checkpoint write');
      this.#setBroken(failure);
      throw failure;
    }
    assert(this.#durableSequence >= snapshot.sequence, 'checkpoint committed before its log is durable');
    await this.#writeRoot({
      checkpoint: { sequence: snapshot.sequence, imageBytes: snapshot.image.length, imageCrc: crc32c(snapshot.image), segments: snapshot.segments },
    });
    this.#checkpointsWritten++;
    this.#logBytesSinceCheckpoint = Math.max(0, this.#logBytesSinceCheckpoint - snapshot.logBytes);
  }

  #checkpointState(sequence: number): CheckpointState {
    const volumes = new Map<number, ImageVolume>();
    const volume = (volumeId: number): ImageVolume => {
      let entry = volumes.get(volumeId);
      if (!entry) {
        entry = { volumeId };
        volumes.set(volumeId, entry);
      }
      return entry;
    };
    for (const [volumeId, fence] of this.#fences) volume(volumeId).fence = { ...fence };
    for (const [volumeId, location] of this.#purged) if (location >= 0) volume(volumeId).purgeLocation = location;
    for (const [volumeId, set] of this.#snapshots) {
      if (set.location >= 0) volume(volumeId).snapshots = { ids: set.ids, knownSeq: set.knownSeq, keepTombstones: set.keepTombstones, version: set.version, location: set.location };
    }
    const kv = new Map<number, Map<string, ImageKvEntry>>();
    for (const [shardId, shard] of this.#kv) kv.set(shardId, shard.entries);
    return {
      checkpointSequence: sequence,
      segments: { generation: this.#generation, generationMax: this.#generationMax, firstSequence: this.#firstSequence, damaged: this.#damaged },
      volumes: [...volumes.values()],
      index: this.#index,
      kv,
    };
  }

  // -------------------------------------------------------------------------------------------
  // Applying records (runtime and replay alike): the version rule, snapshots and space accounting

  /**
   * Applies one record. DATA: `dataLocation` is the location of its first data block. Others:
   * `headerLocation`. Returns the blocks (or 1 for a key-value record) whose head took it.
   */
  #applyRecord(
    kind: RecordKindValue, volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, epoch: number, seq: number,
    snapSeq: number, flags: number, payload: Buffer | undefined, headerLocation: number, dataLocation: number,
    checksums: Uint32Array | undefined, checksumIndex: number,
  ): number {
    switch (kind) {
      case RecordKind.DATA:
        return this.#applyBlocks(BlockState.DATA, volumeId, chunkIndex, offsetBlocks, countBlocks, epoch, seq, snapSeq, dataLocation, checksums!, checksumIndex);
      case RecordKind.ZERO:
        return this.#applyBlocks(BlockState.ZERO, volumeId, chunkIndex, offsetBlocks, countBlocks, epoch, seq, snapSeq, headerLocation, undefined, 0);
      case RecordKind.FENCE:
        this.#applyFence(volumeId, epoch, headerLocation);
        return 0;
      case RecordKind.PURGE:
        this.#applyPurge(volumeId, headerLocation);
        return 0;
      case RecordKind.SNAPSHOTS:
        this.#applySnapshots(volumeId, decodeSnapshotIds(payload!), snapSeq, (flags & SnapshotFlags.KEEP_TOMBSTONES) !== 0, seq, headerLocation);
        return 0;
      case RecordKind.DROP:
        this.#applyDrop(volumeId, chunkIndex, offsetBlocks, countBlocks, epoch, seq);
        return 0;
      case RecordKind.KV_PUT:
      case RecordKind.KV_DELETE: {
        const { key, value } = decodeKvPayload(payload!);
        return this.#applyKv(volumeId, key.toString('latin1'), kind === RecordKind.KV_PUT ? Buffer.from(value) : undefined, epoch, seq, headerLocation) ? 1 : 0;
      }
    }
  }

  /** a is later in the log than b (both locations of valid records). */
  #isLater(a: number, b: number): boolean {
    const bps = this.#blocksPerSegment;
    const segmentA = Math.floor(a / bps);
    const segmentB = Math.floor(b / bps);
    if (segmentA !== segmentB) return this.#firstSequence[segmentA]! > this.#firstSequence[segmentB]!;
    return a > b;
  }

  #addLive(location: number, isData: boolean, units = 1): void {
    const segment = Math.floor(location / this.#blocksPerSegment);
    if (isData) {
      this.#liveDataBlocks[segment]!++;
      this.#liveDataTotal++;
    } else {
      this.#liveMetaUnits[segment]! += units;
    }
  }

  #dropLive(location: number, isData: boolean, units = 1): void {
    const segment = Math.floor(location / this.#blocksPerSegment);
    if (isData) {
      // Dead data: no read will ask for it again, so its cache slot can hold something else now.
      this.#cache?.forget(location);
      this.#liveDataBlocks[segment]!--;
      this.#liveDataTotal--;
    } else {
      this.#liveMetaUnits[segment]! -= units;
    }
    assert(this.#liveDataBlocks[segment]! >= 0 && this.#liveMetaUnits[segment]! >= 0, 'segment live count went negative');
    this.#outOfSpace = false;
    if (!this.#replaying && this.#segmentState[segment] === SegmentState.SEALED &&
      this.#liveDataBlocks[segment] === 0 && this.#liveMetaUnits[segment] === 0) {
      this.#markPendingFree(segment);
    }
  }

  /**
   * Some snapshot that may be live needs a version stamped `low` whose next newer version is
   * stamped `high`: a live id s with low < s ≤ high, or any s in that range above the snap
   * sequence the engine knows the list to be complete up to.
   */
  #snapshotNeeds(set: SnapshotSet | undefined, low: number, high: number): boolean {
    if (high <= low) return false;
    if (high > Math.max(low, set?.knownSeq ?? 0)) return true;
    if (!set) return false;
    const at = upperBound(set.ids, low);
    return at < set.ids.length && set.ids[at]! <= high;
  }

  /** Drops the block's history entries no snapshot needs (newest first; the head shadows them). */
  #pruneHistory(table: ObjectTable, block: number, set: SnapshotSet | undefined): void {
    let shadow = table.stampAt(block);
    let previous = -1;
    let entry = table.firstHistory(block);
    while (entry >= 0) {
      const next = table.hNext[entry]!;
      const stamp = table.entryStamp(entry);
      if (this.#snapshotNeeds(set, stamp, shadow)) {
        previous = entry;
      } else {
        this.#dropLive(table.hLocation[entry]!, table.entryKind(entry) === BlockState.DATA);
        table.removeHistory(block, entry, previous);
      }
      if (stamp < shadow) shadow = stamp;
      entry = next;
    }
  }

  /**
   * Applies a DATA or ZERO record to blocks offsetBlocks..+countBlocks. `location`: DATA — the
   * location of the first data block (block i is at location + i); ZERO — the batch header's
   * location. Returns how many blocks' heads took the version.
   */
  #applyBlocks(
    state: number, volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number,
    epoch: number, seq: number, stamp: number, location: number, checksums: Uint32Array | undefined, checksumIndex: number,
  ): number {
    if (this.#purged.has(volumeId)) return 0;
    const isData = state === BlockState.DATA;
    const table = this.#index.getOrCreate(volumeId, chunkIndex, offsetBlocks + countBlocks);
    if (table.presentBlocks === 0 && table.historyCount === 0) this.#imageGrowthBytes += IMAGE_BYTES_PER_OBJECT;
    const set = this.#snapshots.get(volumeId);
    let applied = 0;
    for (let i = 0; i < countBlocks; i++) {
      const block = offsetBlocks + i;
      const newLocation = isData ? location + i : location;
      const crc = isData ? checksums![checksumIndex + i]! : ZERO_BLOCK_CRC;
      const headState = table.stateAt(block);
      if (headState === BlockState.ABSENT) {
        table.setHead(block, state, epoch, seq, stamp, newLocation, crc);
        this.#addLive(newLocation, isData);
        this.#imageGrowthBytes += IMAGE_BYTES_PER_BLOCK;
        applied++;
        continue;
      }
      const headLocation = table.location[block]!;
      const order = compareVersions(epoch, seq, table.epochAt(block), table.seqAt(block));
      if (order > 0) {
        // A new head; the old one becomes history if a snapshot needs it.
        const oldEpoch = table.epochAt(block);
        const oldSeq = table.seqAt(block);
        const oldStamp = table.stampAt(block);
        const oldCrc = table.crc[block]!;
        table.setHead(block, state, epoch, seq, stamp, newLocation, crc);
        this.#addLive(newLocation, isData);
        if (this.#snapshotNeeds(set, oldStamp, stamp)) {
          table.insertHistory(block, headState, oldEpoch, oldSeq, oldStamp, headLocation, oldCrc);
          this.#imageGrowthBytes += IMAGE_BYTES_PER_HISTORY;
          this.#pruneHistory(table, block, set);
        } else {
          this.#dropLive(headLocation, headState === BlockState.DATA);
          // What the old head shadowed, the new head shadows no less: kept versions stay needed or not.
          if (table.hasHistory(block)) this.#pruneHistory(table, block, set);
        }
        applied++;
      } else if (order === 0) {
        // The same write again: the copy later in the log is the live one (compaction, retries).
        if (headState === state && this.#isLater(newLocation, headLocation)) {
          this.#addLive(newLocation, isData);
          table.location[block] = newLocation;
          table.crc[block] = crc;
          this.#dropLive(headLocation, isData);
        }
      } else {
        // Older than the head: a copy of a kept version, or a version a snapshot may need.
        let entry = table.firstHistory(block);
        let order2 = 1;
        while (entry >= 0) {
          order2 = compareVersions(table.entryEpoch(entry), table.entrySeq(entry), epoch, seq);
          if (order2 <= 0) break;
          entry = table.hNext[entry]!;
        }
        if (entry >= 0 && order2 === 0) {
          const entryLocation = table.hLocation[entry]!;
          if (table.entryKind(entry) === state && this.#isLater(newLocation, entryLocation)) {
            this.#addLive(newLocation, isData);
            table.hLocation[entry] = newLocation;
            table.hCrc[entry] = crc;
            this.#dropLive(entryLocation, isData);
          }
          continue;
        }
        table.insertHistory(block, state, epoch, seq, stamp, newLocation, crc);
        this.#addLive(newLocation, isData);
        this.#imageGrowthBytes += IMAGE_BYTES_PER_HISTORY;
        this.#pruneHistory(table, block, set);
      }
    }
    return applied;
  }

  #applyFence(volumeId: number, epoch: number, location: number): void {
    if (this.#purged.has(volumeId)) return;
    const current = this.#fences.get(volumeId);
    if (current) {
      if (epoch < current.epoch || (epoch === current.epoch && !this.#isLater(location, current.location))) return;
      this.#dropLive(current.location, false);
    }
    this.#fences.set(volumeId, { epoch, location });
    this.#addLive(location, false);
    if (epoch > (this.#ownerEpochs.get(volumeId) ?? 0)) this.#ownerEpochs.set(volumeId, epoch);
  }

  #applyPurge(volumeId: number, location: number): void {
    const current = this.#purged.get(volumeId);
    if (current !== undefined && current >= 0) {
      if (!this.#isLater(location, current)) return;
      this.#dropLive(current, false);
      this.#purged.set(volumeId, location);
      this.#addLive(location, false);
      return;
    }
    this.#purged.set(volumeId, location);
    this.#addLive(location, false);
    for (const table of this.#index.deleteVolume(volumeId)) {
      for (let block = 0; block < table.highestBlocks; block++) {
        const state = table.stateAt(block);
        if (state !== BlockState.ABSENT) this.#dropLive(table.location[block]!, state === BlockState.DATA);
        for (let entry = table.firstHistory(block); entry >= 0; entry = table.hNext[entry]!) {
          this.#dropLive(table.hLocation[entry]!, table.entryKind(entry) === BlockState.DATA);
        }
      }
    }
    const fence = this.#fences.get(volumeId);
    if (fence) {
      this.#fences.delete(volumeId);
      this.#dropLive(fence.location, false);
    }
    this.#ownerEpochs.delete(volumeId);
    const set = this.#snapshots.get(volumeId);
    if (set) {
      this.#snapshots.delete(volumeId);
      if (set.location >= 0) this.#dropLive(set.location, false);
    }
    const shard = this.#kv.get(volumeId);
    if (shard) {
      this.#kv.delete(volumeId);
      for (const entry of shard.entries.values()) this.#dropLive(entry.location, false, kvUnits(entry));
    }
  }

  #applySnapshots(volumeId: number, ids: number[], knownSeq: number, keepTombstones: boolean, version: number, location: number): void {
    if (this.#purged.has(volumeId)) return;
    const current = this.#snapshots.get(volumeId);
    if (current) {
      if (version < current.version || (version === current.version && !this.#isLater(location, current.location))) return;
      this.#dropLive(current.location, false);
    }
    const set: SnapshotSet = { ids, knownSeq, keepTombstones, version, location };
    this.#snapshots.set(volumeId, set);
    this.#addLive(location, false);
    if (current && version === current.version) return; // a copy: same list
    // Trim what only deleted snapshots needed.
    for (const table of [...this.#index.objectsOf(volumeId)]) {
      if (table.historyCount === 0) continue;
      for (let block = 0; block < table.highestBlocks; block++) if (table.hasHistory(block)) this.#pruneHistory(table, block, set);
    }
  }

  /** A tombstone head nothing older shadows and no known live snapshot reads may go. */
  #tombstoneDroppable(table: ObjectTable, block: number): boolean {
    if (table.stateAt(block) !== BlockState.ZERO || table.hasHistory(block)) return false;
    const set = this.#snapshots.get(table.volumeId);
    if (!set) return true;
    if (set.keepTombstones) return false;
    const at = upperBound(set.ids, table.stampAt(block));
    return at === set.ids.length;
  }

  #applyDrop(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, epoch: number, seq: number): void {
    if (this.#purged.has(volumeId)) return;
    const table = this.#index.get(volumeId, chunkIndex);
    if (!table) return;
    for (let block = offsetBlocks; block < offsetBlocks + countBlocks; block++) {
      if (table.stateAt(block) !== BlockState.ZERO || table.epochAt(block) !== epoch || table.seqAt(block) !== seq) continue;
      if (!this.#tombstoneDroppable(table, block)) continue;
      this.#dropLive(table.location[block]!, false);
      table.clearHead(block);
      this.#droppedTombstoneBlocks++;
    }
    if (table.presentBlocks === 0 && table.historyCount === 0) this.#index.delete(volumeId, chunkIndex);
  }

  #applyKv(shardId: number, key: string, value: Buffer | undefined, epoch: number, seq: number, location: number): boolean {
    if (this.#purged.has(shardId)) return false;
    let shard = this.#kv.get(shardId);
    if (!shard) {
      shard = { entries: new Map(), sorted: [], liveCount: 0 };
      this.#kv.set(shardId, shard);
    }
    const current = shard.entries.get(key);
    const next: ImageKvEntry = { key, value, epoch, seq, location };
    const units = kvUnitsOf(key.length, value?.length ?? 0);
    if (!current) {
      shard.entries.set(key, next);
      shard.sorted.splice(lowerBoundString(shard.sorted, key), 0, key);
      if (value) shard.liveCount++;
      this.#addLive(location, false, units);
      this.#imageGrowthBytes += 32 + key.length + (value?.length ?? 0);
      return true;
    }
    const order = compareVersions(epoch, seq, current.epoch, current.seq);
    if (order < 0) return false;
    if (order === 0) {
      if (this.#isLater(location, current.location) && (current.value === undefined) === (value === undefined)) {
        this.#addLive(location, false, units);
        this.#dropLive(current.location, false, kvUnits(current));
        current.location = location;
      }
      return false;
    }
    this.#addLive(location, false, units);
    this.#dropLive(current.location, false, kvUnits(current));
    if (current.value && !value) shard.liveCount--;
    if (!current.value && value) shard.liveCount++;
    shard.entries.set(key, next);
    this.#imageGrowthBytes += 32 + key.length + (value?.length ?? 0);
    return true;
  }

  /** How many of the batch's bad data blocks the index points at (head or snapshot version). */
  #liveBadBlocks(batch: DecodedBatch, segment: number, badBlocks: readonly number[]): number {
    const dataLocation = segment * this.#blocksPerSegment + batch.positionBlocks + batch.headerBlocks;
    let live = 0;
    for (const bad of badBlocks) {
      for (const record of batch.records) {
        if (record.kind !== RecordKind.DATA || bad < record.dataIndexBlocks || bad >= record.dataIndexBlocks + record.countBlocks) continue;
        if (this.#stillAt(record.volumeId, record.chunkIndex, record.offsetBlocks + (bad - record.dataIndexBlocks), dataLocation + bad)) live++;
      }
    }
    return live;
  }

  #applyDecodedBatch(batch: DecodedBatch, segment: number): void {
    const headerLocation = segment * this.#blocksPerSegment + batch.positionBlocks;
    const dataLocation = headerLocation + batch.headerBlocks;
    for (const record of batch.records) {
      this.#applyRecord(record.kind, record.volumeId, record.chunkIndex, record.offsetBlocks, record.countBlocks, record.epoch, record.seq,
        record.snapSeq, record.flags ?? 0, record.payload, headerLocation, dataLocation + record.dataIndexBlocks, batch.checksums, record.dataIndexBlocks);
    }
  }

  // -------------------------------------------------------------------------------------------
  // Open: root, checkpoint image, replay

  async #load(): Promise<void> {
    const startMs = this.#env.clock.nowMs();
    const { root, fallback } = await this.#readRoot();
    this.#replaying = true;
    let imageBytesRead = 0;
    if (root.imageBytes > 0) {
      const image = await this.#readImage(root);
      imageBytesRead = image.length;
      let state: CheckpointState;
      try {
        state = decodeImage(image, this.#segmentCount, this.#blocksPerSegment);
      } catch (error) {
        if (!(error instanceof ImageError)) throw error;
        throw new ShaleError('CHECKSUM', `${this.#file.path}: checkpoint image is malformed (${error.message}); the disk's metadata needs repair`, { metadata: true });
      }
      if (state.checkpointSequence !== root.checkpointSequence) {
        throw new ShaleError('CHECKSUM', `${this.#file.path}: checkpoint image is for sequence ${state.checkpointSequence}, its root says ${root.checkpointSequence}`, { metadata: true });
      }
      this.#adoptImage(state);
    }
    this.#rootSequence = root.rootSequence;
    this.#leaseEnd = root.sequenceLeaseEnd;
    this.#checkpoint = { sequence: root.checkpointSequence, imageBytes: root.imageBytes, imageCrc: root.imageCrc, segments: root.checkpointSegments };
    this.#lastImageBytes = root.imageBytes;
    this.#recountLive();
    const report = await this.#replay(root, fallback);
    report.imageBytes = imageBytesRead;
    this.#replaying = false;

    // Segment states from what is now known.
    const checkpointSegments = new Set(root.checkpointSegments.map((entry) => entry.segment));
    for (let s = 0; s < this.#segmentCount; s++) {
      const live = this.#liveDataBlocks[s]! > 0 || this.#liveMetaUnits[s]! > 0;
      if (checkpointSegments.has(s)) {
        assert(!live, 'live records in a checkpoint segment');
        this.#segmentState[s] = SegmentState.CHECKPOINT;
        this.#checkpointSegmentCount++;
      } else if (live) {
        assert(this.#generation[s]! > 0, 'live records in a segment that was never written');
        this.#segmentState[s] = SegmentState.SEALED;
      } else if (this.#since[s]) {
        this.#segmentState[s] = SegmentState.PENDING_FREE;
        this.#emptiedAtSequence[s] = 0;
        this.#pendingFreeCount++;
      } else {
        this.#segmentState[s] = SegmentState.FREE;
        this.#freeCount++;
      }
    }
    this.#countPendingSince();
    // Free segments the last run wrote and may not have given back (it gave back what it could).
    for (let s = 0; s < this.#segmentCount; s++) if (this.#segmentState[s] === SegmentState.FREE) this.#discardLater(s);
    this.#nextSequence = report.nextSequence;
    this.#incarnationFirstSequence = this.#nextSequence;
    this.#lastWrittenSequence = this.#nextSequence - 1;
    this.#durableSequence = this.#lastWrittenSequence;
    // What replay read is now the truth: make it durable, then a new root plans fresh segments
    // (the old plan's generations count as used) and leases this instance's sequences.
    await this.#file.sync();
    await this.#doWriteRoot(undefined);
    report.durationMs = this.#env.clock.nowMs() - startMs;
    this.#replayReport = report;
    if (this.#logBytesSinceCheckpoint >= this.#checkpointIntervalBytes / 2 || this.#sinceList.length >= Math.max(2, Math.ceil(this.#segmentCount / 8))) {
      this.#backgroundCheckpoint();
    }
  }

  /** The newest valid root; `fallback` if the other slot holds something that is not a valid root (damaged or torn) rather than nothing. */
  async #readRoot(): Promise<{ root: Root; fallback: boolean }> {
    const slotBytes = this.#superblock.rootSlotSizeBytes;
    let best: Root | undefined;
    let invalid = 0;
    for (let slot = 0; slot < ROOT_SLOTS; slot++) {
      const offset = this.#superblock.rootSlotOffsetBytes + slot * slotBytes;
      const first = Buffer.alloc(BLOCK_SIZE_BYTES);
      await this.#file.read(first, offset);
      const length = rootLength(first);
      const root = length === undefined || length > slotBytes ? undefined : await this.#decodeRootSlot(first, slot, length, offset);
      if (root && (!best || root.rootSequence > best.rootSequence)) best = root;
      if (!root && first.some((byte) => byte !== 0)) invalid++;
    }
    if (!best) {
      throw new ShaleError('CHECKSUM', `${this.#file.path}: neither checkpoint root slot is valid; the disk's metadata needs repair`, { metadata: true });
    }
    return { root: best, fallback: invalid > 0 };
  }

  async #decodeRootSlot(first: Buffer, slot: number, length: number, offset: number): Promise<Root | undefined> {
    {
      let buffer = first;
      if (length > BLOCK_SIZE_BYTES) {
        buffer = Buffer.alloc(Math.ceil(length / BLOCK_SIZE_BYTES) * BLOCK_SIZE_BYTES);
        await this.#file.read(buffer, offset);
      }
      return decodeRoot(buffer, slot, this.#formatId, this.#segmentCount, this.#blocksPerSegment);
    }
  }

  async #readImage(root: Root): Promise<Buffer> {
    const perSegment = imageBytesPerSegment(this.#segmentSizeBytes);
    const image = Buffer.alloc(root.imageBytes);
    const needed = Math.ceil(root.imageBytes / perSegment);
    if (root.checkpointSegments.length !== needed) {
      throw new ShaleError('CHECKSUM', `${this.#file.path}: checkpoint root lists ${root.checkpointSegments.length} segments for ${root.imageBytes} bytes`, { metadata: true });
    }
    await Promise.all(root.checkpointSegments.map(async (entry, i) => {
      const bytes = Math.min(perSegment, root.imageBytes - i * perSegment);
      const buffer = Buffer.alloc(SEGMENT_HEADER_BLOCKS * BLOCK_SIZE_BYTES + bytes);
      await this.#file.read(buffer, this.#segmentOffsetBytes(entry.segment));
      const header = decodeSegmentHeaders(buffer, entry.segment, this.#formatId);
      if (!header || header.kind !== SegmentKind.CHECKPOINT || header.generation !== entry.generation) {
        throw new ShaleError('CHECKSUM', `${this.#file.path}: checkpoint segment ${entry.segment} has no valid header of generation ${entry.generation}`, { metadata: true });
      }
      buffer.copy(image, i * perSegment, SEGMENT_HEADER_BLOCKS * BLOCK_SIZE_BYTES);
      this.#generation[entry.segment] = entry.generation;
    }));
    if (crc32c(image) !== root.imageCrc) {
      throw new ShaleError('CHECKSUM', `${this.#file.path}: checkpoint image fails its crc32c; the disk's metadata needs repair`, { metadata: true });
    }
    return image;
  }

  #adoptImage(state: CheckpointState): void {
    this.#generation.set(state.segments.generation);
    this.#generationMax.set(state.segments.generationMax);
    this.#firstSequence.set(state.segments.firstSequence);
    this.#damaged.set(state.segments.damaged);
    for (const volume of state.volumes) {
      if (volume.fence) {
        this.#fences.set(volume.volumeId, { ...volume.fence });
        this.#ownerEpochs.set(volume.volumeId, volume.fence.epoch);
      }
      if (volume.purgeLocation !== undefined) this.#purged.set(volume.volumeId, volume.purgeLocation);
      if (volume.snapshots) this.#snapshots.set(volume.volumeId, { ...volume.snapshots });
    }
    assert(this.#index.objectCount === 0, 'image loaded into a used index');
    for (const table of state.index.objects()) this.#index.adopt(table);
    for (const [shardId, entries] of state.kv) {
      const shard: KvShard = { entries, sorted: [...entries.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)), liveCount: 0 };
      for (const entry of entries.values()) if (entry.value) shard.liveCount++;
      this.#kv.set(shardId, shard);
    }
  }

  /** Live counts per segment from the index and the metadata maps (after loading an image). */
  #recountLive(): void {
    this.#liveDataBlocks.fill(0);
    this.#liveMetaUnits.fill(0);
    this.#liveDataTotal = 0;
    for (const table of this.#index.objects()) {
      for (let block = 0; block < table.highestBlocks; block++) {
        const state = table.stateAt(block);
        if (state !== BlockState.ABSENT) this.#addLive(table.location[block]!, state === BlockState.DATA);
        for (let entry = table.firstHistory(block); entry >= 0; entry = table.hNext[entry]!) {
          this.#addLive(table.hLocation[entry]!, table.entryKind(entry) === BlockState.DATA);
        }
      }
    }
    for (const fence of this.#fences.values()) this.#addLive(fence.location, false);
    for (const location of this.#purged.values()) this.#addLive(location, false);
    for (const set of this.#snapshots.values()) this.#addLive(set.location, false);
    for (const shard of this.#kv.values()) for (const entry of shard.entries.values()) this.#addLive(entry.location, false, kvUnits(entry));
  }

  /**
   * Replay. Reads the header of every log segment the root lists: one showing the planned
   * generation was opened after the checkpoint (its batches are read); any other was not, or its
   * header was lost before anything in it was synced — either way its planned generation counts
   * as used. Batches above the checkpoint's sequence are applied in sequence order; the torn /
   * corrupt decision needs every durability claim first.
   */
  async #replay(root: Root, fallback: boolean): Promise<ReplayReport> {
    const report: ReplayReport = {
      rootSequence: root.rootSequence, checkpointSequence: root.checkpointSequence, imageBytes: root.imageBytes, headersRead: 0,
      rootFallback: fallback, segmentsFoundByScan: 0, segmentsScanned: 0,
      bytesRead: 0, batchesApplied: 0, staleBatches: 0, tornBatches: 0, corruptBatches: 0, corruptBlocks: 0, damagedHeaders: 0, lostBlocks: 0,
      nextSequence: 0, durationMs: 0,
    };
    const headerBytes = SEGMENT_HEADER_BLOCKS * BLOCK_SIZE_BYTES;
    const headers = await Promise.all(root.logSegments.map(async (entry) => {
      const buffer = Buffer.alloc(headerBytes);
      await this.#file.read(buffer, this.#segmentOffsetBytes(entry.segment));
      return decodeSegmentHeaders(buffer, entry.segment, this.#formatId);
    }));
    report.headersRead = headers.length;
    report.bytesRead += headers.length * headerBytes;
    let sequenceMax = root.sequenceLeaseEnd;
    const durableUpTo = new Map<number, number>();
    const opened: { entry: RootEntry; header: SegmentHeader }[] = [];
    root.logSegments.forEach((entry, i) => {
      const segment = entry.segment;
      if (entry.generation > this.#generationMax[segment]!) this.#generationMax[segment] = entry.generation;
      const header = headers[i];
      if (header && header.generation > entry.generation) {
        // Only a newer root plans a higher generation, and a segment is opened only once that
        // root is durable: the newest root is damaged and this one is stale. Refuse to roll back.
        throw new ShaleError('CHECKSUM', `${this.#file.path}: segment ${segment} is at generation ${header.generation}, above what root ${root.rootSequence} planned: the newest root is damaged; the disk's metadata needs repair`, { metadata: true });
      }
      if (header && header.generation === entry.generation && header.kind === SegmentKind.LOG) opened.push({ entry, header });
    });
    if (fallback) {
      // The newest root may be the damaged one: a segment it planned and opened is listed nowhere
      // here, but its header shows a generation above any this root and image know of. Replay
      // those too (in the order they were opened), so nothing written under the lost root is lost.
      const listed = new Set([...root.logSegments, ...root.checkpointSegments].map((entry) => entry.segment));
      const found: { entry: RootEntry; header: SegmentHeader }[] = [];
      const unlisted = Array.from({ length: this.#segmentCount }, (_, s) => s).filter((s) => !listed.has(s));
      for (let at = 0; at < unlisted.length; at += fallbackScanParallel) {
        const group = unlisted.slice(at, at + fallbackScanParallel);
        const groupHeaders = await Promise.all(group.map(async (segment) => {
          const buffer = Buffer.alloc(headerBytes);
          await this.#file.read(buffer, this.#segmentOffsetBytes(segment));
          return decodeSegmentHeaders(buffer, segment, this.#formatId);
        }));
        report.headersRead += group.length;
        report.bytesRead += group.length * headerBytes;
        group.forEach((segment, i) => {
          const header = groupHeaders[i];
          if (!header || header.kind !== SegmentKind.LOG || header.generation <= this.#generationMax[segment]!) return;
          this.#generationMax[segment] = header.generation;
          found.push({ entry: { segment, startBlocks: SEGMENT_HEADER_BLOCKS, generation: header.generation }, header });
        });
      }
      found.sort((a, b) => a.header.firstSequence - b.header.firstSequence);
      opened.push(...found);
      report.segmentsFoundByScan = found.length;
    }
    const collected: { batch: DecodedBatch; segment: number; header: SegmentHeader; badBlocks: number[] }[] = [];
    const gaps: { segment: number; sequence: number }[] = [];
    const buffer = Buffer.alloc(this.#segmentSizeBytes);
    for (const { entry, header } of opened) {
      const segment = entry.segment;
      const start = Math.max(SEGMENT_HEADER_BLOCKS, entry.startBlocks) * BLOCK_SIZE_BYTES;
      buffer.fill(0);
      await this.#file.read(buffer.subarray(0, headerBytes), this.#segmentOffsetBytes(segment));
      const length = await this.#file.read(buffer.subarray(start), this.#segmentOffsetBytes(segment) + start);
      report.bytesRead += headerBytes + length;
      report.segmentsScanned++;
      const scan = scanSegment(buffer, segment, this.#formatId, Math.max(SEGMENT_HEADER_BLOCKS, entry.startBlocks));
      sequenceMax = Math.max(sequenceMax, scan.sequenceMax);
      report.staleBatches += scan.staleBatches;
      for (const [first, durable] of scan.durableClaims) {
        if (durable > (durableUpTo.get(first) ?? -1)) durableUpTo.set(first, durable);
      }
      this.#since[segment] = 1;
      this.#sinceList.push({ ...entry });
      if (!scan.header) continue;
      for (const sequence of scan.gapsLost) gaps.push({ segment, sequence });
      for (const batch of scan.batches) {
        if (batch.sequence <= root.checkpointSequence) continue;
        collected.push({ batch, segment, header, badBlocks: badDataBlocks(buffer, batch) });
        this.#logBytesSinceCheckpoint += (batch.headerBlocks + batch.dataBlocks) * BLOCK_SIZE_BYTES;
      }
    }
    const knownDurable = (sequence: number): boolean => {
      for (const [first, durable] of durableUpTo) if (sequence >= first && sequence <= durable) return true;
      return false;
    };
    collected.sort((a, b) => a.batch.sequence - b.batch.sequence);
    const corrupt: typeof collected = [];
    for (const item of collected) {
      const { batch, segment, header } = item;
      if (this.#generation[segment] !== header.generation) {
        // The first batch of a generation opened after the checkpoint: the segment's old contents
        // are gone. Everything in them was dead by now, unless a record that said so was lost.
        if (this.#liveDataBlocks[segment]! > 0 || this.#liveMetaUnits[segment]! > 0) report.lostBlocks += this.#dropEntriesIn(segment);
        this.#generation[segment] = header.generation;
        this.#firstSequence[segment] = header.firstSequence;
        this.#damaged[segment] = 0;
      }
      if (item.badBlocks.length === 0) {
        this.#applyDecodedBatch(batch, segment);
        report.batchesApplied++;
      } else if (knownDurable(batch.sequence)) {
        this.#applyDecodedBatch(batch, segment);
        report.batchesApplied++;
        corrupt.push(item);
      } else {
        report.tornBatches++;
      }
    }
    for (const { batch, segment, badBlocks } of corrupt) {
      // Counted after everything is applied: damage to blocks superseded since harms nothing.
      const liveBad = this.#liveBadBlocks(batch, segment, badBlocks);
      if (liveBad > 0) report.corruptBatches++;
      report.corruptBlocks += liveBad;
    }
    // A gap hiding a batch known durable means a durable batch's header is unreadable.
    for (const { sequence } of gaps) if (sequence > root.checkpointSequence && knownDurable(sequence)) report.damagedHeaders++;
    report.nextSequence = sequenceMax + 1;
    return report;
  }

  /** Drops every index entry pointing into `segment` (replay found it reused while something still pointed there). */
  #dropEntriesIn(segment: number): number {
    const bps = this.#blocksPerSegment;
    let dropped = 0;
    for (const table of [...this.#index.objects()]) {
      for (let block = 0; block < table.highestBlocks; block++) {
        let previous = -1;
        for (let entry = table.firstHistory(block); entry >= 0;) {
          const next = table.hNext[entry]!;
          if (Math.floor(table.hLocation[entry]! / bps) === segment) {
            this.#dropLive(table.hLocation[entry]!, table.entryKind(entry) === BlockState.DATA);
            table.removeHistory(block, entry, previous);
            dropped++;
          } else {
            previous = entry;
          }
          entry = next;
        }
        const state = table.stateAt(block);
        if (state !== BlockState.ABSENT && Math.floor(table.location[block]! / bps) === segment) {
          this.#dropLive(table.location[block]!, state === BlockState.DATA);
          table.clearHead(block);
          // A kept older version becomes the head again.
          const first = table.firstHistory(block);
          if (first >= 0) {
            table.setHead(block, table.entryKind(first), table.entryEpoch(first), table.entrySeq(first), table.entryStamp(first), table.hLocation[first]!, table.hCrc[first]!);
            table.removeHistory(block, first, -1);
          }
          dropped++;
        }
      }
      if (table.presentBlocks === 0 && table.historyCount === 0) this.#index.delete(table.volumeId, table.chunkIndex);
    }
    for (const [volumeId, fence] of this.#fences) {
      if (Math.floor(fence.location / bps) === segment) {
        this.#dropLive(fence.location, false);
        this.#fences.delete(volumeId);
      }
    }
    for (const [volumeId, set] of this.#snapshots) {
      if (Math.floor(set.location / bps) === segment) {
        this.#dropLive(set.location, false);
        this.#snapshots.delete(volumeId);
      }
    }
    for (const shard of this.#kv.values()) {
      for (const [key, entry] of shard.entries) {
        if (Math.floor(entry.location / bps) === segment) {
          this.#dropLive(entry.location, false, kvUnits(entry));
          shard.entries.delete(key);
          shard.sorted.splice(lowerBoundString(shard.sorted, key), 1);
          if (entry.value) shard.liveCount--;
        }
      }
    }
    // PURGE records are never dropped: a purged volume stays purged.
    return dropped;
  }

  // -------------------------------------------------------------------------------------------
  // Space: making room and compaction

  /** Blocks clients could fill without compaction. */
  #writableBlocks(): number {
    const open = this.#openSegment >= 0 ? this.#blocksPerSegment - this.#openPositionBlocks : 0;
    const clientSegments = Math.max(0, this.#freeCount - this.#reserveSegments - this.#checkpointReserveSegments());
    return clientSegments * (this.#blocksPerSegment - SEGMENT_HEADER_BLOCKS) + open;
  }

  /**
   * Called (as the writer) when a client request needs a new segment and none may be taken.
   * True if progress was made: segments came free, room for clients appeared, or client records
   * went out meanwhile (compaction batches carry queued client writes along, so the room a copy
   * frees is often used at once — that counts as progress, not as failure). Compacts up to
   * `makeSpaceCompactionsMax` segments before giving up.
   */
  async #makeSpace(): Promise<boolean> {
    if (await this.#freePending()) return true;
    for (let attempt = 0; attempt < makeSpaceCompactionsMax; attempt++) {
      const writableBefore = this.#writableBlocks();
      const clientBefore = this.#clientRecordsWritten;
      const victim = this.#pickVictim(false);
      if (victim < 0) return false;
      this.#foregroundCompactions++;
      await this.#compactSegment(victim);
      if (await this.#freePending()) return true;
      if (this.#writableBlocks() > writableBefore || this.#clientRecordsWritten > clientBefore) return true;
    }
    return false;
  }

  /** Frees emptied segments: a sync, or (for segments replay still needs) a checkpoint. True if any was freed. */
  async #freePending(): Promise<boolean> {
    if (this.#pendingFreeCount === 0) return false;
    const before = this.#freeCount;
    await this.#syncUpTo(this.#lastWrittenSequence);
    if (this.#freeCount === before && this.#waitingForCheckpoint() > 0 && !this.#checkpointStarved) {
      try {
        await this.#checkpointAsWriter();
      } catch (error) {
        if (!(error instanceof ShaleError && error.code === 'NO_SPACE')) throw error;
        this.#checkpointStarved = true;
        this.#checkpointsStarved++;
      }
    }
    return this.#freeCount > before;
  }

  /** Estimated blocks it costs to copy a segment's live records. */
  #copyCostBlocks(segment: number): number {
    const meta = this.#liveMetaUnits[segment]!;
    return this.#liveDataBlocks[segment]! + Math.ceil((meta * META_UNIT_BYTES) / BLOCK_SIZE_BYTES) + 1;
  }

  /** The sealed segment cheapest to compact, if compacting it frees space (background: frees enough). */
  #pickVictim(background: boolean): number {
    const usable = this.#blocksPerSegment - SEGMENT_HEADER_BLOCKS;
    const costMax = background ? Math.floor(usable * compactionLiveFractionMax) : usable - 1;
    let best = -1;
    let bestRank = Infinity;
    for (let s = 0; s < this.#segmentCount; s++) {
      if (this.#segmentState[s] !== SegmentState.SEALED || this.#damaged[s] || s === this.#compactorVictim) continue;
      const cost = this.#copyCostBlocks(s);
      if (cost > costMax) continue;
      // A segment replay still needs is freed only by a checkpoint: prefer the others a little.
      const rank = cost + (this.#since[s] ? usable / 4 : 0);
      if (rank < bestRank) {
        best = s;
        bestRank = rank;
      }
    }
    return best;
  }

  #maybeScheduleCompaction(): void {
    if (!this.#backgroundCompaction || this.#compactionTimer || this.#compactor || this.#closing || this.#broken) return;
    if (this.#freeCount >= this.#compactionFreeSegmentsMin || this.#pickVictim(true) < 0) return;
    // The compactor also starts after every batch; this catches an engine that went idle after it gave up.
    this.#compactionTimer = this.#env.clock.after(this.#compactionIdleDelayMs, () => {
      this.#compactionTimer = undefined;
      this.#maybeStartCompactor();
    });
    this.#compactionTimer.unref();
  }

  /** Compaction blocks a batch may carry while clients wait (see compactionBatchBlocksMax). */
  #compactionBatchLimit(): number {
    if (this.#compacting || this.#queue_.isEmpty) return Infinity;
    const clientKeep = this.#checkpointReserveSegments() + this.#reserveSegments;
    return this.#freeCount <= clientKeep + 2 ? Infinity : compactionBatchBlocksMax;
  }

  /** Drops queued compaction copies (their victim stays as it is); the background compactor learns it. */
  #dropCompactionQueue(): void {
    const dropped = new ShaleError('NO_SPACE', 'compaction copy dropped: no room');
    for (const op of this.#compactionQueue.drain()) rejectOp(op, dropped);
  }

  /**
   * Background compaction, under load as well as idle: when fewer than compactionFreeSegmentsMin
   * segments are free, a compactor (outside the writer) reads a victim at most 75 % live, queues
   * copies of its live records, and lets the writer interleave them with client batches
   * (compactionBatchBlocksMax per batch while clients wait). The victim is reused only after a
   * sync covers the copies, exactly as in the foreground.
   */
  #maybeStartCompactor(): void {
    if (!this.#backgroundCompaction || this.#compactor || this.#closing || this.#broken || this.#replaying) return;
    if (this.#freeCount >= this.#compactionFreeSegmentsMin || this.#pickVictim(true) < 0) return;
    this.#compactor = this.#runCompactor().catch((error: unknown) => {
      if (!(error instanceof ShaleError)) this.#setBroken(toDiskError(error, 'background compaction'));
    }).finally(() => {
      this.#compactor = undefined;
      this.#compactorVictim = -1;
    });
  }

  async #runCompactor(): Promise<void> {
    let failures = 0;
    // Emptied victims count as free here: the next sync (ours, or any flush or root) frees them.
    while (this.#freeCount + this.#pendingFreeCount - this.#pendingSinceCount < this.#compactionFreeSegmentsMin && !this.#closing && !this.#broken && failures < 3) {
      const victim = this.#pickVictim(true);
      if (victim < 0) return;
      if (await this.#compactInBackground(victim)) failures = 0;
      else failures++;
    }
    // Done for now: one sync frees the victims still waiting for one.
    if (!this.#broken && this.#pendingFreeCount > this.#pendingSinceCount && this.#lastWrittenSequence > this.#durableSequence) {
      await this.#syncUpTo(this.#lastWrittenSequence);
    }
  }

  /** One victim: read it (pinned, off the writer), queue its copies, wait until they are written, sync. True if it was emptied. */
  async #compactInBackground(victim: number): Promise<boolean> {
    this.#compactorVictim = victim;
    const generation = this.#generation[victim]!;
    const buffer = (this.#compactorBuffer ??= Buffer.allocUnsafe(this.#segmentSizeBytes));
    let length: number;
    this.#readPins[victim]!++;
    try {
      length = await this.#file.read(buffer, this.#segmentOffsetBytes(victim));
    } catch {
      this.#damaged[victim] = 1;
      return false;
    } finally {
      this.#readPins[victim]!--;
      this.#afterUnpin();
    }
    // Emptied by overwrites meanwhile (and maybe reused): nothing to do.
    if (this.#segmentState[victim] !== SegmentState.SEALED || this.#generation[victim] !== generation) return true;
    if (this.#closing || this.#broken) return false;
    const scan = length === buffer.length ? scanSegment(buffer, victim, this.#formatId) : undefined;
    if (!scan?.header || scan.header.generation !== generation || scan.header.kind !== SegmentKind.LOG) {
      this.#damaged[victim] = 1;
      return false;
    }
    // A foreground compaction owns the queue while it runs: try again later.
    if (this.#compacting) return false;
    const ops = this.#queueCopies(victim, buffer, scan.batches, Tier.BACKGROUND);
    if (ops.length > 0) {
      // Every copy settles: written (resolve), or dropped for lack of room or a broken engine (reject).
      let failed = false;
      const settled = ops.map((op) => new Promise<void>((resolve) => {
        op.resolve = () => resolve();
        op.reject = () => {
          failed = true;
          resolve();
        };
      }));
      this.#pump();
      await Promise.all(settled);
      if (failed) return false;
    }
    if (this.#segmentState[victim] === SegmentState.SEALED) {
      // Something is still live there: it changed under the copy (a snapshot appeared), or a live
      // record lies in a batch the scan cannot read. The third time, give the segment up as the
      // foreground compaction does, rather than reread it after every batch.
      this.#compactorMisses[victim]!++;
      if (this.#compactorMisses[victim]! >= 3) this.#damaged[victim] = 1;
      return false;
    }
    this.#compactorMisses[victim] = 0;
    // The copies must be durable before the victim is reused: it stays PENDING_FREE until a sync.
    // One sync per few victims (each fdatasync also writes back every dirty page of the disk),
    // at once when free segments run short.
    const waitingForSync = this.#pendingFreeCount - this.#pendingSinceCount;
    const short = this.#freeCount <= this.#checkpointReserveSegments() + this.#reserveSegments + 2;
    if ((short || waitingForSync >= compactorSyncSegments) && this.#lastWrittenSequence > this.#durableSequence) {
      await this.#syncUpTo(this.#lastWrittenSequence);
    }
    this.#compactedSegments++;
    this.#backgroundCompactedSegments++;
    return true;
  }

  /**
   * Copies the live records of `victim` (with their versions, snap stamps and crcs) to the open
   * segment — or, for a tombstone nothing needs any more, writes a DROP — syncs, and so frees it.
   * Runs as the writer. True if the victim was emptied.
   */
  async #compactSegment(victim: number): Promise<boolean> {
    assert(this.#segmentState[victim] === SegmentState.SEALED, 'compaction victim is not sealed');
    // Background copies still queued may not use the reserve this compaction needs: drop them.
    this.#dropCompactionQueue();
    this.#compacting = true;
    try {
      for (let round = 0; round < 3; round++) {
        const buffer = (this.#compactionBuffer ??= Buffer.allocUnsafe(this.#segmentSizeBytes));
        let length: number;
        try {
          length = await this.#file.read(buffer, this.#segmentOffsetBytes(victim));
        } catch {
          this.#damaged[victim] = 1;
          return false;
        }
        const scan = length === buffer.length ? scanSegment(buffer, victim, this.#formatId) : undefined;
        if (!scan?.header || scan.header.generation !== this.#generation[victim] || scan.header.kind !== SegmentKind.LOG) {
          this.#damaged[victim] = 1;
          return false;
        }
        this.#queueCopies(victim, buffer, scan.batches);
        while (!this.#compactionQueue.isEmpty) {
          if (await this.#writeNext()) continue;
          if (await this.#freePending()) continue;
          // Not even the reserve is left: give up; what was copied so far is simply garbage there.
          this.#dropCompactionQueue();
          return false;
        }
        if (this.#liveDataBlocks[victim] === 0 && this.#liveMetaUnits[victim] === 0) {
          // The copies must be durable before the victim can be reused: that is what makes a crash
          // at any moment of compaction lose nothing.
          await this.#syncUpTo(this.#lastWrittenSequence);
          this.#compactedSegments++;
          return true;
        }
        // Something changed under the copy (a snapshot appeared, a drop no longer applied): look again.
      }
      // Something live is in a batch the scan cannot read (damaged since it was written).
      this.#damaged[victim] = 1;
      return false;
    } finally {
      this.#compacting = false;
    }
  }

  /** Queues copies (and drops) of every live record of the victim's batches; returns them. */
  #queueCopies(victim: number, buffer: Buffer, batches: readonly DecodedBatch[], tier: number = Tier.COMPACTION): PendingOp[] {
    const base = victim * this.#blocksPerSegment;
    const queued: PendingOp[] = [];
    const push = (op: PendingOp): void => {
      queued.push(op);
      this.#compactionQueue.push(op);
    };
    for (const batch of batches) {
      const headerLocation = base + batch.positionBlocks;
      const dataLocation = headerLocation + batch.headerBlocks;
      const dataStartBytes = (batch.positionBlocks + batch.headerBlocks) * BLOCK_SIZE_BYTES;
      for (const record of batch.records) {
        const purged = this.#purged.has(record.volumeId);
        switch (record.kind) {
          case RecordKind.DATA: {
            const table = purged ? undefined : this.#index.get(record.volumeId, record.chunkIndex);
            if (!table) break;
            const recordLocation = dataLocation + record.dataIndexBlocks;
            let runStart = -1;
            for (let i = 0; i <= record.countBlocks; i++) {
              const live = i < record.countBlocks &&
                this.#hasVersionAt(table, record.offsetBlocks + i, BlockState.DATA, recordLocation + i, record.epoch, record.seq);
              if (live && runStart < 0) runStart = i;
              if (!live && runStart >= 0) {
                const from = dataStartBytes + (record.dataIndexBlocks + runStart) * BLOCK_SIZE_BYTES;
                push(new PendingOp(RecordKind.DATA, record.volumeId, record.chunkIndex, record.offsetBlocks + runStart, i - runStart,
                  record.epoch, record.seq, record.snapSeq, buffer.subarray(from, from + (i - runStart) * BLOCK_SIZE_BYTES),
                  batch.checksums.slice(record.dataIndexBlocks + runStart, record.dataIndexBlocks + i), tier));
                runStart = -1;
              }
            }
            break;
          }
          case RecordKind.ZERO: {
            const table = purged ? undefined : this.#index.get(record.volumeId, record.chunkIndex);
            if (!table) break;
            // Per block: 0 dead, 1 copy, 2 drop.
            let runStart = -1;
            let runAction = 0;
            for (let i = 0; i <= record.countBlocks; i++) {
              let action = 0;
              if (i < record.countBlocks) {
                const block = record.offsetBlocks + i;
                if (table.stateAt(block) === BlockState.ZERO && table.location[block] === headerLocation &&
                  table.epochAt(block) === record.epoch && table.seqAt(block) === record.seq) {
                  action = this.#tombstoneDroppable(table, block) ? 2 : 1;
                } else if (this.#hasVersionAt(table, block, BlockState.ZERO, headerLocation, record.epoch, record.seq)) {
                  action = 1;
                }
              }
              if (action !== runAction) {
                if (runAction !== 0) {
                  const kind = runAction === 2 ? RecordKind.DROP : RecordKind.ZERO;
                  push(new PendingOp(kind, record.volumeId, record.chunkIndex, record.offsetBlocks + runStart, i - runStart,
                    record.epoch, record.seq, record.snapSeq, undefined, undefined, tier));
                }
                runStart = i;
                runAction = action;
              }
            }
            break;
          }
          case RecordKind.FENCE:
            if (this.#fences.get(record.volumeId)?.location === headerLocation) {
              push(new PendingOp(RecordKind.FENCE, record.volumeId, 0, 0, 0, record.epoch, 0, 0, undefined, undefined, tier));
            }
            break;
          case RecordKind.PURGE:
            if (this.#purged.get(record.volumeId) === headerLocation) {
              push(new PendingOp(RecordKind.PURGE, record.volumeId, 0, 0, 0, 0, 0, 0, undefined, undefined, tier));
            }
            break;
          case RecordKind.SNAPSHOTS: {
            const set = this.#snapshots.get(record.volumeId);
            if (set && set.location === headerLocation && set.version === record.seq) {
              const op = new PendingOp(RecordKind.SNAPSHOTS, record.volumeId, 0, 0, 0, 0, record.seq, record.snapSeq, undefined, undefined, tier);
              op.payload = record.payload;
              op.flags = record.flags ?? 0;
              push(op);
            }
            break;
          }
          case RecordKind.DROP:
            break;
          case RecordKind.KV_PUT:
          case RecordKind.KV_DELETE: {
            const key = decodeKvPayload(record.payload!).key.toString('latin1');
            const entry = purged ? undefined : this.#kv.get(record.volumeId)?.entries.get(key);
            if (entry && entry.location === headerLocation && entry.epoch === record.epoch && entry.seq === record.seq &&
              (entry.value === undefined) === (record.kind === RecordKind.KV_DELETE)) {
              const op = new PendingOp(record.kind, record.volumeId, 0, 0, 0, record.epoch, record.seq, 0, undefined, undefined, tier);
              op.payload = record.payload;
              push(op);
            }
            break;
          }
        }
      }
    }
    return queued;
  }

  /** The block has a version (head or kept) of this kind, version and location. */
  #hasVersionAt(table: ObjectTable, block: number, state: number, location: number, epoch: number, seq: number): boolean {
    if (table.stateAt(block) === state && table.location[block] === location && table.epochAt(block) === epoch && table.seqAt(block) === seq) return true;
    for (let entry = table.firstHistory(block); entry >= 0; entry = table.hNext[entry]!) {
      if (table.entryKind(entry) === state && table.hLocation[entry] === location && table.entryEpoch(entry) === epoch && table.entrySeq(entry) === seq) return true;
    }
    return false;
  }

  // -------------------------------------------------------------------------------------------

  #segmentOffsetBytes(segment: number): number {
    return this.#segmentAreaOffsetBytes + segment * this.#segmentSizeBytes;
  }

  #locationOffsetBytes(location: number): number {
    return this.#segmentAreaOffsetBytes + location * BLOCK_SIZE_BYTES;
  }
}

function kvUnitsOf(keyBytes: number, valueBytes: number): number {
  return Math.ceil((RECORD_ENTRY_BYTES + 2 + keyBytes + valueBytes) / META_UNIT_BYTES);
}

function kvUnits(entry: ImageKvEntry): number {
  return kvUnitsOf(entry.key.length, entry.value?.length ?? 0);
}

/**
 * Calls a writeNow caller's `done` from inside the writer. What it throws is the caller's bug, not
 * the disk's: rethrown outside the writer, so it neither breaks the engine nor hides.
 */
function settleNow(done: WriteNowDone, error: Error | undefined, result: WriteResult | undefined): void {
  try {
    done(error, result);
  } catch (thrown) {
    queueMicrotask(() => {
      throw thrown;
    });
  }
}

/** Settles an op: through its writeNow caller's `done` if it has one, else its Promise. */
function resolveOp(op: PendingOp, result: WriteResult): void {
  if (op.done !== undefined) settleNow(op.done, undefined, result);
  else op.resolve?.(result);
}

function rejectOp(op: PendingOp, error: Error): void {
  if (op.done !== undefined) settleNow(op.done, error, undefined);
  else op.reject?.(error);
}

function diskInfo(path: string, superblock: Superblock): DiskInfo {
  return {
    path,
    diskUuid: superblock.diskUuid,
    clusterId: superblock.clusterId,
    formatVersion: superblock.formatVersion,
    segmentSizeBytes: superblock.segmentSizeBytes,
    segmentCount: superblock.segmentCount,
    capacityBytes: superblock.segmentCount * superblock.segmentSizeBytes,
    formattedWallMs: superblock.formattedWallMs,
  };
}

/** The head version of each block of a range, as #locate and blockVersionsAt give them for a head read. */
function describeHead(table: ObjectTable | undefined, offsetBlocks: number, countBlocks: number, versions: HeadVersions): void {
  for (let i = 0; i < countBlocks; i++) {
    const block = offsetBlocks + i;
    const state = table === undefined ? BlockState.ABSENT : table.stateAt(block);
    versions.states[i] = state;
    if (state === BlockState.ABSENT) {
      versions.epochs[i] = 0;
      versions.seqs[i] = 0;
      versions.stamps[i] = 0;
    } else {
      versions.epochs[i] = table!.epochAt(block);
      versions.seqs[i] = table!.seqAt(block);
      versions.stamps[i] = table!.stampAt(block);
    }
    versions.checksums[i] = state === BlockState.DATA ? table!.crc[block]! : ZERO_BLOCK_CRC;
  }
}
