/**
 * The etcd MetaStore and the conductor election against a real etcd (Debian's etcd-server on a
 * loopback port, started here): the shared MetaStore suite, then what only etcd has — the
 * leader guard, the key space version, the limits of one transaction, watches, elections.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { nodeEnv } from '../../env/node/node-env.ts';
import { type EtcdCluster, startEtcdCluster } from '../testing/etcd-cluster.ts';
import { EtcdElection } from './etcd-election.ts';
import { type EtcdMetaStoreOptions, etcdMigrations, EtcdMetaStore, parseEtcdUrl, txnOpsMax } from './etcd-meta-store.ts';
import { isCode, metaStoreSuite, poolRecord, storeRecord, volumeRecord } from './meta-store.suite.ts';

let etcd: EtcdCluster;
let prefixNumber = 0;

before(async () => {
  etcd = await startEtcdCluster(1);
});

after(async () => {
  await etcd?.stop();
});

const freshPrefix = (): string => `/test-${process.pid}-${++prefixNumber}`;

/** A store that may commit without an election: it plays the leader with a guard of its own key. */
async function openLeading(prefix = freshPrefix(), options: Partial<EtcdMetaStoreOptions> = {}): Promise<EtcdMetaStore> {
  const meta = await EtcdMetaStore.open(nodeEnv, { endpoints: etcd.endpoints, prefix, ...options });
  const put = await meta.client.kv.txn({
    compare: [{ key: Buffer.from(meta.leaderKey), target: 'Create', result: 'Equal', create_revision: 0 }],
    success: [{ request_put: { key: Buffer.from(meta.leaderKey), value: Buffer.from('{"id":"test","url":"http://test"}') } }],
    failure: [{ request_range: { key: Buffer.from(meta.leaderKey) } }],
  });
  const createRevision = put.succeeded ? put.header.revision : put.responses[0]!.response_range.kvs[0]!.create_revision;
  meta.setGuard({ createRevision });
  return meta;
}

const prefixes = new WeakMap<object, string>();

metaStoreSuite('etcd', {
  open: async () => {
    const prefix = freshPrefix();
    const meta = await openLeading(prefix, { rangePageSize: 2 });
    prefixes.set(meta, prefix);
    return meta;
  },
  reopen: async (closed) => {
    const prefix = prefixes.get(closed)!;
    const meta = await openLeading(prefix, { rangePageSize: 2 });
    prefixes.set(meta, prefix);
    return meta;
  },
  second: async (first) => openLeading(prefixes.get(first)!),
});

