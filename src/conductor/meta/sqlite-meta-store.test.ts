import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DatabaseSync } from 'node:sqlite';
import { after, describe, it } from 'node:test';
import { isCode, metaStoreSuite } from './meta-store.suite.ts';
import { type Migration, migrate, migrations, SCHEMA_VERSION, schemaVersionOf, SqliteMetaStore } from './sqlite-meta-store.ts';

const directory = mkdtempSync(join(tmpdir(), 'shale-meta-'));
after(() => rmSync(directory, { recursive: true, force: true }));
let fileNumber = 0;
const freshPath = (): string => join(directory, `meta-${++fileNumber}.db`);

metaStoreSuite('sqlite', {
  open: async () => SqliteMetaStore.open(freshPath()),
  reopen: async (closed) => SqliteMetaStore.open((closed as SqliteMetaStore).description.slice('sqlite:'.length)),
});

describe('SqliteMetaStore', () => {
  it('refuses a second opener of the same file while the first holds it', async () => {
    const path = freshPath();
    const meta = SqliteMetaStore.open(path);
    assert.throws(() => SqliteMetaStore.open(path, { lockTimeoutMs: 50 }), isCode('UNAVAILABLE'));
    await meta.close();
    await SqliteMetaStore.open(path).close();
  });

  it('runs with synchronous=FULL and WAL', async () => {
    const meta = SqliteMetaStore.open(freshPath());
    const sync = meta.statement('PRAGMA synchronous').get() as { synchronous: number };
    assert.equal(sync.synchronous, 2, 'FULL');
    assert.equal((meta.statement('PRAGMA journal_mode').get() as { journal_mode: string }).journal_mode, 'wal');
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

  it('migrates a version 1 file to the latest: pools keep their placement at the host level, tokens appear, volumes have no snapshots', async () => {
    const path = freshPath();
    const db = new DatabaseSync(path);
    assert.equal(migrate(db, migrations.slice(0, 1)), 1);
    db.exec(`INSERT INTO pools (id, name, replicas, min_replicas, pg_count, created_at) VALUES (1, 'default', 3, 2, 8, 'then')`);
    db.exec(`INSERT INTO counters (name, value) VALUES ('poolId', 1)`);
    db.exec(`INSERT INTO volumes (id, name, size_bytes, chunk_size_bytes, pool_id, owner, owner_epoch, created_at) VALUES (1, 'v', 4096, 65536, 1, NULL, 0, 'then')`);
    db.close();
    const meta = SqliteMetaStore.open(path);
    assert.equal(meta.schemaVersion, SCHEMA_VERSION);
    await meta.read(async (tx) => {
      assert.deepEqual(await tx.pool(1), { id: 1, name: 'default', replicas: 3, minReplicas: 2, pgCount: 8, domainLevel: 'host', createdAt: 'then' });
      assert.equal(await tx.token('admin'), undefined);
      assert.equal(await tx.counter('poolId'), 1);
      const volume = await tx.volume(1);
      assert.equal(volume?.snapSeq, 0);
      assert.equal(volume?.parentVolumeId, null);
      assert.deepEqual(await tx.snapshots(1), []);
    });
    await meta.close();
  });

  it('applies each missing step once, in order, and keeps data', () => {
    const path = freshPath();
    const db = new DatabaseSync(path);
    assert.equal(migrate(db), SCHEMA_VERSION);
    db.prepare(`INSERT INTO counters (name, value) VALUES ('storeId', 4)`).run();
    const applied: number[] = [];
    const next = SCHEMA_VERSION + 1;
    const withNext: Migration[] = [
      ...migrations,
      {
        version: next, description: 'test: add a column', up(target) {
          applied.push(next);
          target.exec(`ALTER TABLE stores ADD COLUMN weight INTEGER NOT NULL DEFAULT 1`);
        },
      },
    ];
    assert.equal(migrate(db, withNext), next);
    assert.equal(migrate(db, withNext), next);
    assert.deepEqual(applied, [next]);
    assert.equal(schemaVersionOf(db), next);
    assert.deepEqual({ ...db.prepare(`SELECT value FROM counters WHERE name = 'storeId'`).get() }, { value: 4 });
    db.close();
  });

  it('rolls back a failing step entirely', () => {
    const db = new DatabaseSync(freshPath());
    migrate(db);
    const broken: Migration[] = [...migrations, {
      version: SCHEMA_VERSION + 1, description: 'fails halfway', up(target) {
        target.exec(`CREATE TABLE half (x)`);
        throw new Error('boom');
      },
    }];
    assert.throws(() => migrate(db, broken), /boom/);
    assert.equal(schemaVersionOf(db), SCHEMA_VERSION);
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
