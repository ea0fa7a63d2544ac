/**
 * Helpers for the engine's tests (imported by *.test.ts only): a simulated environment, block
 * contents that say which write produced them, and write requests built from those.
 *
 * Every test block is a 32-byte stamp (magic, volume, chunk, block, epoch, seq) repeated over the
 * 4 KiB, so a block read back tells exactly which version it is, and a block mixing sectors of
 * two versions (torn) or a flipped bit is recognised as neither.
 */
import { blockChecksums } from '../../lib/crc32c.ts';
import { BLOCK_SIZE_BYTES, KiB } from '../../lib/units.ts';
import { SimClock } from '../../env/sim/sim-clock.ts';
import { SimDisk } from '../../env/sim/sim-disk.ts';
import type { SimDiskOptions } from '../../env/sim/sim-disk.ts';
import { SimRandom } from '../../env/sim/sim-random.ts';
import { StoreEngine } from './engine.ts';
import type { EngineEnv, WriteRequest } from './engine.ts';
import { METADATA_AREA_BYTES } from './format.ts';

const STAMP_BYTES = 32;
const STAMP_MAGIC = 0x5ea1b10c;

export interface SimEnv extends EngineEnv {
  disk: SimDisk;
  clock: SimClock;
  random: SimRandom;
}

export function simEnv(seed: number, diskOptions: Omit<SimDiskOptions, 'seed'> = {}): SimEnv {
  return { disk: new SimDisk({ seed, ...diskOptions }), clock: new SimClock(), random: new SimRandom(seed ^ 0x5bd1e995) };
}

export interface Stamp {
  volumeId: number;
  chunkIndex: number;
  block: number;
  epoch: number;
  seq: number;
}

export function stampBlock(target: Buffer, stamp: Stamp): void {
  const head = Buffer.alloc(STAMP_BYTES);
  head.writeUInt32LE(STAMP_MAGIC, 0);
  head.writeUInt32LE(stamp.chunkIndex, 4);
  head.writeDoubleLE(stamp.volumeId, 8);
  head.writeUInt32LE(stamp.block, 16);
  head.writeUInt32LE(stamp.epoch, 20);
  head.writeDoubleLE(stamp.seq, 24);
  target.fill(head);
}

/** The stamp of a whole, untorn test block; undefined for zeros, garbage or a mix. */
export function readStamp(block: Buffer): Stamp | undefined {
  if (block.length !== BLOCK_SIZE_BYTES || block.readUInt32LE(0) !== STAMP_MAGIC) return undefined;
  const head = block.subarray(0, STAMP_BYTES);
  for (let at = STAMP_BYTES; at < BLOCK_SIZE_BYTES; at += STAMP_BYTES) {
    if (block.compare(head, 0, STAMP_BYTES, at, at + STAMP_BYTES) !== 0) return undefined;
  }
  return {
    chunkIndex: block.readUInt32LE(4),
    volumeId: block.readDoubleLE(8),
    block: block.readUInt32LE(16),
    epoch: block.readUInt32LE(20),
    seq: block.readDoubleLE(24),
  };
}

/** A write of blocks offsetBlocks..+countBlocks, each stamped with (epoch, seq). */
export function stampedWrite(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, epoch: number, seq: number, snapSeq = 0): WriteRequest {
  const data = Buffer.alloc(countBlocks * BLOCK_SIZE_BYTES);
  for (let i = 0; i < countBlocks; i++) {
    stampBlock(data.subarray(i * BLOCK_SIZE_BYTES, (i + 1) * BLOCK_SIZE_BYTES), { volumeId, chunkIndex, block: offsetBlocks + i, epoch, seq });
  }
  return { volumeId, chunkIndex, offsetBlocks, data, checksums: blockChecksums(data), version: { epoch, seq }, snapSeq };
}

export function isAllZero(buffer: Buffer): boolean {
  for (let i = 0; i < buffer.length; i++) if (buffer[i] !== 0) return false;
  return true;
}

