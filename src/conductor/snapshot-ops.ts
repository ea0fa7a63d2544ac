/**
 * Snapshots and clones in the conductor's state machine (DESIGN §2–3, docs/snapshots.md). Each
 * function is one step of a MetaStore transaction run through ClusterOps: nothing here reaches
 * the outside world.
 *
 * Snapshot ids come from the volume's snap sequence (`VolumeRecord.snapSeq`), which only grows,
 * so an id is never used twice for one volume. Every change a writer or a store must see — a new
 * snapshot, a deleted one, a clone, a flatten — takes a new map epoch: the map's `snapContexts`
 * carry each volume's {seq, snapshots, parent}.
 *
 * Creation without an I/O pause, decision table:
 *   volume has no owner          → the snapshot is live at once (nothing is in flight: the volume
 *                                  is fenced at its last owner epoch and nobody else may write)
 *   volume has an owner          → state `creating`, the map carries the new seq; the owner switches
 *                                  its writes to it, waits until every write under the older seq
 *                                  completed, then acknowledges (snapshot-ack) → `live`
 *   owner closes the volume      → its `creating` snapshots are live (it drained before closing)
 *   a new owner opens / takes over → it fences the old one, reconciles, then acknowledges
 */
import { ShaleError } from '../lib/errors.ts';
import type { SnapContextEntry, SnapshotInfo } from './api/types.ts';
import type { ClusterOps } from './cluster-ops.ts';
import type { MetaReadTx, SnapshotRecord, VolumeRecord } from './meta/meta-store.ts';

/** Snapshots a volume may hold at once (the store engine keeps at most this many ids per volume). */
export const snapshotsPerVolumeMax = 1000;
/** The highest snap sequence a volume may reach (see SNAP_STAMP_MAX in the store protocol). */
export const snapSeqMax = 0xff_ffff;
/** Clones of clones: how deep a parent chain may go (every read of an absent block walks it). */
export const cloneDepthMax = 16;

export async function snapshotByName(tx: MetaReadTx, volume: VolumeRecord, name: string): Promise<SnapshotRecord> {
  const snapshot = (await tx.snapshots(volume.id)).find((candidate) => candidate.name === name);
  if (!snapshot) throw new ShaleError('NOT_FOUND', `volume ${volume.name} has no snapshot named ${name}`);
  return snapshot;
}

/** Live volumes that read through to (volumeId, snapshotId), or to any snapshot of volumeId when snapshotId is undefined. */
export async function clonesOf(tx: MetaReadTx, volumeId: number, snapshotId?: number): Promise<VolumeRecord[]> {
  return (await tx.volumes()).filter((volume) => volume.parentVolumeId === volumeId && (snapshotId === undefined || volume.parentSnapshotId === snapshotId));
}

export async function snapshotInfo(tx: MetaReadTx, volume: VolumeRecord, snapshot: SnapshotRecord): Promise<SnapshotInfo> {
  return {
    volumeId: volume.id,
    volume: volume.name,
    id: snapshot.id,
    name: snapshot.name,
    state: snapshot.state,
    sizeBytes: snapshot.sizeBytes,
    createdAt: snapshot.createdAt,
    clones: (await clonesOf(tx, volume.id, snapshot.id)).map((clone) => clone.name),
  };
}

