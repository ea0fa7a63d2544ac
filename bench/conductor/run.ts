/**
 * Control-plane benchmark (`npm run bench:conductor`), results in docs/benchmarks.md
 * "## Control plane":
 *   1. API throughput: volume create (1 and 16 requests in flight) and volume list (100 volumes),
 *      with SQLite and with etcd (1 member, and 3 members on loopback);
 *   2. conductor failover: 3 `shale conductor` processes on a 3-member etcd; kill -9 the leader;
 *      time until another leads and until a write through the ConductorClient succeeds;
 *   3. PG-map push latency: 100 simulated stores long-poll GET /map; a change is committed; time
 *      until each store has the new map (SQLite; etcd with the stores split over leader and standby).
 * Everything runs on this machine over loopback; etcd is Debian's etcd-server. Options:
 *   --quick              fewer repetitions (a smoke run)
 *   BENCH_ONLY=throughput|failover|push   one part only
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ClusterMap } from '../../src/conductor/api/types.ts';
import { type Conductor, startConductor } from '../../src/conductor/conductor.ts';
import { type EtcdCluster, freePort, startEtcdCluster } from '../../src/conductor/testing/etcd-cluster.ts';
import { nodeEnv } from '../../src/env/node/node-env.ts';
import { ConductorClient } from '../../src/proto/conductor-client.ts';

const quick = process.argv.includes('--quick');
const MAIN = fileURLToPath(new URL('../../src/cli/main.ts', import.meta.url));
const dir = mkdtempSync(join(tmpdir(), 'shale-bench-conductor-'));
const agent = new http.Agent({ keepAlive: true, maxSockets: 1024 });

interface Reply {
  status: number;
  body: string;
}

function call(base: string, token: string | undefined, method: string, path: string, body?: unknown): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const request = http.request(`${base}/api/v1${path}`, {
      method, agent,
      headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), ...(payload ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } : {}) },
    }, (response) => {
      const chunks: Buffer[] = [];
      response.on('data', (chunk: Buffer) => chunks.push(chunk));
      response.on('end', () => resolve({ status: response.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }));
      response.on('error', reject);
    });
    request.on('error', reject);
    request.end(payload);
  });
}

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

const ms = (value: number): string => value.toFixed(value < 10 ? 2 : 1);

async function registerStores(base: string, token: string | undefined, clusterId: string, count: number): Promise<void> {
  for (let n = 1; n <= count; n++) {
    const reply = await call(base, token, 'POST', '/stores/register', {
      diskUuid: `bench-disk-${n}`, clusterId, address: `127.0.0.1:${30000 + n}`, domain: `host-${n}`,
      disks: [{ uuid: `bench-disk-${n}`, path: `/d${n}`, capacityBytes: 2 ** 40, usedBytes: 0 }],
    });
    if (reply.status !== 200) throw new Error(`register: ${reply.status} ${reply.body}`);
  }
}

// ---- 1. API throughput -------------------------------------------------------------------------

interface ThroughputResult {
  engine: string;
  createSerialPerSecond: number;
  createSerialMs: number;
  createConcurrentPerSecond: number;
  listPerSecond: number;
  listMs: number;
}

async function throughput(engine: string, metaPath: string): Promise<ThroughputResult> {
  const conductor = await startConductor(nodeEnv, { metaPath, listen: '127.0.0.1:0', pgCount: 256, auth: 'token' });
  const token = conductor.newAdminToken!;
  const base = `http://${conductor.address}`;
  try {
    await registerStores(base, token, conductor.clusterId, 3);
    const serial = quick ? 50 : 300;
    let started = performance.now();
    for (let i = 0; i < serial; i++) {
      const reply = await call(base, token, 'POST', '/volumes', { name: `s${i}`, size: '1G' });
      if (reply.status !== 201) throw new Error(`create: ${reply.status} ${reply.body}`);
    }
    const serialSeconds = (performance.now() - started) / 1000;
    const concurrent = quick ? 64 : 480;
    const inFlight = 16;
    started = performance.now();
    let next = 0;
    await Promise.all(Array.from({ length: inFlight }, async () => {
      while (next < concurrent) {
        const i = next++;
        const reply = await call(base, token, 'POST', '/volumes', { name: `c${i}`, size: '1G' });
        if (reply.status !== 201) throw new Error(`create: ${reply.status} ${reply.body}`);
      }
    }));
    const concurrentSeconds = (performance.now() - started) / 1000;
    // List: delete down to 100 volumes first, so the figure is for a list of 100.
    const { volumes } = JSON.parse((await call(base, token, 'GET', '/volumes')).body) as { volumes: { name: string }[] };
    for (const volume of volumes.slice(100)) await call(base, token, 'DELETE', `/volumes/${volume.name}`);
    const lists = quick ? 50 : 300;
    const latencies: number[] = [];
    started = performance.now();
    for (let i = 0; i < lists; i++) {
      const at = performance.now();
      const reply = await call(base, token, 'GET', '/volumes');
      if (reply.status !== 200) throw new Error(`list: ${reply.status}`);
      latencies.push(performance.now() - at);
    }
    const listSeconds = (performance.now() - started) / 1000;
    return {
      engine,
      createSerialPerSecond: serial / serialSeconds,
      createSerialMs: (serialSeconds * 1000) / serial,
      createConcurrentPerSecond: concurrent / concurrentSeconds,
      listPerSecond: lists / listSeconds,
      listMs: percentile(latencies, 50),
    };
  } finally {
    await conductor.close();
  }
}

// ---- 2. failover ---------------------------------------------------------------------------------

interface ConductorProcess {
  url: string;
  child: ChildProcess;
  /** Its log, shown if a round fails. */
  output: string[];
}

