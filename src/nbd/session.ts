/**
 * One NBD client connection: the fixed newstyle handshake (with STARTTLS, structured replies and
 * the `base:allocation` meta context), then the transmission phase.
 *
 * Handshake. The server greets, reads the client flags, then answers one option at a time (the
 * socket is paused while an option's answer is being built). NBD_OPT_GO / NBD_OPT_EXPORT_NAME on a
 * known export enter transmission; any framing error, unknown client flag, refused EXPORT_NAME,
 * too many options or a handshake slower than `handshakeTimeoutMs` closes this connection only.
 * NBD_OPT_STARTTLS is answered with NBD_REP_ACK, then the connection is swapped for a TLS one
 * (tls.ts) and negotiation starts over as proto.md asks: structured replies and meta contexts
 * chosen before are forgotten. Events of the replaced plaintext connection are ignored.
 *
 * Transmission. Everything a socket read delivered is framed and dispatched in one go: each
 * request starts its export operation at once, many run concurrently, and replies go out as each
 * completes — batched, one vectored write per event-loop turn (`clock.soon`), a read's data sent
 * from the export's buffer without a copy. Replies may be out of order; the cookie ties them to
 * requests. With structured replies, a read is answered with data chunks (and hole chunks when the
 * export has readSparse), an error with an error chunk carrying a message, a block status query
 * with one block status chunk; other successes keep the 16-byte simple reply, which proto.md
 * allows. Limits: at most `inFlightRequestsMax` requests and about `inFlightBytesMax` bytes (read
 * lengths + write payloads; one request may overshoot) per connection, counting both operations
 * running and replies waiting to be sent; beyond, the socket is paused until replies go out. A
 * socket whose write buffer is full also pauses reading, so a client that never reads its replies
 * cannot make the server buffer without bound.
 *
 * Ending. NBD_CMD_DISC: nothing more is read, in-flight operations complete and their replies are
 * sent, then the connection ends. A client that vanishes mid-request: in-flight operations still
 * complete (their replies are dropped) and only then is the export's holder released, so an
 * export is never released under a running operation.
 */
import type { Connection, Env, Timer } from '../env/env.ts';
import { assert } from '../lib/assert.ts';
import { ioBuffers, takePayloadBuffer } from '../lib/buffer-pool.ts';
import { ErrorCodes, NbdErrno, ShaleError, codeOf } from '../lib/errors.ts';
import {
  NBD_BLOCK_SIZE_MINIMUM,
  NBD_BLOCK_SIZE_MINIMUM_MAX,
  NBD_BLOCK_SIZE_PREFERRED,
  NBD_META_CONTEXT_BASE_ALLOCATION,
  NBD_OFFSET_DATA_HEADER_BYTES,
  NBD_OFFSET_HOLE_CHUNK_BYTES,
  NBD_REPLY_FLAG_DONE,
  NBD_SIMPLE_REPLY_HEADER_BYTES,
  NbdBlockStatusFlag,
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
  decodeMetaContextRequest,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoDescription,
  encodeInfoExport,
  encodeInfoName,
  encodeMetaContextReply,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOffsetHoleChunk,
  encodeOptionReply,
  encodeServerEntry,
  encodeSimpleReplyHeader,
  optionName,
} from '../proto/nbd.ts';
import type { NbdBlockSizes, NbdClientMessage, NbdExtent, NbdRequest } from '../proto/nbd.ts';
import type { ExportReferences } from './export-references.ts';
import type { ExportProvider, NbdExport, NbdExtentStatus, NbdReadPiece } from './server.ts';
import type { NbdTls } from './tls.ts';

export const SERVER_HANDSHAKE_FLAGS = NbdHandshakeFlag.FIXED_NEWSTYLE | NbdHandshakeFlag.NO_ZEROES;
const KNOWN_CLIENT_FLAGS = NbdClientFlag.FIXED_NEWSTYLE | NbdClientFlag.NO_ZEROES;
/** The id of `base:allocation` once selected (ids are per connection and opaque to the client). */
const BASE_ALLOCATION_CONTEXT_ID = 1;

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
  /** Most extents in one block status reply. */
  readonly blockStatusExtentsMax: number;
  /** Busy-poll this long after replies go out or an operation goes asynchronous (0: never). */
  readonly pollMs: number;
}

export interface SessionContext {
  readonly env: Env;
  readonly provider: ExportProvider;
  readonly references: ExportReferences;
  readonly limits: SessionLimits;
  readonly log: (message: string) => void;
  /** TLS credentials and mode; undefined when TLS is off. */
  readonly tls: NbdTls | undefined;
  readonly isShuttingDown: () => boolean;
}

/** What transmission needs to know about the negotiated export and connection. */
export interface RequestTarget {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly blockSizes: NbdBlockSizes;
  readonly structuredReplies: boolean;
  /** `base:allocation` was selected for this export (NBD_CMD_BLOCK_STATUS is allowed). */
  readonly blockStatus: boolean;
}

/**
 * The transmission flags of an export: everything Shale supports, plus READ_ONLY; SEND_DF only
 * once structured replies are negotiated (proto.md: MUST be clear otherwise).
 */
export function transmissionFlagsOf(opened: NbdExport, structuredReplies = false): number {
  let flags = NbdTransmissionFlag.HAS_FLAGS | NbdTransmissionFlag.SEND_FLUSH | NbdTransmissionFlag.SEND_FUA
    | NbdTransmissionFlag.SEND_TRIM | NbdTransmissionFlag.SEND_WRITE_ZEROES | NbdTransmissionFlag.CAN_MULTI_CONN
    | NbdTransmissionFlag.SEND_FAST_ZERO;
  if (structuredReplies) flags |= NbdTransmissionFlag.SEND_DF;
  if (opened.readOnly) flags |= NbdTransmissionFlag.READ_ONLY;
  return flags;
}

const isPowerOfTwo = (value: number): boolean => Number.isSafeInteger(value) && value > 0 && (value & (value - 1)) === 0;

