import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BlockState, ObjectTable } from './block-index.ts';

/** Contexts in use: every context but "absent" that some head holds. */
function heldContexts(table: ObjectTable): Set<number> {
  const held = new Set<number>();
  for (let block = 0; block < table.highestBlocks; block++) if (table.ctx[block] !== 0) held.add(table.ctx[block]!);
  return held;
}

test('heads of one version share a context; a version no head holds any more frees its context for the next', () => {
  const table = new ObjectTable(1, 0);
  table.ensure(64);
  for (let block = 0; block < 32; block++) table.setHead(block, BlockState.DATA, 3, 10, 0, 100 + block, block);
  assert.equal(heldContexts(table).size, 1, 'one write of 32 blocks: one context');
  // One block overwritten 1000 times: each version's context is freed when the next replaces it.
  for (let seq = 11; seq < 1011; seq++) table.setHead(40, BlockState.DATA, 3, seq, 0, 1000 + seq, seq);
  assert.ok(table.ctxKind.length <= 4, `${table.ctxKind.length - 1} contexts made for 1001 versions, one alive at a time`);
  assert.equal(table.seqAt(40), 1010);
  assert.equal(table.seqAt(5), 10);
});

test('versions that share a sequence number but differ in epoch, kind or stamp keep their own contexts, and are found again', () => {
  const table = new ObjectTable(1, 0);
  table.ensure(16);
  const seq = 77;
  table.setHead(1, BlockState.DATA, 1, seq, 0, 11, 1);
  table.setHead(2, BlockState.DATA, 2, seq, 0, 12, 2);
  table.setHead(3, BlockState.ZERO, 1, seq, 0, 13, 0);
  table.setHead(4, BlockState.DATA, 1, seq, 5, 14, 4);
  assert.equal(heldContexts(table).size, 4);
  // Found again, whichever place in the chain they hold.
  table.setHead(6, BlockState.DATA, 2, seq, 0, 16, 6);
  table.setHead(7, BlockState.DATA, 1, seq, 0, 17, 7);
  table.setHead(8, BlockState.ZERO, 1, seq, 0, 18, 0);
  assert.equal(table.ctx[6], table.ctx[2]);
  assert.equal(table.ctx[7], table.ctx[1]);
  assert.equal(table.ctx[8], table.ctx[3]);
  // Free the middle of the chain (epoch 2) and the head of it; the others are still found.
  table.setHead(2, BlockState.DATA, 9, 1, 0, 22, 2);
  table.setHead(6, BlockState.DATA, 9, 1, 0, 26, 6);
  table.setHead(4, BlockState.DATA, 9, 1, 0, 24, 4);
  table.setHead(9, BlockState.DATA, 1, seq, 0, 19, 9);
  table.setHead(10, BlockState.ZERO, 1, seq, 0, 20, 0);
  assert.equal(table.ctx[9], table.ctx[1]);
  assert.equal(table.ctx[10], table.ctx[3]);
  table.setHead(11, BlockState.DATA, 2, seq, 0, 21, 11);
  assert.ok(!heldContexts(table).has(0));
  assert.deepEqual([table.epochAt(11), table.seqAt(11), table.stateAt(11)], [2, seq, BlockState.DATA]);
  assert.equal(heldContexts(table).size, 4, 'epoch 9 seq 1, and seq 77 as data epoch 1, zero epoch 1, data epoch 2');
});

test('past 255 versions a table widens, and every head keeps its version', () => {
  const table = new ObjectTable(1, 0);
  table.ensure(1024);
  for (let block = 0; block < 600; block++) table.setHead(block, BlockState.DATA, 1 + (block % 3), 2 ** 40 + block, block % 2, 1 + block, block);
  for (let block = 0; block < 600; block++) {
    assert.deepEqual([table.epochAt(block), table.seqAt(block), table.stampAt(block)], [1 + (block % 3), 2 ** 40 + block, block % 2], `block ${block}`);
  }
  // After widening, versions with the same high sequence bits share contexts by (kind, epoch, stamp).
  assert.ok(heldContexts(table).size <= 6, `${heldContexts(table).size} contexts after widening`);
});
