/**
 * Reading through layers: snapshots and clones (DESIGN §2, docs/snapshots.md).
 *
 * A *layer* is one volume seen at one point: its head (snapshotId 0) or a snapshot. A clone's
 * blocks it never wrote are ABSENT and read through to its parent layer (the parent volume at the
 * clone's snapshot), recursively; a DATA block is the answer; a ZERO block (a tombstone of TRIM or
 * WRITE_ZEROES) reads as zeros and stops the walk. Past the end of a layer's size (a clone grown
 * beyond its parent), or past the last layer, a block reads as zeros.
 *
 * Every layer of a chain lives in the same pool with the same chunk size (a clone is made so), so
 * chunk i of one layer is chunk i of every other.
 *
 * Reads go to one clean replica of the chunk's PG after another; STALE_PG_EPOCH refreshes the
 * map; when none answers, the read waits for a newer map up to the I/O timeout (NO_QUORUM).
 */
import { ShaleError } from '../lib/errors.ts';
import { placementGroupOf } from '../lib/placement-hash.ts';
import { BLOCK_SIZE_BYTES } from '../lib/units.ts';
import { BlockState, decodeBlockVersions, decodeListReply, decodeReadReply, decodeReadParts, encodeVolumeIds, type Frame, Op } from '../proto/store-protocol.ts';
import { crc32c } from '../lib/crc32c.ts';
import type { ClusterMap, SnapContextEntry } from '../conductor/api/types.ts';
import type { ClusterClient } from './cluster-client.ts';

export interface Layer {
  volumeId: number;
  /** 0: the head; else a snapshot id of the volume. */
  snapshotId: number;
  /** Bytes of the layer: blocks at or beyond it read as zeros. */
  sizeBytes: number;
}

/** Longest parent chain followed (the conductor refuses deeper clones; this guards a bad map). */
export const chainDepthMax = 64;

export function snapContextOf(map: ClusterMap, volumeId: number): SnapContextEntry | undefined {
  return map.snapContexts?.find((entry) => entry.volumeId === volumeId);
}

/** The layers a volume's absent blocks read through to, nearest first (empty for a volume with no parent). */
export function parentLayers(map: ClusterMap, volumeId: number): Layer[] {
  const layers: Layer[] = [];
  let entry = snapContextOf(map, volumeId);
  while (entry?.parent) {
    if (layers.length >= chainDepthMax) throw new ShaleError('INTERNAL', `volume ${volumeId}: parent chain longer than ${chainDepthMax}`);
    layers.push({ volumeId: entry.parent.volumeId, snapshotId: entry.parent.snapshotId, sizeBytes: entry.parent.sizeBytes });
    entry = snapContextOf(map, entry.parent.volumeId);
  }
  return layers;
}

export interface LayerRead {
  states: Uint8Array;
  /** count × 4 KiB; zeros where a block is not DATA. */
  data: Buffer;
}

export class ChainReader {
  readonly #cluster: ClusterClient;
  readonly #poolId: number;
  #turn = 0;

  constructor(cluster: ClusterClient, poolId: number) {
    this.#cluster = cluster;
    this.#poolId = poolId;
  }

  /** One layer's blocks (READ or READ_SNAP) with their states; crc32c checked here. */
  async readLayer(layer: Layer, chunkIndex: number, offsetBlocks: number, countBlocks: number): Promise<LayerRead> {
    const reply = await this.#request(layer, chunkIndex, offsetBlocks, countBlocks, layer.snapshotId === 0 ? Op.READ : Op.READ_SNAP);
    const parts = reply.frame.parts;
    const read = parts && parts.length === 2 ? decodeReadParts(parts[0]!, parts[1]!, countBlocks) : decodeReadReply(reply.frame.payload, countBlocks);
    const data = Buffer.alloc(countBlocks * BLOCK_SIZE_BYTES);
    let at = 0;
    for (let i = 0; i < countBlocks; i++) {
      if (read.states[i] !== BlockState.DATA) continue;
      const block = read.data.subarray(at * BLOCK_SIZE_BYTES, (at + 1) * BLOCK_SIZE_BYTES);
      if (reply.frame.verified !== true && crc32c(block) !== read.checksums[i]) {
        throw new ShaleError('CHECKSUM', `volume ${layer.volumeId} chunk ${chunkIndex} block ${offsetBlocks + i} from store ${reply.storeId} failed its crc32c in transit`);
      }
      block.copy(data, i * BLOCK_SIZE_BYTES);
      at++;
    }
    return { states: Uint8Array.from(read.states.subarray(0, countBlocks)), data };
  }

