/**
 * Admin verbs (DESIGN §6): `shale cluster status`, `store list`, `disk list`,
 * `pool create|list|info`, `volume create|list|info|resize|delete`. Each talks only to the
 * conductor's HTTP API (--api URL[,URL…], default $SHALE_API or http://127.0.0.1:49180) with
 * the admin token (SHALE_TOKEN or the config directory's token file, token.ts), prints a table
 * for people or the API's JSON with --json, and on failure prints one line
 * `shale: <message> (<CODE>)` on stderr and exits with the code's CLI exit code
 * (src/lib/errors.ts).
 */
import type { Command } from 'commander';
import type {
  ClusterStatus, CreatePoolRequest, CreateVolumeRequest, DiskInfo, PoolDetail, PoolInfo, ResizeVolumeRequest, StoreInfo, VolumeInfo,
} from '../conductor/api/types.ts';
import { codeOf, ErrorCodes, ShaleError } from '../lib/errors.ts';
import { formatBytes } from '../lib/units.ts';
import type { ScrubReport } from '../proto/store-protocol.ts';

/** A scrub reads a whole disk: the CLI waits for it this long. */
const scrubTimeoutMs = 6 * 3_600_000;
import { AdminApi, defaultApiUrl, normalizeApiUrl } from './admin-api.ts';
import { formatJson, formatPercent, formatReplicas, formatTime, renderFields, renderTable } from './format.ts';
import { findToken, readTextFile } from './token.ts';
import { closeDataPath, openDataPath } from './data-path.ts';
import { volumeUsage, type VolumeUsage } from '../client/volume-ops.ts';
import { formatPlan, formatScrub, recoveryFields, volumeHealthFields } from './heal-format.ts';
import type { MovePlan } from '../conductor/healing.ts';
import type { ScrubResult } from '../conductor/api/types.ts';

/** Where the admin verbs read and write; tests pass their own. */
export interface AdminIo {
  stdout(text: string): void;
  stderr(text: string): void;
  readonly stdoutIsTty: boolean;
  readonly env: Readonly<Record<string, string | undefined>>;
  readonly fetch: typeof fetch;
  /** A file's text, or undefined (the token file). */
  readTextFile(path: string): string | undefined;
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
  readTextFile,
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

function parseCount(text: string | undefined, option: string): number | undefined {
  if (text === undefined) return undefined;
  if (!/^[0-9]{1,9}$/.test(text) || Number(text) < 1) throw new ShaleError('INVALID_ARGUMENT', `${option}: expected a whole number of at least 1, got "${text}"`);
  return Number(text);
}

function parseReplicas(text: string | undefined): number | undefined {
  return parseCount(text, '--replicas');
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
    ['provisioned', `${formatBytes(volume.sizeBytes)} (thin: space is used only by what is written)`],
    ['snapshots', volume.snapshots ?? 0],
    ['parent', volume.parent ? `${volume.parent.volume}@${volume.parent.snapshot} (a clone)` : '-'],
    ['created', formatTime(volume.createdAt)],
  ];
}

function poolTable(pools: readonly PoolInfo[], isTty: boolean): string {
  return renderTable(
    ['POOL', 'ID', 'REPLICAS', 'MIN', 'PGS', 'DOMAIN', 'CLEAN', 'DEGRADED', 'PROVISIONED', 'USABLE', 'OVERCOMMIT'],
    pools.map((p) => [p.name, p.id, p.replicas, p.minReplicas, p.pgCount, p.domainLevel, p.pgsClean, p.pgsDegraded,
      p.provisionedBytes === undefined ? '-' : formatBytes(p.provisionedBytes), p.usableBytes === undefined ? '-' : formatBytes(p.usableBytes),
      p.overcommitRatio === undefined ? '-' : `${p.overcommitRatio.toFixed(2)}x`]),
    isTty,
  );
}

