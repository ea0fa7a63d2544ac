/**
 * The in-memory export's allocation tracking — what nbdinfo --map, qemu-img map and hole chunks
 * show in the other tests — against a model: a byte array plus the state of each 4 KiB block.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { MEMORY_EXPORT_BLOCK_BYTES, MEMORY_EXPORT_EXTENTS_MAX, MemoryExport } from './memory-export.ts';

const KiB = 1024;
const block = MEMORY_EXPORT_BLOCK_BYTES;

/** Extents as [length, 'hole' | 'data' | 'zero'] for readable comparisons. */
async function statusOf(memory: MemoryExport, offsetBytes = 0, lengthBytes = memory.sizeBytes): Promise<[number, string][]> {
  const extents = await memory.blockStatus(offsetBytes, lengthBytes);
  return extents.map((extent) => [extent.lengthBytes, extent.hole ? 'hole' : extent.zero ? 'zero' : 'data']);
}

describe('MemoryExport', () => {
  test('a new export is one hole; writes make data, trims and zeroes of whole blocks make holes', async () => {
    const memory = new MemoryExport({ name: 'm', sizeBytes: 64 * KiB });
    assert.deepEqual(await statusOf(memory), [[64 * KiB, 'hole']]);
    await memory.write(8 * KiB + 100, Buffer.alloc(10, 1), false);
    assert.deepEqual(await statusOf(memory), [[8 * KiB, 'hole'], [4 * KiB, 'data'], [52 * KiB, 'hole']]);
    await memory.write(16 * KiB, Buffer.alloc(16 * KiB, 2), false);
    await memory.trim(16 * KiB + 1, 8 * KiB, false);
    assert.deepEqual(await statusOf(memory, 16 * KiB, 16 * KiB), [[4 * KiB, 'data'], [4 * KiB, 'hole'], [8 * KiB, 'data']], 'only the block covered whole became a hole');
    assert.deepEqual(memory.data.subarray(16 * KiB, 16 * KiB + 2), Buffer.from([2, 0]), 'the partly covered block was zeroed where trimmed');
    await memory.writeZeroes(24 * KiB, 8 * KiB, { fua: false, noHole: false, fast: false });
    await memory.writeZeroes(40 * KiB, 8 * KiB, { fua: false, noHole: true, fast: false });
    assert.deepEqual(await statusOf(memory, 16 * KiB, 48 * KiB), [[4 * KiB, 'data'], [20 * KiB, 'hole'], [8 * KiB, 'zero'], [16 * KiB, 'hole']]);
  });

  test('NO_HOLE zeroes: a partly covered hole becomes allocated zeroes, a partly covered data block stays data', async () => {
    const memory = new MemoryExport({ name: 'm', sizeBytes: 32 * KiB });
    await memory.write(12 * KiB, Buffer.alloc(4 * KiB, 9), false);
    await memory.writeZeroes(2 * KiB, 12 * KiB, { fua: false, noHole: true, fast: false });
    assert.deepEqual(await statusOf(memory), [[12 * KiB, 'zero'], [4 * KiB, 'data'], [16 * KiB, 'hole']]);
    assert.deepEqual(memory.data.subarray(12 * KiB, 16 * KiB), Buffer.concat([Buffer.alloc(2 * KiB), Buffer.alloc(2 * KiB, 9)]));
  });

  test('an export whose size is not a multiple of 4 KiB: the last partial block behaves as a whole one', async () => {
    const memory = new MemoryExport({ name: 'm', sizeBytes: 10 * KiB + 5 });
    memory.load(0, Buffer.alloc(10 * KiB + 5, 1));
    await memory.trim(8 * KiB, 2 * KiB + 5, false);
    assert.deepEqual(await statusOf(memory), [[8 * KiB, 'data'], [2 * KiB + 5, 'hole']]);
    assert.deepEqual(await statusOf(memory, 10 * KiB, 5), [[5, 'hole']]);
  });

  test('readSparse: data pieces with copies, zero pieces without data, covering the range exactly', async () => {
    const memory = new MemoryExport({ name: 'm', sizeBytes: 64 * KiB });
    memory.load(4 * KiB, Buffer.alloc(8 * KiB, 5));
    await memory.writeZeroes(12 * KiB, 4 * KiB, { fua: false, noHole: true, fast: false });
    const pieces = await memory.readSparse(2 * KiB, 20 * KiB);
    assert.deepEqual(pieces.map((piece) => [piece.offsetBytes, piece.lengthBytes, piece.data === undefined ? 'zero' : 'data']), [
      [2 * KiB, 2 * KiB, 'zero'], [4 * KiB, 8 * KiB, 'data'], [12 * KiB, 10 * KiB, 'zero'],
    ]);
    const data = pieces[1]!.data!;
    assert.deepEqual(data, Buffer.alloc(8 * KiB, 5));
    await memory.write(4 * KiB, Buffer.alloc(8 * KiB, 6), false);
    assert.deepEqual(data, Buffer.alloc(8 * KiB, 5), 'what a read returned does not change with later writes');
    assert.equal(memory.counters.sparseReads, 1);
  });

  test('reads are copies that later writes do not change, small ones included', async () => {
    const memory = new MemoryExport({ name: 'm', sizeBytes: 4 * 1024 * KiB });
    const reads: Buffer[] = [];
    for (let index = 0; index < 600; index++) {
      await memory.write(index * 4 * KiB, Buffer.alloc(4 * KiB, index & 0xff), false);
      reads.push(await memory.read(index * 4 * KiB, 4 * KiB));
    }
    for (let index = 0; index < 600; index++) await memory.write(index * 4 * KiB, Buffer.alloc(4 * KiB, 0xaa), false);
    reads.forEach((read, index) => assert.deepEqual(read, Buffer.alloc(4 * KiB, index & 0xff), `read ${index}`));
  });

  test('blockStatus returns at most MEMORY_EXPORT_EXTENTS_MAX extents, from the start of the range', async () => {
    const memory = new MemoryExport({ name: 'm', sizeBytes: (MEMORY_EXPORT_EXTENTS_MAX + 10) * 2 * block });
    for (let index = 0; index < MEMORY_EXPORT_EXTENTS_MAX + 10; index++) memory.load(index * 2 * block, Buffer.alloc(block, 1));
    const extents = await memory.blockStatus(0, memory.sizeBytes);
    assert.equal(extents.length, MEMORY_EXPORT_EXTENTS_MAX);
    assert.ok(extents.every((extent) => extent.lengthBytes === block));
  });

  test('FAST_ZERO is refused with NOT_SUPPORTED, changing nothing, when the export is told it cannot zero fast', async () => {
    const memory = new MemoryExport({ name: 'm', sizeBytes: 16 * KiB, fastZeroes: false });
    memory.load(0, Buffer.alloc(16 * KiB, 3));
    await assert.rejects(memory.writeZeroes(0, 16 * KiB, { fua: false, noHole: false, fast: true }), { code: 'NOT_SUPPORTED' });
    assert.deepEqual(memory.data, Buffer.alloc(16 * KiB, 3));
    assert.deepEqual(await statusOf(memory), [[16 * KiB, 'data']]);
    await memory.writeZeroes(0, 16 * KiB, { fua: false, noHole: false, fast: false });
    assert.deepEqual(await statusOf(memory), [[16 * KiB, 'hole']]);
  });

  test('random operations: contents match a plain buffer, holes read as zeroes, extents tile the range', async () => {
    const sizeBytes = 40 * KiB + 123;
    const operation = fc.record({
      kind: fc.constantFrom('write', 'trim', 'zero', 'zeroNoHole'),
      offsetBytes: fc.nat(sizeBytes - 1),
      lengthBytes: fc.nat(12 * KiB),
      fill: fc.integer({ min: 1, max: 255 }),
    });
    await fc.assert(fc.asyncProperty(fc.array(operation, { maxLength: 30 }), async (operations) => {
      const memory = new MemoryExport({ name: 'm', sizeBytes });
      const model = Buffer.alloc(sizeBytes);
      for (const { kind, offsetBytes, lengthBytes: wanted, fill } of operations) {
        const lengthBytes = Math.min(wanted, sizeBytes - offsetBytes);
        if (kind === 'write') {
          await memory.write(offsetBytes, Buffer.alloc(lengthBytes, fill), false);
          model.fill(fill, offsetBytes, offsetBytes + lengthBytes);
        } else {
          if (kind === 'trim') await memory.trim(offsetBytes, lengthBytes, false);
          else await memory.writeZeroes(offsetBytes, lengthBytes, { fua: false, noHole: kind === 'zeroNoHole', fast: false });
          model.fill(0, offsetBytes, offsetBytes + lengthBytes);
        }
      }
      assert.deepEqual(await memory.read(0, sizeBytes), model);
      const assembled = Buffer.alloc(sizeBytes, 0xee);
      for (const piece of await memory.readSparse(0, sizeBytes)) {
        if (piece.data !== undefined) piece.data.copy(assembled, piece.offsetBytes);
        else assembled.fill(0, piece.offsetBytes, piece.offsetBytes + piece.lengthBytes);
      }
      assert.deepEqual(assembled, model);
      let position = 0;
      for (const extent of await memory.blockStatus(0, sizeBytes)) {
        assert.ok(extent.lengthBytes > 0);
        if (extent.zero) assert.ok(model.subarray(position, position + extent.lengthBytes).every((byte) => byte === 0), `extent at ${position} claims zeroes`);
        position += extent.lengthBytes;
      }
      assert.equal(position, sizeBytes);
    }), { numRuns: 100 });
  });
});
