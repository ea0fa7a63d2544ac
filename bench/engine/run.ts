/**
 * `npm run bench:engine`: the store engine's benchmark (not a test). Prints markdown tables and
 * writes the raw numbers to $SHALE_BENCH_DIR/results.json.
 *
 *   I/O:      the patterns of workload.ts against (1) the engine in this process, (2) a store
 *             process through the store protocol (unix socket), (3) fio on a plain file in the same
 *             directory (psync at QD1, libaio at QD>1, buffered like the engine), each run
 *             $SHALE_BENCH_RUNS times (default 3), medians reported with the ratio to fio.
 *   Restart:  write 1, 4 and 16 GiB (SHALE_BENCH_RESTART_GIB), then a clean close or kill -9,
 *             and time StoreEngine.open in a fresh process (median of 3 opens).
 *   Memory:   RSS and index bytes per GiB written, sequential and random (SHALE_BENCH_MEMORY_GIB).
 *   Compaction: 4 KiB random overwrites at QD32 of a region half the disk's size, timed per write,
 *             with the background compactor, with foreground compaction only, and on a disk that
 *             never needs compacting (SHALE_BENCH_COMPACTION_MIB=disk,region,overwrite; default
 *             1024,512,1536), $SHALE_BENCH_RUNS runs, medians.
 *
 * Environment: SHALE_BENCH_DIR (default a directory under the OS temp dir, removed afterwards
 * unless SHALE_BENCH_KEEP=1), SHALE_BENCH_SECONDS (per random pattern, default 5),
 * SHALE_BENCH_REGION_MIB (default 1024), SHALE_BENCH_ONLY=io,restart,memory,compaction.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { cpus, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { GiB, MiB } from '../../src/lib/units.ts';
import { nodeEnv } from '../../src/env/node/node-env.ts';
import { StoreEngine } from '../../src/store/engine/engine.ts';
import { engineTarget, protocolTarget } from './targets.ts';
import { patterns, run, type Pattern, type Result } from './workload.ts';

process.env.UV_THREADPOOL_SIZE ??= '16';
const here = import.meta.dirname;
const dir = process.env.SHALE_BENCH_DIR ?? join(tmpdir(), `shale-bench-${process.pid}`);
const runs = Number(process.env.SHALE_BENCH_RUNS ?? 3);
const seconds = Number(process.env.SHALE_BENCH_SECONDS ?? 5);
const regionBytes = Number(process.env.SHALE_BENCH_REGION_MIB ?? 1024) * MiB;
const restartGib = (process.env.SHALE_BENCH_RESTART_GIB ?? '1,4,16').split(',').map(Number);
const memoryGib = Number(process.env.SHALE_BENCH_MEMORY_GIB ?? 2);
const only = new Set((process.env.SHALE_BENCH_ONLY ?? 'io,restart,memory,compaction').split(','));
const [compactionDiskMib, compactionRegionMib, compactionOverwriteMib] = (process.env.SHALE_BENCH_COMPACTION_MIB ?? '1024,512,1536').split(',').map(Number) as [number, number, number];
const diskBytes = Math.max(2 * GiB, regionBytes * 2);

mkdirSync(dir, { recursive: true });
const results: Record<string, unknown> = {
  machine: { cpus: cpus().length, cpuModel: cpus()[0]?.model, memoryBytes: totalmem(), node: process.version, dir },
};

const median = (values: number[]): number => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted.length === 0 ? NaN : sorted[Math.floor((sorted.length - 1) / 2)]!;
};
const fixed = (value: number, digits = 0) => (Number.isFinite(value) ? value.toFixed(digits) : '–');

function node(args: string[]): ChildProcess {
  return spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] });
}

/** Resolves with the first stdout line that satisfies `accept`. */
function lineFrom(child: ChildProcess, accept: (line: string) => boolean = () => true): Promise<string> {
  return new Promise((resolve, reject) => {
    let buffered = '';
    child.stdout!.on('data', (chunk: Buffer) => {
      buffered += chunk.toString();
      for (;;) {
        const at = buffered.indexOf('\n');
        if (at < 0) break;
        const line = buffered.slice(0, at);
        buffered = buffered.slice(at + 1);
        if (accept(line)) resolve(line);
      }
    });
    child.on('exit', (code) => reject(new Error(`child exited (${code}) before the expected output`)));
  });
}