export function registerAdminCommands(program: Command, io: AdminIo = processIo): void {
  const apiDefault = io.env.SHALE_API || defaultApiUrl;

  /** Adds --api and --json, and runs the action with the API client, reporting any failure. */
  const verb = <A extends unknown[], O extends CommonOptions>(
    command: Command,
    run: (api: AdminApi, options: O, ...args: A) => Promise<void>,
  ): Command =>
    command
      .option('--api <url>', 'conductor API URL, or several comma separated (env SHALE_API)', apiDefault)
      .option('--json', 'print the API answer as JSON, for scripts', false)
      .action(async (...received: unknown[]) => {
        // commander passes the arguments, then the options, then the command.
        const args = received.slice(0, -2) as A;
        const options = received[received.length - 2] as O;
        try {
          // The token of the first conductor listed (every conductor of a cluster takes the same).
          const { token, source } = findToken(io.env, normalizeApiUrl(options.api.split(',')[0]!.trim()), (path) => io.readTextFile(path));
          await run(new AdminApi(options.api, io.fetch, token, source), options, ...args);
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
          ['conductor', status.conductor.leading
            ? `${status.conductor.url} (leader)`
            : `${status.conductor.url} (standby; leader: ${status.conductor.leaderUrl ?? 'none elected'})`],
          ...recoveryFields(status.recovery),
          ...(status.lastScrub ? [['last scrub', `${formatTime(status.lastScrub.finishedAt)}: ${status.lastScrub.blocks} blocks compared, ${status.lastScrub.inconsistentBlocks} inconsistent, ${status.lastScrub.repairedBlocks} repaired`] as [string, string]] : []),
        ]);
        if (status.pools.length > 0) text += '\n' + poolTable(status.pools, io.stdoutIsTty);
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
        ) + stores.filter((s) => s.downReason !== undefined).map((s) => `store ${s.id} went down: ${s.downReason}\n`).join(''));
    });

  verb(store.command('scrub').argument('<id>', 'store id').description('read every live block of the store\'s disk and check its crc32c; list the bad ones')
    .option('--mib-per-second <n>', 'read at most this many MiB per second (default: unthrottled)'),
  async (api, options: CommonOptions & { mibPerSecond?: string }, id: string) => {
    if (!/^[1-9][0-9]{0,15}$/.test(id)) throw new ShaleError('INVALID_ARGUMENT', `store id: expected a positive whole number, got "${id}"`);
    const rate = options.mibPerSecond;
    if (rate !== undefined && !/^[1-9][0-9]{0,6}$/.test(rate)) throw new ShaleError('INVALID_ARGUMENT', `--mib-per-second: expected a positive whole number, got "${rate}"`);
    const query = rate === undefined ? '' : `?mibPerSecond=${rate}`;
    const report = await api.call<ScrubReport>('POST', `/stores/${id}/scrub${query}`, undefined, scrubTimeoutMs);
    out(options, report, () => {
      const summary = `store ${id}: ${report.blocks} blocks of ${report.objects} objects read (${formatBytes(report.bytesRead)}) in ${(report.durationMs / 1000).toFixed(1)} s: ${report.badBlocks === 0 ? 'no bad blocks' : `${report.badBlocks} bad block(s)${report.unreadableBlocks > 0 ? `, ${report.unreadableBlocks} of them unreadable` : ''}`}\n`;
      if (report.bad.length === 0) return summary;
      return summary + renderTable(['VOLUME', 'CHUNK', 'BLOCK'], report.bad.map((bad) => [bad.volumeId, bad.chunkIndex, bad.block]), io.stdoutIsTty);
    });
    if (report.badBlocks > 0) process.exitCode = ErrorCodes.CHECKSUM.exitCode;
  });

  verb(store.command('drain').argument('<id>', 'store id').description('move every PG replica off the store (before removing it); --dry-run prints what would move')
    .option('--dry-run', 'print the PGs, bytes and time it would move, and change nothing', false)
    .option('--cancel', 'take the store back into placement', false),
  async (api, options: CommonOptions & { dryRun: boolean; cancel: boolean }, id: string) => {
    if (!/^[1-9][0-9]{0,15}$/.test(id)) throw new ShaleError('INVALID_ARGUMENT', `store id: expected a positive whole number, got "${id}"`);
    const query = [options.dryRun ? 'dryRun=true' : '', options.cancel ? 'cancel=true' : ''].filter((part) => part !== '').join('&');
    const plan = await api.call<MovePlan>('POST', `/stores/${id}/drain${query ? `?${query}` : ''}`);
    out(options, plan, () => formatPlan(plan, options.cancel ? `cancelling the drain of store ${id}` : `draining store ${id}`, options.dryRun));
  });

  verb(program.command('rebalance').description('move PGs to where placement wants them (new stores, out or drained ones); --dry-run prints the plan')
    .option('--dry-run', 'print the PGs, bytes and time it would move, and change nothing', false),
  async (api, options: CommonOptions & { dryRun: boolean }) => {
    const plan = await api.call<MovePlan>('POST', `/rebalance${options.dryRun ? '?dryRun=true' : ''}`);
    out(options, plan, () => formatPlan(plan, 'rebalance', options.dryRun));
  });

  verb(program.command('scrub').argument('[volume]', 'one volume (default: every volume)')
    .description('compare every replica of the volume\'s PGs block by block (crc32c and version, no data moved) and repair copies that differ')
    .option('--mib-per-second <n>', 'each store reads at most this many MiB per second (default: unthrottled)'),
  async (api, options: CommonOptions & { mibPerSecond?: string }, volumeName: string | undefined) => {
    const rate = options.mibPerSecond;
    if (rate !== undefined && !/^[1-9][0-9]{0,6}$/.test(rate)) throw new ShaleError('INVALID_ARGUMENT', `--mib-per-second: expected a positive whole number, got "${rate}"`);
    const query = [volumeName === undefined ? '' : `volume=${encodeURIComponent(volumeName)}`, rate === undefined ? '' : `mibPerSecond=${rate}`].filter((part) => part !== '').join('&');
    const result = await api.call<ScrubResult>('POST', `/scrub${query ? `?${query}` : ''}`, undefined, scrubTimeoutMs);
    out(options, result, () => formatScrub(result));
    if (result.unrepairedBlocks > 0) process.exitCode = ErrorCodes.CHECKSUM.exitCode;
  });

  // ---- disk -------------------------------------------------------------------------------
  const disk = group(program, 'disk', 'the disks of every store');
  verb(disk.command('list').description('every disk with its store, state, capacity and use'),
    async (api, options: CommonOptions) => {
      const { disks } = await api.call<{ disks: DiskInfo[] }>('GET', '/disks');
      out(options, { disks }, () => disks.length === 0
        ? 'no disks: no store has registered\n'
        : renderTable(
          ['STORE', 'ADDRESS', 'STATE', 'DOMAIN', 'DISK', 'PATH', 'CAPACITY', 'USED', 'USE%', 'LIVE'],
          disks.map((d) => [
            d.storeId, d.storeAddress, d.storeState, d.domain || '-', d.uuid, d.path, formatBytes(d.capacityBytes), formatBytes(d.usedBytes),
            formatPercent(d.usedBytes, d.capacityBytes), d.liveBytes === undefined ? '-' : formatBytes(d.liveBytes),
          ]),
          io.stdoutIsTty,
        ));
    });

  // ---- pool -------------------------------------------------------------------------------
  const pool = group(program, 'pool', 'pools of stores with a redundancy policy and placement groups');

  verb(pool.command('create').argument('<name>', 'pool name').description('create a pool and place its placement groups')
    .option('--replicas <n>', 'copies of every object (required)')
    .option('--min-replicas <m>', 'fewest replicas a write completes on (default R - floor(R/2))')
    .option('--pgs <p>', 'placement groups (default: the conductor\'s, 256)')
    .option('--domain-level <level>', 'failure-domain level the replicas spread over: host, rack, … or store', 'host'),
  async (api, options: CommonOptions & { replicas?: string; minReplicas?: string; pgs?: string; domainLevel: string }, name: string) => {
    const replicas = parseCount(options.replicas, '--replicas');
    if (replicas === undefined) throw new ShaleError('INVALID_ARGUMENT', 'pool create: --replicas is required (example: --replicas 3)');
    const request: CreatePoolRequest = { name, replicas, domainLevel: options.domainLevel };
    const minReplicas = parseCount(options.minReplicas, '--min-replicas');
    if (minReplicas !== undefined) request.minReplicas = minReplicas;
    const pgCount = parseCount(options.pgs, '--pgs');
    if (pgCount !== undefined) request.pgCount = pgCount;
    const created = await api.call<PoolInfo>('POST', '/pools', request);
    out(options, created, () =>
      `created pool ${created.name} (id ${created.id}): ${created.replicas} replicas (min ${created.minReplicas}), ${created.pgCount} PGs over "${created.domainLevel}" domains\n`);
  });

  verb(pool.command('list').description('every pool with the health of its placement groups'),
    async (api, options: CommonOptions) => {
      const { pools } = await api.call<{ pools: PoolInfo[] }>('GET', '/pools');
      out(options, { pools }, () => pools.length === 0 ? 'no pools\n' : poolTable(pools, io.stdoutIsTty));
    });

  verb(pool.command('info').argument('<name>', 'pool name').description('one pool: its stores and, with --pgs, its PG table')
    .option('--pgs', 'print every placement group with its replicas and their states', false),
  async (api, options: CommonOptions & { pgs: boolean }, name: string) => {
    const detail = await api.call<PoolDetail>('GET', `/pools/${encodeURIComponent(name)}`);
    out(options, detail, () => {
      let text = renderFields([
        ['name', detail.name],
        ['id', detail.id],
        ['replicas', `${detail.replicas} (writes complete on at least ${detail.minReplicas})`],
        ['PGs', `${detail.pgCount}: ${detail.pgsClean} clean, ${detail.pgsDegraded} degraded`],
        ['domain level', detail.domainLevel],
        ['provisioned', detail.provisionedBytes === undefined ? '-' : `${formatBytes(detail.provisionedBytes)} of ${formatBytes(detail.usableBytes ?? 0)} usable (overcommit ${(detail.overcommitRatio ?? 0).toFixed(2)}x)`],
        ['created', formatTime(detail.createdAt)],
      ]);
      text += '\n' + renderTable(['STORE', 'PGS', 'PREFERRED'], detail.stores.map((s) => [s.storeId, s.pgs, s.preferred]), io.stdoutIsTty);
      if (options.pgs) {
        text += '\n' + renderTable(['PG', 'EPOCH', 'REPLICAS'], detail.pgs.map((pg) => [pg.index, pg.epoch, formatReplicas(pg.replicas)]), io.stdoutIsTty);
      }
      return text;
    });
  });

  // ---- volume -----------------------------------------------------------------------------
  const volume = group(program, 'volume', 'block volumes');

  verb(volume.command('create').argument('<name>', 'volume name').description('create a thin volume')
    .option('--size <size>', 'size, e.g. 10G (a multiple of 4 KiB)')
    .option('--replicas <n>', 'replicas (default: the default pool\'s)')
    .option('--pool <name>', 'the pool to place it in (default: the default pool)')
    .option('--chunk-size <size>', 'chunk size, a power of two from 64K to 1G', undefined),
  async (api, options: CommonOptions & { size?: string; replicas?: string; chunkSize?: string; pool?: string }, name: string) => {
    if (options.size === undefined) throw new ShaleError('INVALID_ARGUMENT', 'volume create: --size is required (example: --size 10G)');
    const request: CreateVolumeRequest = { name, size: options.size };
    const replicas = parseReplicas(options.replicas);
    if (replicas !== undefined) request.replicas = replicas;
    if (options.chunkSize !== undefined) request.chunkSize = options.chunkSize;
    if (options.pool !== undefined) request.pool = options.pool;
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

  verb(volume.command('info').argument('<name>', 'volume name').description('one volume in detail')
    .option('--usage', 'also the bytes written (used) and on disk, from a walk of the block index on the stores (docs/snapshots.md)', false),
  async (api, options: CommonOptions & { usage: boolean }, name: string) => {
    const info = await api.call<VolumeInfo>('GET', `/volumes/${encodeURIComponent(name)}`);
    let usage: VolumeUsage | undefined;
    if (options.usage) {
      const { token } = findToken(io.env, normalizeApiUrl(options.api.split(',')[0]!.trim()), (path) => io.readTextFile(path));
      const client = await openDataPath(options.api, token);
      try {
        usage = await volumeUsage(client, name);
      } finally {
        await closeDataPath(client, io === processIo);
      }
    }
    const usageFields = (used: VolumeUsage): [string, string | number][] => [
      ['used', `${formatBytes(used.writtenBytes)} written (${used.provisionedBytes > 0 ? ((used.writtenBytes / used.provisionedBytes) * 100).toFixed(1) : '0'}% of provisioned), ${formatBytes(used.zeroBytes)} trimmed`],
      ['on disk', `${formatBytes(used.rawBytes)} (× ${used.replicas} replicas, snapshots included)`],
    ];
    out(options, usage ? { ...info, usage } : info, () => renderFields([...volumeFields(info), ...(usage ? usageFields(usage) : []), ...volumeHealthFields(info.health)]));
  });

  verb(volume.command('resize').argument('<name>', 'volume name').description('grow a volume, also while it is open (shrinking is not supported yet)')
    .option('--size <size>', 'the new size, e.g. 20G (a multiple of 4 KiB)')
    .option('--force', 'allow shrinking, once supported (the data beyond the new end is lost)', false),
  async (api, options: CommonOptions & { size?: string; force: boolean }, name: string) => {
    if (options.size === undefined) throw new ShaleError('INVALID_ARGUMENT', 'volume resize: --size is required (example: --size 20G)');
    const before = await api.call<VolumeInfo>('GET', `/volumes/${encodeURIComponent(name)}`);
    const request: ResizeVolumeRequest = { size: options.size };
    if (options.force) request.force = true;
    const resized = await api.call<VolumeInfo>('PATCH', `/volumes/${encodeURIComponent(name)}`, request);
    out(options, resized, () => resized.sizeBytes === before.sizeBytes
      ? `volume ${name} is already ${formatBytes(resized.sizeBytes)}\n`
      : `resized volume ${name}: ${formatBytes(before.sizeBytes)} -> ${formatBytes(resized.sizeBytes)}\n`);
  });

  verb(volume.command('delete').argument('<name>', 'volume name').description('delete a volume and all its data')
    .option('--force', 'delete even while a gateway has it open', false),
  async (api, options: CommonOptions & { force: boolean }, name: string) => {
    const reply = await api.call<{ ok: true }>('DELETE', `/volumes/${encodeURIComponent(name)}${options.force ? '?force=true' : ''}`);
    out(options, reply, () => `deleted volume ${name}\n`);
  });

  // ---- key, bucket (S3) -------------------------------------------------------------------
  const key = group(program, 'key', 'S3 access keys');

  verb(key.command('create').description('create an S3 access key for an account (the account is made on first use)')
    .option('--account <name>', 'the account the key acts for (required)')
    .option('--access-key <id>', 'import this access key id (with --secret-key); generated when absent')
    .option('--secret-key <secret>', 'its secret key'),
  async (api, options: CommonOptions & { account?: string; accessKey?: string; secretKey?: string }) => {
    if (options.account === undefined) throw new ShaleError('INVALID_ARGUMENT', 'key create: --account NAME is required');
    const created = await api.call<{ accessKey: string; secretKey: string; account: string }>('POST', '/s3/keys', {
      account: options.account, ...(options.accessKey !== undefined ? { accessKey: options.accessKey } : {}), ...(options.secretKey !== undefined ? { secretKey: options.secretKey } : {}),
    });
    out(options, created, () => renderFields([['account', created.account], ['access key', created.accessKey], ['secret key', created.secretKey]]));
  });

  verb(key.command('list').description('every S3 access key (secrets are not shown)'),
    async (api, options: CommonOptions) => {
      const { keys } = await api.call<{ keys: { accessKey: string; account: string; createdAt: string }[] }>('GET', '/s3/keys');
      out(options, { keys }, () => keys.length === 0
        ? 'no keys\n'
        : renderTable(['ACCESS KEY', 'ACCOUNT', 'CREATED'], keys.map((k) => [k.accessKey, k.account, formatTime(k.createdAt)]), io.stdoutIsTty));
    });

  verb(key.command('delete').argument('<access-key>', 'access key id').description('delete an S3 access key: requests signed with it are refused'),
    async (api, options: CommonOptions, accessKey: string) => {
      const reply = await api.call<{ ok: true }>('DELETE', `/s3/keys/${encodeURIComponent(accessKey)}`);
      out(options, reply, () => `deleted access key ${accessKey}\n`);
    });

  const bucket = group(program, 'bucket', 'S3 buckets');
  verb(bucket.command('list').description('every S3 bucket with its account'),
    async (api, options: CommonOptions) => {
      const { buckets } = await api.call<{ buckets: { name: string; id: number; account: string; shardCount: number; publicRead: boolean; createdAt: string }[] }>('GET', '/s3/buckets');
      out(options, { buckets }, () => buckets.length === 0
        ? 'no buckets\n'
        : renderTable(['BUCKET', 'ID', 'ACCOUNT', 'SHARDS', 'PUBLIC READ', 'CREATED'],
          buckets.map((b) => [b.name, b.id, b.account, b.shardCount, b.publicRead ? 'yes' : 'no', formatTime(b.createdAt)]), io.stdoutIsTty));
    });
}
