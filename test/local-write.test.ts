/**
 * The write path of a gateway whose store lives in the same process (DESIGN §9, what `shale up
 * --stores 1` runs): VolumeClient.writeNow hands a write to the store engine without a Promise per
 * layer. It must take what it can, decline the rest without side effects, keep the owner fence and
 * the PG listings' view of writes in flight, and report a store that has gone away as write() does.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { after, before, describe, test } from 'node:test';
import { ClusterClient } from '../src/client/cluster-client.ts';
import { nodeEnv } from '../src/env/node/node-env.ts';
import { ioBuffers } from '../src/lib/buffer-pool.ts';
import { codeOf } from '../src/lib/errors.ts';
import { startNbdServer } from '../src/nbd/server.ts';
import { allWithin, NbdSimpleClient } from '../src/nbd/simple-client.ts';
import { VolumeExports } from '../src/nbd/volume-exports.ts';
import { NbdCommand, NbdCommandFlag } from '../src/proto/nbd.ts';
import { temporaryDirectory } from './harness.ts';
import { CHUNK, MiB, quiet, startLocal, stopLocal, type LocalCluster } from './local-cluster.ts';
import { countEngineWrites, writeNow, writeRounds, writesThenListing } from './write-now.ts';

const BLOCK = 4096;

describe('writes from a gateway to a store in the same process', () => {
  const dir = temporaryDirectory('local-write');
  let local: LocalCluster;
  const model = Buffer.alloc(16 * MiB);

  before(async () => {
    local = await startLocal(dir.path);
  });

  after(async () => {
    await stopLocal(local);
    dir.remove();
  });

  test('whole-block writes within a chunk are taken without a Promise and read back as written', async (t) => {
    const { volume, store } = local;
    const counts = countEngineWrites(store.engine);
    t.after(() => counts.restore());
    const taken = await writeRounds(volume, 12, model);
    assert.equal(counts.now, taken, 'every write reached the engine through writeNow');
    assert.equal(counts.promised, 0, 'none through the Promise path');
    assert.ok((await volume.read(0, model.length)).equals(model), 'the volume reads back as written');
    await volume.flush();
  });

  test('over NBD, write payloads land in pool buffers that come back once the store has written them', async (t) => {
    // 1 MiB payloads arrive in many socket reads, straight into pool buffers; 4 KiB ones are copied
    // out of the reused staging buffer. Each payload is different, so a buffer handed out again
    // before its write was done would show in what reads back. FUA writes take the Promise path,
    // whose buffers are left to the garbage collector.
    const server = await startNbdServer(nodeEnv, { listen: '127.0.0.1:0', provider: new VolumeExports(local.gateway) });
    t.after(() => server.close());
    const client = await NbdSimpleClient.connect(nodeEnv, server.address);
    await client.go('fast');
    const before = ioBuffers.counters;
    let writes = 0;
    for (let round = 0; round < 6; round++) {
      const sent: Promise<{ error: number }>[] = [];
      for (let i = 0; i < 4; i++) {
        // Large writes in the first 8 MiB, small ones in the rest: none overlaps another in flight
        // (an overlapping one takes the Promise path).
        const offset = ((round * 4 + i) % 8) * MiB;
        const data = randomBytes(MiB);
        data.copy(model, offset);
        sent.push(client.write(offset, data, round === 5 && i === 0 ? NbdCommandFlag.FUA : 0));
        const small = randomBytes(BLOCK);
        const smallOffset = 8 * MiB + (round * 4 + i) * 37 * BLOCK;
        small.copy(model, smallOffset);
        sent.push(client.write(smallOffset, small));
      }
      for (const reply of await Promise.all(sent)) assert.equal(reply.error, 0);
      writes += sent.length;
    }
    const after = ioBuffers.counters;
    const made = after.allocated - before.allocated;
    const reused = after.reused - before.reused;
    assert.ok(made + reused >= writes, `every payload was in a pool buffer (${made} made, ${reused} reused, ${writes} writes)`);
    assert.ok(made <= 20, `buffers came back and were handed out again: ${made} made for ${writes} writes`);
    for (let offset = 0; offset < model.length; offset += 4 * MiB) {
      const reply = await client.read(offset, 4 * MiB);
      assert.equal(reply.error, 0);
      assert.ok(reply.data!.equals(model.subarray(offset, offset + 4 * MiB)), `the volume reads back as written at ${offset}`);
    }
    await client.disconnect();
  });

  test('over NBD, writes sent as one stream cut at random points into a connection that fills up read back as written', async () => {
    // Whole-block writes take writeNow and pool buffers that come back once the store has written
    // them; unaligned ones take the Promise path. The stream is cut anywhere and the connection
    // allows 1 to 4 operations, so payloads are received in pieces while the session stops and
    // starts reading. A buffer reused too early, or bytes framed in the wrong place, show in what
    // reads back.
    await fc.assert(fc.asyncProperty(
      fc.array(fc.record({ blocks: fc.integer({ min: 1, max: 40 }), unaligned: fc.boolean() }), { minLength: 1, maxLength: 12 }),
      fc.array(fc.nat(), { maxLength: 30 }),
      fc.integer({ min: 1, max: 4 }),
      fc.nat(8 * MiB),
      async (writes, cuts, inFlightRequestsMax, base) => {
        const server = await startNbdServer(nodeEnv, { listen: '127.0.0.1:0', provider: new VolumeExports(local.gateway), inFlightRequestsMax });
        const client = await NbdSimpleClient.connect(nodeEnv, server.address);
        try {
          await client.go('fast');
          let offset = base - (base % BLOCK);
          const sent = writes.map((write) => {
            const at = write.unaligned ? offset + 512 : offset;
            const data = randomBytes(write.blocks * BLOCK - (write.unaligned ? 1000 : 0));
            offset += (write.blocks + 1) * BLOCK;
            data.copy(model, at);
            return { at, data, ...client.prepare(NbdCommand.WRITE, { offsetBytes: at, payload: data }) };
          });
          await client.sendInPieces(Buffer.concat(sent.map((write) => write.bytes)), cuts, () => new Promise((resolve) => setImmediate(resolve)));
          // A write whose bytes went astray never completes.
          for (const reply of await allWithin(nodeEnv.clock, sent.map((write) => write.reply), 5000, 'the writes\' replies')) assert.equal(reply.error, 0);
          for (const write of sent) {
            const reply = await client.read(write.at, write.data.length);
            assert.ok(reply.data!.equals(write.data), `the write at ${write.at} reads back as written`);
          }
        } finally {
          client.destroy();
          await server.close();
        }
      }), { numRuns: 15, endOnFailure: true }); // a failure may be a 5 s stall: report the first, do not shrink
    assert.ok((await local.volume.read(0, model.length)).equals(model), 'the volume reads back as the model');
  });

  test('declines what write() must do, and never calls done for it', async () => {
    const { volume } = local;
    const calls: unknown[] = [];
    const done = (error: unknown): void => {
      calls.push(error);
    };
    const data = randomBytes(2 * BLOCK);
    assert.equal(volume.writeNow(0, data, true, done), false, 'FUA');
    assert.equal(volume.writeNow(512, data, false, done), false, 'an unaligned offset');
    assert.equal(volume.writeNow(0, data.subarray(0, 5000), false, done), false, 'a partial block');
    assert.equal(volume.writeNow(0, Buffer.alloc(0), false, done), false, 'nothing');
    assert.equal(volume.writeNow(CHUNK - BLOCK, data, false, done), false, 'across a chunk boundary');
    assert.equal(volume.writeNow(model.length - BLOCK, data, false, done), false, 'beyond the end');
    assert.equal(volume.writeNow(-BLOCK, data, false, done), false, 'a negative offset');
    // A write overlapping one in flight waits for it in write(); writeNow leaves it to write().
    const first = writeNow(volume, 10 * BLOCK, data);
    assert.ok(first.taken);
    assert.equal(volume.writeNow(11 * BLOCK, data, false, done), false, 'overlapping a write in flight');
    const beside = writeNow(volume, 12 * BLOCK, data);
    assert.ok(beside.taken, 'a write beside it is taken');
    assert.equal(await first.ended, undefined);
    assert.equal(await beside.ended, undefined);
    data.copy(model, 10 * BLOCK);
    data.copy(model, 12 * BLOCK);
    const again = writeNow(volume, 11 * BLOCK, data);
    assert.ok(again.taken, 'taken once the overlapping write has ended');
    assert.equal(await again.ended, undefined);
    data.copy(model, 11 * BLOCK);
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.deepEqual(calls, [], 'no declined write was settled');
    assert.ok((await volume.read(0, 64 * BLOCK)).equals(model.subarray(0, 64 * BLOCK)));
  });

  test('a PG listing answers only after the in-process writes the store took before it', async (t) => {
    const { volume, store, gateway } = local;
    const counts = countEngineWrites(store.engine);
    t.after(() => counts.restore());
    // The engine holds back each write's answer for 150 ms, as a slow disk would.
    counts.delayMs = 150;
    const chunkIndex = 2;
    const { endedAtListing, listed, allEnded } = await writesThenListing(gateway, volume, store.storeId, chunkIndex, model);
    assert.deepEqual(endedAtListing, new Array(16).fill(true), 'every write taken before the listing was answered first');
    assert.ok(listed.some((object) => object.volumeId === volume.info.id && object.chunkIndex === chunkIndex), 'the listing holds the written chunk');
    await allEnded;
  });

  test('an owner that was taken over gets FENCED from writeNow, and its write does not land', async (t) => {
    const { volume, api, localStores } = local;
    const before = randomBytes(4 * BLOCK);
    const started = writeNow(volume, 40 * BLOCK, before);
    assert.ok(started.taken);
    assert.equal(await started.ended, undefined);
    before.copy(model, 40 * BLOCK);
    const successor = new ClusterClient(nodeEnv, { conductorUrls: api, ownerId: 'gw-successor', requestTimeoutMs: 5000, ioTimeoutMs: 1500, log: quiet, localStores });
    await successor.start();
    t.after(() => successor.close());
    const owner = await successor.openVolume('fast', { takeover: true });
    assert.ok(owner.ownerEpoch > volume.ownerEpoch);
    // Its replica is still local, so the write is taken; the store refuses it on the way.
    const stale = writeNow(volume, 40 * BLOCK, randomBytes(4 * BLOCK));
    assert.ok(stale.taken);
    assert.equal(codeOf(await stale.ended), 'FENCED');
    assert.ok((await owner.read(40 * BLOCK, 4 * BLOCK)).equals(before), 'the fenced owner\'s write did not land');
    // The new owner writes on the fast path.
    const newer = randomBytes(4 * BLOCK);
    const fresh = writeNow(owner, 40 * BLOCK, newer);
    assert.ok(fresh.taken);
    assert.equal(await fresh.ended, undefined);
    assert.ok((await owner.read(40 * BLOCK, 4 * BLOCK)).equals(newer));
  });

  test('a store that stops: writeNow ends with NO_QUORUM once the I/O timeout has passed, as write() does', async () => {
    const { gateway, store } = local;
    // This gateway's client was fenced by the test above: open the volume again, taking it back.
    gateway.forget('fast');
    const volume = await gateway.openVolume('fast', { takeover: true });
    await store.close();
    const startedAt = Date.now();
    const started = writeNow(volume, 0, randomBytes(BLOCK));
    assert.ok(started.taken, 'the store\'s channel still looks local: the write is taken, and fails on the way');
    assert.equal(codeOf(await started.ended), 'NO_QUORUM');
    const waitedMs = Date.now() - startedAt;
    assert.ok(waitedMs >= 1000 && waitedMs < 10_000, `ended after ${waitedMs} ms (I/O timeout 1500 ms)`);
  });
});
