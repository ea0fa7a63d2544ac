import assert from 'node:assert/strict';
import { test } from 'node:test';
import { blockChecksums, blockCrc32c, crc32c } from './crc32c.ts';
import { BLOCK_SIZE_BYTES } from './units.ts';

test('blockCrc32c checksums one 4 KiB block, of a one-block buffer, a view, or a longer buffer', () => {
  const data = Buffer.alloc(3 * BLOCK_SIZE_BYTES);
  for (let i = 0; i < data.length; i++) data[i] = (i * 131 + (i >> 12)) & 0xff;
  const blocks = [0, 1, 2].map((b) => Buffer.from(data.subarray(b * BLOCK_SIZE_BYTES, (b + 1) * BLOCK_SIZE_BYTES)));
  const expected = blocks.map((block) => crc32c(block));
  assert.equal(new Set(expected).size, 3);
  expected.forEach((crc, b) => {
    assert.equal(blockCrc32c(data, b), crc, `block ${b} of the whole buffer`);
    assert.equal(blockCrc32c(blocks[b]!, 0), crc, `block ${b} as a buffer of its own`);
    assert.equal(blockCrc32c(data.subarray(b * BLOCK_SIZE_BYTES, (b + 1) * BLOCK_SIZE_BYTES), 0), crc, `block ${b} as a view`);
  });
  assert.deepEqual([...blockChecksums(data)], expected);
  assert.deepEqual([...blockChecksums(blocks[1]!)], [expected[1]]);
});
