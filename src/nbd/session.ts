/**
 * One NBD client connection: the fixed newstyle handshake, then the transmission phase with simple
 * replies.
 *
 * Handshake. The server greets, reads the client flags, then answers one option at a time (the
 * socket is paused while an option's answer is being built). NBD_OPT_GO / NBD_OPT_EXPORT_NAME on a
 * known export enter transmission; any framing error, unknown client flag, refused EXPORT_NAME,
 * too many options or a handshake slower than `handshakeTimeoutMs` closes this connection only.
 *
 * Transmission. Everything a socket read delivered is framed and dispatched in one go: each
 * request starts its export operation at once, many run concurrently, and replies go out as each
 * completes — batched, one vectored write per event-loop turn (`clock.soon`), a read's data sent
 * from the export's buffer without a copy. Replies may be out of order; the cookie ties them to
 * requests. Limits: at most `inFlightRequestsMax` operations and about `inFlightBytesMax` bytes
 * (read lengths + write payloads; one request may overshoot) per connection; beyond, the socket is
 * paused until operations complete. A socket whose write buffer is full also pauses reading, so a
 * client that never reads its replies cannot make the server buffer without bound.
 *
 * Ending. NBD_CMD_DISC: nothing more is read, in-flight operations complete and their replies are
 * sent, then the connection ends. A client that vanishes mid-request: in-flight operations still
 * complete (their replies are dropped) and only then is the export's holder released, so an
 * export is never released under a running operation.
 */
import type { Connection, Env, Timer } from '../env/env.ts';
import { assert } from '../lib/assert.ts';
import { ErrorCodes, NbdErrno, ShaleError, codeOf } from '../lib/errors.ts';
import {
  NBD_BLOCK_SIZE_MINIMUM,
  NBD_BLOCK_SIZE_PREFERRED,
  NBD_SIMPLE_REPLY_HEADER_BYTES,
  NbdClientFlag,
  NbdCommand,
  NbdCommandFlag,
  NbdHandshakeFlag,
  NbdInfo,
  NbdOption,
  NbdReply,
  NbdServerParser,
  NbdTransmissionFlag,
  commandName,
  decodeExportName,
  decodeInfoRequest,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoDescription,
  encodeInfoExport,
  encodeInfoName,
  encodeOptionReply,
  encodeServerEntry,
  encodeSimpleReplyHeader,
  optionName,
} from '../proto/nbd.ts';
import type { NbdClientMessage, NbdRequest } from '../proto/nbd.ts';
import type { ExportReferences } from './export-references.ts';
import type { ExportProvider, NbdExport } from './server.ts';

export const SERVER_HANDSHAKE_FLAGS = NbdHandshakeFlag.FIXED_NEWSTYLE | NbdHandshakeFlag.NO_ZEROES;
const KNOWN_CLIENT_FLAGS = NbdClientFlag.FIXED_NEWSTYLE | NbdClientFlag.NO_ZEROES;

export interface SessionLimits {
  readonly payloadBytesMax: number;
  readonly oversizedPayloadSkipBytesMax: number;
  readonly optionDataBytesMax: number;
  readonly optionsPerConnectionMax: number;
  readonly inFlightRequestsMax: number;
  readonly inFlightBytesMax: number;
  readonly handshakeTimeoutMs: number;
  /** After the server ends a connection, how long the client gets to close its side. */
  readonly lingerMs: number;
}

export interface SessionContext {
  readonly env: Env;
  readonly provider: ExportProvider;
  readonly references: ExportReferences;
  readonly limits: SessionLimits;
  readonly log: (message: string) => void;
  readonly isShuttingDown: () => boolean;
}

/** The transmission flags of an export: everything Shale supports, plus READ_ONLY. */
export function transmissionFlagsOf(opened: NbdExport): number {
  let flags = NbdTransmissionFlag.HAS_FLAGS | NbdTransmissionFlag.SEND_FLUSH | NbdTransmissionFlag.SEND_FUA
    | NbdTransmissionFlag.SEND_TRIM | NbdTransmissionFlag.SEND_WRITE_ZEROES | NbdTransmissionFlag.CAN_MULTI_CONN;
  if (opened.readOnly) flags |= NbdTransmissionFlag.READ_ONLY;
  return flags;
}

