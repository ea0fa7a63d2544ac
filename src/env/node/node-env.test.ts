import assert from 'node:assert/strict';
import { test } from 'node:test';
import { codeOf } from '../../lib/errors.ts';
import { nodeEnv } from './node-env.ts';

test('listening on an address another server holds is IN_USE, naming the address; the holder is unharmed', async (t) => {
  const holder = await nodeEnv.net.listen('127.0.0.1:0', (connection) => connection.end());
  t.after(() => holder.close());
  await assert.rejects(nodeEnv.net.listen(holder.address, () => {}), (error: unknown) =>
    codeOf(error) === 'IN_USE' && (error as Error).message === `cannot listen on ${holder.address}: the address is already in use`);
  await assert.rejects(nodeEnv.net.serveHttp(holder.address, () => {}), (error: unknown) => codeOf(error) === 'IN_USE');
  const connection = await nodeEnv.net.connect(holder.address);
  await new Promise<void>((resolve) => connection.onClose(() => resolve()));
});

test('write calls onWritten once the buffers are written, and at once on a closed connection', async (t) => {
  const received: Buffer[] = [];
  const server = await nodeEnv.net.listen('127.0.0.1:0', (connection) => connection.onData((chunk) => received.push(chunk)));
  t.after(() => server.close());
  const connection = await nodeEnv.net.connect(server.address);
  const written = await new Promise<boolean>((resolve) => {
    connection.write([Buffer.from('ab'), Buffer.from('cd'), Buffer.from('ef')], () => resolve(true));
  });
  assert.equal(written, true);
  connection.destroy();
  await new Promise<void>((resolve) => connection.onClose(() => resolve()));
  let called = false;
  assert.equal(connection.write(Buffer.from('late'), () => (called = true)), false);
  assert.equal(called, true, 'nothing holds the buffer of a write to a closed connection');
  while (Buffer.concat(received).length < 6) await new Promise((resolve) => setTimeout(resolve, 5));
  assert.equal(Buffer.concat(received).toString(), 'abcdef');
});
