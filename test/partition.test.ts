/**
 * A network partition in Linux network namespaces (needs root and `ip`): store 3 and the volume's
 * old writer (an NBD gateway, with its qemu-io client) live in their own namespace, joined to the
 * rest (conductor, stores 1 and 2, a second gateway) by a veth pair. The link goes down; the old
 * writer keeps writing (reaching only store 3); the other side marks store 3 down, a new gateway
 * takes the volume over and writes. The link comes back: store 3 rejoins and resyncs. After that no
 * stale write is visible anywhere — not through the new gateway, not on any replica (a scrub finds
 * them identical), not on store 3 alone — and the old writer is fenced.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { ClusterStatus, ScrubResult } from '../src/conductor/api/types.ts';
import { MAIN, requireTool, run, shale, temporaryDirectory, waitFor } from './harness.ts';

const suffix = `${process.pid % 100000}`;
const namespace = `shale-part-${suffix}`;
const hostSide = `shp${suffix}a`;
const nsSide = `shp${suffix}b`;
// A /24 of 10.0.0.0/8 chosen by pid, so parallel runs on one machine do not collide.
const net = `10.${200 + (process.pid % 50)}.${Math.floor(process.pid / 50) % 250}`;
const hostIp = `${net}.1`;
const nsIp = `${net}.2`;

interface Daemon {
  child: ChildProcess;
  output: string;
}

function daemon(args: string[], env: NodeJS.ProcessEnv, inNamespace = false): Daemon {
  const command = inNamespace ? 'ip' : process.execPath;
  const full = inNamespace ? ['netns', 'exec', namespace, process.execPath, MAIN, ...args] : [MAIN, ...args];
  const child = spawn(command, full, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  const entry: Daemon = { child, output: '' };
  child.stdout!.on('data', (chunk: Buffer) => (entry.output += chunk.toString()));
  child.stderr!.on('data', (chunk: Buffer) => (entry.output += chunk.toString()));
  return entry;
}

async function ip(...args: string[]): Promise<void> {
  const result = await run('ip', args);
  assert.equal(result.status, 0, `ip ${args.join(' ')}: ${result.stderr}`);
}

const canRun = process.getuid?.() === 0;

describe('partition in network namespaces: a store and an old writer cut off together', { skip: canRun ? false : 'needs root for ip netns' }, () => {
  const dir = temporaryDirectory('partition');
  const daemons: Daemon[] = [];
  let api = '';
  let token = '';
  let oldGateway: Daemon;
  let newGateway: Daemon;
  let oldUri = '';
  let newUri = '';

  before(async () => {
    requireTool('ip');
    for (const tool of ['qemu-io']) requireTool(tool);
    await run('ip', ['netns', 'del', namespace]);
    await ip('netns', 'add', namespace);
    await ip('link', 'add', hostSide, 'type', 'veth', 'peer', 'name', nsSide);
    await ip('link', 'set', nsSide, 'netns', namespace);
    await ip('addr', 'add', `${hostIp}/24`, 'dev', hostSide);
    await ip('link', 'set', hostSide, 'up');
    await ip('netns', 'exec', namespace, 'ip', 'addr', 'add', `${nsIp}/24`, 'dev', nsSide);
    await ip('netns', 'exec', namespace, 'ip', 'link', 'set', nsSide, 'up');
    await ip('netns', 'exec', namespace, 'ip', 'link', 'set', 'lo', 'up');

    const conductor = daemon(['conductor', '--meta', `sqlite:${join(dir.path, 'meta.db')}`, '--listen', `${hostIp}:0`,
      '--heartbeat-timeout', '2s', '--down-out-interval', '10m', '--scrub-interval', '0'], {});
    daemons.push(conductor);
    await waitFor('the conductor', async () => /admin token[^\n]*\n\s+(\S+)/.exec(conductor.output)?.[1], 30_000, 50);
    token = /admin token[^\n]*\n\s+(\S+)/.exec(conductor.output)![1]!;
    // This test file runs in its own process: the CLI calls below take the token from here.
    process.env.SHALE_TOKEN = token;
    api = await waitFor('the conductor\'s address', async () => /listening on (http:\/\/\S+)/.exec(conductor.output)?.[1], 30_000, 50);
    const env = { SHALE_TOKEN: token };
    for (const index of [1, 2, 3]) {
      const inNamespace = index === 3;
      daemons.push(daemon(['store', '--disk', `${join(dir.path, `store-${index}.img`)}:512M`, '--format', '--listen', `${inNamespace ? nsIp : hostIp}:0`,
        '--conductor', api, '--domain', `host-${index}`], env, inNamespace));
      // Registration order gives store ids 1, 2, 3.
      await waitFor(`store ${index}`, async () => {
        const list = await shale(api, 'store', 'list', '--json');
        return list.status === 0 && (JSON.parse(list.stdout) as { stores: unknown[] }).stores.length === index;
      }, 30_000, 100);
    }
    oldGateway = daemon(['nbd', '--conductor', api, '--listen', `${nsIp}:0`, '--owner', 'old-writer', '--io-timeout', '4s'], env, true);
    daemons.push(oldGateway);
    oldUri = `nbd://${await waitFor('the old gateway', async () => /listening on (\S+)/.exec(oldGateway.output)?.[1], 30_000, 50)}/vol-part`;
  });

  after(async () => {
    for (const entry of daemons.reverse()) entry.child.kill('SIGKILL');
    await run('ip', ['netns', 'del', namespace]);
    await run('ip', ['link', 'del', hostSide]);
    dir.remove();
  });

  // The old writer's I/O can hang on requests to unreachable stores (each times out after 30 s) before its I/O timeout applies.
  const qemuIoOld = (...commands: string[]): ReturnType<typeof run> =>
    run('ip', ['netns', 'exec', namespace, 'qemu-io', '-f', 'raw', ...commands.flatMap((command) => ['-c', command]), oldUri], { timeoutMs: 300_000 });
  const qemuIoNew = (...commands: string[]): ReturnType<typeof run> =>
    run('qemu-io', ['-f', 'raw', ...commands.flatMap((command) => ['-c', command]), newUri], { timeoutMs: 60_000 });

  test('after healing, no stale write of the old writer is visible anywhere', async () => {
    assert.equal((await shale(api, 'volume', 'create', 'vol-part', '--size', '16M', '--replicas', '3')).status, 0);
    // Acknowledged on all three replicas before the partition.
    let result = await qemuIoOld('write -P 0x41 0 64k', 'write -P 0x41 1M 64k', 'flush');
    assert.equal(result.status, 0, result.stdout + result.stderr + oldGateway.output);

    // The partition: store 3 and the old writer are alone.
    await ip('link', 'set', hostSide, 'down');
    // The old writer keeps writing: only store 3 can take it, so it waits and fails (NO_QUORUM after 4 s).
    const stale = qemuIoOld('write -P 0x53 0 64k', 'write -P 0x53 1M 64k');
    await waitFor('store 3 to be marked down', async () => {
      const status = await shale(api, 'cluster', 'status', '--json');
      return status.status === 0 && (JSON.parse(status.stdout) as ClusterStatus).stores.down === 1;
    }, 30_000, 200);
    // Give the stale writes time to reach store 3 (the one store the old writer can reach).
    await new Promise((resolve) => setTimeout(resolve, 3000));

    // The majority side: a new gateway takes the volume over and writes one of the two ranges.
    newGateway = daemon(['nbd', '--conductor', api, '--listen', `${hostIp}:0`, '--owner', 'new-writer', '--takeover'], { SHALE_TOKEN: token });
    daemons.push(newGateway);
    newUri = `nbd://${await waitFor('the new gateway', async () => /listening on (\S+)/.exec(newGateway.output)?.[1], 30_000, 50)}/vol-part`;
    result = await qemuIoNew('read -P 0x41 0 64k', 'read -P 0x41 1M 64k', 'write -P 0x4e 0 64k', 'flush');
    assert.equal(result.status, 0, result.stdout + result.stderr + newGateway.output);
    assert.doesNotMatch(result.stdout, /Pattern verification failed/, 'the new owner never sees the stale writes');

    // Heal: store 3 rejoins, resyncs (rolling back what only it has), and is clean again.
    await ip('link', 'set', hostSide, 'up');
    await waitFor('every PG clean with store 3 back', async () => {
      const status = await shale(api, 'cluster', 'status', '--json');
      if (status.status !== 0) return false;
      const parsed = JSON.parse(status.stdout) as ClusterStatus;
      return parsed.stores.up === 3 && parsed.health === 'ok';
    }, 90_000, 250);
    // The old writer's writes end without an acknowledgement (NO_QUORUM or FENCED), and it is fenced for good.
    result = await stale;
    assert.doesNotMatch(result.stdout, /wrote 65536\/65536 bytes at offset 0\n[\s\S]*wrote 65536\/65536 bytes at offset 1048576/, 'the stale writes were not acknowledged');
    result = await qemuIoOld('write -P 0x5a 2M 4k');
    result = await qemuIoNew('read -P 0x4e 0 64k', 'read -P 0x41 1M 64k', 'read -P 0 2M 4k');
    assert.equal(result.status, 0, result.stdout + result.stderr);
    assert.doesNotMatch(result.stdout, /Pattern verification failed/, 'no stale write through the new owner');
    const scrub = await shale(api, 'scrub', 'vol-part', '--json');
    assert.equal(scrub.status, 0, scrub.stderr);
    const parsed = JSON.parse(scrub.stdout) as ScrubResult;
    assert.ok(parsed.blocks >= 32, JSON.stringify(parsed));
    assert.equal(parsed.inconsistentBlocks, 0, `every replica identical: ${JSON.stringify(parsed)}`);

    // Store 3 alone serves the volume: it holds the new data, not the stale writes.
    for (const entry of daemons.slice(1, 3)) entry.child.kill('SIGKILL');
    result = await qemuIoNew('read -P 0x4e 0 64k', 'read -P 0x41 1M 64k');
    assert.equal(result.status, 0, result.stdout + result.stderr);
    assert.doesNotMatch(result.stdout, /Pattern verification failed/, 'store 3 alone holds no stale write');
    const store3 = daemons[3]!.output;
    process.stdout.write(`# store 3 after the partition: ${/rolled back (\d+) blocks/.exec(store3)?.[1] ?? 0} blocks rolled back\n`);
    if (process.env.PARTITION_DEBUG) process.stdout.write(`${oldGateway.output}\n----\n${store3}\n`);
  });
});
