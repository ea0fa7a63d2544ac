/**
 * `shale conductor`, `shale store`, `shale nbd`: each role alone, in the foreground, for a real
 * cluster (and for `shale up`, which runs stores as child processes through `shale store`).
 * SIGINT and SIGTERM stop a role cleanly: in-flight requests finish, disks are synced.
 */
import { hostname, totalmem } from 'node:os';
import type { Command } from 'commander';
import { ClusterClient } from '../client/cluster-client.ts';
import { startConductor } from '../conductor/conductor.ts';
import { nodeEnv } from '../env/node/node-env.ts';
import { ShaleError } from '../lib/errors.ts';
import { GiB, MiB, parseDuration, parseSize } from '../lib/units.ts';
import { startNbdServer, type NbdTlsOptions } from '../nbd/server.ts';
import { VolumeExports } from '../nbd/volume-exports.ts';
import type { LocalStores } from '../proto/local-channel.ts';
import { openLogEngine } from '../store/open-engine.ts';
import { startStoreDaemon } from '../store/store-daemon.ts';
import { exitWithError, makeLog } from './output.ts';
import { DEFAULT_S3_PORT, startS3Role } from '../s3/s3-role.ts';
import { configDirectory, saveToken } from './token.ts';

export const DEFAULT_API_PORT = 49180;
export const DEFAULT_NBD_PORT = 10809;
export const DEFAULT_STORE_PORT = 49162;

/**
 * Runs `stop` once on SIGINT/SIGTERM, then exits. A second signal exits at once. A process run by
 * a supervisor (`shale up`, over an IPC channel) ignores SIGINT: Ctrl-C in a terminal reaches the
 * whole process group, and the supervisor stops its children itself, in order, with SIGTERM.
 */
