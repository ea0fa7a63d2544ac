/**
 * A read-only view of a volume at one snapshot (`vol@snap`): reads and block status through the
 * snapshot's layers (the volume at the snapshot, then, for a clone, its parent chain). A
 * snapshot never changes (invariant 4), so nothing here takes locks or owner epochs, and any
 * number of views may read one snapshot while its volume is written.
 */
import { ShaleError } from '../lib/errors.ts';
import { BLOCK_SHIFT, BLOCK_SIZE_BYTES } from '../lib/units.ts';
import { BLOCKS_PER_REQUEST_MAX, BlockState } from '../proto/store-protocol.ts';
import type { SnapshotInfo, VolumeInfo } from '../conductor/api/types.ts';
import type { ClusterClient } from './cluster-client.ts';
import { ChainReader, type Layer, parentLayers } from './snap-chain.ts';
import { REQUEST_BYTES_MAX } from './volume-client.ts';

export interface BlockExtent {
  lengthBytes: number;
  hole: boolean;
  zero: boolean;
}

export class SnapshotView {
  readonly volume: VolumeInfo;
  readonly snapshot: SnapshotInfo;
  readonly #cluster: ClusterClient;
  readonly #chain: ChainReader;
  readonly #chunkBlocks: number;

  constructor(cluster: ClusterClient, volume: VolumeInfo, snapshot: SnapshotInfo) {
    this.#cluster = cluster;
    this.volume = volume;
    this.snapshot = snapshot;
    this.#chain = new ChainReader(cluster, volume.poolId);
    this.#chunkBlocks = volume.chunkSizeBytes >> BLOCK_SHIFT;
  }

  /** Looks the snapshot up; refuses one still being created (NOT_READY). Errors: NOT_FOUND. */
  static async open(cluster: ClusterClient, volumeName: string, snapshotName: string): Promise<SnapshotView> {
    const volume = await cluster.conductor.volume(volumeName);
    const snapshot = await cluster.conductor.snapshot(volumeName, snapshotName);
    if (snapshot.state !== 'live') throw new ShaleError('NOT_READY', `snapshot ${volumeName}@${snapshotName} is still being created`);
    // The map must know the snapshot before reads (stores learn of it through the same map).
    await cluster.watcher.refresh().catch(() => {});
    return new SnapshotView(cluster, volume, snapshot);
  }

  get sizeBytes(): number {
    return this.snapshot.sizeBytes;
  }

  get name(): string {
    return `${this.volume.name}@${this.snapshot.name}`;
  }

  #layers(): Layer[] {
    return [{ volumeId: this.volume.id, snapshotId: this.snapshot.id, sizeBytes: this.snapshot.sizeBytes }, ...parentLayers(this.#cluster.map, this.volume.id)];
  }

  #check(offsetBytes: number, lengthBytes: number): void {
    if (!Number.isSafeInteger(offsetBytes) || !Number.isSafeInteger(lengthBytes) || offsetBytes < 0 || lengthBytes < 0) {
      throw new ShaleError('INVALID_ARGUMENT', `bad range ${offsetBytes}+${lengthBytes}`);
    }
    if (offsetBytes + lengthBytes > this.sizeBytes) throw new ShaleError('OUT_OF_RANGE', `range ${offsetBytes}+${lengthBytes} is beyond the snapshot's ${this.sizeBytes} bytes`);
  }

  /** Pieces of [startBlock, endBlock) that stay within one chunk and one request. */
  #pieces(startBlock: number, endBlock: number): { chunkIndex: number; offsetBlocks: number; countBlocks: number; bufferBlock: number }[] {
    const pieces = [];
    for (let block = startBlock; block < endBlock;) {
      const chunkIndex = Math.floor(block / this.#chunkBlocks);
      const offsetBlocks = block - chunkIndex * this.#chunkBlocks;
      const countBlocks = Math.min(endBlock - block, this.#chunkBlocks - offsetBlocks, BLOCKS_PER_REQUEST_MAX);
      pieces.push({ chunkIndex, offsetBlocks, countBlocks, bufferBlock: block - startBlock });
      block += countBlocks;
    }
    return pieces;
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    this.#check(offsetBytes, lengthBytes);
    if (lengthBytes > REQUEST_BYTES_MAX) throw new ShaleError('INVALID_ARGUMENT', `request of ${lengthBytes} bytes exceeds ${REQUEST_BYTES_MAX}`);
    if (lengthBytes === 0) return Buffer.alloc(0);
    const startBlock = Math.floor(offsetBytes / BLOCK_SIZE_BYTES);
    const endBlock = Math.ceil((offsetBytes + lengthBytes) / BLOCK_SIZE_BYTES);
    const out = Buffer.alloc((endBlock - startBlock) * BLOCK_SIZE_BYTES);
    const layers = this.#layers();
    await Promise.all(this.#pieces(startBlock, endBlock).map(async (piece) => {
      const target = out.subarray(piece.bufferBlock * BLOCK_SIZE_BYTES, (piece.bufferBlock + piece.countBlocks) * BLOCK_SIZE_BYTES);
      const pending = new Uint8Array(piece.countBlocks).fill(1);
      await this.#chain.readThrough(layers, piece.chunkIndex, this.#chunkBlocks, piece.offsetBlocks, piece.countBlocks, target, pending);
    }));
    const skip = offsetBytes - startBlock * BLOCK_SIZE_BYTES;
    return out.subarray(skip, skip + lengthBytes);
  }

  /** Per block of [startBlock, startBlock+count) within one chunk: its state through the chain. */
  async states(chunkIndex: number, offsetBlocks: number, countBlocks: number): Promise<Uint8Array> {
    const states = new Uint8Array(countBlocks);
    await this.#chain.statesThrough(this.#layers(), chunkIndex, this.#chunkBlocks, offsetBlocks, countBlocks, states);
    return states;
  }

  /** Block status of a range (at most one chunk): data, or holes where the block reads as zeros through the whole chain. */
  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<BlockExtent[]> {
    this.#check(offsetBytes, Math.min(lengthBytes, this.sizeBytes - offsetBytes));
    if (lengthBytes === 0) return [];
    const startBlock = Math.floor(offsetBytes / BLOCK_SIZE_BYTES);
    const endBlock = Math.ceil(Math.min(offsetBytes + lengthBytes, this.sizeBytes) / BLOCK_SIZE_BYTES);
    const piece = this.#pieces(startBlock, endBlock)[0]!;
    const states = await this.states(piece.chunkIndex, piece.offsetBlocks, piece.countBlocks);
    const extents: BlockExtent[] = [];
    let cursor = offsetBytes;
    for (let i = 0; i < piece.countBlocks;) {
      const hole = states[i] !== BlockState.DATA;
      let end = i + 1;
      while (end < piece.countBlocks && (states[end] !== BlockState.DATA) === hole) end++;
      const extentEnd = Math.min((startBlock + end) * BLOCK_SIZE_BYTES, offsetBytes + lengthBytes, this.sizeBytes);
      extents.push({ lengthBytes: extentEnd - cursor, hole, zero: hole });
      cursor = extentEnd;
      i = end;
    }
    return extents;
  }
}