/**
 * The size constraints of an export: its own, proto.md's defaults for what it leaves out, the
 * maximum payload capped at the server's. Errors: INTERNAL for constraints proto.md forbids (a bug
 * in the provider; the export is refused).
 */
export function blockSizesOf(opened: NbdExport, payloadBytesMax: number): NbdBlockSizes {
  const minimumBytes = opened.blockSizes?.minimumBytes ?? NBD_BLOCK_SIZE_MINIMUM;
  const preferredBytes = opened.blockSizes?.preferredBytes ?? Math.max(NBD_BLOCK_SIZE_PREFERRED, minimumBytes);
  const maximumPayloadBytes = Math.min(opened.blockSizes?.maximumPayloadBytes ?? payloadBytesMax, payloadBytesMax);
  const bad = (why: string): never => {
    throw new ShaleError('INTERNAL', `export "${opened.name}" has block sizes ${minimumBytes}/${preferredBytes}/${maximumPayloadBytes} that proto.md forbids: ${why}`);
  };
  if (!isPowerOfTwo(minimumBytes) || minimumBytes > NBD_BLOCK_SIZE_MINIMUM_MAX) bad('the minimum must be a power of two up to 64 KiB');
  if (!isPowerOfTwo(preferredBytes) || preferredBytes < Math.max(minimumBytes, 512)) bad('the preferred size must be a power of two ≥ the minimum and ≥ 512');
  if (!Number.isSafeInteger(maximumPayloadBytes) || maximumPayloadBytes < preferredBytes) bad('the maximum payload must be ≥ the preferred size');
  if (maximumPayloadBytes % minimumBytes !== 0) bad('the maximum payload must be a multiple of the minimum');
  return { minimumBytes, preferredBytes, maximumPayloadBytes };
}

/** Command flags each command accepts (FUA is valid on every command once SEND_FUA is advertised). */
const allowedFlags: ReadonlyMap<number, number> = new Map([
  [NbdCommand.READ, NbdCommandFlag.FUA | NbdCommandFlag.DF],
  [NbdCommand.WRITE, NbdCommandFlag.FUA],
  [NbdCommand.DISC, NbdCommandFlag.FUA],
  [NbdCommand.FLUSH, NbdCommandFlag.FUA],
  [NbdCommand.TRIM, NbdCommandFlag.FUA],
  [NbdCommand.WRITE_ZEROES, NbdCommandFlag.FUA | NbdCommandFlag.NO_HOLE | NbdCommandFlag.FAST_ZERO],
  [NbdCommand.BLOCK_STATUS, NbdCommandFlag.FUA | NbdCommandFlag.REQ_ONE],
]);

export interface Refusal {
  readonly errno: number;
  readonly message: string;
}

/**
 * Checks a request against the export before anything runs: undefined when it may run, else the
 * errno to reply and why (proto.md "Error values"):
 * - EINVAL: unknown command or flag, DF without structured replies, BLOCK_STATUS without the meta
 *   context, a write payload above the maximum, a read or trim or block status past the end, a
 *   request not aligned to the minimum block size, an empty block status query;
 * - EOVERFLOW: a read above the maximum payload when structured replies are on (proto.md lets the
 *   server refuse those up front with it; with simple replies it is EINVAL);
 * - EPERM: write, trim or write-zeroes on a read-only export;
 * - ENOSPC: write or write-zeroes past the end.
 */
export function checkRequest(request: NbdRequest, target: RequestTarget): Refusal | undefined {
  const type = request.type;
  const allowed = allowedFlags.get(type);
  if (allowed === undefined) return { errno: NbdErrno.EINVAL, message: `${commandName(type)} is not supported` };
  if ((request.flags & ~allowed) !== 0) {
    return { errno: NbdErrno.EINVAL, message: `flags 0x${request.flags.toString(16)} are not valid for ${commandName(type)}` };
  }
  if (type === NbdCommand.FLUSH || type === NbdCommand.DISC) return undefined;
  if ((request.flags & NbdCommandFlag.DF) !== 0 && !target.structuredReplies) {
    return { errno: NbdErrno.EINVAL, message: 'NBD_CMD_FLAG_DF needs structured replies' };
  }
  if (type === NbdCommand.BLOCK_STATUS) {
    if (!target.blockStatus) return { errno: NbdErrno.EINVAL, message: `no meta context was selected for this export (${NBD_META_CONTEXT_BASE_ALLOCATION} with NBD_OPT_SET_META_CONTEXT)` };
    if (request.lengthBytes === 0) return { errno: NbdErrno.EINVAL, message: 'block status of 0 bytes' };
  }
  const sizes = target.blockSizes;
  if (request.payloadSkipped || (type === NbdCommand.WRITE && request.lengthBytes > sizes.maximumPayloadBytes)) {
    return { errno: NbdErrno.EINVAL, message: `write of ${request.lengthBytes} bytes is above the maximum payload of ${sizes.maximumPayloadBytes}` };
  }
  if (type === NbdCommand.READ && request.lengthBytes > sizes.maximumPayloadBytes) {
    return { errno: target.structuredReplies ? NbdErrno.EOVERFLOW : NbdErrno.EINVAL, message: `read of ${request.lengthBytes} bytes is above the maximum payload of ${sizes.maximumPayloadBytes}` };
  }
  const writes = type === NbdCommand.WRITE || type === NbdCommand.TRIM || type === NbdCommand.WRITE_ZEROES;
  if (writes && target.readOnly) return { errno: NbdErrno.EPERM, message: 'the export is read-only' };
  if (request.offsetBytes + request.lengthBytes > target.sizeBytes) {
    return {
      errno: type === NbdCommand.WRITE || type === NbdCommand.WRITE_ZEROES ? NbdErrno.ENOSPC : NbdErrno.EINVAL,
      message: `${request.lengthBytes} bytes at ${request.offsetBytes} go past the end of the export (${target.sizeBytes} bytes)`,
    };
  }
  if (sizes.minimumBytes > 1 && type !== NbdCommand.BLOCK_STATUS
    && (request.offsetBytes % sizes.minimumBytes !== 0 || request.lengthBytes % sizes.minimumBytes !== 0)) {
    return { errno: NbdErrno.EINVAL, message: `${request.lengthBytes} bytes at ${request.offsetBytes} are not aligned to the minimum block size of ${sizes.minimumBytes}` };
  }
  return undefined;
}

