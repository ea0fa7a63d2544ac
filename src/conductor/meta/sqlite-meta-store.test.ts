import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DatabaseSync } from 'node:sqlite';
import { after, describe, it } from 'node:test';
import { ShaleError } from '../../lib/errors.ts';
import type { StoreRecord, VolumeRecord } from './meta-store.ts';
import { type Migration, migrate, migrations, SCHEMA_VERSION, schemaVersionOf, SqliteMetaStore } from './sqlite-meta-store.ts';

const directory = mkdtempSync(join(tmpdir(), 'shale-meta-'));
after(() => rmSync(directory, { recursive: true, force: true }));
let fileNumber = 0;
const freshPath = (): string => join(directory, `meta-${++fileNumber}.db`);

function store(id: number, diskUuid = `disk-${id}`): StoreRecord {
  return {
    id, diskUuid, address: `127.0.0.1:${9000 + id}`, domain: `host-${id}`, state: 'up', stateEpoch: 1,
    capacityBytes: 1000, usedBytes: 10, lastHeartbeatAt: null, disks: [{ uuid: diskUuid, path: '/d', capacityBytes: 1000, usedBytes: 10 }],
  };
}

function volume(id: number, name: string): VolumeRecord {
  return { id, name, sizeBytes: 4096, chunkSizeBytes: 4 << 20, poolId: 1, owner: null, ownerEpoch: 0, createdAt: '2024-01-01T00:00:00.000Z' };
}

async function withPool(meta: SqliteMetaStore): Promise<void> {
  await meta.write(async (tx) => {
    await tx.putPool({ id: await tx.allocate('poolId'), name: 'default', replicas: 3, minReplicas: 2, pgCount: 4, createdAt: 'now' });
  });
}

function isCode(code: string): (error: unknown) => boolean {
  return (error) => error instanceof ShaleError && error.code === code;
}

describe('SqliteMetaStore', () => {
  it('round-trips every record kind', async () => {
    const meta = SqliteMetaStore.open(freshPath());
    await withPool(meta);
    await meta.write(async (tx) => {
      await tx.putCluster({ clusterId: 'c-1', createdAt: 'then' });
      await tx.putStore(store(1));
      await tx.putPg({ poolId: 1, index: 3, epoch: 7, replicas: [{ storeId: 1, state: 'recovering', sinceEpoch: 6 }], lastClean: [2] });
      await tx.putVolume({ ...volume(1, 'a'), owner: 'gw', ownerEpoch: 3 });
    });
    await meta.read(async (tx) => {
      assert.deepEqual(await tx.cluster(), { clusterId: 'c-1', createdAt: 'then' });
      assert.deepEqual(await tx.store(1), store(1));
      assert.deepEqual(await tx.storeByDisk('disk-1'), store(1));
      assert.equal(await tx.storeByDisk('nope'), undefined);
      assert.deepEqual(await tx.pg(1, 3), { poolId: 1, index: 3, epoch: 7, replicas: [{ storeId: 1, state: 'recovering', sinceEpoch: 6 }], lastClean: [2] });
      assert.equal((await tx.poolByName('default'))?.replicas, 3);
      assert.deepEqual(await tx.volumeByName('a'), { ...volume(1, 'a'), owner: 'gw', ownerEpoch: 3 });
    });
    await meta.close();
  });

  it('rolls a transaction back when its function throws', async () => {
    const meta = SqliteMetaStore.open(freshPath());
    await meta.write(async (tx) => {
      await tx.putStore(store(await tx.allocate('storeId')));
    });
    await assert.rejects(
      meta.write(async (tx) => {
        await tx.allocate('storeId');
        await tx.putStore(store(2));
        await tx.allocate('mapEpoch');
        throw new ShaleError('INVALID_ARGUMENT', 'changed my mind');
      }),
      isCode('INVALID_ARGUMENT'),
    );
    await meta.read(async (tx) => {
      assert.equal((await tx.stores()).length, 1);
      assert.equal(await tx.counter('storeId'), 1);
      assert.equal(await tx.counter('mapEpoch'), 0);
    });
    // The next transaction works normally.
    assert.equal(await meta.write((tx) => tx.allocate('storeId')), 2);
    await meta.close();
  });

  it('never reuses a volume id or lets a deleted one come back, and frees the name', async () => {
    const path = freshPath();
    let meta = SqliteMetaStore.open(path);
    await withPool(meta);
    const first = await meta.write(async (tx) => {
      const id = await tx.allocate('volumeId');
      await tx.putVolume(volume(id, 'vol'));
      return id;
    });
    await meta.write((tx) => tx.deleteVolume(first, { id: first, name: 'vol', deletedAt: 'now', epoch: 5 }));
    await meta.close();
    meta = SqliteMetaStore.open(path);
    const second = await meta.write(async (tx) => {
      const id = await tx.allocate('volumeId');
      await tx.putVolume(volume(id, 'vol'));
      return id;
    });
    assert.ok(second > first);
    await meta.read(async (tx) => {
      assert.deepEqual((await tx.deletedVolumes()).map((d) => d.id), [first]);
      assert.equal((await tx.volumeByName('vol'))?.id, second);
    });
    await assert.rejects(meta.write((tx) => tx.putVolume(volume(first, 'zombie'))), /deleted volume id is never used again/);
    await meta.close();
  });

  it('refuses a second live volume with the same name', async () => {
    const meta = SqliteMetaStore.open(freshPath());
    await withPool(meta);
    await meta.write((tx) => tx.putVolume(volume(1, 'x')));
    await assert.rejects(meta.write((tx) => tx.putVolume(volume(2, 'x'))), isCode('ALREADY_EXISTS'));
    await meta.close();
  });

  it('runs transactions one at a time, in order', async () => {
    const meta = SqliteMetaStore.open(freshPath());
    const order: number[] = [];
    await Promise.all([1, 2, 3].map((n) => meta.write(async (tx) => {
      const value = await tx.allocate('mapEpoch');
      await Promise.resolve();
      order.push(value);
    })));
    assert.deepEqual(order, [1, 2, 3]);
    await meta.close();
  });

  it('refuses a second opener of the same file while the first holds it', async () => {
    const path = freshPath();
    const meta = SqliteMetaStore.open(path);
    assert.throws(() => SqliteMetaStore.open(path, { lockTimeoutMs: 50 }), isCode('UNAVAILABLE'));
    await meta.close();
    await SqliteMetaStore.open(path).close();
  });

  it('rejects use after close with SHUTTING_DOWN', async () => {
    const meta = SqliteMetaStore.open(freshPath());
    await meta.close();
    await assert.rejects(meta.read((tx) => tx.stores()), isCode('SHUTTING_DOWN'));
    await meta.close();
  });
});