/** Takes snapshot `name` of volume `volumeName`: live at once without an owner, else `creating`. */
export async function createSnapshot(ops: ClusterOps, volumeName: string, name: string): Promise<{ volume: VolumeRecord; snapshot: SnapshotRecord }> {
  const volume = await ops.volumeByName(volumeName);
  const existing = await ops.tx.snapshots(volume.id);
  if (existing.some((snapshot) => snapshot.name === name)) throw new ShaleError('ALREADY_EXISTS', `volume ${volumeName} already has a snapshot named ${name}`);
  if (existing.length >= snapshotsPerVolumeMax) {
    throw new ShaleError('INVALID_ARGUMENT', `volume ${volumeName} already has ${existing.length} snapshots, the most it may keep: delete some first`);
  }
  const id = (volume.snapSeq ?? 0) + 1;
  // Stamps travel in 24 bits of a READ descriptor (store protocol): the sequence stays below 2^24.
  if (id > snapSeqMax) throw new ShaleError('INVALID_ARGUMENT', `volume ${volumeName} has used all ${snapSeqMax} snapshot ids: clone it to a new volume to take more`);
  const updated: VolumeRecord = { ...volume, snapSeq: id };
  await ops.tx.putVolume(updated);
  const snapshot: SnapshotRecord = {
    volumeId: volume.id, id, name, state: volume.owner === null ? 'live' : 'creating', sizeBytes: volume.sizeBytes, createdAt: ops.nowIso,
  };
  await ops.tx.putSnapshot(snapshot);
  const epoch = await ops.epoch();
  ops.events.push(`volume ${volume.id} "${volumeName}": snapshot ${id} "${name}" ${snapshot.state === 'live' ? 'taken' : `waits for owner ${volume.owner} to switch`} (map epoch ${epoch})`);
  return { volume: updated, snapshot };
}

/**
 * The owner at `ownerEpoch` has switched to snap context `snapSeq` and drained the older ones:
 * every `creating` snapshot up to it becomes live. A stale owner is refused with FENCED.
 */
export async function acknowledgeSnapshots(ops: ClusterOps, volumeName: string, owner: string, ownerEpoch: number, snapSeq: number): Promise<number> {
  const volume = await ops.volumeByName(volumeName);
  if (volume.owner !== owner || volume.ownerEpoch !== ownerEpoch) {
    throw new ShaleError('FENCED', `volume ${volumeName} is owned by ${volume.owner ?? 'nobody'} at owner epoch ${volume.ownerEpoch}, not ${owner} at ${ownerEpoch}`);
  }
  return markLive(ops, volume, snapSeq);
}

/** Every `creating` snapshot of the volume with id ≤ upTo becomes live. Returns how many. */
export async function markLive(ops: ClusterOps, volume: VolumeRecord, upTo: number): Promise<number> {
  let count = 0;
  for (const snapshot of await ops.tx.snapshots(volume.id)) {
    if (snapshot.state !== 'creating' || snapshot.id > upTo) continue;
    await ops.tx.putSnapshot({ ...snapshot, state: 'live' });
    count++;
  }
  if (count > 0) {
    await ops.epoch();
    ops.events.push(`volume ${volume.id} "${volume.name}": ${count} snapshot(s) up to ${upTo} are live`);
  }
  return count;
}

/** Deletes a snapshot; refused (IN_USE) while clones read through to it. The stores trim what only it needed. */
export async function deleteSnapshot(ops: ClusterOps, volumeName: string, name: string): Promise<void> {
  const volume = await ops.volumeByName(volumeName);
  const snapshot = await snapshotByName(ops.tx, volume, name);
  const clones = await clonesOf(ops.tx, volume.id, snapshot.id);
  if (clones.length > 0) {
    throw new ShaleError('IN_USE', `snapshot ${volumeName}@${name} has clones that read through to it (${clones.map((c) => c.name).join(', ')}): flatten or delete them first`);
  }
  await ops.tx.deleteSnapshot(volume.id, snapshot.id);
  const epoch = await ops.epoch();
  ops.events.push(`volume ${volume.id} "${volumeName}": snapshot ${snapshot.id} "${name}" deleted (map epoch ${epoch})`);
}

