/**
 * The store protocol: how clients (and stores repairing each other) talk to a store. Binary,
 * little-endian, versioned, with request ids so many requests are in flight on one connection and
 * replies may come back in any order. Documented byte by byte in docs/protocol.md.
 *
 * Every frame is a fixed 96-byte header, then `payloadBytes` of payload:
 *
 *   off size field
 *     0   4  magic 0x454c4853 ("SHLE" in memory order)
 *     4   1  protocol version (1)
 *     5   1  op (requests < 0x80; a reply is the request's op | 0x80)
 *     6   2  flags (FUA, REPAIR)
 *     8   4  request id (chosen by the sender, echoed in the reply)
 *    12   2  status (replies: 0 = ok, else the error's wire code from src/lib/errors.ts)
 *    14   2  namespace (0 = block volumes)
 *    16   8  volume id
 *    24   4  chunk index
 *    28   4  pool id
 *    32   4  placement group
 *    36   4  pg count of the pool (lets a store compute an object's PG without the map)
 *    40   8  PG epoch the sender acts on
 *    48   8  owner epoch of the writer  (the high half of a write's version)
 *    56   8  version sequence          (the low half of a write's version)
 *    64   4  offset in the chunk, in 4 KiB blocks
 *    68   4  count of 4 KiB blocks
 *    72   8  snap sequence of the writer's snap context
 *    80   8  watermark: every version ≤ it is on every replica of the PG
 *    88   4  payload length in bytes
 *    92   4  crc32c of bytes 0..91
 *
 * 64-bit fields are carried as two 32-bit halves and read back as JS numbers; values stay below
 * 2^53 (asserted on encode).
 *
 * Payloads:
 *   WRITE         request: crc32c per block (4 × count), then the data (4096 × count). reply: none;
 *                 the reply's count field holds how many blocks the version rule applied.
 *   WRITE_ZEROES  request: none (tombstones). reply: as WRITE.
 *   READ          request: none. reply: per block a 20-byte descriptor (crc32c u32, state u8, 3 pad,
 *                 version epoch u32, version seq f64), then the data of the blocks whose state is DATA, in order.
 *   FLUSH         none either way: the reply means every write this store acknowledged before the
 *                 FLUSH arrived is durable.
 *   FENCE         request: volume id + owner epoch; reply after the fence is durable.
 *   LIST_PG       request: pool/pg/pg count/PG epoch, payload: the volume ids (u64) of the pool.
 *                 reply: for each object of those volumes in that PG: volume id u64, chunk index u32,
 *                 block count u32, then per block (state u8, 3 pad, epoch u32, seq f64) = 16 bytes.
 *   PING          none either way.
 *   BLOCK_STATES  request: none. reply: one state byte per block (absent, data, zero) — block status
 *                 without reading data.
 *   RECENT_WRITES request: volume id (and owner epoch with CLEAR). reply: the writes of that volume
 *                 above the watermark, 24 bytes each: chunk u32, offset u32, count u32, epoch u32,
 *                 seq f64. With CLEAR, entries of older owner epochs are dropped after the reply is built.
 *   SCRUB         request: none (count = most MiB per second to read, 0 = unthrottled). reply: a
 *                 JSON ScrubReport (a rare administrative call, not on the data path).
 *   READ_SNAP     (0x30) a READ as snapshot `snap seq` saw the range: per block the newest version
 *                 stamped below it. Same reply as READ. NOT_FOUND if the store knows it was deleted.
 *   BLOCK_VERSIONS (0x31) request: none (snap seq = snapshot id, 0 = the head). reply: per block
 *                 16 bytes: state u8, 3 pad, epoch u32, seq f64 — for block status and diffs.
 *   PG_DIGEST     request: as LIST_PG (count = most MiB per second to read, 0 = unthrottled). reply:
 *                 per object of the PG its blocks' crc32c, state, version and whether the data read
 *                 back bad — see pg-digest.ts. Scrub compares replicas with it without moving data.
 *
 * Key-value ops (namespace 2, the S3 bucket index; volume id = shard id, chunk index 0, so the
 * shard's PG is computed like any object's; version = (owner epoch, version seq)):
 *   KV_PUT        request: u16 key length, key, value. FUA makes it durable before the reply.
 *                 reply: count = 1 if the version rule applied it, else 0.
 *   KV_DELETE     request: u16 key length, key. A versioned tombstone. reply: as KV_PUT.
 *   KV_GET        request: the key. reply: count = 1 and the value, with the record's version in
 *                 the owner epoch / version seq fields; count = 0 when there is no live record.
 *   KV_LIST       request: u16 prefix length, prefix, u16 start-after length, start-after; count =
 *                 most entries (1..10000). reply: entries in key order, each u16 key length, u32
 *                 value length, u32 version epoch, f64 version seq, key, value.
 *   KV_LIST_PG    (0x24) request: pool/pg/pg count/PG epoch (volume id 0), count = most entries
 *                 (1..10000), payload empty (from the start) or u64 shard id, u16 key length, key (after
 *                 it). reply: every record of the PG's shards, tombstones too, in (shard, key) order:
 *                 u64 shard id, u8 live (1) or tombstone (0), u16 key length, u32 value length,
 *                 u32 epoch, f64 seq, key, value. Fewer than count entries: the listing is complete.
 * LIST_PG with namespace 1 lists every S3 data object of the PG (the payload's volume ids are
 * ignored), by its namespace-local id: resync of S3 data.
 */
