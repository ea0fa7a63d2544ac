/**
 * An NbdExport held in memory, and a provider of a fixed set of them: for tests, demos and
 * benchmarks of the NBD path without stores. Counts every operation so tests can check what a
 * client actually sent (FUA, NO_HOLE, FAST_ZERO, flushes). `beforeOperation` lets a test delay or
 * fail operations; nothing here touches timers or I/O.
 *
 * Allocation is tracked per 4 KiB block, the way a sparse file or a Shale volume would: every
 * block is a hole (never written, or trimmed / zeroed whole), data (written), or allocated zeroes
 * (NBD_CMD_WRITE_ZEROES with NO_HOLE). A write makes every block it touches data; trim and
 * write-zeroes without NO_HOLE turn the blocks they cover whole into holes and zero the bytes of
 * partly covered ones, which keep their state. blockStatus reports these states (a hole reads as
 * zeroes: hole + zero; allocated zeroes: zero) and readSparse leaves out every block that reads as
 * zeroes, so `nbdinfo --map`, `qemu-img map` and hole chunks show them. A test that puts bytes in
 * `data` directly must say so with `load`, or they stay holes to blockStatus and readSparse.
 */
import { assert } from '../lib/assert.ts';
import { ShaleError } from '../lib/errors.ts';
import type { ExportProvider, NbdExport, NbdExportBlockSizes, NbdExtentStatus, NbdReadPiece } from './server.ts';

/** Granularity of allocation tracking. */
export const MEMORY_EXPORT_BLOCK_BYTES = 4096;
/** Size of the slabs small read copies are cut from. */
const MEMORY_EXPORT_SLAB_BYTES = 1024 * 1024;
/** Most extents one blockStatus call returns (the client asks again for the rest). */
export const MEMORY_EXPORT_EXTENTS_MAX = 1024;

const BlockState = { HOLE: 0, DATA: 1, ZERO: 2 } as const;

export interface MemoryExportOptions {
  readonly name: string;
  readonly sizeBytes: number;
  readonly readOnly?: boolean;
  readonly description?: string;
  readonly blockSizes?: NbdExportBlockSizes;
  /** Whether write-zeroes with FAST_ZERO succeeds (default true) or is refused with NOT_SUPPORTED. */
  readonly fastZeroes?: boolean;
  /** Awaited before each operation; a throw fails the operation with what it threw. */
  readonly beforeOperation?: (operation: MemoryOperation, offsetBytes: number, lengthBytes: number) => Promise<void> | void;
}

export type MemoryOperation = 'read' | 'write' | 'flush' | 'trim' | 'writeZeroes' | 'blockStatus';

export interface MemoryExportCounters {
  reads: number;
  /** Reads through readSparse (also counted in reads). */
  sparseReads: number;
  writes: number;
  fuaWrites: number;
  flushes: number;
  trims: number;
  fuaTrims: number;
  writeZeroes: number;
  noHoleWriteZeroes: number;
  /** Write-zeroes with FAST_ZERO, whether done or refused. */
  fastWriteZeroes: number;
  blockStatuses: number;
  releases: number;
  /** Operations running right now, and the most ever running at once. */
  running: number;
  runningMax: number;
}

export class MemoryExport implements NbdExport {
  readonly name: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly description: string | undefined;
  readonly blockSizes: NbdExportBlockSizes | undefined;
  readonly data: Buffer;
  readonly counters: MemoryExportCounters = {
    reads: 0, sparseReads: 0, writes: 0, fuaWrites: 0, flushes: 0, trims: 0, fuaTrims: 0, writeZeroes: 0, noHoleWriteZeroes: 0,
    fastWriteZeroes: 0, blockStatuses: 0, releases: 0, running: 0, runningMax: 0,
  };
  /** One BlockState per 4 KiB block (the last one may be partial). */
  readonly #states: Uint8Array;
  readonly #fastZeroes: boolean;
  #slab = Buffer.allocUnsafe(0);
  #slabUsed = 0;
  readonly #beforeOperation: MemoryExportOptions['beforeOperation'];

  constructor(options: MemoryExportOptions) {
    assert(Number.isSafeInteger(options.sizeBytes) && options.sizeBytes >= 0, 'export size is a whole number of bytes');
    this.name = options.name;
    this.sizeBytes = options.sizeBytes;
    this.readOnly = options.readOnly ?? false;
    this.description = options.description;
    this.blockSizes = options.blockSizes;
    this.data = Buffer.alloc(options.sizeBytes);
    this.#states = new Uint8Array(Math.ceil(options.sizeBytes / MEMORY_EXPORT_BLOCK_BYTES));
    this.#fastZeroes = options.fastZeroes ?? true;
    this.#beforeOperation = options.beforeOperation;
  }