export interface ModelVersion {
  epoch: number;
  seq: number;
  /** The snap stamp the write carried. */
  stamp: number;
  zero: boolean;
  acked: boolean;
}

type V = { epoch: number; seq: number };

function compareVersions(a: V, b: V): number {
  return a.epoch - b.epoch || a.seq - b.seq;
}

interface ModelBlock {
  issued: ModelVersion[];
  /** Highest version acknowledged before an acknowledged flush: a crash may not go below it. */
  floor: V | undefined;
  /** The same per live snapshot: the newest version stamped below it that a flush covered. */
  snapshotFloors: Map<number, V>;
}

/** Live snapshot ids per volume, as the test told the engine. */
export type ModelSnapshots = ReadonlyMap<number, readonly number[]>;

type ReadableEngine = {
  read(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, options?: { snapshotId?: number }):
    Promise<{ data: Buffer; states: Uint8Array; versions: { epochs: Uint32Array; seqs: Float64Array } }>;
};

function newest(versions: readonly ModelVersion[], where: (v: ModelVersion) => boolean): ModelVersion | undefined {
  let best: ModelVersion | undefined;
  for (const v of versions) if (where(v) && (!best || compareVersions(v, best) > 0)) best = v;
  return best;
}

/**
 * What a single writer knows about its blocks: every version it issued (with its snap stamp, and
 * whether the write was acknowledged) and, per block, the floor that flushes guarantee — for the
 * head and for each live snapshot. `verify` checks an engine against it: every block, read as the
 * head and as every live snapshot, is a whole version that was written there (stamped below the
 * snapshot), at or above its floor, or exactly the newest acknowledged one when nothing can have
 * been lost; `settle` adopts what the engine holds after a crash (durable from then on).
 */
export class VersionModel {
  readonly #blocks = new Map<string, ModelBlock>();
  readonly label: string;

  constructor(label: string) {
    this.label = label;
  }

