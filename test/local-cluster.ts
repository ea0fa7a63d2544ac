/**
 * A gateway and a store in one process, as `shale up --stores 1` runs them (DESIGN §9): a real
 * conductor, a store daemon with its log engine on a file, and a client library sharing its
 * LocalStores, so reads and writes take the in-process paths. Shared by the local-read and
 * local-write tests.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { ClusterClient } from '../src/client/cluster-client.ts';
import type { VolumeClient } from '../src/client/volume-client.ts';
import { startConductor, type Conductor } from '../src/conductor/conductor.ts';
import type { Env } from '../src/env/env.ts';
import { nodeDiskWith, nodeEnv } from '../src/env/node/node-env.ts';
import { LocalStores } from '../src/proto/local-channel.ts';
import { openLogEngine } from '../src/store/open-engine.ts';
import { startStoreDaemon, type StoreDaemon, type StoreDaemonOptions } from '../src/store/store-daemon.ts';
import { waitFor } from './harness.ts';

export const MiB = 1024 * 1024;
export const CHUNK = 4 * MiB;
export const quiet = (): void => {};

// The store reads synchronously whenever asked, so that what readNow serves does not depend on how
// loaded the machine is (the adaptive policy backs off when slow reads exceed its time budget).
const env: Env = { ...nodeEnv, disk: nodeDiskWith(() => ({ useSync: () => true, record: () => {} })) };

export interface LocalCluster {
  conductor: Conductor;
  api: string;
  store: StoreDaemon;
  localStores: LocalStores;
  gateway: ClusterClient;
  /** The 16 MiB volume "fast", opened by `gateway`. */
  volume: VolumeClient;
}

/** A conductor, a store daemon on a file and a gateway in this process, and one 16 MiB volume "fast". */
export async function startLocal(dirPath: string, store: Partial<StoreDaemonOptions> = {}): Promise<LocalCluster> {
  const conductor = await startConductor(nodeEnv, { metaPath: join(dirPath, 'meta.db'), listen: '127.0.0.1:0', heartbeatTimeoutMs: 5000, defaultReplicas: 1, pgCount: 8 });
  const api = `http://${conductor.address}`;
  const localStores = new LocalStores();
  const daemon = await startStoreDaemon(env, {
    diskPath: join(dirPath, 'disk.img'), diskSizeBytes: 256 * MiB, format: true, listen: '127.0.0.1:0', conductorUrls: api, domain: 'local', log: quiet, openEngine: openLogEngine, localStores,
    ...store,
  });
  await waitFor('the default pool', async () => ((await (await fetch(`${api}/api/v1/pools`)).json()) as { pools: unknown[] }).pools.length > 0);
  const response = await fetch(`${api}/api/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'fast', size: 16 * MiB, replicas: 1 }) });
  assert.equal(response.status, 201, await response.text());
  const gateway = new ClusterClient(nodeEnv, { conductorUrls: api, ownerId: 'gw-local', requestTimeoutMs: 5000, ioTimeoutMs: 1500, log: quiet, localStores });
  await gateway.start();
  return { conductor, api, store: daemon, localStores, gateway, volume: await gateway.openVolume('fast') };
}

/** Stops what startLocal started. */
export async function stopLocal(local: LocalCluster | undefined): Promise<void> {
  await local?.gateway.close().catch(() => {});
  await local?.store.close().catch(() => {});
  await local?.conductor.close();
}
