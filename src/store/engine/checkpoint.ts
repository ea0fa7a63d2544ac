/**
 * The checkpoint image: everything the engine knows in memory at one batch sequence, as bytes
 * (docs/format.md, "Checkpoint image"). Written into checkpoint segments and named by a root;
 * loaded at open, after which replay applies the batches written after that sequence.
 *
 * The image is a pure function of the state handed in; decoding validates every length and
 * range and throws `ImageError` on anything malformed (the root's crc32c over the whole image
 * already caught damage, so this only fires on a bug or a forged image).
 */
import { BLOCK_SIZE_BYTES } from '../../lib/units.ts';
import { BlockIndex, ObjectTable } from './block-index.ts';
import { CHUNK_BLOCKS_MAX, readU64, writeU64 } from './format.ts';

export const IMAGE_MAGIC = Buffer.from('SHALECKP', 'latin1');
export const IMAGE_VERSION = 1;

const little = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

export class ImageError extends Error {
  override name = 'ImageError';
}

export interface ImageSegments {
  generation: Float64Array;
  generationMax: Float64Array;
  firstSequence: Float64Array;
  damaged: Uint8Array;
}

export interface ImageVolume {
  volumeId: number;
  fence?: { epoch: number; location: number };
  purgeLocation?: number;
  snapshots?: { ids: number[]; knownSeq: number; keepTombstones: boolean; version: number; location: number };
}

export interface ImageKvEntry {
  /** The key's bytes as a latin1 string (byte order = string order). */
  key: string;
  /** undefined: a delete tombstone. */
  value: Buffer | undefined;
  epoch: number;
  seq: number;
  location: number;
}

export interface CheckpointState {
  checkpointSequence: number;
  segments: ImageSegments;
  volumes: ImageVolume[];
  index: BlockIndex;
  kv: Map<number, Map<string, ImageKvEntry>>;
}

class ImageWriter {
  buffer: Buffer;
  at = 0;

  /** `sizeHint`: the expected image size; a good hint means one allocation, no doubling and copying. */
  constructor(sizeHint = 64 * 1024) {
    this.buffer = Buffer.allocUnsafe(Math.max(64 * 1024, Math.ceil(sizeHint)));
  }

  ensure(bytes: number): void {
    if (this.at + bytes <= this.buffer.length) return;
    let size = this.buffer.length * 2;
    while (size < this.at + bytes) size *= 2;
    const grown = Buffer.allocUnsafe(size);
    this.buffer.copy(grown, 0, 0, this.at);
    this.buffer = grown;
  }

  u8(value: number): void {
    this.ensure(1);
    this.buffer.writeUInt8(value, this.at);
    this.at += 1;
  }

  u16(value: number): void {
    this.ensure(2);
    this.buffer.writeUInt16LE(value, this.at);
    this.at += 2;
  }

  u32(value: number): void {
    this.ensure(4);
    this.buffer.writeUInt32LE(value >>> 0, this.at);
    this.at += 4;
  }

  u64(value: number): void {
    this.ensure(8);
    writeU64(this.buffer, this.at, value);
    this.at += 8;
  }

  /** A location or "none" (-1). */
  f64(value: number): void {
    this.ensure(8);
    this.buffer.writeDoubleLE(value, this.at);
    this.at += 8;
  }

  bytes(data: Uint8Array): void {
    this.ensure(data.length);
    this.buffer.set(data, this.at);
    this.at += data.length;
  }

  typed(array: Uint32Array | Uint16Array | Uint8Array, count: number): void {
    const bytes = count * array.BYTES_PER_ELEMENT;
    this.bytes(new Uint8Array(array.buffer, array.byteOffset, bytes));
  }

  finish(): Buffer {
    return this.buffer.subarray(0, this.at);
  }
}

class ImageReader {
  readonly #buffer: Buffer;
  at = 0;

  constructor(buffer: Buffer) {
    this.#buffer = buffer;
  }

