/**
 * Calls to the conductor's HTTP API (src/conductor/api/types.ts), for stores and gateways.
 *
 * Finding the leader. It takes the list of every conductor's URL and sticks to the one that last
 * answered. A conductor that cannot be reached, or answers UNAVAILABLE (no leader elected yet,
 * stopping), makes it try the next; a standby answers a write with 307 and the leader's URL in
 * `Location`, and the client re-sends the request there and sticks to the leader from then on
 * (a leader it did not know is added to the list). So every role follows the leader as it
 * changes, with no configuration beyond the list. A call fails only when no conductor could
 * answer (UNAVAILABLE), and the caller retries later as it would for one conductor.
 *
 * Authentication: every request carries `Authorization: Bearer <token>`: the token given, or
 * SHALE_TOKEN from the environment (`shale up` hands it to its children that way; it never goes
 * on a command line).
 *
 * Errors come back as ShaleErrors with the API's code.
 */
import type { Env } from '../env/env.ts';
import { isErrorCode, ShaleError } from '../lib/errors.ts';
import type {
  ClusterInfo, ClusterMap, FlattenedRequest, HeartbeatRequest, MarkCleanRequest, OpenVolumeRequest, OpenVolumeResponse, SnapshotAckRequest, SnapshotInfo,
  RegisterStoreRequest, RegisterStoreResponse, ReportDownRequest, VolumeInfo,
} from '../conductor/api/types.ts';

/** Redirects followed for one call (a standby points at the leader; one hop is the norm). */
export const redirectsMax = 3;

export interface ConductorClientOptions {
  /** The admin token. Default: the SHALE_TOKEN environment variable, if set. */
  token?: string;
}

/** "http://h:p/", "h:p" → "http://h:p". */
function normalize(url: string): string {
  const trimmed = url.trim().replace(/\/+$/, '').replace(/\/api\/v1$/, '');
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(trimmed) ? trimmed : `http://${trimmed}`;
}

export class ConductorClient {
  /** The conductors as given. */
  readonly urls: readonly string[];
  readonly #env: Env;
  readonly #token: string | undefined;
  /** The conductors to try: those given, then leaders learnt from redirects. */
  readonly #known: string[];
  #current = 0;

  constructor(env: Env, urls: string | readonly string[], options: ConductorClientOptions = {}) {
    this.#env = env;
    const list = typeof urls === 'string' ? urls.split(',') : urls;
    this.urls = list.filter((url) => url.trim().length > 0).map(normalize);
    if (this.urls.length === 0) throw new ShaleError('INVALID_ARGUMENT', 'no conductor URL given');
    this.#known = [...this.urls];
    // The one place a role's token is read from the environment, so no caller has to pass it on.
    this.#token = options.token ?? (typeof process === 'object' ? process.env.SHALE_TOKEN || undefined : undefined);
  }

  /** The conductor calls go to first (the leader, once a redirect named it). */
  get currentUrl(): string {
    return this.#known[this.#current]!;
  }

  #follow(location: string | undefined, from: string): number | undefined {
    if (!location) return undefined;
    let target: URL;
    try {
      target = new URL(location, from);
    } catch {
      return undefined;
    }
    const apiAt = target.pathname.indexOf('/api/v1/');
    const base = normalize(`${target.origin}${apiAt >= 0 ? target.pathname.slice(0, apiAt) : ''}`);
    let index = this.#known.indexOf(base);
    if (index < 0) {
      this.#known.push(base);
      index = this.#known.length - 1;
    }
    return index;
  }

  async call<T>(method: string, path: string, body?: unknown, timeoutMs = 30_000): Promise<T> {
    let lastError: unknown;
    const headers: Record<string, string> = body === undefined ? {} : { 'content-type': 'application/json' };
    if (this.#token) headers.authorization = `Bearer ${this.#token}`;
    const payload = body === undefined ? undefined : JSON.stringify(body);
    let redirects = 0;
    let failures = 0;
    let index = this.#current;
    // Every known conductor until one answers; a redirect to the leader does not count as a failure.
    while (failures < this.#known.length) {
      index %= this.#known.length;
      const base = this.#known[index]!;
      const url = `${base}/api/v1${path}`;
      try {
        const result = await this.#env.net.httpRequest(method, url, { body: payload, headers, timeoutMs });
        if ((result.status === 307 || result.status === 308) && redirects < redirectsMax) {
          const leader = this.#follow(result.headers.location, url);
          if (leader !== undefined) {
            redirects++;
            index = leader;
            this.#current = leader;
            continue;
          }
        }
        this.#current = index;
        const text = result.body.toString('utf8');
        let parsed: unknown;
        try {
          parsed = text.length > 0 ? JSON.parse(text) : {};
        } catch {
          throw new ShaleError('PROTOCOL', `conductor ${base} answered ${method} ${path} with status ${result.status} and no JSON`);
        }
        if (result.status >= 300) {
          const errorBody = parsed as { code?: string; message?: string };
          const code = isErrorCode(errorBody.code) ? errorBody.code : 'INTERNAL';
          throw new ShaleError(code, errorBody.message ?? `conductor ${base} answered ${result.status}`);
        }
        return parsed as T;
      } catch (error) {
        lastError = error;
        // Unreachable, no leader yet, or stopping: another conductor may answer.
        if (!(error instanceof ShaleError) || !['UNAVAILABLE', 'SHUTTING_DOWN'].includes(error.code)) throw error;
        failures++;
        index++;
        this.#current = index % this.#known.length;
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

  /** One volume, with its current size (a gateway may check it after a map names a new size). */
  volume(name: string): Promise<VolumeInfo> {
    return this.call('GET', `/volumes/${encodeURIComponent(name)}`);
  }

  snapshot(volume: string, name: string): Promise<SnapshotInfo> {
    return this.call('GET', `/volumes/${encodeURIComponent(volume)}/snapshots/${encodeURIComponent(name)}`);
  }

  snapshots(volume: string): Promise<{ snapshots: SnapshotInfo[] }> {
    return this.call('GET', `/volumes/${encodeURIComponent(volume)}/snapshots`);
  }

  /** The owner switched its writes to `snapSeq` and the older ones drained. */
  acknowledgeSnapshots(volume: string, request: SnapshotAckRequest): Promise<unknown> {
    return this.call('POST', `/volumes/${encodeURIComponent(volume)}/snapshot-ack`, request);
  }

  markFlattened(volume: string, request: FlattenedRequest): Promise<VolumeInfo> {
    return this.call('POST', `/volumes/${encodeURIComponent(volume)}/flattened`, request);
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
  #refreshing: Promise<ClusterMap> | undefined;

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

  /** Fetches the map now. Single flight: callers while one fetch is under way share it (a burst of STALE_PG_EPOCH replies costs one fetch). */
  refresh(): Promise<ClusterMap> {
    this.#refreshing ??= (async () => {
      try {
        const map = await this.#conductor.map();
        this.offer(map);
        return this.#map!;
      } finally {
        this.#refreshing = undefined;
      }
    })();
    return this.#refreshing;
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
