import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { blockChecksums, crc32c } from '../../lib/crc32c.ts';
import { BLOCK_SIZE_BYTES } from '../../lib/units.ts';
import { BlockIndex } from './block-index.ts';
import { Fifo } from './fifo.ts';
import {
  badDataBlocks, batchHeaderBlocks, decodeBatchHeader, decodeSegmentHeader, decodeSuperblock, encodeSegmentHeader, encodeSuperblock,
  RecordKind, scanSegment, sealBatchHeader, SEGMENT_HEADER_BLOCKS, SegmentKind, writeCrcEntry, writeRecordEntry,
} from './format.ts';
import type { BatchRecord, Superblock } from './format.ts';

const formatId = Buffer.from('00112233445566778899aabbccddeeff', 'hex');

const superblock: Superblock = {
  formatVersion: 1,
  segmentSizeBytes: 16 * 1024 * 1024,
  segmentCount: 100,
  segmentAreaOffsetBytes: 1024 * 1024,
  sizeBytes: 1024 * 1024 + 100 * 16 * 1024 * 1024,
  formattedWallMs: 1_700_000_000_123,
  diskUuid: '0f0e0d0c-0b0a-4908-8706-050403020100',
  formatId,
  clusterId: 'clüster-1',
  rootSlotOffsetBytes: 8192,
  rootSlotSizeBytes: 4096,
};

test('superblock round-trips; any flipped byte or a short buffer makes it invalid', () => {
  const block = encodeSuperblock(superblock);
  const decoded = decodeSuperblock(block);
  assert.ok(decoded.ok);
  assert.deepEqual(decoded.superblock, superblock);
  for (const offset of [0, 8, 12, 20, 30, 70, 90, 100, 200, 4095]) {
    const copy = Buffer.from(block);
    copy[offset]! ^= 0x10;
    assert.equal(decodeSuperblock(copy).ok, false, `byte ${offset}`);
  }
  assert.equal(decodeSuperblock(block.subarray(0, 100)).ok, false);
  const future = Buffer.from(block);
  future.writeUInt32LE(2, 8);
  assert.deepEqual(decodeSuperblock(future), { ok: false, reason: 'unknown-version', version: 2 });
});

test('segment header round-trips and is bound to its segment and disk', () => {
  const block = encodeSegmentHeader({ segmentIndex: 7, kind: SegmentKind.LOG, generation: 3, firstSequence: 12345, formatId });
  assert.deepEqual(decodeSegmentHeader(block, 0, 7, formatId), { segmentIndex: 7, kind: SegmentKind.LOG, generation: 3, firstSequence: 12345, formatId });
  assert.equal(decodeSegmentHeader(block, 0, 8, formatId), undefined);
  assert.equal(decodeSegmentHeader(block, 0, 7, Buffer.alloc(16)), undefined);
  block[30]! ^= 1;
  assert.equal(decodeSegmentHeader(block, 0, 7, formatId), undefined);
});

function buildBatch(segmentBlocks: number, position: number, generation: number, sequence: number, records: BatchRecord[], data: Buffer): Buffer {
  const segment = Buffer.alloc(segmentBlocks * BLOCK_SIZE_BYTES);
  const dataBlocks = data.length / BLOCK_SIZE_BYTES;
  const headerBlocks = batchHeaderBlocks(records.length, dataBlocks);
  const header = Buffer.alloc(headerBlocks * BLOCK_SIZE_BYTES);
  records.forEach((record, i) => writeRecordEntry(header, i, record));
  blockChecksums(data).forEach((crc, i) => writeCrcEntry(header, records.length, i, crc));
  sealBatchHeader(header, {
    segmentIndex: 2, headerBlocks, generation, sequence, incarnationFirstSequence: 1, durableSequence: sequence - 1,
    formatId, positionBlocks: position, recordCount: records.length, dataBlocks,
  });
  header.copy(segment, position * BLOCK_SIZE_BYTES);
  data.copy(segment, (position + headerBlocks) * BLOCK_SIZE_BYTES);
  return segment;
}

