/**
 * The NBD wire protocol (NetworkBlockDevice/nbd doc/proto.md): constants, and pure codecs over
 * Buffers for both sides of the fixed newstyle handshake (with meta contexts) and of the
 * transmission phase with simple and structured replies. No I/O here: `src/nbd/session.ts` drives a
 * socket with these functions.
 *
 * Everything on the wire is big-endian. 64-bit fields are read as two 32-bit halves; an offset is
 * returned as a JS number (`high * 2^32 + low`), exact below 2^53 and, above that, still larger than
 * any export, so range checks stay correct. The request cookie (once called "handle") is opaque and
 * carried as two uint32 halves so it can be echoed without BigInt.
 *
 * `NbdServerParser` frames what a client sends — client flags, options, requests with their write
 * payload — from an arbitrary split of the byte stream. Headers are read in place from the socket's
 * chunks (a header split across chunks is first copied into a 28-byte scratch buffer); a write
 * payload that lies within one chunk is returned as a view of that chunk, otherwise it is copied
 * once into a buffer of its exact size. Every buffer is bounded: option data by
 * `optionDataBytesMax` (larger options are skipped without buffering), write payloads by
 * `payloadBytesMax` (larger ones are skipped up to `oversizedPayloadSkipBytesMax`, beyond which the
 * stream is treated as garbage). A framing error (bad magic, a payload too large to skip) is a
 * ShaleError PROTOCOL and is sticky: the parser stays failed and the connection must be closed.
 *
 * `NbdReplyParser` is its mirror for a client: it frames simple replies (whose data length only the
 * client knows, from the request) and structured reply chunks (bounded by `chunkPayloadBytesMax`).
 */
import { assert } from '../lib/assert.ts';
import { ShaleError } from '../lib/errors.ts';
import { MiB } from '../lib/units.ts';

// ---------------------------------------------------------------------------------------------
// Constants

/** 'NBDMAGIC', sent first by the server. */
export const NBD_INIT_MAGIC = Buffer.from('NBDMAGIC', 'latin1');
/** 'IHAVEOPT': the newstyle server magic, and the magic of every option the client sends. */
export const NBD_OPTION_MAGIC = Buffer.from('IHAVEOPT', 'latin1');
/** 0x3e889045565a9, the magic of an option reply, as two 32-bit halves. */
export const NBD_OPTION_REPLY_MAGIC_HIGH = 0x0003e889;
export const NBD_OPTION_REPLY_MAGIC_LOW = 0x045565a9;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
/** Defined by the EXTENDED_HEADERS extension; refused as garbage until that is negotiated. */
export const NBD_EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const NBD_EXTENDED_REPLY_MAGIC = 0x6e8a278c;

/** Server greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags. */
export const NBD_GREETING_BYTES = 18;
export const NBD_CLIENT_FLAGS_BYTES = 4;
/** Option request header: IHAVEOPT, option, data length. */
export const NBD_OPTION_HEADER_BYTES = 16;
/** Option reply header: magic, option, reply type, data length. */
export const NBD_OPTION_REPLY_HEADER_BYTES = 20;
/** Reply to NBD_OPT_EXPORT_NAME: size, transmission flags, then 124 zero bytes unless NO_ZEROES. */
export const NBD_EXPORT_NAME_REPLY_BYTES = 10;
export const NBD_EXPORT_NAME_REPLY_ZEROES_BYTES = 124;
export const NBD_REQUEST_HEADER_BYTES = 28;
export const NBD_SIMPLE_REPLY_HEADER_BYTES = 16;
export const NBD_STRUCTURED_REPLY_HEADER_BYTES = 20;

/** Strings (export names, descriptions, messages) MUST be at most 4096 bytes (proto.md "Conventions"). */
export const NBD_STRING_BYTES_MAX = 4096;

/** The size constraints Shale advertises: proto.md's defaults, so clients need not ask for them. */
export const NBD_BLOCK_SIZE_MINIMUM = 1;
export const NBD_BLOCK_SIZE_PREFERRED = 4096;
export const NBD_PAYLOAD_BYTES_MAX = 32 * MiB;
/** proto.md: a server SHOULD NOT send more than 2^20 extents in one block status chunk. */
export const NBD_BLOCK_STATUS_EXTENTS_MAX = 2 ** 20;
/** proto.md: a minimum block size MUST NOT be larger than 2^16. */
export const NBD_BLOCK_SIZE_MINIMUM_MAX = 64 * 1024;

export const NbdHandshakeFlag = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

export const NbdClientFlag = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

export const NbdTransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
  BLOCK_STATUS_PAYLOAD: 1 << 12,
} as const;

export const NbdOption = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const NBD_REPLY_ERROR_BIT = 0x80000000;

export const NbdReply = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: NBD_REPLY_ERROR_BIT + 1,
  ERR_POLICY: NBD_REPLY_ERROR_BIT + 2,
  ERR_INVALID: NBD_REPLY_ERROR_BIT + 3,
  ERR_PLATFORM: NBD_REPLY_ERROR_BIT + 4,
  ERR_TLS_REQD: NBD_REPLY_ERROR_BIT + 5,
  ERR_UNKNOWN: NBD_REPLY_ERROR_BIT + 6,
  ERR_SHUTDOWN: NBD_REPLY_ERROR_BIT + 7,
  ERR_BLOCK_SIZE_REQD: NBD_REPLY_ERROR_BIT + 8,
  ERR_TOO_BIG: NBD_REPLY_ERROR_BIT + 9,
  ERR_EXT_HEADER_REQD: NBD_REPLY_ERROR_BIT + 10,
} as const;

export function isOptionReplyError(replyType: number): boolean {
  return replyType >= NBD_REPLY_ERROR_BIT;
}

export const NbdInfo = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

export const NbdCommand = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

export const NbdCommandFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  PAYLOAD_LEN: 1 << 5,
} as const;

/** Structured reply chunk types, for when NBD_OPT_STRUCTURED_REPLY is supported. */
export const NbdStructuredReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const;

export const NBD_REPLY_FLAG_DONE = 1 << 0;

/** Bytes of an NBD_REPLY_TYPE_OFFSET_DATA chunk before its data: header, then the 64-bit offset. */
export const NBD_OFFSET_DATA_HEADER_BYTES = NBD_STRUCTURED_REPLY_HEADER_BYTES + 8;
/** An NBD_REPLY_TYPE_OFFSET_HOLE chunk: header, 64-bit offset, 32-bit hole size. */
export const NBD_OFFSET_HOLE_CHUNK_BYTES = NBD_STRUCTURED_REPLY_HEADER_BYTES + 12;
/** An error chunk's payload before its message: 32-bit error, 16-bit message length. */
export const NBD_ERROR_CHUNK_FIXED_BYTES = 6;

/** Status flags of the `base:allocation` meta context. */
export const NbdBlockStatusFlag = {
  HOLE: 1 << 0,
  ZERO: 1 << 1,
} as const;

/** The one meta context proto.md defines, and the only one Shale offers. */
export const NBD_META_CONTEXT_BASE_ALLOCATION = 'base:allocation';

