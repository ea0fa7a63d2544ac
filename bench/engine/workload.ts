/**
 * Workload drivers for the engine benchmark: the same I/O patterns against the engine in this
 * process, or against a store process through the store protocol. A "target" is anything that can
 * write, read and flush 4 KiB-block ranges of one volume; the driver keeps `depth` requests in
 * flight for `seconds` and reports operations per second, MiB/s and latency percentiles.
 */
import { blockChecksums } from '../../src/lib/crc32c.ts';
import { BLOCK_SIZE_BYTES, KiB, MiB } from '../../src/lib/units.ts';
import { nodeClock } from '../../src/env/node/node-env.ts';

export const CHUNK_BYTES = 4 * MiB;
export const CHUNK_BLOCKS = CHUNK_BYTES / BLOCK_SIZE_BYTES;

export interface Target {
  /** Writes `data` (whole blocks, with its crcs) at byte `offset` of the volume (inside one chunk). */
  write(offset: number, data: Buffer, checksums: Uint32Array, seq: number): Promise<void>;
  read(offset: number, bytes: number): Promise<void>;
  flush(): Promise<void>;
}

export interface Pattern {
  name: string;
  kind: 'write' | 'read';
  blockBytes: number;
  depth: number;
  random: boolean;
  /** Flush after every this many writes (0: never). */
  flushEvery: number;
}

export const patterns: Pattern[] = [
  { name: 'seq write 1 MiB QD4', kind: 'write', blockBytes: 1 * MiB, depth: 4, random: false, flushEvery: 0 },
  { name: 'seq read 1 MiB QD4', kind: 'read', blockBytes: 1 * MiB, depth: 4, random: false, flushEvery: 0 },
  { name: 'rand write 4 KiB QD1', kind: 'write', blockBytes: 4 * KiB, depth: 1, random: true, flushEvery: 0 },
  { name: 'rand write 4 KiB QD32', kind: 'write', blockBytes: 4 * KiB, depth: 32, random: true, flushEvery: 0 },
  { name: 'rand write 4 KiB QD32 + flush/32', kind: 'write', blockBytes: 4 * KiB, depth: 32, random: true, flushEvery: 32 },
  { name: 'rand read 4 KiB QD1', kind: 'read', blockBytes: 4 * KiB, depth: 1, random: true, flushEvery: 0 },
  { name: 'rand read 4 KiB QD32', kind: 'read', blockBytes: 4 * KiB, depth: 32, random: true, flushEvery: 0 },
];

export interface Result {
  iops: number;
  mibPerSecond: number;
  latencyP50Us: number;
  latencyP99Us: number;
}

/** A cheap, seeded generator: benchmark offsets need not be cryptographic. */
export function xorshift(seed: number): () => number {
  let state = seed >>> 0 || 1;
  return () => {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    return state / 2 ** 32;
  };
}

let sequence = 1;

/**
 * Runs `pattern` over the first `regionBytes` of the volume for `seconds` (a sequential pattern
 * also stops after one pass over the region). Buffers are prepared up front so the measurement is
 * the target, not the driver.
 */
export async function run(target: Target, pattern: Pattern, regionBytes: number, seconds: number, seed = 1): Promise<Result> {
  const random = xorshift(seed);
  const slots = regionBytes / pattern.blockBytes;
  const payloads: { data: Buffer; checksums: Uint32Array }[] = [];
  if (pattern.kind === 'write') {
    for (let i = 0; i < Math.max(pattern.depth, 4); i++) {
      const data = Buffer.alloc(pattern.blockBytes);
      for (let at = 0; at < data.length; at += 8) data.writeDoubleLE(random(), at);
      payloads.push({ data, checksums: blockChecksums(data) });
    }
  }
  const latencies: number[] = [];
  const startMs = nodeClock.nowMs();
  const endMs = startMs + seconds * 1000;
  let next = 0;
  let done = 0;
  let sinceFlush = 0;
  let stop = false;
  const worker = async (index: number): Promise<void> => {
    while (!stop) {
      if (!pattern.random && next >= slots) break;
      const slot = pattern.random ? Math.floor(random() * slots) : next++;
      const offset = slot * pattern.blockBytes;
      const began = nodeClock.nowMs();
      if (pattern.kind === 'write') {
        const payload = payloads[(done + index) % payloads.length]!;
        await target.write(offset, payload.data, payload.checksums, sequence++);
        if (pattern.flushEvery > 0 && ++sinceFlush >= pattern.flushEvery) {
          sinceFlush = 0;
          await target.flush();
        }
      } else {
        await target.read(offset, pattern.blockBytes);
      }
      latencies.push((nodeClock.nowMs() - began) * 1000);
      done++;
      if ((done & 63) === 0 && nodeClock.nowMs() >= endMs) stop = true;
    }
  };
  await Promise.all(Array.from({ length: pattern.depth }, (_, i) => worker(i)));
  if (pattern.kind === 'write') await target.flush();
  const elapsedSeconds = (nodeClock.nowMs() - startMs) / 1000;
  latencies.sort((a, b) => a - b);
  return {
    iops: done / elapsedSeconds,
    mibPerSecond: (done * pattern.blockBytes) / MiB / elapsedSeconds,
    latencyP50Us: latencies[Math.floor(latencies.length * 0.5)] ?? 0,
    latencyP99Us: latencies[Math.floor(latencies.length * 0.99)] ?? 0,
  };
}

/** Splits a volume byte offset into (chunk, first block). */
export function place(offset: number): { chunkIndex: number; offsetBlocks: number } {
  return { chunkIndex: Math.floor(offset / CHUNK_BYTES), offsetBlocks: (offset % CHUNK_BYTES) / BLOCK_SIZE_BYTES };
}
