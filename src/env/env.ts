/**
 * The environment: the only way any component reaches disks, the network, time and randomness
 * (DESIGN §8). Production passes the real Node.js implementations (`node/`); tests may pass
 * simulated ones (`sim/`) that lose unsynced writes, corrupt sectors, delay, drop and partition,
 * all from one seed. Nothing outside `src/env/node/` imports fs, net, timers or Math.random.
 *
 * Addresses are strings: "HOST:PORT" for TCP (IPv6 as "[::1]:PORT") or "unix:/path" for a unix
 * socket. Port 0 asks for any free port; Listener.address() tells which one was bound.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';

/** A file or block device holding a store's disk, or any other file a role keeps. */
export interface DiskFile {
  readonly path: string;
  /** Size in bytes at open (a block device's size, or a file's length). */
  readonly sizeBytes: number;
  /**
   * Reads `target.length` bytes at `offsetBytes` into `target`. Returns the number of bytes read,
   * which is shorter only at the end of the file. Errors: the OS error.
   */
  read(target: Buffer, offsetBytes: number): Promise<number>;
  /**
   * The same read done synchronously when that is cheap (the data is likely in the page cache),
   * else undefined and nothing read: the caller uses `read`. Optional: a disk may never offer it.
   */
  readNow?(target: Buffer, offsetBytes: number): number | undefined;
  /**
   * Writes the buffers back to back at `offsetBytes`, completely. The data may sit in a volatile
   * cache until `sync` resolves; a crash before that may drop any subset of unsynced writes,
   * at sector granularity.
   */
  writev(buffers: readonly Buffer[], offsetBytes: number): Promise<void>;
  /**
   * The same write done synchronously when that is cheap (into the page cache, not held up by
   * writeback), returning true; false and nothing written: the caller uses `writev`. Optional.
   */
  writevNow?(buffers: readonly Buffer[], offsetBytes: number): boolean;
  /**
   * Gives byte ranges back to the file system (punches holes; the file keeps its size): they read
   * as zeros from then on, and their page-cache pages are dropped. Like a write, a crash before
   * the next `sync` may leave a range as it was. Optional; rejects with NOT_SUPPORTED where the
   * file cannot (a block device, a file system without hole punching).
   */
  punchHoles?(ranges: readonly ByteRange[]): Promise<void>;
  /** Makes every write that completed before this call durable (fdatasync). */
  sync(): Promise<void>;
  close(): Promise<void>;
}

export interface ByteRange {
  offsetBytes: number;
  lengthBytes: number;
}

export interface OpenOptions {
  /** Create the file if missing. With sizeBytes, a new or shorter file is extended (sparse) to that size. */
  create?: boolean;
  sizeBytes?: number;
  /**
   * With sizeBytes: allocate the blocks of a file that was created or extended (fallocate), so a
   * full file system shows now and not at the first write. Where the file system (or the system)
   * cannot, the file stays sparse.
   */
  preallocate?: boolean;
  readOnly?: boolean;
}

export interface Disk {
  open(path: string, options?: OpenOptions): Promise<DiskFile>;
  /** Whole-file helpers for small files (configuration, tokens, pid files). */
  readFile(path: string): Promise<Buffer | undefined>;
  /** Writes atomically: to a temporary file, fsync, rename. */
  writeFileAtomic(path: string, data: Buffer | string, mode?: number): Promise<void>;
  exists(path: string): Promise<boolean>;
  mkdir(path: string): Promise<void>;
  remove(path: string): Promise<void>;
}

/** A byte stream: a TCP or unix-socket connection. */
export interface Connection {
  readonly remoteAddress: string;
  /**
   * Queues the buffers in order as one write. Returns false when the caller should wait for onDrain.
   * `onWritten`, if given, is called once the buffers are no longer needed: written to the OS, or
   * dropped because the connection closed.
   */
  write(data: Buffer | readonly Buffer[], onWritten?: () => void): boolean;
  /** Each chunk read; the chunk is the listener's to keep. */
  onData(listener: (chunk: Buffer) => void): void;
  /**
   * Optional: from now on, reads go into buffers the caller gives instead of a new buffer per read
   * (the per-read buffers of a busy connection keep the garbage collector busy), and onData gets
   * nothing more. `target` is asked before each read for where it may go (a non-empty buffer the
   * caller may hand out again once `received` returns); `received` says how many bytes of it the
   * read filled. False, with nothing changed, when this connection cannot (then onData goes on).
   */
  readInto?(target: () => Buffer, received: (bytes: number) => void): boolean;
  onDrain(listener: () => void): void;
  /** Called once when the stream is closed, with the error that closed it if any. */
  onClose(listener: (error?: Error) => void): void;
  pause(): void;
  resume(): void;
  /** Sends what is queued, then closes. */
  end(): void;
  /** Closes at once, dropping what is queued. */
  destroy(error?: Error): void;
  readonly closed: boolean;
}

