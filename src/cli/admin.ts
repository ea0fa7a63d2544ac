/**
 * Admin verbs (DESIGN §6): `shale cluster status`, `store list`, `volume create|list|info|delete`.
 * Each talks only to the conductor's HTTP API (--api URL, default $SHALE_API or
 * http://127.0.0.1:49180), prints a table for people or the API's JSON with --json, and on
 * failure prints one line `shale: <message> (<CODE>)` on stderr and exits with the code's CLI
 * exit code (src/lib/errors.ts).
 */
import type { Command } from 'commander';
import type { ClusterStatus, CreateVolumeRequest, StoreInfo, VolumeInfo } from '../conductor/api/types.ts';
import { codeOf, ErrorCodes, ShaleError } from '../lib/errors.ts';
import { formatBytes } from '../lib/units.ts';
import { AdminApi, defaultApiUrl } from './admin-api.ts';
import { formatJson, formatPercent, formatTime, renderFields, renderTable } from './format.ts';

/** Where the admin verbs read and write; tests pass their own. */
export interface AdminIo {
  stdout(text: string): void;
  stderr(text: string): void;
  readonly stdoutIsTty: boolean;
  readonly env: Readonly<Record<string, string | undefined>>;
  readonly fetch: typeof fetch;
  /** Reports a failed verb: the default prints the one-line message and sets the exit code. */
  fail(error: unknown): void;
}

function reportFailure(io: Pick<AdminIo, 'stderr'>, error: unknown): number {
  const code = codeOf(error);
  const message = error instanceof Error ? error.message : String(error);
  io.stderr(`shale: ${message} (${code})\n`);
  if (!(error instanceof ShaleError) && error instanceof Error && error.stack) io.stderr(`${error.stack}\n`);
  return ErrorCodes[code].exitCode;
}

export const processIo: AdminIo = {
  stdout: (text) => void process.stdout.write(text),
  stderr: (text) => void process.stderr.write(text),
  get stdoutIsTty() {
    return process.stdout.isTTY === true;
  },
  env: process.env,
  fetch: (input, init) => fetch(input, init),
  fail(error) {
    process.exitCode = reportFailure(this, error);
  },
};

/** A failure reporter for tests and embedders: prints the line and returns the exit code. */
export function failureExitCode(io: Pick<AdminIo, 'stderr'>, error: unknown): number {
  return reportFailure(io, error);
}

interface CommonOptions {
  api: string;
  json: boolean;
}

function group(program: Command, name: string, description: string): Command {
  return program.commands.find((command) => command.name() === name) ?? program.command(name).description(description);
}

function parseReplicas(text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  if (!/^[0-9]+$/.test(text) || Number(text) < 1) throw new ShaleError('INVALID_ARGUMENT', `--replicas: expected a whole number of at least 1, got "${text}"`);
  return Number(text);
}

function volumeFields(volume: VolumeInfo): [string, string | number][] {
  return [
    ['name', volume.name],
    ['id', volume.id],
    ['size', `${formatBytes(volume.sizeBytes)} (${volume.sizeBytes} bytes)`],
    ['chunk size', formatBytes(volume.chunkSizeBytes)],
    ['pool', `${volume.poolName} (id ${volume.poolId})`],
    ['replicas', volume.replicas],
    ['owner', volume.owner === null ? '-' : `${volume.owner} (epoch ${volume.ownerEpoch})`],
    ['created', formatTime(volume.createdAt)],
  ];
}

