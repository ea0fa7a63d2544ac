/**
 * The client library's shared state for one process: the cluster map (kept current by long poll
 * and refreshed on STALE_PG_EPOCH), one channel per store, and the volumes it has open. All NBD
 * connections to one export share one VolumeClient, which is what makes CAN_MULTI_CONN true.
 */
import type { Env } from '../env/env.ts';
import { ShaleError } from '../lib/errors.ts';
import { ConductorClient, MapWatcher } from '../proto/conductor-client.ts';
import { LocalChannel, type LocalStores } from '../proto/local-channel.ts';
import { StoreChannel, type StoreRequester } from '../proto/store-channel.ts';
import type { ClusterMap } from '../conductor/api/types.ts';
import { VolumeClient } from './volume-client.ts';

export interface ClusterClientOptions {
  conductorUrls: string | readonly string[];
  /** Shown as the owner of the volumes this client opens. */
  ownerId: string;
  /** How long I/O waits for enough replicas before failing with NO_QUORUM; 0 waits forever. */
  ioTimeoutMs?: number;
  /** How long one store request may take before the store counts as failed. */
  requestTimeoutMs?: number;
  log?: (message: string) => void;
  /** Stores served by this same process: reached by direct calls instead of sockets. */
  localStores?: LocalStores;
  /** The admin token for the conductor (default: SHALE_TOKEN). */
  token?: string;
}

export class ClusterClient {
  readonly env: Env;
  readonly conductor: ConductorClient;
  readonly watcher: MapWatcher;
  readonly ownerId: string;
  readonly ioTimeoutMs: number;
  readonly requestTimeoutMs: number;
  readonly log: (message: string) => void;
  readonly #localStores: LocalStores | undefined;
  #channels = new Map<string, StoreRequester>();
  #volumes = new Map<string, Promise<VolumeClient>>();
  #reportsInFlight = new Map<number, Promise<ClusterMap>>();

  constructor(env: Env, options: ClusterClientOptions) {
    this.env = env;
    this.conductor = new ConductorClient(env, options.conductorUrls, options.token === undefined ? {} : { token: options.token });
    this.watcher = new MapWatcher(env, this.conductor);
    this.ownerId = options.ownerId;
    this.ioTimeoutMs = options.ioTimeoutMs ?? 0;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
    this.log = options.log ?? (() => {});
    this.#localStores = options.localStores;
  }

  async start(): Promise<void> {
    this.watcher.onMap((map) => this.#applySizes(map));
    await this.watcher.start();
  }

  /** A volume resized by the conductor (a new map epoch): open volumes take the new size. */
  #applySizes(map: ClusterMap): void {
    const sizes = new Map(map.volumeSizes ?? []);
    for (const opening of this.#volumes.values()) {
      opening.then((volume) => {
        const size = sizes.get(volume.info.id);
        if (size !== undefined && size !== volume.info.sizeBytes) {
          this.log(`volume ${volume.info.name} resized from ${volume.info.sizeBytes} to ${size} bytes`);
          volume.info.sizeBytes = size;
        }
        void volume.applySnapContext(map);
      }, () => {});
    }
  }

  get map(): ClusterMap {
    const map = this.watcher.map;
    if (!map) throw new ShaleError('NOT_READY', 'no cluster map yet');
    return map;
  }

  channel(storeId: number): StoreRequester {
    const store = this.map.stores.find((candidate) => candidate.id === storeId);
    if (!store) throw new ShaleError('NOT_FOUND', `store ${storeId} is not in the map`);
    let channel = this.#channels.get(store.address);
    if (!channel) {
      const local = this.#localStores?.get(store.address);
      channel = local
        ? new LocalChannel(store.address, local)
        : new StoreChannel(this.env, store.address, { timeoutMs: this.requestTimeoutMs });
      this.#channels.set(store.address, channel);
    }
    return channel;
  }

  /**
   * A store failed under us: have the conductor mark it down in a new, committed epoch before
   * anything is acknowledged without it (DESIGN §3). Concurrent reports of one store share a call.
   */
  reportDown(storeId: number, reason: string): Promise<ClusterMap> {
    let pending = this.#reportsInFlight.get(storeId);
    if (!pending) {
      pending = this.conductor.reportDown(storeId, { reporter: this.ownerId, reason }).then((map) => {
        this.watcher.offer(map);
        return this.watcher.map!;
      });
      pending.then(
        () => this.#reportsInFlight.delete(storeId),
        () => this.#reportsInFlight.delete(storeId),
      );
      this.#reportsInFlight.set(storeId, pending);
      this.log(`store ${storeId} failed (${reason}); reporting it down`);
    }
    return pending;
  }

  /** Opens a volume for writing (one VolumeClient per name per process). */
  openVolume(name: string, options: { takeover?: boolean } = {}): Promise<VolumeClient> {
    let opening = this.#volumes.get(name);
    if (!opening) {
      opening = VolumeClient.open(this, name, options);
      this.#volumes.set(name, opening);
      opening.catch(() => this.#volumes.delete(name));
    }
    return opening;
  }

  /** Forgets an open volume (after close). */
  forget(name: string): void {
    this.#volumes.delete(name);
  }

  async close(): Promise<void> {
    const volumes = await Promise.allSettled([...this.#volumes.values()]);
    for (const result of volumes) {
      if (result.status === 'fulfilled') await result.value.close().catch(() => {});
    }
    this.watcher.stop();
    for (const channel of this.#channels.values()) channel.close();
  }
}