export function structuredReplyTypeName(type: number): string {
  for (const [name, value] of Object.entries(NbdStructuredReplyType)) if (value === type) return `NBD_REPLY_TYPE_${name}`;
  return `reply type ${type}`;
}

export function optionName(option: number): string {
  for (const [name, value] of Object.entries(NbdOption)) if (value === option) return `NBD_OPT_${name}`;
  return `option ${option}`;
}

export function commandName(type: number): string {
  for (const [name, value] of Object.entries(NbdCommand)) if (value === type) return `NBD_CMD_${name}`;
  return `command ${type}`;
}

// ---------------------------------------------------------------------------------------------
// Handshake: server side

export function encodeGreeting(handshakeFlags: number): Buffer {
  const buffer = Buffer.allocUnsafe(NBD_GREETING_BYTES);
  NBD_INIT_MAGIC.copy(buffer, 0);
  NBD_OPTION_MAGIC.copy(buffer, 8);
  buffer.writeUInt16BE(handshakeFlags, 16);
  return buffer;
}

/**
 * An option reply: header plus data. `data` may be a Buffer, or a string sent as UTF-8 (an error
 * message, cut to the 4096 bytes a string may have).
 */
export function encodeOptionReply(option: number, replyType: number, data?: Buffer | string): Buffer {
  const payload = typeof data === 'string' ? encodeString(data) : data;
  const lengthBytes = payload?.length ?? 0;
  const buffer = Buffer.allocUnsafe(NBD_OPTION_REPLY_HEADER_BYTES + lengthBytes);
  buffer.writeUInt32BE(NBD_OPTION_REPLY_MAGIC_HIGH, 0);
  buffer.writeUInt32BE(NBD_OPTION_REPLY_MAGIC_LOW, 4);
  buffer.writeUInt32BE(option >>> 0, 8);
  buffer.writeUInt32BE(replyType >>> 0, 12);
  buffer.writeUInt32BE(lengthBytes, 16);
  payload?.copy(buffer, NBD_OPTION_REPLY_HEADER_BYTES);
  return buffer;
}

/** Data of an NBD_REP_SERVER reply: name length, name, then a description for people. */
export function encodeServerEntry(name: string, description: string): Buffer {
  const nameBytes = encodeString(name);
  const descriptionBytes = encodeString(description);
  const buffer = Buffer.allocUnsafe(4 + nameBytes.length + descriptionBytes.length);
  buffer.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(buffer, 4);
  descriptionBytes.copy(buffer, 4 + nameBytes.length);
  return buffer;
}

/** Data of NBD_REP_INFO / NBD_INFO_EXPORT: type, size, transmission flags (12 bytes). */
export function encodeInfoExport(sizeBytes: number, transmissionFlags: number): Buffer {
  const buffer = Buffer.allocUnsafe(12);
  buffer.writeUInt16BE(NbdInfo.EXPORT, 0);
  writeUInt64(buffer, 2, sizeBytes);
  buffer.writeUInt16BE(transmissionFlags, 10);
  return buffer;
}

export function encodeInfoName(name: string): Buffer {
  return encodeInfoString(NbdInfo.NAME, name);
}

export function encodeInfoDescription(description: string): Buffer {
  return encodeInfoString(NbdInfo.DESCRIPTION, description);
}

export interface NbdBlockSizes {
  readonly minimumBytes: number;
  readonly preferredBytes: number;
  readonly maximumPayloadBytes: number;
}

/** Data of NBD_REP_INFO / NBD_INFO_BLOCK_SIZE (14 bytes). */
export function encodeInfoBlockSize(sizes: NbdBlockSizes): Buffer {
  const buffer = Buffer.allocUnsafe(14);
  buffer.writeUInt16BE(NbdInfo.BLOCK_SIZE, 0);
  buffer.writeUInt32BE(sizes.minimumBytes, 2);
  buffer.writeUInt32BE(sizes.preferredBytes, 6);
  buffer.writeUInt32BE(sizes.maximumPayloadBytes, 10);
  return buffer;
}

/** The reply that ends NBD_OPT_EXPORT_NAME: size, flags, and the 124 zeroes unless the client said NO_ZEROES. */
export function encodeExportNameReply(sizeBytes: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const buffer = Buffer.alloc(NBD_EXPORT_NAME_REPLY_BYTES + (noZeroes ? 0 : NBD_EXPORT_NAME_REPLY_ZEROES_BYTES));
  writeUInt64(buffer, 0, sizeBytes);
  buffer.writeUInt16BE(transmissionFlags, 8);
  return buffer;
}

export interface NbdInfoRequest {
  readonly name: string;
  /** NBD_INFO_* types the client asked for, in its order. */
  readonly informationRequests: readonly number[];
}

/**
 * Reads the data of NBD_OPT_INFO / NBD_OPT_GO: name length, name, count, count × 16-bit info types.
 * Errors: INVALID_ARGUMENT when the lengths do not add up or the name is not a valid string (the
 * server answers NBD_REP_ERR_INVALID).
 */
export function decodeInfoRequest(data: Buffer): NbdInfoRequest {
  if (data.length < 6) throw new ShaleError('INVALID_ARGUMENT', `option data of ${data.length} bytes is shorter than 6`);
  const nameBytes = data.readUInt32BE(0);
  if (nameBytes > data.length - 6) {
    throw new ShaleError('INVALID_ARGUMENT', `name length ${nameBytes} does not fit in option data of ${data.length} bytes`);
  }
  const name = decodeString(data.subarray(4, 4 + nameBytes), 'export name');
  const count = data.readUInt16BE(4 + nameBytes);
  const listStart = 6 + nameBytes;
  if (data.length !== listStart + 2 * count) {
    throw new ShaleError('INVALID_ARGUMENT', `${count} information requests need ${listStart + 2 * count} bytes of option data, got ${data.length}`);
  }
  const informationRequests: number[] = [];
  for (let index = 0; index < count; index++) informationRequests.push(data.readUInt16BE(listStart + 2 * index));
  return { name, informationRequests };
}

/** The data of NBD_OPT_EXPORT_NAME is the name itself. Errors: INVALID_ARGUMENT for an invalid string. */
export function decodeExportName(data: Buffer): string {
  return decodeString(data, 'export name');
}

export interface NbdMetaContextRequest {
  readonly exportName: string;
  readonly queries: readonly string[];
}

/**
 * Reads the data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: name length, export name,
 * query count, then each query as length + string. Errors: INVALID_ARGUMENT when the lengths do not
 * add up or a string is invalid (the server answers NBD_REP_ERR_INVALID).
 */
