/**
 * One open volume: byte ranges in, replicated block I/O out (DESIGN §3).
 *
 * Write: the range is split into chunk pieces; each piece goes, in parallel, to every replica of
 * its PG that is clean or recovering, tagged (PG epoch, owner epoch, version, snap seq, crc32c per
 * 4 KiB). It is acknowledged when all of them acknowledged. Decision table for a replica's answer:
 *
 *   ok                          → counted
 *   STALE_PG_EPOCH              → refresh the map, send the piece again to the new acting set
 *   NOT_READY, BUSY, CHECKSUM   → wait a little, send again (duplicates are harmless: equal version)
 *   UNAVAILABLE, MAYBE_COMMITTED, SHUTTING_DOWN
 *                               → the replica failed: the conductor marks it down in a committed
 *                                 epoch, then the piece is sent again to the new acting set
 *   DISK_FAILED                 → the same, where the PG can do without the replica (it keeps
 *                                 its minimum, and a clean replica); else fail with it
 *   FENCED                      → another gateway owns the volume: fail, never retry
 *   anything else               → fail the request with that code
 *
 * While fewer than `minReplicas` replicas can take the piece, it waits for a newer map (up to the
 * I/O timeout, then NO_QUORUM). Overlapping writes are kept in order by a range lock.
 *
 * Read: from one clean replica, chosen round robin; crc32c checked again here (end to end); on a
 * checksum error, a disk that could not read, a timeout or an unreachable store, the next clean
 * replica is tried. A replica whose copy failed its checksum or could not be read is rewritten
 * from the good copy.
 *
 * Flush: FLUSH to every store written since the last flush; a store that can't flush is marked
 * down before the FLUSH is acknowledged (one whose disk failed only where every PG can do
 * without it; else the FLUSH fails with DISK_FAILED).
 */
import { assert } from '../lib/assert.ts';
import { giveBack, ioBuffers } from '../lib/buffer-pool.ts';
import { blockChecksums, crc32c } from '../lib/crc32c.ts';
import { ShaleError, toShaleError } from '../lib/errors.ts';
import { placementGroupOf } from '../lib/placement-hash.ts';
import { Tickets } from '../lib/tickets.ts';
import { BLOCK_SHIFT, BLOCK_SIZE_BYTES } from '../lib/units.ts';
import { BLOCKS_PER_REQUEST_MAX, BlockState, compareVersions, decodeReadParts, decodeReadReply, decodeRecentWrites, encodeChecksums, Flag, Op, type DecodedRead, type Frame } from '../proto/store-protocol.ts';
import type { LocalReadFields, LocalWriteFields, StoreRequester } from '../proto/store-channel.ts';
import type { ClusterMap, PgEntry, PoolMapEntry, VolumeInfo } from '../conductor/api/types.ts';
import type { ClusterClient } from './cluster-client.ts';
import { RangeLock } from './range-lock.ts';
import { diskFailedSpare, handleReplicaFailures, noQuorum, waitForMapChange, type ReplicaFailure } from './replica-retry.ts';
import { actingReplicas, acts, isUp, pgNeeds, poolNeeds } from '../conductor/api/acting.ts';
import { ChainReader, type Layer, parentLayers, snapContextOf } from './snap-chain.ts';

/** A copy of T's shape that can be written: for request records refilled in place. */
type Mutable<T> = { -readonly [K in keyof T]: T[K] };

/** The largest single request a volume accepts (NBD's maximum block size is advertised at or below it). */
export const REQUEST_BYTES_MAX = 32 * 1024 * 1024;

/** Tries of a snapshot acknowledgement before giving up (the next map tries again). */
const snapshotAckAttemptsMax = 25;

interface Piece {
  chunkIndex: number;
  offsetBlocks: number;
  countBlocks: number;
  /** Position of the piece in the request's aligned buffer, in blocks. */
  bufferBlock: number;
}


