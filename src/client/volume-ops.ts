/**
 * Whole-volume operations on the data path, run by the CLI as the volume's owner (docs/snapshots.md):
 * rollback to a snapshot, flatten a clone, and the changed ranges between two points (diff).
 *
 * Rollback and flatten write, so they open the volume as its owner (a new owner epoch, fencing
 * any earlier one) and refuse with IN_USE when a gateway has it open: they never take a volume
 * over. Diff only reads block versions (no data), so it works on an open volume.
 *
 * Each walks the volume chunk by chunk and reports progress as (done, total) in bytes.
 */
import { ShaleError } from '../lib/errors.ts';
import { BLOCK_SHIFT, BLOCK_SIZE_BYTES } from '../lib/units.ts';
import { BLOCKS_PER_REQUEST_MAX, BlockState } from '../proto/store-protocol.ts';
import type { SnapshotInfo, VolumeInfo } from '../conductor/api/types.ts';
import type { ClusterClient } from './cluster-client.ts';
import { ChainReader, type Layer, parentLayers } from './snap-chain.ts';
import type { VolumeClient } from './volume-client.ts';

export type Progress = (doneBytes: number, totalBytes: number) => void;

export interface ChangedRange {
  offsetBytes: number;
  lengthBytes: number;
}

/** Opens the volume as its owner for a whole-volume operation; IN_USE if someone else has it open (unless `takeover`). */
export { chunksOf, openExclusive };
async function openExclusive(cluster: ClusterClient, volume: VolumeInfo, what: string, takeover: boolean): Promise<VolumeClient> {
  if (volume.owner !== null && !takeover) {
    throw new ShaleError('IN_USE', `volume ${volume.name} is open for writing by ${volume.owner}: disconnect its clients before ${what}, then pass --force to take it over from that gateway (which is fenced until the operation ends)`);
  }
  try {
    return await cluster.openVolume(volume.name, { takeover });
  } catch (error) {
    if (error instanceof ShaleError && error.code === 'FENCED') throw new ShaleError('IN_USE', `volume ${volume.name} was opened by another gateway: ${error.message}`);
    throw error;
  }
}

async function liveSnapshot(cluster: ClusterClient, volumeName: string, snapshotName: string): Promise<SnapshotInfo> {
  const snapshot = await cluster.conductor.snapshot(volumeName, snapshotName);
  if (snapshot.state !== 'live') throw new ShaleError('NOT_READY', `snapshot ${volumeName}@${snapshotName} is still being created`);
  return snapshot;
}

/**
 * Pieces of [0, sizeBytes) chunk by chunk, each at most one request; with `chunks`, only those
 * chunks (the others hold nothing, so walking them would only cost requests).
 */
function* chunkPieces(sizeBytes: number, chunkBlocks: number, chunks?: ReadonlySet<number>): Generator<{ chunkIndex: number; offsetBlocks: number; countBlocks: number; startBlock: number }> {
  const totalBlocks = Math.ceil(sizeBytes / BLOCK_SIZE_BYTES);
  const indexes = chunks ? [...chunks].sort((a, b) => a - b) : undefined;
  const chunkCount = Math.ceil(totalBlocks / chunkBlocks);
  const visit = indexes ?? Array.from({ length: chunkCount }, (_, i) => i);
  for (const chunkIndex of visit) {
    if (chunkIndex >= chunkCount) break;
    const end = Math.min(totalBlocks, (chunkIndex + 1) * chunkBlocks);
    for (let block = chunkIndex * chunkBlocks; block < end;) {
      const offsetBlocks = block - chunkIndex * chunkBlocks;
      const countBlocks = Math.min(end - block, BLOCKS_PER_REQUEST_MAX);
      yield { chunkIndex, offsetBlocks, countBlocks, startBlock: block };
      block += countBlocks;
    }
  }
}

/** The chunks any of the layers' volumes holds something in. */
async function chunksOf(chain: ChainReader, volumeIds: readonly number[]): Promise<Set<number>> {
  const listed = await chain.writtenChunks([...new Set(volumeIds)]);
  const union = new Set<number>();
  for (const chunks of listed.values()) for (const chunk of chunks) union.add(chunk);
  return union;
}

/** Runs of consecutive indexes in [0, count) for which `test` holds. */
function* runs(count: number, test: (i: number) => boolean): Generator<[number, number]> {
  for (let i = 0; i < count;) {
    if (!test(i)) {
      i++;
      continue;
    }
    let end = i + 1;
    while (end < count && test(end)) end++;
    yield [i, end];
    i = end;
  }
}