import { assert } from '../lib/assert.ts';
import type { BlockStateValue } from '../lib/block-state.ts';
import { BlockState } from '../lib/block-state.ts';
import { crc32c } from '../lib/crc32c.ts';
import { ShaleError } from '../lib/errors.ts';
import { BLOCK_SIZE_BYTES } from '../lib/units.ts';

export const PROTOCOL_MAGIC = 0x454c4853;
export const PROTOCOL_VERSION = 1;
export const HEADER_BYTES = 96;
/** The largest payload a frame may carry: a 4 MiB write plus its checksums, or a PG listing. */
export const PAYLOAD_BYTES_MAX = 64 * 1024 * 1024;
export const BLOCKS_PER_REQUEST_MAX = 8192;

export const Op = {
  WRITE: 1,
  READ: 2,
  WRITE_ZEROES: 3,
  FLUSH: 4,
  FENCE: 5,
  LIST_PG: 6,
  PING: 7,
  BLOCK_STATES: 8,
  RECENT_WRITES: 9,
  SCRUB: 10,
  /** Key-value records (the S3 bucket index), 0x20–0x2F: see below and docs/protocol.md. */
  KV_PUT: 0x20,
  KV_DELETE: 0x21,
  KV_GET: 0x22,
  KV_LIST: 0x23,
  /** Every key-value record (tombstones too) of every namespace-2 shard of a PG, with versions, in pages: resync of the S3 index. */
  KV_LIST_PG: 0x24,
  /** READ as snapshot `snapSeq` (the header field holds the snapshot id, > 0) saw the blocks. Same reply as READ. */
  READ_SNAP: 0x30,
  /** Per block its state and version, at the head (snapSeq 0) or at snapshot `snapSeq`, without reading data. */
  BLOCK_VERSIONS: 0x31,
  /** Self-healing (0x40–0x4F): per-block crc32c and version of a PG, read and verified on the store (pg-digest.ts). */
  PG_DIGEST: 0x40,
} as const;

/**
 * Namespaces of the header's namespace field. Block volumes are 0. S3 object data (immutable
 * objects, written once) is 1, the S3 bucket-index shards (key-value records) are 2. A store maps
 * (namespace, id) onto its engine's one id space: 0 → id, 1 → 2^52 + id, 2 → 2^52 + 2^51 + id, so
 * ids of different namespaces never meet on a disk; ids of namespaces 1 and 2 stay below 2^51.
 */
export const Namespace = {
  VOLUME: 0,
  S3_DATA: 1,
  S3_INDEX: 2,
} as const;
/** Ids of namespaces 1 and 2 stay below this, so namespace 2's top id never meets the store's own shard 2^53 − 1. */
export const NAMESPACE_ID_MAX = 2 ** 51 - 2;

/** The engine id of (namespace, id). Throws INVALID_ARGUMENT for an unknown namespace or an id too large. */
export function engineObjectId(namespace: number, id: number): number {
  if (namespace === Namespace.VOLUME) return id;
  if (id > NAMESPACE_ID_MAX) throw new ShaleError('INVALID_ARGUMENT', `id ${id} of namespace ${namespace} is above 2^51`);
  if (namespace === Namespace.S3_DATA) return 2 ** 52 + id;
  if (namespace === Namespace.S3_INDEX) return 2 ** 52 + 2 ** 51 + id;
  throw new ShaleError('INVALID_ARGUMENT', `unknown namespace ${namespace}`);
}
/** The (namespace, id) of an engine id of namespace 1 or 2 (the inverse of engineObjectId), or undefined for a volume or the store's own ids. */
export function namespacedId(engineId: number): { namespace: number; id: number } | undefined {
  if (engineId < 2 ** 52) return undefined;
  const offset = engineId - 2 ** 52;
  if (offset <= NAMESPACE_ID_MAX) return { namespace: Namespace.S3_DATA, id: offset };
  if (offset - 2 ** 51 <= NAMESPACE_ID_MAX) return { namespace: Namespace.S3_INDEX, id: offset - 2 ** 51 };
  return undefined;
}

export type OpCode = (typeof Op)[keyof typeof Op];
export const REPLY_BIT = 0x80;

export const Flag = {
  /** Make this write durable before replying. */
  FUA: 1,
  /** A store-to-store repair copy: carries the block's original version, bypasses the owner fence,
   *  is applied only where its version is higher, and may be sent to a recovering replica. */
  REPAIR: 2,
  /** RECENT_WRITES: forget the entries of owner epochs below the request's owner epoch. */
  CLEAR: 4,
} as const;

