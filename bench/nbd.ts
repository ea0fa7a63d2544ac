/**
 * NBD block benchmark: Shale beside nbdkit (file plugin) and qemu-nbd on a file of the same size on
 * the same disk, in one run, with fio's nbd engine. Rounds are interleaved (every target once per
 * round) so that load from elsewhere on a shared machine hits all targets alike; the table shows
 * the median of the rounds, the ratio to nbdkit over the same transport, and the ratio to the
 * minimal Node.js log server (node-minimal-log, bench/minimal-nbd.ts), the least a
 * log-structured store in Node.js does per request. It also gives the
 * server's CPU time per operation (user + system of every server process and thread, from
 * /proc/PID/stat, over the fio run): a figure that load from elsewhere disturbs far less than IOPS;
 * and fio's own CPU per operation, since client and server share the machine's cores. Read
 * workloads read page-cached data (every target is read once right before its run); with
 * DROP_CACHES=1 the page cache is emptied before every run instead (cold reads, root only).
 *
 *   npm run bench:nbd                      # all targets, all workloads, RUNS=3 rounds of RUNTIME=10 s
 *   RUNS=5 RUNTIME=20 npm run bench:nbd
 *   TARGETS=nbdkit-file-tcp,shale-1-replica-tcp WORKLOADS=randread_4k_qd32 npm run bench:nbd
 *   DROP_CACHES=1 WORKLOADS=randread_4k_qd32 npm run bench:nbd
 *   WRITE_PAGES=keep WORKLOADS=randwrite_4k_qd32 npm run bench:nbd   # writes over the pages earlier runs left
 *   CACHE_SIZE=0 TARGETS=shale-1-replica-unix npm run bench:nbd     # Shale's stores without their read cache
 *
 * Targets: nbdkit file plugin (tcp, unix), qemu-nbd (--cache=none --aio=threads, unix), the
 * minimal Node.js servers of bench/minimal-nbd.ts, in place on a 1 GiB file (node-minimal) and as
 * a log on a 4 GiB file (node-minimal-log), tcp and unix: what one Node.js thread does with no
 * storage logic, the yardsticks for Node's cost and the log's; Shale with
 * 1 replica on `shale up --stores 1` (the store engine in the gateway's process) and with 3
 * replicas on `shale up --stores 3` (3 store processes), each over TCP and a unix socket.
 * Volumes and files are 1 GiB, written once (1 MiB sequential) before measuring.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { accessSync, constants, existsSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort, log, MAIN } from './support.ts';

const MINIMAL_SERVER = join(import.meta.dirname, 'minimal-nbd.ts');

const RUNS = Number(process.env.RUNS ?? 3);
const RUNTIME = Number(process.env.RUNTIME ?? 10);
const SIZE = '1G';
/**
 * Read workloads measure data in the page cache by default: each target is read once, sequentially,
 * right before its measured run (this VM's kernel pages out file pages left untouched for ~30 s,
 * so without it a target measured after the others' turns starts cold). A Shale volume with R
 * replicas is read R times: the gateway sends each read to one replica, in turn, so R passes read
 * every replica's copy once (a single pass left two thirds of each store's copy cold, and the
 * 3-replica random reads measured the disk). The same pass fills a Shale store's own read cache
 * (--cache-size, on by default) while it has room, as any sequential reader would.
 * DROP_CACHES=1 (root) measures the other case: the page cache is emptied before every measured
 * run (Shale's cache is not: with CACHE_SIZE=0 the Shale targets run without one).
 */
const DROP_CACHES = process.env.DROP_CACHES === '1';
/**
 * Write workloads start from the same page-cache state on every target: before each write run, the
 * target's backing files (nbdkit's and qemu-nbd's image, each Shale store's disk file) are written
 * back and dropped from the page cache (`dd oflag=nocache conv=fdatasync count=0`). Without it the
 * peers' 4 KiB random writes depend on history: this machine's kernel (6.18) keeps a file's page
 * cache in large folios when large writes or readahead filled it, and ext4 walks every block of
 * the folio on each 4 KiB write into one. nbdkit's file plugin measured 19k IOPS over the pages the
 * 1 MiB fill left and 135k over pages its own 4 KiB writes made; which one a run saw depended on
 * whether the kernel had paged the file out in the meantime. Dropping the pages gives every
 * target the pages its own writes make; WRITE_PAGES=keep writes over whatever earlier runs left.
 * Run as root, the whole page cache is emptied too (CAN_DROP_ALL).
 */