/**
 * Rolls `volumeName` back to `snapshotName`: every block that changed since the snapshot is
 * rewritten with what the snapshot reads there (data, or a tombstone where it reads as zeros),
 * as new writes under the current snap context — so later snapshots keep what they saw. Blocks
 * beyond the snapshot's size (a volume grown since) are zeroed. Errors: IN_USE (open for
 * writing), NOT_FOUND, NOT_READY.
 */
export async function rollbackVolume(cluster: ClusterClient, volumeName: string, snapshotName: string, progress: Progress = () => {}, options: { takeover?: boolean } = {}): Promise<{ changedBytes: number }> {
  const info = await cluster.conductor.volume(volumeName);
  const snapshot = await liveSnapshot(cluster, volumeName, snapshotName);
  const volume = await openExclusive(cluster, info, `rolling it back to ${snapshotName}`, options.takeover ?? false);
  try {
    const chain = new ChainReader(cluster, info.poolId);
    const chunkBlocks = info.chunkSizeBytes >> BLOCK_SHIFT;
    const head: Layer = { volumeId: info.id, snapshotId: 0, sizeBytes: volume.sizeBytes };
    const layers: Layer[] = [{ volumeId: info.id, snapshotId: snapshot.id, sizeBytes: snapshot.sizeBytes }, ...parentLayers(cluster.map, info.id)];
    let changedBytes = 0;
    const total = snapshot.sizeBytes;
    const chunks = await chunksOf(chain, [info.id]);
    for (const piece of chunkPieces(snapshot.sizeBytes, chunkBlocks, chunks)) {
      const now = await chain.versionsOfLayer(head, piece.chunkIndex, piece.offsetBlocks, piece.countBlocks);
      const then = await chain.versionsOfLayer(layers[0]!, piece.chunkIndex, piece.offsetBlocks, piece.countBlocks);
      const changed = (i: number): boolean => now.states[i] !== then.states[i] || now.epochs[i] !== then.epochs[i] || now.seqs[i] !== then.seqs[i];
      for (const [first, end] of runs(piece.countBlocks, changed)) {
        const count = end - first;
        const data = Buffer.alloc(count * BLOCK_SIZE_BYTES);
        const pending = new Uint8Array(count).fill(1);
        await chain.readThrough(layers, piece.chunkIndex, chunkBlocks, piece.offsetBlocks + first, count, data, pending);
        const states = new Uint8Array(count);
        await chain.statesThrough(layers, piece.chunkIndex, chunkBlocks, piece.offsetBlocks + first, count, states);
        const base = (piece.startBlock + first) * BLOCK_SIZE_BYTES;
        for (const [a, b] of runs(count, (i) => states[i] === BlockState.DATA)) {
          await volume.write(base + a * BLOCK_SIZE_BYTES, data.subarray(a * BLOCK_SIZE_BYTES, b * BLOCK_SIZE_BYTES));
        }
        for (const [a, b] of runs(count, (i) => states[i] !== BlockState.DATA)) {
          await volume.writeZeroes(base + a * BLOCK_SIZE_BYTES, (b - a) * BLOCK_SIZE_BYTES);
        }
        changedBytes += count * BLOCK_SIZE_BYTES;
      }
      progress(Math.min(total, (piece.startBlock + piece.countBlocks) * BLOCK_SIZE_BYTES), total);
    }
    if (volume.sizeBytes > snapshot.sizeBytes) {
      for (let at = snapshot.sizeBytes; at < volume.sizeBytes; at += 1024 * 1024 * 1024) {
        await volume.writeZeroes(at, Math.min(1024 * 1024 * 1024, volume.sizeBytes - at));
      }
    }
    await volume.flush();
    return { changedBytes };
  } finally {
    await volume.close();
  }
}

/**
 * Copies into the clone `volumeName` every block it never wrote that its parent chain holds as
 * data ("write only if absent": the operation owns the volume, so nothing else writes meanwhile),
 * then has the conductor forget the parent. Errors: IN_USE, NOT_FOUND; a volume without a parent
 * is left as it is.
 */
