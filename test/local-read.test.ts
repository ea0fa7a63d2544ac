/**
 * The synchronous read path of a gateway whose store lives in the same process (DESIGN §9, what
 * `shale up --stores 1` runs): a real conductor, a store daemon with its log engine on a file, and a
 * client library sharing its LocalStores. readNow must give exactly what read gives, decline what
 * it can't serve, and never return a block whose checksum fails.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ClusterClient } from '../src/client/cluster-client.ts';
import type { VolumeClient } from '../src/client/volume-client.ts';
import type { Conductor } from '../src/conductor/conductor.ts';
import { nodeEnv } from '../src/env/node/node-env.ts';
import { giveBack, ioBuffers } from '../src/lib/buffer-pool.ts';
import { codeOf } from '../src/lib/errors.ts';
import { openLogEngine } from '../src/store/open-engine.ts';
import type { StoreDaemon } from '../src/store/store-daemon.ts';
import { temporaryDirectory, waitFor } from './harness.ts';
import { CHUNK, MiB, quiet, startLocal, stopLocal, type LocalCluster } from './local-cluster.ts';

describe('reads from a store in the same process', () => {
  const dir = temporaryDirectory('local-read');
  const diskPath = join(dir.path, 'disk.img');
  let conductor: Conductor;
  let api: string;
  let store: StoreDaemon;
  let gateway: ClusterClient;
  let volume: VolumeClient;
  const model = Buffer.alloc(16 * MiB);

  before(async () => {
    ({ conductor, api, store, gateway, volume } = await startLocal(dir.path));
  });

  after(async () => {
    await gateway?.close().catch(() => {});
    await store?.close().catch(() => {});
    await conductor?.close();
    dir.remove();
  });

  test('gives the bytes read gives, for aligned and unaligned ranges, written and never written', async () => {
    // Chunks 0 and 2 written (partly), chunk 1 and 3 never: absent blocks read as zeros.
    for (const [offset, length] of [[0, 3 * MiB], [2 * CHUNK + 12_345, 700_000], [CHUNK - 8192, 4096]] as const) {
      const data = randomBytes(length);
      data.copy(model, offset);
      await volume.write(offset, data);
    }
    await volume.writeZeroes(100 * 4096, 8 * 4096);
    model.fill(0, 100 * 4096, 108 * 4096);
    let served = 0;
    for (let i = 0; i < 300; i++) {
      const length = 1 + Math.floor(Math.random() * 64 * 1024);
      const offset = Math.floor(Math.random() * (model.length - length));
      const now = volume.readNow(offset, length);
      const expected = model.subarray(offset, offset + length);
      if (now !== undefined) {
        served++;
        assert.equal(now.length, length);
        assert.ok(now.equals(expected), `readNow at ${offset}+${length} differs from what was written`);
      } else {
        // Declined only when the range crosses a chunk boundary or its blocks span more than the
        // 64 KiB a synchronous disk read may take.
        const span = Math.ceil((offset + length) / 4096) * 4096 - Math.floor(offset / 4096) * 4096;
        const crosses = Math.floor(offset / CHUNK) !== Math.floor((offset + length - 1) / CHUNK);
        assert.ok(crosses || span > 64 * 1024, `readNow declined ${offset}+${length} within one chunk`);
      }
      assert.ok((await volume.read(offset, length)).equals(expected));
    }
    assert.ok(served > 250, `readNow served ${served} of 300 reads`);
  });

  test('declines what it cannot serve, without throwing', () => {
    assert.equal(volume.readNow(CHUNK - 4096, 8192), undefined, 'across chunks');
    assert.equal(volume.readNow(model.length - 4096, 8192), undefined, 'beyond the end');
    assert.equal(volume.readNow(-1, 10), undefined, 'negative offset');
    assert.equal(volume.readNow(0, 0), undefined, 'empty');
  });

  test('a clone reads the blocks it never wrote through to its parent, from either local path', async () => {
    const post = async (path: string, body: unknown): Promise<void> => {
      const response = await fetch(`${api}/api/v1${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
      assert.equal(response.status, 201, await response.text());
    };
    await post('/volumes/fast/snapshots', { name: 'base' });
    await post('/volumes/fast/snapshots/base/clone', { name: 'fast-clone' });
    const clone = await gateway.openVolume('fast-clone');
    const expected = Buffer.from(model);
    const own = randomBytes(3 * 4096);
    own.copy(expected, 5 * 4096);
    await clone.write(5 * 4096, own);
    for (const [offset, length] of [[0, 4096], [4 * 4096, 4 * 4096], [5 * 4096, 4096], [0, 256 * 1024], [2 * CHUNK + 12_345, 700_000], [CHUNK + 4096, 4096]] as const) {
      const want = expected.subarray(offset, offset + length);
      const now = clone.readNow(offset, length);
      if (now !== undefined) assert.ok(now.equals(want), `clone readNow at ${offset}+${length}`);
      assert.ok((await clone.read(offset, length)).equals(want), `clone read at ${offset}+${length}`);
    }
    // The parent is unchanged by the clone's write.
    assert.ok((await volume.read(5 * 4096, own.length)).equals(model.subarray(5 * 4096, 8 * 4096)));
  });

  test('a store answers socket READs it can read from the page cache synchronously, as its asynchronous read would', async (t) => {
    // A second gateway without the in-process channel: its reads reach the store over a socket.
    const remote = new ClusterClient(nodeEnv, { conductorUrls: api, ownerId: 'gw-remote', requestTimeoutMs: 5000, ioTimeoutMs: 1500, log: quiet });
    await remote.start();
    t.after(() => remote.close());
    const engine = store.engine;
    const readNow = engine.readNow!.bind(engine);
    let servedNow = 0;
    engine.readNow = (volumeId, chunkIndex, offsetBlocks, countBlocks, versions) => {
      const result = readNow(volumeId, chunkIndex, offsetBlocks, countBlocks, versions);
      if (result !== undefined && versions !== undefined) servedNow++;
      return result;
    };
    t.after(() => {
      engine.readNow = readNow;
    });
    const response = await fetch(`${api}/api/v1/volumes`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'remote', size: 8 * MiB, replicas: 1 }) });
    assert.equal(response.status, 201, await response.text());
    const remoteVolume = await remote.openVolume('remote');
    // Data, zeroed blocks, blocks never written, and versions from before and after a snapshot.
    const expected = Buffer.alloc(8 * MiB);
    const first = randomBytes(MiB);
    first.copy(expected, 0);
    await remoteVolume.write(0, first);
    await remoteVolume.writeZeroes(64 * 4096, 16 * 4096);
    expected.fill(0, 64 * 4096, 80 * 4096);
    const snapshot = await fetch(`${api}/api/v1/volumes/remote/snapshots`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'then' }) });
    assert.equal(snapshot.status, 201, await snapshot.text());
    const later = randomBytes(40 * 4096);
    later.copy(expected, 20 * 4096);
    await remoteVolume.write(20 * 4096, later);
    const far = randomBytes(3 * 4096);
    far.copy(expected, CHUNK + 5 * 4096);
    await remoteVolume.write(CHUNK + 5 * 4096, far);
    const pool = ioBuffers.counters;
    for (let i = 0; i < 200; i++) {
      const length = 1 + Math.floor(Math.random() * 48 * 1024);
      const offset = Math.floor(Math.random() * (2 * MiB - length)) + (i % 2) * (CHUNK - MiB);
      assert.ok((await remoteVolume.read(offset, length)).equals(expected.subarray(offset, offset + length)), `remote read at ${offset}+${length}`);
    }
    assert.ok(servedNow > 150, `the store answered ${servedNow} of 200 socket reads synchronously`);
    // The store gives each read buffer back once its reply is written: one read at a time needs
    // a buffer or two per size class, not one per read.
    const allocated = ioBuffers.counters.allocated - pool.allocated;
    assert.ok(allocated < 20, `${allocated} read buffers allocated for 200 reads`);

    // Block for block, the synchronous read describes what the asynchronous one does (ranges of
    // up to 64 KiB: larger ones are read through the thread pool).
    const volumeId = remoteVolume.info.id;
    const stamps = new Set<number>();
    const ranges: [number, number, number][] = [[1, 0, 12], [1, 300, 4], [0, 60, 16], [0, 75, 10]];
    for (let offsetBlocks = 0; offsetBlocks < 256; offsetBlocks += 16) ranges.push([0, offsetBlocks, 16]);
    for (const [chunkIndex, offsetBlocks, countBlocks] of ranges) {
      const versions = { states: new Uint8Array(countBlocks), checksums: new Uint32Array(countBlocks), epochs: new Uint32Array(countBlocks), seqs: new Float64Array(countBlocks), stamps: new Float64Array(countBlocks) };
      const now = readNow(volumeId, chunkIndex, offsetBlocks, countBlocks, versions);
      assert.ok(now !== undefined);
      const read = await engine.read(volumeId, chunkIndex, offsetBlocks, countBlocks);
      const described = engine.blockVersions(volumeId, chunkIndex, offsetBlocks, countBlocks);
      const where = `chunk ${chunkIndex} blocks ${offsetBlocks}+${countBlocks}`;
      assert.ok(now.data.equals(read.data), `${where}: data`);
      assert.deepEqual(versions.states, read.states, `${where}: states`);
      assert.deepEqual(Array.from(versions.checksums), Array.from(read.checksums), `${where}: checksums`);
      assert.deepEqual(Array.from(versions.epochs), Array.from(read.epochs), `${where}: epochs`);
      assert.deepEqual(Array.from(versions.seqs), Array.from(read.seqs), `${where}: seqs`);
      assert.deepEqual(Array.from(versions.stamps), Array.from(described.stamps), `${where}: stamps`);
      for (const stamp of versions.stamps) stamps.add(stamp);
    }
    assert.ok(stamps.size >= 2, 'versions from before and after the snapshot carry different stamps');
  });

  test('a block that fails its checksum is never returned: readNow declines and read reports CHECKSUM', async () => {
    const offset = 3 * CHUNK;
    const data = randomBytes(64 * 1024);
    await volume.write(offset, data);
    await volume.flush();
    assert.ok(volume.readNow(offset, data.length)?.equals(data));
    // Find the block's bytes in the disk file and flip one bit.
    const fd = openSync(diskPath, 'r+');
    try {
      const needle = data.subarray(8192, 8192 + 64);
      const window = Buffer.alloc(16 * MiB);
      let found = -1;
      for (let at = 0; found < 0; at += window.length - needle.length) {
        const got = readSync(fd, window, 0, window.length, at);
        if (got <= needle.length) break;
        const hit = window.subarray(0, got).indexOf(needle);
        if (hit >= 0) found = at + hit;
      }
      assert.ok(found >= 0, 'the written block is in the disk file');
      const byte = Buffer.alloc(1);
      readSync(fd, byte, 0, 1, found + 10);
      byte[0] ^= 0x10;
      writeSync(fd, byte, 0, 1, found + 10);
    } finally {
      closeSync(fd);
    }
    assert.equal(volume.readNow(offset, data.length), undefined, 'a corrupt block makes readNow decline');
    assert.ok(volume.readNow(offset + 4 * 4096, 4096)?.equals(data.subarray(4 * 4096, 5 * 4096)), 'other blocks still served');
    await assert.rejects(volume.read(offset, data.length), (error: unknown) => codeOf(error) === 'NO_QUORUM' || codeOf(error) === 'CHECKSUM');
  });

  test('the store reports its disk\'s used and live bytes to the conductor (disk list)', async () => {
    // The tests above wrote about 3.7 MiB of distinct blocks (32 KiB of them zeroed again).
    await waitFor('a heartbeat with live bytes', async () => {
      const { disks } = (await (await fetch(`${api}/api/v1/disks`)).json()) as { disks: { usedBytes: number; liveBytes?: number }[] };
      const disk = disks[0]!;
      return disk.liveBytes !== undefined && disk.liveBytes >= 3.5 * MiB && disk.liveBytes <= disk.usedBytes;
    });
  });
});

describe('reads from a store in the same process, with its read cache', () => {
  const dir = temporaryDirectory('local-read-cache');
  const logs: string[] = [];
  let local: LocalCluster;

  before(async () => {
    local = await startLocal(dir.path, {
      openEngine: (engineEnv, options) => openLogEngine(engineEnv, { ...options, cacheBytes: 4 * MiB }),
      cacheReportIntervalMs: 100,
      log: (message) => logs.push(message),
    });
  });

  after(async () => {
    await stopLocal(local);
    dir.remove();
  });

  test('a block read again is lent from the cache, equal to what was written, and comes back; the store logs what the cache did', async () => {
    const { volume, store } = local;
    const data = randomBytes(2 * MiB);
    await volume.write(0, data);
    await volume.flush();
    // Twice over: the first pass fills the cache (2 MiB of its 4), the second finds every block.
    for (let pass = 0; pass < 2; pass++) {
      const lent: Buffer[] = [];
      for (let block = 0; block < 512; block++) {
        const now = volume.readNow(block * 4096, 4096);
        assert.ok(now?.equals(data.subarray(block * 4096, (block + 1) * 4096)), `pass ${pass} block ${block}`);
        lent.push(now!);
      }
      if (pass === 1) assert.equal(store.engine.stats().cache!.pinned, 512, 'the second pass was lent from the cache');
      for (const buffer of lent) giveBack(buffer);
    }
    const cache = store.engine.stats().cache!;
    assert.equal(cache.pinned, 0);
    assert.ok(cache.hits >= 512, JSON.stringify(cache));
    // Overwritten blocks are forgotten, and read back new.
    const newer = randomBytes(64 * 4096);
    await volume.write(0, newer);
    for (let block = 0; block < 64; block++) {
      const now = volume.readNow(block * 4096, 4096);
      assert.ok(now?.equals(newer.subarray(block * 4096, (block + 1) * 4096)), `overwritten block ${block}`);
      giveBack(now!);
    }
    assert.ok(logs.some((line) => /read cache: up to 4\.0 MiB/.test(line)), logs.join('\n'));
    await waitFor('a report of the cache', async () => logs.some((line) => /read cache: .* held; \d+ of \d+ block lookups hit/.test(line)));
  });
});
