/**
 * StoreEngine: the log-structured engine of one store disk (DESIGN §4), format version 1.
 *
 * What it is. One disk file or raw device, opened by path through `env.disk`: a superblock, then
 * fixed-size segments. Every change — data, a tombstone (TRIM / WRITE_ZEROES), a FENCE, a PURGE —
 * is a record appended to the open segment in a *batch*: header block(s) listing the records with
 * a crc32c per 4 KiB data block, then the data, all in one `writev` (group commit: what arrives
 * while a batch is being written goes out together in the next one). The index lives in memory
 * (block-index.ts) and is rebuilt at open by replaying every segment; checkpoints come later.
 * docs/format.md describes the bytes and the replay rules.
 *
 * Invariants.
 * - Version rule: a block takes a record only if the record's version (epoch, seq) is higher than
 *   the block's, lexicographically. An equal version is the same write again (a retry, or a copy
 *   made by compaction): it is not counted as applied, but the block's location moves to the copy
 *   that is later in the log, so runtime and replay always agree on locations. Hence the index
 *   after replay does not depend on the order in which segments are scanned.
 * - PURGE wins over every record of its volume (volume ids are never reused); FENCE keeps the
 *   highest owner epoch. Neither is ever dropped by format-1 compaction.
 * - Only one batch is being written at a time, and batch sequence numbers grow by one: when a sync
 *   starts, every batch up to the last written one is covered.
 * - A segment is reused only after (a) nothing in the index points into it and (b) a sync has
 *   covered every write that made it so (PENDING_FREE → FREE). So a crash can never lose the
 *   newer copy while the older one is already overwritten; compaction is the same case (copy,
 *   sync, only then the victim may be reused). Reuse bumps the segment's generation; batches of an
 *   older generation in it are never replayed.
 * - Data is checksummed before the write (the client's crcs are verified) and after every read;
 *   a block whose crc fails is never returned (CHECKSUM). Compaction copies bytes and the
 *   original crcs, so damage stays detectable and is never laundered.
 * - Clients get NO_SPACE while `reserveSegments` free segments remain; compaction, FENCE and
 *   PURGE may use them. Reads keep working.
 *
 * Crash model. Any unsynced write may be lost, whole or in 512-byte sectors, in any subset.
 * - A write resolves when its batch is written (volatile, like a disk cache); `flush()` resolves
 *   when every write that resolved before it is durable.
 * - Replay takes a batch only if its header (magic, crc, format id, segment, position) is valid
 *   and its generation is the segment's. A batch whose data crcs fail is *torn* (never durable:
 *   ignored whole, the blocks keep their older versions) unless it is known durable, in which case
 *   it is *corrupt* (kept; reads of the bad blocks fail with CHECKSUM). Every batch header carries
 *   the first sequence its engine instance wrote and the highest sequence it knew durable; a batch
 *   is known durable iff some valid header of its own instance, anywhere on the disk, says so.
 *   close() writes a last marker batch so that after a clean stop every batch is known durable.
 * - Every valid header anywhere counts for the next sequence and the segment's next generation
 *   (also one hidden inside an older batch's extent), so neither is ever reused. A segment showing
 *   a generation above its header's was being reused when its new header was lost: nothing in it
 *   is live.
 * - After replay the file is synced once, so nothing replay relied on can vanish later; a new
 *   instance never appends to a segment of an older one, it opens a fresh segment.
 *
 * API (all numbers are safe integers; volume ids < 2^53, epochs < 2^32):
 *   StoreEngine.format(env, path, { sizeBytes, clusterId, diskUuid?, segmentSizeBytes?, overwrite? }) → DiskInfo
 *       Errors: INVALID_ARGUMENT (bad option, disk too small/large), ALREADY_EXISTS (already
 *       formatted and `overwrite` not set).
 *   StoreEngine.open(env, path, { clusterId?, reserveSegments?, … }) → StoreEngine
 *       Errors: NOT_FOUND (no such file), WRONG_CLUSTER (no valid superblock, unknown format
 *       version, other cluster, truncated) — the disk is left untouched.
 *   engine.write({ volumeId, chunkIndex, offsetBlocks, data, checksums, version, snapSeq, ownerEpoch? })
 *       → { appliedBlocks, skippedBlocks }. `data` is not copied: do not change it until the
 *       promise settles. Errors: INVALID_ARGUMENT, OUT_OF_RANGE, CHECKSUM (crcs do not match the
 *       data; nothing written), FENCED (ownerEpoch below the volume's), NOT_FOUND (volume purged),
 *       NO_SPACE (a write split over several batches may then be partly applied: each block holds
 *       the old or the new version), BUSY (queue full), SHUTTING_DOWN, INTERNAL (disk error: the
 *       engine is broken from then on; reads still work, writes and flushes fail).
 *   engine.writeZeroes({ volumeId, chunkIndex, offsetBlocks, countBlocks, version, snapSeq, ownerEpoch? })
 *       → same, writes a tombstone.
 *   engine.read(volumeId, chunkIndex, offsetBlocks, countBlocks) → { data, checksums, states, versions }
 *       Absent and zero blocks read as zeros. Errors: CHECKSUM (names the block), INVALID_ARGUMENT,
 *       OUT_OF_RANGE.
 *   engine.flush(); engine.fence(volumeId, ownerEpoch) (durable; FENCED if older than seen);
 *   engine.ownerEpoch(volumeId); engine.purgeVolume(volumeId) (durable); engine.isPurged(volumeId);
 *   engine.listObjects(); engine.objectVersions(volumeId, chunkIndex); engine.stats();
 *   engine.compact() (one segment now); engine.close(); engine.info (uuid, cluster, geometry);
 *   engine.replayReport (what open found: torn, stale, corrupt batches, damaged headers).
 * Ordering: writes to the same block that are in flight together are applied by the version
 * rule, not by arrival; a write and a read in flight together may see either.
 */
import { assert } from '../../lib/assert.ts';
import { crc32c, ZERO_BLOCK_CRC } from '../../lib/crc32c.ts';
import { ShaleError } from '../../lib/errors.ts';
import { BLOCK_SIZE_BYTES } from '../../lib/units.ts';
import type { DiskFile, Env, Timer } from '../../env/env.ts';
import { BlockIndex, BlockState } from './block-index.ts';
import { Fifo } from './fifo.ts';
import {
  badDataBlocks, batchHeaderBlocks, CHUNK_BLOCKS_MAX, CLUSTER_ID_BYTES_MAX, decodeSuperblock, encodeSegmentHeader,
  encodeSuperblock, FORMAT_VERSION, METADATA_AREA_BYTES, RECORD_ENTRY_BYTES, RecordKind, scanSegment, sealBatchHeader,
  SEGMENT_AREA_BLOCKS_MAX, SEGMENT_HEADER_BLOCKS, SEGMENT_SIZE_BYTES_DEFAULT, SEGMENT_SIZE_BYTES_MAX,
  SEGMENT_SIZE_BYTES_MIN, SUPERBLOCK_COPIES, uuidToBytes, writeCrcEntry, writeRecordEntry,
} from './format.ts';
import type { DecodedBatch, RecordKindValue, Superblock } from './format.ts';

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

