/**
 * What the volume and object clients do when replicas fail a request (DESIGN §3): one policy for
 * both. A stale PG epoch refreshes the map; a busy, not-ready or bad-checksum replica is retried
 * after a short delay; an unreachable one is reported down (a new map epoch without it) before the
 * request is retried on the rest, and so is one whose disk failed while the rest suffice (below);
 * anything else is final. Past the I/O deadline: NO_QUORUM.
 */
import type { ClusterMap } from '../conductor/api/types.ts';
import { ShaleError } from '../lib/errors.ts';
import type { ClusterClient } from './cluster-client.ts';

export const RETRY_DELAY_MS = 50;

export interface ReplicaFailure {
  storeId: number;
  error: ShaleError;
}

/**
 * Acts on the failures of one round; returns the first one's error for NO_QUORUM, throws what can't
 * be retried. `spare`: how many replicas whose disk failed (DISK_FAILED) may be reported down, as
 * for a write whose PG keeps its minimum without them; beyond that, DISK_FAILED is final (a volume
 * whose only copy sits on the failed disk gets the error, not a wait for a store that will not come
 * back by itself).
 */
export async function handleReplicaFailures(cluster: ClusterClient, failures: readonly ReplicaFailure[], spare = 0): Promise<ShaleError> {
  let delay = false;
  let refresh = false;
  let spareLeft = spare;
  for (const { storeId, error } of failures) {
    if (error.code === 'DISK_FAILED' && spareLeft-- <= 0) throw error;
    switch (error.code) {
      case 'STALE_PG_EPOCH':
        refresh = true;
        break;
      case 'NOT_READY':
      case 'BUSY':
      case 'CHECKSUM':
        delay = true;
        break;
      case 'UNAVAILABLE':
      case 'MAYBE_COMMITTED':
      case 'SHUTTING_DOWN':
      case 'DISK_FAILED': // within `spare` (above)
        try {
          await cluster.reportDown(storeId, error.message);
        } catch {
          delay = true; // the conductor is unreachable: retry until the deadline
        }
        break;
      default:
        throw error;
    }
  }
  if (refresh) await cluster.watcher.refresh().catch(() => {});
  if (delay) await cluster.env.clock.sleep(RETRY_DELAY_MS);
  return failures[0]!.error;
}

/**
 * The `spare` for handleReplicaFailures: every replica of the round whose disk failed, when
 * `needs` (acting.ts: pgNeeds, poolNeeds) says the PG or PGs can do without them all; else none.
 */
export function diskFailedSpare(failures: readonly ReplicaFailure[], needs: (storeIds: ReadonlySet<number>) => string | undefined): number {
  const failed = new Set<number>();
  for (const failure of failures) if (failure.error.code === 'DISK_FAILED') failed.add(failure.storeId);
  return failed.size > 0 && needs(failed) === undefined ? failed.size : 0;
}

/** Waits for a map newer than `map`, or a short while; throws NO_QUORUM past the deadline. */
export async function waitForMapChange(cluster: ClusterClient, map: ClusterMap, deadline: number, lastError: ShaleError | undefined, what = 'I/O'): Promise<void> {
  const clock = cluster.env.clock;
  if (clock.nowMs() >= deadline) throw noQuorum(lastError, what);
  const waitMs = Math.min(500, deadline - clock.nowMs());
  await Promise.race([cluster.watcher.waitForEpoch(map.epoch + 1), clock.sleep(waitMs)]);
}

export function noQuorum(lastError: ShaleError | undefined, what = 'I/O'): ShaleError {
  return new ShaleError('NO_QUORUM', `${what} timed out waiting for replicas${lastError ? `: ${lastError.message}` : ''}`);
}
