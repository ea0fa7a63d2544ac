/**
 * One connection to one store, speaking the store protocol. Many requests are in flight at once;
 * each gets a request id and resolves when its reply arrives, in whatever order. Requests made in
 * the same event-loop turn leave in one write. The channel connects lazily and reconnects on the
 * next request after the connection is lost.
 *
 * Errors: a reply with a non-zero status rejects with a ShaleError of that code; a lost connection
 * rejects every pending request with UNAVAILABLE; no reply within the timeout rejects with
 * MAYBE_COMMITTED (the store may or may not have applied it). Callers retry only idempotent work.
 */
import { assert } from '../lib/assert.ts';
import { errorCodeFromWire, ShaleError, toShaleError } from '../lib/errors.ts';
import type { Connection, Env, Timer } from '../env/env.ts';
import { RequestSlots } from '../lib/request-slots.ts';
import { emptyHeader, encodeChecksums, encodeHeader, FrameParser, HEADER_BYTES, Op, REPLY_BIT, type Frame, type FrameHeader } from './store-protocol.ts';

/** Requests in flight on one channel before new ones are refused with BUSY. */
export const CHANNEL_IN_FLIGHT_MAX = 4096;

/** The longest a timed-out request waits for the sweep that fails it, beyond its timeout. */
const SWEEP_INTERVAL_MAX_MS = 250;

interface Pending {
  resolve: (frame: Frame) => void;
  reject: (error: ShaleError) => void;
  /** When the request fails with MAYBE_COMMITTED (Infinity: never). */
  deadlineMs: number;
  timeoutMs: number;
  op: number;
}

/** The fields of a READ that a store in this process can answer synchronously. */
export type LocalReadFields = Pick<FrameHeader, 'volumeId' | 'chunkIndex' | 'poolId' | 'pgId' | 'pgCount' | 'pgEpoch' | 'ownerEpoch' | 'offsetBlocks' | 'countBlocks'>;

/** The fields of a client's volume WRITE that a store in this process takes without the wire format. */
export type LocalWriteFields = LocalReadFields & Pick<FrameHeader, 'versionSeq' | 'snapSeq' | 'watermark'>;

/** How a write handed over without a Promise ends: undefined once acknowledged, else the error a store reports. */
export type WriteDone = (error: ShaleError | undefined) => void;

/**
 * A synchronous READ's answer: the bytes (absent and zero blocks as zeros, data blocks verified),
 * and whether any block was never written. The bytes are read-only and may be lent by the store
 * engine's cache: whoever ends up holding them gives them back with `giveBack` (lib/buffer-pool.ts)
 * when done, also when it drops them unsent.
 */
export interface LocalReadResult {
  data: Buffer;
  absent: boolean;
}

/** What the client library needs of a connection to a store: a socket channel or the in-process one. */
export interface StoreRequester {
  readonly address: string;
  readonly inFlight: number;
  request(fields: Partial<FrameHeader> & { op: number }, payload?: readonly Buffer[], timeoutMs?: number): Promise<Frame>;
  /**
   * A READ answered synchronously, or undefined: use `request` (which then gives the answer or the
   * error). Only a store in this process can offer it (LocalChannel); the blocks are verified.
   * Keeps no reference to `fields`: the caller may reuse them once it returns.
   */
  readNow?(fields: LocalReadFields): LocalReadResult | undefined;
  /**
   * The same READ answered without the wire format, through the disk's asynchronous path when it
   * must be read (a store in this process only). Undefined: use `request`. A rejection, for any
   * error, also means: use `request`, which then gives the answer or the error as a store reports it.
   */
  readLocal?(fields: LocalReadFields): Promise<LocalReadResult> | undefined;
  /**
   * A volume WRITE (no flags) without a Promise: to a store in this process without the wire format
   * (`checksums` were computed from `data` here and are not checked again), to one behind a socket
   * as a frame whose reply settles it. Settles `done` exactly once, never before returning, with
   * the error `request` would have rejected with. Keeps `fields`, `checksums` and `data` until then.
   */
  writeNow?(fields: LocalWriteFields, checksums: Uint32Array, data: Buffer, done: WriteDone): void;
  /**
   * A READ sent to a store behind a socket, its reply (or error) given to `done` without a Promise;
   * only the socket channel offers it. `done` is called exactly once, never before this returns,
   * with what `request` would have resolved or rejected with. Keeps no reference to `fields`.
   */
  sendRead?(fields: LocalReadFields, done: (error: ShaleError | undefined, reply: Frame | undefined) => void): void;
  close(): void;
  reset(): void;
}

