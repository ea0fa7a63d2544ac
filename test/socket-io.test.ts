/**
 * Reads and writes without a Promise per layer to stores behind sockets (what `shale up --stores
 * 3` runs). Writes: VolumeClient.writeNow sends a WRITE frame to every replica
 * (StoreChannel.writeNow), and each store hands a plain WRITE it has checked to its engine's
 * writeNow. Every replica must hold what was acknowledged; a damaged block, a FUA write and an old
 * owner must be handled as before; a PG listing must still wait for the writes the store took
 * before it. Reads: VolumeClient.readThen sends one READ frame (StoreChannel.sendRead); it must
 * return what read() returns, decline what it can't take, and never return a block that fails its
 * checksum — another replica answers, and the bad copy is repaired.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import type { ClusterClient } from '../src/client/cluster-client.ts';
import type { VolumeClient } from '../src/client/volume-client.ts';
import { blockChecksums } from '../src/lib/crc32c.ts';
import { codeOf, type ShaleError } from '../src/lib/errors.ts';
import { placementGroupOf } from '../src/lib/placement-hash.ts';
import { encodeChecksums, Op } from '../src/proto/store-protocol.ts';
import { findBlock, flipBit, startLocalCluster, waitFor, type LocalCluster } from './harness.ts';
import { countEngineWrites, writeNow, writeRounds, writesThenListing } from './write-now.ts';

const BLOCK = 4096;
const MiB = 1024 * 1024;
const CHUNK = 4 * MiB;
const SIZE = 16 * MiB;

describe('reads and writes from a gateway to 3 stores behind sockets', () => {
  let cluster: LocalCluster;
  let gateway: ClusterClient;
  let volume: VolumeClient;
  const model = Buffer.alloc(SIZE);

  before(async () => {
    cluster = await startLocalCluster({ stores: 3 });
    const created = await cluster.call('POST', '/volumes', { name: 'wide', size: SIZE, replicas: 3 });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    gateway = await cluster.client('gw-sockets');
    volume = await gateway.openVolume('wide');
  });

  after(async () => {
    await cluster?.close();
  });

  /** What one store's engine holds of the volume, blocks never written as zeros. */
  async function replicaContent(index: number): Promise<Buffer> {
    const engine = cluster.stores[index]!.engine;
    const out = Buffer.alloc(SIZE);
    for (let block = 0; block < SIZE / BLOCK; block += 256) {
      const chunkIndex = Math.floor((block * BLOCK) / CHUNK);
      const read = await engine.read(volume.info.id, chunkIndex, block - chunkIndex * (CHUNK / BLOCK), 256);
      read.data.copy(out, block * BLOCK);
    }
    return out;
  }

  test('whole-block writes are taken, reach every store\'s engine without a Promise, and every replica holds them', async (t) => {
    const counts = cluster.stores.map((store) => countEngineWrites(store.engine));
    t.after(() => counts.forEach((count) => count.restore()));
    const taken = await writeRounds(volume, 8, model);
    for (const [index, count] of counts.entries()) {
      assert.equal(count.now, taken, `store ${index}: every write reached the engine through writeNow`);
      assert.equal(count.promised, 0, `store ${index}: none through the Promise path`);
    }
    for (let index = 0; index < 3; index++) assert.ok((await replicaContent(index)).equals(model), `replica ${index} holds every acknowledged write`);
    assert.ok((await volume.read(0, SIZE)).equals(model), 'the volume reads back as written');
  });

  test('a FUA write and a block damaged in transit take the Promise path: the first lands, the second is refused with CHECKSUM', async (t) => {
    const counts = cluster.stores.map((store) => countEngineWrites(store.engine));
    t.after(() => counts.forEach((count) => count.restore()));
    const fua = randomBytes(2 * BLOCK);
    await volume.write(20 * BLOCK, fua, { fua: true });
    fua.copy(model, 20 * BLOCK);
    for (const count of counts) assert.deepEqual([count.now, count.promised], [0, 1], 'the FUA write went through the engine\'s write()');

    // A frame whose second block does not match its crc32c, straight to one store.
    const map = gateway.map;
    const pool = map.pools.find((candidate) => candidate.id === volume.info.poolId)!;
    const pgId = placementGroupOf(volume.info.id, 0, pool.pgCount);
    const data = randomBytes(2 * BLOCK);
    const sums = encodeChecksums(blockChecksums(data));
    data[BLOCK + 7]! ^= 0x40;
    const storeId = cluster.stores[0]!.storeId;
    await assert.rejects(
      gateway.channel(storeId).request({
        op: Op.WRITE, volumeId: volume.info.id, chunkIndex: 0, poolId: pool.id, pgId, pgCount: pool.pgCount, pgEpoch: pool.pgs[pgId]!.epoch,
        ownerEpoch: volume.ownerEpoch, versionSeq: 1e9, offsetBlocks: 30, countBlocks: 2,
      }, [sums, data]),
      (error: unknown) => codeOf(error) === 'CHECKSUM',
    );
    assert.equal(counts[0]!.now, 0, 'the damaged write was not taken by writeNow');
    assert.ok((await replicaContent(0)).equals(model), 'nothing of it was written');
  });

  test('a PG listing answers only after the socket writes the store took before it', async (t) => {
    const counts = cluster.stores.map((store) => countEngineWrites(store.engine));
    t.after(() => counts.forEach((count) => count.restore()));
    // Each engine holds back its writes' answers for 150 ms, as a slow disk would.
    for (const count of counts) count.delayMs = 150;
    // The listing goes to store 1 after the writes, on the same connection: without the wait its
    // answer would overtake theirs, which the engine holds back.
    const chunkIndex = 2;
    const { listed, allEnded } = await writesThenListing(gateway, volume, cluster.stores[1]!.storeId, chunkIndex, model);
    assert.equal(counts[1]!.now, 16, 'the store took the 16 writes through writeNow');
    assert.equal(counts[1]!.answered, 16, 'its engine had answered every one of them before the listing was answered');
    assert.ok(listed.some((object) => object.volumeId === volume.info.id && object.chunkIndex === chunkIndex), 'the listing holds the written chunk');
    await allEnded;
  });

  /** Calls readThen and returns whether it took the read, and a promise of its bytes (or error). */
  function readThen(target: VolumeClient, offsetBytes: number, lengthBytes: number): { taken: boolean; settledInCall: boolean; ended: Promise<Buffer> } {
    let returned = false;
    let settledInCall = false;
    let settle!: (error: ShaleError | undefined, data: Buffer | undefined) => void;
    const ended = new Promise<Buffer>((resolve, reject) => {
      settle = (error, data) => (error === undefined ? resolve(data!) : reject(error));
    });
    const taken = target.readThen(offsetBytes, lengthBytes, (error, data) => {
      if (!returned) settledInCall = true;
      settle(error, data);
    });
    returned = true;
    return { taken, settledInCall, ended };
  }

  test('readThen returns what read() returns, for aligned and unaligned ranges within a chunk, and declines the rest', async () => {
    const started: { offset: number; length: number; ended: Promise<Buffer> }[] = [];
    for (let i = 0; i < 200; i++) {
      const length = 1 + Math.floor(Math.random() * 64 * 1024);
      const chunk = Math.floor(Math.random() * (SIZE / CHUNK));
      const offset = chunk * CHUNK + Math.floor(Math.random() * (CHUNK - length));
      const read = readThen(volume, offset, length);
      assert.ok(read.taken, `readThen took ${length} bytes at ${offset}`);
      assert.equal(read.settledInCall, false, 'done is never called before readThen returns');
      started.push({ offset, length, ended: read.ended });
    }
    for (const { offset, length, ended } of started) assert.ok((await ended).equals(model.subarray(offset, offset + length)), `${length} bytes at ${offset}`);
    const declined = (offset: number, length: number): boolean => volume.readThen(offset, length, () => assert.fail('a declined read is never settled'));
    assert.equal(declined(CHUNK - BLOCK, 2 * BLOCK), false, 'across a chunk boundary');
    assert.equal(declined(SIZE - BLOCK, 2 * BLOCK), false, 'beyond the end');
    assert.equal(declined(0, 0), false, 'nothing');
    assert.equal(declined(-BLOCK, BLOCK), false, 'a negative offset');
  });

  test('a block that rots on two of three replicas is never returned by readThen: the third answers and the bad copies are repaired', async () => {
    const offset = 3 * CHUNK + 64 * BLOCK;
    const data = randomBytes(4 * BLOCK);
    await volume.write(offset, data);
    await volume.flush();
    data.copy(model, offset);
    // The second block rots on two stores: whichever replica readThen asks first, the bytes come
    // back right, and the reads report and repair the rotten copies.
    const rotten = [0, 1];
    for (const index of rotten) {
      const path = `${cluster.dir}/disk-${index}.img`;
      flipBit(path, findBlock(path, data.subarray(BLOCK, 2 * BLOCK)) + 100);
    }
    for (let i = 0; i < 12; i++) {
      const read = readThen(volume, offset, data.length);
      assert.ok(read.taken);
      assert.ok((await read.ended).equals(data), `read ${i} returns the written bytes`);
    }
    await waitFor('both rotten copies repaired', async () => {
      for (const index of rotten) {
        // A rotten copy reads as CHECKSUM from the engine until it is repaired.
        const content = await replicaContent(index).catch(() => undefined);
        if (!content?.subarray(offset, offset + data.length).equals(data)) return false;
      }
      return true;
    }, 10_000);
  });

  test('an owner that was taken over gets FENCED from every store, and its write lands nowhere', async (t) => {
    const before = randomBytes(4 * BLOCK);
    const first = writeNow(volume, 40 * BLOCK, before);
    assert.ok(first.taken);
    assert.equal(await first.ended, undefined);
    before.copy(model, 40 * BLOCK);
    const successor = await cluster.client('gw-successor');
    const owner = await successor.openVolume('wide', { takeover: true });
    assert.ok(owner.ownerEpoch > volume.ownerEpoch);
    const stale = writeNow(volume, 40 * BLOCK, randomBytes(4 * BLOCK));
    assert.ok(stale.taken, 'the old owner still sees its replicas: the write is taken, and refused on the way');
    assert.equal(codeOf(await stale.ended), 'FENCED');
    for (let index = 0; index < 3; index++) assert.ok((await replicaContent(index)).equals(model), `replica ${index}: the fenced write did not land`);
    const newer = randomBytes(4 * BLOCK);
    const fresh = writeNow(owner, 40 * BLOCK, newer);
    assert.ok(fresh.taken);
    assert.equal(await fresh.ended, undefined);
    assert.ok((await owner.read(40 * BLOCK, 4 * BLOCK)).equals(newer));
    t.diagnostic('the new owner writes on the same path');
  });
});
