/**
 * The admin verbs against a real conductor on 127.0.0.1: in-process with captured output, and
 * once as a real child process (exit codes, stderr line).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Command } from 'commander';
import type { ClusterStatus, DiskInfo, PoolDetail, PoolInfo, VolumeInfo } from '../conductor/api/types.ts';
import { type Conductor, startConductor } from '../conductor/conductor.ts';
import { nodeEnv } from '../env/node/node-env.ts';
import { normalizeApiUrl } from './admin-api.ts';
import { type AdminIo, failureExitCode, registerAdminCommands } from './admin.ts';
import { configDirectory, endpointFileName, findToken, readTextFile, saveToken } from './token.ts';

const directory = mkdtempSync(join(tmpdir(), 'shale-cli-'));
/** The CLI finds the token here, as `shale conductor` saved it. */
const configDir = join(directory, 'config');
let conductor: Conductor;
let apiUrl: string;
let token: string;

before(async () => {
  conductor = await startConductor(nodeEnv, {
    metaPath: join(directory, 'meta.db'), listen: '127.0.0.1:0', pgCount: 16, auth: 'token',
    adminToken: { onCreated: async (made) => void saveToken({ SHALE_CONFIG_DIR: configDir }, made, []) },
  });
  apiUrl = `http://${conductor.address}`;
  token = conductor.newAdminToken!;
  for (const n of [1, 2, 3]) {
    const result = await nodeEnv.net.httpRequest('POST', `${apiUrl}/api/v1/stores/register`, {
      headers: { authorization: `Bearer ${token}` },
      body: JSON.stringify({
        diskUuid: `disk-${n}`, clusterId: conductor.clusterId, address: `127.0.0.1:${30000 + n}`, domain: `host-${n}`,
        disks: [{ uuid: `disk-${n}`, path: `/d${n}`, capacityBytes: 64 * 2 ** 30, usedBytes: 2 ** 30 }],
      }),
    });
    assert.equal(result.status, 200);
  }
});

after(async () => {
  await conductor.close();
  rmSync(directory, { recursive: true, force: true });
});

interface CliResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

async function shale(args: string[], env: Record<string, string | undefined> = {}): Promise<CliResult> {
  let stdout = '';
  let stderr = '';
  let exitCode = 0;
  const io: AdminIo = {
    stdout: (text) => void (stdout += text),
    stderr: (text) => void (stderr += text),
    stdoutIsTty: false,
    env: { SHALE_API: apiUrl, SHALE_CONFIG_DIR: configDir, ...env },
    fetch: (input, init) => fetch(input, init),
    readTextFile,
    fail(error) {
      exitCode = failureExitCode(this, error);
    },
  };
  const program = new Command('shale').exitOverride().configureOutput({ writeOut: io.stdout, writeErr: io.stderr });
  registerAdminCommands(program, io);
  try {
    await program.parseAsync(args, { from: 'user' });
  } catch (error) {
    exitCode = (error as { exitCode?: number }).exitCode ?? 1;
  }
  return { exitCode, stdout, stderr };
}

