/**
 * Snapshot and clone verbs (docs/snapshots.md): `shale snapshot create|list|delete|rollback|diff`
 * and `shale volume clone|flatten|export|import`. Metadata verbs talk to the conductor's API
 * like the other admin verbs; rollback, flatten, diff, export and import also run the client
 * library here, on the data path (they read and write the stores the map names), with a
 * progress bar on stderr when it is a terminal.
 */
import type { Command } from 'commander';
import { SingleBar } from 'cli-progress';
import type { ClusterClient } from '../client/cluster-client.ts';
import { diffVolume, flattenVolume, rollbackVolume, volumeUsage, type Progress } from '../client/volume-ops.ts';
import type { SnapshotInfo, VolumeInfo } from '../conductor/api/types.ts';
import { ShaleError } from '../lib/errors.ts';
import { formatBytes } from '../lib/units.ts';
import { AdminApi, defaultApiUrl, normalizeApiUrl } from './admin-api.ts';
import { type AdminIo, processIo } from './admin.ts';
import { formatJson, formatTime, renderTable } from './format.ts';
import { closeDataPath, openDataPath } from './data-path.ts';
import { findToken } from './token.ts';
import { exportVolume, importVolume } from './volume-transfer.ts';

interface CommonOptions {
  api: string;
  json: boolean;
}

interface Context {
  api: AdminApi;
  /** A client library instance on the data path (made on first use, closed after the verb). */
  cluster(): Promise<ClusterClient>;
  progress(label: string): { update: Progress; stop(): void };
}

/** "vol@snap" → [vol, snap]. */
export function parseSnapshotName(text: string, what = 'VOLUME@SNAPSHOT'): [string, string] {
  const at = text.indexOf('@');
  if (at <= 0 || at === text.length - 1 || text.indexOf('@', at + 1) >= 0) {
    throw new ShaleError('INVALID_ARGUMENT', `expected ${what} (for example disk1@before-upgrade), got "${text}"`);
  }
  return [text.slice(0, at), text.slice(at + 1)];
}

function group(program: Command, name: string, description: string): Command {
  return program.commands.find((command) => command.name() === name) ?? program.command(name).description(description);
}

