/**
 * Calls to the conductor's HTTP API (src/conductor/api/types.ts), for stores and gateways. Takes
 * the list of conductor URLs and sticks to the one that last answered, moving on to the next when
 * one can't be reached. Errors come back as ShaleErrors with the API's code.
 */
import type { Env } from '../env/env.ts';
import { isErrorCode, ShaleError } from '../lib/errors.ts';
import type {
  ClusterInfo, ClusterMap, HeartbeatRequest, MarkCleanRequest, OpenVolumeRequest, OpenVolumeResponse,
  RegisterStoreRequest, RegisterStoreResponse, ReportDownRequest, VolumeInfo,
} from '../conductor/api/types.ts';

export class ConductorClient {
  readonly urls: readonly string[];
  readonly #env: Env;
  #current = 0;

  constructor(env: Env, urls: string | readonly string[]) {
    this.#env = env;
    const list = typeof urls === 'string' ? urls.split(',') : urls;
    this.urls = list.map((url) => url.trim().replace(/\/+$/, '')).filter((url) => url.length > 0);
    if (this.urls.length === 0) throw new ShaleError('INVALID_ARGUMENT', 'no conductor URL given');
  }

  async call<T>(method: string, path: string, body?: unknown, timeoutMs = 30_000): Promise<T> {
    let lastError: unknown;
    for (let attempt = 0; attempt < this.urls.length; attempt++) {
      const index = (this.#current + attempt) % this.urls.length;
      const url = `${this.urls[index]}/api/v1${path}`;
      try {
        const result = await this.#env.net.httpRequest(method, url, {
          body: body === undefined ? undefined : JSON.stringify(body),
          headers: body === undefined ? {} : { 'content-type': 'application/json' },
          timeoutMs,
        });
        this.#current = index;
        const text = result.body.toString('utf8');
        let parsed: unknown;
        try {
          parsed = text.length > 0 ? JSON.parse(text) : {};
        } catch {
          throw new ShaleError('PROTOCOL', `conductor answered ${method} ${path} with status ${result.status} and no JSON`);
        }
        if (result.status >= 400) {
          const errorBody = parsed as { code?: string; message?: string };
          const code = isErrorCode(errorBody.code) ? errorBody.code : 'INTERNAL';
          throw new ShaleError(code, errorBody.message ?? `conductor answered ${result.status}`);
        }
        return parsed as T;
      } catch (error) {
        lastError = error;
        if (!(error instanceof ShaleError) || error.code !== 'UNAVAILABLE') throw error;
      }
    }
    throw lastError;
  }

  cluster(): Promise<ClusterInfo> {
    return this.call('GET', '/cluster');
  }

  register(request: RegisterStoreRequest): Promise<RegisterStoreResponse> {
    return this.call('POST', '/stores/register', request);
  }

  heartbeat(storeId: number, request: HeartbeatRequest): Promise<unknown> {
    return this.call('POST', `/stores/${storeId}/heartbeat`, request, 10_000);
  }

  /** The cluster map; with `sinceEpoch`, waits up to `waitMs` for one newer than it. */
  map(sinceEpoch = -1, waitMs = 0): Promise<ClusterMap> {
    const query = sinceEpoch >= 0 ? `?since=${sinceEpoch}&waitMs=${waitMs}` : '';
    return this.call('GET', `/map${query}`, undefined, waitMs + 10_000);
  }

  reportDown(storeId: number, request: ReportDownRequest): Promise<ClusterMap> {
    return this.call('POST', `/stores/${storeId}/report-down`, request);
  }

  markClean(poolId: number, pg: number, request: MarkCleanRequest): Promise<ClusterMap> {
    return this.call('POST', `/pgs/${poolId}/${pg}/clean`, request);
  }

  openVolume(name: string, request: OpenVolumeRequest): Promise<OpenVolumeResponse> {
    return this.call('POST', `/volumes/${encodeURIComponent(name)}/open`, request);
  }

  closeVolume(name: string, owner: string, ownerEpoch: number): Promise<unknown> {
    return this.call('POST', `/volumes/${encodeURIComponent(name)}/close`, { owner, ownerEpoch });
  }

  volumes(): Promise<{ volumes: VolumeInfo[] }> {
    return this.call('GET', '/volumes');
  }
}

/**
 * Keeps an up-to-date copy of the cluster map by long polling the conductor, and tells listeners
 * of every newer map. `refresh()` fetches at once (after a STALE_PG_EPOCH, say).
 */
export class MapWatcher {
  readonly #env: Env;
  readonly #conductor: ConductorClient;
  #map: ClusterMap | undefined;
  #listeners: ((map: ClusterMap) => void)[] = [];
  #running = false;
  #waiters: { minEpoch: number; resolve: (map: ClusterMap) => void }[] = [];

  constructor(env: Env, conductor: ConductorClient) {
    this.#env = env;
    this.#conductor = conductor;
  }

  get map(): ClusterMap | undefined {
    return this.#map;
  }

  onMap(listener: (map: ClusterMap) => void): void {
    this.#listeners.push(listener);
  }

  /** Starts the long-poll loop; resolves with the first map. */
  async start(): Promise<ClusterMap> {
    if (!this.#running) {
      this.#running = true;
      void this.#loop();
    }
    return this.#map ?? (await this.waitForEpoch(0));
  }

  stop(): void {
    this.#running = false;
  }

  /** Installs a map learnt elsewhere (a conductor reply), if newer. */
  offer(map: ClusterMap): void {
    if (this.#map && map.epoch <= this.#map.epoch) return;
    this.#map = map;
    for (const listener of this.#listeners) listener(map);
    const ready = this.#waiters.filter((waiter) => map.epoch >= waiter.minEpoch);
    this.#waiters = this.#waiters.filter((waiter) => map.epoch < waiter.minEpoch);
    for (const waiter of ready) waiter.resolve(map);
  }

  async refresh(): Promise<ClusterMap> {
    const map = await this.#conductor.map();
    this.offer(map);
    return this.#map!;
  }

  /** Resolves once a map with epoch ≥ minEpoch is known. */
  waitForEpoch(minEpoch: number): Promise<ClusterMap> {
    if (this.#map && this.#map.epoch >= minEpoch) return Promise.resolve(this.#map);
    return new Promise((resolve) => this.#waiters.push({ minEpoch, resolve }));
  }

  async #loop(): Promise<void> {
    let backoffMs = 100;
    while (this.#running) {
      try {
        const map = await this.#conductor.map(this.#map?.epoch ?? -1, 20_000);
        this.offer(map);
        backoffMs = 100;
      } catch {
        await this.#env.clock.sleep(backoffMs);
        backoffMs = Math.min(backoffMs * 2, 2000);
      }
    }
  }
}