export class StoreChannel implements StoreRequester {
  readonly address: string;
  readonly #env: Env;
  readonly #timeoutMs: number;
  #connection: Connection | undefined;
  #connecting: Promise<Connection> | undefined;
  /** Requests sent and not yet answered, by request id. */
  readonly #pending = new RequestSlots<Pending>();
  #outbox: Buffer[] = [];
  readonly #writeHeader: FrameHeader = { ...emptyHeader(), op: Op.WRITE };
  readonly #readHeader: FrameHeader = { ...emptyHeader(), op: Op.READ };
  #flushScheduled = false;
  #closed = false;
  /**
   * Timeouts: one sweep per channel while requests with a deadline are pending, not a timer per
   * request (a timer set and cleared per store request was a measurable part of the gateway's
   * CPU and of its young-generation garbage). A request fails at most 1/8 of its timeout, and at
   * most SWEEP_INTERVAL_MAX_MS, after its deadline.
   */
  #sweep: Timer | undefined;
  #sweepIntervalMs = 0;

  constructor(env: Env, address: string, options: { timeoutMs?: number } = {}) {
    this.#env = env;
    this.address = address;
    this.#timeoutMs = options.timeoutMs ?? 30_000;
  }

  get inFlight(): number {
    return this.#pending.size;
  }