const WRITE_PAGES_KEPT = process.env.WRITE_PAGES === 'keep';
/**
 * Root may empty the whole page cache before each write run, not only the target's files. On this
 * VM a page-cache page costs a write several times more when it comes from free memory the guest
 * has handed back to the host (free page reporting) than when it was freed a moment ago; emptying
 * the cache gives every target's writes the same start, whatever the target before it wrote.
 */
const CAN_DROP_ALL = (() => {
  try {
    accessSync('/proc/sys/vm/drop_caches', constants.W_OK);
    return true;
  } catch {
    return false;
  }
})();
/** `--busy-poll` for the Shale gateways (µs); unset: shale up's default. */
const BUSY_POLL = process.env.BUSY_POLL;
/** `--cache-size` for the Shale stores; unset: shale up's default (auto). */
const CACHE_SIZE = process.env.CACHE_SIZE;
const CLOCK_TICKS_PER_SECOND = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100;

const WORKLOADS: Record<string, string[]> = {
  randread_4k_qd1: ['--rw=randread', '--bs=4k', '--iodepth=1'],
  randread_4k_qd32: ['--rw=randread', '--bs=4k', '--iodepth=32'],
  randwrite_4k_qd1: ['--rw=randwrite', '--bs=4k', '--iodepth=1'],
  randwrite_4k_qd32: ['--rw=randwrite', '--bs=4k', '--iodepth=32'],
  seqread_1m_qd8: ['--rw=read', '--bs=1M', '--iodepth=8'],
  seqwrite_1m_qd8: ['--rw=write', '--bs=1M', '--iodepth=8'],
};

interface Target {
  name: string;
  transport: 'tcp' | 'unix';
  uri: string;
  pids: () => number[];
  /** Copies of the data behind the target, each read once before a read run. */
  replicas?: number;
  /** The files holding the target's data, dropped from the page cache before a write run. */
  files: string[];
}

const dir = mkdtempSync(join(tmpdir(), 'shale-bench-nbd-'));
const children: ChildProcess[] = [];

function start(command: string, args: string[], env: NodeJS.ProcessEnv = {}): ChildProcess {
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  let output = '';
  child.stdout!.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr!.on('data', (chunk: Buffer) => (output += chunk.toString()));
  (child as ChildProcess & { output: () => string }).output = () => output;
  children.push(child);
  return child;
}

