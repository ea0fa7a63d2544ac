/**
 * Checkpoints, roots and open: a fresh or lightly used disk opens without reading its unused
 * segments; restart reads the checkpoint image plus a log bounded by the checkpoint interval,
 * whatever the amount of data stored; a crash at any moment of a checkpoint or root write loses
 * nothing; a lost segment header never lets batches behind it come back; damaged metadata is
 * refused, never rolled back silently.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ShaleError } from '../../lib/errors.ts';
import { BLOCK_SIZE_BYTES, GiB, KiB, MiB } from '../../lib/units.ts';
import { StoreEngine } from './engine.ts';
import type { EngineOpenOptions } from './engine.ts';
import { decodeRoot, decodeSuperblock, METADATA_AREA_BYTES, scanSegment, SEGMENT_HEADER_BLOCKS } from './format.ts';
import { readStamp, simEnv, stampedWrite, VersionModel } from './test-support.ts';
import type { SimEnv } from './test-support.ts';

const PATH = '/disks/cp';

function hasCode(code: string) {
  return (error: unknown) => error instanceof ShaleError && error.code === code;
}

async function open(env: SimEnv, options: EngineOpenOptions = {}): Promise<StoreEngine> {
  return StoreEngine.open(env, PATH, { backgroundCompaction: false, ...options });
}

/** Byte offsets of the root slots, newest valid root first. */
function rootSlots(env: SimEnv): number[] {
  const image = env.disk.fileBytes(PATH);
  const decoded = decodeSuperblock(image);
  assert.ok(decoded.ok);
  const { rootSlotOffsetBytes, rootSlotSizeBytes, formatId, segmentCount, segmentSizeBytes } = decoded.superblock;
  const slots = [0, 1].map((slot) => {
    const offset = rootSlotOffsetBytes + slot * rootSlotSizeBytes;
    const root = decodeRoot(image.subarray(offset, offset + rootSlotSizeBytes), slot, formatId, segmentCount, segmentSizeBytes / BLOCK_SIZE_BYTES);
    return { offset, sequence: root?.rootSequence ?? -1 };
  });
  return slots.sort((a, b) => b.sequence - a.sequence).map((slot) => slot.offset);
}

test('a fresh or lightly used 4 GiB disk opens without reading its unused segments', async () => {
  const env = simEnv(1);
  const info = await StoreEngine.format(env, PATH, { sizeBytes: 4 * GiB, clusterId: 'c' });
  assert.equal(info.segmentCount, 255);
  let before = env.disk.stats.readBytes;
  const engine = await open(env);
  const fresh = env.disk.stats.readBytes - before;
  // The superblock, the roots and the two header blocks of each planned segment (2 GiB worth): no segment is read.
  assert.ok(fresh < 1.5 * MiB, `a fresh disk's open read ${fresh} bytes`);
  assert.equal(engine.replayReport.segmentsScanned, 0);
  assert.ok(engine.replayReport.headersRead <= 128);
  // Light use: 24 MiB in three volumes, then a clean close (a checkpoint).
  for (let i = 0; i < 24; i++) await engine.write(stampedWrite(1 + (i % 3), i, 0, 256, 1, i + 1));
  await engine.close();
  before = env.disk.stats.readBytes;
  const again = await open(env);
  const light = env.disk.stats.readBytes - before;
  assert.equal(again.replayReport.segmentsScanned, 0, 'a clean close leaves nothing to replay');
  assert.ok(light < 1.5 * MiB, `after a clean close, open read ${light} bytes`);
  assert.equal(readStamp((await again.read(2, 4, 255, 1)).data)?.seq, 5);
  // After a crash: the image plus only the segments written since the checkpoint.
  for (let i = 0; i < 8; i++) await again.write(stampedWrite(4, i, 0, 256, 1, i + 1));
  await again.flush();
  env.disk.crash();
  before = env.disk.stats.readBytes;
  const third = await open(env);
  const crashed = env.disk.stats.readBytes - before;
  assert.ok(third.replayReport.segmentsScanned <= 3, `scanned ${third.replayReport.segmentsScanned} segments`);
  assert.ok(crashed < 3 * 16 * MiB + 1.5 * MiB, `after a crash, open read ${crashed} bytes`);
  assert.equal(readStamp((await third.read(4, 7, 100, 1)).data)?.seq, 8);
  await third.close();
});

