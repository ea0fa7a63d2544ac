/**
 * Benchmark targets: the engine in this process, and a store process reached through the store
 * protocol (StoreChannel over a unix socket, the same framing and server code as production).
 */
import { StoreChannel } from '../../src/proto/store-channel.ts';
import { Op } from '../../src/proto/store-protocol.ts';
import { placementGroupOf } from '../../src/lib/placement-hash.ts';
import { BLOCK_SIZE_BYTES } from '../../src/lib/units.ts';
import { nodeEnv } from '../../src/env/node/node-env.ts';
import type { StoreEngine } from '../../src/store/engine/engine.ts';
import { place, type Target } from './workload.ts';

export const VOLUME_ID = 1;

export function engineTarget(engine: StoreEngine): Target {
  return {
    async write(offset, data, checksums, seq) {
      await engine.write({ volumeId: VOLUME_ID, ...place(offset), data, checksums, version: { epoch: 1, seq }, snapSeq: 0 });
    },
    async read(offset, bytes) {
      const { chunkIndex, offsetBlocks } = place(offset);
      await engine.read(VOLUME_ID, chunkIndex, offsetBlocks, bytes / BLOCK_SIZE_BYTES);
    },
    flush: () => engine.flush(),
  };
}

export function protocolTarget(address: string): { target: Target; close: () => void } {
  const channel = new StoreChannel(nodeEnv, address, { timeoutMs: 120_000 });
  const fields = (offset: number, countBlocks: number) => {
    const { chunkIndex, offsetBlocks } = place(offset);
    return { volumeId: VOLUME_ID, chunkIndex, offsetBlocks, countBlocks, poolId: 1, pgCount: 1, pgId: placementGroupOf(VOLUME_ID, chunkIndex, 1), pgEpoch: 1, ownerEpoch: 1 };
  };
  // Like a client, piggyback the watermark: every write up to it has completed (the store keeps
  // only the writes above it for reconciliation, and refuses with BUSY if they pile up).
  const outstanding = new Set<number>();
  let highest = 0;
  const watermark = (): number => {
    let lowest = highest + 1;
    for (const seq of outstanding) if (seq < lowest) lowest = seq;
    return lowest - 1;
  };
  return {
    target: {
      async write(offset, data, checksums, seq) {
        const sums = Buffer.from(checksums.buffer, checksums.byteOffset, checksums.length * 4);
        outstanding.add(seq);
        if (seq > highest) highest = seq;
        try {
          await channel.request({ op: Op.WRITE, ...fields(offset, data.length / BLOCK_SIZE_BYTES), versionSeq: seq, watermark: watermark() }, [sums, data]);
        } finally {
          outstanding.delete(seq);
        }
      },
      async read(offset, bytes) {
        await channel.request({ op: Op.READ, ...fields(offset, bytes / BLOCK_SIZE_BYTES) });
      },
      async flush() {
        await channel.request({ op: Op.FLUSH, ownerEpoch: 1 });
      },
    },
    close: () => channel.close(),
  };
}