  /** Puts `bytes` at `offsetBytes` as a write would (for tests that prepare contents). */
  load(offsetBytes: number, bytes: Buffer): void {
    assert(offsetBytes >= 0 && offsetBytes + bytes.length <= this.sizeBytes, 'load within the export');
    bytes.copy(this.data, offsetBytes);
    this.#mark(offsetBytes, bytes.length, BlockState.DATA, false);
  }

  read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    return this.#run('read', offsetBytes, lengthBytes, () => {
      this.counters.reads++;
      return this.#copyOut(offsetBytes, lengthBytes);
    });
  }

  readSparse(offsetBytes: number, lengthBytes: number): Promise<NbdReadPiece[]> {
    return this.#run('read', offsetBytes, lengthBytes, () => {
      this.counters.reads++;
      this.counters.sparseReads++;
      // Runs of data and of zeroes (holes and allocated zeroes alike read as zeroes), merged.
      const runs: { offsetBytes: number; lengthBytes: number; isData: boolean }[] = [];
      this.#walk(offsetBytes, lengthBytes, Number.POSITIVE_INFINITY, (start, length, state) => {
        const isData = state === BlockState.DATA;
        const last = runs.at(-1);
        if (last !== undefined && last.isData === isData) last.lengthBytes += length;
        else runs.push({ offsetBytes: start, lengthBytes: length, isData });
      });
      return runs.map((run): NbdReadPiece => (run.isData
        ? { offsetBytes: run.offsetBytes, lengthBytes: run.lengthBytes, data: this.#copyOut(run.offsetBytes, run.lengthBytes) }
        : { offsetBytes: run.offsetBytes, lengthBytes: run.lengthBytes }));
    });
  }

  write(offsetBytes: number, data: Buffer, fua: boolean): Promise<void> {
    return this.#run('write', offsetBytes, data.length, () => {
      this.#checkWritable();
      this.counters.writes++;
      if (fua) this.counters.fuaWrites++;
      data.copy(this.data, offsetBytes);
      this.#mark(offsetBytes, data.length, BlockState.DATA, false);
    });
  }

  flush(): Promise<void> {
    return this.#run('flush', 0, 0, () => {
      this.counters.flushes++;
    });
  }

  trim(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void> {
    return this.#run('trim', offsetBytes, lengthBytes, () => {
      this.#checkWritable();
      this.counters.trims++;
      if (fua) this.counters.fuaTrims++;
      // Trimmed data reads back as zeroes here; NBD allows anything.
      this.data.fill(0, offsetBytes, offsetBytes + lengthBytes);
      this.#mark(offsetBytes, lengthBytes, BlockState.HOLE, true);
    });
  }

  writeZeroes(offsetBytes: number, lengthBytes: number, options: { fua: boolean; noHole: boolean; fast?: boolean }): Promise<void> {
    return this.#run('writeZeroes', offsetBytes, lengthBytes, () => {
      this.#checkWritable();
      if (options.fast === true) {
        this.counters.fastWriteZeroes++;
        if (!this.#fastZeroes) throw new ShaleError('NOT_SUPPORTED', `export "${this.name}" cannot zero fast`);
      }
      this.counters.writeZeroes++;
      if (options.noHole) this.counters.noHoleWriteZeroes++;
      this.data.fill(0, offsetBytes, offsetBytes + lengthBytes);
      if (options.noHole) {
        // Blocks covered whole become allocated zeroes; a partly covered hole too (it is all zeroes);
        // a partly covered data block stays data.
        this.#mark(offsetBytes, lengthBytes, BlockState.ZERO, true);
        for (const edge of [offsetBytes, offsetBytes + lengthBytes - 1]) {
          const block = Math.floor(edge / MEMORY_EXPORT_BLOCK_BYTES);
          if (lengthBytes > 0 && this.#states[block] === BlockState.HOLE) this.#states[block] = BlockState.ZERO;
        }
      } else {
        this.#mark(offsetBytes, lengthBytes, BlockState.HOLE, true);
      }
    });
  }

  blockStatus(offsetBytes: number, lengthBytes: number): Promise<NbdExtentStatus[]> {
    return this.#run('blockStatus', offsetBytes, lengthBytes, () => {
      this.counters.blockStatuses++;
      const extents: NbdExtentStatus[] = [];
      this.#walk(offsetBytes, lengthBytes, MEMORY_EXPORT_EXTENTS_MAX, (_start, length, state) => {
        extents.push({ lengthBytes: length, hole: state === BlockState.HOLE, zero: state !== BlockState.DATA });
      });
      return extents;
    });
  }

  release(): Promise<void> {
    this.counters.releases++;
    return Promise.resolve();
  }

  /**
   * A copy of the bytes, which later writes do not change (the server sends it after the read
   * resolved). Small copies are cut from a shared slab, as Node's Buffer pool does, so that a read
   * does not allocate an ArrayBuffer of its own; the slab is freed once no copy refers to it.
   */
  #copyOut(offsetBytes: number, lengthBytes: number): Buffer {
    if (lengthBytes > MEMORY_EXPORT_SLAB_BYTES / 8) return Buffer.from(this.data.subarray(offsetBytes, offsetBytes + lengthBytes));
    if (this.#slab.length - this.#slabUsed < lengthBytes) {
      this.#slab = Buffer.allocUnsafe(MEMORY_EXPORT_SLAB_BYTES);
      this.#slabUsed = 0;
    }
    const copy = this.#slab.subarray(this.#slabUsed, this.#slabUsed + lengthBytes);
    this.data.copy(copy, 0, offsetBytes, offsetBytes + lengthBytes);
    // Keep copies 8-byte aligned, as allocators do.
    this.#slabUsed += (lengthBytes + 7) & ~7;
    return copy;
  }

  /**
   * Visits runs of equal state over [offsetBytes, offsetBytes + lengthBytes), at most `runsMax`
   * of them, each clipped to the range.
   */
  #walk(offsetBytes: number, lengthBytes: number, runsMax: number, visit: (startBytes: number, lengthBytes: number, state: number) => void): void {
    const end = offsetBytes + lengthBytes;
    let position = offsetBytes;
    let runs = 0;
    while (position < end && runs < runsMax) {
      let block = Math.floor(position / MEMORY_EXPORT_BLOCK_BYTES);
      const state = this.#states[block]!;
      while (block < this.#states.length && this.#states[block] === state && block * MEMORY_EXPORT_BLOCK_BYTES < end) block++;
      const runEnd = Math.min(end, block * MEMORY_EXPORT_BLOCK_BYTES);
      visit(position, runEnd - position, state);
      runs++;
      position = runEnd;
    }
  }

  /**
   * Sets the state of the blocks the range touches. With `wholeOnly`, only blocks it covers whole
   * change (the end of the export counts as the end of its last block) and partly covered ones keep
   * their state (the caller has zeroed their bytes).
   */
  #mark(offsetBytes: number, lengthBytes: number, state: number, wholeOnly: boolean): void {
    if (lengthBytes === 0) return;
    const end = offsetBytes + lengthBytes;
    let first = Math.floor(offsetBytes / MEMORY_EXPORT_BLOCK_BYTES);
    let last = Math.floor((end - 1) / MEMORY_EXPORT_BLOCK_BYTES);
    if (wholeOnly) {
      if (offsetBytes % MEMORY_EXPORT_BLOCK_BYTES !== 0) first++;
      if (end % MEMORY_EXPORT_BLOCK_BYTES !== 0 && end !== this.sizeBytes) last--;
    }
    if (first === last) this.#states[first] = state;
    else if (first < last) this.#states.fill(state, first, last + 1);
  }

  #run<T>(operation: MemoryOperation, offsetBytes: number, lengthBytes: number, body: () => T): Promise<T> {
    if (offsetBytes < 0 || lengthBytes < 0 || offsetBytes + lengthBytes > this.sizeBytes) {
      return Promise.reject(new ShaleError('OUT_OF_RANGE', `${operation} of ${lengthBytes} bytes at ${offsetBytes} is outside export "${this.name}" of ${this.sizeBytes} bytes`));
    }
    const counters = this.counters;
    counters.running++;
    if (counters.running > counters.runningMax) counters.runningMax = counters.running;
    const before = this.#beforeOperation;
    const finish = (): T => {
      try {
        return body();
      } finally {
        counters.running--;
      }
    };
    // The body runs in a later microtask, as it would behind real I/O: operations dispatched in one
    // batch are all running at once (runningMax counts them).
    if (before === undefined) return Promise.resolve().then(finish);
    return Promise.resolve()
      .then(() => before(operation, offsetBytes, lengthBytes))
      .then(finish, (error: unknown) => {
        counters.running--;
        throw error;
      });
  }

  #checkWritable(): void {
    if (this.readOnly) throw new ShaleError('READ_ONLY', `export "${this.name}" is read-only`);
  }
}

/** Serves a fixed set of MemoryExports by name; the same instance for every open. */
export class MemoryExportProvider implements ExportProvider {
  readonly #exports = new Map<string, MemoryExport>();

  constructor(exports: readonly MemoryExport[]) {
    for (const memoryExport of exports) {
      assert(!this.#exports.has(memoryExport.name), 'export names are unique');
      this.#exports.set(memoryExport.name, memoryExport);
    }
  }

  async open(name: string): Promise<MemoryExport> {
    const found = this.#exports.get(name);
    if (found === undefined) throw new ShaleError('NOT_FOUND', `no export named "${name}"`);
    return found;
  }

  async list(): Promise<{ name: string; description: string }[]> {
    return [...this.#exports.values()].map((memoryExport) => ({ name: memoryExport.name, description: memoryExport.description ?? '' }));
  }
}