export function decodeMetaContextRequest(data: Buffer): NbdMetaContextRequest {
  let position = 0;
  const need = (count: number, what: string): void => {
    if (count > data.length - position) {
      throw new ShaleError('INVALID_ARGUMENT', `${what} needs ${count} bytes at ${position} of option data of ${data.length} bytes`);
    }
  };
  need(4, 'export name length');
  const nameBytes = data.readUInt32BE(position);
  position += 4;
  need(nameBytes, 'export name');
  const exportName = decodeString(data.subarray(position, position + nameBytes), 'export name');
  position += nameBytes;
  need(4, 'query count');
  const count = data.readUInt32BE(position);
  position += 4;
  // Each query takes at least its 4-byte length: a count the data cannot hold is refused before looping.
  if (count > (data.length - position) / 4) throw new ShaleError('INVALID_ARGUMENT', `${count} queries cannot fit in ${data.length - position} bytes`);
  const queries: string[] = [];
  for (let index = 0; index < count; index++) {
    need(4, `query ${index} length`);
    const queryBytes = data.readUInt32BE(position);
    position += 4;
    need(queryBytes, `query ${index}`);
    queries.push(decodeString(data.subarray(position, position + queryBytes), `query ${index}`));
    position += queryBytes;
  }
  if (position !== data.length) throw new ShaleError('INVALID_ARGUMENT', `${data.length - position} bytes after the last query`);
  return { exportName, queries };
}

export function encodeMetaContextRequest(exportName: string, queries: readonly string[]): Buffer {
  const parts: Buffer[] = [];
  const pushString = (text: string): void => {
    const bytes = Buffer.from(text, 'utf8');
    const length = Buffer.allocUnsafe(4);
    length.writeUInt32BE(bytes.length, 0);
    parts.push(length, bytes);
  };
  pushString(exportName);
  const count = Buffer.allocUnsafe(4);
  count.writeUInt32BE(queries.length, 0);
  parts.push(count);
  for (const query of queries) pushString(query);
  return Buffer.concat(parts);
}

/** Data of NBD_REP_META_CONTEXT: 32-bit context id, then the context name. */
export function encodeMetaContextReply(contextId: number, name: string): Buffer {
  const nameBytes = encodeString(name);
  const buffer = Buffer.allocUnsafe(4 + nameBytes.length);
  buffer.writeUInt32BE(contextId >>> 0, 0);
  nameBytes.copy(buffer, 4);
  return buffer;
}

export function decodeMetaContextReply(data: Buffer): { contextId: number; name: string } {
  if (data.length < 4) throw new ShaleError('PROTOCOL', 'NBD_REP_META_CONTEXT shorter than 4 bytes');
  return { contextId: data.readUInt32BE(0), name: data.toString('utf8', 4) };
}

// ---------------------------------------------------------------------------------------------
// Transmission: server side

/** A request as framed by NbdServerParser. */
export interface NbdRequest {
  readonly kind: 'request';
  readonly flags: number;
  readonly type: number;
  readonly cookieHigh: number;
  readonly cookieLow: number;
  /** Exact below 2^53; above, it is still larger than any export. */
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  /** The write payload (length `lengthBytes`); undefined for commands without one and for skipped payloads. */
  readonly payload: Buffer | undefined;
  /** A write whose payload exceeded the parser's payloadBytesMax and was discarded unread. */
  readonly payloadSkipped: boolean;
  /**
   * The payload is in a buffer from the parser's `payloadBuffer` (every payload while reading in
   * place, else one that arrived in more than one socket read); false for a view of the bytes as
   * they arrived, and without a payload.
   */
  readonly payloadLent: boolean;
}

/** Reads a request header at `offset` of `source`, which must hold 28 bytes there. Does not check the magic. */
export function decodeRequestHeader(source: Buffer, offset: number): { magic: number; flags: number; type: number; cookieHigh: number; cookieLow: number; offsetBytes: number; lengthBytes: number } {
  return {
    magic: source.readUInt32BE(offset),
    flags: source.readUInt16BE(offset + 4),
    type: source.readUInt16BE(offset + 6),
    cookieHigh: source.readUInt32BE(offset + 8),
    cookieLow: source.readUInt32BE(offset + 12),
    offsetBytes: source.readUInt32BE(offset + 16) * 2 ** 32 + source.readUInt32BE(offset + 20),
    lengthBytes: source.readUInt32BE(offset + 24),
  };
}

/** Writes a 16-byte simple reply header into `target` at `offset`. */
export function encodeSimpleReplyHeader(target: Buffer, offset: number, error: number, cookieHigh: number, cookieLow: number): void {
  target.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, offset);
  target.writeUInt32BE(error, offset + 4);
  target.writeUInt32BE(cookieHigh, offset + 8);
  target.writeUInt32BE(cookieLow, offset + 12);
}

/** Writes a 20-byte structured reply chunk header into `target` at `offset`; the payload follows it. */
export function encodeStructuredReplyHeader(target: Buffer, offset: number, flags: number, type: number, cookieHigh: number, cookieLow: number, payloadBytes: number): void {
  target.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, offset);
  target.writeUInt16BE(flags, offset + 4);
  target.writeUInt16BE(type, offset + 6);
  target.writeUInt32BE(cookieHigh, offset + 8);
  target.writeUInt32BE(cookieLow, offset + 12);
  target.writeUInt32BE(payloadBytes, offset + 16);
}

/**
 * Writes the 28 bytes that precede `dataBytes` of data in an NBD_REPLY_TYPE_OFFSET_DATA chunk (header
 * and offset) into `target` at `offset`. The data itself is sent from its own buffer, not copied.
 */
export function encodeOffsetDataHeader(target: Buffer, offset: number, flags: number, cookieHigh: number, cookieLow: number, dataOffsetBytes: number, dataBytes: number): void {
  assert(dataBytes > 0 && dataBytes <= 0xffffffff - 8, 'a data chunk carries at least one byte and fits its 32-bit length');
  encodeStructuredReplyHeader(target, offset, flags, NbdStructuredReplyType.OFFSET_DATA, cookieHigh, cookieLow, 8 + dataBytes);
  writeUInt64(target, offset + NBD_STRUCTURED_REPLY_HEADER_BYTES, dataOffsetBytes);
}

/** Writes a whole 32-byte NBD_REPLY_TYPE_OFFSET_HOLE chunk into `target` at `offset`. */
export function encodeOffsetHoleChunk(target: Buffer, offset: number, flags: number, cookieHigh: number, cookieLow: number, holeOffsetBytes: number, holeBytes: number): void {
  assert(holeBytes > 0 && holeBytes <= 0xffffffff, 'a hole is 1 to 2^32 - 1 bytes');
  encodeStructuredReplyHeader(target, offset, flags, NbdStructuredReplyType.OFFSET_HOLE, cookieHigh, cookieLow, 12);
  writeUInt64(target, offset + NBD_STRUCTURED_REPLY_HEADER_BYTES, holeOffsetBytes);
  target.writeUInt32BE(holeBytes, offset + NBD_STRUCTURED_REPLY_HEADER_BYTES + 8);
}

/** A whole NBD_REPLY_TYPE_NONE chunk (20 bytes, DONE): the reply succeeded and carries nothing more. */
export function encodeNoneChunk(cookieHigh: number, cookieLow: number): Buffer {
  const buffer = Buffer.allocUnsafe(NBD_STRUCTURED_REPLY_HEADER_BYTES);
  encodeStructuredReplyHeader(buffer, 0, NBD_REPLY_FLAG_DONE, NbdStructuredReplyType.NONE, cookieHigh, cookieLow, 0);
  return buffer;
}

