/**
 * `npm run bench:snap`: snapshots and clones (not a test). On a cluster in this process (a
 * conductor on SQLite, 3 store daemons with log engines on files, real sockets, 3 replicas):
 *
 *   1. snapshot create and volume clone time against the volume's size (1 GiB, 1 TiB) and how
 *      much is written (nothing, or 4 KiB in each of N chunks spread over the volume), median of
 *      SHALE_BENCH_RUNS (default 5) — measured at the API, as `shale snapshot create` waits, with
 *      the volume open by a writer (so the owner's switch-and-acknowledge is included) and closed;
 *   2. the latency of a 4 KiB write that is the first overwrite of its block after a snapshot,
 *      against a later overwrite of the same block (QD1, SHALE_BENCH_BLOCKS blocks, default 2000).
 *
 * Prints markdown tables (docs/benchmarks.md keeps a copy with the machine it ran on).
 */
import { randomBytes } from 'node:crypto';
import { cpus } from 'node:os';
import { startLocalCluster } from '../test/harness.ts';

const runs = Number(process.env.SHALE_BENCH_RUNS ?? 5);
const chunksWritten = Number(process.env.SHALE_BENCH_CHUNKS ?? 2000);
const overwriteBlocks = Number(process.env.SHALE_BENCH_BLOCKS ?? 2000);
const GiB = 1024 ** 3;
const TiB = 1024 ** 4;

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))]!;
}

const cluster = await startLocalCluster({ diskSizeBytes: 2 * GiB, pgCount: 64 });
const timed = async (method: string, path: string, body?: unknown): Promise<number> => {
  const started = performance.now();
  const reply = await cluster.call(method, path, body);
  const elapsed = performance.now() - started;
  if (reply.status >= 300) throw new Error(`${method} ${path}: ${JSON.stringify(reply.body)}`);
  return elapsed;
};

try {
  const rows: string[] = [];
  let volumeNumber = 0;
  for (const sizeBytes of [GiB, TiB]) {
    for (const chunks of [0, chunksWritten]) {
      for (const open of [false, true]) {
        const name = `v${++volumeNumber}`;
        await timed('POST', '/volumes', { name, size: sizeBytes });
        const client = await cluster.client(`bench-${name}`);
        const volume = await client.openVolume(name);
        // 4 KiB in each of `chunks` chunks spread evenly over the volume (4 MiB chunks).
        const chunkCount = sizeBytes / (4 * 1024 * 1024);
        const block = randomBytes(4096);
        for (let i = 0; i < chunks; i++) await volume.write(Math.floor((i * chunkCount) / chunks) * 4 * 1024 * 1024, block);
        if (!open) await volume.close();
        const snapshotMs: number[] = [];
        const cloneMs: number[] = [];
        for (let run = 0; run < runs; run++) {
          snapshotMs.push(await timed('POST', `/volumes/${name}/snapshots`, { name: `s${run}` }));
          cloneMs.push(await timed('POST', `/volumes/${name}/snapshots/s${run}/clone`, { name: `${name}-c${run}` }));
        }
        if (open) await volume.close();
        rows.push(`| ${sizeBytes === GiB ? "1 GiB" : "1 TiB"} | ${chunks === 0 ? "nothing" : `4 KiB in each of ${Math.min(chunks, chunkCount)} chunks`} | ${open ? 'open (owner switches, drains, acknowledges)' : 'closed'} | ${median(snapshotMs).toFixed(1)} | ${median(cloneMs).toFixed(1)} |`);
        console.error(rows[rows.length - 1]);
      }
    }
  }
  console.log(`Snapshot and clone creation (${cpus().length} cores, ${cpus()[0]?.model}; in-process cluster, 3 stores, 3 replicas, 64 PGs; median of ${runs}, ms at the API)\n`);
  console.log('| volume | written | volume state | snapshot create (ms) | clone (ms) |');
  console.log('|---|---|---|---:|---:|');
  for (const row of rows) console.log(row);

  // First overwrite after a snapshot vs a later one.
  await timed('POST', '/volumes', { name: 'cow', size: GiB });
  const client = await cluster.client('bench-cow');
  const volume = await client.openVolume('cow');
  const data = randomBytes(4096);
  for (let i = 0; i < overwriteBlocks; i++) await volume.write(i * 4096 * 16, data);
  await timed('POST', '/volumes/cow/snapshots', { name: 'before' });
  const measure = async (): Promise<number[]> => {
    const latencies: number[] = [];
    for (let i = 0; i < overwriteBlocks; i++) {
      const started = performance.now();
      await volume.write(i * 4096 * 16, data);
      latencies.push((performance.now() - started) * 1000);
    }
    return latencies;
  };
  const first = await measure();
  const second = await measure();
  const noSnapshotVolume = await (await cluster.client('bench-plain')).openVolume((await timed('POST', '/volumes', { name: 'plain', size: GiB }), 'plain'));
  for (let i = 0; i < overwriteBlocks; i++) await noSnapshotVolume.write(i * 4096 * 16, data);
  const plain: number[] = [];
  for (let i = 0; i < overwriteBlocks; i++) {
    const started = performance.now();
    await noSnapshotVolume.write(i * 4096 * 16, data);
    plain.push((performance.now() - started) * 1000);
  }
  console.log(`\n4 KiB write latency at QD1 over ${overwriteBlocks} blocks (µs)\n`);
  console.log('| write | median | p99 |');
  console.log('|---|---:|---:|');
  console.log(`| first overwrite of a block after a snapshot | ${median(first).toFixed(0)} | ${percentile(first, 0.99).toFixed(0)} |`);
  console.log(`| second overwrite (no snapshot since) | ${median(second).toFixed(0)} | ${percentile(second, 0.99).toFixed(0)} |`);
  console.log(`| overwrite on a volume that never had a snapshot | ${median(plain).toFixed(0)} | ${percentile(plain, 0.99).toFixed(0)} |`);
} finally {
  await cluster.close();
}
