/**
 * `shale store --disk PATH[:SIZE] [--format] [--sparse]` as an operator runs it (a real process
 * against a real conductor): a new disk file is created and formatted only with --format, with its
 * blocks allocated (fallocate) unless --sparse; a file that is not blank is never formatted; a disk
 * of another cluster, of an unknown format version, or holding data Shale does not recognise is
 * refused with a clear error and a non-zero exit, its bytes untouched.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { startConductor, type Conductor } from '../conductor/conductor.ts';
import { nodeEnv } from '../env/node/node-env.ts';
import { MiB } from '../lib/units.ts';
import { StoreEngine } from './engine/engine.ts';
import { decodeSuperblock, encodeSuperblock } from './engine/format.ts';
import { MAIN, temporaryDirectory } from '../../test/harness.ts';

const digest = (path: string): string => createHash('sha256').update(readFileSync(path)).digest('hex');

describe('shale store --disk', () => {
  const dir = temporaryDirectory('store-disk');
  let conductor: Conductor;
  let api: string;

  before(async () => {
    conductor = await startConductor(nodeEnv, { metaPath: join(dir.path, 'meta.db'), listen: '127.0.0.1:0', heartbeatTimeoutMs: 5000, defaultReplicas: 1, pgCount: 8 });
    api = `http://${conductor.address}`;
  });
  after(async () => {
    await conductor.close();
    dir.remove();
  });

  /** Runs `shale store` until it says it serves (then SIGTERM: a clean stop) or exits on its own. */
  const store = (...args: string[]): Promise<{ code: number; output: string }> => new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [MAIN, 'store', '--listen', '127.0.0.1:0', '--conductor', api, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`shale store ${args.join(' ')}: no answer in 60 s\n${output}`));
    }, 60_000);
    const collect = (chunk: Buffer): void => {
      output += chunk.toString();
      if (/serving/.test(output)) child.kill('SIGTERM');
    };
    child.stdout.on('data', collect);
    child.stderr.on('data', collect);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? 128, output });
    });
  });

  test('--format makes a new disk file of SIZE with its blocks allocated; --sparse leaves it sparse', async () => {
    const allocated = join(dir.path, 'allocated.img');
    const served = await store('--disk', `${allocated}:128M`, '--format');
    assert.match(served.output, /serving/);
    assert.equal(statSync(allocated).size, 128 * MiB);
    const blocks = statSync(allocated).blocks * 512;
    assert.ok(blocks >= 120 * MiB, `allocated ${blocks} bytes of 128 MiB (fallocate)`);

    const sparse = join(dir.path, 'sparse.img');
    const servedSparse = await store('--disk', `${sparse}:128M`, '--format', '--sparse');
    assert.match(servedSparse.output, /serving/);
    assert.equal(statSync(sparse).size, 128 * MiB);
    assert.ok(statSync(sparse).blocks * 512 < 8 * MiB, 'a sparse disk file holds only what was written');

    // The same file again, with --format: it is a Shale disk of this cluster now, opened, not reformatted.
    const uuid = decodeSuperblock(readFileSync(allocated).subarray(0, 8192));
    assert.ok(uuid.ok);
    const again = await store('--disk', allocated, '--format');
    assert.match(again.output, /serving/);
    const after = decodeSuperblock(readFileSync(allocated).subarray(0, 8192));
    assert.ok(after.ok && after.superblock.diskUuid === uuid.superblock.diskUuid, 'not reformatted');
  });

  test('without --format a missing disk is an error; a new file needs a size', async () => {
    const missing = await store('--disk', join(dir.path, 'missing.img'));
    assert.notEqual(missing.code, 0);
    assert.match(missing.output, /no such file/);
    const sizeless = await store('--disk', join(dir.path, 'sizeless.img'), '--format');
    assert.notEqual(sizeless.code, 0);
    assert.match(sizeless.output, /needs a size/);
  });

  test('a disk of another cluster, of an unknown format version, or holding other data is refused and left untouched', async () => {
    const foreign = join(dir.path, 'foreign.img');
    await StoreEngine.format(nodeEnv, foreign, { sizeBytes: 96 * MiB, clusterId: 'some-other-cluster' });
    const unknown = join(dir.path, 'v2.img');
    await StoreEngine.format(nodeEnv, unknown, { sizeBytes: 96 * MiB, clusterId: 'c' });
    const image = readFileSync(unknown);
    const decoded = decodeSuperblock(image);
    assert.ok(decoded.ok);
    const v2 = encodeSuperblock({ ...decoded.superblock, formatVersion: 2 });
    v2.copy(image, 0);
    v2.copy(image, 4096);
    writeFileSync(unknown, image);
    const other = join(dir.path, 'other.img');
    const garbage = Buffer.alloc(96 * MiB);
    garbage.write('not a Shale disk: somebody else\'s data', 0);
    writeFileSync(other, garbage);

    for (const [path, message] of [[foreign, /belongs to cluster "some-other-cluster"/], [unknown, /format version 2/], [other, /no valid Shale superblock/]] as const) {
      const before = digest(path);
      const result = await store('--disk', `${path}:128M`, '--format');
      assert.notEqual(result.code, 0, `${path}: refused`);
      assert.match(result.output, message);
      assert.equal(digest(path), before, `${path}: untouched`);
      assert.equal(statSync(path).size, 96 * MiB, `${path}: not extended`);
    }
  });
});
