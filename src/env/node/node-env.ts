/**
 * The real environment: Node.js files, sockets, timers and crypto randomness. The only module tree
 * allowed to import fs, net, http, timers or to call Math.random and Date.now.
 */
import { execFile } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import * as fs from 'node:fs/promises';
import { constants as fsConstants, openSync, readSync, writevSync, type Stats } from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import { dirname } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { Writable } from 'node:stream';
import { ShaleError } from '../../lib/errors.ts';
import type { ByteRange, Clock, Connection, Disk, DiskFile, Env, HttpHandler, HttpResult, Listener, Net, OpenOptions, Random, Timer } from '../env.ts';
import { formatAddress, parseAddress } from '../env.ts';

/** Reads up to this size may be served synchronously (see SyncIoPolicy). */
const SYNC_READ_BYTES_MAX = 64 * 1024;
/** Writes up to this size may be done synchronously (a policy of their own, as for reads). */
const SYNC_WRITE_BYTES_MAX = 256 * 1024;
/**
 * The time a write may take for its size before the rest counts as a stall: copying into new
 * page-cache pages runs at about 0.7 GiB/s on the build machine; 0.5 GiB/s leaves room.
 */
const SYNC_WRITE_BYTES_PER_MS = 512 * 1024;

/**
 * When to read synchronously. A small read served from the page cache takes 2–5 µs; through
 * libuv's thread pool it costs a round trip of several times that (on a VM every hand-off between
 * threads is a cross-CPU wake-up). But a read that goes to the device (a cache miss) stalls the
 * event loop for its whole latency, and at queue depth 32 every other request waits behind it.
 * So reads are synchronous while the time they stall the loop stays below what the thread pool
 * would cost: SYNC_READ_STALL_PER_READ_MS per read, counted over windows of SYNC_READ_WINDOW
 * reads. A read slower than SYNC_READ_SLOW_MS is a stall; once a window's stalls add up to more
 * than its budget, reads go to the thread pool for a back-off period, then synchronous reads are
 * tried again. The back-off doubles (up to
 * SYNC_READ_BACKOFF_MAX_MS) each time the retry stalls again, and starts over once a window stays
 * within its budget. A disk that mostly misses thus stalls the event loop for a few device reads
 * every several seconds. A disk of 100 µs misses stays synchronous up to a miss rate of about
 * 10 %, one of 300 µs up to about 3 %.
 *
 * A read is also slow when the thread was preempted during it, which on a machine whose cores
 * are shared (store processes, the gateway, the client) happens to a few reads in a thousand.
 * Counted as stalls, those sent half of all reads to the thread pool with every byte in the page
 * cache. So the time the thread spent waiting for a CPU (`runQueueWaitMs`, read from the kernel
 * at the start of each window and after each slow read: about 1 µs) is taken off the slow reads.
 *
 * A slow read during which the thread had nothing read from a device is not a miss either (when
 * the policy is given `deviceReadBytes`: the thread's read_bytes in /proc/thread-self/io, looked
 * at like the run-queue wait). On a virtual machine the vCPU itself is sometimes held back by the
 * host for 1–8 ms, in computation as much as in a read, and the guest does not count that as
 * waiting for a CPU; a few of those a second sent every read to the thread pool for 250 ms each
 * time, at two to three times the CPU per read, with every byte in the page cache.
 *
 * Synchronous log writes follow the same policy, on a record of their own (NodeDiskFile.writevNow),
 * without the device-read check: what holds a write up is the kernel throttling it, not a read.
 */
const SYNC_READ_SLOW_MS = 0.05;
const SYNC_READ_WINDOW = 256;
const SYNC_READ_STALL_PER_READ_MS = 0.01;
const SYNC_READ_STALL_BUDGET_MS = SYNC_READ_WINDOW * SYNC_READ_STALL_PER_READ_MS;
const SYNC_READ_BACKOFF_MIN_MS = 250;
const SYNC_READ_BACKOFF_MAX_MS = 8000;

/** What NodeDiskFile asks before and tells after each synchronous read (or write). */
export interface SyncIo {
  useSync(): boolean;
  record(elapsedMs: number): void;
}