/** A whole NBD_REPLY_TYPE_ERROR chunk (DONE): errno and a message for people (cut to 4096 bytes). */
export function encodeErrorChunk(cookieHigh: number, cookieLow: number, error: number, message: string): Buffer {
  assert(error !== 0, 'an error chunk carries a nonzero error');
  const messageBytes = encodeString(message);
  const buffer = Buffer.allocUnsafe(NBD_STRUCTURED_REPLY_HEADER_BYTES + NBD_ERROR_CHUNK_FIXED_BYTES + messageBytes.length);
  encodeStructuredReplyHeader(buffer, 0, NBD_REPLY_FLAG_DONE, NbdStructuredReplyType.ERROR, cookieHigh, cookieLow, NBD_ERROR_CHUNK_FIXED_BYTES + messageBytes.length);
  buffer.writeUInt32BE(error, NBD_STRUCTURED_REPLY_HEADER_BYTES);
  buffer.writeUInt16BE(messageBytes.length, NBD_STRUCTURED_REPLY_HEADER_BYTES + 4);
  messageBytes.copy(buffer, NBD_STRUCTURED_REPLY_HEADER_BYTES + NBD_ERROR_CHUNK_FIXED_BYTES);
  return buffer;
}

export interface NbdExtent {
  /** Nonzero, below 2^32. */
  readonly lengthBytes: number;
  /** NbdBlockStatusFlag bits. */
  readonly flags: number;
}

/** A whole NBD_REPLY_TYPE_BLOCK_STATUS chunk (DONE): context id, then one descriptor per extent. */
export function encodeBlockStatusChunk(cookieHigh: number, cookieLow: number, contextId: number, extents: readonly NbdExtent[]): Buffer {
  assert(extents.length > 0, 'a block status chunk has at least one extent');
  const payloadBytes = 4 + 8 * extents.length;
  const buffer = Buffer.allocUnsafe(NBD_STRUCTURED_REPLY_HEADER_BYTES + payloadBytes);
  encodeStructuredReplyHeader(buffer, 0, NBD_REPLY_FLAG_DONE, NbdStructuredReplyType.BLOCK_STATUS, cookieHigh, cookieLow, payloadBytes);
  buffer.writeUInt32BE(contextId >>> 0, NBD_STRUCTURED_REPLY_HEADER_BYTES);
  let position = NBD_STRUCTURED_REPLY_HEADER_BYTES + 4;
  for (const extent of extents) {
    assert(Number.isInteger(extent.lengthBytes) && extent.lengthBytes > 0 && extent.lengthBytes <= 0xffffffff, 'an extent is 1 to 2^32 - 1 bytes');
    buffer.writeUInt32BE(extent.lengthBytes, position);
    buffer.writeUInt32BE(extent.flags >>> 0, position + 4);
    position += 8;
  }
  return buffer;
}

// ---------------------------------------------------------------------------------------------
// Client side (for Shale's own client and tests)

export function decodeGreeting(source: Buffer): { handshakeFlags: number } {
  if (source.length < NBD_GREETING_BYTES) throw new ShaleError('PROTOCOL', `greeting of ${source.length} bytes is too short`);
  if (!source.subarray(0, 8).equals(NBD_INIT_MAGIC)) throw new ShaleError('PROTOCOL', 'greeting does not start with NBDMAGIC');
  if (!source.subarray(8, 16).equals(NBD_OPTION_MAGIC)) throw new ShaleError('PROTOCOL', 'server does not speak newstyle (no IHAVEOPT)');
  return { handshakeFlags: source.readUInt16BE(16) };
}

export function encodeClientFlags(flags: number): Buffer {
  const buffer = Buffer.allocUnsafe(NBD_CLIENT_FLAGS_BYTES);
  buffer.writeUInt32BE(flags >>> 0, 0);
  return buffer;
}

export function encodeOptionRequest(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const buffer = Buffer.allocUnsafe(NBD_OPTION_HEADER_BYTES + data.length);
  NBD_OPTION_MAGIC.copy(buffer, 0);
  buffer.writeUInt32BE(option >>> 0, 8);
  buffer.writeUInt32BE(data.length, 12);
  data.copy(buffer, NBD_OPTION_HEADER_BYTES);
  return buffer;
}

export function encodeInfoRequest(name: string, informationRequests: readonly number[]): Buffer {
  const nameBytes = Buffer.from(name, 'utf8');
  const buffer = Buffer.allocUnsafe(6 + nameBytes.length + 2 * informationRequests.length);
  buffer.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(buffer, 4);
  buffer.writeUInt16BE(informationRequests.length, 4 + nameBytes.length);
  informationRequests.forEach((type, index) => buffer.writeUInt16BE(type, 6 + nameBytes.length + 2 * index));
  return buffer;
}

export interface NbdOptionReplyHeader {
  readonly option: number;
  readonly replyType: number;
  readonly lengthBytes: number;
}

export function decodeOptionReplyHeader(source: Buffer, offset = 0): NbdOptionReplyHeader {
  if (source.readUInt32BE(offset) !== NBD_OPTION_REPLY_MAGIC_HIGH || source.readUInt32BE(offset + 4) !== NBD_OPTION_REPLY_MAGIC_LOW) {
    throw new ShaleError('PROTOCOL', 'option reply has a bad magic');
  }
  return { option: source.readUInt32BE(offset + 8), replyType: source.readUInt32BE(offset + 12), lengthBytes: source.readUInt32BE(offset + 16) };
}

export type NbdInfoReply =
  | { readonly type: typeof NbdInfo.EXPORT; readonly sizeBytes: number; readonly transmissionFlags: number }
  | { readonly type: typeof NbdInfo.NAME; readonly name: string }
  | { readonly type: typeof NbdInfo.DESCRIPTION; readonly description: string }
  | { readonly type: typeof NbdInfo.BLOCK_SIZE; readonly sizes: NbdBlockSizes }
  | { readonly type: number; readonly unknown: Buffer };

/** Reads the data of an NBD_REP_INFO reply. */
export function decodeInfoReply(data: Buffer): NbdInfoReply {
  if (data.length < 2) throw new ShaleError('PROTOCOL', 'NBD_REP_INFO shorter than 2 bytes');
  const type = data.readUInt16BE(0);
  switch (type) {
    case NbdInfo.EXPORT:
      if (data.length !== 12) throw new ShaleError('PROTOCOL', `NBD_INFO_EXPORT of ${data.length} bytes, not 12`);
      return { type, sizeBytes: readUInt64(data, 2), transmissionFlags: data.readUInt16BE(10) };
    case NbdInfo.NAME:
      return { type, name: data.toString('utf8', 2) };
    case NbdInfo.DESCRIPTION:
      return { type, description: data.toString('utf8', 2) };
    case NbdInfo.BLOCK_SIZE:
      if (data.length !== 14) throw new ShaleError('PROTOCOL', `NBD_INFO_BLOCK_SIZE of ${data.length} bytes, not 14`);
      return { type, sizes: { minimumBytes: data.readUInt32BE(2), preferredBytes: data.readUInt32BE(6), maximumPayloadBytes: data.readUInt32BE(10) } };
    default:
      return { type, unknown: data.subarray(2) };
  }
}

