/**
 * PG placement by rendezvous (highest-random-weight) hashing: every (pool, pg, store) triple gets
 * a pseudo-random score, and a PG goes to the R stores with the highest scores, taking distinct
 * failure domains first. Because a store's score for a PG does not depend on the other stores,
 * adding a store takes over only the PGs where it now scores in the top R (about R/N of them),
 * and removing one moves only the PGs it held. Pure functions: no I/O, no randomness.
 *
 * Weighted by capacity: a store ranks by weight / -ln(u), u = (score + 0.5) / 2^32 — weighted
 * rendezvous hashing, under which a store's expected share of PGs is proportional to its weight
 * and still independent of the other stores. Equal weights give the plain score order.
 *
 * Failure domains: a store's domain label is either one name ("h3", which is its host) or
 * `level=value` pairs ("rack=r1,host=h3"). A pool spreads its replicas over distinct values of
 * its domain level ("host" by default; "store" means any distinct stores); a store without that
 * level counts as a domain of its own.
 */
import { assert } from '../../lib/assert.ts';

export interface PlacementCandidate {
  id: number;
  /** Failure domain label. An empty label counts as a domain of its own. */
  domain: string;
  /** Relative share of PGs, e.g. capacity in bytes; default 1. Must be > 0. */
  weight?: number;
}

/** The level names a domain label may use, and "store" (no grouping). */
export const domainLevelPattern = /^[a-z][a-z0-9_-]{0,31}$/;

/** The value of `level` in a store's domain label, or undefined if it has none. */
export function domainAt(label: string, level: string): string | undefined {
  if (level === 'store') return undefined;
  if (!label.includes('=')) return level === 'host' && label !== '' ? label : undefined;
  for (const part of label.split(',')) {
    const at = part.indexOf('=');
    if (at > 0 && part.slice(0, at).trim() === level) {
      const value = part.slice(at + 1).trim();
      return value === '' ? undefined : value;
    }
  }
  return undefined;
}

/** How many distinct domains of `level` the candidates span (a store without the level counts alone). */
export function distinctDomains(candidates: readonly PlacementCandidate[], level: string): number {
  return new Set(candidates.map((candidate) => domainKey(candidate, level))).size;
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

function domainKey(candidate: PlacementCandidate, level: string): string {
  return domainAt(candidate.domain, level) ?? `\u0000store-${candidate.id}`;
}

function weightedScore(poolId: number, pgIndex: number, candidate: PlacementCandidate): number {
  const weight = candidate.weight ?? 1;
  assert(weight > 0 && Number.isFinite(weight), 'a placement weight is a positive number');
  const u = (rendezvousScore(poolId, pgIndex, candidate.id) + 0.5) / 2 ** 32;
  return weight / -Math.log(u);
}

/**
 * The ordered replica set of one PG: `replicas` distinct store ids, highest score first, on
 * distinct failure domains where there are enough of them. `candidates` must hold at least
 * `replicas` distinct stores.
 */
export function placePg(poolId: number, pgIndex: number, replicas: number, candidates: readonly PlacementCandidate[], domainLevel = 'host'): number[] {
  assert(replicas >= 1 && replicas <= candidates.length, 'enough candidates for the replica count');
  const ranked = candidates
    .map((candidate) => ({ candidate, score: weightedScore(poolId, pgIndex, candidate) }))
    .sort((a, b) => b.score - a.score || a.candidate.id - b.candidate.id);
  const chosen: number[] = [];
  const domains = new Set<string>();
  for (const { candidate } of ranked) {
    if (chosen.length === replicas) break;
    const domain = domainKey(candidate, domainLevel);
    if (domains.has(domain)) continue;
    domains.add(domain);
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
export function placePool(poolId: number, pgCount: number, replicas: number, candidates: readonly PlacementCandidate[], domainLevel = 'host'): number[][] {
  const result: number[][] = [];
  for (let pg = 0; pg < pgCount; pg++) result.push(placePg(poolId, pg, replicas, candidates, domainLevel));
  return result;
}

/** Default minimum replicas for writes: R − ⌊R/2⌋ (a majority for odd R, half for even R). */
export function defaultMinReplicas(replicas: number): number {
  assert(Number.isSafeInteger(replicas) && replicas >= 1, 'replicas is a positive whole number');
  return replicas - Math.floor(replicas / 2);
}
