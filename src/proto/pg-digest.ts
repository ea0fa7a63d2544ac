/**
 * PG_DIGEST (store op 0x40): what a replica holds of one PG, block by block, without the data —
 * the crc32c the index keeps, the state, the version, and whether the data on disk still matches
 * that crc32c (the store reads and checks every data block to answer). Scrub compares the digests
 * of a PG's replicas and repairs only the blocks that differ (DESIGN §3 "Repair", invariant 3).
 *
 * Reply payload, per object: volume id u64, chunk index u32, block count u32, then per block
 * 20 bytes: crc32c u32, state u8, bad u8 (1 = the data fails its crc32c or cannot be read),
 * 2 pad, version epoch u32, version seq f64.
 */
import { ShaleError } from '../lib/errors.ts';

export const DIGEST_BLOCK_BYTES = 20;

export interface DigestObject {
  volumeId: number;
  chunkIndex: number;
  checksums: Uint32Array;
  states: Uint8Array;
  /** 1 where the block's data failed its crc32c on the store. */
  bad: Uint8Array;
  epochs: Uint32Array;
  seqs: Float64Array;
}

export function encodeDigest(objects: readonly DigestObject[]): Buffer {
  let size = 0;
  for (const object of objects) size += 16 + object.states.length * DIGEST_BLOCK_BYTES;
  const out = Buffer.alloc(size);
  let at = 0;
  for (const object of objects) {
    out.writeUInt32LE(object.volumeId >>> 0, at);
    out.writeUInt32LE(Math.floor(object.volumeId / 2 ** 32), at + 4);
    out.writeUInt32LE(object.chunkIndex, at + 8);
    out.writeUInt32LE(object.states.length, at + 12);
    at += 16;
    for (let i = 0; i < object.states.length; i++) {
      out.writeUInt32LE(object.checksums[i]! >>> 0, at);
      out.writeUInt8(object.states[i]!, at + 4);
      out.writeUInt8(object.bad[i]!, at + 5);
      out.writeUInt32LE(object.epochs[i]! >>> 0, at + 8);
      out.writeDoubleLE(object.seqs[i]!, at + 12);
      at += DIGEST_BLOCK_BYTES;
    }
  }
  return out;
}

export function decodeDigest(payload: Buffer): DigestObject[] {
  const objects: DigestObject[] = [];
  let at = 0;
  while (at < payload.length) {
    if (at + 16 > payload.length) throw new ShaleError('PROTOCOL', 'PG_DIGEST reply truncated');
    const volumeId = payload.readUInt32LE(at) + payload.readUInt32LE(at + 4) * 2 ** 32;
    const chunkIndex = payload.readUInt32LE(at + 8);
    const blocks = payload.readUInt32LE(at + 12);
    at += 16;
    if (at + blocks * DIGEST_BLOCK_BYTES > payload.length) throw new ShaleError('PROTOCOL', 'PG_DIGEST reply truncated');
    const object: DigestObject = {
      volumeId, chunkIndex, checksums: new Uint32Array(blocks), states: new Uint8Array(blocks), bad: new Uint8Array(blocks),
      epochs: new Uint32Array(blocks), seqs: new Float64Array(blocks),
    };
    for (let i = 0; i < blocks; i++) {
      object.checksums[i] = payload.readUInt32LE(at);
      object.states[i] = payload.readUInt8(at + 4);
      object.bad[i] = payload.readUInt8(at + 5);
      object.epochs[i] = payload.readUInt32LE(at + 8);
      object.seqs[i] = payload.readDoubleLE(at + 12);
      at += DIGEST_BLOCK_BYTES;
    }
    objects.push(object);
  }
  return objects;
}
