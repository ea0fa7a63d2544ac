/**
 * The NBD server against real clients: nbdinfo, nbdcopy, nbdfuse and python3-libnbd (libnbd-bin,
 * python3-libnbd), qemu-img and qemu-io (qemu-utils), fio's nbd engine, and a real filesystem
 * (mkfs.ext4, e2fsck, debugfs from e2fsprogs; fuse2fs; fusermount3 from fuse3) on an export
 * mounted as a file by nbdfuse. TLS with certificates made by openssl. Exports live in memory and
 * are served on 127.0.0.1, port 0. A missing tool fails its test with the package to install: these
 * tests never pass by skipping.
 */
import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { open as openFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import { nodeEnv } from '../env/node/node-env.ts';
import { MemoryExport, MemoryExportProvider } from './memory-export.ts';
import { startNbdServer } from './server.ts';
import type { NbdServer } from './server.ts';
import { NbdSimpleClient } from './simple-client.ts';
import { requireTool } from '../../scripts/required-tools.ts';
import { filesystemRoundTrip } from '../../test/filesystem.ts';
import { makeTestCertificates } from './test-certificates.ts';
import type { TestCertificates } from './test-certificates.ts';

const MiB = 1024 * 1024;
const PYTHON = '/usr/bin/python3';

function requirePythonNbd(): void {
  try {
    execFileSync(PYTHON, ['-c', 'import nbd'], { stdio: 'ignore' });
  } catch {
    assert.fail(`${PYTHON} cannot import nbd: run \`apt-get install -y python3-libnbd\``);
  }
}

interface Ran {
  readonly stdout: string;
  readonly stderr: string;
  readonly code: number;
}

/** Runs a client without blocking the event loop (the server runs in this process). */
function run(command: string, args: readonly string[], timeoutMs = 120_000, cwd?: string): Promise<Ran> {
  requireTool(command);
  return new Promise((resolve) => {
    execFile(command, args, { timeout: timeoutMs, maxBuffer: 64 * MiB, cwd }, (error, stdout, stderr) => {
      const code = error === null ? 0 : typeof error.code === 'number' ? error.code : -1;
      resolve({ stdout, stderr, code });
    });
  });
}

async function runOk(command: string, args: readonly string[], timeoutMs?: number, cwd?: string): Promise<Ran> {
  const ran = await run(command, args, timeoutMs, cwd);
  assert.equal(ran.code, 0, `${command} ${args.join(' ')} exited ${ran.code}\n${ran.stdout}\n${ran.stderr}`);
  return ran;
}

/** Runs a python3-libnbd script; it gets the URI as sys.argv[1] and prints one JSON value. */
async function python(script: string, uri: string): Promise<unknown> {
  requirePythonNbd();
  const ran = await new Promise<Ran>((resolve) => {
    execFile(PYTHON, ['-c', script, uri], { timeout: 60_000 }, (error, stdout, stderr) => {
      resolve({ stdout, stderr, code: error === null ? 0 : typeof error.code === 'number' ? error.code : -1 });
    });
  });
  assert.equal(ran.code, 0, `python exited ${ran.code}\n${ran.stdout}\n${ran.stderr}`);
  return JSON.parse(ran.stdout);
}

const pythonPrelude = `
import json, sys, nbd
def attempt(operation):
    # The errno name libnbd reports for the server's error reply, or "ok".
    try:
        operation()
        return "ok"
    except nbd.Error as error:
        return error.errno
h = nbd.NBD()
h.set_strict_mode(0)  # let requests the client would refuse itself reach the server
h.connect_uri(sys.argv[1])
`;

async function waitFor(what: string, condition: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** An image with data, a hole and an odd tail, as a VM disk has. */
function imageBytes(sizeBytes: number): Buffer {
  const image = Buffer.alloc(sizeBytes);
  randomBytes(3 * MiB).copy(image, 0);
  randomBytes(MiB - 4096).copy(image, sizeBytes - MiB + 4096);
  image.fill(0x5c, 5 * MiB, 5 * MiB + 4096);
  return image;
}

describe('real NBD clients', () => {
  const logs: string[] = [];
  const exports = {
    disk: new MemoryExport({ name: 'disk', sizeBytes: 16 * MiB, description: 'scratch disk' }),
    flags: new MemoryExport({ name: 'flags', sizeBytes: 4 * MiB }),
    convert: new MemoryExport({ name: 'convert', sizeBytes: 8 * MiB }),
    copy: new MemoryExport({ name: 'copy', sizeBytes: 8 * MiB }),
    sparse: new MemoryExport({ name: 'sparse', sizeBytes: 16 * MiB }),
    sparseCopy: new MemoryExport({ name: 'sparse-copy', sizeBytes: 16 * MiB }),
    slowZero: new MemoryExport({ name: 'slow-zero', sizeBytes: 4 * MiB, fastZeroes: false }),
    filesystem: new MemoryExport({ name: 'filesystem', sizeBytes: 64 * MiB }),
    fio: new MemoryExport({ name: 'fio', sizeBytes: 16 * MiB }),
    edge: new MemoryExport({ name: 'edge', sizeBytes: MiB }),
    snapshot: new MemoryExport({ name: 'vol@snap', sizeBytes: MiB, readOnly: true, description: 'read-only snapshot' }),
  };
  exports.snapshot.load(0, Buffer.alloc(MiB, 0x61));
  let server: NbdServer;
  let directory: string;
  const uri = (name: string): string => `nbd://${server.address}/${name}`;

  before(async () => {
    server = await startNbdServer(nodeEnv, {
      listen: '127.0.0.1:0',
      provider: new MemoryExportProvider(Object.values(exports)),
      log: (message) => logs.push(message),
    });
    directory = await mkdtemp(join(tmpdir(), 'shale-nbd-'));
  });

  after(async () => {
    await server.close();
    await rm(directory, { recursive: true, force: true });
  });

  test('nbdinfo shows the size, flags and block sizes', async () => {
    const text = await runOk('nbdinfo', [uri('disk')]);
    assert.match(text.stdout, /export-size: 16777216 \(16M\)/);
    const info = JSON.parse((await runOk('nbdinfo', ['--json', uri('disk')])).stdout) as { exports: Record<string, unknown>[] };
    const disk = info.exports[0]!;
    assert.equal(disk['export-size'], 16 * MiB);
    assert.equal(disk.description, 'scratch disk');
    for (const flag of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero', 'can_multi_conn', 'can_df']) assert.equal(disk[flag], true, flag);
    assert.equal(disk.can_cache, false);
    assert.deepEqual(disk.contexts, ['base:allocation']);
    assert.equal(disk.is_read_only, false);
    assert.equal(disk.block_size_minimum, 1);
    assert.equal(disk.block_size_preferred, 4096);
    assert.equal(disk.block_size_maximum, 32 * MiB);
  });

  test('nbdinfo --list lists every export', async () => {
    const listed = JSON.parse((await runOk('nbdinfo', ['--list', '--json', `nbd://${server.address}`])).stdout) as { exports: { 'export-name': string; description?: string; is_read_only: boolean }[] };
    const byName = new Map(listed.exports.map((entry) => [entry['export-name'], entry]));
    assert.deepEqual([...byName.keys()].sort(), Object.values(exports).map((memoryExport) => memoryExport.name).sort());
    assert.equal(byName.get('vol@snap')!.description, 'read-only snapshot');
    assert.equal(byName.get('vol@snap')!.is_read_only, true);
  });

  test('an unknown export is refused', async () => {
    const ran = await run('nbdinfo', [uri('no-such-volume')]);
    assert.notEqual(ran.code, 0);
    assert.match(ran.stderr, /no-such-volume|not available|unknown/i);
    await waitFor('the log line', () => logs.some((line) => line.includes('refused export "no-such-volume"')));
  });

  test('qemu-io writes a pattern and reads it back', async () => {
    const ran = await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 0 64k', '-c', 'read -P 0xab 0 64k', uri('disk')]);
    assert.match(ran.stdout, /read 65536\/65536 bytes at offset 0/);
    assert.doesNotMatch(ran.stdout + ran.stderr, /Pattern verification failed/);
    assert.deepEqual(exports.disk.data.subarray(0, 64 * 1024), Buffer.alloc(64 * 1024, 0xab));
  });

  test('qemu-io: FUA write, flush, trim and write zeroes reach the export', async () => {
    const flags = exports.flags;
    flags.data.fill(0xff);
    await runOk('qemu-io', ['-f', 'raw', '-t', 'writeback', '-d', 'unmap',
      '-c', 'write -P 1 0 4k', '-c', 'write -f -P 2 4k 4k', '-c', 'flush',
      '-c', 'discard 64k 64k', '-c', 'write -z 128k 64k', '-c', 'write -z -u 192k 64k', uri('flags')]);
    const counters = flags.counters;
    assert.equal(counters.writes, 2);
    assert.equal(counters.fuaWrites, 1, 'only `write -f` is FUA');
    assert.ok(counters.flushes >= 1);
    assert.equal(counters.trims, 1);
    assert.equal(counters.writeZeroes, 2);
    assert.equal(counters.noHoleWriteZeroes, 1, '`write -z` without -u asks for NO_HOLE');
    assert.deepEqual(flags.data.subarray(0, 4096), Buffer.alloc(4096, 1));
    assert.deepEqual(flags.data.subarray(4096, 8192), Buffer.alloc(4096, 2));
    assert.deepEqual(flags.data.subarray(128 * 1024, 256 * 1024), Buffer.alloc(128 * 1024));
    assert.deepEqual(flags.data.subarray(256 * 1024, 260 * 1024), Buffer.alloc(4096, 0xff));
  });

  test('qemu-img converts a file to the export and back, and compares equal', async () => {
    const image = imageBytes(8 * MiB);
    const source = join(directory, 'source.img');
    const back = join(directory, 'back.img');
    await writeFile(source, image);
    await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', source, uri('convert')]);
    assert.ok(exports.convert.data.equals(image), 'the export holds the image');
    await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', source, uri('convert')]);
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri('convert'), back]);
    assert.ok((await readFile(back)).equals(image), 'the copy back equals the image');
    exports.convert.load(7 * MiB, Buffer.from([exports.convert.data[7 * MiB]! ^ 1]));
    const differing = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', source, uri('convert')]);
    assert.equal(differing.code, 1, 'qemu-img compare sees a changed byte');
  });

  test('nbdcopy copies a file to the export and back over several connections', async () => {
    const image = imageBytes(8 * MiB);
    const source = join(directory, 'nbdcopy-source.img');
    const back = join(directory, 'nbdcopy-back.img');
    await writeFile(source, image);
    const releasesBefore = exports.copy.counters.releases;
    let connectionsMax = 0;
    const sampler = setInterval(() => {
      connectionsMax = Math.max(connectionsMax, server.connectionCount());
    }, 1);
    try {
      await runOk('nbdcopy', ['--connections=4', '--requests=16', source, uri('copy')]);
    } finally {
      clearInterval(sampler);
    }
    assert.ok(connectionsMax >= 2, `nbdcopy used ${connectionsMax} connection(s) at once (CAN_MULTI_CONN lets it use several)`);
    assert.ok(exports.copy.data.equals(image), 'the export holds the image');
    await runOk('nbdcopy', [uri('copy'), back]);
    assert.ok((await readFile(back)).equals(image), 'the copy back equals the image');
    await waitFor('every connection to close', () => server.connectionCount() === 0);
    assert.ok(exports.copy.counters.releases >= releasesBefore + 2);
    assert.ok(exports.copy.counters.runningMax > 1, 'requests ran concurrently');
  });

  test('fio randrw with crc32c verification passes', async () => {
    const ran = await runOk('fio', ['--name=randrw', '--ioengine=nbd', `--uri=${uri('fio')}`, '--rw=randrw', '--bs=4k',
      '--iodepth=16', '--size=16M', '--verify=crc32c', '--verify_state_save=0', '--output-format=json'], 300_000, directory);
    const report = JSON.parse(ran.stdout.slice(ran.stdout.indexOf('{'))) as { jobs: { error: number; read: { io_bytes: number }; write: { io_bytes: number } }[] };
    const job = report.jobs[0]!;
    assert.equal(job.error, 0);
    assert.ok(job.read.io_bytes > 0 && job.write.io_bytes > 0);
    assert.equal(exports.fio.counters.runningMax, 16, 'iodepth 16 means 16 requests in flight');
  });

  test('a read-only export: libnbd sees READ_ONLY, writes get EPERM, reads work', async () => {
    const info = JSON.parse((await runOk('nbdinfo', ['--json', uri('vol@snap')])).stdout) as { exports: Record<string, unknown>[] };
    assert.equal(info.exports[0]!.is_read_only, true);
    const result = await python(`${pythonPrelude}
print(json.dumps({
    "readOnly": h.is_read_only(),
    "write": attempt(lambda: h.pwrite(b"x" * 512, 0)),
    "trim": attempt(lambda: h.trim(512, 0)),
    "zero": attempt(lambda: h.zero(512, 0)),
    "read": h.pread(4, 0).decode(),
}))
h.shutdown()
`, uri('vol@snap'));
    assert.deepEqual(result, { readOnly: true, write: 'EPERM', trim: 'EPERM', zero: 'EPERM', read: 'aaaa' });
    const ran = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', uri('vol@snap')]);
    assert.notEqual(ran.code, 0);
    assert.deepEqual(exports.snapshot.data, Buffer.alloc(MiB, 0x61));
  });

  test('requests past the end get EINVAL / ENOSPC and the connection keeps working', async () => {
    const result = await python(`${pythonPrelude}
size = h.get_size()
h.pwrite(b"z" * 512, size - 512)
print(json.dumps({
    "read": attempt(lambda: h.pread(1024, size - 512)),
    "write": attempt(lambda: h.pwrite(b"y" * 1024, size - 512)),
    "zero": attempt(lambda: h.zero(1024, size - 512)),
    "trim": attempt(lambda: h.trim(1024, size - 512)),
    "farRead": attempt(lambda: h.pread(512, 1 << 62)),
    "after": h.pread(512, size - 512).decode(),
}))
h.shutdown()
`, uri('edge'));
    assert.deepEqual(result, { read: 'EINVAL', write: 'ENOSPC', zero: 'ENOSPC', trim: 'EINVAL', farRead: 'EINVAL', after: 'z'.repeat(512) });
  });

  test('garbage on one connection closes it while a real client on another carries on', async () => {
    const garbage = await NbdSimpleClient.connect(nodeEnv, server.address);
    await garbage.go('disk');
    const copying = runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 1M 4M', '-c', 'read -P 0x3c 1M 4M', uri('disk')]);
    garbage.sendRaw(randomBytes(4096));
    await garbage.closed;
    await copying;
    assert.deepEqual(exports.disk.data.subarray(MiB, 5 * MiB), Buffer.alloc(4 * MiB, 0x3c));
    assert.ok(logs.some((line) => /closing connection: bad request magic/.test(line)), logs.join('\n'));
  });

  test('nbdinfo --map and qemu-img map show the holes, the data and the allocated zeroes', async () => {
    const sparse = exports.sparse;
    sparse.load(MiB, randomBytes(MiB));
    sparse.load(8 * MiB, randomBytes(64 * 1024));
    // write -z without -u asks for NO_HOLE: allocated zeroes; discard makes a hole inside the data.
    await runOk('qemu-io', ['-f', 'raw', '-d', 'unmap', '-c', 'write -z 4M 1M', '-c', 'discard 1536k 256k', uri('sparse')]);
    const map = JSON.parse((await runOk('nbdinfo', ['--map', '--json', uri('sparse')])).stdout) as { offset: number; length: number; type: number; description: string }[];
    assert.deepEqual(map.map((entry) => [entry.offset, entry.length, entry.description]), [
      [0, MiB, 'hole,zero'],
      [MiB, MiB / 2, 'data'],
      [1536 * 1024, 256 * 1024, 'hole,zero'],
      [1792 * 1024, 256 * 1024, 'data'],
      [2 * MiB, 2 * MiB, 'hole,zero'],
      [4 * MiB, MiB, 'zero'],
      [5 * MiB, 3 * MiB, 'hole,zero'],
      [8 * MiB, 64 * 1024, 'data'],
      [8 * MiB + 64 * 1024, 8 * MiB - 64 * 1024, 'hole,zero'],
    ]);
    const qemuMap = JSON.parse((await runOk('qemu-img', ['map', '--output=json', '-f', 'raw', uri('sparse')])).stdout) as { start: number; length: number; data: boolean; zero: boolean }[];
    // qemu calls allocated ranges data (the allocated zeroes too, with zero: true).
    const allocated = qemuMap.filter((entry) => entry.data).map((entry) => [entry.start, entry.length, entry.zero]);
    assert.deepEqual(allocated, [[MiB, MiB / 2, false], [1792 * 1024, 256 * 1024, false], [4 * MiB, MiB, true], [8 * MiB, 64 * 1024, false]]);
    assert.ok(qemuMap.filter((entry) => !entry.data).every((entry) => entry.zero), 'every hole reads as zeroes');
    assert.ok(sparse.counters.blockStatuses >= 2);
  });

  test('libnbd: reads come as data and hole chunks, block status and FAST_ZERO work', async () => {
    const result = await python(`${pythonPrelude.replace('h.connect_uri', 'h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\nh.connect_uri')}
chunks = []
def chunk(subbuf, offset, status, error):
    chunks.append([offset, len(subbuf), {nbd.READ_DATA: "data", nbd.READ_HOLE: "hole"}.get(status, status)])
    return 0
h.pwrite(b"\\x07" * 8192, 65536)
buf = h.pread_structured(4 * 65536, 0, chunk)
extents = []
def extent(metacontext, offset, entries, error):
    extents.append([metacontext] + list(entries))
    return 0
h.block_status(4 * 65536, 0, extent)
print(json.dumps({
    "structured": h.get_structured_replies_negotiated(),
    "chunks": chunks,
    "data": buf[65536:65536 + 8192] == b"\\x07" * 8192 and buf[:65536] == bytes(65536),
    "extents": extents,
    "fastZero": attempt(lambda: h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)),
}))
h.shutdown()
`, uri('sparse-copy'));
    assert.deepEqual(result, {
      structured: true,
      chunks: [[0, 65536, 'hole'], [65536, 8192, 'data'], [65536 + 8192, 3 * 65536 - 8192, 'hole']],
      data: true,
      extents: [['base:allocation', 65536, 3, 8192, 0, 3 * 65536 - 8192, 3]],
      fastZero: 'ok',
    });
    assert.equal(exports.sparseCopy.counters.sparseReads, 1);
  });

  test('FAST_ZERO: qemu-io gets ENOTSUP from an export that cannot zero fast; qemu-img still fills it', async () => {
    const refused = await run('qemu-io', ['-f', 'raw', '-c', 'write -z -n 0 64k', uri('slow-zero')]);
    assert.match(refused.stdout + refused.stderr, /Operation not supported/);
    assert.equal(exports.slowZero.counters.fastWriteZeroes, 1);
    assert.equal(exports.slowZero.counters.writeZeroes, 0, 'refused fast, nothing was zeroed');
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -z -n 0 64k', uri('sparse')]);
    const image = Buffer.alloc(4 * MiB);
    randomBytes(MiB).copy(image, 0);
    randomBytes(MiB / 2).copy(image, 3 * MiB);
    const source = join(directory, 'slow-zero-source.img');
    await writeFile(source, image);
    exports.slowZero.load(0, Buffer.alloc(4 * MiB, 0xee));
    await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', source, uri('slow-zero')]);
    assert.ok(exports.slowZero.data.equals(image), 'the zero ranges were written anyway');
  });

  test('nbdcopy of a sparse file keeps its holes as holes', async () => {
    const source = join(directory, 'sparse-source.img');
    const file = await openFile(source, 'w');
    await file.write(Buffer.alloc(MiB, 0x42), 0, MiB, 2 * MiB);
    await file.write(Buffer.alloc(4096, 0x43), 0, 4096, 12 * MiB);
    await file.close();
    await truncate(source, 16 * MiB);
    exports.sparseCopy.load(0, Buffer.alloc(16 * MiB, 0xff));
    await runOk('nbdcopy', [source, uri('sparse-copy')]);
    assert.ok(exports.sparseCopy.data.equals(await readFile(source)));
    const map = JSON.parse((await runOk('nbdinfo', ['--map', '--json', uri('sparse-copy')])).stdout) as { offset: number; length: number; description: string }[];
    const holes = map.filter((entry) => entry.description === 'hole,zero').reduce((sum, entry) => sum + entry.length, 0);
    assert.ok(holes >= 14 * MiB, `only ${holes} bytes are holes after copying a file that is 15 MiB of holes`);
  });

  test('a filesystem: nbdfuse exposes the export as a file, mkfs.ext4, fuse2fs mounts it twice, e2fsck passes', async () => {
    const base = join(directory, 'fs');
    await filesystemRoundTrip(uri('filesystem'), base);
    // The filesystem is in the export itself, not in some cache on the way: check a copy of its bytes.
    const copy = join(base, 'copy.img');
    await writeFile(copy, exports.filesystem.data);
    await runOk('e2fsck', ['-fn', copy], 60_000);
    assert.equal((await runOk('debugfs', ['-R', 'cat /dir/nested.txt', copy])).stdout, 'nested\n');
    assert.ok(exports.filesystem.counters.flushes > 0, 'the filesystem tools flushed');
  });
});

describe('real NBD clients over TLS', () => {
  const logs: string[] = [];
  const disk = new MemoryExport({ name: 'disk', sizeBytes: 8 * MiB });
  let server: NbdServer;
  let directory: string;
  let certificates: TestCertificates;
  const tlsUri = (name: string, certificateDirectory = certificates.directory): string => `nbds://${server.address}/${name}?tls-certificates=${certificateDirectory}`;
  /** qemu's --object for the client's credentials (the directory holds ca-cert.pem, client-cert.pem, client-key.pem). */
  const qemuTls = (_name: string): string[] => ['--object', `tls-creds-x509,id=tls0,dir=${certificates.directory},endpoint=client`];
  const nbdOptions = (name: string): string => `driver=nbd,host=127.0.0.1,port=${server.address.split(':')[1]},export=${name},tls-creds=tls0`;

  before(async () => {
    directory = await mkdtemp(join(tmpdir(), 'shale-nbd-tls-clients-'));
    requireTool('openssl');
    certificates = await makeTestCertificates(join(directory, 'certificates'));
    server = await startNbdServer(nodeEnv, {
      listen: '127.0.0.1:0',
      provider: new MemoryExportProvider([disk]),
      log: (message) => logs.push(message),
      tls: { mode: 'require', certFile: certificates.serverCertFile, keyFile: certificates.serverKeyFile, caFile: certificates.caFile },
    });
  });

  after(async () => {
    await server.close();
    await rm(directory, { recursive: true, force: true });
  });

  test('nbdinfo over TLS with a client certificate; plaintext and a certificate from another CA are refused', async () => {
    const info = await runOk('nbdinfo', [tlsUri('disk')]);
    assert.match(info.stdout, /with TLS/);
    assert.match(info.stdout, /export-size: 8388608/);
    const plain = await run('nbdinfo', [`nbd://${server.address}/disk`]);
    assert.notEqual(plain.code, 0);
    const stranger = await run('nbdinfo', [tlsUri('disk', certificates.strangerDirectory)]);
    assert.notEqual(stranger.code, 0);
    await waitFor('the refusals in the log', () => logs.some((line) => /before STARTTLS/.test(line)) && logs.some((line) => /handshake \(TLS\)/.test(line)));
  });

  test('qemu-img converts and compares, nbdcopy copies, all over TLS', async () => {
    const image = imageBytes(8 * MiB);
    const source = join(directory, 'source.img');
    const back = join(directory, 'back.img');
    await writeFile(source, image);
    await runOk('qemu-img', ['convert', '-n', '-f', 'raw', qemuTls('disk')[0]!, qemuTls('disk')[1]!, source, '--target-image-opts', nbdOptions('disk')]);
    assert.ok(disk.data.equals(image));
    // qemu-img compare takes --image-opts for both images or for neither.
    await runOk('qemu-img', ['compare', qemuTls('disk')[0]!, qemuTls('disk')[1]!, '--image-opts', `driver=raw,file.driver=file,file.filename=${source}`, nbdOptions('disk')]);
    disk.load(MiB, Buffer.from([disk.data[MiB]! ^ 1]));
    const differing = await run('qemu-img', ['compare', qemuTls('disk')[0]!, qemuTls('disk')[1]!, '--image-opts', `driver=raw,file.driver=file,file.filename=${source}`, nbdOptions('disk')]);
    assert.equal(differing.code, 1, 'qemu-img compare over TLS sees a changed byte');
    disk.load(0, image);
    await runOk('nbdcopy', [tlsUri('disk'), back]);
    assert.ok((await readFile(back)).equals(image));
  });
});
