/**
 * A minimal NBD client: fixed newstyle handshake (with STARTTLS, structured replies and meta
 * contexts), then requests with simple or structured replies, many in flight. It exists to drive
 * the server precisely in tests (raw bytes, bad flags, oversized requests) and is the seed of the
 * client that "nexus" volumes will use to mirror onto an external NBD target. It trusts nothing: a
 * reply with an unknown cookie, a bad magic or an oversized chunk closes the connection.
 *
 * With structured replies, the chunks of one reply are collected until the one flagged DONE; a
 * read's data is assembled from its data and hole chunks (holes read as zeroes) and the chunks are
 * kept in the reply so tests can see how the server answered.
 */
import type { Clock, Connection, Env, Timer } from '../env/env.ts';
import { assert } from '../lib/assert.ts';
import { ShaleError } from '../lib/errors.ts';
import {
  ByteQueue,
  NBD_EXPORT_NAME_REPLY_BYTES,
  NBD_EXPORT_NAME_REPLY_ZEROES_BYTES,
  NBD_GREETING_BYTES,
  NBD_OPTION_REPLY_HEADER_BYTES,
  NBD_PAYLOAD_BYTES_MAX,
  NBD_REPLY_FLAG_DONE,
  NbdClientFlag,
  NbdCommand,
  NbdOption,
  NbdReply,
  NbdReplyParser,
  NbdStructuredReplyType,
  decodeBlockStatus,
  decodeErrorChunk,
  decodeExportNameReply,
  decodeGreeting,
  decodeInfoReply,
  decodeMetaContextReply,
  decodeOffsetData,
  decodeOffsetHole,
  decodeOptionReplyHeader,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOptionRequest,
  encodeRequestHeader,
  isOptionReplyError,
} from '../proto/nbd.ts';
import type { NbdExtent, NbdInfoReply, NbdReplyMessage } from '../proto/nbd.ts';
import { upgradeClientConnection } from './tls.ts';
import type { NbdTlsClientOptions } from './tls.ts';

export interface NbdOptionReply {
  readonly replyType: number;
  readonly data: Buffer;
}

/** One chunk of a structured reply, as received. */
export interface NbdReceivedChunk {
  readonly type: number;
  readonly flags: number;
  /** Offset and length of a data or hole chunk. */
  readonly offsetBytes?: number;
  readonly lengthBytes?: number;
}

export interface NbdSimpleReply {
  readonly error: number;
  /** A read's data (when error is 0); assembled from data and hole chunks with structured replies. */
  readonly data: Buffer | undefined;
  /** With structured replies: the message of an error chunk. */
  readonly message?: string;
  /** With structured replies: every chunk of the reply, in order. */
  readonly chunks?: readonly NbdReceivedChunk[];
  /** A block status reply: per context id, its extents. */
  readonly blockStatus?: ReadonlyMap<number, readonly NbdExtent[]>;
}

export interface NbdRequestOptions {
  readonly flags?: number;
  readonly offsetBytes?: number;
  readonly lengthBytes?: number;
  /** Sent after the header (a write's data). */
  readonly payload?: Buffer;
  /** Whether the reply carries lengthBytes of data on success (default: for NBD_CMD_READ). */
  readonly expectData?: boolean;
}

interface Waiter {
  readonly count: number;
  readonly resolve: (bytes: Buffer) => void;
  readonly reject: (error: Error) => void;
}

interface PendingRequest {
  readonly offsetBytes: number;
  /** Data bytes of a successful simple reply (a read's length). */
  readonly dataBytes: number;
  readonly resolve: (reply: NbdSimpleReply) => void;
  readonly reject: (error: Error) => void;
  /** Structured chunks received so far. */
  chunks: NbdReceivedChunk[];
  assembled: Buffer | undefined;
  error: number;
  message: string | undefined;
  blockStatus: Map<number, readonly NbdExtent[]> | undefined;
}

/** Largest structured chunk the client accepts: the maximum payload plus a data chunk's offset. */
const CHUNK_PAYLOAD_BYTES_MAX = NBD_PAYLOAD_BYTES_MAX + 8 * 1024 * 1024;
const COOKIE_HIGH = 0x5a4c;

/** All of `promises`, or a rejection naming `what` if any is still pending after `timeoutMs` on `clock` (a stall fails a test rather than hanging it). */
export async function allWithin<T>(clock: Clock, promises: readonly Promise<T>[], timeoutMs: number, what: string): Promise<T[]> {
  let timer: Timer | undefined;
  const stalled = new Promise<never>((_, reject) => {
    timer = clock.after(timeoutMs, () => reject(new Error(`${what}: still pending after ${timeoutMs} ms`)));
  });
  try {
    return await Promise.race([Promise.all(promises), stalled]);
  } finally {
    timer?.cancel();
  }
}

