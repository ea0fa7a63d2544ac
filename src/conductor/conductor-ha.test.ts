/**
 * Several conductors on etcd (DESIGN §5): one leads, the others answer reads, push map changes
 * to their long polls and send writes to the leader; a leader that dies (kill -9) is replaced
 * within seconds while block I/O through a client goes on; stores follow the leader.
 *
 * First in one process on a one-member etcd (the API behaviour), then as real child processes
 * (`node src/cli/main.ts conductor --meta etcd://…`) on a 3-member etcd cluster, with store
 * daemons and a client library doing I/O in this process.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, it } from 'node:test';
import { ClusterClient } from '../client/cluster-client.ts';
import { nodeEnv } from '../env/node/node-env.ts';
import { ShaleError } from '../lib/errors.ts';
import { ConductorClient } from '../proto/conductor-client.ts';
import { openLogEngine } from '../store/open-engine.ts';
import { startStoreDaemon, type StoreDaemon } from '../store/store-daemon.ts';
import type { ClusterMap, ConductorInfo, VolumeInfo } from './api/types.ts';
import { eventually, expectError, request, startCluster, type TestCluster } from './testing/conductor-harness.ts';
import { type EtcdCluster, freePort, startEtcdCluster } from './testing/etcd-cluster.ts';

const MiB = 1024 * 1024;
const MAIN = fileURLToPath(new URL('../cli/main.ts', import.meta.url));

describe('conductors on etcd, in one process', () => {
  let etcd: EtcdCluster;
  let prefixNumber = 0;

  before(async () => {
    etcd = await startEtcdCluster(1);
  });

  after(async () => {
    await etcd?.stop();
  });

  const pair = async (options: { heartbeatTimeoutMs?: number } = {}): Promise<[TestCluster, TestCluster]> => {
    const metaPath = etcd.metaUrl(`/ha-${process.pid}-${++prefixNumber}`);
    const first = await startCluster({ metaPath, auth: 'token', pgCount: 16, leaseTtlSeconds: 2, electionPollMs: 50, ...options });
    const second = await startCluster({ metaPath, auth: 'token', pgCount: 16, leaseTtlSeconds: 2, electionPollMs: 50, token: first.token, ...options });
    return [first, second];
  };

  it('one leads; a standby answers reads, redirects writes to the leader, and wakes its long polls from etcd', async () => {
    const [leader, standby] = await pair();
    try {
      assert.ok(leader.token, 'the first conductor made the admin token');
      assert.equal(standby.conductor.newAdminToken, undefined, 'the second found it');
      assert.equal(leader.conductor.isLeader, true);
      assert.equal(standby.conductor.isLeader, false);
      assert.equal(standby.conductor.clusterId, leader.conductor.clusterId);
      const info = (await standby.call<ConductorInfo>('GET', '/conductor')).body;
      assert.deepEqual({ leading: info.leading, leaderUrl: info.leaderUrl }, { leading: false, leaderUrl: leader.conductor.url });
      assert.match(info.meta, /^etcd:\/\//);

      // A write to the standby: 307 to the same path on the leader.
      const redirected = await standby.call('POST', '/stores/register', {});
      assert.equal(redirected.status, 307);
      assert.equal(redirected.headers.location, `${leader.conductor.url}/api/v1/stores/register`);
      assert.equal(redirected.body.leader, leader.conductor.url);
      // Without a token even that is refused.
      expectError(await standby.call('POST', '/volumes', { name: 'v', size: '1G' }, { authorization: '' }), 'UNAUTHENTICATED');

      for (const n of [1, 2, 3]) await leader.register(n);
      await leader.call('POST', '/volumes', { name: 'shared', size: '1G' });
      // Reads on the standby see the leader's commits.
      assert.deepEqual((await standby.call<{ volumes: VolumeInfo[] }>('GET', '/volumes')).body.volumes.map((v) => v.name), ['shared']);
      assert.deepEqual(await standby.map(), await leader.map());
      assert.equal((await standby.call('GET', '/status')).body.conductor.leading, false);

      // A long poll on the standby wakes when the leader commits.
      const epoch = (await standby.map()).epoch;
      const polling = standby.call<ClusterMap>('GET', `/map?since=${epoch}&waitMs=10000`);
      await new Promise((resolve) => setTimeout(resolve, 100));
      const changedAt = Date.now();
      await leader.call('POST', '/volumes/shared/open', { owner: 'gw' });
      const woken = await polling;
      assert.equal(woken.body.epoch, epoch + 1);
      assert.ok(Date.now() - changedAt < 1000, `pushed in ${Date.now() - changedAt} ms`);

      // A client given both URLs, the standby first, follows the redirect and sticks to the leader.
      const client = new ConductorClient(nodeEnv, [standby.conductor.url, leader.conductor.url], { token: leader.token });
      const opened = await client.openVolume('shared', { owner: 'gw' });
      assert.equal(opened.ownerEpoch, 2);
      assert.equal(client.currentUrl, leader.conductor.url);
    } finally {
      await standby.close();
      await leader.close();
    }
  });

  it('a standby takes over when the leader stops, keeps the state, and gives every up store a grace period', async () => {
    const [leader, standby] = await pair({ heartbeatTimeoutMs: 1500 });
    try {
      for (const n of [1, 2, 3]) await leader.register(n);
      await leader.call('POST', '/volumes', { name: 'keep', size: '1G' });
      const before = await leader.map();
      await leader.close();
      await eventually('the standby to lead', async () => (standby.conductor.isLeader ? true : undefined), 5000);
      // The stores heartbeat to the new leader; none is marked down meanwhile.
      const beat = (id: number) => standby.call('POST', `/stores/${id}/heartbeat`, { disks: [] });
      for (const id of [1, 2]) assert.equal((await beat(id)).status, 200);
      const created = await standby.call<VolumeInfo>('POST', '/volumes', { name: 'after', size: '1G' });
      assert.equal(created.status, 201, JSON.stringify(created.body));
      assert.equal(created.body.id, 2, 'ids go on from where the old leader stopped');
      const map = await standby.map();
      assert.deepEqual(map.stores.map((s) => s.state), ['up', 'up', 'up'], 'a grace period after the takeover');
      assert.deepEqual(map.pools, before.pools);
      // Store 3 never heartbeats to the new leader: it goes down after the timeout; 1 and 2 stay up.
      const alive = setInterval(() => {
        void beat(1).catch(() => {});
        void beat(2).catch(() => {});
      }, 200);
      try {
        const down = await eventually('store 3 down', async () => {
          const current = await standby.map();
          return current.stores.find((s) => s.id === 3)?.state === 'down' ? current : undefined;
        }, 5000);
        assert.deepEqual(down.stores.map((s) => s.state), ['up', 'up', 'down']);
      } finally {
        clearInterval(alive);
      }
    } finally {
      await standby.close();
      await leader.close();
    }
  });

  it('a token replaced through one conductor stops working on the others within seconds', async () => {
    const [leader, standby] = await pair();
    try {
      const old = leader.token!;
      const replacing = await startCluster({ metaPath: leader.metaPath, auth: 'token', leaseTtlSeconds: 2, electionPollMs: 50, adminToken: { replace: true } });
      try {
        assert.ok(replacing.token && replacing.token !== old);
        assert.equal((await replacing.call('GET', '/volumes')).status, 200);
        for (const conductor of [leader, standby]) {
          await eventually('the old token refused', async () => ((await conductor.call('GET', '/volumes', undefined, { authorization: `Bearer ${old}` })).status === 401 ? true : undefined), 5000);
          assert.equal((await conductor.call('GET', '/volumes', undefined, { authorization: `Bearer ${replacing.token}` })).status, 200);
        }
      } finally {
        await replacing.close();
      }
    } finally {
      await standby.close();
      await leader.close();
    }
  });

  it('the bad-input table gives the same codes on etcd and changes nothing', async () => {
    const [leader, standby] = await pair();
    try {
      for (const n of [1, 2, 3]) await leader.register(n);
      await leader.call('POST', '/volumes', { name: 'taken', size: '1G' });
      const before = await leader.map();
      const cases: [string, string, unknown, string][] = [
        ['GET', '/volumes/nope', undefined, 'NOT_FOUND'],
        ['POST', '/volumes', { name: 'taken', size: '1G' }, 'ALREADY_EXISTS'],
        ['POST', '/volumes', { name: 'v', size: 0 }, 'INVALID_ARGUMENT'],
        ['POST', '/volumes', { name: 'v', size: '2P' }, 'INVALID_ARGUMENT'],
        ['POST', '/stores/register', { diskUuid: 'd', clusterId: 'another', address: '127.0.0.1:1', domain: '', disks: [] }, 'WRONG_CLUSTER'],
        ['PATCH', '/volumes/taken', { size: '1M' }, 'NOT_SUPPORTED'],
        ['POST', '/pools', { name: 'p', replicas: 9 }, 'NOT_READY'],
      ];
      for (const [method, path, body, code] of cases) {
        expectError(await leader.call(method, path, body), code as never);
      }
      expectError(await leader.raw('POST', '/volumes', '{"name": '), 'INVALID_ARGUMENT', /malformed JSON/);
      expectError(await standby.raw('POST', '/volumes', '{"name": '), 'INVALID_ARGUMENT', /malformed JSON/);
      assert.deepEqual(await leader.map(), before);
      assert.equal(leader.logs.filter((line) => line.includes('GET /api/v1/volumes/nope')).length, 1, 'logged once');
    } finally {
      await standby.close();
      await leader.close();
    }
  });
});

/** A `shale conductor` child process. */
interface ConductorProcess {
  url: string;
  child: ChildProcess;
  output: string[];
}