/** The NBD errno for anything an export operation threw: its code's errno, EIO for the unknown. */
export function errnoOf(error: unknown): number {
  return ErrorCodes[codeOf(error)].nbdErrno;
}

/** The errno a failed request gets: ENOTSUP only for FAST_ZERO (proto.md reserves it), EINVAL instead elsewhere. */
function requestErrnoOf(request: NbdRequest, error: unknown): number {
  const errno = errnoOf(error);
  if (errno !== NbdErrno.ENOTSUP) return errno;
  const fastZero = request.type === NbdCommand.WRITE_ZEROES && (request.flags & NbdCommandFlag.FAST_ZERO) !== 0;
  return fastZero ? NbdErrno.ENOTSUP : NbdErrno.EINVAL;
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

/**
 * How a queued reply is put on the wire:
 * SIMPLE: a 16-byte simple reply header, followed by `data` for a successful simple read;
 * DATA_CHUNK: a 28-byte NBD_REPLY_TYPE_OFFSET_DATA header (DONE) for `data` read at `offsetBytes`;
 * ENCODED: `encoded` holds the whole reply (error chunks, block status, sparse reads).
 */
const ReplyShape = { SIMPLE: 0, DATA_CHUNK: 1, ENCODED: 2 } as const;
type ReplyShapeValue = (typeof ReplyShape)[keyof typeof ReplyShape];

interface PendingReply {
  readonly shape: ReplyShapeValue;
  readonly cookieHigh: number;
  readonly cookieLow: number;
  readonly error: number;
  readonly offsetBytes: number;
  readonly data: Buffer | undefined;
  readonly encoded: Buffer | readonly Buffer[] | undefined;
  /** Bytes of data this reply holds until it is sent (counted against inFlightBytesMax). */
  readonly costBytes: number;
  /** `data` came from the export's read(), readNow() or readThen(): given to its recycle() once written. */
  readonly recycle: boolean;
}

/** failed: destroyed after a protocol violation, waiting for the close event. */
type SessionState = 'handshake' | 'transmission' | 'ending' | 'failed' | 'closed';

export class NbdSession {
  readonly remoteAddress: string;
  /** Resolves once the connection is closed and every operation it started has completed. */
  readonly finished: Promise<void>;
  /** The plaintext connection, then the TLS one after STARTTLS. */
  #connection: Connection;
  readonly #context: SessionContext;
  readonly #parser: NbdServerParser;
  #state: SessionState = 'handshake';
  #clientFlags = 0;
  #optionBusy = false;
  #optionCount = 0;
  #tlsActive = false;
  /** Socket reads go into the parser's buffers (#readInPlace). */
  #readingInPlace = false;
  #structuredReplies = false;
  /** The export `base:allocation` was selected for by the last NBD_OPT_SET_META_CONTEXT. */
  #metaContextExport: string | undefined;
  #export: NbdExport | undefined;
  #target: RequestTarget | undefined;
  #exportReleased = false;
  /** Export operations running. */
  #inFlightRequests = 0;
  #inFlightBytes = 0;
  /** Replies waiting for the next flush, and the data bytes they hold. */
  #replies: PendingReply[] = [];
  #queuedReplyBytes = 0;
  #inputPaused = false;
  #outputCongested = false;
  #pumping = false;
  #replyFlushScheduled = false;
  #handshakeTimer: Timer | undefined;
  #lingerTimer: Timer | undefined;
  #brokenLogged = false;
  #refusalLogged = false;
  #ended = false;
  #refusedRequests = 0;
  #resolveFinished!: () => void;
  readonly #flushReplies = (): void => this.#sendReplies();

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
    }, takePayloadBuffer);
    this.#attach(connection);
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

  /** Listens to a connection; events of a connection that was since replaced (by TLS) are ignored. */
  #attach(connection: Connection): void {
    connection.onData((chunk) => {
      if (connection === this.#connection) this.#onData(chunk);
    });
    connection.onDrain(() => {
      if (connection !== this.#connection) return;
      this.#outputCongested = false;
      this.#pump();
    });
    connection.onClose((error) => {
      if (connection === this.#connection) this.#onClose(error);
    });
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
    // Operations went asynchronous (disk, other stores): poll for their completions.
    if (this.#inFlightRequests > 0) this.#context.env.clock.pollFor(this.#context.limits.pollMs);
  }

  #canTakeMessage(): boolean {
    if (this.#state === 'handshake') return !this.#optionBusy;
    if (this.#state !== 'transmission') return false;
    const limits = this.#context.limits;
    return !this.#outputCongested
      && this.#inFlightRequests + this.#replies.length < limits.inFlightRequestsMax
      && this.#inFlightBytes + this.#queuedReplyBytes < limits.inFlightBytesMax;
  }

  #updateInput(): void {
    if (this.#state === 'closed' || this.#state === 'failed') return;
    // An ending connection reading in place keeps reading (and drops what comes) to see the
    // client close: a paused socket of that kind reads nothing, not even the end of the stream.
    const wanted = this.#state === 'handshake' || this.#state === 'transmission' ? this.#canTakeMessage() : this.#state === 'ending' && this.#readingInPlace;
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
        if (this.#context.tls?.mode === 'require' && (message.flags & NbdClientFlag.FIXED_NEWSTYLE) === 0) {
          this.#fail('TLS is required and the client does not speak fixed newstyle, which STARTTLS needs');
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
    if (this.#context.tls?.mode === 'require' && !this.#tlsActive && option !== NbdOption.STARTTLS && option !== NbdOption.ABORT) {
      // FORCEDTLS: nothing but STARTTLS and ABORT before TLS; EXPORT_NAME cannot answer an error.
      if (option === NbdOption.EXPORT_NAME) {
        this.#fail('NBD_OPT_EXPORT_NAME without TLS, which this server requires');
        return;
      }
      this.#logRefusal(`refused ${optionName(option)} before STARTTLS (TLS is required)`);
      this.#send(encodeOptionReply(option, NbdReply.ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first'));
      return;
    }
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
      case NbdOption.STARTTLS:
        this.#startTls(message.data);
        return;
      case NbdOption.STRUCTURED_REPLY:
        if (message.data.length !== 0) {
          this.#send(encodeOptionReply(option, NbdReply.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data'));
          return;
        }
        this.#structuredReplies = true;
        this.#send(encodeOptionReply(option, NbdReply.ACK));
        return;
      case NbdOption.LIST_META_CONTEXT:
      case NbdOption.SET_META_CONTEXT:
        return this.#metaContext(option, message.data);
      default:
        // Extended headers and anything unknown.
        this.#send(encodeOptionReply(option, NbdReply.ERR_UNSUP, `${optionName(option)} is not supported by this server`));
        return;
    }
  }

  /** NBD_OPT_STARTTLS: ACK in plaintext, then everything goes through TLS (proto.md "TLS support"). */
  #startTls(data: Buffer): void {
    const tls = this.#context.tls;
    if (data.length !== 0) {
      this.#send(encodeOptionReply(NbdOption.STARTTLS, NbdReply.ERR_INVALID, 'NBD_OPT_STARTTLS takes no data'));
      return;
    }
    if (tls === undefined) {
      this.#send(encodeOptionReply(NbdOption.STARTTLS, NbdReply.ERR_POLICY, 'TLS is not enabled on this server'));
      return;
    }
    if (this.#tlsActive) {
      this.#send(encodeOptionReply(NbdOption.STARTTLS, NbdReply.ERR_INVALID, 'TLS is already active'));
      return;
    }
    if ((this.#clientFlags & NbdClientFlag.FIXED_NEWSTYLE) === 0) {
      this.#send(encodeOptionReply(NbdOption.STARTTLS, NbdReply.ERR_POLICY, 'STARTTLS needs fixed newstyle negotiation'));
      return;
    }
    if (this.#parser.bufferedBytes > 0) {
      // The client must wait for the ACK: bytes already here would be plaintext read as TLS.
      this.#fail('the client sent data after NBD_OPT_STARTTLS without waiting for the reply');
      return;
    }
    this.#send(encodeOptionReply(NbdOption.STARTTLS, NbdReply.ACK));
    let upgraded: Connection;
    try {
      upgraded = tls.upgrade(this.#connection);
    } catch (error) {
      this.#fail(`cannot start TLS: ${messageOf(error)}`);
      return;
    }
    this.#connection = upgraded;
    this.#inputPaused = false;
    this.#outputCongested = false;
    this.#attach(upgraded);
    this.#tlsActive = true;
    // proto.md: after STARTTLS the client renegotiates structured replies and meta contexts.
    this.#structuredReplies = false;
    this.#metaContextExport = undefined;
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
    let blockSizes: NbdBlockSizes;
    try {
      opened = await this.#context.references.acquire(name);
    } catch (error) {
      // NBD_OPT_EXPORT_NAME cannot answer an error: the session must end.
      this.#fail(`refused export "${name}": ${messageOf(error)}`);
      return;
    }
    try {
      blockSizes = blockSizesOf(opened, this.#context.limits.payloadBytesMax);
    } catch (error) {
      this.#context.references.release(opened);
      this.#fail(`refused export "${name}": ${messageOf(error)}`);
      return;
    }
    if (!this.#adoptExport(opened, name, blockSizes)) return;
    const noZeroes = (this.#clientFlags & NbdClientFlag.NO_ZEROES) !== 0;
    this.#send(encodeExportNameReply(opened.sizeBytes, transmissionFlagsOf(opened, this.#structuredReplies), noZeroes));
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

  /**
   * Opens `name` for an option that needs the export to exist; on failure answers the option
   * with the provider's error and returns undefined. The caller releases what it gets (or adopts it).
   */
  async #acquireForOption(option: number, name: string): Promise<{ opened: NbdExport; blockSizes: NbdBlockSizes } | undefined> {
    let opened: NbdExport;
    try {
      opened = await this.#context.references.acquire(name);
    } catch (error) {
      this.#logRefusal(`refused export "${name}": ${messageOf(error)}`);
      this.#send(encodeOptionReply(option, optionErrorOf(error), `export "${name}" is not available: ${messageOf(error)}`));
      return undefined;
    }
    try {
      return { opened, blockSizes: blockSizesOf(opened, this.#context.limits.payloadBytesMax) };
    } catch (error) {
      this.#context.references.release(opened);
      this.#context.log(`nbd ${this.remoteAddress}: refused export "${name}": ${messageOf(error)}`);
      this.#send(encodeOptionReply(option, NbdReply.ERR_UNKNOWN, `export "${name}" is not available: ${messageOf(error)}`));
      return undefined;
    }
  }

  async #infoOrGo(option: number, data: Buffer): Promise<void> {
    let request: { name: string; informationRequests: readonly number[] };
    try {
      request = decodeInfoRequest(data);
    } catch (error) {
      this.#send(encodeOptionReply(option, NbdReply.ERR_INVALID, messageOf(error)));
      return;
    }
    const acquired = await this.#acquireForOption(option, request.name);
    if (acquired === undefined) return;
    const { opened, blockSizes } = acquired;
    const replies = [encodeOptionReply(option, NbdReply.INFO, encodeInfoExport(opened.sizeBytes, transmissionFlagsOf(opened, this.#structuredReplies)))];
    // Sent whether asked or not, so every client sees the constraints the server enforces.
    replies.push(encodeOptionReply(option, NbdReply.INFO, encodeInfoBlockSize(blockSizes)));
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
    if (!this.#adoptExport(opened, request.name, blockSizes)) return;
    this.#send(replies);
    this.#enterTransmission();
  }

  /**
   * NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. Shale knows one context,
   * `base:allocation`. Queries of other namespaces are ignored (proto.md: MUST); `base:` lists it
   * and selects nothing; a query without a namespace is NBD_REP_ERR_INVALID. SET forgets the
   * previous selection first, even when it fails.
   */
  async #metaContext(option: number, data: Buffer): Promise<void> {
    const set = option === NbdOption.SET_META_CONTEXT;
    if (set) this.#metaContextExport = undefined;
    if (!this.#structuredReplies) {
      this.#send(encodeOptionReply(option, NbdReply.ERR_INVALID, `${optionName(option)} needs NBD_OPT_STRUCTURED_REPLY first`));
      return;
    }
    let request: { exportName: string; queries: readonly string[] };
    try {
      request = decodeMetaContextRequest(data);
    } catch (error) {
      this.#send(encodeOptionReply(option, NbdReply.ERR_INVALID, messageOf(error)));
      return;
    }
    let allocation = !set && request.queries.length === 0;
    for (const query of request.queries) {
      const colon = query.indexOf(':');
      if (colon <= 0) {
        this.#send(encodeOptionReply(option, NbdReply.ERR_INVALID, `meta context query "${query}" has no namespace`));
        return;
      }
      if (query.slice(0, colon) !== 'base') continue;
      const leaf = query.slice(colon + 1);
      if (leaf === 'allocation' || (!set && leaf === '')) allocation = true;
    }
    const acquired = await this.#acquireForOption(option, request.exportName);
    if (acquired === undefined) return;
    this.#context.references.release(acquired.opened);
    const replies: Buffer[] = [];
    if (allocation) {
      replies.push(encodeOptionReply(option, NbdReply.META_CONTEXT, encodeMetaContextReply(set ? BASE_ALLOCATION_CONTEXT_ID : 0, NBD_META_CONTEXT_BASE_ALLOCATION)));
      if (set) this.#metaContextExport = request.exportName;
    }
    replies.push(encodeOptionReply(option, NbdReply.ACK));
    this.#send(replies);
  }

  /** Keeps the export for transmission; false (and the holder dropped) if the connection went away meanwhile. */
  #adoptExport(opened: NbdExport, requestedName: string, blockSizes: NbdBlockSizes): boolean {
    if (this.#state !== 'handshake') {
      this.#context.references.release(opened);
      return false;
    }
    assert(this.#export === undefined, 'one export per connection');
    this.#export = opened;
    this.#target = {
      sizeBytes: opened.sizeBytes,
      readOnly: opened.readOnly,
      blockSizes,
      structuredReplies: this.#structuredReplies,
      blockStatus: this.#structuredReplies && this.#metaContextExport === requestedName,
    };
    return true;
  }

  #enterTransmission(): void {
    assert(this.#state === 'handshake' && this.#export !== undefined, 'transmission follows an accepted export');
    this.#state = 'transmission';
    this.#handshakeTimer?.cancel();
    this.#handshakeTimer = undefined;
    this.#parser.enterTransmission();
    this.#readInPlace();
  }

  /**
   * From transmission on, socket reads go into the parser's buffers when the connection can (not
   * under TLS): a reused staging buffer, or straight into the write payload being received. Every
   * write payload is then in a pool buffer, given back when the write is done with it.
   */
  #readInPlace(): void {
    const connection = this.#connection;
    const parser = this.#parser;
    this.#readingInPlace = connection.readInto?.(() => parser.readTarget(), (bytes) => {
      if (connection !== this.#connection || this.#state !== 'transmission') return;
      parser.received(bytes);
      this.#pump();
      parser.release();
    }) === true;
  }

  // -------------------------------------------------------------------------------------------
  // Transmission

  #dispatch(request: NbdRequest): void {
    const opened = this.#export;
    const target = this.#target;
    assert(opened !== undefined && target !== undefined && this.#state === 'transmission', 'requests come in transmission');
    const type = request.type;
    if (type === NbdCommand.DISC) {
      this.#beginEnding();
      return;
    }
    const refusal = checkRequest(request, target);
    if (refusal !== undefined) {
      this.#giveBackPayload(request);
      this.#refuse(request, refusal);
      return;
    }
    if (request.lengthBytes === 0 && type !== NbdCommand.FLUSH) {
      // Nothing to do (BLOCK_STATUS of 0 bytes was refused); a read of nothing is still a read reply.
      if (type === NbdCommand.READ && target.structuredReplies) this.#queueEncoded(request, encodeNoneChunk(request.cookieHigh, request.cookieLow), 0);
      else this.#queueReply(ReplyShape.SIMPLE, request, 0, undefined, 0);
      return;
    }
    const fua = (request.flags & NbdCommandFlag.FUA) !== 0;
    const costBytes = type === NbdCommand.READ || type === NbdCommand.WRITE ? request.lengthBytes
      : type === NbdCommand.BLOCK_STATUS ? 8 * Math.min(this.#context.limits.blockStatusExtentsMax, Math.ceil(request.lengthBytes / 512)) : 0;
    this.#inFlightRequests++;
    this.#inFlightBytes += costBytes;
    try {
      switch (type) {
        case NbdCommand.READ: {
          const now = opened.readNow?.(request.offsetBytes, request.lengthBytes);
          if (now !== undefined) {
            this.#completeRead(request, costBytes, now);
            return;
          }
          if (target.structuredReplies && opened.readSparse !== undefined && (request.flags & NbdCommandFlag.DF) === 0) {
            opened.readSparse(request.offsetBytes, request.lengthBytes).then(
              (pieces) => this.#completeSparseRead(request, costBytes, pieces),
              (thrown: unknown) => this.#completeFailure(request, costBytes, thrown),
            );
          } else {
            const taken = opened.readThen?.(request.offsetBytes, request.lengthBytes, (thrown, data) => {
              if (thrown === undefined) this.#completeRead(request, costBytes, data!);
              else this.#completeFailure(request, costBytes, thrown);
            });
            if (taken === true) return;
            opened.read(request.offsetBytes, request.lengthBytes).then(
              (data) => this.#completeRead(request, costBytes, data),
              (thrown: unknown) => this.#completeFailure(request, costBytes, thrown),
            );
          }
          return;
        }
        case NbdCommand.WRITE:
          if (opened.writeNow?.(request.offsetBytes, request.payload!, fua, (thrown, dataDone) => this.#completeWrite(request, costBytes, thrown, dataDone)) === true) return;
          this.#track(request, costBytes, opened.write(request.offsetBytes, request.payload!, fua));
          return;
        case NbdCommand.FLUSH:
          this.#track(request, costBytes, opened.flush());
          return;
        case NbdCommand.TRIM:
          this.#track(request, costBytes, opened.trim(request.offsetBytes, request.lengthBytes, fua));
          return;
        case NbdCommand.WRITE_ZEROES:
          this.#track(request, costBytes, opened.writeZeroes(request.offsetBytes, request.lengthBytes, {
            fua,
            noHole: (request.flags & NbdCommandFlag.NO_HOLE) !== 0,
            fast: (request.flags & NbdCommandFlag.FAST_ZERO) !== 0,
          }));
          return;
        case NbdCommand.BLOCK_STATUS:
          if (opened.blockStatus === undefined) {
            this.#completeBlockStatus(request, costBytes, [{ lengthBytes: request.lengthBytes, hole: false, zero: false }]);
          } else {
            opened.blockStatus(request.offsetBytes, request.lengthBytes).then(
              (extents) => this.#completeBlockStatus(request, costBytes, extents),
              (thrown: unknown) => this.#completeFailure(request, costBytes, thrown),
            );
          }
          return;
        default:
          throw new ShaleError('INTERNAL', `checkRequest let ${commandName(type)} through`);
      }
    } catch (thrown) {
      // The export threw instead of rejecting: the same failure, reported on the same path.
      this.#completeFailure(request, costBytes, thrown);
    }
  }

  #track(request: NbdRequest, costBytes: number, operation: Promise<void>): void {
    operation.then(
      () => this.#completeDone(request, costBytes),
      (thrown: unknown) => this.#completeFailure(request, costBytes, thrown),
    );
  }

  /** How a write taken by writeNow ended: undefined when acknowledged. */
  #completeWrite(request: NbdRequest, costBytes: number, thrown: unknown, dataDone: boolean | undefined): void {
    if (dataDone === true) this.#giveBackPayload(request);
    if (thrown === undefined) this.#completeDone(request, costBytes);
    else this.#completeFailure(request, costBytes, thrown);
  }

  /** Ends an operation's accounting; false when nobody is left to reply to. */
  #endOperation(costBytes: number): boolean {
    this.#inFlightRequests--;
    this.#inFlightBytes -= costBytes;
    assert(this.#inFlightRequests >= 0 && this.#inFlightBytes >= 0, 'in-flight accounting stays non-negative');
    if (this.#state === 'closed' || this.#state === 'failed') {
      this.#maybeFinish();
      return false;
    }
    return true;
  }

  #completeDone(request: NbdRequest, costBytes: number): void {
    if (!this.#endOperation(costBytes)) return;
    this.#queueReply(ReplyShape.SIMPLE, request, 0, undefined, 0);
    this.#resumeIfRoom();
  }

  #completeRead(request: NbdRequest, costBytes: number, data: Buffer): void {
    if (!this.#endOperation(costBytes)) {
      if (Buffer.isBuffer(data)) this.#export?.recycle?.(data);
      return;
    }
    if (!Buffer.isBuffer(data) || data.length !== request.lengthBytes) {
      if (Buffer.isBuffer(data)) this.#export?.recycle?.(data);
      this.#exportBug(request, `returned ${Buffer.isBuffer(data) ? `${data.length} bytes` : typeof data} for a read of ${request.lengthBytes}`);
    } else if (this.#target!.structuredReplies) {
      this.#queueReply(ReplyShape.DATA_CHUNK, request, 0, data, data.length, true);
    } else {
      this.#queueReply(ReplyShape.SIMPLE, request, 0, data, data.length, true);
    }
    this.#resumeIfRoom();
  }

  /** A sparse read: data chunks and hole chunks, in the export's order, the last one DONE. */
  #completeSparseRead(request: NbdRequest, costBytes: number, pieces: NbdReadPiece[]): void {
    if (!this.#endOperation(costBytes)) return;
    const problem = checkPieces(pieces, request.offsetBytes, request.lengthBytes);
    if (problem !== undefined) {
      this.#exportBug(request, `readSparse ${problem}`);
    } else if (pieces.length === 1 && pieces[0]!.data !== undefined) {
      this.#queueReply(ReplyShape.DATA_CHUNK, request, 0, pieces[0]!.data, request.lengthBytes);
    } else {
      let headerBytes = 0;
      for (const piece of pieces) headerBytes += piece.data === undefined ? NBD_OFFSET_HOLE_CHUNK_BYTES : NBD_OFFSET_DATA_HEADER_BYTES;
      const headers = Buffer.allocUnsafe(headerBytes);
      const buffers: Buffer[] = [];
      let at = 0;
      let runStart = 0;
      let dataBytes = 0;
      pieces.forEach((piece, index) => {
        const flags = index === pieces.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
        if (piece.data === undefined) {
          encodeOffsetHoleChunk(headers, at, flags, request.cookieHigh, request.cookieLow, piece.offsetBytes, piece.lengthBytes);
          at += NBD_OFFSET_HOLE_CHUNK_BYTES;
        } else {
          encodeOffsetDataHeader(headers, at, flags, request.cookieHigh, request.cookieLow, piece.offsetBytes, piece.lengthBytes);
          at += NBD_OFFSET_DATA_HEADER_BYTES;
          buffers.push(headers.subarray(runStart, at), piece.data);
          runStart = at;
          dataBytes += piece.lengthBytes;
        }
      });
      if (runStart < at) buffers.push(headers.subarray(runStart, at));
      this.#queueEncoded(request, buffers, dataBytes);
    }
    this.#resumeIfRoom();
  }

  #completeBlockStatus(request: NbdRequest, costBytes: number, statuses: NbdExtentStatus[]): void {
    if (!this.#endOperation(costBytes)) return;
    const limits = this.#context.limits;
    const extentsMax = (request.flags & NbdCommandFlag.REQ_ONE) !== 0 ? 1 : limits.blockStatusExtentsMax;
    const extents: NbdExtent[] = [];
    let covered = 0;
    let problem: string | undefined = Array.isArray(statuses) && statuses.length > 0 ? undefined : 'returned no extents';
    for (const status of problem === undefined ? statuses : []) {
      if (!Number.isSafeInteger(status.lengthBytes) || status.lengthBytes <= 0) {
        problem = `returned an extent of ${String(status.lengthBytes)} bytes`;
        break;
      }
      // Never more than asked: the excess of an extent is cut, extents beyond are dropped.
      const lengthBytes = Math.min(status.lengthBytes, request.lengthBytes - covered);
      const flags = (status.hole ? NbdBlockStatusFlag.HOLE : 0) | (status.zero ? NbdBlockStatusFlag.ZERO : 0);
      const last = extents.at(-1);
      if (last !== undefined && last.flags === flags) {
        extents[extents.length - 1] = { lengthBytes: last.lengthBytes + lengthBytes, flags };
      } else {
        if (extents.length === extentsMax) break;
        extents.push({ lengthBytes, flags });
      }
      covered += lengthBytes;
      if (covered === request.lengthBytes) break;
    }
    if (problem !== undefined) {
      this.#exportBug(request, `blockStatus ${problem}`);
    } else {
      this.#queueEncoded(request, encodeBlockStatusChunk(request.cookieHigh, request.cookieLow, BASE_ALLOCATION_CONTEXT_ID, extents), 0);
    }
    this.#resumeIfRoom();
  }

  #completeFailure(request: NbdRequest, costBytes: number, thrown: unknown): void {
    if (!this.#endOperation(costBytes)) return;
    this.#noteFailure(request, thrown);
    this.#queueError(request, requestErrnoOf(request, thrown), messageOf(thrown));
    this.#resumeIfRoom();
  }

  /** An export broke its contract: EIO to the client, always logged. */
  #exportBug(request: NbdRequest, what: string): void {
    this.#refusedRequests++;
    this.#context.log(`nbd ${this.remoteAddress}: bug: export "${this.#export?.name}" ${what} (${commandName(request.type)} offset ${request.offsetBytes} length ${request.lengthBytes})`);
    this.#queueError(request, NbdErrno.EIO, 'internal error in the export');
  }

  /**
   * Gives a payload the parser copied into a pool buffer back to the pool, once nothing reads it
   * any more: the request was refused, or the export said it is done with the data. A payload the
   * export may still hold is left to the garbage collector.
   */
  #giveBackPayload(request: NbdRequest): void {
    if (request.payloadLent) ioBuffers.give(request.payload!);
  }

  #refuse(request: NbdRequest, refusal: Refusal): void {
    this.#refusedRequests++;
    if (this.#refusedRequests === 1) {
      this.#context.log(`nbd ${this.remoteAddress}: refused ${commandName(request.type)} flags 0x${request.flags.toString(16)} offset ${request.offsetBytes} length ${request.lengthBytes}${request.payloadSkipped ? ' (payload above the maximum, skipped)' : ''}: errno ${refusal.errno}: ${refusal.message}`);
    }
    this.#queueError(request, refusal.errno, refusal.message);
  }

  #noteFailure(request: NbdRequest, thrown: unknown): void {
    this.#refusedRequests++;
    if (this.#refusedRequests === 1 || codeOf(thrown) === 'INTERNAL') {
      this.#context.log(`nbd ${this.remoteAddress}: ${commandName(request.type)} offset ${request.offsetBytes} length ${request.lengthBytes} failed: ${messageOf(thrown)}`);
    }
  }

  /** An error reply: an error chunk with the message when structured replies are on, else a simple reply. */
  #queueError(request: NbdRequest, errno: number, message: string): void {
    assert(errno !== 0, 'an error reply carries an errno');
    if (this.#target?.structuredReplies) this.#queueEncoded(request, encodeErrorChunk(request.cookieHigh, request.cookieLow, errno, message), 0);
    else this.#queueReply(ReplyShape.SIMPLE, request, errno, undefined, 0);
  }

  #queueEncoded(request: NbdRequest, encoded: Buffer | readonly Buffer[], costBytes: number): void {
    this.#replies.push({ shape: ReplyShape.ENCODED, cookieHigh: request.cookieHigh, cookieLow: request.cookieLow, error: 0, offsetBytes: 0, data: undefined, encoded, costBytes, recycle: false });
    this.#afterQueue(costBytes);
  }

  #queueReply(shape: ReplyShapeValue, request: NbdRequest, error: number, data: Buffer | undefined, costBytes: number, recycle = false): void {
    this.#replies.push({ shape, cookieHigh: request.cookieHigh, cookieLow: request.cookieLow, error, offsetBytes: request.offsetBytes, data, encoded: undefined, costBytes, recycle });
    this.#afterQueue(costBytes);
  }

  #afterQueue(costBytes: number): void {
    this.#queuedReplyBytes += costBytes;
    if (!this.#replyFlushScheduled) {
      this.#replyFlushScheduled = true;
      this.#context.env.clock.soon(this.#flushReplies);
    }
  }

  /**
   * Sends every queued reply in one vectored write: runs of fixed-size headers share one buffer,
   * data is sent from the export's buffers, encoded replies as they are.
   */
  #sendReplies(): void {
    this.#replyFlushScheduled = false;
    const replies = this.#replies;
    this.#replies = [];
    this.#queuedReplyBytes = 0;
    if (this.#state === 'closed' || this.#state === 'failed' || replies.length === 0) {
      this.#recycleUnsent(replies);
      this.#maybeFinish();
      return;
    }
    let headerBytes = 0;
    for (const reply of replies) {
      if (reply.shape === ReplyShape.SIMPLE) headerBytes += NBD_SIMPLE_REPLY_HEADER_BYTES;
      else if (reply.shape === ReplyShape.DATA_CHUNK) headerBytes += NBD_OFFSET_DATA_HEADER_BYTES;
    }
    const headers = Buffer.allocUnsafe(headerBytes);
    const buffers: Buffer[] = [];
    // Read data sent in this write, for the export to reuse once it is written.
    let sent: Buffer[] | undefined;
    let at = 0;
    let runStart = 0;
    for (const reply of replies) {
      switch (reply.shape) {
        case ReplyShape.SIMPLE:
          encodeSimpleReplyHeader(headers, at, reply.error, reply.cookieHigh, reply.cookieLow);
          at += NBD_SIMPLE_REPLY_HEADER_BYTES;
          if (reply.data === undefined || reply.data.length === 0) continue;
          break;
        case ReplyShape.DATA_CHUNK:
          encodeOffsetDataHeader(headers, at, NBD_REPLY_FLAG_DONE, reply.cookieHigh, reply.cookieLow, reply.offsetBytes, reply.data!.length);
          at += NBD_OFFSET_DATA_HEADER_BYTES;
          break;
        case ReplyShape.ENCODED:
          if (runStart < at) buffers.push(headers.subarray(runStart, at));
          runStart = at;
          if (Buffer.isBuffer(reply.encoded)) buffers.push(reply.encoded);
          else for (const buffer of reply.encoded!) buffers.push(buffer);
          continue;
      }
      buffers.push(headers.subarray(runStart, at), reply.data!);
      runStart = at;
      if (reply.recycle) (sent ??= []).push(reply.data!);
    }
    if (runStart < at) buffers.push(headers.subarray(runStart, at));
    const opened = this.#export;
    this.#send(buffers, sent === undefined || opened?.recycle === undefined ? undefined : () => {
      for (const data of sent!) opened.recycle!(data);
    });
    this.#maybeFinish();
    this.#resumeIfRoom();
    this.#context.env.clock.pollFor(this.#context.limits.pollMs);
  }

  /** After an operation completed or replies went out: read on if the socket was paused for lack of room. */
  #resumeIfRoom(): void {
    if (this.#state === 'transmission' && this.#inputPaused) this.#pump();
  }

  /**
   * Read data of replies that will never be written (the connection is gone): back to the export
   * now. Data lent by the store engine's cache keeps a cache slot until it comes back.
   */
  #recycleUnsent(replies: readonly PendingReply[]): void {
    const recycle = this.#export?.recycle;
    if (recycle === undefined) return;
    for (const reply of replies) if (reply.recycle) recycle(reply.data!);
  }

  #send(data: Buffer | readonly Buffer[], onWritten?: () => void): void {
    if (this.#state === 'closed' || this.#state === 'failed') {
      onWritten?.();
      return;
    }
    if (!this.#connection.write(data, onWritten)) {
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

  /** A refused option (unknown export, failed listing, no TLS): logged once per connection. */
  #logRefusal(message: string): void {
    if (this.#refusalLogged) return;
    this.#refusalLogged = true;
    this.#context.log(`nbd ${this.remoteAddress}: ${message}`);
  }

  #onClose(error: Error | undefined): void {
    if (this.#state === 'closed') return;
    const previous = this.#state;
    this.#state = 'closed';
    this.#handshakeTimer?.cancel();
    this.#lingerTimer?.cancel();
    this.#parser.discard();
    this.#recycleUnsent(this.#replies);
    this.#replies = [];
    this.#queuedReplyBytes = 0;
    if (previous === 'transmission' && (error !== undefined || this.#inFlightRequests > 0)) {
      const dropped = this.#inFlightRequests > 0 ? ` with ${this.#inFlightRequests} requests in flight (their replies are dropped)` : '';
      this.#logBroken(`connection lost${error !== undefined ? `: ${error.message}` : ''}${dropped}`);
    } else if (previous === 'handshake' && error !== undefined) {
      this.#logBroken(`connection lost during the handshake${this.#tlsActive ? ' (TLS)' : ''}: ${error.message}`);
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

/** Why sparse-read pieces do not cover [offsetBytes, offsetBytes + lengthBytes) exactly, or undefined. */
function checkPieces(pieces: readonly NbdReadPiece[], offsetBytes: number, lengthBytes: number): string | undefined {
  if (!Array.isArray(pieces) || pieces.length === 0) return 'returned no pieces';
  let position = offsetBytes;
  for (const piece of pieces) {
    if (piece.offsetBytes !== position) return `returned a piece at ${String(piece.offsetBytes)} where ${position} was due`;
    if (!Number.isSafeInteger(piece.lengthBytes) || piece.lengthBytes <= 0) return `returned a piece of ${String(piece.lengthBytes)} bytes`;
    if (piece.data !== undefined && (!Buffer.isBuffer(piece.data) || piece.data.length !== piece.lengthBytes)) return `returned a data piece whose data is not ${piece.lengthBytes} bytes`;
    position += piece.lengthBytes;
  }
  return position === offsetBytes + lengthBytes ? undefined : `covered ${position - offsetBytes} of ${lengthBytes} bytes`;
}