const TWO_32 = 2 ** 32;

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
}

export interface WriteZeroesRequest {
  volumeId: number;
  chunkIndex: number;
  offsetBlocks: number;
  countBlocks: number;
  version: Version;
  snapSeq: number;
  ownerEpoch?: number;
}

export interface WriteResult {
  /** Blocks that took this write's version. */
  appliedBlocks: number;
  /** Blocks that kept a version equal or higher (version rule), or whose volume was purged. */
  skippedBlocks: number;
}

export interface BlockVersions {
  /** Per block; 0 for absent blocks. */
  epochs: Uint32Array;
  seqs: Float64Array;
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

export interface EngineStats {
  /** Bytes of the segment area. */
  capacityBytes: number;
  /** Bytes of segments in use (open, sealed, or waiting for a sync to be free). */
  usedBytes: number;
  /** Bytes of free segments (including the reserve). */
  freeBytes: number;
  /** Bytes of data blocks the index points at. */
  liveBytes: number;
  /** Bytes clients can still write before NO_SPACE, without compaction. */
  writableBytes: number;
  segmentSizeBytes: number;
  segmentCount: number;
  freeSegments: number;
  pendingFreeSegments: number;
  reserveSegments: number;
  /** Segments compaction gave up on (a record in them could not be parsed). */
  damagedSegments: number;
  objectCount: number;
  compactedSegments: number;
  batchesWritten: number;
  syncs: number;
}

export interface ReplayReport {
  segmentsScanned: number;
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
  nextSequence: number;
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
}

export interface EngineOpenOptions {
  /** Refuse (WRONG_CLUSTER) a disk of another cluster. */
  clusterId?: string;
  /** Free segments clients cannot take (≥ 1). Default 2. */
  reserveSegments?: number;
  /** Background compaction runs when fewer segments than this are free. Default max(reserve + 2, 10 %). */
  compactionFreeSegmentsMin?: number;
  /** Default true. */
  backgroundCompaction?: boolean;
  /** Idle time before background compaction starts. Default 200 ms. */
  compactionIdleDelayMs?: number;
  /** Test hook: the order in which replay scans segments (a permutation of 0..segmentCount-1). */
  replaySegmentOrder?: readonly number[];
}

const SegmentState = {
  FREE: 0,
  OPEN: 1,
  SEALED: 2,
  /** Empty, waiting for a sync to cover the writes that emptied it. */
  PENDING_FREE: 3,
} as const;

interface PendingOp {
  kind: RecordKindValue;
  volumeId: number;
  chunkIndex: number;
  offsetBlocks: number;
  /** Blocks covered (0 for FENCE and PURGE). */
  countBlocks: number;
  epoch: number;
  seq: number;
  snapSeq: number;
  data: Buffer | undefined;
  checksums: Uint32Array | undefined;
  /** DATA: blocks already handed to a batch. */
  placedBlocks: number;
  /** Compaction, FENCE and PURGE may use the reserved segments. */
  mayUseReserve: boolean;
  appliedBlocks: number;
  skippedBlocks: number;
  resolve: ((result: WriteResult) => void) | undefined;
  reject: ((error: Error) => void) | undefined;
}

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
  buffers: Buffer[];
  offsetBytes: number;
}

const FORM_IDLE = 0;
const FORM_BLOCKED = 1;
const FORM_NEED_SPACE = 2;
type FormResult = Batch | typeof FORM_IDLE | typeof FORM_BLOCKED | typeof FORM_NEED_SPACE;

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

function toDiskError(error: unknown, what: string): ShaleError {
  if (error instanceof ShaleError) return error;
  return new ShaleError('INTERNAL', `${what}: ${error instanceof Error ? error.message : String(error)}`);
}

export class StoreEngine {
  readonly #env: EngineEnv;
  readonly #file: DiskFile;
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

  // Per segment.
  readonly #segmentState: Uint8Array;
  /** Generation of the segment's current contents (0: never used, or no valid header). */
  readonly #generation: Float64Array;
  /** Highest generation ever seen in the segment: the next use takes one more. */
  readonly #generationMax: Float64Array;
  /** Sequence of the first batch of the current generation: orders segments by age. */
  readonly #firstSequence: Float64Array;
  readonly #emptiedAtSequence: Float64Array;
  readonly #liveDataBlocks: Int32Array;
  /** Live tombstone blocks plus live FENCE and PURGE records. */
  readonly #liveMetaBlocks: Int32Array;
  readonly #readPins: Int32Array;
  readonly #damaged: Uint8Array;
  #freeCount = 0;
  #pendingFreeCount = 0;
  #liveDataTotal = 0;

  #openSegment = -1;
  #openPositionBlocks = 0;
  #nextSequence = 1;
  #incarnationFirstSequence = 1;
  #lastWrittenSequence = 0;
  #durableSequence = 0;
  #syncInFlight: { promise: Promise<void>; covers: number } | undefined;

  readonly #index = new BlockIndex();
  /** Volume → the live FENCE record (highest epoch, latest copy). */
  readonly #fences = new Map<number, { epoch: number; location: number }>();
  /** Volume → highest owner epoch seen, raised when fence() is called (before it is durable). */
  readonly #ownerEpochs = new Map<number, number>();
  /** Volume → location of its live PURGE record; -1 while the record is being written. */
  readonly #purged = new Map<number, number>();
  readonly #purging = new Map<number, Promise<void>>();

  readonly #queue = new Fifo<PendingOp>();
  readonly #compactionQueue = new Fifo<PendingOp>();
  readonly #tasks: (() => Promise<void>)[] = [];
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
  #compactedSegments = 0;
  #batchesWritten = 0;
  #syncs = 0;
  #replayReport: ReplayReport | undefined;

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
    this.#reserveSegments = options.reserveSegments ?? Math.min(reserveSegmentsDefault, Math.max(1, count - 2));
    if (!Number.isInteger(this.#reserveSegments) || this.#reserveSegments < 1 || this.#reserveSegments >= count) {
      throw invalid(`reserveSegments ${options.reserveSegments} must be in [1, ${count - 1}]`);
    }
    this.#compactionFreeSegmentsMin = options.compactionFreeSegmentsMin ?? Math.max(this.#reserveSegments + 2, Math.ceil(count / 10));
    this.#backgroundCompaction = options.backgroundCompaction ?? true;
    this.#compactionIdleDelayMs = options.compactionIdleDelayMs ?? compactionIdleDelayMsDefault;
    this.#segmentState = new Uint8Array(count);
    this.#generation = new Float64Array(count);
    this.#generationMax = new Float64Array(count);
    this.#firstSequence = new Float64Array(count);
    this.#emptiedAtSequence = new Float64Array(count);
    this.#liveDataBlocks = new Int32Array(count);
    this.#liveMetaBlocks = new Int32Array(count);
    this.#readPins = new Int32Array(count);
    this.#damaged = new Uint8Array(count);
  }

