/**
 * Snapshots and clones with real clients on `shale up` (a real child process, three store
 * processes): qemu-io, qemu-img, nbdinfo and nbdcopy read `vol@snap` after the volume was
 * overwritten, a clone and a clone of a clone, block status through the parent chain, rollback,
 * and a diff → export → import round trip checked with `qemu-img compare`, with an export
 * interrupted and resumed.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { requireTool, run, shale, ShaleUp, temporaryDirectory } from './harness.ts';

const MiB = 1024 * 1024;

interface MapEntry { offset: number; length: number; type: number; description?: string }

describe('snapshots and clones with real NBD clients', () => {
  const dir = temporaryDirectory('snap-nbd');
  let cluster: ShaleUp;
  const ok = async (command: string, args: string[]): Promise<string> => {
    const result = await run(command, args);
    assert.equal(result.status, 0, `${command} ${args.join(' ')}\n${result.stdout}\n${result.stderr}`);
    return result.stdout;
  };
  const cli = async (...args: string[]): Promise<string> => {
    const result = await shale(cluster.api, ...args);
    assert.equal(result.status, 0, `shale ${args.join(' ')}\n${result.stdout}\n${result.stderr}`);
    return result.stdout;
  };
  /** nbdinfo --map as [start, length, data?] runs. */
  const map = async (exportName: string): Promise<[number, number, boolean][]> => {
    const entries = JSON.parse(await ok('nbdinfo', ['--map', '--json', cluster.uri(exportName)])) as MapEntry[];
    return entries.map((entry) => [entry.offset, entry.length, (entry.type & 1) === 0]);
  };

  before(async () => {
    for (const tool of ['qemu-img', 'qemu-io', 'nbdinfo', 'nbdcopy']) requireTool(tool);
    cluster = new ShaleUp(join(dir.path, 'data'), ['--disk-size', '1G']);
    await cluster.start();
  });

  after(async () => {
    await cluster?.stop();
    dir.remove();
  });

  test('data written before a snapshot reads back unchanged from vol@snap after it was overwritten', async () => {
    await cli('volume', 'create', 'disk', '--size', '64M', '--chunk-size', '1M');
    await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 0 4M', '-c', 'write -P 0x62 8M 1M', cluster.uri('disk')]);
    // The gateway still owns the volume: the snapshot goes through its switch and acknowledgement.
    const created = JSON.parse(await cli('snapshot', 'create', 'disk@s1', '--json')) as { state: string; id: number };
    assert.equal(created.state, 'live');
    await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x71 0 2M', '-c', 'discard 8M 1M', cluster.uri('disk')]);
    await ok('qemu-io', ['-f', 'raw', '-c', 'read -P 0x71 0 2M', '-c', 'read -P 0x61 2M 2M', '-c', 'read -P 0 8M 1M', cluster.uri('disk')]);
    const read = await ok('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x61 0 4M', '-c', 'read -P 0x62 8M 1M', '-c', 'read -P 0 4M 4M', cluster.uri('disk@s1')]);
    assert.doesNotMatch(read, /Pattern verification failed/);
    // Read-only: writes are refused.
    const write = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', cluster.uri('disk@s1')]);
    assert.notEqual(write.status, 0, 'a snapshot export refuses writes');
    const listed = JSON.parse(await ok('nbdinfo', ['--list', '--json', cluster.uri('')])) as { exports: { 'export-name': string; description?: string }[] };
    assert.ok(listed.exports.some((entry) => entry['export-name'] === 'disk@s1' && /read-only/.test(entry.description ?? '')), 'nbdinfo --list shows the snapshot');
    const info = await ok('nbdinfo', ['--json', cluster.uri('disk@s1')]);
    assert.equal((JSON.parse(info) as { exports: { is_read_only: boolean }[] }).exports[0]!.is_read_only, true);
    // Block status of the snapshot: data where it was written, holes elsewhere.
    assert.deepEqual(await map('disk@s1'), [[0, 4 * MiB, true], [4 * MiB, 4 * MiB, false], [8 * MiB, MiB, true], [9 * MiB, 55 * MiB, false]]);
    // nbdcopy the snapshot out and compare byte for byte.
    const copy = join(dir.path, 's1.raw');
    await ok('nbdcopy', [cluster.uri('disk@s1'), copy]);
    const expected = Buffer.alloc(64 * MiB);
    expected.fill(0x61, 0, 4 * MiB);
    expected.fill(0x62, 8 * MiB, 9 * MiB);
    assert.ok(readFileSync(copy).equals(expected));
    const list = JSON.parse(await cli('snapshot', 'list', 'disk', '--space', '--json')) as { snapshots: { name: string; state: string; exclusiveBytes: number; sharedBytes: number }[] };
    // s1 alone keeps the 2 MiB the volume overwrote and the 1 MiB it discarded; it shares the other 2 MiB.
    assert.deepEqual(list.snapshots.map((s) => [s.name, s.state, s.exclusiveBytes, s.sharedBytes]), [['s1', 'live', 3 * MiB, 2 * MiB]]);
    assert.match(await cli('snapshot', 'list', 'disk', '--space'), /^s1 +1 +live +64\.0 MiB .* 3\.0 MiB +2\.0 MiB$/m);
    const usageInfo = JSON.parse(await cli('volume', 'info', 'disk', '--usage', '--json')) as { sizeBytes: number; usage: { writtenBytes: number; zeroBytes: number; rawBytes: number } };
    assert.deepEqual([usageInfo.sizeBytes, usageInfo.usage.writtenBytes, usageInfo.usage.zeroBytes, usageInfo.usage.rawBytes], [64 * MiB, 4 * MiB, MiB, (4 + 3) * MiB * 3]);
    assert.match(await cli('volume', 'info', 'disk', '--usage'), /^used: +4\.0 MiB written \(6\.3% of provisioned\), 1\.0 MiB trimmed$/m);
 
    // Bad input gets a clear message and the code's exit status.
    const cases: [string[], number, RegExp][] = [
      [['snapshot', 'create', 'disk'], 2, /expected VOLUME@SNAPSHOT.*\(INVALID_ARGUMENT\)/],
      [['snapshot', 'create', 'nope@s1'], 3, /no volume named nope \(NOT_FOUND\)/],
      [['snapshot', 'create', 'disk@s1'], 4, /already has a snapshot named s1 \(ALREADY_EXISTS\)/],
      [['snapshot', 'create', 'disk@bad/name'], 2, /INVALID_ARGUMENT/],
      [['snapshot', 'delete', 'disk@missing'], 3, /no snapshot named missing \(NOT_FOUND\)/],
      [['volume', 'clone', 'disk@missing', 'x'], 3, /NOT_FOUND/],
    ];
    for (const [args, status, message] of cases) {
      const result = await shale(cluster.api, ...args);
      assert.equal(result.status, status, `shale ${args.join(' ')}: ${result.stderr}`);
      assert.match(result.stderr, message);
    }
    const missing = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read 0 4k', cluster.uri('disk@missing')]);
    assert.notEqual(missing.status, 0, 'an unknown snapshot export is refused');
  });

  test('clones and clones of clones read through; block status is a hole only where the whole chain reads zeros', async () => {
    await cli('volume', 'clone', 'disk@s1', 'vm1');
    await ok('qemu-io', ['-f', 'raw', '-c', 'read -P 0x61 0 4M', '-c', 'read -P 0x62 8M 1M', '-c', 'write -P 0x41 1M 1M', '-c', 'write -z 8M 512k', cluster.uri('vm1')]);
    // Data inherited from the parent is data (qemu-img convert and nbdcopy would skip a hole).
    // Zeros written in the clone (a tombstone) are a hole even though the parent has data there.
    assert.deepEqual(await map('vm1'), [[0, 4 * MiB, true], [4 * MiB, 4.5 * MiB, false], [8.5 * MiB, 0.5 * MiB, true], [9 * MiB, 55 * MiB, false]]);
    await cli('snapshot', 'create', 'vm1@c1');
    await cli('volume', 'clone', 'vm1@c1', 'vm2');
    const converted = join(dir.path, 'vm2.raw');
    await ok('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', cluster.uri('vm2'), converted]);
    const expected = Buffer.alloc(64 * MiB);
    expected.fill(0x61, 0, 4 * MiB);
    expected.fill(0x41, MiB, 2 * MiB);
    expected.fill(0x62, 8 * MiB + 512 * 1024, 9 * MiB);
    assert.ok(readFileSync(converted).equals(expected), 'qemu-img convert of a clone of a clone copies every inherited byte');
    const refused = await shale(cluster.api, 'snapshot', 'delete', 'disk@s1');
    assert.equal(refused.status, 18, refused.stderr);
    assert.match(refused.stderr, /IN_USE/);
  });

  test('rollback: refused while a gateway holds the volume, then with --force the volume reads as the snapshot', async () => {
    const refused = await shale(cluster.api, 'snapshot', 'rollback', 'disk@s1');
    assert.equal(refused.status, 18, refused.stderr);
    assert.match(refused.stderr, /open for writing.*\(IN_USE\)/);
    await cli('snapshot', 'rollback', 'disk@s1', '--force');
    const read = await ok('qemu-io', ['-f', 'raw', '-c', 'read -P 0x61 0 4M', '-c', 'read -P 0x62 8M 1M', cluster.uri('disk')]);
    assert.doesNotMatch(read, /Pattern verification failed/);
  });

  test('diff, then full and incremental export, import elsewhere: qemu-img compare finds them identical; an interrupted export resumes', async () => {
    await cli('snapshot', 'create', 'disk@base');
    await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x55 20M 3M', '-c', 'write -z 0 1M', cluster.uri('disk')]);
    const random = join(dir.path, 'random.raw');
    writeFileSync(random, randomBytes(2 * MiB));
    await ok('qemu-img', ['dd', '-f', 'raw', '-O', 'raw', `if=${random}`, `of=${cluster.uri('disk')}`, 'bs=1M', 'seek=40', 'count=2']).catch(async () => {
      await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x99 40M 2M', cluster.uri('disk')]);
    });
    await cli('snapshot', 'create', 'disk@s2');
    const diff = JSON.parse(await cli('snapshot', 'diff', 'disk@base', 'disk@s2', '--json')) as { ranges: { offsetBytes: number; lengthBytes: number }[] };
    assert.deepEqual(diff.ranges.map((r) => [r.offsetBytes, r.lengthBytes]), [[0, MiB], [20 * MiB, 3 * MiB], [40 * MiB, 2 * MiB]]);
    const table = await cli('snapshot', 'diff', 'disk@base', 'disk@s2');
    assert.match(table, /3 changed range\(s\)/);

    const full = join(dir.path, 'full.img');
    const incremental = join(dir.path, 'incremental.img');
    await cli('volume', 'export', 'disk@base', full);
    await cli('volume', 'export', 'disk@s2', incremental, '--from-snap', 'base');
    // Interrupt: cut the incremental file in the middle of a record, then run the export again.
    const size = statSync(incremental).size;
    assert.ok(size < 8 * MiB, `an incremental image holds only what changed (${size} bytes)`);
    truncateSync(incremental, Math.floor(size / 2) + 100);
    const resumed = JSON.parse(await cli('volume', 'export', 'disk@s2', incremental, '--from-snap', 'base', '--json')) as { resumedFromBytes: number };
    assert.ok(resumed.resumedFromBytes > 0, 'the export resumed after the records it had');
    assert.equal(statSync(incremental).size, size);

    await cli('volume', 'import', full, 'copy');
    await ok('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', cluster.uri('copy'), cluster.uri('disk@base')]);
    await cli('volume', 'import', incremental, 'copy', '--force');
    await ok('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', cluster.uri('copy'), cluster.uri('disk@s2')]);
  });
});