test('batch header round-trips records and crcs; it is bound to its segment, position and disk', () => {
  const data = Buffer.alloc(3 * BLOCK_SIZE_BYTES);
  data.fill(1, 0, BLOCK_SIZE_BYTES);
  data.fill(2, BLOCK_SIZE_BYTES);
  const records: BatchRecord[] = [
    { kind: RecordKind.DATA, volumeId: 2 ** 40 + 5, chunkIndex: 4_000_000_000, offsetBlocks: 9, countBlocks: 3, epoch: 7, seq: 2 ** 50, snapSeq: 11, dataIndexBlocks: 0 },
    { kind: RecordKind.ZERO, volumeId: 1, chunkIndex: 0, offsetBlocks: 0, countBlocks: 262_144, epoch: 1, seq: 2, snapSeq: 0, dataIndexBlocks: 0 },
    { kind: RecordKind.FENCE, volumeId: 1, chunkIndex: 0, offsetBlocks: 0, countBlocks: 0, epoch: 2 ** 32 - 1, seq: 0, snapSeq: 0, dataIndexBlocks: 0 },
    { kind: RecordKind.PURGE, volumeId: 3, chunkIndex: 0, offsetBlocks: 0, countBlocks: 0, epoch: 0, seq: 0, snapSeq: 0, dataIndexBlocks: 0 },
  ];
  const segment = buildBatch(16, 5, 4, 99, records, data);
  const batch = decodeBatchHeader(segment, 5, 2, formatId);
  assert.ok(batch);
  assert.deepEqual(batch.records, records);
  assert.deepEqual([...batch.checksums], [...blockChecksums(data)]);
  assert.equal(batch.generation, 4);
  assert.equal(batch.sequence, 99);
  assert.deepEqual(badDataBlocks(segment, batch), []);
  assert.equal(decodeBatchHeader(segment, 5, 3, formatId), undefined, 'other segment');
  assert.equal(decodeBatchHeader(segment, 4, 2, formatId), undefined, 'other position');
  assert.equal(decodeBatchHeader(segment, 5, 2, Buffer.alloc(16)), undefined, 'other disk');
  // A flipped data bit is found by badDataBlocks, a flipped header bit invalidates the header.
  segment[(5 + 1 + 2) * BLOCK_SIZE_BYTES + 9]! ^= 4;
  assert.deepEqual(badDataBlocks(segment, batch), [2]);
  segment[5 * BLOCK_SIZE_BYTES + 200]! ^= 4;
  assert.equal(decodeBatchHeader(segment, 5, 2, formatId), undefined);
});

/** Seals `length` bytes at `offset` again as the format does: crc32c of all of it, bytes 12..15 counted as zeros. */
function resealStructure(buffer: Buffer, offset: number, length: number): void {
  buffer.writeUInt32LE(0, offset + 12);
  buffer.writeUInt32LE(crc32c(buffer.subarray(offset, offset + length)), offset + 12);
}

test('a header with a valid crc but the wrong magic is refused (segment header and batch)', () => {
  const segmentHeader = encodeSegmentHeader({ segmentIndex: 7, kind: SegmentKind.LOG, generation: 3, firstSequence: 12345, formatId });
  resealStructure(segmentHeader, 0, BLOCK_SIZE_BYTES);
  assert.ok(decodeSegmentHeader(segmentHeader, 0, 7, formatId), 'resealed unchanged: still valid');
  segmentHeader[7]! ^= 1; // the last byte of SHALESEG
  resealStructure(segmentHeader, 0, BLOCK_SIZE_BYTES);
  assert.equal(decodeSegmentHeader(segmentHeader, 0, 7, formatId), undefined);

  const record: BatchRecord = { kind: RecordKind.DATA, volumeId: 1, chunkIndex: 0, offsetBlocks: 0, countBlocks: 1, epoch: 1, seq: 1, snapSeq: 0, dataIndexBlocks: 0 };
  const segment = buildBatch(16, 2, 1, 1, [record], Buffer.alloc(BLOCK_SIZE_BYTES, 9));
  const headerBytes = batchHeaderBlocks(1, 1) * BLOCK_SIZE_BYTES;
  resealStructure(segment, 2 * BLOCK_SIZE_BYTES, headerBytes);
  assert.ok(decodeBatchHeader(segment, 2, 2, formatId), 'resealed unchanged: still valid');
  segment[2 * BLOCK_SIZE_BYTES + 7]! ^= 1; // the last byte of SHALEBAT
  resealStructure(segment, 2 * BLOCK_SIZE_BYTES, headerBytes);
  assert.equal(decodeBatchHeader(segment, 2, 2, formatId), undefined);
  assert.equal(scanSegment(segment, 2, formatId).batches.length, 0);
});

