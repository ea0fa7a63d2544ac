/**
 * The body of an S3 upload as a stream of Buffers, decoded and verified on the way:
 *  - plain bodies, checked against a hex x-amz-content-sha256 at the end (CONTENT_SHA256_MISMATCH);
 *  - aws-chunked bodies (STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER], STREAMING-UNSIGNED-PAYLOAD-TRAILER):
 *    "hex-size[;chunk-signature=S]\r\n data \r\n" … "0[;chunk-signature=S]\r\n", then trailer lines
 *    ("x-amz-checksum-crc32:…", "x-amz-trailer-signature:…") and "\r\n". Chunk and trailer
 *    signatures are verified (SIGNATURE_MISMATCH); the decoded length must equal
 *    x-amz-decoded-content-length.
 * Content-MD5 and x-amz-checksum-* (header or trailer) are computed as the bytes pass and checked
 * at the end (BAD_DIGEST). Nothing is stored by the caller until the stream has ended without error.
 */
import { createHash, type Hash } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import { crc32 as zlibCrc32 } from 'node:zlib';
import { crc32c } from '../lib/crc32c.ts';
import { ShaleError } from '../lib/errors.ts';
import { chunkSignature, sha256Hex, signaturesEqual, trailerSignature, type AuthResult } from './sigv4.ts';

/** Longest chunk header or trailer line accepted. */
const LINE_BYTES_MAX = 4096;
/** Largest aws-chunked chunk accepted. */
const CHUNK_BYTES_MAX = 64 * 1024 * 1024;

export const CHECKSUM_ALGORITHMS = ['crc32', 'crc32c', 'sha1', 'sha256'] as const;
export type ChecksumAlgorithm = (typeof CHECKSUM_ALGORITHMS)[number];

/** An incremental checksum of one of the x-amz-checksum-* algorithms, base64 as S3 shows it. */
export class Checksum {
  readonly algorithm: ChecksumAlgorithm;
  #crc = 0;
  #hash: Hash | undefined;

  constructor(algorithm: ChecksumAlgorithm) {
    this.algorithm = algorithm;
    if (algorithm === 'sha1' || algorithm === 'sha256') this.#hash = createHash(algorithm);
  }

