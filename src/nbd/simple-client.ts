/**
 * A minimal NBD client: fixed newstyle handshake, then requests with simple replies, many in
 * flight. It exists to drive the server precisely in tests (raw bytes, bad flags, oversized
 * requests) and is the seed of the client that "nexus" volumes will use to mirror onto an external
 * NBD target. It trusts nothing: a reply with an unknown cookie or bad magic closes the connection.
 */
import type { Connection, Env } from '../env/env.ts';
import { assert } from '../lib/assert.ts';
import { ShaleError } from '../lib/errors.ts';
import {
  ByteQueue,
  NBD_EXPORT_NAME_REPLY_BYTES,
  NBD_EXPORT_NAME_REPLY_ZEROES_BYTES,
  NBD_GREETING_BYTES,
  NBD_OPTION_REPLY_HEADER_BYTES,
  NBD_SIMPLE_REPLY_HEADER_BYTES,
  NBD_SIMPLE_REPLY_MAGIC,
  NbdClientFlag,
  NbdCommand,
  NbdOption,
  NbdReply,
  decodeExportNameReply,
  decodeGreeting,
  decodeInfoReply,
  decodeOptionReplyHeader,
  decodeSimpleReplyHeader,
  encodeClientFlags,
  encodeInfoRequest,
  encodeOptionRequest,
  encodeRequestHeader,
  isOptionReplyError,
} from '../proto/nbd.ts';
import type { NbdInfoReply } from '../proto/nbd.ts';

export interface NbdOptionReply {
  readonly replyType: number;
  readonly data: Buffer;
}

export interface NbdSimpleReply {
  readonly error: number;
  /** A read's data (when error is 0). */
  readonly data: Buffer | undefined;
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
  readonly dataBytes: number;
  readonly resolve: (reply: NbdSimpleReply) => void;
  readonly reject: (error: Error) => void;
}

export class NbdSimpleClient {
  readonly handshakeFlags: number;
  /** Resolves when the connection has closed (with the error that closed it, if any). */
  readonly closed: Promise<Error | undefined>;
  sizeBytes = 0;
  transmissionFlags = 0;
  readonly #connection: Connection;
  readonly #queue: ByteQueue;
  #waiter: Waiter | undefined;
  #transmission = false;
  #pending = new Map<number, PendingRequest>();
  #nextCookie = 1;
  #closedError: Error | undefined;
  #isClosed = false;

  private constructor(connection: Connection, queue: ByteQueue, handshakeFlags: number, closed: Promise<Error | undefined>) {
    this.#connection = connection;
    this.#queue = queue;
    this.handshakeFlags = handshakeFlags;
    this.closed = closed;
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
      if (client !== undefined) client.#onData(chunk);
      else {
        queue.push(chunk);
        if (greetingWaiter !== undefined && queue.length >= NBD_GREETING_BYTES) greetingWaiter(queue.take(NBD_GREETING_BYTES));
      }
    });
    connection.onClose((error) => {
      if (client !== undefined) client.#onClose(error);
      else greetingWaiter?.(error ?? new ShaleError('UNAVAILABLE', 'connection closed before the greeting'));
      resolveClosed(error);
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
    client = new NbdSimpleClient(connection, queue, handshakeFlags, closed);
    connection.write(encodeClientFlags(clientFlags));
    return client;
  }

  get isClosed(): boolean {
    return this.#isClosed;
  }

  /** Sends bytes as they are (garbage, hand-made messages). */
  sendRaw(bytes: Buffer): void {
    this.#connection.write(bytes);
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
    assert(this.#transmission, 'requests follow the handshake');
    const cookie = this.#nextCookie++;
    const lengthBytes = options.lengthBytes ?? options.payload?.length ?? 0;
    const header = encodeRequestHeader({ flags: options.flags ?? 0, type, cookieHigh: 0x5a4c, cookieLow: cookie, offsetBytes: options.offsetBytes ?? 0, lengthBytes });
    const expectData = options.expectData ?? type === NbdCommand.READ;
    const reply = new Promise<NbdSimpleReply>((resolve, reject) => {
      if (this.#isClosed) {
        reject(this.#closedError ?? new ShaleError('UNAVAILABLE', 'connection closed'));
        return;
      }
      this.#pending.set(cookie, { dataBytes: expectData ? lengthBytes : 0, resolve, reject });
    });
    this.#connection.write(options.payload !== undefined ? [header, options.payload] : header);
    return reply;
  }

  read(offsetBytes: number, lengthBytes: number, flags = 0): Promise<NbdSimpleReply> {
    return this.request(NbdCommand.READ, { offsetBytes, lengthBytes, flags });
  }

  write(offsetBytes: number, payload: Buffer, flags = 0): Promise<NbdSimpleReply> {
    return this.request(NbdCommand.WRITE, { offsetBytes, payload, flags });
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
    this.#parseReplies();
  }

  #onData(chunk: Buffer): void {
    this.#queue.push(chunk);
    if (this.#transmission) {
      this.#parseReplies();
    } else if (this.#waiter !== undefined && this.#queue.length >= this.#waiter.count) {
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
    while (this.#queue.length >= NBD_SIMPLE_REPLY_HEADER_BYTES) {
      const header = decodeSimpleReplyHeader(this.#queue.peek(NBD_SIMPLE_REPLY_HEADER_BYTES));
      if (header.magic !== NBD_SIMPLE_REPLY_MAGIC) {
        this.#connection.destroy(new ShaleError('PROTOCOL', `bad reply magic 0x${header.magic.toString(16)}`));
        return;
      }
      const pending = this.#pending.get(header.cookieLow);
      if (pending === undefined) {
        this.#connection.destroy(new ShaleError('PROTOCOL', `reply for unknown cookie ${header.cookieLow}`));
        return;
      }
      const dataBytes = header.error === 0 ? pending.dataBytes : 0;
      if (this.#queue.length < NBD_SIMPLE_REPLY_HEADER_BYTES + dataBytes) return;
      this.#queue.skip(NBD_SIMPLE_REPLY_HEADER_BYTES);
      const data = header.error === 0 && pending.dataBytes > 0 ? this.#queue.take(dataBytes) : undefined;
      this.#pending.delete(header.cookieLow);
      pending.resolve({ error: header.error, data });
    }
  }

  #onClose(error: Error | undefined): void {
    this.#isClosed = true;
    this.#closedError = error ?? new ShaleError('UNAVAILABLE', 'connection closed');
    this.#waiter?.reject(this.#closedError);
    this.#waiter = undefined;
    for (const pending of this.#pending.values()) pending.reject(this.#closedError);
    this.#pending.clear();
  }
}
