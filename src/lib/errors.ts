/**
 * The one table of error codes. Every failure that crosses a module boundary carries one of these
 * codes; callers branch on `err.code`, never on message text. Each code is mapped exactly once to
 * what every interface shows a user: an NBD errno, an S3 error code with its HTTP status, the
 * status of the HTTP API, and an exit code of the CLI. `docs/errors.md` documents every code and
 * a test keeps the two in step.
 *
 * The numeric `wire` value is what the store protocol carries in a reply's status field; it is
 * part of the protocol and never changes for an existing code.
 */

/** NBD errno values (doc/proto.md "Error values"). */
export const NbdErrno = {
  OK: 0,
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;
export type NbdErrnoValue = (typeof NbdErrno)[keyof typeof NbdErrno];

export interface ErrorCodeSpec {
  /** Value in the store protocol's status field. 0 is success and never an error. */
  readonly wire: number;
  readonly nbdErrno: NbdErrnoValue;
  readonly s3Code: string;
  readonly httpStatus: number;
  readonly exitCode: number;
  /** Whether a caller may retry the same request unchanged (after refreshing state if the doc says so). */
  readonly retryable: boolean;
  readonly doc: string;
}

export const ErrorCodes = {
  INVALID_ARGUMENT: {
    wire: 1, nbdErrno: NbdErrno.EINVAL, s3Code: 'InvalidArgument', httpStatus: 400, exitCode: 2, retryable: false,
    doc: 'A request or option is malformed or has a value outside what is allowed. Nothing was changed.',
  },
  NOT_FOUND: {
    wire: 2, nbdErrno: NbdErrno.EINVAL, s3Code: 'NoSuchKey', httpStatus: 404, exitCode: 3, retryable: false,
    doc: 'The named volume, store, pool, snapshot or object does not exist.',
  },
  ALREADY_EXISTS: {
    wire: 3, nbdErrno: NbdErrno.EINVAL, s3Code: 'BucketAlreadyOwnedByYou', httpStatus: 409, exitCode: 4, retryable: false,
    doc: 'Something with that name already exists.',
  },
  OUT_OF_RANGE: {
    wire: 4, nbdErrno: NbdErrno.EINVAL, s3Code: 'InvalidRange', httpStatus: 416, exitCode: 2, retryable: false,
    doc: 'An offset or length lies outside the volume, chunk or object.',
  },
  READ_ONLY: {
    wire: 5, nbdErrno: NbdErrno.EPERM, s3Code: 'AccessDenied', httpStatus: 403, exitCode: 5, retryable: false,
    doc: 'A write was sent to something that is read-only, such as a snapshot export.',
  },
  NO_SPACE: {
    wire: 6, nbdErrno: NbdErrno.ENOSPC, s3Code: 'ServiceUnavailable', httpStatus: 507, exitCode: 6, retryable: false,
    doc: 'A disk has no free segment left for client writes. Data already written is unharmed and reads keep working.',
  },
  CHECKSUM: {
    wire: 7, nbdErrno: NbdErrno.EIO, s3Code: 'InternalError', httpStatus: 500, exitCode: 7, retryable: true,
    doc: 'Data read from a disk failed its crc32c. The bytes are never returned; the client reads another replica and repairs this one. Where no replica holds a good copy, the read fails at once with this code.',
  },
  STALE_PG_EPOCH: {
    wire: 8, nbdErrno: NbdErrno.EIO, s3Code: 'ServiceUnavailable', httpStatus: 503, exitCode: 8, retryable: true,
    doc: 'The request carried an older placement-group epoch than the store knows. The client refreshes its PG map and retries.',
  },
  FENCED: {
    wire: 9, nbdErrno: NbdErrno.EIO, s3Code: 'AccessDenied', httpStatus: 409, exitCode: 9, retryable: false,
    doc: 'The request carried an older owner epoch than the store has seen for the volume: another gateway took the volume over. The writer stops and never retries.',
  },
  NO_QUORUM: {
    wire: 10, nbdErrno: NbdErrno.EIO, s3Code: 'ServiceUnavailable', httpStatus: 503, exitCode: 10, retryable: true,
    doc: 'Fewer than the minimum number of replicas of a placement group are available, and the I/O timeout ran out while waiting.',
  },
  MAYBE_COMMITTED: {
    wire: 11, nbdErrno: NbdErrno.EIO, s3Code: 'InternalError', httpStatus: 500, exitCode: 11, retryable: false,
    doc: 'A request was sent but no answer came back in time: it may or may not have taken effect. Only idempotent requests are retried.',
  },
  SHUTTING_DOWN: {
    wire: 12, nbdErrno: NbdErrno.ESHUTDOWN, s3Code: 'ServiceUnavailable', httpStatus: 503, exitCode: 12, retryable: true,
    doc: 'The process is stopping and takes no new requests.',
  },
  UNAVAILABLE: {
    wire: 13, nbdErrno: NbdErrno.EIO, s3Code: 'ServiceUnavailable', httpStatus: 503, exitCode: 13, retryable: true,
    doc: 'A peer (store, conductor) could not be reached, or refused the connection. Retried with back-off where the operation allows.',
  },
  NOT_SUPPORTED: {
    wire: 14, nbdErrno: NbdErrno.ENOTSUP, s3Code: 'NotImplemented', httpStatus: 501, exitCode: 14, retryable: false,
    doc: 'The operation or option is not implemented (yet) by this version of Shale.',
  },
  NOT_READY: {
    wire: 15, nbdErrno: NbdErrno.EIO, s3Code: 'ServiceUnavailable', httpStatus: 503, exitCode: 13, retryable: true,
    doc: 'The replica cannot serve this yet: it is recovering (takes writes, serves no reads) or the cluster has not enough stores for the request.',
  },
  BUSY: {
    wire: 16, nbdErrno: NbdErrno.EIO, s3Code: 'SlowDown', httpStatus: 503, exitCode: 13, retryable: true,
    doc: 'A bounded queue is full. The caller backs off and retries.',
  },
  WRONG_CLUSTER: {
    wire: 17, nbdErrno: NbdErrno.EIO, s3Code: 'InternalError', httpStatus: 409, exitCode: 15, retryable: false,
    doc: 'A disk or store belongs to another cluster, or has a format this version does not know. It is refused and left untouched.',
  },
  UNAUTHENTICATED: {
    wire: 18, nbdErrno: NbdErrno.EPERM, s3Code: 'AccessDenied', httpStatus: 401, exitCode: 16, retryable: false,
    doc: 'The request carried no valid credentials.',
  },
  PROTOCOL: {
    wire: 19, nbdErrno: NbdErrno.EINVAL, s3Code: 'InvalidRequest', httpStatus: 400, exitCode: 17, retryable: false,
    doc: 'A peer sent bytes that do not follow the protocol (bad magic, version, header checksum or length). The connection is closed.',
  },
  INTERNAL: {
    wire: 20, nbdErrno: NbdErrno.EIO, s3Code: 'InternalError', httpStatus: 500, exitCode: 1, retryable: false,
    doc: 'An unexpected failure: a bug. It is logged with its stack.',
  },
  IN_USE: {
    wire: 21, nbdErrno: NbdErrno.EPERM, s3Code: 'OperationAborted', httpStatus: 409, exitCode: 18, retryable: false,
    doc: 'The volume or snapshot is in use in a way that forbids the request: a rollback, flatten or import of a volume a gateway has open for writing, or deleting a snapshot (or volume) that clones still read through. Close the volume or flatten the clones first. Also: a server cannot listen on an address another process already holds (choose another port, or 0 for a free one).',
  },
  NO_SUCH_BUCKET: {
    wire: 22, nbdErrno: NbdErrno.EINVAL, s3Code: 'NoSuchBucket', httpStatus: 404, exitCode: 3, retryable: false,
    doc: 'The named S3 bucket does not exist.',
  },
  NO_SUCH_UPLOAD: {
    wire: 23, nbdErrno: NbdErrno.EINVAL, s3Code: 'NoSuchUpload', httpStatus: 404, exitCode: 3, retryable: false,
    doc: 'The S3 multipart upload does not exist: it was never created, or was completed or aborted.',
  },
  BUCKET_NOT_EMPTY: {
    wire: 24, nbdErrno: NbdErrno.EINVAL, s3Code: 'BucketNotEmpty', httpStatus: 409, exitCode: 4, retryable: false,
    doc: 'An S3 bucket that still holds objects (or unfinished multipart uploads) cannot be deleted.',
  },
  BUCKET_EXISTS: {
    wire: 25, nbdErrno: NbdErrno.EINVAL, s3Code: 'BucketAlreadyExists', httpStatus: 409, exitCode: 4, retryable: false,
    doc: 'The S3 bucket name is taken by another account (bucket names are unique in the cluster).',
  },
  INVALID_BUCKET_NAME: {
    wire: 26, nbdErrno: NbdErrno.EINVAL, s3Code: 'InvalidBucketName', httpStatus: 400, exitCode: 2, retryable: false,
    doc: 'An S3 bucket name breaks the naming rules (3 to 63 lower-case letters, digits, dots and hyphens; no IP address form).',
  },
  SIGNATURE_MISMATCH: {
    wire: 27, nbdErrno: NbdErrno.EPERM, s3Code: 'SignatureDoesNotMatch', httpStatus: 403, exitCode: 16, retryable: false,
    doc: 'The AWS Signature V4 of an S3 request (header, presigned URL or chunk signature) does not match the one computed with the secret key.',
  },
  INVALID_ACCESS_KEY: {
    wire: 28, nbdErrno: NbdErrno.EPERM, s3Code: 'InvalidAccessKeyId', httpStatus: 403, exitCode: 16, retryable: false,
    doc: 'The S3 request names an access key that does not exist.',
  },
  ACCESS_DENIED: {
    wire: 29, nbdErrno: NbdErrno.EPERM, s3Code: 'AccessDenied', httpStatus: 403, exitCode: 16, retryable: false,
    doc: 'The S3 request is authenticated but not allowed: another account\'s bucket, an anonymous request, or an expired presigned URL.',
  },
  ENTITY_TOO_SMALL: {
    wire: 30, nbdErrno: NbdErrno.EINVAL, s3Code: 'EntityTooSmall', httpStatus: 400, exitCode: 2, retryable: false,
    doc: 'A part of a multipart upload other than the last is smaller than the 5 MiB minimum.',
  },
  ENTITY_TOO_LARGE: {
    wire: 31, nbdErrno: NbdErrno.EINVAL, s3Code: 'EntityTooLarge', httpStatus: 400, exitCode: 2, retryable: false,
    doc: 'An S3 object or part is larger than the gateway accepts (5 GiB per PUT or part).',
  },
  INVALID_PART: {
    wire: 32, nbdErrno: NbdErrno.EINVAL, s3Code: 'InvalidPart', httpStatus: 400, exitCode: 2, retryable: false,
    doc: 'A multipart completion names a part that was not uploaded, or with another ETag.',
  },
  INVALID_PART_ORDER: {
    wire: 33, nbdErrno: NbdErrno.EINVAL, s3Code: 'InvalidPartOrder', httpStatus: 400, exitCode: 2, retryable: false,
    doc: 'A multipart completion lists its parts out of ascending order.',
  },
  PRECONDITION_FAILED: {
    wire: 34, nbdErrno: NbdErrno.EINVAL, s3Code: 'PreconditionFailed', httpStatus: 412, exitCode: 2, retryable: false,
    doc: 'A condition of an S3 request (If-Match, If-Unmodified-Since, copy-source conditions) does not hold.',
  },
  MALFORMED_XML: {
    wire: 35, nbdErrno: NbdErrno.EINVAL, s3Code: 'MalformedXML', httpStatus: 400, exitCode: 2, retryable: false,
    doc: 'The XML body of an S3 request is not well formed or not of the expected shape.',
  },
  BAD_DIGEST: {
    wire: 36, nbdErrno: NbdErrno.EINVAL, s3Code: 'BadDigest', httpStatus: 400, exitCode: 2, retryable: false,
    doc: 'The body of an S3 request does not match its Content-MD5 or x-amz-checksum-* header. Nothing was stored.',
  },
  CONTENT_SHA256_MISMATCH: {
    wire: 37, nbdErrno: NbdErrno.EINVAL, s3Code: 'XAmzContentSHA256Mismatch', httpStatus: 400, exitCode: 2, retryable: false,
    doc: 'The body of an S3 request does not match its x-amz-content-sha256 header. Nothing was stored.',
  },
  REQUEST_TIME_SKEWED: {
    wire: 38, nbdErrno: NbdErrno.EPERM, s3Code: 'RequestTimeTooSkewed', httpStatus: 403, exitCode: 16, retryable: false,
    doc: 'The S3 request is dated more than 15 minutes away from the gateway\'s clock.',
  },
  MISSING_CONTENT_LENGTH: {
    wire: 39, nbdErrno: NbdErrno.EINVAL, s3Code: 'MissingContentLength', httpStatus: 411, exitCode: 2, retryable: false,
    doc: 'An S3 upload came without a Content-Length (or x-amz-decoded-content-length for aws-chunked bodies).',
  },
  INVALID_REQUEST: {
    wire: 40, nbdErrno: NbdErrno.EINVAL, s3Code: 'InvalidRequest', httpStatus: 400, exitCode: 2, retryable: false,
    doc: 'An S3 request is well formed but asks for something that is not allowed, such as copying an object onto itself without changing anything.',
  },
  METHOD_NOT_ALLOWED: {
    wire: 41, nbdErrno: NbdErrno.EINVAL, s3Code: 'MethodNotAllowed', httpStatus: 405, exitCode: 2, retryable: false,
    doc: 'The HTTP method is not allowed on this S3 resource.',
  },
  DISK_FAILED: {
    wire: 42, nbdErrno: NbdErrno.EIO, s3Code: 'InternalError', httpStatus: 500, exitCode: 1, retryable: false,
    doc: 'A store\'s disk failed a read, a write or a sync (an I/O error, or the file system holding a disk file is full). A block that could not be read is read from another replica and rewritten on this one. After a failed write or sync the store takes no more writes until it is restarted; clients report it down and go on with the other replicas where the rest suffice.',
  },
} as const satisfies Record<string, ErrorCodeSpec>;

export type ErrorCode = keyof typeof ErrorCodes;

const codeByWire = new Map<number, ErrorCode>();
for (const [code, spec] of Object.entries(ErrorCodes) as [ErrorCode, ErrorCodeSpec][]) {
  if (codeByWire.has(spec.wire)) throw new Error(`duplicate wire value ${spec.wire} for ${code}`);
  codeByWire.set(spec.wire, code);
}

export class ShaleError extends Error {
  override name = 'ShaleError';
  readonly code: ErrorCode;
  readonly details: Record<string, unknown> | undefined;

  constructor(code: ErrorCode, message: string, details?: Record<string, unknown>) {
    super(message);
    this.code = code;
    this.details = details;
  }

  get spec(): ErrorCodeSpec {
    return ErrorCodes[this.code];
  }
}

export function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === 'string' && Object.hasOwn(ErrorCodes, value);
}

export function errorCodeFromWire(wire: number): ErrorCode {
  return codeByWire.get(wire) ?? 'INTERNAL';
}

/** The code of any thrown value: ShaleErrors keep theirs, anything else is INTERNAL. */
export function codeOf(err: unknown): ErrorCode {
  return err instanceof ShaleError ? err.code : 'INTERNAL';
}

export function isRetryable(err: unknown): boolean {
  return ErrorCodes[codeOf(err)].retryable;
}

/** Wraps anything thrown into a ShaleError, keeping the code when there is one. */
export function toShaleError(err: unknown): ShaleError {
  if (err instanceof ShaleError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new ShaleError('INTERNAL', message);
}
