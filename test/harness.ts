/**
 * Helpers for integration tests: run `shale up` as a real child process in a temporary directory,
 * run the CLI and external tools (qemu-img, nbdinfo, fio), find free ports.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, fstatSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort } from '../src/conductor/testing/etcd-cluster.ts';

export { freePort };

export const MAIN = fileURLToPath(new URL('../src/cli/main.ts', import.meta.url));

// Tokens that `shale up` saves for the CLI go to a directory of the test run, not to ~/.config;
// one this file made is removed when the test process exits.
if (process.env.SHALE_CONFIG_DIR === undefined) {
  const configDir = mkdtempSync(join(tmpdir(), 'shale-config-'));
  process.env.SHALE_CONFIG_DIR = configDir;
  process.on('exit', () => rmSync(configDir, { recursive: true, force: true }));
}

export function temporaryDirectory(prefix: string): { path: string; remove(): void } {
  const path = mkdtempSync(join(tmpdir(), `shale-${prefix}-`));
  return { path, remove: () => rmSync(path, { recursive: true, force: true }) };
}

export interface RunResult {
  status: number;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion (async, so the event loop keeps serving in-process servers). */
export function run(command: string, args: readonly string[], options: { env?: NodeJS.ProcessEnv; timeoutMs?: number; input?: string } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env: { ...process.env, ...options.env }, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${command} ${args.join(' ')} timed out after ${options.timeoutMs ?? 120_000} ms\n${stdout}\n${stderr}`));
    }, options.timeoutMs ?? 120_000);
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ status: code ?? 128, stdout, stderr });
    });
    // A child that exits before reading its input closes the pipe: that is not an error here.
    child.stdin.on('error', () => {});
    child.stdin.end(options.input ?? '');
  });
}

/** Runs the shale CLI against `api`. */
export function shale(api: string, ...args: string[]): Promise<RunResult> {
  return run(process.execPath, [MAIN, ...args], { env: { SHALE_API: api } });
}

export { requireTool } from '../scripts/required-tools.ts';

/** How often start() picks new ports when another process took one of its own first. */
const UP_START_ATTEMPTS_MAX = 3;

/** A `shale up` running as a child process. */
export class ShaleUp {
  readonly dataDir: string;
  readonly extraArgs: string[];
  /** Ports given to the constructor, kept on every start; without them, start() picks free ones. */
  readonly #fixedPorts: { nbd: number; api: number } | undefined;
  nbdPort = 0;
  apiPort = 0;
  process: ChildProcess | undefined;
  output = '';

  constructor(dataDir: string, extraArgs: string[] = [], ports?: { nbd: number; api: number }) {
    this.dataDir = dataDir;
    this.extraArgs = extraArgs;
    this.#fixedPorts = ports;
  }

  get api(): string {
    return `http://127.0.0.1:${this.apiPort}`;
  }

  uri(volume: string): string {
    return `nbd://127.0.0.1:${this.nbdPort}/${volume}`;
  }

  /**
   * Starts `shale up` and resolves once it printed that it is up. A port picked here can be taken
   * by another process before shale up binds it; then it starts again on new ones.
   */
  async start(timeoutMs = 60_000): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      this.nbdPort = this.#fixedPorts?.nbd ?? await freePort();
      this.apiPort = this.#fixedPorts?.api ?? await freePort();
      try {
        return await this.#startOnce(timeoutMs);
      } catch (error) {
        const portTaken = this.#fixedPorts === undefined && /cannot listen on .*\(IN_USE\)/.test(this.output);
        if (!portTaken || attempt >= UP_START_ATTEMPTS_MAX) throw error;
        this.output = '';
      }
    }
  }

  async #startOnce(timeoutMs: number): Promise<void> {
    const child = spawn(process.execPath, [
      // The S3 gateway on any free port (tests run side by side); extraArgs may name one.
      MAIN, 'up', '--data', this.dataDir, '--nbd-port', String(this.nbdPort), '--api-port', String(this.apiPort), '--s3-listen', '127.0.0.1:0', ...this.extraArgs,
    ], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.process = child;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`shale up did not come up in ${timeoutMs} ms:\n${this.output}`)), timeoutMs);
      const onData = (chunk: Buffer): void => {
        this.output += chunk.toString();
        if (this.output.includes('Shale is up')) {
          clearTimeout(timer);
          resolve();
        }
      };
      child.stdout!.on('data', onData);
      child.stderr!.on('data', (chunk: Buffer) => (this.output += chunk.toString()));
      child.on('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`shale up exited with ${code} before it was up:\n${this.output}`));
      });
    });
  }

  /** SIGTERM, and the exit code once it has stopped. */
  async stop(timeoutMs = 30_000): Promise<number | null> {
    const child = this.process;
    if (!child || child.exitCode !== null) return child?.exitCode ?? null;
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    const code = await exited;
    clearTimeout(timer);
    return code;
  }

  /** The S3 endpoint `shale up` printed. */
  get s3Endpoint(): string {
    const match = /S3\s+(http:\/\/\S+)/.exec(this.output);
    if (!match) throw new Error(`shale up printed no S3 endpoint:\n${this.output}`);
    return match[1]!;
  }

  storePid(index: number): number {
    return Number(readFileSync(join(this.dataDir, `store-${index}`, 'store.pid'), 'utf8').trim());
  }
}

