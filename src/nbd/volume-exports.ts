/**
 * NBD exports backed by Shale volumes: export name = volume name. Every connection to one export
 * gets the same NbdExport, backed by one VolumeClient, so a FLUSH on any connection covers the
 * writes acknowledged on all of them (CAN_MULTI_CONN). `vol@snap` is a read-only export of a
 * snapshot (NBD_FLAG_READ_ONLY; writes get EPERM), read through the snapshot's layers.
 */
import type { ClusterClient } from '../client/cluster-client.ts';
import type { VolumeClient } from '../client/volume-client.ts';
import { giveBack } from '../lib/buffer-pool.ts';
import { ShaleError } from '../lib/errors.ts';
import { SnapshotView } from '../client/snapshot-view.ts';
import type { ExportProvider, NbdExport } from './server.ts';

export class VolumeExports implements ExportProvider {
  readonly #cluster: ClusterClient;
  readonly #exports = new Map<string, NbdExport>();
  readonly #takeover: boolean;
  readonly #volumes = new Map<string, VolumeClient>();

  /** Whether the map names a higher owner epoch for the volume than this gateway holds. */
  #takenOver(name: string): boolean {
    const volume = this.#volumes.get(name);
    if (!volume) return false;
    const owner = this.#cluster.map.owners.find(([volumeId]) => volumeId === volume.info.id);
    return owner !== undefined && owner[1] > volume.ownerEpoch;
  }

  /** With `takeover`, opening a volume another gateway owns takes it over (and fences that gateway). */
  constructor(cluster: ClusterClient, options: { takeover?: boolean } = {}) {
    this.#cluster = cluster;
    this.#takeover = options.takeover ?? false;
  }

  async open(name: string): Promise<NbdExport> {
    const existing = this.#exports.get(name);
    if (existing && !this.#takenOver(name)) return existing;
    if (existing) {
      // Someone (a rollback, flatten or import with --force) took the volume over since: this
      // gateway's client is fenced. Open it again, as any gateway would (refused while the other owner keeps it).
      this.#exports.delete(name);
      this.#volumes.delete(name);
      this.#cluster.forget(name);
    }
    if (name.includes('@')) {
      const at = name.indexOf('@');
      const view = await SnapshotView.open(this.#cluster, name.slice(0, at), name.slice(at + 1));
      const raced = this.#exports.get(name);
      if (raced) return raced;
      const created = snapshotExport(view, () => this.#exports.delete(name));
      this.#exports.set(name, created);
      return created;
    }
    const volume = await this.#cluster.openVolume(name, { takeover: this.#takeover });
    this.#volumes.set(name, volume);
    const raced = this.#exports.get(name);
    if (raced) return raced;
    const created = volumeExport(volume);
    this.#exports.set(name, created);
    return created;
  }

  async list(): Promise<{ name: string; description: string }[]> {
    const { volumes } = await this.#cluster.conductor.volumes();
    const entries: { name: string; description: string }[] = [];
    for (const volume of volumes) {
      entries.push({ name: volume.name, description: `${volume.sizeBytes} bytes, ${volume.replicas} replicas` });
      // Live snapshots are exports too (read-only); `snapshots` counts them without another call for the rest.
      if ((volume.snapshots ?? 0) === 0) continue;
      const { snapshots } = await this.#cluster.conductor.snapshots(volume.name);
      for (const snapshot of snapshots) {
        if (snapshot.state === 'live') entries.push({ name: `${volume.name}@${snapshot.name}`, description: `snapshot of ${volume.name}, ${snapshot.sizeBytes} bytes, read-only` });
      }
    }
    return entries;
  }
}

/**
 * The server calls release() once, when the last connection to the export has closed and its
 * requests have finished. The volume stays open (this gateway stays its owner) and is flushed.
 */
function volumeExport(volume: VolumeClient): NbdExport {
  return {
    name: volume.info.name,
    description: `Shale volume ${volume.info.name}`,
    // A getter: a resize seen in the cluster map shows to the connections made after it.
    get sizeBytes(): number {
      return volume.info.sizeBytes;
    },
    readOnly: false,
    read: (offsetBytes, lengthBytes) => volume.read(offsetBytes, lengthBytes),
    readNow: (offsetBytes, lengthBytes) => volume.readNow(offsetBytes, lengthBytes),
    readThen: (offsetBytes, lengthBytes, done) => volume.readThen(offsetBytes, lengthBytes, done),
    // Read data comes from the process's read buffer pool (the store engine's reads); once the
    // reply is written, the buffer goes back to it. Buffers from elsewhere are ignored by the pool.
    recycle: (data) => giveBack(data),
    write: (offsetBytes, data, fua) => volume.write(offsetBytes, data, { fua }),
    writeNow: (offsetBytes, data, fua, done) => volume.writeNow(offsetBytes, data, fua, done),
    flush: () => volume.flush(),
    trim: (offsetBytes, lengthBytes, fua) => volume.writeZeroes(offsetBytes, lengthBytes, { fua }),
    // Tombstones are written at once, so zeroing is always fast (FAST_ZERO never needs refusing).
    writeZeroes: (offsetBytes, lengthBytes, options) => volume.writeZeroes(offsetBytes, lengthBytes, { fua: options.fua }),
    // Absent and zero blocks read as zeros: holes for NBD block status (clones will consult their parent chain).
    blockStatus: (offsetBytes, lengthBytes) => volume.blockStatus(offsetBytes, lengthBytes),
    release: () => volume.flush(),
  };
}

/** A read-only export of a snapshot; forgotten when its last connection closes. */
function snapshotExport(view: SnapshotView, forget: () => void): NbdExport {
  const readOnly = (): Promise<never> => Promise.reject(new ShaleError('READ_ONLY', `${view.name} is a snapshot: read-only`));
  return {
    name: view.name,
    description: `Shale snapshot ${view.name} (read-only)`,
    sizeBytes: view.sizeBytes,
    readOnly: true,
    read: (offsetBytes, lengthBytes) => view.read(offsetBytes, lengthBytes),
    write: readOnly,
    flush: async () => {},
    trim: readOnly,
    writeZeroes: readOnly,
    blockStatus: (offsetBytes, lengthBytes) => view.blockStatus(offsetBytes, lengthBytes),
    release: async () => forget(),
  };
}