  /** Sends one request. `header` fields not given are zero; op and payload length are filled in. */
  async request(fields: Partial<FrameHeader> & { op: number }, payload: readonly Buffer[] = [], timeoutMs = this.#timeoutMs): Promise<Frame> {
    if (this.#closed) throw new ShaleError('SHUTTING_DOWN', `channel to ${this.address} is closed`);
    if (this.#pending.size >= CHANNEL_IN_FLIGHT_MAX) throw new ShaleError('BUSY', `too many requests in flight to ${this.address}`);
    const connection = this.#connection && !this.#connection.closed ? this.#connection : await this.#connect();
    let payloadBytes = 0;
    for (const part of payload) payloadBytes += part.length;
    const header: FrameHeader = { ...emptyHeader(), ...fields, payloadBytes };
    return new Promise<Frame>((resolve, reject) => this.#send(connection, header, payload, timeoutMs, resolve, reject));
  }

  /**
   * A volume WRITE as a frame, settled by its reply without a Promise (StoreRequester.writeNow). On
   * a channel that is not connected (or closed, or full) it goes through `request`, which connects
   * or reports why not.
   */
  writeNow(fields: LocalWriteFields, checksums: Uint32Array, data: Buffer, done: WriteDone): void {
    const connection = this.#connection;
    const sums = encodeChecksums(checksums);
    if (this.#closed || connection === undefined || connection.closed || this.#pending.size >= CHANNEL_IN_FLIGHT_MAX) {
      this.request({ ...fields, op: Op.WRITE }, [sums, data]).then(() => done(undefined), (error: unknown) => done(toShaleError(error)));
      return;
    }
    // Every field of LocalWriteFields is set again each time, so the header can be reused; the rest stay zero.
    const header = Object.assign(this.#writeHeader, fields);
    header.payloadBytes = sums.length + data.length;
    this.#send(connection, header, [sums, data], this.#timeoutMs, () => done(undefined), done);
  }

  /**
   * A READ as a frame, settled by its reply without a Promise (StoreRequester.sendRead); through
   * `request` on a channel that is not connected (or closed, or full).
   */
  sendRead(fields: LocalReadFields, done: (error: ShaleError | undefined, reply: Frame | undefined) => void): void {
    const connection = this.#connection;
    if (this.#closed || connection === undefined || connection.closed || this.#pending.size >= CHANNEL_IN_FLIGHT_MAX) {
      this.request({ ...fields, op: Op.READ }).then((reply) => done(undefined, reply), (error: unknown) => done(toShaleError(error), undefined));
      return;
    }
    // Every field of LocalReadFields is set again each time, so the header can be reused; the rest stay zero.
    const header = Object.assign(this.#readHeader, fields);
    this.#send(connection, header, [], this.#timeoutMs, (reply) => done(undefined, reply), (error) => done(error, undefined));
  }

  /** Queues one request for the next flush; its reply (or failure) settles `resolve` or `reject`. */
  #send(connection: Connection, header: FrameHeader, payload: readonly Buffer[], timeoutMs: number, resolve: (frame: Frame) => void, reject: (error: ShaleError) => void): void {
    const deadlineMs = timeoutMs > 0 ? this.#env.clock.nowMs() + timeoutMs : Infinity;
    header.requestId = this.#pending.add({ resolve, reject, deadlineMs, timeoutMs, op: header.op });
    const headerBuffer = encodeHeader(header, Buffer.allocUnsafe(HEADER_BYTES));
    if (timeoutMs > 0) this.#armSweep(timeoutMs);
    this.#outbox.push(headerBuffer);
    for (const part of payload) this.#outbox.push(part);
    this.#scheduleFlush(connection);
  }

  /** Closes the connection; pending requests fail with UNAVAILABLE. */
  close(): void {
    this.#closed = true;
    this.#connection?.destroy();
    this.#failAll(new ShaleError('SHUTTING_DOWN', `channel to ${this.address} closed`));
  }

  /** Drops the current connection (e.g. after a protocol error); the next request reconnects. */
  reset(): void {
    this.#connection?.destroy();
  }

  /** Makes sure a sweep runs often enough for a request with this timeout. */
  #armSweep(timeoutMs: number): void {
    const intervalMs = Math.max(1, Math.min(SWEEP_INTERVAL_MAX_MS, Math.ceil(timeoutMs / 8)));
    if (this.#sweep !== undefined && this.#sweepIntervalMs <= intervalMs) return;
    this.#sweep?.cancel();
    this.#sweepIntervalMs = intervalMs;
    this.#sweep = this.#env.clock.every(intervalMs, () => this.#expire());
  }

  /** Fails every request past its deadline; stops sweeping when nothing is pending. */
  #expire(): void {
    const nowMs = this.#env.clock.nowMs();
    for (const pending of this.#pending.takeWhere((entry) => entry.deadlineMs <= nowMs)) {
      pending.reject(new ShaleError('MAYBE_COMMITTED', `no reply from store ${this.address} within ${pending.timeoutMs} ms`));
    }
    if (this.#pending.size === 0) this.#stopSweep();
  }

  #stopSweep(): void {
    this.#sweep?.cancel();
    this.#sweep = undefined;
    this.#sweepIntervalMs = 0;
  }

  #scheduleFlush(connection: Connection): void {
    if (this.#flushScheduled) return;
    this.#flushScheduled = true;
    queueMicrotask(() => {
      this.#flushScheduled = false;
      const out = this.#outbox;
      this.#outbox = [];
      if (out.length > 0 && !connection.closed) connection.write(out);
    });
  }

  #connect(): Promise<Connection> {
    if (this.#connecting) return this.#connecting;
    this.#connecting = (async () => {
      try {
        const connection = await this.#env.net.connect(this.address, Math.min(this.#timeoutMs, 5000));
        const parser = new FrameParser();
        connection.onData((chunk) => {
          let frames: Frame[];
          try {
            frames = parser.push(chunk);
          } catch (error) {
            connection.destroy(error as Error);
            return;
          }
          for (const frame of frames) this.#deliver(frame);
        });
        connection.onClose((error) => {
          if (this.#connection === connection) this.#connection = undefined;
          this.#failAll(new ShaleError('UNAVAILABLE', `connection to store ${this.address} lost${error ? `: ${error.message}` : ''}`));
        });
        this.#connection = connection;
        return connection;
      } finally {
        this.#connecting = undefined;
      }
    })();
    return this.#connecting;
  }

  #deliver(frame: Frame): void {
    const pending = this.#pending.take(frame.header.requestId);
    if (!pending) return; // timed out already: the late reply is dropped
    assert((frame.header.op & REPLY_BIT) !== 0, 'a store only sends replies');
    if (frame.header.status !== 0) {
      const code = errorCodeFromWire(frame.header.status);
      const message = frame.payload.length > 0 ? frame.payload.toString('utf8') : code;
      pending.reject(new ShaleError(code, `store ${this.address}: ${message}`));
    } else {
      pending.resolve(frame);
    }
  }

  #failAll(error: ShaleError): void {
    const pending = this.#pending.takeWhere(() => true);
    this.#stopSweep();
    for (const entry of pending) entry.reject(error);
  }
}
