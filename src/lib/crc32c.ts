/**
 * crc32c (Castagnoli), native. Every on-disk record and every wire frame carries one; data is
 * checksummed per 4 KiB block so a read of one block verifies only that block.
 */
import { crc32c as nativeCrc32c } from '@node-rs/crc32';
import { BLOCK_SIZE_BYTES } from './units.ts';

export function crc32c(data: Uint8Array, previous = 0): number {
  return nativeCrc32c(data, previous) >>> 0;
}

/**
 * crc32c of the `index`th 4 KiB block of `data`. A one-block buffer is checksummed as it is: a
 * view per block is an object per 4 KiB write or read on the hot paths.
 */
export function blockCrc32c(data: Buffer, index: number): number {
  if (index === 0 && data.length === BLOCK_SIZE_BYTES) return crc32c(data);
  return crc32c(data.subarray(index * BLOCK_SIZE_BYTES, (index + 1) * BLOCK_SIZE_BYTES));
}

/** crc32c of each 4 KiB block of `data` (whose length is a multiple of 4 KiB), written into `out`. */
export function blockChecksums(data: Buffer, out: Uint32Array = new Uint32Array(data.length / BLOCK_SIZE_BYTES)): Uint32Array {
  const blocks = data.length / BLOCK_SIZE_BYTES;
  if (!Number.isInteger(blocks) || out.length < blocks) {
    throw new RangeError(`blockChecksums: length ${data.length} is not a multiple of ${BLOCK_SIZE_BYTES} or out is short`);
  }
  for (let i = 0; i < blocks; i++) out[i] = blockCrc32c(data, i);
  return out;
}

/** crc32c of a 4 KiB block of zeros, precomputed: tombstones and holes read as zeros. */
export const ZERO_BLOCK_CRC = crc32c(Buffer.alloc(BLOCK_SIZE_BYTES));
