/**
 * The conductor's S3 records: accounts, access keys and buckets, kept in the MetaStore (DESIGN §2).
 * The bucket index itself (key → manifest) is not here: it lives on the stores as key-value
 * records (src/s3/bucket-index.ts). S3 data ids are handed out here in ranges, so a gateway asks
 * the conductor once per range, never per upload, and an id is never handed out twice.
 *
 * Rules: bucket names are unique in the cluster (S3's rule); an access key belongs to one account
 * (made on first use); a bucket's pool and shard count never change.
 */
import type { Env } from '../env/env.ts';
import { ShaleError } from '../lib/errors.ts';
import type { AccessKeyRecord, BucketRecord, MetaStore } from './meta/meta-store.ts';
import { defaultPoolName } from './cluster-ops.ts';

export const accountNameLengthMax = 64;
export const bucketShardCountMax = 256;
export const bucketShardCountDefault = 8;
/** Most S3 data ids one call hands out. */
export const dataIdRangeMax = 65_536;

/** An access key as listed (no secret). */
export interface AccessKeyInfo {
  accessKey: string;
  account: string;
  createdAt: string;
}

export type BucketInfo = BucketRecord;

/** S3 bucket naming rules: 3–63 of [a-z0-9.-], starting and ending with a letter or digit, no "..", not an IP address. */
export function checkBucketName(name: string): void {
  const bad = (why: string): never => {
    throw new ShaleError('INVALID_BUCKET_NAME', `bucket name "${name}" ${why}`);
  };
  if (name.length < 3 || name.length > 63) bad('must be 3 to 63 characters long');
  if (!/^[a-z0-9][a-z0-9.-]*[a-z0-9]$/.test(name)) bad('may hold only lower-case letters, digits, dots and hyphens, and must start and end with a letter or digit');
  if (name.includes('..') || name.includes('.-') || name.includes('-.')) bad('must not have two dots, or a dot beside a hyphen');
  if (/^\d+\.\d+\.\d+\.\d+$/.test(name)) bad('must not look like an IP address');
  if (name.startsWith('xn--') || name.endsWith('-s3alias')) bad('uses a reserved prefix or suffix');
}

export function checkAccountName(name: string): void {
  if (!/^[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}$/.test(name)) {
    throw new ShaleError('INVALID_ARGUMENT', `account name "${name}" must be 1–${accountNameLengthMax} of [A-Za-z0-9._@-], not starting with '.', '-' or '@'`);
  }
}

export function checkAccessKey(accessKey: string): void {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{2,127}$/.test(accessKey)) {
    throw new ShaleError('INVALID_ARGUMENT', `access key "${accessKey}" must be 3–128 of [A-Za-z0-9._-]`);
  }
}

export function checkSecretKey(secretKey: string): void {
  if (!/^[\x21-\x7e]{8,128}$/.test(secretKey)) throw new ShaleError('INVALID_ARGUMENT', 'secret key must be 8–128 printable characters without spaces');
}

const ALPHANUMERIC = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789';

export class S3Registry {
  readonly #meta: MetaStore;
  readonly #env: Env;

  constructor(env: Env, meta: MetaStore) {
    this.#env = env;
    this.#meta = meta;
  }

  #now(): string {
    return new Date(this.#env.clock.wallMs()).toISOString();
  }

