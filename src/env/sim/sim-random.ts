/**
 * A seeded, deterministic `Random` (xoshiro128**, seeded through splitmix32). Every simulated
 * component draws from one of these so that a whole run replays from its seed. Not for anything
 * that needs unpredictability: production passes the crypto-backed `nodeRandom`.
 */
import type { Random } from '../env.ts';

function splitmix32(state: { value: number }): number {
  state.value = (state.value + 0x9e3779b9) >>> 0;
  let z = state.value;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
  return (z ^ (z >>> 16)) >>> 0;
}

export class SimRandom implements Random {
  readonly seed: number;
  #s0: number;
  #s1: number;
  #s2: number;
  #s3: number;

  constructor(seed: number) {
    this.seed = seed;
    const state = { value: seed >>> 0 };
    this.#s0 = splitmix32(state);
    this.#s1 = splitmix32(state);
    this.#s2 = splitmix32(state);
    this.#s3 = splitmix32(state);
    if ((this.#s0 | this.#s1 | this.#s2 | this.#s3) === 0) this.#s0 = 1;
  }

  uint32(): number {
    const result = Math.imul(rotl(Math.imul(this.#s1, 5) >>> 0, 7), 9) >>> 0;
    const t = (this.#s1 << 9) >>> 0;
    this.#s2 = (this.#s2 ^ this.#s0) >>> 0;
    this.#s3 = (this.#s3 ^ this.#s1) >>> 0;
    this.#s1 = (this.#s1 ^ this.#s2) >>> 0;
    this.#s0 = (this.#s0 ^ this.#s3) >>> 0;
    this.#s2 = (this.#s2 ^ t) >>> 0;
    this.#s3 = rotl(this.#s3, 11);
    return result;
  }

  float(): number {
    return this.uint32() / 2 ** 32;
  }

  /** A uniformly distributed integer in [0, count). */
  below(count: number): number {
    return Math.floor(this.float() * count);
  }

  /** An integer in [low, high], both included. */
  between(low: number, high: number): number {
    return low + this.below(high - low + 1);
  }

  /** True with probability `probability`. */
  chance(probability: number): boolean {
    return this.float() < probability;
  }

  bytes(count: number): Buffer {
    const out = Buffer.allocUnsafe(count);
    let i = 0;
    for (; i + 4 <= count; i += 4) out.writeUInt32LE(this.uint32(), i);
    if (i < count) {
      const last = this.uint32();
      for (let shift = 0; i < count; i++, shift += 8) out[i] = (last >>> shift) & 0xff;
    }
    return out;
  }

  uuid(): string {
    const bytes = this.bytes(16);
    bytes[6] = (bytes[6]! & 0x0f) | 0x40;
    bytes[8] = (bytes[8]! & 0x3f) | 0x80;
    const hex = bytes.toString('hex');
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  /** An independent generator derived from this one (for a component that needs its own stream). */
  fork(): SimRandom {
    return new SimRandom(this.uint32());
  }
}

function rotl(value: number, shift: number): number {
  return ((value << shift) | (value >>> (32 - shift))) >>> 0;
}
