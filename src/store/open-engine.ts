/**
 * Opens a store's disk with the log-structured engine, formatting it first when asked and when it
 * is new. "New" means the file did not exist, or its first MiB is all zeros: a disk holding anything
 * else — a Shale disk of this or another cluster, or data we don't recognise — is never formatted
 * here; opening it either works or is refused untouched (WRONG_CLUSTER).
 */
import type { Env } from '../env/env.ts';
import { ShaleError } from '../lib/errors.ts';
import { MiB } from '../lib/units.ts';
import type { LocalReadResult } from '../proto/store-channel.ts';
import type { ScrubReport } from '../proto/store-protocol.ts';
import type { BlockEngine, BlockReadResult, EngineStats, HeadVersions, ObjectVersions } from './block-engine.ts';
import { StoreEngine } from './engine/engine.ts';

/**
 * `preallocate`: a disk file that format creates or extends gets its blocks allocated
 * (fallocate), so a store never finds its file system full in the middle of a write. `shale
 * store --format` asks for it unless `--sparse`; `shale up` keeps its own disk files sparse (a
 * laptop need not give up 3 × 4 GiB), and so does the default here.
 *
 * `discard`: segments the engine frees are given back to the file system (holes punched), so a
 * sparse file shrinks when data is overwritten or deleted. `--discard` (`shale store`, `shale up`)
 * asks for it; off by default, as rewrites of punched segments land on new page-cache pages
 * (docs/benchmarks.md).
 */
export async function openLogEngine(env: Env, options: { path: string; clusterId: string; format: boolean; sizeBytes?: number; preallocate?: boolean; cacheBytes?: number; discard?: boolean }): Promise<BlockEngine> {
  if (options.format && (await isBlank(env, options.path))) {
    const sizeBytes = options.sizeBytes ?? (await sizeOf(env, options.path));
    if (!sizeBytes) throw new ShaleError('INVALID_ARGUMENT', `${options.path}: a new disk file needs a size (--disk PATH:SIZE)`);
    await StoreEngine.format(env, options.path, { sizeBytes, clusterId: options.clusterId, preallocate: options.preallocate ?? false });
  }
  const engine = await StoreEngine.open(env, options.path, { clusterId: options.clusterId, cacheBytes: options.cacheBytes, discardFreedSegments: options.discard ?? false });
  return new LogEngineAdapter(engine, options.path);
}

async function isBlank(env: Env, path: string): Promise<boolean> {
  if (!(await env.disk.exists(path))) return true;
  const file = await env.disk.open(path, { readOnly: true });
  try {
    const head = Buffer.alloc(Math.min(MiB, file.sizeBytes));
    const read = await file.read(head, 0);
    return head.subarray(0, read).every((byte) => byte === 0);
  } finally {
    await file.close();
  }
}

async function sizeOf(env: Env, path: string): Promise<number> {
  if (!(await env.disk.exists(path))) return 0;
  const file = await env.disk.open(path, { readOnly: true });
  const size = file.sizeBytes;
  await file.close();
  return size;
}

class LogEngineAdapter implements BlockEngine {
  readonly #engine: StoreEngine;
  readonly path: string;

  constructor(engine: StoreEngine, path: string) {
    this.#engine = engine;
    this.path = path;
  }

  get diskUuid(): string {
    return this.#engine.info.diskUuid;
  }

  get clusterId(): string {
    return this.#engine.info.clusterId;
  }

  write(request: Parameters<BlockEngine['write']>[0]): Promise<{ appliedBlocks: number }> {
    return this.#engine.write(request);
  }

  writeNow(request: Parameters<BlockEngine['write']>[0], done: Parameters<NonNullable<BlockEngine['writeNow']>>[1]): void {
    this.#engine.writeNow(request, done);
  }

  writeZeroes(request: Parameters<BlockEngine['writeZeroes']>[0]): Promise<{ appliedBlocks: number }> {
    return this.#engine.writeZeroes(request);
  }

