import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { nodeEnv } from '../env/node/node-env.ts';
import { blockChecksums } from '../lib/crc32c.ts';
import { codeOf, ErrorCodes } from '../lib/errors.ts';
import { StoreChannel, type LocalReadFields, type LocalWriteFields } from './store-channel.ts';
import { emptyHeader, encodeHeader, FrameParser, Op, REPLY_BIT } from './store-protocol.ts';

test('a request the store never answers fails with MAYBE_COMMITTED soon after its timeout; answered ones resolve', async (t) => {
  // A store that answers PINGs, except those marked with a block count of 1.
  const server = await nodeEnv.net.listen('127.0.0.1:0', (connection) => {
    const parser = new FrameParser();
    connection.onData((chunk) => {
      for (const frame of parser.push(chunk)) {
        if (frame.header.countBlocks === 1) continue;
        connection.write(encodeHeader({ ...emptyHeader(), op: frame.header.op | REPLY_BIT, requestId: frame.header.requestId }));
      }
    });
  });
  t.after(() => server.close());
  const channel = new StoreChannel(nodeEnv, server.address, { timeoutMs: 400 });
  t.after(() => channel.close());
  const startedMs = performance.now();
  const answered = channel.request({ op: Op.PING });
  const silent = channel.request({ op: Op.PING, countBlocks: 1 });
  const quick = channel.request({ op: Op.PING, countBlocks: 1 }, [], 100);
  const untimed = channel.request({ op: Op.PING, countBlocks: 1 }, [], 0);
  assert.equal((await answered).header.op, Op.PING | REPLY_BIT);
  const failedAfter = async (request: Promise<unknown>): Promise<number> => {
    await assert.rejects(request, (error: unknown) => codeOf(error) === 'MAYBE_COMMITTED');
    return performance.now() - startedMs;
  };
  const [silentMs, quickMs] = await Promise.all([failedAfter(silent), failedAfter(quick)]);
  assert.ok(silentMs >= 400 && silentMs < 400 + 50 + 200, `the 400 ms request failed after ${silentMs} ms`);
  assert.ok(quickMs >= 100 && quickMs < 100 + 13 + 200, `the 100 ms request failed after ${quickMs} ms`);
  assert.equal(channel.inFlight, 1, 'a request without a timeout waits on');
  channel.close();
  await assert.rejects(untimed, (error: unknown) => codeOf(error) === 'SHUTTING_DOWN');
});

test('writeNow sends a WRITE frame whose reply settles its callback: answered, refused, unanswered, not yet connected, closed', async (t) => {
  // A store that checks each WRITE frame's parts and answers by the volume id: 1 acknowledges, 2
  // refuses with FENCED, 3 never answers.
  const seen: { header: import('./store-protocol.ts').FrameHeader; sums: Buffer; data: Buffer }[] = [];
  const server = await nodeEnv.net.listen('127.0.0.1:0', (connection) => {
    const parser = new FrameParser();
    connection.onData((chunk) => {
      for (const frame of parser.push(chunk)) {
        const h = frame.header;
        seen.push({ header: h, sums: frame.payload.subarray(0, h.countBlocks * 4), data: frame.payload.subarray(h.countBlocks * 4) });
        if (h.volumeId === 3) continue;
        const status = h.volumeId === 2 ? ErrorCodes.FENCED.wire : 0;
        connection.write(encodeHeader({ ...emptyHeader(), op: h.op | REPLY_BIT, requestId: h.requestId, status, countBlocks: h.countBlocks }));
      }
    });
  });
  t.after(() => server.close());
  const channel = new StoreChannel(nodeEnv, server.address, { timeoutMs: 300 });
  t.after(() => channel.close());
  const fields = (volumeId: number): LocalWriteFields => ({
    volumeId, chunkIndex: 7, poolId: 1, pgId: 5, pgCount: 32, pgEpoch: 12, ownerEpoch: 4, offsetBlocks: 9, countBlocks: 2, versionSeq: 77, snapSeq: 3, watermark: 70,
  });
  const data = randomBytes(2 * 4096);
  const checksums = blockChecksums(data);
  const write = (volumeId: number): { ended: Promise<string | undefined>; settledInCall: boolean } => {
    let settle!: (code: string | undefined) => void;
    const ended = new Promise<string | undefined>((resolve) => (settle = resolve));
    let returned = false;
    let settledInCall = false;
    channel.writeNow(fields(volumeId), checksums, data, (error) => {
      if (!returned) settledInCall = true;
      settle(error === undefined ? undefined : codeOf(error));
    });
    returned = true;
    return { ended, settledInCall };
  };

  // The channel has not connected yet: the first write connects (through request) and is answered.
  const first = write(1);
  assert.equal(first.settledInCall, false);
  assert.equal(await first.ended, undefined);
  // Connected: the frame path.
  const [answered, refused, unanswered] = [write(1), write(2), write(3)];
  assert.equal(answered.settledInCall || refused.settledInCall || unanswered.settledInCall, false, 'nothing settles before writeNow returns');
  assert.equal(await answered.ended, undefined);
  assert.equal(await refused.ended, 'FENCED');
  const startedMs = performance.now();
  assert.equal(await unanswered.ended, 'MAYBE_COMMITTED');
  assert.ok(performance.now() - startedMs < 300 + 38 + 200, 'the unanswered write failed about its timeout after it was sent');
  assert.equal(channel.inFlight, 0);
  // Every frame carried the write's fields, its checksums little-endian and its data.
  assert.equal(seen.length, 4);
  const expected: Record<string, number> = { ...fields(0), op: Op.WRITE, flags: 0, namespace: 0, payloadBytes: 2 * 4 + data.length };
  delete expected.volumeId;
  for (const frame of seen) {
    for (const [field, value] of Object.entries(expected)) assert.equal(frame.header[field as keyof typeof frame.header], value, field);
    assert.deepEqual([frame.sums.readUInt32LE(0), frame.sums.readUInt32LE(4)], [...checksums]);
    assert.ok(frame.data.equals(data));
  }
  assert.deepEqual(seen.map((frame) => frame.header.volumeId), [1, 1, 2, 3]);
  // Closed: the write is refused, after writeNow has returned.
  channel.close();
  const late = write(1);
  assert.equal(late.settledInCall, false);
  assert.equal(await late.ended, 'SHUTTING_DOWN');
});