  // -------------------------------------------------------------------------------------------
  // Format and open

  /** Writes a new superblock (two copies) on a new or existing file, extended (sparse) to sizeBytes. */
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
    const segmentCount = Math.floor((sizeBytes - METADATA_AREA_BYTES) / segmentSizeBytes);
    if (segmentCount < 4) {
      throw invalid(`sizeBytes ${sizeBytes} is too small: it must hold 1 MiB of metadata and at least 4 segments of ${segmentSizeBytes} bytes`);
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

    const file = await env.disk.open(path, { create: true, sizeBytes });
    try {
      if (file.sizeBytes < sizeBytes) throw invalid(`${path} holds only ${file.sizeBytes} bytes, less than sizeBytes ${sizeBytes}`);
      const superblock: Superblock = {
        formatVersion: FORMAT_VERSION,
        segmentSizeBytes,
        segmentCount,
        segmentAreaOffsetBytes: METADATA_AREA_BYTES,
        sizeBytes,
        formattedWallMs: Math.floor(env.clock.wallMs()),
        diskUuid: diskUuid.toLowerCase(),
        formatId: env.random.bytes(16),
        clusterId,
      };
      const block = encodeSuperblock(superblock);
      await file.writev([block, block], 0);
      await file.sync();
      return diskInfo(path, superblock);
    } finally {
      await file.close();
    }
  }