describe('conductor failover with kill -9, on a 3-member etcd cluster', () => {
  const dir = mkdtempSync(join(tmpdir(), 'shale-ha-'));
  const configDir = join(dir, 'config');
  let etcd: EtcdCluster;
  const conductors: ConductorProcess[] = [];
  const stores: StoreDaemon[] = [];
  let cluster: ClusterClient | undefined;
  const savedToken = process.env.SHALE_TOKEN;

  const startConductorProcess = async (): Promise<ConductorProcess> => {
    const port = await freePort();
    const output: string[] = [];
    const child = spawn(process.execPath, [
      MAIN, 'conductor', '--meta', etcd.metaUrl('/shale-ha'), '--listen', `127.0.0.1:${port}`,
      '--lease-ttl', '2s', '--heartbeat-timeout', '4s', '--pgs', '16',
    ], { env: { ...process.env, SHALE_CONFIG_DIR: configDir, SHALE_TOKEN: '' }, stdio: ['ignore', 'pipe', 'pipe'] });
    child.stdout!.on('data', (chunk: Buffer) => output.push(chunk.toString()));
    child.stderr!.on('data', (chunk: Buffer) => output.push(chunk.toString()));
    const conductor = { url: `http://127.0.0.1:${port}`, child, output };
    conductors.push(conductor);
    await eventually(`conductor on port ${port}`, async () => {
      if (child.exitCode !== null) assert.fail(`conductor exited: ${output.join('')}`);
      const reply = await request(`${conductor.url}/api/v1/openapi.json`, 'GET').catch(() => undefined);
      return reply?.status === 200 ? true : undefined;
    }, 30_000);
    return conductor;
  };

  const info = async (conductor: ConductorProcess, token: string): Promise<ConductorInfo | undefined> => {
    const reply = await request(`${conductor.url}/api/v1/conductor`, 'GET', undefined, { authorization: `Bearer ${token}` }).catch(() => undefined);
    return reply?.status === 200 ? (reply.body as ConductorInfo) : undefined;
  };

  before(async () => {
    etcd = await startEtcdCluster(3);
    // Never leave a conductor running if this process dies.
    process.on('exit', () => {
      for (const conductor of conductors) conductor.child.kill('SIGKILL');
    });
  });

  after(async () => {
    await cluster?.close().catch(() => {});
    for (const store of stores) await store.close().catch(() => {});
    for (const conductor of conductors) conductor.child.kill('SIGKILL');
    await etcd?.stop();
    rmSync(dir, { recursive: true, force: true });
    if (savedToken === undefined) delete process.env.SHALE_TOKEN;
    else process.env.SHALE_TOKEN = savedToken;
  });

  it('another conductor leads within 10 s; block I/O and stores carry on through the switch', async () => {
    for (let i = 0; i < 3; i++) await startConductorProcess();
    const token = readFileSync(join(configDir, 'token'), 'utf8').trim();
    assert.match(token, /^shale_/);
    assert.equal(conductors.filter((c) => c.output.join('').includes(token)).length, 1, 'printed once, by the conductor that made it');
    // Stores and the client read it from the environment, as under shale up.
    process.env.SHALE_TOKEN = token;
    const urls = conductors.map((c) => c.url);
    const leaderOf = async (): Promise<ConductorProcess | undefined> => {
      for (const conductor of conductors) {
        if (conductor.child.exitCode === null && conductor.child.signalCode === null && (await info(conductor, token))?.leading) return conductor;
      }
      return undefined;
    };
    const firstLeader = await eventually('a leader', leaderOf, 10_000);

    for (let i = 0; i < 3; i++) {
      stores.push(await startStoreDaemon(nodeEnv, {
        diskPath: join(dir, `disk-${i}.img`), diskSizeBytes: 128 * MiB, format: true, listen: '127.0.0.1:0',
        conductorUrls: urls, domain: `host-${i}`, log: () => {}, openEngine: openLogEngine,
      }));
    }
    const api = new ConductorClient(nodeEnv, urls);
    await eventually('the default pool', async () => ((await api.map()).pools.length > 0 ? true : undefined), 20_000);
    await api.call('POST', '/volumes', { name: 'busy', size: '32M' });

    cluster = new ClusterClient(nodeEnv, { conductorUrls: urls, ownerId: 'gw-ha', requestTimeoutMs: 5000, log: () => {} });
    await cluster.start();
    const volume = await cluster.openVolume('busy');
    const model = Buffer.alloc(32 * MiB);
    const errors: unknown[] = [];
    const completions: number[] = [];
    let latencyMsMax = 0;
    let running = true;
    const load = (async () => {
      for (let i = 0; running; i++) {
        const offset = ((i * 7919) % 8192) * 4096;
        const data = randomBytes(4096);
        const started = Date.now();
        try {
          await volume.write(offset, data);
          data.copy(model, offset);
          const back = await volume.read(offset, 4096);
          if (!back.equals(data)) errors.push(new Error(`read back differs at ${offset}`));
        } catch (error) {
          errors.push(error);
        }
        latencyMsMax = Math.max(latencyMsMax, Date.now() - started);
        completions.push(Date.now());
      }
    })();
    await new Promise((resolve) => setTimeout(resolve, 500));

    // kill -9 the leader.
    const killedAt = Date.now();
    firstLeader.child.kill('SIGKILL');
    const secondLeader = await eventually('a new leader', async () => {
      const leader = await leaderOf();
      return leader && leader !== firstLeader ? leader : undefined;
    }, 15_000);
    const electedMs = Date.now() - killedAt;
    // A change through the client, which follows the new leader by itself.
    await eventually('a write through the new leader', async () => {
      try {
        await api.call('POST', '/volumes', { name: 'after-failover', size: '8M' });
        return true;
      } catch (error) {
        if (error instanceof ShaleError && error.code === 'ALREADY_EXISTS') return true;
        return undefined;
      }
    }, 15_000);
    const writableMs = Date.now() - killedAt;
    await new Promise((resolve) => setTimeout(resolve, 500));
    const ioDuringSwitch = completions.filter((at) => at > killedAt && at < killedAt + electedMs).length;

    // Then lose one etcd member (not necessarily etcd's leader): the conductors carry on.
    etcd.kill(2);
    await eventually('a write with one etcd member gone', async () => {
      try {
        await api.call('PATCH', '/volumes/after-failover', { size: '16M' });
        return true;
      } catch {
        return undefined;
      }
    }, 20_000);

    running = false;
    await load;
    assert.deepEqual(errors, [], 'no I/O error');
    assert.ok(electedMs < 10_000, `a new leader in ${electedMs} ms`);
    assert.ok(writableMs < 10_000, `writable again in ${writableMs} ms`);
    assert.ok(ioDuringSwitch > 0, `I/O completed while no conductor led (${ioDuringSwitch} operations in ${electedMs} ms)`);
    assert.ok(latencyMsMax < 3000, `no I/O waited on the conductor (slowest ${latencyMsMax} ms)`);
    const map = await api.map();
    assert.deepEqual(map.stores.map((s) => s.state), ['up', 'up', 'up'], 'no store was marked down by the switch');
    assert.ok((await volume.read(0, 32 * MiB)).equals(model), 'every acknowledged write reads back');
    assert.notEqual(secondLeader, firstLeader);
    process.stdout.write(`# failover: new leader ${electedMs} ms after kill -9, writable after ${writableMs} ms; ${ioDuringSwitch} I/Os completed meanwhile, slowest ${latencyMsMax} ms\n`);
  });
});