  #block(volumeId: number, chunkIndex: number, block: number): ModelBlock {
    const key = `${volumeId}/${chunkIndex}/${block}`;
    let entry = this.#blocks.get(key);
    if (!entry) {
      entry = { issued: [], floor: undefined, snapshotFloors: new Map() };
      this.#blocks.set(key, entry);
    }
    return entry;
  }

  /** Records a write about to be issued; call the returned function when it is acknowledged. */
  issue(volumeId: number, chunkIndex: number, offsetBlocks: number, countBlocks: number, epoch: number, seq: number, zero: boolean, stamp = 0): () => void {
    const versions: ModelVersion[] = [];
    for (let i = 0; i < countBlocks; i++) {
      const version = { epoch, seq, stamp, zero, acked: false };
      this.#block(volumeId, chunkIndex, offsetBlocks + i).issued.push(version);
      versions.push(version);
    }
    return () => {
      for (const version of versions) version.acked = true;
    };
  }

  /** Call when a flush is issued; call the returned function when it resolves. */
  flushIssued(snapshots: ModelSnapshots = new Map()): () => void {
    const raises: { block: ModelBlock; snapshot: number | undefined; version: V }[] = [];
    for (const [key, block] of this.#blocks) {
      const best = newest(block.issued, (v) => v.acked);
      if (best) raises.push({ block, snapshot: undefined, version: best });
      for (const s of snapshots.get(Number(key.split('/')[0])) ?? []) {
        const visible = newest(block.issued, (v) => v.acked && v.stamp < s);
        if (visible) raises.push({ block, snapshot: s, version: visible });
      }
    }
    return () => {
      for (const { block, snapshot, version } of raises) {
        const current = snapshot === undefined ? block.floor : block.snapshotFloors.get(snapshot);
        if (current && compareVersions(version, current) <= 0) continue;
        if (snapshot === undefined) block.floor = { epoch: version.epoch, seq: version.seq };
        else block.snapshotFloors.set(snapshot, { epoch: version.epoch, seq: version.seq });
      }
    };
  }

  /** Object keys the model knows. */
  objects(): { volumeId: number; chunkIndex: number; blocks: number[] }[] {
    const objects = new Map<string, { volumeId: number; chunkIndex: number; blocks: number[] }>();
    for (const key of this.#blocks.keys()) {
      const [volumeId, chunkIndex, block] = key.split('/').map(Number) as [number, number, number];
      const objectKey = `${volumeId}/${chunkIndex}`;
      let object = objects.get(objectKey);
      if (!object) {
        object = { volumeId, chunkIndex, blocks: [] };
        objects.set(objectKey, object);
      }
      object.blocks.push(block);
    }
    return [...objects.values()];
  }

  /**
   * Checks one view of one block (the head, or snapshot `snapshot`): returns the version it shows
   * (undefined: absent). Throws on any difference from the model.
   */
  #check(where: string, block: ModelBlock, snapshot: number | undefined, state: number, got: V, bytes: Buffer, object: { volumeId: number; chunkIndex: number }, blockIndex: number, exact: boolean): ModelVersion | undefined {
    const candidates = snapshot === undefined ? block.issued : block.issued.filter((v) => v.stamp < snapshot);
    const floor = snapshot === undefined ? block.floor : block.snapshotFloors.get(snapshot);
    const newestAcked = newest(candidates, (v) => v.acked);
    let observed: ModelVersion | undefined;
    if (state === 0) {
      if (!isAllZero(bytes)) throw new Error(`${where}: absent but not zeros`);
      // Compaction drops a tombstone nothing older survives under: absent then stands for it.
      const droppedTombstone = candidates.find((v) => v.zero && (!floor || compareVersions(v, floor) >= 0) &&
        (!exact || !newestAcked || compareVersions(v, newestAcked) >= 0));
      if (floor && !droppedTombstone) throw new Error(`${where}: absent, but version ${floor.epoch}.${floor.seq} was flushed`);
      observed = droppedTombstone;
    } else {
      observed = candidates.find((v) => v.epoch === got.epoch && v.seq === got.seq);
      if (!observed) throw new Error(`${where}: holds version ${got.epoch}.${got.seq}, which was never written there${snapshot === undefined ? '' : ' below the snapshot'}`);
      if (observed.zero !== (state === 2)) throw new Error(`${where}: state ${state} does not match the write of ${got.epoch}.${got.seq}`);
      if (state === 2) {
        if (!isAllZero(bytes)) throw new Error(`${where}: tombstone does not read as zeros`);
      } else {
        const stamp = readStamp(bytes);
        if (!stamp) throw new Error(`${where}: content is not one whole version (torn or corrupt)`);
        if (stamp.volumeId !== object.volumeId || stamp.chunkIndex !== object.chunkIndex || stamp.block !== blockIndex ||
          stamp.epoch !== got.epoch || stamp.seq !== got.seq) {
          throw new Error(`${where}: content is ${JSON.stringify(stamp)}, version says ${got.epoch}.${got.seq}`);
        }
      }
      if (floor && compareVersions(got, floor) < 0) {
        throw new Error(`${where}: holds ${got.epoch}.${got.seq}, older than the flushed ${floor.epoch}.${floor.seq}`);
      }
    }
    if (exact && newestAcked && (!observed || compareVersions(observed, newestAcked) < 0)) {
      // Nothing lost: at least the newest acknowledged version (a failed write may or may not have landed).
      throw new Error(`${where}: holds ${observed ? `${observed.epoch}.${observed.seq}` : 'nothing'}, expected at least the newest acknowledged ${newestAcked.epoch}.${newestAcked.seq}`);
    }
    return observed;
  }

  /**
   * Checks `engine` against the model: the head of every block, and its view from every live
   * snapshot in `snapshots`. `exact`: no write can have been lost (no crash since the last settle
   * and nothing in flight). With `settle`, the model then adopts what the engine holds.
   */
  async verify(engine: ReadableEngine, options: { exact: boolean; settle: boolean }, snapshots: ModelSnapshots = new Map()): Promise<void> {
    for (const object of this.objects()) {
      const highest = Math.max(...object.blocks) + 1;
      const views: (number | undefined)[] = [undefined, ...(snapshots.get(object.volumeId) ?? [])];
      const seen = new Map<ModelBlock, { head: ModelVersion | undefined; snapshots: Map<number, ModelVersion | undefined> }>();
      for (const snapshot of views) {
        let read;
        try {
          read = await engine.read(object.volumeId, object.chunkIndex, 0, highest, snapshot === undefined ? {} : { snapshotId: snapshot });
        } catch (error) {
          throw new Error(`${this.label}: read of ${object.volumeId}/${object.chunkIndex}${snapshot === undefined ? '' : `@${snapshot}`} failed: ${(error as Error).message}`);
        }
        for (const blockIndex of object.blocks) {
          const where = `${this.label}: block ${object.volumeId}/${object.chunkIndex}/${blockIndex}${snapshot === undefined ? '' : ` at snapshot ${snapshot}`}`;
          const block = this.#block(object.volumeId, object.chunkIndex, blockIndex);
          const bytes = read.data.subarray(blockIndex * BLOCK_SIZE_BYTES, (blockIndex + 1) * BLOCK_SIZE_BYTES);
          const got = { epoch: read.versions.epochs[blockIndex]!, seq: read.versions.seqs[blockIndex]! };
          const observed = this.#check(where, block, snapshot, read.states[blockIndex]!, got, bytes, object, blockIndex, options.exact);
          let entry = seen.get(block);
          if (!entry) {
            entry = { head: undefined, snapshots: new Map() };
            seen.set(block, entry);
          }
          if (snapshot === undefined) entry.head = observed;
          else entry.snapshots.set(snapshot, observed);
        }
      }
      if (!options.settle) continue;
      for (const [block, entry] of seen) {
        const kept = new Set<ModelVersion>();
        if (entry.head) kept.add(entry.head);
        for (const v of entry.snapshots.values()) if (v) kept.add(v);
        block.issued = [...kept].map((v) => ({ ...v, acked: true }));
        block.floor = entry.head ? { epoch: entry.head.epoch, seq: entry.head.seq } : undefined;
        block.snapshotFloors = new Map();
        for (const [s, v] of entry.snapshots) if (v) block.snapshotFloors.set(s, { epoch: v.epoch, seq: v.seq });
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Generated workloads

const COMMANDS_PATH = '/disks/commands';

/** One step of a generated engine workload (engine-property.test.ts). */
export type EngineCommand =
  | { kind: 'write'; volumeId: number; chunkIndex: number; offsetBlocks: number; countBlocks: number; zero: boolean; wait: boolean }
  | { kind: 'flush'; wait: boolean }
  | { kind: 'compact'; wait: boolean }
  | { kind: 'checkpoint'; wait: boolean }
  | { kind: 'snapshot'; volumeId: number }
  | { kind: 'deleteSnapshot'; volumeId: number; pick: number }
  | { kind: 'takeover' }
  | { kind: 'pause'; turns: number }
  | { kind: 'settle' }
  | { kind: 'crash' };

/**
 * Runs a command sequence against an engine on a fresh simulated disk (seeded) and checks it
 * against a VersionModel — heads and every live snapshot — after every crash and settle; throws
 * on the first difference. Snapshots are created and deleted through setSnapshots (durable), and
 * every later write to the volume carries the new snap sequence as its stamp. With
 * `backgroundCompaction`, the compactor also runs on its own between (and under) the commands.
 * With `discard`, every freed segment is given back at once (holes punched in the simulated
 * disk, which a crash may undo), racing the writer that reopens it.
 */
export async function runEngineCommands(seed: number, commands: readonly EngineCommand[], segments = 8, backgroundCompaction = false, discard = false): Promise<SimEnv> {
  const env = simEnv(seed);
  await StoreEngine.format(env, COMMANDS_PATH, { sizeBytes: METADATA_AREA_BYTES + segments * 64 * KiB, clusterId: 'p', segmentSizeBytes: 64 * KiB });
  const open = async () => {
    const engine = await StoreEngine.open(env, COMMANDS_PATH, {
      backgroundCompaction, checkpointIntervalBytes: 256 * KiB, ...(discard ? { discardFreedSegments: true, discardDelayMs: 0 } : {}),
    });
    const report = engine.replayReport;
    if (report.corruptBatches > 0 || report.damagedHeaders > 0 || report.lostBlocks > 0) {
      throw new Error(`seed ${seed}: a crash looks like corruption: ${JSON.stringify(report)}`);
    }
    return engine;
  };
  const model = new VersionModel(`seed ${seed}`);
  let engine = await open();
  let inFlight: Promise<unknown>[] = [];
  let epoch = 1;
  let seq = 0;
  const snapSeqs = new Map<number, number>();
  const live = new Map<number, number[]>();
  const swallow = () => undefined;
  for (const c of commands) {
    switch (c.kind) {
      case 'write': {
        const version = { epoch, seq: ++seq };
        const stamp = snapSeqs.get(c.volumeId) ?? 0;
        const ack = model.issue(c.volumeId, c.chunkIndex, c.offsetBlocks, c.countBlocks, version.epoch, version.seq, c.zero, stamp);
        const promise = (c.zero
          ? engine.writeZeroes({ volumeId: c.volumeId, chunkIndex: c.chunkIndex, offsetBlocks: c.offsetBlocks, countBlocks: c.countBlocks, version, snapSeq: stamp })
          : engine.write(stampedWrite(c.volumeId, c.chunkIndex, c.offsetBlocks, c.countBlocks, version.epoch, version.seq, stamp))
        ).then(ack, swallow);
        if (c.wait) await promise;
        else inFlight.push(promise);
        break;
      }
      case 'flush': {
        const flushed = model.flushIssued(live);
        const promise = engine.flush().then(flushed, swallow);
        if (c.wait) await promise;
        else inFlight.push(promise);
        break;
      }
      case 'compact': {
        const promise = engine.compact().catch(swallow);
        if (c.wait) await promise;
        else inFlight.push(promise);
        break;
      }
      case 'checkpoint': {
        const promise = engine.checkpoint().catch(swallow);
        if (c.wait) await promise;
        else inFlight.push(promise);
        break;
      }
      case 'snapshot':
      case 'deleteSnapshot': {
        const ids = [...(live.get(c.volumeId) ?? [])];
        let snapSeq = snapSeqs.get(c.volumeId) ?? 0;
        if (c.kind === 'snapshot') {
          snapSeq++;
          ids.push(snapSeq);
        } else {
          if (ids.length === 0) break;
          ids.splice(c.pick % ids.length, 1);
        }
        try {
          await engine.setSnapshots(c.volumeId, ids, { snapSeq });
        } catch {
          break; // NO_SPACE (or the engine broke): the snapshot was not taken
        }
        snapSeqs.set(c.volumeId, snapSeq);
        live.set(c.volumeId, ids);
        break;
      }
      case 'takeover':
        epoch++;
        seq = 0;
        break;
      case 'pause':
        for (let i = 0; i < c.turns; i++) await null;
        break;
      case 'settle':
        await Promise.all(inFlight);
        inFlight = [];
        await model.verify(engine, { exact: true, settle: false }, live);
        break;
      case 'crash':
        env.disk.crash();
        await Promise.all(inFlight);
        inFlight = [];
        engine = await open();
        await model.verify(engine, { exact: false, settle: true }, live);
        break;
    }
  }
  await Promise.all(inFlight);
  await model.verify(engine, { exact: true, settle: false }, live);
  env.disk.crash();
  engine = await open();
  await model.verify(engine, { exact: false, settle: true }, live);
  await engine.close();
  const closed = await open();
  await model.verify(closed, { exact: true, settle: false }, live);
  await closed.close();
  return env;
}