export async function flattenVolume(cluster: ClusterClient, volumeName: string, progress: Progress = () => {}, options: { takeover?: boolean } = {}): Promise<{ copiedBytes: number }> {
  const info = await cluster.conductor.volume(volumeName);
  if (!info.parent) return { copiedBytes: 0 };
  const { snapshots } = await cluster.conductor.snapshots(volumeName);
  if (snapshots.length > 0) {
    throw new ShaleError('IN_USE', `clone ${volumeName} has snapshots (${snapshots.map((s) => s.name).join(', ')}) that read through to its parent: delete them before flattening`);
  }
  const volume = await openExclusive(cluster, info, 'flattening it', options.takeover ?? false);
  try {
    const chain = new ChainReader(cluster, info.poolId);
    const chunkBlocks = info.chunkSizeBytes >> BLOCK_SHIFT;
    const head: Layer = { volumeId: info.id, snapshotId: 0, sizeBytes: volume.sizeBytes };
    const layers = parentLayers(cluster.map, info.id);
    let copiedBytes = 0;
    const total = volume.sizeBytes;
    const chunks = await chunksOf(chain, layers.map((layer) => layer.volumeId));
    for (const piece of chunkPieces(volume.sizeBytes, chunkBlocks, chunks)) {
      const own = await chain.versionsOfLayer(head, piece.chunkIndex, piece.offsetBlocks, piece.countBlocks);
      const states = Uint8Array.from(own.states);
      await chain.statesThrough(layers, piece.chunkIndex, chunkBlocks, piece.offsetBlocks, piece.countBlocks, states);
      const inherited = (i: number): boolean => own.states[i] === BlockState.ABSENT && states[i] === BlockState.DATA;
      for (const [first, end] of runs(piece.countBlocks, inherited)) {
        const count = end - first;
        const data = Buffer.alloc(count * BLOCK_SIZE_BYTES);
        await chain.readThrough(layers, piece.chunkIndex, chunkBlocks, piece.offsetBlocks + first, count, data, new Uint8Array(count).fill(1));
        await volume.write((piece.startBlock + first) * BLOCK_SIZE_BYTES, data);
        copiedBytes += data.length;
      }
      progress(Math.min(total, (piece.startBlock + piece.countBlocks) * BLOCK_SIZE_BYTES), total);
    }
    await volume.flush();
    await cluster.conductor.markFlattened(volumeName, { owner: cluster.ownerId, ownerEpoch: volume.ownerEpoch });
    await cluster.watcher.refresh().catch(() => {});
    return { copiedBytes };
  } finally {
    await volume.close();
  }
}

/**
 * The byte ranges whose content may differ between `volumeName@fromSnapshot` and `@toSnapshot`
 * (the head when undefined): blocks whose version there differs, from the stores' indexes alone.
 * A clone's blocks that both points read through to its parent are unchanged. Ranges are merged
 * and ordered. Errors: NOT_FOUND, NOT_READY.
 */
export async function diffVolume(cluster: ClusterClient, volumeName: string, fromSnapshot: string, toSnapshot: string | undefined, progress: Progress = () => {}): Promise<{ sizeBytes: number; ranges: ChangedRange[] }> {
  const info = await cluster.conductor.volume(volumeName);
  const from = await liveSnapshot(cluster, volumeName, fromSnapshot);
  const to = toSnapshot === undefined ? undefined : await liveSnapshot(cluster, volumeName, toSnapshot);
  if (to && to.id < from.id) throw new ShaleError('INVALID_ARGUMENT', `snapshot ${toSnapshot} is older than ${fromSnapshot}: give the older one first`);
  await cluster.watcher.refresh().catch(() => {});
  const chain = new ChainReader(cluster, info.poolId);
  const chunkBlocks = info.chunkSizeBytes >> BLOCK_SHIFT;
  const sizeBytes = to ? to.sizeBytes : info.sizeBytes;
  const a: Layer = { volumeId: info.id, snapshotId: from.id, sizeBytes: from.sizeBytes };
  const b: Layer = { volumeId: info.id, snapshotId: to ? to.id : 0, sizeBytes };
  const fromBlocks = Math.ceil(from.sizeBytes / BLOCK_SIZE_BYTES);
  const ranges: ChangedRange[] = [];
  const add = (offsetBytes: number, lengthBytes: number): void => {
    const last = ranges[ranges.length - 1];
    if (last && last.offsetBytes + last.lengthBytes === offsetBytes) last.lengthBytes += lengthBytes;
    else ranges.push({ offsetBytes, lengthBytes });
  };
  const chunks = await chunksOf(chain, [info.id]);
  for (const piece of chunkPieces(sizeBytes, chunkBlocks, chunks)) {
    const later = await chain.versionsOfLayer(b, piece.chunkIndex, piece.offsetBlocks, piece.countBlocks);
    const earlier = piece.startBlock < fromBlocks ? await chain.versionsOfLayer(a, piece.chunkIndex, piece.offsetBlocks, piece.countBlocks) : undefined;
    const changed = (i: number): boolean => {
      if (!earlier || piece.startBlock + i >= fromBlocks) return later.states[i] !== BlockState.ABSENT;
      return later.states[i] !== earlier.states[i] || later.epochs[i] !== earlier.epochs[i] || later.seqs[i] !== earlier.seqs[i];
    };
    for (const [first, end] of runs(piece.countBlocks, changed)) {
      const offsetBytes = (piece.startBlock + first) * BLOCK_SIZE_BYTES;
      add(offsetBytes, Math.min(sizeBytes, (piece.startBlock + end) * BLOCK_SIZE_BYTES) - offsetBytes);
    }
    progress(Math.min(sizeBytes, (piece.startBlock + piece.countBlocks) * BLOCK_SIZE_BYTES), sizeBytes);
  }
  return { sizeBytes, ranges };
}