/** Command flags each command accepts (FUA is valid on every command once SEND_FUA is advertised). */
const allowedFlags: ReadonlyMap<number, number> = new Map([
  [NbdCommand.READ, NbdCommandFlag.FUA],
  [NbdCommand.WRITE, NbdCommandFlag.FUA],
  [NbdCommand.DISC, NbdCommandFlag.FUA],
  [NbdCommand.FLUSH, NbdCommandFlag.FUA],
  [NbdCommand.TRIM, NbdCommandFlag.FUA],
  [NbdCommand.WRITE_ZEROES, NbdCommandFlag.FUA | NbdCommandFlag.NO_HOLE],
]);

/**
 * Checks a request against the export before anything runs. Returns 0, or the NBD errno to reply:
 * EINVAL for an unknown command or flag, a payload above the maximum or a read/trim past the end;
 * EPERM for a write, trim or write-zeroes on a read-only export; ENOSPC for a write or
 * write-zeroes past the end (proto.md "Error values").
 */
export function checkRequest(request: NbdRequest, opened: { readonly sizeBytes: number; readonly readOnly: boolean }, payloadBytesMax: number): number {
  const allowed = allowedFlags.get(request.type);
  if (allowed === undefined) return NbdErrno.EINVAL;
  if ((request.flags & ~allowed) !== 0) return NbdErrno.EINVAL;
  const type = request.type;
  if (type === NbdCommand.FLUSH || type === NbdCommand.DISC) return 0;
  if (request.payloadSkipped) return NbdErrno.EINVAL;
  if (type === NbdCommand.READ && request.lengthBytes > payloadBytesMax) return NbdErrno.EINVAL;
  const writes = type === NbdCommand.WRITE || type === NbdCommand.TRIM || type === NbdCommand.WRITE_ZEROES;
  if (writes && opened.readOnly) return NbdErrno.EPERM;
  if (request.offsetBytes + request.lengthBytes > opened.sizeBytes) {
    return type === NbdCommand.WRITE || type === NbdCommand.WRITE_ZEROES ? NbdErrno.ENOSPC : NbdErrno.EINVAL;
  }
  return 0;
}

/** The NBD errno for anything an export operation threw: its code's errno, EIO for the unknown. */
export function errnoOf(error: unknown): number {
  return ErrorCodes[codeOf(error)].nbdErrno;
}

/** The option reply for a failure to open or list exports. */
function optionErrorOf(error: unknown): number {
  switch (codeOf(error)) {
    case 'NOT_FOUND': return NbdReply.ERR_UNKNOWN;
    case 'SHUTTING_DOWN': return NbdReply.ERR_SHUTDOWN;
    case 'INVALID_ARGUMENT': return NbdReply.ERR_INVALID;
    case 'UNAUTHENTICATED':
    case 'FENCED': return NbdReply.ERR_POLICY;
    default: return NbdReply.ERR_UNKNOWN;
  }
}

function messageOf(error: unknown): string {
  if (error instanceof ShaleError) return `${error.code}: ${error.message}`;
  return error instanceof Error ? error.message : String(error);
}

interface PendingReply {
  readonly cookieHigh: number;
  readonly cookieLow: number;
  readonly error: number;
  readonly data: Buffer | undefined;
}

/** failed: destroyed after a protocol violation, waiting for the close event. */
type SessionState = 'handshake' | 'transmission' | 'ending' | 'failed' | 'closed';

