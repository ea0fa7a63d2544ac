/**
 * The conductor's HTTP/JSON API (contract: ./types.ts, docs/api.md). This module is the edge:
 * it routes, reads bounded JSON bodies, validates every field into typed input for a
 * ConductorService, and turns every failure into `{ code, message }` with the status of the
 * error table. Nothing a client sends can crash it: a malformed body is INVALID_ARGUMENT, an
 * unknown route NOT_FOUND, a bug INTERNAL (logged with its stack). Each error is logged once.
 *
 * Order of checks for every request: stopping (SHUTTING_DOWN) → route (NOT_FOUND) → token
 * (UNAUTHENTICATED; never logged with the token) → body (INVALID_ARGUMENT) → leadership: a
 * request that changes something, on a conductor that does not lead, is answered 307 with
 * `Location: <leader URL><same path>` (or UNAVAILABLE while no one leads) → the handler.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { HttpHandler } from '../../env/env.ts';
import { ErrorCodes, ShaleError, toShaleError } from '../../lib/errors.ts';
import type { CreateVolumeInput, PoolSpec, RegisterInput } from '../cluster-ops.ts';
import type { S3Registry } from '../s3-registry.ts';
import { s3Routes } from './s3-routes.ts';
import {
  chunkSize, diskReports, domainLevel, integerField, type JsonObject, optionalBooleanField, optionalIntegerField, ownerLengthMax, pathId,
  pgCountMax, poolName, replicasMax, requireObject, storeAddress, stringField, volumeName, volumeSize,
} from '../validate.ts';
import type {
  ApiErrorBody, ClusterInfo, ClusterMap, ClusterStatus, ConductorInfo, DiskInfo, DiskReport, OpenVolumeResponse, PoolDetail, PoolInfo,
  RecoveryReport, RegisterStoreResponse, ScrubResult, SnapshotInfo, StoreInfo, VolumeInfo,
} from './types.ts';
import type { MovePlan } from '../healing.ts';

export const apiPrefix = '/api/v1';
/** Largest request body accepted. */
export const bodyBytesMax = 1024 * 1024;
/** Longest long poll a client may ask for. */
export const mapWaitMsMax = 120_000;
/** Long poll when `since` is given without `waitMs`. */
export const mapWaitMsDefault = 30_000;

/** One line per event, as the CLI's makeLog gives. */
export type Log = (message: string) => void;

/** A map ready to send: the object and its JSON, serialized once per epoch. */
export interface MapSnapshot {
  map: ClusterMap;
  json: string;
}

/** What the API asks of the conductor; inputs are already validated. */
export interface ConductorService {
  clusterInfo(): ClusterInfo;
  registerStore(input: RegisterInput): Promise<RegisterStoreResponse>;
  heartbeat(storeId: number, disks: DiskReport[], recovery?: RecoveryReport): Promise<void>;
  reportDown(storeId: number, reporter: string, reason: string): Promise<MapSnapshot>;
  /** Waits as GET /map describes; `onAbort` registers the client-went-away hook. */
  map(since: number | undefined, waitMs: number, onAbort: (cancel: () => void) => void): Promise<MapSnapshot>;
  markClean(poolId: number, pgIndex: number, storeId: number, pgEpoch: number): Promise<MapSnapshot>;
  openVolume(name: string, owner: string, takeover: boolean): Promise<OpenVolumeResponse>;
  closeVolume(name: string, owner: string, ownerEpoch: number): Promise<boolean>;
  status(): Promise<ClusterStatus>;
  conductorInfo(): ConductorInfo;
  stores(): Promise<StoreInfo[]>;
  /** Has the store scrub its disk now (reads every live block, checks its crc32c) and returns its report. */
  scrubStore(storeId: number, mibPerSecondMax: number): Promise<unknown>;
  disks(): Promise<DiskInfo[]>;
  pools(): Promise<PoolInfo[]>;
  pool(name: string): Promise<PoolDetail>;
  createPool(spec: PoolSpec): Promise<PoolInfo>;
  createVolume(input: CreateVolumeInput): Promise<VolumeInfo>;
  volumes(): Promise<VolumeInfo[]>;
  volume(name: string): Promise<VolumeInfo>;
  resizeVolume(name: string, sizeBytes: number, force: boolean): Promise<VolumeInfo>;
  deleteVolume(name: string, force: boolean): Promise<void>;
  /** S3 accounts, keys, buckets and data ids (s3-routes.ts). */
  readonly s3: S3Registry;
  createSnapshot(volumeName: string, name: string): Promise<SnapshotInfo>;
  snapshots(volumeName: string): Promise<SnapshotInfo[]>;
  snapshot(volumeName: string, name: string): Promise<SnapshotInfo>;
  deleteSnapshot(volumeName: string, name: string): Promise<void>;
  acknowledgeSnapshots(volumeName: string, owner: string, ownerEpoch: number, snapSeq: number): Promise<void>;
  cloneVolume(volumeName: string, snapshotName: string, newName: string): Promise<VolumeInfo>;
  markFlattened(volumeName: string, owner: string, ownerEpoch: number): Promise<VolumeInfo>;
  /** Healing (healing.ts): the moves placement wants now; without dryRun, starts them at once. */
  rebalance(dryRun: boolean): Promise<MovePlan>;
  drainStore(storeId: number, options: { dryRun: boolean; cancel: boolean }): Promise<MovePlan>;
  /** Replica scrub (scrub.ts) of one volume's PGs or every volume's. */
  scrub(volumeName: string | null, mibPerSecond: number): Promise<ScrubResult>;
}