test('restart after a crash reads a log bounded by the checkpoint interval, not by the data stored', async () => {
  const interval = 4 * MiB;
  const readAfterCrash = async (dataBytes: number): Promise<{ read: number; report: StoreEngine['replayReport'] }> => {
    const env = simEnv(2);
    await StoreEngine.format(env, PATH, { sizeBytes: 256 * MiB, clusterId: 'c', segmentSizeBytes: 1 * MiB });
    const engine = await open(env, { checkpointIntervalBytes: interval });
    const writes = dataBytes / (256 * KiB);
    for (let i = 0; i < writes; i++) await engine.write(stampedWrite(1, Math.floor(i / 16), (i % 16) * 64, 64, 1, i + 1));
    await engine.flush();
    assert.ok(engine.stats().checkpointsWritten >= Math.floor(dataBytes / interval) - 1, `${engine.stats().checkpointsWritten} checkpoints`);
    env.disk.crash();
    const before = env.disk.stats.readBytes;
    const again = await open(env, { checkpointIntervalBytes: interval });
    const read = env.disk.stats.readBytes - before;
    const last = writes - 1;
    assert.equal(readStamp((await again.read(1, Math.floor(last / 16), (last % 16) * 64 + 63, 1)).data)?.seq, writes);
    const report = again.replayReport;
    await again.close();
    return { read, report };
  };
  const small = await readAfterCrash(16 * MiB);
  const large = await readAfterCrash(96 * MiB);
  const bound = interval + 3 * MiB + large.report.imageBytes;
  assert.ok(small.read < bound, `16 MiB stored: restart read ${small.read} bytes`);
  assert.ok(large.read < bound, `96 MiB stored: restart read ${large.read} bytes (bound ${bound})`);
  assert.ok(large.report.imageBytes > small.report.imageBytes, 'the image grows with the data (about 13 bytes a block)');
});

test('regression: batches behind a lost segment header never come back when the segment is reused', async () => {
  const env = simEnv(3, { survivalProbability: 1, tearProbability: 0 });
  await StoreEngine.format(env, PATH, { sizeBytes: METADATA_AREA_BYTES + 16 * 64 * KiB, clusterId: 'c', segmentSizeBytes: 64 * KiB });
  const engine = await open(env);
  await engine.write(stampedWrite(1, 0, 0, 12, 1, 1)); // fills most of segment 0
  await engine.flush();
  // These open segment 1 and land (all unsynced writes survive this crash)…
  for (let i = 0; i < 4; i++) await engine.write(stampedWrite(1, 0, i * 2, 2, 1, 10 + i));
  const formatId = (decodeSuperblock(env.disk.fileBytes(PATH)) as { ok: true; superblock: { formatId: Buffer } }).superblock.formatId;
  const segmentAt = (s: number) => METADATA_AREA_BYTES + s * 64 * KiB;
  const scan = (s: number) => scanSegment(env.disk.fileBytes(PATH).subarray(segmentAt(s), segmentAt(s + 1)), s, formatId);
  const orphans = scan(1);
  assert.equal(orphans.batches.length, 4, 'the four writes went to segment 1');
  env.disk.crash();
  // … but its header did not: torn away.
  env.disk.plant(PATH, segmentAt(1), Buffer.alloc(SEGMENT_HEADER_BLOCKS * BLOCK_SIZE_BYTES));
  const again = await open(env);
  assert.deepEqual([...(await again.read(1, 0, 0, 8)).versions.seqs], [1, 1, 1, 1, 1, 1, 1, 1], 'never synced: lost');
  // Reuse segment 1 with a short batch: the old batches' extents lie behind it.
  await again.write(stampedWrite(2, 0, 0, 1, 1, 1));
  await again.flush();
  const reused = scan(1);
  assert.ok(reused.header && reused.header.generation > orphans.header!.generation, 'segment 1 reused with a higher generation');
  env.disk.crash();
  const third = await open(env);
  assert.deepEqual([...(await third.read(1, 0, 0, 8)).versions.seqs], [1, 1, 1, 1, 1, 1, 1, 1], 'the orphans stay dead');
  assert.equal((await third.read(2, 0, 0, 1)).versions.seqs[0], 1);
  await third.close();
});