export interface VolumeUsage {
  volume: string;
  provisionedBytes: number;
  /** Blocks holding data at the head, × 4 KiB (a clone's inherited blocks are not counted: its parent holds them). */
  writtenBytes: number;
  /** Blocks trimmed or zeroed at the head (tombstones: no data space). */
  zeroBytes: number;
  replicas: number;
  /** writtenBytes × replicas, plus what snapshots keep, × replicas. */
  rawBytes: number;
  /**
   * Per snapshot, oldest first: `exclusiveBytes`, data it reads that the next snapshot (or the
   * head) no longer does — what deleting it frees; `sharedBytes`, data it reads that the next
   * point reads too (kept anyway).
   */
  snapshots: { name: string; id: number; exclusiveBytes: number; sharedBytes: number }[];
}

/**
 * What a volume uses, by a walk of its blocks' states and versions on the stores (no data is
 * read): data at the head, and per snapshot what only it keeps. O(chunks) requests per point.
 */
export async function volumeUsage(cluster: ClusterClient, volumeName: string, progress: Progress = () => {}): Promise<VolumeUsage> {
  const info = await cluster.conductor.volume(volumeName);
  const { snapshots } = await cluster.conductor.snapshots(volumeName);
  const live = snapshots.filter((snapshot) => snapshot.state === 'live');
  const chain = new ChainReader(cluster, info.poolId);
  const chunkBlocks = info.chunkSizeBytes >> BLOCK_SHIFT;
  const points: Layer[] = [...live.map((s) => ({ volumeId: info.id, snapshotId: s.id, sizeBytes: s.sizeBytes })), { volumeId: info.id, snapshotId: 0, sizeBytes: info.sizeBytes }];
  const exclusive = new Array<number>(live.length).fill(0);
  const shared = new Array<number>(live.length).fill(0);
  let writtenBlocks = 0;
  let zeroBlocks = 0;
  const sizeBytes = Math.max(info.sizeBytes, ...live.map((s) => s.sizeBytes));
  const chunks = await chunksOf(chain, [info.id]);
  for (const piece of chunkPieces(sizeBytes, chunkBlocks, chunks)) {
    const versions = [];
    for (const point of points) versions.push(await chain.versionsOfLayer(point, piece.chunkIndex, piece.offsetBlocks, piece.countBlocks));
    const head = versions[versions.length - 1]!;
    for (let i = 0; i < piece.countBlocks; i++) {
      if (head.states[i] === BlockState.DATA) writtenBlocks++;
      else if (head.states[i] === BlockState.ZERO) zeroBlocks++;
      for (let s = 0; s < live.length; s++) {
        const here = versions[s]!;
        const next = versions[s + 1]!;
        if (here.states[i] !== BlockState.DATA) continue;
        if (here.epochs[i] !== next.epochs[i] || here.seqs[i] !== next.seqs[i]) exclusive[s]!++;
        else shared[s]!++;
      }
    }
    progress(Math.min(sizeBytes, (piece.startBlock + piece.countBlocks) * BLOCK_SIZE_BYTES), sizeBytes);
  }
  const snapshotBytes = exclusive.reduce((sum, blocks) => sum + blocks * BLOCK_SIZE_BYTES, 0);
  return {
    volume: volumeName,
    provisionedBytes: info.sizeBytes,
    writtenBytes: writtenBlocks * BLOCK_SIZE_BYTES,
    zeroBytes: zeroBlocks * BLOCK_SIZE_BYTES,
    replicas: info.replicas,
    rawBytes: (writtenBlocks * BLOCK_SIZE_BYTES + snapshotBytes) * info.replicas,
    snapshots: live.map((s, i) => ({ name: s.name, id: s.id, exclusiveBytes: exclusive[i]! * BLOCK_SIZE_BYTES, sharedBytes: shared[i]! * BLOCK_SIZE_BYTES })),
  };
}
