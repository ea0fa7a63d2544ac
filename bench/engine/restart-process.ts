/**
 * Restart-time helper, one process per step (so restart is a cold process start, as after a crash):
 *   write DISK SIZE_BYTES GIB MODE  — formats DISK, writes GIB GiB sequentially in 1 MiB requests,
 *                                     then MODE=close closes cleanly, MODE=crash flushes, prints
 *                                     "flushed" and waits to be killed with SIGKILL;
 *   open DISK                       — opens DISK and prints a JSON line: open time, replay report.
 */
import { blockChecksums } from '../../src/lib/crc32c.ts';
import { GiB, MiB } from '../../src/lib/units.ts';
import { nodeEnv } from '../../src/env/node/node-env.ts';
import { StoreEngine } from '../../src/store/engine/engine.ts';
import { place } from './workload.ts';

process.env.UV_THREADPOOL_SIZE ??= '16';
const [command, disk, ...rest] = process.argv.slice(2) as [string, string, ...string[]];
if (command === 'write') {
  const [size, gib, mode] = rest as [string, string, string];
  await StoreEngine.format(nodeEnv, disk, { sizeBytes: Number(size), clusterId: 'bench', overwrite: true });
  const engine = await StoreEngine.open(nodeEnv, disk, { backgroundCompaction: false });
  const data = Buffer.alloc(1 * MiB);
  for (let at = 0; at < data.length; at += 8) data.writeDoubleLE(at * 7.5, at);
  const checksums = blockChecksums(data);
  const total = (Number(gib) * GiB) / MiB;
  let next = 0;
  const worker = async () => {
    while (next < total) {
      const i = next++;
      await engine.write({ volumeId: 1, ...place(i * MiB), data, checksums, version: { epoch: 1, seq: i + 1 }, snapSeq: 0 });
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
  if (mode === 'close') {
    await engine.close();
    console.log(JSON.stringify({ checkpoints: engine.stats().checkpointsWritten }));
  } else {
    await engine.flush();
    console.log(JSON.stringify({ flushed: true, checkpoints: engine.stats().checkpointsWritten, logBytesSinceCheckpoint: engine.stats().logBytesSinceCheckpoint }));
    await new Promise(() => {});
  }
} else if (command === 'open') {
  const began = nodeEnv.clock.nowMs();
  const engine = await StoreEngine.open(nodeEnv, disk, { backgroundCompaction: false });
  const openMs = nodeEnv.clock.nowMs() - began;
  const report = engine.replayReport;
  console.log(JSON.stringify({ openMs, imageBytes: report.imageBytes, bytesRead: report.bytesRead, segmentsScanned: report.segmentsScanned, batchesApplied: report.batchesApplied, rssBytes: process.memoryUsage().rss }));
  process.exit(0);
}