  update(data: Buffer): void {
    if (this.#hash) this.#hash.update(data);
    else if (this.algorithm === 'crc32') this.#crc = zlibCrc32(data, this.#crc);
    else this.#crc = crc32c(data, this.#crc);
  }

  digest(): string {
    if (this.#hash) return this.#hash.digest('base64');
    const out = Buffer.allocUnsafe(4);
    out.writeUInt32BE(this.#crc >>> 0, 0);
    return out.toString('base64');
  }
}

export function checksumAlgorithmOf(name: string): ChecksumAlgorithm {
  const algorithm = name.toLowerCase();
  if ((CHECKSUM_ALGORITHMS as readonly string[]).includes(algorithm)) return algorithm as ChecksumAlgorithm;
  throw new ShaleError('NOT_SUPPORTED', `checksum algorithm ${name} is not supported (crc32, crc32c, sha1, sha256 are)`);
}

export interface BodyResult {
  sizeBytes: number;
  md5Hex: string;
  /** The x-amz-checksum-* the client sent (header or trailer), verified; base64. */
  checksum?: { algorithm: ChecksumAlgorithm; value: string };
}

function header(request: IncomingMessage, name: string): string | undefined {
  const value = request.headers[name];
  return Array.isArray(value) ? value.join(',') : value;
}

/**
 * Reads the request body as decoded Buffers. `done()` (after the iteration ends) gives the
 * size, MD5 and verified checksum. `sizeBytesMax` bounds the decoded size (ENTITY_TOO_LARGE).
 */
export function bodyStream(request: IncomingMessage, auth: AuthResult | undefined, sizeBytesMax: number, options: { objectChecksums?: boolean } = {}): { chunks: AsyncGenerator<Buffer>; done(): BodyResult } {
  // On CompleteMultipartUpload the x-amz-checksum-* headers are the object's checksum, not the body's.
  const objectChecksums = options.objectChecksums ?? true;
  const payloadHash = auth?.payloadHash ?? header(request, 'x-amz-content-sha256') ?? 'UNSIGNED-PAYLOAD';
  const chunked = payloadHash.startsWith('STREAMING-');
  const signedChunks = payloadHash.startsWith('STREAMING-AWS4-HMAC-SHA256-PAYLOAD');
  if (chunked && !['STREAMING-AWS4-HMAC-SHA256-PAYLOAD', 'STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER', 'STREAMING-UNSIGNED-PAYLOAD-TRAILER'].includes(payloadHash)) {
    throw new ShaleError('NOT_SUPPORTED', `payload form ${payloadHash} is not supported`);
  }
  if (signedChunks && !auth) throw new ShaleError('ACCESS_DENIED', 'a signed chunked body needs a signed request');
  if (!chunked && payloadHash !== 'UNSIGNED-PAYLOAD' && !/^[0-9a-f]{64}$/.test(payloadHash)) {
    throw new ShaleError('INVALID_ARGUMENT', `x-amz-content-sha256 "${payloadHash.slice(0, 80)}" is not a SHA-256, UNSIGNED-PAYLOAD or a STREAMING- form`);
  }
  let expectedSize: number | undefined;
  const lengthText = chunked ? header(request, 'x-amz-decoded-content-length') : header(request, 'content-length');
  if (lengthText !== undefined) {
    if (!/^\d{1,16}$/.test(lengthText)) throw new ShaleError('INVALID_ARGUMENT', `bad content length "${lengthText}"`);
    expectedSize = Number(lengthText);
  } else if (chunked || header(request, 'transfer-encoding') === undefined) {
    throw new ShaleError('MISSING_CONTENT_LENGTH', 'the upload has no Content-Length (or x-amz-decoded-content-length)');
  }
  if (expectedSize !== undefined && expectedSize > sizeBytesMax) throw new ShaleError('ENTITY_TOO_LARGE', `the body of ${expectedSize} bytes exceeds ${sizeBytesMax}`);

  const md5 = createHash('md5');
  const sha256 = !chunked && payloadHash !== 'UNSIGNED-PAYLOAD' ? createHash('sha256') : undefined;
  const contentMd5 = header(request, 'content-md5');
  // A checksum announced as a header, or named by x-amz-trailer / x-amz-sdk-checksum-algorithm.
  let checksum: Checksum | undefined;
  let expectedChecksum: string | undefined;
  for (const algorithm of objectChecksums ? CHECKSUM_ALGORITHMS : []) {
    const value = header(request, `x-amz-checksum-${algorithm}`);
    if (value !== undefined) {
      checksum = new Checksum(algorithm);
      expectedChecksum = value;
    }
  }
  const trailerName = header(request, 'x-amz-trailer');
  if (trailerName !== undefined) {
    const match = /^x-amz-checksum-([a-z0-9]+)$/i.exec(trailerName.trim());
    if (!match) throw new ShaleError('INVALID_ARGUMENT', `unsupported trailer ${trailerName}`);
    checksum = new Checksum(checksumAlgorithmOf(match[1]!));
  }
  let size = 0;
  let result: BodyResult | undefined;

  const account = (data: Buffer): void => {
    size += data.length;
    if (size > sizeBytesMax) throw new ShaleError('ENTITY_TOO_LARGE', `the body exceeds ${sizeBytesMax} bytes`);
    md5.update(data);
    sha256?.update(data);
    checksum?.update(data);
  };

  async function* plain(): AsyncGenerator<Buffer> {
    for await (const data of request as AsyncIterable<Buffer>) {
      account(data);
      yield data;
    }
  }

  async function* decodeChunked(): AsyncGenerator<Buffer> {
    let buffered: Buffer = Buffer.alloc(0);
    let previousSignature = auth?.seedSignature ?? '';
    const source = (request as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
    let ended = false;
    const more = async (): Promise<boolean> => {
      if (ended) return false;
      const next = await source.next();
      if (next.done) {
        ended = true;
        return false;
      }
      buffered = buffered.length === 0 ? next.value : Buffer.concat([buffered, next.value]);
      return true;
    };
    const line = async (): Promise<string> => {
      for (;;) {
        const at = buffered.indexOf('\r\n');
        if (at >= 0) {
          const text = buffered.subarray(0, at).toString('latin1');
          buffered = buffered.subarray(at + 2);
          return text;
        }
        if (buffered.length > LINE_BYTES_MAX) throw new ShaleError('INVALID_ARGUMENT', 'aws-chunked line too long');
        if (!(await more())) throw new ShaleError('INVALID_ARGUMENT', 'aws-chunked body ended early');
      }
    };
    for (;;) {
      const head = await line();
      const match = /^([0-9a-fA-F]{1,8})(?:;chunk-signature=([0-9a-f]{64}))?$/.exec(head);
      if (!match) throw new ShaleError('INVALID_ARGUMENT', `bad aws-chunked chunk header "${head.slice(0, 100)}"`);
      const length = parseInt(match[1]!, 16);
      if (length > CHUNK_BYTES_MAX) throw new ShaleError('INVALID_ARGUMENT', `aws-chunked chunk of ${length} bytes`);
      if (signedChunks && !match[2]) throw new ShaleError('SIGNATURE_MISMATCH', 'an aws-chunked chunk has no signature');
      const chunkHash = signedChunks ? createHash('sha256') : undefined;
      let remaining = length;
      while (remaining > 0) {
        if (buffered.length === 0 && !(await more())) throw new ShaleError('INVALID_ARGUMENT', 'aws-chunked body ended inside a chunk');
        const take = Math.min(remaining, buffered.length);
        const data = buffered.subarray(0, take);
        buffered = buffered.subarray(take);
        remaining -= take;
        chunkHash?.update(data);
        account(data);
        yield data;
      }
      if (signedChunks) {
        const expected = chunkSignature(auth!, previousSignature, chunkHash!.digest('hex'));
        if (!signaturesEqual(expected, match[2]!)) throw new ShaleError('SIGNATURE_MISMATCH', 'an aws-chunked chunk signature does not match');
        previousSignature = expected;
      }
      if (length === 0) break;
      if ((await line()) !== '') throw new ShaleError('INVALID_ARGUMENT', 'aws-chunked chunk not followed by CRLF');
    }
    // Trailers (may be absent): lines up to an empty line or the end of the body.
    const trailers: string[] = [];
    let trailerSignatureText: string | undefined;
    for (;;) {
      if (buffered.length === 0 && !(await more())) break;
      const text = await line();
      if (text === '') break;
      const at = text.indexOf(':');
      if (at < 0) throw new ShaleError('INVALID_ARGUMENT', `bad trailer line "${text.slice(0, 100)}"`);
      const name = text.slice(0, at).trim().toLowerCase();
      const value = text.slice(at + 1).trim();
      if (name === 'x-amz-trailer-signature') trailerSignatureText = value;
      else {
        trailers.push(`${name}:${value}`);
        if (name.startsWith('x-amz-checksum-')) {
          const algorithm = checksumAlgorithmOf(name.slice('x-amz-checksum-'.length));
          if (!checksum || checksum.algorithm !== algorithm) throw new ShaleError('INVALID_ARGUMENT', `trailer ${name} was not announced in x-amz-trailer`);
          expectedChecksum = value;
        }
      }
    }
    if (payloadHash === 'STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER') {
      if (!trailerSignatureText) throw new ShaleError('SIGNATURE_MISMATCH', 'the trailer has no signature');
      const expected = trailerSignature(auth!, previousSignature, trailers.map((text) => `${text}\n`).join(''));
      if (!signaturesEqual(expected, trailerSignatureText)) throw new ShaleError('SIGNATURE_MISMATCH', 'the trailer signature does not match');
    }
    if (trailerName !== undefined && expectedChecksum === undefined) throw new ShaleError('INVALID_ARGUMENT', `the announced trailer ${trailerName} never came`);
  }

  async function* all(): AsyncGenerator<Buffer> {
    yield* chunked ? decodeChunked() : plain();
    if (expectedSize !== undefined && size !== expectedSize) {
      throw new ShaleError('INVALID_ARGUMENT', `the body has ${size} bytes, not the ${expectedSize} announced`);
    }
    if (sha256 && sha256.digest('hex') !== payloadHash) throw new ShaleError('CONTENT_SHA256_MISMATCH', 'the body does not match x-amz-content-sha256');
    const md5Digest = md5.digest();
    if (contentMd5 !== undefined && md5Digest.toString('base64') !== contentMd5) throw new ShaleError('BAD_DIGEST', 'the body does not match Content-MD5');
    let verified: BodyResult['checksum'];
    if (checksum) {
      const actual = checksum.digest();
      if (expectedChecksum !== undefined && actual !== expectedChecksum) {
        throw new ShaleError('BAD_DIGEST', `the body does not match x-amz-checksum-${checksum.algorithm}`);
      }
      verified = { algorithm: checksum.algorithm, value: actual };
    }
    result = { sizeBytes: size, md5Hex: md5Digest.toString('hex'), ...(verified ? { checksum: verified } : {}) };
  }

  return {
    chunks: all(),
    done(): BodyResult {
      if (!result) throw new ShaleError('INTERNAL', 'body read before it ended');
      return result;
    },
  };
}

export { sha256Hex };
