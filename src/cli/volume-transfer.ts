/**
 * `shale volume export` and `shale volume import`: a volume at a snapshot to an image file (full,
 * or incremental from an older snapshot) and back, in the format of src/client/volume-image.ts.
 * Both resume after an interruption:
 *  - export appends records in offset order; run again on the same file, it keeps every whole
 *    record (checked by crc32c), cuts a torn tail, and goes on after the last one;
 *  - import records its position in `FILE.import-VOLUME.progress` after every flushed batch; run
 *    again, it skips what was applied (applying a record twice is harmless).
 */
import { open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import type { ClusterClient } from '../client/cluster-client.ts';
import { SnapshotView } from '../client/snapshot-view.ts';
import { ChainReader, parentLayers } from '../client/snap-chain.ts';
import { chunksOf, diffVolume, openExclusive, type ChangedRange, type Progress } from '../client/volume-ops.ts';
import {
  DATA_RECORD_BYTES_MAX, decodeImageHeader, decodeRecordHeader, encodeImageHeader, encodeRecordHeader, IMAGE_HEADER_BYTES, type ImageHeader,
  RECORD_HEADER_BYTES, RecordKind,
} from '../client/volume-image.ts';
import { crc32c } from '../lib/crc32c.ts';
import { ShaleError } from '../lib/errors.ts';
import { BLOCK_SIZE_BYTES } from '../lib/units.ts';
import { BlockState } from '../proto/store-protocol.ts';
import type { VolumeInfo } from '../conductor/api/types.ts';

/** Bytes an import applies between two flushes (and progress-file updates). */
const importBatchBytes = 64 * 1024 * 1024;

export interface ExportResult {
  file: string;
  records: number;
  dataBytes: number;
  zeroBytes: number;
  resumedFromBytes: number;
  alreadyComplete: boolean;
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(() => true, () => false);
}

/** Reads the whole records of an existing export: where they end in the file and in the volume, whether END is there. */
async function scanImage(path: string): Promise<{ header: ImageHeader; fileBytes: number; volumeBytes: number; records: number; complete: boolean }> {
  const handle = await open(path, 'r');
  try {
    const headerBytes = Buffer.alloc(IMAGE_HEADER_BYTES);
    const { bytesRead } = await handle.read(headerBytes, 0, IMAGE_HEADER_BYTES, 0);
    if (bytesRead < IMAGE_HEADER_BYTES) throw new ShaleError('INVALID_ARGUMENT', `${path} is not a Shale volume image (too short)`);
    const header = decodeImageHeader(headerBytes);
    let position = IMAGE_HEADER_BYTES;
    let volumeBytes = 0;
    let records = 0;
    const recordHeader = Buffer.alloc(RECORD_HEADER_BYTES);
    for (;;) {
      const got = await handle.read(recordHeader, 0, RECORD_HEADER_BYTES, position);
      const record = got.bytesRead === RECORD_HEADER_BYTES ? decodeRecordHeader(recordHeader) : undefined;
      if (!record) return { header, fileBytes: position, volumeBytes, records, complete: false };
      if (record.kind === RecordKind.END) return { header, fileBytes: position + RECORD_HEADER_BYTES, volumeBytes, records, complete: record.lengthBytes === records };
      if (record.kind === RecordKind.DATA) {
        const data = Buffer.alloc(record.lengthBytes);
        const read = await handle.read(data, 0, record.lengthBytes, position + RECORD_HEADER_BYTES);
        if (read.bytesRead !== record.lengthBytes || crc32c(data) !== record.dataCrc) return { header, fileBytes: position, volumeBytes, records, complete: false };
        position += record.lengthBytes;
      }
      position += RECORD_HEADER_BYTES;
      volumeBytes = record.offsetBytes + record.lengthBytes;
      records++;
    }
  } finally {
    await handle.close();
  }
}

/** Pieces of the ranges from `fromBytes` on, split at chunk boundaries and at most DATA_RECORD_BYTES_MAX. */
function* piecesOf(ranges: readonly ChangedRange[], chunkSizeBytes: number, fromBytes: number): Generator<{ offsetBytes: number; lengthBytes: number }> {
  for (const range of ranges) {
    let at = Math.max(range.offsetBytes, fromBytes);
    const end = range.offsetBytes + range.lengthBytes;
    while (at < end) {
      const chunkEnd = (Math.floor(at / chunkSizeBytes) + 1) * chunkSizeBytes;
      const pieceEnd = Math.min(end, chunkEnd, at + DATA_RECORD_BYTES_MAX);
      yield { offsetBytes: at, lengthBytes: pieceEnd - at };
      at = pieceEnd;
    }
  }
}

/**
 * Writes `volume@snapshot` (incremental from `fromSnapshot` when given) to `path`. An existing
 * file of the same export is resumed; any other existing file is refused (ALREADY_EXISTS) unless
 * `overwrite`.
 */
export async function exportVolume(cluster: ClusterClient, volumeName: string, snapshotName: string, path: string,
  options: { fromSnapshot?: string; overwrite?: boolean; progress?: Progress } = {}): Promise<ExportResult> {
  const progress = options.progress ?? (() => {});
  const view = await SnapshotView.open(cluster, volumeName, snapshotName);
  const from = options.fromSnapshot === undefined ? undefined : await cluster.conductor.snapshot(volumeName, options.fromSnapshot);
  const header: ImageHeader = {
    volume: volumeName, snapshot: snapshotName, snapshotId: view.snapshot.id, fromSnapshot: from?.name ?? null, fromSnapshotId: from?.id ?? null,
    sizeBytes: view.sizeBytes, blockSizeBytes: 4096, createdAt: new Date().toISOString(),
  };
  let resumeFileBytes = 0;
  let resumeVolumeBytes = 0;
  let records = 0;
  if (await exists(path) && !options.overwrite) {
    const scanned = await scanImage(path).catch((error: unknown) => {
      throw new ShaleError('ALREADY_EXISTS', `${path} exists and is not an export to resume (${(error as Error).message}): pass --overwrite to replace it`);
    });
    const same = scanned.header.volume === volumeName && scanned.header.snapshotId === header.snapshotId && scanned.header.fromSnapshotId === header.fromSnapshotId;
    if (!same) throw new ShaleError('ALREADY_EXISTS', `${path} holds an export of ${scanned.header.volume}@${scanned.header.snapshot}: pass --overwrite to replace it`);
    if (scanned.complete) {
      progress(view.sizeBytes, view.sizeBytes);
      return { file: path, records: scanned.records, dataBytes: 0, zeroBytes: 0, resumedFromBytes: scanned.volumeBytes, alreadyComplete: true };
    }
    resumeFileBytes = scanned.fileBytes;
    resumeVolumeBytes = scanned.volumeBytes;
    records = scanned.records;
  }
  let ranges: ChangedRange[];
  if (from) {
    ranges = (await diffVolume(cluster, volumeName, from.name, snapshotName)).ranges;
  } else {
    // A full image covers every byte: the chunks the snapshot's chain holds anything in are read,
    // the rest are ZERO records (never-written space costs no reads).
    const chain = new ChainReader(cluster, view.volume.poolId);
    const chunks = [...await chunksOf(chain, [view.volume.id, ...parentLayers(cluster.map, view.volume.id).map((layer) => layer.volumeId)])].sort((a, b) => a - b);
    ranges = [];
    for (const chunk of chunks) {
      const offsetBytes = chunk * view.volume.chunkSizeBytes;
      if (offsetBytes >= view.sizeBytes) break;
      const lengthBytes = Math.min(view.volume.chunkSizeBytes, view.sizeBytes - offsetBytes);
      const last = ranges[ranges.length - 1];
      if (last && last.offsetBytes + last.lengthBytes === offsetBytes) last.lengthBytes += lengthBytes;
      else ranges.push({ offsetBytes, lengthBytes });
    }
  }
  const fillGaps = !from;
  const handle = await open(path, resumeFileBytes > 0 ? 'r+' : 'w');
  let dataBytes = 0;
  let zeroBytes = 0;
  try {
    let position = resumeFileBytes;
    if (resumeFileBytes === 0) {
      await handle.write(encodeImageHeader(header), 0, IMAGE_HEADER_BYTES, 0);
      position = IMAGE_HEADER_BYTES;
    } else {
      await handle.truncate(resumeFileBytes);
    }
    const append = async (buffers: Buffer[]): Promise<void> => {
      const { bytesWritten } = await handle.writev(buffers, position);
      position += bytesWritten;
    };
    const chunkBlocks = view.volume.chunkSizeBytes / BLOCK_SIZE_BYTES;
    let covered = resumeVolumeBytes;
    const zeroUpTo = async (offsetBytes: number): Promise<void> => {
      if (!fillGaps || offsetBytes <= covered) return;
      await append([encodeRecordHeader({ kind: RecordKind.ZERO, offsetBytes: covered, lengthBytes: offsetBytes - covered, dataCrc: 0 })]);
      zeroBytes += offsetBytes - covered;
      records++;
      covered = offsetBytes;
    };
    for (const piece of piecesOf(ranges, view.volume.chunkSizeBytes, resumeVolumeBytes)) {
      await zeroUpTo(piece.offsetBytes);
      covered = piece.offsetBytes + piece.lengthBytes;
      const startBlock = piece.offsetBytes / BLOCK_SIZE_BYTES;
      const count = piece.lengthBytes / BLOCK_SIZE_BYTES;
      const chunkIndex = Math.floor(startBlock / chunkBlocks);
      const states = await view.states(chunkIndex, startBlock - chunkIndex * chunkBlocks, count);
      const hasData = states.some((state) => state === BlockState.DATA);
      const data = hasData ? await view.read(piece.offsetBytes, piece.lengthBytes) : undefined;
      for (let i = 0; i < count;) {
        const isData = states[i] === BlockState.DATA;
        let end = i + 1;
        while (end < count && (states[end] === BlockState.DATA) === isData) end++;
        const offsetBytes = piece.offsetBytes + i * BLOCK_SIZE_BYTES;
        const lengthBytes = (end - i) * BLOCK_SIZE_BYTES;
        if (isData) {
          const bytes = data!.subarray(i * BLOCK_SIZE_BYTES, end * BLOCK_SIZE_BYTES);
          await append([encodeRecordHeader({ kind: RecordKind.DATA, offsetBytes, lengthBytes, dataCrc: crc32c(bytes) }), bytes]);
          dataBytes += lengthBytes;
        } else {
          await append([encodeRecordHeader({ kind: RecordKind.ZERO, offsetBytes, lengthBytes, dataCrc: 0 })]);
          zeroBytes += lengthBytes;
        }
        records++;
        i = end;
      }
      progress(piece.offsetBytes + piece.lengthBytes, view.sizeBytes);
    }
    await zeroUpTo(view.sizeBytes);
    await append([encodeRecordHeader({ kind: RecordKind.END, offsetBytes: 0, lengthBytes: records, dataCrc: 0 })]);
    await handle.sync();
    progress(view.sizeBytes, view.sizeBytes);
  } finally {
    await handle.close();
  }
  return { file: path, records, dataBytes, zeroBytes, resumedFromBytes: resumeVolumeBytes, alreadyComplete: false };
}

export interface ImportResult {
  volume: string;
  created: boolean;
  records: number;
  dataBytes: number;
  zeroBytes: number;
  resumedAtRecord: number;
}

interface ImportProgressFile {
  volumeId: number;
  snapshotId: number;
  fromSnapshotId: number | null;
  fileOffset: number;
  records: number;
}

/**
 * Applies the image at `path` to `volumeName` (created with the image's size when missing and the
 * image is full). Refuses an incomplete image (an export that was interrupted: resume it first)
 * and an incremental image into a missing volume. Errors: IN_USE (the volume is open for writing;
 * `takeover` takes it over), INVALID_ARGUMENT, NOT_FOUND.
 */
export async function importVolume(cluster: ClusterClient, path: string, volumeName: string,
  options: { takeover?: boolean; progress?: Progress; createVolume: (name: string, sizeBytes: number) => Promise<void> }): Promise<ImportResult> {
  const progress = options.progress ?? (() => {});
  const scanned = await scanImage(path);
  if (!scanned.complete) throw new ShaleError('INVALID_ARGUMENT', `${path} is an incomplete image (its export was interrupted): run the export again to finish it`);
  const header = scanned.header;
  let info: VolumeInfo;
  let created = false;
  try {
    info = await cluster.conductor.volume(volumeName);
  } catch (error) {
    if (!(error instanceof ShaleError && error.code === 'NOT_FOUND')) throw error;
    if (header.fromSnapshotId !== null) throw new ShaleError('NOT_FOUND', `no volume named ${volumeName}: an incremental image applies only to a volume holding ${header.volume}@${header.fromSnapshot}`);
    await options.createVolume(volumeName, header.sizeBytes);
    info = await cluster.conductor.volume(volumeName);
    created = true;
  }
  if (info.sizeBytes < header.sizeBytes) throw new ShaleError('OUT_OF_RANGE', `volume ${volumeName} holds ${info.sizeBytes} bytes, the image ${header.sizeBytes}: grow it first`);
  const progressPath = `${path}.import-${volumeName}.progress`;
  let start = { fileOffset: IMAGE_HEADER_BYTES, records: 0 };
  const saved = await readFile(progressPath, 'utf8').then((text) => JSON.parse(text) as ImportProgressFile, () => undefined);
  if (saved && saved.volumeId === info.id && saved.snapshotId === header.snapshotId && saved.fromSnapshotId === header.fromSnapshotId) start = saved;
  const volume = await openExclusive(cluster, info, 'importing into it', options.takeover ?? false);
  const handle = await open(path, 'r');
  let dataBytes = 0;
  let zeroBytes = 0;
  let records = start.records;
  try {
    let position = start.fileOffset;
    let sinceFlush = 0;
    const recordHeader = Buffer.alloc(RECORD_HEADER_BYTES);
    const checkpoint = async (): Promise<void> => {
      await volume.flush();
      const state: ImportProgressFile = { volumeId: info.id, snapshotId: header.snapshotId, fromSnapshotId: header.fromSnapshotId, fileOffset: position, records };
      await writeFile(progressPath, JSON.stringify(state));
      sinceFlush = 0;
    };
    for (;;) {
      await handle.read(recordHeader, 0, RECORD_HEADER_BYTES, position);
      const record = decodeRecordHeader(recordHeader);
      if (!record) throw new ShaleError('INVALID_ARGUMENT', `${path}: damaged record at byte ${position}`);
      if (record.kind === RecordKind.END) break;
      if (record.offsetBytes % BLOCK_SIZE_BYTES !== 0 || record.lengthBytes % BLOCK_SIZE_BYTES !== 0 || record.offsetBytes + record.lengthBytes > header.sizeBytes) {
        throw new ShaleError('INVALID_ARGUMENT', `${path}: record at byte ${position} lies outside the image`);
      }
      if (record.kind === RecordKind.DATA) {
        const data = Buffer.alloc(record.lengthBytes);
        await handle.read(data, 0, record.lengthBytes, position + RECORD_HEADER_BYTES);
        if (crc32c(data) !== record.dataCrc) throw new ShaleError('CHECKSUM', `${path}: the data of the record at byte ${position} fails its crc32c`);
        await volume.write(record.offsetBytes, data);
        dataBytes += record.lengthBytes;
        position += RECORD_HEADER_BYTES + record.lengthBytes;
      } else {
        await volume.writeZeroes(record.offsetBytes, record.lengthBytes);
        zeroBytes += record.lengthBytes;
        position += RECORD_HEADER_BYTES;
      }
      records++;
      sinceFlush += record.lengthBytes;
      progress(record.offsetBytes + record.lengthBytes, header.sizeBytes);
      if (sinceFlush >= importBatchBytes) await checkpoint();
    }
    await volume.flush();
    await rm(progressPath, { force: true });
    progress(header.sizeBytes, header.sizeBytes);
  } finally {
    await handle.close();
    await volume.close();
  }
  return { volume: volumeName, created, records, dataBytes, zeroBytes, resumedAtRecord: start.records };
}