async function waitFor(what: string, ready: () => boolean, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ready()) {
    if (Date.now() > deadline) throw new Error(`${what} did not come up`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

function has(tool: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;
}

interface FioResult {
  iops: number;
  mibps: number;
  p50us: number;
  p99us: number;
  ios: number;
  /** fio's own CPU time per I/O (the client's share of the 2 cores). */
  clientCpuUsPerOp: number;
}

/** CPU seconds (user + system, every thread) used so far by the processes, from /proc. */
function cpuSeconds(pids: readonly number[]): number {
  let ticks = 0;
  for (const pid of pids) {
    try {
      // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
      const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
      ticks += Number(fields[11]) + Number(fields[12]);
    } catch {
      // The process is gone: it uses no more CPU.
    }
  }
  return ticks / CLOCK_TICKS_PER_SECOND;
}

function fio(uri: string, args: string[], runtime: number, extra: string[] = []): FioResult {
  const output = join(dir, 'fio.json');
  const result = spawnSync('fio', [
    '--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--size=${SIZE}`, '--time_based', `--runtime=${runtime}`,
    '--norandommap', '--randrepeat=0', '--output-format=json', `--output=${output}`, ...args, ...extra,
  ], { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`fio failed on ${uri}: ${result.stderr}`);
  const job = JSON.parse(readFileSync(output, 'utf8')).jobs[0];
  const side = job.read.iops > job.write.iops ? job.read : job.write;
  const percentile = side.clat_ns.percentile ?? {};
  const clientCpuUsPerOp = ((job.usr_cpu + job.sys_cpu) / 100) * job.job_runtime * 1000 / Math.max(1, side.total_ios);
  return { iops: side.iops, mibps: side.bw / 1024, p50us: (percentile['50.000000'] ?? 0) / 1000, p99us: (percentile['99.000000'] ?? 0) / 1000, ios: side.total_ios, clientCpuUsPerOp };
}

async function shaleUp(name: string, stores: number): Promise<Target[]> {
  const nbdPort = await freePort();
  const apiPort = await freePort();
  const socket = join(dir, `${name}.sock`);
  const child = start(process.execPath, [
    MAIN, 'up', '--data', join(dir, name), '--stores', String(stores), '--disk-size', '4G',
    '--nbd-port', String(nbdPort), '--api-port', String(apiPort), '--nbd-socket', socket, '--s3-listen', '127.0.0.1:0',
    ...(BUSY_POLL === undefined ? [] : ['--busy-poll', BUSY_POLL]),
    ...(CACHE_SIZE === undefined ? [] : ['--cache-size', CACHE_SIZE]),
  ], { SHALE_CONFIG_DIR: join(dir, `${name}-config`) });
  const output = (child as ChildProcess & { output: () => string }).output;
  await waitFor(`shale up (${name})`, () => output().includes('Shale is up'));
  const create = spawnSync(process.execPath, [MAIN, 'volume', 'create', 'bench', '--size', SIZE, '--replicas', String(Math.min(3, stores))], {
    encoding: 'utf8', env: { ...process.env, SHALE_API: `http://127.0.0.1:${apiPort}`, SHALE_CONFIG_DIR: join(dir, `${name}-config`) },
  });
  if (create.status !== 0) throw new Error(`volume create on ${name}: ${create.stderr}`);
  const pids = (): number[] => {
    const list = spawnSync('pgrep', ['-f', join(dir, name)], { encoding: 'utf8' }).stdout.trim().split('\n').filter(Boolean).map(Number);
    return list;
  };
  const files = Array.from({ length: stores }, (_, index) => join(dir, name, `store-${index + 1}`, 'disk.img'));
  for (const file of files) if (!existsSync(file)) throw new Error(`${name}: no store disk at ${file}`);
  return [
    { name, transport: 'tcp', uri: `nbd://127.0.0.1:${nbdPort}/bench`, pids, replicas: Math.min(3, stores), files },
    { name, transport: 'unix', uri: `nbd+unix:///bench?socket=${socket}`, pids, replicas: Math.min(3, stores), files },
  ];
}

async function main(): Promise<void> {
  for (const tool of ['fio', 'nbdkit', 'qemu-nbd']) {
    if (!has(tool)) throw new Error(`${tool} is missing: apt-get install fio nbdkit qemu-utils`);
  }
  const only = process.env.TARGETS?.split(',');
  const workloads = Object.entries(WORKLOADS).filter(([name]) => !process.env.WORKLOADS || process.env.WORKLOADS.split(',').includes(name));
  const targets: Target[] = [];
  const wanted = (name: string): boolean => !only || only.some((entry) => entry === `${name}-tcp` || entry === `${name}-unix`);

  const nbdkitFile = join(dir, 'nbdkit.img');
  truncateSync(writeFileAndReturn(nbdkitFile), 1024 ** 3);
  const nbdkitPort = await freePort();
  const nbdkitSocket = join(dir, 'nbdkit.sock');
  const nbdkitTcp = start('nbdkit', ['-f', '-p', String(nbdkitPort), 'file', nbdkitFile]);
  const nbdkitUnix = start('nbdkit', ['-f', '-U', nbdkitSocket, 'file', nbdkitFile]);
  targets.push({ name: 'nbdkit-file', transport: 'tcp', uri: `nbd://127.0.0.1:${nbdkitPort}/`, pids: () => [nbdkitTcp.pid!], files: [nbdkitFile] });
  targets.push({ name: 'nbdkit-file', transport: 'unix', uri: `nbd+unix:///?socket=${nbdkitSocket}`, pids: () => [nbdkitUnix.pid!], files: [nbdkitFile] });

  const qemuFile = join(dir, 'qemu.img');
  truncateSync(writeFileAndReturn(qemuFile), 1024 ** 3);
  const qemuSocket = join(dir, 'qemu.sock');
  const qemu = start('qemu-nbd', ['--persistent', '--shared=8', '--cache=none', '--aio=threads', '--format=raw', `--socket=${qemuSocket}`, qemuFile]);
  targets.push({ name: 'qemu-nbd', transport: 'unix', uri: `nbd+unix:///?socket=${qemuSocket}`, pids: () => [qemu.pid!], files: [qemuFile] });

  // The minimal Node.js servers: in place on a 1 GiB file, and as a log on a 4 GiB file (Shale's
  // disk size here) holding a 1 GiB export.
  for (const [name, fileBytes, extra] of [['node-minimal', 1024 ** 3, []], ['node-minimal-log', 4 * 1024 ** 3, ['--log', String(1024 ** 3)]]] as const) {
    if (!wanted(name)) continue;
    const file = join(dir, `${name}.img`);
    truncateSync(writeFileAndReturn(file), fileBytes);
    const port = await freePort();
    const socket = join(dir, `${name}.sock`);
    const tcp = start(process.execPath, [MINIMAL_SERVER, file, `tcp:${port}`, ...extra]);
    const unix = start(process.execPath, [MINIMAL_SERVER, file, `unix:${socket}`, ...extra]);
    for (const server of [tcp, unix]) {
      await waitFor(name, () => (server as ChildProcess & { output: () => string }).output().includes('minimal NBD server on'));
    }
    targets.push({ name, transport: 'tcp', uri: `nbd://127.0.0.1:${port}/`, pids: () => [tcp.pid!], files: [file] });
    targets.push({ name, transport: 'unix', uri: `nbd+unix:///?socket=${socket}`, pids: () => [unix.pid!], files: [file] });
  }

  // Shale clusters are started only when one of their targets is measured.
  if (wanted('shale-1-replica')) targets.push(...(await shaleUp('shale-1-replica', 1)));
  if (wanted('shale-3-replicas')) targets.push(...(await shaleUp('shale-3-replicas', 3)));
  const chosen = targets.filter((target) => !only || only.includes(`${target.name}-${target.transport}`));
  await new Promise((resolve) => setTimeout(resolve, 1000));

  for (const target of chosen) {
    log(`filling ${target.name} over ${target.transport}`);
    fio(target.uri, ['--rw=write', '--bs=1M', '--iodepth=8'], 0, ['--time_based=0']);
  }

  const results = new Map<string, (FioResult & { cpuUsPerOp: number })[]>();
  for (let round = 1; round <= RUNS; round++) {
    for (const [workload, args] of workloads) {
      for (const target of chosen) {
        const key = `${workload}|${target.name}|${target.transport}`;
        const pids = target.pids();
        if (DROP_CACHES) dropPageCache();
        else if (args.some((arg) => arg.includes('write'))) {
          if (!WRITE_PAGES_KEPT) {
            for (const file of target.files) dropFilePages(file);
            if (CAN_DROP_ALL) dropPageCache();
          }
        } else if (args.some((arg) => arg.includes('read'))) {
          for (let pass = 0; pass < (target.replicas ?? 1); pass++) fio(target.uri, ['--rw=read', '--bs=1M', '--iodepth=8'], 0, ['--time_based=0']);
        }
        // Nothing dirty anywhere: a run does not pay for writing back what the target before it
        // wrote (node-minimal-log's writes leave gigabytes dirty, past the background threshold).
        spawnSync('sync');
        const cpuBefore = cpuSeconds(pids);
        const measured = fio(target.uri, args, RUNTIME);
        const result = { ...measured, cpuUsPerOp: ((cpuSeconds(pids) - cpuBefore) * 1e6) / Math.max(1, measured.ios) };
        log(`round ${round} ${workload} ${target.name}/${target.transport}: ${Math.round(result.iops)} IOPS, ${result.mibps.toFixed(0)} MiB/s, p50 ${result.p50us.toFixed(0)} µs, ${result.cpuUsPerOp.toFixed(1)} CPU µs/op (fio ${result.clientCpuUsPerOp.toFixed(1)})`);
        results.set(key, [...(results.get(key) ?? []), result]);
      }
    }
  }

  const median = (values: number[]): number => {
    const sorted = [...values].sort((a, b) => a - b);
    return sorted[Math.floor(sorted.length / 2)]!;
  };
  const lines: string[] = [];
  lines.push(`| workload | target | transport | IOPS (median) | MiB/s | p50 µs | p99 µs | server CPU µs/op | fio CPU µs/op | vs nbdkit-file (same transport) | vs node-minimal-log (same transport) |`);
  lines.push('|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|');
  for (const [workload] of workloads) {
    for (const target of chosen) {
      const runs = results.get(`${workload}|${target.name}|${target.transport}`)!;
      const iops = median(runs.map((run) => run.iops));
      const ratioTo = (name: string): string => {
        const reference = results.get(`${workload}|${name}|${target.transport}`);
        return reference ? `${(iops / median(reference.map((run) => run.iops))).toFixed(2)}×` : '–';
      };
      lines.push(`| ${workload} | ${target.name} | ${target.transport} | ${Math.round(iops)} | ${median(runs.map((run) => run.mibps)).toFixed(0)} | ${median(runs.map((run) => run.p50us)).toFixed(0)} | ${median(runs.map((run) => run.p99us)).toFixed(0)} | ${median(runs.map((run) => run.cpuUsPerOp)).toFixed(1)} | ${median(runs.map((run) => run.clientCpuUsPerOp)).toFixed(1)} | ${ratioTo('nbdkit-file')} | ${ratioTo('node-minimal-log')} |`);
    }
  }
  const loadavg = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  const cache = DROP_CACHES ? 'page cache emptied before each run'
    : `reads of page-cached data (every copy of the data read once before its run); ${WRITE_PAGES_KEPT ? 'writes over the pages earlier runs left' : CAN_DROP_ALL ? 'writes after the page cache was emptied' : 'writes after the data files left the page cache'}`;
  process.stdout.write(`\nNBD benchmark: ${RUNS} rounds × ${RUNTIME} s per workload and target, medians; ${cache}; ${cpuDescription()}; load average at the end ${loadavg}\n\n${lines.join('\n')}\n`);
}

/**
 * The CPUs and how idle ones wait: on a VM whose idle vCPUs halt at once (haltpoll with no guest
 * polling), every wake-up of fio or of a server thread costs a VM exit (docs/benchmarks.md). And
 * whether the guest hands free memory back to the host (free page reporting): there, a page the
 * page cache takes for the first time after a pause costs a host fault, which a log-structured
 * store's writes pay on every new block and an in-place file's rewrites do not (docs/benchmarks.md,
 * "Why ad-hoc write runs differ twofold").
 */
function cpuDescription(): string {
  const read = (path: string): string | undefined => {
    try {
      return readFileSync(path, 'utf8').trim();
    } catch {
      return undefined;
    }
  };
  const driver = read('/sys/devices/system/cpu/cpuidle/current_driver');
  const haltPollNs = driver === 'haltpoll' ? read('/sys/module/haltpoll/parameters/guest_halt_poll_ns') : undefined;
  const idle = driver === undefined ? 'cpuidle unknown' : `cpuidle ${driver}${haltPollNs === undefined ? '' : ` (guest halt polling ${haltPollNs} ns)`}`;
  const reportingOrder = read('/sys/module/page_reporting/parameters/page_reporting_order');
  const reportedKib = Number(read('/sys/module/page_reporting/parameters/reported_kib') ?? Number.NaN);
  const reporting = reportingOrder === undefined ? 'no free page reporting'
    : `free page reporting at order ${reportingOrder}${reportedKib > 0 ? ` (${(reportedKib / 1024 / 1024).toFixed(0)} GiB handed back to the host since boot)` : ''}`;
  return `${availableParallelism()} CPUs, ${idle}, ${reporting}`;
}

function dropPageCache(): void {
  spawnSync('sync');
  writeFileSync('/proc/sys/vm/drop_caches', '1');
}

/** Writes the file's dirty pages back and drops all its pages from the page cache (GNU dd's `nocache`). */
function dropFilePages(file: string): void {
  const result = spawnSync('dd', [`of=${file}`, 'oflag=nocache', 'conv=notrunc,fdatasync', 'count=0', 'status=none'], { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`dropping ${file} from the page cache: ${result.stderr}`);
}

function writeFileAndReturn(path: string): string {
  writeFileSync(path, '');
  return path;
}

try {
  await main();
} catch (error) {
  // What the servers said last, so that a failed run can be understood after its directory is gone.
  for (const child of children) {
    const lines = (child as ChildProcess & { output: () => string }).output().trimEnd().split('\n').slice(-30);
    if (lines.join('').length > 0) log(`last output of ${child.spawnargs.slice(0, 4).join(' ')} (pid ${child.pid}):\n${lines.join('\n')}`);
  }
  throw error;
} finally {
  for (const child of children) child.kill('SIGTERM');
  await new Promise((resolve) => setTimeout(resolve, 3000));
  for (const child of children) if (child.exitCode === null) child.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
}
