/**
 * Validation at the API's edge: every value that comes in over HTTP is checked here and refused
 * with INVALID_ARGUMENT naming the field, before any transaction starts. Limits are named `…Max`.
 */
import { parseAddress } from '../env/env.ts';
import { ShaleError } from '../lib/errors.ts';
import { BLOCK_SIZE_BYTES, GiB, KiB, MiB, TiB, isPowerOfTwo, parseSize } from '../lib/units.ts';
import type { DiskReport } from './api/types.ts';
import { domainLevelPattern } from './placement/rendezvous.ts';

export const volumeNameLengthMax = 64;
export const volumeSizeBytesMax = 1024 * TiB;
export const chunkSizeBytesMin = 64 * KiB;
export const chunkSizeBytesMax = 1 * GiB;
export const chunkSizeBytesDefault = 4 * MiB;
export const replicasMax = 16;
export const ownerLengthMax = 128;
export const disksPerStoreMax = 64;
export const labelLengthMax = 128;
/** PGs of one pool. */
export const pgCountMax = 16_384;
/** Pools in a cluster (with pgReplicasTotalMax, keeps every metadata transaction within etcd's limits). */
export const poolsMax = 32;
/** Σ pgCount × replicas over every pool. */
export const pgReplicasTotalMax = 32_768;
export const poolNameLengthMax = 64;

export type JsonObject = Record<string, unknown>;

function invalid(message: string): never {
  throw new ShaleError('INVALID_ARGUMENT', message);
}

export function requireObject(value: unknown, what: string): JsonObject {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) invalid(`${what} must be a JSON object`);
  return value as JsonObject;
}

export function stringField(body: JsonObject, name: string, options: { lengthMax?: number; allowEmpty?: boolean } = {}): string {
  const value = body[name];
  if (typeof value !== 'string') invalid(`${name} is required and must be a string`);
  if (!options.allowEmpty && value.length === 0) invalid(`${name} must not be empty`);
  const lengthMax = options.lengthMax ?? labelLengthMax;
  if (value.length > lengthMax) invalid(`${name} is longer than ${lengthMax} characters`);
  if (/[\u0000-\u001f\u007f]/.test(value)) invalid(`${name} must not contain control characters`);
  return value;
}

export function integerField(body: JsonObject, name: string, minimum: number, maximum: number): number {
  return checkInteger(body[name], name, minimum, maximum);
}

export function optionalIntegerField(body: JsonObject, name: string, minimum: number, maximum: number): number | undefined {
  return body[name] === undefined || body[name] === null ? undefined : checkInteger(body[name], name, minimum, maximum);
}

function checkInteger(value: unknown, name: string, minimum: number, maximum: number): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value)) invalid(`${name} is required and must be a whole number`);
  if (value < minimum || value > maximum) invalid(`${name} must be between ${minimum} and ${maximum} (got ${value})`);
  return value;
}

export function optionalBooleanField(body: JsonObject, name: string): boolean {
  const value = body[name];
  if (value === undefined || value === null) return false;
  if (typeof value !== 'boolean') invalid(`${name} must be true or false`);
  return value;
}

/** An id in a URL path: a positive whole number. */
export function pathId(text: string, what: string): number {
  if (!/^[0-9]{1,16}$/.test(text)) invalid(`${what} must be a positive whole number (got "${text}")`);
  const value = Number(text);
  if (!Number.isSafeInteger(value)) invalid(`${what} is too large`);
  return value;
}

/** 1–64 characters of [A-Za-z0-9._-], not starting with '.' or '-' (so never "@", "/" or a path). */
export function volumeName(value: unknown, what = 'volume name'): string {
  if (typeof value !== 'string') invalid(`${what} is required and must be a string`);
  if (value.length === 0 || value.length > volumeNameLengthMax) invalid(`${what} must be 1 to ${volumeNameLengthMax} characters long`);
  if (!/^[A-Za-z0-9_][A-Za-z0-9._-]*$/.test(value)) {
    invalid(`${what} "${value}" may contain only letters, digits, '.', '_' and '-', and must not start with '.' or '-'`);
  }
  return value;
}

