/**
 * A pool of I/O buffers for reads and for write payloads. Node gives every Buffer of 4 KiB or more
 * its own ArrayBuffer, outside V8's heap; allocating one per read made V8 run full garbage
 * collections every few dozen 1 MiB reads (half the CPU of a sequential read went to marking and
 * sweeping), and one per 1 MiB write payload did the same to writes. A buffer taken here goes back
 * with `give` once its last user is done with it — for a read, when the NBD reply carrying it has
 * been written to the socket; for a write payload, once it has been written (by every replica,
 * for the NBD gateway) — and is handed out again.
 *
 * Safety rests on one rule: only the last user gives a buffer back. A buffer that is never given
 * back is simply garbage collected, so any path that keeps a reference (or doesn't know) just
 * doesn't give it. `give` accepts only buffers this pool handed out and not yet given back; a
 * stranger or a second give is ignored.
 *
 * Sizes are rounded up to a power of two from 4 KiB to 4 MiB; each size class keeps at most
 * `bytesPerClassMax` bytes of free buffers.
 */

/**
 * Whoever lent out a buffer and wants it back: the read pool here, the store engine's block cache.
 * A read's bytes travel up to the NBD gateway or a store's socket, which cannot know which one lent
 * them; `giveBack` finds the lender from a mark on the buffer's ArrayBuffer.
 */
export interface BufferLender {
  give(buffer: Buffer): void;
}

const LENDER = Symbol('shale.buffer-lender');
type Lent = ArrayBufferLike & { [LENDER]?: BufferLender };

/** Marks every buffer over `arrayBuffer` as lent by `lender`. */
export function markLender(arrayBuffer: ArrayBufferLike, lender: BufferLender): void {
  (arrayBuffer as Lent)[LENDER] = lender;
}

/**
 * Gives a read's buffer (or a view of one) back to whoever lent it, once its last user is done;
 * a buffer nobody lent is left to the garbage collector.
 */
export function giveBack(buffer: Buffer): void {
  (buffer.buffer as Lent)[LENDER]?.give(buffer);
}

const CLASS_MIN_SHIFT = 12;
const CLASS_MAX_SHIFT = 22;

/**
 * Marks an ArrayBuffer handed out and not yet given back. A property on the ArrayBuffer itself
 * (not a WeakSet): the hot read path takes and gives a buffer per request, and a WeakSet's
 * ephemeron table cost more than the read's own bookkeeping.
 */
const OUT = Symbol('shale.buffer-pool.out');
/** The whole buffer made over an ArrayBuffer: a view given back returns it to the free list without a new Buffer. */
const WHOLE = Symbol('shale.buffer-pool.whole');
type Marked = ArrayBufferLike & { [OUT]?: boolean; [WHOLE]?: Buffer };

export class BufferPool implements BufferLender {
  /** Per size class, whole free buffers (each owns its ArrayBuffer of exactly the class size). */
  readonly #free: Buffer[][] = [];
  readonly #freeMax: number[] = [];
  #reused = 0;
  #allocated = 0;

  constructor(bytesPerClassMax = 16 * 1024 * 1024) {
    for (let shift = CLASS_MIN_SHIFT; shift <= CLASS_MAX_SHIFT; shift++) {
      this.#free.push([]);
      this.#freeMax.push(Math.max(1, Math.floor(bytesPerClassMax / 2 ** shift)));
    }
  }

  /** A buffer of exactly `bytes` bytes, contents undefined (like Buffer.allocUnsafe). */
  take(bytes: number): Buffer {
    const index = classIndex(bytes);
    if (index < 0) return Buffer.allocUnsafe(bytes);
    let buffer = this.#free[index]!.pop();
    if (buffer === undefined) {
      buffer = Buffer.allocUnsafeSlow(2 ** (index + CLASS_MIN_SHIFT));
      markLender(buffer.buffer, this);
      (buffer.buffer as Marked)[WHOLE] = buffer;
      this.#allocated++;
    } else {
      this.#reused++;
    }
    (buffer.buffer as Marked)[OUT] = true;
    return buffer.length === bytes ? buffer : buffer.subarray(0, bytes);
  }

  /** Gives back a buffer from `take` (or a view of one) whose last user is done with it. */
  give(buffer: Buffer): void {
    const arrayBuffer = buffer.buffer as Marked;
    if (arrayBuffer[OUT] !== true) return;
    arrayBuffer[OUT] = false;
    const bytes = arrayBuffer.byteLength;
    const index = classIndex(bytes);
    if (index < 0 || 2 ** (index + CLASS_MIN_SHIFT) !== bytes) return;
    const free = this.#free[index]!;
    if (free.length >= this.#freeMax[index]!) return;
    free.push(arrayBuffer[WHOLE] ?? Buffer.from(arrayBuffer, 0, bytes));
  }

  /** For tests and metrics: buffers made new and buffers handed out again. */
  get counters(): { allocated: number; reused: number } {
    return { allocated: this.#allocated, reused: this.#reused };
  }
}

/** The size class of `bytes` (the next power of two, 4 KiB..4 MiB, as an index), or -1 outside the classes. */
function classIndex(bytes: number): number {
  if (bytes < 2 ** CLASS_MIN_SHIFT || bytes > 2 ** CLASS_MAX_SHIFT) return -1;
  return 32 - Math.clz32(bytes - 1) - CLASS_MIN_SHIFT;
}

/**
 * The process's pool: read data (the store engine takes, the NBD gateway gives back) and the write
 * payloads sockets are read into (the NBD gateway takes them and gives them back when the volume
 * reports every replica done with them; a store, when its engine has written them).
 */
export const ioBuffers = new BufferPool();

/**
 * A buffer from `ioBuffers` for a write payload a socket is read into (the parsers' `payloadBuffer`
 * in the NBD gateway and in stores): a new 1 MiB buffer per request kept V8's collector marking and
 * sweeping through a third of a 1 MiB sequential write's CPU (docs/benchmarks.md).
 */
export function takePayloadBuffer(bytes: number): Buffer {
  return ioBuffers.take(bytes);
}