/** Reads the data of an NBD_REP_SERVER reply. */
export function decodeServerEntry(data: Buffer): { name: string; description: string } {
  if (data.length < 4) throw new ShaleError('PROTOCOL', 'NBD_REP_SERVER shorter than 4 bytes');
  const nameBytes = data.readUInt32BE(0);
  if (nameBytes > data.length - 4) throw new ShaleError('PROTOCOL', 'NBD_REP_SERVER name length exceeds the reply');
  return { name: data.toString('utf8', 4, 4 + nameBytes), description: data.toString('utf8', 4 + nameBytes) };
}

export function decodeExportNameReply(source: Buffer): { sizeBytes: number; transmissionFlags: number } {
  return { sizeBytes: readUInt64(source, 0), transmissionFlags: source.readUInt16BE(8) };
}

export interface NbdRequestFields {
  readonly flags: number;
  readonly type: number;
  readonly cookieHigh: number;
  readonly cookieLow: number;
  readonly offsetBytes: number;
  readonly lengthBytes: number;
}

/** A 28-byte request header (the payload, if any, is sent after it). */
export function encodeRequestHeader(request: NbdRequestFields): Buffer {
  const buffer = Buffer.allocUnsafe(NBD_REQUEST_HEADER_BYTES);
  buffer.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  buffer.writeUInt16BE(request.flags, 4);
  buffer.writeUInt16BE(request.type, 6);
  buffer.writeUInt32BE(request.cookieHigh >>> 0, 8);
  buffer.writeUInt32BE(request.cookieLow >>> 0, 12);
  writeUInt64(buffer, 16, request.offsetBytes);
  buffer.writeUInt32BE(request.lengthBytes >>> 0, 24);
  return buffer;
}

export function decodeSimpleReplyHeader(source: Buffer, offset = 0): { magic: number; error: number; cookieHigh: number; cookieLow: number } {
  return {
    magic: source.readUInt32BE(offset),
    error: source.readUInt32BE(offset + 4),
    cookieHigh: source.readUInt32BE(offset + 8),
    cookieLow: source.readUInt32BE(offset + 12),
  };
}

export interface NbdStructuredReplyHeader {
  readonly magic: number;
  readonly flags: number;
  readonly type: number;
  readonly cookieHigh: number;
  readonly cookieLow: number;
  readonly lengthBytes: number;
}

export function decodeStructuredReplyHeader(source: Buffer, offset = 0): NbdStructuredReplyHeader {
  return {
    magic: source.readUInt32BE(offset),
    flags: source.readUInt16BE(offset + 4),
    type: source.readUInt16BE(offset + 6),
    cookieHigh: source.readUInt32BE(offset + 8),
    cookieLow: source.readUInt32BE(offset + 12),
    lengthBytes: source.readUInt32BE(offset + 16),
  };
}

/** The payload of NBD_REPLY_TYPE_OFFSET_DATA. Errors: PROTOCOL when shorter than 9 bytes. */
export function decodeOffsetData(payload: Buffer): { offsetBytes: number; data: Buffer } {
  if (payload.length < 9) throw new ShaleError('PROTOCOL', `NBD_REPLY_TYPE_OFFSET_DATA payload of ${payload.length} bytes, at least 9 needed`);
  return { offsetBytes: readUInt64(payload, 0), data: payload.subarray(8) };
}

/** The payload of NBD_REPLY_TYPE_OFFSET_HOLE. Errors: PROTOCOL unless 12 bytes with a nonzero size. */
export function decodeOffsetHole(payload: Buffer): { offsetBytes: number; holeBytes: number } {
  if (payload.length !== 12) throw new ShaleError('PROTOCOL', `NBD_REPLY_TYPE_OFFSET_HOLE payload of ${payload.length} bytes, not 12`);
  const holeBytes = payload.readUInt32BE(8);
  if (holeBytes === 0) throw new ShaleError('PROTOCOL', 'NBD_REPLY_TYPE_OFFSET_HOLE of 0 bytes');
  return { offsetBytes: readUInt64(payload, 0), holeBytes };
}

/** The payload of an error chunk (type with bit 15 set). Errors: PROTOCOL when the message overruns it. */
export function decodeErrorChunk(type: number, payload: Buffer): { error: number; message: string; offsetBytes: number | undefined } {
  if (payload.length < NBD_ERROR_CHUNK_FIXED_BYTES) throw new ShaleError('PROTOCOL', `error chunk payload of ${payload.length} bytes, at least 6 needed`);
  const error = payload.readUInt32BE(0);
  const messageBytes = payload.readUInt16BE(4);
  const trailerBytes = type === NbdStructuredReplyType.ERROR_OFFSET ? 8 : 0;
  if (NBD_ERROR_CHUNK_FIXED_BYTES + messageBytes + trailerBytes > payload.length) throw new ShaleError('PROTOCOL', `error chunk message of ${messageBytes} bytes overruns its payload`);
  const message = payload.toString('utf8', NBD_ERROR_CHUNK_FIXED_BYTES, NBD_ERROR_CHUNK_FIXED_BYTES + messageBytes);
  const offsetBytes = trailerBytes > 0 ? readUInt64(payload, NBD_ERROR_CHUNK_FIXED_BYTES + messageBytes) : undefined;
  return { error, message, offsetBytes };
}

/** The payload of NBD_REPLY_TYPE_BLOCK_STATUS. Errors: PROTOCOL unless 4 + 8n bytes, n ≥ 1. */
export function decodeBlockStatus(payload: Buffer): { contextId: number; extents: NbdExtent[] } {
  if (payload.length < 12 || (payload.length - 4) % 8 !== 0) throw new ShaleError('PROTOCOL', `NBD_REPLY_TYPE_BLOCK_STATUS payload of ${payload.length} bytes is not 4 + 8n`);
  const extents: NbdExtent[] = [];
  for (let position = 4; position < payload.length; position += 8) {
    extents.push({ lengthBytes: payload.readUInt32BE(position), flags: payload.readUInt32BE(position + 4) });
  }
  return { contextId: payload.readUInt32BE(0), extents };
}

// ---------------------------------------------------------------------------------------------
// Stream framing

/**
 * A FIFO of received chunks. Reads that fall within one chunk return views of it (no copy);
 * reads that span chunks copy once. A view stays valid after the chunk is consumed as long as the
 * chunk's buffer is not reused: true of Node's own per-read buffers; a reused staging buffer's
 * bytes are copied out with `own` before it is read into again.
 */
export class ByteQueue {
  readonly #chunks: Buffer[] = [];
  /** Offset of the first unread byte in #chunks[0]. */
  #head = 0;
  #length = 0;
  /** Where the bytes of the last `inPlace` start in the buffer it returned. */
  inPlaceOffset = 0;

  get length(): number {
    return this.#length;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#length += chunk.length;
  }