  /** One layer's block states and versions, without data. */
  async versionsOfLayer(layer: Layer, chunkIndex: number, offsetBlocks: number, countBlocks: number): Promise<{ states: Uint8Array; epochs: Uint32Array; seqs: Float64Array }> {
    const reply = await this.#request(layer, chunkIndex, offsetBlocks, countBlocks, Op.BLOCK_VERSIONS);
    const payload = reply.frame.parts ? Buffer.concat(reply.frame.parts) : reply.frame.payload;
    return decodeBlockVersions(payload, countBlocks);
  }

  /**
   * Fills `target` (count blocks) with what the chain `layers` holds for the blocks whose `pending`
   * flag is set, clearing the flag of each block resolved. Blocks still pending after the last
   * layer read as zeros (`target` is left as is: the caller passes zeros there).
   */
  async readThrough(layers: readonly Layer[], chunkIndex: number, chunkBlocks: number, offsetBlocks: number, countBlocks: number, target: Buffer, pending: Uint8Array): Promise<void> {
    for (const layer of layers) {
      const range = pendingRange(pending, countBlocks, layerBlocksInChunk(layer, chunkIndex, chunkBlocks) - offsetBlocks);
      if (!range) break;
      const read = await this.readLayer(layer, chunkIndex, offsetBlocks + range.first, range.end - range.first);
      for (let i = range.first; i < range.end; i++) {
        if (!pending[i]) continue;
        const state = read.states[i - range.first]!;
        if (state === BlockState.ABSENT) continue;
        pending[i] = 0;
        if (state === BlockState.DATA) read.data.copy(target, i * BLOCK_SIZE_BYTES, (i - range.first) * BLOCK_SIZE_BYTES, (i - range.first + 1) * BLOCK_SIZE_BYTES);
        else target.fill(0, i * BLOCK_SIZE_BYTES, (i + 1) * BLOCK_SIZE_BYTES);
      }
    }
  }

  /**
   * Per block, its state through the chain: DATA if some layer holds data before a tombstone,
   * ZERO where a tombstone stops the walk, ABSENT if no layer has it (reads as zeros). `states`
   * holds the first layer's states already; its ABSENT entries are resolved in place.
   */
  async statesThrough(layers: readonly Layer[], chunkIndex: number, chunkBlocks: number, offsetBlocks: number, countBlocks: number, states: Uint8Array): Promise<void> {
    const pending = new Uint8Array(countBlocks);
    for (let i = 0; i < countBlocks; i++) pending[i] = states[i] === BlockState.ABSENT ? 1 : 0;
    for (const layer of layers) {
      const range = pendingRange(pending, countBlocks, layerBlocksInChunk(layer, chunkIndex, chunkBlocks) - offsetBlocks);
      if (!range) break;
      const versions = await this.versionsOfLayer(layer, chunkIndex, offsetBlocks + range.first, range.end - range.first);
      for (let i = range.first; i < range.end; i++) {
        if (!pending[i]) continue;
        const state = versions.states[i - range.first]!;
        if (state === BlockState.ABSENT) continue;
        pending[i] = 0;
        states[i] = state;
      }
    }
  }

