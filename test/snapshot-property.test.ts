/**
 * A property test of snapshots and clones against an in-memory model (fast-check): random
 * sequences of write / trim / snapshot / clone / rollback / delete snapshot / flatten on a cluster
 * in one process (conductor on SQLite, three store daemons, real sockets), and after every step
 * every byte of every volume and every snapshot is compared with the model.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import type { ClusterClient } from '../src/client/cluster-client.ts';
import { SnapshotView } from '../src/client/snapshot-view.ts';
import { flattenVolume, rollbackVolume } from '../src/client/volume-ops.ts';
import type { VolumeClient } from '../src/client/volume-client.ts';
import { startLocalCluster, type LocalCluster } from './harness.ts';

const BLOCK = 4096;
const BLOCKS = 48; // 192 KiB volumes in 64 KiB chunks: three chunks, so pieces cross chunk boundaries
const SIZE = BLOCKS * BLOCK;

type Step =
  | { kind: 'write'; volume: number; block: number; count: number; byte: number }
  | { kind: 'trim'; volume: number; block: number; count: number }
  | { kind: 'snapshot'; volume: number }
  | { kind: 'clone'; snapshot: number }
  | { kind: 'rollback'; snapshot: number }
  | { kind: 'delete'; snapshot: number }
  | { kind: 'flatten'; volume: number };

const range = fc.integer({ min: 0, max: BLOCKS - 1 }).chain((block) => fc.record({ block: fc.constant(block), count: fc.integer({ min: 1, max: Math.min(20, BLOCKS - block) }) }));
const stepArbitrary: fc.Arbitrary<Step> = fc.oneof(
  { weight: 5, arbitrary: fc.record({ volume: fc.nat(7), byte: fc.integer({ min: 1, max: 255 }), r: range }).map(({ volume, byte, r }) => ({ kind: 'write' as const, volume, byte, ...r })) },
  { weight: 2, arbitrary: fc.record({ volume: fc.nat(7), r: range }).map(({ volume, r }) => ({ kind: 'trim' as const, volume, ...r })) },
  { weight: 2, arbitrary: fc.nat(7).map((volume) => ({ kind: 'snapshot' as const, volume })) },
  { weight: 2, arbitrary: fc.nat(15).map((snapshot) => ({ kind: 'clone' as const, snapshot })) },
  { weight: 1, arbitrary: fc.nat(15).map((snapshot) => ({ kind: 'rollback' as const, snapshot })) },
  { weight: 1, arbitrary: fc.nat(15).map((snapshot) => ({ kind: 'delete' as const, snapshot })) },
  { weight: 1, arbitrary: fc.nat(7).map((volume) => ({ kind: 'flatten' as const, volume })) },
);

interface ModelVolume { name: string; bytes: Buffer; parent: ModelSnapshot | undefined; client: VolumeClient | undefined }
interface ModelSnapshot { volume: ModelVolume; name: string; bytes: Buffer; clones: number }

describe('snapshots and clones against a model', () => {
  let cluster: LocalCluster;
  let gateway: ClusterClient;
  let cli: ClusterClient;
  let run = 0;
  before(async () => {
    cluster = await startLocalCluster({ pgCount: 16 });
    gateway = await cluster.client('property-gateway');
    cli = await cluster.client('property-cli');
  });
  after(async () => {
    await cluster?.close();
  });

  test('every byte of every volume and snapshot matches the model after each step', async () => {
    await fc.assert(fc.asyncProperty(fc.array(stepArbitrary, { minLength: 4, maxLength: 14 }), async (steps) => {
      const prefix = `r${++run}`;
      const volumes: ModelVolume[] = [];
      const snapshots: ModelSnapshot[] = [];
      let names = 0;
      const open = async (volume: ModelVolume): Promise<VolumeClient> => {
        volume.client ??= await gateway.openVolume(volume.name);
        return volume.client;
      };
      const closeVolume = async (volume: ModelVolume): Promise<void> => {
        await volume.client?.close();
        volume.client = undefined;
      };
      const first: ModelVolume = { name: `${prefix}-v0`, bytes: Buffer.alloc(SIZE), parent: undefined, client: undefined };
      assert.equal((await cluster.call('POST', '/volumes', { name: first.name, size: SIZE, chunkSize: '64K' })).status, 201);
      volumes.push(first);
      const check = async (after: Step | undefined): Promise<void> => {
        for (const volume of volumes) {
          const seen = await (await open(volume)).read(0, SIZE);
          assert.ok(seen.equals(volume.bytes), `volume ${volume.name} differs from the model after ${JSON.stringify(after)}`);
        }
        for (const snapshot of snapshots) {
          const view = await SnapshotView.open(cli, snapshot.volume.name, snapshot.name);
          assert.ok((await view.read(0, SIZE)).equals(snapshot.bytes), `snapshot ${snapshot.volume.name}@${snapshot.name} changed after ${JSON.stringify(after)}`);
        }
      };
      try {
        for (const step of steps) {
          switch (step.kind) {
            case 'write': {
              const volume = volumes[step.volume % volumes.length]!;
              const data = Buffer.alloc(step.count * BLOCK, step.byte);
              data.writeUInt32LE(step.block, 0); // not all-zero-detectable, distinct per position
              await (await open(volume)).write(step.block * BLOCK, data);
              data.copy(volume.bytes, step.block * BLOCK);
              break;
            }
            case 'trim': {
              const volume = volumes[step.volume % volumes.length]!;
              await (await open(volume)).writeZeroes(step.block * BLOCK, step.count * BLOCK);
              volume.bytes.fill(0, step.block * BLOCK, (step.block + step.count) * BLOCK);
              break;
            }
            case 'snapshot': {
              const volume = volumes[step.volume % volumes.length]!;
              const name = `s${++names}`;
              const reply = await cluster.call('POST', `/volumes/${volume.name}/snapshots`, { name });
              assert.equal(reply.status, 201, JSON.stringify(reply.body));
              snapshots.push({ volume, name, bytes: Buffer.from(volume.bytes), clones: 0 });
              break;
            }
            case 'clone': {
              if (snapshots.length === 0 || volumes.length >= 6) continue;
              const snapshot = snapshots[step.snapshot % snapshots.length]!;
              const name = `${prefix}-c${++names}`;
              const reply = await cluster.call('POST', `/volumes/${snapshot.volume.name}/snapshots/${snapshot.name}/clone`, { name });
              assert.equal(reply.status, 201, JSON.stringify(reply.body));
              snapshot.clones++;
              volumes.push({ name, bytes: Buffer.from(snapshot.bytes), parent: snapshot, client: undefined });
              break;
            }
            case 'rollback': {
              if (snapshots.length === 0) continue;
              const snapshot = snapshots[step.snapshot % snapshots.length]!;
              await closeVolume(snapshot.volume);
              await rollbackVolume(cli, snapshot.volume.name, snapshot.name);
              snapshot.bytes.copy(snapshot.volume.bytes);
              break;
            }
            case 'delete': {
              if (snapshots.length === 0) continue;
              const index = step.snapshot % snapshots.length;
              const snapshot = snapshots[index]!;
              const reply = await cluster.call('DELETE', `/volumes/${snapshot.volume.name}/snapshots/${snapshot.name}`);
              if (snapshot.clones > 0) {
                assert.equal(reply.body.code, 'IN_USE', 'a snapshot with clones is not deleted');
              } else {
                assert.equal(reply.status, 200, JSON.stringify(reply.body));
                snapshots.splice(index, 1);
              }
              break;
            }
            case 'flatten': {
              const volume = volumes[step.volume % volumes.length]!;
              if (!volume.parent) continue;
              await closeVolume(volume);
              if (snapshots.some((snapshot) => snapshot.volume === volume)) {
                // Its snapshots read through to the parent as well: refused until they are gone.
                await assert.rejects(flattenVolume(cli, volume.name), (error: { code?: string }) => error.code === 'IN_USE');
                break;
              }
              await flattenVolume(cli, volume.name);
              volume.parent.clones--;
              volume.parent = undefined;
              break;
            }
          }
          await check(step);
        }
      } finally {
        for (const volume of volumes) await closeVolume(volume).catch(() => {});
      }
    }), { numRuns: Number(process.env.SHALE_PROPERTY_RUNS ?? 30), endOnFailure: true });
  });
});