export { BlockState, type BlockStateValue } from '../lib/block-state.ts';

export interface FrameHeader {
  op: number;
  flags: number;
  requestId: number;
  status: number;
  namespace: number;
  volumeId: number;
  chunkIndex: number;
  poolId: number;
  pgId: number;
  pgCount: number;
  pgEpoch: number;
  ownerEpoch: number;
  versionSeq: number;
  offsetBlocks: number;
  countBlocks: number;
  snapSeq: number;
  watermark: number;
  payloadBytes: number;
}

export function emptyHeader(): FrameHeader {
  return {
    op: 0, flags: 0, requestId: 0, status: 0, namespace: 0, volumeId: 0, chunkIndex: 0, poolId: 0, pgId: 0,
    pgCount: 0, pgEpoch: 0, ownerEpoch: 0, versionSeq: 0, offsetBlocks: 0, countBlocks: 0, snapSeq: 0,
    watermark: 0, payloadBytes: 0,
  };
}

function writeU64(buffer: Buffer, offset: number, value: number): void {
  // The message is built only on failure: every header encodes six of these.
  if (!Number.isSafeInteger(value) || value < 0) assert(false, `u64 field at ${offset} is a non-negative safe integer (${value})`);
  buffer.writeUInt32LE(value >>> 0, offset);
  buffer.writeUInt32LE(Math.floor(value / 2 ** 32), offset + 4);
}

/** The u64 at `at` of `buffer`; `field` (its offset within the header) names it in the error. */
function readU64(buffer: Buffer, at: number, field = at): number {
  const high = buffer.readUInt32LE(at + 4);
  if (high >= 2 ** 21) throw new ShaleError('PROTOCOL', `u64 field at ${field} is beyond 2^53`);
  return high * 2 ** 32 + buffer.readUInt32LE(at);
}

/** A WRITE payload's first part: the crc32c of each block from `start`, `count` of them, little-endian. */
export function encodeChecksums(checksums: ArrayLike<number>, start = 0, count = checksums.length - start): Buffer {
  const sums = Buffer.allocUnsafe(count * 4);
  for (let i = 0; i < count; i++) sums.writeUInt32LE(checksums[start + i]!, i * 4);
  return sums;
}

/** Encodes a header into `target` (96 bytes at `offset`), checksum included. */
export function encodeHeader(header: FrameHeader, target: Buffer = Buffer.allocUnsafe(HEADER_BYTES), offset = 0): Buffer {
  assert(header.payloadBytes <= PAYLOAD_BYTES_MAX, 'payload within PAYLOAD_BYTES_MAX');
  const b = offset === 0 && target.length === HEADER_BYTES ? target : target.subarray(offset, offset + HEADER_BYTES);
  b.writeUInt32LE(PROTOCOL_MAGIC, 0);
  b.writeUInt8(PROTOCOL_VERSION, 4);
  b.writeUInt8(header.op, 5);
  b.writeUInt16LE(header.flags, 6);
  b.writeUInt32LE(header.requestId >>> 0, 8);
  b.writeUInt16LE(header.status, 12);
  b.writeUInt16LE(header.namespace, 14);
  writeU64(b, 16, header.volumeId);
  b.writeUInt32LE(header.chunkIndex >>> 0, 24);
  b.writeUInt32LE(header.poolId >>> 0, 28);
  b.writeUInt32LE(header.pgId >>> 0, 32);
  b.writeUInt32LE(header.pgCount >>> 0, 36);
  writeU64(b, 40, header.pgEpoch);
  writeU64(b, 48, header.ownerEpoch);
  writeU64(b, 56, header.versionSeq);
  b.writeUInt32LE(header.offsetBlocks >>> 0, 64);
  b.writeUInt32LE(header.countBlocks >>> 0, 68);
  writeU64(b, 72, header.snapSeq);
  writeU64(b, 80, header.watermark);
  b.writeUInt32LE(header.payloadBytes >>> 0, 88);
  b.writeUInt32LE(crc32c(b.subarray(0, 92)), 92);
  return target;
}

