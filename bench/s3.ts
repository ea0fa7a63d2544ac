/**
 * S3 benchmark: PUT and GET of 4 KiB and 1 MiB objects with 16 concurrent clients (AWS SDK v3,
 * one keep-alive socket per client) against the S3 gateway of `shale up`, for each topology:
 * 3 store processes (3 replicas) and 1 store inside the gateway's process (1 replica).
 *
 *   npm run bench:s3                               # both topologies, DURATION=10 s per phase
 *   DURATION=20 TOPOLOGIES=3 npm run bench:s3
 *
 * Each phase runs for DURATION seconds: PUT phase writes fresh keys, GET phase reads random keys
 * written by the PUT phase. Printed: ops/s and MiB/s per phase, and the median latency.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { Agent } from 'node:http';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CreateBucketCommand, GetObjectCommand, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { freePort, log, MAIN } from './support.ts';

const DURATION_S = Number(process.env.DURATION ?? 10);
const TOPOLOGIES = (process.env.TOPOLOGIES ?? '3,1').split(',').map(Number);
const CLIENTS = Number(process.env.CLIENTS ?? 16);
const SIZES = [4 * 1024, 1024 * 1024];
const KEY = { accessKeyId: 'AKBENCH', secretAccessKey: 'bench-secret-key' };

async function startUp(dir: string, stores: number): Promise<{ child: ChildProcess; api: string; s3: string; token: string }> {
  const apiPort = await freePort();
  const child = spawn(process.execPath, [MAIN, 'up', '--data', join(dir, 'data'), '--stores', String(stores), '--disk-size', '4G',
    '--api-port', String(apiPort), '--nbd-port', String(await freePort()), '--s3-listen', `127.0.0.1:${await freePort()}`], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`shale up did not start:\n${output}`)), 120_000);
    child.stdout!.on('data', (chunk: Buffer) => {
      output += chunk.toString();
      if (output.includes('Shale is up')) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.stderr!.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.on('exit', () => reject(new Error(`shale up exited:\n${output}`)));
  });
  const s3 = /S3\s+(http:\/\/\S+)/.exec(output)![1]!;
  return { child, api: `http://127.0.0.1:${apiPort}`, s3, token: readFileSync(join(dir, 'data', 'token'), 'utf8').trim() };
}

interface PhaseResult {
  ops: number;
  bytes: number;
  seconds: number;
  latencyMsMedian: number;
}

async function phase(clients: S3Client[], run: (client: S3Client, index: number) => Promise<number>): Promise<PhaseResult> {
  const started = performance.now();
  const deadline = started + DURATION_S * 1000;
  const latencies: number[] = [];
  let bytes = 0;
  await Promise.all(clients.map(async (client) => {
    while (performance.now() < deadline) {
      const begin = performance.now();
      // Not `bytes += await …`: that reads `bytes` before the await and loses the other clients' counts.
      const moved = await run(client, latencies.length);
      bytes += moved;
      latencies.push(performance.now() - begin);
    }
  }));
  const seconds = (performance.now() - started) / 1000;
  latencies.sort((a, b) => a - b);
  return { ops: latencies.length, bytes, seconds, latencyMsMedian: latencies[Math.floor(latencies.length / 2)] ?? 0 };
}

async function benchTopology(stores: number): Promise<string[]> {
  const dir = mkdtempSync(join(tmpdir(), 'shale-bench-s3-'));
  const up = await startUp(dir, stores);
  const rows: string[] = [];
  try {
    const created = await fetch(`${up.api}/api/v1/s3/keys`, {
      method: 'POST', headers: { 'content-type': 'application/json', authorization: `Bearer ${up.token}` },
      body: JSON.stringify({ account: 'bench', accessKey: KEY.accessKeyId, secretKey: KEY.secretAccessKey }),
    });
    if (created.status !== 201) throw new Error(`key create: ${created.status} ${await created.text()}`);
    const clients = Array.from({ length: CLIENTS }, () => new S3Client({
      endpoint: up.s3, region: 'us-east-1', credentials: KEY, forcePathStyle: true,
      requestChecksumCalculation: 'WHEN_REQUIRED', responseChecksumValidation: 'WHEN_REQUIRED',
      requestHandler: { httpAgent: new Agent({ keepAlive: true, maxSockets: 1 }) },
    }));
    await clients[0]!.send(new CreateBucketCommand({ Bucket: 'bench' }));
    for (const size of SIZES) {
      const body = randomBytes(size);
      let written = 0;
      const put = await phase(clients, async (client) => {
        const key = `obj-${size}-${written++}`;
        await client.send(new PutObjectCommand({ Bucket: 'bench', Key: key, Body: body }));
        return size;
      });
      const get = await phase(clients, async (client) => {
        const key = `obj-${size}-${Math.floor(Math.random() * written)}`;
        const reply = await client.send(new GetObjectCommand({ Bucket: 'bench', Key: key }));
        const data = await reply.Body!.transformToByteArray();
        if (data.length !== size) throw new Error(`GET ${key}: ${data.length} bytes`);
        return data.length;
      });
      for (const [name, result] of [['PUT', put], ['GET', get]] as const) {
        const row = `| ${stores} store${stores === 1 ? ' (in-process)' : 's'}, ${stores === 1 ? 1 : 3} replica${stores === 1 ? '' : 's'} | ${name} | ${size === 4096 ? '4 KiB' : '1 MiB'} | ${(result.ops / result.seconds).toFixed(0)} | ${(result.bytes / result.seconds / 1048576).toFixed(1)} | ${result.latencyMsMedian.toFixed(1)} |`;
        rows.push(row);
        log(row);
      }
    }
    for (const client of clients) client.destroy();
  } finally {
    up.child.kill('SIGTERM');
    await new Promise((resolve) => up.child.once('exit', resolve));
    rmSync(dir, { recursive: true, force: true });
  }
  return rows;
}

const all: string[] = [];
for (const stores of TOPOLOGIES) all.push(...(await benchTopology(stores)));
process.stdout.write(['', `S3, ${CLIENTS} concurrent clients, ${DURATION_S} s per phase`, '', '| topology | op | size | ops/s | MiB/s | median ms |', '|---|---|---|---|---|---|', ...all, ''].join('\n'));
