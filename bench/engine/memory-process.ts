/**
 * Memory helper: writes GIB GiB into a fresh engine (sequential 1 MiB requests, or 4 KiB requests
 * at random over the region, every block once) and prints a JSON line with the process's memory
 * before and after (after a forced GC when exposed) and the index's typed-array bytes.
 * Usage: node --expose-gc bench/engine/memory-process.ts DISK SIZE_BYTES GIB seq|rand
 */
import { readFileSync } from 'node:fs';
import { blockChecksums } from '../../src/lib/crc32c.ts';
import { BLOCK_SIZE_BYTES, GiB, MiB } from '../../src/lib/units.ts';
import { nodeEnv } from '../../src/env/node/node-env.ts';
import { StoreEngine } from '../../src/store/engine/engine.ts';
import { place } from './workload.ts';

process.env.UV_THREADPOOL_SIZE ??= '16';
const [disk, size, gib, mode] = process.argv.slice(2) as [string, string, string, 'seq' | 'rand'];
const gc = (globalThis as { gc?: () => void }).gc;
/** Anonymous resident memory (Linux): RSS without the mapped files (the node binary, libraries). */
const rssAnon = (): number => {
  try {
    return Number(/RssAnon:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? NaN) * 1024;
  } catch {
    return NaN;
  }
};
const memory = () => {
  gc?.();
  const usage = process.memoryUsage();
  return { rss: usage.rss, rssAnon: rssAnon(), heapTotal: usage.heapTotal, heapUsed: usage.heapUsed, arrayBuffers: usage.arrayBuffers, indexBytes: engine.stats().indexMemoryBytes };
};
await StoreEngine.format(nodeEnv, disk, { sizeBytes: Number(size), clusterId: 'bench', overwrite: true });
const engine = await StoreEngine.open(nodeEnv, disk, { backgroundCompaction: false });
const requestBytes = mode === 'seq' ? 1 * MiB : BLOCK_SIZE_BYTES;
const data = Buffer.alloc(requestBytes, 1);
const checksums = blockChecksums(data);
const count = (Number(gib) * GiB) / requestBytes;
// Random: a permutation of the region's blocks (every block written once, in random order).
const order = new Uint32Array(count);
for (let i = 0; i < count; i++) order[i] = i;
if (mode === 'rand') {
  let state = 12345;
  for (let i = count - 1; i > 0; i--) {
    state = (state * 1103515245 + 12345) >>> 0;
    const j = state % (i + 1);
    const t = order[i]!;
    order[i] = order[j]!;
    order[j] = t;
  }
}
// Stop on a clean point: no checkpoint in flight (its image is the one large transient buffer).
// V8 frees dead ArrayBuffers' memory on a sweeper thread after a GC: give it a moment, then GC again.
const settle = async () => {
  await engine.checkpoint();
  gc?.();
  await new Promise((resolve) => setTimeout(resolve, 200));
  return memory();
};
const before = memory();
let next = 0;
const writeUpTo = async (end: number) => {
  const worker = async () => {
    while (next < end) {
      const i = next++;
      await engine.write({ volumeId: 1, ...place(order[i]! * requestBytes), data, checksums, version: { epoch: 1, seq: i + 1 }, snapSeq: 0 });
    }
  };
  await Promise.all(Array.from({ length: mode === 'seq' ? 4 : 32 }, worker));
  await engine.flush();
};
// Memory is taken halfway too: the second half's growth is the marginal cost, without start-up.
await writeUpTo(count / 2);
const half = await settle();
await writeUpTo(count);
// `during`: as the writes end (a checkpoint may be building its image); `after`: once it is written.
const during = memory();
const after = await settle();
const stats = engine.stats();
console.log(JSON.stringify({ mode, gib: Number(gib), before, half, during, after, indexMemoryBytes: stats.indexMemoryBytes, objects: stats.objectCount, imageBytes: stats.lastCheckpointImageBytes }));
await engine.close();