export class VolumeClient {
  readonly info: VolumeInfo;
  readonly ownerEpoch: number;
  readonly #cluster: ClusterClient;
  readonly #chunkBlocks: number;
  readonly #lock = new RangeLock();
  /**
   * Write seqs, from 1, as tickets: the lowest one not yet completed, less one, is the watermark,
   * sent with every write (every write with seq ≤ it has been acknowledged by all its replicas).
   */
  readonly #writeSeqs = new Tickets(1);
  #readTurn = 0;
  /** The request readNow and readThen hand a channel, refilled per call (#placeInChunk): no channel keeps a reference to it. */
  readonly #nowFields: Mutable<LocalReadFields> = {
    volumeId: 0, chunkIndex: 0, poolId: 0, pgId: 0, pgCount: 0, pgEpoch: 0, ownerEpoch: 0, offsetBlocks: 0, countBlocks: 0,
  };
  /** Where the request last placed by #placeInChunk goes: its pool, PG entry, and the map they are from. */
  #placedPool: PoolMapEntry | undefined;
  #placedPg: PgEntry | undefined;
  #placedMap: ClusterMap | undefined;
  #writtenSinceFlush = new Set<number>();
  #closed = false;
  /** Pieces repaired on a replica after it failed a checksum. */
  repairs = 0;
  /** Blocks an earlier owner left on only some replicas that opening this volume rolled forward. */
  reconciledBlocks = 0;
  /** The snap context's seq every new write carries (DESIGN §3: stores stamp versions with it). */
  #snapSeq = 0;
  /** Writes in flight per snap seq they carry, so a switch can wait for the older ones to drain. */
  #inFlightBySnapSeq = new Map<number, number>();
  #drainWaiters: (() => void)[] = [];
  /** The highest snap seq acknowledged to the conductor. */
  #acknowledgedSnapSeq = 0;
  #switching: Promise<void> = Promise.resolve();
  readonly #chain: ChainReader;
  /** A clone's parent layers, as of the last map applied (empty for a volume without a parent). */
  #parentLayers: Layer[] = [];

  private constructor(cluster: ClusterClient, info: VolumeInfo, ownerEpoch: number) {
    this.#cluster = cluster;
    this.info = info;
    this.ownerEpoch = ownerEpoch;
    this.#chunkBlocks = info.chunkSizeBytes >> BLOCK_SHIFT;
    this.#chain = new ChainReader(cluster, info.poolId);
  }

  /** Opens `name` as its owner: a new owner epoch, then FENCE on every up store of its pool. */
  static async open(cluster: ClusterClient, name: string, options: { takeover?: boolean }): Promise<VolumeClient> {
    const opened = await cluster.conductor.openVolume(name, { owner: cluster.ownerId, takeover: options.takeover ?? false });
    cluster.watcher.offer(opened.map);
    const volume = new VolumeClient(cluster, opened.volume, opened.ownerEpoch);
    await volume.#fenceAll();
    await volume.#reconcile();
    // Every earlier owner is fenced and its writes rolled forward: snapshots it had not
    // acknowledged are complete, and this owner's writes carry the current snap seq.
    volume.#snapSeq = snapContextOf(cluster.map, volume.info.id)?.seq ?? 0;
    await volume.applySnapContext(cluster.map);
    cluster.log(`volume ${name} (id ${opened.volume.id}) open with owner epoch ${opened.ownerEpoch}`);
    return volume;
  }

  get sizeBytes(): number {
    return this.info.sizeBytes;
  }

  async #fenceAll(): Promise<void> {
    const map = this.#cluster.map;
    const pool = this.#pool(map);
    const storeIds = new Set<number>();
    for (const pg of pool.pgs) for (const replica of pg.replicas) storeIds.add(replica.storeId);
    await Promise.all([...storeIds].map(async (storeId) => {
      const store = map.stores.find((candidate) => candidate.id === storeId);
      if (!store || store.state !== 'up') return;
      try {
        await this.#cluster.channel(storeId).request({ op: Op.FENCE, volumeId: this.info.id, ownerEpoch: this.ownerEpoch });
      } catch (error) {
        if (error instanceof ShaleError && error.code === 'FENCED') throw error;
        // A store that can't take the fence is marked down; it learns the owner epoch from the map when it returns.
        await this.#cluster.reportDown(storeId, `fence failed: ${(error as Error).message}`);
      }
    }));
  }

  /** Where chunk `chunkIndex` lives in `map`: its pool, PG number and PG entry. */
  #placement(map: ClusterMap, chunkIndex: number): { pool: PoolMapEntry; pgId: number; pg: PgEntry } {
    const pool = this.#pool(map);
    const pgId = placementGroupOf(this.info.id, chunkIndex, pool.pgCount);
    return { pool, pgId, pg: pool.pgs[pgId]! };
  }

  #pool(map: ClusterMap): PoolMapEntry {
    // A loop, not find(): this runs for every request, and a closure per call showed in allocation profiles.
    const poolId = this.info.poolId;
    for (const pool of map.pools) if (pool.id === poolId) return pool;
    throw new ShaleError('NOT_READY', `pool ${poolId} of volume ${this.info.name} is not in the map`);
  }

  #checkRange(offsetBytes: number, lengthBytes: number): void {
    if (this.#closed) throw new ShaleError('SHUTTING_DOWN', `volume ${this.info.name} is closed`);
    if (!Number.isSafeInteger(offsetBytes) || !Number.isSafeInteger(lengthBytes) || offsetBytes < 0 || lengthBytes < 0) {
      throw new ShaleError('INVALID_ARGUMENT', `bad range ${offsetBytes}+${lengthBytes}`);
    }
    if (offsetBytes + lengthBytes > this.info.sizeBytes) {
      throw new ShaleError('OUT_OF_RANGE', `range ${offsetBytes}+${lengthBytes} is beyond the volume's ${this.info.sizeBytes} bytes`);
    }
    if (lengthBytes > REQUEST_BYTES_MAX) throw new ShaleError('INVALID_ARGUMENT', `request of ${lengthBytes} bytes exceeds ${REQUEST_BYTES_MAX}`);
  }

  #pieces(startBlock: number, countBlocks: number): Piece[] {
    const pieces: Piece[] = [];
    let block = startBlock;
    const end = startBlock + countBlocks;
    while (block < end) {
      const chunkIndex = Math.floor(block / this.#chunkBlocks);
      const offsetBlocks = block - chunkIndex * this.#chunkBlocks;
      const count = Math.min(end - block, this.#chunkBlocks - offsetBlocks, BLOCKS_PER_REQUEST_MAX);
      pieces.push({ chunkIndex, offsetBlocks, countBlocks: count, bufferBlock: block - startBlock });
      block += count;
    }
    return pieces;
  }

  async read(offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    this.#checkRange(offsetBytes, lengthBytes);
    if (lengthBytes === 0) return Buffer.alloc(0);
    const startBlock = Math.floor(offsetBytes / BLOCK_SIZE_BYTES);
    const endBlock = Math.ceil((offsetBytes + lengthBytes) / BLOCK_SIZE_BYTES);
    return trimToRange(await this.#readBlocks(startBlock, endBlock - startBlock), offsetBytes, lengthBytes);
  }

  /**
   * A read answered synchronously by a clean replica in this process (DESIGN §9's hyperconverged
   * fast path: no Promise, no event-loop turn), or undefined: then `read` gives the answer or the
   * error. Only reads within one chunk, served from the page cache, qualify.
   */
  readNow(offsetBytes: number, lengthBytes: number): Buffer | undefined {
    const fields = this.#placeInChunk(offsetBytes, lengthBytes);
    if (fields === undefined) return undefined;
    const map = this.#placedMap!;
    const replicas = this.#placedPg!.replicas;
    const turn = this.#readTurn++;
    for (let i = 0; i < replicas.length; i++) {
      const replica = replicas[(turn + i) % replicas.length]!;
      if (replica.state !== 'clean' || !isUp(map, replica.storeId)) continue;
      const channel = this.#cluster.channel(replica.storeId);
      if (channel.readNow === undefined) continue;
      const result = channel.readNow(fields);
      if (result === undefined) return undefined;
      // A clone's absent blocks read through to its parent: the asynchronous path does that.
      if (result.absent && this.#parentLayers.length > 0) {
        giveBack(result.data);
        return undefined;
      }
      // Absent and zero blocks are zeros in the engine's result, as they read.
      return trimToRange(result.data, offsetBytes, lengthBytes);
    }
    return undefined;
  }

  /**
   * Places a request that lies within one chunk of the volume: fills #nowFields (and #placedPool,
   * #placedPg, #placedMap) for it and returns them; undefined for one out of range, across
   * chunks, too large, or of a volume whose pool the map lacks — the Promise paths report those.
   */
  #placeInChunk(offsetBytes: number, lengthBytes: number): Mutable<LocalReadFields> | undefined {
    if (this.#closed || lengthBytes <= 0 || offsetBytes < 0 || offsetBytes + lengthBytes > this.info.sizeBytes || lengthBytes > REQUEST_BYTES_MAX) return undefined;
    const startBlock = Math.floor(offsetBytes / BLOCK_SIZE_BYTES);
    const countBlocks = Math.ceil((offsetBytes + lengthBytes) / BLOCK_SIZE_BYTES) - startBlock;
    const chunkIndex = Math.floor(startBlock / this.#chunkBlocks);
    const offsetBlocks = startBlock - chunkIndex * this.#chunkBlocks;
    if (offsetBlocks + countBlocks > this.#chunkBlocks || countBlocks > BLOCKS_PER_REQUEST_MAX) return undefined;
    const map = this.#cluster.map;
    let pool: PoolMapEntry;
    try {
      pool = this.#pool(map);
    } catch {
      return undefined;
    }
    const pgId = placementGroupOf(this.info.id, chunkIndex, pool.pgCount);
    const pg = pool.pgs[pgId]!;
    this.#placedMap = map;
    this.#placedPool = pool;
    this.#placedPg = pg;
    const fields = this.#nowFields;
    fields.volumeId = this.info.id;
    fields.chunkIndex = chunkIndex;
    fields.poolId = pool.id;
    fields.pgId = pgId;
    fields.pgCount = pool.pgCount;
    fields.pgEpoch = pg.epoch;
    fields.ownerEpoch = this.ownerEpoch;
    fields.offsetBlocks = offsetBlocks;
    fields.countBlocks = countBlocks;
    return fields;
  }

  /**
   * A piece read from a clean replica in this process without the wire format (DESIGN §9): the
   * verified bytes, or undefined (no such replica, or a clone's block that reads through to its
   * parent) — then the piece is read as any other. A rejection also means: read it as any other.
   */
  #readPieceLocal(piece: Piece): Promise<Buffer | undefined> | undefined {
    const map = this.#cluster.map;
    const { pool, pgId, pg } = this.#placement(map, piece.chunkIndex);
    for (const replica of pg.replicas) {
      if (replica.state !== 'clean' || !isUp(map, replica.storeId)) continue;
      const channel = this.#cluster.channel(replica.storeId);
      if (channel.readLocal === undefined) continue;
      const pending = channel.readLocal({
        volumeId: this.info.id, chunkIndex: piece.chunkIndex, poolId: pool.id, pgId, pgCount: pool.pgCount, pgEpoch: pg.epoch,
        ownerEpoch: this.ownerEpoch, offsetBlocks: piece.offsetBlocks, countBlocks: piece.countBlocks,
      });
      if (pending === undefined) return undefined;
      return pending.then((result) => (result.absent && this.#parentLayers.length > 0 ? undefined : result.data));
    }
    return undefined;
  }

  async #readBlocks(startBlock: number, countBlocks: number): Promise<Buffer> {
    const pieces = this.#pieces(startBlock, countBlocks);
    if (pieces.length === 1) return this.#readPiece(pieces[0]!);
    const out = ioBuffers.take(countBlocks * BLOCK_SIZE_BYTES);
    await Promise.all(pieces.map(async (piece) => {
      const data = await this.#readPiece(piece);
      data.copy(out, piece.bufferBlock * BLOCK_SIZE_BYTES);
      giveBack(data);
    }));
    return out;
  }

  /**
   * A read sent to one clean replica behind a socket with a callback where read() has a Promise
   * at each layer (StoreRequester.sendRead), or false, with nothing started: then read() does it.
   * Reads within one chunk of a volume that is not a clone, whose clean replicas are all behind
   * sockets, qualify. `done` is called once, never before this returns, with what read() would
   * have resolved or rejected with: an error reply or a block that fails its crc32c is read again
   * as read() reads (another replica; one that failed its checksum is repaired).
   */
  readThen(offsetBytes: number, lengthBytes: number, done: (error: ShaleError | undefined, data: Buffer | undefined) => void): boolean {
    if (this.#parentLayers.length > 0) return false;
    const fields = this.#placeInChunk(offsetBytes, lengthBytes);
    if (fields === undefined) return false;
    const map = this.#placedMap!;
    const replicas = this.#placedPg!.replicas;
    const turn = this.#readTurn++;
    let chosen: StoreRequester | undefined;
    let storeId = 0;
    for (let i = 0; i < replicas.length; i++) {
      const replica = replicas[(turn + i) % replicas.length]!;
      if (replica.state !== 'clean' || !isUp(map, replica.storeId)) continue;
      const channel = this.#cluster.channel(replica.storeId);
      // A replica in this process: read() reads it without a socket.
      if (channel.sendRead === undefined) return false;
      if (chosen === undefined) {
        chosen = channel;
        storeId = replica.storeId;
      }
    }
    if (chosen === undefined) return false;
    const { chunkIndex, offsetBlocks, countBlocks } = fields;
    chosen.sendRead!(fields, (error, reply) => {
      let data: Buffer | undefined;
      if (error === undefined) {
        try {
          data = assembleRead(decodeRead(reply!, countBlocks), countBlocks, storeId, reply!.verified === true);
        } catch (thrown) {
          error = toShaleError(thrown);
        }
      }
      if (data !== undefined) {
        done(undefined, trimToRange(data, offsetBytes, lengthBytes));
        return;
      }
      // As read() goes on after a failed attempt: another replica, a newer map, or the error.
      const bad: number[] = [];
      this.#noteBadReplica(error!, storeId, bad);
      this.#readPiece({ chunkIndex, offsetBlocks, countBlocks, bufferBlock: 0 }, bad).then(
        (read) => done(undefined, trimToRange(read, offsetBytes, lengthBytes)),
        (thrown: unknown) => done(toShaleError(thrown), undefined),
      );
    });
    return true;
  }

  /** One piece's bytes; `bad`: replicas already found to fail a checksum or a disk read, repaired from the good copy read. */
  async #readPiece(piece: Piece, bad: number[] = []): Promise<Buffer> {
    const local = this.#readPieceLocal(piece);
    if (local !== undefined) {
      try {
        const data = await local;
        if (data !== undefined) return data;
      } catch {
        // Read again below, as any read: another replica, or the error as the store reports it.
      }
    }
    let states: Uint8Array | undefined;
    const { value, storeId, pool, pgId, pgEpoch, reply } = await this.#fromCleanReplica(piece, Op.READ, (frame, from) => {
      const read = decodeRead(frame, piece.countBlocks);
      states = read.states;
      return assembleRead(read, piece.countBlocks, from, frame.verified === true);
    }, bad);
    if (bad.length > 0) void this.#repair(piece, reply.payload, bad, { pool, pgId, pgEpoch }, storeId);
    const layers = this.#parentLayers;
    if (layers.length === 0 || !states) return value;
    // A clone: blocks it never wrote read through to its parent chain.
    const pending = new Uint8Array(piece.countBlocks);
    let any = false;
    for (let i = 0; i < piece.countBlocks; i++) {
      if (states[i] !== BlockState.ABSENT) continue;
      pending[i] = 1;
      any = true;
    }
    if (!any) return value;
    const out = Buffer.from(value);
    await this.#chain.readThrough(layers, piece.chunkIndex, this.#chunkBlocks, piece.offsetBlocks, piece.countBlocks, out, pending);
    return out;
  }

  /**
   * Applies the volume's snap context from a newer map (DESIGN §3, snapshot creation without an
   * I/O pause): new writes carry the new seq at once; once every write submitted under an older
   * seq has completed, the owner acknowledges to the conductor, which makes the snapshot live.
   * Acknowledgements run one at a time, in order.
   */
  applySnapContext(map: ClusterMap): Promise<void> {
    this.#parentLayers = parentLayers(map, this.info.id);
    const entry = snapContextOf(map, this.info.id);
    if (!entry) return this.#switching;
    if (entry.seq > this.#snapSeq) {
      this.#snapSeq = entry.seq;
      // The old seq's entry may rest at 0 (#endWrite keeps the current one); none will end under it now.
      for (const [stamp, count] of this.#inFlightBySnapSeq) if (count === 0 && stamp !== this.#snapSeq) this.#inFlightBySnapSeq.delete(stamp);
    }
    const target = this.#snapSeq;
    if (entry.creating.length === 0 || target <= this.#acknowledgedSnapSeq) return this.#switching;
    this.#switching = this.#switching.then(async () => {
      if (target <= this.#acknowledgedSnapSeq || this.#closed) return;
      await this.#drainBelow(target);
      // The conductor may be failing over: retry a while (the acknowledgement is idempotent).
      for (let attempt = 0; ; attempt++) {
        try {
          await this.#cluster.conductor.acknowledgeSnapshots(this.info.name, { owner: this.#cluster.ownerId, ownerEpoch: this.ownerEpoch, snapSeq: target });
          break;
        } catch (error) {
          if (attempt >= snapshotAckAttemptsMax || (error instanceof ShaleError && (error.code === 'FENCED' || error.code === 'NOT_FOUND'))) throw error;
          await this.#cluster.env.clock.sleep(200);
        }
      }
      this.#acknowledgedSnapSeq = Math.max(this.#acknowledgedSnapSeq, target);
    }).catch((error: unknown) => this.#cluster.log(`volume ${this.info.name}: acknowledging snap context ${target}: ${(error as Error).message}`));
    return this.#switching;
  }

  /** The snap seq new writes carry. */
  get snapSeq(): number {
    return this.#snapSeq;
  }

  /** Resolves once no write carrying a snap seq below `seq` is in flight. */
  #drainBelow(seq: number): Promise<void> {
    const busy = (): boolean => [...this.#inFlightBySnapSeq].some(([stamp, count]) => stamp < seq && count > 0);
    if (!busy()) return Promise.resolve();
    return new Promise((resolve) => {
      const check = (): void => {
        if (busy()) this.#drainWaiters.push(check);
        else resolve();
      };
      this.#drainWaiters.push(check);
    });
  }

  /**
   * Asks one clean replica after another (round robin from a rotating start) until one answers.
   * Replicas that answered CHECKSUM or DISK_FAILED are collected in `bad` for repair; when every
   * clean replica answered one of those, that error is final. Waits for a newer map when none can
   * answer otherwise, up to the I/O timeout.
   */
  async #fromCleanReplica<T>(piece: Piece, op: number, decode: (reply: Frame, storeId: number) => T, bad: number[]): Promise<{ value: T; storeId: number; pool: PoolMapEntry; pgId: number; pgEpoch: number; reply: Frame }> {
    const deadline = this.#deadline();
    let lastError: ShaleError | undefined;
    for (;;) {
      const map = this.#cluster.map;
      const { pool, pgId, pg } = this.#placement(map, piece.chunkIndex);
      const clean = pg.replicas.filter((replica) => replica.state === 'clean' && isUp(map, replica.storeId));
      const turn = this.#readTurn++;
      let staleMap = false;
      let badCopies = 0;
      for (let i = 0; i < clean.length && !staleMap; i++) {
        const storeId = clean[(turn + i) % clean.length]!.storeId;
        try {
          const reply = await this.#cluster.channel(storeId).request({
            op, volumeId: this.info.id, chunkIndex: piece.chunkIndex, poolId: pool.id, pgId, pgCount: pool.pgCount,
            pgEpoch: pg.epoch, ownerEpoch: this.ownerEpoch, offsetBlocks: piece.offsetBlocks, countBlocks: piece.countBlocks,
          });
          return { value: decode(reply, storeId), storeId, pool, pgId, pgEpoch: pg.epoch, reply };
        } catch (error) {
          lastError = error instanceof ShaleError ? error : new ShaleError('INTERNAL', String(error));
          if (lastError.code === 'FENCED' || lastError.code === 'NOT_FOUND' || lastError.code === 'INVALID_ARGUMENT') throw lastError;
          if (lastError.code === 'STALE_PG_EPOCH') staleMap = true;
          if (this.#noteBadReplica(lastError, storeId, bad)) badCopies++;
        }
      }
      // Every clean replica's copy failed its checksum or could not be read: no map to come brings
      // a good one, so the read fails now rather than waiting (with --io-timeout 0, for ever).
      if (badCopies > 0 && badCopies === clean.length) throw lastError!;
      if (staleMap) await this.#cluster.watcher.refresh().catch(() => {});
      else await waitForMapChange(this.#cluster, map, deadline, lastError);
    }
  }

  /**
   * A replica whose copy failed its checksum, or whose disk could not read it (DISK_FAILED: a bad
   * sector, say), goes into `bad`, to be rewritten from the good copy: a log-structured store
   * writes the repair to a new place on its disk. Returns whether the error was one of those.
   */
  #noteBadReplica(error: ShaleError, storeId: number, bad: number[]): boolean {
    if (error.code !== 'CHECKSUM' && error.code !== 'DISK_FAILED') return false;
    this.#cluster.log(`volume ${this.info.name}: ${error.message}; reading another replica`);
    if (!bad.includes(storeId)) bad.push(storeId);
    return true;
  }

  /**
   * Rewrites a piece on replicas that failed a checksum or a disk read, from the good READ reply, with each
   * block's own version and the REPAIR flag: the store replaces its copy of that version (an equal
   * version takes the newer location) and never overwrites a newer one.
   */
  async #repair(piece: Piece, goodPayload: Buffer, badStores: readonly number[], where: { pool: PoolMapEntry; pgId: number; pgEpoch: number }, goodStore: number): Promise<void> {
    const read = decodeReadReply(goodPayload, piece.countBlocks);
    const dataOffsets = new Int32Array(piece.countBlocks).fill(-1);
    for (let i = 0, at = 0; i < piece.countBlocks; i++) if (read.states[i] === BlockState.DATA) dataOffsets[i] = at++;
    for (const storeId of badStores) {
      try {
        let i = 0;
        while (i < piece.countBlocks) {
          const state = read.states[i]!;
          let end = i + 1;
          while (end < piece.countBlocks && read.states[end] === state && read.epochs[end] === read.epochs[i] && read.seqs[end] === read.seqs[i] && read.stamps[end] === read.stamps[i]) end++;
          if (state !== BlockState.ABSENT) {
            const header = {
              op: state === BlockState.DATA ? Op.WRITE : Op.WRITE_ZEROES, flags: Flag.REPAIR, volumeId: this.info.id, chunkIndex: piece.chunkIndex,
              poolId: where.pool.id, pgId: where.pgId, pgCount: where.pool.pgCount, pgEpoch: where.pgEpoch,
              ownerEpoch: read.epochs[i]!, versionSeq: read.seqs[i]!, offsetBlocks: piece.offsetBlocks + i, countBlocks: end - i,
              snapSeq: read.stamps[i]!,
            };
            const payload: Buffer[] = [];
            if (state === BlockState.DATA) {
              const sums = encodeChecksums(read.checksums, i, end - i);
              const first = dataOffsets[i]!;
              payload.push(sums, read.data.subarray(first * BLOCK_SIZE_BYTES, (first + end - i) * BLOCK_SIZE_BYTES));
            }
            await this.#cluster.channel(storeId).request(header, payload);
          }
          i = end;
        }
        this.repairs++;
        this.#cluster.log(`volume ${this.info.name}: repaired chunk ${piece.chunkIndex} blocks ${piece.offsetBlocks}+${piece.countBlocks} on store ${storeId} from store ${goodStore}`);
      } catch (error) {
        this.#cluster.log(`volume ${this.info.name}: repair on store ${storeId} failed: ${(error as Error).message}`);
      }
    }
  }

  /**
   * Block status of a byte range, for NBD BLOCK_STATUS: extents from `offsetBytes` on, each a run of
   * blocks that are all data or all holes (absent or zero: they read as zeros). Covers at most one chunk.
   */
  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<{ lengthBytes: number; hole: boolean; zero: boolean }[]> {
    this.#checkRange(offsetBytes, Math.min(lengthBytes, REQUEST_BYTES_MAX));
    if (lengthBytes === 0) return [];
    const startBlock = Math.floor(offsetBytes / BLOCK_SIZE_BYTES);
    const endBlock = Math.ceil(Math.min(offsetBytes + lengthBytes, this.info.sizeBytes) / BLOCK_SIZE_BYTES);
    const piece = this.#pieces(startBlock, endBlock - startBlock)[0]!;
    const { value: headStates } = await this.#fromCleanReplica(piece, Op.BLOCK_STATES, (reply) => {
      if (reply.payload.length !== piece.countBlocks) throw new ShaleError('PROTOCOL', 'BLOCK_STATES reply of the wrong length');
      return reply.payload;
    }, []);
    let states: Uint8Array = headStates;
    const layers = this.#parentLayers;
    if (layers.length > 0) {
      // A clone: a block is a hole only if it reads as zeros through the whole parent chain.
      states = Uint8Array.from(headStates);
      await this.#chain.statesThrough(layers, piece.chunkIndex, this.#chunkBlocks, piece.offsetBlocks, piece.countBlocks, states);
    }
    const extents: { lengthBytes: number; hole: boolean; zero: boolean }[] = [];
    let cursor = offsetBytes;
    for (let i = 0; i < piece.countBlocks;) {
      const hole = states[i] !== BlockState.DATA;
      let end = i + 1;
      while (end < piece.countBlocks && (states[end] !== BlockState.DATA) === hole) end++;
      const extentEnd = Math.min((startBlock + end) * BLOCK_SIZE_BYTES, offsetBytes + lengthBytes);
      extents.push({ lengthBytes: extentEnd - cursor, hole, zero: hole });
      cursor = extentEnd;
      i = end;
    }
    return extents;
  }

  async write(offsetBytes: number, data: Buffer, options: { fua?: boolean } = {}): Promise<void> {
    this.#checkRange(offsetBytes, data.length);
    if (data.length === 0) return;
    const startBlock = Math.floor(offsetBytes / BLOCK_SIZE_BYTES);
    const endBlock = Math.ceil((offsetBytes + data.length) / BLOCK_SIZE_BYTES);
    const release = await this.#lock.acquire(startBlock, endBlock);
    try {
      let aligned = data;
      const head = offsetBytes - startBlock * BLOCK_SIZE_BYTES;
      if (head !== 0 || data.length % BLOCK_SIZE_BYTES !== 0) {
        // Read-modify-write of the partial blocks at either end; the lock keeps other writers out.
        aligned = Buffer.allocUnsafe((endBlock - startBlock) * BLOCK_SIZE_BYTES);
        const firstPartial = head !== 0 || data.length < BLOCK_SIZE_BYTES;
        const lastPartial = (offsetBytes + data.length) % BLOCK_SIZE_BYTES !== 0;
        if (firstPartial) (await this.#readBlocks(startBlock, 1)).copy(aligned, 0);
        if (lastPartial && (endBlock - 1 > startBlock || !firstPartial)) {
          (await this.#readBlocks(endBlock - 1, 1)).copy(aligned, aligned.length - BLOCK_SIZE_BYTES);
        }
        data.copy(aligned, head);
      }
      await this.#writeVersioned(Op.WRITE, startBlock, endBlock, options.fua ?? false, aligned, blockChecksums(aligned));
    } finally {
      release();
    }
  }

  /** Writes zeros as tombstones (TRIM and WRITE_ZEROES): nothing is stored for them. */
  async writeZeroes(offsetBytes: number, lengthBytes: number, options: { fua?: boolean } = {}): Promise<void> {
    this.#checkRange(offsetBytes, Math.min(lengthBytes, REQUEST_BYTES_MAX));
    if (offsetBytes + lengthBytes > this.info.sizeBytes) throw new ShaleError('OUT_OF_RANGE', 'zeroed range is beyond the volume');
    if (lengthBytes === 0) return;
    let startBlock = Math.floor(offsetBytes / BLOCK_SIZE_BYTES);
    let endBlock = Math.ceil((offsetBytes + lengthBytes) / BLOCK_SIZE_BYTES);
    // Partial blocks at the ends are written as data (zeros merged into what is there).
    const headPartial = offsetBytes % BLOCK_SIZE_BYTES !== 0;
    const tailPartial = (offsetBytes + lengthBytes) % BLOCK_SIZE_BYTES !== 0;
    if (headPartial) {
      const headEnd = Math.min(offsetBytes + lengthBytes, (startBlock + 1) * BLOCK_SIZE_BYTES);
      await this.write(offsetBytes, Buffer.alloc(headEnd - offsetBytes), options);
      startBlock++;
    }
    if (tailPartial && endBlock > startBlock) {
      const tailStart = Math.max(offsetBytes, (endBlock - 1) * BLOCK_SIZE_BYTES);
      await this.write(tailStart, Buffer.alloc(offsetBytes + lengthBytes - tailStart), options);
      endBlock--;
    }
    if (endBlock <= startBlock) return;
    const release = await this.#lock.acquire(startBlock, endBlock);
    try {
      await this.#writeVersioned(Op.WRITE_ZEROES, startBlock, endBlock, options.fua ?? false, undefined, undefined);
    } finally {
      release();
    }
  }

  /** One write under one new version: every chunk piece in parallel; the seq counts as done either way. */
  async #writeVersioned(op: number, startBlock: number, endBlock: number, fua: boolean, data: Buffer | undefined, checksums: Uint32Array | undefined): Promise<void> {
    // The snap seq is fixed once per write: every replica, and every retry, stamps it alike.
    const snapSeq = this.#snapSeq;
    const seq = this.#beginWrite(snapSeq);
    try {
      await Promise.all(this.#pieces(startBlock, endBlock - startBlock).map((piece) => this.#writePiece(piece, op, seq, snapSeq, fua, data, checksums)));
    } finally {
      this.#endWrite(seq, snapSeq);
    }
  }

  /** A new write's seq; the write counts as in flight under the snap seq it carries until #endWrite. */
  #beginWrite(snapSeq: number): number {
    this.#inFlightBySnapSeq.set(snapSeq, (this.#inFlightBySnapSeq.get(snapSeq) ?? 0) + 1);
    return this.#writeSeqs.begin();
  }

  #endWrite(seq: number, snapSeq: number): void {
    this.#completed(seq);
    const left = this.#inFlightBySnapSeq.get(snapSeq)! - 1;
    // The current snap seq keeps its entry at 0: deleting and adding it back as writes come and go
    // made the Map shrink and grow again. Older ones drain once and go.
    if (left === 0 && snapSeq !== this.#snapSeq) this.#inFlightBySnapSeq.delete(snapSeq);
    else this.#inFlightBySnapSeq.set(snapSeq, left);
    if (this.#drainWaiters.length > 0) for (const waiter of this.#drainWaiters.splice(0)) waiter();
  }

  /**
   * A write taken without a Promise per layer, when every replica of its PG that acts now lives
   * in this process (DESIGN §9's hyperconverged fast path), or false: then write() does it. Whole
   * blocks within one chunk, without FUA, overlapping no write in flight, qualify. `done` is
   * called once, never before this returns: undefined when every acting replica has the write,
   * else the error write() would have failed with. Replicas that fail are handled, and the write
   * retried, as write() does. `dataDone` is true when every replica answered the first round with
   * success: a store in this process has written `data` by then, and one behind a socket has read
   * the whole frame, so nothing reads `data` any more. After a failure it is false: a request that
   * timed out may still sit in a socket's queue.
   */
  writeNow(offsetBytes: number, data: Buffer, fua: boolean, done: (error: ShaleError | undefined, dataDone: boolean) => void): boolean {
    if (fua || offsetBytes % BLOCK_SIZE_BYTES !== 0 || data.length % BLOCK_SIZE_BYTES !== 0) return false;
    const placed = this.#placeInChunk(offsetBytes, data.length);
    if (placed === undefined) return false;
    const map = this.#placedMap!;
    const pool = this.#placedPool!;
    const pg = this.#placedPg!;
    const { chunkIndex, offsetBlocks, countBlocks } = placed;
    const startBlock = offsetBytes / BLOCK_SIZE_BYTES;
    // The acting replicas as bits of a number, counted here and sent to below: no arrays per write.
    const replicas = pg.replicas;
    if (replicas.length > 31) return false;
    let actingBits = 0;
    let actingCount = 0;
    for (let i = 0; i < replicas.length; i++) {
      const replica = replicas[i]!;
      if (!acts(map, replica)) continue;
      if (this.#cluster.channel(replica.storeId).writeNow === undefined) return false;
      actingBits |= 1 << i;
      actingCount++;
    }
    if (actingCount < pool.minReplicas) return false;
    const hold = this.#lock.tryHold(startBlock, startBlock + countBlocks);
    if (hold === undefined) return false;

    const deadline = this.#deadline();
    const snapSeq = this.#snapSeq;
    const seq = this.#beginWrite(snapSeq);
    const checksums = blockChecksums(data);
    const finish = (error: ShaleError | undefined, dataDone: boolean): void => {
      this.#endWrite(seq, snapSeq);
      this.#lock.release(hold);
      done(error, dataDone);
    };
    let pending = actingCount;
    let failures: ReplicaFailure[] | undefined;
    // Kept by the channels until each replica answers: a copy of the placement, not #nowFields itself.
    // Spelled out: a spread of #nowFields went through a generic clone per write.
    const fields: LocalWriteFields = {
      volumeId: placed.volumeId, chunkIndex, poolId: placed.poolId, pgId: placed.pgId, pgCount: placed.pgCount, pgEpoch: placed.pgEpoch,
      ownerEpoch: placed.ownerEpoch, offsetBlocks, countBlocks, versionSeq: seq, snapSeq, watermark: this.#watermark(),
    };
    for (let i = 0; i < replicas.length; i++) {
      if ((actingBits & (1 << i)) === 0) continue;
      const storeId = replicas[i]!.storeId;
      this.#writtenSinceFlush.add(storeId);
      this.#cluster.channel(storeId).writeNow!(fields, checksums, data, (error) => {
        if (error !== undefined) (failures ??= []).push({ storeId, error });
        if (--pending > 0) return;
        if (failures === undefined) {
          finish(undefined, true);
          return;
        }
        // A replica failed: from here on as write() goes on after a failed round.
        const piece: Piece = { chunkIndex, offsetBlocks, countBlocks, bufferBlock: 0 };
        this.#writePiece(piece, Op.WRITE, seq, snapSeq, false, data, checksums, deadline, failures).then(
          () => finish(undefined, false),
          (thrown: unknown) => finish(toShaleError(thrown), false),
        );
      });
    }
    return true;
  }

  /**
   * Writes one piece to every acting replica of its PG, round after round until all have it,
   * handling failed replicas between rounds. `failed`: the failures of a round already made.
   */
  async #writePiece(piece: Piece, op: number, seq: number, snapSeq: number, fua: boolean, data: Buffer | undefined, checksums: Uint32Array | undefined,
    deadline = this.#deadline(), failed?: ReplicaFailure[]): Promise<void> {
    let payload: Buffer[] = [];
    if (data && checksums) {
      const sums = encodeChecksums(checksums, piece.bufferBlock, piece.countBlocks);
      payload = [sums, data.subarray(piece.bufferBlock * BLOCK_SIZE_BYTES, (piece.bufferBlock + piece.countBlocks) * BLOCK_SIZE_BYTES)];
    }
    let lastError: ShaleError | undefined;
    if (failed !== undefined) {
      const map = this.#cluster.map;
      const { pool, pgId } = this.#placement(map, piece.chunkIndex);
      lastError = await handleReplicaFailures(this.#cluster, failed, diskFailedSpare(failed, (storeIds) => pgNeeds(map, pool, pgId, storeIds)));
      if (this.#expired(deadline)) throw noQuorum(lastError);
    }
    for (;;) {
      const map = this.#cluster.map;
      const { pool, pgId, pg, acting } = this.#acting(map, piece);
      if (acting.length < pool.minReplicas) {
        lastError = new ShaleError('NO_QUORUM', `PG ${pool.id}.${pgId} has ${acting.length} of ${pool.minReplicas} replicas needed`);
        await waitForMapChange(this.#cluster, map, deadline, lastError);
        continue;
      }
      const header = {
        op, flags: fua ? Flag.FUA : 0, volumeId: this.info.id, chunkIndex: piece.chunkIndex, poolId: pool.id, pgId,
        pgCount: pool.pgCount, pgEpoch: pg.epoch, ownerEpoch: this.ownerEpoch, versionSeq: seq,
        offsetBlocks: piece.offsetBlocks, countBlocks: piece.countBlocks, snapSeq, watermark: this.#watermark(),
      };
      const results = await Promise.all(acting.map(async (replica): Promise<ReplicaFailure | undefined> => {
        this.#writtenSinceFlush.add(replica.storeId);
        try {
          await this.#cluster.channel(replica.storeId).request(header, payload);
          return undefined;
        } catch (error) {
          return { storeId: replica.storeId, error: error instanceof ShaleError ? error : new ShaleError('INTERNAL', String(error)) };
        }
      }));
      const failures = results.filter((failure): failure is ReplicaFailure => failure !== undefined);
      if (failures.length === 0) return;
      // A replica whose disk failed leaves the acting set where the PG can do without it.
      lastError = await handleReplicaFailures(this.#cluster, failures, diskFailedSpare(failures, (storeIds) => pgNeeds(map, pool, pgId, storeIds)));
      if (this.#expired(deadline)) throw noQuorum(lastError);
    }
  }

  /** The piece's PG in `map` and its acting replicas: those not down, on stores that are up. */
  #acting(map: ClusterMap, piece: Piece): { pool: PoolMapEntry; pgId: number; pg: PgEntry; acting: PgEntry['replicas'] } {
    const { pool, pgId, pg } = this.#placement(map, piece.chunkIndex);
    return { pool, pgId, pg, acting: actingReplicas(map, pg) };
  }

  /** Every write with seq ≤ this has been acknowledged by all its replicas. */
  #watermark(): number {
    return this.#writeSeqs.low - 1;
  }

  /**
   * A write finished (acknowledged, or failed for good: a failed write is no longer in flight, and
   * whatever part of it landed is the kind of divergence reconciliation repairs after a crash).
   */
  #completed(seq: number): void {
    this.#writeSeqs.end(seq);
  }

  /**
   * Reconciliation after a writer crash (DESIGN §3): after fencing, gather from every replica the
   * writes it holds above the old owners' watermarks, and roll the newest version of each range
   * forward to every replica of its PG, before this owner serves any I/O. Then the stores forget
   * those entries.
   */
  async #reconcile(): Promise<void> {
    const map = this.#cluster.map;
    const pool = this.#pool(map);
    const storeIds = new Set<number>();
    for (const pg of pool.pgs) for (const replica of pg.replicas) if (acts(map, replica)) storeIds.add(replica.storeId);
    const ranges = new Map<string, { chunkIndex: number; offsetBlocks: number; countBlocks: number }>();
    const asked: number[] = [];
    for (const storeId of storeIds) {
      try {
        const reply = await this.#cluster.channel(storeId).request({ op: Op.RECENT_WRITES, volumeId: this.info.id, ownerEpoch: this.ownerEpoch });
        asked.push(storeId);
        for (const entry of decodeRecentWrites(reply.payload)) {
          if (entry.epoch >= this.ownerEpoch) continue;
          ranges.set(`${entry.chunkIndex}:${entry.offsetBlocks}:${entry.countBlocks}`, entry);
        }
      } catch (error) {
        if (error instanceof ShaleError && error.code === 'FENCED') throw error;
        await this.#cluster.reportDown(storeId, `reconciliation: ${(error as Error).message}`);
      }
    }
    let rolled = 0;
    for (const range of ranges.values()) rolled += await this.#rollForward(range);
    for (const storeId of asked) {
      await this.#cluster.channel(storeId).request({ op: Op.RECENT_WRITES, flags: Flag.CLEAR, volumeId: this.info.id, ownerEpoch: this.ownerEpoch }).catch(() => {});
    }
    if (rolled > 0) this.#cluster.log(`volume ${this.info.name}: rolled ${rolled} block(s) an earlier owner left in flight forward to every replica`);
    this.reconciledBlocks = rolled;
  }

  /** Reads a range from every replica of its PG and writes the newest version of each block to those that lack it. */
  async #rollForward(range: { chunkIndex: number; offsetBlocks: number; countBlocks: number }): Promise<number> {
    const map = this.#cluster.map;
    const { pool, pgId, pg } = this.#placement(map, range.chunkIndex);
    const replicas = actingReplicas(map, pg).map((replica) => replica.storeId);
    const header = {
      volumeId: this.info.id, chunkIndex: range.chunkIndex, poolId: pool.id, pgId, pgCount: pool.pgCount, pgEpoch: pg.epoch,
      offsetBlocks: range.offsetBlocks, countBlocks: range.countBlocks,
    };
    const settled = await Promise.allSettled(replicas.map(async (storeId) => {
      const reply = await this.#cluster.channel(storeId).request({ op: Op.READ, flags: Flag.REPAIR, ...header, ownerEpoch: this.ownerEpoch });
      return { storeId, read: decodeReadReply(reply.payload, range.countBlocks) };
    }));
    // A replica that can't be read now is down; it is resynced from the others when it returns.
    const reads = settled.flatMap((result) => (result.status === 'fulfilled' ? [result.value] : []));
    let rolled = 0;
    // The newest copy of each block, and which replicas hold an older one.
    for (let block = 0; block < range.countBlocks && reads.length > 0; block++) {
      let newest = reads[0]!;
      for (const candidate of reads) {
        if (compareVersions(candidate.read.epochs[block]!, candidate.read.seqs[block]!, newest.read.epochs[block]!, newest.read.seqs[block]!) > 0) newest = candidate;
      }
      const state = newest.read.states[block]!;
      if (state === BlockState.ABSENT) continue;
      const epoch = newest.read.epochs[block]!;
      const seq = newest.read.seqs[block]!;
      const behind = reads.filter((candidate) => compareVersions(candidate.read.epochs[block]!, candidate.read.seqs[block]!, epoch, seq) < 0);
      if (behind.length === 0) continue;
      let dataIndex = 0;
      for (let i = 0; i < block; i++) if (newest.read.states[i] === BlockState.DATA) dataIndex++;
      const repair = {
        op: state === BlockState.DATA ? Op.WRITE : Op.WRITE_ZEROES, flags: Flag.REPAIR, ...header,
        offsetBlocks: range.offsetBlocks + block, countBlocks: 1, ownerEpoch: epoch, versionSeq: seq,
        // The copy keeps the snap stamp of the version it copies: snapshots see it as they did.
        snapSeq: newest.read.stamps[block]!,
      };
      const checksum = Buffer.allocUnsafe(4);
      checksum.writeUInt32LE(newest.read.checksums[block]!, 0);
      const payload = state === BlockState.DATA
        ? [checksum, newest.read.data.subarray(dataIndex * BLOCK_SIZE_BYTES, (dataIndex + 1) * BLOCK_SIZE_BYTES)]
        : [];
      await Promise.all(behind.map((candidate) => this.#cluster.channel(candidate.storeId).request(repair, payload)));
      rolled++;
    }
    return rolled;
  }

  async flush(): Promise<void> {
    const deadline = this.#deadline();
    const stores = [...this.#writtenSinceFlush];
    this.#writtenSinceFlush = new Set();
    let pending = stores;
    while (pending.length > 0) {
      const map = this.#cluster.map;
      const results = await Promise.all(pending.map(async (storeId): Promise<ReplicaFailure | undefined> => {
        if (!isUp(map, storeId)) return undefined; // already down in a committed epoch
        try {
          await this.#cluster.channel(storeId).request({ op: Op.FLUSH, volumeId: this.info.id, ownerEpoch: this.ownerEpoch, watermark: this.#watermark() });
          return undefined;
        } catch (error) {
          return { storeId, error: error instanceof ShaleError ? error : new ShaleError('INTERNAL', String(error)) };
        }
      }));
      const failures = results.filter((failure): failure is ReplicaFailure => failure !== undefined);
      if (failures.length === 0) return;
      // A store whose disk failed the FLUSH is reported down where every PG of the pool can do
      // without it: each of those PGs' other replicas took every write it took, and flushed them
      // in this round. Else the FLUSH fails with the disk's error.
      const lastError = await handleReplicaFailures(this.#cluster, failures, diskFailedSpare(failures, (storeIds) => poolNeeds(map, this.#pool(map), storeIds)));
      if (this.#expired(deadline)) throw noQuorum(lastError);
      pending = failures.map((failure) => failure.storeId);
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    await this.flush();
    this.#closed = true;
    this.#cluster.forget(this.info.name);
    await this.#cluster.conductor.closeVolume(this.info.name, this.#cluster.ownerId, this.ownerEpoch).catch(() => {});
  }

  #deadline(): number {
    return this.#cluster.ioTimeoutMs > 0 ? this.#cluster.env.clock.nowMs() + this.#cluster.ioTimeoutMs : Number.POSITIVE_INFINITY;
  }

  #expired(deadline: number): boolean {
    return this.#cluster.env.clock.nowMs() >= deadline;
  }
}

/** Decodes a READ reply, from its parts when it came from the in-process store (no joined copy). */
function decodeRead(frame: Frame, countBlocks: number): DecodedRead {
  const parts = frame.parts;
  return parts && parts.length === 2 ? decodeReadParts(parts[0]!, parts[1]!, countBlocks) : decodeReadReply(frame.payload, countBlocks);
}

/**
 * Rebuilds the piece's bytes from a READ reply, verifying every data block's crc32c — end to end,
 * unless the store already verified them in this same process (`verified`).
 */
function assembleRead(read: DecodedRead, countBlocks: number, storeId: number, verified: boolean): Buffer {
  let dataBlocks = 0;
  for (let i = 0; i < countBlocks; i++) {
    if (read.states[i] !== BlockState.DATA) continue;
    const block = read.data.subarray(dataBlocks * BLOCK_SIZE_BYTES, (dataBlocks + 1) * BLOCK_SIZE_BYTES);
    if (!verified && crc32c(block) !== read.checksums[i]) {
      throw new ShaleError('CHECKSUM', `block ${i} from store ${storeId} failed its crc32c in transit`);
    }
    dataBlocks++;
  }
  if (dataBlocks === countBlocks) return read.data;
  const out = Buffer.alloc(countBlocks * BLOCK_SIZE_BYTES);
  let at = 0;
  for (let i = 0; i < countBlocks; i++) {
    if (read.states[i] !== BlockState.DATA) continue;
    read.data.copy(out, i * BLOCK_SIZE_BYTES, at * BLOCK_SIZE_BYTES, (at + 1) * BLOCK_SIZE_BYTES);
    at++;
  }
  assert(at === dataBlocks, 'every data block placed');
  return out;
}

/** The bytes of [offsetBytes, +lengthBytes) out of `data`, which holds the whole blocks around them. */
function trimToRange(data: Buffer, offsetBytes: number, lengthBytes: number): Buffer {
  const skip = offsetBytes % BLOCK_SIZE_BYTES;
  return skip === 0 && data.length === lengthBytes ? data : data.subarray(skip, skip + lengthBytes);
}
