/**
 * Units and sizes. Sizes are parsed from what people type ("4G", "512MiB", "1.5T", "4096") and
 * printed back in binary units. Everything is in bytes unless the name says otherwise.
 */
import { ShaleError } from './errors.ts';

/** The unit of checksums, allocation and replication on the data path. */
export const BLOCK_SIZE_BYTES = 4096;
export const BLOCK_SHIFT = 12;

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

const suffixes: Record<string, number> = {
  '': 1, b: 1,
  k: KiB, kb: KiB, kib: KiB,
  m: MiB, mb: MiB, mib: MiB,
  g: GiB, gb: GiB, gib: GiB,
  t: TiB, tb: TiB, tib: TiB,
  p: 1024 * TiB, pb: 1024 * TiB, pib: 1024 * TiB,
};

/**
 * Parses a size such as "10G", "512MiB", "1.5t" or "4096" into bytes (binary units: K = 1024).
 * Throws INVALID_ARGUMENT naming `what` on anything else.
 */
export function parseSize(text: string | number, what = 'size'): number {
  if (typeof text === 'number') {
    if (!Number.isSafeInteger(text) || text < 0) throw new ShaleError('INVALID_ARGUMENT', `${what}: ${text} is not a whole number of bytes`);
    return text;
  }
  const match = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = match ? suffixes[match[2]!.toLowerCase()] : undefined;
  if (!match || unit === undefined) {
    throw new ShaleError('INVALID_ARGUMENT', `${what}: cannot read "${text}" as a size (examples: 4096, 512M, 10G, 1TiB)`);
  }
  const bytes = Number(match[1]) * unit;
  if (!Number.isSafeInteger(bytes)) {
    throw new ShaleError('INVALID_ARGUMENT', `${what}: "${text}" is not a whole number of bytes or is too large`);
  }
  return bytes;
}

/** Formats bytes for people: "4.0 GiB", "512 KiB", "17 B". */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let value = bytes;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  if (unit === 0) return `${bytes} B`;
  return `${value >= 100 ? value.toFixed(0) : value.toFixed(1)} ${units[unit]}`;
}

/** Parses a duration such as "10m", "5s", "250ms", "1h" into milliseconds. */
export function parseDuration(text: string | number, what = 'duration'): number {
  if (typeof text === 'number') return text;
  const match = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/.exec(text);
  if (!match) throw new ShaleError('INVALID_ARGUMENT', `${what}: cannot read "${text}" as a duration (examples: 250ms, 5s, 10m, 1h)`);
  const scale = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[match[2] ?? 's']!;
  return Math.round(Number(match[1]) * scale);
}

export function isPowerOfTwo(value: number): boolean {
  return Number.isSafeInteger(value) && value > 0 && (value & (value - 1)) === 0 || (value > 2 ** 30 && Number.isInteger(Math.log2(value)));
}