export async function waitFor<T>(what: string, probe: () => Promise<T | undefined | false>, timeoutMs = 60_000, intervalMs = 200): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await probe();
      if (value !== undefined && value !== false) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/**
 * A whole cluster in this process: a conductor on SQLite and `stores` store daemons with log
 * engines on files, real sockets. For tests that drive the client library directly.
 */
export interface LocalCluster {
  api: string;
  dir: string;
  /** The store daemons (their engines, for tests that look inside). */
  stores: import('../src/store/store-daemon.ts').StoreDaemon[];
  client(ownerId: string): Promise<import('../src/client/cluster-client.ts').ClusterClient>;
  call<T = any>(method: string, path: string, body?: unknown): Promise<{ status: number; body: T }>;
  close(): Promise<void>;
}

/**
 * `envFor`: the environment of store `index` (default: nodeEnv), for a disk that fails on demand.
 * `heartbeatTimeoutMs` (default 3000) and `heartbeatIntervalMs` (default a quarter of it): the conductor's.
 */
export async function startLocalCluster(options: {
  stores?: number; diskSizeBytes?: number; pgCount?: number; envFor?: (index: number) => import('../src/env/env.ts').Env | undefined;
  heartbeatTimeoutMs?: number; heartbeatIntervalMs?: number;
} = {}): Promise<LocalCluster> {
  const { ClusterClient } = await import('../src/client/cluster-client.ts');
  const { startConductor } = await import('../src/conductor/conductor.ts');
  const { nodeEnv } = await import('../src/env/node/node-env.ts');
  const { openLogEngine } = await import('../src/store/open-engine.ts');
  const { startStoreDaemon } = await import('../src/store/store-daemon.ts');
  const dir = temporaryDirectory('local-cluster');
  const storeCount = options.stores ?? 3;
  const conductor = await startConductor(nodeEnv, {
    metaPath: join(dir.path, 'meta.db'), listen: '127.0.0.1:0', heartbeatTimeoutMs: options.heartbeatTimeoutMs ?? 3000,
    ...(options.heartbeatIntervalMs === undefined ? {} : { heartbeatIntervalMs: options.heartbeatIntervalMs }), defaultReplicas: Math.min(3, storeCount), pgCount: options.pgCount ?? 32,
  });
  const api = `http://${conductor.address}`;
  const quiet = (): void => {};
  const stores: import('../src/store/store-daemon.ts').StoreDaemon[] = [];
  for (let index = 0; index < storeCount; index++) {
    stores.push(await startStoreDaemon(options.envFor?.(index) ?? nodeEnv, {
      diskPath: join(dir.path, `disk-${index}.img`), diskSizeBytes: options.diskSizeBytes ?? 256 * 1024 * 1024, format: true, listen: '127.0.0.1:0',
      conductorUrls: api, domain: `d${index}`, log: quiet, openEngine: openLogEngine,
    }));
  }
  const call = async (method: string, path: string, body?: unknown): Promise<{ status: number; body: any }> => {
    const response = await fetch(`${api}/api/v1${path}`, body === undefined ? { method } : { method, headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    return { status: response.status, body: await response.json() };
  };
  await waitFor('the default pool', async () => (await call('GET', '/pools')).body.pools.length > 0);
  const clients: { close(): Promise<void> }[] = [];
  return {
    api,
    dir: dir.path,
    stores,
    call,
    async client(ownerId: string) {
      const created = new ClusterClient(nodeEnv, { conductorUrls: api, ownerId, requestTimeoutMs: 10_000, log: quiet });
      await created.start();
      clients.push(created);
      return created;
    },
    async close() {
      for (const created of clients) await created.close().catch(() => {});
      for (const daemon of stores) await daemon.close().catch(() => {});
      await conductor.close();
      dir.remove();
    },
  };
}

/** Where a 4 KiB block's bytes are in a disk file (the first copy), or throws. */
export function findBlock(path: string, block: Buffer): number {
  const fd = openSync(path, 'r');
  try {
    const size = fstatSync(fd).size;
    const buffer = Buffer.alloc(16 * 1024 * 1024);
    for (let base = 0; base < size; base += buffer.length) {
      const read = readSync(fd, buffer, 0, buffer.length, base);
      for (let at = 0; at + 4096 <= read; at += 4096) {
        if (buffer.subarray(at, at + 4096).equals(block)) return base + at;
      }
    }
  } finally {
    closeSync(fd);
  }
  throw new Error(`block not found in ${path}`);
}

/** Flips one bit of a file at `offset`, as rot would. */
export function flipBit(path: string, offset: number): void {
  const fd = openSync(path, 'r+');
  const byte = Buffer.alloc(1);
  readSync(fd, byte, 0, 1, offset);
  byte[0]! ^= 0x10;
  writeSync(fd, byte, 0, 1, offset);
  closeSync(fd);
}