export interface Listener {
  /** The bound address, in the same form as given to listen (with the real port). */
  readonly address: string;
  close(): Promise<void>;
}

export type HttpHandler = (request: IncomingMessage, response: ServerResponse) => void;

export interface HttpResult {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
}

export interface Net {
  listen(address: string, onConnection: (connection: Connection) => void): Promise<Listener>;
  connect(address: string, timeoutMs?: number): Promise<Connection>;
  /** An HTTP/1.1 server on `address`. */
  /**
   * With `expectContinue`, a request carrying `Expect: 100-continue` reaches the handler before any
   * interim answer: the handler calls `writeContinue()` once it accepts the request (or answers an
   * error without reading the body). Without it, 100 Continue is sent at once.
   */
  serveHttp(address: string, handler: HttpHandler, options?: { expectContinue?: boolean }): Promise<Listener>;
  /** One HTTP request; resolves on any status, rejects with UNAVAILABLE when the peer can't be reached or times out. */
  httpRequest(method: string, url: string, options?: { body?: Buffer | string; headers?: Record<string, string>; timeoutMs?: number }): Promise<HttpResult>;
}

export interface Timer {
  cancel(): void;
  /** The timer does not keep the process alive. */
  unref(): Timer;
}

export interface Clock {
  /** Monotonic milliseconds, for durations and timeouts. */
  nowMs(): number;
  /** Wall-clock milliseconds since the Unix epoch, for timestamps shown to people. */
  wallMs(): number;
  after(delayMs: number, callback: () => void): Timer;
  every(intervalMs: number, callback: () => void): Timer;
  sleep(delayMs: number): Promise<void>;
  /**
   * Runs `callback` after the current event-loop turn's I/O (setImmediate), for batching; in a
   * simulation, on the next `advance`.
   */
  soon(callback: () => void): void;
  /**
   * Runs `callback` once the I/O callbacks of the current event-loop turn have run (setImmediate),
   * so that what every socket delivered this turn is there when it runs. Unlike `soon`, a
   * simulation runs it at once (a microtask): nothing arrives from outside during a simulated
   * turn, so waiting for the next `advance` would only stall what waits on it.
   */
  afterIo(callback: () => void): void;
  /**
   * Busy polling: keeps the event loop checking for I/O without sleeping until about durationMs
   * from now (a later deadline set before stands). Spends CPU to spare the next event the cost of
   * waking a sleeping thread, which on a virtual machine is tens of µs.
   */
  pollFor(durationMs: number): void;
}

export interface Random {
  /** A uniformly distributed integer in [0, 2^32). */
  uint32(): number;
  /** A uniformly distributed number in [0, 1). */
  float(): number;
  bytes(count: number): Buffer;
  /** A random RFC 4122 version 4 uuid. */
  uuid(): string;
}

export interface Env {
  readonly disk: Disk;
  readonly net: Net;
  readonly clock: Clock;
  readonly random: Random;
}

/** Splits "HOST:PORT" or "unix:/path" into its parts. */
export function parseAddress(address: string): { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number } {
  if (address.startsWith('unix:')) return { kind: 'unix', path: address.slice('unix:'.length) };
  const match = /^\[?([^\]]*?)\]?:(\d+)$/.exec(address);
  if (!match) throw new RangeError(`not an address: "${address}" (expected HOST:PORT or unix:/path)`);
  const port = Number(match[2]);
  if (port > 65535) throw new RangeError(`not an address: "${address}" (port above 65535)`);
  return { kind: 'tcp', host: match[1] || '127.0.0.1', port };
}

export function formatAddress(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}
