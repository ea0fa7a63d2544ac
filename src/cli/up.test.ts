import assert from 'node:assert/strict';
import { test } from 'node:test';
import { storeListen } from './up.ts';

test('stores of shale up listen on a unix socket on the loopback host, on TCP otherwise or when the path is too long', () => {
  assert.equal(storeListen('127.0.0.1', '/var/lib/shale/store-2'), 'unix:/var/lib/shale/store-2/store.sock');
  assert.equal(storeListen('localhost', '/d/store-1'), 'unix:/d/store-1/store.sock');
  assert.equal(storeListen('::1', '/d/store-1'), 'unix:/d/store-1/store.sock');
  // Reachable from other machines: a free TCP port on that address.
  assert.equal(storeListen('0.0.0.0', '/d/store-1'), '0.0.0.0:0');
  assert.equal(storeListen('192.168.1.5', '/d/store-1'), '192.168.1.5:0');
  // The kernel takes at most 107 bytes for a unix socket's path.
  const deep = `/${'x'.repeat(120)}/store-1`;
  assert.equal(storeListen('127.0.0.1', deep), '127.0.0.1:0');
  assert.equal(storeListen('::1', deep), '[::1]:0');
});
