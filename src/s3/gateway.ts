/**
 * The S3 gateway: S3 over HTTP (node:http through env.net) on top of the object store.
 *
 * Every request: route (path style /bucket/key, or virtual-host style bucket.DOMAIN/key) →
 * authenticate (SigV4 header or presigned URL; anonymous only for GET/HEAD of objects in a
 * public-read bucket) → authorize (the bucket's account must be the key's) → the operation.
 * Errors are S3 XML with the code and status of the one error table (src/lib/errors.ts).
 * Bodies are streamed: an upload is never held whole in memory (docs/s3.md has the limits).
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { XMLBuilder, XMLParser } from 'fast-xml-parser';
import { createHash } from 'node:crypto';
import type { Env, Listener } from '../env/env.ts';
import { ErrorCodes, ShaleError, codeOf, toShaleError } from '../lib/errors.ts';
import type { ClusterClient } from '../client/cluster-client.ts';
import { ObjectClient } from '../client/object-client.ts';
import { bodyStream, Checksum, checksumAlgorithmOf, type ChecksumAlgorithm } from './body.ts';
import {
  OBJECT_BYTES_MAX, ObjectStore, PART_BYTES_MIN, PART_NUMBER_MAX, PARTS_MAX, type BucketRef, type DataPart, type Manifest, type PartRecord,
} from './object-store.ts';
import { isSigned, parseQuery, uriEncode, verifyRequest, type AuthResult } from './sigv4.ts';

export interface S3GatewayOptions {
  listen: string;
  cluster: ClusterClient;
  log: (message: string) => void;
  /** Host names under which virtual-host-style requests arrive: BUCKET.DOMAIN. */
  domains?: readonly string[];
  region?: string;
  /** How long replaced or deleted data is kept before it is freed. */
  graceMs?: number;
  /** Unfinished multipart uploads older than this are aborted by the collector. */
  uploadAgeMsMax?: number;
  /** How often the collector runs. */
  collectIntervalMs?: number;
}

export interface S3Gateway {
  readonly address: string;
  readonly store: ObjectStore;
  /** Runs the collector over every bucket now. */
  collect(): Promise<number>;
  close(): Promise<void>;
}

interface Bucket extends BucketRef {
  account: string;
  publicRead: boolean;
  createdAt: string;
}

/** Requests answered without a body read: cache entries live this long. */
const CACHE_MS = 2000;
const XML_BODY_BYTES_MAX = 2 * 1024 * 1024;
const DELETE_OBJECTS_MAX = 1000;
const LIST_KEYS_MAX = 1000;
const STANDARD_HEADERS = ['cache-control', 'content-disposition', 'content-encoding', 'content-language', 'expires'] as const;
const META_BYTES_MAX = 2048;

const xml = new XMLBuilder({ ignoreAttributes: false, suppressEmptyNode: false, format: false });
// Values are kept as sent: keys may begin or end with spaces, or look like numbers.
const xmlParser = new XMLParser({ parseTagValue: false, trimValues: false, ignoreAttributes: true, isArray: (name) => ['Object', 'Part'].includes(name) });

function xmlDocument(root: string, body: Record<string, unknown>): string {
  return `<?xml version="1.0" encoding="UTF-8"?>\n${xml.build({ [root]: { '@_xmlns': 'http://s3.amazonaws.com/doc/2006-03-01/', ...body } }) as string}`;
}

function header(request: IncomingMessage, name: string): string | undefined {
  const value = request.headers[name];
  return Array.isArray(value) ? value.join(',') : value;
}

function httpDate(iso: string): string {
  return new Date(iso).toUTCString();
}

function quoteEtag(etag: string): string {
  return `"${etag}"`;
}

