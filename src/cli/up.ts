/**
 * `shale up`: the whole cluster on one machine, in the foreground. The conductor (SQLite at
 * DIR/meta.db) and the NBD gateway run in this process; every store is a child process running
 * `shale store` on its own sparse disk file DIR/store-N/disk.img (with --discard, freed segments
 * are given back to the file system), restarted if it dies (after --restart-delay), as a service
 * manager would. SIGINT/SIGTERM stop everything cleanly; running `shale up` again on the same DIR
 * brings every volume back with its data.
 *
 * Each store is its own failure domain ("local-N"), so a 3-replica pool can place its copies on
 * the 3 stores of one machine.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Command } from 'commander';
import { startConductor } from '../conductor/conductor.ts';
import { formatAddress } from '../env/env.ts';
import { nodeEnv } from '../env/node/node-env.ts';
import { ShaleError } from '../lib/errors.ts';
import { formatBytes, parseDuration, parseSize } from '../lib/units.ts';
import { ConductorClient } from '../proto/conductor-client.ts';
import { LocalStores } from '../proto/local-channel.ts';
import { openLogEngine } from '../store/open-engine.ts';
import { startStoreDaemon, type StoreDaemon } from '../store/store-daemon.ts';
import { exitWithError, makeLog } from './output.ts';
import { readTextFile, saveToken, writeTokenFile } from './token.ts';
import { DEFAULT_S3_PORT, startS3Role } from '../s3/s3-role.ts';
import {
  BUSY_POLL_HELP, CACHE_SIZE_HELP, DISCARD_HELP, DEFAULT_API_PORT, DEFAULT_NBD_PORT, parseBusyPoll, parseCacheSize, positiveInteger, startNbdGateway, stopOnSignals, tlsOptions,
} from './roles.ts';

/**
 * Busy polling of `shale up`'s gateway when its only store lives in its process: with nothing
 * to wait for in other processes, polling 200 µs after each reply halves the round trip at queue
 * depth 1 on a VM, where waking a sleeping thread costs tens of µs (docs/benchmarks.md). With
 * store processes beside it on the same cores, a spinning gateway takes CPU they need: off.
 */
const UP_BUSY_POLL_MICROS = '200';

const MAIN = fileURLToPath(new URL('./main.ts', import.meta.url));

interface UpOptions {
  data: string;
  stores: string;
  diskSize: string;
  nbdPort: string;
  apiPort: string;
  host: string;
  heartbeatTimeout: string;
  restartDelay: string;
  ioTimeout: string;
  resyncRate: string;
  cacheSize: string;
  discard: boolean;
  downOutInterval: string;
  scrubInterval: string;
  nbdSocket?: string;
  busyPoll: string;
  s3Listen: string;
  tls: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
}

