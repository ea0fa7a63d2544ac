/**
 * A simulated `Disk`, in memory and deterministic from a seed (DESIGN §8). It behaves like a disk
 * with a volatile write cache:
 *
 * - `writev` lands in the file at once (reads see it) but stays *unsynced* until a `sync` of that
 *   file covers it. `sync` makes durable every write that had completed when it was called (and,
 *   to keep the order of overlapping writes, every write issued before one of those).
 * - `crash()` is a power loss: each file keeps its durable bytes plus a random subset of its
 *   unsynced writes — each survives whole, is dropped, or is *torn* (only some of its 512-byte
 *   sectors land) — applied in the order they were issued. Every handle opened before the crash
 *   is dead afterwards: its operations reject and change nothing.
 * - `corrupt(path, offset)` flips a bit, durably (bit rot).
 * - Operations complete after a random number of microtask turns, so concurrent requests finish
 *   in a seeded, varying order.
 *
 * Files are sparse (4 KiB pages held only once written), so a simulated multi-GiB disk costs
 * only what is written; `stats` counts reads and writes with their bytes. `punchHoles` zeros
 * ranges when it completes and, like a write, durably only once a sync covers it.
 *
 * Simplifications: extending a file (open with `sizeBytes`) and the whole-file helpers
 * (`writeFileAtomic`, `remove`, …) are durable at once; there is no directory tree.
 */
import { ShaleError } from '../../lib/errors.ts';
import type { ByteRange, Disk, DiskFile, OpenOptions } from '../env.ts';
import { SimRandom } from './sim-random.ts';

export const SECTOR_SIZE_BYTES = 512;

export interface SimDiskOptions {
  seed: number;
  /** Probability that an unsynced write survives a crash (whole or torn). Default 0.5. */
  survivalProbability?: number;
  /** Probability that a surviving write is torn (only some sectors land). Default 0.3. */
  tearProbability?: number;
  /** Operations complete after 0..completionTurnsMax microtask turns. Default 3. */
  completionTurnsMax?: number;
}

export interface CrashReport {
  /** Unsynced writes kept whole, dropped, and torn, over all files. */
  kept: number;
  dropped: number;
  torn: number;
}

/** Called after a write has landed (unsynced) or a sync has made data durable, before either resolves. */
export type SimDiskHook = (event: { kind: 'write' | 'sync'; path: string; offsetBytes: number; lengthBytes: number }) => void;

interface PendingWrite {
  offsetBytes: number;
  data: Buffer;
  completed: boolean;
  /** A punched hole of this many bytes (data is empty): zeros, whole or not at all after a crash. */
  holeBytes?: number;
}

/** Bytes per page of the sparse store: pages never written read as zeros and cost nothing. */
const PAGE_BYTES = 4096;

/** A sparse byte store: a map of pages. */
class Pages {
  readonly map = new Map<number, Buffer>();

  read(target: Buffer, offsetBytes: number, length: number): void {
    let done = 0;
    while (done < length) {
      const at = offsetBytes + done;
      const page = Math.floor(at / PAGE_BYTES);
      const within = at - page * PAGE_BYTES;
      const take = Math.min(PAGE_BYTES - within, length - done);
      const stored = this.map.get(page);
      if (stored) stored.copy(target, done, within, within + take);
      else target.fill(0, done, done + take);
      done += take;
    }
  }

  write(data: Buffer, offsetBytes: number): void {
    let done = 0;
    while (done < data.length) {
      const at = offsetBytes + done;
      const page = Math.floor(at / PAGE_BYTES);
      const within = at - page * PAGE_BYTES;
      const take = Math.min(PAGE_BYTES - within, data.length - done);
      let stored = this.map.get(page);
      if (!stored) {
        stored = Buffer.alloc(PAGE_BYTES);
        this.map.set(page, stored);
      }
      data.copy(stored, within, done, done + take);
      done += take;
    }
  }

