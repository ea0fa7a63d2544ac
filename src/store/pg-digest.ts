/**
 * The store's side of PG_DIGEST (src/proto/pg-digest.ts): for every object of a PG, each block's
 * crc32c, state and version from the index, and whether its data still reads back matching that
 * crc32c. Reads every data block of the PG (throttled), sends none of it.
 */
import type { Env } from '../env/env.ts';
import { ShaleError } from '../lib/errors.ts';
import { BLOCK_SIZE_BYTES } from '../lib/units.ts';
import type { DigestObject } from '../proto/pg-digest.ts';
import { BlockState } from '../proto/store-protocol.ts';
import type { BlockEngine } from './block-engine.ts';

/** Blocks read at once while digesting. */
export const DIGEST_READ_BLOCKS_MAX = 256;

export async function digestPg(env: Env, engine: BlockEngine, volumeIds: ReadonlySet<number>, inPg: (volumeId: number, chunkIndex: number) => boolean, bytesPerSecondMax: number): Promise<DigestObject[]> {
  const startedMs = env.clock.nowMs();
  let bytesRead = 0;
  const result: DigestObject[] = [];
  for (const object of engine.listObjects(volumeIds, inPg)) {
    const blocks = object.states.length;
    const digest: DigestObject = {
      volumeId: object.volumeId, chunkIndex: object.chunkIndex, checksums: new Uint32Array(blocks), states: new Uint8Array(blocks),
      bad: new Uint8Array(blocks), epochs: new Uint32Array(blocks), seqs: new Float64Array(blocks),
    };
    for (let offset = 0; offset < blocks; offset += DIGEST_READ_BLOCKS_MAX) {
      const count = Math.min(DIGEST_READ_BLOCKS_MAX, blocks - offset);
      let hasData = false;
      for (let i = 0; i < count; i++) if (object.states[offset + i] !== BlockState.ABSENT) hasData = true;
      if (!hasData) continue;
      try {
        const read = await engine.read(object.volumeId, object.chunkIndex, offset, count);
        copyInto(digest, offset, read);
      } catch (error) {
        if (!isBadCopy(error)) throw error;
        // One block or more is bad or unreadable: find which, one block at a time.
        for (let i = 0; i < count; i++) {
          try {
            copyInto(digest, offset + i, await engine.read(object.volumeId, object.chunkIndex, offset + i, 1));
          } catch (blockError) {
            if (!isBadCopy(blockError)) throw blockError;
            digest.states[offset + i] = object.states[offset + i]!;
            digest.epochs[offset + i] = object.epochs[offset + i]!;
            digest.seqs[offset + i] = object.seqs[offset + i]!;
            digest.bad[offset + i] = 1;
          }
        }
      }
      bytesRead += count * BLOCK_SIZE_BYTES;
      if (bytesPerSecondMax > 0) {
        const dueMs = startedMs + (bytesRead / bytesPerSecondMax) * 1000;
        const now = env.clock.nowMs();
        if (dueMs > now) await env.clock.sleep(dueMs - now);
      }
    }
    result.push(digest);
  }
  return result;
}

function copyInto(digest: DigestObject, at: number, read: { checksums: Uint32Array; states: Uint8Array; epochs: ArrayLike<number>; seqs: ArrayLike<number> }): void {
  for (let i = 0; i < read.states.length; i++) {
    digest.checksums[at + i] = read.checksums[i]!;
    digest.states[at + i] = read.states[i]!;
    digest.epochs[at + i] = read.epochs[i]!;
    digest.seqs[at + i] = read.seqs[i]!;
  }
}

/**
 * A copy the scrub rewrites from a good one: it fails its crc32c, or the disk cannot read it
 * (DISK_FAILED on a read: a bad sector, say; a log-structured store writes the repair elsewhere).
 */
function isBadCopy(error: unknown): boolean {
  return error instanceof ShaleError && (error.code === 'CHECKSUM' || error.code === 'DISK_FAILED');
}
