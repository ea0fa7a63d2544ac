/**
 * The writes a store holds above its writer's watermark (DESIGN §3 "Reconciliation"): per volume,
 * the (chunk, block range, version) of every write applied here whose version is above the
 * watermark the writer piggybacks on its writes ("every replica holds every version ≤ N").
 * Bounded like DRBD's activity log: a writer keeps its writes above the watermark few, so the
 * list stays short; past RECENT_WRITES_MAX entries for a volume, writes are refused with BUSY
 * until the watermark moves on.
 *
 * After a writer crash, the new owner gathers these lists from every replica and rolls the newest
 * version of each range forward to all, then clears the entries of older owner epochs.
 *
 * Kept in memory only: a store that restarts loses its list. The other replicas still report the
 * ranges they hold; a write that only a restarted replica holds is left for the resync of issue 8.
 */
import { ShaleError } from '../lib/errors.ts';

export const RECENT_WRITES_MAX = 65_536;

export interface RecentWrite {
  chunkIndex: number;
  offsetBlocks: number;
  countBlocks: number;
  epoch: number;
  seq: number;
}

export class RecentWrites {
  #byVolume = new Map<number, RecentWrite[]>();

  /** Records a write applied here, then forgets what the watermark (of the same epoch) covers. */
  note(volumeId: number, write: RecentWrite, watermarkSeq: number): void {
    let list = this.#byVolume.get(volumeId);
    if (!list) {
      list = [];
      this.#byVolume.set(volumeId, list);
    }
    if (write.seq > watermarkSeq) {
      if (list.length >= RECENT_WRITES_MAX) this.#prune(list, write.epoch, watermarkSeq);
      if (list.length >= RECENT_WRITES_MAX) throw new ShaleError('BUSY', `volume ${volumeId} has ${list.length} writes above its watermark`);
      list.push(write);
    }
    // Pruning is amortised: once every 32 entries past 64.
    if (list.length > 64 && list.length % 32 === 0) this.#prune(list, write.epoch, watermarkSeq);
  }

  /** May this write be applied, given the list's bound? Checked before the engine writes. */
  check(volumeId: number, epoch: number, watermarkSeq: number): void {
    const list = this.#byVolume.get(volumeId);
    if (list && list.length >= RECENT_WRITES_MAX) {
      this.#prune(list, epoch, watermarkSeq);
      if (list.length >= RECENT_WRITES_MAX) throw new ShaleError('BUSY', `volume ${volumeId} has ${list.length} writes above its watermark`);
    }
  }

  /** The writer's watermark moved (carried by a FLUSH): forget what it covers. */
  advance(volumeId: number, epoch: number, watermarkSeq: number): void {
    const list = this.#byVolume.get(volumeId);
    if (list) this.#prune(list, epoch, watermarkSeq);
  }

  list(volumeId: number): RecentWrite[] {
    return [...(this.#byVolume.get(volumeId) ?? [])];
  }

  /** Forgets every entry of an owner epoch below `epoch` (the new owner has reconciled them). */
  clearOlder(volumeId: number, epoch: number): void {
    const list = this.#byVolume.get(volumeId);
    if (!list) return;
    const kept = list.filter((write) => write.epoch >= epoch);
    if (kept.length === 0) this.#byVolume.delete(volumeId);
    else this.#byVolume.set(volumeId, kept);
  }

  forget(volumeId: number): void {
    this.#byVolume.delete(volumeId);
  }

  #prune(list: RecentWrite[], epoch: number, watermarkSeq: number): void {
    let kept = 0;
    for (const write of list) {
      if (write.epoch === epoch && write.seq <= watermarkSeq) continue;
      list[kept++] = write;
    }
    list.length = kept;
  }
}