export class NbdSimpleClient {
  readonly handshakeFlags: number;
  /** Resolves when the connection has closed (with the error that closed it, if any). */
  readonly closed: Promise<Error | undefined>;
  sizeBytes = 0;
  transmissionFlags = 0;
  /** Whether the server acknowledged NBD_OPT_STRUCTURED_REPLY (reset by STARTTLS). */
  structuredReplies = false;
  #connection: Connection;
  readonly #queue: ByteQueue;
  readonly #parser: NbdReplyParser;
  #waiter: Waiter | undefined;
  #transmission = false;
  #pending = new Map<number, PendingRequest>();
  #nextCookie = 1;
  #closedError: Error | undefined;
  #isClosed = false;
  #resolveClosed: (error: Error | undefined) => void;

  private constructor(connection: Connection, queue: ByteQueue, handshakeFlags: number, closed: Promise<Error | undefined>, resolveClosed: (error: Error | undefined) => void) {
    this.#connection = connection;
    this.#queue = queue;
    this.handshakeFlags = handshakeFlags;
    this.closed = closed;
    this.#resolveClosed = resolveClosed;
    this.#parser = new NbdReplyParser({
      simpleReplyDataBytes: (cookieHigh, cookieLow) => (cookieHigh === COOKIE_HIGH ? this.#pending.get(cookieLow)?.dataBytes : undefined),
      chunkPayloadBytesMax: CHUNK_PAYLOAD_BYTES_MAX,
    });
  }

  /** Connects, reads the greeting and sends the client flags (default: FIXED_NEWSTYLE | NO_ZEROES). */
  static async connect(env: Env, address: string, clientFlags = NbdClientFlag.FIXED_NEWSTYLE | NbdClientFlag.NO_ZEROES): Promise<NbdSimpleClient> {
    const connection = await env.net.connect(address);
    const queue = new ByteQueue();
    let client: NbdSimpleClient | undefined;
    let greetingWaiter: ((bytes: Buffer | Error) => void) | undefined;
    let resolveClosed!: (error: Error | undefined) => void;
    const closed = new Promise<Error | undefined>((resolve) => {
      resolveClosed = resolve;
    });
    connection.onData((chunk) => {
      if (client !== undefined) client.#onData(connection, chunk);
      else {
        queue.push(chunk);
        if (greetingWaiter !== undefined && queue.length >= NBD_GREETING_BYTES) greetingWaiter(queue.take(NBD_GREETING_BYTES));
      }
    });
    connection.onClose((error) => {
      if (client !== undefined) client.#onClose(connection, error);
      else {
        greetingWaiter?.(error ?? new ShaleError('UNAVAILABLE', 'connection closed before the greeting'));
        resolveClosed(error);
      }
    });
    const greeting = await new Promise<Buffer | Error>((resolve) => {
      if (queue.length >= NBD_GREETING_BYTES) resolve(queue.take(NBD_GREETING_BYTES));
      else greetingWaiter = resolve;
    });
    if (greeting instanceof Error) throw greeting;
    let handshakeFlags: number;
    try {
      ({ handshakeFlags } = decodeGreeting(greeting));
    } catch (error) {
      connection.destroy();
      throw error;
    }
    client = new NbdSimpleClient(connection, queue, handshakeFlags, closed, resolveClosed);
    connection.write(encodeClientFlags(clientFlags));
    return client;
  }

  get isClosed(): boolean {
    return this.#isClosed;
  }

  /** The connection in use (the TLS one after startTls). */
  get connection(): Connection {
    return this.#connection;
  }

  /** Sends bytes as they are (garbage, hand-made messages). */
  sendRaw(bytes: Buffer): void {
    this.#connection.write(bytes);
  }

  /**
   * Sends `bytes` cut at the given points (each taken modulo the length), one piece per write,
   * awaiting `between(piece)` after each: the server then receives them in separate reads.
   */
  async sendInPieces(bytes: Buffer, cuts: readonly number[], between: (piece: number) => Promise<unknown>): Promise<void> {
    const ends = [...new Set(cuts.map((cut) => cut % bytes.length)), bytes.length].sort((a, b) => a - b);
    let start = 0;
    for (const [piece, end] of ends.entries()) {
      this.sendRaw(bytes.subarray(start, end));
      start = end;
      await between(piece);
    }
  }

  /** Sends an option and collects its replies up to the final one (ACK or an error). */
  async option(option: number, data?: Buffer): Promise<NbdOptionReply[]> {
    this.#connection.write(encodeOptionRequest(option, data));
    const replies: NbdOptionReply[] = [];
    for (;;) {
      const header = decodeOptionReplyHeader(await this.#read(NBD_OPTION_REPLY_HEADER_BYTES));
      if (header.option !== option) throw new ShaleError('PROTOCOL', `reply for option ${header.option}, expected ${option}`);
      const replyData = header.lengthBytes > 0 ? await this.#read(header.lengthBytes) : Buffer.alloc(0);
      replies.push({ replyType: header.replyType, data: replyData });
      if (header.replyType === NbdReply.ACK || isOptionReplyError(header.replyType)) return replies;
    }
  }

  /** NBD_OPT_STRUCTURED_REPLY; true when the server acknowledged it. */
  async negotiateStructuredReplies(): Promise<boolean> {
    const replies = await this.option(NbdOption.STRUCTURED_REPLY);
    this.structuredReplies = replies.at(-1)!.replyType === NbdReply.ACK;
    return this.structuredReplies;
  }

  /**
   * NBD_OPT_SET_META_CONTEXT (or LIST with `list`): the contexts the server returned. Errors:
   * PROTOCOL for an error reply (its type in details).
   */
  async metaContext(exportName: string, queries: readonly string[], list = false): Promise<{ contextId: number; name: string }[]> {
    const option = list ? NbdOption.LIST_META_CONTEXT : NbdOption.SET_META_CONTEXT;
    const replies = await this.option(option, encodeMetaContextRequest(exportName, queries));
    const final = replies.at(-1)!;
    if (final.replyType !== NbdReply.ACK) throw new ShaleError('PROTOCOL', final.data.toString('utf8'), { replyType: final.replyType });
    return replies.filter((reply) => reply.replyType === NbdReply.META_CONTEXT).map((reply) => decodeMetaContextReply(reply.data));
  }

  /**
   * NBD_OPT_STARTTLS, then the TLS handshake; everything after goes through TLS. Errors: PROTOCOL
   * for an error reply (its type in details), UNAVAILABLE for a failed TLS handshake.
   */
  async startTls(options: NbdTlsClientOptions): Promise<void> {
    const replies = await this.option(NbdOption.STARTTLS);
    const final = replies.at(-1)!;
    if (final.replyType !== NbdReply.ACK) throw new ShaleError('PROTOCOL', final.data.toString('utf8'), { replyType: final.replyType });
    assert(this.#queue.length === 0, 'nothing follows the STARTTLS reply in plaintext');
    const upgraded = await upgradeClientConnection(this.#connection, options);
    this.#connection = upgraded;
    this.structuredReplies = false;
    upgraded.onData((chunk) => this.#onData(upgraded, chunk));
    upgraded.onClose((error) => this.#onClose(upgraded, error));
  }

  /**
   * NBD_OPT_GO (or NBD_OPT_INFO with `infoOnly`). Returns the information replies; on success with
   * GO the client is in transmission. Errors: ShaleError NOT_FOUND for NBD_REP_ERR_UNKNOWN, PROTOCOL
   * for any other error reply (the reply type is in details).
   */
  async go(name: string, informationRequests: readonly number[] = [], infoOnly = false): Promise<NbdInfoReply[]> {
    const option = infoOnly ? NbdOption.INFO : NbdOption.GO;
    const replies = await this.option(option, encodeInfoRequest(name, informationRequests));
    const final = replies.at(-1)!;
    if (final.replyType !== NbdReply.ACK) {
      const message = final.data.toString('utf8');
      throw new ShaleError(final.replyType === NbdReply.ERR_UNKNOWN ? 'NOT_FOUND' : 'PROTOCOL', message, { replyType: final.replyType });
    }
    const infos = replies.filter((reply) => reply.replyType === NbdReply.INFO).map((reply) => decodeInfoReply(reply.data));
    const exportInfo = infos.find((info) => info.type === 0 && 'sizeBytes' in info);
    assert(exportInfo !== undefined && 'sizeBytes' in exportInfo, 'a successful GO carries NBD_INFO_EXPORT');
    if (!infoOnly) {
      this.sizeBytes = exportInfo.sizeBytes;
      this.transmissionFlags = exportInfo.transmissionFlags;
      this.#enterTransmission();
    }
    return infos;
  }

  /** NBD_OPT_EXPORT_NAME; `noZeroes` must match the client flags sent. */
  async exportName(name: string, noZeroes = true): Promise<void> {
    this.#connection.write(encodeOptionRequest(NbdOption.EXPORT_NAME, Buffer.from(name, 'utf8')));
    const reply = decodeExportNameReply(await this.#read(NBD_EXPORT_NAME_REPLY_BYTES));
    if (!noZeroes) {
      const zeroes = await this.#read(NBD_EXPORT_NAME_REPLY_ZEROES_BYTES);
      if (!zeroes.equals(Buffer.alloc(NBD_EXPORT_NAME_REPLY_ZEROES_BYTES))) throw new ShaleError('PROTOCOL', 'export name reply padding is not zero');
    }
    this.sizeBytes = reply.sizeBytes;
    this.transmissionFlags = reply.transmissionFlags;
    this.#enterTransmission();
  }

  /** Sends one request; resolves with its reply. Nothing is awaited before sending, so many can be in flight. */
  request(type: number, options: NbdRequestOptions = {}): Promise<NbdSimpleReply> {
    const { bytes, reply } = this.prepare(type, options);
    this.#connection.write(bytes);
    return reply;
  }

  /**
   * A request's bytes and its reply, without sending it: the caller sends the bytes with `sendRaw`,
   * in order with other requests' bytes, whole or split at chosen points.
   */
  prepare(type: number, options: NbdRequestOptions = {}): { bytes: Buffer; reply: Promise<NbdSimpleReply> } {
    assert(this.#transmission, 'requests follow the handshake');
    const cookie = this.#nextCookie++;
    const lengthBytes = options.lengthBytes ?? options.payload?.length ?? 0;
    const offsetBytes = options.offsetBytes ?? 0;
    const header = encodeRequestHeader({ flags: options.flags ?? 0, type, cookieHigh: COOKIE_HIGH, cookieLow: cookie, offsetBytes, lengthBytes });
    const expectData = options.expectData ?? type === NbdCommand.READ;
    const reply = new Promise<NbdSimpleReply>((resolve, reject) => {
      if (this.#isClosed) {
        reject(this.#closedError ?? new ShaleError('UNAVAILABLE', 'connection closed'));
        return;
      }
      this.#pending.set(cookie, {
        offsetBytes,
        dataBytes: expectData ? lengthBytes : 0,
        resolve,
        reject,
        chunks: [],
        assembled: undefined,
        error: 0,
        message: undefined,
        blockStatus: undefined,
      });
    });
    return { bytes: options.payload === undefined ? header : Buffer.concat([header, options.payload]), reply };
  }

  read(offsetBytes: number, lengthBytes: number, flags = 0): Promise<NbdSimpleReply> {
    return this.request(NbdCommand.READ, { offsetBytes, lengthBytes, flags });
  }

  write(offsetBytes: number, payload: Buffer, flags = 0): Promise<NbdSimpleReply> {
    return this.request(NbdCommand.WRITE, { offsetBytes, payload, flags });
  }

  blockStatus(offsetBytes: number, lengthBytes: number, flags = 0): Promise<NbdSimpleReply> {
    return this.request(NbdCommand.BLOCK_STATUS, { offsetBytes, lengthBytes, flags, expectData: false });
  }

  /** NBD_CMD_DISC, then waits for the server to close. */
  async disconnect(): Promise<void> {
    this.#connection.write(encodeRequestHeader({ flags: 0, type: NbdCommand.DISC, cookieHigh: 0, cookieLow: 0, offsetBytes: 0, lengthBytes: 0 }));
    await this.closed;
  }

  destroy(): void {
    this.#connection.destroy();
  }

  /** Stops reading replies (to test the server's back-pressure); requests can still be sent. */
  pauseReading(): void {
    this.#connection.pause();
  }

  resumeReading(): void {
    this.#connection.resume();
  }

  #enterTransmission(): void {
    this.#transmission = true;
    if (this.#queue.length > 0) this.#parser.push(this.#queue.take(this.#queue.length));
    this.#parseReplies();
  }

  #onData(from: Connection, chunk: Buffer): void {
    if (from !== this.#connection) return;
    if (this.#transmission) {
      this.#parser.push(chunk);
      this.#parseReplies();
      return;
    }
    this.#queue.push(chunk);
    if (this.#waiter !== undefined && this.#queue.length >= this.#waiter.count) {
      const waiter = this.#waiter;
      this.#waiter = undefined;
      waiter.resolve(this.#queue.take(waiter.count));
    }
  }

  #read(count: number): Promise<Buffer> {
    assert(this.#waiter === undefined, 'one handshake read at a time');
    if (this.#queue.length >= count) return Promise.resolve(this.#queue.take(count));
    if (this.#isClosed) return Promise.reject(this.#closedError ?? new ShaleError('UNAVAILABLE', 'connection closed'));
    return new Promise((resolve, reject) => {
      this.#waiter = { count, resolve, reject };
    });
  }

  #parseReplies(): void {
    try {
      for (;;) {
        const message = this.#parser.next();
        if (message === undefined) return;
        this.#handleReply(message);
      }
    } catch (error) {
      this.#connection.destroy(error instanceof Error ? error : new ShaleError('PROTOCOL', String(error)));
    }
  }

  #handleReply(message: NbdReplyMessage): void {
    const pending = this.#pending.get(message.cookieLow);
    assert(pending !== undefined, 'the parser only frames replies to known cookies');
    if (message.kind === 'simple') {
      if (pending.chunks.length > 0) throw new ShaleError('PROTOCOL', `simple reply to cookie ${message.cookieLow} after structured chunks`);
      this.#pending.delete(message.cookieLow);
      pending.resolve({ error: message.error, data: message.data });
      return;
    }
    if (!this.structuredReplies) throw new ShaleError('PROTOCOL', 'structured reply chunk without NBD_OPT_STRUCTURED_REPLY');
    const payload = message.payload;
    switch (message.type) {
      case NbdStructuredReplyType.NONE:
        if (payload.length !== 0 || (message.flags & NBD_REPLY_FLAG_DONE) === 0) throw new ShaleError('PROTOCOL', 'NBD_REPLY_TYPE_NONE with a payload or without DONE');
        pending.chunks.push({ type: message.type, flags: message.flags });
        break;
      case NbdStructuredReplyType.OFFSET_DATA: {
        const { offsetBytes, data } = decodeOffsetData(payload);
        this.#place(pending, offsetBytes, data.length, data);
        pending.chunks.push({ type: message.type, flags: message.flags, offsetBytes, lengthBytes: data.length });
        break;
      }
      case NbdStructuredReplyType.OFFSET_HOLE: {
        const { offsetBytes, holeBytes } = decodeOffsetHole(payload);
        this.#place(pending, offsetBytes, holeBytes, undefined);
        pending.chunks.push({ type: message.type, flags: message.flags, offsetBytes, lengthBytes: holeBytes });
        break;
      }
      case NbdStructuredReplyType.BLOCK_STATUS: {
        const { contextId, extents } = decodeBlockStatus(payload);
        pending.blockStatus ??= new Map();
        pending.blockStatus.set(contextId, extents);
        pending.chunks.push({ type: message.type, flags: message.flags });
        break;
      }
      default: {
        if ((message.type & 0x8000) === 0) throw new ShaleError('PROTOCOL', `unknown structured reply type ${message.type}`);
        const { error, message: text } = decodeErrorChunk(message.type, payload);
        if (error === 0) throw new ShaleError('PROTOCOL', 'error chunk with error 0');
        pending.error ||= error;
        pending.message ??= text;
        pending.chunks.push({ type: message.type, flags: message.flags });
      }
    }
    if ((message.flags & NBD_REPLY_FLAG_DONE) === 0) return;
    this.#pending.delete(message.cookieLow);
    const data = pending.error === 0 && pending.dataBytes > 0 ? pending.assembled ?? Buffer.alloc(pending.dataBytes) : undefined;
    pending.resolve({ error: pending.error, data, message: pending.message, chunks: pending.chunks, blockStatus: pending.blockStatus });
  }

  /** Puts a data or hole chunk in a read's buffer; PROTOCOL if it lies outside the request. */
  #place(pending: PendingRequest, offsetBytes: number, lengthBytes: number, data: Buffer | undefined): void {
    const start = offsetBytes - pending.offsetBytes;
    if (start < 0 || start + lengthBytes > pending.dataBytes) throw new ShaleError('PROTOCOL', `chunk of ${lengthBytes} bytes at ${offsetBytes} lies outside the read`);
    pending.assembled ??= Buffer.alloc(pending.dataBytes);
    if (data !== undefined) data.copy(pending.assembled, start);
  }

  #onClose(from: Connection, error: Error | undefined): void {
    if (from !== this.#connection) return;
    this.#isClosed = true;
    this.#closedError = error ?? new ShaleError('UNAVAILABLE', 'connection closed');
    this.#waiter?.reject(this.#closedError);
    this.#waiter = undefined;
    for (const pending of this.#pending.values()) pending.reject(this.#closedError);
    this.#pending.clear();
    this.#resolveClosed(error);
  }
}