/** Decodes and validates a header. Throws PROTOCOL on a bad magic, version, checksum or length. */
export function decodeHeader(source: Buffer, offset = 0): FrameHeader {
  // Fields are read where they lie (no view per header): a store decodes one per write.
  const o = offset;
  if (source.length - o < HEADER_BYTES) throw new ShaleError('PROTOCOL', 'short frame header');
  if (source.readUInt32LE(o) !== PROTOCOL_MAGIC) throw new ShaleError('PROTOCOL', 'bad frame magic');
  const version = source.readUInt8(o + 4);
  if (version !== PROTOCOL_VERSION) throw new ShaleError('PROTOCOL', `unsupported store protocol version ${version}`);
  if (crc32c(source.subarray(o, o + 92)) !== source.readUInt32LE(o + 92)) throw new ShaleError('PROTOCOL', 'frame header checksum mismatch');
  const payloadBytes = source.readUInt32LE(o + 88);
  if (payloadBytes > PAYLOAD_BYTES_MAX) throw new ShaleError('PROTOCOL', `payload of ${payloadBytes} bytes exceeds ${PAYLOAD_BYTES_MAX}`);
  return {
    op: source.readUInt8(o + 5),
    flags: source.readUInt16LE(o + 6),
    requestId: source.readUInt32LE(o + 8),
    status: source.readUInt16LE(o + 12),
    namespace: source.readUInt16LE(o + 14),
    volumeId: readU64(source, o + 16, 16),
    chunkIndex: source.readUInt32LE(o + 24),
    poolId: source.readUInt32LE(o + 28),
    pgId: source.readUInt32LE(o + 32),
    pgCount: source.readUInt32LE(o + 36),
    pgEpoch: readU64(source, o + 40, 40),
    ownerEpoch: readU64(source, o + 48, 48),
    versionSeq: readU64(source, o + 56, 56),
    offsetBlocks: source.readUInt32LE(o + 64),
    countBlocks: source.readUInt32LE(o + 68),
    snapSeq: readU64(source, o + 72, 72),
    watermark: readU64(source, o + 80, 80),
    payloadBytes,
  };
}

export interface Frame {
  header: FrameHeader;
  payload: Buffer;
  /** In-process requests only: the payload as the parts it was built from (no concatenation). */
  parts?: readonly Buffer[];
  /** In-process replies only: the data's checksums were verified in this process and need no second check. */
  verified?: boolean;
  /** The payload is in a buffer from the parser's `payloadBuffer` (a frame read in place). */
  lent?: boolean;
}

/** Where a connection read in place lands when no payload is being filled. */
const STAGING_BYTES = 64 * 1024;

/**
 * Splits a byte stream into frames. Feed it every chunk read from the socket; it returns the
 * frames completed so far. Payloads are views into the received chunks when a frame lies within
 * one chunk (no copy), else one concatenation. Throws PROTOCOL on a malformed header: the caller
 * closes the connection, since the stream can no longer be framed.
 */
export class FrameParser {
  #chunks: Buffer[] = [];
  #buffered = 0;
  #header: FrameHeader | undefined;
  readonly #payloadBuffer: ((bytes: number) => Buffer) | undefined;
  // Reading in place: reads go into #staging, reused, or straight into the payload being filled.
  #staging: Buffer | undefined;
  #filling: { header: FrameHeader; payload: Buffer; filled: number } | undefined;
  #targetIsPayload = false;
  /** Bytes at the start of #staging left by the last read (less than a header); the next read lands after them. */
  #stagedBytes = 0;

  /** `payloadBuffer` gives the buffers payloads read in place go into (exactly the size asked). */
  constructor(payloadBuffer?: (bytes: number) => Buffer) {
    this.#payloadBuffer = payloadBuffer;
  }