describe('schema version and migration', () => {
  it('creates a fresh file at the newest version, in WAL mode', async () => {
    const path = freshPath();
    const meta = SqliteMetaStore.open(path);
    assert.equal(meta.schemaVersion, SCHEMA_VERSION);
    assert.equal(SCHEMA_VERSION, migrations.length);
    await meta.close();
    const db = new DatabaseSync(path);
    assert.equal(schemaVersionOf(db), SCHEMA_VERSION);
    assert.equal((db.prepare('PRAGMA journal_mode').get() as { journal_mode: string }).journal_mode, 'wal');
    db.close();
  });

  it('applies each missing step once, in order, and keeps data', () => {
    const path = freshPath();
    const db = new DatabaseSync(path);
    assert.equal(migrate(db), 1);
    db.prepare(`INSERT INTO counters (name, value) VALUES ('storeId', 4)`).run();
    const applied: number[] = [];
    const withStep2: Migration[] = [
      ...migrations,
      {
        version: 2, description: 'test: add a column', up(target) {
          applied.push(2);
          target.exec(`ALTER TABLE stores ADD COLUMN weight INTEGER NOT NULL DEFAULT 1`);
        },
      },
    ];
    assert.equal(migrate(db, withStep2), 2);
    assert.equal(migrate(db, withStep2), 2);
    assert.deepEqual(applied, [2]);
    assert.equal(schemaVersionOf(db), 2);
    assert.deepEqual({ ...db.prepare(`SELECT value FROM counters WHERE name = 'storeId'`).get() }, { value: 4 });
    db.close();
  });

  it('rolls back a failing step entirely', () => {
    const db = new DatabaseSync(freshPath());
    migrate(db);
    const broken: Migration[] = [...migrations, {
      version: 2, description: 'fails halfway', up(target) {
        target.exec(`CREATE TABLE half (x)`);
        throw new Error('boom');
      },
    }];
    assert.throws(() => migrate(db, broken), /boom/);
    assert.equal(schemaVersionOf(db), 1);
    assert.equal(db.prepare(`SELECT 1 FROM sqlite_master WHERE name = 'half'`).get(), undefined);
    db.close();
  });

  it('refuses a file newer than the code knows', () => {
    const path = freshPath();
    const db = new DatabaseSync(path);
    migrate(db);
    db.prepare(`UPDATE meta SET value = '99' WHERE key = 'schema_version'`).run();
    db.close();
    assert.throws(() => SqliteMetaStore.open(path), (error) => isCode('WRONG_CLUSTER')(error) && /schema version 99/.test((error as Error).message));
  });

  it('refuses a SQLite file that is not Shale\'s, and a file that is not SQLite', () => {
    const foreign = freshPath();
    const db = new DatabaseSync(foreign);
    db.exec('CREATE TABLE photos (id INTEGER)');
    db.close();
    assert.throws(() => SqliteMetaStore.open(foreign), isCode('WRONG_CLUSTER'));
    const garbage = freshPath();
    writeFileSync(garbage, Buffer.alloc(8192, 0x5a));
    assert.throws(() => SqliteMetaStore.open(garbage), isCode('WRONG_CLUSTER'));
  });
});