/** fio on a plain file: buffered with a warm page cache like the engine (`direct`: O_DIRECT, the device itself). */
function fio(pattern: Pattern, file: string, direct: boolean): Result {
  const args = [
    '--name=bench', `--filename=${file}`, `--size=${regionBytes}`, `--bs=${pattern.blockBytes}`, `--direct=${direct ? 1 : 0}`, '--invalidate=0',
    `--rw=${pattern.random ? 'rand' : ''}${pattern.kind}`, `--iodepth=${pattern.depth}`,
    `--ioengine=${pattern.depth === 1 ? 'psync' : 'libaio'}`, '--output-format=json', '--randrepeat=0',
    ...(pattern.random ? ['--time_based', `--runtime=${seconds}`] : []),
    ...(pattern.flushEvery > 0 ? [`--fdatasync=${pattern.flushEvery}`] : []),
    ...(pattern.kind === 'write' && !pattern.random ? ['--end_fsync=1'] : []),
  ];
  const out = spawnSync('fio', args, { encoding: 'utf8', maxBuffer: 64 * MiB });
  if (out.status !== 0) throw new Error(`fio failed: ${out.stderr}`);
  const job = JSON.parse(out.stdout).jobs[0];
  const side = pattern.kind === 'write' ? job.write : job.read;
  const percentile = side.clat_ns?.percentile ?? {};
  return {
    iops: side.iops,
    mibPerSecond: side.bw_bytes / MiB,
    latencyP50Us: (percentile['50.000000'] ?? NaN) / 1000,
    latencyP99Us: (percentile['99.000000'] ?? NaN) / 1000,
  };
}

async function ioSection(): Promise<void> {
  const hasFio = spawnSync('fio', ['--version']).status === 0;
  const samples: Record<string, Record<string, Result[]>> = {};
  const add = (target: string, pattern: Pattern, result: Result) => {
    ((samples[pattern.name] ??= {})[target] ??= []).push(result);
    console.error(`  ${target.padEnd(8)} ${pattern.name.padEnd(34)} ${fixed(result.iops).padStart(8)} IOPS ${fixed(result.mibPerSecond, 1).padStart(8)} MiB/s  p99 ${fixed(result.latencyP99Us)} µs`);
  };
  for (let r = 1; r <= runs; r++) {
    console.error(`I/O run ${r}/${runs}`);
    const disk = join(dir, 'engine.disk');
    rmSync(disk, { force: true });
    await StoreEngine.format(nodeEnv, disk, { sizeBytes: diskBytes, clusterId: 'bench' });
    const engine = await StoreEngine.open(nodeEnv, disk, {});
    for (const pattern of patterns) add('engine', pattern, await run(engineTarget(engine), pattern, regionBytes, seconds, r));
    await engine.close();
    rmSync(disk, { force: true });

    const storeDisk = join(dir, 'store.disk');
    const socket = join(dir, 'store.sock');
    rmSync(storeDisk, { force: true });
    rmSync(socket, { force: true });
    const store = node([join(here, 'store-process.ts'), storeDisk, String(diskBytes), socket]);
    const ready = await lineFrom(store, (line) => line.startsWith('ready '));
    const { target, close } = protocolTarget(ready.slice('ready '.length));
    for (const pattern of patterns) add('protocol', pattern, await run(target, pattern, regionBytes, seconds, r));
    close();
    store.kill('SIGTERM');
    await new Promise((resolve) => store.on('exit', resolve));
    rmSync(storeDisk, { force: true });

    if (hasFio) {
      const file = join(dir, 'fio.dat');
      rmSync(file, { force: true });
      for (const pattern of patterns) add('fio', pattern, fio(pattern, file, false));
      for (const pattern of patterns) add('fio-odirect', pattern, fio(pattern, file, true));
      rmSync(file, { force: true });
    }
  }
  results.io = samples;
  console.log(`\n### I/O (${runs} runs, medians; region ${regionBytes / MiB} MiB, ${seconds} s per random pattern)\n`);
  console.log('| pattern | engine IOPS | engine MiB/s | protocol IOPS | fio IOPS | engine / fio | protocol / fio | fio O_DIRECT IOPS | p99 µs engine / protocol / fio |');
  console.log('|---|---:|---:|---:|---:|---:|---:|---:|---:|');
  for (const pattern of patterns) {
    const m = (target: string, key: keyof Result) => median((samples[pattern.name]?.[target] ?? []).map((s) => s[key]));
    const engine = m('engine', 'iops');
    const protocol = m('protocol', 'iops');
    const reference = m('fio', 'iops');
    console.log(`| ${pattern.name} | ${fixed(engine)} | ${fixed(m('engine', 'mibPerSecond'), 1)} | ${fixed(protocol)} | ${fixed(reference)} | ${fixed(engine / reference, 2)} | ${fixed(protocol / reference, 2)} | ${fixed(m('fio-odirect', 'iops'))} | ${fixed(m('engine', 'latencyP99Us'))} / ${fixed(m('protocol', 'latencyP99Us'))} / ${fixed(m('fio', 'latencyP99Us'))} |`);
  }
}

