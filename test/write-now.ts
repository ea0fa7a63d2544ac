/**
 * Helpers of the tests of VolumeClient.writeNow (the write path without a Promise per layer), to
 * stores in the gateway's process (local-write.test.ts) and behind sockets (socket-io.test.ts).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { ClusterClient } from '../src/client/cluster-client.ts';
import type { VolumeClient } from '../src/client/volume-client.ts';
import type { ShaleError } from '../src/lib/errors.ts';
import { placementGroupOf } from '../src/lib/placement-hash.ts';
import { decodeListReply, encodeVolumeIds, Op } from '../src/proto/store-protocol.ts';
import type { BlockEngine } from '../src/store/block-engine.ts';

const BLOCK = 4096;
/** The chunk size of the volumes these tests create (the conductor's default). */
const CHUNK = 4 * 1024 * 1024;

/** Calls writeNow and returns whether it took the write and a promise of how it ended. */
export function writeNow(volume: VolumeClient, offsetBytes: number, data: Buffer, fua = false): { taken: boolean; ended: Promise<ShaleError | undefined>; settledInCall: boolean } {
  let settle!: (error: ShaleError | undefined) => void;
  const ended = new Promise<ShaleError | undefined>((resolve) => (settle = resolve));
  let returned = false;
  let settledInCall = false;
  const taken = volume.writeNow(offsetBytes, data, fua, (error) => {
    if (!returned) settledInCall = true;
    settle(error);
  });
  returned = true;
  return { taken, ended, settledInCall };
}

/**
 * Counts the engine's write calls by kind and the writeNow completions it has answered, and can
 * hold back writeNow's completions by `delayMs`.
 */
export function countEngineWrites(engine: BlockEngine): { now: number; promised: number; answered: number; delayMs: number; restore(): void } {
  const originalNow = engine.writeNow!.bind(engine);
  const originalWrite = engine.write.bind(engine);
  const counts = {
    now: 0,
    promised: 0,
    answered: 0,
    delayMs: 0,
    restore(): void {
      engine.writeNow = originalNow;
      engine.write = originalWrite;
    },
  };
  engine.writeNow = (request, done) => {
    const answer = (error: Error | undefined, result: { appliedBlocks: number } | undefined): void => {
      counts.answered++;
      done(error, result);
    };
    originalNow(request, (error, result) => {
      if (counts.delayMs > 0) setTimeout(() => answer(error, result), counts.delayMs);
      else answer(error, result);
    });
    counts.now++;
  };
  engine.write = (request) => {
    counts.promised++;
    return originalWrite(request);
  };
  return counts;
}

/**
 * Takes 16 one-block writes in chunk `chunkIndex` through writeNow (each copied into `model`), then
 * sends a LIST_PG of that chunk's PG to `storeId`. Returns which writes had ended when the listing
 * was answered, the objects it listed, and every write's end (each must succeed).
 */
export async function writesThenListing(gateway: ClusterClient, volume: VolumeClient, storeId: number, chunkIndex: number, model: Buffer): Promise<{
  endedAtListing: boolean[]; listed: ReturnType<typeof decodeListReply>; allEnded: Promise<unknown>;
}> {
  const ended: boolean[] = [];
  const pending: Promise<unknown>[] = [];
  for (let i = 0; i < 16; i++) {
    const data = randomBytes(BLOCK);
    const offset = chunkIndex * CHUNK + i * 8 * BLOCK;
    const started = writeNow(volume, offset, data);
    assert.ok(started.taken);
    data.copy(model, offset);
    ended.push(false);
    pending.push(started.ended.then((error) => {
      assert.equal(error, undefined);
      ended[i] = true;
    }));
  }
  const pool = gateway.map.pools.find((candidate) => candidate.id === volume.info.poolId)!;
  const pgId = placementGroupOf(volume.info.id, chunkIndex, pool.pgCount);
  const listing = await gateway.channel(storeId).request(
    { op: Op.LIST_PG, poolId: pool.id, pgId, pgCount: pool.pgCount, pgEpoch: pool.pgs[pgId]!.epoch },
    [encodeVolumeIds([volume.info.id])],
  );
  const endedAtListing = [...ended];
  return { endedAtListing, listed: decodeListReply(listing.parts ? Buffer.concat(listing.parts) : listing.payload), allEnded: Promise.all(pending) };
}

/**
 * `rounds` rounds of 32 writes in flight at once through writeNow, each of 1–16 blocks in its own
 * 64 KiB slot of `model`'s length (overlapping writes would be declined), copied into `model`.
 * Every one must be taken, never settle inside the call, and succeed. Returns how many there were.
 */
export async function writeRounds(volume: VolumeClient, rounds: number, model: Buffer): Promise<number> {
  let taken = 0;
  for (let round = 0; round < rounds; round++) {
    const slots = new Set<number>();
    while (slots.size < 32) slots.add(Math.floor(Math.random() * (model.length / (64 * 1024))));
    const pending: Promise<ShaleError | undefined>[] = [];
    for (const slot of slots) {
      const blocks = 1 + Math.floor(Math.random() * 16);
      const offset = slot * 64 * 1024 + Math.floor(Math.random() * (17 - blocks)) * BLOCK;
      const data = randomBytes(blocks * BLOCK);
      const started = writeNow(volume, offset, data);
      assert.ok(started.taken, `writeNow took ${blocks} blocks at ${offset}`);
      assert.equal(started.settledInCall, false, 'done is never called before writeNow returns');
      data.copy(model, offset);
      pending.push(started.ended);
      taken++;
    }
    for (const error of await Promise.all(pending)) assert.equal(error, undefined);
  }
  return taken;
}
