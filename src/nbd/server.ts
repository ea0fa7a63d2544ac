/**
 * The NBD server of the nbd gateway (DESIGN §1, §6): serves exports — one per volume, read-only
 * ones for snapshots — to NBD clients (qemu, nbdcopy, fio, nbdfuse, the kernel's nbd-client) over
 * TCP or a unix socket, optionally with TLS. What it supports, its limits and its error mapping are
 * in docs/nbd.md.
 *
 * Exports come from an ExportProvider. All connections to one export share one NbdExport object
 * (the provider returns the same instance for the same name), which is what makes
 * NBD_FLAG_CAN_MULTI_CONN true: a FLUSH on any connection covers writes acknowledged on all of
 * them. The server counts holders and calls `release()` once the last connection using an export
 * has closed and its operations have completed.
 *
 * Isolation: a client that sends garbage, breaks the handshake or vanishes mid-request loses its
 * own connection and nothing else; the failure is logged once through `log`. Every buffer and
 * queue is bounded (see NbdServerOptions).
 *
 * Shutdown (`close`): stop accepting; connections still in the handshake are closed; connections
 * in transmission read no more requests, finish what is in flight, send the replies and end —
 * within `shutdownGraceMs`, after which they are cut. Then every export release has run.
 */
import type { Connection, Env, Listener } from '../env/env.ts';
import { ShaleError } from '../lib/errors.ts';
import { MiB } from '../lib/units.ts';
import { NBD_BLOCK_STATUS_EXTENTS_MAX, NBD_PAYLOAD_BYTES_MAX, NBD_STRING_BYTES_MAX } from '../proto/nbd.ts';
import { ExportReferences } from './export-references.ts';
import { NbdSession } from './session.ts';
import type { SessionContext, SessionLimits } from './session.ts';
import { loadServerTls } from './tls.ts';
import type { NbdTlsOptions } from './tls.ts';

export type { NbdTlsMode, NbdTlsOptions } from './tls.ts';

/**
 * One export as the server sees it. Offsets and lengths are in bytes and always within
 * [0, sizeBytes] — the server checks them (and the export's block sizes) before calling.
 * Operations may run concurrently, also on overlapping ranges (ordering those is the client's
 * business, as on a disk).
 */
