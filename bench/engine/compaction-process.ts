/**
 * Compaction helper (one process per variant): foreground write latency while compaction runs.
 *
 *   node bench/engine/compaction-process.ts DISK DISK_BYTES REGION_BYTES OVERWRITE_BYTES MODE
 *
 * Formats DISK (16 MiB segments), fills the first REGION_BYTES of a volume with 1 MiB writes, then
 * overwrites 4 KiB blocks of that region at random, 32 in flight, until OVERWRITE_BYTES are written,
 * timing every write. MODE: `background` (default options: the compactor runs under load),
 * `foreground` (backgroundCompaction off: space is reclaimed only when a client hits the wall) —
 * both on a disk that must compact to keep going — or `roomy`, on a disk large enough that nothing
 * needs compacting (the baseline). Prints one JSON line: latency percentiles in µs, IOPS, and the
 * engine's compaction and checkpoint counts.
 */
import { blockChecksums } from '../../src/lib/crc32c.ts';
import { BLOCK_SIZE_BYTES, MiB } from '../../src/lib/units.ts';
import { nodeClock, nodeEnv } from '../../src/env/node/node-env.ts';
import { StoreEngine } from '../../src/store/engine/engine.ts';
import { place, xorshift } from './workload.ts';

process.env.UV_THREADPOOL_SIZE ??= '16';
const [disk, diskBytesArg, regionBytesArg, overwriteBytesArg, mode] = process.argv.slice(2) as [string, string, string, string, string];
const regionBytes = Number(regionBytesArg);
const overwriteBytes = Number(overwriteBytesArg);
const diskBytes = mode === 'roomy' ? regionBytes + overwriteBytes + 1024 * MiB : Number(diskBytesArg);
await StoreEngine.format(nodeEnv, disk, { sizeBytes: diskBytes, clusterId: 'bench', overwrite: true });
const engine = await StoreEngine.open(nodeEnv, disk, { backgroundCompaction: mode !== 'foreground' });

let seq = 0;
// Fill the region (every block live), sequentially.
{
  const data = Buffer.alloc(1 * MiB, 7);
  const checksums = blockChecksums(data);
  let next = 0;
  const worker = async () => {
    while (next < regionBytes / MiB) {
      const i = next++;
      await engine.write({ volumeId: 1, ...place(i * MiB), data, checksums, version: { epoch: 1, seq: ++seq }, snapSeq: 0 });
    }
  };
  await Promise.all(Array.from({ length: 4 }, worker));
  await engine.flush();
}
const filled = engine.stats();

// Random 4 KiB overwrites, QD32.
const writes = Math.floor(overwriteBytes / BLOCK_SIZE_BYTES);
const latenciesUs = new Float64Array(writes);
const payloads = Array.from({ length: 32 }, (_, i) => {
  const data = Buffer.alloc(BLOCK_SIZE_BYTES, i + 1);
  return { data, checksums: blockChecksums(data) };
});
const random = xorshift(0x9e3779b9);
const slots = regionBytes / BLOCK_SIZE_BYTES;
let next = 0;
let failed: unknown;
const startMs = nodeClock.nowMs();
const worker = async (index: number) => {
  while (next < writes && failed === undefined) {
    const i = next++;
    const payload = payloads[index]!;
    const began = nodeClock.nowMs();
    try {
      await engine.write({ volumeId: 1, ...place(Math.floor(random() * slots) * BLOCK_SIZE_BYTES), ...payload, version: { epoch: 1, seq: ++seq }, snapSeq: 0 });
    } catch (error) {
      failed = error;
      return;
    }
    latenciesUs[i] = (nodeClock.nowMs() - began) * 1000;
  }
};
await Promise.all(Array.from({ length: 32 }, (_, i) => worker(i)));
await engine.flush();
const elapsedSeconds = (nodeClock.nowMs() - startMs) / 1000;
const done = Math.min(next, writes);
const sorted = latenciesUs.subarray(0, done).sort();
const at = (fraction: number) => sorted[Math.min(done - 1, Math.floor(done * fraction))] ?? NaN;
const stats = engine.stats();
console.log(JSON.stringify({
  mode,
  diskBytes,
  regionBytes,
  overwriteBytes,
  error: failed === undefined ? undefined : String(failed),
  writes: done,
  iops: done / elapsedSeconds,
  p50Us: at(0.5),
  p99Us: at(0.99),
  p999Us: at(0.999),
  maxUs: sorted[done - 1],
  compactedSegments: stats.compactedSegments - filled.compactedSegments,
  backgroundCompactedSegments: stats.backgroundCompactedSegments - filled.backgroundCompactedSegments,
  foregroundCompactions: stats.foregroundCompactions - filled.foregroundCompactions,
  checkpoints: stats.checkpointsWritten - filled.checkpointsWritten,
  freeSegmentsAtEnd: stats.freeSegments,
  segmentCount: stats.segmentCount,
}));
await engine.close();