/** Checks the bearer token of a request. */
export interface Authenticator {
  /** Whether `token` is valid. Errors: UNAVAILABLE (the MetaStore could not be read). */
  verify(token: string): Promise<boolean>;
}

/** What the handler asks of leadership (leadership.ts). */
export interface LeadershipView {
  readonly isLeader: boolean;
  readonly leaderUrl: string | undefined;
}

interface ApiRequest {
  params: string[];
  query: URLSearchParams;
  body: JsonObject;
  onAbort(cancel: () => void): void;
}

interface ApiReply {
  status?: number;
  body?: unknown;
  /** Pre-serialized JSON body (the map). */
  json?: string;
}

export interface Route {
  method: string;
  /** The path as the OpenAPI document writes it: "/volumes/{name}". */
  path: string;
  pattern: RegExp;
  /** Changes state: only the leader runs it. */
  write: boolean;
  /** Needs no token. */
  public: boolean;
  handle(request: ApiRequest): Promise<ApiReply>;
}

function queryInteger(query: URLSearchParams, name: string, minimum: number, maximum: number): number | undefined {
  const text = query.get(name);
  if (text === null) return undefined;
  if (!/^[0-9]{1,16}$/.test(text)) throw new ShaleError('INVALID_ARGUMENT', `${name} must be a whole number (got "${text}")`);
  const value = Number(text);
  if (value < minimum || value > maximum) throw new ShaleError('INVALID_ARGUMENT', `${name} must be between ${minimum} and ${maximum} (got ${value})`);
  return value;
}

function queryBoolean(query: URLSearchParams, name: string): boolean {
  const text = query.get(name);
  if (text === null || text === 'false' || text === '0') return false;
  if (text === 'true' || text === '1' || text === '') return true;
  throw new ShaleError('INVALID_ARGUMENT', `${name} must be true or false (got "${text}")`);
}

function decodeSegment(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw new ShaleError('INVALID_ARGUMENT', `bad percent-encoding in the path: "${text}"`);
  }
}

const ok = { ok: true } as const;

/** A store's optional resync figures in a heartbeat: numbers ≥ 0; anything else is INVALID_ARGUMENT. */
function recoveryReport(value: unknown): RecoveryReport | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'object' || Array.isArray(value)) throw new ShaleError('INVALID_ARGUMENT', 'recovery must be an object');
  const record = value as Record<string, unknown>;
  const number = (name: string): number => {
    const field = record[name];
    if (typeof field !== 'number' || !Number.isFinite(field) || field < 0) throw new ShaleError('INVALID_ARGUMENT', `recovery.${name} must be a number ≥ 0`);
    return field;
  };
  const paused = record.paused;
  if (paused !== undefined && (typeof paused !== 'string' || paused.length > 1024)) throw new ShaleError('INVALID_ARGUMENT', 'recovery.paused must be a short string');
  return {
    pgsQueued: number('pgsQueued'), pgsActive: number('pgsActive'), bytesCopied: number('bytesCopied'),
    bytesPerSecond: number('bytesPerSecond'), bytesPending: number('bytesPending'), ...(paused ? { paused } : {}),
  };
}

