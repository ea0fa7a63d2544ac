/**
 * The Shale volume image format (docs/snapshots.md, "Image files"): a full or incremental copy of
 * a volume at a snapshot, written by `shale volume export` and applied by `shale volume import`.
 * Pure codecs over Buffers; the file I/O is the CLI's.
 *
 *   header (4096 bytes):
 *     0   8  magic "SHALEIMG"
 *     8   4  format version (1)
 *    12   4  JSON length n
 *    16   n  JSON ImageHeader (UTF-8), then zeros up to byte 4092
 *  4092   4  crc32c of bytes 0..4091
 *   records, in increasing offset order, back to back:
 *     0   4  magic 0x52494853 ("SHIR")
 *     4   1  kind: 1 DATA, 2 ZERO, 3 END
 *     5   3  zero
 *     8   8  offset in bytes (u64 LE; DATA and ZERO: a multiple of 4096)
 *    16   8  length in bytes (DATA: at most 4 MiB, a multiple of 4096; ZERO: any multiple of 4096;
 *             END: the number of DATA and ZERO records before it)
 *    24   4  crc32c of the data (DATA), else 0
 *    28   4  crc32c of bytes 0..27
 *     then, for DATA, `length` bytes of data.
 *
 * A DATA record sets bytes; a ZERO record makes the range read as zeros (a tombstone: no space);
 * ranges no record covers are left as they are (an incremental image names only what changed
 * since `fromSnapshot`; a full image covers every byte). A file is complete only with its END
 * record; a file cut short (an interrupted export) is resumed after its last whole record.
 */
import { crc32c } from '../lib/crc32c.ts';
import { ShaleError } from '../lib/errors.ts';

export const IMAGE_MAGIC = 'SHALEIMG';
export const IMAGE_VERSION = 1;
export const IMAGE_HEADER_BYTES = 4096;
export const RECORD_HEADER_BYTES = 32;
export const RECORD_MAGIC = 0x52494853;
export const DATA_RECORD_BYTES_MAX = 4 * 1024 * 1024;

export const RecordKind = { DATA: 1, ZERO: 2, END: 3 } as const;

export interface ImageHeader {
  /** The volume and snapshot the image was taken from. */
  volume: string;
  snapshot: string;
  snapshotId: number;
  /** The snapshot an incremental image starts from; null for a full image. */
  fromSnapshot: string | null;
  fromSnapshotId: number | null;
  /** The size of the volume at `snapshot`. */
  sizeBytes: number;
  blockSizeBytes: 4096;
  createdAt: string;
}

export interface ImageRecord {
  kind: number;
  offsetBytes: number;
  lengthBytes: number;
  dataCrc: number;
}

function writeU64(buffer: Buffer, at: number, value: number): void {
  buffer.writeUInt32LE(value >>> 0, at);
  buffer.writeUInt32LE(Math.floor(value / 2 ** 32), at + 4);
}

function readU64(buffer: Buffer, at: number): number {
  return buffer.readUInt32LE(at + 4) * 2 ** 32 + buffer.readUInt32LE(at);
}

export function encodeImageHeader(header: ImageHeader): Buffer {
  const out = Buffer.alloc(IMAGE_HEADER_BYTES);
  out.write(IMAGE_MAGIC, 0, 'latin1');
  out.writeUInt32LE(IMAGE_VERSION, 8);
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  if (json.length > IMAGE_HEADER_BYTES - 20) throw new ShaleError('INVALID_ARGUMENT', 'image header too long');
  out.writeUInt32LE(json.length, 12);
  json.copy(out, 16);
  out.writeUInt32LE(crc32c(out.subarray(0, 4092)), 4092);
  return out;
}

/** Errors: INVALID_ARGUMENT (not a Shale image, or damaged), NOT_SUPPORTED (a newer format version). */
export function decodeImageHeader(buffer: Buffer): ImageHeader {
  if (buffer.length < IMAGE_HEADER_BYTES || buffer.toString('latin1', 0, 8) !== IMAGE_MAGIC) throw new ShaleError('INVALID_ARGUMENT', 'not a Shale volume image (bad magic)');
  if (crc32c(buffer.subarray(0, 4092)) !== buffer.readUInt32LE(4092)) throw new ShaleError('INVALID_ARGUMENT', 'the image header is damaged (crc32c)');
  const version = buffer.readUInt32LE(8);
  if (version !== IMAGE_VERSION) throw new ShaleError('NOT_SUPPORTED', `image format version ${version} is not supported (this Shale reads ${IMAGE_VERSION})`);
  const length = buffer.readUInt32LE(12);
  if (length > IMAGE_HEADER_BYTES - 20) throw new ShaleError('INVALID_ARGUMENT', 'the image header is damaged (length)');
  const header = JSON.parse(buffer.toString('utf8', 16, 16 + length)) as ImageHeader;
  if (!Number.isSafeInteger(header.sizeBytes) || header.sizeBytes <= 0 || header.sizeBytes % 4096 !== 0) throw new ShaleError('INVALID_ARGUMENT', 'the image header has a bad size');
  return header;
}

export function encodeRecordHeader(record: ImageRecord): Buffer {
  const out = Buffer.alloc(RECORD_HEADER_BYTES);
  out.writeUInt32LE(RECORD_MAGIC, 0);
  out.writeUInt8(record.kind, 4);
  writeU64(out, 8, record.offsetBytes);
  writeU64(out, 16, record.lengthBytes);
  out.writeUInt32LE(record.dataCrc >>> 0, 24);
  out.writeUInt32LE(crc32c(out.subarray(0, 28)), 28);
  return out;
}

/** Undefined when the bytes are not a whole, valid record header (the end of a cut-short file). */
export function decodeRecordHeader(buffer: Buffer): ImageRecord | undefined {
  if (buffer.length < RECORD_HEADER_BYTES || buffer.readUInt32LE(0) !== RECORD_MAGIC) return undefined;
  if (crc32c(buffer.subarray(0, 28)) !== buffer.readUInt32LE(28)) return undefined;
  const record = { kind: buffer.readUInt8(4), offsetBytes: readU64(buffer, 8), lengthBytes: readU64(buffer, 16), dataCrc: buffer.readUInt32LE(24) };
  if (record.kind < RecordKind.DATA || record.kind > RecordKind.END) return undefined;
  if (record.kind === RecordKind.DATA && (record.lengthBytes === 0 || record.lengthBytes > DATA_RECORD_BYTES_MAX)) return undefined;
  return record;
}
