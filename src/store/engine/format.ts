/**
 * The store engine's on-disk format, version 1: pure encoders and decoders over Buffers, no I/O.
 * docs/format.md describes every byte; keep the two in step.
 *
 *   block 0, 1          superblock, two identical copies
 *   rootSlotOffset      checkpoint root slot 0, then slot 1 (each `rootSlotSizeBytes`)
 *   segmentAreaOffset   segment 0, segment 1, … each `segmentSizeBytes`
 *
 *   log segment:         [segment header ×2][batch][batch]…[unused]
 *   checkpoint segment:  [segment header ×2][a piece of a checkpoint image]
 *   batch:               [header block(s): fixed part, record entries, crc table, inline payloads][data blocks]
 *
 * Every structure starts with its magic, its format version and its crc32c; integers are
 * little-endian; u64 fields are read as JavaScript numbers and a value above 2^53 makes the
 * structure invalid (Shale never writes one). Validation never throws: a decoder returns
 * `undefined` for anything that is not a valid structure of this format.
 */
import { crc32c } from '../../lib/crc32c.ts';
import { BLOCK_SIZE_BYTES, KiB, MiB } from '../../lib/units.ts';

export const FORMAT_VERSION = 1;

export const SUPERBLOCK_MAGIC = Buffer.from('SHALE-SB', 'latin1');
export const SEGMENT_MAGIC = Buffer.from('SHALESEG', 'latin1');
export const BATCH_MAGIC = Buffer.from('SHALEBAT', 'latin1');
export const ROOT_MAGIC = Buffer.from('SHALEROT', 'latin1');

/** Superblock copies at blocks 0 and 1. */
export const SUPERBLOCK_COPIES = 2;
/** The two checkpoint root slots start right after the superblock copies. */
export const ROOT_SLOT_OFFSET_BYTES = SUPERBLOCK_COPIES * BLOCK_SIZE_BYTES;
export const ROOT_SLOTS = 2;
/** The segment area starts at a multiple of this. */
export const SEGMENT_AREA_ALIGN_BYTES = 1 * MiB;
/** Kept for callers that size small test disks: the metadata area of a disk of up to 52 000 segments. */
export const METADATA_AREA_BYTES = 1 * MiB;
/** Every segment starts with two identical copies of its header. */
export const SEGMENT_HEADER_BLOCKS = 2;
export const CLUSTER_ID_BYTES_MAX = 64;
export const SEGMENT_SIZE_BYTES_DEFAULT = 16 * MiB;
export const SEGMENT_SIZE_BYTES_MIN = 64 * 1024;
export const SEGMENT_SIZE_BYTES_MAX = 1024 * MiB;
/** Locations are u32 block numbers in the segment area: 16 TiB of segments per disk in format 1. */
export const SEGMENT_AREA_BLOCKS_MAX = 2 ** 32 - 1;

export const BATCH_FIXED_BYTES = 128;
export const RECORD_ENTRY_BYTES = 64;
export const CRC_ENTRY_BYTES = 4;
/** Largest object: 1 GiB chunks of 4 KiB blocks. */
export const CHUNK_BLOCKS_MAX = (1024 * MiB) / BLOCK_SIZE_BYTES;
/** Key-value records: key and value limits (a record must fit in the smallest segment). */
export const KV_KEY_BYTES_MAX = 1 * KiB;
export const KV_VALUE_BYTES_MAX = 32 * KiB;
/** Inline payload bytes in one batch. */
export const BATCH_PAYLOAD_BYTES_MAX = 256 * KiB;
/** Live snapshot ids in one SNAPSHOTS record. */
export const SNAPSHOT_IDS_MAX = 4096;

export const ROOT_FIXED_BYTES = 128;
export const ROOT_ENTRY_BYTES = 16;

export const SegmentKind = {
  /** Batches of records. */
  LOG: 1,
  /** A piece of a checkpoint image. */
  CHECKPOINT: 2,
} as const;
export type SegmentKindValue = (typeof SegmentKind)[keyof typeof SegmentKind];

export const RecordKind = {
  /** Data blocks: offsetBlocks..+countBlocks of the object, data in the batch. */
  DATA: 1,
  /** A tombstone over offsetBlocks..+countBlocks (TRIM, WRITE_ZEROES): reads as zeros, no data. */
  ZERO: 2,
  /** The volume's owner epoch was raised to `epoch`. */
  FENCE: 3,
  /** The volume was deleted: every record of it is dead, whatever its version. */
  PURGE: 4,
  /** The volume's live snapshot ids (payload: u64 each, ascending); `seq` holds the snap sequence they are complete up to. */
  SNAPSHOTS: 5,
  /** Compaction dropped the tombstone (epoch, seq) over offsetBlocks..+countBlocks: those blocks become absent. */
  DROP: 6,
  /** A key-value record of shard `volumeId` (payload: u16 key length, key, value). */
  KV_PUT: 7,
  /** A key-value tombstone of shard `volumeId` (payload: u16 key length, key). */
  KV_DELETE: 8,
} as const;
export type RecordKindValue = (typeof RecordKind)[keyof typeof RecordKind];