  async read(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, options: { snapshotId?: number } = {}): Promise<BlockReadResult> {
    const result = await this.#engine.read(volumeId, chunkIndex, offsetBlocks, countBlocks, options);
    return { data: result.data, checksums: result.checksums, states: result.states, epochs: result.versions.epochs, seqs: result.versions.seqs };
  }

  blockVersions(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, snapshotId?: number): { states: Uint8Array; epochs: Uint32Array; seqs: Float64Array; stamps: Float64Array } {
    return this.#engine.blockVersionsAt(volumeId, chunkIndex, offsetBlocks, countBlocks, snapshotId);
  }

  setSnapshots(volumeId: number, liveSnapIds: readonly number[], options: { snapSeq: number; keepTombstones: boolean }): Promise<void> {
    return this.#engine.setSnapshots(volumeId, liveSnapIds, options);
  }

  snapshots(volumeId: number): { ids: number[]; snapSeq: number; keepTombstones: boolean } | undefined {
    return this.#engine.snapshots(volumeId);
  }

  readNow(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, versions?: HeadVersions): LocalReadResult | undefined {
    return this.#engine.readNow(volumeId, chunkIndex, offsetBlocks, countBlocks, versions);
  }

  flush(): Promise<void> {
    return this.#engine.flush();
  }

  fence(volumeId: number, ownerEpoch: number): Promise<void> {
    return this.#engine.fence(volumeId, ownerEpoch);
  }

  ownerEpoch(volumeId: number): number {
    return this.#engine.ownerEpoch(volumeId);
  }

  purgeVolume(volumeId: number): Promise<void> {
    return this.#engine.purgeVolume(volumeId);
  }

  isPurged(volumeId: number): boolean {
    return this.#engine.isPurged(volumeId);
  }

  blockStates(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number): Uint8Array {
    const states = new Uint8Array(countBlocks);
    const versions = this.#engine.objectVersions(volumeId, chunkIndex);
    if (versions) states.set(versions.states.subarray(offsetBlocks, offsetBlocks + countBlocks));
    return states;
  }

  listObjects(volumeIds: ReadonlySet<number> | undefined, filter: (volumeId: number, chunkIndex: number) => boolean): ObjectVersions[] {
    const out: ObjectVersions[] = [];
    for (const key of this.#engine.listObjects()) {
      if ((volumeIds && !volumeIds.has(key.volumeId)) || !filter(key.volumeId, key.chunkIndex)) continue;
      const versions = this.#engine.objectVersions(key.volumeId, key.chunkIndex);
      if (versions) out.push(versions);
    }
    return out;
  }

  kvPut(shardId: number, key: Buffer | string, value: Buffer, version: { epoch: number; seq: number }, options: { fua?: boolean } = {}): Promise<{ applied: boolean }> {
    return this.#engine.kvPut(shardId, key, value, version, options);
  }

  kvDelete(shardId: number, key: Buffer | string, version: { epoch: number; seq: number }, options: { fua?: boolean } = {}): Promise<{ applied: boolean }> {
    return this.#engine.kvDelete(shardId, key, version, options);
  }

  kvGet(shardId: number, key: Buffer | string): { key: Buffer; value: Buffer; version: { epoch: number; seq: number } } | undefined {
    return this.#engine.kvGet(shardId, key);
  }

  kvShardIds(): number[] {
    return this.#engine.kvShardIds();
  }

  kvRecords(shardId: number): { key: Buffer; value: Buffer | undefined; version: { epoch: number; seq: number } }[] {
    return this.#engine.kvRecords(shardId);
  }

  kvList(shardId: number, options: { prefix?: Buffer | string; startAfter?: Buffer | string; limit?: number } = {}): { key: Buffer; value: Buffer; version: { epoch: number; seq: number } }[] {
    return this.#engine.kvList(shardId, options);
  }

  failure(): ShaleError | undefined {
    return this.#engine.failure();
  }

  stats(): EngineStats {
    return this.#engine.stats();
  }

  async scrub(options: { bytesPerSecondMax?: number } = {}): Promise<ScrubReport> {
    const report = await this.#engine.scrub(options);
    return { ...report, bad: report.bad.map((bad) => ({ ...bad })) };
  }

  close(): Promise<void> {
    return this.#engine.close();
  }
}