export function conductorRoutes(service: ConductorService, openApiJson: () => string = () => '{}'): Route[] {
  const route = (method: string, path: string, handle: Route['handle'], flags: { write?: boolean; public?: boolean } = {}): Route => ({
    method,
    path,
    pattern: new RegExp(`^${path.replace(/\{[a-zA-Z]+\}/g, '([^/]+)')}$`),
    write: flags.write ?? method !== 'GET',
    public: flags.public ?? false,
    handle,
  });
  return [
    route('GET', '/openapi.json', async () => ({ json: openApiJson() }), { public: true }),
    route('GET', '/cluster', async () => ({ body: service.clusterInfo() })),
    route('GET', '/conductor', async () => ({ body: service.conductorInfo() })),

    route('POST', '/stores/register', async ({ body }) => {
      const input: RegisterInput = {
        diskUuid: stringField(body, 'diskUuid'),
        clusterId: stringField(body, 'clusterId'),
        address: storeAddress(body.address),
        domain: stringField(body, 'domain', { allowEmpty: true }),
        disks: diskReports(body.disks),
      };
      return { body: await service.registerStore(input) };
    }),

    route('POST', '/stores/{id}/heartbeat', async ({ params, body }) => {
      await service.heartbeat(pathId(params[0]!, 'store id'), diskReports(body.disks), recoveryReport(body.recovery));
      return { body: ok };
    }),

    route('POST', '/stores/{id}/report-down', async ({ params, body }) => {
      const storeId = pathId(params[0]!, 'store id');
      const reporter = body.reporter === undefined ? 'unknown' : stringField(body, 'reporter');
      const reason = body.reason === undefined ? 'no reason given' : stringField(body, 'reason', { lengthMax: 1024, allowEmpty: true });
      return { json: (await service.reportDown(storeId, reporter, reason)).json };
    }),

    route('GET', '/stores', async () => ({ body: { stores: await service.stores() } })),
    // Changes no metadata: any conductor may relay it, leader or not.
    route('POST', '/stores/{id}/scrub', async ({ params, query }) => ({
      body: await service.scrubStore(pathId(params[0]!, 'store id'), queryInteger(query, 'mibPerSecond', 0, 1_000_000) ?? 0),
    }), { write: false }),
    route('GET', '/disks', async () => ({ body: { disks: await service.disks() } })),
    route('POST', '/stores/{id}/drain', async ({ params, query }) => ({
      body: await service.drainStore(pathId(params[0]!, 'store id'), { dryRun: queryBoolean(query, 'dryRun'), cancel: queryBoolean(query, 'cancel') }),
    })),
    route('POST', '/rebalance', async ({ query }) => ({ body: await service.rebalance(queryBoolean(query, 'dryRun')) })),
    route('POST', '/scrub', async ({ query }) => {
      const volume = query.get('volume');
      return { body: await service.scrub(volume === null ? null : volumeName(volume), queryInteger(query, 'mibPerSecond', 0, 1_000_000) ?? 0) };
    }),

    route('GET', '/map', async ({ query, onAbort }) => {
      const since = queryInteger(query, 'since', 0, Number.MAX_SAFE_INTEGER);
      const waitMs = queryInteger(query, 'waitMs', 0, mapWaitMsMax) ?? (since === undefined ? 0 : mapWaitMsDefault);
      return { json: (await service.map(since, waitMs, onAbort)).json };
    }),

    route('POST', '/pgs/{pool}/{pg}/clean', async ({ params, body }) => {
      const poolId = pathId(params[0]!, 'pool id');
      const pgIndex = queryIndex(params[1]!);
      const storeId = integerField(body, 'storeId', 1, Number.MAX_SAFE_INTEGER);
      const pgEpoch = integerField(body, 'pgEpoch', 0, Number.MAX_SAFE_INTEGER);
      return { json: (await service.markClean(poolId, pgIndex, storeId, pgEpoch)).json };
    }),

    route('POST', '/volumes/{name}/open', async ({ params, body }) => {
      const name = volumeName(decodeSegment(params[0]!));
      const owner = stringField(body, 'owner', { lengthMax: ownerLengthMax });
      return { body: await service.openVolume(name, owner, optionalBooleanField(body, 'takeover')) };
    }),

    route('POST', '/volumes/{name}/close', async ({ params, body }) => {
      const name = volumeName(decodeSegment(params[0]!));
      const owner = stringField(body, 'owner', { lengthMax: ownerLengthMax });
      const ownerEpoch = integerField(body, 'ownerEpoch', 0, Number.MAX_SAFE_INTEGER);
      return { body: { ok: true, cleared: await service.closeVolume(name, owner, ownerEpoch) } };
    }),

    route('GET', '/status', async () => ({ body: await service.status() })),
    route('GET', '/pools', async () => ({ body: { pools: await service.pools() } })),
    route('POST', '/pools', async ({ body }) => {
      const replicas = integerField(body, 'replicas', 1, replicasMax);
      const minReplicas = optionalIntegerField(body, 'minReplicas', 1, replicasMax);
      if (minReplicas !== undefined && minReplicas > replicas) {
        throw new ShaleError('INVALID_ARGUMENT', `minReplicas (${minReplicas}) must not exceed replicas (${replicas})`);
      }
      const spec: PoolSpec = {
        name: poolName(body.name),
        replicas,
        minReplicas,
        pgCount: optionalIntegerField(body, 'pgCount', 1, pgCountMax) ?? 0,
        domainLevel: domainLevel(body.domainLevel),
      };
      return { status: 201, body: await service.createPool(spec) };
    }),
    route('GET', '/pools/{name}', async ({ params }) => ({ body: await service.pool(poolName(decodeSegment(params[0]!))) })),

    route('POST', '/volumes', async ({ body }) => {
      const input: CreateVolumeInput = {
        name: volumeName(body.name),
        sizeBytes: volumeSize(body.size),
        chunkSizeBytes: chunkSize(body.chunkSize),
        replicas: optionalIntegerField(body, 'replicas', 1, replicasMax),
        pool: body.pool === undefined || body.pool === null ? undefined : poolName(body.pool),
      };
      return { status: 201, body: await service.createVolume(input) };
    }),

    route('GET', '/volumes', async () => ({ body: { volumes: await service.volumes() } })),
    route('GET', '/volumes/{name}', async ({ params }) => ({ body: await service.volume(volumeName(decodeSegment(params[0]!))) })),
    route('PATCH', '/volumes/{name}', async ({ params, body }) => {
      const name = volumeName(decodeSegment(params[0]!));
      return { body: await service.resizeVolume(name, volumeSize(body.size), optionalBooleanField(body, 'force')) };
    }),
    route('DELETE', '/volumes/{name}', async ({ params, query }) => {
      await service.deleteVolume(volumeName(decodeSegment(params[0]!)), queryBoolean(query, 'force'));
      return { body: ok };
    }),
    ...s3Routes(() => service.s3, (method, path, handle) => route(method, path, handle)),

    route('POST', '/volumes/{name}/snapshots', async ({ params, body }) => ({
      status: 201,
      body: await service.createSnapshot(volumeName(decodeSegment(params[0]!)), volumeName(body.name, 'snapshot name')),
    })),
    route('GET', '/volumes/{name}/snapshots', async ({ params }) => ({
      body: { snapshots: await service.snapshots(volumeName(decodeSegment(params[0]!))) },
    })),
    route('GET', '/volumes/{name}/snapshots/{snap}', async ({ params }) => ({
      body: await service.snapshot(volumeName(decodeSegment(params[0]!)), volumeName(decodeSegment(params[1]!), 'snapshot name')),
    })),
    route('DELETE', '/volumes/{name}/snapshots/{snap}', async ({ params }) => {
      await service.deleteSnapshot(volumeName(decodeSegment(params[0]!)), volumeName(decodeSegment(params[1]!), 'snapshot name'));
      return { body: ok };
    }),
    route('POST', '/volumes/{name}/snapshots/{snap}/clone', async ({ params, body }) => ({
      status: 201,
      body: await service.cloneVolume(volumeName(decodeSegment(params[0]!)), volumeName(decodeSegment(params[1]!), 'snapshot name'), volumeName(body.name, 'clone name')),
    })),
    route('POST', '/volumes/{name}/snapshot-ack', async ({ params, body }) => {
      const name = volumeName(decodeSegment(params[0]!));
      await service.acknowledgeSnapshots(name, stringField(body, 'owner', { lengthMax: ownerLengthMax }),
        integerField(body, 'ownerEpoch', 1, Number.MAX_SAFE_INTEGER), integerField(body, 'snapSeq', 0, Number.MAX_SAFE_INTEGER));
      return { body: ok };
    }),
    route('POST', '/volumes/{name}/flattened', async ({ params, body }) => ({
      body: await service.markFlattened(volumeName(decodeSegment(params[0]!)), stringField(body, 'owner', { lengthMax: ownerLengthMax }),
        integerField(body, 'ownerEpoch', 1, Number.MAX_SAFE_INTEGER)),
    })),
  ];
}