export function registerSnapshotCommands(program: Command, io: AdminIo = processIo): void {
  const apiDefault = io.env.SHALE_API || defaultApiUrl;

  const verb = <A extends unknown[], O extends CommonOptions>(command: Command, run: (context: Context, options: O, ...args: A) => Promise<void>): Command =>
    command
      .option('--api <url>', 'conductor API URL, or several comma separated (env SHALE_API)', apiDefault)
      .option('--json', 'print the answer as JSON, for scripts', false)
      .action(async (...received: unknown[]) => {
        const args = received.slice(0, -2) as A;
        const options = received[received.length - 2] as O;
        let client: ClusterClient | undefined;
        try {
          const { token, source } = findToken(io.env, normalizeApiUrl(options.api.split(',')[0]!.trim()), (path) => io.readTextFile(path));
          const context: Context = {
            api: new AdminApi(options.api, io.fetch, token, source),
            async cluster() {
              client ??= await openDataPath(options.api, token);
              return client;
            },
            progress(label) {
              if (options.json || !process.stderr.isTTY) return { update: () => {}, stop: () => {} };
              const bar = new SingleBar({ format: `${label} [{bar}] {percentage}% | {done} of {all} | ETA {eta_formatted}`, hideCursor: true, stream: process.stderr });
              let started = false;
              return {
                update(done, total) {
                  if (!started) {
                    bar.start(total, 0, { done: formatBytes(0), all: formatBytes(total) });
                    started = true;
                  }
                  bar.update(done, { done: formatBytes(done), all: formatBytes(total) });
                },
                stop: () => started && bar.stop(),
              };
            },
          };
          await run(context, options, ...args);
        } catch (error) {
          io.fail(error);
        } finally {
          if (client) await closeDataPath(client, io === processIo);
        }
      });

  const out = (options: CommonOptions, value: unknown, human: () => string): void => {
    io.stdout(options.json ? formatJson(value) : human());
  };
  const path = (volume: string, rest = ''): string => `/volumes/${encodeURIComponent(volume)}${rest}`;

  // ---- snapshot ---------------------------------------------------------------------------
  const snapshot = group(program, 'snapshot', 'snapshots of volumes (read-only NBD export VOLUME@SNAPSHOT)');

  verb(snapshot.command('create').argument('<volume@snapshot>', 'volume and new snapshot name').description('take a crash-consistent snapshot (O(1), no I/O pause)'),
    async ({ api }, options: CommonOptions, name: string) => {
      const [volume, snap] = parseSnapshotName(name);
      const started = performance.now();
      const created = await api.call<SnapshotInfo>('POST', path(volume, '/snapshots'), { name: snap });
      const elapsedMs = performance.now() - started;
      out(options, created, () => `created snapshot ${volume}@${created.name} (id ${created.id}, ${formatBytes(created.sizeBytes)}) in ${elapsedMs.toFixed(1)} ms\n`);
    });

  verb(snapshot.command('list').argument('<volume>', 'volume name').description('the volume\'s snapshots')
    .option('--space', 'also each snapshot\'s exclusive bytes (what deleting it frees) and shared bytes, by a walk of the block index on the stores', false),
  async (context, options: CommonOptions & { space: boolean }, volume: string) => {
    const { snapshots } = await context.api.call<{ snapshots: SnapshotInfo[] }>('GET', path(volume, '/snapshots'));
    let space = new Map<number, { exclusiveBytes: number; sharedBytes: number }>();
    if (options.space && snapshots.length > 0) {
      const bar = context.progress(`space of ${volume}`);
      const usage = await volumeUsage(await context.cluster(), volume, bar.update);
      bar.stop();
      space = new Map(usage.snapshots.map((s) => [s.id, s]));
    }
    const rows = snapshots.map((s) => ({ ...s, ...(space.get(s.id) ?? {}) }));
    out(options, { snapshots: rows }, () => snapshots.length === 0
      ? `volume ${volume} has no snapshots\n`
      : renderTable(['NAME', 'ID', 'STATE', 'SIZE', 'CREATED', 'CLONES', ...(options.space ? ['EXCLUSIVE', 'SHARED'] : [])],
        rows.map((s) => [s.name, s.id, s.state, formatBytes(s.sizeBytes), formatTime(s.createdAt), s.clones.length === 0 ? '-' : s.clones.join(','),
          ...(options.space ? [s.exclusiveBytes === undefined ? '-' : formatBytes(s.exclusiveBytes), s.sharedBytes === undefined ? '-' : formatBytes(s.sharedBytes)] : [])]),
        io.stdoutIsTty));
  });

  verb(snapshot.command('delete').argument('<volume@snapshot>', 'the snapshot').description('delete a snapshot (refused while clones read through to it); its space comes back through compaction'),
    async ({ api }, options: CommonOptions, name: string) => {
      const [volume, snap] = parseSnapshotName(name);
      const reply = await api.call('DELETE', path(volume, `/snapshots/${encodeURIComponent(snap)}`));
      out(options, reply, () => `deleted snapshot ${volume}@${snap}\n`);
    });

  verb(snapshot.command('rollback').argument('<volume@snapshot>', 'the snapshot to go back to')
    .description('make the volume read as the snapshot again (refused while the volume is open for writing)')
    .option('--force', 'take the volume over from a gateway that keeps it open but has no clients (that gateway is fenced meanwhile)', false),
  async (context, options: CommonOptions & { force: boolean }, name: string) => {
    const [volume, snap] = parseSnapshotName(name);
    const bar = context.progress(`rollback ${volume}@${snap}`);
    try {
      const result = await rollbackVolume(await context.cluster(), volume, snap, bar.update, { takeover: options.force });
      bar.stop();
      out(options, { volume, snapshot: snap, ...result }, () => `rolled volume ${volume} back to ${snap}: ${formatBytes(result.changedBytes)} rewritten\n`);
    } finally {
      bar.stop();
    }
  });

  verb(snapshot.command('diff').argument('<volume@from>', 'the older snapshot').argument('[volume@to]', 'the newer snapshot (default: the volume as it is now)')
    .description('the byte ranges that changed between two snapshots (or a snapshot and now)'),
  async (context, options: CommonOptions, fromName: string, toName: string | undefined) => {
    const [volume, from] = parseSnapshotName(fromName);
    let to: string | undefined;
    if (toName !== undefined) {
      const [toVolume, toSnapshot] = parseSnapshotName(toName);
      if (toVolume !== volume) throw new ShaleError('INVALID_ARGUMENT', `both snapshots must be of one volume (${volume} and ${toVolume})`);
      to = toSnapshot;
    }
    const bar = context.progress(`diff ${fromName}`);
    const result = await diffVolume(await context.cluster(), volume, from, to, bar.update);
    bar.stop();
    const changedBytes = result.ranges.reduce((sum, range) => sum + range.lengthBytes, 0);
    out(options, { volume, from, to: to ?? null, sizeBytes: result.sizeBytes, changedBytes, ranges: result.ranges }, () =>
      (result.ranges.length === 0 ? '' : renderTable(['OFFSET', 'LENGTH', 'SIZE'], result.ranges.map((r) => [r.offsetBytes, r.lengthBytes, formatBytes(r.lengthBytes)]), io.stdoutIsTty)) +
      `${result.ranges.length} changed range(s), ${formatBytes(changedBytes)} of ${formatBytes(result.sizeBytes)}\n`);
  });

  // ---- volume: clone, flatten, export, import ----------------------------------------------
  const volumeGroup = group(program, 'volume', 'block volumes');

  verb(volumeGroup.command('clone').argument('<volume@snapshot>', 'the snapshot to clone').argument('<name>', 'the new volume')
    .description('a new volume that starts as the snapshot and reads through to it (O(1))'),
  async ({ api }, options: CommonOptions, source: string, name: string) => {
    const [volume, snap] = parseSnapshotName(source);
    const started = performance.now();
    const created = await api.call<VolumeInfo>('POST', path(volume, `/snapshots/${encodeURIComponent(snap)}/clone`), { name });
    const elapsedMs = performance.now() - started;
    out(options, created, () => `created volume ${created.name} (id ${created.id}, ${formatBytes(created.sizeBytes)}) as a clone of ${volume}@${snap} in ${elapsedMs.toFixed(1)} ms\n`);
  });

  verb(volumeGroup.command('usage').argument('<name>', 'volume name')
    .description('thin provisioning: provisioned against written bytes, and what each snapshot alone keeps (walks the block index on the stores)'),
  async (context, options: CommonOptions, name: string) => {
    const bar = context.progress(`usage ${name}`);
    const usage = await volumeUsage(await context.cluster(), name, bar.update);
    bar.stop();
    out(options, usage, () => {
      let text = `volume ${name}: provisioned ${formatBytes(usage.provisionedBytes)}, written ${formatBytes(usage.writtenBytes)}` +
        ` (${usage.provisionedBytes > 0 ? ((usage.writtenBytes / usage.provisionedBytes) * 100).toFixed(1) : '0'}%), trimmed/zeroed ${formatBytes(usage.zeroBytes)},` +
        ` raw on disks ${formatBytes(usage.rawBytes)} (${usage.replicas} replicas, snapshots included)\n`;
      if (usage.snapshots.length > 0) {
        text += renderTable(['SNAPSHOT', 'ID', 'EXCLUSIVE', 'SHARED'], usage.snapshots.map((s) => [s.name, s.id, formatBytes(s.exclusiveBytes), formatBytes(s.sharedBytes)]), io.stdoutIsTty);
      }
      return text;
    });
  });

  verb(volumeGroup.command('flatten').argument('<name>', 'a clone').description('copy the parent chain\'s data into a clone so it no longer needs its parent')
    .option('--force', 'take the volume over from a gateway that keeps it open but has no clients', false),
  async (context, options: CommonOptions & { force: boolean }, name: string) => {
    const bar = context.progress(`flatten ${name}`);
    try {
      const result = await flattenVolume(await context.cluster(), name, bar.update, { takeover: options.force });
      bar.stop();
      out(options, { volume: name, ...result }, () => `flattened volume ${name}: ${formatBytes(result.copiedBytes)} copied from its parent chain\n`);
    } finally {
      bar.stop();
    }
  });

  verb(volumeGroup.command('export').argument('<volume@snapshot>', 'what to export').argument('<file>', 'the image file')
    .description('write a snapshot to an image file (docs/snapshots.md), full or incremental; run again to resume an interrupted export')
    .option('--from-snap <snapshot>', 'incremental: only what changed since this older snapshot')
    .option('--overwrite', 'replace an existing file instead of resuming it', false),
  async (context, options: CommonOptions & { fromSnap?: string; overwrite: boolean }, source: string, file: string) => {
    const [volume, snap] = parseSnapshotName(source);
    const bar = context.progress(`export ${source}`);
    try {
      const result = await exportVolume(await context.cluster(), volume, snap, file, { fromSnapshot: options.fromSnap, overwrite: options.overwrite, progress: bar.update });
      bar.stop();
      out(options, result, () => result.alreadyComplete
        ? `${file} already holds the whole export of ${source}\n`
        : `exported ${source}${options.fromSnap ? ` (since ${options.fromSnap})` : ''} to ${file}: ${formatBytes(result.dataBytes)} of data, ${formatBytes(result.zeroBytes)} of zeros, ${result.records} records${result.resumedFromBytes > 0 ? ` (resumed at ${formatBytes(result.resumedFromBytes)})` : ''}\n`);
    } finally {
      bar.stop();
    }
  });

  verb(volumeGroup.command('import').argument('<file>', 'an image file written by volume export').argument('<volume>', 'the volume to apply it to (created for a full image if missing)')
    .description('apply an image file to a volume; run again to resume an interrupted import')
    .option('--force', 'take the volume over from a gateway that keeps it open but has no clients', false),
  async (context, options: CommonOptions & { force: boolean }, file: string, volume: string) => {
    const bar = context.progress(`import ${file}`);
    try {
      const result = await importVolume(await context.cluster(), file, volume, {
        takeover: options.force, progress: bar.update,
        createVolume: async (name, sizeBytes) => {
          await context.api.call('POST', '/volumes', { name, size: sizeBytes });
        },
      });
      bar.stop();
      out(options, result, () => `imported ${file} into ${result.created ? 'new ' : ''}volume ${volume}: ${formatBytes(result.dataBytes)} of data, ${formatBytes(result.zeroBytes)} of zeros${result.resumedAtRecord > 0 ? ` (resumed at record ${result.resumedAtRecord})` : ''}\n`);
    } finally {
      bar.stop();
    }
  });
}