/** SNAPSHOTS record flags. */
export const SnapshotFlags = {
  /** Absent blocks of this volume read through to a parent: tombstones are never dropped. */
  KEEP_TOMBSTONES: 1,
} as const;

const TWO_32 = 2 ** 32;

export function readU64(buffer: Buffer, offset: number): number | undefined {
  const low = buffer.readUInt32LE(offset);
  const high = buffer.readUInt32LE(offset + 4);
  if (high >= 2 ** 21) return undefined;
  return high * TWO_32 + low;
}

export function writeU64(buffer: Buffer, offset: number, value: number): void {
  buffer.writeUInt32LE(value % TWO_32 >>> 0, offset);
  buffer.writeUInt32LE(Math.floor(value / TWO_32) >>> 0, offset + 4);
}

/**
 * A byte loop, not Buffer.compare: a compaction scan asks this of every block of a segment, and
 * nearly all of them (data) differ at the first byte; compare's call into C++ cost more than that.
 */
function hasMagic(buffer: Buffer, offset: number, magic: Buffer): boolean {
  if (offset + magic.length > buffer.length) return false;
  for (let i = 0; i < magic.length; i++) {
    if (buffer[offset + i] !== magic[i]) return false;
  }
  return true;
}

/** crc32c of `length` bytes at `offset`, counting the 4 bytes at `offset + 12` as zeros. */
function structureCrc(buffer: Buffer, offset: number, length: number): number {
  let crc = crc32c(buffer.subarray(offset, offset + 12));
  crc = crc32c(ZERO_WORD, crc);
  return crc32c(buffer.subarray(offset + 16, offset + length), crc);
}
const ZERO_WORD = Buffer.alloc(4);

export function uuidToBytes(uuid: string): Buffer | undefined {
  const hex = uuid.replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) return undefined;
  return Buffer.from(hex, 'hex');
}

