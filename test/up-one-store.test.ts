/**
 * `shale up --stores 1` end to end, with the store's read cache in the gateway's process: what fio
 * wrote reads back right through the NBD server when the blocks come from the cache (lent to the
 * replies, not copied), through overwrites, and with a cache smaller than the data (evictions). A
 * block rotten in its only copy answers EIO at once.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { findBlock, flipBit, requireTool, run, shale, ShaleUp, temporaryDirectory } from './harness.ts';

describe('shale up --stores 1 with its read cache', () => {
  const dir = temporaryDirectory('up-one');
  let cluster: ShaleUp;

  before(async () => {
    requireTool('fio');
    // 16 MiB of cache: 12 MiB of data read again and again from it, then 24 MiB elsewhere that evicts it.
    cluster = new ShaleUp(join(dir.path, 'data'), ['--stores', '1', '--disk-size', '1G', '--cache-size', '16M']);
    await cluster.start();
    const created = await shale(cluster.api, 'volume', 'create', 'one', '--size', '64M');
    assert.equal(created.status, 0, created.stderr);
  });

  after(async () => {
    await cluster?.stop();
    dir.remove();
  });

  // Writes a region with fio's verify data and reads it back, or only reads it back (the same
  // offsets in the same order, from the same seed).
  const fio = async (seed: number, verifyOnly: boolean, region = ['--offset=0', '--size=12M']): Promise<void> => {
    const result = await run('fio', [
      `--name=${verifyOnly ? 'reread' : 'write'}`, '--ioengine=nbd', `--uri=${cluster.uri('one')}`, '--rw=randwrite', '--bs=4k', '--iodepth=16',
      ...region, '--verify=crc32c', '--verify_fatal=1', `--randseed=${seed}`, '--verify_state_save=0', ...(verifyOnly ? ['--verify_only=1'] : []),
    ], { timeoutMs: 300_000 });
    assert.equal(result.status, 0, result.stdout + result.stderr);
    assert.doesNotMatch(result.stdout + result.stderr, /verify failed|bad magic|crc32c: verify/i);
  };

  test('fio verify=crc32c reads back what it wrote, again and again, and after overwrites', async () => {
    await fio(1, false);
    await fio(1, true);
    await fio(1, true);
    // Overwrite everything with other data: no cached block of the first pass may be served.
    await fio(2, false);
    await fio(2, true);
    // Another 24 MiB through the cache evicts most of the first region, which still reads right.
    await fio(3, false, ['--offset=32M', '--size=24M']);
    await fio(2, true);
  });

  test('a block rotten in its only copy: qemu-io gets EIO at once, and the blocks beside it still read', async () => {
    requireTool('qemu-io');
    assert.equal((await shale(cluster.api, 'volume', 'create', 'rot', '--size', '8M')).status, 0);
    const uri = cluster.uri('rot');
    const write = await run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x5a 0 4k', '-c', 'write -P 0x33 4k 4k'], { timeoutMs: 60_000 });
    assert.equal(write.status, 0, write.stdout + write.stderr);
    const disk = join(dir.path, 'data', 'store-1', 'disk.img');
    flipBit(disk, findBlock(disk, Buffer.alloc(4096, 0x5a)) + 100);
    const started = Date.now();
    const read = await run('qemu-io', ['-f', 'raw', uri, '-c', 'read -P 0x5a 0 4k'], { timeoutMs: 60_000 });
    assert.match(read.stdout + read.stderr, /read failed: Input\/output error/, read.stdout + read.stderr);
    assert.ok(Date.now() - started < 10_000, `EIO at once, not after waiting for a good copy (${Date.now() - started} ms)`);
    const beside = await run('qemu-io', ['-f', 'raw', uri, '-c', 'read -P 0x33 4k 4k'], { timeoutMs: 60_000 });
    assert.equal(beside.status, 0, beside.stdout + beside.stderr);
    assert.doesNotMatch(beside.stdout + beside.stderr, /fail|Pattern verification/i);
  });

  test('--cache-size refuses what is not a size, and starts nothing', async () => {
    const result = await run(process.execPath, [join(import.meta.dirname, '../src/cli/main.ts'), 'up', '--data', join(dir.path, 'never'), '--stores', '1', '--cache-size', '100'], { timeoutMs: 60_000 });
    assert.equal(result.status, 2, result.stdout + result.stderr);
    assert.match(result.stderr, /--cache-size: 100 bytes is less than one 4 KiB block/);
  });
});