  /** Opens a formatted disk and replays its segments. Refused disks are left untouched. */
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
      await engine.#replay(options.replaySegmentOrder);
      // What replay read is now the truth: make it durable before anything it allows is overwritten.
      await file.sync();
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
      for (let i = 0; i < countBlocks; i++) {
        const start = i * BLOCK_SIZE_BYTES;
        if (crc32c(data.subarray(start, start + BLOCK_SIZE_BYTES)) !== checksums[i]) {
          throw new ShaleError('CHECKSUM', `write to volume ${volumeId} chunk ${chunkIndex}: block ${offsetBlocks + i} does not match its crc32c; nothing written`,
            { volumeId, chunkIndex, block: offsetBlocks + i });
        }
      }
      this.#checkWriter(volumeId, request.ownerEpoch);
      op = newOp(RecordKind.DATA, volumeId, chunkIndex, offsetBlocks, countBlocks, version.epoch, version.seq, snapSeq, data, checksums, false);
    } catch (error) {
      return Promise.reject(error);
    }
    return this.#enqueue(op);
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
      op = newOp(RecordKind.ZERO, volumeId, chunkIndex, offsetBlocks, countBlocks, version.epoch, version.seq, snapSeq, undefined, undefined, false);
    } catch (error) {
      return Promise.reject(error);
    }
    return this.#enqueue(op);
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
      await this.#enqueue(newOp(RecordKind.FENCE, volumeId, 0, 0, 0, ownerEpoch, 0, 0, undefined, undefined, true));
    }
    await this.#syncUpTo(this.#lastWrittenSequence);
  }

  /** Highest owner epoch seen for the volume (0 if never fenced). */
  ownerEpoch(volumeId: number): number {
    return this.#ownerEpochs.get(volumeId) ?? 0;
  }

  /**
   * Deletes every block of the volume, durably; the space becomes garbage for compaction. From the
   * call on, reads of the volume see nothing and writes to it are refused (NOT_FOUND). Idempotent.
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
    const done = this.#enqueue(newOp(RecordKind.PURGE, volumeId, 0, 0, 0, 0, 0, 0, undefined, undefined, true))
      .then(() => this.#syncUpTo(this.#lastWrittenSequence))
      .finally(() => this.#purging.delete(volumeId));
    this.#purging.set(volumeId, done);
    return done;
  }

  isPurged(volumeId: number): boolean {
    return this.#purged.has(volumeId);
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
    if (this.#queue.length >= queuedOpsMax) {
      return Promise.reject(new ShaleError('BUSY', `store engine queue is full (${queuedOpsMax} requests)`));
    }
    const promise = new Promise<WriteResult>((resolve, reject) => {
      op.resolve = resolve;
      op.reject = reject;
    });
    this.#queue.push(op);
    this.#pump();
    return promise;
  }

  // -------------------------------------------------------------------------------------------
  // Reads

  async read(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number): Promise<ReadResult> {
    if (this.#closed) throw new ShaleError('SHUTTING_DOWN', 'store engine is closed');
    checkVolumeId(volumeId);
    checkU32('chunkIndex', chunkIndex);
    checkBlockRange(offsetBlocks, countBlocks);
    const data = Buffer.allocUnsafe(countBlocks * BLOCK_SIZE_BYTES);
    const checksums = new Uint32Array(countBlocks);
    const states = new Uint8Array(countBlocks);
    const epochs = new Uint32Array(countBlocks);
    const seqs = new Float64Array(countBlocks);
    const table = this.#purged.has(volumeId) ? undefined : this.#index.get(volumeId, chunkIndex);
    const bps = this.#blocksPerSegment;
    const reads: Promise<number>[] = [];
    const readLengths: number[] = [];
    const pinned: number[] = [];
    let i = 0;
    while (i < countBlocks) {
      const block = offsetBlocks + i;
      const state = table ? table.stateAt(block) : BlockState.ABSENT;
      if (state !== BlockState.DATA) {
        data.fill(0, i * BLOCK_SIZE_BYTES, (i + 1) * BLOCK_SIZE_BYTES);
        checksums[i] = ZERO_BLOCK_CRC;
        states[i] = state;
        if (state === BlockState.ZERO) {
          epochs[i] = table!.epoch[block]!;
          seqs[i] = table!.seq[block]!;
        }
        i++;
        continue;
      }
      // A run of data blocks that lie next to each other in one segment: one read.
      const start = i;
      const startLocation = table!.location[block]!;
      const segment = Math.floor(startLocation / bps);
      do {
        const b = offsetBlocks + i;
        states[i] = BlockState.DATA;
        checksums[i] = table!.crc[b]!;
        epochs[i] = table!.epoch[b]!;
        seqs[i] = table!.seq[b]!;
        i++;
      } while (
        i < countBlocks && table!.stateAt(offsetBlocks + i) === BlockState.DATA &&
        table!.location[offsetBlocks + i] === startLocation + (i - start) &&
        Math.floor((startLocation + (i - start)) / bps) === segment
      );
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
      }
      for (let r = 0; r < lengths.length; r++) {
        if (lengths[r] !== readLengths[r]) {
          throw new ShaleError('CHECKSUM', `volume ${volumeId} chunk ${chunkIndex}: short read from the disk`, { volumeId, chunkIndex });
        }
      }
      for (let b = 0; b < countBlocks; b++) {
        if (states[b] !== BlockState.DATA) continue;
        const start = b * BLOCK_SIZE_BYTES;
        if (crc32c(data.subarray(start, start + BLOCK_SIZE_BYTES)) !== checksums[b]) {
          const block = offsetBlocks + b;
          throw new ShaleError('CHECKSUM', `volume ${volumeId} chunk ${chunkIndex} block ${block}: data does not match its crc32c`,
            { volumeId, chunkIndex, block });
        }
      }
    }
    return { data, checksums, states, versions: { epochs, seqs } };
  }

  /** Every object holding at least one block (data or tombstone). Safe to interleave with writes. */
  *listObjects(): IterableIterator<ObjectKey> {
    for (const table of this.#index.objects()) {
      if (table.presentBlocks > 0 && !this.#purged.has(table.volumeId)) yield { volumeId: table.volumeId, chunkIndex: table.chunkIndex };
    }
  }

  /** State and version of every block of the object up to the highest written (copies), or undefined. */
  objectVersions(volumeId: number, chunkIndex: number): ObjectVersions | undefined {
    if (this.#purged.has(volumeId)) return undefined;
    const table = this.#index.get(volumeId, chunkIndex);
    if (!table || table.presentBlocks === 0) return undefined;
    const blocks = table.highestBlocks;
    return {
      volumeId,
      chunkIndex,
      states: table.state.slice(0, blocks),
      epochs: table.epoch.slice(0, blocks),
      seqs: table.seq.slice(0, blocks),
    };
  }

  stats(): EngineStats {
    const segmentBytes = this.#segmentSizeBytes;
    const usableBlocks = this.#blocksPerSegment - SEGMENT_HEADER_BLOCKS;
    const openRemaining = this.#openSegment >= 0 ? this.#blocksPerSegment - this.#openPositionBlocks : 0;
    const clientSegments = Math.max(0, this.#freeCount - this.#reserveSegments);
    let damaged = 0;
    for (let s = 0; s < this.#segmentCount; s++) damaged += this.#damaged[s]!;
    return {
      capacityBytes: this.#segmentCount * segmentBytes,
      usedBytes: (this.#segmentCount - this.#freeCount) * segmentBytes,
      freeBytes: this.#freeCount * segmentBytes,
      liveBytes: this.#liveDataTotal * BLOCK_SIZE_BYTES,
      writableBytes: (clientSegments * usableBlocks + openRemaining) * BLOCK_SIZE_BYTES,
      segmentSizeBytes: segmentBytes,
      segmentCount: this.#segmentCount,
      freeSegments: this.#freeCount,
      pendingFreeSegments: this.#pendingFreeCount,
      reserveSegments: this.#reserveSegments,
      damagedSegments: damaged,
      objectCount: this.#index.objectCount,
      compactedSegments: this.#compactedSegments,
      batchesWritten: this.#batchesWritten,
      syncs: this.#syncs,
    };
  }

  /** Compacts the segment with the least live data now, if that frees anything. Resolves true if one was freed. */
  compact(): Promise<boolean> {
    if (this.#closing || this.#closed) return Promise.reject(new ShaleError('SHUTTING_DOWN', 'store engine is closing'));
    return this.#runTask(async () => {
      const victim = this.#pickVictim(false);
      return victim >= 0 ? this.#compactSegment(victim) : false;
    });
  }

  /** Waits for queued writes, syncs, writes a closing marker and closes the file. Idempotent. */
  close(): Promise<void> {
    if (this.#closePromise) return this.#closePromise;
    this.#closing = true;
    this.#compactionTimer?.cancel();
    this.#compactionTimer = undefined;
    this.#closePromise = (async () => {
      await this.#whenIdle();
      try {
        if (!this.#broken && this.#lastWrittenSequence >= this.#incarnationFirstSequence) {
          await this.#syncUpTo(this.#lastWrittenSequence);
          await this.#writeCloseMarker();
          await this.#syncUpTo(this.#lastWrittenSequence);
        }
      } finally {
        this.#closed = true;
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
      // Let every request submitted in this turn join the first batch.
      await null;
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
      this.#setBroken(toDiskError(error, 'store engine writer'));
    } finally {
      this.#writerRunning = false;
    }
    if (this.#broken) this.#rejectQueued(this.#broken);
    // Work may have arrived while the last (empty) turn was settling.
    if (!this.#broken && (this.#tasks.length > 0 || !this.#queue.isEmpty)) {
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
    if (!this.#writerRunning && this.#queue.isEmpty && this.#tasks.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /** Forms and writes one batch. False when there is nothing (more) to write. */
  async #writeNext(): Promise<boolean> {
    const plan = this.#formBatch();
    if (plan === FORM_IDLE || plan === FORM_BLOCKED) return false;
    if (plan === FORM_NEED_SPACE) {
      if (!this.#outOfSpace && (await this.#makeSpace())) return true;
      this.#outOfSpace = true;
      const op = this.#queue.shift();
      assert(op, 'need-space without a queued request');
      op.reject?.(new ShaleError('NO_SPACE', `disk ${this.#file.path} is full: no free segment left for client writes`,
        { freeSegments: this.#freeCount, reserveSegments: this.#reserveSegments }));
      return true;
    }
    await this.#writeBatch(plan);
    return true;
  }

  /**
   * Takes requests (compaction copies first) into one batch, bounded by batchDataBlocksMax,
   * batchRecordsMax and the room left in the open segment; opens a new segment when needed and
   * allowed. A request too large for the room left is split over batches.
   */
  #formBatch(): FormResult {
    const pieces: BatchPiece[] = [];
    let records = 0;
    let dataBlocks = 0;
    let segmentHeader: Buffer | undefined;
    while (records < batchRecordsMax) {
      const fromCompaction = !this.#compactionQueue.isEmpty;
      const queue = fromCompaction ? this.#compactionQueue : this.#queue;
      const op = queue.peek();
      if (op === undefined) break;
      const take = this.#openSegment < 0 ? 0 : this.#fit(op, records, dataBlocks);
      if (take === 0) {
        if (pieces.length > 0) break;
        if (!this.#mayOpenSegment(op.mayUseReserve)) {
          return fromCompaction || this.#compacting ? FORM_BLOCKED : FORM_NEED_SPACE;
        }
        segmentHeader = this.#openNewSegment();
        assert(this.#fit(op, 0, 0) > 0, 'a request does not fit in an empty segment');
        continue;
      }
      let last = true;
      if (op.kind === RecordKind.DATA) {
        pieces.push({ op, firstBlock: op.placedBlocks, countBlocks: take, dataIndexBlocks: dataBlocks, last: false });
        op.placedBlocks += take;
        dataBlocks += take;
        last = op.placedBlocks === op.countBlocks;
        pieces[pieces.length - 1]!.last = last;
      } else {
        pieces.push({ op, firstBlock: 0, countBlocks: op.countBlocks, dataIndexBlocks: 0, last: true });
      }
      records++;
      if (last) queue.shift();
    }
    if (pieces.length === 0) return FORM_IDLE;

    const sequence = this.#nextSequence++;
    const segment = this.#openSegment;
    const positionBlocks = this.#openPositionBlocks;
    const headerBlocks = batchHeaderBlocks(records, dataBlocks);
    assert(positionBlocks + headerBlocks + dataBlocks <= this.#blocksPerSegment, 'batch overflows its segment');
    const header = Buffer.alloc(headerBlocks * BLOCK_SIZE_BYTES);
    const buffers: Buffer[] = segmentHeader ? [segmentHeader, header] : [header];
    for (let r = 0; r < pieces.length; r++) {
      const piece = pieces[r]!;
      const op = piece.op;
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
      });
      if (op.kind === RecordKind.DATA) {
        const checksums = op.checksums!;
        for (let b = 0; b < piece.countBlocks; b++) writeCrcEntry(header, records, piece.dataIndexBlocks + b, checksums[piece.firstBlock + b]!);
        buffers.push(op.data!.subarray(piece.firstBlock * BLOCK_SIZE_BYTES, (piece.firstBlock + piece.countBlocks) * BLOCK_SIZE_BYTES));
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
    });
    this.#openPositionBlocks += headerBlocks + dataBlocks;
    const segmentStart = this.#segmentOffsetBytes(segment);
    const offsetBytes = segmentHeader ? segmentStart : segmentStart + positionBlocks * BLOCK_SIZE_BYTES;
    return { sequence, segment, positionBlocks, headerBlocks, dataBlocks, pieces, buffers, offsetBytes };
  }

  /** How much of `op` fits in the open segment next to what the batch holds: DATA blocks, or 1 for a record without data; 0 if nothing. */
  #fit(op: PendingOp, records: number, dataBlocks: number): number {
    const remaining = this.#blocksPerSegment - this.#openPositionBlocks;
    if (op.kind !== RecordKind.DATA) return batchHeaderBlocks(records + 1, dataBlocks) + dataBlocks <= remaining ? 1 : 0;
    let take = Math.min(op.countBlocks - op.placedBlocks, batchDataBlocksMax - dataBlocks, remaining - dataBlocks - 1);
    while (take > 0 && batchHeaderBlocks(records + 1, dataBlocks + take) + dataBlocks + take > remaining) take--;
    return Math.max(0, take);
  }

  #mayOpenSegment(mayUseReserve: boolean): boolean {
    if (this.#freeCount <= (mayUseReserve ? 0 : this.#reserveSegments)) return false;
    return this.#pickFreeSegment() >= 0;
  }

  /** A free segment no read is using, or -1. */
  #pickFreeSegment(): number {
    for (let s = 0; s < this.#segmentCount; s++) {
      if (this.#segmentState[s] === SegmentState.FREE && this.#readPins[s] === 0) return s;
    }
    return -1;
  }

  /** Seals the open segment and opens a free one with the next generation. Returns its header (two copies). */
  #openNewSegment(): Buffer {
    this.#sealOpenSegment();
    const segment = this.#pickFreeSegment();
    assert(segment >= 0, 'no free segment to open');
    assert(this.#liveDataBlocks[segment] === 0 && this.#liveMetaBlocks[segment] === 0, 'a free segment holds live records');
    const generation = this.#generationMax[segment]! + 1;
    this.#segmentState[segment] = SegmentState.OPEN;
    this.#freeCount--;
    this.#generation[segment] = generation;
    this.#generationMax[segment] = generation;
    this.#firstSequence[segment] = this.#nextSequence;
    this.#damaged[segment] = 0;
    this.#openSegment = segment;
    this.#openPositionBlocks = SEGMENT_HEADER_BLOCKS;
    const copy = encodeSegmentHeader({ segmentIndex: segment, generation, firstSequence: this.#nextSequence, formatId: this.#formatId });
    return Buffer.concat([copy, copy]);
  }

  #sealOpenSegment(): void {
    const segment = this.#openSegment;
    if (segment < 0) return;
    this.#openSegment = -1;
    this.#segmentState[segment] = SegmentState.SEALED;
    if (this.#liveDataBlocks[segment] === 0 && this.#liveMetaBlocks[segment] === 0) this.#markPendingFree(segment);
  }

  async #writeBatch(batch: Batch): Promise<void> {
    try {
      await this.#file.writev(batch.buffers, batch.offsetBytes);
    } catch (error) {
      const failure = toDiskError(error, `write of batch ${batch.sequence} to ${this.#file.path}`);
      for (const piece of batch.pieces) piece.op.reject?.(failure);
      this.#setBroken(failure);
      throw failure;
    }
    assert(batch.sequence === this.#lastWrittenSequence + 1, 'batches written out of order');
    this.#lastWrittenSequence = batch.sequence;
    this.#batchesWritten++;
    const headerLocation = batch.segment * this.#blocksPerSegment + batch.positionBlocks;
    const dataLocation = headerLocation + batch.headerBlocks;
    for (const piece of batch.pieces) {
      const op = piece.op;
      const offsetBlocks = op.offsetBlocks + piece.firstBlock;
      let applied = 0;
      switch (op.kind) {
        case RecordKind.DATA:
          applied = this.#applyBlocks(RecordKind.DATA, op.volumeId, op.chunkIndex, offsetBlocks, piece.countBlocks, op.epoch, op.seq,
            dataLocation + piece.dataIndexBlocks, op.checksums!, piece.firstBlock);
          break;
        case RecordKind.ZERO:
          applied = this.#applyBlocks(RecordKind.ZERO, op.volumeId, op.chunkIndex, offsetBlocks, piece.countBlocks, op.epoch, op.seq,
            headerLocation, undefined, 0);
          break;
        case RecordKind.FENCE:
          this.#applyFence(op.volumeId, op.epoch, headerLocation);
          break;
        case RecordKind.PURGE:
          this.#applyPurge(op.volumeId, headerLocation);
          break;
      }
      op.appliedBlocks += applied;
      op.skippedBlocks += piece.countBlocks - applied;
      if (piece.last) op.resolve?.({ appliedBlocks: op.appliedBlocks, skippedBlocks: op.skippedBlocks });
    }
  }

  /** A final empty batch recording that everything before it is durable (see the crash model). */
  async #writeCloseMarker(): Promise<void> {
    const segment = this.#openSegment;
    if (segment < 0 || this.#openPositionBlocks + 1 > this.#blocksPerSegment) return;
    const sequence = this.#nextSequence++;
    const header = Buffer.alloc(BLOCK_SIZE_BYTES);
    sealBatchHeader(header, {
      segmentIndex: segment,
      headerBlocks: 1,
      generation: this.#generation[segment]!,
      sequence,
      incarnationFirstSequence: this.#incarnationFirstSequence,
      durableSequence: this.#durableSequence,
      formatId: this.#formatId,
      positionBlocks: this.#openPositionBlocks,
      recordCount: 0,
      dataBlocks: 0,
    });
    const offsetBytes = this.#segmentOffsetBytes(segment) + this.#openPositionBlocks * BLOCK_SIZE_BYTES;
    this.#openPositionBlocks += 1;
    await this.#file.writev([header], offsetBytes);
    this.#lastWrittenSequence = sequence;
  }

  #setBroken(error: ShaleError): void {
    if (this.#broken) return;
    this.#broken = error;
    this.#compactionTimer?.cancel();
    this.#compactionTimer = undefined;
  }

  #rejectQueued(error: Error): void {
    for (const op of this.#queue.drain()) op.reject?.(error);
    this.#compactionQueue.drain();
    for (const task of this.#tasks.splice(0)) void task();
  }

  // -------------------------------------------------------------------------------------------
  // Durability

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
      const covers = this.#lastWrittenSequence;
      const promise = this.#file.sync().then(
        () => {
          this.#syncs++;
          if (covers > this.#durableSequence) this.#durableSequence = covers;
          this.#releasePendingFree(covers);
        },
        (error: unknown) => {
          // After a failed fsync the kernel may have dropped the dirty pages: nothing is trusted any more.
          const failure = toDiskError(error, `sync of ${this.#file.path}`);
          this.#setBroken(failure);
          throw failure;
        },
      );
      this.#syncInFlight = { promise, covers };
      try {
        await promise;
      } finally {
        if (this.#syncInFlight?.promise === promise) this.#syncInFlight = undefined;
      }
    }
  }

  #markPendingFree(segment: number): void {
    this.#segmentState[segment] = SegmentState.PENDING_FREE;
    this.#emptiedAtSequence[segment] = this.#lastWrittenSequence;
    this.#pendingFreeCount++;
    this.#outOfSpace = false;
    if (this.#emptiedAtSequence[segment]! <= this.#durableSequence) this.#releasePendingFree(this.#durableSequence);
  }

  #releasePendingFree(durable: number): void {
    if (this.#pendingFreeCount === 0) return;
    for (let s = 0; s < this.#segmentCount; s++) {
      if (this.#segmentState[s] === SegmentState.PENDING_FREE && this.#emptiedAtSequence[s]! <= durable) {
        this.#segmentState[s] = SegmentState.FREE;
        this.#pendingFreeCount--;
        this.#freeCount++;
        this.#outOfSpace = false;
      }
    }
  }

  // -------------------------------------------------------------------------------------------
  // Index: the version rule and space accounting

  /** a is later in the log than b (both locations of valid records). */
  #isLater(a: number, b: number): boolean {
    const bps = this.#blocksPerSegment;
    const segmentA = Math.floor(a / bps);
    const segmentB = Math.floor(b / bps);
    if (segmentA !== segmentB) return this.#firstSequence[segmentA]! > this.#firstSequence[segmentB]!;
    return a > b;
  }

  #addLive(location: number, isData: boolean): void {
    const segment = Math.floor(location / this.#blocksPerSegment);
    if (isData) {
      this.#liveDataBlocks[segment]!++;
      this.#liveDataTotal++;
    } else {
      this.#liveMetaBlocks[segment]!++;
    }
  }

  #dropLive(location: number, isData: boolean): void {
    const segment = Math.floor(location / this.#blocksPerSegment);
    if (isData) {
      this.#liveDataBlocks[segment]!--;
      this.#liveDataTotal--;
    } else {
      this.#liveMetaBlocks[segment]!--;
    }
    assert(this.#liveDataBlocks[segment]! >= 0 && this.#liveMetaBlocks[segment]! >= 0, 'segment live count went negative');
    this.#outOfSpace = false;
    if (!this.#replaying && this.#segmentState[segment] === SegmentState.SEALED &&
      this.#liveDataBlocks[segment] === 0 && this.#liveMetaBlocks[segment] === 0) {
      this.#markPendingFree(segment);
    }
  }

  /**
   * Applies a DATA or ZERO record to blocks offsetBlocks..+countBlocks by the version rule.
   * `location`: DATA — the location of the first data block (block i is at location + i);
   * ZERO — the batch header's location. Returns how many blocks took the version.
   */
  #applyBlocks(
    kind: RecordKindValue, volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number,
    epoch: number, seq: number, location: number, checksums: Uint32Array | undefined, checksumIndex: number,
  ): number {
    if (this.#purged.has(volumeId)) return 0;
    const isData = kind === RecordKind.DATA;
    const newState = isData ? BlockState.DATA : BlockState.ZERO;
    const table = this.#index.getOrCreate(volumeId, chunkIndex, offsetBlocks + countBlocks);
    let applied = 0;
    for (let i = 0; i < countBlocks; i++) {
      const block = offsetBlocks + i;
      const newLocation = isData ? location + i : location;
      const oldState = table.state[block]!;
      let moved = false;
      if (oldState !== BlockState.ABSENT) {
        const oldEpoch = table.epoch[block]!;
        const oldSeq = table.seq[block]!;
        if (epoch < oldEpoch || (epoch === oldEpoch && seq < oldSeq)) continue;
        if (epoch === oldEpoch && seq === oldSeq) {
          // The same write again: keep the copy that is later in the log (compaction copies, retries).
          if (!this.#isLater(newLocation, table.location[block]!)) continue;
          moved = true;
        }
        this.#dropLive(table.location[block]!, oldState === BlockState.DATA);
      } else {
        table.presentBlocks++;
        if (block + 1 > table.highestBlocks) table.highestBlocks = block + 1;
      }
      table.state[block] = newState;
      table.epoch[block] = epoch;
      table.seq[block] = seq;
      table.location[block] = newLocation;
      table.crc[block] = isData ? checksums![checksumIndex + i]! : ZERO_BLOCK_CRC;
      this.#addLive(newLocation, isData);
      if (!moved) applied++;
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
        const state = table.state[block];
        if (state !== BlockState.ABSENT) this.#dropLive(table.location[block]!, state === BlockState.DATA);
      }
    }
    const fence = this.#fences.get(volumeId);
    if (fence) {
      this.#fences.delete(volumeId);
      this.#dropLive(fence.location, false);
    }
    this.#ownerEpochs.delete(volumeId);
  }

  #applyDecodedBatch(batch: DecodedBatch, segment: number): void {
    const headerLocation = segment * this.#blocksPerSegment + batch.positionBlocks;
    const dataLocation = headerLocation + batch.headerBlocks;
    for (const record of batch.records) {
      switch (record.kind) {
        case RecordKind.DATA:
          this.#applyBlocks(RecordKind.DATA, record.volumeId, record.chunkIndex, record.offsetBlocks, record.countBlocks, record.epoch,
            record.seq, dataLocation + record.dataIndexBlocks, batch.checksums, record.dataIndexBlocks);
          break;
        case RecordKind.ZERO:
          this.#applyBlocks(RecordKind.ZERO, record.volumeId, record.chunkIndex, record.offsetBlocks, record.countBlocks, record.epoch,
            record.seq, headerLocation, undefined, 0);
          break;
        case RecordKind.FENCE:
          this.#applyFence(record.volumeId, record.epoch, headerLocation);
          break;
        case RecordKind.PURGE:
          this.#applyPurge(record.volumeId, headerLocation);
          break;
      }
    }
  }

  /** How many of the batch's bad data blocks the index points at. */
  #liveBadBlocks(batch: DecodedBatch, segment: number, badBlocks: readonly number[]): number {
    const dataLocation = segment * this.#blocksPerSegment + batch.positionBlocks + batch.headerBlocks;
    let live = 0;
    for (const bad of badBlocks) {
      for (const record of batch.records) {
        if (record.kind !== RecordKind.DATA || bad < record.dataIndexBlocks || bad >= record.dataIndexBlocks + record.countBlocks) continue;
        if (this.#purged.has(record.volumeId)) continue;
        const table = this.#index.get(record.volumeId, record.chunkIndex);
        const block = record.offsetBlocks + (bad - record.dataIndexBlocks);
        if (table && table.stateAt(block) === BlockState.DATA && table.location[block] === dataLocation + bad) live++;
      }
    }
    return live;
  }

  // -------------------------------------------------------------------------------------------
  // Replay

  async #replay(order: readonly number[] | undefined): Promise<void> {
    const count = this.#segmentCount;
    const segments = order ?? Array.from({ length: count }, (_, s) => s);
    assert(segments.length === count && new Set(segments).size === count && segments.every((s) => s >= 0 && s < count),
      'replay order must be a permutation of the segments');
    this.#replaying = true;
    const report: ReplayReport = {
      segmentsScanned: 0, batchesApplied: 0, staleBatches: 0, tornBatches: 0, corruptBatches: 0, corruptBlocks: 0, damagedHeaders: 0, nextSequence: 0,
    };
    const gapsBefore: { segment: number; sequence: number }[] = [];
    const buffer = Buffer.alloc(this.#segmentSizeBytes);
    const validHeader = new Uint8Array(count);
    /** Instance (first sequence) → highest sequence it recorded as durable. */
    const durableUpTo = new Map<number, number>();
    const damaged: { batch: DecodedBatch; segment: number; badBlocks: number[] }[] = [];
    let sequenceMax = 0;
    for (const segment of segments) {
      const length = await this.#file.read(buffer, this.#segmentOffsetBytes(segment));
      if (length < buffer.length) buffer.fill(0, length);
      report.segmentsScanned++;
      const scan = scanSegment(buffer, segment, this.#formatId);
      this.#generationMax[segment] = scan.generationMax;
      sequenceMax = Math.max(sequenceMax, scan.sequenceMax);
      report.staleBatches += scan.staleBatches;
      // A durability claim stays true whatever happened to the segment that carries it.
      for (const [first, durable] of scan.durableClaims) {
        if (durable > (durableUpTo.get(first) ?? -1)) durableUpTo.set(first, durable);
      }
      if (!scan.header) continue;
      for (const sequence of scan.gapsBefore) gapsBefore.push({ segment, sequence });
      validHeader[segment] = 1;
      this.#generation[segment] = scan.header.generation;
      this.#firstSequence[segment] = scan.header.firstSequence;
      for (const batch of scan.batches) {
        const badBlocks = badDataBlocks(buffer, batch);
        if (badBlocks.length === 0) {
          this.#applyDecodedBatch(batch, segment);
          report.batchesApplied++;
        } else {
          damaged.push({ batch, segment, badBlocks });
        }
      }
    }
    // Torn or corrupt? Decided once every header is known (docs/format.md, "Replay rules").
    const knownDurable = (sequence: number): boolean => {
      for (const [first, durable] of durableUpTo) if (sequence >= first && sequence <= durable) return true;
      return false;
    };
    for (const { batch, segment, badBlocks } of damaged) {
      if (knownDurable(batch.sequence)) {
        // Applied after every good batch, so the version rule has already decided which of its
        // blocks are still live; damage to superseded blocks (a reuse of the segment torn by a
        // crash) harms nothing and is not reported.
        this.#applyDecodedBatch(batch, segment);
        report.batchesApplied++;
        const liveBad = this.#liveBadBlocks(batch, segment, badBlocks);
        if (liveBad > 0) report.corruptBatches++;
        report.corruptBlocks += liveBad;
      } else {
        report.tornBatches++;
      }
    }
    // A gap before a durable batch means a durable batch is unreadable — unless the segment holds
    // nothing live: then it was free and a crash tore the write that was reusing it.
    for (const { segment, sequence } of gapsBefore) {
      if (knownDurable(sequence) && (this.#liveDataBlocks[segment]! > 0 || this.#liveMetaBlocks[segment]! > 0)) report.damagedHeaders++;
    }
    for (let s = 0; s < count; s++) {
      if (validHeader[s] && (this.#liveDataBlocks[s]! > 0 || this.#liveMetaBlocks[s]! > 0)) {
        this.#segmentState[s] = SegmentState.SEALED;
      } else {
        this.#segmentState[s] = SegmentState.FREE;
        this.#freeCount++;
        assert(this.#liveDataBlocks[s] === 0 && this.#liveMetaBlocks[s] === 0, 'live records in a segment without a header');
      }
    }
    this.#nextSequence = sequenceMax + 1;
    this.#incarnationFirstSequence = this.#nextSequence;
    this.#lastWrittenSequence = sequenceMax;
    this.#durableSequence = sequenceMax;
    report.nextSequence = this.#nextSequence;
    this.#replayReport = report;
    this.#replaying = false;
  }

  // -------------------------------------------------------------------------------------------
  // Space: making room and compaction

  /** Blocks clients could fill without compaction. */
  #writableBlocks(): number {
    const open = this.#openSegment >= 0 ? this.#blocksPerSegment - this.#openPositionBlocks : 0;
    return Math.max(0, this.#freeCount - this.#reserveSegments) * (this.#blocksPerSegment - SEGMENT_HEADER_BLOCKS) + open;
  }

  /** Called when a client request needs a new segment and none may be taken. True if progress was made. */
  async #makeSpace(): Promise<boolean> {
    if (this.#pendingFreeCount > 0) {
      await this.#syncUpTo(this.#lastWrittenSequence);
      return true;
    }
    const before = this.#writableBlocks();
    const victim = this.#pickVictim(false);
    if (victim < 0) return false;
    await this.#compactSegment(victim);
    return this.#writableBlocks() > before;
  }

  /** Estimated blocks it costs to copy a segment's live records. */
  #copyCostBlocks(segment: number): number {
    const meta = this.#liveMetaBlocks[segment]!;
    return this.#liveDataBlocks[segment]! + Math.ceil((meta * RECORD_ENTRY_BYTES) / BLOCK_SIZE_BYTES) + 1;
  }

  /** The sealed segment cheapest to compact, if compacting it frees space (background: frees enough). */
  #pickVictim(background: boolean): number {
    const usable = this.#blocksPerSegment - SEGMENT_HEADER_BLOCKS;
    const costMax = background ? Math.floor(usable * compactionLiveFractionMax) : usable - 1;
    let best = -1;
    let bestCost = Infinity;
    for (let s = 0; s < this.#segmentCount; s++) {
      if (this.#segmentState[s] !== SegmentState.SEALED || this.#damaged[s]) continue;
      const cost = this.#copyCostBlocks(s);
      if (cost < bestCost) {
        best = s;
        bestCost = cost;
      }
    }
    return bestCost <= costMax ? best : -1;
  }

  #maybeScheduleCompaction(): void {
    if (!this.#backgroundCompaction || this.#compactionTimer || this.#closing || this.#broken) return;
    if (this.#freeCount >= this.#compactionFreeSegmentsMin || this.#pickVictim(true) < 0) return;
    this.#compactionTimer = this.#env.clock.after(this.#compactionIdleDelayMs, () => {
      this.#compactionTimer = undefined;
      if (this.#closing || this.#broken || this.#writerRunning) return;
      this.#runTask(async () => {
        while (this.#freeCount < this.#compactionFreeSegmentsMin && this.#queue.isEmpty && !this.#closing) {
          const victim = this.#pickVictim(true);
          if (victim < 0 || !(await this.#compactSegment(victim))) break;
        }
      }).catch(() => {
        // A failed compaction marks its victim damaged or breaks the engine; both are reported elsewhere.
      });
    });
    this.#compactionTimer.unref();
  }

  /**
   * Copies the live records of `victim` (with their versions, snap stamps and crcs) to the open
   * segment, syncs, and so frees it. Runs as the writer. True if the victim was freed.
   */
  async #compactSegment(victim: number): Promise<boolean> {
    assert(this.#segmentState[victim] === SegmentState.SEALED, 'compaction victim is not sealed');
    this.#compacting = true;
    try {
      const buffer = (this.#compactionBuffer ??= Buffer.allocUnsafe(this.#segmentSizeBytes));
      let length: number;
      try {
        length = await this.#file.read(buffer, this.#segmentOffsetBytes(victim));
      } catch {
        this.#damaged[victim] = 1;
        return false;
      }
      if (length < buffer.length) {
        this.#damaged[victim] = 1;
        return false;
      }
      const scan = scanSegment(buffer, victim, this.#formatId);
      if (!scan.header || scan.header.generation !== this.#generation[victim]) {
        this.#damaged[victim] = 1;
        return false;
      }
      const base = victim * this.#blocksPerSegment;
      for (const batch of scan.batches) {
        const headerLocation = base + batch.positionBlocks;
        const dataLocation = headerLocation + batch.headerBlocks;
        const dataStartBytes = (batch.positionBlocks + batch.headerBlocks) * BLOCK_SIZE_BYTES;
        for (const record of batch.records) {
          switch (record.kind) {
            case RecordKind.DATA: {
              const table = this.#purged.has(record.volumeId) ? undefined : this.#index.get(record.volumeId, record.chunkIndex);
              if (!table) break;
              const recordLocation = dataLocation + record.dataIndexBlocks;
              let runStart = -1;
              for (let i = 0; i <= record.countBlocks; i++) {
                const block = record.offsetBlocks + i;
                const live = i < record.countBlocks && table.stateAt(block) === BlockState.DATA && table.location[block] === recordLocation + i;
                if (live && runStart < 0) runStart = i;
                if (!live && runStart >= 0) {
                  const from = dataStartBytes + (record.dataIndexBlocks + runStart) * BLOCK_SIZE_BYTES;
                  this.#compactionQueue.push(newOp(RecordKind.DATA, record.volumeId, record.chunkIndex, record.offsetBlocks + runStart, i - runStart,
                    record.epoch, record.seq, record.snapSeq, buffer.subarray(from, from + (i - runStart) * BLOCK_SIZE_BYTES),
                    batch.checksums.slice(record.dataIndexBlocks + runStart, record.dataIndexBlocks + i), true));
                  runStart = -1;
                }
              }
              break;
            }
            case RecordKind.ZERO: {
              const table = this.#purged.has(record.volumeId) ? undefined : this.#index.get(record.volumeId, record.chunkIndex);
              if (!table) break;
              let runStart = -1;
              for (let i = 0; i <= record.countBlocks; i++) {
                const block = record.offsetBlocks + i;
                const live = i < record.countBlocks && table.stateAt(block) === BlockState.ZERO && table.location[block] === headerLocation &&
                  table.epoch[block] === record.epoch && table.seq[block] === record.seq;
                if (live && runStart < 0) runStart = i;
                if (!live && runStart >= 0) {
                  this.#compactionQueue.push(newOp(RecordKind.ZERO, record.volumeId, record.chunkIndex, record.offsetBlocks + runStart, i - runStart,
                    record.epoch, record.seq, record.snapSeq, undefined, undefined, true));
                  runStart = -1;
                }
              }
              break;
            }
            case RecordKind.FENCE:
              if (this.#fences.get(record.volumeId)?.location === headerLocation) {
                this.#compactionQueue.push(newOp(RecordKind.FENCE, record.volumeId, 0, 0, 0, record.epoch, 0, 0, undefined, undefined, true));
              }
              break;
            case RecordKind.PURGE:
              if (this.#purged.get(record.volumeId) === headerLocation) {
                this.#compactionQueue.push(newOp(RecordKind.PURGE, record.volumeId, 0, 0, 0, 0, 0, 0, undefined, undefined, true));
              }
              break;
          }
        }
      }
      while (!this.#compactionQueue.isEmpty) {
        if (await this.#writeNext()) continue;
        if (this.#pendingFreeCount > 0) {
          await this.#syncUpTo(this.#lastWrittenSequence);
          continue;
        }
        // Not even the reserve is left: give up; what was copied so far is simply garbage there.
        this.#compactionQueue.drain();
        return false;
      }
      if (this.#liveDataBlocks[victim]! > 0 || this.#liveMetaBlocks[victim]! > 0) {
        // Something live was in a batch the scan could not read (damaged since it was written).
        this.#damaged[victim] = 1;
        return false;
      }
      // The copies must be durable before the victim can be reused: that is what makes a crash
      // at any moment of compaction lose nothing.
      await this.#syncUpTo(this.#lastWrittenSequence);
      this.#compactedSegments++;
      return true;
    } finally {
      this.#compacting = false;
    }
  }

  // -------------------------------------------------------------------------------------------

  #segmentOffsetBytes(segment: number): number {
    return this.#segmentAreaOffsetBytes + segment * this.#segmentSizeBytes;
  }

  #locationOffsetBytes(location: number): number {
    return this.#segmentAreaOffsetBytes + location * BLOCK_SIZE_BYTES;
  }
}

function newOp(
  kind: RecordKindValue, volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, epoch: number, seq: number,
  snapSeq: number, data: Buffer | undefined, checksums: Uint32Array | undefined, mayUseReserve: boolean,
): PendingOp {
  return {
    kind, volumeId, chunkIndex, offsetBlocks, countBlocks, epoch, seq, snapSeq, data, checksums,
    placedBlocks: 0, mayUseReserve, appliedBlocks: 0, skippedBlocks: 0, resolve: undefined, reject: undefined,
  };
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