function queryIndex(text: string): number {
  if (!/^[0-9]{1,9}$/.test(text)) throw new ShaleError('INVALID_ARGUMENT', `PG number must be a whole number (got "${text}")`);
  return Number(text);
}

/** Reads the request body, refusing more than `limit` bytes. */
function readBody(request: IncomingMessage, limit: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const declared = Number(request.headers['content-length']);
    if (Number.isFinite(declared) && declared > limit) {
      reject(new ShaleError('INVALID_ARGUMENT', `request body of ${declared} bytes is larger than the limit of ${limit}`));
      return;
    }
    const chunks: Buffer[] = [];
    let length = 0;
    let done = false;
    request.on('data', (chunk: Buffer) => {
      if (done) return;
      length += chunk.length;
      if (length > limit) {
        done = true;
        reject(new ShaleError('INVALID_ARGUMENT', `request body is larger than the limit of ${limit} bytes`));
        return;
      }
      chunks.push(chunk);
    });
    request.on('end', () => {
      if (done) return;
      done = true;
      resolve(Buffer.concat(chunks));
    });
    request.on('error', (error) => {
      if (done) return;
      done = true;
      reject(new ShaleError('UNAVAILABLE', `reading the request body: ${error.message}`));
    });
  });
}

function parseJsonBody(raw: Buffer): JsonObject {
  if (raw.length === 0) return {};
  let value: unknown;
  try {
    value = JSON.parse(raw.toString('utf8'));
  } catch (error) {
    throw new ShaleError('INVALID_ARGUMENT', `malformed JSON in the request body: ${(error as Error).message}`);
  }
  return requireObject(value, 'the request body');
}