export function stopOnSignals(stop: () => Promise<void>, log: (message: string) => void): void {
  const supervised = process.send !== undefined;
  let stopping = false;
  const onSignal = (signal: string): void => {
    if (stopping) {
      log(`${signal} again: exiting now`);
      process.exit(130);
    }
    stopping = true;
    log(`${signal}: stopping`);
    stop().then(
      () => process.exit(0),
      (error: unknown) => {
        log(`stopping failed: ${(error as Error).message}`);
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', () => {
    if (!supervised) onSignal('SIGINT');
  });
  process.on('SIGTERM', () => onSignal('SIGTERM'));
}

/** "PATH[:SIZE]" as given to --disk. */
export function parseDiskArgument(text: string): { path: string; sizeBytes?: number } {
  const match = /^(.*?)(?::(\d+(?:\.\d+)?[a-zA-Z]*))?$/.exec(text);
  if (!match || !match[1]) throw new ShaleError('INVALID_ARGUMENT', `--disk: expected PATH[:SIZE], got "${text}"`);
  return match[2] ? { path: match[1], sizeBytes: parseSize(match[2], '--disk size') } : { path: match[1] };
}

export function registerRoleCommands(program: Command): void {
  program
    .command('s3')
    .description('run an S3 gateway: buckets and objects on the stores (SigV4; path and virtual-host style)')
    .option('--listen <host:port>', 'S3 HTTP address', `127.0.0.1:${DEFAULT_S3_PORT}`)
    .option('--conductor <urls>', 'conductor URLs, comma separated', `http://127.0.0.1:${DEFAULT_API_PORT}`)
    .option('--domain <names>', 'host names for virtual-host-style requests (BUCKET.NAME), comma separated', 'localhost,s3.localhost')
    .option('--grace <duration>', 'keep replaced and deleted data this long before freeing it (a GET in progress is never cut off sooner)', '5m')
    .action(async (options: { listen: string; conductor: string; domain: string; grace: string }) => {
      try {
        const log = makeLog('s3');
        const gateway = await startS3Role({
          listen: options.listen, conductor: options.conductor, log, domains: options.domain.split(',').map((name) => name.trim()).filter(Boolean),
          graceMs: parseDuration(options.grace, '--grace'),
        });
        process.stdout.write(`S3 gateway on http://${gateway.address}\n`);
        stopOnSignals(() => gateway.stop(), log);
      } catch (error) {
        exitWithError(error);
      }
    });

  program
    .command('conductor')
    .description('run a conductor (control plane and HTTP API); on etcd, run several: one leads, the others stand by')
    .option('--meta <url>', 'metadata: sqlite:PATH (one conductor) or etcd://HOST:PORT[,HOST:PORT…][/prefix] (several)', 'sqlite:./shale-data/meta.db')
    .option('--listen <host:port>', 'HTTP API address', `127.0.0.1:${DEFAULT_API_PORT}`)
    .option('--advertise <url>', 'the URL other processes reach this conductor at (default: http://LISTEN)')
    .option('--heartbeat-timeout <duration>', 'mark a store down after this long without a heartbeat', '5s')
    .option('--replicas <n>', 'replicas of the default pool', '3')
    .option('--pgs <n>', 'placement groups of pools made without --pgs (the default pool)', '256')
    .option('--lease-ttl <duration>', 'etcd: leadership lease; a dead leader is replaced within about this long', '5s')
    .option('--down-out-interval <duration>', 'mark a store out this long after it went down, and re-replicate its PGs elsewhere', '10m')
    .option('--scrub-interval <duration>', 'compare every volume\'s replicas this often (0: only on demand, shale scrub)', '24h')
    .option('--new-admin-token', 'replace the cluster\'s admin token (the old one stops working) and print the new one', false)
    .action(async (options: {
      meta: string; listen: string; advertise?: string; heartbeatTimeout: string; replicas: string; pgs: string; leaseTtl: string; newAdminToken: boolean;
      downOutInterval: string; scrubInterval: string;
    }) => {
      try {
        const log = makeLog('conductor');
        if (!options.meta.startsWith('sqlite:') && !options.meta.startsWith('etcd:')) {
          throw new ShaleError('INVALID_ARGUMENT', `--meta ${options.meta}: expected sqlite:PATH or etcd://HOST:PORT[,HOST:PORT…]`);
        }
        const leaseTtlSeconds = Math.max(2, Math.ceil(parseDuration(options.leaseTtl, '--lease-ttl') / 1000));
        const conductor = await startConductor(nodeEnv, {
          metaPath: options.meta, listen: options.listen, advertiseUrl: options.advertise,
          heartbeatTimeoutMs: parseDuration(options.heartbeatTimeout, '--heartbeat-timeout'),
          defaultReplicas: positiveInteger(options.replicas, '--replicas'), pgCount: positiveInteger(options.pgs, '--pgs'),
          leaseTtlSeconds, log, auth: 'token',
          downOutIntervalMs: parseDuration(options.downOutInterval, '--down-out-interval'),
          scrubIntervalMs: parseDuration(options.scrubInterval, '--scrub-interval'),
          adminToken: {
            replace: options.newAdminToken,
            // Shown once, on stdout (not in the log), and kept where the CLI looks for it.
            onCreated: async (token) => {
              const urls = [options.advertise ?? `http://${options.listen}`];
              const path = saveToken(process.env, token, urls);
              process.stdout.write(`admin token (shown once; saved with mode 0600 to ${path}):\n  ${token}\n`);
            },
          },
        });
        if (!conductor.newAdminToken) {
          log(`the admin token was made when the cluster was created; the CLI reads it from SHALE_TOKEN or ${configDirectory(process.env)}/token`);
        }
        log(`conductor ${conductor.id} of cluster ${conductor.clusterId} listening on http://${conductor.address} (${conductor.isLeader ? 'leading' : 'standby'})`);
        stopOnSignals(() => conductor.close(), log);
      } catch (error) {
        exitWithError(error);
      }
    });

  program
    .command('store')
    .description('run a store daemon on one disk')
    .option('--disk <path[:size]>', 'disk file or block device; SIZE makes a new file that large (required)')
    .option('--format', 'format the disk if it has no Shale superblock (an existing Shale disk is never reformatted)', false)
    .option('--sparse', 'with --format: leave a new disk file sparse instead of allocating its blocks (fallocate)', false)
    .option('--discard', DISCARD_HELP, false)
    .option('--listen <host:port>', 'store protocol address (port 0: any free port)', `127.0.0.1:${DEFAULT_STORE_PORT}`)
    .option('--conductor <urls>', 'conductor URLs, comma separated', `http://127.0.0.1:${DEFAULT_API_PORT}`)
    .option('--domain <label>', 'failure domain of this store: a host name, or rack=R,host=H', hostname())
    .option('--resync-rate <bytes-per-second>', 'most bytes per second a resync copies into this store (0: unlimited)', '0')
    .option('--cache-size <size>', CACHE_SIZE_HELP, 'auto')
    .action(async (options: { disk?: string; format: boolean; sparse: boolean; discard: boolean; listen: string; conductor: string; domain: string; resyncRate: string; cacheSize: string }) => {
      try {
        if (!options.disk) throw new ShaleError('INVALID_ARGUMENT', 'shale store: --disk PATH[:SIZE] is required to run a store (or use `shale store list`)');
        const disk = parseDiskArgument(options.disk);
        const cacheBytes = parseCacheSize(options.cacheSize);
        const log = makeLog(`store ${disk.path}`);
        const daemon = await startStoreDaemon(nodeEnv, {
          diskPath: disk.path, diskSizeBytes: disk.sizeBytes, format: options.format, listen: options.listen,
          conductorUrls: options.conductor, domain: options.domain, log,
          openEngine: (env, engineOptions) => openLogEngine(env, { ...engineOptions, preallocate: !options.sparse, discard: options.discard, cacheBytes }),
          resyncRateBytesPerSecond: parseSize(options.resyncRate, '--resync-rate'),
          beforeRegister: process.send ? () => registrationTurn() : undefined,
        });
        stopOnSignals(() => daemon.close(), log);
        // Under a supervisor (shale up), say we are registered and serving.
        if (process.send) {
          process.send({ type: 'ready', storeId: daemon.storeId, address: daemon.address });
          // The supervisor is gone (it crashed or was killed): stop rather than run on unmanaged.
          process.on('disconnect', () => {
            log('supervisor gone: stopping');
            daemon.close().finally(() => process.exit(0));
          });
        }
      } catch (error) {
        exitWithError(error);
      }
    });

  program
    .command('nbd')
    .description('run an NBD gateway: one export per volume')
    .option('--listen <host:port>', 'NBD address (or unix:/path)', `127.0.0.1:${DEFAULT_NBD_PORT}`)
    .option('--conductor <urls>', 'conductor URLs, comma separated', `http://127.0.0.1:${DEFAULT_API_PORT}`)
    .option('--owner <id>', 'owner id of the volumes this gateway opens', `nbd-${process.pid}`)
    .option('--io-timeout <duration>', 'fail I/O with NO_QUORUM after waiting this long for replicas (0: wait forever)', '0')
    .option('--takeover', 'take over volumes that another gateway owns (it is fenced and can never write again)', false)
    .option('--busy-poll <µs>', BUSY_POLL_HELP, DEFAULT_BUSY_POLL_MICROS)
    .option('--tls <mode>', 'off, on (offer STARTTLS) or require (refuse plaintext)', 'off')
    .option('--tls-cert <file>', 'x509 certificate (PEM) for TLS')
    .option('--tls-key <file>', 'private key (PEM) of the certificate')
    .option('--tls-ca <file>', 'CA (PEM) that client certificates must be signed by; without it clients need none')
    .action(async (options: { listen: string; conductor: string; owner: string; ioTimeout: string; takeover: boolean; busyPoll: string } & TlsCliOptions) => {
      try {
        const log = makeLog('nbd');
        const gateway = await startNbdGateway({ ...options, tls: tlsOptions(options), log });
        log(`NBD gateway listening on ${gateway.address}`);
        stopOnSignals(() => gateway.close(), log);
      } catch (error) {
        exitWithError(error);
      }
    });
}

/**
 * Under a supervisor: say the disk is open, then wait for its word to register, so that a new
 * cluster's stores get ids in the supervisor's order while their disks open in parallel.
 */
function registrationTurn(): Promise<void> {
  return new Promise((resolve) => {
    const onMessage = (message: { type?: string }): void => {
      if (message?.type !== 'register') return;
      process.off('message', onMessage);
      resolve();
    };
    process.on('message', onMessage);
    process.send!({ type: 'opened' });
  });
}

export async function startNbdGateway(options: {
  listen: string;
  /** More addresses to serve the same exports on (a unix socket beside TCP, say). */
  alsoListen?: string[];
  conductor: string;
  owner: string;
  ioTimeout: string;
  log: (message: string) => void;
  localStores?: LocalStores;
  tls?: NbdTlsOptions;
  takeover?: boolean;
  /** --busy-poll: microseconds, as typed. */
  busyPoll?: string;
}): Promise<{ address: string; addresses: string[]; close(): Promise<void> }> {
  const pollMicros = parseBusyPoll(options.busyPoll ?? DEFAULT_BUSY_POLL_MICROS);
  const cluster = new ClusterClient(nodeEnv, {
    conductorUrls: options.conductor, ownerId: options.owner, ioTimeoutMs: parseDuration(options.ioTimeout, '--io-timeout'), log: options.log,
    localStores: options.localStores,
  });
  await cluster.start();
  // Every listener shares one provider: all connections to a volume share one client (CAN_MULTI_CONN).
  const provider = new VolumeExports(cluster, { takeover: options.takeover });
  const servers: Awaited<ReturnType<typeof startNbdServer>>[] = [];
  for (const address of [options.listen, ...(options.alsoListen ?? [])]) {
    servers.push(await startNbdServer(nodeEnv, { listen: address, provider, log: options.log, tls: options.tls, pollMicros }));
  }
  return {
    address: servers[0]!.address,
    addresses: servers.map((server) => server.address),
    async close(): Promise<void> {
      for (const server of servers) await server.close();
      await cluster.close();
    },
  };
}

/** `--discard` of `shale store` and `shale up`. */
export const DISCARD_HELP = 'give segments the store frees back to the file system (holes punched in a disk file), so the file shrinks as data is overwritten or deleted; slower rewrites where new page-cache pages are dear (docs/benchmarks.md)';

export const CACHE_SIZE_HELP = 'memory for the store\'s read cache of verified 4 KiB blocks: a size, 0 for none, or auto '
  + '(1/16 of this machine\'s memory, 64 MiB to 4 GiB)';

/** --cache-size: bytes, from a size, 0, or auto (1/16 of the machine's memory, 64 MiB to 4 GiB). */
export function parseCacheSize(text: string): number {
  if (text.trim() === 'auto') return Math.min(4 * GiB, Math.max(64 * MiB, Math.floor(totalmem() / 16 / MiB) * MiB));
  const bytes = parseSize(text, '--cache-size');
  if (bytes > 0 && bytes < 4096) throw new ShaleError('INVALID_ARGUMENT', `--cache-size: ${bytes} bytes is less than one 4 KiB block (0 turns the cache off)`);
  return bytes;
}

export const DEFAULT_BUSY_POLL_MICROS = '0';
export const BUSY_POLL_HELP = 'after each reply, keep polling for the next request this many µs instead of sleeping: '
  + 'shorter round trips at low queue depth for CPU while I/O runs (0: off)';

export function parseBusyPoll(text: string): number {
  const micros = Number(text);
  if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(micros) || micros > 1_000_000) {
    throw new ShaleError('INVALID_ARGUMENT', `--busy-poll: expected whole microseconds from 0 to 1000000, got "${text}"`);
  }
  return micros;
}

export interface TlsCliOptions {
  tls: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
}

/** The NBD TLS options from --tls, --tls-cert, --tls-key, --tls-ca. */
export function tlsOptions(options: TlsCliOptions): NbdTlsOptions {
  if (options.tls !== 'off' && options.tls !== 'on' && options.tls !== 'require') {
    throw new ShaleError('INVALID_ARGUMENT', `--tls: expected off, on or require, got "${options.tls}"`);
  }
  if (options.tls !== 'off' && (!options.tlsCert || !options.tlsKey)) {
    throw new ShaleError('INVALID_ARGUMENT', `--tls ${options.tls} needs --tls-cert and --tls-key`);
  }
  return { mode: options.tls, certFile: options.tlsCert, keyFile: options.tlsKey, caFile: options.tlsCa };
}

export function positiveInteger(text: string, what: string): number {
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value <= 0) throw new ShaleError('INVALID_ARGUMENT', `${what}: expected a positive whole number, got "${text}"`);
  return value;
}