async function restartSection(): Promise<void> {
  const rows: { gib: number; mode: string; opens: Record<string, number>[] }[] = [];
  for (const gib of restartGib) {
    for (const mode of ['close', 'crash']) {
      const disk = join(dir, `restart-${gib}.disk`);
      rmSync(disk, { force: true });
      console.error(`restart: writing ${gib} GiB, then ${mode === 'close' ? 'a clean close' : 'kill -9'}`);
      const writer = node([join(here, 'restart-process.ts'), 'write', disk, String((gib + 2) * GiB), String(gib), mode]);
      const line = await lineFrom(writer);
      if (mode === 'crash') writer.kill('SIGKILL');
      await new Promise((resolve) => writer.on('exit', resolve));
      const opens: Record<string, number>[] = [];
      for (let i = 0; i < 3; i++) {
        const opener = node([join(here, 'restart-process.ts'), 'open', disk]);
        opens.push(JSON.parse(await lineFrom(opener)));
        await new Promise((resolve) => opener.on('exit', resolve));
      }
      console.error(`  ${line} → open ${opens.map((o) => `${fixed(o.openMs!)} ms`).join(', ')}`);
      rows.push({ gib, mode, opens });
      rmSync(disk, { force: true });
    }
  }
  results.restart = rows;
  console.log('\n### Restart (open of a fresh process, median of 3)\n');
  console.log('| written | after | open ms | image MiB | bytes read MiB | segments replayed | batches replayed |');
  console.log('|---:|---|---:|---:|---:|---:|---:|');
  for (const row of rows) {
    const m = (key: string) => median(row.opens.map((o) => o[key]!));
    console.log(`| ${row.gib} GiB | ${row.mode === 'close' ? 'clean close' : 'kill -9'} | ${fixed(m('openMs'))} | ${fixed(m('imageBytes') / MiB, 1)} | ${fixed(m('bytesRead') / MiB, 1)} | ${fixed(m('segmentsScanned'))} | ${fixed(m('batchesApplied'))} |`);
  }
}

async function memorySection(): Promise<void> {
  const rows: Record<string, unknown>[] = [];
  for (const [mode, gib] of [['seq', memoryGib], ['rand', Math.max(1, Math.floor(memoryGib / 2))]] as const) {
    const disk = join(dir, `memory-${mode}.disk`);
    rmSync(disk, { force: true });
    console.error(`memory: ${gib} GiB ${mode === 'seq' ? 'sequential 1 MiB' : 'random 4 KiB'} writes`);
    const child = spawn(process.execPath, ['--expose-gc', join(here, 'memory-process.ts'), disk, String((gib + 2) * GiB), String(gib), mode], { stdio: ['ignore', 'pipe', 'inherit'] });
    rows.push(JSON.parse(await lineFrom(child)));
    await new Promise((resolve) => child.on('exit', resolve));
    rmSync(disk, { force: true });
  }
  results.memory = rows;
  console.log('\n### Memory per GiB written (after a forced GC)\n');
  console.log('| writes | GiB | index typed arrays per GiB | index bytes per 4 KiB block | checkpoint image per GiB | second half, per GiB: RSS / anonymous RSS / array buffers / V8 heap committed | RSS at the end | array buffers while the last image is built |');
  console.log('|---|---:|---:|---:|---:|---|---:|---:|');
  for (const row of rows as { mode: string; gib: number; half: Record<string, number>; during: Record<string, number>; after: Record<string, number>; indexMemoryBytes: number; imageBytes: number }[]) {
    const perGib = (bytes: number, gib = row.gib) => `${fixed(bytes / gib / MiB, 2)} MiB`;
    const growth = (key: string) => fixed((row.after[key]! - row.half[key]!) / (row.gib / 2) / MiB, 2);
    console.log(`| ${row.mode === 'seq' ? 'sequential 1 MiB' : 'random 4 KiB'} | ${row.gib} | ${perGib(row.indexMemoryBytes)} | ${fixed(row.indexMemoryBytes / ((row.gib * GiB) / 4096), 2)} | ${perGib(row.imageBytes)} | ${growth('rss')} / ${growth('rssAnon')} / ${growth('arrayBuffers')} / ${growth('heapTotal')} MiB | ${fixed(row.after.rss! / MiB)} MiB | ${fixed(row.during.arrayBuffers! / MiB)} MiB |`);
  }
}

