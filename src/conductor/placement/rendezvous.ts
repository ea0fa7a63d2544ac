/**
 * PG placement by rendezvous (highest-random-weight) hashing: every (pool, pg, store) triple gets
 * a pseudo-random score, and a PG goes to the R stores with the highest scores, taking distinct
 * failure domains first. Because a store's score for a PG does not depend on the other stores,
 * adding a store takes over only the PGs where it now scores in the top R (about R/N of them),
 * and removing one moves only the PGs it held. Pure functions: no I/O, no randomness.
 *
 * Stores are unweighted for now (every store is expected to have similar capacity); a weighted
 * variant would rank by -weight / ln(score / 2^32) instead.
 */
import { assert } from '../../lib/assert.ts';

export interface PlacementCandidate {
  id: number;
  /** Failure domain label. An empty label counts as a domain of its own. */
  domain: string;
}

function fmix32(value: number): number {
  let h = value >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

function mixWord(hash: number, word: number): number {
  let k = Math.imul(word >>> 0, 0xcc9e2d51);
  k = (k << 15) | (k >>> 17);
  k = Math.imul(k, 0x1b873593);
  let h = (hash ^ k) >>> 0;
  h = (h << 13) | (h >>> 19);
  return (Math.imul(h, 5) + 0xe6546b64) >>> 0;
}

function mixInteger(hash: number, value: number): number {
  return mixWord(mixWord(hash, value % 2 ** 32), Math.floor(value / 2 ** 32));
}

/** The score of `storeId` for PG `pgIndex` of pool `poolId`: a uint32, stable forever (part of the placement). */
export function rendezvousScore(poolId: number, pgIndex: number, storeId: number): number {
  let h = 0x5348414c; // "SHAL"
  h = mixInteger(h, poolId);
  h = mixInteger(h, pgIndex);
  h = mixInteger(h, storeId);
  return fmix32(h ^ 24);
}

function domainOf(candidate: PlacementCandidate): string {
  return candidate.domain === '' ? `\u0000store-${candidate.id}` : candidate.domain;
}

/**
 * The ordered replica set of one PG: `replicas` distinct store ids, highest score first, on
 * distinct failure domains where there are enough of them. `candidates` must hold at least
 * `replicas` distinct stores.
 */
export function placePg(poolId: number, pgIndex: number, replicas: number, candidates: readonly PlacementCandidate[]): number[] {
  assert(replicas >= 1 && replicas <= candidates.length, 'enough candidates for the replica count');
  const ranked = candidates
    .map((candidate) => ({ candidate, score: rendezvousScore(poolId, pgIndex, candidate.id) }))
    .sort((a, b) => b.score - a.score || a.candidate.id - b.candidate.id);
  const chosen: number[] = [];
  const domains = new Set<string>();
  for (const { candidate } of ranked) {
    if (chosen.length === replicas) break;
    if (domains.has(domainOf(candidate))) continue;
    domains.add(domainOf(candidate));
    chosen.push(candidate.id);
  }
  for (const { candidate } of ranked) {
    if (chosen.length === replicas) break;
    if (!chosen.includes(candidate.id)) chosen.push(candidate.id);
  }
  assert(chosen.length === replicas && new Set(chosen).size === replicas, 'a PG gets R distinct stores');
  return chosen;
}

/** The replica sets of every PG of a pool, index = PG number. */
export function placePool(poolId: number, pgCount: number, replicas: number, candidates: readonly PlacementCandidate[]): number[][] {
  const result: number[][] = [];
  for (let pg = 0; pg < pgCount; pg++) result.push(placePg(poolId, pg, replicas, candidates));
  return result;
}

/** Default minimum replicas for writes: R − ⌊R/2⌋ (a majority for odd R, half for even R). */
export function defaultMinReplicas(replicas: number): number {
  assert(Number.isSafeInteger(replicas) && replicas >= 1, 'replicas is a positive whole number');
  return replicas - Math.floor(replicas / 2);
}
