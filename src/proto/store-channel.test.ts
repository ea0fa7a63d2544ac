import assert from 'node:assert/strict';
import { test } from 'node:test';
import { nodeEnv } from '../env/node/node-env.ts';
import { codeOf } from '../lib/errors.ts';
import { StoreChannel } from './store-channel.ts';
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
