/**
 * Assertions that stay on in production. `assert` is for conditions that can only fail through a
 * bug in Shale itself: bad input from outside is refused with a coded ShaleError instead.
 */
export class AssertionError extends Error {
  override name = 'AssertionError';
}

export function assert(condition: unknown, why: string): asserts condition {
  if (!condition) throw new AssertionError(`assertion failed: ${why}`);
}

export function unreachable(value: never, why = 'unreachable'): never {
  throw new AssertionError(`${why}: ${String(value)}`);
}
