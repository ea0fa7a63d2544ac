/**
 * How the healing verbs print: a data-moving plan (--dry-run, and what a drain or rebalance
 * started), a replica scrub's result, and the recovery lines of `cluster status`.
 */
import type { RecoveryStatus, ScrubResult, VolumeHealth } from '../conductor/api/types.ts';
import type { MovePlan } from '../conductor/healing.ts';
import { formatBytes } from '../lib/units.ts';

export function formatSeconds(seconds: number): string {
  if (!Number.isFinite(seconds)) return 'unknown';
  if (seconds < 90) return `${Math.ceil(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

export function formatPlan(plan: MovePlan, what: string, dryRun: boolean): string {
  const lines: string[] = [];
  const verb = dryRun ? 'would move' : 'moves';
  if (plan.replicas === 0 && plan.replicasRemoved === 0) {
    lines.push(`${what}: nothing to move`);
  } else {
    lines.push(`${what} ${verb} ${plan.pgs} PGs: ${plan.replicas} new replicas (~${formatBytes(plan.bytes)}), ${plan.replicasRemoved} replicas dropped once their replacements are clean`);
    lines.push(`estimated time: ${formatSeconds(plan.seconds)} at ${formatBytes(plan.bytesPerSecond)}/s (${plan.rateMeasured ? 'measured on the recovery under way' : 'assumed: no recovery running to measure'})`);
    for (const store of plan.stores) lines.push(`  store ${store.storeId}: receives ${store.receives}, gives up ${store.givesUp}`);
    const shown = plan.moves.slice(0, 20);
    for (const move of shown) lines.push(`  PG ${move.poolId}.${move.pgIndex}: +[${move.add.join(',')}] -[${move.remove.join(',')}]`);
    if (plan.moves.length > shown.length) lines.push(`  … and ${plan.moves.length - shown.length} more PGs (--json lists all)`);
  }
  for (const why of plan.blocked.slice(0, 10)) lines.push(`  blocked: ${why}`);
  return lines.join('\n') + '\n';
}

export function formatScrub(result: ScrubResult): string {
  const scope = result.volume === null ? 'every volume' : `volume ${result.volume}`;
  const lines = [
    `scrub of ${scope}: ${result.pgs} PGs (${result.pgsSkipped} skipped), ${result.objects} objects, ${result.blocks} blocks compared across replicas`,
    result.inconsistentBlocks === 0
      ? 'all replicas identical'
      : `${result.inconsistentBlocks} inconsistent blocks: ${result.repairedBlocks} block copies repaired, ${result.unrepairedBlocks} unrepaired`,
  ];
  for (const entry of result.repairedByStore) lines.push(`  store ${entry.storeId}: ${entry.blocks} blocks rewritten`);
  for (const error of result.errors.slice(0, 10)) lines.push(`  ${error}`);
  return lines.join('\n') + '\n';
}

export function recoveryFields(recovery: RecoveryStatus | undefined): [string, string][] {
  if (!recovery) return [];
  const fields: [string, string][] = [];
  if (recovery.replicasRecovering > 0 || recovery.replicasToRemove > 0) {
    fields.push(['recovery', `${recovery.replicasRecovering} replicas filling over ${recovery.pgsMoving} PGs, ${recovery.replicasToRemove} to drop; ` +
      `${formatBytes(recovery.bytesRemaining)} to go at ${formatBytes(recovery.bytesPerSecond)}/s, ETA ${recovery.etaSeconds === null ? 'unknown' : formatSeconds(recovery.etaSeconds)}`]);
  }
  if (recovery.storesOut.length > 0) fields.push(['out', `stores ${recovery.storesOut.join(', ')}`]);
  for (const drain of recovery.storesDraining) fields.push(['draining', `store ${drain.storeId}: ${drain.replicasLeft} replicas left`]);
  return fields;
}

export function volumeHealthFields(health: VolumeHealth | undefined): [string, string][] {
  if (!health) return [];
  return [['placement groups', `${health.pgs}: ${health.pgsClean} clean, ${health.pgsDegraded} degraded, ${health.pgsRecovering} recovering`]];
}