test('a crc-valid header with a malformed record is not a batch', () => {
  const bad: BatchRecord = { kind: RecordKind.DATA, volumeId: 1, chunkIndex: 0, offsetBlocks: 0, countBlocks: 2, epoch: 1, seq: 1, snapSeq: 0, dataIndexBlocks: 0 };
  const segment = buildBatch(16, 2, 1, 1, [bad], Buffer.alloc(BLOCK_SIZE_BYTES)); // claims 2 blocks, batch holds 1
  assert.equal(decodeBatchHeader(segment, 2, 2, formatId), undefined);
});

test('random garbage never decodes as a superblock, segment header or batch', () => {
  fc.assert(
    fc.property(fc.uint8Array({ minLength: BLOCK_SIZE_BYTES * 2, maxLength: BLOCK_SIZE_BYTES * 2 }), fc.boolean(), (bytes, withMagic) => {
      const buffer = Buffer.from(bytes);
      if (withMagic) {
        buffer.write('SHALE-SB', 0, 'latin1');
        buffer.write('SHALEBAT', BLOCK_SIZE_BYTES, 'latin1');
        buffer.writeUInt32LE(1, 8);
      }
      assert.equal(decodeSuperblock(buffer).ok, false);
      assert.equal(decodeSegmentHeader(buffer, 0, 0, formatId), undefined);
      assert.equal(decodeBatchHeader(buffer, 1, 2, formatId), undefined);
    }),
    { numRuns: 300 },
  );
});

test('scanSegment walks the chain, steps over damage, and counts every header for the maxima', () => {
  const record = (seq: number, count: number): BatchRecord => ({
    kind: RecordKind.DATA, volumeId: 1, chunkIndex: 0, offsetBlocks: 0, countBlocks: count, epoch: 1, seq, snapSeq: 0, dataIndexBlocks: 0,
  });
  const place = (segment: Buffer, from: Buffer, position: number, blocks: number) =>
    from.copy(segment, position * BLOCK_SIZE_BYTES, position * BLOCK_SIZE_BYTES, (position + blocks) * BLOCK_SIZE_BYTES);
  // Generation 2: a batch at block 2 with 6 data blocks (extent 2..8) …
  const segment = buildBatch(32, 2, 2, 10, [record(10, 6)], Buffer.alloc(6 * BLOCK_SIZE_BYTES, 1));
  // … with a generation-1 header (seq 30) left inside its extent, …
  place(segment, buildBatch(32, 4, 1, 30, [record(30, 1)], Buffer.alloc(BLOCK_SIZE_BYTES, 2)), 4, 1);
  // … then a batch right after it at 9, damage where the next one should start, and one at 20 after the gap.
  place(segment, buildBatch(32, 9, 2, 11, [record(11, 1)], Buffer.alloc(BLOCK_SIZE_BYTES, 3)), 9, 2);
  segment.fill(0xee, 11 * BLOCK_SIZE_BYTES, 20 * BLOCK_SIZE_BYTES);
  place(segment, buildBatch(32, 20, 2, 13, [record(13, 1)], Buffer.alloc(BLOCK_SIZE_BYTES, 4)), 20, 2);
  const header = encodeSegmentHeader({ segmentIndex: 2, kind: SegmentKind.LOG, generation: 2, firstSequence: 10, formatId });
  header.copy(segment, 0);
  header.copy(segment, BLOCK_SIZE_BYTES);
  const scan = scanSegment(segment, 2, formatId);
  assert.equal(scan.header?.generation, 2);
  assert.deepEqual(scan.batches.map((b) => b.sequence), [10, 11, 13]);
  assert.deepEqual(scan.gapsBefore, [13]);
  assert.equal(scan.staleBatches, 1);
  assert.equal(scan.generationMax, 2);
  assert.equal(scan.sequenceMax, 30, 'the hidden header counts: the next sequence must pass it');
  assert.deepEqual(badDataBlocks(segment, scan.batches[0]!), [1], 'the block holding the old header fails its crc');

  // A header of a newer generation than the segment header's: the segment was being reused and
  // its new header was lost, so nothing in it is live — and the next reuse must pass generation 3.
  place(segment, buildBatch(32, 26, 3, 40, [record(40, 1)], Buffer.alloc(BLOCK_SIZE_BYTES, 5)), 26, 2);
  const reused = scanSegment(segment, 2, formatId);
  assert.equal(reused.header, undefined);
  assert.deepEqual(reused.batches, []);
  assert.equal(reused.generationMax, 3);
  assert.equal(reused.sequenceMax, 40);
  assert.equal(SEGMENT_HEADER_BLOCKS, 2);
});