/** A new volume that reads through to `volumeName@snapshotName`: O(1), nothing is copied. */
export async function cloneVolume(ops: ClusterOps, volumeName: string, snapshotName: string, newName: string): Promise<VolumeRecord> {
  const parent = await ops.volumeByName(volumeName);
  const snapshot = await snapshotByName(ops.tx, parent, snapshotName);
  if (snapshot.state !== 'live') throw new ShaleError('NOT_READY', `snapshot ${volumeName}@${snapshotName} is still being created`);
  if (await ops.tx.volumeByName(newName)) throw new ShaleError('ALREADY_EXISTS', `a volume named ${newName} already exists`);
  let depth = 1;
  for (let ancestor: VolumeRecord | undefined = parent; ancestor?.parentVolumeId; ancestor = await ops.tx.volume(ancestor.parentVolumeId)) depth++;
  if (depth > cloneDepthMax) throw new ShaleError('INVALID_ARGUMENT', `a clone of ${volumeName} would be ${depth} levels deep, more than ${cloneDepthMax}: flatten ${volumeName} first`);
  const volume: VolumeRecord = {
    id: await ops.tx.allocate('volumeId'),
    name: newName,
    sizeBytes: snapshot.sizeBytes,
    chunkSizeBytes: parent.chunkSizeBytes,
    poolId: parent.poolId,
    owner: null,
    ownerEpoch: 0,
    createdAt: ops.nowIso,
    snapSeq: 0,
    parentVolumeId: parent.id,
    parentSnapshotId: snapshot.id,
  };
  await ops.tx.putVolume(volume);
  const epoch = await ops.epoch();
  ops.events.push(`volume ${volume.id} "${newName}" cloned from ${volumeName}@${snapshotName} (map epoch ${epoch})`);
  return volume;
}

/** The owner copied the parent chain's data in: the clone forgets its parent. */
export async function markFlattened(ops: ClusterOps, volumeName: string, owner: string, ownerEpoch: number): Promise<VolumeRecord> {
  const volume = await ops.volumeByName(volumeName);
  if (volume.owner !== owner || volume.ownerEpoch !== ownerEpoch) {
    throw new ShaleError('FENCED', `volume ${volumeName} is owned by ${volume.owner ?? 'nobody'} at owner epoch ${volume.ownerEpoch}, not ${owner} at ${ownerEpoch}`);
  }
  if (!volume.parentVolumeId) return volume;
  const own = await ops.tx.snapshots(volume.id);
  if (own.length > 0) {
    // Their absent blocks read through to the parent too; flatten copies into the head only.
    throw new ShaleError('IN_USE', `clone ${volumeName} has snapshots (${own.map((s) => s.name).join(', ')}) that read through to its parent: delete them before flattening`);
  }
  const updated: VolumeRecord = { ...volume, parentVolumeId: null, parentSnapshotId: null };
  await ops.tx.putVolume(updated);
  const epoch = await ops.epoch();
  ops.events.push(`volume ${volume.id} "${volumeName}" flattened: no longer reads through to volume ${volume.parentVolumeId} (map epoch ${epoch})`);
  return updated;
}

/** The map's snap contexts: every volume with a snapshot or a parent. */
export async function snapContexts(tx: MetaReadTx, volumes: readonly VolumeRecord[]): Promise<SnapContextEntry[]> {
  const byVolume = new Map<number, SnapshotRecord[]>();
  for (const snapshot of await tx.allSnapshots()) {
    const list = byVolume.get(snapshot.volumeId) ?? [];
    list.push(snapshot);
    byVolume.set(snapshot.volumeId, list);
  }
  const entries: SnapContextEntry[] = [];
  for (const volume of volumes) {
    const seq = volume.snapSeq ?? 0;
    if (seq === 0 && !volume.parentVolumeId) continue;
    const snapshots = byVolume.get(volume.id) ?? [];
    let parent: SnapContextEntry['parent'] = null;
    if (volume.parentVolumeId && volume.parentSnapshotId) {
      const parentSnapshot = byVolume.get(volume.parentVolumeId)?.find((s) => s.id === volume.parentSnapshotId);
      parent = { volumeId: volume.parentVolumeId, snapshotId: volume.parentSnapshotId, sizeBytes: parentSnapshot?.sizeBytes ?? 0 };
    }
    entries.push({
      volumeId: volume.id,
      seq,
      snapshots: snapshots.map((s) => s.id),
      creating: snapshots.filter((s) => s.state === 'creating').map((s) => s.id),
      parent,
    });
  }
  return entries;
}
