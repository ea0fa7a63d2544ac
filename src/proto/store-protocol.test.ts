import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { ShaleError } from '../lib/errors.ts';
import {
  BlockState, decodeHeader, decodeListReply, decodeReadReply, decodeVolumeIds, emptyHeader, encodeHeader, encodeListReply,
  encodeReadDescriptors, encodeVolumeIds, FrameParser, HEADER_BYTES, Op, type FrameHeader,
  decodeKvPgCursor, decodeKvPgRecords, encodeKvPgCursor, encodeKvPgRecords, engineObjectId, Namespace, NAMESPACE_ID_MAX, namespacedId,
} from './store-protocol.ts';
import type { Frame } from './store-protocol.ts';

const u32 = fc.nat({ max: 0xffffffff });
const u53 = fc.nat({ max: Number.MAX_SAFE_INTEGER });
const headerArbitrary: fc.Arbitrary<FrameHeader> = fc.record({
  op: fc.nat({ max: 255 }), flags: fc.nat({ max: 0xffff }), requestId: u32, status: fc.nat({ max: 0xffff }),
  namespace: fc.nat({ max: 0xffff }), volumeId: u53, chunkIndex: u32, poolId: u32, pgId: u32, pgCount: u32,
  pgEpoch: u53, ownerEpoch: u53, versionSeq: u53, offsetBlocks: u32, countBlocks: u32, snapSeq: u53, watermark: u53,
  payloadBytes: fc.nat({ max: 4096 }),
});

test('a header round-trips through encode and decode', () => {
  fc.assert(fc.property(headerArbitrary, (header) => {
    assert.deepEqual(decodeHeader(encodeHeader(header)), { ...header });
  }));
});

test('a flipped bit anywhere in a header is refused with PROTOCOL', () => {
  fc.assert(fc.property(headerArbitrary, fc.nat({ max: HEADER_BYTES * 8 - 1 }), (header, bit) => {
    const bytes = encodeHeader(header);
    bytes[bit >> 3]! ^= 1 << (bit & 7);
    assert.throws(() => decodeHeader(bytes), (error: unknown) => error instanceof ShaleError && error.code === 'PROTOCOL');
  }));
});

test('the frame parser yields the same frames for every split of the byte stream', () => {
  const frames = [
    { header: { ...emptyHeader(), op: Op.WRITE, requestId: 1, payloadBytes: 5 }, payload: Buffer.from('hello') },
    { header: { ...emptyHeader(), op: Op.FLUSH, requestId: 2, payloadBytes: 0 }, payload: Buffer.alloc(0) },
    { header: { ...emptyHeader(), op: Op.READ, requestId: 3, volumeId: 2 ** 40, payloadBytes: 3 }, payload: Buffer.from('abc') },
  ];
  const stream = Buffer.concat(frames.flatMap((frame) => [encodeHeader(frame.header), frame.payload]));
  for (let first = 0; first <= stream.length; first += 7) {
    for (let second = first; second <= stream.length; second += 13) {
      const parser = new FrameParser();
      const out = [stream.subarray(0, first), stream.subarray(first, second), stream.subarray(second)].flatMap((part) => parser.push(part));
      assert.equal(out.length, frames.length, `split at ${first}/${second}`);
      out.forEach((frame, i) => {
        assert.deepEqual(frame.header, frames[i]!.header);
        assert.deepEqual(frame.payload, frames[i]!.payload);
      });
      assert.equal(parser.bufferedBytes, 0);
    }
  }
});

test('the frame parser reading in place yields the same frames, payloads lent, nothing kept in its reused staging buffer', () => {
  fc.assert(fc.property(
    fc.array(fc.oneof(fc.nat(200), fc.integer({ min: 60_000, max: 200_000 })), { maxLength: 10 }),
    fc.array(fc.integer({ min: 1, max: 150_000 }), { minLength: 1, maxLength: 20 }),
    (sizes, readSizes) => {
      const frames = sizes.map((size, i) => ({
        header: { ...emptyHeader(), op: size === 0 ? Op.FLUSH : Op.WRITE, requestId: i + 1, volumeId: 7, payloadBytes: size },
        payload: Buffer.alloc(size, (i * 31) & 0xff),
      }));
      const { out, lent, parser } = readInPlace(frames, readSizes);
      assert.equal(out.length, frames.length);
      out.forEach((frame, i) => {
        assert.deepEqual(frame.header, frames[i]!.header);
        assert.ok(frame.payload.equals(frames[i]!.payload), `payload of frame ${i}`);
        assert.equal(frame.lent === true, frames[i]!.payload.length > 0);
        if (frame.lent) assert.ok(lent.has(frame.payload));
      });
      assert.equal(parser.bufferedBytes, 0);
    }), { numRuns: 200 });
});

/** Frames encoded into one stream, read in place by a FrameParser in reads of the given sizes (in turn). */
function readInPlace(frames: readonly Frame[], readSizes: readonly number[]): { out: Frame[]; lent: Set<Buffer>; parser: FrameParser } {
  const stream = Buffer.concat(frames.flatMap((frame) => [encodeHeader(frame.header), frame.payload]));
  const lent = new Set<Buffer>();
  const parser = new FrameParser((bytes) => {
    const buffer = Buffer.alloc(bytes);
    lent.add(buffer);
    return buffer;
  });
  const out: Frame[] = [];
  for (let at = 0, turn = 0; at < stream.length; turn++) {
    const target = parser.readTarget();
    assert.ok(target.length > 0);
    // A read may leave anything in the target past what it reports: the parser keeps nothing there.
    target.fill(0xee);
    const count = Math.min(target.length, readSizes[turn % readSizes.length]!, stream.length - at);
    stream.copy(target, 0, at, at + count);
    at += count;
    out.push(...parser.received(count));
  }
  return { out, lent, parser };
}