/**
 * Crash at each disk operation (every write and sync) of a checkpoint and the writes around it,
 * several seeds each: whatever was flushed before must survive exactly.
 */
async function checkpointCrashScenario(crashAt: number, seed: number): Promise<boolean> {
  const env = simEnv(seed, { survivalProbability: 0.5, tearProbability: 0.5 });
  await StoreEngine.format(env, PATH, { sizeBytes: METADATA_AREA_BYTES + 12 * 64 * KiB, clusterId: 'c', segmentSizeBytes: 64 * KiB });
  const label = `crash at operation ${crashAt}, seed ${seed}`;
  const model = new VersionModel(label);
  const engine = await open(env);
  let seq = 0;
  const write = async (volumeId: number, offsetBlocks: number, countBlocks: number) => {
    const ack = model.issue(volumeId, 0, offsetBlocks, countBlocks, 1, ++seq, false);
    await engine.write(stampedWrite(volumeId, 0, offsetBlocks, countBlocks, 1, seq));
    ack();
  };
  for (let i = 0; i < 12; i++) await write(1 + (i % 2), i, 2);
  await engine.setSnapshots(1, [1], { snapSeq: 1 });
  await engine.fence(2, 5);
  const flushed = model.flushIssued();
  await engine.flush();
  flushed();
  let operations = 0;
  let crashed = false;
  env.disk.onOperation = () => {
    if (++operations === crashAt) {
      crashed = true;
      env.disk.crash();
    }
  };
  try {
    await engine.checkpoint();
    for (let i = 0; i < 6; i++) await write(3, i * 2, 2);
    await engine.checkpoint();
    await engine.flush();
  } catch (error) {
    if (!crashed) throw error;
  }
  env.disk.onOperation = undefined;
  if (!crashed) return false;
  const again = await open(env);
  await model.verify(again, { exact: false, settle: false });
  assert.equal(again.ownerEpoch(2), 5, `${label}: fence lost`);
  assert.deepEqual(again.snapshots(1)?.ids, [1], `${label}: snapshot list lost`);
  await again.close();
  return true;
}

test('a crash at any moment of a checkpoint or of its root write loses nothing', async () => {
  let crashAt = 1;
  for (; ; crashAt++) {
    let crashed = false;
    for (let variant = 0; variant < 5; variant++) crashed = (await checkpointCrashScenario(crashAt, 2000 + crashAt * 10 + variant)) || crashed;
    if (!crashed) break;
  }
  assert.ok(crashAt > 10, `the scenario performs disk operations (${crashAt - 1})`);
});

test('one damaged root slot falls back to the other; both damaged, or a damaged image, is refused untouched', async () => {
  const env = simEnv(4);
  await StoreEngine.format(env, PATH, { sizeBytes: METADATA_AREA_BYTES + 12 * 64 * KiB, clusterId: 'c', segmentSizeBytes: 64 * KiB });
  const engine = await open(env);
  await engine.write(stampedWrite(1, 0, 0, 4, 1, 1));
  await engine.close(); // checkpoint, committed by a root
  const reopened = await open(env); // writes the next root: same checkpoint
  const rootSequence = reopened.replayReport.rootSequence + 1;
  await reopened.close(); // nothing new: no checkpoint, the roots stay as they are
  // Rot in the newest root: the older one names the same checkpoint, and nothing contradicts it.
  env.disk.corrupt(PATH, rootSlots(env)[0]! + 20);
  const fallback = await open(env);
  assert.equal(fallback.replayReport.rootSequence, rootSequence - 1);
  assert.equal(readStamp((await fallback.read(1, 0, 3, 1)).data)?.seq, 1);
  await fallback.close();
  // Both slots rotten: refused, nothing written.
  for (const offset of rootSlots(env)) env.disk.corrupt(PATH, offset + 20);
  const image = env.disk.fileBytes(PATH);
  await assert.rejects(open(env), (error: unknown) => hasCode('CHECKSUM')(error) && /root/.test((error as Error).message));
  assert.ok(env.disk.fileBytes(PATH).equals(image), 'a refused disk is left untouched');

  // A damaged checkpoint image.
  const env2 = simEnv(5);
  await StoreEngine.format(env2, PATH, { sizeBytes: METADATA_AREA_BYTES + 12 * 64 * KiB, clusterId: 'c', segmentSizeBytes: 64 * KiB });
  const writer = await StoreEngine.open(env2, PATH, { backgroundCompaction: false });
  await writer.write(stampedWrite(1, 0, 0, 4, 1, 1));
  await writer.close();
  const checkpointSegment = (await open(env2)).segmentStats().find((s) => s.state === 'checkpoint')!.segment;
  env2.disk.corrupt(PATH, METADATA_AREA_BYTES + checkpointSegment * 64 * KiB + SEGMENT_HEADER_BLOCKS * BLOCK_SIZE_BYTES + 40);
  await assert.rejects(StoreEngine.open(env2, PATH), (error: unknown) => hasCode('CHECKSUM')(error) && /image/.test((error as Error).message));
});

