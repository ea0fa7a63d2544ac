/**
 * The admin verbs against a real conductor on 127.0.0.1: in-process with captured output, and
 * once as a real child process (exit codes, stderr line).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Command } from 'commander';
import type { ClusterStatus, VolumeInfo } from '../conductor/api/types.ts';
import { type Conductor, startConductor } from '../conductor/conductor.ts';
import { nodeEnv } from '../env/node/node-env.ts';
import { normalizeApiUrl } from './admin-api.ts';
import { type AdminIo, failureExitCode, registerAdminCommands } from './admin.ts';

const directory = mkdtempSync(join(tmpdir(), 'shale-cli-'));
let conductor: Conductor;
let apiUrl: string;

before(async () => {
  conductor = await startConductor(nodeEnv, { metaPath: join(directory, 'meta.db'), listen: '127.0.0.1:0', pgCount: 16 });
  apiUrl = `http://${conductor.address}`;
  for (const n of [1, 2, 3]) {
    const result = await nodeEnv.net.httpRequest('POST', `${apiUrl}/api/v1/stores/register`, {
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
    env: { SHALE_API: apiUrl, ...env },
    fetch: (input, init) => fetch(input, init),
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
    assert.match(status.stdout, /default.*3.*2.*16.*16.*0/);
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
        env: { ...process.env, SHALE_API: apiUrl }, cwd: fileURLToPath(new URL('../..', import.meta.url)),
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
