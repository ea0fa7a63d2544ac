/**
 * Real etcd for tests and benchmarks: Debian's etcd-server (3.4), members on loopback ports in
 * a temporary directory, started as child processes and stopped (or killed) by PID. Imported by
 * tests and bench only.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export function requireEtcd(): void {
  if (spawnSync('sh', ['-c', 'command -v etcd']).status !== 0) {
    throw new Error('etcd is not installed: run `npm test` as root (it installs etcd-server) or `apt-get install -y etcd-server etcd-client`');
  }
}

/** The ports freePort() handed out in this process. */
const portsHandedOut = new Set<number>();

/**
 * A loopback port nothing listens on now, never one handed out before in this process: the kernel
 * can give a closed probe's port to the next probe at once (about one pair in 2,000 here), and two
 * servers told to listen on the same port would fail.
 */
export async function freePort(): Promise<number> {
  for (;;) {
    const port = await probePort();
    if (!portsHandedOut.has(port)) {
      portsHandedOut.add(port);
      return port;
    }
  }
}

function probePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

export interface EtcdMember {
  name: string;
  clientPort: number;
  peerPort: number;
  process: ChildProcess | undefined;
}

export interface EtcdCluster {
  readonly members: EtcdMember[];
  /** "127.0.0.1:P,127.0.0.1:Q,…" */
  readonly endpoints: string[];
  /** "etcd://127.0.0.1:P,…" plus `prefix`. */
  metaUrl(prefix?: string): string;
  /** SIGKILL one member. */
  kill(index: number): void;
  /** Starts a killed member again on its data directory. */
  restart(index: number): Promise<void>;
  /** Kills every member and removes the data. */
  stop(): Promise<void>;
}

async function healthy(port: number): Promise<boolean> {
  try {
    const response = await fetch(`http://127.0.0.1:${port}/health`, { signal: AbortSignal.timeout(1000) });
    const body = (await response.json()) as { health?: string };
    return body.health === 'true';
  } catch {
    return false;
  }
}

/** Tries with fresh ports when one was taken between freePort() and etcd binding it. */
const START_ATTEMPTS_MAX = 3;

/** Starts an etcd cluster of `size` members and waits until every member reports healthy. */
export async function startEtcdCluster(size = 1, options: { timeoutMs?: number } = {}): Promise<EtcdCluster> {
  requireEtcd();
  for (let attempt = 1; ; attempt++) {
    try {
      return await startEtcdClusterOnce(size, options);
    } catch (error) {
      // freePort() closes its probe before etcd binds the port: another process can take it in between.
      if (attempt >= START_ATTEMPTS_MAX || !String((error as Error).message).includes('address already in use')) throw error;
    }
  }
}

async function startEtcdClusterOnce(size: number, options: { timeoutMs?: number }): Promise<EtcdCluster> {
  const dir = mkdtempSync(join(tmpdir(), 'shale-etcd-'));
  const members: EtcdMember[] = [];
  for (let i = 0; i < size; i++) members.push({ name: `m${i}`, clientPort: await freePort(), peerPort: await freePort(), process: undefined });
  const initialCluster = members.map((m) => `${m.name}=http://127.0.0.1:${m.peerPort}`).join(',');
  const clusterToken = `shale-test-${members[0]!.clientPort}`;
  const output: string[] = [];

  const launch = (member: EtcdMember, state: 'new' | 'existing'): void => {
    const dataDir = join(dir, member.name);
    mkdirSync(dataDir, { recursive: true });
    const child = spawn('etcd', [
      '--name', member.name, '--data-dir', dataDir,
      '--listen-client-urls', `http://127.0.0.1:${member.clientPort}`, '--advertise-client-urls', `http://127.0.0.1:${member.clientPort}`,
      '--listen-peer-urls', `http://127.0.0.1:${member.peerPort}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${member.peerPort}`,
      '--initial-cluster', initialCluster, '--initial-cluster-state', state, '--initial-cluster-token', clusterToken,
      // Fast elections on loopback: a killed etcd member is replaced within about a second.
      '--heartbeat-interval', '50', '--election-timeout', '500',
      '--logger', 'zap', '--log-level', 'error',
    ], { stdio: ['ignore', 'ignore', 'pipe'] });
    child.stderr!.on('data', (chunk: Buffer) => {
      output.push(chunk.toString());
      if (output.length > 200) output.shift();
    });
    member.process = child;
  };

  const waitHealthy = async (targets: EtcdMember[]): Promise<void> => {
    const deadline = Date.now() + (options.timeoutMs ?? 30_000);
    for (const member of targets) {
      while (!(await healthy(member.clientPort))) {
        const exited = member.process?.exitCode !== null || member.process?.signalCode !== null;
        if (exited) await new Promise((resolve) => setTimeout(resolve, 200)); // the rest of its stderr
        if (Date.now() > deadline || exited) throw new Error(`etcd member ${member.name} did not become healthy:\n${output.join('')}`);
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
  };

  for (const member of members) launch(member, 'new');
  // If this process dies without stopping the cluster (a crash, an uncaught error), take the
  // members with it rather than leave them running.
  const killOnExit = (): void => {
    for (const member of members) {
      if (member.process?.pid && member.process.exitCode === null) {
        try {
          process.kill(member.process.pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
    }
  };
  process.on('exit', killOnExit);
  const stop = async (): Promise<void> => {
    process.off('exit', killOnExit);
    await Promise.all(members.map((member) => new Promise<void>((resolve) => {
      const child = member.process;
      member.process = undefined;
      if (!child || child.exitCode !== null || child.signalCode !== null) return resolve();
      child.once('exit', () => resolve());
      child.kill('SIGKILL');
    })));
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    await waitHealthy(members);
  } catch (error) {
    await stop();
    throw error;
  }
  const endpoints = members.map((m) => `127.0.0.1:${m.clientPort}`);
  return {
    members,
    endpoints,
    metaUrl: (prefix = '') => `etcd://${endpoints.join(',')}${prefix}`,
    kill(index) {
      const member = members[index]!;
      if (member.process?.pid) process.kill(member.process.pid, 'SIGKILL');
      member.process = undefined;
    },
    async restart(index) {
      const member = members[index]!;
      launch(member, 'existing');
      await waitHealthy([member]);
    },
    stop,
  };
}