test('a stale root is never used when a newer one existed: refused instead of rolled back', async () => {
  const env = simEnv(6);
  await StoreEngine.format(env, PATH, { sizeBytes: METADATA_AREA_BYTES + 12 * 64 * KiB, clusterId: 'c', segmentSizeBytes: 64 * KiB });
  const engine = await open(env);
  await engine.write(stampedWrite(1, 0, 0, 2, 1, 1));
  await engine.flush();
  env.disk.crash();
  // The reopen writes a root that plans the unopened segments one generation up; a write opens one.
  const again = await open(env);
  await again.write(stampedWrite(1, 0, 2, 2, 1, 2));
  await again.flush();
  assert.equal(again.stats().rootsWritten, 1);
  env.disk.crash();
  // That root rots: the older one planned the segment now open at the lower generation.
  env.disk.corrupt(PATH, rootSlots(env)[0]! + 20);
  await assert.rejects(open(env), (error: unknown) => hasCode('CHECKSUM')(error) && /newest root is damaged/.test((error as Error).message));
});

test('sequences are never reused: each root leases a range and the next instance starts above it', async () => {
  const env = simEnv(7, { survivalProbability: 0.5 });
  await StoreEngine.format(env, PATH, { sizeBytes: METADATA_AREA_BYTES + 16 * 64 * KiB, clusterId: 'c', segmentSizeBytes: 64 * KiB });
  let engine = await open(env, { sequenceLeaseBatches: 8 });
  const formatId = (decodeSuperblock(env.disk.fileBytes(PATH)) as { ok: true; superblock: { formatId: Buffer } }).superblock.formatId;
  const highestOnDisk = () => {
    const image = env.disk.fileBytes(PATH);
    let highest = 0;
    for (let s = 0; s < 16; s++) highest = Math.max(highest, scanSegment(image.subarray(METADATA_AREA_BYTES + s * 64 * KiB, METADATA_AREA_BYTES + (s + 1) * 64 * KiB), s, formatId).sequenceMax);
    return highest;
  };
  for (let round = 0; round < 4; round++) {
    const rootsBefore = engine.stats().rootsWritten;
    for (let i = 0; i < 30; i++) await engine.write(stampedWrite(1, 0, i % 20, 1, 1, round * 100 + i + 1));
    assert.ok(engine.stats().rootsWritten - rootsBefore >= 3, 'the lease is renewed by roots as batches go out');
    const written = highestOnDisk();
    env.disk.crash();
    engine = await open(env, { sequenceLeaseBatches: 8 });
    assert.ok(engine.replayReport.nextSequence > written, `round ${round}: next sequence ${engine.replayReport.nextSequence} reuses ${written}`);
  }
  await engine.close();
});