/** Pool names follow the rules of volume names. */
export function poolName(value: unknown, what = 'pool name'): string {
  return volumeName(value, what);
}

/** A failure-domain level: "host", "rack", … (lower case, ≤ 32 characters) or "store". */
export function domainLevel(value: unknown): string {
  if (value === undefined || value === null) return 'host';
  if (typeof value !== 'string' || !domainLevelPattern.test(value)) {
    invalid(`domainLevel must be a level name such as "host", "rack" or "store" (lower-case letters, digits, '-', '_'), got ${JSON.stringify(value)}`);
  }
  return value;
}

function sizeValue(value: unknown, what: string): number {
  if (typeof value !== 'number' && typeof value !== 'string') invalid(`${what} is required: bytes or a size such as "10G"`);
  return parseSize(value, what);
}

/** A volume size: > 0, ≤ 1 PiB, a multiple of 4 KiB. */
export function volumeSize(value: unknown): number {
  const bytes = sizeValue(value, 'size');
  if (bytes <= 0) invalid('size must be greater than 0');
  if (bytes > volumeSizeBytesMax) invalid(`size ${bytes} is larger than the maximum of 1 PiB`);
  if (bytes % BLOCK_SIZE_BYTES !== 0) invalid(`size ${bytes} is not a multiple of ${BLOCK_SIZE_BYTES} bytes`);
  return bytes;
}

/** A chunk size: a power of two from 64 KiB to 1 GiB; default 4 MiB. */
export function chunkSize(value: unknown): number {
  if (value === undefined || value === null) return chunkSizeBytesDefault;
  const bytes = sizeValue(value, 'chunkSize');
  if (!isPowerOfTwo(bytes) || bytes < chunkSizeBytesMin || bytes > chunkSizeBytesMax) {
    invalid(`chunkSize ${bytes} must be a power of two from 64 KiB to 1 GiB`);
  }
  return bytes;
}

export function storeAddress(value: unknown): string {
  if (typeof value !== 'string') invalid('address is required: "HOST:PORT" or "unix:/path"');
  if (value.length > 1024) invalid('address is too long');
  let parsed: ReturnType<typeof parseAddress>;
  try {
    parsed = parseAddress(value);
  } catch (error) {
    invalid(`address: ${(error as Error).message}`);
  }
  if (parsed.kind === 'unix' ? parsed.path.length === 0 : parsed.port === 0) {
    invalid(`address "${value}" names no socket path or port that clients could connect to`);
  }
  return value;
}

export function diskReports(value: unknown): DiskReport[] {
  if (!Array.isArray(value)) invalid('disks is required and must be an array');
  if (value.length > disksPerStoreMax) invalid(`disks holds more than ${disksPerStoreMax} entries`);
  return value.map((entry, i) => {
    const disk = requireObject(entry, `disks[${i}]`);
    return {
      uuid: stringField(disk, 'uuid'),
      path: stringField(disk, 'path', { lengthMax: 4096 }),
      capacityBytes: integerField(disk, 'capacityBytes', 0, Number.MAX_SAFE_INTEGER),
      usedBytes: integerField(disk, 'usedBytes', 0, Number.MAX_SAFE_INTEGER),
      ...(disk.liveBytes === undefined ? {} : { liveBytes: integerField(disk, 'liveBytes', 0, Number.MAX_SAFE_INTEGER) }),
    };
  });
}

export function sameDisks(a: readonly DiskReport[], b: readonly DiskReport[]): boolean {
  return a.length === b.length && a.every((disk, i) => {
    const other = b[i]!;
    return disk.uuid === other.uuid && disk.path === other.path && disk.capacityBytes === other.capacityBytes && disk.usedBytes === other.usedBytes && disk.liveBytes === other.liveBytes;
  });
}