export class NbdSession {
  readonly remoteAddress: string;
  /** Resolves once the connection is closed and every operation it started has completed. */
  readonly finished: Promise<void>;
  readonly #connection: Connection;
  readonly #context: SessionContext;
  readonly #parser: NbdServerParser;
  #state: SessionState = 'handshake';
  #clientFlags = 0;
  #optionBusy = false;
  #optionCount = 0;
  #export: NbdExport | undefined;
  #exportReleased = false;
  #inFlightRequests = 0;
  #inFlightBytes = 0;
  #inputPaused = false;
  #outputCongested = false;
  #pumping = false;
  #replies: PendingReply[] = [];
  #replyFlushScheduled = false;
  #handshakeTimer: Timer | undefined;
  #lingerTimer: Timer | undefined;
  #brokenLogged = false;
  #refusalLogged = false;
  #ended = false;
  #refusedRequests = 0;
  #resolveFinished!: () => void;

  constructor(connection: Connection, context: SessionContext) {
    this.#connection = connection;
    this.#context = context;
    this.remoteAddress = connection.remoteAddress;
    this.finished = new Promise((resolve) => {
      this.#resolveFinished = resolve;
    });
    this.#parser = new NbdServerParser({
      optionDataBytesMax: context.limits.optionDataBytesMax,
      payloadBytesMax: context.limits.payloadBytesMax,
      oversizedPayloadSkipBytesMax: context.limits.oversizedPayloadSkipBytesMax,
    });
    connection.onData((chunk) => this.#onData(chunk));
    connection.onDrain(() => {
      this.#outputCongested = false;
      this.#pump();
    });
    connection.onClose((error) => this.#onClose(error));
    this.#handshakeTimer = context.env.clock.after(context.limits.handshakeTimeoutMs, () => {
      if (this.#state === 'handshake') this.#fail(`handshake not completed within ${context.limits.handshakeTimeoutMs} ms`);
    }).unref();
    connection.write(encodeGreeting(SERVER_HANDSHAKE_FLAGS));
  }

  /**
   * Server shutdown: a connection still in the handshake is closed; one in transmission reads no
   * more requests, lets in-flight operations complete, sends their replies, then ends.
   */
  shutdown(): void {
    if (this.#state === 'handshake') {
      this.#state = 'failed';
      this.#handshakeTimer?.cancel();
      this.#connection.destroy();
    } else if (this.#state === 'transmission') {
      this.#beginEnding();
    }
  }

  /** Closes at once (after the shutdown grace period). */
  destroy(): void {
    if (this.#state !== 'closed') this.#connection.destroy();
  }

  // -------------------------------------------------------------------------------------------
  // Input

  #onData(chunk: Buffer): void {
    if (this.#state !== 'handshake' && this.#state !== 'transmission') return;
    this.#parser.push(chunk);
    this.#pump();
  }

  /** Frames and handles buffered messages while limits allow, then pauses or resumes the socket. */
  #pump(): void {
    if (this.#pumping) return;
    this.#pumping = true;
    try {
      while (this.#canTakeMessage()) {
        const message = this.#parser.next();
        if (message === undefined) break;
        this.#handle(message);
      }
    } catch (error) {
      // A protocol error is the client's; anything else is a bug in Shale, kept to this connection.
      this.#fail(codeOf(error) === 'PROTOCOL' ? (error as ShaleError).message : `internal error: ${error instanceof Error ? error.stack : String(error)}`);
    } finally {
      this.#pumping = false;
    }
    this.#updateInput();
  }

  #canTakeMessage(): boolean {
    if (this.#state === 'handshake') return !this.#optionBusy;
    if (this.#state !== 'transmission') return false;
    const limits = this.#context.limits;
    return !this.#outputCongested && this.#inFlightRequests < limits.inFlightRequestsMax && this.#inFlightBytes < limits.inFlightBytesMax;
  }

  #updateInput(): void {
    if (this.#state === 'closed' || this.#state === 'failed') return;
    const wanted = (this.#state === 'handshake' || this.#state === 'transmission') && this.#canTakeMessage();
    if (wanted && this.#inputPaused) {
      this.#inputPaused = false;
      this.#connection.resume();
    } else if (!wanted && !this.#inputPaused) {
      this.#inputPaused = true;
      this.#connection.pause();
    }
  }

  #handle(message: NbdClientMessage): void {
    switch (message.kind) {
      case 'client-flags':
        if ((message.flags & ~KNOWN_CLIENT_FLAGS) !== 0) {
          this.#fail(`client flags 0x${message.flags.toString(16)} set bits the server does not know`);
          return;
        }
        this.#clientFlags = message.flags;
        return;
      case 'option':
      case 'oversized-option':
        this.#optionCount++;
        if (this.#optionCount > this.#context.limits.optionsPerConnectionMax) {
          this.#fail(`more than ${this.#context.limits.optionsPerConnectionMax} options`);
          return;
        }
        this.#optionBusy = true;
        this.#handleOption(message).then(
          () => this.#optionDone(),
          (error: unknown) => {
            this.#fail(`${optionName(message.option)} failed: ${messageOf(error)}`);
            this.#optionDone();
          },
        );
        return;
      case 'request':
        this.#dispatch(message);
        return;
    }
  }

  #optionDone(): void {
    this.#optionBusy = false;
    this.#pump();
  }

  // -------------------------------------------------------------------------------------------
  // Handshake

  async #handleOption(message: Extract<NbdClientMessage, { kind: 'option' | 'oversized-option' }>): Promise<void> {
    const option = message.option;
    if (message.kind === 'oversized-option') {
      if (option === NbdOption.EXPORT_NAME) {
        this.#fail(`NBD_OPT_EXPORT_NAME with ${message.lengthBytes} bytes of data`);
        return;
      }
      this.#send(encodeOptionReply(option, NbdReply.ERR_TOO_BIG, `option data of ${message.lengthBytes} bytes exceeds ${this.#context.limits.optionDataBytesMax}`));
      return;
    }
    if (this.#context.isShuttingDown() && option === NbdOption.EXPORT_NAME) {
      this.#fail('NBD_OPT_EXPORT_NAME while the server is shutting down');
      return;
    }
    if (this.#context.isShuttingDown() && option !== NbdOption.ABORT) {
      this.#send(encodeOptionReply(option, NbdReply.ERR_SHUTDOWN, 'the server is shutting down'));
      return;
    }
    switch (option) {
      case NbdOption.EXPORT_NAME:
        return this.#exportName(message.data);
      case NbdOption.ABORT:
        this.#send(encodeOptionReply(option, NbdReply.ACK));
        this.#beginEnding();
        return;
      case NbdOption.LIST:
        return this.#list(message.data);
      case NbdOption.INFO:
      case NbdOption.GO:
        return this.#infoOrGo(option, message.data);
      default:
        // STARTTLS, STRUCTURED_REPLY, meta contexts and extended headers are not supported yet.
        this.#send(encodeOptionReply(option, NbdReply.ERR_UNSUP, `${optionName(option)} is not supported by this server`));
        return;
    }
  }

  async #exportName(data: Buffer): Promise<void> {
    let name: string;
    try {
      name = decodeExportName(data);
    } catch (error) {
      this.#fail(`NBD_OPT_EXPORT_NAME: ${messageOf(error)}`);
      return;
    }
    let opened: NbdExport;
    try {
      opened = await this.#context.references.acquire(name);
    } catch (error) {
      // NBD_OPT_EXPORT_NAME cannot answer an error: the session must end.
      this.#fail(`refused export "${name}": ${messageOf(error)}`);
      return;
    }
    if (!this.#adoptExport(opened)) return;
    const noZeroes = (this.#clientFlags & NbdClientFlag.NO_ZEROES) !== 0;
    this.#send(encodeExportNameReply(opened.sizeBytes, transmissionFlagsOf(opened), noZeroes));
    this.#enterTransmission();
  }

  async #list(data: Buffer): Promise<void> {
    if (data.length !== 0) {
      this.#send(encodeOptionReply(NbdOption.LIST, NbdReply.ERR_INVALID, 'NBD_OPT_LIST takes no data'));
      return;
    }
    let exports: { name: string; description: string }[];
    try {
      exports = await this.#context.provider.list();
    } catch (error) {
      this.#logRefusal(`NBD_OPT_LIST failed: ${messageOf(error)}`);
      this.#send(encodeOptionReply(NbdOption.LIST, optionErrorOf(error), `cannot list exports: ${messageOf(error)}`));
      return;
    }
    const replies = exports.map((entry) => encodeOptionReply(NbdOption.LIST, NbdReply.SERVER, encodeServerEntry(entry.name, entry.description)));
    replies.push(encodeOptionReply(NbdOption.LIST, NbdReply.ACK));
    this.#send(replies);
  }

  async #infoOrGo(option: number, data: Buffer): Promise<void> {
    let request: { name: string; informationRequests: readonly number[] };
    try {
      request = decodeInfoRequest(data);
    } catch (error) {
      this.#send(encodeOptionReply(option, NbdReply.ERR_INVALID, messageOf(error)));
      return;
    }
    let opened: NbdExport;
    try {
      opened = await this.#context.references.acquire(request.name);
    } catch (error) {
      this.#logRefusal(`refused export "${request.name}": ${messageOf(error)}`);
      this.#send(encodeOptionReply(option, optionErrorOf(error), `export "${request.name}" is not available: ${messageOf(error)}`));
      return;
    }
    const limits = this.#context.limits;
    const replies = [encodeOptionReply(option, NbdReply.INFO, encodeInfoExport(opened.sizeBytes, transmissionFlagsOf(opened)))];
    // Block sizes are proto.md's defaults; sent whether asked or not, so clients see them.
    replies.push(encodeOptionReply(option, NbdReply.INFO, encodeInfoBlockSize({
      minimumBytes: NBD_BLOCK_SIZE_MINIMUM,
      preferredBytes: NBD_BLOCK_SIZE_PREFERRED,
      maximumPayloadBytes: limits.payloadBytesMax,
    })));
    if (request.informationRequests.includes(NbdInfo.NAME)) {
      replies.push(encodeOptionReply(option, NbdReply.INFO, encodeInfoName(opened.name)));
    }
    if (request.informationRequests.includes(NbdInfo.DESCRIPTION) && opened.description !== undefined) {
      replies.push(encodeOptionReply(option, NbdReply.INFO, encodeInfoDescription(opened.description)));
    }
    replies.push(encodeOptionReply(option, NbdReply.ACK));
    if (option === NbdOption.INFO) {
      this.#context.references.release(opened);
      this.#send(replies);
      return;
    }
    if (!this.#adoptExport(opened)) return;
    this.#send(replies);
    this.#enterTransmission();
  }

  /** Keeps the export for transmission; false (and the holder dropped) if the connection went away meanwhile. */
  #adoptExport(opened: NbdExport): boolean {
    if (this.#state !== 'handshake') {
      this.#context.references.release(opened);
      return false;
    }
    assert(this.#export === undefined, 'one export per connection');
    this.#export = opened;
    return true;
  }

  #enterTransmission(): void {
    assert(this.#state === 'handshake' && this.#export !== undefined, 'transmission follows an accepted export');
    this.#state = 'transmission';
    this.#handshakeTimer?.cancel();
    this.#handshakeTimer = undefined;
    this.#parser.enterTransmission();
  }

  // -------------------------------------------------------------------------------------------
  // Transmission

  #dispatch(request: NbdRequest): void {
    const opened = this.#export;
    assert(opened !== undefined && this.#state === 'transmission', 'requests come in transmission');
    if (request.type === NbdCommand.DISC) {
      this.#beginEnding();
      return;
    }
    const error = checkRequest(request, opened, this.#context.limits.payloadBytesMax);
    if (error !== 0) {
      this.#refuse(request, error);
      return;
    }
    if (request.lengthBytes === 0 && request.type !== NbdCommand.FLUSH) {
      this.#queueReply(request, 0, request.type === NbdCommand.READ ? Buffer.alloc(0) : undefined);
      return;
    }
    const fua = (request.flags & NbdCommandFlag.FUA) !== 0;
    const costBytes = request.type === NbdCommand.READ || request.type === NbdCommand.WRITE ? request.lengthBytes : 0;
    this.#inFlightRequests++;
    this.#inFlightBytes += costBytes;
    let operation: Promise<Buffer | void>;
    try {
      switch (request.type) {
        case NbdCommand.READ:
          operation = opened.read(request.offsetBytes, request.lengthBytes);
          break;
        case NbdCommand.WRITE:
          operation = opened.write(request.offsetBytes, request.payload!, fua);
          break;
        case NbdCommand.FLUSH:
          operation = opened.flush();
          break;
        case NbdCommand.TRIM:
          operation = opened.trim(request.offsetBytes, request.lengthBytes, fua);
          break;
        case NbdCommand.WRITE_ZEROES:
          operation = opened.writeZeroes(request.offsetBytes, request.lengthBytes, { fua, noHole: (request.flags & NbdCommandFlag.NO_HOLE) !== 0 });
          break;
        default:
          throw new ShaleError('INTERNAL', `checkRequest let ${commandName(request.type)} through`);
      }
    } catch (thrown) {
      operation = Promise.reject(thrown);
    }
    operation.then(
      (result) => this.#complete(request, costBytes, 0, result),
      (thrown: unknown) => {
        this.#noteFailure(request, thrown);
        this.#complete(request, costBytes, errnoOf(thrown), undefined);
      },
    );
  }

  #complete(request: NbdRequest, costBytes: number, error: number, result: Buffer | void): void {
    this.#inFlightRequests--;
    this.#inFlightBytes -= costBytes;
    assert(this.#inFlightRequests >= 0 && this.#inFlightBytes >= 0, 'in-flight accounting stays non-negative');
    if (this.#state === 'closed' || this.#state === 'failed') {
      this.#maybeFinish();
      return;
    }
    let data: Buffer | undefined;
    if (request.type === NbdCommand.READ && error === 0) {
      if (Buffer.isBuffer(result) && result.length === request.lengthBytes) {
        data = result;
      } else {
        this.#context.log(`nbd ${this.remoteAddress}: bug: export "${this.#export?.name}" returned ${Buffer.isBuffer(result) ? result.length : typeof result} bytes for a read of ${request.lengthBytes}`);
        error = NbdErrno.EIO;
      }
    }
    this.#queueReply(request, error, data);
    if (this.#state === 'transmission') this.#pump();
  }

  #refuse(request: NbdRequest, error: number): void {
    this.#refusedRequests++;
    if (this.#refusedRequests === 1) {
      this.#context.log(`nbd ${this.remoteAddress}: refused ${commandName(request.type)} flags 0x${request.flags.toString(16)} offset ${request.offsetBytes} length ${request.lengthBytes}${request.payloadSkipped ? ' (payload above the maximum, skipped)' : ''}: errno ${error}`);
    }
    this.#queueReply(request, error, undefined);
  }

  #noteFailure(request: NbdRequest, thrown: unknown): void {
    this.#refusedRequests++;
    if (this.#refusedRequests === 1 || codeOf(thrown) === 'INTERNAL') {
      this.#context.log(`nbd ${this.remoteAddress}: ${commandName(request.type)} offset ${request.offsetBytes} length ${request.lengthBytes} failed: ${messageOf(thrown)}`);
    }
  }

  #queueReply(request: NbdRequest, error: number, data: Buffer | undefined): void {
    this.#replies.push({ cookieHigh: request.cookieHigh, cookieLow: request.cookieLow, error, data });
    if (!this.#replyFlushScheduled) {
      this.#replyFlushScheduled = true;
      this.#context.env.clock.soon(() => this.#flushReplies());
    }
  }

  /** Sends every queued reply in one vectored write: runs of headers share one buffer, read data follows its header. */
  #flushReplies(): void {
    this.#replyFlushScheduled = false;
    const replies = this.#replies;
    this.#replies = [];
    if (this.#state === 'closed' || this.#state === 'failed' || replies.length === 0) {
      this.#maybeFinish();
      return;
    }
    const headers = Buffer.allocUnsafe(replies.length * NBD_SIMPLE_REPLY_HEADER_BYTES);
    const buffers: Buffer[] = [];
    let runStart = 0;
    for (let index = 0; index < replies.length; index++) {
      const reply = replies[index]!;
      const at = index * NBD_SIMPLE_REPLY_HEADER_BYTES;
      encodeSimpleReplyHeader(headers, at, reply.error, reply.cookieHigh, reply.cookieLow);
      if (reply.data !== undefined && reply.data.length > 0) {
        buffers.push(headers.subarray(runStart, at + NBD_SIMPLE_REPLY_HEADER_BYTES), reply.data);
        runStart = at + NBD_SIMPLE_REPLY_HEADER_BYTES;
      }
    }
    if (runStart < headers.length) buffers.push(headers.subarray(runStart));
    this.#send(buffers);
    this.#maybeFinish();
  }

  #send(data: Buffer | readonly Buffer[]): void {
    if (this.#state === 'closed' || this.#state === 'failed') return;
    if (!this.#connection.write(data)) {
      this.#outputCongested = true;
      this.#updateInput();
    }
  }

  // -------------------------------------------------------------------------------------------
  // Ending

  /** Soft end (NBD_CMD_DISC, NBD_OPT_ABORT, shutdown): read nothing more, finish what runs, then end. */
  #beginEnding(): void {
    if (this.#state === 'ending' || this.#state === 'closed') return;
    this.#state = 'ending';
    this.#parser.discard();
    this.#handshakeTimer?.cancel();
    this.#updateInput();
    this.#maybeFinish();
  }

  /** Ends a soft-ending connection once nothing runs; releases the export of a closed one once nothing runs. */
  #maybeFinish(): void {
    if (this.#state === 'closed') {
      if (this.#inFlightRequests === 0) this.#releaseExport();
      return;
    }
    if (this.#state !== 'ending' || this.#ended) return;
    if (this.#inFlightRequests > 0 || this.#replies.length > 0 || this.#replyFlushScheduled) return;
    this.#ended = true;
    this.#connection.end();
    this.#lingerTimer = this.#context.env.clock.after(this.#context.limits.lingerMs, () => this.#connection.destroy()).unref();
  }

  /** A broken or hostile client: log once, close this connection only. */
  #fail(reason: string): void {
    if (this.#state === 'closed' || this.#state === 'failed') return;
    this.#state = 'failed';
    this.#logBroken(`closing connection: ${reason}`);
    this.#parser.discard();
    this.#handshakeTimer?.cancel();
    this.#connection.destroy();
  }

  /** Why the connection broke: logged once per connection. */
  #logBroken(message: string): void {
    if (this.#brokenLogged) return;
    this.#brokenLogged = true;
    this.#context.log(`nbd ${this.remoteAddress}: ${message}`);
  }

  /** A refused option (unknown export, failed listing): logged once per connection. */
  #logRefusal(message: string): void {
    if (this.#refusalLogged) return;
    this.#refusalLogged = true;
    this.#context.log(`nbd ${this.remoteAddress}: ${message}`);
  }

  #onClose(error: Error | undefined): void {
    if (this.#state === 'closed') return;
    const wasInTransmission = this.#state === 'transmission';
    this.#state = 'closed';
    this.#handshakeTimer?.cancel();
    this.#lingerTimer?.cancel();
    this.#parser.discard();
    this.#replies = [];
    if (wasInTransmission && (error !== undefined || this.#inFlightRequests > 0)) {
      const dropped = this.#inFlightRequests > 0 ? ` with ${this.#inFlightRequests} requests in flight (their replies are dropped)` : '';
      this.#logBroken(`connection lost${error !== undefined ? `: ${error.message}` : ''}${dropped}`);
    }
    if (this.#refusedRequests > 1) this.#context.log(`nbd ${this.remoteAddress}: ${this.#refusedRequests} requests were refused or failed on this connection`);
    this.#maybeFinish();
  }

  #releaseExport(): void {
    if (this.#exportReleased) return;
    this.#exportReleased = true;
    if (this.#export !== undefined) this.#context.references.release(this.#export);
    this.#resolveFinished();
  }
}
