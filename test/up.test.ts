/**
 * `shale up` as a user runs it: a real child process with 3 store processes, driven by the CLI,
 * nbdinfo, qemu-img and fio; kill -9 of stores under load; a clean stop and a restart on the same
 * data directory.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { makeTestCertificates, type TestCertificates } from '../src/nbd/test-certificates.ts';
import { filesystemRoundTrip } from './filesystem.ts';
import { freePort, MAIN, requireTool, run, shale, ShaleUp, temporaryDirectory, waitFor } from './harness.ts';

interface StoreEntry {
  state: string;
  address: string;
}

const MiB = 1024 * 1024;

describe('shale up, end to end', () => {
  const dir = temporaryDirectory('up');
  let cluster: ShaleUp;
  const imageA = join(dir.path, 'a.raw');
  const imageB = join(dir.path, 'b.raw');

  let certificates: TestCertificates;

  before(async () => {
    for (const tool of ['qemu-img', 'nbdinfo', 'fio', 'openssl']) requireTool(tool);
    writeFileSync(imageA, randomBytes(24 * MiB));
    writeFileSync(imageB, Buffer.concat([randomBytes(8 * MiB), Buffer.alloc(8 * MiB), randomBytes(8 * MiB)]));
    mkdirSync(join(dir.path, 'certificates'));
    certificates = await makeTestCertificates(join(dir.path, 'certificates'));
    cluster = new ShaleUp(join(dir.path, 'data'), [
      // A slow resync keeps the window in which a returning store must not be read from wide open.
      '--disk-size', '1G', '--heartbeat-timeout', '2s', '--restart-delay', '2s', '--resync-rate', '4M',
      // TLS offered (plaintext still allowed); clients that use it must show a certificate of this CA.
      '--tls', 'on', '--tls-cert', certificates.serverCertFile, '--tls-key', certificates.serverKeyFile, '--tls-ca', certificates.caFile,
      // Busy polling on (the default only with --stores 1): every real client below runs against it.
      '--busy-poll', '200',
    ]);
    await cluster.start();
  });

  after(async () => {
    await cluster?.stop();
    dir.remove();
  });

  test('the CLI shows the cluster and manages volumes, with clear errors', async () => {
    const stores = await shale(cluster.api, 'store', 'list', '--json');
    assert.equal(stores.status, 0, stores.stderr);
    const storeList = JSON.parse(stores.stdout) as { stores?: StoreEntry[] } | StoreEntry[];
    const entries = Array.isArray(storeList) ? storeList : storeList.stores!;
    assert.equal(entries.length, 3);
    assert.ok(entries.every((store) => store.state === 'up'));
    // On the loopback host, each store listens on a unix socket in its own directory.
    assert.deepEqual(entries.map((store) => store.address).sort(),
      [1, 2, 3].map((index) => `unix:${join(dir.path, 'data', `store-${index}`, 'store.sock')}`));

    const created = await shale(cluster.api, 'volume', 'create', 'vol1', '--size', '64M', '--replicas', '3');
    assert.equal(created.status, 0, created.stderr);
    const info = await shale(cluster.api, 'volume', 'info', 'vol1', '--json');
    assert.equal(info.status, 0, info.stderr);
    assert.equal((JSON.parse(info.stdout) as { sizeBytes: number }).sizeBytes, 64 * MiB);
    const table = await shale(cluster.api, 'volume', 'list');
    assert.equal(table.status, 0, table.stderr);
    assert.match(table.stdout, /vol1/);
    assert.match(table.stdout, /64\.0 MiB/);
    const status = await shale(cluster.api, 'cluster', 'status');
    assert.equal(status.status, 0, status.stderr);

    const scrub = await shale(cluster.api, 'store', 'scrub', '1');
    assert.equal(scrub.status, 0, scrub.stderr);
    assert.match(scrub.stdout, /^store 1: \d+ blocks of \d+ objects read .*: no bad blocks\n$/);
    const badScrub = await shale(cluster.api, 'store', 'scrub', 'x1');
    assert.equal(badScrub.status, 2, 'a bad store id is INVALID_ARGUMENT');

    const duplicate = await shale(cluster.api, 'volume', 'create', 'vol1', '--size', '1G');
    assert.equal(duplicate.status, 4, 'ALREADY_EXISTS exits 4');
    assert.match(duplicate.stderr, /^shale: .*\(ALREADY_EXISTS\)\n$/);
    const missing = await shale(cluster.api, 'volume', 'info', 'nope');
    assert.equal(missing.status, 3, 'NOT_FOUND exits 3');
    const badSize = await shale(cluster.api, 'volume', 'create', 'vol2', '--size', 'lots');
    assert.equal(badSize.status, 2, 'INVALID_ARGUMENT exits 2');
    const unreachable = await shale('http://127.0.0.1:1', 'volume', 'list');
    assert.equal(unreachable.status, 13, 'UNAVAILABLE exits 13');
    for (const role of [['up', '--data', join(cluster.dataDir, 'never')], ['nbd']]) {
      const badPoll = await shale(cluster.api, ...role, '--busy-poll', 'fast');
      assert.equal(badPoll.status, 2, `${role[0]} --busy-poll fast: ${badPoll.stderr}`);
      assert.match(badPoll.stderr, /--busy-poll: expected whole microseconds/);
    }
    assert.ok(!existsSync(join(cluster.dataDir, 'never')), 'a refused shale up starts nothing');
  });

  test('nbdinfo sees the volume; qemu-img writes an image and reads it back equal', async () => {
    const nbdinfo = await run('nbdinfo', ['--json', cluster.uri('vol1')]);
    assert.equal(nbdinfo.status, 0, nbdinfo.stderr);
    const described = JSON.parse(nbdinfo.stdout) as { exports: { 'export-size': number }[] };
    assert.equal(described.exports[0]!['export-size'], 64 * MiB);

    const convert = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', imageA, cluster.uri('vol1')]);
    assert.equal(convert.status, 0, convert.stderr);
    const compare = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', imageA, cluster.uri('vol1')]);
    // The volume is larger than the image: compare checks the tail of the longer one reads as zeros.
    assert.equal(compare.status, 0, compare.stdout + compare.stderr);

    const unknown = await run('nbdinfo', [cluster.uri('no-such-volume')]);
    assert.notEqual(unknown.status, 0, 'an unknown export is refused');
  });

  test('nbdcopy and qemu-io read and write the volume, with FUA, flush, trim and write zeroes', async () => {
    const copyOut = join(dir.path, 'copy-out.raw');
    let result = await run('nbdcopy', ['--connections=4', cluster.uri('vol1'), copyOut]);
    assert.equal(result.status, 0, result.stderr);
    const back = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', copyOut, cluster.uri('vol1')]);
    assert.equal(back.status, 0, back.stdout + back.stderr);
    result = await run('qemu-io', ['-f', 'raw',
      '-c', 'write -P 0x5a -f 1M 64k', '-c', 'flush', '-c', 'read -P 0x5a 1M 64k',
      '-c', 'write -z -u 1M 4k', '-c', 'read -P 0 1M 4k', '-c', 'read -P 0x5a 1052672 60k',
      '-c', 'discard 2M 1M', '-c', 'read -P 0 2M 1M',
      '-c', 'write -P 0x33 12345 777', '-c', 'read -P 0x33 12345 777',
      cluster.uri('vol1')]);
    assert.equal(result.status, 0, result.stdout + result.stderr);
    assert.doesNotMatch(result.stdout + result.stderr, /Pattern verification failed|error/i);
  });

  test('thin volumes: nbdinfo --map and qemu-img map show the holes, and TRIM makes holes again', async () => {
    assert.equal((await shale(cluster.api, 'volume', 'create', 'vol-map', '--size', '32M')).status, 0);
    let result = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 4M 1M', '-c', 'write -P 0x78 20M 64k', cluster.uri('vol-map')]);
    assert.equal(result.status, 0, result.stderr);
    const extents = async (): Promise<{ offset: number; length: number; type: number }[]> => {
      const map = await run('nbdinfo', ['--map', '--json', cluster.uri('vol-map')]);
      assert.equal(map.status, 0, map.stderr);
      return JSON.parse(map.stdout) as { offset: number; length: number; type: number }[];
    };
    const dataRanges = (list: { offset: number; length: number; type: number }[]): [number, number][] =>
      list.filter((extent) => (extent.type & 1) === 0).map((extent) => [extent.offset, extent.length]);
    assert.deepEqual(dataRanges(await extents()), [[4 * MiB, MiB], [20 * MiB, 64 * 1024]]);
    const qemuMap = await run('qemu-img', ['map', '--output=json', '-f', 'raw', cluster.uri('vol-map')]);
    assert.equal(qemuMap.status, 0, qemuMap.stderr);
    const qemuData = (JSON.parse(qemuMap.stdout) as { start: number; length: number; data: boolean }[]).filter((entry) => entry.data);
    assert.deepEqual(qemuData.map((entry) => [entry.start, entry.length]), [[4 * MiB, MiB], [20 * MiB, 64 * 1024]]);
    result = await run('qemu-io', ['-f', 'raw', '-c', 'discard 4M 1M', cluster.uri('vol-map')]);
    assert.equal(result.status, 0, result.stderr);
    assert.deepEqual(dataRanges(await extents()), [[20 * MiB, 64 * 1024]], 'a trimmed range is a hole again');
  });

  test('TLS: a client with a certificate of the CA reads and writes; one without is refused', async () => {
    assert.equal((await shale(cluster.api, 'volume', 'create', 'vol-tls', '--size', '16M')).status, 0);
    const tlsUri = `nbds://127.0.0.1:${cluster.nbdPort}/vol-tls?tls-certificates=${certificates.directory}`;
    const info = await run('nbdinfo', ['--json', tlsUri]);
    assert.equal(info.status, 0, info.stderr);
    assert.equal((JSON.parse(info.stdout) as { exports: { 'export-size': number; 'is_tls'?: boolean }[] }).exports[0]!['export-size'], 16 * MiB);
    const write = await run('qemu-io', ['--image-opts', '--object', `tls-creds-x509,id=tls0,dir=${certificates.directory},endpoint=client`,
      '-c', 'write -P 0x42 0 1M', '-c', 'read -P 0x42 0 1M',
      `driver=nbd,host=127.0.0.1,port=${cluster.nbdPort},export=vol-tls,tls-creds=tls0`]);
    assert.equal(write.status, 0, write.stdout + write.stderr);
    assert.doesNotMatch(write.stdout, /Pattern verification failed/);
    const stranger = await run('nbdinfo', [`nbds://127.0.0.1:${cluster.nbdPort}/vol-tls?tls-certificates=${certificates.strangerDirectory}`]);
    assert.notEqual(stranger.status, 0, 'a client certificate of another CA is refused');
  });

  test('a real filesystem on a replicated volume: nbdfuse, mkfs.ext4, fuse2fs, remount, e2fsck', async () => {
    assert.equal((await shale(cluster.api, 'volume', 'create', 'vol-fs', '--size', '128M')).status, 0);
    await filesystemRoundTrip(cluster.uri('vol-fs'), join(dir.path, 'fs'));
  });

  test('a second gateway is refused the volume unless it takes it over; then the first one is fenced', async () => {
    assert.equal((await shale(cluster.api, 'volume', 'create', 'vol-owner', '--size', '8M')).status, 0);
    let result = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 0 64k', cluster.uri('vol-owner')]);
    assert.equal(result.status, 0, result.stderr);
    const token = readFileSync(join(cluster.dataDir, 'token'), 'utf8').trim();
    const gateway = async (extra: string[]): Promise<{ port: number; child: ChildProcess; output: () => string }> => {
      const port = await freePort();
      const child = spawn(process.execPath, [MAIN, 'nbd', '--conductor', cluster.api, '--listen', `127.0.0.1:${port}`, ...extra], {
        stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, SHALE_TOKEN: token },
      });
      let output = '';
      child.stdout!.on('data', (chunk: Buffer) => (output += chunk.toString()));
      child.stderr!.on('data', (chunk: Buffer) => (output += chunk.toString()));
      await waitFor('the second gateway to listen', async () => output.includes('listening'), 30_000, 50);
      return { port, child, output: () => output };
    };
    const polite = await gateway([]);
    try {
      result = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x61 0 64k', `nbd://127.0.0.1:${polite.port}/vol-owner`]);
      assert.notEqual(result.status, 0, 'a gateway without --takeover may not open a volume another gateway owns');
    } finally {
      polite.child.kill('SIGTERM');
    }
    const usurper = await gateway(['--takeover']);
    try {
      result = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x61 0 64k', '-c', 'write -P 0x62 0 4k', `nbd://127.0.0.1:${usurper.port}/vol-owner`]);
      assert.equal(result.status, 0, result.stdout + result.stderr + usurper.output());
      result = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x63 0 4k', cluster.uri('vol-owner')]);
      assert.notEqual(result.status, 0, 'the first gateway is fenced: its write fails');
      result = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x62 0 4k', `nbd://127.0.0.1:${usurper.port}/vol-owner`]);
      assert.equal(result.status, 0, result.stdout + result.stderr);
      assert.doesNotMatch(result.stdout, /Pattern verification failed/, 'the fenced write never landed');
    } finally {
      usurper.child.kill('SIGTERM');
    }
  });

  test('fio with verify=crc32c passes over the NBD engine', async () => {
    const fio = await run('fio', [
      '--name=verify', '--ioengine=nbd', `--uri=${cluster.uri('vol1')}`, '--rw=randwrite', '--bs=4k', '--iodepth=16',
      '--size=16M', '--verify=crc32c', '--verify_fatal=1', '--randrepeat=0', '--verify_state_save=0',
    ], { timeoutMs: 300_000 });
    assert.equal(fio.status, 0, fio.stdout + fio.stderr);
    assert.match(fio.stdout, /verify/);
  });

  test('kill -9 of a store under an fio verify write load causes no I/O error', async () => {
    const volume = await shale(cluster.api, 'volume', 'create', 'vol-kill', '--size', '64M');
    assert.equal(volume.status, 0, volume.stderr);
    const victim = cluster.storePid(2);
    const fio = run('fio', [
      '--name=kill', '--ioengine=nbd', `--uri=${cluster.uri('vol-kill')}`, '--rw=randwrite', '--bs=4k', '--iodepth=16',
      '--size=32M', '--verify=crc32c', '--verify_fatal=1', '--randrepeat=0', '--verify_state_save=0',
    ], { timeoutMs: 300_000 });
    await new Promise((resolve) => setTimeout(resolve, 800));
    process.kill(victim, 'SIGKILL');
    const result = await fio;
    assert.equal(result.status, 0, result.stdout + result.stderr);
    assert.doesNotMatch(result.stdout + result.stderr, /error=|verify: bad/i);
    await waitForHealthy(cluster);
  });

  test('kill -9 of a store under unaligned writes of mixed sizes and under trims: fio verifies, a scrub finds every replica identical', async () => {
    const volume = await shale(cluster.api, 'volume', 'create', 'vol-mixed', '--size', '32M');
    assert.equal(volume.status, 0, volume.stderr);
    const victim = cluster.storePid(3);
    const uri = cluster.uri('vol-mixed');
    const common = ['--ioengine=nbd', `--uri=${uri}`, '--verify=crc32c', '--verify_fatal=1', '--randrepeat=0', '--verify_state_save=0'];
    // Two jobs on disjoint halves: writes of 512 B to 64 KiB at 512-byte alignment (partial blocks:
    // the gateway's read-modify-write), and trims each followed by a write of 4 to 128 KiB.
    const fio = run('fio', [
      '--name=unaligned', ...common, '--rw=randwrite', '--bsrange=512-64k', '--blockalign=512', '--serialize_overlap=1',
      '--iodepth=16', '--offset=0', '--size=16M', '--loops=3',
      '--name=trims', ...common, '--rw=randtrimwrite', '--bsrange=4k-128k', '--iodepth=8', '--offset=16M', '--size=16M',
    ], { timeoutMs: 300_000 });
    let fioEnded = false;
    // Both outcomes handled here, so a fio that times out fails only through `await fio` below.
    const noteEnd = (): void => {
      fioEnded = true;
    };
    fio.then(noteEnd, noteEnd);
    await new Promise((resolve) => setTimeout(resolve, 500));
    assert.equal(fioEnded, false, 'fio still runs when the store is killed');
    process.kill(victim, 'SIGKILL');
    const result = await fio;
    assert.equal(result.status, 0, result.stdout + result.stderr);
    assert.doesNotMatch(result.stdout + result.stderr, /error=[1-9]|verify: bad/i);
    assert.match(result.stdout, /unaligned: \(groupid=0, jobs=1\): err= 0/);
    assert.match(result.stdout, /trims: \(groupid=0, jobs=1\): err= 0/);
    assert.match(result.stdout, /TRIM: bw=/, 'the second job trimmed');
    await waitForHealthy(cluster);
    const scrub = await shale(cluster.api, 'scrub', 'vol-mixed', '--json');
    assert.equal(scrub.status, 0, scrub.stderr);
    const report = JSON.parse(scrub.stdout) as { pgs: number; pgsSkipped: number; blocks: number; inconsistentBlocks: number };
    assert.ok(report.pgs > 0 && report.blocks > 0, `the scrub compared something: ${scrub.stdout}`);
    assert.equal(report.pgsSkipped, 0, scrub.stdout);
    assert.equal(report.inconsistentBlocks, 0, `every replica identical after the store came back: ${scrub.stdout}`);
  });

  test('a store that comes back is read from only once it has caught up', async () => {
    assert.equal((await shale(cluster.api, 'volume', 'create', 'vol-resync', '--size', '24M')).status, 0);
    let convert = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', imageA, cluster.uri('vol-resync')]);
    assert.equal(convert.status, 0, convert.stderr);
    // Store 1 dies; the volume is rewritten while it is away.
    process.kill(cluster.storePid(1), 'SIGKILL');
    convert = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', imageB, cluster.uri('vol-resync')]);
    assert.equal(convert.status, 0, convert.stderr);
    // While it returns and resyncs, every read must see the new data.
    const differences: string[] = [];
    let compares = 0;
    await waitFor('all placement groups clean again', async () => {
      const compare = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', imageB, cluster.uri('vol-resync')]);
      if (compare.status !== 0) differences.push(compare.stdout + compare.stderr);
      compares++;
      return isHealthy(cluster);
    }, 90_000, 100);
    assert.deepEqual(differences, [], 'every read during the resync saw the new data');
    assert.ok(compares > 1, `compared ${compares} times while the store resynced`);
    // Now the other two die together: reads can only come from store 1, which must hold the new data.
    const others = [cluster.storePid(2), cluster.storePid(3)];
    for (const pid of others) process.kill(pid, 'SIGKILL');
    const compare = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', imageB, cluster.uri('vol-resync')]);
    assert.equal(compare.status, 0, `store 1 alone: ${compare.stdout}${compare.stderr}`);
    await waitForHealthy(cluster);
  });

  test('SIGTERM stops every process; shale up on the same directory brings the volumes back', async () => {
    const code = await cluster.stop();
    assert.equal(code, 0, cluster.output);
    cluster = new ShaleUp(cluster.dataDir, cluster.extraArgs, { nbd: cluster.nbdPort, api: cluster.apiPort });
    await cluster.start();
    const list = await shale(cluster.api, 'volume', 'list', '--json');
    assert.equal(list.status, 0, list.stderr);
    const names = (JSON.parse(list.stdout) as { volumes?: { name: string }[] } | { name: string }[]);
    const volumes = Array.isArray(names) ? names : names.volumes!;
    assert.deepEqual(volumes.map((volume) => volume.name).sort(), ['vol-fs', 'vol-kill', 'vol-map', 'vol-mixed', 'vol-owner', 'vol-resync', 'vol-tls', 'vol1']);
    const compare = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', imageB, cluster.uri('vol-resync')]);
    assert.equal(compare.status, 0, compare.stdout + compare.stderr);
  });
});

async function isHealthy(cluster: ShaleUp): Promise<boolean> {
  const status = await shale(cluster.api, 'cluster', 'status', '--json');
  if (status.status !== 0) return false;
  const parsed = JSON.parse(status.stdout) as { health: string; stores: { up: number } };
  return parsed.health === 'ok' && parsed.stores.up === 3;
}

async function waitForHealthy(cluster: ShaleUp): Promise<void> {
  await waitFor('the cluster to be healthy', async () => isHealthy(cluster), 90_000, 250);
}
