/**
 * SigV4 and aws-chunked bodies: AWS's published example of a chunked upload (known answers), a
 * property test against the AWS SDK's own signer (@smithy/signature-v4: any request it signs is
 * accepted, any change to it is refused), presigned expiry, and the chunked parser fed every
 * split of the byte stream.
 */
import assert from 'node:assert/strict';
import { createHash, createHmac } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import fc from 'fast-check';
import { SignatureV4 } from '@smithy/signature-v4';
import { ShaleError } from '../lib/errors.ts';
import { bodyStream } from './body.ts';
import { chunkSignature, parseQuery, verifyRequest, type AuthResult } from './sigv4.ts';

const EXAMPLE = {
  accessKey: 'AKIAIOSFODNN7EXAMPLE',
  secret: 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY',
  now: Date.UTC(2013, 4, 24, 0, 0, 0),
  seed: '4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9',
  chunks: [
    { size: 65536, signature: 'ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648' },
    { size: 1024, signature: '0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497' },
    { size: 0, signature: 'b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9' },
  ],
};

const exampleHeaders = {
  host: 's3.amazonaws.com',
  'x-amz-date': '20130524T000000Z',
  'x-amz-storage-class': 'REDUCED_REDUNDANCY',
  authorization: `AWS4-HMAC-SHA256 Credential=${EXAMPLE.accessKey}/20130524/us-east-1/s3/aws4_request,SignedHeaders=content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;x-amz-storage-class,Signature=${EXAMPLE.seed}`,
  'x-amz-content-sha256': 'STREAMING-AWS4-HMAC-SHA256-PAYLOAD',
  'content-encoding': 'aws-chunked',
  'x-amz-decoded-content-length': '66560',
  'content-length': '66824',
};

const lookup = (accessKey: string, secret: string) => async (asked: string) => (asked === accessKey ? secret : undefined);

function hasCode(code: string) {
  return (error: unknown) => error instanceof ShaleError && error.code === code;
}

function exampleBody(tamper = false): Buffer {
  const parts: Buffer[] = [];
  for (const chunk of EXAMPLE.chunks) {
    parts.push(Buffer.from(`${chunk.size.toString(16)};chunk-signature=${chunk.signature}\r\n`));
    const data = Buffer.alloc(chunk.size, 'a');
    if (tamper && chunk.size === 1024) data[10] = 0x62;
    parts.push(data, Buffer.from('\r\n'));
  }
  return Buffer.concat(parts);
}

function request(headers: Record<string, string>, body: Buffer, split: number): IncomingMessage {
  const pieces: Buffer[] = [];
  for (let at = 0; at < body.length; at += split) pieces.push(body.subarray(at, at + split));
  const stream = Readable.from(pieces) as unknown as IncomingMessage;
  (stream as { headers: Record<string, string> }).headers = headers;
  return stream;
}

async function drain(body: ReturnType<typeof bodyStream>): Promise<Buffer> {
  const out: Buffer[] = [];
  for await (const data of body.chunks) out.push(Buffer.from(data));
  return Buffer.concat(out);
}