export interface HttpHandlerOptions {
  log: Log;
  /** While true, every request gets SHUTTING_DOWN. */
  isClosing(): boolean;
  bodyBytesMax?: number;
  /** Without it, no token is asked for (in-process tests and embedders). */
  auth?: Authenticator;
  /** Without it, this conductor always leads. */
  leadership?: LeadershipView;
}

/** Longest token accepted in a header (ours are 50 characters). */
export const tokenLengthMax = 256;

function bearerToken(request: IncomingMessage): string {
  const header = request.headers.authorization;
  if (header === undefined) {
    throw new ShaleError('UNAUTHENTICATED', 'this API needs a token: send "Authorization: Bearer TOKEN" (the CLI reads it from SHALE_TOKEN or $SHALE_CONFIG_DIR/token)');
  }
  const match = /^Bearer +([\x21-\x7e]+) *$/i.exec(header);
  if (!match || match[1]!.length > tokenLengthMax) throw new ShaleError('UNAUTHENTICATED', 'the Authorization header is not "Bearer TOKEN"');
  return match[1]!;
}

export function createHttpHandler(routes: readonly Route[], options: HttpHandlerOptions): HttpHandler {
  const limit = options.bodyBytesMax ?? bodyBytesMax;

  const send = (response: ServerResponse, status: number, json: string, close = false, extra: Record<string, string> = {}): void => {
    if (response.headersSent || response.destroyed) return;
    const headers: Record<string, string | number> = {
      'content-type': 'application/json; charset=utf-8',
      'content-length': Buffer.byteLength(json),
      'cache-control': 'no-store',
      ...extra,
    };
    if (close) headers.connection = 'close';
    response.writeHead(status, headers);
    response.end(json);
  };

  const fail = (request: IncomingMessage, response: ServerResponse, error: unknown, close = false): void => {
    const shaleError = toShaleError(error);
    const what = `${request.method} ${request.url}`;
    if (shaleError.code === 'INTERNAL') {
      options.log(`${what} -> INTERNAL: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
    } else {
      options.log(`${what} -> ${shaleError.code}: ${shaleError.message}`);
    }
    const body: ApiErrorBody = { code: shaleError.code, message: shaleError.message };
    send(response, ErrorCodes[shaleError.code].httpStatus, JSON.stringify(body), close);
  };

  const handle = async (request: IncomingMessage, response: ServerResponse): Promise<void> => {
    if (options.isClosing()) throw new ShaleError('SHUTTING_DOWN', 'the conductor is stopping');
    const method = request.method ?? 'GET';
    let url: URL;
    try {
      url = new URL(request.url ?? '/', 'http://conductor');
    } catch {
      throw new ShaleError('INVALID_ARGUMENT', `cannot parse the request URL "${request.url}"`);
    }
    const path = url.pathname.startsWith(apiPrefix + '/') ? url.pathname.slice(apiPrefix.length) : undefined;
    let matched: { route: Route; params: string[] } | undefined;
    let pathKnown = false;
    for (const route of path === undefined ? [] : routes) {
      const match = route.pattern.exec(path!);
      if (!match) continue;
      pathKnown = true;
      if (route.method === method) {
        matched = { route, params: match.slice(1) };
        break;
      }
    }
    if (!matched) {
      throw new ShaleError('NOT_FOUND', pathKnown ? `${method} is not supported on ${url.pathname}` : `no such endpoint: ${method} ${url.pathname}`);
    }
    if (options.auth && !matched.route.public) {
      if (!(await options.auth.verify(bearerToken(request)))) {
        throw new ShaleError('UNAUTHENTICATED', 'the token is not valid for this cluster (see SHALE_TOKEN or $SHALE_CONFIG_DIR/token)');
      }
    }
    const body = method === 'GET' || method === 'HEAD' ? {} : parseJsonBody(await readBody(request, limit));
    const leadership = options.leadership;
    if (matched.route.write && leadership && !leadership.isLeader) {
      const leaderUrl = leadership.leaderUrl;
      if (!leaderUrl) throw new ShaleError('UNAVAILABLE', 'no conductor leads at the moment (an election is under way): retry in a few seconds');
      const location = `${leaderUrl}${url.pathname}${url.search}`;
      send(response, 307, JSON.stringify({ leader: leaderUrl, message: `this conductor does not lead: send changes to ${leaderUrl}` }), false, { location });
      return;
    }
    const aborts: (() => void)[] = [];
    const onClose = (): void => {
      if (!response.writableFinished) for (const cancel of aborts) cancel();
    };
    response.on('close', onClose);
    try {
      const reply = await matched.route.handle({ params: matched.params, query: url.searchParams, body, onAbort: (cancel) => aborts.push(cancel) });
      send(response, reply.status ?? 200, reply.json ?? JSON.stringify(reply.body));
    } finally {
      response.off('close', onClose);
    }
  };

  return (request, response) => {
    handle(request, response).catch((error: unknown) => {
      // A refused body may still be arriving: answer, then close the connection.
      const bodyRefused = error instanceof ShaleError && error.code === 'INVALID_ARGUMENT' && !request.complete;
      fail(request, response, error, bodyRefused);
    });
  };
}
