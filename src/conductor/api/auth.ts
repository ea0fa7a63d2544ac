/**
 * API tokens. The cluster has one admin token, made at first start (or when a conductor is told
 * to replace it) and shown once to whoever started the conductor; the MetaStore keeps only its
 * SHA-256, so a copy of the metadata does not hold a usable token. Every conductor of the
 * cluster checks requests against that hash, in constant time.
 *
 * A token is "shale_" + 43 base64url characters (256 random bits).
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { Clock, Random } from '../../env/env.ts';
import type { MetaStore } from '../meta/meta-store.ts';
import type { Authenticator } from './server.ts';

export const adminTokenName = 'admin';
/** How long a cached hash is trusted before it is read again (a token replaced through another conductor). */
export const tokenRefreshIntervalMs = 2000;

export function newToken(random: Random): string {
  return `shale_${random.bytes(32).toString('base64url')}`;
}

export function tokenSha256(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

function sameHash(a: string, b: string): boolean {
  const left = Buffer.from(a, 'hex');
  const right = Buffer.from(b, 'hex');
  return left.length === right.length && left.length > 0 && timingSafeEqual(left, right);
}

/** Checks bearer tokens against the admin token's hash in the MetaStore. */
export class TokenAuthenticator implements Authenticator {
  readonly #meta: MetaStore;
  readonly #clock: Clock;
  #sha256: string | undefined;
  #readAtMs = -Infinity;

  constructor(meta: MetaStore, clock: Clock, sha256?: string) {
    this.#meta = meta;
    this.#clock = clock;
    this.#sha256 = sha256;
    if (sha256 !== undefined) this.#readAtMs = clock.nowMs();
  }

  /**
   * Whether `token` is the admin token. The hash is read again when the cached one is older than
   * tokenRefreshIntervalMs, so a token replaced through another conductor stops working here
   * within that time; if the MetaStore cannot be read then, the cached hash goes on serving.
   */
  async verify(token: string): Promise<boolean> {
    const now = this.#clock.nowMs();
    if (now - this.#readAtMs >= tokenRefreshIntervalMs) {
      this.#readAtMs = now;
      try {
        this.#sha256 = (await this.#meta.read((tx) => tx.token(adminTokenName)))?.sha256;
      } catch {
        // keep the cached hash: an unreachable MetaStore must not lock every client out
      }
    }
    return this.#sha256 !== undefined && sameHash(tokenSha256(token), this.#sha256);
  }
}
