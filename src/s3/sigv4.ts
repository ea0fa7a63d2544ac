/**
 * AWS Signature Version 4 for the S3 gateway: the Authorization header, presigned URLs (query
 * auth with expiry), and the signatures of aws-chunked bodies (per chunk and for the trailer).
 * Pure functions over the request's parts; the secret comes from the caller's key lookup.
 *
 * Checks, in order: the form of the credentials (INVALID_ARGUMENT), the access key
 * (INVALID_ACCESS_KEY), the date (REQUEST_TIME_SKEWED beyond 15 minutes for header auth;
 * ACCESS_DENIED once a presigned URL has expired), then the signature (SIGNATURE_MISMATCH),
 * compared in constant time.
 */
import { createHash, createHmac, timingSafeEqual } from 'node:crypto';
import { ShaleError } from '../lib/errors.ts';

export const ALGORITHM = 'AWS4-HMAC-SHA256';
export const EMPTY_SHA256 = createHash('sha256').update('').digest('hex');
/** Largest clock difference accepted for header-signed requests. */
export const CLOCK_SKEW_MS_MAX = 15 * 60_000;
/** Longest validity of a presigned URL (7 days, as S3). */
export const PRESIGN_SECONDS_MAX = 7 * 24 * 3600;

export interface SignedRequest {
  method: string;
  /** The path as sent (percent-encoded), without the query. */
  rawPath: string;
  /** The raw query string (without '?'). */
  rawQuery: string;
  headers: Record<string, string | string[] | undefined>;
}

export interface Credential {
  accessKey: string;
  date: string;
  region: string;
  service: string;
}

export interface AuthResult {
  accessKey: string;
  /** The payload hash the signature covers: a hex SHA-256, UNSIGNED-PAYLOAD or a STREAMING-… form. */
  payloadHash: string;
  /** For chunk signatures: the seed signature, the scope and the signing key. */
  seedSignature: string;
  amzDate: string;
  scope: string;
  signingKey: Buffer;
}

export type SecretLookup = (accessKey: string) => Promise<string | undefined>;