  #need(bytes: number): void {
    if (this.at + bytes > this.#buffer.length) throw new ImageError(`checkpoint image ends early (need ${bytes} bytes at ${this.at})`);
  }

  u8(): number {
    this.#need(1);
    return this.#buffer.readUInt8(this.at++);
  }

  u16(): number {
    this.#need(2);
    const value = this.#buffer.readUInt16LE(this.at);
    this.at += 2;
    return value;
  }

  u32(): number {
    this.#need(4);
    const value = this.#buffer.readUInt32LE(this.at);
    this.at += 4;
    return value;
  }

  u64(): number {
    this.#need(8);
    const value = readU64(this.#buffer, this.at);
    if (value === undefined) throw new ImageError(`checkpoint image: u64 at ${this.at} is above 2^53`);
    this.at += 8;
    return value;
  }

  f64(): number {
    this.#need(8);
    const value = this.#buffer.readDoubleLE(this.at);
    this.at += 8;
    return value;
  }

  bytes(count: number): Buffer {
    this.#need(count);
    const value = Buffer.from(this.#buffer.subarray(this.at, this.at + count));
    this.at += count;
    return value;
  }

  typed<T extends Uint32Array | Uint16Array | Uint8Array>(make: (count: number) => T, count: number): T {
    const array = make(count);
    const bytes = count * array.BYTES_PER_ELEMENT;
    this.#need(bytes);
    new Uint8Array(array.buffer).set(this.#buffer.subarray(this.at, this.at + bytes));
    this.at += bytes;
    return array;
  }

  get done(): boolean {
    return this.at === this.#buffer.length;
  }
}

const VOLUME_FENCE = 1;
const VOLUME_PURGE = 2;
const VOLUME_SNAPSHOTS = 4;

/** Serialises the state (synchronously: the caller holds the writer, so nothing changes meanwhile). */
export function encodeImage(state: CheckpointState, sizeHint?: number): Buffer {
  if (!little) throw new Error('checkpoint images are written from little-endian typed arrays');
  const writer = new ImageWriter(sizeHint);
  const segmentCount = state.segments.generation.length;
  writer.bytes(IMAGE_MAGIC);
  writer.u32(IMAGE_VERSION);
  writer.u32(0);
  writer.u64(state.checkpointSequence);
  writer.u32(segmentCount);
  writer.u32(0);
  for (let s = 0; s < segmentCount; s++) {
    writer.u64(state.segments.generation[s]!);
    writer.u64(state.segments.generationMax[s]!);
    writer.u64(state.segments.firstSequence[s]!);
    writer.u8(state.segments.damaged[s]!);
  }

  writer.u32(state.volumes.length);
  for (const volume of state.volumes) {
    writer.u64(volume.volumeId);
    writer.u8((volume.fence ? VOLUME_FENCE : 0) | (volume.purgeLocation !== undefined ? VOLUME_PURGE : 0) | (volume.snapshots ? VOLUME_SNAPSHOTS : 0));
    if (volume.fence) {
      writer.u32(volume.fence.epoch);
      writer.f64(volume.fence.location);
    }
    if (volume.purgeLocation !== undefined) writer.f64(volume.purgeLocation);
    if (volume.snapshots) {
      writer.u64(volume.snapshots.knownSeq);
      writer.u8(volume.snapshots.keepTombstones ? 1 : 0);
      writer.u64(volume.snapshots.version);
      writer.f64(volume.snapshots.location);
      writer.u32(volume.snapshots.ids.length);
      for (const id of volume.snapshots.ids) writer.u64(id);
    }
  }

  writer.u32(state.index.objectCount);
  for (const table of state.index.objects()) {
    const highest = table.highestBlocks;
    writer.u64(table.volumeId);
    writer.u32(table.chunkIndex);
    writer.u32(highest);
    const contexts = table.ctxKind.length - 1;
    writer.u32(contexts);
    writer.u8(table.ctx.BYTES_PER_ELEMENT);
    writer.u8(table.seqLow ? 1 : 0);
    for (let c = 1; c <= contexts; c++) {
      writer.u8(table.ctxKind[c]!);
      writer.u32(table.ctxEpoch[c]!);
      writer.u64(table.ctxSeq[c]!);
      writer.u64(table.ctxStamp[c]!);
    }
    writer.typed(table.location, highest);
    writer.typed(table.crc, highest);
    if (table.seqLow) writer.typed(table.seqLow, highest);
    writer.typed(table.ctx, highest);
    writer.u32(table.historyCount);
    let written = 0;
    if (table.historyCount > 0) {
      for (let block = 0; block < table.capacity; block++) {
        for (let entry = table.firstHistory(block); entry >= 0; entry = table.hNext[entry]!) {
          writer.u32(block);
          writer.u32(table.hLocation[entry]!);
          writer.u32(table.hCrc[entry]!);
          writer.u32(table.hSeqLow[entry]!);
          writer.u16(table.hCtx[entry]!);
          written++;
        }
      }
    }
    if (written !== table.historyCount) throw new Error('history count does not match its chains');
  }

  writer.u32(state.kv.size);
  for (const [shardId, entries] of state.kv) {
    writer.u64(shardId);
    writer.u32(entries.size);
    for (const entry of entries.values()) {
      const key = Buffer.from(entry.key, 'latin1');
      writer.u16(key.length);
      writer.bytes(key);
      writer.u8(entry.value ? 1 : 2);
      writer.u32(entry.epoch);
      writer.u64(entry.seq);
      writer.f64(entry.location);
      writer.u32(entry.value?.length ?? 0);
      if (entry.value) writer.bytes(entry.value);
    }
  }
  return writer.finish();
}

/** Decodes an image for a disk of `segmentCount` segments of `blocksPerSegment` blocks. */
export function decodeImage(image: Buffer, segmentCount: number, blocksPerSegment: number): CheckpointState {
  if (!little) throw new Error('checkpoint images are read into little-endian typed arrays');
  const reader = new ImageReader(image);
  const magic = reader.bytes(8);
  if (!magic.equals(IMAGE_MAGIC)) throw new ImageError('checkpoint image has no magic');
  if (reader.u32() !== IMAGE_VERSION) throw new ImageError('checkpoint image has an unknown version');
  reader.u32();
  const checkpointSequence = reader.u64();
  if (reader.u32() !== segmentCount) throw new ImageError('checkpoint image is for another segment count');
  reader.u32();
  const segments: ImageSegments = {
    generation: new Float64Array(segmentCount),
    generationMax: new Float64Array(segmentCount),
    firstSequence: new Float64Array(segmentCount),
    damaged: new Uint8Array(segmentCount),
  };
  for (let s = 0; s < segmentCount; s++) {
    segments.generation[s] = reader.u64();
    segments.generationMax[s] = reader.u64();
    segments.firstSequence[s] = reader.u64();
    segments.damaged[s] = reader.u8();
  }
  const locationLimit = segmentCount * blocksPerSegment;
  const checkLocation = (location: number): number => {
    if (!Number.isInteger(location) || location < 0 || location >= locationLimit) throw new ImageError(`checkpoint image: location ${location} is out of range`);
    return location;
  };

  const volumes: ImageVolume[] = [];
  for (let v = reader.u32(); v > 0; v--) {
    const volume: ImageVolume = { volumeId: reader.u64() };
    const flags = reader.u8();
    if (flags & VOLUME_FENCE) volume.fence = { epoch: reader.u32(), location: checkLocation(reader.f64()) };
    if (flags & VOLUME_PURGE) volume.purgeLocation = checkLocation(reader.f64());
    if (flags & VOLUME_SNAPSHOTS) {
      const knownSeq = reader.u64();
      const keepTombstones = reader.u8() === 1;
      const version = reader.u64();
      const location = checkLocation(reader.f64());
      const ids: number[] = [];
      for (let n = reader.u32(); n > 0; n--) ids.push(reader.u64());
      volume.snapshots = { ids, knownSeq, keepTombstones, version, location };
    }
    volumes.push(volume);
  }

  const index = new BlockIndex();
  for (let o = reader.u32(); o > 0; o--) {
    const volumeId = reader.u64();
    const chunkIndex = reader.u32();
    const highest = reader.u32();
    if (highest > CHUNK_BLOCKS_MAX) throw new ImageError('checkpoint image: object larger than the largest chunk');
    const contextCount = reader.u32();
    const width = reader.u8();
    if (width !== 1 && width !== 2) throw new ImageError('checkpoint image: bad context width');
    const wide = reader.u8();
    if (wide > 1) throw new ImageError('checkpoint image: bad sequence layout');
    const contexts: { kind: number; epoch: number; seq: number; stamp: number }[] = [];
    for (let c = 0; c < contextCount; c++) contexts.push({ kind: reader.u8(), epoch: reader.u32(), seq: reader.u64(), stamp: reader.u64() });
    for (const context of contexts) if (context.kind !== 1 && context.kind !== 2) throw new ImageError('checkpoint image: bad context kind');
    if (!wide && contextCount > 255) throw new ImageError('checkpoint image: a compact table with more than 255 contexts');
    const location = reader.typed((n) => new Uint32Array(n), highest);
    const crc = reader.typed((n) => new Uint32Array(n), highest);
    const seqLow = wide ? reader.typed((n) => new Uint32Array(n), highest) : undefined;
    const ctx = width === 1 ? reader.typed((n) => new Uint8Array(n), highest) : reader.typed((n) => new Uint16Array(n), highest);
    for (let b = 0; b < highest; b++) {
      if (ctx[b]! > contextCount) throw new ImageError('checkpoint image: block refers to a missing context');
      if (ctx[b] !== 0) checkLocation(location[b]!);
    }
    const table: ObjectTable = index.getOrCreate(volumeId, chunkIndex, 0);
    table.restore(contexts, highest, location, crc, seqLow, ctx);
    for (let h = reader.u32(); h > 0; h--) {
      const block = reader.u32();
      const entryLocation = checkLocation(reader.u32());
      const entryCrc = reader.u32();
      const entrySeqLow = reader.u32();
      const entryCtx = reader.u16();
      if (block >= table.capacity || entryCtx === 0 || entryCtx > contextCount) throw new ImageError('checkpoint image: bad history entry');
      table.restoreHistory(block, entryLocation, entryCrc, entrySeqLow, entryCtx);
    }
    table.finishRestore();
  }

  const kv = new Map<number, Map<string, ImageKvEntry>>();
  for (let s = reader.u32(); s > 0; s--) {
    const shardId = reader.u64();
    const entries = new Map<string, ImageKvEntry>();
    for (let e = reader.u32(); e > 0; e--) {
      const key = reader.bytes(reader.u16()).toString('latin1');
      const kind = reader.u8();
      const epoch = reader.u32();
      const seq = reader.u64();
      const location = checkLocation(reader.f64());
      const valueBytes = reader.u32();
      const value = reader.bytes(valueBytes);
      if (kind !== 1 && kind !== 2) throw new ImageError('checkpoint image: bad key-value kind');
      entries.set(key, { key, value: kind === 1 ? value : undefined, epoch, seq, location });
    }
    kv.set(shardId, entries);
  }
  if (!reader.done) throw new ImageError('checkpoint image has trailing bytes');
  return { checkpointSequence, segments, volumes, index, kv };
}

/** Bytes of image payload one checkpoint segment holds. */
export function imageBytesPerSegment(segmentSizeBytes: number): number {
  return segmentSizeBytes - 2 * BLOCK_SIZE_BYTES;
}