test('BlockIndex grows tables and deletes volumes; Fifo keeps order', () => {
  const index = new BlockIndex();
  const table = index.getOrCreate(5, 1, 3);
  assert.equal(table.capacity, 16);
  table.setHead(2, 1, 7, 2 ** 40 + 42, 3, 99, 1234);
  index.getOrCreate(5, 1, 1000);
  assert.equal(table.capacity, 1024);
  assert.deepEqual([table.stateAt(2), table.epochAt(2), table.seqAt(2), table.stampAt(2), table.location[2], table.crc[2]], [1, 7, 2 ** 40 + 42, 3, 99, 1234], 'growing keeps the slots');
  assert.equal(table.stateAt(5000), 0);
  // Compact while few versions (9 bytes a block); wide once more than 255, keeping every value.
  const busy = index.getOrCreate(7, 0, 1024);
  assert.equal(busy.memoryBytes, 1024 * 9);
  for (let b = 0; b < 200; b++) busy.setHead(b, 1, 1, 2 ** 33 + b, b % 3, 1000 + b, b);
  busy.insertHistory(5, 2, 1, 7, 0, 77, 0);
  assert.equal(busy.wideSeq, false);
  for (let b = 200; b < 600; b++) busy.setHead(b, 1 + (b % 2), 2, b, 9, 1000 + b, b);
  assert.equal(busy.wideSeq, true);
  assert.equal(busy.memoryBytes, 1024 * 13 + 1024 * 4 + 16 * 18);
  for (let b = 0; b < 600; b++) {
    const want = b < 200 ? [1, 1, 2 ** 33 + b, b % 3] : [1 + (b % 2), 2, b, 9];
    assert.deepEqual([busy.stateAt(b), busy.epochAt(b), busy.seqAt(b), busy.stampAt(b), busy.location[b], busy.crc[b]], [...want, 1000 + b, b]);
  }
  const kept = busy.firstHistory(5);
  assert.deepEqual([busy.entryKind(kept), busy.entryEpoch(kept), busy.entrySeq(kept), busy.entryStamp(kept), busy.hLocation[kept]], [2, 1, 7, 0, 77]);
  for (let b = 0; b < 600; b++) busy.clearHead(b);
  assert.equal(busy.presentBlocks, 0);
  index.getOrCreate(6, 0, 1);
  assert.equal(index.objectCount, 3);
  assert.equal(index.deleteVolume(5).length, 1);
  assert.equal(index.objectCount, 2);
  assert.equal(index.get(5, 1), undefined);

  const fifo = new Fifo<number>();
  for (let i = 0; i < 3000; i++) fifo.push(i);
  for (let i = 0; i < 2500; i++) assert.equal(fifo.shift(), i);
  assert.equal(fifo.length, 500);
  assert.equal(fifo.peek(), 2500);
  assert.deepEqual(fifo.drain().slice(0, 2), [2500, 2501]);
  assert.ok(fifo.isEmpty);
});