/** Percent-encodes as SigV4 wants: everything but A-Z a-z 0-9 - . _ ~ (and '/' when asked). */
export function uriEncode(text: string, keepSlash: boolean): string {
  let out = '';
  for (const byte of Buffer.from(text, 'utf8')) {
    const c = String.fromCharCode(byte);
    if (/[A-Za-z0-9\-._~]/.test(c) || (keepSlash && c === '/')) out += c;
    else out += `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

function decode(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw new ShaleError('INVALID_ARGUMENT', `bad percent-encoding: "${text.slice(0, 100)}"`);
  }
}

/** The query as (name, value) pairs, decoded. */
export function parseQuery(rawQuery: string): [string, string][] {
  if (rawQuery === '') return [];
  return rawQuery.split('&').filter((part) => part.length > 0).map((part) => {
    const at = part.indexOf('=');
    return at < 0 ? [decode(part), ''] : [decode(part.slice(0, at)), decode(part.slice(at + 1))];
  });
}

function canonicalQuery(pairs: [string, string][]): string {
  return pairs
    .map(([name, value]) => [uriEncode(name, false), uriEncode(value, false)] as const)
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0))
    .map(([name, value]) => `${name}=${value}`)
    .join('&');
}

function headerValue(headers: SignedRequest['headers'], name: string): string | undefined {
  const value = headers[name];
  if (value === undefined) return undefined;
  return Array.isArray(value) ? value.join(',') : value;
}

function canonicalHeaders(request: SignedRequest, signedHeaders: string[]): string {
  return signedHeaders.map((name) => {
    const value = headerValue(request.headers, name);
    if (value === undefined) throw new ShaleError('SIGNATURE_MISMATCH', `signed header ${name} is missing from the request`);
    // Node hands header bytes over as latin1. Clients sign the text they meant: botocore sends it as
    // UTF-8 bytes, Node clients as latin1 bytes. Bytes that are valid UTF-8 are read as UTF-8.
    const text = /[\u0080-\u00ff]/.test(value) ? utf8IfValid(value) : value;
    return `${name}:${text.trim().replace(/\s+/g, ' ')}\n`;
  }).join('');
}

function utf8IfValid(latin1: string): string {
  const bytes = Buffer.from(latin1, 'latin1');
  const decoded = bytes.toString('utf8');
  return Buffer.from(decoded, 'utf8').equals(bytes) ? decoded : latin1;
}

export function signingKey(secret: string, date: string, region: string, service: string): Buffer {
  const dateKey = createHmac('sha256', `AWS4${secret}`).update(date).digest();
  const regionKey = createHmac('sha256', dateKey).update(region).digest();
  const serviceKey = createHmac('sha256', regionKey).update(service).digest();
  return createHmac('sha256', serviceKey).update('aws4_request').digest();
}

export function hmacHex(key: Buffer, text: string): string {
  return createHmac('sha256', key).update(text).digest('hex');
}

export function sha256Hex(data: string | Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

export function signaturesEqual(a: string, b: string): boolean {
  const left = Buffer.from(a, 'utf8');
  const right = Buffer.from(b, 'utf8');
  return left.length === right.length && timingSafeEqual(left, right);
}

function parseCredential(text: string): Credential {
  const parts = text.split('/');
  if (parts.length !== 5 || parts[4] !== 'aws4_request' || !/^\d{8}$/.test(parts[1]!)) {
    throw new ShaleError('INVALID_ARGUMENT', `malformed credential "${text.slice(0, 200)}"`);
  }
  return { accessKey: parts[0]!, date: parts[1]!, region: parts[2]!, service: parts[3]! };
}

function parseAmzDate(text: string | undefined): number {
  const match = text ? /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/.exec(text) : null;
  if (!match) throw new ShaleError('ACCESS_DENIED', `bad or missing x-amz-date "${text ?? ''}"`);
  return Date.UTC(Number(match[1]), Number(match[2]) - 1, Number(match[3]), Number(match[4]), Number(match[5]), Number(match[6]));
}

/** Whether the request carries SigV4 credentials at all (header or query). */
export function isSigned(request: SignedRequest, query: [string, string][]): boolean {
  return headerValue(request.headers, 'authorization') !== undefined || query.some(([name]) => name === 'X-Amz-Signature');
}

/**
 * Verifies a request's SigV4 signature (header or presigned form). `nowMs` is the gateway's
 * wall clock. Resolves with the access key and what the body must still be checked against.
 */
export async function verifyRequest(request: SignedRequest, query: [string, string][], nowMs: number, lookup: SecretLookup): Promise<AuthResult> {
  const authorization = headerValue(request.headers, 'authorization');
  const presigned = authorization === undefined;
  let credential: Credential;
  let signedHeaders: string[];
  let signature: string;
  let amzDate: string;
  let payloadHash: string;
  let canonicalPairs = query;
  if (!presigned) {
    if (!authorization.startsWith(`${ALGORITHM} `)) {
      if (authorization.startsWith('AWS ')) throw new ShaleError('NOT_SUPPORTED', 'AWS signature version 2 is not supported; sign with version 4');
      throw new ShaleError('INVALID_ARGUMENT', 'unsupported authorization type');
    }
    const fields = new Map<string, string>();
    for (const part of authorization.slice(ALGORITHM.length + 1).split(',')) {
      const at = part.indexOf('=');
      if (at > 0) fields.set(part.slice(0, at).trim(), part.slice(at + 1).trim());
    }
    const credentialText = fields.get('Credential');
    const signedText = fields.get('SignedHeaders');
    const signatureText = fields.get('Signature');
    if (!credentialText || !signedText || !signatureText) throw new ShaleError('INVALID_ARGUMENT', 'the Authorization header lacks Credential, SignedHeaders or Signature');
    credential = parseCredential(credentialText);
    signedHeaders = signedText.split(';');
    signature = signatureText;
    amzDate = headerValue(request.headers, 'x-amz-date') ?? '';
    if (amzDate === '') {
      const date = headerValue(request.headers, 'date');
      if (!date) throw new ShaleError('ACCESS_DENIED', 'the request has no x-amz-date or Date header');
      const parsed = Date.parse(date);
      if (Number.isNaN(parsed)) throw new ShaleError('ACCESS_DENIED', 'unreadable Date header');
      amzDate = new Date(parsed).toISOString().replace(/[-:]/g, '').replace(/\.\d{3}/, '');
    }
    const content = headerValue(request.headers, 'x-amz-content-sha256');
    if (content === undefined) throw new ShaleError('INVALID_REQUEST', 'missing required header x-amz-content-sha256');
    payloadHash = content;
    const skew = Math.abs(nowMs - parseAmzDate(amzDate));
    if (skew > CLOCK_SKEW_MS_MAX) throw new ShaleError('REQUEST_TIME_SKEWED', `the request time differs from the server's by ${Math.round(skew / 1000)} s`);
  } else {
    const get = (name: string): string | undefined => query.find(([key]) => key === name)?.[1];
    const algorithm = get('X-Amz-Algorithm');
    if (algorithm !== ALGORITHM) throw new ShaleError('INVALID_ARGUMENT', `X-Amz-Algorithm must be ${ALGORITHM}`);
    credential = parseCredential(get('X-Amz-Credential') ?? '');
    signedHeaders = (get('X-Amz-SignedHeaders') ?? '').split(';');
    signature = get('X-Amz-Signature') ?? '';
    amzDate = get('X-Amz-Date') ?? '';
    const expiresText = get('X-Amz-Expires') ?? '';
    if (!/^\d{1,7}$/.test(expiresText) || Number(expiresText) > PRESIGN_SECONDS_MAX) {
      throw new ShaleError('INVALID_ARGUMENT', `X-Amz-Expires must be 0..${PRESIGN_SECONDS_MAX} seconds`);
    }
    const signedAt = parseAmzDate(amzDate);
    if (nowMs > signedAt + Number(expiresText) * 1000) throw new ShaleError('ACCESS_DENIED', 'Request has expired');
    if (signedAt - nowMs > CLOCK_SKEW_MS_MAX) throw new ShaleError('ACCESS_DENIED', 'Request is not yet valid');
    payloadHash = headerValue(request.headers, 'x-amz-content-sha256') ?? 'UNSIGNED-PAYLOAD';
    canonicalPairs = query.filter(([name]) => name !== 'X-Amz-Signature');
  }
  if (!amzDate.startsWith(credential.date)) throw new ShaleError('SIGNATURE_MISMATCH', 'the credential date is not the request date');
  if (!signedHeaders.includes('host')) throw new ShaleError('ACCESS_DENIED', 'the host header must be signed');
  const secret = await lookup(credential.accessKey);
  if (secret === undefined) throw new ShaleError('INVALID_ACCESS_KEY', `the access key ${credential.accessKey} does not exist`);
  // Each segment decoded and encoded again the SigV4 way (an encoded '/' inside a segment stays %2F).
  const canonicalPath = request.rawPath.split('/').map((segment) => uriEncode(decode(segment), false)).join('/');
  const canonicalRequest = [
    request.method, canonicalPath, canonicalQuery(canonicalPairs), canonicalHeaders(request, signedHeaders), signedHeaders.join(';'),
    presigned && headerValue(request.headers, 'x-amz-content-sha256') === undefined ? 'UNSIGNED-PAYLOAD' : payloadHash,
  ].join('\n');
  const scope = `${credential.date}/${credential.region}/${credential.service}/aws4_request`;
  const stringToSign = [ALGORITHM, amzDate, scope, sha256Hex(canonicalRequest)].join('\n');
  const key = signingKey(secret, credential.date, credential.region, credential.service);
  const expected = hmacHex(key, stringToSign);
  if (!signaturesEqual(expected, signature.toLowerCase())) {
    throw new ShaleError('SIGNATURE_MISMATCH', 'The request signature we calculated does not match the signature you provided. Check your key and signing method.');
  }
  return { accessKey: credential.accessKey, payloadHash, seedSignature: expected, amzDate, scope, signingKey: key };
}

/** The signature one aws-chunked chunk must carry. */
export function chunkSignature(auth: AuthResult, previousSignature: string, chunkSha256Hex: string): string {
  return hmacHex(auth.signingKey, ['AWS4-HMAC-SHA256-PAYLOAD', auth.amzDate, auth.scope, previousSignature, EMPTY_SHA256, chunkSha256Hex].join('\n'));
}

/** The signature the trailer of a signed aws-chunked body must carry. */
export function trailerSignature(auth: AuthResult, previousSignature: string, trailerText: string): string {
  return hmacHex(auth.signingKey, ['AWS4-HMAC-SHA256-TRAILER', auth.amzDate, auth.scope, previousSignature, sha256Hex(trailerText)].join('\n'));
}