export class SyncIoPolicy implements SyncIo {
  readonly #nowMs: () => number;
  readonly #runQueueWaitMs: () => number | undefined;
  readonly #deviceReadBytes: () => number | undefined;
  #asyncUntilMs = 0;
  #backoffMs = SYNC_READ_BACKOFF_MIN_MS;
  #reads = 0;
  #stallMs = 0;
  /** The run-queue wait when this window started or its last slow read ended; undefined: not read yet. */
  #waitMs: number | undefined;
  /** Likewise the bytes read from devices; undefined: not read yet, or unknown. */
  #deviceBytes: number | undefined;

  /**
   * `runQueueWaitMs`: how long this thread has waited, runnable, for a CPU in all;
   * `deviceReadBytes`: how many bytes storage devices have read for this thread in all. Either
   * undefined when unknown: then slow reads count whole.
   */
  constructor(
    nowMs: () => number = () => performance.now(),
    runQueueWaitMs: () => number | undefined = threadRunQueueWaitMs,
    deviceReadBytes: () => number | undefined = () => undefined,
  ) {
    this.#nowMs = nowMs;
    this.#runQueueWaitMs = runQueueWaitMs;
    this.#deviceReadBytes = deviceReadBytes;
  }

  useSync(): boolean {
    if (this.#asyncUntilMs !== 0 && this.#nowMs() < this.#asyncUntilMs) return false;
    if (this.#reads === 0 && this.#waitMs === undefined) {
      this.#waitMs = this.#runQueueWaitMs();
      this.#deviceBytes = this.#deviceReadBytes();
    }
    return true;
  }

  record(elapsedMs: number): void {
    if (elapsedMs > SYNC_READ_SLOW_MS) {
      // Time spent preempted since the last look is not the disk's; each wait excuses one read only.
      const waitMs = this.#runQueueWaitMs();
      let stallMs = waitMs !== undefined && this.#waitMs !== undefined ? elapsedMs - Math.max(0, waitMs - this.#waitMs) : elapsedMs;
      this.#waitMs = waitMs;
      // Nothing read from a device since the last look: the page cache served it, however slowly.
      const deviceBytes = this.#deviceReadBytes();
      if (deviceBytes !== undefined && deviceBytes === this.#deviceBytes) stallMs = 0;
      this.#deviceBytes = deviceBytes;
      if (stallMs > SYNC_READ_SLOW_MS) this.#stallMs += stallMs;
      if (this.#stallMs > SYNC_READ_STALL_BUDGET_MS) {
        // Misses: back off at once, longer each time the previous back-off ended in misses.
        this.#backoffMs = this.#asyncUntilMs === 0 ? SYNC_READ_BACKOFF_MIN_MS : Math.min(SYNC_READ_BACKOFF_MAX_MS, this.#backoffMs * 2);
        this.#asyncUntilMs = this.#nowMs() + this.#backoffMs;
        this.#startWindow();
        return;
      }
    }
    if (++this.#reads < SYNC_READ_WINDOW) return;
    // A window within its budget: the cache serves; synchronous reads stay.
    this.#asyncUntilMs = 0;
    this.#startWindow();
  }

  #startWindow(): void {
    this.#reads = 0;
    this.#stallMs = 0;
    this.#waitMs = undefined;
    this.#deviceBytes = undefined;
  }
}

/** This thread's open /proc/thread-self files (module state is per thread); null where the kernel has none. */
const threadProcFds = new Map<string, number | null>();
const threadProcBuffer = Buffer.alloc(256);

/** The text of /proc/thread-self/`name`, read through a descriptor kept open; undefined where it cannot be read. */
function readThreadProcFile(name: string): string | undefined {
  let fd = threadProcFds.get(name);
  if (fd === undefined) {
    try {
      fd = openSync(`/proc/thread-self/${name}`, 'r');
    } catch {
      fd = null;
    }
    threadProcFds.set(name, fd);
  }
  if (fd === null) return undefined;
  try {
    return threadProcBuffer.toString('latin1', 0, readSync(fd, threadProcBuffer, 0, threadProcBuffer.length, 0));
  } catch {
    return undefined;
  }
}

/**
 * How long this thread has waited for a CPU while runnable, in ms: the second field of
 * /proc/thread-self/schedstat (the scheduler's run_delay), or undefined where it cannot be read.
 */
export function threadRunQueueWaitMs(): number | undefined {
  const text = readThreadProcFile('schedstat');
  if (text === undefined) return undefined;
  const first = text.indexOf(' ');
  const second = text.indexOf(' ', first + 1);
  const runDelayNs = Number(text.slice(first + 1, second));
  return first > 0 && second > first && Number.isFinite(runDelayNs) ? runDelayNs / 1e6 : undefined;
}

/**
 * How many bytes storage devices have read for this thread (its page-cache misses and their
 * read-ahead): read_bytes of /proc/thread-self/io, or undefined where it cannot be read.
 */
export function threadDeviceReadBytes(): number | undefined {
  const text = readThreadProcFile('io');
  if (text === undefined) return undefined;
  const match = /^read_bytes: (\d+)$/m.exec(text);
  return match ? Number(match[1]) : undefined;
}

/** The policy for a file's synchronous reads: run-queue wait and device reads excuse slow reads. */
function syncReadPolicy(): SyncIoPolicy {
  return new SyncIoPolicy(() => performance.now(), threadRunQueueWaitMs, threadDeviceReadBytes);
}

class NodeDiskFile implements DiskFile {
  readonly path: string;
  readonly sizeBytes: number;
  readonly #handle: fs.FileHandle;
  readonly #syncReads: SyncIo;
  /**
   * Synchronous writes follow the same policy as reads, on their own record: a write into the page
   * cache is a copy; one the kernel holds up (dirty-page throttling, a file system allocating) is
   * a stall, and enough of them send writes to the thread pool for a while.
   */
  readonly #syncWrites: SyncIo;

  /** A regular file (holes can be punched), not a block device. */
  readonly #regularFile: boolean;

  constructor(path: string, handle: fs.FileHandle, sizeBytes: number, regularFile: boolean, syncReads: SyncIo, syncWrites: SyncIo) {
    this.path = path;
    this.#handle = handle;
    this.sizeBytes = sizeBytes;
    this.#regularFile = regularFile;
    this.#syncReads = syncReads;
    this.#syncWrites = syncWrites;
  }

  async read(target: Buffer, offsetBytes: number): Promise<number> {
    const now = this.readNow(target, offsetBytes);
    if (now !== undefined) return now;
    let done = 0;
    while (done < target.length) {
      const { bytesRead } = await this.#handle.read(target, done, target.length - done, offsetBytes + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }

  readNow(target: Buffer, offsetBytes: number): number | undefined {
    if (target.length > SYNC_READ_BYTES_MAX || !this.#syncReads.useSync()) return undefined;
    // Data in the page cache comes back in a few µs: cheaper than a thread-pool round trip.
    let done = 0;
    while (done < target.length) {
      const startedMs = performance.now();
      const bytesRead = readSync(this.#handle.fd, target, done, target.length - done, offsetBytes + done);
      this.#syncReads.record(performance.now() - startedMs);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }

  async writev(buffers: readonly Buffer[], offsetBytes: number): Promise<void> {
    let position = offsetBytes;
    let pending = buffers.filter((b) => b.length > 0);
    while (pending.length > 0) {
      const { bytesWritten } = await this.#handle.writev(pending, position);
      position += bytesWritten;
      pending = skipBytes(pending, bytesWritten);
    }
  }

  writevNow(buffers: readonly Buffer[], offsetBytes: number): boolean {
    let total = 0;
    for (const buffer of buffers) total += buffer.length;
    if (total > SYNC_WRITE_BYTES_MAX || !this.#syncWrites.useSync()) return false;
    let position = offsetBytes;
    let pending: readonly Buffer[] = buffers;
    while (total > 0) {
      const startedMs = performance.now();
      const written = writevSync(this.#handle.fd, pending as Buffer[], position);
      this.#syncWrites.record(Math.max(0, performance.now() - startedMs - written / SYNC_WRITE_BYTES_PER_MS));
      if (written <= 0) throw new Error(`${this.path}: a write of ${total} bytes at ${position} wrote nothing`);
      position += written;
      total -= written;
      if (total > 0) pending = skipBytes(pending, written);
    }
    return true;
  }

  /**
   * util-linux `fallocate --punch-hole` once per range (Node.js has no binding for fallocate),
   * all ranges in one `sh` so the caller pays one process start, however many ranges.
   */
  punchHoles(ranges: readonly ByteRange[]): Promise<void> {
    if (!this.#regularFile) return Promise.reject(new ShaleError('NOT_SUPPORTED', `${this.path}: holes are punched only in regular files`));
    if (ranges.length === 0) return Promise.resolve();
    const script = 'f=$1; shift; while [ $# -gt 0 ]; do fallocate --punch-hole --offset "$1" --length "$2" "$f" || exit 1; shift 2; done';
    const args = ['-c', script, 'sh', this.path, ...ranges.flatMap((range) => [String(range.offsetBytes), String(range.lengthBytes)])];
    return new Promise((resolve, reject) => {
      execFile('sh', args, (error, _stdout, stderr) => {
        if (error) reject(new ShaleError('NOT_SUPPORTED', `${this.path}: punching holes failed: ${stderr.trim() || error.message}`));
        else resolve();
      });
    });
  }

  async sync(): Promise<void> {
    await this.#handle.datasync();
  }

  async close(): Promise<void> {
    await this.#handle.close();
  }
}

/** What is left of `buffers` after their first `bytes` bytes (empty buffers dropped). */
function skipBytes(buffers: readonly Buffer[], bytes: number): Buffer[] {
  let skip = bytes;
  const rest: Buffer[] = [];
  for (const buffer of buffers) {
    if (skip >= buffer.length) {
      skip -= buffer.length;
    } else {
      rest.push(skip > 0 ? buffer.subarray(skip) : buffer);
      skip = 0;
    }
  }
  return rest;
}

async function blockDeviceSize(handle: fs.FileHandle): Promise<number> {
  // A block device reports size 0 from stat; seeking is not exposed, so read its size from sysfs-free means:
  // read the last byte by binary search over readable offsets.
  let low = 0;
  let high = 2 ** 50;
  const probe = Buffer.alloc(1);
  while (low < high) {
    const middle = Math.floor((low + high + 1) / 2);
    const { bytesRead } = await handle.read(probe, 0, 1, middle - 1);
    if (bytesRead === 1) low = middle;
    else high = middle - 1;
  }
  return low;
}

/**
 * Allocates a file's blocks with util-linux `fallocate` (posix_fallocate has no binding in
 * Node.js): mode 0 keeps what is written and turns holes into allocated, unwritten extents,
 * instantly on ext4 and xfs. Where it fails (a file system without fallocate, no util-linux), the
 * file stays sparse; nothing else changes.
 */
function preallocate(path: string, sizeBytes: number): Promise<boolean> {
  return new Promise((resolve) => {
    execFile('fallocate', ['--length', String(sizeBytes), path], (error) => resolve(!error));
  });
}

/**
 * The real disk. Each file opened gets its own sync-read policy from syncReads (by default the
 * adaptive SyncIoPolicy); a test that must see the synchronous path serve, whatever the
 * machine's load, passes one that always reads synchronously.
 */
export function nodeDiskWith(syncReads: () => SyncIo): Disk {
  return { ...nodeDisk, open: (path, options) => openDiskFile(path, options, syncReads(), new SyncIoPolicy()) };
}

async function openDiskFile(path: string, options: OpenOptions = {}, syncReads: SyncIo, syncWrites: SyncIo): Promise<DiskFile> {
  const flags = options.readOnly
    ? fsConstants.O_RDONLY
    : fsConstants.O_RDWR | (options.create ? fsConstants.O_CREAT : 0);
  let handle: fs.FileHandle;
  try {
    handle = await fs.open(path, flags, 0o600);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new ShaleError('NOT_FOUND', `${path}: no such file`);
    throw error;
  }
  const stat = await handle.stat();
  let sizeBytes = stat.isBlockDevice() ? await blockDeviceSize(handle) : stat.size;
  if (stat.isFile() && options.sizeBytes !== undefined && sizeBytes < options.sizeBytes && !options.readOnly) {
    await handle.truncate(options.sizeBytes);
    sizeBytes = options.sizeBytes;
    if (options.preallocate) await preallocate(path, options.sizeBytes);
  }
  return new NodeDiskFile(path, handle, sizeBytes, stat.isFile(), syncReads, syncWrites);
}

export const nodeDisk: Disk = {
  open(path: string, options: OpenOptions = {}): Promise<DiskFile> {
    return openDiskFile(path, options, syncReadPolicy(), new SyncIoPolicy());
  },

  async readFile(path: string): Promise<Buffer | undefined> {
    try {
      return await fs.readFile(path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw error;
    }
  },

  async writeFileAtomic(path: string, data: Buffer | string, mode = 0o644): Promise<void> {
    const temporary = `${path}.tmp-${process.pid}`;
    const handle = await fs.open(temporary, 'w', mode);
    try {
      await handle.writeFile(data);
      await handle.chmod(mode);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fs.rename(temporary, path);
    const directory = await fs.open(dirname(path), 'r');
    try {
      await directory.sync();
    } finally {
      await directory.close();
    }
  },

  async exists(path: string): Promise<boolean> {
    try {
      await fs.stat(path);
      return true;
    } catch {
      return false;
    }
  },

  async mkdir(path: string): Promise<void> {
    await fs.mkdir(path, { recursive: true });
  },

  async remove(path: string): Promise<void> {
    await fs.rm(path, { force: true, recursive: true });
  },
};

/**
 * Writes the buffers to a stream as one vectored write (corked); `onWritten` rides on the last
 * buffer, whose callback comes after every earlier one's (or on an error or destroy). No stream
 * (closed): nothing is written and `onWritten` runs at once, as nothing holds the buffers.
 */
export function writeToStream(stream: Writable | undefined, data: Buffer | readonly Buffer[], onWritten?: () => void): boolean {
  const done = onWritten === undefined ? undefined : (): void => onWritten();
  if (stream === undefined) {
    done?.();
    return false;
  }
  if (Buffer.isBuffer(data)) return stream.write(data, done);
  if (data.length === 0) {
    done?.();
    return true;
  }
  if (data.length === 1) return stream.write(data[0]!, done);
  stream.cork();
  let ok = true;
  for (let i = 0; i < data.length; i++) ok = stream.write(data[i]!, i === data.length - 1 ? done : undefined);
  stream.uncork();
  return ok;
}

class NodeConnection implements Connection {
  readonly remoteAddress: string;
  readonly #socket: net.Socket;
  #closed = false;

  constructor(socket: net.Socket) {
    this.#socket = socket;
    this.remoteAddress = socket.remoteAddress ? formatAddress(socket.remoteAddress, socket.remotePort ?? 0) : 'unix';
    socket.setNoDelay(true);
    socket.on('close', () => {
      this.#closed = true;
    });
    // Errors are reported through onClose; without a listener an 'error' event would crash the process.
    socket.on('error', () => {});
  }

  get closed(): boolean {
    return this.#closed || this.#socket.destroyed;
  }

  write(data: Buffer | readonly Buffer[], onWritten?: () => void): boolean {
    return writeToStream(this.closed ? undefined : this.#socket, data, onWritten);
  }

  onData(listener: (chunk: Buffer) => void): void {
    this.#socket.on('data', listener);
  }

  readInto(target: () => Buffer, received: (bytes: number) => void): boolean {
    const socket = this.#socket as net.Socket & Record<symbol, unknown> & { _handle?: { useUserBuffer?: (buffer: Uint8Array) => void } };
    const keys = userBufferKeys();
    const handle = socket._handle;
    // Bytes the stream has buffered would come after reads that bypass it: only on a quiet stream.
    if (keys === undefined || typeof handle?.useUserBuffer !== 'function' || socket.readableLength > 0 || this.closed) return false;
    const first = target();
    socket[keys.buffer] = first;
    socket[keys.next] = target;
    socket[keys.callback] = (bytes: number): void => received(bytes);
    handle.useUserBuffer(first);
    return true;
  }

  onDrain(listener: () => void): void {
    this.#socket.on('drain', listener);
  }

  onClose(listener: (error?: Error) => void): void {
    let lastError: Error | undefined;
    this.#socket.on('error', (error) => {
      lastError = error;
    });
    this.#socket.on('close', () => listener(lastError));
  }

  pause(): void {
    this.#socket.pause();
  }

  resume(): void {
    this.#socket.resume();
  }

  end(): void {
    this.#socket.end();
  }

  destroy(error?: Error): void {
    this.#socket.destroy(error);
  }

  /** The underlying socket, for protocols that upgrade the stream (NBD STARTTLS). Node environment only. */
  get socket(): net.Socket {
    return this.#socket;
  }
}

/**
 * The properties through which a net.Socket reads into the caller's buffers. Node.js offers this
 * (the `onread` option) only to sockets it connects, not to the ones a server accepts; an accepted
 * socket gets the same by the same properties, found by their names on a socket made with
 * `onread`, and its handle's `useUserBuffer`. Undefined if this Node.js does not have them (then
 * connections read as usual; src/env/node/node-env.test.ts checks that the pinned Node.js has them).
 */
let userBufferKeysFound: { buffer: symbol; next: symbol; callback: symbol } | null | undefined;

function userBufferKeys(): { buffer: symbol; next: symbol; callback: symbol } | undefined {
  if (userBufferKeysFound === undefined) {
    const next = (): Buffer => Buffer.alloc(1);
    const callback = (): boolean => true;
    const probe = new net.Socket({ onread: { buffer: next, callback } }) as net.Socket & Record<symbol, unknown>;
    const symbols = Object.getOwnPropertySymbols(probe);
    const named = (name: string): symbol | undefined => symbols.find((symbol) => symbol.description === name);
    const buffer = named('kBuffer');
    const generator = named('kBufferGen');
    const reader = named('kBufferCb');
    const found = buffer !== undefined && generator !== undefined && reader !== undefined && probe[buffer] === true && probe[generator] === next && probe[reader] === callback;
    userBufferKeysFound = found ? { buffer, next: generator, callback: reader } : null;
    probe.destroy();
  }
  return userBufferKeysFound ?? undefined;
}

export function wrapSocket(socket: net.Socket): Connection {
  return new NodeConnection(socket);
}

function listenOptions(address: string): net.ListenOptions {
  const parsed = parseAddress(address);
  return parsed.kind === 'unix' ? { path: parsed.path } : { host: parsed.host, port: parsed.port };
}

function boundAddress(server: net.Server, requested: string): string {
  const parsed = parseAddress(requested);
  if (parsed.kind === 'unix') return requested;
  const bound = server.address();
  if (bound && typeof bound === 'object') return formatAddress(parsed.host, bound.port);
  return requested;
}

/**
 * Makes room for a unix socket at `path`: a socket left by a process that died is removed; one a
 * live server answers on is IN_USE, as a TCP port would be; anything else at the path (a file, a
 * directory) is left alone and refused.
 */
async function clearUnixSocketPath(path: string, address: string): Promise<void> {
  let stat: Stats;
  try {
    stat = await fs.lstat(path);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw new ShaleError('UNAVAILABLE', `cannot listen on ${address}: ${(error as Error).message}`);
  }
  if (!stat.isSocket()) throw new ShaleError('INVALID_ARGUMENT', `cannot listen on ${address}: ${path} exists and is not a socket`);
  const answered = await new Promise<boolean>((resolve) => {
    const probe = net.createConnection({ path });
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (answered) throw new ShaleError('IN_USE', `cannot listen on ${address}: the address is already in use`);
  await fs.rm(path, { force: true });
}

async function startListening(server: net.Server, address: string): Promise<Listener> {
  const parsed = parseAddress(address);
  if (parsed.kind === 'unix') await clearUnixSocketPath(parsed.path, address);
  await new Promise<void>((resolve, reject) => {
    const refused = (error: NodeJS.ErrnoException): void => {
      reject(error.code === 'EADDRINUSE'
        ? new ShaleError('IN_USE', `cannot listen on ${address}: the address is already in use`)
        : new ShaleError('UNAVAILABLE', `cannot listen on ${address}: ${error.message}`));
    };
    server.once('error', refused);
    server.listen(listenOptions(address), () => {
      server.off('error', refused);
      resolve();
    });
  });
  const bound = boundAddress(server, address);
  const sockets = new Set<net.Socket>();
  server.on('connection', (socket: net.Socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  return {
    address: bound,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const socket of sockets) socket.destroy();
        if ('closeAllConnections' in server) (server as http.Server).closeAllConnections();
      }),
  };
}

export const nodeNet: Net = {
  async listen(address: string, onConnection: (connection: Connection) => void): Promise<Listener> {
    const server = net.createServer({ noDelay: true }, (socket) => onConnection(new NodeConnection(socket)));
    return startListening(server, address);
  },

  connect(address: string, timeoutMs = 5000): Promise<Connection> {
    const parsed = parseAddress(address);
    return new Promise((resolve, reject) => {
      const socket = parsed.kind === 'unix'
        ? net.createConnection({ path: parsed.path })
        : net.createConnection({ host: parsed.host, port: parsed.port, noDelay: true });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new ShaleError('UNAVAILABLE', `connect to ${address} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      socket.once('error', (error) => {
        clearTimeout(timer);
        reject(new ShaleError('UNAVAILABLE', `connect to ${address}: ${error.message}`));
      });
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new NodeConnection(socket));
      });
    });
  },

  async serveHttp(address: string, handler: HttpHandler, options: { expectContinue?: boolean } = {}): Promise<Listener> {
    const server = http.createServer({ keepAliveTimeout: 65_000, requestTimeout: 0 }, handler);
    if (options.expectContinue) server.on('checkContinue', handler);
    return startListening(server, address);
  },

  httpRequest(method, url, options = {}): Promise<HttpResult> {
    const timeoutMs = options.timeoutMs ?? 30_000;
    return new Promise((resolve, reject) => {
      const target = new URL(url);
      const body = options.body === undefined ? undefined : Buffer.from(options.body);
      const headers: Record<string, string | number> = { ...options.headers };
      if (body) headers['content-length'] = body.length;
      const request = http.request(
        { method, host: target.hostname.replace(/^\[|\]$/g, ''), port: target.port || 80, path: target.pathname + target.search, headers, agent: keepAliveAgent },
        (response) => {
          const chunks: Buffer[] = [];
          response.on('data', (chunk: Buffer) => chunks.push(chunk));
          response.on('end', () => {
            clearTimeout(timer);
            const flat: Record<string, string> = {};
            for (const [name, value] of Object.entries(response.headers)) {
              if (value !== undefined) flat[name] = Array.isArray(value) ? value.join(', ') : value;
            }
            resolve({ status: response.statusCode ?? 0, headers: flat, body: Buffer.concat(chunks) });
          });
          response.on('error', (error) => {
            clearTimeout(timer);
            reject(new ShaleError('UNAVAILABLE', `${method} ${url}: ${error.message}`));
          });
        },
      );
      const timer = setTimeout(() => {
        request.destroy(new Error(`timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      request.on('error', (error) => {
        clearTimeout(timer);
        reject(new ShaleError('UNAVAILABLE', `${method} ${url}: ${error.message}`));
      });
      request.end(body);
    });
  },
};

const keepAliveAgent = new http.Agent({ keepAlive: true, maxSockets: 64 });

function wrapTimer(handle: NodeJS.Timeout, cancel: (handle: NodeJS.Timeout) => void): Timer {
  const timer: Timer = {
    cancel: () => cancel(handle),
    unref: () => {
      handle.unref();
      return timer;
    },
  };
  return timer;
}

/**
 * Busy polling with setImmediate: while an immediate is pending, libuv polls for I/O with a zero
 * timeout instead of sleeping in epoll_wait, so the next request is picked up by a thread that
 * is already running. One chain of immediates serves every caller; it ends at the deadline.
 */
let pollUntilMs = 0;
let polling = false;
const pollStep = (): void => {
  if (performance.now() < pollUntilMs) setImmediate(pollStep);
  else polling = false;
};

export const nodeClock: Clock = {
  nowMs: () => performance.now(),
  wallMs: () => Date.now(),
  after: (delayMs, callback) => wrapTimer(setTimeout(callback, delayMs), clearTimeout),
  every: (intervalMs, callback) => wrapTimer(setInterval(callback, intervalMs), clearInterval),
  sleep: (delayMs) => new Promise((resolve) => setTimeout(resolve, delayMs)),
  soon: (callback) => {
    setImmediate(callback);
  },
  afterIo: (callback) => {
    setImmediate(callback);
  },
  pollFor: (durationMs) => {
    if (durationMs <= 0) return;
    const until = performance.now() + durationMs;
    if (until > pollUntilMs) pollUntilMs = until;
    if (!polling) {
      polling = true;
      setImmediate(pollStep);
    }
  },
};

export const nodeRandom: Random = {
  uint32: () => randomBytes(4).readUInt32LE(0),
  float: () => Math.random(),
  bytes: (count) => randomBytes(count),
  uuid: () => randomUUID(),
};

export const nodeEnv: Env = { disk: nodeDisk, net: nodeNet, clock: nodeClock, random: nodeRandom };