  /** Makes an access key for `account` (the account too, if new). Generates the key and secret unless both are given. */
  async createKey(input: { account: string; accessKey?: string; secretKey?: string }): Promise<AccessKeyRecord> {
    checkAccountName(input.account);
    if ((input.accessKey === undefined) !== (input.secretKey === undefined)) {
      throw new ShaleError('INVALID_ARGUMENT', 'give both the access key and the secret key, or neither');
    }
    const random = this.#env.random;
    const accessKey = input.accessKey ?? `SK${Array.from(random.bytes(18), (byte) => ALPHANUMERIC[byte % ALPHANUMERIC.length]).join('')}`;
    const secretKey = input.secretKey ?? random.bytes(30).toString('base64').replace(/[+/=]/g, (c) => (c === '+' ? 'x' : c === '/' ? 'y' : ''));
    checkAccessKey(accessKey);
    checkSecretKey(secretKey);
    const now = this.#now();
    return this.#meta.write(async (tx) => {
      const existing = await tx.accessKey(accessKey);
      if (existing) throw new ShaleError('ALREADY_EXISTS', `access key ${accessKey} already exists (account ${existing.account})`);
      if (!(await tx.account(input.account))) await tx.putAccount({ name: input.account, createdAt: now });
      const record = { accessKey, secretKey, account: input.account, createdAt: now };
      await tx.putAccessKey(record);
      return record;
    });
  }

  async keys(): Promise<AccessKeyInfo[]> {
    const keys = await this.#meta.read((tx) => tx.accessKeys());
    return keys.map((key) => ({ accessKey: key.accessKey, account: key.account, createdAt: key.createdAt }));
  }

  /** The key with its secret (for the S3 gateway, which needs it to check signatures). */
  async key(accessKey: string): Promise<AccessKeyRecord> {
    const key = await this.#meta.read((tx) => tx.accessKey(accessKey));
    if (!key) throw new ShaleError('NOT_FOUND', `no access key ${accessKey}`);
    return key;
  }

  async deleteKey(accessKey: string): Promise<void> {
    const deleted = await this.#meta.write((tx) => tx.deleteAccessKey(accessKey));
    if (!deleted) throw new ShaleError('NOT_FOUND', `no access key ${accessKey}`);
  }

  async createBucket(input: { name: string; account: string; shardCount?: number }): Promise<BucketRecord> {
    checkBucketName(input.name);
    checkAccountName(input.account);
    const shardCount = input.shardCount ?? bucketShardCountDefault;
    if (!Number.isInteger(shardCount) || shardCount < 1 || shardCount > bucketShardCountMax) {
      throw new ShaleError('INVALID_ARGUMENT', `shardCount must be between 1 and ${bucketShardCountMax}`);
    }
    const now = this.#now();
    return this.#meta.write(async (tx) => {
      const existing = await tx.bucket(input.name);
      if (existing) {
        if (existing.account === input.account) throw new ShaleError('ALREADY_EXISTS', `bucket ${input.name} already exists and is yours`);
        throw new ShaleError('BUCKET_EXISTS', `bucket ${input.name} belongs to another account`);
      }
      if (!(await tx.account(input.account))) throw new ShaleError('NOT_FOUND', `no account ${input.account}`);
      const pool = await tx.poolByName(defaultPoolName);
      if (!pool) throw new ShaleError('NOT_READY', 'the default pool does not exist yet (no stores have joined)');
      const record: BucketRecord = { id: await tx.allocate('bucketId'), name: input.name, account: input.account, poolId: pool.id, shardCount, publicRead: false, createdAt: now };
      await tx.putBucket(record);
      return record;
    });
  }

  buckets(): Promise<BucketRecord[]> {
    return this.#meta.read((tx) => tx.buckets());
  }

  async bucket(name: string): Promise<BucketRecord> {
    const bucket = await this.#meta.read((tx) => tx.bucket(name));
    if (!bucket) throw new ShaleError('NO_SUCH_BUCKET', `no bucket ${name}`);
    return bucket;
  }

  async setPublicRead(name: string, publicRead: boolean): Promise<BucketRecord> {
    return this.#meta.write(async (tx) => {
      const bucket = await tx.bucket(name);
      if (!bucket) throw new ShaleError('NO_SUCH_BUCKET', `no bucket ${name}`);
      const updated = { ...bucket, publicRead };
      await tx.putBucket(updated);
      return updated;
    });
  }

  /** Forgets the bucket. The gateway checks it is empty first; its id is never reused. */
  async deleteBucket(name: string): Promise<void> {
    const deleted = await this.#meta.write((tx) => tx.deleteBucket(name));
    if (!deleted) throw new ShaleError('NO_SUCH_BUCKET', `no bucket ${name}`);
  }

  /** `count` fresh S3 data ids: [first, first + count). */
  async allocateDataIds(count: number): Promise<{ first: number; count: number }> {
    if (!Number.isInteger(count) || count < 1 || count > dataIdRangeMax) throw new ShaleError('INVALID_ARGUMENT', `count must be between 1 and ${dataIdRangeMax}`);
    const first = await this.#meta.write((tx) => tx.allocateRange('s3DataId', count));
    return { first, count };
  }
}