describe('EtcdMetaStore', () => {
  it('parses etcd:// URLs and refuses bad ones', () => {
    assert.deepEqual(parseEtcdUrl('etcd://127.0.0.1:2379,10.0.0.2:22379'), { endpoints: ['127.0.0.1:2379', '10.0.0.2:22379'], prefix: '/shale' });
    assert.deepEqual(parseEtcdUrl('etcd://h:1/my/prefix/'), { endpoints: ['h:1'], prefix: '/my/prefix' });
    for (const bad of ['etcd://', 'etcd://nohost', 'etcd://h:1/', 'etcd://h:1,h:x', 'http://h:1']) {
      assert.throws(() => parseEtcdUrl(bad), isCode('INVALID_ARGUMENT'), bad);
    }
  });

  it('commits only while it holds the leader key: without a guard, or after losing it, nothing is written', async () => {
    const meta = await openLeading();
    try {
      await meta.write(async (tx) => {
        await tx.allocate('mapEpoch');
      });
      const guard = meta.guard;
      meta.setGuard(undefined);
      await assert.rejects(meta.write((tx) => tx.allocate('mapEpoch')), (error: unknown) => isCode('UNAVAILABLE')(error) && (error as { details?: { notLeader?: boolean } }).details?.notLeader === true);
      // Another conductor takes the key over (the old one's lease expired): the old guard no longer commits.
      await meta.client.delete().key(meta.leaderKey);
      await meta.client.put(meta.leaderKey).value('{"id":"other","url":"http://other"}');
      meta.setGuard(guard);
      let lost = false;
      meta.onLostLeadership = () => (lost = true);
      await assert.rejects(meta.write(async (tx) => {
        await tx.allocate('mapEpoch');
        await tx.putStore(storeRecord(1));
      }), (error: unknown) => isCode('UNAVAILABLE')(error) && /no longer the leader/.test((error as Error).message));
      assert.ok(lost, 'the election is told');
      assert.equal(meta.guard, undefined);
      await meta.read(async (tx) => {
        assert.equal(await tx.counter('mapEpoch'), 1);
        assert.equal(await tx.store(1), undefined);
      });
      // Unguarded writes (cluster record, first token at start) still go through.
      await meta.write((tx) => tx.putCluster({ clusterId: 'c', createdAt: 'now' }), { unguarded: true });
      assert.equal((await meta.read((tx) => tx.cluster()))?.clusterId, 'c');
    } finally {
      await meta.close();
    }
  });

  it('refuses a transaction over etcd\'s operation limit before sending it', async () => {
    const meta = await openLeading();
    try {
      await meta.write(async (tx) => {
        await tx.putPool(poolRecord(1));
      });
      await assert.rejects(meta.write(async (tx) => {
        for (let id = 1; id <= txnOpsMax; id++) await tx.putVolume(volumeRecord(id, `v${id}`));
      }), (error: unknown) => isCode('INTERNAL')(error) && /over etcd's limit/.test((error as Error).message));
      assert.deepEqual(await meta.read((tx) => tx.volumes()), []);
    } finally {
      await meta.close();
    }
  });

  it('keeps every PG of a large pool in a few keys and lists them in order', async () => {
    const meta = await openLeading();
    try {
      await meta.write(async (tx) => {
        await tx.putPool({ ...poolRecord(1), pgCount: 2048 });
        for (let index = 0; index < 2048; index++) {
          await tx.putPg({ poolId: 1, index, epoch: 1, replicas: [1, 2, 3].map((storeId) => ({ storeId, state: 'clean' as const, sinceEpoch: 1 })), lastClean: [] });
        }
      });
      const pgs = await meta.read((tx) => tx.pgs(1));
      assert.deepEqual(pgs.map((pg) => pg.index), Array.from({ length: 2048 }, (_, i) => i));
      const keys = await meta.client.getAll().prefix(`${meta.prefix}/pgs/`).keys();
      assert.equal(keys.length, 4, '2048 PGs in 4 shards of 512');
    } finally {
      await meta.close();
    }
  });

  it('tells other processes about counter changes through a watch', async () => {
    const meta = await openLeading();
    const other = await EtcdMetaStore.open(nodeEnv, { endpoints: etcd.endpoints, prefix: meta.prefix });
    try {
      const seen: number[] = [];
      const stop = other.watchCounter('mapEpoch', (value) => seen.push(value));
      await new Promise((resolve) => setTimeout(resolve, 200));
      await meta.write((tx) => tx.allocate('mapEpoch'));
      await meta.write((tx) => tx.allocate('mapEpoch'));
      const deadline = Date.now() + 5000;
      while (seen.length < 2 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
      assert.deepEqual(seen, [1, 2]);
      stop();
    } finally {
      await other.close();
      await meta.close();
    }
  });

  it('versions its key space: refuses a foreign prefix and a newer version, migrates an older one once', async () => {
    const foreign = freshPrefix();
    const client = (await openLeading()).client;
    await client.put(`${foreign}/photos/1`).value('cat');
    await assert.rejects(EtcdMetaStore.open(nodeEnv, { endpoints: etcd.endpoints, prefix: foreign }), (error: unknown) => isCode('WRONG_CLUSTER')(error) && /not Shale's/.test((error as Error).message));

    const newer = freshPrefix();
    await client.put(`${newer}/schema`).value('{"version":99}');
    await assert.rejects(EtcdMetaStore.open(nodeEnv, { endpoints: etcd.endpoints, prefix: newer }), (error: unknown) => isCode('WRONG_CLUSTER')(error) && /version 99/.test((error as Error).message));

    const older = freshPrefix();
    const v1 = await EtcdMetaStore.open(nodeEnv, { endpoints: etcd.endpoints, prefix: older });
    assert.equal(v1.schemaVersion, 1);
    await v1.write(async (tx) => {
      await tx.putStore(storeRecord(1));
    }, { unguarded: true });
    await v1.close();
    let applied = 0;
    const withStep2 = [...etcdMigrations, {
      version: 2, description: 'test: every store gets a weight', async up(tx: import('./etcd-meta-store.ts').RawTx) {
        applied++;
        for (const [key, value] of await tx.list('stores/')) tx.put(key, JSON.stringify({ ...JSON.parse(value), weight: 1 }));
      },
    }];
    const [a, b] = await Promise.all([0, 1].map(() => EtcdMetaStore.open(nodeEnv, { endpoints: etcd.endpoints, prefix: older, migrations: withStep2 })));
    assert.equal(a!.schemaVersion, 2);
    assert.equal(applied >= 1, true);
    const stored = JSON.parse((await a!.client.get(`${older}/stores/${'1'.padStart(16, '0')}`).string())!) as { weight?: number };
    assert.equal(stored.weight, 1);
    assert.equal(await a!.client.get(`${older}/schema`).string(), '{"version":2}');
    await a!.close();
    await b!.close();
    client.close();
  });
});

describe('EtcdElection', () => {
  const identity = (n: number) => ({ id: `c${n}`, url: `http://127.0.0.1:${40000 + n}` });

  it('elects one leader; the other knows where it is and takes over when it resigns', async () => {
    const prefix = freshPrefix();
    const metas = await Promise.all([0, 1].map(() => EtcdMetaStore.open(nodeEnv, { endpoints: etcd.endpoints, prefix })));
    const logs: string[] = [];
    const elections = metas.map((meta, n) => new EtcdElection(nodeEnv, meta, { identity: identity(n), leaseTtlSeconds: 2, pollMs: 50, log: (line) => logs.push(line) }));
    try {
      await elections[0]!.start();
      await elections[1]!.start();
      assert.equal(elections[0]!.isLeader, true);
      assert.equal(elections[1]!.isLeader, false);
      assert.equal(elections[1]!.leaderUrl, 'http://127.0.0.1:40000');
      await metas[0]!.write((tx) => tx.allocate('mapEpoch'));
      await assert.rejects(metas[1]!.write((tx) => tx.allocate('mapEpoch')), isCode('UNAVAILABLE'));

      const changes: boolean[] = [];
      elections[1]!.onChange((leading) => changes.push(leading));
      const started = Date.now();
      await elections[0]!.close();
      while (!elections[1]!.isLeader && Date.now() - started < 5000) await new Promise((resolve) => setTimeout(resolve, 10));
      assert.ok(elections[1]!.isLeader, 'the standby leads');
      assert.ok(Date.now() - started < 1000, `took over in ${Date.now() - started} ms after a clean resign`);
      assert.deepEqual(changes, [true]);
      assert.equal(await metas[1]!.write((tx) => tx.allocate('mapEpoch')), 2);
      await assert.rejects(metas[0]!.write((tx) => tx.allocate('mapEpoch')), isCode('UNAVAILABLE'));
    } finally {
      for (const election of elections) await election.close();
      for (const meta of metas) await meta.close();
    }
  });

  it('steps down when its leader key disappears, and campaigns again', async () => {
    const prefix = freshPrefix();
    const meta = await EtcdMetaStore.open(nodeEnv, { endpoints: etcd.endpoints, prefix });
    const election = new EtcdElection(nodeEnv, meta, { identity: identity(5), leaseTtlSeconds: 2, pollMs: 50, log: () => {} });
    try {
      await election.start();
      assert.ok(election.isLeader);
      const first = meta.guard!.createRevision;
      const changes: boolean[] = [];
      election.onChange((leading) => changes.push(leading));
      await meta.client.delete().key(meta.leaderKey);
      const deadline = Date.now() + 5000;
      while (changes.length < 2 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
      assert.deepEqual(changes, [false, true]);
      assert.notEqual(meta.guard!.createRevision, first, 'a new guard');
    } finally {
      await election.close();
      await meta.close();
    }
  });
});