test('an object with more versions than its contexts hold (a wide table) survives checkpoint, replay and compaction', async () => {
  const env = simEnv(8);
  await StoreEngine.format(env, PATH, { sizeBytes: 64 * MiB, clusterId: 'c', segmentSizeBytes: 1 * MiB });
  const engine = await open(env);
  await engine.setSnapshots(1, [1], { snapSeq: 1 });
  // 400 blocks, each its own version (the first 100 stamped before snapshot 1, then overwritten after it).
  for (let b = 0; b < 100; b++) await engine.write(stampedWrite(1, 0, b, 1, 1, 2 ** 32 + b, 0));
  for (let b = 0; b < 400; b++) await engine.write(stampedWrite(1, 0, b, 1, 2, 1000 + b, 1));
  assert.equal(engine.stats().snapshotVersions, 100);
  const expect = async (e: StoreEngine, label: string) => {
    const head = await e.read(1, 0, 0, 400);
    const snap = await e.read(1, 0, 0, 400, { snapshotId: 1 });
    for (let b = 0; b < 400; b++) {
      assert.equal(head.versions.seqs[b], 1000 + b, `${label}: head ${b}`);
      assert.equal(readStamp(head.data.subarray(b * BLOCK_SIZE_BYTES, (b + 1) * BLOCK_SIZE_BYTES))?.seq, 1000 + b);
      assert.equal(snap.states[b], b < 100 ? 1 : 0, `${label}: snapshot ${b}`);
      if (b < 100) assert.equal(snap.versions.seqs[b], 2 ** 32 + b, `${label}: snapshot version ${b}`);
    }
  };
  await expect(engine, 'live');
  await engine.flush();
  env.disk.crash();
  const replayed = await open(env);
  await expect(replayed, 'replayed');
  await replayed.checkpoint();
  for (let i = 0; i < 40 && (await replayed.compact()); i++);
  await expect(replayed, 'compacted');
  await replayed.close();
  const checkpointed = await open(env);
  await expect(checkpointed, 'from the checkpoint');
  await checkpointed.close();
});

/**
 * Bit rot in the newest root (any byte of it), after writes, compactions and checkpoints that
 * made roots extend the plan: open falls back to the other slot and replays from it, and — since
 * the lost root may have planned and opened segments the older one does not list — reads every
 * segment header to replay those too. Nothing flushed is lost. Regression: before the scan, a
 * flushed write in a segment only the damaged root had planned was silently rolled back.
 */
test('a damaged newest root: open falls back to the other slot, replays what the lost root opened, loses nothing flushed (many seeds)', async () => {
  let foundByScan = 0;
  for (let seed = 1; seed <= 40; seed++) {
    const env = simEnv(seed);
    const random = env.disk.random.fork();
    await StoreEngine.format(env, PATH, { sizeBytes: METADATA_AREA_BYTES + 40 * 64 * KiB, clusterId: 'c', segmentSizeBytes: 64 * KiB });
    // A short plan (4 segments per root) and a small checkpoint interval: roots and checkpoints come often.
    const engine = await open(env, { queueSegments: 4, checkpointIntervalBytes: 1 * MiB });
    const latest = new Map<number, number>();
    let seq = 0;
    const writes = 40 + random.below(seed % 2 === 0 ? 800 : 120);
    for (let i = 0; i < writes; i++) {
      const block = random.below(150);
      await engine.write(stampedWrite(1, 0, block, 1, 1, ++seq));
      latest.set(block, seq);
      if (random.chance(0.05)) await engine.compact();
    }
    await engine.flush();
    env.disk.crash();
    const newest = rootSlots(env)[0]!;
    const image = env.disk.fileBytes(PATH);
    env.disk.corrupt(PATH, newest + random.below(image.readUInt32LE(newest + 16)));
    let again: StoreEngine;
    try {
      again = await open(env);
    } catch (error) {
      assert.fail(`seed=${seed}: open refused after one damaged root: ${(error as Error).message}`);
    }
    assert.equal(again.replayReport.rootFallback, true, `seed=${seed}: the fallback was noticed`);
    foundByScan += again.replayReport.segmentsFoundByScan;
    for (const [block, version] of latest) {
      assert.equal(readStamp((await again.read(1, 0, block, 1)).data)?.seq, version, `seed=${seed}: block ${block} holds the flushed version`);
    }
    await again.close();
  }
  assert.ok(foundByScan > 0, 'some seeds had segments only the damaged root listed');
});