export async function startS3Gateway(env: Env, options: S3GatewayOptions): Promise<S3Gateway> {
  const log = options.log;
  const region = options.region ?? 'us-east-1';
  const domains = options.domains ?? ['localhost', 's3.localhost'];
  const client = new ObjectClient(options.cluster);
  const store = new ObjectStore(env, client, { graceMs: options.graceMs ?? 5 * 60_000 });
  const conductor = options.cluster.conductor;
  const secrets = new Map<string, { secret: string | undefined; account: string | undefined; at: number }>();
  const buckets = new Map<string, { bucket: Bucket | undefined; at: number }>();
  let closing = false;

  const lookupKey = async (accessKey: string): Promise<{ secret: string; account: string } | undefined> => {
    const now = env.clock.nowMs();
    let entry = secrets.get(accessKey);
    if (!entry || now - entry.at > CACHE_MS) {
      try {
        const key = await conductor.call<{ secretKey: string; account: string }>('GET', `/s3/keys/${encodeURIComponent(accessKey)}`);
        entry = { secret: key.secretKey, account: key.account, at: now };
      } catch (error) {
        if (!(error instanceof ShaleError && error.code === 'NOT_FOUND')) throw error;
        entry = { secret: undefined, account: undefined, at: now };
      }
      secrets.set(accessKey, entry);
    }
    return entry.secret !== undefined ? { secret: entry.secret, account: entry.account! } : undefined;
  };

  const findBucket = async (name: string, fresh = false): Promise<Bucket | undefined> => {
    const now = env.clock.nowMs();
    const entry = buckets.get(name);
    if (entry && !fresh && now - entry.at <= CACHE_MS) return entry.bucket;
    let bucket: Bucket | undefined;
    try {
      bucket = await conductor.call<Bucket>('GET', `/s3/buckets/${encodeURIComponent(name)}`);
    } catch (error) {
      if (!(error instanceof ShaleError && (error.code === 'NO_SUCH_BUCKET' || error.code === 'NOT_FOUND'))) throw error;
    }
    buckets.set(name, { bucket, at: now });
    return bucket;
  };

  const sendXml = (response: ServerResponse, status: number, root: string, body: Record<string, unknown>, headers: Record<string, string> = {}): void => {
    const text = xmlDocument(root, body);
    response.writeHead(status, { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(text), ...headers });
    response.end(text);
  };

  /** GET ?acl shows the owner-only ACL; PUT ?acl accepts only a canned owner-only one (nothing else is stored). */
  const answerAcl = (request: IncomingMessage, response: ServerResponse, method: string, account: string): void => {
    if (method === 'GET') {
      sendXml(response, 200, 'AccessControlPolicy', aclDocument(account));
      return;
    }
    checkCannedAcl(request);
    if (header(request, 'x-amz-acl') === undefined) throw new ShaleError('NOT_SUPPORTED', 'only canned owner-only ACLs (x-amz-acl: private) can be set');
    response.writeHead(200, { 'content-length': 0 });
    response.end();
  };
  const sendError = (request: IncomingMessage, response: ServerResponse, error: unknown, resource: string): void => {
    const shaleError = toShaleError(error);
    const spec = ErrorCodes[codeOf(shaleError)];
    if (spec.httpStatus >= 500 || codeOf(shaleError) === 'INTERNAL') log(`s3 ${request.method} ${resource}: ${shaleError.message}${codeOf(error) === 'INTERNAL' && error instanceof Error ? `\n${error.stack}` : ''}`);
    if (response.headersSent) {
      response.destroy();
      return;
    }
    const code = shaleError.code === 'NOT_FOUND' && shaleError.details?.s3Code === 'NoSuchBucketPolicy' ? 'NoSuchBucketPolicy' : spec.s3Code;
    const text = request.method === 'HEAD' ? '' : xmlDocument('Error', { Code: code, Message: shaleError.message, Resource: resource, RequestId: String(response.getHeader('x-amz-request-id') ?? '') }).replace(' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"', '');
    response.writeHead(spec.httpStatus, { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(text), 'x-amz-error-code': code });
    response.end(text);
    // Whatever the client still sends of a refused upload is read and dropped, so the socket stays usable.
    request.resume();
  };

  /** Requests waiting for `100 Continue`: sent only once the request is authorized and its body wanted. */
  const continues = new WeakMap<IncomingMessage, ServerResponse>();
  const readBody = (request: IncomingMessage, auth: AuthResult | undefined, sizeBytesMax: number, options: { objectChecksums?: boolean } = {}): ReturnType<typeof bodyStream> => {
    const body = bodyStream(request, auth, sizeBytesMax, options);
    const response = continues.get(request);
    if (response) {
      continues.delete(request);
      response.writeContinue();
    }
    return body;
  };

  const readXml = async (request: IncomingMessage, auth: AuthResult | undefined): Promise<Record<string, unknown>> => {
    const body = readBody(request, auth, XML_BODY_BYTES_MAX, { objectChecksums: false });
    const parts: Buffer[] = [];
    for await (const data of body.chunks) parts.push(data);
    const text = Buffer.concat(parts).toString('utf8');
    try {
      const parsed = xmlParser.parse(text, true) as Record<string, unknown>;
      return parsed;
    } catch {
      throw new ShaleError('MALFORMED_XML', 'the XML body is not well formed');
    }
  };

  const metadataOf = (request: IncomingMessage): { meta: Record<string, string>; headers: Record<string, string>; contentType?: string } => {
    const meta: Record<string, string> = {};
    const headers: Record<string, string> = {};
    let metaBytes = 0;
    for (const [name, value] of Object.entries(request.headers)) {
      if (value === undefined) continue;
      const text = Array.isArray(value) ? value.join(',') : value;
      if (name.startsWith('x-amz-meta-')) {
        meta[name.slice('x-amz-meta-'.length)] = text;
        metaBytes += name.length - 'x-amz-meta-'.length + text.length;
      }
      if ((STANDARD_HEADERS as readonly string[]).includes(name)) headers[name] = text;
    }
    if (metaBytes > META_BYTES_MAX) throw new ShaleError('INVALID_ARGUMENT', `user metadata of ${metaBytes} bytes exceeds ${META_BYTES_MAX}`);
    const contentType = header(request, 'content-type');
    return { meta, headers, ...(contentType ? { contentType } : {}) };
  };

  const objectHeaders = (manifest: Manifest): Record<string, string> => {
    const out: Record<string, string> = {
      etag: quoteEtag(manifest.etag), 'last-modified': httpDate(manifest.lastModified), 'content-type': manifest.contentType ?? 'binary/octet-stream',
      'accept-ranges': 'bytes',
    };
    for (const [name, value] of Object.entries(manifest.headers ?? {})) out[name] = value;
    for (const [name, value] of Object.entries(manifest.meta ?? {})) out[`x-amz-meta-${name}`] = value;
    if (manifest.partSizes) out['x-amz-mp-parts-count'] = String(manifest.partSizes.length);
    return out;
  };

  /** Conditional GET/HEAD: undefined to go on, or the status to answer (304/412). */
  const conditions = (request: IncomingMessage, manifest: Manifest): number | undefined => {
    const etag = quoteEtag(manifest.etag);
    const modified = Math.floor(Date.parse(manifest.lastModified) / 1000) * 1000;
    const matches = (list: string): boolean => list.split(',').some((tag) => tag.trim() === '*' || tag.trim() === etag || tag.trim() === manifest.etag);
    const ifMatch = header(request, 'if-match');
    const ifNoneMatch = header(request, 'if-none-match');
    const ifModifiedSince = header(request, 'if-modified-since');
    const ifUnmodifiedSince = header(request, 'if-unmodified-since');
    if (ifMatch !== undefined && !matches(ifMatch)) return 412;
    if (ifMatch === undefined && ifUnmodifiedSince !== undefined && !Number.isNaN(Date.parse(ifUnmodifiedSince)) && modified > Date.parse(ifUnmodifiedSince)) return 412;
    if (ifNoneMatch !== undefined && matches(ifNoneMatch)) return 304;
    if (ifNoneMatch === undefined && ifModifiedSince !== undefined && !Number.isNaN(Date.parse(ifModifiedSince)) && modified <= Date.parse(ifModifiedSince)) return 304;
    return undefined;
  };

  /**
   * Conditional writes (If-Match / If-None-Match on PutObject and CompleteMultipartUpload), checked
   * against the current object before anything is written. Not atomic against a concurrent writer
   * of the same key (docs/s3.md).
   */
  const putConditions = async (request: IncomingMessage, bucket: BucketRef, key: string): Promise<void> => {
    const ifMatch = header(request, 'if-match');
    const ifNoneMatch = header(request, 'if-none-match');
    if (ifMatch === undefined && ifNoneMatch === undefined) return;
    const current = await store.head(bucket, key);
    const matches = (list: string): boolean => current !== undefined && list.split(',').some((tag) => ['*', quoteEtag(current.etag), current.etag].includes(tag.trim()));
    if (ifMatch !== undefined) {
      if (!current) throw new ShaleError('NOT_FOUND', `no key ${key}: If-Match cannot hold`);
      if (!matches(ifMatch)) throw new ShaleError('PRECONDITION_FAILED', 'If-Match does not hold');
    }
    if (ifNoneMatch !== undefined && matches(ifNoneMatch)) throw new ShaleError('PRECONDITION_FAILED', 'If-None-Match does not hold');
  };

  /** "bytes=a-b", "bytes=a-", "bytes=-n" → [start, end) or 416; undefined for the whole object. */
  const rangeOf = (text: string | undefined, size: number): [number, number] | undefined => {
    if (text === undefined) return undefined;
    const match = /^bytes=(\d*)-(\d*)$/.exec(text.trim());
    if (!match || (match[1] === '' && match[2] === '')) return undefined; // unparseable ranges are ignored, as HTTP says
    if (match[1] === '') {
      const suffix = Number(match[2]);
      if (suffix === 0) throw new ShaleError('OUT_OF_RANGE', `range ${text} is empty`);
      return [Math.max(0, size - suffix), size];
    }
    const start = Number(match[1]);
    const end = match[2] === '' ? size - 1 : Math.min(Number(match[2]), size - 1);
    if (start >= size) throw new ShaleError('OUT_OF_RANGE', `range ${text} starts beyond the object's ${size} bytes`);
    if (end < start) return undefined;
    return [start, end + 1];
  };

  const stream = async (response: ServerResponse, bucket: BucketRef, manifest: Manifest, start: number, end: number): Promise<void> => {
    for await (const data of store.read(bucket, manifest, start, end)) {
      if (response.destroyed) return;
      if (!response.write(data)) await new Promise<void>((resolve) => {
        response.once('drain', resolve);
        response.once('close', resolve);
      });
    }
    response.end();
  };

  const copySource = async (request: IncomingMessage, account: string): Promise<{ bucket: Bucket; key: string; manifest: Manifest }> => {
    let text = header(request, 'x-amz-copy-source')!;
    const versionAt = text.indexOf('?versionId=');
    if (versionAt >= 0) text = text.slice(0, versionAt);
    let decoded: string;
    try {
      decoded = decodeURIComponent(text);
    } catch {
      throw new ShaleError('INVALID_ARGUMENT', 'bad percent-encoding in x-amz-copy-source');
    }
    if (decoded.startsWith('/')) decoded = decoded.slice(1);
    const slash = decoded.indexOf('/');
    if (slash <= 0 || slash === decoded.length - 1) throw new ShaleError('INVALID_ARGUMENT', 'x-amz-copy-source must be BUCKET/KEY');
    const bucket = await findBucket(decoded.slice(0, slash));
    if (!bucket) throw new ShaleError('NO_SUCH_BUCKET', `no bucket ${decoded.slice(0, slash)}`);
    if (bucket.account !== account && !bucket.publicRead) throw new ShaleError('ACCESS_DENIED', 'the copy source belongs to another account');
    const key = decoded.slice(slash + 1);
    const manifest = await store.head(bucket, key);
    if (!manifest) throw new ShaleError('NOT_FOUND', `no key ${key} in bucket ${bucket.name}`);
    // Copy-source conditions answer 412 whichever fails.
    const fake = { headers: {
      'if-match': header(request, 'x-amz-copy-source-if-match'), 'if-none-match': header(request, 'x-amz-copy-source-if-none-match'),
      'if-modified-since': header(request, 'x-amz-copy-source-if-modified-since'), 'if-unmodified-since': header(request, 'x-amz-copy-source-if-unmodified-since'),
    } } as unknown as IncomingMessage;
    if (conditions(fake, manifest) !== undefined) throw new ShaleError('PRECONDITION_FAILED', 'a copy-source condition does not hold');
    return { bucket, key, manifest };
  };

  const handle = async (request: IncomingMessage, response: ServerResponse): Promise<void> => {
    if (closing) throw new ShaleError('SHUTTING_DOWN', 'the gateway is stopping');
    const method = request.method ?? 'GET';
    const url = request.url ?? '/';
    const questionAt = url.indexOf('?');
    const rawPath = questionAt >= 0 ? url.slice(0, questionAt) : url;
    const rawQuery = questionAt >= 0 ? url.slice(questionAt + 1) : '';
    const queryPairs = parseQuery(rawQuery);
    const query = new Map(queryPairs);
    let path: string;
    try {
      path = decodeURIComponent(rawPath);
    } catch {
      throw new ShaleError('INVALID_ARGUMENT', 'bad percent-encoding in the path');
    }
    // Virtual-host style: BUCKET.DOMAIN[:port].
    const host = (header(request, 'host') ?? '').replace(/:\d+$/, '').toLowerCase();
    let bucketName: string | undefined;
    let key: string | undefined;
    const domain = domains.find((candidate) => host.endsWith(`.${candidate}`));
    if (domain) {
      bucketName = host.slice(0, host.length - domain.length - 1);
      key = path.length > 1 ? path.slice(1) : undefined;
    } else {
      const trimmed = path.slice(1);
      const slash = trimmed.indexOf('/');
      bucketName = trimmed === '' ? undefined : slash < 0 ? trimmed : trimmed.slice(0, slash);
      key = slash < 0 || slash === trimmed.length - 1 ? undefined : trimmed.slice(slash + 1);
    }
    if (key !== undefined && Buffer.byteLength(key) > 1024) throw new ShaleError('INVALID_ARGUMENT', 'object keys are at most 1024 bytes (KeyTooLongError)');

    // Authentication.
    let auth: AuthResult | undefined;
    let account: string | undefined;
    if (isSigned({ method, rawPath, rawQuery, headers: request.headers }, queryPairs)) {
      let keyAccount: string | undefined;
      auth = await verifyRequest({ method, rawPath, rawQuery, headers: request.headers }, queryPairs, env.clock.wallMs(), async (accessKey) => {
        const found = await lookupKey(accessKey);
        keyAccount = found?.account;
        return found?.secret;
      });
      account = keyAccount;
    }

    if (header(request, 'expect')?.toLowerCase() === '100-continue') continues.set(request, response);

    const needBucket = async (): Promise<Bucket> => {
      const bucket = await findBucket(bucketName!);
      if (!bucket) throw new ShaleError('NO_SUCH_BUCKET', `no bucket ${bucketName}`);
      if (bucket.account !== account) {
        const anonymousRead = account === undefined && bucket.publicRead && key !== undefined && (method === 'GET' || method === 'HEAD') && !query.has('uploadId');
        if (!anonymousRead) throw new ShaleError('ACCESS_DENIED', account === undefined ? 'anonymous requests are refused' : `bucket ${bucketName} belongs to another account`);
      }
      return bucket;
    };

    // ---- service -----------------------------------------------------------------------------
    if (bucketName === undefined) {
      if (method !== 'GET') throw new ShaleError('METHOD_NOT_ALLOWED', `${method} is not allowed on the service`);
      if (account === undefined) throw new ShaleError('ACCESS_DENIED', 'anonymous requests are refused');
      const all = (await conductor.call<{ buckets: Bucket[] }>('GET', '/s3/buckets')).buckets.filter((bucket) => bucket.account === account);
      sendXml(response, 200, 'ListAllMyBucketsResult', {
        Owner: { ID: account, DisplayName: account },
        Buckets: { Bucket: all.map((bucket) => ({ Name: bucket.name, CreationDate: bucket.createdAt })) },
      });
      return;
    }

    // ---- bucket ------------------------------------------------------------------------------
    if (key === undefined) {
      if (account === undefined) throw new ShaleError('ACCESS_DENIED', 'anonymous requests are refused');
      if (method === 'PUT' && rawQuery === '') {
        checkCannedAcl(request);
        if (/[A-Z_]/.test(bucketName) || bucketName.length < 3) throw new ShaleError('INVALID_BUCKET_NAME', `bucket name "${bucketName}" breaks the naming rules`);
        // The body (a location constraint) is read and ignored: there is one region.
        for await (const _ of readBody(request, auth, XML_BODY_BYTES_MAX).chunks);
        try {
          const created = await conductor.call<Bucket>('POST', '/s3/buckets', { name: bucketName, account });
          buckets.set(bucketName, { bucket: created, at: env.clock.nowMs() });
        } catch (error) {
          // Creating one's own bucket again succeeds and changes nothing, as S3 in us-east-1 answers.
          if (!(error instanceof ShaleError && error.code === 'ALREADY_EXISTS' && region === 'us-east-1')) throw error;
        }
        response.writeHead(200, { location: `/${bucketName}`, 'content-length': 0 });
        response.end();
        return;
      }
      const bucket = await needBucket();
      if (method === 'HEAD') {
        response.writeHead(200, { 'x-amz-bucket-region': region, 'content-length': 0 });
        response.end();
        return;
      }
      if (method === 'DELETE' && rawQuery === '') {
        if (!(await store.isEmpty(bucket))) throw new ShaleError('BUCKET_NOT_EMPTY', `bucket ${bucketName} is not empty`);
        // Unfinished multipart uploads do not keep a bucket alive (as S3): they are aborted with it.
        for (const upload of await store.uploads(bucket)) await store.endUpload(bucket, upload, await store.parts(bucket, upload));
        await conductor.call('DELETE', `/s3/buckets/${encodeURIComponent(bucketName)}`);
        buckets.delete(bucketName);
        response.writeHead(204);
        response.end();
        return;
      }
      if (method === 'GET' && query.has('location')) {
        sendXml(response, 200, 'LocationConstraint', region === 'us-east-1' ? {} : { '#text': region });
        return;
      }
      if (query.has('acl') && (method === 'GET' || method === 'PUT')) {
        answerAcl(request, response, method, bucket.account);
        return;
      }
      if (method === 'GET' && query.has('versioning')) {
        sendXml(response, 200, 'VersioningConfiguration', {});
        return;
      }
      if (query.has('policy')) {
        if (method === 'PUT') {
          const body = readBody(request, auth, 20_480);
          const parts: Buffer[] = [];
          for await (const data of body.chunks) parts.push(data);
          const publicRead = isPublicReadPolicy(Buffer.concat(parts).toString('utf8'), bucketName);
          await conductor.call('PATCH', `/s3/buckets/${encodeURIComponent(bucketName)}`, { publicRead });
          buckets.delete(bucketName);
          response.writeHead(204);
          response.end();
          return;
        }
        if (method === 'DELETE') {
          await conductor.call('PATCH', `/s3/buckets/${encodeURIComponent(bucketName)}`, { publicRead: false });
          buckets.delete(bucketName);
          response.writeHead(204);
          response.end();
          return;
        }
        if (method === 'GET') {
          if (!bucket.publicRead) throw new ShaleError('NOT_FOUND', 'the bucket has no policy', { s3Code: 'NoSuchBucketPolicy' });
          const text = JSON.stringify(publicReadPolicy(bucketName));
          response.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
          response.end(text);
          return;
        }
      }
      if (method === 'GET' && query.has('uploads')) {
        const uploads = (await store.uploads(bucket)).filter((upload) => upload.key.startsWith(query.get('prefix') ?? ''));
        sendXml(response, 200, 'ListMultipartUploadsResult', {
          Bucket: bucketName, KeyMarker: query.get('key-marker') ?? '', UploadIdMarker: query.get('upload-id-marker') ?? '',
          Prefix: query.get('prefix') ?? '', MaxUploads: 1000, IsTruncated: false,
          Upload: uploads.map((upload) => ({ Key: upload.key, UploadId: upload.uploadId, Initiator: { ID: account }, Owner: { ID: account }, StorageClass: 'STANDARD', Initiated: upload.initiated })),
        });
        return;
      }
      if (method === 'GET' && query.has('versions')) {
        await listVersions(response, bucket, query);
        return;
      }
      if (method === 'GET' && (rawQuery === '' || ['list-type', 'prefix', 'delimiter', 'marker', 'max-keys', 'encoding-type', 'continuation-token', 'start-after', 'fetch-owner'].some((name) => query.has(name)))) {
        await listObjects(response, bucket, query, account);
        return;
      }
      if (method === 'POST' && query.has('delete')) {
        const parsed = await readXml(request, auth);
        const root = parsed.Delete as { Object?: { Key?: string; VersionId?: string }[]; Quiet?: string } | undefined;
        if (!root || !Array.isArray(root.Object) || root.Object.length === 0) throw new ShaleError('MALFORMED_XML', 'DeleteObjects needs <Delete><Object><Key>…');
        if (root.Object.length > DELETE_OBJECTS_MAX) throw new ShaleError('MALFORMED_XML', `at most ${DELETE_OBJECTS_MAX} keys per DeleteObjects`);
        const quiet = String(root.Quiet ?? '').trim() === 'true';
        const deleted: unknown[] = [];
        const errors: unknown[] = [];
        for (const entry of root.Object) {
          const name = typeof entry.Key === 'string' ? entry.Key : undefined;
          if (!name) {
            errors.push({ Key: '', Code: 'InvalidArgument', Message: 'an object without a key' });
            continue;
          }
          if (entry.VersionId !== undefined && entry.VersionId !== 'null') {
            errors.push({ Key: name, VersionId: entry.VersionId, Code: 'NoSuchVersion', Message: 'the bucket is not versioned: its only version id is "null"' });
            continue;
          }
          try {
            await store.delete(bucket, name);
            if (!quiet) deleted.push({ Key: name, ...(entry.VersionId !== undefined ? { VersionId: entry.VersionId } : {}) });
          } catch (error) {
            const shaleError = toShaleError(error);
            errors.push({ Key: name, Code: shaleError.spec.s3Code, Message: shaleError.message });
          }
        }
        sendXml(response, 200, 'DeleteResult', { Deleted: deleted, Error: errors });
        return;
      }
      throw new ShaleError('NOT_SUPPORTED', `this bucket operation (${method} ?${rawQuery.slice(0, 100)}) is not implemented`);
    }

    // ---- object ------------------------------------------------------------------------------
    const bucket = await needBucket();
    const resource = `/${bucketName}/${key}`;
    const uploadId = query.get('uploadId');
    if (query.has('acl') && (method === 'GET' || method === 'PUT')) {
      if (!(await store.head(bucket, key))) throw new ShaleError('NOT_FOUND', `no key ${key} in bucket ${bucketName}`);
      answerAcl(request, response, method, bucket.account);
      return;
    }
    if (['tagging', 'retention', 'legal-hold', 'torrent', 'attributes', 'restore', 'select'].some((name) => query.has(name))) {
      throw new ShaleError('NOT_SUPPORTED', `object ${[...query.keys()].join(', ')} is not implemented`);
    }
    if (method === 'GET' || method === 'HEAD') {
      if (uploadId !== undefined && method === 'GET') {
        const upload = await store.upload(bucket, uploadId, key);
        const parts = await store.parts(bucket, upload);
        const marker = Number(query.get('part-number-marker') ?? 0);
        const maxParts = Math.min(Number(query.get('max-parts') ?? 1000) || 1000, 1000);
        const after = parts.filter((part) => part.partNumber > marker);
        const shown = after.slice(0, maxParts);
        sendXml(response, 200, 'ListPartsResult', {
          Bucket: bucketName, Key: key, UploadId: uploadId, PartNumberMarker: marker,
          NextPartNumberMarker: shown.length > 0 ? shown[shown.length - 1]!.partNumber : marker, MaxParts: maxParts, IsTruncated: after.length > shown.length,
          Initiator: { ID: account ?? '' }, Owner: { ID: bucket.account }, StorageClass: 'STANDARD',
          Part: shown.map((part) => ({ PartNumber: part.partNumber, LastModified: part.lastModified, ETag: quoteEtag(part.etag), Size: part.size })),
        });
        return;
      }
      const manifest = await store.head(bucket, key);
      if (!manifest) throw new ShaleError('NOT_FOUND', `no key ${key} in bucket ${bucketName}`);
      const status = conditions(request, manifest);
      const headers = objectHeaders(manifest);
      if (status === 412) throw new ShaleError('PRECONDITION_FAILED', 'a condition of the request does not hold');
      if (status === 304) {
        response.writeHead(304, { etag: headers.etag!, 'last-modified': headers['last-modified']! });
        response.end();
        return;
      }
      for (const [name, override] of [['response-content-type', 'content-type'], ['response-content-disposition', 'content-disposition'], ['response-cache-control', 'cache-control'],
        ['response-content-encoding', 'content-encoding'], ['response-content-language', 'content-language'], ['response-expires', 'expires']] as const) {
        const value = query.get(name);
        if (value !== undefined) headers[override] = value;
      }
      let range = rangeOf(header(request, 'range'), manifest.size);
      const partNumber = query.get('partNumber');
      if (partNumber !== undefined) {
        const number = Number(partNumber);
        const sizes = manifest.partSizes ?? [manifest.size];
        if (!Number.isInteger(number) || number < 1 || number > PART_NUMBER_MAX) throw new ShaleError('INVALID_ARGUMENT', `partNumber must be 1..${PART_NUMBER_MAX}`);
        if (number > sizes.length) throw new ShaleError('INVALID_PART', `the object has ${sizes.length} part(s), not ${number}`);
        const start = sizes.slice(0, number - 1).reduce((sum, size) => sum + size, 0);
        range = [start, start + sizes[number - 1]!];
      }
      if (range && manifest.size > 0) {
        response.writeHead(206, { ...headers, 'content-length': range[1] - range[0], 'content-range': `bytes ${range[0]}-${range[1] - 1}/${manifest.size}` });
      } else {
        range = [0, manifest.size];
        // The stored checksum covers the whole object: shown only when the whole object is.
        if (manifest.checksum && header(request, 'x-amz-checksum-mode')?.toUpperCase() === 'ENABLED') headers[`x-amz-checksum-${manifest.checksum.algorithm}`] = manifest.checksum.value;
        response.writeHead(200, { ...headers, 'content-length': manifest.size });
      }
      if (method === 'HEAD' || range[1] === range[0]) {
        response.end();
        return;
      }
      await stream(response, bucket, manifest, range[0], range[1]);
      return;
    }
    if (method === 'DELETE') {
      if (uploadId !== undefined) {
        const upload = await store.upload(bucket, uploadId, key);
        await store.endUpload(bucket, upload, await store.parts(bucket, upload));
      } else {
        await store.delete(bucket, key);
      }
      response.writeHead(204);
      response.end();
      return;
    }
    if (method === 'POST' && query.has('uploads')) {
      checkCannedAcl(request);
      const { meta, headers, contentType } = metadataOf(request);
      const algorithmName = header(request, 'x-amz-checksum-algorithm');
      const checksumAlgorithm = algorithmName ? checksumAlgorithmOf(algorithmName) : undefined;
      const upload = await store.createUpload(bucket, { key, meta, headers, ...(contentType ? { contentType } : {}), ...(checksumAlgorithm ? { checksumAlgorithm } : {}) });
      sendXml(response, 200, 'InitiateMultipartUploadResult', { Bucket: bucketName, Key: key, UploadId: upload.uploadId },
        checksumAlgorithm ? { 'x-amz-checksum-algorithm': checksumAlgorithm.toUpperCase() } : {});
      return;
    }
    if (method === 'POST' && uploadId !== undefined) {
      const completed = await store.completedUpload(bucket, uploadId, key);
      if (completed) {
        // A repeated CompleteMultipartUpload of a completed upload answers as the first did.
        sendXml(response, 200, 'CompleteMultipartUploadResult', { Location: resource, Bucket: bucketName, Key: key, ETag: quoteEtag(completed.etag) });
        return;
      }
      const upload = await store.upload(bucket, uploadId, key);
      await putConditions(request, bucket, key);
      const parsed = await readXml(request, auth);
      const root = parsed.CompleteMultipartUpload as { Part?: { PartNumber?: string; ETag?: string }[] } | undefined;
      if (!root || !Array.isArray(root.Part) || root.Part.length === 0) throw new ShaleError('MALFORMED_XML', 'CompleteMultipartUpload needs at least one <Part>');
      if (root.Part.length > PARTS_MAX) throw new ShaleError('INVALID_ARGUMENT', `at most ${PARTS_MAX} parts per upload are supported`);
      const stored = new Map((await store.parts(bucket, upload)).map((part) => [part.partNumber, part]));
      const chosen: PartRecord[] = [];
      let previous = 0;
      for (const entry of root.Part) {
        const number = Number(String(entry.PartNumber ?? '').trim());
        if (!Number.isInteger(number) || number < 1) throw new ShaleError('MALFORMED_XML', `bad part number ${entry.PartNumber}`);
        if (number <= previous) throw new ShaleError('INVALID_PART_ORDER', 'parts must be listed in ascending order');
        previous = number;
        const part = stored.get(number);
        const etag = String(entry.ETag ?? '').replace(/&quot;|"/g, '').trim();
        if (!part || part.etag !== etag) throw new ShaleError('INVALID_PART', `part ${number} was not uploaded${part ? ' with that ETag' : ''}`);
        chosen.push(part);
      }
      chosen.forEach((part, i) => {
        if (i < chosen.length - 1 && part.size < PART_BYTES_MIN) throw new ShaleError('ENTITY_TOO_SMALL', `part ${part.partNumber} is ${part.size} bytes; parts but the last need at least ${PART_BYTES_MIN}`);
      });
      const md5 = createHash('md5');
      for (const part of chosen) md5.update(Buffer.from(part.etag, 'hex'));
      const etag = `${md5.digest('hex')}-${chosen.length}`;
      let checksum: Manifest['checksum'];
      if (upload.checksumAlgorithm && chosen.every((part) => part.checksum?.algorithm === upload.checksumAlgorithm)) {
        // The checksum of checksums, as S3 shows it for multipart objects: base64 "-N".
        const combined = new Checksum(upload.checksumAlgorithm);
        for (const part of chosen) combined.update(Buffer.from(part.checksum!.value, 'base64'));
        checksum = { algorithm: upload.checksumAlgorithm, value: `${combined.digest()}-${chosen.length}` };
      }
      const manifest: Manifest = {
        v: 1, size: chosen.reduce((sum, part) => sum + part.size, 0), etag, lastModified: new Date(env.clock.wallMs()).toISOString(),
        parts: chosen.map((part): DataPart => [part.dataId, part.size]), partSizes: chosen.map((part) => part.size),
        ...(upload.contentType ? { contentType: upload.contentType } : {}), headers: upload.headers ?? {}, meta: upload.meta ?? {}, ...(checksum ? { checksum } : {}),
      };
      await store.commit(bucket, key, manifest, []);
      const unused = [...stored.values()].filter((part) => !chosen.includes(part));
      await store.endUpload(bucket, upload, unused, { etag });
      sendXml(response, 200, 'CompleteMultipartUploadResult', { Location: resource, Bucket: bucketName, Key: key, ETag: quoteEtag(etag) });
      return;
    }
    if (method === 'PUT') {
      checkCannedAcl(request);
      const partNumberText = query.get('partNumber');
      if (partNumberText !== undefined || uploadId !== undefined) {
        const partNumber = Number(partNumberText);
        if (!Number.isInteger(partNumber) || partNumber < 1 || partNumber > PART_NUMBER_MAX) throw new ShaleError('INVALID_ARGUMENT', `part number must be 1..${PART_NUMBER_MAX}`);
        const upload = await store.upload(bucket, uploadId ?? '', key);
        let written: { dataId: number; size: number };
        let etag: string;
        let checksum: PartRecord['checksum'];
        const headers: Record<string, string> = {};
        if (header(request, 'x-amz-copy-source') !== undefined) {
          const source = await copySource(request, account!);
          let start = 0;
          let end = source.manifest.size;
          const rangeText = header(request, 'x-amz-copy-source-range');
          if (rangeText !== undefined) {
            const match = /^bytes=(\d+)-(\d+)$/.exec(rangeText);
            if (!match || Number(match[2]) < Number(match[1]) || Number(match[2]) >= source.manifest.size) throw new ShaleError('INVALID_ARGUMENT', `bad x-amz-copy-source-range ${rangeText}`);
            start = Number(match[1]);
            end = Number(match[2]) + 1;
          }
          const copied = await store.copyData(bucket, source, start, end, { uploadId: upload.uploadId, partNumber, key });
          written = copied;
          etag = copied.md5Hex;
          await store.putPart(bucket, upload, { partNumber, dataId: written.dataId, size: written.size, etag, lastModified: new Date(env.clock.wallMs()).toISOString() });
          sendXml(response, 200, 'CopyPartResult', { LastModified: new Date(env.clock.wallMs()).toISOString(), ETag: quoteEtag(etag) });
          return;
        }
        const body = readBody(request, auth, OBJECT_BYTES_MAX);
        written = await store.writeData(bucket, body.chunks, { uploadId: upload.uploadId, partNumber, key });
        const result = body.done();
        etag = result.md5Hex;
        if (result.checksum) {
          checksum = result.checksum;
          headers[`x-amz-checksum-${result.checksum.algorithm}`] = result.checksum.value;
        }
        await store.putPart(bucket, upload, { partNumber, dataId: written.dataId, size: written.size, etag, lastModified: new Date(env.clock.wallMs()).toISOString(), ...(checksum ? { checksum } : {}) });
        response.writeHead(200, { etag: quoteEtag(etag), 'content-length': 0, ...headers });
        response.end();
        return;
      }
      if (header(request, 'x-amz-copy-source') !== undefined) {
        const source = await copySource(request, account!);
        const directive = (header(request, 'x-amz-metadata-directive') ?? 'COPY').toUpperCase();
        if (directive !== 'COPY' && directive !== 'REPLACE') throw new ShaleError('INVALID_ARGUMENT', `x-amz-metadata-directive must be COPY or REPLACE`);
        if (source.bucket.id === bucket.id && source.key === key && directive === 'COPY') {
          throw new ShaleError('INVALID_REQUEST', 'This copy request is illegal because it is trying to copy an object to itself without changing the object\'s metadata, storage class, website redirect location or encryption attributes.');
        }
        const copied = await store.copyData(bucket, source, 0, source.manifest.size, { key });
        const fresh = metadataOf(request);
        const manifest: Manifest = {
          v: 1, size: copied.size, etag: source.manifest.partSizes ? copied.md5Hex : source.manifest.etag, lastModified: new Date(env.clock.wallMs()).toISOString(),
          parts: copied.size > 0 ? [[copied.dataId, copied.size]] : [],
          ...(directive === 'COPY'
            ? { ...(source.manifest.contentType ? { contentType: source.manifest.contentType } : {}), headers: source.manifest.headers ?? {}, meta: source.manifest.meta ?? {} }
            : { ...(fresh.contentType ? { contentType: fresh.contentType } : {}), headers: fresh.headers, meta: fresh.meta }),
          ...(source.manifest.checksum && !source.manifest.partSizes ? { checksum: source.manifest.checksum } : {}),
        };
        await store.commit(bucket, key, manifest, [copied.dataId]);
        sendXml(response, 200, 'CopyObjectResult', { LastModified: manifest.lastModified, ETag: quoteEtag(manifest.etag) });
        return;
      }
      const { meta, headers, contentType } = metadataOf(request);
      await putConditions(request, bucket, key);
      const body = readBody(request, auth, OBJECT_BYTES_MAX);
      const written = await store.writeData(bucket, body.chunks, { key });
      const result = body.done();
      const manifest: Manifest = {
        v: 1, size: written.size, etag: result.md5Hex, lastModified: new Date(env.clock.wallMs()).toISOString(),
        parts: written.size > 0 ? [[written.dataId, written.size]] : [],
        ...(contentType ? { contentType } : {}), headers, meta, ...(result.checksum ? { checksum: result.checksum } : {}),
      };
      await store.commit(bucket, key, manifest, [written.dataId]);
      const replyHeaders: Record<string, string> = { etag: quoteEtag(manifest.etag), 'content-length': '0' };
      if (result.checksum) replyHeaders[`x-amz-checksum-${result.checksum.algorithm}`] = result.checksum.value;
      response.writeHead(200, replyHeaders);
      response.end();
      return;
    }
    throw new ShaleError('METHOD_NOT_ALLOWED', `${method} is not allowed on an object`);
  };

  const listObjects = async (response: ServerResponse, bucket: Bucket, query: Map<string, string>, account: string): Promise<void> => {
    const v2 = query.get('list-type') === '2';
    const prefix = query.get('prefix') ?? '';
    const delimiter = query.get('delimiter') || undefined;
    const encoding = query.get('encoding-type');
    if (encoding !== undefined && encoding !== 'url') throw new ShaleError('INVALID_ARGUMENT', 'encoding-type must be url');
    const maxKeysText = query.get('max-keys') ?? '1000';
    if (!/^\d{1,9}$/.test(maxKeysText)) throw new ShaleError('INVALID_ARGUMENT', 'max-keys must be a whole number');
    const maxKeys = Math.min(Number(maxKeysText), LIST_KEYS_MAX);
    let startAfter: string | undefined;
    if (v2) {
      const token = query.get('continuation-token');
      if (token !== undefined && token !== '') {
        if (!/^[A-Za-z0-9_-]+$/.test(token)) throw new ShaleError('INVALID_ARGUMENT', 'The continuation token provided is incorrect');
        startAfter = Buffer.from(token, 'base64url').toString('utf8');
      } else startAfter = query.get('start-after') || undefined;
    } else startAfter = query.get('marker') || undefined;
    const encode = (text: string): string => (encoding === 'url' ? uriEncode(text, true).replace(/%2F/g, '/') : text);
    const listed = maxKeys === 0 ? { objects: [], prefixes: [], truncated: false, lastKey: undefined } : await store.list(bucket, { prefix, delimiter, startAfter, limit: maxKeys });
    const contents = listed.objects.map(({ key, manifest }) => ({
      Key: encode(key), LastModified: manifest.lastModified, ETag: quoteEtag(manifest.etag), Size: manifest.size, StorageClass: 'STANDARD',
      ...(v2 && query.get('fetch-owner') !== 'true' ? {} : { Owner: { ID: bucket.account, DisplayName: bucket.account } }),
    }));
    const common = listed.prefixes.map((text) => ({ Prefix: encode(text) }));
    const body: Record<string, unknown> = {
      Name: bucket.name, Prefix: encode(prefix), ...(delimiter ? { Delimiter: encode(delimiter) } : {}), MaxKeys: maxKeys,
      ...(encoding ? { EncodingType: encoding } : {}), IsTruncated: listed.truncated, Contents: contents, CommonPrefixes: common,
    };
    if (v2) {
      body.KeyCount = contents.length + common.length;
      if (query.has('continuation-token')) body.ContinuationToken = query.get('continuation-token');
      if (query.has('start-after')) body.StartAfter = encode(query.get('start-after')!);
      if (listed.truncated && listed.lastKey !== undefined) body.NextContinuationToken = Buffer.from(listed.lastKey, 'utf8').toString('base64url');
    } else {
      body.Marker = encode(query.get('marker') ?? '');
      if (listed.truncated && delimiter && listed.lastKey !== undefined) body.NextMarker = encode(listed.lastKey);
    }
    void account;
    sendXml(response, 200, 'ListBucketResult', body);
  };

  /** ListObjectVersions of an unversioned bucket: every object is its one version, "null". */
  const listVersions = async (response: ServerResponse, bucket: Bucket, query: Map<string, string>): Promise<void> => {
    const prefix = query.get('prefix') ?? '';
    const delimiter = query.get('delimiter') || undefined;
    const maxKeysText = query.get('max-keys') ?? '1000';
    if (!/^\d{1,9}$/.test(maxKeysText)) throw new ShaleError('INVALID_ARGUMENT', 'max-keys must be a whole number');
    const maxKeys = Math.min(Number(maxKeysText), LIST_KEYS_MAX);
    const listed = maxKeys === 0 ? { objects: [], prefixes: [], truncated: false, lastKey: undefined } : await store.list(bucket, { prefix, delimiter, startAfter: query.get('key-marker') || undefined, limit: maxKeys });
    sendXml(response, 200, 'ListVersionsResult', {
      Name: bucket.name, Prefix: prefix, KeyMarker: query.get('key-marker') ?? '', VersionIdMarker: query.get('version-id-marker') ?? '',
      MaxKeys: maxKeys, ...(delimiter ? { Delimiter: delimiter } : {}), IsTruncated: listed.truncated,
      ...(listed.truncated && listed.lastKey !== undefined ? { NextKeyMarker: listed.lastKey, NextVersionIdMarker: 'null' } : {}),
      Version: listed.objects.map(({ key, manifest }) => ({
        Key: key, VersionId: 'null', IsLatest: true, LastModified: manifest.lastModified, ETag: quoteEtag(manifest.etag), Size: manifest.size,
        StorageClass: 'STANDARD', Owner: { ID: bucket.account, DisplayName: bucket.account },
      })),
      CommonPrefixes: listed.prefixes.map((text) => ({ Prefix: text })),
    });
  };

  let requestCounter = 0;
  const gatewayTag = env.random.bytes(4).toString('hex').toUpperCase();
  const listener: Listener = await env.net.serveHttp(options.listen, (request, response) => {
    const resource = request.url ?? '/';
    response.setHeader('x-amz-request-id', `${gatewayTag}${(++requestCounter).toString(16).toUpperCase().padStart(8, '0')}`);
    handle(request, response).catch((error: unknown) => sendError(request, response, error, resource.split('?')[0]!));
  }, { expectContinue: true });

  let collecting: Promise<number> | undefined;
  const collect = (): Promise<number> => {
    collecting ??= (async () => {
      let freed = 0;
      try {
        const all = (await conductor.call<{ buckets: Bucket[] }>('GET', '/s3/buckets')).buckets;
        for (const bucket of all) freed += await store.collect(bucket, options.uploadAgeMsMax ?? 7 * 24 * 3_600_000);
      } finally {
        collecting = undefined;
      }
      return freed;
    })();
    return collecting;
  };
  const timer = env.clock.every(options.collectIntervalMs ?? 30_000, () => {
    collect().catch((error: unknown) => log(`s3 collector: ${(error as Error).message}`));
  });
  log(`s3 gateway listening on http://${listener.address}`);
  return {
    address: listener.address,
    store,
    collect,
    close: async () => {
      closing = true;
      timer.cancel();
      await collecting?.catch(() => {});
      await listener.close();
    },
  };
}

/** Canned ACLs that say nothing beyond "the owner has full control" (there are no other grants). */
const OWNER_ONLY_ACLS = new Set(['private', 'bucket-owner-full-control', 'bucket-owner-read']);

function checkCannedAcl(request: IncomingMessage): void {
  const acl = header(request, 'x-amz-acl');
  if (acl !== undefined && !OWNER_ONLY_ACLS.has(acl)) throw new ShaleError('NOT_SUPPORTED', `ACL ${acl} is not supported: objects and buckets are private to their account (see PutBucketPolicy for public read)`);
  for (const name of ['x-amz-grant-read', 'x-amz-grant-write', 'x-amz-grant-read-acp', 'x-amz-grant-write-acp', 'x-amz-grant-full-control']) {
    if (header(request, name) !== undefined) throw new ShaleError('NOT_SUPPORTED', `${name}: ACL grants are not supported`);
  }
}

function aclDocument(owner: string): Record<string, unknown> {
  return {
    Owner: { ID: owner, DisplayName: owner },
    AccessControlList: { Grant: [{ Grantee: { '@_xmlns:xsi': 'http://www.w3.org/2001/XMLSchema-instance', '@_xsi:type': 'CanonicalUser', ID: owner, DisplayName: owner }, Permission: 'FULL_CONTROL' }] },
  };
}

/** The minimal bucket policy understood: allow s3:GetObject to everyone on BUCKET/*. */
function publicReadPolicy(bucket: string): unknown {
  return {
    Version: '2012-10-17',
    Statement: [{ Effect: 'Allow', Principal: '*', Action: 's3:GetObject', Resource: `arn:aws:s3:::${bucket}/*` }],
  };
}

function isPublicReadPolicy(text: string, bucket: string): boolean {
  let policy: { Statement?: unknown };
  try {
    policy = JSON.parse(text) as { Statement?: unknown };
  } catch {
    throw new ShaleError('MALFORMED_XML', 'the policy is not JSON');
  }
  const statements = Array.isArray(policy.Statement) ? policy.Statement : [policy.Statement];
  const list = (value: unknown): unknown[] => (Array.isArray(value) ? value : [value]);
  const ok = statements.length > 0 && statements.every((raw) => {
    const statement = raw as { Effect?: string; Principal?: unknown; Action?: unknown; Resource?: unknown };
    const principal = statement.Principal === '*' || (typeof statement.Principal === 'object' && statement.Principal !== null && list((statement.Principal as { AWS?: unknown }).AWS).includes('*'));
    return statement.Effect === 'Allow' && principal && list(statement.Action).every((action) => action === 's3:GetObject')
      && list(statement.Resource).every((resource) => resource === `arn:aws:s3:::${bucket}/*`);
  });
  if (!ok) throw new ShaleError('NOT_SUPPORTED', 'only a policy that allows s3:GetObject on BUCKET/* to everyone ("public read") is supported');
  return true;
}

/** The checksum algorithms an upload may name. */
export type { ChecksumAlgorithm };
