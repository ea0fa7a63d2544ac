/**
 * Replica scrub (DESIGN §3, invariant 3): every PG's clean replicas are compared block by block by
 * crc32c, state and version — each store reads and checks its own copy (PG_DIGEST) and sends only
 * the digest, no data — and a block that differs is rewritten from a good copy. Run on demand
 * (`shale scrub [VOL]`) and periodically by the leading conductor; an administrative task like the
 * single-store scrub relay, never on the data path.
 *
 * Per block, over the clean replicas (a recovering one is still being filled; it is not compared):
 *
 *   replica's copy reads back bad (crc32c fails)         -> inconsistent
 *   good copies: the highest version is the authority; among good copies of that version the
 *   crc32c most of them hold wins (a tie: unrepaired, reported)
 *   a good copy of a lower version, another state, or another crc32c at that version -> inconsistent
 *   a bad copy whose version is above the authority's     -> unrepaired (the rewrite would not replace it)
 *
 * An inconsistent copy is rewritten with the authority's data and version and the REPAIR flag: the
 * store replaces a copy of the same version and never overwrites a newer one, so a client write
 * racing the scrub always wins. A block written during the scrub may show as inconsistent (the
 * replicas answered at different moments); its rewrite is then a harmless duplicate.
 */
import type { Env } from '../env/env.ts';
import { BLOCK_SIZE_BYTES } from '../lib/units.ts';
import { decodeDigest, type DigestObject } from '../proto/pg-digest.ts';
import type { StoreChannel } from '../proto/store-channel.ts';
import { BlockState, compareVersions, decodeReadReply, encodeVolumeIds, Flag, Op } from '../proto/store-protocol.ts';
import type { ScrubResult } from './api/types.ts';
import { volumePgs } from './healing.ts';
import type { PgRecord, PoolRecord, StoreRecord, VolumeRecord } from './meta/meta-store.ts';

/** PGs compared at once. */
export const SCRUB_PARALLEL_PGS = 4;
/** Errors kept in a result. */
export const SCRUB_ERRORS_MAX = 50;

export interface ScrubInput {
  stores: readonly StoreRecord[];
  pools: readonly { pool: PoolRecord; pgs: readonly PgRecord[] }[];
  /** The volumes to scrub (one, or every live volume). */
  volumes: readonly VolumeRecord[];
  /** null: every volume. */
  volumeName: string | null;
  /** Per store, MiB per second its digest may read (0: no limit). */
  mibPerSecond: number;
}

interface BlockRepair {
  target: number;
  source: number;
  volumeId: number;
  chunkIndex: number;
  block: number;
}