  /**
   * Reading in place (Connection.readInto), with a `payloadBuffer`: where the next read should go,
   * the rest of the payload being filled or a staging buffer reused for every read. Then
   * `received` with the bytes it filled, which returns the frames completed: every payload in a
   * lent buffer (`lent`), and nothing kept that refers to the staging buffer. Not mixed with push.
   */
  readTarget(): Buffer {
    assert(this.#payloadBuffer !== undefined, 'reading in place needs payload buffers');
    const filling = this.#filling;
    this.#targetIsPayload = filling !== undefined;
    if (filling !== undefined) return filling.payload.subarray(filling.filled);
    const staging = (this.#staging ??= Buffer.allocUnsafe(STAGING_BYTES));
    return this.#stagedBytes === 0 ? staging : staging.subarray(this.#stagedBytes);
  }

  received(bytes: number): Frame[] {
    const filling = this.#filling;
    if (this.#targetIsPayload && filling !== undefined) {
      assert(filling.filled + bytes <= filling.payload.length, 'a read stays within its payload');
      filling.filled += bytes;
      if (filling.filled < filling.payload.length) return [];
      this.#filling = undefined;
      return [{ header: filling.header, payload: filling.payload, lent: true }];
    }
    // Frames are cut from the staging buffer where they lie: headers decoded in place, payloads
    // copied into lent buffers. No view of the staging buffer outlives this call.
    const staging = this.#staging!;
    const end = this.#stagedBytes + bytes;
    let at = 0;
    const frames: Frame[] = [];
    while (end - at >= HEADER_BYTES) {
      const header = decodeHeader(staging, at);
      at += HEADER_BYTES;
      if (header.payloadBytes === 0) {
        frames.push({ header, payload: EMPTY });
        continue;
      }
      // Into a lent buffer: what has arrived now, the rest by the next reads, straight into it.
      const payload = this.#payloadBuffer!(header.payloadBytes);
      assert(payload.length === header.payloadBytes, 'a payload buffer has the size asked for');
      const arrived = Math.min(end - at, header.payloadBytes);
      if (arrived > 0) staging.copy(payload, 0, at, at + arrived);
      at += arrived;
      if (arrived === header.payloadBytes) {
        frames.push({ header, payload, lent: true });
        continue;
      }
      this.#filling = { header, payload, filled: arrived };
      break;
    }
    // What is left is less than a header: moved to the front, where the next read continues it.
    if (at > 0 && at < end) staging.copyWithin(0, at, end);
    this.#stagedBytes = end - at;
    return frames;
  }

  push(chunk: Buffer): Frame[] {
    const frames: Frame[] = [];
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
    for (;;) {
      if (this.#header === undefined) {
        if (this.#buffered < HEADER_BYTES) break;
        this.#header = decodeHeader(this.#take(HEADER_BYTES));
      }
      const need = this.#header.payloadBytes;
      if (this.#buffered < need) break;
      const payload = need === 0 ? EMPTY : this.#take(need);
      frames.push({ header: this.#header, payload });
      this.#header = undefined;
    }
    return frames;
  }

  get bufferedBytes(): number {
    return this.#buffered + this.#stagedBytes;
  }

  #take(count: number): Buffer {
    assert(count <= this.#buffered, 'take within buffered bytes');
    this.#buffered -= count;
    const first = this.#chunks[0]!;
    if (first.length >= count) {
      const out = first.subarray(0, count);
      if (first.length === count) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(count);
      return out;
    }
    const out = Buffer.allocUnsafe(count);
    let filled = 0;
    while (filled < count) {
      const head = this.#chunks[0]!;
      const n = Math.min(head.length, count - filled);
      head.copy(out, filled, 0, n);
      filled += n;
      if (n === head.length) this.#chunks.shift();
      else this.#chunks[0] = head.subarray(n);
    }
    return out;
  }
}

const EMPTY = Buffer.alloc(0);

/** The 20-byte per-block descriptor of a READ reply. */
export const READ_DESCRIPTOR_BYTES = 20;

export interface BlockDescriptor {
  crc: number;
  state: BlockStateValue;
  epoch: number;
  seq: number;
}

/** Snap stamps travel in READ descriptors as 24 bits; a volume's snap sequence stays below this. */
export const SNAP_STAMP_MAX = 0xff_ffff;

export function encodeReadDescriptors(descriptors: { checksums: Uint32Array; states: Uint8Array; epochs: ArrayLike<number>; seqs: ArrayLike<number>; stamps?: ArrayLike<number> }, count: number): Buffer {
  const out = Buffer.allocUnsafe(count * READ_DESCRIPTOR_BYTES);
  for (let i = 0; i < count; i++) {
    const at = i * READ_DESCRIPTOR_BYTES;
    out.writeUInt32LE(descriptors.checksums[i]! >>> 0, at);
    out.writeUInt8(descriptors.states[i]!, at + 4);
    // Bytes 5..7: the version's snap stamp (24 bits, 0 when unknown), so copies keep it.
    const stamp = Math.min(descriptors.stamps?.[i] ?? 0, SNAP_STAMP_MAX);
    out.writeUInt8(stamp & 0xff, at + 5);
    out.writeUInt16LE(stamp >>> 8, at + 6);
    out.writeUInt32LE(descriptors.epochs[i]! >>> 0, at + 8);
    out.writeDoubleLE(descriptors.seqs[i]!, at + 12);
  }
  return out;
}

export interface DecodedRead {
  checksums: Uint32Array;
  states: Uint8Array;
  epochs: Uint32Array;
  seqs: Float64Array;
  /** Per block, the snap stamp of its version (0 from stores that do not send it). */
  stamps: Uint32Array;
  /** The data of the DATA blocks, back to back. */
  data: Buffer;
}

export function decodeReadReply(payload: Buffer, count: number): DecodedRead {
  const descriptorBytes = count * READ_DESCRIPTOR_BYTES;
  if (payload.length < descriptorBytes) throw new ShaleError('PROTOCOL', 'READ reply shorter than its descriptors');
  return decodeReadParts(payload.subarray(0, descriptorBytes), payload.subarray(descriptorBytes), count);
}

/** As decodeReadReply, for a reply whose descriptors and data arrive as separate buffers (in-process). */
export function decodeReadParts(descriptors: Buffer, data: Buffer, count: number): DecodedRead {
  const payload = descriptors;
  if (payload.length !== count * READ_DESCRIPTOR_BYTES) throw new ShaleError('PROTOCOL', 'READ reply descriptors of the wrong length');
  const checksums = new Uint32Array(count);
  const states = new Uint8Array(count);
  const epochs = new Uint32Array(count);
  const seqs = new Float64Array(count);
  const stamps = new Uint32Array(count);
  let dataBlocks = 0;
  for (let i = 0; i < count; i++) {
    const at = i * READ_DESCRIPTOR_BYTES;
    checksums[i] = payload.readUInt32LE(at);
    stamps[i] = payload.readUInt8(at + 5) | (payload.readUInt16LE(at + 6) << 8);
    const state = payload.readUInt8(at + 4);
    if (state > BlockState.ZERO) throw new ShaleError('PROTOCOL', `READ reply has unknown block state ${state}`);
    states[i] = state;
    epochs[i] = payload.readUInt32LE(at + 8);
    seqs[i] = payload.readDoubleLE(at + 12);
    if (state === BlockState.DATA) dataBlocks++;
  }
  if (data.length !== dataBlocks * BLOCK_SIZE_BYTES) {
    throw new ShaleError('PROTOCOL', `READ reply carries ${data.length} data bytes for ${dataBlocks} data blocks`);
  }
  return { checksums, states, epochs, seqs, stamps, data };
}

/** One object of a LIST_PG reply, with the per-block state and version. */
export interface ListedObject {
  volumeId: number;
  chunkIndex: number;
  states: Uint8Array;
  epochs: Uint32Array;
  seqs: Float64Array;
}

export const LIST_BLOCK_BYTES = 16;

export function encodeListReply(objects: readonly ListedObject[]): Buffer {
  let size = 0;
  for (const object of objects) size += 16 + object.states.length * LIST_BLOCK_BYTES;
  const out = Buffer.alloc(size);
  let at = 0;
  for (const object of objects) {
    writeU64(out, at, object.volumeId);
    out.writeUInt32LE(object.chunkIndex, at + 8);
    out.writeUInt32LE(object.states.length, at + 12);
    at += 16;
    for (let i = 0; i < object.states.length; i++) {
      out.writeUInt8(object.states[i]!, at);
      out.writeUInt32LE(object.epochs[i]!, at + 4);
      out.writeDoubleLE(object.seqs[i]!, at + 8);
      at += LIST_BLOCK_BYTES;
    }
  }
  return out;
}

export function decodeListReply(payload: Buffer): ListedObject[] {
  const objects: ListedObject[] = [];
  let at = 0;
  while (at < payload.length) {
    if (at + 16 > payload.length) throw new ShaleError('PROTOCOL', 'LIST_PG reply truncated');
    const volumeId = readU64(payload, at);
    const chunkIndex = payload.readUInt32LE(at + 8);
    const blocks = payload.readUInt32LE(at + 12);
    at += 16;
    if (at + blocks * LIST_BLOCK_BYTES > payload.length) throw new ShaleError('PROTOCOL', 'LIST_PG reply truncated');
    const states = new Uint8Array(blocks);
    const epochs = new Uint32Array(blocks);
    const seqs = new Float64Array(blocks);
    for (let i = 0; i < blocks; i++) {
      states[i] = payload.readUInt8(at);
      epochs[i] = payload.readUInt32LE(at + 4);
      seqs[i] = payload.readDoubleLE(at + 8);
      at += LIST_BLOCK_BYTES;
    }
    objects.push({ volumeId, chunkIndex, states, epochs, seqs });
  }
  return objects;
}

export function encodeVolumeIds(volumeIds: readonly number[]): Buffer {
  const out = Buffer.allocUnsafe(volumeIds.length * 8);
  volumeIds.forEach((id, i) => writeU64(out, i * 8, id));
  return out;
}

export function decodeVolumeIds(payload: Buffer): number[] {
  if (payload.length % 8 !== 0) throw new ShaleError('PROTOCOL', 'volume id list is not a multiple of 8 bytes');
  const ids: number[] = [];
  for (let at = 0; at < payload.length; at += 8) ids.push(readU64(payload, at));
  return ids;
}

/** Versions compare as (epoch, seq) pairs. */
export const BLOCK_VERSION_BYTES = 16;

export function encodeBlockVersions(versions: { states: Uint8Array; epochs: ArrayLike<number>; seqs: ArrayLike<number> }, count: number): Buffer {
  const out = Buffer.alloc(count * BLOCK_VERSION_BYTES);
  for (let i = 0; i < count; i++) {
    out.writeUInt8(versions.states[i]!, i * BLOCK_VERSION_BYTES);
    out.writeUInt32LE(versions.epochs[i]!, i * BLOCK_VERSION_BYTES + 4);
    out.writeDoubleLE(versions.seqs[i]!, i * BLOCK_VERSION_BYTES + 8);
  }
  return out;
}

export function decodeBlockVersions(payload: Buffer, count: number): { states: Uint8Array; epochs: Uint32Array; seqs: Float64Array } {
  if (payload.length !== count * BLOCK_VERSION_BYTES) throw new ShaleError('PROTOCOL', `BLOCK_VERSIONS reply of ${payload.length} bytes for ${count} blocks`);
  const states = new Uint8Array(count);
  const epochs = new Uint32Array(count);
  const seqs = new Float64Array(count);
  for (let i = 0; i < count; i++) {
    states[i] = payload.readUInt8(i * BLOCK_VERSION_BYTES);
    epochs[i] = payload.readUInt32LE(i * BLOCK_VERSION_BYTES + 4);
    seqs[i] = payload.readDoubleLE(i * BLOCK_VERSION_BYTES + 8);
  }
  return { states, epochs, seqs };
}

export function compareVersions(epochA: number, seqA: number, epochB: number, seqB: number): number {
  return epochA !== epochB ? epochA - epochB : seqA - seqB;
}

/** One entry of a RECENT_WRITES reply. */
export interface RecentWriteEntry {
  chunkIndex: number;
  offsetBlocks: number;
  countBlocks: number;
  epoch: number;
  seq: number;
}

export const RECENT_WRITE_BYTES = 24;

export function encodeRecentWrites(entries: readonly RecentWriteEntry[]): Buffer {
  const out = Buffer.allocUnsafe(entries.length * RECENT_WRITE_BYTES);
  entries.forEach((entry, i) => {
    const at = i * RECENT_WRITE_BYTES;
    out.writeUInt32LE(entry.chunkIndex, at);
    out.writeUInt32LE(entry.offsetBlocks, at + 4);
    out.writeUInt32LE(entry.countBlocks, at + 8);
    out.writeUInt32LE(entry.epoch, at + 12);
    out.writeDoubleLE(entry.seq, at + 16);
  });
  return out;
}

export function decodeRecentWrites(payload: Buffer): RecentWriteEntry[] {
  if (payload.length % RECENT_WRITE_BYTES !== 0) throw new ShaleError('PROTOCOL', 'RECENT_WRITES reply is not a whole number of entries');
  const entries: RecentWriteEntry[] = [];
  for (let at = 0; at < payload.length; at += RECENT_WRITE_BYTES) {
    entries.push({
      chunkIndex: payload.readUInt32LE(at), offsetBlocks: payload.readUInt32LE(at + 4), countBlocks: payload.readUInt32LE(at + 8),
      epoch: payload.readUInt32LE(at + 12), seq: payload.readDoubleLE(at + 16),
    });
  }
  return entries;
}

/** What a scrub found: every live block read and checked against its crc32c. */
export interface ScrubReport {
  objects: number;
  blocks: number;
  bytesRead: number;
  badBlocks: number;
  /** Of the bad blocks, those the disk could not read at all. */
  unreadableBlocks: number;
  /** The first bad blocks (a bounded list). */
  bad: { volumeId: number; chunkIndex: number; block: number; [detail: string]: unknown }[];
  durationMs: number;
}

/** One key-value record as KV_GET and KV_LIST carry it. */
export interface KvRecord {
  key: Buffer;
  value: Buffer;
  epoch: number;
  seq: number;
}

/** The most entries one KV_LIST returns. */
export const KV_LIST_LIMIT_MAX = 10_000;

export function encodeKvKey(key: Buffer, value?: Buffer): Buffer[] {
  if (key.length < 1 || key.length > 0xffff) throw new ShaleError('INVALID_ARGUMENT', `key of ${key.length} bytes`);
  const length = Buffer.allocUnsafe(2);
  length.writeUInt16LE(key.length, 0);
  return value ? [length, key, value] : [length, key];
}

export function decodeKvKey(payload: Buffer): { key: Buffer; value: Buffer } {
  if (payload.length < 2) throw new ShaleError('PROTOCOL', 'key-value payload shorter than its key length');
  const keyBytes = payload.readUInt16LE(0);
  if (keyBytes < 1 || 2 + keyBytes > payload.length) throw new ShaleError('PROTOCOL', `key-value payload with a bad key length ${keyBytes}`);
  return { key: payload.subarray(2, 2 + keyBytes), value: payload.subarray(2 + keyBytes) };
}

export function encodeKvListRequest(prefix: Buffer, startAfter: Buffer | undefined): Buffer {
  const after = startAfter ?? Buffer.alloc(0);
  if (prefix.length > 0xffff || after.length > 0xffff) throw new ShaleError('INVALID_ARGUMENT', 'prefix or start-after too long');
  const out = Buffer.allocUnsafe(4 + prefix.length + after.length);
  out.writeUInt16LE(prefix.length, 0);
  prefix.copy(out, 2);
  out.writeUInt16LE(after.length, 2 + prefix.length);
  after.copy(out, 4 + prefix.length);
  return out;
}

export function decodeKvListRequest(payload: Buffer): { prefix: Buffer; startAfter: Buffer | undefined } {
  if (payload.length < 4) throw new ShaleError('PROTOCOL', 'KV_LIST request too short');
  const prefixBytes = payload.readUInt16LE(0);
  if (2 + prefixBytes + 2 > payload.length) throw new ShaleError('PROTOCOL', 'KV_LIST request truncated');
  const prefix = payload.subarray(2, 2 + prefixBytes);
  const afterBytes = payload.readUInt16LE(2 + prefixBytes);
  if (4 + prefixBytes + afterBytes !== payload.length) throw new ShaleError('PROTOCOL', 'KV_LIST request of the wrong length');
  const startAfter = afterBytes > 0 ? payload.subarray(4 + prefixBytes) : undefined;
  return { prefix, startAfter };
}

const KV_ENTRY_HEADER_BYTES = 18;

export function encodeKvRecords(records: readonly KvRecord[]): Buffer {
  let size = 0;
  for (const record of records) size += KV_ENTRY_HEADER_BYTES + record.key.length + record.value.length;
  const out = Buffer.allocUnsafe(size);
  let at = 0;
  for (const record of records) {
    out.writeUInt16LE(record.key.length, at);
    out.writeUInt32LE(record.value.length, at + 2);
    out.writeUInt32LE(record.epoch >>> 0, at + 6);
    out.writeDoubleLE(record.seq, at + 10);
    at += KV_ENTRY_HEADER_BYTES;
    record.key.copy(out, at);
    at += record.key.length;
    record.value.copy(out, at);
    at += record.value.length;
  }
  return out;
}

export function decodeKvRecords(payload: Buffer): KvRecord[] {
  const records: KvRecord[] = [];
  let at = 0;
  while (at < payload.length) {
    if (at + KV_ENTRY_HEADER_BYTES > payload.length) throw new ShaleError('PROTOCOL', 'KV_LIST reply truncated');
    const keyBytes = payload.readUInt16LE(at);
    const valueBytes = payload.readUInt32LE(at + 2);
    const epoch = payload.readUInt32LE(at + 6);
    const seq = payload.readDoubleLE(at + 10);
    at += KV_ENTRY_HEADER_BYTES;
    if (at + keyBytes + valueBytes > payload.length) throw new ShaleError('PROTOCOL', 'KV_LIST reply truncated');
    records.push({ key: payload.subarray(at, at + keyBytes), value: payload.subarray(at + keyBytes, at + keyBytes + valueBytes), epoch, seq });
    at += keyBytes + valueBytes;
  }
  return records;
}

/** One record of a KV_LIST_PG reply: value undefined for a delete tombstone. */
export interface KvPgRecord {
  shardId: number;
  key: Buffer;
  value: Buffer | undefined;
  epoch: number;
  seq: number;
}

const KV_PG_ENTRY_HEADER_BYTES = 27;

export function encodeKvPgCursor(after: { shardId: number; key: Buffer } | undefined): Buffer {
  if (!after) return Buffer.alloc(0);
  const out = Buffer.allocUnsafe(10 + after.key.length);
  writeU64(out, 0, after.shardId);
  out.writeUInt16LE(after.key.length, 8);
  after.key.copy(out, 10);
  return out;
}

export function decodeKvPgCursor(payload: Buffer): { shardId: number; key: Buffer } | undefined {
  if (payload.length === 0) return undefined;
  if (payload.length < 10 || payload.length !== 10 + payload.readUInt16LE(8)) throw new ShaleError('PROTOCOL', 'KV_LIST_PG request of the wrong length');
  return { shardId: readU64(payload, 0), key: payload.subarray(10) };
}

export function encodeKvPgRecords(records: readonly KvPgRecord[]): Buffer {
  let size = 0;
  for (const record of records) size += KV_PG_ENTRY_HEADER_BYTES + record.key.length + (record.value?.length ?? 0);
  const out = Buffer.allocUnsafe(size);
  let at = 0;
  for (const record of records) {
    writeU64(out, at, record.shardId);
    out.writeUInt8(record.value ? 1 : 0, at + 8);
    out.writeUInt16LE(record.key.length, at + 9);
    out.writeUInt32LE(record.value?.length ?? 0, at + 11);
    out.writeUInt32LE(record.epoch >>> 0, at + 15);
    out.writeDoubleLE(record.seq, at + 19);
    at += KV_PG_ENTRY_HEADER_BYTES;
    record.key.copy(out, at);
    at += record.key.length;
    if (record.value) {
      record.value.copy(out, at);
      at += record.value.length;
    }
  }
  return out;
}

export function decodeKvPgRecords(payload: Buffer): KvPgRecord[] {
  const records: KvPgRecord[] = [];
  let at = 0;
  while (at < payload.length) {
    if (at + KV_PG_ENTRY_HEADER_BYTES > payload.length) throw new ShaleError('PROTOCOL', 'KV_LIST_PG reply truncated');
    const shardId = readU64(payload, at);
    const live = payload.readUInt8(at + 8) === 1;
    const keyBytes = payload.readUInt16LE(at + 9);
    const valueBytes = payload.readUInt32LE(at + 11);
    const epoch = payload.readUInt32LE(at + 15);
    const seq = payload.readDoubleLE(at + 19);
    at += KV_PG_ENTRY_HEADER_BYTES;
    if (at + keyBytes + valueBytes > payload.length) throw new ShaleError('PROTOCOL', 'KV_LIST_PG reply truncated');
    const key = payload.subarray(at, at + keyBytes);
    const value = live ? payload.subarray(at + keyBytes, at + keyBytes + valueBytes) : undefined;
    records.push({ shardId, key, value, epoch, seq });
    at += keyBytes + valueBytes;
  }
  return records;
}
