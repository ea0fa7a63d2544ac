/**
 * Property test: fast-check generates sequences of writes, tombstones, flushes, compactions,
 * checkpoints, snapshot creations and deletions, takeovers (higher epoch, sequence restarted),
 * pauses and crashes, run against the engine on a simulated disk and checked against a
 * VersionModel (test-support.ts) — every block as the head and as every live snapshot sees it,
 * also with the background compactor on and with freed segments given back to the disk. A
 * failure prints its seed and the command sequence; set SHALE_PROPERTY_SHRINK=1 to shrink it to a
 * minimal one (slow).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { runEngineCommands } from './test-support.ts';
import type { EngineCommand } from './test-support.ts';

const command: fc.Arbitrary<EngineCommand> = fc.oneof(
  { arbitrary: fc.record({
    kind: fc.constant('write' as const),
    volumeId: fc.integer({ min: 1, max: 2 }),
    chunkIndex: fc.integer({ min: 0, max: 1 }),
    offsetBlocks: fc.integer({ min: 0, max: 11 }),
    countBlocks: fc.integer({ min: 1, max: 6 }),
    zero: fc.boolean(),
    wait: fc.boolean(),
  }), weight: 10 },
  { arbitrary: fc.record({ kind: fc.constant('flush' as const), wait: fc.boolean() }), weight: 3 },
  { arbitrary: fc.record({ kind: fc.constant('compact' as const), wait: fc.boolean() }), weight: 2 },
  { arbitrary: fc.record({ kind: fc.constant('checkpoint' as const), wait: fc.boolean() }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant('snapshot' as const), volumeId: fc.integer({ min: 1, max: 2 }) }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant('deleteSnapshot' as const), volumeId: fc.integer({ min: 1, max: 2 }), pick: fc.nat(7) }), weight: 1 },
  { arbitrary: fc.constant({ kind: 'takeover' as const }), weight: 1 },
  { arbitrary: fc.record({ kind: fc.constant('pause' as const), turns: fc.integer({ min: 0, max: 20 }) }), weight: 2 },
  { arbitrary: fc.constant({ kind: 'settle' as const }), weight: 1 },
  { arbitrary: fc.constant({ kind: 'crash' as const }), weight: 2 },
);

test('property: interleaved writes, zeroes, flushes, compactions, checkpoints, snapshots and crashes match the model', async () => {
  await fc.assert(
    fc.asyncProperty(fc.integer({ min: 1, max: 2 ** 31 - 1 }), fc.array(command, { minLength: 1, maxLength: 150, size: 'max' }), async (seed, commands) => {
      await runEngineCommands(seed, commands);
    }),
    {
      numRuns: Number(process.env.SHALE_PROPERTY_RUNS ?? 300),
      // Shrinking re-runs whole workloads and takes minutes: report the first failure with its
      // seed and path (replay them with fc.assert's `seed`/`path`), shrink on request.
      endOnFailure: process.env.SHALE_PROPERTY_SHRINK === undefined,
    },
  );
});

// The same workloads with the background compactor on: it picks victims, reads them outside the
// writer and interleaves copies with the commands' writes, snapshots, checkpoints and crashes.
test('property: the same with background compaction running under the workload', async () => {
  await fc.assert(
    fc.asyncProperty(fc.integer({ min: 1, max: 2 ** 31 - 1 }), fc.array(command, { minLength: 1, maxLength: 150, size: 'max' }), async (seed, commands) => {
      await runEngineCommands(seed, commands, 8, true);
    }),
    {
      numRuns: Number(process.env.SHALE_PROPERTY_RUNS ?? 200),
      endOnFailure: process.env.SHALE_PROPERTY_SHRINK === undefined,
    },
  );
});

// The same with freed segments given back to the disk at once (discardFreedSegments, no delay):
// holes are punched in segments the writer may plan and reopen next, under crashes that may
// undo a hole, and no acknowledged block may change or vanish.
test('property: the same with freed segments given back to the disk at once', async () => {
  let punched = 0;
  await fc.assert(
    fc.asyncProperty(fc.integer({ min: 1, max: 2 ** 31 - 1 }), fc.array(command, { minLength: 1, maxLength: 150, size: 'max' }), async (seed, commands) => {
      const env = await runEngineCommands(seed, commands, 8, true, true);
      punched += env.disk.stats.holesPunched;
    }),
    {
      numRuns: Number(process.env.SHALE_PROPERTY_RUNS ?? 200),
      endOnFailure: process.env.SHALE_PROPERTY_SHRINK === undefined,
    },
  );
  // The workloads free segments often enough that holes were punched; else this tested nothing.
  assert.ok(punched > 0, 'no hole was punched in any run');
});
