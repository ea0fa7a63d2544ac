/**
 * Rebuild benchmark (issue 8): how fast a dead store's data is re-replicated, against what this
 * disk can write, and what the rebuild costs clients. One run:
 *
 *   1. fio: sequential write bandwidth of the disk the stores live on (1 MiB blocks, buffered,
 *      end_fsync) — the ceiling for any rebuild here.
 *   2. `shale up --stores 4` (a 3-replica pool over 4 stores, each store its own failure domain),
 *      a volume of SIZE (default 4G) filled with 1 MiB sequential writes (fio, nbd engine).
 *   3. Client IOPS without a rebuild: fio 4 KiB random reads at queue depth 16 on the volume for
 *      RUNTIME seconds.
 *   4. kill -9 of store 2, marked out after --down-out-interval 2s; its PGs are refilled on the other
 *      stores, every holder sending. Measured: time from out to every PG clean, bytes copied (from
 *      the stores' heartbeats), rebuild MiB/s; and the same fio random reads during the rebuild.
 *   5. Resync after a short outage: store 3 killed, 64 MiB written, store 3 started again on its
 *      disk; bytes it copied when back.
 *
 *   npm run bench:rebuild                  # SIZE=4G RUNTIME=10
 *   SIZE=1G RUNTIME=5 npm run bench:rebuild
 *   RESYNC_RATE=200M npm run bench:rebuild # throttled rebuild (--resync-rate)
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort, log, MAIN } from './support.ts';

const SIZE = process.env.SIZE ?? '4G';
const RUNTIME = Number(process.env.RUNTIME ?? 10);
const RESYNC_RATE = process.env.RESYNC_RATE ?? '0';
const MiB = 1024 * 1024;

const dir = mkdtempSync(join(process.env.BENCH_DIR ?? tmpdir(), 'shale-bench-rebuild-'));
let up: ChildProcess | undefined;
let restarted: ChildProcess | undefined;

function fio(args: string[]): { [key: string]: any } {
  const result = spawnSync('fio', ['--output-format=json', ...args], { encoding: 'utf8', maxBuffer: 64 * MiB });
  if (result.status !== 0) throw new Error(`fio ${args.join(' ')} failed: ${result.stderr}`);
  return JSON.parse(result.stdout.slice(result.stdout.indexOf('{'))) as { [key: string]: any };
}

function fioAsync(args: string[]): Promise<{ [key: string]: any }> {
  return new Promise((resolve, reject) => {
    const child = spawn('fio', ['--output-format=json', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (err += chunk.toString()));
    child.on('close', (code) => (code === 0 ? resolve(JSON.parse(out.slice(out.indexOf('{')))) : reject(new Error(`fio failed: ${err}`))));
  });
}

let apiToken = '';

/** The API straight from this process: polling through the CLI would spawn a Node process per poll and steal the CPU being measured. */
async function apiGet(api: string, path: string): Promise<any> {
  const response = await fetch(`${api}/api/v1${path}`, { headers: { authorization: `Bearer ${apiToken}` } });
  if (!response.ok) throw new Error(`GET ${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

function shale(api: string, ...args: string[]): any {
  const result = spawnSync(process.execPath, [MAIN, ...args, '--json'], { encoding: 'utf8', env: { ...process.env, SHALE_API: api } });
  if (result.status !== 0) throw new Error(`shale ${args.join(' ')}: ${result.stderr}`);
  return JSON.parse(result.stdout);
}

async function sleep(ms: number): Promise<void> {
  await new Promise((resolve) => setTimeout(resolve, ms));
}

async function waitFor<T>(what: string, probe: () => T | false | Promise<T | false>, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const value = await probe();
      if (value !== false) return value;
    } catch {
      // not yet
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(250);
  }
}

async function settled(api: string): Promise<boolean> {
  const status = await apiGet(api, '/status');
  const recovery = status.recovery;
  return recovery.replicasRecovering === 0 && recovery.replicasToRemove === 0 && recovery.pgsMoving === 0 && status.pools.every((pool: any) => pool.pgsDegraded === 0);
}

function storePid(dataDir: string, index: number): number {
  return Number(readFileSync(join(dataDir, `store-${index}`, 'store.pid'), 'utf8').trim());
}

async function copiedBy(api: string): Promise<Map<number, number>> {
  const { stores } = await apiGet(api, '/stores');
  return new Map((stores as any[]).map((store) => [store.id, store.recovery?.bytesCopied ?? 0]));
}

async function main(): Promise<void> {
  // 1. The disk's sequential write bandwidth.
  const seq = fio(['--name=seqwrite', `--filename=${join(dir, 'fio.tmp')}`, '--rw=write', '--bs=1M', '--size=2G', '--end_fsync=1', '--ioengine=psync']);
  const diskMiBps = seq.jobs[0].write.bw_bytes / MiB;
  rmSync(join(dir, 'fio.tmp'), { force: true });
  log(`disk sequential write (fio, 1 MiB, buffered + end_fsync): ${diskMiBps.toFixed(0)} MiB/s`);

  // 2. The cluster and the data.
  const dataDir = join(dir, 'data');
  const nbdPort = await freePort();
  const apiPort = await freePort();
  const api = `http://127.0.0.1:${apiPort}`;
  const diskSize = `${Math.max(8, Math.ceil((parseSizeGiB(SIZE) * 3) / 3) + 4)}G`;
  up = spawn(process.execPath, [MAIN, 'up', '--data', dataDir, '--stores', '4', '--disk-size', diskSize, '--nbd-port', String(nbdPort), '--api-port', String(apiPort), '--s3-listen', '127.0.0.1:0',
    '--heartbeat-timeout', '2s', '--down-out-interval', '2s', '--restart-delay', '1h', '--scrub-interval', '0', '--resync-rate', RESYNC_RATE], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  up.stdout!.on('data', (chunk: Buffer) => (output += chunk.toString()));
  up.stderr!.on('data', (chunk: Buffer) => (output += chunk.toString()));
  await waitFor('shale up', () => output.includes('Shale is up') || false, 120_000);
  apiToken = readFileSync(join(dataDir, 'token'), 'utf8').trim();
  await waitFor('placement to settle', async () => (await settled(api)) || false, 300_000);
  shale(api, 'volume', 'create', 'bench', '--size', SIZE, '--replicas', '3');
  const uri = `nbd://127.0.0.1:${nbdPort}/bench`;
  const fillStart = Date.now();
  fio(['--name=fill', '--ioengine=nbd', `--uri=${uri}`, '--rw=write', '--bs=1M', '--iodepth=8', `--size=${SIZE}`]);
  const fillSeconds = (Date.now() - fillStart) / 1000;
  log(`filled ${SIZE} (3 replicas) in ${fillSeconds.toFixed(1)} s: ${(parseSizeGiB(SIZE) * 1024 / fillSeconds).toFixed(0)} MiB/s client writes`);

  // 3. Client IOPS without a rebuild.
  const randread = ['--name=randread', '--ioengine=nbd', `--uri=${uri}`, '--rw=randread', '--bs=4k', '--iodepth=16', `--size=${SIZE}`, '--time_based', `--runtime=${RUNTIME}`];
  const idleIops = fio(randread).jobs[0].read.iops as number;
  log(`client 4 KiB random reads, QD16, no rebuild: ${idleIops.toFixed(0)} IOPS`);

  // 4. Kill a store; time the rebuild.
  const before = await copiedBy(api);
  const victim = 2;
  process.kill(storePid(dataDir, victim), 'SIGKILL');
  const outAt = await waitFor('the store to be marked out', async () => {
    const status = await apiGet(api, '/status');
    return status.recovery.storesOut.includes(victim) ? Date.now() : false;
  }, 60_000);
  const during = fioAsync(randread);
  let peakRate = 0;
  const rebuiltAt = await waitFor('the rebuild', async () => {
    const status = await apiGet(api, '/status');
    peakRate = Math.max(peakRate, status.recovery.bytesPerSecond);
    return (await settled(api)) ? Date.now() : false;
  }, 3_600_000);
  const duringIops = (await during).jobs[0].read.iops as number;
  await sleep(1500);
  const after = await copiedBy(api);
  let rebuiltBytes = 0;
  for (const [id, bytes] of after) if (id !== victim) rebuiltBytes += bytes - (before.get(id) ?? 0);
  const rebuildSeconds = (rebuiltAt - outAt) / 1000;
  const rebuildMiBps = rebuiltBytes / MiB / rebuildSeconds;
  log(`rebuild: ${(rebuiltBytes / MiB).toFixed(0)} MiB in ${rebuildSeconds.toFixed(1)} s = ${rebuildMiBps.toFixed(0)} MiB/s (${((rebuildMiBps / diskMiBps) * 100).toFixed(0)}% of the disk's sequential write)`);
  log(`client 4 KiB random reads, QD16, during the rebuild (first ${RUNTIME} s): ${duringIops.toFixed(0)} IOPS (${((duringIops / idleIops) * 100).toFixed(0)}% of idle)`);

  // 5. Resync after a short outage: store 3 dies, 64 MiB are written, and it is started again on its disk.
  process.kill(storePid(dataDir, 3), 'SIGKILL');
  fio(['--name=outage', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bs=64k', '--iodepth=8', '--size=64M', '--offset=0']);
  const token = readFileSync(join(dataDir, 'token'), 'utf8').trim();
  restarted = spawn(process.execPath, [MAIN, 'store', '--disk', join(dataDir, 'store-3', 'disk.img'), '--listen', '127.0.0.1:0', '--conductor', api, '--domain', 'local-3'],
    { stdio: 'ignore', env: { ...process.env, SHALE_TOKEN: token } });
  await waitFor('store 3 back and clean', async () => {
    const status = await apiGet(api, '/status');
    return (status.stores.up === 3 && (await settled(api))) || false;
  }, 600_000);
  await sleep(1500);
  const resyncBytes = (await copiedBy(api)).get(3) ?? 0; // a restarted store counts from zero
  log(`resync after a short outage with 64 MiB written: ${(resyncBytes / MiB).toFixed(1)} MiB copied (volume ${SIZE})`);

  const table = [
    '| measure | value |',
    '|---|---:|',
    `| disk sequential write (fio 1 MiB, end_fsync) | ${diskMiBps.toFixed(0)} MiB/s |`,
    `| data (3 replicas over 4 stores) | ${SIZE} volume, filled at ${(parseSizeGiB(SIZE) * 1024 / fillSeconds).toFixed(0)} MiB/s |`,
    `| rebuild of a dead store (out → all PGs clean) | ${(rebuiltBytes / MiB).toFixed(0)} MiB in ${rebuildSeconds.toFixed(1)} s = **${rebuildMiBps.toFixed(0)} MiB/s** (${((rebuildMiBps / diskMiBps) * 100).toFixed(0)}% of the disk) |`,
    `| client 4 KiB randread QD16 without rebuild | ${idleIops.toFixed(0)} IOPS |`,
    `| client 4 KiB randread QD16 during rebuild | ${duringIops.toFixed(0)} IOPS (${((duringIops / idleIops) * 100).toFixed(0)}%) |`,
    `| resync after a ~3 s outage, 64 MiB written meanwhile | ${(resyncBytes / MiB).toFixed(1)} MiB copied |`,
  ].join('\n');
  process.stdout.write(`${table}\n`);
  if (process.env.BENCH_LOG) writeFileSync(process.env.BENCH_LOG, output);
}

function parseSizeGiB(text: string): number {
  const match = /^(\d+(?:\.\d+)?)([MG])$/i.exec(text);
  if (!match) throw new Error(`SIZE=${text}: use e.g. 4G or 512M`);
  return Number(match[1]) / (match[2]!.toUpperCase() === 'G' ? 1 : 1024);
}

main().then(
  async () => {
    restarted?.kill('SIGTERM');
    up?.kill('SIGTERM');
    await sleep(3000);
    rmSync(dir, { recursive: true, force: true });
  },
  async (error: unknown) => {
    process.stderr.write(`${(error as Error).stack}\n`);
    restarted?.kill('SIGTERM');
    up?.kill('SIGTERM');
    await sleep(3000);
    rmSync(dir, { recursive: true, force: true });
    process.exitCode = 1;
  },
);