  /**
   * The next `count` bytes without consuming them: a view when they lie in one chunk, else a copy
   * into `scratch` (itself when exactly `count` long) or, if it is too short, into a new buffer.
   */
  peek(count: number, scratch?: Buffer): Buffer {
    assert(count <= this.#length, 'peek within the queued bytes');
    const first = this.#chunks[0];
    if (count === 0) return Buffer.alloc(0);
    assert(first !== undefined, 'bytes are queued');
    if (first.length - this.#head >= count) return first.subarray(this.#head, this.#head + count);
    const target = scratch === undefined || scratch.length < count ? Buffer.allocUnsafe(count) : scratch.length === count ? scratch : scratch.subarray(0, count);
    let copied = 0;
    let position = this.#head;
    for (const chunk of this.#chunks) {
      const taken = chunk.copy(target, copied, position, Math.min(chunk.length, position + count - copied));
      copied += taken;
      position = 0;
      if (copied === count) break;
    }
    return target;
  }

  /**
   * The next `count` bytes to be read in place, without a view or a copy when they lie in one
   * chunk: returns that chunk and sets `inPlaceOffset` to where they start in it; otherwise copies
   * them into `scratch` (at least `count` long) and returns it, with `inPlaceOffset` 0. Valid until
   * the queue changes. The per-request header path: a view per request showed in the allocation
   * profile of 4 KiB reads.
   */
  inPlace(count: number, scratch: Buffer): Buffer {
    const first = this.#chunks[0];
    if (first !== undefined && first.length - this.#head >= count) {
      this.inPlaceOffset = this.#head;
      return first;
    }
    this.inPlaceOffset = 0;
    return this.peek(count, scratch);
  }

  /** Whether the next `count` bytes (at most `length`) lie in one chunk, so `peek` and `take` give a view. */
  contiguous(count: number): boolean {
    const first = this.#chunks[0];
    return count === 0 || (first !== undefined && first.length - this.#head >= count);
  }

  /** Consumes and returns the next `count` bytes: a view when they lie in one chunk, else one copy. */
  take(count: number): Buffer {
    const bytes = this.peek(count);
    this.skip(count);
    return bytes;
  }

  /** Consumes up to `count` bytes; returns how many were consumed. */
  skip(count: number): number {
    let remaining = Math.min(count, this.#length);
    const consumed = remaining;
    while (remaining > 0) {
      const first = this.#chunks[0]!;
      const available = first.length - this.#head;
      if (available > remaining) {
        this.#head += remaining;
        remaining = 0;
      } else {
        remaining -= available;
        this.#chunks.shift();
        this.#head = 0;
      }
    }
    this.#length -= consumed;
    return consumed;
  }

  /** Consumes the next `count` bytes into `target` from its start, always as a copy. */
  takeInto(target: Buffer, count: number): void {
    assert(count <= this.#length && count <= target.length, 'takeInto within the queued bytes and the target');
    let copied = 0;
    while (copied < count) {
      const first = this.#chunks[0]!;
      const taken = first.copy(target, copied, this.#head, Math.min(first.length, this.#head + count - copied));
      copied += taken;
      this.skip(taken);
    }
  }

  /**
   * Replaces the queued bytes by one copy of them, so that none refers any more to a buffer the
   * caller is about to reuse.
   */
  own(): void {
    if (this.#length === 0) {
      this.clear();
      return;
    }
    const copy = Buffer.allocUnsafe(this.#length);
    this.takeInto(copy, this.#length);
    this.push(copy);
  }

  clear(): void {
    this.#chunks.length = 0;
    this.#head = 0;
    this.#length = 0;
  }
}

/** Where a connection read in place lands when no payload is being filled. */
const STAGING_BYTES = 64 * 1024;

export type NbdParserPhase = 'client-flags' | 'options' | 'transmission';

export type NbdClientMessage =
  | { readonly kind: 'client-flags'; readonly flags: number }
  | { readonly kind: 'option'; readonly option: number; readonly data: Buffer }
  /** An option whose data exceeded optionDataBytesMax: its data is discarded unread. */
  | { readonly kind: 'oversized-option'; readonly option: number; readonly lengthBytes: number }
  | NbdRequest;

export interface NbdServerParserLimits {
  /** Largest option data kept in memory. */
  readonly optionDataBytesMax: number;
  /** Largest write payload kept in memory (the advertised maximum payload). */
  readonly payloadBytesMax: number;
  /** Largest oversized write payload discarded to keep the stream in step; beyond it, PROTOCOL. */
  readonly oversizedPayloadSkipBytesMax: number;
}

export const defaultParserLimits: NbdServerParserLimits = {
  optionDataBytesMax: 64 * 1024,
  payloadBytesMax: NBD_PAYLOAD_BYTES_MAX,
  oversizedPayloadSkipBytesMax: 2 * NBD_PAYLOAD_BYTES_MAX,
};

/**
 * Frames the client's side of an NBD connection. Feed it with `push`, then call `next` until it
 * returns undefined (more bytes needed). The phase moves from client flags to options by itself;
 * the server moves it to transmission with `enterTransmission` once it has accepted an export.
 * Errors: ShaleError PROTOCOL, sticky.
 */
export class NbdServerParser {
  readonly #limits: NbdServerParserLimits;
  readonly #payloadBuffer: ((bytes: number) => Buffer) | undefined;
  readonly #queue = new ByteQueue();
  readonly #scratch = Buffer.allocUnsafe(NBD_REQUEST_HEADER_BYTES);
  #phase: NbdParserPhase = 'client-flags';
  /** Bytes of a discarded payload still to be dropped from the stream. */
  #skipBytes = 0;
  #failure: ShaleError | undefined;
  // Reading in place (readTarget / received / release): the socket reads into #staging, or straight
  // into the write payload being filled; #staging is reused for every read.
  #inPlace = false;
  #staging: Buffer | undefined;
  #targetIsPayload = false;
  /** A WRITE whose header has been framed and whose payload the next reads fill. */
  #filling: { request: NbdRequest; payload: Buffer; filled: number } | undefined;
  /** A WRITE whose payload reads have filled, returned by the next next(). */
  #filled: NbdRequest | undefined;

  /**
   * `payloadBuffer`, if given, supplies a buffer of exactly the size asked for a write payload that
   * arrived in more than one socket read, and for every payload while reading in place (the request
   * says `payloadLent`); without it such a payload is copied into a new buffer. Otherwise a payload
   * that arrived in one read is a view of it.
   */
  constructor(limits: NbdServerParserLimits = defaultParserLimits, payloadBuffer?: (bytes: number) => Buffer) {
    assert(limits.optionDataBytesMax >= NBD_STRING_BYTES_MAX + 6, 'options can hold a maximal name');
    assert(limits.oversizedPayloadSkipBytesMax >= limits.payloadBytesMax, 'skip limit covers the payload limit');
    this.#limits = limits;
    this.#payloadBuffer = payloadBuffer;
  }

  get phase(): NbdParserPhase {
    return this.#phase;
  }

  /** Bytes received and not yet framed (a partial message, or messages not yet pulled). */
  get bufferedBytes(): number {
    return this.#queue.length;
  }

  push(chunk: Buffer): void {
    if (this.#failure === undefined) this.#queue.push(chunk);
  }

  /**
   * Reading in place, for a connection that reads into buffers it is given (Connection.readInto),
   * in transmission, with a `payloadBuffer`: the buffer the next read should go into — the rest
   * of a write payload being filled (so a large payload lands where it is handed on, without a
   * copy), else a staging buffer reused for every read. Then `received` with the bytes that read
   * filled, `next` until it returns undefined or the caller stops, and `release` before the next
   * read: it copies what the queue still holds out of the staging buffer. `next` may also run
   * between choosing a target and the read landing (a paused reader resuming): a write framed then
   * takes its next bytes from the staging buffer. Every payload is then lent (copied out of the
   * staging buffer if it arrived there). Mixes with `push` of owned chunks received before.
   */
  readTarget(): Buffer {
    assert(this.#phase === 'transmission' && this.#payloadBuffer !== undefined, 'reading in place is for transmission, with payload buffers');
    this.#inPlace = true;
    const filling = this.#filling;
    this.#targetIsPayload = filling !== undefined;
    if (filling !== undefined) return filling.payload.subarray(filling.filled);
    return (this.#staging ??= Buffer.allocUnsafe(STAGING_BYTES));
  }

  /** The last read filled the first `bytes` bytes of what readTarget returned. */
  received(bytes: number): void {
    if (this.#failure !== undefined) return;
    const filling = this.#filling;
    if (this.#targetIsPayload) {
      // Discarded since its target was chosen (the connection is ending): the bytes go with it.
      if (filling === undefined) return;
      assert(filling.filled + bytes <= filling.payload.length, 'a read stays within its payload');
      filling.filled += bytes;
    } else {
      this.#queue.push(this.#staging!.subarray(0, bytes));
      if (filling === undefined) return;
      // The payload began after this read's target was chosen (the caller pulled a write's header
      // between choosing it and the read): its next bytes are in the staging buffer.
      const taken = Math.min(this.#queue.length, filling.payload.length - filling.filled);
      this.#queue.takeInto(filling.payload.subarray(filling.filled), taken);
      filling.filled += taken;
    }
    if (filling.filled === filling.payload.length) {
      this.#filling = undefined;
      this.#filled = filling.request;
    }
  }

  /** Before the next read in place: nothing queued may refer to the staging buffer any more. */
  release(): void {
    this.#queue.own();
  }

  enterTransmission(): void {
    assert(this.#phase === 'options', 'transmission follows option haggling');
    this.#phase = 'transmission';
  }

  /** Drops everything buffered (after NBD_CMD_DISC, or when the connection closes). */
  discard(): void {
    this.#queue.clear();
    this.#skipBytes = 0;
    this.#filling = undefined;
    this.#filled = undefined;
  }

  next(): NbdClientMessage | undefined {
    if (this.#failure !== undefined) throw this.#failure;
    const filled = this.#filled;
    if (filled !== undefined) {
      this.#filled = undefined;
      return filled;
    }
    if (this.#filling !== undefined) return undefined;
    if (this.#skipBytes > 0) {
      this.#skipBytes -= this.#queue.skip(this.#skipBytes);
      if (this.#skipBytes > 0) return undefined;
    }
    switch (this.#phase) {
      case 'client-flags': {
        if (this.#queue.length < NBD_CLIENT_FLAGS_BYTES) return undefined;
        const flags = this.#queue.peek(NBD_CLIENT_FLAGS_BYTES, this.#scratch).readUInt32BE(0);
        this.#queue.skip(NBD_CLIENT_FLAGS_BYTES);
        this.#phase = 'options';
        return { kind: 'client-flags', flags };
      }
      case 'options':
        return this.#nextOption();
      case 'transmission':
        return this.#nextRequest();
    }
  }

  #fail(message: string): never {
    this.#failure = new ShaleError('PROTOCOL', message);
    this.discard();
    throw this.#failure;
  }

  #nextOption(): NbdClientMessage | undefined {
    if (this.#queue.length < NBD_OPTION_HEADER_BYTES) return undefined;
    const header = this.#queue.peek(NBD_OPTION_HEADER_BYTES, this.#scratch);
    if (!header.subarray(0, 8).equals(NBD_OPTION_MAGIC)) this.#fail(`bad option magic 0x${header.toString('hex', 0, 8)}`);
    const option = header.readUInt32BE(8);
    const lengthBytes = header.readUInt32BE(12);
    if (lengthBytes > this.#limits.optionDataBytesMax) {
      this.#queue.skip(NBD_OPTION_HEADER_BYTES);
      this.#skipBytes = lengthBytes;
      return { kind: 'oversized-option', option, lengthBytes };
    }
    if (this.#queue.length < NBD_OPTION_HEADER_BYTES + lengthBytes) return undefined;
    this.#queue.skip(NBD_OPTION_HEADER_BYTES);
    return { kind: 'option', option, data: this.#queue.take(lengthBytes) };
  }

  #nextRequest(): NbdRequest | undefined {
    if (this.#queue.length < NBD_REQUEST_HEADER_BYTES) return undefined;
    const header = this.#queue.inPlace(NBD_REQUEST_HEADER_BYTES, this.#scratch);
    const at = this.#queue.inPlaceOffset;
    const magic = header.readUInt32BE(at);
    if (magic !== NBD_REQUEST_MAGIC) this.#fail(`bad request magic 0x${magic.toString(16).padStart(8, '0')}`);
    const flags = header.readUInt16BE(at + 4);
    const type = header.readUInt16BE(at + 6);
    const cookieHigh = header.readUInt32BE(at + 8);
    const cookieLow = header.readUInt32BE(at + 12);
    const offsetBytes = header.readUInt32BE(at + 16) * 2 ** 32 + header.readUInt32BE(at + 20);
    const lengthBytes = header.readUInt32BE(at + 24);
    let payload: Buffer | undefined;
    let payloadSkipped = false;
    let payloadLent = false;
    if (type === NbdCommand.WRITE) {
      if (lengthBytes > this.#limits.payloadBytesMax) {
        if (lengthBytes > this.#limits.oversizedPayloadSkipBytesMax) {
          this.#fail(`write of ${lengthBytes} bytes is beyond the ${this.#limits.oversizedPayloadSkipBytesMax} bytes the server skips`);
        }
        this.#queue.skip(NBD_REQUEST_HEADER_BYTES);
        this.#skipBytes = lengthBytes;
        payloadSkipped = true;
      } else if (this.#inPlace && lengthBytes > 0) {
        // Into a lent buffer: what has arrived now, the rest by the next reads, straight into it.
        this.#queue.skip(NBD_REQUEST_HEADER_BYTES);
        payload = this.#payloadBuffer!(lengthBytes);
        assert(payload.length === lengthBytes, 'a payload buffer has the size asked for');
        const arrived = Math.min(this.#queue.length, lengthBytes);
        this.#queue.takeInto(payload, arrived);
        const request: NbdRequest = { kind: 'request', flags, type, cookieHigh, cookieLow, offsetBytes, lengthBytes, payload, payloadSkipped, payloadLent: true };
        if (arrived === lengthBytes) return request;
        this.#filling = { request, payload, filled: arrived };
        return undefined;
      } else {
        if (this.#queue.length < NBD_REQUEST_HEADER_BYTES + lengthBytes) return undefined;
        this.#queue.skip(NBD_REQUEST_HEADER_BYTES);
        if (this.#payloadBuffer !== undefined && !this.#queue.contiguous(lengthBytes)) {
          const lent = this.#payloadBuffer(lengthBytes);
          payload = this.#queue.peek(lengthBytes, lent);
          payloadLent = payload === lent;
          this.#queue.skip(lengthBytes);
        } else {
          payload = this.#queue.take(lengthBytes);
        }
      }
    } else {
      this.#queue.skip(NBD_REQUEST_HEADER_BYTES);
    }
    return { kind: 'request', flags, type, cookieHigh, cookieLow, offsetBytes, lengthBytes, payload, payloadSkipped, payloadLent };
  }
}

export type NbdReplyMessage =
  | { readonly kind: 'simple'; readonly error: number; readonly cookieHigh: number; readonly cookieLow: number; readonly data: Buffer | undefined }
  | { readonly kind: 'chunk'; readonly flags: number; readonly type: number; readonly cookieHigh: number; readonly cookieLow: number; readonly payload: Buffer };

export interface NbdReplyParserOptions {
  /**
   * How many bytes of data follow a successful simple reply to this cookie (the length of a read,
   * 0 for other commands); undefined for a cookie the client never sent (PROTOCOL).
   */
  readonly simpleReplyDataBytes: (cookieHigh: number, cookieLow: number) => number | undefined;
  /** Largest structured chunk payload kept in memory; a larger one is PROTOCOL. */
  readonly chunkPayloadBytesMax: number;
}

/**
 * Frames what a server sends in the transmission phase — simple replies and structured reply
 * chunks — from an arbitrary split of the byte stream. Feed it with `push`, call `next` until it
 * returns undefined. Payloads within one received chunk are views of it. Errors: ShaleError
 * PROTOCOL (bad magic, unknown cookie, oversized chunk), sticky.
 */
export class NbdReplyParser {
  readonly #options: NbdReplyParserOptions;
  readonly #queue = new ByteQueue();
  readonly #scratch = Buffer.allocUnsafe(NBD_STRUCTURED_REPLY_HEADER_BYTES);
  #failure: ShaleError | undefined;

  constructor(options: NbdReplyParserOptions) {
    this.#options = options;
  }

  get bufferedBytes(): number {
    return this.#queue.length;
  }

  push(chunk: Buffer): void {
    if (this.#failure === undefined) this.#queue.push(chunk);
  }

  next(): NbdReplyMessage | undefined {
    if (this.#failure !== undefined) throw this.#failure;
    if (this.#queue.length < 4) return undefined;
    const magic = this.#queue.peek(4, this.#scratch).readUInt32BE(0);
    if (magic === NBD_SIMPLE_REPLY_MAGIC) {
      if (this.#queue.length < NBD_SIMPLE_REPLY_HEADER_BYTES) return undefined;
      const header = decodeSimpleReplyHeader(this.#queue.peek(NBD_SIMPLE_REPLY_HEADER_BYTES, this.#scratch));
      const expected = this.#options.simpleReplyDataBytes(header.cookieHigh, header.cookieLow);
      if (expected === undefined) this.#fail(`simple reply for unknown cookie ${header.cookieHigh}:${header.cookieLow}`);
      const dataBytes = header.error === 0 ? expected : 0;
      if (this.#queue.length < NBD_SIMPLE_REPLY_HEADER_BYTES + dataBytes) return undefined;
      this.#queue.skip(NBD_SIMPLE_REPLY_HEADER_BYTES);
      const data = dataBytes > 0 ? this.#queue.take(dataBytes) : undefined;
      return { kind: 'simple', error: header.error, cookieHigh: header.cookieHigh, cookieLow: header.cookieLow, data };
    }
    if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
      if (this.#queue.length < NBD_STRUCTURED_REPLY_HEADER_BYTES) return undefined;
      const header = decodeStructuredReplyHeader(this.#queue.peek(NBD_STRUCTURED_REPLY_HEADER_BYTES, this.#scratch));
      if (this.#options.simpleReplyDataBytes(header.cookieHigh, header.cookieLow) === undefined) {
        this.#fail(`structured reply chunk for unknown cookie ${header.cookieHigh}:${header.cookieLow}`);
      }
      if (header.lengthBytes > this.#options.chunkPayloadBytesMax) this.#fail(`structured reply chunk of ${header.lengthBytes} bytes exceeds ${this.#options.chunkPayloadBytesMax}`);
      if (this.#queue.length < NBD_STRUCTURED_REPLY_HEADER_BYTES + header.lengthBytes) return undefined;
      this.#queue.skip(NBD_STRUCTURED_REPLY_HEADER_BYTES);
      const payload = this.#queue.take(header.lengthBytes);
      return { kind: 'chunk', flags: header.flags, type: header.type, cookieHigh: header.cookieHigh, cookieLow: header.cookieLow, payload };
    }
    this.#fail(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`);
  }

  #fail(message: string): never {
    this.#failure = new ShaleError('PROTOCOL', message);
    this.#queue.clear();
    throw this.#failure;
  }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/** A string as UTF-8, cut (on a character boundary) to the 4096 bytes proto.md allows. */
function encodeString(text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  if (bytes.length <= NBD_STRING_BYTES_MAX) return bytes;
  let end = NBD_STRING_BYTES_MAX;
  while (end > 0 && (bytes[end]! & 0xc0) === 0x80) end--;
  return bytes.subarray(0, end);
}

function encodeInfoString(type: number, text: string): Buffer {
  const bytes = encodeString(text);
  const buffer = Buffer.allocUnsafe(2 + bytes.length);
  buffer.writeUInt16BE(type, 0);
  bytes.copy(buffer, 2);
  return buffer;
}

const utf8Decoder = new TextDecoder('utf-8', { fatal: true });

/** A protocol string: valid UTF-8, no NUL, at most 4096 bytes. Errors: INVALID_ARGUMENT. */
function decodeString(bytes: Buffer, what: string): string {
  if (bytes.length > NBD_STRING_BYTES_MAX) throw new ShaleError('INVALID_ARGUMENT', `${what} of ${bytes.length} bytes is longer than ${NBD_STRING_BYTES_MAX}`);
  if (bytes.includes(0)) throw new ShaleError('INVALID_ARGUMENT', `${what} contains a NUL byte`);
  try {
    return utf8Decoder.decode(bytes);
  } catch {
    throw new ShaleError('INVALID_ARGUMENT', `${what} is not valid UTF-8`);
  }
}

/** Any integer in [0, 2^64) that a double holds exactly (all of them below 2^53). */
function writeUInt64(target: Buffer, offset: number, value: number): void {
  assert(Number.isInteger(value) && value >= 0 && value < 2 ** 64, 'a 64-bit field holds a non-negative integer below 2^64');
  target.writeUInt32BE(Math.floor(value / 2 ** 32), offset);
  target.writeUInt32BE(value >>> 0, offset + 4);
}

function readUInt64(source: Buffer, offset: number): number {
  return source.readUInt32BE(offset) * 2 ** 32 + source.readUInt32BE(offset + 4);
}
