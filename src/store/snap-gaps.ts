/**
 * Snapshots this store cannot serve correctly ("gaps"), kept durably in the engine's key-value
 * records. A replica that resyncs copies each block's head; a snapshot that became live while the
 * replica was down (or before a brand-new replica existed) may need older versions it never had.
 * Resync copies those in where it can (resync.ts, #checkSnapshots) and records here, per (volume,
 * snapshot), where this store's copy of a snapshot still differs from a clean holder's. The store
 * server then answers READ_SNAP and BLOCK_VERSIONS at that snapshot with NOT_READY, and the client
 * reads another clean replica; none left → NO_QUORUM after its I/O timeout, never wrong bytes.
 *
 * Records live in key-value shard STORE_INTERNAL_SHARD (2^53 − 1; no volume or bucket gets that
 * id), keys `snapgap/<volume id>/<snapshot id>`, value the time it was found (JSON). A record goes
 * when the snapshot is deleted (the map's snap context no longer lists it) or the volume is.
 */
import type { Env } from '../env/env.ts';
import { ShaleError } from '../lib/errors.ts';
import type { ClusterMap } from '../conductor/api/types.ts';
import type { BlockEngine } from './block-engine.ts';

/** Key-value shard for the store's own records (never a volume's or a bucket's id). */
export const STORE_INTERNAL_SHARD = Number.MAX_SAFE_INTEGER;
const PREFIX = 'snapgap/';

export class SnapshotGaps {
  readonly #engine: BlockEngine;
  readonly #env: Env;
  #lastSeq = 0;

  constructor(env: Env, engine: BlockEngine) {
    this.#env = env;
    this.#engine = engine;
  }

  /** Whether this store's copy of snapshot `snapshotId` of the volume is known to be incomplete. */
  has(volumeId: number, snapshotId: number): boolean {
    return this.#engine.kvGet(STORE_INTERNAL_SHARD, key(volumeId, snapshotId)) !== undefined;
  }

  /** Every recorded gap, as [volume id, snapshot id]. */
  list(): [number, number][] {
    return this.#engine.kvList(STORE_INTERNAL_SHARD, { prefix: PREFIX }).map((entry) => parse(entry.key.toString('latin1'))).filter((pair) => pair !== undefined);
  }

  /** Records the gap durably (before resync may call the replica clean). */
  async mark(volumeId: number, snapshotId: number, reason: string): Promise<void> {
    if (this.has(volumeId, snapshotId)) return;
    const value = Buffer.from(JSON.stringify({ foundMs: this.#env.clock.nowMs(), reason: reason.slice(0, 500) }), 'utf8');
    await this.#engine.kvPut(STORE_INTERNAL_SHARD, key(volumeId, snapshotId), value, this.#version(), { fua: true });
  }

  /** Drops the records of deleted volumes and of snapshots the map says are deleted. */
  async prune(map: ClusterMap): Promise<void> {
    const gaps = this.list();
    if (gaps.length === 0) return;
    const deleted = new Set(map.deletedVolumes);
    const contexts = new Map((map.snapContexts ?? []).map((context) => [context.volumeId, context]));
    for (const [volumeId, snapshotId] of gaps) {
      const context = contexts.get(volumeId);
      const gone = deleted.has(volumeId) || this.#engine.isPurged(volumeId) ||
        (context !== undefined && snapshotId <= context.seq && !context.snapshots.includes(snapshotId));
      if (gone) await this.#engine.kvDelete(STORE_INTERNAL_SHARD, key(volumeId, snapshotId), this.#version(), { fua: true });
    }
  }

  /** Versions above every earlier one of this store (wall clock in µs, then +1). */
  #version(): { epoch: number; seq: number } {
    this.#lastSeq = Math.max(this.#lastSeq + 1, Math.floor(this.#env.clock.nowMs() * 1000));
    return { epoch: 1, seq: this.#lastSeq };
  }
}

/** The NOT_READY a store answers for a snapshot it records as incomplete (store-server.ts). */
export const SNAPSHOT_GAP_MESSAGE = 'is incomplete on this store';

export function isSnapshotGapError(error: unknown): boolean {
  return error instanceof ShaleError && error.code === 'NOT_READY' && error.message.includes(SNAPSHOT_GAP_MESSAGE);
}

function key(volumeId: number, snapshotId: number): string {
  return `${PREFIX}${volumeId}/${snapshotId}`;
}

function parse(text: string): [number, number] | undefined {
  const [volume, snapshot] = text.slice(PREFIX.length).split('/');
  const volumeId = Number(volume);
  const snapshotId = Number(snapshot);
  return Number.isSafeInteger(volumeId) && Number.isSafeInteger(snapshotId) ? [volumeId, snapshotId] : undefined;
}