export function registerAdminCommands(program: Command, io: AdminIo = processIo): void {
  const apiDefault = io.env.SHALE_API || defaultApiUrl;

  /** Adds --api and --json, and runs the action with the API client, reporting any failure. */
  const verb = <A extends unknown[], O extends CommonOptions>(
    command: Command,
    run: (api: AdminApi, options: O, ...args: A) => Promise<void>,
  ): Command =>
    command
      .option('--api <url>', 'conductor API URL (env SHALE_API)', apiDefault)
      .option('--json', 'print the API answer as JSON, for scripts', false)
      .action(async (...received: unknown[]) => {
        // commander passes the arguments, then the options, then the command.
        const args = received.slice(0, -2) as A;
        const options = received[received.length - 2] as O;
        try {
          await run(new AdminApi(options.api, io.fetch), options, ...args);
        } catch (error) {
          io.fail(error);
        }
      });

  const out = (options: CommonOptions, value: unknown, human: () => string): void => {
    io.stdout(options.json ? formatJson(value) : human());
  };

  // ---- cluster ----------------------------------------------------------------------------
  const cluster = group(program, 'cluster', 'the cluster as a whole');
  verb(cluster.command('status').description('health, stores, pools, capacity and what needs attention'),
    async (api, options: CommonOptions) => {
      const status = await api.call<ClusterStatus>('GET', '/status');
      out(options, status, () => {
        let text = renderFields([
          ['cluster', status.clusterId],
          ['health', status.health],
          ['map epoch', status.epoch],
          ['stores', `${status.stores.up} up, ${status.stores.down} down (${status.stores.total} total)`],
          ['volumes', status.volumes],
          ['capacity', formatBytes(status.capacityBytes)],
          ['used', `${formatBytes(status.usedBytes)} (${formatPercent(status.usedBytes, status.capacityBytes)})`],
          ['provisioned', formatBytes(status.provisionedBytes)],
        ]);
        if (status.pools.length > 0) {
          text += '\n' + renderTable(
            ['POOL', 'ID', 'REPLICAS', 'MIN', 'PGS', 'CLEAN', 'DEGRADED'],
            status.pools.map((p) => [p.name, p.id, p.replicas, p.minReplicas, p.pgCount, p.pgsClean, p.pgsDegraded]),
            io.stdoutIsTty,
          );
        }
        if (status.messages.length > 0) text += '\n' + status.messages.map((m) => `  - ${m}\n`).join('');
        return text;
      });
    });

  // ---- store ------------------------------------------------------------------------------
  const store = group(program, 'store', 'store daemons (list; run one with `shale store --disk …`)');
  verb(store.command('list').description('every store with its state and capacity'),
    async (api, options: CommonOptions) => {
      const { stores } = await api.call<{ stores: StoreInfo[] }>('GET', '/stores');
      out(options, { stores }, () => stores.length === 0
        ? 'no stores registered\n'
        : renderTable(
          ['ID', 'ADDRESS', 'DOMAIN', 'STATE', 'CAPACITY', 'USED', 'USE%', 'DISKS', 'LAST HEARTBEAT'],
          stores.map((s) => [
            s.id, s.address, s.domain || '-', s.state, formatBytes(s.capacityBytes), formatBytes(s.usedBytes),
            formatPercent(s.usedBytes, s.capacityBytes), s.disks.length, formatTime(s.lastHeartbeatAt),
          ]),
          io.stdoutIsTty,
        ));
    });

  // ---- volume -----------------------------------------------------------------------------
  const volume = group(program, 'volume', 'block volumes');

  verb(volume.command('create').argument('<name>', 'volume name').description('create a thin volume')
    .option('--size <size>', 'size, e.g. 10G (a multiple of 4 KiB)')
    .option('--replicas <n>', 'replicas (default: the default pool\'s)')
    .option('--chunk-size <size>', 'chunk size, a power of two from 64K to 1G', undefined),
  async (api, options: CommonOptions & { size?: string; replicas?: string; chunkSize?: string }, name: string) => {
    if (options.size === undefined) throw new ShaleError('INVALID_ARGUMENT', 'volume create: --size is required (example: --size 10G)');
    const request: CreateVolumeRequest = { name, size: options.size };
    const replicas = parseReplicas(options.replicas);
    if (replicas !== undefined) request.replicas = replicas;
    if (options.chunkSize !== undefined) request.chunkSize = options.chunkSize;
    const created = await api.call<VolumeInfo>('POST', '/volumes', request);
    out(options, created, () =>
      `created volume ${created.name} (id ${created.id}): ${formatBytes(created.sizeBytes)}, ${created.replicas} replicas in pool ${created.poolName}, chunk ${formatBytes(created.chunkSizeBytes)}\n`);
  });

  verb(volume.command('list').description('every volume'),
    async (api, options: CommonOptions) => {
      const { volumes } = await api.call<{ volumes: VolumeInfo[] }>('GET', '/volumes');
      out(options, { volumes }, () => volumes.length === 0
        ? 'no volumes\n'
        : renderTable(
          ['NAME', 'ID', 'SIZE', 'REPLICAS', 'POOL', 'CHUNK', 'OWNER', 'CREATED'],
          volumes.map((v) => [
            v.name, v.id, formatBytes(v.sizeBytes), v.replicas, v.poolName, formatBytes(v.chunkSizeBytes), v.owner ?? '-', formatTime(v.createdAt),
          ]),
          io.stdoutIsTty,
        ));
    });

  verb(volume.command('info').argument('<name>', 'volume name').description('one volume in detail'),
    async (api, options: CommonOptions, name: string) => {
      const info = await api.call<VolumeInfo>('GET', `/volumes/${encodeURIComponent(name)}`);
      out(options, info, () => renderFields(volumeFields(info)));
    });

  verb(volume.command('delete').argument('<name>', 'volume name').description('delete a volume and all its data')
    .option('--force', 'delete even while a gateway has it open', false),
  async (api, options: CommonOptions & { force: boolean }, name: string) => {
    const reply = await api.call<{ ok: true }>('DELETE', `/volumes/${encodeURIComponent(name)}${options.force ? '?force=true' : ''}`);
    out(options, reply, () => `deleted volume ${name}\n`);
  });
}