export function bytesToUuid(bytes: Buffer): string {
  const hex = bytes.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20, 32)}`;
}

function roundUp(value: number, multiple: number): number {
  return Math.ceil(value / multiple) * multiple;
}

/** Size of one root slot for a disk of `segmentCount` segments: every segment can be listed once. */
export function rootSlotSizeBytes(segmentCount: number): number {
  return roundUp(ROOT_FIXED_BYTES + ROOT_ENTRY_BYTES * segmentCount, BLOCK_SIZE_BYTES);
}

/** Where the segment area starts for a disk of `segmentCount` segments. */
export function segmentAreaOffsetBytes(segmentCount: number): number {
  return roundUp(ROOT_SLOT_OFFSET_BYTES + ROOT_SLOTS * rootSlotSizeBytes(segmentCount), SEGMENT_AREA_ALIGN_BYTES);
}

// ---------------------------------------------------------------------------------------------
// Superblock

export interface Superblock {
  formatVersion: number;
  segmentSizeBytes: number;
  segmentCount: number;
  segmentAreaOffsetBytes: number;
  /** Size the disk was formatted with. */
  sizeBytes: number;
  formattedWallMs: number;
  diskUuid: string;
  /** Random at every format: segment and batch headers and roots repeat it, so a reformatted disk's old records are never read. */
  formatId: Buffer;
  clusterId: string;
  /** Offset of checkpoint root slot 0; slot 1 follows it. */
  rootSlotOffsetBytes: number;
  rootSlotSizeBytes: number;
}

export function encodeSuperblock(superblock: Superblock): Buffer {
  const block = Buffer.alloc(BLOCK_SIZE_BYTES);
  const clusterId = Buffer.from(superblock.clusterId, 'utf8');
  const diskUuid = uuidToBytes(superblock.diskUuid);
  if (clusterId.length === 0 || clusterId.length > CLUSTER_ID_BYTES_MAX) throw new RangeError('cluster id must be 1..64 bytes');
  if (!diskUuid) throw new RangeError(`disk uuid "${superblock.diskUuid}" is not a uuid`);
  if (superblock.formatId.length !== 16) throw new RangeError('format id must be 16 bytes');
  SUPERBLOCK_MAGIC.copy(block, 0);
  block.writeUInt32LE(superblock.formatVersion, 8);
  block.writeUInt32LE(BLOCK_SIZE_BYTES, 16);
  block.writeUInt32LE(clusterId.length, 20);
  writeU64(block, 24, superblock.segmentSizeBytes);
  writeU64(block, 32, superblock.segmentCount);
  writeU64(block, 40, superblock.segmentAreaOffsetBytes);
  writeU64(block, 48, superblock.sizeBytes);
  writeU64(block, 56, superblock.formattedWallMs);
  diskUuid.copy(block, 64);
  superblock.formatId.copy(block, 80);
  clusterId.copy(block, 96);
  writeU64(block, 160, superblock.rootSlotOffsetBytes);
  writeU64(block, 168, superblock.rootSlotSizeBytes);
  block.writeUInt32LE(structureCrc(block, 0, BLOCK_SIZE_BYTES), 12);
  return block;
}

export type SuperblockDecode =
  | { ok: true; superblock: Superblock }
  | { ok: false; reason: 'no-magic' | 'bad-crc' | 'unknown-version' | 'invalid'; version?: number };

/** Decodes one superblock copy (4 KiB at `offset`). */
export function decodeSuperblock(buffer: Buffer, offset = 0): SuperblockDecode {
  if (buffer.length < offset + BLOCK_SIZE_BYTES || !hasMagic(buffer, offset, SUPERBLOCK_MAGIC)) return { ok: false, reason: 'no-magic' };
  // The version is read before the crc: a later format may checksum differently, and the
  // operator should hear "unknown version", not "damaged".
  const version = buffer.readUInt32LE(offset + 8);
  if (version !== FORMAT_VERSION) return { ok: false, reason: 'unknown-version', version };
  if (buffer.readUInt32LE(offset + 12) !== structureCrc(buffer, offset, BLOCK_SIZE_BYTES)) return { ok: false, reason: 'bad-crc' };
  const blockSize = buffer.readUInt32LE(offset + 16);
  const clusterIdLength = buffer.readUInt32LE(offset + 20);
  const segmentSizeBytes = readU64(buffer, offset + 24);
  const segmentCount = readU64(buffer, offset + 32);
  const areaOffsetBytes = readU64(buffer, offset + 40);
  const sizeBytes = readU64(buffer, offset + 48);
  const formattedWallMs = readU64(buffer, offset + 56);
  const rootOffsetBytes = readU64(buffer, offset + 160);
  const rootSizeBytes = readU64(buffer, offset + 168);
  if (
    blockSize !== BLOCK_SIZE_BYTES || clusterIdLength === 0 || clusterIdLength > CLUSTER_ID_BYTES_MAX ||
    segmentSizeBytes === undefined || segmentSizeBytes % BLOCK_SIZE_BYTES !== 0 ||
    segmentSizeBytes < SEGMENT_SIZE_BYTES_MIN || segmentSizeBytes > SEGMENT_SIZE_BYTES_MAX ||
    segmentCount === undefined || segmentCount < 1 ||
    areaOffsetBytes === undefined || areaOffsetBytes % BLOCK_SIZE_BYTES !== 0 ||
    sizeBytes === undefined || formattedWallMs === undefined ||
    areaOffsetBytes + segmentCount * segmentSizeBytes > sizeBytes ||
    (segmentCount * segmentSizeBytes) / BLOCK_SIZE_BYTES > SEGMENT_AREA_BLOCKS_MAX ||
    rootOffsetBytes === undefined || rootSizeBytes === undefined || rootOffsetBytes < ROOT_SLOT_OFFSET_BYTES ||
    rootOffsetBytes % BLOCK_SIZE_BYTES !== 0 || rootSizeBytes % BLOCK_SIZE_BYTES !== 0 ||
    rootSizeBytes < rootSlotSizeBytes(segmentCount) || rootOffsetBytes + ROOT_SLOTS * rootSizeBytes > areaOffsetBytes
  ) {
    return { ok: false, reason: 'invalid' };
  }
  return {
    ok: true,
    superblock: {
      formatVersion: version,
      segmentSizeBytes,
      segmentCount,
      segmentAreaOffsetBytes: areaOffsetBytes,
      sizeBytes,
      formattedWallMs,
      diskUuid: bytesToUuid(buffer.subarray(offset + 64, offset + 80)),
      formatId: Buffer.from(buffer.subarray(offset + 80, offset + 96)),
      clusterId: buffer.toString('utf8', offset + 96, offset + 96 + clusterIdLength),
      rootSlotOffsetBytes: rootOffsetBytes,
      rootSlotSizeBytes: rootSizeBytes,
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Segment header

export interface SegmentHeader {
  segmentIndex: number;
  kind: SegmentKindValue;
  /** Bumped every time the segment is reused; every batch in it repeats it. */
  generation: number;
  /** LOG: sequence number of the first batch of this generation (orders segments by age). CHECKPOINT: the checkpoint's sequence. */
  firstSequence: number;
  formatId: Buffer;
}

/** One copy of a segment header (4 KiB). */
export function encodeSegmentHeader(header: SegmentHeader): Buffer {
  const block = Buffer.alloc(BLOCK_SIZE_BYTES);
  SEGMENT_MAGIC.copy(block, 0);
  block.writeUInt32LE(FORMAT_VERSION, 8);
  block.writeUInt32LE(header.segmentIndex, 16);
  block.writeUInt32LE(header.kind, 20);
  writeU64(block, 24, header.generation);
  writeU64(block, 32, header.firstSequence);
  header.formatId.copy(block, 40);
  block.writeUInt32LE(structureCrc(block, 0, BLOCK_SIZE_BYTES), 12);
  return block;
}

/** Decodes one segment-header copy at `offset`; valid only for this disk (format id) and this segment. */
export function decodeSegmentHeader(buffer: Buffer, offset: number, segmentIndex: number, formatId: Buffer): SegmentHeader | undefined {
  if (buffer.length < offset + BLOCK_SIZE_BYTES || !hasMagic(buffer, offset, SEGMENT_MAGIC)) return undefined;
  if (buffer.readUInt32LE(offset + 12) !== structureCrc(buffer, offset, BLOCK_SIZE_BYTES)) return undefined;
  if (buffer.readUInt32LE(offset + 8) !== FORMAT_VERSION) return undefined;
  if (buffer.readUInt32LE(offset + 16) !== segmentIndex) return undefined;
  const kind = buffer.readUInt32LE(offset + 20);
  if (kind !== SegmentKind.LOG && kind !== SegmentKind.CHECKPOINT) return undefined;
  if (buffer.compare(formatId, 0, 16, offset + 40, offset + 56) !== 0) return undefined;
  const generation = readU64(buffer, offset + 24);
  const firstSequence = readU64(buffer, offset + 32);
  if (generation === undefined || generation < 1 || firstSequence === undefined) return undefined;
  return { segmentIndex, kind: kind as SegmentKindValue, generation, firstSequence, formatId };
}

/** The valid copy with the highest generation of the two header copies at the start of `buffer`. */
export function decodeSegmentHeaders(buffer: Buffer, segmentIndex: number, formatId: Buffer): SegmentHeader | undefined {
  const first = decodeSegmentHeader(buffer, 0, segmentIndex, formatId);
  const second = decodeSegmentHeader(buffer, BLOCK_SIZE_BYTES, segmentIndex, formatId);
  if (first && second) return second.generation > first.generation ? second : first;
  return first ?? second;
}

// ---------------------------------------------------------------------------------------------
// Batch header

export interface BatchFixed {
  segmentIndex: number;
  headerBlocks: number;
  generation: number;
  /** Disk-wide, strictly increasing, never reused (roots lease ranges of them). */
  sequence: number;
  /** First sequence written by the engine instance (incarnation) that wrote this batch. */
  incarnationFirstSequence: number;
  /** Highest sequence of that incarnation known durable when this batch was built (< incarnationFirstSequence: none). */
  durableSequence: number;
  formatId: Buffer;
  /** Block offset of this header inside its segment. */
  positionBlocks: number;
  recordCount: number;
  dataBlocks: number;
  /** Bytes of inline payloads after the crc table. */
  payloadBytes: number;
}

export interface BatchRecord {
  kind: RecordKindValue;
  volumeId: number;
  chunkIndex: number;
  offsetBlocks: number;
  countBlocks: number;
  epoch: number;
  seq: number;
  snapSeq: number;
  /** Index of the record's first data block in the batch's data area (DATA only). */
  dataIndexBlocks: number;
  /** SNAPSHOTS: SnapshotFlags. */
  flags?: number;
  /** SNAPSHOTS, KV_PUT, KV_DELETE: the record's inline payload. */
  payload?: Buffer;
}

export interface DecodedBatch extends BatchFixed {
  records: BatchRecord[];
  /** crc32c of every data block of the batch, in order. */
  checksums: Uint32Array;
}

function hasPayload(kind: number): boolean {
  return kind === RecordKind.SNAPSHOTS || kind === RecordKind.KV_PUT || kind === RecordKind.KV_DELETE;
}

export function batchHeaderBytes(recordCount: number, dataBlocks: number, payloadBytes = 0): number {
  return BATCH_FIXED_BYTES + recordCount * RECORD_ENTRY_BYTES + dataBlocks * CRC_ENTRY_BYTES + payloadBytes;
}

export function batchHeaderBlocks(recordCount: number, dataBlocks: number, payloadBytes = 0): number {
  return Math.ceil(batchHeaderBytes(recordCount, dataBlocks, payloadBytes) / BLOCK_SIZE_BYTES);
}

/**
 * Writes record entry `index` into a batch header buffer (before `sealBatchHeader`). A record with
 * a payload needs `payloadOffset`: where its payload goes in the payload area (the caller lays
 * payloads out back to back); the payload is copied in.
 */
export function writeRecordEntry(header: Buffer, index: number, record: BatchRecord, layout?: { recordCount: number; dataBlocks: number; payloadOffset: number }): void {
  const at = BATCH_FIXED_BYTES + index * RECORD_ENTRY_BYTES;
  writeU64(header, at, record.volumeId);
  header.writeUInt32LE(record.chunkIndex, at + 8);
  header.writeUInt32LE(record.offsetBlocks, at + 12);
  header.writeUInt32LE(record.countBlocks, at + 16);
  header.writeUInt8(record.kind, at + 20);
  header.writeUInt8(record.flags ?? 0, at + 21);
  writeU64(header, at + 24, record.epoch);
  writeU64(header, at + 32, record.seq);
  writeU64(header, at + 40, record.snapSeq);
  if (hasPayload(record.kind)) {
    if (!layout || !record.payload) throw new RangeError('a record with a payload needs its payload and a layout');
    header.writeUInt32LE(layout.payloadOffset, at + 48);
    header.writeUInt32LE(record.payload.length, at + 52);
    record.payload.copy(header, BATCH_FIXED_BYTES + layout.recordCount * RECORD_ENTRY_BYTES + layout.dataBlocks * CRC_ENTRY_BYTES + layout.payloadOffset);
  } else {
    header.writeUInt32LE(record.dataIndexBlocks, at + 48);
  }
}

/** Writes the crc of data block `index` into a batch header with `recordCount` records. */
export function writeCrcEntry(header: Buffer, recordCount: number, index: number, crc: number): void {
  header.writeUInt32LE(crc >>> 0, BATCH_FIXED_BYTES + recordCount * RECORD_ENTRY_BYTES + index * CRC_ENTRY_BYTES);
}

/** Fills the fixed part and the crc over the whole header area; records, crcs and payloads must be written already. */
export function sealBatchHeader(header: Buffer, fixed: Omit<BatchFixed, 'payloadBytes'> & { payloadBytes?: number }): void {
  if (header.length !== fixed.headerBlocks * BLOCK_SIZE_BYTES) throw new RangeError('batch header buffer size does not match headerBlocks');
  BATCH_MAGIC.copy(header, 0);
  header.writeUInt32LE(FORMAT_VERSION, 8);
  header.writeUInt32LE(fixed.segmentIndex, 16);
  header.writeUInt32LE(fixed.headerBlocks, 20);
  writeU64(header, 24, fixed.generation);
  writeU64(header, 32, fixed.sequence);
  writeU64(header, 40, fixed.incarnationFirstSequence);
  writeU64(header, 48, fixed.durableSequence);
  fixed.formatId.copy(header, 56);
  header.writeUInt32LE(fixed.positionBlocks, 72);
  header.writeUInt32LE(fixed.recordCount, 76);
  header.writeUInt32LE(fixed.dataBlocks, 80);
  header.writeUInt32LE(fixed.payloadBytes ?? 0, 84);
  header.writeUInt32LE(structureCrc(header, 0, header.length), 12);
}

/**
 * Decodes the batch header whose first block is block `positionBlocks` of the segment image in
 * `segment` (which holds the whole segment). Valid only if magic, version, crc, format id, segment
 * index and position all match, the batch fits in the segment and every record is well formed.
 * The generation is *not* checked here: the caller compares it with the segment header's.
 * Payloads are copied out (the segment buffer is reused).
 */
export function decodeBatchHeader(segment: Buffer, positionBlocks: number, segmentIndex: number, formatId: Buffer): DecodedBatch | undefined {
  const offset = positionBlocks * BLOCK_SIZE_BYTES;
  const segmentBlocks = segment.length / BLOCK_SIZE_BYTES;
  if (offset + BLOCK_SIZE_BYTES > segment.length || !hasMagic(segment, offset, BATCH_MAGIC)) return undefined;
  if (segment.readUInt32LE(offset + 8) !== FORMAT_VERSION) return undefined;
  if (segment.readUInt32LE(offset + 16) !== segmentIndex) return undefined;
  if (segment.readUInt32LE(offset + 72) !== positionBlocks) return undefined;
  if (segment.compare(formatId, 0, 16, offset + 56, offset + 72) !== 0) return undefined;
  const headerBlocks = segment.readUInt32LE(offset + 20);
  const recordCount = segment.readUInt32LE(offset + 76);
  const dataBlocks = segment.readUInt32LE(offset + 80);
  const payloadBytes = segment.readUInt32LE(offset + 84);
  if (headerBlocks < 1 || positionBlocks + headerBlocks + dataBlocks > segmentBlocks) return undefined;
  if (payloadBytes > BATCH_PAYLOAD_BYTES_MAX || batchHeaderBlocks(recordCount, dataBlocks, payloadBytes) !== headerBlocks) return undefined;
  const headerBytes = headerBlocks * BLOCK_SIZE_BYTES;
  if (segment.readUInt32LE(offset + 12) !== structureCrc(segment, offset, headerBytes)) return undefined;
  const generation = readU64(segment, offset + 24);
  const sequence = readU64(segment, offset + 32);
  const incarnationFirstSequence = readU64(segment, offset + 40);
  const durableSequence = readU64(segment, offset + 48);
  if (generation === undefined || sequence === undefined || incarnationFirstSequence === undefined || durableSequence === undefined) return undefined;
  const payloadAt = offset + BATCH_FIXED_BYTES + recordCount * RECORD_ENTRY_BYTES + dataBlocks * CRC_ENTRY_BYTES;
  const records: BatchRecord[] = [];
  for (let i = 0; i < recordCount; i++) {
    const at = offset + BATCH_FIXED_BYTES + i * RECORD_ENTRY_BYTES;
    const volumeId = readU64(segment, at);
    const kind = segment.readUInt8(at + 20);
    const epoch = readU64(segment, at + 24);
    const seq = readU64(segment, at + 32);
    const snapSeq = readU64(segment, at + 40);
    if (volumeId === undefined || epoch === undefined || seq === undefined || snapSeq === undefined) return undefined;
    const record: BatchRecord = {
      kind: kind as RecordKindValue,
      volumeId,
      chunkIndex: segment.readUInt32LE(at + 8),
      offsetBlocks: segment.readUInt32LE(at + 12),
      countBlocks: segment.readUInt32LE(at + 16),
      epoch,
      seq,
      snapSeq,
      dataIndexBlocks: 0,
    };
    if (hasPayload(kind)) {
      const payloadOffset = segment.readUInt32LE(at + 48);
      const payloadLength = segment.readUInt32LE(at + 52);
      if (payloadOffset + payloadLength > payloadBytes) return undefined;
      record.payload = Buffer.from(segment.subarray(payloadAt + payloadOffset, payloadAt + payloadOffset + payloadLength));
      if (kind === RecordKind.SNAPSHOTS) record.flags = segment.readUInt8(at + 21);
    } else {
      record.dataIndexBlocks = segment.readUInt32LE(at + 48);
    }
    if (epoch >= TWO_32 || !recordShapeValid(record, dataBlocks)) return undefined;
    records.push(record);
  }
  const checksums = new Uint32Array(dataBlocks);
  const crcAt = offset + BATCH_FIXED_BYTES + recordCount * RECORD_ENTRY_BYTES;
  for (let i = 0; i < dataBlocks; i++) checksums[i] = segment.readUInt32LE(crcAt + i * CRC_ENTRY_BYTES);
  return {
    segmentIndex, headerBlocks, generation, sequence, incarnationFirstSequence, durableSequence,
    formatId, positionBlocks, recordCount, dataBlocks, payloadBytes, records, checksums,
  };
}

function recordShapeValid(record: BatchRecord, dataBlocks: number): boolean {
  switch (record.kind) {
    case RecordKind.DATA:
      return record.countBlocks >= 1 && record.offsetBlocks + record.countBlocks <= CHUNK_BLOCKS_MAX &&
        record.dataIndexBlocks + record.countBlocks <= dataBlocks;
    case RecordKind.ZERO:
    case RecordKind.DROP:
      return record.countBlocks >= 1 && record.offsetBlocks + record.countBlocks <= CHUNK_BLOCKS_MAX;
    case RecordKind.FENCE:
    case RecordKind.PURGE:
      return record.countBlocks === 0;
    case RecordKind.SNAPSHOTS: {
      const payload = record.payload!;
      if (record.countBlocks !== 0 || payload.length % 8 !== 0 || payload.length / 8 > SNAPSHOT_IDS_MAX) return false;
      let previous = -1;
      for (let at = 0; at < payload.length; at += 8) {
        const id = readU64(payload, at);
        if (id === undefined || id <= previous) return false;
        previous = id;
      }
      return true;
    }
    case RecordKind.KV_PUT:
    case RecordKind.KV_DELETE: {
      const payload = record.payload!;
      if (record.countBlocks !== 0 || payload.length < 2) return false;
      const keyBytes = payload.readUInt16LE(0);
      if (keyBytes < 1 || keyBytes > KV_KEY_BYTES_MAX || 2 + keyBytes > payload.length) return false;
      const valueBytes = payload.length - 2 - keyBytes;
      return record.kind === RecordKind.KV_PUT ? valueBytes <= KV_VALUE_BYTES_MAX : valueBytes === 0;
    }
    default:
      return false;
  }
}

/** Payload of a KV record: u16 key length, key, value. */
export function encodeKvPayload(key: Buffer, value: Buffer | undefined): Buffer {
  const payload = Buffer.allocUnsafe(2 + key.length + (value?.length ?? 0));
  payload.writeUInt16LE(key.length, 0);
  key.copy(payload, 2);
  value?.copy(payload, 2 + key.length);
  return payload;
}

export function decodeKvPayload(payload: Buffer): { key: Buffer; value: Buffer } {
  const keyBytes = payload.readUInt16LE(0);
  return { key: payload.subarray(2, 2 + keyBytes), value: payload.subarray(2 + keyBytes) };
}

export function encodeSnapshotIds(ids: readonly number[]): Buffer {
  const payload = Buffer.alloc(ids.length * 8);
  ids.forEach((id, i) => writeU64(payload, i * 8, id));
  return payload;
}

export function decodeSnapshotIds(payload: Buffer): number[] {
  const ids: number[] = [];
  for (let at = 0; at < payload.length; at += 8) ids.push(readU64(payload, at)!);
  return ids;
}

// ---------------------------------------------------------------------------------------------
// Segment scan (replay, compaction, rebuild)

export interface SegmentScan {
  /** The valid header copy with the highest generation, if any. */
  header: SegmentHeader | undefined;
  /** Valid batches of the header's generation (LOG segments only), in position order. */
  batches: DecodedBatch[];
  /** Valid batch headers of another generation (left over from before the segment was reused). */
  staleBatches: number;
  /** Highest generation seen in a header copy or any valid batch header anywhere in the segment (0: none). */
  generationMax: number;
  /** Highest sequence seen in any valid batch header anywhere in the segment, or a LOG segment header (0: none). */
  sequenceMax: number;
  /** (incarnationFirstSequence, durableSequence) of every valid batch header, whatever its generation. */
  durableClaims: [number, number][];
  /**
   * Sequences of chain batches that do not start where the previous one ended: something in
   * between was lost. Harmless if that was never durable (a crash dropped it); if this batch is
   * known durable, the lost one was too — a damaged header.
   */
  gapsBefore: number[];
  /** For each gap, the sequence of the first batch it hides (one more than the batch before it). */
  gapsLost: number[];
}

/**
 * Reads a segment image (`segment` holds the whole segment; with `startBlocks`, only the header
 * copies and blocks from `startBlocks` on are meaningful). Every block is tried as a batch header
 * (a valid one needs the magic, the crc, this disk's format id, this segment and its own position,
 * so data cannot pass for one), because the maxima must count every header in the segment — also
 * one that sits inside the extent of an older batch it partly overwrote. If some header shows a
 * generation above the segment header's, the segment was being reused and the new header was
 * lost: the segment holds nothing live and is reported without a header. Otherwise, in a LOG
 * segment, batches of the segment header's generation form the chain that is replayed: within
 * one generation batches never overlap, so the walk takes each one and continues after its
 * extent; a lost, torn or damaged batch does not hide those after it.
 */
export function scanSegment(segment: Buffer, segmentIndex: number, formatId: Buffer, startBlocks = SEGMENT_HEADER_BLOCKS): SegmentScan {
  let header = decodeSegmentHeaders(segment, segmentIndex, formatId);
  const scan: SegmentScan = {
    header,
    batches: [],
    staleBatches: 0,
    generationMax: 0,
    sequenceMax: header && header.kind === SegmentKind.LOG ? header.firstSequence : 0,
    durableClaims: [],
    gapsBefore: [],
    gapsLost: [],
  };
  for (const offset of [0, BLOCK_SIZE_BYTES]) {
    const copy = decodeSegmentHeader(segment, offset, segmentIndex, formatId);
    if (copy) scan.generationMax = Math.max(scan.generationMax, copy.generation);
  }
  const blocks = segment.length / BLOCK_SIZE_BYTES;
  let chainEnd = startBlocks;
  // The sequence of the chain batch before the next one (a gap at the very start hides the first).
  let previous = header && startBlocks === SEGMENT_HEADER_BLOCKS ? header.firstSequence - 1 : -1;
  for (let position = startBlocks; position < blocks; position++) {
    const batch = decodeBatchHeader(segment, position, segmentIndex, formatId);
    if (!batch) continue;
    scan.generationMax = Math.max(scan.generationMax, batch.generation);
    scan.sequenceMax = Math.max(scan.sequenceMax, batch.sequence);
    scan.durableClaims.push([batch.incarnationFirstSequence, batch.durableSequence]);
    if (header && header.kind === SegmentKind.LOG && batch.generation === header.generation && position >= chainEnd) {
      if (position > chainEnd) {
        scan.gapsBefore.push(batch.sequence);
        scan.gapsLost.push(previous >= 0 ? previous + 1 : batch.sequence - 1);
      }
      previous = batch.sequence;
      scan.batches.push(batch);
      chainEnd = position + batch.headerBlocks + batch.dataBlocks;
    } else {
      scan.staleBatches++;
    }
  }
  if (header && scan.generationMax > header.generation) {
    // A newer generation was started here but its header was lost: it was never synced (the
    // header goes out with its first batch), and the segment was only reused because all of the
    // header's generation was dead and that was durable. Nothing in it is live.
    scan.staleBatches += scan.batches.length;
    scan.batches = [];
    scan.gapsBefore = [];
    scan.gapsLost = [];
    header = undefined;
    scan.header = undefined;
  }
  return scan;
}

/** Indices (in the batch's data area) of the data blocks of `batch` whose crc32c does not match its header. */
export function badDataBlocks(segment: Buffer, batch: DecodedBatch): number[] {
  const bad: number[] = [];
  const start = (batch.positionBlocks + batch.headerBlocks) * BLOCK_SIZE_BYTES;
  for (let i = 0; i < batch.dataBlocks; i++) {
    const at = start + i * BLOCK_SIZE_BYTES;
    if (crc32c(segment.subarray(at, at + BLOCK_SIZE_BYTES)) !== batch.checksums[i]) bad.push(i);
  }
  return bad;
}

// ---------------------------------------------------------------------------------------------
// Checkpoint root

export interface RootEntry {
  segment: number;
  /** LOG entries: replay starts at this block of the segment. CHECKPOINT entries: 0. */
  startBlocks: number;
  /** The generation the segment has (or will have, once opened). */
  generation: number;
}

export interface Root {
  /** +1 at every root written; of two valid slots the higher one counts. */
  rootSequence: number;
  formatId: Buffer;
  /** Every batch with a sequence up to this one is reflected in the checkpoint image (0: empty image). */
  checkpointSequence: number;
  /** No batch sequence above this was written while this root was the newest; the next instance starts above it. */
  sequenceLeaseEnd: number;
  imageBytes: number;
  imageCrc: number;
  /** Segments holding the checkpoint image, in order. */
  checkpointSegments: RootEntry[];
  /**
   * Segments that may hold batches after `checkpointSequence`, in the order they were (or will
   * be) opened: the ones opened since the checkpoint, then the planned ones. Replay walks them.
   */
  logSegments: RootEntry[];
}

export function rootBytes(root: Pick<Root, 'checkpointSegments' | 'logSegments'>): number {
  return ROOT_FIXED_BYTES + ROOT_ENTRY_BYTES * (root.checkpointSegments.length + root.logSegments.length);
}

export function encodeRoot(root: Root, slot: number): Buffer {
  const length = rootBytes(root);
  const buffer = Buffer.alloc(Math.ceil(length / BLOCK_SIZE_BYTES) * BLOCK_SIZE_BYTES);
  ROOT_MAGIC.copy(buffer, 0);
  buffer.writeUInt32LE(FORMAT_VERSION, 8);
  buffer.writeUInt32LE(length, 16);
  buffer.writeUInt32LE(slot, 20);
  writeU64(buffer, 24, root.rootSequence);
  root.formatId.copy(buffer, 32);
  writeU64(buffer, 48, root.checkpointSequence);
  writeU64(buffer, 56, root.sequenceLeaseEnd);
  writeU64(buffer, 64, root.imageBytes);
  buffer.writeUInt32LE(root.imageCrc >>> 0, 72);
  buffer.writeUInt32LE(root.checkpointSegments.length, 76);
  buffer.writeUInt32LE(root.logSegments.length, 80);
  let at = ROOT_FIXED_BYTES;
  for (const entry of [...root.checkpointSegments, ...root.logSegments]) {
    buffer.writeUInt32LE(entry.segment, at);
    buffer.writeUInt32LE(entry.startBlocks, at + 4);
    writeU64(buffer, at + 8, entry.generation);
    at += ROOT_ENTRY_BYTES;
  }
  buffer.writeUInt32LE(structureCrc(buffer, 0, length), 12);
  return buffer;
}

/** Bytes of a root slot's first block that tell its length (read the rest only if needed). */
export function rootLength(buffer: Buffer): number | undefined {
  if (buffer.length < BLOCK_SIZE_BYTES || !hasMagic(buffer, 0, ROOT_MAGIC) || buffer.readUInt32LE(8) !== FORMAT_VERSION) return undefined;
  const length = buffer.readUInt32LE(16);
  return length >= ROOT_FIXED_BYTES ? length : undefined;
}

export function decodeRoot(buffer: Buffer, slot: number, formatId: Buffer, segmentCount: number, segmentBlocks: number): Root | undefined {
  const length = rootLength(buffer);
  if (length === undefined || length > buffer.length) return undefined;
  if (buffer.readUInt32LE(12) !== structureCrc(buffer, 0, length)) return undefined;
  if (buffer.readUInt32LE(20) !== slot || buffer.compare(formatId, 0, 16, 32, 48) !== 0) return undefined;
  const rootSequence = readU64(buffer, 24);
  const checkpointSequence = readU64(buffer, 48);
  const sequenceLeaseEnd = readU64(buffer, 56);
  const imageBytes = readU64(buffer, 64);
  const checkpointCount = buffer.readUInt32LE(76);
  const logCount = buffer.readUInt32LE(80);
  if (rootSequence === undefined || checkpointSequence === undefined || sequenceLeaseEnd === undefined || imageBytes === undefined) return undefined;
  if (length !== ROOT_FIXED_BYTES + ROOT_ENTRY_BYTES * (checkpointCount + logCount) || sequenceLeaseEnd < checkpointSequence) return undefined;
  const entries: RootEntry[] = [];
  const seen = new Set<number>();
  for (let i = 0, at = ROOT_FIXED_BYTES; i < checkpointCount + logCount; i++, at += ROOT_ENTRY_BYTES) {
    const segment = buffer.readUInt32LE(at);
    const startBlocks = buffer.readUInt32LE(at + 4);
    const generation = readU64(buffer, at + 8);
    if (segment >= segmentCount || seen.has(segment) || generation === undefined || generation < 1 || startBlocks > segmentBlocks) return undefined;
    seen.add(segment);
    entries.push({ segment, startBlocks, generation });
  }
  return {
    rootSequence, formatId, checkpointSequence, sequenceLeaseEnd, imageBytes, imageCrc: buffer.readUInt32LE(72),
    checkpointSegments: entries.slice(0, checkpointCount), logSegments: entries.slice(checkpointCount),
  };
}