test('sigv4: AWS\'s chunked-upload example verifies: seed signature, every chunk signature, at every split of the stream', async () => {
  const auth = await verifyRequest({ method: 'PUT', rawPath: '/examplebucket/chunkObject.txt', rawQuery: '', headers: exampleHeaders }, [], EXAMPLE.now, lookup(EXAMPLE.accessKey, EXAMPLE.secret));
  assert.equal(auth.seedSignature, EXAMPLE.seed);
  assert.equal(chunkSignature(auth, EXAMPLE.seed, createHash('sha256').update(Buffer.alloc(65536, 'a')).digest('hex')), EXAMPLE.chunks[0]!.signature);
  for (const split of [2, 7, 88, 4096, 70_000]) {
    const body = bodyStream(request(exampleHeaders, exampleBody(), split), auth, 1 << 30);
    const data = await drain(body);
    assert.ok(data.equals(Buffer.alloc(66560, 'a')), `split ${split}`);
    assert.equal(body.done().sizeBytes, 66560);
    assert.equal(body.done().md5Hex, createHash('md5').update(data).digest('hex'));
  }
  // A changed byte breaks that chunk's signature; a wrong secret breaks the seed.
  await assert.rejects(drain(bodyStream(request(exampleHeaders, exampleBody(true), 1000), auth, 1 << 30)), hasCode('SIGNATURE_MISMATCH'));
  await assert.rejects(verifyRequest({ method: 'PUT', rawPath: '/examplebucket/chunkObject.txt', rawQuery: '', headers: exampleHeaders }, [], EXAMPLE.now, lookup(EXAMPLE.accessKey, 'other')), hasCode('SIGNATURE_MISMATCH'));
  await assert.rejects(verifyRequest({ method: 'PUT', rawPath: '/examplebucket/chunkObject.txt', rawQuery: '', headers: exampleHeaders }, [], EXAMPLE.now, lookup('SOMEONE', 'x')), hasCode('INVALID_ACCESS_KEY'));
  // A day later the same request is refused as skewed.
  await assert.rejects(verifyRequest({ method: 'PUT', rawPath: '/examplebucket/chunkObject.txt', rawQuery: '', headers: exampleHeaders }, [], EXAMPLE.now + 86_400_000, lookup(EXAMPLE.accessKey, EXAMPLE.secret)), hasCode('REQUEST_TIME_SKEWED'));
  // A body shorter than announced, or garbage instead of a chunk header.
  await assert.rejects(drain(bodyStream(request({ ...exampleHeaders, 'x-amz-decoded-content-length': '66561' }, exampleBody(), 999), auth, 1 << 30)), hasCode('INVALID_ARGUMENT'));
  await assert.rejects(drain(bodyStream(request(exampleHeaders, Buffer.from('zz;chunk-signature=1\r\n'), 3), auth, 1 << 30)), hasCode('INVALID_ARGUMENT'));
});

test('sigv4: unsigned chunked bodies with a trailing checksum are decoded and the checksum checked', async () => {
  const data = Buffer.from('hello, trailing checksum world');
  const { crc32 } = await import('node:zlib');
  const sum = Buffer.alloc(4);
  sum.writeUInt32BE(crc32(data), 0);
  const encode = (value: string) => Buffer.from(`${data.length.toString(16)}\r\n${data.toString()}\r\n0\r\nx-amz-checksum-crc32:${value}\r\n\r\n`);
  const headers = {
    'x-amz-content-sha256': 'STREAMING-UNSIGNED-PAYLOAD-TRAILER', 'x-amz-trailer': 'x-amz-checksum-crc32', 'x-amz-decoded-content-length': String(data.length),
  };
  const unsignedAuth = { payloadHash: 'STREAMING-UNSIGNED-PAYLOAD-TRAILER' } as AuthResult;
  for (const split of [1, 5, 1000]) {
    const body = bodyStream(request(headers, encode(sum.toString('base64')), split), unsignedAuth, 1 << 20);
    assert.ok((await drain(body)).equals(data));
    assert.deepEqual(body.done().checksum, { algorithm: 'crc32', value: sum.toString('base64') });
  }
  await assert.rejects(drain(bodyStream(request(headers, encode('AAAAAA=='), 9), unsignedAuth, 1 << 20)), hasCode('BAD_DIGEST'));
  // A plain body checked against its x-amz-content-sha256.
  const plainHeaders = { 'x-amz-content-sha256': createHash('sha256').update(data).digest('hex'), 'content-length': String(data.length) };
  const plainAuth = { payloadHash: plainHeaders['x-amz-content-sha256'] } as AuthResult;
  assert.ok((await drain(bodyStream(request(plainHeaders, data, 4), plainAuth, 1 << 20))).equals(data));
  const other = Buffer.from(data);
  other[0] = 0x48;
  await assert.rejects(drain(bodyStream(request(plainHeaders, other, 4), plainAuth, 1 << 20)), hasCode('CONTENT_SHA256_MISMATCH'));
});

