/**
 * A store whose disk fails a write. The failure is injected under one store's engine, into its
 * real disk file: once switched on, every write to the file fails as a full host file system
 * does (ENOSPC). The engine answers DISK_FAILED from then on. A 3-replica volume's writes must go
 * on with the other two replicas: the client reports the store down, in a committed map epoch,
 * before it acknowledges a write without it, and the store must not register again afterwards.
 * A 1-replica volume has no other copy: its write fails at once with the disk's error, rather
 * than waiting for a store that will not come back by itself.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, describe, test } from 'node:test';
import type { DiskFile, Env } from '../src/env/env.ts';
import { nodeEnv } from '../src/env/node/node-env.ts';
import { codeOf } from '../src/lib/errors.ts';
import { startLocalCluster, type LocalCluster } from './harness.ts';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

/** An environment whose disk files fail every write while `switch.on` (as ENOSPC does), and work otherwise. */
function failingDisk(): { env: Env; switch: { on: boolean }; failedWrites: () => number } {
  const state = { on: false };
  let failed = 0;
  const fail = (): Error => {
    failed++;
    return Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC', errno: -28, syscall: 'write' });
  };
  const wrap = (file: DiskFile): DiskFile => ({
    path: file.path,
    sizeBytes: file.sizeBytes,
    read: (target, offsetBytes) => file.read(target, offsetBytes),
    readNow: file.readNow && ((target, offsetBytes) => file.readNow!(target, offsetBytes)),
    writev: (buffers, offsetBytes) => (state.on ? Promise.reject(fail()) : file.writev(buffers, offsetBytes)),
    writevNow: file.writevNow && ((buffers, offsetBytes) => {
      if (state.on) throw fail();
      return file.writevNow!(buffers, offsetBytes);
    }),
    sync: () => file.sync(),
    close: () => file.close(),
  });
  const env: Env = { ...nodeEnv, disk: { ...nodeEnv.disk, open: async (path, options) => wrap(await nodeEnv.disk.open(path, options)) } };
  return { env, switch: state, failedWrites: () => failed };
}

describe('a store whose disk fails a write', () => {
  const clusters: LocalCluster[] = [];
  after(async () => {
    for (const cluster of clusters) await cluster.close();
  });

  test('3 replicas: writes go on with the other two, the store is reported down and stays down', async () => {
    const disk = failingDisk();
    const cluster = await startLocalCluster({ stores: 3, envFor: (index) => (index === 1 ? disk.env : undefined) });
    clusters.push(cluster);
    assert.equal((await cluster.call('POST', '/volumes', { name: 'wide', size: SIZE, replicas: 3 })).status, 201);
    const gateway = await cluster.client('gw-disk-failure');
    const volume = await gateway.openVolume('wide');
    const failing = cluster.stores[1]!;

    const before = randomBytes(SIZE / 2);
    await volume.write(0, before);
    disk.switch.on = true;
    // Every PG has a replica on each of the 3 stores: every chunk written reaches the failing disk.
    const during = randomBytes(SIZE / 2);
    await volume.write(SIZE / 2, during);
    assert.ok(disk.failedWrites() > 0, 'the failing store was asked to write');
    assert.equal(codeOf(failing.engine.failure()), 'DISK_FAILED', `the engine says why it stopped: ${failing.engine.failure()?.message}`);
    assert.match(failing.engine.failure()!.message, /file system holding the disk file is full/);

    const storeState = async (): Promise<string> => (await cluster.call('GET', '/stores')).body.stores.find((store: { id: number }) => store.id === failing.storeId).state;
    assert.equal(await storeState(), 'down', 'reported down before the write was acknowledged without it');
    assert.ok((await volume.read(0, SIZE)).equals(Buffer.concat([before, during])), 'the volume reads back every acknowledged write');
    await volume.flush();

    // Heartbeats now answer NOT_FOUND; a store whose disk failed must not register again.
    await new Promise((resolve) => setTimeout(resolve, 2500));
    assert.equal(await storeState(), 'down', 'still down after more than one heartbeat period');
    const again = randomBytes(64 * 1024);
    await volume.write(0, again);
    assert.ok((await volume.read(0, again.length)).equals(again), 'writes still work');
  });

  test('1 replica: the write fails at once with DISK_FAILED, and reads still answer', async () => {
    const disk = failingDisk();
    const cluster = await startLocalCluster({ stores: 1, envFor: () => disk.env });
    clusters.push(cluster);
    assert.equal((await cluster.call('POST', '/volumes', { name: 'single', size: SIZE, replicas: 1 })).status, 201);
    const gateway = await cluster.client('gw-disk-failure-1');
    const volume = await gateway.openVolume('single');
    const data = randomBytes(MiB);
    await volume.write(0, data);
    disk.switch.on = true;
    const started = Date.now();
    await assert.rejects(volume.write(MiB, randomBytes(MiB)), (error: unknown) => codeOf(error) === 'DISK_FAILED');
    assert.ok(Date.now() - started < 5000, `failed at once, not after waiting (${Date.now() - started} ms)`);
    assert.ok((await volume.read(0, MiB)).equals(data), 'what was written before still reads');
    assert.equal((await cluster.call('GET', '/stores')).body.stores[0].state, 'up', 'not reported down: no other replica could take the write');
  });
});