  /**
   * The chunks that hold anything (data or tombstones, at the head or for a snapshot) of each of
   * `volumeIds`: one LIST_PG per PG of the pool, to a clean replica (which holds every
   * acknowledged write). Whole-volume walks visit only these instead of every chunk of the size.
   */
  async writtenChunks(volumeIds: readonly number[]): Promise<Map<number, Set<number>>> {
    const cluster = this.#cluster;
    const result = new Map<number, Set<number>>(volumeIds.map((id) => [id, new Set<number>()]));
    const map = cluster.map;
    const pool = map.pools.find((candidate) => candidate.id === this.#poolId);
    if (!pool) throw new ShaleError('NOT_READY', `pool ${this.#poolId} is not in the map`);
    const payload = encodeVolumeIds(volumeIds);
    const pgIds = Array.from({ length: pool.pgCount }, (_, i) => i);
    const listPg = async (pgId: number): Promise<void> => {
      let lastError: unknown;
      for (let attempt = 0; attempt < 20; attempt++) {
        const current = cluster.map;
        const currentPool = current.pools.find((candidate) => candidate.id === this.#poolId)!;
        const pg = currentPool.pgs[pgId]!;
        const clean = pg.replicas.filter((replica) => replica.state === 'clean' && current.stores.some((store) => store.id === replica.storeId && store.state === 'up'));
        for (const replica of clean) {
          try {
            const reply = await cluster.channel(replica.storeId).request({ op: Op.LIST_PG, poolId: pool.id, pgId, pgCount: pool.pgCount, pgEpoch: pg.epoch }, [payload]);
            const body = reply.parts ? Buffer.concat(reply.parts) : reply.payload;
            for (const object of decodeListReply(body)) result.get(object.volumeId)?.add(object.chunkIndex);
            return;
          } catch (error) {
            lastError = error;
            if (error instanceof ShaleError && error.code === 'STALE_PG_EPOCH') await cluster.watcher.refresh().catch(() => {});
          }
        }
        await cluster.env.clock.sleep(100);
      }
      throw lastError instanceof ShaleError ? lastError : new ShaleError('NO_QUORUM', `no clean replica of PG ${pool.id}.${pgId} answered a listing`);
    };
    // A few PGs at a time: bounded, and quick on a big pool.
    for (let i = 0; i < pgIds.length; i += 16) await Promise.all(pgIds.slice(i, i + 16).map(listPg));
    return result;
  }

  async #request(layer: Layer, chunkIndex: number, offsetBlocks: number, countBlocks: number, op: number): Promise<{ frame: Frame; storeId: number }> {
    const cluster = this.#cluster;
    const deadline = cluster.ioTimeoutMs > 0 ? cluster.env.clock.nowMs() + cluster.ioTimeoutMs : Number.POSITIVE_INFINITY;
    let lastError: ShaleError | undefined;
    for (;;) {
      const map = cluster.map;
      const pool = map.pools.find((candidate) => candidate.id === this.#poolId);
      if (!pool) throw new ShaleError('NOT_READY', `pool ${this.#poolId} is not in the map`);
      const pgId = placementGroupOf(layer.volumeId, chunkIndex, pool.pgCount);
      const pg = pool.pgs[pgId]!;
      const clean = pg.replicas.filter((replica) => replica.state === 'clean' && map.stores.some((store) => store.id === replica.storeId && store.state === 'up'));
      const turn = this.#turn++;
      let stale = false;
      for (let i = 0; i < clean.length && !stale; i++) {
        const storeId = clean[(turn + i) % clean.length]!.storeId;
        try {
          const frame = await cluster.channel(storeId).request({
            op, volumeId: layer.volumeId, chunkIndex, poolId: pool.id, pgId, pgCount: pool.pgCount, pgEpoch: pg.epoch,
            offsetBlocks, countBlocks, snapSeq: layer.snapshotId,
          });
          return { frame, storeId };
        } catch (error) {
          lastError = error instanceof ShaleError ? error : new ShaleError('INTERNAL', String(error));
          if (lastError.code === 'NOT_FOUND' || lastError.code === 'INVALID_ARGUMENT' || lastError.code === 'OUT_OF_RANGE') throw lastError;
          if (lastError.code === 'STALE_PG_EPOCH') stale = true;
        }
      }
      if (stale) {
        await cluster.watcher.refresh().catch(() => {});
        continue;
      }
      if (cluster.env.clock.nowMs() >= deadline) throw new ShaleError('NO_QUORUM', `I/O timed out reading volume ${layer.volumeId}${lastError ? `: ${lastError.message}` : ''}`);
      await Promise.race([cluster.watcher.waitForEpoch(map.epoch + 1), cluster.env.clock.sleep(Math.min(500, deadline - cluster.env.clock.nowMs()))]);
    }
  }
}

/** Blocks of chunk `chunkIndex` that lie within the layer's size. */
function layerBlocksInChunk(layer: Layer, chunkIndex: number, chunkBlocks: number): number {
  const layerBlocks = Math.ceil(layer.sizeBytes / BLOCK_SIZE_BYTES);
  return Math.max(0, Math.min(chunkBlocks, layerBlocks - chunkIndex * chunkBlocks));
}

/** The smallest range [first, end) holding every pending block below `limit`, or undefined. */
function pendingRange(pending: Uint8Array, count: number, limit: number): { first: number; end: number } | undefined {
  const upTo = Math.min(count, limit);
  let first = -1;
  let end = -1;
  for (let i = 0; i < upTo; i++) {
    if (!pending[i]) continue;
    if (first < 0) first = i;
    end = i + 1;
  }
  return first < 0 ? undefined : { first, end };
}