test('the frame parser reading in place carries a partial header over to the next read, at every read size', () => {
  // Header-only frames (replies, FLUSH) and small payloads: reads end inside headers at every offset.
  const frames: Frame[] = Array.from({ length: 12 }, (_, i) => ({
    header: { ...emptyHeader(), op: i % 3 === 0 ? Op.FLUSH : Op.WRITE, requestId: i + 1, volumeId: 2 ** 40 + i, versionSeq: i * 1000, payloadBytes: i % 3 === 0 ? 0 : 17 * i },
    payload: i % 3 === 0 ? Buffer.alloc(0) : Buffer.alloc(17 * i, i),
  }));
  for (let size = 1; size <= 3 * HEADER_BYTES + 10; size++) {
    const { out, parser } = readInPlace(frames, [size]);
    assert.equal(out.length, frames.length, `reads of ${size} bytes`);
    out.forEach((frame, i) => {
      assert.deepEqual(frame.header, frames[i]!.header, `reads of ${size} bytes, frame ${i}`);
      assert.ok(frame.payload.equals(frames[i]!.payload), `reads of ${size} bytes, payload of frame ${i}`);
    });
    assert.equal(parser.bufferedBytes, 0);
  }
});

test('the frame parser refuses garbage', () => {
  const parser = new FrameParser();
  assert.throws(() => parser.push(Buffer.alloc(HEADER_BYTES, 0x41)), (error: unknown) => error instanceof ShaleError && error.code === 'PROTOCOL');
});

test('READ replies carry descriptors and only the data blocks', () => {
  const data = Buffer.alloc(4096, 7);
  const payload = Buffer.concat([
    encodeReadDescriptors({ checksums: Uint32Array.of(1, 0, 3), states: Uint8Array.of(BlockState.ABSENT, BlockState.DATA, BlockState.ZERO), epochs: [0, 5, 6], seqs: [0, 2 ** 40, 9] }, 3),
    data,
  ]);
  const decoded = decodeReadReply(payload, 3);
  assert.deepEqual([...decoded.states], [0, 1, 2]);
  assert.deepEqual([...decoded.epochs], [0, 5, 6]);
  assert.deepEqual([...decoded.seqs], [0, 2 ** 40, 9]);
  assert.equal(decoded.data.length, 4096);
  assert.throws(() => decodeReadReply(payload.subarray(0, payload.length - 1), 3), /data bytes/);
});

test('LIST_PG replies and volume id lists round-trip', () => {
  const objects = [
    { volumeId: 7, chunkIndex: 3, states: Uint8Array.of(1, 2), epochs: Uint32Array.of(1, 2), seqs: Float64Array.of(10, 11) },
    { volumeId: 2 ** 50, chunkIndex: 0, states: Uint8Array.of(), epochs: Uint32Array.of(), seqs: Float64Array.of() },
  ];
  assert.deepEqual(decodeListReply(encodeListReply(objects)), objects);
  assert.deepEqual(decodeVolumeIds(encodeVolumeIds([1, 2 ** 52, 0])), [1, 2 ** 52, 0]);
  assert.throws(() => decodeListReply(encodeListReply(objects).subarray(0, 20)), /truncated/);
});

test('KV_LIST_PG pages and cursors round-trip; engine ids map back to their namespace', () => {
  const records = [
    { shardId: 513, key: Buffer.from('a'), value: Buffer.from('manifest'), epoch: 1, seq: 2 ** 45 },
    { shardId: 513, key: Buffer.from([0xff, 0]), value: undefined, epoch: 1, seq: 7 },
    { shardId: NAMESPACE_ID_MAX, key: Buffer.from('k'), value: Buffer.alloc(0), epoch: 2, seq: 0 },
  ];
  assert.deepEqual(decodeKvPgRecords(encodeKvPgRecords(records)), records);
  assert.throws(() => decodeKvPgRecords(encodeKvPgRecords(records).subarray(0, 30)), /truncated/);
  assert.equal(decodeKvPgCursor(encodeKvPgCursor(undefined)), undefined);
  assert.deepEqual(decodeKvPgCursor(encodeKvPgCursor({ shardId: 9, key: Buffer.from('x/y') })), { shardId: 9, key: Buffer.from('x/y') });
  assert.throws(() => decodeKvPgCursor(Buffer.alloc(11)), /wrong length/);
  for (const namespace of [Namespace.S3_DATA, Namespace.S3_INDEX]) {
    for (const id of [0, 12_345, NAMESPACE_ID_MAX]) assert.deepEqual(namespacedId(engineObjectId(namespace, id)), { namespace, id });
  }
  assert.equal(namespacedId(42), undefined, 'a volume id');
  assert.equal(namespacedId(2 ** 53 - 1), undefined, "the store's own shard");
  assert.equal(Op.KV_LIST_PG, 0x24);
});