test('sendRead sends a READ frame whose reply (or error) reaches its callback, connected or not, and none after close', async (t) => {
  // A store that answers each READ with its chunk index as payload, and refuses chunk 13 as NOT_READY.
  const seen: import('./store-protocol.ts').FrameHeader[] = [];
  const server = await nodeEnv.net.listen('127.0.0.1:0', (connection) => {
    const parser = new FrameParser();
    connection.onData((chunk) => {
      for (const { header } of parser.push(chunk)) {
        seen.push(header);
        const payload = Buffer.from(`chunk ${header.chunkIndex}`);
        const refused = header.chunkIndex === 13;
        connection.write(encodeHeader({
          ...emptyHeader(), op: header.op | REPLY_BIT, requestId: header.requestId, status: refused ? ErrorCodes.NOT_READY.wire : 0, payloadBytes: refused ? 0 : payload.length,
        }));
        if (!refused) connection.write(payload);
      }
    });
  });
  t.after(() => server.close());
  const channel = new StoreChannel(nodeEnv, server.address, { timeoutMs: 2000 });
  t.after(() => channel.close());
  const fields: LocalReadFields = { volumeId: 4, chunkIndex: 0, poolId: 1, pgId: 2, pgCount: 32, pgEpoch: 9, ownerEpoch: 3, offsetBlocks: 10, countBlocks: 3 };
  const read = (chunkIndex: number): { ended: Promise<string>; settledInCall: boolean } => {
    let returned = false;
    let settledInCall = false;
    let settle!: (outcome: string) => void;
    const ended = new Promise<string>((resolve) => (settle = resolve));
    // The same fields object each time, changed after the call: the channel keeps no reference to it.
    fields.chunkIndex = chunkIndex;
    channel.sendRead(fields, (error, reply) => {
      if (!returned) settledInCall = true;
      settle(error === undefined ? reply!.payload.toString() : codeOf(error));
    });
    fields.chunkIndex = 999;
    returned = true;
    return { ended, settledInCall };
  };
  const first = read(1);
  assert.equal(await first.ended, 'chunk 1', 'the first read connects through request');
  const [a, b, refused] = [read(2), read(3), read(13)];
  assert.equal(a.settledInCall || b.settledInCall || refused.settledInCall || first.settledInCall, false, 'nothing settles before sendRead returns');
  assert.deepEqual(await Promise.all([a.ended, b.ended, refused.ended]), ['chunk 2', 'chunk 3', 'NOT_READY']);
  assert.deepEqual(seen.map((header) => [header.op, header.chunkIndex, header.volumeId, header.pgEpoch, header.offsetBlocks, header.countBlocks, header.payloadBytes]),
    [1, 2, 3, 13].map((chunkIndex) => [Op.READ, chunkIndex, 4, 9, 10, 3, 0]));
  channel.close();
  const late = read(4);
  assert.equal(late.settledInCall, false);
  assert.equal(await late.ended, 'SHUTTING_DOWN');
});
