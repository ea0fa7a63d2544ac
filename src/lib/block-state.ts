/**
 * The three states of a block (DESIGN §2): absent (never written here: reads through to a parent,
 * or as zeros), data, or zero (a tombstone from TRIM or WRITE_ZEROES, which stops the read-through).
 * The values are part of the store protocol and the on-disk index.
 */
export const BlockState = {
  ABSENT: 0,
  DATA: 1,
  ZERO: 2,
} as const;
export type BlockStateValue = (typeof BlockState)[keyof typeof BlockState];
