/**
 * An NbdExport held in memory, and a provider of a fixed set of them: for tests, demos and
 * benchmarks of the NBD path without stores. Counts every operation so tests can check what a
 * client actually sent (FUA, NO_HOLE, flushes). `beforeOperation` lets a test delay or fail
 * operations; nothing here touches timers or I/O.
 */
import { assert } from '../lib/assert.ts';
import { ShaleError } from '../lib/errors.ts';
import type { ExportProvider, NbdExport } from './server.ts';

export interface MemoryExportOptions {
  readonly name: string;
  readonly sizeBytes: number;
  readonly readOnly?: boolean;
  readonly description?: string;
  /** Awaited before each operation; a throw fails the operation with what it threw. */
  readonly beforeOperation?: (operation: MemoryOperation, offsetBytes: number, lengthBytes: number) => Promise<void> | void;
}

export type MemoryOperation = 'read' | 'write' | 'flush' | 'trim' | 'writeZeroes';

export interface MemoryExportCounters {
  reads: number;
  writes: number;
  fuaWrites: number;
  flushes: number;
  trims: number;
  fuaTrims: number;
  writeZeroes: number;
  noHoleWriteZeroes: number;
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
  readonly data: Buffer;
  readonly counters: MemoryExportCounters = {
    reads: 0, writes: 0, fuaWrites: 0, flushes: 0, trims: 0, fuaTrims: 0, writeZeroes: 0, noHoleWriteZeroes: 0, releases: 0, running: 0, runningMax: 0,
  };
  readonly #beforeOperation: MemoryExportOptions['beforeOperation'];

  constructor(options: MemoryExportOptions) {
    assert(Number.isSafeInteger(options.sizeBytes) && options.sizeBytes >= 0, 'export size is a whole number of bytes');
    this.name = options.name;
    this.sizeBytes = options.sizeBytes;
    this.readOnly = options.readOnly ?? false;
    this.description = options.description;
    this.data = Buffer.alloc(options.sizeBytes);
    this.#beforeOperation = options.beforeOperation;
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    return this.#run('read', offsetBytes, lengthBytes, () => {
      this.counters.reads++;
      return Buffer.from(this.data.subarray(offsetBytes, offsetBytes + lengthBytes));
    });
  }

  async write(offsetBytes: number, data: Buffer, fua: boolean): Promise<void> {
    return this.#run('write', offsetBytes, data.length, () => {
      this.#checkWritable();
      this.counters.writes++;
      if (fua) this.counters.fuaWrites++;
      data.copy(this.data, offsetBytes);
    });
  }

  async flush(): Promise<void> {
    return this.#run('flush', 0, 0, () => {
      this.counters.flushes++;
    });
  }

  async trim(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void> {
    return this.#run('trim', offsetBytes, lengthBytes, () => {
      this.#checkWritable();
      this.counters.trims++;
      if (fua) this.counters.fuaTrims++;
      // Trimmed data reads back as zeroes here; NBD allows anything.
      this.data.fill(0, offsetBytes, offsetBytes + lengthBytes);
    });
  }

  async writeZeroes(offsetBytes: number, lengthBytes: number, options: { fua: boolean; noHole: boolean }): Promise<void> {
    return this.#run('writeZeroes', offsetBytes, lengthBytes, () => {
      this.#checkWritable();
      this.counters.writeZeroes++;
      if (options.noHole) this.counters.noHoleWriteZeroes++;
      this.data.fill(0, offsetBytes, offsetBytes + lengthBytes);
    });
  }

  async release(): Promise<void> {
    this.counters.releases++;
  }

  async #run<T>(operation: MemoryOperation, offsetBytes: number, lengthBytes: number, body: () => T): Promise<T> {
    if (offsetBytes < 0 || lengthBytes < 0 || offsetBytes + lengthBytes > this.sizeBytes) {
      throw new ShaleError('OUT_OF_RANGE', `${operation} of ${lengthBytes} bytes at ${offsetBytes} is outside export "${this.name}" of ${this.sizeBytes} bytes`);
    }
    this.counters.running++;
    this.counters.runningMax = Math.max(this.counters.runningMax, this.counters.running);
    try {
      await this.#beforeOperation?.(operation, offsetBytes, lengthBytes);
      return body();
    } finally {
      this.counters.running--;
    }
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