test('sigv4: whatever the AWS SDK signer signs (header or presigned) verifies; any change is refused', async () => {
  const segment = fc.string({ minLength: 1, maxLength: 12, unit: fc.constantFrom(...'abcXYZ019-_.~ +&=%/é!*\'()'.split('')) });
  await fc.assert(fc.asyncProperty(
    fc.array(segment, { minLength: 1, maxLength: 4 }), fc.array(fc.tuple(segment, fc.string({ maxLength: 8 })), { maxLength: 4 }), fc.boolean(), fc.nat({ max: 3 }),
    async (pathParts, queryPairs, presign, mutation) => {
      const credentials = { accessKeyId: 'AKPROPERTY', secretAccessKey: 'property/secret+key' };
      const signer = new SignatureV4({ credentials, region: 'us-east-1', service: 's3', sha256: Sha256, uriEscapePath: false, applyChecksum: false });
      const path = `/bucket/${pathParts.map((part) => strictEncode(part)).join('/')}`;
      const query: Record<string, string> = {};
      for (const [name, value] of queryPairs) if (!name.startsWith('X-Amz')) query[name] = value;
      const now = Date.UTC(2026, 0, 2, 3, 4, 5);
      const base = { method: 'GET', protocol: 'http:', hostname: 'gateway.test', port: 9000, path, query, headers: { host: 'gateway.test:9000', 'x-amz-content-sha256': 'UNSIGNED-PAYLOAD' } };
      const signed = presign
        ? await signer.presign(base, { signingDate: new Date(now), expiresIn: 600 })
        : await signer.sign(base, { signingDate: new Date(now) });
      const rawQuery = Object.entries(signed.query ?? {}).map(([name, value]) => `${encodeURIComponent(name)}=${encodeURIComponent(String(value))}`).join('&');
      const headers = Object.fromEntries(Object.entries(signed.headers).map(([name, value]) => [name.toLowerCase(), value]));
      const verify = (changes: { path?: string; query?: string; headers?: Record<string, string>; now?: number } = {}) => {
        const finalQuery = changes.query ?? rawQuery;
        return verifyRequest({ method: 'GET', rawPath: changes.path ?? path, rawQuery: finalQuery, headers: changes.headers ?? headers }, parseQuery(finalQuery), changes.now ?? now + 1000, lookup('AKPROPERTY', 'property/secret+key'));
      };
      assert.equal((await verify()).accessKey, 'AKPROPERTY');
      const changed = [
        () => verify({ path: `${path}x` }),
        () => verify({ query: rawQuery === '' ? 'extra=1' : `${rawQuery}&extra=1` }),
        () => verify({ headers: { ...headers, host: 'other.test:9000' } }),
        () => verify({ now: now + (presign ? 601_000 : 16 * 60_000) }),
      ][mutation]!;
      await assert.rejects(changed(), (error: unknown) => error instanceof ShaleError && ['SIGNATURE_MISMATCH', 'ACCESS_DENIED', 'REQUEST_TIME_SKEWED'].includes(error.code));
    },
  ), { numRuns: 150 });
});

/** The hash constructor the SDK signer wants, on node:crypto. */
class Sha256 {
  readonly #hash;
  constructor(secret?: unknown) {
    this.#hash = secret === undefined ? createHash('sha256') : createHmacFor(secret as string | Uint8Array);
  }
  update(data: string | Uint8Array): void {
    this.#hash.update(data);
  }
  async digest(): Promise<Uint8Array> {
    return new Uint8Array(this.#hash.digest());
  }
}

/** RFC 3986 encoding, as the AWS SDKs encode object keys ('!', '*', "'", '(' and ')' too). */
function strictEncode(text: string): string {
  return encodeURIComponent(text).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
}

function createHmacFor(secret: string | Uint8Array) {
  return createHmac('sha256', secret);
}