  /** Zeros a range; whole pages in it are dropped. */
  zero(offsetBytes: number, lengthBytes: number): void {
    const end = offsetBytes + lengthBytes;
    for (let page = Math.floor(offsetBytes / PAGE_BYTES); page * PAGE_BYTES < end; page++) {
      const stored = this.map.get(page);
      if (!stored) continue;
      const start = page * PAGE_BYTES;
      if (start >= offsetBytes && start + PAGE_BYTES <= end) this.map.delete(page);
      else stored.fill(0, Math.max(0, offsetBytes - start), Math.min(PAGE_BYTES, end - start));
    }
  }

  flip(offsetBytes: number, mask: number): void {
    const page = Math.floor(offsetBytes / PAGE_BYTES);
    let stored = this.map.get(page);
    if (!stored) {
      stored = Buffer.alloc(PAGE_BYTES);
      this.map.set(page, stored);
    }
    stored[offsetBytes - page * PAGE_BYTES]! ^= mask;
  }

  /** Zeros everything from `offsetBytes` on. */
  cut(offsetBytes: number): void {
    for (const [page, stored] of this.map) {
      const start = page * PAGE_BYTES;
      if (start >= offsetBytes) this.map.delete(page);
      else if (start + PAGE_BYTES > offsetBytes) stored.fill(0, offsetBytes - start);
    }
  }

  clone(): Pages {
    const copy = new Pages();
    for (const [page, stored] of this.map) copy.map.set(page, Buffer.from(stored));
    return copy;
  }
}

class SimFileState {
  /** What reads see. */
  current = new Pages();
  /** What survives a crash. */
  durable = new Pages();
  sizeBytes: number;
  durableSizeBytes: number;
  pending: PendingWrite[] = [];
  /** Bumped at every crash; handles from an older incarnation are dead. */
  incarnation = 0;

  constructor(sizeBytes: number) {
    this.sizeBytes = sizeBytes;
    this.durableSizeBytes = sizeBytes;
  }

  grow(sizeBytes: number, durableToo: boolean): void {
    this.sizeBytes = Math.max(this.sizeBytes, sizeBytes);
    if (durableToo) this.durableSizeBytes = Math.max(this.durableSizeBytes, sizeBytes);
  }

  applyDurable(write: PendingWrite, data: Buffer = write.data): void {
    if (write.holeBytes !== undefined) {
      this.durable.zero(write.offsetBytes, write.holeBytes);
      return;
    }
    this.durable.write(data, write.offsetBytes);
    this.durableSizeBytes = Math.max(this.durableSizeBytes, write.offsetBytes + data.length);
  }

  bytes(pages: Pages, sizeBytes: number): Buffer {
    const out = Buffer.alloc(sizeBytes);
    pages.read(out, 0, sizeBytes);
    return out;
  }
}

function crashedError(path: string): Error {
  return new Error(`${path}: simulated crash (this handle is dead)`);
}

class SimDiskFile implements DiskFile {
  readonly path: string;
  readonly sizeBytes: number;
  readonly #disk: SimDisk;
  readonly #state: SimFileState;
  readonly #incarnation: number;
  readonly #readOnly: boolean;
  #closed = false;

  constructor(disk: SimDisk, path: string, state: SimFileState, readOnly: boolean) {
    this.#disk = disk;
    this.path = path;
    this.#state = state;
    this.#incarnation = state.incarnation;
    this.sizeBytes = state.sizeBytes;
    this.#readOnly = readOnly;
  }