export function registerUpCommand(program: Command): void {
  program
    .command('up')
    .description('run a whole cluster on this machine: conductor, stores, NBD and S3 gateways, HTTP API')
    .option('--data <dir>', 'data directory', './shale-data')
    .option('--stores <n>', 'number of store processes', '3')
    .option('--disk-size <size>', 'size of each store\'s sparse disk file', '4G')
    .option('--nbd-port <port>', 'NBD port', String(DEFAULT_NBD_PORT))
    .option('--api-port <port>', 'HTTP API port', String(DEFAULT_API_PORT))
    .option('--host <address>', 'address every endpoint listens on', '127.0.0.1')
    .option('--heartbeat-timeout <duration>', 'mark a store down after this long without a heartbeat', '5s')
    .option('--restart-delay <duration>', 'restart a store process this long after it died', '2s')
    .option('--io-timeout <duration>', 'fail I/O with NO_QUORUM after waiting this long for replicas (0: wait forever)', '0')
    .option('--resync-rate <bytes-per-second>', 'most bytes per second a resync copies into one store (0: unlimited)', '0')
    .option('--cache-size <size>', `each store: ${CACHE_SIZE_HELP}`, 'auto')
    .option('--discard', `each store: ${DISCARD_HELP}`, false)
    .option('--down-out-interval <duration>', 'mark a store out this long after it went down, and re-replicate its PGs elsewhere', '10m')
    .option('--scrub-interval <duration>', 'compare every volume\'s replicas this often (0: only on demand, shale scrub)', '24h')
    .option('--nbd-socket <path>', 'also serve NBD on this unix socket')
    .option('--busy-poll <µs>', `NBD gateway: ${BUSY_POLL_HELP}; auto: ${UP_BUSY_POLL_MICROS} with --stores 1 (the store in the gateway's process), else 0`, 'auto')
    .option('--s3-listen <host:port>', 'S3 gateway address (port 0: any free port)', `127.0.0.1:${DEFAULT_S3_PORT}`)
    .option('--tls <mode>', 'NBD TLS: off, on (offer STARTTLS) or require (refuse plaintext)', 'off')
    .option('--tls-cert <file>', 'x509 certificate (PEM) for NBD TLS')
    .option('--tls-key <file>', 'private key (PEM) of the certificate')
    .option('--tls-ca <file>', 'CA (PEM) that NBD client certificates must be signed by')
    .action(async (options: UpOptions) => {
      try {
        await up(options);
      } catch (error) {
        exitWithError(error);
      }
    });
}

/** Longest unix socket path taken (the kernel's limit is 107 bytes); a longer one falls back to TCP. */
const UNIX_SOCKET_PATH_MAX = 100;

/**
 * Where a store of this machine listens: on the loopback host, a unix socket in its directory
 * (nothing off this machine could reach it anyway, and a unix socket costs the gateway and the
 * store less per request than TCP over loopback: docs/benchmarks.md); on any other host, a free
 * TCP port there, so that processes on other machines can reach it.
 */
export function storeListen(host: string, storeDir: string): string {
  const path = `${storeDir}/store.sock`;
  const loopback = host === '127.0.0.1' || host === '::1' || host === 'localhost';
  return loopback && Buffer.byteLength(path) <= UNIX_SOCKET_PATH_MAX ? `unix:${path}` : formatAddress(host, 0);
}

