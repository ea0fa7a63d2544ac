/**
 * Helpers for tests of the conductor through its real HTTP API on 127.0.0.1 (port 0): start one
 * on a temporary SQLite file (or an etcd prefix), call it with or without a token, register fake
 * stores. Imported by tests only.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after } from 'node:test';
import { nodeEnv } from '../../env/node/node-env.ts';
import { ErrorCodes, type ErrorCode } from '../../lib/errors.ts';
import type { ClusterMap, RegisterStoreRequest, RegisterStoreResponse } from '../api/types.ts';
import { type Conductor, type ConductorOptions, startConductor } from '../conductor.ts';

const directory = mkdtempSync(join(tmpdir(), 'shale-conductor-'));
after(() => rmSync(directory, { recursive: true, force: true }));
let fileNumber = 0;

export const clock = nodeEnv.clock;

export interface Reply<T = any> {
  status: number;
  headers: Record<string, string>;
  body: T;
}

export interface TestCluster {
  conductor: Conductor;
  metaPath: string;
  logs: string[];
  /** The admin token (auth: 'token'), sent with every call unless the call says otherwise. */
  token: string | undefined;
  base: string;
  call<T = any>(method: string, path: string, body?: unknown, headers?: Record<string, string>): Promise<Reply<T>>;
  raw(method: string, path: string, body: string | undefined, headers?: Record<string, string>): Promise<Reply>;
  register(n: number, overrides?: Partial<RegisterStoreRequest>): Promise<number>;
  map(): Promise<ClusterMap>;
  close(): Promise<void>;
}

export function freshMetaPath(): string {
  return join(directory, `meta-${++fileNumber}.db`);
}

/** A request to any conductor URL (no redirect following). */
export async function request(url: string, method: string, body?: string, headers: Record<string, string> = {}): Promise<Reply> {
  const result = await nodeEnv.net.httpRequest(method, url, body === undefined ? { headers } : { body, headers: { 'content-type': 'application/json', ...headers } });
  const text = result.body.toString('utf8');
  let parsed: unknown;
  try {
    parsed = text.length > 0 ? JSON.parse(text) : undefined;
  } catch {
    parsed = text;
  }
  return { status: result.status, headers: result.headers, body: parsed };
}

export async function startCluster(options: Partial<ConductorOptions> & { token?: string } = {}): Promise<TestCluster> {
  const metaPath = options.metaPath ?? freshMetaPath();
  const logs: string[] = [];
  let token = options.token;
  const conductor = await startConductor(nodeEnv, {
    listen: '127.0.0.1:0', heartbeatTimeoutMs: 60_000, ...options, metaPath, log: (line) => logs.push(line),
    adminToken: { ...options.adminToken, onCreated: async (made) => {
      token = made;
      await options.adminToken?.onCreated?.(made);
    } },
  });
  const base = `http://${conductor.address}/api/v1`;
  /** A header given as '' is left out (to send no token). */
  const raw = (method: string, path: string, body?: string, headers: Record<string, string> = {}): Promise<Reply> => {
    const merged: Record<string, string> = { ...(token ? { authorization: `Bearer ${token}` } : {}), ...headers };
    for (const [name, value] of Object.entries(merged)) if (value === '') delete merged[name];
    return request(base + path, method, body, merged);
  };
  const call = <T>(method: string, path: string, body?: unknown, headers?: Record<string, string>): Promise<Reply<T>> =>
    raw(method, path, body === undefined ? undefined : JSON.stringify(body), headers) as Promise<Reply<T>>;
  const cluster: TestCluster = {
    conductor, metaPath, logs, base, call, raw,
    get token() {
      return token;
    },
    async register(n, overrides = {}) {
      const reply = await call<RegisterStoreResponse>('POST', '/stores/register', {
        diskUuid: `disk-${n}`, clusterId: conductor.clusterId, address: `127.0.0.1:${20000 + n}`, domain: `host-${n}`,
        disks: [{ uuid: `disk-${n}`, path: `/disks/${n}`, capacityBytes: 100 * 2 ** 30, usedBytes: n * 2 ** 20 }],
        ...overrides,
      });
      assert.equal(reply.status, 200, JSON.stringify(reply.body));
      return reply.body.storeId;
    },
    async map() {
      const reply = await call<ClusterMap>('GET', '/map');
      assert.equal(reply.status, 200);
      return reply.body;
    },
    close: () => conductor.close(),
  };
  return cluster;
}

export function expectError(reply: Reply, code: ErrorCode, pattern?: RegExp): void {
  assert.equal(reply.body?.code, code, `expected ${code}, got ${reply.status} ${JSON.stringify(reply.body)}`);
  assert.equal(reply.status, ErrorCodes[code].httpStatus);
  assert.equal(typeof reply.body.message, 'string');
  if (pattern) assert.match(reply.body.message, pattern);
}

export async function eventually<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 5000): Promise<T> {
  const deadline = clock.nowMs() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (clock.nowMs() > deadline) assert.fail(`timed out waiting for ${what}`);
    await clock.sleep(20);
  }
}