  #check(): void {
    if (this.#closed) throw new Error(`${this.path}: file is closed`);
    if (this.#state.incarnation !== this.#incarnation) throw crashedError(this.path);
  }

  async read(target: Buffer, offsetBytes: number): Promise<number> {
    this.#check();
    await this.#disk.completionDelay();
    this.#check();
    const state = this.#state;
    const available = Math.max(0, Math.min(target.length, state.sizeBytes - offsetBytes));
    state.current.read(target, offsetBytes, available);
    this.#disk.stats.reads++;
    this.#disk.stats.readBytes += available;
    return available;
  }

  async writev(buffers: readonly Buffer[], offsetBytes: number): Promise<void> {
    this.#check();
    if (this.#readOnly) throw new Error(`${this.path}: opened read-only`);
    const data = Buffer.concat(buffers as Buffer[]);
    const state = this.#state;
    state.grow(offsetBytes + data.length, false);
    state.current.write(data, offsetBytes);
    const write: PendingWrite = { offsetBytes, data, completed: false };
    state.pending.push(write);
    this.#disk.stats.writes++;
    this.#disk.stats.writtenBytes += data.length;
    this.#disk.onOperation?.({ kind: 'write', path: this.path, offsetBytes, lengthBytes: data.length });
    await this.#disk.completionDelay();
    // A crash while the write was in flight: whether it landed is the crash's decision.
    this.#check();
    write.completed = true;
  }

  /**
   * Zeros each range when the call completes — as late as a real one may, so a write racing it
   * into the same range is lost — and durably like a write (a crash before a sync may undo it).
   */
  async punchHoles(ranges: readonly ByteRange[]): Promise<void> {
    this.#check();
    if (this.#readOnly) throw new Error(`${this.path}: opened read-only`);
    // Slower than a write, as a real one is (Shale's starts a process): more room for races.
    for (let i = 0; i < 4; i++) await this.#disk.completionDelay();
    this.#check();
    const state = this.#state;
    for (const range of ranges) {
      state.current.zero(range.offsetBytes, range.lengthBytes);
      state.pending.push({ offsetBytes: range.offsetBytes, data: Buffer.alloc(0), completed: true, holeBytes: range.lengthBytes });
      this.#disk.stats.holesPunched++;
      this.#disk.stats.punchedBytes += range.lengthBytes;
    }
  }

  async sync(): Promise<void> {
    this.#check();
    const state = this.#state;
    // Covered: every write completed before this call, and every write issued before the last of those.
    let last = -1;
    for (let i = 0; i < state.pending.length; i++) if (state.pending[i]!.completed) last = i;
    const covered = state.pending.slice(0, last + 1);
    this.#disk.stats.syncs++;
    await this.#disk.completionDelay();
    this.#check();
    for (const write of covered) state.applyDurable(write);
    state.pending = state.pending.filter((write) => !covered.includes(write));
    if (state.pending.length === 0) state.durableSizeBytes = Math.max(state.durableSizeBytes, state.sizeBytes);
    this.#disk.onOperation?.({ kind: 'sync', path: this.path, offsetBytes: 0, lengthBytes: 0 });
    this.#check();
  }

  async close(): Promise<void> {
    this.#closed = true;
  }
}

export class SimDisk implements Disk {
  readonly random: SimRandom;
  readonly stats = { writes: 0, writtenBytes: 0, reads: 0, readBytes: 0, syncs: 0, crashes: 0, holesPunched: 0, punchedBytes: 0 };
  /** Test hook: may call `crash()` to lose power at exactly that point. */
  onOperation: SimDiskHook | undefined;
  readonly #files = new Map<string, SimFileState>();
  readonly #directories = new Set<string>();
  readonly #survivalProbability: number;
  readonly #tearProbability: number;
  readonly #completionTurnsMax: number;

  constructor(options: SimDiskOptions) {
    this.random = new SimRandom(options.seed);
    this.#survivalProbability = options.survivalProbability ?? 0.5;
    this.#tearProbability = options.tearProbability ?? 0.3;
    this.#completionTurnsMax = options.completionTurnsMax ?? 3;
  }

  /** Waits a random number of microtask turns: operations finish in a seeded, varying order. */
  async completionDelay(): Promise<void> {
    const turns = this.#completionTurnsMax > 0 ? this.random.below(this.#completionTurnsMax + 1) : 0;
    for (let i = 0; i < turns; i++) await null;
  }

  async open(path: string, options: OpenOptions = {}): Promise<DiskFile> {
    let state = this.#files.get(path);
    if (!state) {
      if (!options.create) throw new ShaleError('NOT_FOUND', `${path}: no such file`);
      state = new SimFileState(0);
      this.#files.set(path, state);
    }
    if (options.sizeBytes !== undefined && state.sizeBytes < options.sizeBytes && !options.readOnly) {
      state.grow(options.sizeBytes, true);
    }
    await this.completionDelay();
    return new SimDiskFile(this, path, state, options.readOnly ?? false);
  }

  async readFile(path: string): Promise<Buffer | undefined> {
    const state = this.#files.get(path);
    return state ? state.bytes(state.current, state.sizeBytes) : undefined;
  }

  async writeFileAtomic(path: string, data: Buffer | string): Promise<void> {
    const bytes = Buffer.from(data);
    const state = new SimFileState(bytes.length);
    state.current.write(bytes, 0);
    state.durable.write(bytes, 0);
    this.#files.set(path, state);
  }

  async exists(path: string): Promise<boolean> {
    return this.#files.has(path) || this.#directories.has(path);
  }

  async mkdir(path: string): Promise<void> {
    this.#directories.add(path);
  }

  async remove(path: string): Promise<void> {
    this.#files.delete(path);
    this.#directories.delete(path);
    for (const name of [...this.#files.keys()]) if (name.startsWith(`${path}/`)) this.#files.delete(name);
  }

  /**
   * Power loss. Every unsynced write of every file is kept whole, dropped or torn at random;
   * afterwards each file holds its durable bytes plus the survivors, all durable now, and every
   * handle opened before is dead.
   */
  crash(): CrashReport {
    const report: CrashReport = { kept: 0, dropped: 0, torn: 0 };
    this.stats.crashes++;
    for (const state of this.#files.values()) {
      for (const write of state.pending) {
        if (!this.random.chance(this.#survivalProbability)) {
          report.dropped++;
          continue;
        }
        const sectors = Math.ceil(write.data.length / SECTOR_SIZE_BYTES);
        if (sectors > 1 && this.random.chance(this.#tearProbability)) {
          report.torn++;
          for (let sector = 0; sector < sectors; sector++) {
            if (!this.random.chance(0.5)) continue;
            const start = sector * SECTOR_SIZE_BYTES;
            const piece = write.data.subarray(start, Math.min(write.data.length, start + SECTOR_SIZE_BYTES));
            state.applyDurable({ offsetBytes: write.offsetBytes + start, data: piece, completed: true });
          }
        } else {
          report.kept++;
          state.applyDurable(write);
        }
      }
      state.pending = [];
      state.incarnation++;
      state.current = state.durable.clone();
      state.sizeBytes = state.durableSizeBytes;
    }
    return report;
  }

  /** Flips one bit (bit 0..7 of the byte at `offsetBytes`, random if not given), durably. */
  corrupt(path: string, offsetBytes: number, bit: number = this.random.below(8)): void {
    const state = this.#mustGet(path);
    if (offsetBytes >= state.sizeBytes) throw new RangeError(`${path}: offset ${offsetBytes} is past the end (${state.sizeBytes})`);
    const mask = 1 << bit;
    state.current.flip(offsetBytes, mask);
    state.durable.flip(offsetBytes, mask);
    for (const write of state.pending) {
      const at = offsetBytes - write.offsetBytes;
      if (at >= 0 && at < write.data.length) write.data[at]! ^= mask;
    }
  }

  /** A copy of the bytes reads would see now. */
  fileBytes(path: string): Buffer {
    const state = this.#mustGet(path);
    return state.bytes(state.current, state.sizeBytes);
  }

  /** Writes bytes durably at once, behind any handle's back (a test planting content). */
  plant(path: string, offsetBytes: number, data: Buffer): void {
    let state = this.#files.get(path);
    if (!state) {
      state = new SimFileState(0);
      this.#files.set(path, state);
    }
    state.grow(offsetBytes + data.length, true);
    state.current.write(data, offsetBytes);
    state.durable.write(data, offsetBytes);
  }

  /** Cuts a file to `sizeBytes`, durably. */
  truncate(path: string, sizeBytes: number): void {
    const state = this.#mustGet(path);
    state.current.cut(sizeBytes);
    state.durable.cut(sizeBytes);
    state.sizeBytes = Math.min(state.sizeBytes, sizeBytes);
    state.durableSizeBytes = Math.min(state.durableSizeBytes, sizeBytes);
    state.pending = state.pending.filter((write) => write.offsetBytes < sizeBytes);
  }

  /** Number of writes of `path` not yet covered by a sync. */
  unsyncedWrites(path: string): number {
    return this.#mustGet(path).pending.length;
  }

  #mustGet(path: string): SimFileState {
    const state = this.#files.get(path);
    if (!state) throw new ShaleError('NOT_FOUND', `${path}: no such file`);
    return state;
  }
}