async function up(options: UpOptions): Promise<void> {
  const log = makeLog('up');
  const dataDir = resolve(options.data);
  const storeCount = positiveInteger(options.stores, '--stores');
  const busyPoll = options.busyPoll !== 'auto' ? String(parseBusyPoll(options.busyPoll)) : storeCount === 1 ? UP_BUSY_POLL_MICROS : '0';
  const diskSizeBytes = parseSize(options.diskSize, '--disk-size');
  const nbdPort = port(options.nbdPort, '--nbd-port');
  const apiPort = port(options.apiPort, '--api-port');
  const restartDelayMs = parseDuration(options.restartDelay, '--restart-delay');
  const resyncRateBytesPerSecond = parseSize(options.resyncRate, '--resync-rate');
  const cacheBytes = parseCacheSize(options.cacheSize);
  const tls = tlsOptions(options);
  mkdirSync(dataDir, { recursive: true });

  // The admin token: kept in DATA/token (mode 0600) so a restart on the same data directory
  // finds it; a data directory without it (or with a stale one) gets a new one, since shale up
  // owns its cluster.
  const tokenPath = `${dataDir}/token`;
  const knownToken = readTextFile(tokenPath)?.trim() || undefined;
  const conductor = await startConductor(nodeEnv, {
    metaPath: `${dataDir}/meta.db`, listen: `${options.host}:${apiPort}`,
    heartbeatTimeoutMs: parseDuration(options.heartbeatTimeout, '--heartbeat-timeout'),
    downOutIntervalMs: parseDuration(options.downOutInterval, '--down-out-interval'),
    scrubIntervalMs: parseDuration(options.scrubInterval, '--scrub-interval'),
    defaultReplicas: Math.min(3, storeCount), log: makeLog('conductor'),
    auth: 'token', adminToken: { known: knownToken, replaceUnlessKnown: true, onCreated: async (token) => writeTokenFile(tokenPath, token) },
  });
  const apiUrl = `http://${conductor.address}`;
  const adminToken = conductor.newAdminToken ?? knownToken!;
  // Where the CLI looks ($SHALE_CONFIG_DIR or ~/.config/shale), so it works with no extra step.
  const tokenFile = saveToken(process.env, adminToken, [apiUrl]);
  if (conductor.newAdminToken) process.stdout.write(`admin token (shown once; saved with mode 0600 to ${tokenFile} and ${tokenPath}):\n  ${adminToken}\n`);
  // The stores (children inherit the environment) and this process's gateway send it; it never
  // goes on a command line.
  process.env.SHALE_TOKEN = adminToken;

  let stopping = false;
  const children = new Map<number, ChildProcess>();
  const readyStores = new Set<number>();
  const openedStores = new Set<number>();
  // At start, stores register in order (store-N gets id N in a new cluster); a restarted one at once.
  let registrationsInOrder = true;
  let nextToRegister = 1;
  const registerNext = (): void => {
    // The next store registers once its disk is open and the one before it is registered.
    if (nextToRegister > storeCount || !openedStores.has(nextToRegister)) return;
    if (nextToRegister > 1 && !readyStores.has(nextToRegister - 1)) return;
    children.get(nextToRegister)?.send({ type: 'register' });
    nextToRegister++;
  };
  const startStore = (index: number): void => {
    readyStores.delete(index);
    const dir = `${dataDir}/store-${index}`;
    mkdirSync(dir, { recursive: true });
    const child = spawn(process.execPath, [
      MAIN, 'store', '--disk', `${dir}/disk.img:${diskSizeBytes}`, '--format', '--sparse', '--listen', storeListen(options.host, dir),
      '--conductor', apiUrl, '--domain', `local-${index}`, '--resync-rate', String(resyncRateBytesPerSecond), '--cache-size', String(cacheBytes),
      ...(options.discard ? ['--discard'] : []),
    ], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env: process.env });
    children.set(index, child);
    child.on('message', (message: { type?: string }) => {
      if (message?.type === 'opened') {
        openedStores.add(index);
        // In order at start; at once for a store restarted later or one that already had its turn.
        if (registrationsInOrder && index >= nextToRegister) registerNext();
        else child.send({ type: 'register' });
      }
      if (message?.type === 'ready') {
        readyStores.add(index);
        if (registrationsInOrder) registerNext();
      }
    });
    if (child.pid) writeFileSync(`${dir}/store.pid`, `${child.pid}\n`);
    child.on('exit', (code, signal) => {
      children.delete(index);
      rmSync(`${dir}/store.pid`, { force: true });
      if (stopping) return;
      log(`store-${index} exited (${signal ?? `code ${code}`}); restarting it in ${restartDelayMs} ms`);
      nodeEnv.clock.after(restartDelayMs, () => {
        if (!stopping) startStore(index);
      });
    });
  };
  let localStore: StoreDaemon | undefined;
  const stopStores = async (): Promise<void> => {
    stopping = true;
    await localStore?.close();
    const exits = [...children.values()].map((child) => new Promise<void>((done) => {
      if (child.exitCode !== null || child.signalCode !== null) return done();
      child.once('exit', () => done());
      child.kill('SIGTERM');
      nodeEnv.clock.after(15_000, () => child.kill('SIGKILL')).unref();
    }));
    await Promise.all(exits);
  };

  const conductorClient = new ConductorClient(nodeEnv, apiUrl);
  // One store runs inside this process, beside the gateway: no socket hop per I/O (DESIGN §9).
  // Several run as child processes, opening their disks in parallel and registering in order.
  const localStores = storeCount === 1 ? new LocalStores() : undefined;
  if (localStores) {
    mkdirSync(`${dataDir}/store-1`, { recursive: true });
    localStore = await startStoreDaemon(nodeEnv, {
      diskPath: `${dataDir}/store-1/disk.img`, diskSizeBytes, format: true, listen: storeListen(options.host, `${dataDir}/store-1`), conductorUrls: apiUrl,
      domain: 'local-1', resyncRateBytesPerSecond, log: makeLog(`store ${dataDir}/store-1/disk.img`), localStores,
      openEngine: (env, engineOptions) => openLogEngine(env, { ...engineOptions, discard: options.discard, cacheBytes }),
    }).catch(async (error: unknown) => {
      await conductor.close();
      throw error;
    });
  } else {
    for (let index = 1; index <= storeCount; index++) startStore(index);
    await waitFor(() => readyStores.size === storeCount, `the ${storeCount} stores`).catch(async (error: unknown) => {
      await stopStores();
      await conductor.close();
      throw error;
    });
  }
  registrationsInOrder = false;

  await waitFor(async () => (await conductorClient.map()).pools.length > 0, 'the default pool').catch(async (error: unknown) => {
    await stopStores();
    await conductor.close();
    throw error;
  });

  const gateway = await startNbdGateway({
    listen: `${options.host}:${nbdPort}`, alsoListen: options.nbdSocket ? [`unix:${resolve(options.nbdSocket)}`] : [],
    conductor: apiUrl, owner: `up-nbd`, ioTimeout: options.ioTimeout, log: makeLog('nbd'), localStores, tls,
    busyPoll,
  }).catch(async (error: unknown) => {
    await stopStores();
    await conductor.close();
    throw error;
  });

  const s3 = await startS3Role({ listen: options.s3Listen, conductor: apiUrl, log: makeLog('s3'), localStores }).catch(async (error: unknown) => {
    await gateway.close().catch(() => {});
    await stopStores();
    await conductor.close();
    throw error;
  });

  process.stdout.write([
    '',
    `Shale is up: ${storeCount} store${storeCount === 1 ? '' : 's'} × ${formatBytes(diskSizeBytes)} in ${dataDir}`,
    `  HTTP API   ${apiUrl}/api/v1/`,
    `  NBD        nbd://${gateway.address}/VOLUME`,
    `  S3         http://${s3.address}`,
    ...(options.nbdSocket ? [`  NBD (unix) nbd+unix:///VOLUME?socket=${resolve(options.nbdSocket)}`] : []),
    '',
    'Try:',
    `  npx shale volume create disk1 --size 1G`,
    `  nbdinfo nbd://${gateway.address}/disk1`,
    `  qemu-img convert -n -O raw image.raw nbd://${gateway.address}/disk1`,
    `  npx shale key create --account me      # then: aws --endpoint-url http://${s3.address} s3 mb s3://bucket`,
    '',
    'Ctrl-C stops every process; `shale up` on the same --data brings the volumes back.',
    '',
  ].join('\n'));

  stopOnSignals(async () => {
    await s3.stop().catch((error: unknown) => log(`closing the S3 gateway: ${(error as Error).message}`));
    await gateway.close().catch((error: unknown) => log(`closing the NBD gateway: ${(error as Error).message}`));
    await stopStores();
    await conductor.close();
  }, log);
}

async function waitFor(ready: () => boolean | Promise<boolean>, what: string): Promise<void> {
  const deadlineMs = nodeEnv.clock.nowMs() + 120_000;
  for (;;) {
    try {
      if (await ready()) return;
    } catch {
      // not reachable yet
    }
    if (nodeEnv.clock.nowMs() > deadlineMs) {
      throw new ShaleError('UNAVAILABLE', `${what} did not come up within 120 s; see the messages above`);
    }
    await nodeEnv.clock.sleep(50);
  }
}

function port(text: string, what: string): number {
  const value = Number(text);
  if (!Number.isInteger(value) || value < 0 || value > 65535) throw new ShaleError('INVALID_ARGUMENT', `${what}: "${text}" is not a port number`);
  return value;
}