describe('shale admin verbs', () => {
  it('creates a volume and lists it as a table and as JSON', async () => {
    const created = await shale(['volume', 'create', 'web-01', '--size', '10G']);
    assert.equal(created.exitCode, 0, created.stderr);
    assert.match(created.stdout, /created volume web-01 \(id \d+\): 10\.0 GiB, 3 replicas in pool default, chunk 4\.0 MiB/);

    const withOptions = await shale(['volume', 'create', 'logs', '--size', '512M', '--replicas', '3', '--chunk-size', '64K', '--json']);
    assert.equal(withOptions.exitCode, 0, withOptions.stderr);
    const logs = JSON.parse(withOptions.stdout) as VolumeInfo;
    assert.equal(logs.sizeBytes, 512 * 2 ** 20);
    assert.equal(logs.chunkSizeBytes, 65536);

    const table = await shale(['volume', 'list']);
    assert.equal(table.exitCode, 0);
    assert.match(table.stdout, /NAME.*ID.*SIZE.*REPLICAS.*POOL/);
    assert.match(table.stdout, /web-01.*10\.0 GiB.*3.*default/);
    assert.match(table.stdout, /logs.*512 MiB.*64\.0 KiB/);
    assert.doesNotMatch(table.stdout, /\u001b\[/, 'no colour codes when stdout is not a terminal');

    const json = await shale(['volume', 'list', '--json']);
    const parsed = JSON.parse(json.stdout) as { volumes: VolumeInfo[] };
    assert.deepEqual(parsed.volumes.map((v) => v.name), ['web-01', 'logs']);
    assert.equal(parsed.volumes[0]!.sizeBytes, 10 * 2 ** 30);

    const info = await shale(['volume', 'info', 'web-01']);
    assert.equal(info.exitCode, 0);
    assert.match(info.stdout, /^name: +web-01$/m);
    assert.match(info.stdout, /^size: +10\.0 GiB \(10737418240 bytes\)$/m);
    assert.match(info.stdout, /^owner: +-$/m);
    const infoJson = JSON.parse((await shale(['volume', 'info', 'web-01', '--json'])).stdout) as VolumeInfo;
    assert.equal(infoJson.name, 'web-01');

    const deleted = await shale(['volume', 'delete', 'logs']);
    assert.equal(deleted.exitCode, 0);
    assert.equal(deleted.stdout, 'deleted volume logs\n');
    assert.deepEqual(JSON.parse((await shale(['volume', 'list', '--json'])).stdout).volumes.map((v: VolumeInfo) => v.name), ['web-01']);
  });

  it('shows cluster status and stores', async () => {
    const status = await shale(['cluster', 'status']);
    assert.equal(status.exitCode, 0, status.stderr);
    assert.match(status.stdout, /^health: +ok$/m);
    assert.match(status.stdout, /^stores: +3 up, 0 down \(3 total\)$/m);
    assert.match(status.stdout, /^capacity: +192 GiB$/m);
    assert.match(status.stdout, /default.*3.*2.*16.*host.*16.*0/);
    assert.match(status.stdout, /^conductor: +http:\/\/127\.0\.0\.1:\d+ \(leader\)$/m);
    const json = JSON.parse((await shale(['cluster', 'status', '--json'])).stdout) as ClusterStatus;
    assert.equal(json.clusterId, conductor.clusterId);

    const stores = await shale(['store', 'list']);
    assert.equal(stores.exitCode, 0);
    assert.match(stores.stdout, /ID.*ADDRESS.*STATE.*CAPACITY/);
    for (const n of [1, 2, 3]) assert.match(stores.stdout, new RegExp(`127\\.0\\.0\\.1:3000${n}.*host-${n}.*up.*64\\.0 GiB.*1\\.0 GiB.*1\\.6%`));
    assert.equal(JSON.parse((await shale(['store', 'list', '--json'])).stdout).stores.length, 3);
  });

  it('fails with one line and the exit code of the error', async () => {
    const missing = await shale(['volume', 'info', 'nope']);
    assert.equal(missing.exitCode, 3);
    assert.equal(missing.stdout, '');
    assert.equal(missing.stderr, 'shale: no volume named nope (NOT_FOUND)\n');

    const duplicate = await shale(['volume', 'create', 'web-01', '--size', '1G']);
    assert.equal(duplicate.exitCode, 4);
    assert.match(duplicate.stderr, /^shale: .*already exists \(ALREADY_EXISTS\)\n$/);

    for (const args of [
      ['volume', 'create', 'odd', '--size', '4097'],
      ['volume', 'create', 'nosize'],
      ['volume', 'create', 'x', '--size', '1G', '--replicas', 'three'],
      ['volume', 'create', 'x@y', '--size', '1G'],
      ['volume', 'create', 'x', '--size', '1G', '--chunk-size', '3M'],
    ]) {
      const result = await shale(args);
      assert.equal(result.exitCode, 2, `${args.join(' ')}: ${result.stderr}`);
      assert.match(result.stderr, /^shale: .* \(INVALID_ARGUMENT\)\n$/);
    }

    const tooMany = await shale(['volume', 'create', 'x', '--size', '1G', '--replicas', '5']);
    assert.equal(tooMany.exitCode, 13);
    assert.match(tooMany.stderr, /\(NOT_READY\)/);
  });

  it('says UNAVAILABLE with a hint when the API cannot be reached, and honours SHALE_API and --api', async () => {
    const probe = await nodeEnv.net.listen('127.0.0.1:0', () => {});
    const closedUrl = `http://${probe.address}`;
    await probe.close();
    const down = await shale(['volume', 'list'], { SHALE_API: closedUrl });
    assert.equal(down.exitCode, 13);
    assert.match(down.stderr, /^shale: cannot reach the Shale API at http:\/\/127\.0\.0\.1:\d+ .*`shale up`.* \(UNAVAILABLE\)\n$/);
    // --api wins over SHALE_API, and takes host:port without a scheme.
    const viaFlag = await shale(['volume', 'list', '--json', '--api', conductor.address], { SHALE_API: closedUrl });
    assert.equal(viaFlag.exitCode, 0, viaFlag.stderr);
    const badUrl = await shale(['volume', 'list', '--api', 'ftp://x']);
    assert.equal(badUrl.exitCode, 2);
  });

  it('finds the token in SHALE_TOKEN, the file for the endpoint, or the config directory\'s token file', async () => {
    const home = join(directory, 'home');
    assert.equal(configDirectory({ HOME: home }), join(home, '.config', 'shale'));
    assert.equal(configDirectory({ HOME: home, XDG_CONFIG_HOME: '/x' }), '/x/shale');
    assert.equal(configDirectory({ SHALE_CONFIG_DIR: '/c', XDG_CONFIG_HOME: '/x' }), '/c');
    assert.equal(endpointFileName('http://127.0.0.1:49180/api/v1'), '127.0.0.1_49180');
    assert.equal(endpointFileName('[::1]:5'), '___1__5');
    const dir = join(directory, 'lookup');
    const path = saveToken({ SHALE_CONFIG_DIR: dir }, 'main-token', ['http://10.0.0.1:49180']);
    assert.equal((statSync(path).mode & 0o777).toString(8), '600');
    assert.equal((statSync(join(dir, 'tokens', '10.0.0.1_49180')).mode & 0o777).toString(8), '600');
    saveToken({ SHALE_CONFIG_DIR: dir }, 'other-token', ['http://10.0.0.2:49180']);
    const env = { SHALE_CONFIG_DIR: dir };
    assert.equal(findToken(env, 'http://10.0.0.1:49180', readTextFile).token, 'main-token', 'the file for the endpoint wins');
    assert.equal(findToken(env, 'http://10.0.0.3:49180', readTextFile).token, 'other-token', 'else the last saved');
    assert.equal(findToken({ ...env, SHALE_TOKEN: 'from-env' }, 'http://10.0.0.1:49180', readTextFile).token, 'from-env');
    assert.equal(findToken({ SHALE_CONFIG_DIR: join(directory, 'empty') }, 'http://h:1', readTextFile).token, undefined);
  });

  it('refuses without a token or with a wrong one, with a hint and exit code 16', async () => {
    const none = await shale(['volume', 'list'], { SHALE_CONFIG_DIR: join(directory, 'nowhere') });
    assert.equal(none.exitCode, 16);
    assert.match(none.stderr, /^shale: no admin token found \(looked in SHALE_TOKEN, .*nowhere.*\): set SHALE_TOKEN.* \(UNAUTHENTICATED\)\n$/);
    const wrong = await shale(['volume', 'create', 'x', '--size', '1G'], { SHALE_TOKEN: 'shale_wrong' });
    assert.equal(wrong.exitCode, 16);
    assert.match(wrong.stderr, /not valid for this cluster.*\(token from SHALE_TOKEN\) \(UNAUTHENTICATED\)/);
    assert.doesNotMatch(wrong.stderr, new RegExp(token));
    const right = await shale(['volume', 'list', '--json'], { SHALE_TOKEN: token, SHALE_CONFIG_DIR: join(directory, 'nowhere') });
    assert.equal(right.exitCode, 0, right.stderr);
  });

  it('creates, lists and shows pools; places a volume in one; lists disks', async () => {
    const created = await shale(['pool', 'create', 'fast', '--replicas', '2', '--min-replicas', '2', '--pgs', '32', '--domain-level', 'host']);
    assert.equal(created.exitCode, 0, created.stderr);
    assert.equal(created.stdout, 'created pool fast (id 2): 2 replicas (min 2), 32 PGs over "host" domains\n');
    const createdJson = JSON.parse((await shale(['pool', 'create', 'wide', '--replicas', '3', '--json'])).stdout) as PoolInfo;
    assert.deepEqual([createdJson.replicas, createdJson.minReplicas, createdJson.pgCount], [3, 2, 16]);

    const table = await shale(['pool', 'list']);
    assert.equal(table.exitCode, 0, table.stderr);
    assert.match(table.stdout, /^POOL +ID +REPLICAS +MIN +PGS +DOMAIN +CLEAN +DEGRADED +PROVISIONED +USABLE +OVERCOMMIT$/m);
    assert.match(table.stdout, /^fast +2 +2 +2 +32 +host +32 +0 +0 B +\S+ \S+ +0\.00x$/m);
    assert.match(table.stdout, /^default +1 +3 +2 +16 +host +16 +0 +10\.0 GiB +\S+ \S+ +\d+\.\d\dx$/m);
    assert.deepEqual((JSON.parse((await shale(['pool', 'list', '--json'])).stdout) as { pools: PoolInfo[] }).pools.map((p) => p.name), ['default', 'fast', 'wide']);

    const info = await shale(['pool', 'info', 'fast', '--pgs']);
    assert.equal(info.exitCode, 0, info.stderr);
    assert.match(info.stdout, /^replicas: +2 \(writes complete on at least 2\)$/m);
    assert.match(info.stdout, /^PGs: +32: 32 clean, 0 degraded$/m);
    assert.match(info.stdout, /^STORE +PGS +PREFERRED$/m);
    assert.match(info.stdout, /^PG +EPOCH +REPLICAS$/m);
    assert.match(info.stdout, /^0 +\d+ +\d clean, \d clean$/m);
    const infoJson = JSON.parse((await shale(['pool', 'info', 'fast', '--json'])).stdout) as PoolDetail;
    assert.equal(infoJson.pgs.length, 32);

    const missing = await shale(['pool', 'create', 'p']);
    assert.equal(missing.exitCode, 2);
    assert.match(missing.stderr, /--replicas is required/);
    const duplicate = await shale(['pool', 'create', 'fast', '--replicas', '2']);
    assert.equal(duplicate.exitCode, 4);
    const unknown = await shale(['pool', 'info', 'nope']);
    assert.equal(unknown.exitCode, 3);

    const volume = await shale(['volume', 'create', 'in-fast', '--size', '1G', '--pool', 'fast']);
    assert.equal(volume.exitCode, 0, volume.stderr);
    assert.match(volume.stdout, /2 replicas in pool fast/);
    const noPool = await shale(['volume', 'create', 'x', '--size', '1G', '--pool', 'nope']);
    assert.equal(noPool.exitCode, 3);
    assert.equal(noPool.stderr, 'shale: no pool named nope (NOT_FOUND)\n');

    const disks = await shale(['disk', 'list']);
    assert.equal(disks.exitCode, 0, disks.stderr);
    assert.match(disks.stdout, /^STORE +ADDRESS +STATE +DOMAIN +DISK +PATH +CAPACITY +USED +USE% +LIVE$/m);
    assert.match(disks.stdout, /^2 +127\.0\.0\.1:30002 +up +host-2 +disk-2 +\/d2 +64\.0 GiB +1\.0 GiB +1\.6% +-$/m);
    const disksJson = JSON.parse((await shale(['disk', 'list', '--json'])).stdout) as { disks: DiskInfo[] };
    assert.deepEqual(disksJson.disks.map((d) => d.uuid), ['disk-1', 'disk-2', 'disk-3']);
  });

  it('resizes a volume: grows; shrinking is refused as not supported, size unchanged', async () => {
    assert.equal((await shale(['volume', 'create', 'elastic', '--size', '1G'])).exitCode, 0);
    const grown = await shale(['volume', 'resize', 'elastic', '--size', '2GiB']);
    assert.equal(grown.exitCode, 0, grown.stderr);
    assert.equal(grown.stdout, 'resized volume elastic: 1.0 GiB -> 2.0 GiB\n');
    const same = await shale(['volume', 'resize', 'elastic', '--size', '2G']);
    assert.equal(same.stdout, 'volume elastic is already 2.0 GiB\n');
    const shrink = await shale(['volume', 'resize', 'elastic', '--size', '512M', '--force']);
    assert.equal(shrink.exitCode, 14, 'NOT_SUPPORTED exits 14');
    assert.match(shrink.stderr, /^shale: shrinking volume elastic is not supported yet.*\(NOT_SUPPORTED\)\n$/);
    const after = await shale(['volume', 'info', 'elastic', '--json']);
    assert.equal((JSON.parse(after.stdout) as VolumeInfo).sizeBytes, 2 * 2 ** 30, 'the size is unchanged');
    const noSize = await shale(['volume', 'resize', 'elastic']);
    assert.equal(noSize.exitCode, 2);
    const bad = await shale(['volume', 'resize', 'elastic', '--size', '0']);
    assert.equal(bad.exitCode, 2);
    const missing = await shale(['volume', 'resize', 'nope', '--size', '1G']);
    assert.equal(missing.exitCode, 3);
  });

  it('follows a standby\'s redirect to the leader with the token, and tries the next of several --api URLs', async () => {
    const standby = createServer((request, response) => {
      response.writeHead(307, { location: `${apiUrl}${request.url}`, 'content-type': 'application/json' });
      response.end(JSON.stringify({ leader: apiUrl, message: 'this conductor does not lead' }));
    });
    await new Promise<void>((resolve) => standby.listen(0, '127.0.0.1', resolve));
    const standbyUrl = `http://127.0.0.1:${(standby.address() as AddressInfo).port}`;
    const probe = await nodeEnv.net.listen('127.0.0.1:0', () => {});
    const deadUrl = `http://${probe.address}`;
    await probe.close();
    try {
      const created = await shale(['volume', 'create', 'via-standby', '--size', '1G', '--api', `${deadUrl},${standbyUrl}`], { SHALE_TOKEN: token });
      assert.equal(created.exitCode, 0, created.stderr);
      assert.match(created.stdout, /created volume via-standby/);
    } finally {
      standby.close();
    }
  });

  it('normalizes API URLs', () => {
    assert.equal(normalizeApiUrl('127.0.0.1:49180'), 'http://127.0.0.1:49180');
    assert.equal(normalizeApiUrl('http://h:1/'), 'http://h:1');
    assert.equal(normalizeApiUrl('https://h/shale/api/v1/'), 'https://h/shale');
  });

  it('runs as a real process: JSON on stdout, exit code and one stderr line on failure', async () => {
    const adminUrl = pathToFileURL(fileURLToPath(new URL('./admin.ts', import.meta.url))).href;
    const script = `
      import { Command } from 'commander';
      import { registerAdminCommands } from ${JSON.stringify(adminUrl)};
      const program = new Command('shale').exitOverride();
      registerAdminCommands(program);
      await program.parseAsync(process.argv.slice(1), { from: 'user' });
    `;
    const runCli = (args: string[]): Promise<CliResult> => new Promise((resolve, reject) => {
      const child = spawn(process.execPath, ['--input-type=module', '-e', script, '--', ...args], {
        env: { ...process.env, SHALE_API: apiUrl, SHALE_CONFIG_DIR: configDir, SHALE_TOKEN: '' }, cwd: fileURLToPath(new URL('../..', import.meta.url)),
      });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (chunk: Buffer) => (stdout += chunk));
      child.stderr.on('data', (chunk: Buffer) => (stderr += chunk));
      child.on('error', reject);
      child.on('close', (code) => resolve({ exitCode: code ?? -1, stdout, stderr }));
    });
    const listed = await runCli(['volume', 'list', '--json']);
    assert.equal(listed.exitCode, 0, listed.stderr);
    assert.ok(Array.isArray(JSON.parse(listed.stdout).volumes));
    const missing = await runCli(['volume', 'info', 'nope']);
    assert.equal(missing.exitCode, 3);
    assert.equal(missing.stderr, 'shale: no volume named nope (NOT_FOUND)\n');
  });
});