export interface NbdExport {
  readonly name: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  /** Shown to clients that ask (NBD_INFO_DESCRIPTION). */
  readonly description?: string;
  /**
   * Size constraints sent in NBD_INFO_BLOCK_SIZE and enforced by the server (unaligned requests get
   * EINVAL). Omitted fields take proto.md's defaults: minimum 1, preferred 4096, maximum payload the
   * server's payloadBytesMax (a larger value is lowered to it). minimumBytes: a power of two
   * ≤ 64 KiB; preferredBytes: a power of two ≥ max(minimumBytes, 512); maximumPayloadBytes ≥
   * preferredBytes. An export that breaks these rules is refused (NBD_REP_ERR_UNKNOWN, logged).
   */
  readonly blockSizes?: NbdExportBlockSizes;
  /** Returns exactly `lengthBytes` bytes; the buffer is sent as is and must not change afterwards. */
  read(offsetBytes: number, lengthBytes: number): Promise<Buffer>;
  /**
   * Optional: the same read answered synchronously when the export can (data at hand), else
   * undefined and the server calls read() (or readSparse()). Never throws: errors come from read().
   */
  readNow?(offsetBytes: number, lengthBytes: number): Buffer | undefined;
  /**
   * Optional: the same read with a callback instead of a Promise, when the export can take it so;
   * false, with nothing started, and the server calls read(). `done` is called once, never before
   * this returns: with the error read() would reject with, or with the bytes it would return.
   */
  readThen?(offsetBytes: number, lengthBytes: number, done: (error: unknown, data: Buffer | undefined) => void): boolean;
  /**
   * Optional: called with each buffer that read(), readNow() or readThen() returned once the
   * server holds it no more: its reply has been written to the socket, or will never be (the
   * connection closed first). Lets an export reuse its read buffers, or lend them (the server
   * never writes to one).
   */
  recycle?(data: Buffer): void;
  /**
   * Optional: the same read, with the zero ranges left out. Returns pieces that cover
   * [offsetBytes, offsetBytes + lengthBytes) in order, back to back, each with lengthBytes > 0:
   * with `data` (exactly lengthBytes bytes, not changed afterwards) for data, without for a range
   * that reads as zeroes. The server sends the zero pieces as NBD_REPLY_TYPE_OFFSET_HOLE chunks when
   * the client negotiated structured replies; otherwise, and for NBD_CMD_FLAG_DF reads, it calls
   * read(). Pieces that do not cover the range exactly fail the read with EIO (a bug, logged).
   */
  readSparse?(offsetBytes: number, lengthBytes: number): Promise<NbdReadPiece[]>;
  /**
   * Writes `data` (at most 32 MiB). Resolving acknowledges the write: it must be visible to reads on
   * every connection, and durable once a later flush() resolves; with `fua`, durable before resolving.
   */
  write(offsetBytes: number, data: Buffer, fua: boolean): Promise<void>;
  /**
   * Optional: the same write started without a Promise when the export can (true), or false: the
   * server calls write(). `done` is called exactly once, never before writeNow returns: with
   * undefined when the write is acknowledged (as write() resolving), else with the error; and with
   * `dataDone` true if the export, and everything it passed `data` to, will never read `data`
   * again, so the server may reuse its memory. Never throws.
   */
  writeNow?(offsetBytes: number, data: Buffer, fua: boolean, done: (error: unknown, dataDone?: boolean) => void): boolean;
  /** Makes every write acknowledged before the call durable, whichever connection it came from. */
  flush(): Promise<void>;
  /** The range is no longer needed; it may read back as anything until rewritten. The length may exceed 32 MiB. */
  trim(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void>;
  /**
   * The range reads back as zeroes; `noHole` asks for it to stay allocated. The length may exceed
   * 32 MiB. With `fast` (NBD_CMD_FLAG_FAST_ZERO), an export that cannot zero the range faster than
   * it would write it must throw ShaleError NOT_SUPPORTED at once, leaving the range unchanged; the
   * client then gets ENOTSUP and writes the zeroes itself. NOT_SUPPORTED from any other call (or
   * without `fast`) reaches the client as EINVAL: ENOTSUP is reserved to FAST_ZERO by proto.md.
   */
  writeZeroes(offsetBytes: number, lengthBytes: number, options: { fua: boolean; noHole: boolean; fast: boolean }): Promise<void>;
  /**
   * Optional: the allocation status of the range (NBD_CMD_BLOCK_STATUS, meta context
   * `base:allocation`). Returns extents that start at offsetBytes and follow each other, each with
   * lengthBytes > 0; together they may cover less than lengthBytes (the client asks again for the
   * rest) but never more (the excess is cut). `hole`: not allocated (writing there may need space);
   * `zero`: reads as zeroes. Without this method the server reports the whole range as allocated
   * data, which proto.md allows.
   */
  blockStatus?(offsetBytes: number, lengthBytes: number): Promise<NbdExtentStatus[]>;
  /** Called when the last connection to it closes (after its operations completed). */
  release(): Promise<void>;
}

export interface NbdExportBlockSizes {
  readonly minimumBytes?: number;
  readonly preferredBytes?: number;
  readonly maximumPayloadBytes?: number;
}

export interface NbdReadPiece {
  readonly offsetBytes: number;
  readonly lengthBytes: number;
  /** The bytes of a data piece; absent for a piece that reads as zeroes. */
  readonly data?: Buffer;
}

export interface NbdExtentStatus {
  readonly lengthBytes: number;
  readonly hole: boolean;
  readonly zero: boolean;
}

export interface ExportProvider {
  /**
   * The export called `name`, the same instance for the same name while any connection holds it.
   * Errors: ShaleError NOT_FOUND for an unknown export (the client gets NBD_REP_ERR_UNKNOWN);
   * SHUTTING_DOWN → NBD_REP_ERR_SHUTDOWN; UNAUTHENTICATED / FENCED → NBD_REP_ERR_POLICY.
   */
  open(name: string): Promise<NbdExport>;
  list(): Promise<{ name: string; description: string }[]>;
}

export interface NbdServerOptions {
  /** "HOST:PORT" (port 0 picks a free one) or "unix:/path". */
  readonly listen: string;
  readonly provider: ExportProvider;
  /** Receives one line per refused or broken connection. Default: none. */
  readonly log?: (message: string) => void;
  /** Connections beyond this are closed at once. Default 256. */
  readonly maxConnections?: number;
  /** Operations running at once per connection; beyond it the socket is paused. Default 128. */
  readonly inFlightRequestsMax?: number;
  /** Read lengths + write payloads in flight per connection (one request may overshoot). Default 64 MiB. */
  readonly inFlightBytesMax?: number;
  /** Largest read or write payload, advertised in NBD_INFO_BLOCK_SIZE. Default and maximum 32 MiB. */
  readonly payloadBytesMax?: number;
  /** Oversized write payloads up to this are skipped and answered EINVAL; larger ones close the connection. Default 64 MiB. */
  readonly oversizedPayloadSkipBytesMax?: number;
  /** Largest option data kept in memory; larger options get NBD_REP_ERR_TOO_BIG. Default 64 KiB. */
  readonly optionDataBytesMax?: number;
  /** Options one connection may send before it is cut. Default 256. */
  readonly optionsPerConnectionMax?: number;
  /** Time from connect to the end of the handshake. Default 10 s. */
  readonly handshakeTimeoutMs?: number;
  /** Time a client gets to close its side after the server ended the connection. Default 5 s. */
  readonly lingerMs?: number;
  /** Time close() waits for in-flight operations before cutting connections. Default 30 s. */
  readonly shutdownGraceMs?: number;
  /** Most extents in one NBD_CMD_BLOCK_STATUS reply (8 bytes each); the client asks again for the rest. Default 65536. */
  readonly blockStatusExtentsMax?: number;
  /**
   * Busy polling: after replies go out or an operation starts, the event loop keeps polling for
   * the next request or completion this many µs instead of sleeping (Clock.pollFor). Shortens
   * each round trip at low queue depth at the price of CPU while I/O runs. Default 0 (off), at most 1 s.
   */
  readonly pollMicros?: number;
  /** NBD_OPT_STARTTLS with x509 certificates; needs the Node environment (see tls.ts). Default: off. */
  readonly tls?: NbdTlsOptions;
}

export interface NbdServer {
  /** The bound address, with the real port. */
  readonly address: string;
  /** Connections open, or closed with operations still running (what maxConnections counts). */
  connectionCount(): number;
  close(): Promise<void>;
}

/** Busy polling longer than this after the last reply is a busy loop, not a latency saving. */
const POLL_MS_MAX = 1000;

function limitOf(value: number | undefined, fallback: number, name: string, minimum = 1): number {
  const chosen = value ?? fallback;
  if (!Number.isSafeInteger(chosen) || chosen < minimum) {
    throw new ShaleError('INVALID_ARGUMENT', `nbd server option ${name}: ${chosen} is not a whole number ≥ ${minimum}`);
  }
  return chosen;
}

export async function startNbdServer(env: Env, options: NbdServerOptions): Promise<NbdServer> {
  const log = options.log ?? (() => {});
  const payloadBytesMax = limitOf(options.payloadBytesMax, NBD_PAYLOAD_BYTES_MAX, 'payloadBytesMax', 4096);
  if (payloadBytesMax > NBD_PAYLOAD_BYTES_MAX) {
    throw new ShaleError('INVALID_ARGUMENT', `nbd server option payloadBytesMax: ${payloadBytesMax} is above ${NBD_PAYLOAD_BYTES_MAX}`);
  }
  const limits: SessionLimits = {
    payloadBytesMax,
    oversizedPayloadSkipBytesMax: limitOf(options.oversizedPayloadSkipBytesMax, 2 * payloadBytesMax, 'oversizedPayloadSkipBytesMax', payloadBytesMax),
    optionDataBytesMax: limitOf(options.optionDataBytesMax, 64 * 1024, 'optionDataBytesMax', NBD_STRING_BYTES_MAX + 6),
    optionsPerConnectionMax: limitOf(options.optionsPerConnectionMax, 256, 'optionsPerConnectionMax'),
    inFlightRequestsMax: limitOf(options.inFlightRequestsMax, 128, 'inFlightRequestsMax'),
    inFlightBytesMax: limitOf(options.inFlightBytesMax, 64 * MiB, 'inFlightBytesMax'),
    handshakeTimeoutMs: limitOf(options.handshakeTimeoutMs, 10_000, 'handshakeTimeoutMs'),
    lingerMs: limitOf(options.lingerMs, 5_000, 'lingerMs'),
    blockStatusExtentsMax: limitOf(options.blockStatusExtentsMax, 65_536, 'blockStatusExtentsMax'),
    pollMs: limitOf(options.pollMicros, 0, 'pollMicros', 0) / 1000,
  };
  if (limits.pollMs > POLL_MS_MAX) {
    throw new ShaleError('INVALID_ARGUMENT', `nbd server option pollMicros: ${options.pollMicros} is above ${POLL_MS_MAX * 1000} (1 s)`);
  }
  if (limits.blockStatusExtentsMax > NBD_BLOCK_STATUS_EXTENTS_MAX) {
    throw new ShaleError('INVALID_ARGUMENT', `nbd server option blockStatusExtentsMax: ${limits.blockStatusExtentsMax} is above ${NBD_BLOCK_STATUS_EXTENTS_MAX}`);
  }
  const tls = options.tls === undefined ? undefined : await loadServerTls(env, options.tls);
  const maxConnections = limitOf(options.maxConnections, 256, 'maxConnections');
  const shutdownGraceMs = limitOf(options.shutdownGraceMs, 30_000, 'shutdownGraceMs', 0);
  const references = new ExportReferences(options.provider, log);
  const sessions = new Set<NbdSession>();
  let shuttingDown = false;

  const context: SessionContext = {
    env,
    provider: options.provider,
    references,
    limits,
    log,
    tls,
    isShuttingDown: () => shuttingDown,
  };

  const onConnection = (connection: Connection): void => {
    if (shuttingDown) {
      connection.destroy();
      return;
    }
    if (sessions.size >= maxConnections) {
      log(`nbd ${connection.remoteAddress}: refused connection: ${maxConnections} connections already open`);
      connection.destroy();
      return;
    }
    const session = new NbdSession(connection, context);
    sessions.add(session);
    void session.finished.then(() => sessions.delete(session));
  };

  const listener: Listener = await env.net.listen(options.listen, onConnection);

  let closing: Promise<void> | undefined;
  const close = async (): Promise<void> => {
    shuttingDown = true;
    for (const session of sessions) session.shutdown();
    const everyoneFinished = Promise.all([...sessions].map((session) => session.finished));
    let graceTimer: { cancel(): void } | undefined;
    const graceOver = new Promise<void>((resolve) => {
      graceTimer = env.clock.after(shutdownGraceMs, resolve);
    });
    await Promise.race([everyoneFinished, graceOver]);
    graceTimer?.cancel();
    // Past the grace period, connections are cut. An operation that still hangs (a volume waiting
    // for quorum) keeps its export held; its release runs whenever the operation completes.
    for (const session of sessions) session.destroy();
    await listener.close();
    await references.settled();
  };

  return {
    address: listener.address,
    connectionCount: () => sessions.size,
    close: () => (closing ??= close()),
  };
}