export async function scrubReplicas(env: Env, input: ScrubInput, channel: (address: string) => StoreChannel, log: (message: string) => void): Promise<ScrubResult> {
  const nowIso = (): string => new Date(env.clock.wallMs()).toISOString();
  const result: ScrubResult = {
    volume: input.volumeName, startedAt: nowIso(), finishedAt: '', pgs: 0, pgsSkipped: 0, objects: 0, blocks: 0,
    inconsistentBlocks: 0, repairedBlocks: 0, unrepairedBlocks: 0, repairedByStore: [], errors: [],
  };
  const repairedByStore = new Map<number, number>();
  const error = (message: string): void => {
    if (result.errors.length < SCRUB_ERRORS_MAX) result.errors.push(message);
  };
  const storesById = new Map(input.stores.map((store) => [store.id, store]));
  const work: { pool: PoolRecord; pg: PgRecord; volumeIds: number[] }[] = [];
  for (const { pool, pgs } of input.pools) {
    const volumes = input.volumes.filter((volume) => volume.poolId === pool.id);
    if (volumes.length === 0) continue;
    const wanted = new Set<number>();
    for (const volume of volumes) for (const pg of volumePgs(volume.id, volume.sizeBytes, volume.chunkSizeBytes, pool.pgCount)) wanted.add(pg);
    for (const pg of pgs) if (wanted.has(pg.index)) work.push({ pool, pg, volumeIds: volumes.map((volume) => volume.id) });
  }

  const scrubPg = async ({ pool, pg, volumeIds }: (typeof work)[number]): Promise<void> => {
    const holders = pg.replicas
      .filter((replica) => replica.state === 'clean' && storesById.get(replica.storeId)?.state === 'up')
      .map((replica) => storesById.get(replica.storeId)!);
    if (holders.length < 2) {
      result.pgsSkipped++;
      return;
    }
    const common = { poolId: pool.id, pgId: pg.index, pgCount: pool.pgCount, pgEpoch: pg.epoch };
    let digests: Map<string, DigestObject>[];
    try {
      digests = await Promise.all(holders.map(async (store) => {
        const reply = await channel(store.address).request({ op: Op.PG_DIGEST, ...common, countBlocks: input.mibPerSecond }, [encodeVolumeIds(volumeIds)]);
        return new Map(decodeDigest(reply.payload).map((object) => [`${object.volumeId}:${object.chunkIndex}`, object]));
      }));
    } catch (failure) {
      result.pgsSkipped++;
      error(`PG ${pool.id}.${pg.index}: ${(failure as Error).message}`);
      return;
    }
    result.pgs++;
    const keys = new Set<string>();
    for (const digest of digests) for (const key of digest.keys()) keys.add(key);
    const repairs: BlockRepair[] = [];
    for (const key of keys) {
      result.objects++;
      const copies = digests.map((digest) => digest.get(key));
      const sample = copies.find((copy) => copy !== undefined)!;
      const blocks = Math.max(...copies.map((copy) => copy?.states.length ?? 0));
      for (let block = 0; block < blocks; block++) {
        const views = copies.map((copy) => ({
          state: copy && block < copy.states.length ? copy.states[block]! : BlockState.ABSENT,
          bad: copy && block < copy.states.length ? copy.bad[block]! : 0,
          epoch: copy && block < copy.states.length ? copy.epochs[block]! : 0,
          seq: copy && block < copy.states.length ? copy.seqs[block]! : 0,
          crc: copy && block < copy.states.length ? copy.checksums[block]! : 0,
        }));
        if (views.every((view) => view.state === BlockState.ABSENT)) continue;
        result.blocks++;
        // The authority: the highest version among good copies that hold something.
        let best = -1;
        views.forEach((view, i) => {
          if (view.bad || view.state === BlockState.ABSENT) return;
          if (best < 0 || compareVersions(view.epoch, view.seq, views[best]!.epoch, views[best]!.seq) > 0) best = i;
        });
        const consistent = best >= 0 && views.every((view) => !view.bad && view.state === views[best]!.state && view.epoch === views[best]!.epoch &&
          view.seq === views[best]!.seq && (view.state !== BlockState.DATA || view.crc === views[best]!.crc));
        if (consistent) continue;
        result.inconsistentBlocks++;
        if (best < 0) {
          result.unrepairedBlocks++;
          error(`volume ${sample.volumeId} chunk ${sample.chunkIndex} block ${block}: no replica holds a good copy`);
          continue;
        }
        // Among good copies of the authority's version, the crc32c most hold.
        const top = views[best]!;
        const votes = new Map<number, number[]>();
        views.forEach((view, i) => {
          if (!view.bad && view.state === top.state && view.epoch === top.epoch && view.seq === top.seq) votes.set(view.crc, [...(votes.get(view.crc) ?? []), i]);
        });
        const ranked = [...votes.values()].sort((a, b) => b.length - a.length);
        if (ranked.length > 1 && ranked[0]!.length === ranked[1]!.length) {
          result.unrepairedBlocks++;
          error(`volume ${sample.volumeId} chunk ${sample.chunkIndex} block ${block}: replicas hold different data at the same version and none has a majority`);
          continue;
        }
        const source = ranked[0]![0]!;
        views.forEach((view, i) => {
          const same = !view.bad && view.state === top.state && view.epoch === top.epoch && view.seq === top.seq && (view.state !== BlockState.DATA || view.crc === views[source]!.crc);
          if (same) return;
          if (compareVersions(view.epoch, view.seq, top.epoch, top.seq) > 0) {
            result.unrepairedBlocks++;
            error(`volume ${sample.volumeId} chunk ${sample.chunkIndex} block ${block} on store ${holders[i]!.id}: a newer version that reads back bad`);
            return;
          }
          repairs.push({ target: i, source, volumeId: sample.volumeId, chunkIndex: sample.chunkIndex, block });
        });
      }
    }
    for (const repair of repairs) {
      const target = holders[repair.target]!;
      const source = holders[repair.source]!;
      const header = { ...common, volumeId: repair.volumeId, chunkIndex: repair.chunkIndex, offsetBlocks: repair.block, countBlocks: 1 };
      try {
        const reply = await channel(source.address).request({ op: Op.READ, flags: Flag.REPAIR, ...header });
        const read = decodeReadReply(reply.payload, 1);
        const state = read.states[0]!;
        if (state === BlockState.ABSENT) continue;
        const write = { ...header, op: state === BlockState.DATA ? Op.WRITE : Op.WRITE_ZEROES, flags: Flag.REPAIR, ownerEpoch: read.epochs[0]!, versionSeq: read.seqs[0]! };
        const payload: Buffer[] = [];
        if (state === BlockState.DATA) {
          const sums = Buffer.allocUnsafe(4);
          sums.writeUInt32LE(read.checksums[0]!, 0);
          payload.push(sums, read.data.subarray(0, BLOCK_SIZE_BYTES));
        }
        await channel(target.address).request(write, payload);
        result.repairedBlocks++;
        repairedByStore.set(target.id, (repairedByStore.get(target.id) ?? 0) + 1);
      } catch (failure) {
        result.unrepairedBlocks++;
        error(`repairing volume ${repair.volumeId} chunk ${repair.chunkIndex} block ${repair.block} on store ${target.id} from store ${source.id}: ${(failure as Error).message}`);
      }
    }
    if (repairs.length > 0) log(`scrub: PG ${pool.id}.${pg.index}: rewrote ${repairs.length} inconsistent block copies from good ones`);
  };

  let next = 0;
  await Promise.all(Array.from({ length: SCRUB_PARALLEL_PGS }, async () => {
    while (next < work.length) await scrubPg(work[next++]!);
  }));
  result.repairedByStore = [...repairedByStore].sort(([a], [b]) => a - b).map(([storeId, blocks]) => ({ storeId, blocks }));
  result.finishedAt = nowIso();
  return result;
}