async function startConductorProcess(etcd: EtcdCluster, prefix: string, leaseTtl: string, configDir: string, port?: number): Promise<ConductorProcess> {
  port ??= await freePort();
  const child = spawn(process.execPath, [
    MAIN, 'conductor', '--meta', etcd.metaUrl(prefix), '--listen', `127.0.0.1:${port}`, '--lease-ttl', leaseTtl, '--pgs', '64',
  ], { env: { ...process.env, SHALE_CONFIG_DIR: configDir, SHALE_TOKEN: '' }, stdio: ['ignore', 'ignore', 'pipe'] });
  const output: string[] = [];
  child.stderr!.on('data', (chunk: Buffer) => output.push(chunk.toString()));
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 30_000;
  for (;;) {
    const reply = await call(url, undefined, 'GET', '/openapi.json').catch(() => undefined);
    if (reply?.status === 200) break;
    if (Date.now() > deadline) throw new Error('conductor did not start');
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return { url, child, output };
}

async function leading(conductor: ConductorProcess, token: string): Promise<boolean> {
  const reply = await call(conductor.url, token, 'GET', '/conductor').catch(() => undefined);
  return reply?.status === 200 && (JSON.parse(reply.body) as { leading: boolean }).leading;
}

interface FailoverResult {
  leaseTtl: string;
  electedMs: number[];
  writableMs: number[];
}

async function failover(etcd: EtcdCluster, leaseTtl: string, rounds: number): Promise<FailoverResult> {
  const configDir = join(dir, `config-${leaseTtl}`);
  const prefix = `/bench-failover-${leaseTtl}`;
  const conductors: ConductorProcess[] = [];
  for (let i = 0; i < 3; i++) conductors.push(await startConductorProcess(etcd, prefix, leaseTtl, configDir));
  const token = readFileSync(join(configDir, 'token'), 'utf8').trim();
  const killAll = (): void => {
    for (const conductor of conductors) conductor.child.kill('SIGKILL');
  };
  process.on('exit', killAll);
  const client = new ConductorClient(nodeEnv, conductors.map((c) => c.url), { token });
  const { clusterId } = await client.cluster();
  const result: FailoverResult = { leaseTtl, electedMs: [], writableMs: [] };
  try {
    for (let round = 0; round < rounds; round++) {
      let leader: ConductorProcess | undefined;
      while (!leader) {
        for (const conductor of conductors) if (await leading(conductor, token)) leader = conductor;
        if (!leader) await new Promise((resolve) => setTimeout(resolve, 50));
      }
      await client.call('GET', '/status');
      const killedAt = performance.now();
      leader.child.kill('SIGKILL');
      let electedMs: number | undefined;
      let writableMs: number | undefined;
      while (writableMs === undefined) {
        if (performance.now() - killedAt > 60_000) {
          throw new Error(`no conductor took over within 60 s:\n${conductors.map((c) => `--- ${c.url}\n${c.output.join('')}`).join('\n')}`);
        }
        if (electedMs === undefined) {
          for (const conductor of conductors) {
            if (conductor !== leader && (await leading(conductor, token))) electedMs = performance.now() - killedAt;
          }
        }
        try {
          // A committed change: a store registering on a new address (a new map epoch).
          await client.register({
            diskUuid: 'bench-failover-disk', clusterId, address: `127.0.0.1:${20000 + round}`, domain: 'h', disks: [],
          });
          writableMs = performance.now() - killedAt;
        } catch {
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
      }
      result.electedMs.push(electedMs ?? writableMs);
      result.writableMs.push(writableMs);
      // Bring the killed one back on its address, as a service manager would, as a standby for the next round.
      conductors[conductors.indexOf(leader)] = await startConductorProcess(etcd, prefix, leaseTtl, configDir, Number(new URL(leader.url).port));
    }
  } finally {
    killAll();
    process.off('exit', killAll);
  }
  return result;
}

// ---- 3. map push latency ---------------------------------------------------------------------------

interface PushResult {
  setup: string;
  stores: number;
  /** Median time from sending the change to the leader's answer (the commit). */
  commitMs: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
}

/** One simulated store: a long poll on `base`; resolves with the time the new map arrived. */
function longPoll(base: string, token: string, since: number): Promise<{ at: number; epoch: number }> {
  return call(base, token, 'GET', `/map?since=${since}&waitMs=60000`).then((reply) => {
    const at = performance.now();
    if (reply.status !== 200) throw new Error(`map: ${reply.status} ${reply.body}`);
    return { at, epoch: (JSON.parse(reply.body) as ClusterMap).epoch };
  });
}

async function push(setup: string, conductors: Conductor[], token: string, storeCount: number, rounds: number): Promise<PushResult> {
  const leader = conductors.find((c) => c.isLeader)!;
  const leaderBase = `http://${leader.address}`;
  const delays: number[] = [];
  const commits: number[] = [];
  for (let round = 0; round < rounds; round++) {
    const epoch = (JSON.parse((await call(leaderBase, token, 'GET', '/map')).body) as ClusterMap).epoch;
    const polls = Array.from({ length: storeCount }, (_, i) => longPoll(`http://${conductors[i % conductors.length]!.address}`, token, epoch));
    const settled = Promise.allSettled(polls);
    // Let every poll reach its conductor and wait.
    await new Promise((resolve) => setTimeout(resolve, 300));
    const committedAt = performance.now();
    const reply = await call(leaderBase, token, 'POST', '/volumes/push/open', { owner: 'gw', takeover: true });
    if (reply.status !== 200) {
      await settled;
      throw new Error(`open: ${reply.status} ${reply.body}`);
    }
    commits.push(performance.now() - committedAt);
    for (const { at, epoch: seen } of await Promise.all(polls)) {
      if (seen <= epoch) throw new Error('a poll answered without the new map');
      // From sending the change: includes its commit (fsync, etcd quorum), then the push.
      delays.push(at - committedAt);
    }
  }
  return { setup, stores: storeCount, commitMs: percentile(commits, 50), p50Ms: percentile(delays, 50), p99Ms: percentile(delays, 99), maxMs: Math.max(...delays) };
}

async function pushBench(setup: string, metaPath: string, conductorCount: number, rounds: number): Promise<PushResult> {
  const conductors: Conductor[] = [];
  const first = await startConductor(nodeEnv, { metaPath, listen: '127.0.0.1:0', pgCount: 256, auth: 'token', electionPollMs: 100 });
  conductors.push(first);
  const token = first.newAdminToken!;
  try {
    for (let i = 1; i < conductorCount; i++) conductors.push(await startConductor(nodeEnv, { metaPath, listen: '127.0.0.1:0', pgCount: 256, auth: 'token', electionPollMs: 100 }));
    const base = `http://${first.address}`;
    await registerStores(base, token, first.clusterId, 3);
    await call(base, token, 'POST', '/volumes', { name: 'push', size: '1G' });
    return await push(setup, conductors, token, 100, rounds);
  } finally {
    for (const conductor of conductors.reverse()) await conductor.close();
  }
}

// ---- main ------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const lines: string[] = [];
  const say = (line: string): void => {
    lines.push(line);
    process.stdout.write(`${line}\n`);
  };
  say(`# Shale control-plane benchmark — ${new Date().toISOString()}, ${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, Node ${process.version}${quick ? ' (quick)' : ''}`);
  const etcd1 = await startEtcdCluster(1);
  const etcd3 = await startEtcdCluster(3);
  const only = process.env.BENCH_ONLY;
  try {
    if (!only || only === 'throughput') {
    say('');
    say('| engine | create, 1 in flight | create latency | create, 16 in flight | list 100 volumes | list latency p50 |');
    say('|---|---|---|---|---|---|');
    for (const [engine, metaPath] of [
      ['SQLite (synchronous=FULL)', `sqlite:${join(dir, 'throughput.db')}`],
      ['etcd, 1 member', etcd1.metaUrl('/bench-throughput')],
      ['etcd, 3 members', etcd3.metaUrl('/bench-throughput')],
    ] as const) {
      const r = await throughput(engine, metaPath);
      say(`| ${r.engine} | ${r.createSerialPerSecond.toFixed(0)}/s | ${ms(r.createSerialMs)} ms | ${r.createConcurrentPerSecond.toFixed(0)}/s | ${r.listPerSecond.toFixed(0)}/s | ${ms(r.listMs)} ms |`);
    }
    }
    if (!only || only === 'failover') {

    say('');
    say('| failover (3 conductors, 3-member etcd, kill -9 of the leader) | new leader: median / max | writable again: median / max |');
    say('|---|---|---|');
    for (const leaseTtl of ['2s', '5s']) {
      const r = await failover(etcd3, leaseTtl, quick ? 1 : 5);
      say(`| lease TTL ${leaseTtl}, ${r.electedMs.length} kills | ${ms(percentile(r.electedMs, 50))} / ${ms(Math.max(...r.electedMs))} ms | ${ms(percentile(r.writableMs, 50))} / ${ms(Math.max(...r.writableMs))} ms |`);
    }
    }
    if (!only || only === 'push') {

    say('');
    say('| map push to 100 simulated stores (long polls), from sending the change | commit (median) | every store has it: p50 | p99 | max |');
    say('|---|---|---|---|---|');
    const rounds = quick ? 3 : 20;
    for (const r of [
      await pushBench('SQLite, 1 conductor', `sqlite:${join(dir, 'push.db')}`, 1, rounds),
      await pushBench('etcd (3 members), 1 conductor', etcd3.metaUrl('/bench-push-1'), 1, rounds),
      await pushBench('etcd (3 members), leader + standby, stores split', etcd3.metaUrl('/bench-push-2'), 2, rounds),
    ]) {
      say(`| ${r.setup} | ${ms(r.commitMs)} ms | ${ms(r.p50Ms)} ms | ${ms(r.p99Ms)} ms | ${ms(r.maxMs)} ms |`);
    }
    }
  } finally {
    await etcd1.stop();
    await etcd3.stop();
    agent.destroy();
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