async function compactionSection(): Promise<void> {
  const rows: Record<string, number | string>[] = [];
  for (let r = 1; r <= runs; r++) {
    for (const mode of ['roomy', 'background', 'foreground']) {
      const disk = join(dir, 'compaction.disk');
      rmSync(disk, { force: true });
      const child = node([join(here, 'compaction-process.ts'), disk, String(compactionDiskMib * MiB), String(compactionRegionMib * MiB), String(compactionOverwriteMib * MiB), mode]);
      const row = JSON.parse(await lineFrom(child)) as Record<string, number | string>;
      await new Promise((resolve) => child.on('exit', resolve));
      rmSync(disk, { force: true });
      console.error(`  compaction ${mode.padEnd(10)} run ${r}: ${fixed(row.iops as number)} IOPS, p50 ${fixed(row.p50Us as number)} µs, p99 ${fixed(row.p99Us as number)} µs, p99.9 ${fixed(row.p999Us as number)} µs, max ${fixed(row.maxUs as number)} µs, ${row.compactedSegments} compacted (${row.foregroundCompactions} in the foreground)${row.error ? `, ${row.error}` : ''}`);
      rows.push(row);
    }
  }
  results.compaction = rows;
  console.log(`\n### Write latency while compacting (4 KiB random overwrites, QD32; ${compactionRegionMib} MiB live on a ${compactionDiskMib} MiB disk, ${compactionOverwriteMib} MiB overwritten; ${runs} runs, medians)\n`);
  console.log('| compaction | IOPS | p50 µs | p99 µs | p99.9 µs | max µs | segments compacted | of them in the foreground | checkpoints |');
  console.log('|---|---:|---:|---:|---:|---:|---:|---:|---:|');
  const names: Record<string, string> = { roomy: 'none needed (disk of region + 2.5 GiB)', background: 'background, under load (default)', foreground: 'foreground only (background off)' };
  for (const mode of ['roomy', 'background', 'foreground']) {
    const of = rows.filter((row) => row.mode === mode);
    const m = (key: string) => median(of.map((row) => row[key] as number));
    console.log(`| ${names[mode]} | ${fixed(m('iops'))} | ${fixed(m('p50Us'))} | ${fixed(m('p99Us'))} | ${fixed(m('p999Us'))} | ${fixed(m('maxUs'))} | ${fixed(m('compactedSegments'))} | ${fixed(m('foregroundCompactions'))} | ${fixed(m('checkpoints'))} |`);
  }
}

try {
  console.log(`## Store engine benchmark — ${cpus().length} × ${cpus()[0]?.model}, ${fixed(totalmem() / GiB)} GiB RAM, Node ${process.version}, files in ${dir}`);
  if (only.has('io')) await ioSection();
  if (only.has('restart')) await restartSection();
  if (only.has('memory')) await memorySection();
  if (only.has('compaction')) await compactionSection();
} finally {
  writeFileSync(join(dir, 'results.json'), JSON.stringify(results, null, 2));
  console.error(`raw results: ${join(dir, 'results.json')}`);
  if (!process.env.SHALE_BENCH_KEEP && !process.env.SHALE_BENCH_DIR && existsSync(dir)) rmSync(dir, { recursive: true, force: true });
}
