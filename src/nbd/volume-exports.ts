/**
 * NBD exports backed by Shale volumes: export name = volume name. Every connection to one export
 * gets the same NbdExport, backed by one VolumeClient, so a FLUSH on any connection covers the
 * writes acknowledged on all of them (CAN_MULTI_CONN). `vol@snap` names are refused with
 * NOT_SUPPORTED until snapshots exist.
 */
import type { ClusterClient } from '../client/cluster-client.ts';
import type { VolumeClient } from '../client/volume-client.ts';
import { ShaleError } from '../lib/errors.ts';
import type { ExportProvider, NbdExport } from './server.ts';

export class VolumeExports implements ExportProvider {
  readonly #cluster: ClusterClient;
  readonly #exports = new Map<string, { export: NbdExport; users: number }>();

  constructor(cluster: ClusterClient) {
    this.#cluster = cluster;
  }

  async open(name: string): Promise<NbdExport> {
    if (name.includes('@')) throw new ShaleError('NOT_SUPPORTED', `snapshot exports ("${name}") are not supported yet`);
    const existing = this.#exports.get(name);
    if (existing) {
      existing.users++;
      return existing.export;
    }
    const volume = await this.#cluster.openVolume(name);
    const raced = this.#exports.get(name);
    if (raced) {
      raced.users++;
      return raced.export;
    }
    const entry = { export: volumeExport(volume, () => this.#release(name)), users: 1 };
    this.#exports.set(name, entry);
    return entry.export;
  }

  async list(): Promise<{ name: string; description: string }[]> {
    const { volumes } = await this.#cluster.conductor.volumes();
    return volumes.map((volume) => ({ name: volume.name, description: `${volume.sizeBytes} bytes, ${volume.replicas} replicas` }));
  }

  /** The volume stays open (this gateway stays its owner) after the last connection; only flushed. */
  async #release(name: string): Promise<void> {
    const entry = this.#exports.get(name);
    if (!entry) return;
    entry.users = Math.max(0, entry.users - 1);
    if (entry.users === 0) await entry.export.flush();
  }
}

function volumeExport(volume: VolumeClient, release: () => Promise<void>): NbdExport {
  return {
    name: volume.info.name,
    sizeBytes: volume.info.sizeBytes,
    readOnly: false,
    read: (offsetBytes, lengthBytes) => volume.read(offsetBytes, lengthBytes),
    write: (offsetBytes, data, fua) => volume.write(offsetBytes, data, { fua }),
    flush: () => volume.flush(),
    trim: (offsetBytes, lengthBytes, fua) => volume.writeZeroes(offsetBytes, lengthBytes, { fua }),
    writeZeroes: (offsetBytes, lengthBytes, options) => volume.writeZeroes(offsetBytes, lengthBytes, { fua: options.fua }),
    release,
  };
}
