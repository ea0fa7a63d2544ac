/**
 * The OpenAPI 3.1 document of the conductor's API, served at GET /api/v1/openapi.json. It is
 * written by hand beside types.ts (the TypeScript contract) and docs/api.md (the prose); a test
 * checks that every route the server has is in it, and nothing else.
 */
import { ErrorCodes } from '../../lib/errors.ts';

type Schema = Record<string, unknown>;

const ref = (name: string): Schema => ({ $ref: `#/components/schemas/${name}` });
const integer = (description?: string, minimum = 0): Schema => ({ type: 'integer', minimum, ...(description ? { description } : {}) });
const string = (description?: string): Schema => ({ type: 'string', ...(description ? { description } : {}) });
const object = (properties: Record<string, Schema>, required: string[] = Object.keys(properties)): Schema => ({
  type: 'object', properties, required, additionalProperties: false,
});
const array = (items: Schema): Schema => ({ type: 'array', items });
const size: Schema = { oneOf: [{ type: 'integer', minimum: 1 }, { type: 'string', examples: ['10G', '512MiB', '4096'] }], description: 'Bytes, or a number with a binary unit (K, M, G, T, P; KiB-style too).' };
const okBody = object({ ok: { const: true } });

const schemas: Record<string, Schema> = {
  Error: object({
    code: { type: 'string', enum: Object.keys(ErrorCodes), description: 'Branch on this, never on the message.' },
    message: string('For people.'),
  }),
  Redirect: object({ leader: string('The leader\'s base URL.'), message: string() }),
  ClusterInfo: object({ clusterId: string(), apiVersion: { const: 1 } }),
  ConductorInfo: object({
    id: string(), url: string(), leading: { type: 'boolean' }, leaderUrl: { type: ['string', 'null'] }, meta: string('sqlite:PATH or etcd://…'),
  }),
  DiskReport: object({ uuid: string(), path: string(), capacityBytes: integer(), usedBytes: integer(), liveBytes: integer() }, ['uuid', 'path', 'capacityBytes', 'usedBytes']),
  DiskInfo: object({
    uuid: string(), path: string(), capacityBytes: integer(), usedBytes: integer(), liveBytes: integer(), storeId: integer(undefined, 1), storeAddress: string(),
    storeState: { enum: ['up', 'down', 'out'] }, domain: string(),
  }, ['uuid', 'path', 'capacityBytes', 'usedBytes', 'storeId', 'storeAddress', 'storeState', 'domain']),
  RegisterStoreRequest: object({
    diskUuid: string(), clusterId: string(), address: string('HOST:PORT or unix:/path'), domain: string('Failure domain: "h1" or "rack=r1,host=h1".'),
    disks: array(ref('DiskReport')),
  }),
  RegisterStoreResponse: object({ storeId: integer(undefined, 1), heartbeatIntervalMs: integer(), heartbeatTimeoutMs: integer() }),
  HeartbeatRequest: object({ disks: array(ref('DiskReport')), recovery: ref('RecoveryReport') }, ['disks']),
  RecoveryReport: object({
    pgsQueued: integer(), pgsActive: integer(), bytesCopied: integer(), bytesPerSecond: { type: 'number', minimum: 0 }, bytesPending: integer(),
    paused: string('Why copying waits (e.g. the disk is past backfillfull).'),
  }, ['pgsQueued', 'pgsActive', 'bytesCopied', 'bytesPerSecond', 'bytesPending']),
  RecoveryStatus: object({
    replicasRecovering: integer(), replicasToRemove: integer(), pgsMoving: integer(), storesOut: array(integer(undefined, 1)),
    storesDraining: array(object({ storeId: integer(undefined, 1), replicasLeft: integer() })),
    bytesCopied: integer(), bytesPerSecond: { type: 'number', minimum: 0 }, bytesRemaining: integer(), etaSeconds: { type: ['number', 'null'] },
    fullness: array(object({ storeId: integer(undefined, 1), ratio: { type: 'number' }, level: { enum: ['nearfull', 'backfillfull', 'full'] } })),
    blocked: array(string()),
  }),
  ScrubResult: object({
    volume: { type: ['string', 'null'] }, startedAt: { type: 'string', format: 'date-time' }, finishedAt: { type: 'string', format: 'date-time' },
    pgs: integer(), pgsSkipped: integer(), objects: integer(), blocks: integer(), inconsistentBlocks: integer(), repairedBlocks: integer(),
    unrepairedBlocks: integer(), repairedByStore: array(object({ storeId: integer(undefined, 1), blocks: integer() })), errors: array(string()),
  }),
  MovePlan: object({
    pgs: integer(), replicas: integer('New replicas to fill.'), replicasRemoved: integer('Replicas dropped once their replacements are clean.'),
    bytes: integer('Estimated bytes to copy.'), seconds: { type: 'number', description: 'Estimated time.' }, bytesPerSecond: { type: 'number' },
    rateMeasured: { type: 'boolean' }, stores: array(object({ storeId: integer(undefined, 1), receives: integer(), givesUp: integer() })), blocked: array(string()),
    moves: array(object({ poolId: integer(undefined, 1), pgIndex: integer(), add: array(integer(undefined, 1)), remove: array(integer(undefined, 1)) })),
  }),
  VolumeHealth: object({ pgs: integer(), pgsClean: integer(), pgsRecovering: integer(), pgsDegraded: integer() }),
  StoreMapEntry: object({ id: integer(undefined, 1), address: string(), domain: string(), state: { enum: ['up', 'down', 'out'] } }),
  StoreInfo: object({
    id: integer(undefined, 1), address: string(), domain: string(), state: { enum: ['up', 'down', 'out'] }, capacityBytes: integer(), usedBytes: integer(),
    lastHeartbeatAt: { type: ['string', 'null'], format: 'date-time' }, disks: array(ref('DiskReport')),
    draining: { type: 'boolean' }, recovery: ref('RecoveryReport'),
    downReason: string('While not up: why the leading conductor marked it down (its memory only).'),
  }, ['id', 'address', 'domain', 'state', 'capacityBytes', 'usedBytes', 'lastHeartbeatAt', 'disks']),
  ReplicaEntry: object({ storeId: integer(undefined, 1), state: { enum: ['clean', 'recovering', 'down'] }, sinceEpoch: integer('Map epoch the replica entered its state.') }, ['storeId', 'state']),
  PgEntry: object({ epoch: integer(), replicas: array(ref('ReplicaEntry')) }),
  PoolMapEntry: object({
    id: integer(undefined, 1), name: string(), replicas: integer(undefined, 1), minReplicas: integer(undefined, 1), pgCount: integer(undefined, 1),
    pgs: array(ref('PgEntry')),
  }),
  ClusterMap: object({
    clusterId: string(), epoch: integer('Grows by one with every change of anything in the map.'), stores: array(ref('StoreMapEntry')),
    pools: array(ref('PoolMapEntry')),
    owners: { ...array({ type: 'array', prefixItems: [integer('volume id'), integer('owner epoch')] }), description: '[volumeId, ownerEpoch] of every volume ever opened.' },
    deletedVolumes: { ...array(integer()), description: 'Ids of deleted volumes; never shrinks.' },
    volumeSizes: { ...array({ type: 'array', prefixItems: [integer('volume id'), integer('size in bytes')] }), description: '[volumeId, sizeBytes] of every volume ever opened.' },
    snapContexts: { ...array(ref('SnapContextEntry')), description: 'The snap context of every volume with a snapshot or a parent.' },
  }, ['clusterId', 'epoch', 'stores', 'pools', 'owners', 'deletedVolumes', 'volumeSizes']),
  SnapContextEntry: object({
    volumeId: integer(undefined, 1), seq: integer('The volume\'s snap sequence: writes carry it, stores stamp versions with it.'),
    snapshots: { ...array(integer(undefined, 1)), description: 'Snapshot ids that exist, ascending.' },
    creating: { ...array(integer(undefined, 1)), description: 'Snapshot ids whose owner has not acknowledged the switch yet.' },
    parent: { oneOf: [{ type: 'null' }, object({ volumeId: integer(undefined, 1), snapshotId: integer(undefined, 1), sizeBytes: integer() })] },
  }),
  SnapshotInfo: object({
    volumeId: integer(undefined, 1), volume: string(), id: integer(undefined, 1), name: string(), state: { enum: ['creating', 'live'] },
    sizeBytes: integer(), createdAt: { type: 'string', format: 'date-time' }, clones: array(string()),
  }),
  CreateSnapshotRequest: object({ name: { type: 'string', pattern: '^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$' } }),
  CloneVolumeRequest: object({ name: { type: 'string', pattern: '^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$', description: 'The new volume.' } }),
  SnapshotAckRequest: object({ owner: string(), ownerEpoch: integer(undefined, 1), snapSeq: integer() }),
  FlattenedRequest: object({ owner: string(), ownerEpoch: integer(undefined, 1) }),
  ReportDownRequest: object({ reporter: string(), reason: string() }, []),
  MarkCleanRequest: object({ storeId: integer(undefined, 1), pgEpoch: integer() }),
  OpenVolumeRequest: object({ owner: string(), takeover: { type: 'boolean' } }, ['owner']),
  CloseVolumeRequest: object({ owner: string(), ownerEpoch: integer() }),
  VolumeInfo: object({
    id: integer(undefined, 1), name: string(), sizeBytes: integer(undefined, 1), chunkSizeBytes: integer(undefined, 65536), poolId: integer(undefined, 1),
    poolName: string(), replicas: integer(undefined, 1), owner: { type: ['string', 'null'] }, ownerEpoch: integer(), createdAt: { type: 'string', format: 'date-time' },
    snapSeq: integer('The volume\'s snap sequence (0: never snapshotted).'), snapshots: integer('Number of snapshots (single-volume answers).'),
    parent: { oneOf: [{ type: 'null' }, object({ volumeId: integer(undefined, 1), volume: string(), snapshotId: integer(undefined, 1), snapshot: string() })] },
    health: ref('VolumeHealth'),
  }, ['id', 'name', 'sizeBytes', 'chunkSizeBytes', 'poolId', 'poolName', 'replicas', 'owner', 'ownerEpoch', 'createdAt']),
  OpenVolumeResponse: object({ volume: ref('VolumeInfo'), ownerEpoch: integer(undefined, 1), map: ref('ClusterMap') }),
  CreateVolumeRequest: object({
    name: { type: 'string', pattern: '^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$' }, size, replicas: integer(undefined, 1),
    chunkSize: { ...size, description: 'A power of two from 64 KiB to 1 GiB; default 4 MiB.' }, pool: string('Pool name; default: the default pool.'),
  }, ['name', 'size']),
  ResizeVolumeRequest: object({ size, force: { type: 'boolean', description: 'Needed to shrink.' } }, ['size']),
  CreatePoolRequest: object({
    name: { type: 'string', pattern: '^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$' }, replicas: integer(undefined, 1), minReplicas: integer(undefined, 1),
    pgCount: integer(undefined, 1), domainLevel: { type: 'string', pattern: '^[a-z][a-z0-9_-]{0,31}$', description: '"host" (default), "rack", … or "store".' },
  }, ['name', 'replicas']),
  PoolInfo: object({
    id: integer(undefined, 1), name: string(), replicas: integer(undefined, 1), minReplicas: integer(undefined, 1), pgCount: integer(undefined, 1),
    domainLevel: string(), pgsClean: integer(), pgsDegraded: integer(), createdAt: { type: 'string', format: 'date-time' },
    provisionedBytes: integer('Σ sizes of the pool\'s volumes (list and info).'), usableBytes: integer('Capacity of the pool\'s stores / replicas.'),
    overcommitRatio: { type: 'number', description: 'provisionedBytes / usableBytes.' },
  }, ['id', 'name', 'replicas', 'minReplicas', 'pgCount', 'domainLevel', 'pgsClean', 'pgsDegraded', 'createdAt']),
  PoolDetail: {
    allOf: [ref('PoolInfo'), {
      type: 'object',
      properties: {
        stores: array(object({ storeId: integer(undefined, 1), pgs: integer(), preferred: integer() })),
        pgs: array(object({ index: integer(), epoch: integer(), replicas: array(ref('ReplicaEntry')) })),
      },
      required: ['stores', 'pgs'],
    }],
  },
  AccessKey: object({ accessKey: string(), secretKey: string('Shown to admins and gateways only.'), account: string(), createdAt: { type: 'string', format: 'date-time' } }),
  AccessKeyInfo: object({ accessKey: string(), account: string(), createdAt: { type: 'string', format: 'date-time' } }),
  CreateKeyRequest: object({
    account: { type: 'string', pattern: '^[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}$', description: 'Made on first use.' },
    accessKey: { type: 'string', pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{2,127}$', description: 'Import a known key; generated when absent (give both or neither).' },
    secretKey: { type: 'string', pattern: '^[\\x21-\\x7e]{8,128}$' },
  }, ['account']),
  Bucket: object({
    id: integer(undefined, 1), name: string(), account: string(), poolId: integer(undefined, 1), shardCount: integer(undefined, 1),
    publicRead: { type: 'boolean' }, createdAt: { type: 'string', format: 'date-time' },
  }),
  CreateBucketRequest: object({
    name: { type: 'string', pattern: '^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$' }, account: string(), shardCount: integer('Bucket-index shards, 1..256; default 8.', 1),
  }, ['name', 'account']),
  UpdateBucketRequest: object({ publicRead: { type: 'boolean', description: 'Anonymous GET and HEAD of objects.' } }),
  AllocateDataIdsRequest: object({ count: integer('1..65536', 1) }),
  DataIdRange: object({ first: integer(undefined, 1), count: integer(undefined, 1) }),
  ClusterStatus: object({
    clusterId: string(), epoch: integer(), health: { enum: ['ok', 'degraded', 'error'] },
    stores: object({ total: integer(), up: integer(), down: integer() }), pools: array(ref('PoolInfo')), volumes: integer(),
    capacityBytes: integer(), usedBytes: integer(), provisionedBytes: integer(), messages: array(string()), conductor: ref('ConductorInfo'),
    recovery: ref('RecoveryStatus'), lastScrub: { oneOf: [ref('ScrubResult'), { type: 'null' }] },
  }, ['clusterId', 'epoch', 'health', 'stores', 'pools', 'volumes', 'capacityBytes', 'usedBytes', 'provisionedBytes', 'messages', 'conductor']),
};

interface Operation {
  summary: string;
  request?: string;
  response: string | Schema;
  status?: number;
  parameters?: Schema[];
  public?: boolean;
  write?: boolean;
}

const pathParameter = (name: string, description: string, schema: Schema = { type: 'string' }): Schema => ({ name, in: 'path', required: true, description, schema });
const queryParameter = (name: string, description: string, schema: Schema): Schema => ({ name, in: 'query', required: false, description, schema });

const volumeNameParameter = pathParameter('name', 'Volume name.');

export const operations: Record<string, Record<string, Operation>> = {
  '/openapi.json': { get: { summary: 'This document.', response: { type: 'object' }, public: true } },
  '/cluster': { get: { summary: 'The cluster id and API version.', response: 'ClusterInfo' } },
  '/conductor': { get: { summary: 'The conductor that answers, and the leader.', response: 'ConductorInfo' } },
  '/status': { get: { summary: 'Health, stores, pools, capacity and what needs attention.', response: 'ClusterStatus' } },
  '/map': {
    get: {
      summary: 'The cluster map; with `since`, a long poll that answers once the epoch passes it.', response: 'ClusterMap',
      parameters: [
        queryParameter('since', 'Answer once the map epoch is above this.', integer()),
        queryParameter('waitMs', 'Longest wait, at most 120000; default 30000 with since.', integer()),
      ],
    },
  },
  '/stores': { get: { summary: 'Every store with state, capacity and use.', response: object({ stores: array(ref('StoreInfo')) }) } },
  '/disks': { get: { summary: 'Every disk of every store.', response: object({ disks: array(ref('DiskInfo')) }) } },
  '/stores/register': { post: { summary: 'A store joins (or rejoins) with its disks and failure domain.', request: 'RegisterStoreRequest', response: 'RegisterStoreResponse' } },
  '/stores/{id}/heartbeat': {
    post: { summary: 'A store is alive; refreshes its disk figures.', request: 'HeartbeatRequest', response: okBody, parameters: [pathParameter('id', 'Store id.', integer(undefined, 1))] },
  },
  '/stores/{id}/scrub': {
    post: {
      summary: 'The store reads every live block of its disk and checks its crc32c; answers with what it found (query mibPerSecond throttles it).',
      response: { type: 'object' }, parameters: [pathParameter('id', 'Store id.', integer(undefined, 1))],
    },
  },
  '/stores/{id}/drain': {
    post: {
      summary: 'Drain a store: placement leaves it out, so its PGs get replicas elsewhere and then drop it. dryRun=true only answers the plan; cancel=true takes it back.',
      response: 'MovePlan',
      parameters: [pathParameter('id', 'Store id.', integer(undefined, 1)), queryParameter('dryRun', 'Plan only.', { type: 'boolean' }), queryParameter('cancel', 'Undo a drain.', { type: 'boolean' })],
    },
  },
  '/rebalance': {
    post: { summary: 'The PG moves placement wants now (new stores, out or drained ones); dryRun=true changes nothing.', response: 'MovePlan', parameters: [queryParameter('dryRun', 'Plan only.', { type: 'boolean' })] },
  },
  '/scrub': {
    post: {
      summary: 'Compare the replicas of one volume\'s PGs (or every volume\'s) block by block by crc32c and version, without moving data, and rewrite copies that differ from a good one.',
      response: 'ScrubResult',
      parameters: [queryParameter('volume', 'One volume (default: all).', { type: 'string' }), queryParameter('mibPerSecond', 'Per-store read limit.', integer())],
    },
  },
  '/stores/{id}/report-down': {
    post: { summary: 'A client saw the store fail: mark it down now.', request: 'ReportDownRequest', response: 'ClusterMap', parameters: [pathParameter('id', 'Store id.', integer(undefined, 1))] },
  },
  '/pgs/{pool}/{pg}/clean': {
    post: {
      summary: 'A recovering replica finished its resync.', request: 'MarkCleanRequest', response: 'ClusterMap',
      parameters: [pathParameter('pool', 'Pool id.', integer(undefined, 1)), pathParameter('pg', 'PG number.', integer())],
    },
  },
  '/pools': {
    get: { summary: 'Every pool with PG health.', response: object({ pools: array(ref('PoolInfo')) }) },
    post: { summary: 'Create a pool and place its PGs.', request: 'CreatePoolRequest', response: 'PoolInfo', status: 201 },
  },
  '/pools/{name}': { get: { summary: 'One pool with its PG table.', response: 'PoolDetail', parameters: [pathParameter('name', 'Pool name.')] } },
  '/volumes': {
    get: { summary: 'Every volume.', response: object({ volumes: array(ref('VolumeInfo')) }) },
    post: { summary: 'Create a thin volume.', request: 'CreateVolumeRequest', response: 'VolumeInfo', status: 201 },
  },
  '/volumes/{name}': {
    get: { summary: 'One volume.', response: 'VolumeInfo', parameters: [volumeNameParameter] },
    patch: { summary: 'Resize a volume (grow online; shrink only with force, while closed).', request: 'ResizeVolumeRequest', response: 'VolumeInfo', parameters: [volumeNameParameter] },
    delete: {
      summary: 'Delete a volume; its id goes on the deleted set and its data is purged from the stores.', response: okBody,
      parameters: [volumeNameParameter, queryParameter('force', 'Delete even while open.', { type: 'boolean' })],
    },
  },
  '/volumes/{name}/open': {
    post: { summary: 'Become the volume\'s owner with a new owner epoch.', request: 'OpenVolumeRequest', response: 'OpenVolumeResponse', parameters: [volumeNameParameter] },
  },
  '/s3/keys': {
    get: { summary: 'Every S3 access key (without secrets).', response: object({ keys: array(ref('AccessKeyInfo')) }) },
    post: { summary: 'Create (or import) an S3 access key for an account.', request: 'CreateKeyRequest', response: 'AccessKey', status: 201 },
  },
  '/s3/keys/{accessKey}': {
    get: { summary: 'One access key with its secret (S3 gateways check signatures with it).', response: 'AccessKey', parameters: [pathParameter('accessKey', 'Access key id.')] },
    delete: { summary: 'Delete an access key; requests signed with it are refused from then on.', response: okBody, parameters: [pathParameter('accessKey', 'Access key id.')] },
  },
  '/s3/buckets': {
    get: { summary: 'Every S3 bucket.', response: object({ buckets: array(ref('Bucket')) }) },
    post: { summary: 'Create a bucket record (S3 gateways do this for CreateBucket).', request: 'CreateBucketRequest', response: 'Bucket', status: 201 },
  },
  '/s3/buckets/{name}': {
    get: { summary: 'One bucket.', response: 'Bucket', parameters: [pathParameter('name', 'Bucket name.')] },
    patch: { summary: 'Change a bucket\'s public-read setting.', request: 'UpdateBucketRequest', response: 'Bucket', parameters: [pathParameter('name', 'Bucket name.')] },
    delete: { summary: 'Forget a bucket (the gateway checks it is empty first).', response: okBody, parameters: [pathParameter('name', 'Bucket name.')] },
  },
  '/s3/ids': { post: { summary: 'Hand out a range of fresh S3 data ids (never reused).', request: 'AllocateDataIdsRequest', response: 'DataIdRange' } },
  '/volumes/{name}/snapshots': {
    get: { summary: 'The volume\'s snapshots.', response: object({ snapshots: array(ref('SnapshotInfo')) }), parameters: [volumeNameParameter] },
    post: {
      summary: 'Take a snapshot (O(1)); with an owner, answers once the owner switched its snap context and drained the older one.',
      request: 'CreateSnapshotRequest', response: 'SnapshotInfo', status: 201, parameters: [volumeNameParameter],
    },
  },
  '/volumes/{name}/snapshots/{snap}': {
    get: { summary: 'One snapshot.', response: 'SnapshotInfo', parameters: [volumeNameParameter, pathParameter('snap', 'Snapshot name.')] },
    delete: {
      summary: 'Delete a snapshot (IN_USE while clones read through to it); the stores trim what only it needed.', response: okBody,
      parameters: [volumeNameParameter, pathParameter('snap', 'Snapshot name.')],
    },
  },
  '/volumes/{name}/snapshots/{snap}/clone': {
    post: {
      summary: 'A new volume that reads through to this snapshot (O(1)).', request: 'CloneVolumeRequest', response: 'VolumeInfo', status: 201,
      parameters: [volumeNameParameter, pathParameter('snap', 'Snapshot name.')],
    },
  },
  '/volumes/{name}/snapshot-ack': {
    post: { summary: 'The owner switched to snap context snapSeq and drained the older ones: its creating snapshots are live.', request: 'SnapshotAckRequest', response: okBody, parameters: [volumeNameParameter] },
  },
  '/volumes/{name}/flattened': {
    post: { summary: 'The owner copied its parent chain\'s data in: the clone forgets its parent.', request: 'FlattenedRequest', response: 'VolumeInfo', parameters: [volumeNameParameter] },
  },
  '/volumes/{name}/close': {
    post: { summary: 'Stop owning the volume.', request: 'CloseVolumeRequest', response: object({ ok: { const: true }, cleared: { type: 'boolean' } }), parameters: [volumeNameParameter] },
  },
};

function errorResponse(description: string): Schema {
  return { description, content: { 'application/json': { schema: ref('Error') } } };
}

function buildDocument(): Schema {
  const paths: Record<string, Schema> = {};
  for (const [path, methods] of Object.entries(operations)) {
    const item: Record<string, Schema> = {};
    for (const [method, operation] of Object.entries(methods)) {
      const responseSchema = typeof operation.response === 'string' ? ref(operation.response) : operation.response;
      const responses: Record<string, Schema> = {
        [String(operation.status ?? 200)]: { description: 'Success.', content: { 'application/json': { schema: responseSchema } } },
        '400': errorResponse('INVALID_ARGUMENT (malformed JSON, a bad field), PROTOCOL.'),
        '404': errorResponse('NOT_FOUND.'),
        '503': errorResponse('UNAVAILABLE (no leader yet, metadata unreachable), NOT_READY, BUSY, SHUTTING_DOWN, STALE_PG_EPOCH.'),
        default: errorResponse('Any other code of the error table, with its HTTP status.'),
      };
      if (!operation.public) responses['401'] = errorResponse('UNAUTHENTICATED: no token, or a wrong one.');
      if (method !== 'get') {
        responses['307'] = { description: 'This conductor does not lead: the same request goes to the `Location` header.', content: { 'application/json': { schema: ref('Redirect') } } };
        responses['409'] = errorResponse('ALREADY_EXISTS, FENCED, WRONG_CLUSTER.');
      }
      item[method] = {
        summary: operation.summary,
        operationId: `${method}${path.replace(/[{}]/g, '').split(/[/.-]/).map((part) => part.charAt(0).toUpperCase() + part.slice(1)).join('')}`,
        ...(operation.parameters ? { parameters: operation.parameters } : {}),
        ...(operation.request ? { requestBody: { required: true, content: { 'application/json': { schema: ref(operation.request) } } } } : {}),
        responses,
        ...(operation.public ? { security: [] } : {}),
      };
    }
    paths[path] = item;
  }
  return {
    openapi: '3.1.0',
    info: {
      title: 'Shale conductor API',
      version: '1',
      description: 'The control plane of Shale: membership, pools and placement groups, volumes, owners. Errors are {code, message} with the HTTP status of the error table (docs/errors.md). See docs/api.md.',
    },
    servers: [{ url: '/api/v1' }],
    security: [{ adminToken: [] }],
    paths,
    components: {
      securitySchemes: { adminToken: { type: 'http', scheme: 'bearer', description: 'The cluster admin token (shale conductor prints it once; the CLI reads SHALE_TOKEN or $SHALE_CONFIG_DIR/token).' } },
      schemas,
    },
  };
}

let cached: string | undefined;

/** The document as JSON (built once). */
export function openApiDocument(): string {
  cached ??= JSON.stringify(buildDocument());
  return cached;
}
