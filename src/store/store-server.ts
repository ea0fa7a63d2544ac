/**
 * The store's side of the store protocol: frames in, engine calls, replies out.
 *
 * Checks, in order, for every request (DESIGN §3, invariant 6):
 *   1. protocol version and framing (else the connection is closed: it can't be re-framed);
 *   2. deleted volume                        → NOT_FOUND
 *   3. owner epoch older than the volume's fence (writes and flushes that aren't repairs) → FENCED
 *   4. PG epoch older than the store knows   → STALE_PG_EPOCH (the client refreshes its map);
 *      a newer one is remembered, so writers still on the old map are refused from then on;
 *   5. READ of a PG this store is not clean in → NOT_READY (recovering replicas take writes, serve no reads);
 *      READ_SNAP / BLOCK_VERSIONS at a snapshot this store's copy of is incomplete → NOT_READY (snap-gaps.ts).
 * Replies go out in batches: everything completed in one event-loop turn leaves in one write.
 */
import { assert } from '../lib/assert.ts';
import { giveBack, ioBuffers, takePayloadBuffer } from '../lib/buffer-pool.ts';
import { blockCrc32c } from '../lib/crc32c.ts';
import { codeOf, ErrorCodes, ShaleError, toShaleError } from '../lib/errors.ts';
import { placementGroupOf } from '../lib/placement-hash.ts';
import { BLOCK_SIZE_BYTES } from '../lib/units.ts';
import type { Connection, Env, Listener } from '../env/env.ts';
import {
  BLOCKS_PER_REQUEST_MAX, BlockState, decodeKvKey, decodeKvListRequest, decodeVolumeIds, encodeBlockVersions, encodeKvRecords, engineObjectId, KV_LIST_LIMIT_MAX, Namespace, encodeRecentWrites, encodeHeader, encodeListReply, encodeReadDescriptors,
  Flag, FrameParser, HEADER_BYTES, Op, REPLY_BIT, type Frame, type FrameHeader,
  decodeKvPgCursor, encodeKvPgRecords, namespacedId, type KvPgRecord,
} from '../proto/store-protocol.ts';
import type { LocalReadFields, LocalReadResult, LocalWriteFields, WriteDone } from '../proto/store-channel.ts';
import type { BlockEngine, HeadVersions } from './block-engine.ts';
import { RecentWrites } from './recent-writes.ts';
import { Tickets } from '../lib/tickets.ts';
import { encodeDigest } from '../proto/pg-digest.ts';
import { digestPg } from './pg-digest.ts';

/** Requests one connection may have in flight before the server stops reading from it. */
export const CONNECTION_IN_FLIGHT_MAX = 1024;
/** Client requests ended this recently count as client activity (background copies wait). */
export const CLIENT_QUIET_MS = 5;
/** Longest a background copy request waits for client I/O to pause. */
export const BACKGROUND_WAIT_MS_MAX = 20;

/** What the server knows of the cluster, kept current by the daemon from the conductor's map. */
export interface StoreView {
  /** False until the first cluster map is applied: until then the store serves nothing. */
  readonly ready: boolean;
  /** Highest PG epoch known for (pool, pg); 0 when unknown. */
  pgEpoch(poolId: number, pgId: number): number;
  notePgEpoch(poolId: number, pgId: number, epoch: number): void;
  /** Whether this store may serve reads of (pool, pg) for a client acting on `pgEpoch`. */
  canServeReads(poolId: number, pgId: number, pgEpoch: number): boolean;
  isDeleted(volumeId: number): boolean;
}

export interface StoreServerOptions {
  listen: string;
  engine: BlockEngine;
  view: StoreView;
  log: (message: string) => void;
  /** Snapshots this store's copy of is known to be incomplete (snap-gaps.ts): served by no request here. */
  snapshotGaps?: { has(volumeId: number, snapshotId: number): boolean };
}

export class StoreServer {
  readonly #env: Env;
  readonly #engine: BlockEngine;
  readonly #view: StoreView;
  readonly #log: (message: string) => void;
  readonly #snapshotGaps: StoreServerOptions['snapshotGaps'];
  #listener: Listener | undefined;
  #connections = new Set<Connection>();
  /**
   * Writes accepted and not yet answered, over a socket or in this process, so a PG listing can
   * wait until they are in the index. Tickets, not a Set of the writes: see lib/tickets.ts.
   */
  readonly #writeTickets = new Tickets();
  /** Writes above each volume's watermark, for reconciliation after a writer crash. */
  readonly recentWrites = new RecentWrites();
  #stopping = false;
  #clientRequests = 0;
  #clientDoneMs = -Infinity;

  constructor(env: Env, options: Omit<StoreServerOptions, 'listen'>) {
    this.#env = env;
    this.#engine = options.engine;
    this.#view = options.view;
    this.#log = options.log;
    this.#snapshotGaps = options.snapshotGaps;
  }

  /** A snapshot this store missed versions of (resync found it): NOT_READY, so the client reads another replica. */
  #checkSnapshotComplete(volumeId: number, snapshotId: number): void {
    if (snapshotId !== 0 && this.#snapshotGaps?.has(volumeId, snapshotId)) {
      throw new ShaleError('NOT_READY', `snapshot ${snapshotId} of volume ${volumeId} is incomplete on this store (it missed versions while away); read another replica`);
    }
  }

  get address(): string {
    assert(this.#listener, 'server is listening');
    return this.#listener.address;
  }

  async listen(address: string): Promise<string> {
    this.#listener = await this.#env.net.listen(address, (connection) => this.#serve(connection));
    return this.#listener.address;
  }

  /** Stops taking requests, lets the ones in flight finish, closes every connection. */
  async close(): Promise<void> {
    this.#stopping = true;
    await this.#writesAnswered();
    await this.#listener?.close();
    for (const connection of this.#connections) connection.destroy();
  }

  #serve(connection: Connection): void {
    this.#connections.add(connection);
    const parser = new FrameParser(takePayloadBuffer);
    let inFlight = 0;
    let paused = false;
    let outbox: Buffer[] = [];
    // Read buffers of the replies in the outbox, given back (to the pool or the engine's cache) once written.
    let recycle: Buffer[] = [];
    let flushScheduled = false;
    const send = (reply: Reply): void => {
      outbox.push(encodeHeader(reply.header, Buffer.allocUnsafe(HEADER_BYTES)), ...reply.parts);
      if (reply.recycle !== undefined) recycle.push(reply.recycle);
      if (flushScheduled) return;
      flushScheduled = true;
      queueMicrotask(() => {
        flushScheduled = false;
        const out = outbox;
        const written = recycle;
        outbox = [];
        recycle = [];
        if (connection.closed) {
          for (const buffer of written) giveBack(buffer);
          return;
        }
        connection.write(out, written.length === 0 ? undefined : () => {
          for (const buffer of written) giveBack(buffer);
        });
      });
    };
    const done = (): void => {
      inFlight--;
      if (paused && inFlight < CONNECTION_IN_FLIGHT_MAX / 2) {
        paused = false;
        connection.resume();
      }
    };
    const serveFrames = (frames: readonly Frame[]): void => {
      for (const frame of frames) {
        const now = this.#readNow(frame.header);
        if (now !== undefined) {
          send(now);
          continue;
        }
        inFlight++;
        if (this.#writeFrameNow(frame, send, done)) continue;
        this.#handle(frame).then(
          (reply) => {
            send(reply);
            done();
          },
          (error: unknown) => {
            send(errorReply(frame.header, error));
            done();
          },
        );
      }
      if (inFlight >= CONNECTION_IN_FLIGHT_MAX && !paused) {
        paused = true;
        connection.pause();
      }
    };
    const framed = (frame: () => Frame[]): void => {
      let frames: Frame[];
      try {
        frames = frame();
      } catch (error) {
        this.#log(`store protocol error from ${connection.remoteAddress}: ${(error as Error).message}; closing the connection`);
        connection.destroy();
        return;
      }
      serveFrames(frames);
    };
    // Reads into a reused staging buffer, or straight into the payload being received (a pool
    // buffer, given back once the engine has written it), where the connection can.
    const inPlace = connection.readInto?.(() => parser.readTarget(), (bytes) => framed(() => parser.received(bytes))) === true;
    if (!inPlace) connection.onData((chunk) => framed(() => parser.push(chunk)));
    connection.onClose(() => this.#connections.delete(connection));
  }

  /**
   * A request from a client in this process (the hyperconverged fast path, DESIGN §9): the same
   * checks and engine calls as over a socket, without framing, copies or event-loop hops.
   * Resolves with the reply's header and payload parts; rejects with the ShaleError a socket
   * client would get as a status.
   */
  serveLocal(frame: Frame): Promise<Reply> {
    return this.#handle(frame);
  }

  /**
   * A client's volume WRITE from this process (the hyperconverged fast path, DESIGN §9): the checks
   * of #write, then the engine's writeNow, settled through `done` without a Promise. The checksums
   * were computed from `data` in this process and are not checked again. False — also for any
   * error, which serveLocal then reports — when it can't be taken so.
   */
  writeLocalNow(fields: LocalWriteFields, checksums: Uint32Array, data: Buffer, done: WriteDone): boolean {
    return this.#writeNow(fields, checksums, data, done);
  }

  /**
   * A client's volume WRITE from a socket taken as writeLocalNow takes one: no Promise between the
   * frame and the reply. Only a plain WRITE (no FUA, no repair) whose payload is well formed and
   * whose every block matches its crc32c qualifies; false for anything else, which #handle then
   * serves or refuses. `send` gets the reply, then `done` is called.
   */
  #writeFrameNow(frame: Frame, send: (reply: Reply) => void, done: () => void): boolean {
    const h = frame.header;
    if (h.op !== Op.WRITE || h.flags !== 0 || h.namespace !== Namespace.VOLUME || h.countBlocks === 0 || h.countBlocks > BLOCKS_PER_REQUEST_MAX) return false;
    const checksumBytes = h.countBlocks * 4;
    const payload = frame.payload;
    if (frame.parts !== undefined || payload.length !== checksumBytes + h.countBlocks * BLOCK_SIZE_BYTES) return false;
    const data = payload.subarray(checksumBytes);
    const checksums = new Uint32Array(h.countBlocks);
    for (let i = 0; i < h.countBlocks; i++) {
      checksums[i] = payload.readUInt32LE(i * 4);
      // A block damaged in transit: #handle refuses the write with CHECKSUM.
      if (blockCrc32c(data, i) !== checksums[i]) return false;
    }
    return this.#writeNow(h, checksums, data, (error, appliedBlocks) => {
      // Written: nothing reads the payload any more. After an error it is left to the collector.
      if (error === undefined && frame.lent === true) ioBuffers.give(payload);
      if (error !== undefined) send(errorReply(h, error));
      else {
        // The request's header becomes the reply's: nothing reads it once the write is answered.
        h.op |= REPLY_BIT;
        h.status = 0;
        h.payloadBytes = 0;
        h.countBlocks = appliedBlocks;
        send({ header: h, parts: NO_PARTS });
      }
      done();
    });
  }

  /**
   * The checks of #write, then the engine's writeNow, settled through `done` without a Promise;
   * `checksums` are not checked again. False, with nothing done, when the write can't be taken so.
   */
  #writeNow(fields: LocalWriteFields, checksums: Uint32Array, data: Buffer, done: (error: ShaleError | undefined, appliedBlocks: number) => void): boolean {
    const engine = this.#engine;
    if (engine.writeNow === undefined || this.#stopping || !this.#view.ready) return false;
    let ticket = -1;
    const settle = (error: ShaleError | undefined, appliedBlocks = 0): void => {
      this.#clientRequests--;
      this.#clientDoneMs = this.#env.clock.nowMs();
      this.#writeTickets.end(ticket);
      done(error, appliedBlocks);
    };
    try {
      this.#checkRange(fields);
      this.#checkEpochs(fields, false);
      this.recentWrites.check(fields.volumeId, fields.ownerEpoch, fields.watermark);
    } catch {
      return false;
    }
    // Counted before the engine has it, so that nothing the engine does can settle it uncounted.
    this.#clientRequests++;
    ticket = this.#writeTickets.begin();
    try {
      engine.writeNow({
        volumeId: fields.volumeId, chunkIndex: fields.chunkIndex, offsetBlocks: fields.offsetBlocks, data, checksums,
        version: { epoch: fields.ownerEpoch, seq: fields.versionSeq }, snapSeq: fields.snapSeq, ownerEpoch: fields.ownerEpoch,
      }, (error, result) => {
        if (error !== undefined) {
          settle(toShaleError(error));
          return;
        }
        try {
          this.recentWrites.note(fields.volumeId, {
            chunkIndex: fields.chunkIndex, offsetBlocks: fields.offsetBlocks, countBlocks: data.length / BLOCK_SIZE_BYTES, epoch: fields.ownerEpoch, seq: fields.versionSeq,
          }, fields.watermark);
        } catch (noted) {
          // Applied, but the list of writes above the watermark is full: BUSY, as over a socket (the retry is idempotent).
          settle(toShaleError(noted));
          return;
        }
        settle(undefined, result!.appliedBlocks);
      });
    } catch {
      // Refused before it was queued (fenced, queue full, closing): the request path reports it.
      this.#clientRequests--;
      this.#writeTickets.end(ticket);
      return false;
    }
    return true;
  }

  /** Resolves once every write accepted before the call, over a socket or in this process, has been answered. */
  #writesAnswered(): Promise<void> {
    return this.#writeTickets.drained();
  }

  /**
   * A READ from a client in this process answered synchronously: the checks of #read, then the
   * engine's readNow. Undefined — also for any error, which serveLocal then reports — when it
   * can't be answered now; the caller falls back to serveLocal.
   */
  readLocalNow(fields: LocalReadFields): LocalReadResult | undefined {
    const engine = this.#engine;
    if (engine.readNow === undefined || !this.#mayServeRead(fields)) return undefined;
    try {
      const result = engine.readNow(fields.volumeId, fields.chunkIndex, fields.offsetBlocks, fields.countBlocks);
      if (result !== undefined) this.#clientDoneMs = this.#env.clock.nowMs();
      return result;
    } catch {
      return undefined;
    }
  }

  /**
   * A READ from a client in this process that readLocalNow declined (the disk must be read, or the
   * range is large): the same checks, then the engine's read, answered without descriptors or
   * block versions — the volume client needs only the verified bytes. Undefined when the store
   * can't serve it; a rejection (any error) sends the caller to serveLocal, which reports it.
   */
  readLocal(fields: LocalReadFields): Promise<LocalReadResult> | undefined {
    if (!this.#mayServeRead(fields)) return undefined;
    this.#clientRequests++;
    const done = (): void => {
      this.#clientRequests--;
      this.#clientDoneMs = this.#env.clock.nowMs();
    };
    return this.#engine.read(fields.volumeId, fields.chunkIndex, fields.offsetBlocks, fields.countBlocks).then((result) => {
      done();
      return { data: result.data, absent: result.states.includes(BlockState.ABSENT) };
    }, (error: unknown) => {
      done();
      throw error;
    });
  }

  /**
   * A client's head READ answered synchronously when the engine can (page-cached data): the checks
   * and reply of #read without its promises and per-block lookups. Undefined for anything else —
   * other ops, repair and snapshot reads, data to be read from the device, and any error, which
   * #read then reports.
   */
  #readNow(h: FrameHeader): Reply | undefined {
    const engine = this.#engine;
    if (h.op !== Op.READ || (h.flags & Flag.REPAIR) !== 0 || engine.readNow === undefined || !this.#mayServeRead(h)) return undefined;
    try {
      const versions = headVersionsScratch(h.countBlocks);
      const result = engine.readNow(engineObjectId(h.namespace, h.volumeId), h.chunkIndex, h.offsetBlocks, h.countBlocks, versions);
      if (result === undefined) return undefined;
      this.#clientDoneMs = this.#env.clock.nowMs();
      return readReply(h, result.data, versions);
    } catch {
      return undefined;
    }
  }

  /** The checks of #read for a client's head READ; false for anything it would refuse. */
  #mayServeRead(fields: LocalReadFields): boolean {
    if (this.#stopping || !this.#view.ready) return false;
    try {
      this.#checkRange(fields);
      this.#checkEpochs(fields, true);
      return this.#view.canServeReads(fields.poolId, fields.pgId, fields.pgEpoch);
    } catch {
      return false;
    }
  }

  /**
   * Client I/O first (healing): whether client requests (not REPAIR copies) are in flight or ended
   * within the last CLIENT_QUIET_MS. Background copies (a peer's resync reading here, this store's
   * own resync) wait a little while it is so, up to BACKGROUND_WAIT_MS_MAX per request.
   */
  clientBusy(): boolean {
    return this.#clientRequests > 0 || this.#env.clock.nowMs() - this.#clientDoneMs < CLIENT_QUIET_MS;
  }

  async #yieldToClients(): Promise<void> {
    for (let waited = 0; waited < BACKGROUND_WAIT_MS_MAX && this.clientBusy(); waited += 2) await this.#env.clock.sleep(2);
  }

  async #handle(frame: Frame): Promise<Reply> {
    const h = frame.header;
    const isClient = (h.flags & Flag.REPAIR) === 0 && (h.op === Op.READ || h.op === Op.WRITE || h.op === Op.WRITE_ZEROES || h.op === Op.FLUSH);
    if (!isClient) {
      if (h.op === Op.READ) await this.#yieldToClients();
      return this.#dispatch(frame);
    }
    this.#clientRequests++;
    try {
      return await this.#dispatch(frame);
    } finally {
      this.#clientRequests--;
      this.#clientDoneMs = this.#env.clock.nowMs();
    }
  }

  async #dispatch(frame: Frame): Promise<Reply> {
    const h = frame.header;
    if (this.#stopping) throw new ShaleError('SHUTTING_DOWN', 'store is stopping');
    if (!this.#view.ready && h.op !== Op.PING) throw new ShaleError('NOT_READY', 'store has not received the cluster map yet');
    switch (h.op) {
      case Op.PING:
        return { header: replyHeader(h), parts: [] };
      case Op.WRITE:
      case Op.WRITE_ZEROES:
        return this.#track(this.#write(frame));
      case Op.READ:
      case Op.READ_SNAP:
        return this.#read(h);
      case Op.BLOCK_VERSIONS:
        return this.#blockVersions(h);
      case Op.FLUSH:
        if (h.volumeId !== 0) this.recentWrites.advance(h.volumeId, h.ownerEpoch, h.watermark);
        await this.#engine.flush();
        return { header: replyHeader(h), parts: [] };
      case Op.FENCE:
        return this.#fence(h);
      case Op.LIST_PG:
        return this.#listPg(frame);
      case Op.BLOCK_STATES:
        return this.#blockStates(h);
      case Op.RECENT_WRITES:
        return this.#recentWrites(h);
      case Op.KV_PUT:
      case Op.KV_DELETE:
        return this.#track(this.#kvWrite(frame));
      case Op.KV_GET:
      case Op.KV_LIST:
        return this.#kvRead(frame);
      case Op.KV_LIST_PG:
        return this.#kvListPg(frame);
      case Op.PG_DIGEST:
        return this.#pgDigest(frame);
      case Op.SCRUB: {
        const report = await this.#engine.scrub(h.countBlocks > 0 ? { bytesPerSecondMax: h.countBlocks * 1024 * 1024 } : {});
        const payload = Buffer.from(JSON.stringify(report), 'utf8');
        return { header: replyHeader(h, { payloadBytes: payload.length }), parts: [payload] };
      }
      default:
        throw new ShaleError('INVALID_ARGUMENT', `unknown store op ${h.op}`);
    }
  }

  #track<T>(work: Promise<T>): Promise<T> {
    const ticket = this.#writeTickets.begin();
    const forget = (): void => this.#writeTickets.end(ticket);
    work.then(forget, forget);
    return work;
  }

  #checkRange(h: Pick<FrameHeader, 'volumeId' | 'chunkIndex' | 'pgId' | 'pgCount' | 'countBlocks'>): void {
    if (h.countBlocks === 0 || h.countBlocks > BLOCKS_PER_REQUEST_MAX) {
      throw new ShaleError('INVALID_ARGUMENT', `block count ${h.countBlocks} outside 1..${BLOCKS_PER_REQUEST_MAX}`);
    }
    if (h.pgCount === 0 || placementGroupOf(h.volumeId, h.chunkIndex, h.pgCount) !== h.pgId) {
      throw new ShaleError('INVALID_ARGUMENT', `object (${h.volumeId}, ${h.chunkIndex}) is not in PG ${h.pgId} of ${h.pgCount}`);
    }
  }

  #checkEpochs(h: Pick<FrameHeader, 'volumeId' | 'ownerEpoch' | 'poolId' | 'pgId' | 'pgEpoch'> & { namespace?: number }, isRepair: boolean): void {
    const isVolume = (h.namespace ?? Namespace.VOLUME) === Namespace.VOLUME;
    if (isVolume && this.#view.isDeleted(h.volumeId)) throw new ShaleError('NOT_FOUND', `volume ${h.volumeId} was deleted`);
    // S3 data and index objects have no owner: they are written once, or by the version rule alone.
    if (!isRepair && isVolume) {
      const fence = this.#engine.ownerEpoch(h.volumeId);
      if (h.ownerEpoch < fence) {
        throw new ShaleError('FENCED', `owner epoch ${h.ownerEpoch} of volume ${h.volumeId} is older than the fence ${fence}`);
      }
    }
    const known = this.#view.pgEpoch(h.poolId, h.pgId);
    if (h.pgEpoch < known) throw new ShaleError('STALE_PG_EPOCH', `PG ${h.poolId}.${h.pgId} is at epoch ${known}, request at ${h.pgEpoch}`);
    if (h.pgEpoch > known) this.#view.notePgEpoch(h.poolId, h.pgId, h.pgEpoch);
  }

  async #write(frame: Frame): Promise<Reply> {
    const h = frame.header;
    this.#checkRange(h);
    const isRepair = (h.flags & Flag.REPAIR) !== 0;
    this.#checkEpochs(h, isRepair);
    const version = { epoch: h.ownerEpoch, seq: h.versionSeq };
    const isVolume = h.namespace === Namespace.VOLUME;
    const ownerEpoch = isRepair || !isVolume ? undefined : h.ownerEpoch;
    const volumeId = engineObjectId(h.namespace, h.volumeId);
    if (!isRepair && isVolume) this.recentWrites.check(h.volumeId, h.ownerEpoch, h.watermark);
    let appliedBlocks: number;
    if (h.op === Op.WRITE) {
      const checksumBytes = h.countBlocks * 4;
      // A local request keeps checksums and data as separate parts; a socket frame is one buffer.
      const local = frame.parts?.length === 2 ? frame.parts : undefined;
      const sums = local ? local[0]! : frame.payload.subarray(0, checksumBytes);
      const data = local ? local[1]! : frame.payload.subarray(checksumBytes);
      if (sums.length !== checksumBytes || data.length !== h.countBlocks * BLOCK_SIZE_BYTES) {
        throw new ShaleError('INVALID_ARGUMENT', `WRITE payload of ${sums.length + data.length} bytes does not match ${h.countBlocks} blocks`);
      }
      const checksums = new Uint32Array(h.countBlocks);
      for (let i = 0; i < h.countBlocks; i++) checksums[i] = sums.readUInt32LE(i * 4);
      ({ appliedBlocks } = await this.#engine.write({
        volumeId, chunkIndex: h.chunkIndex, offsetBlocks: h.offsetBlocks, data, checksums, version, snapSeq: h.snapSeq, ownerEpoch,
      }));
    } else {
      ({ appliedBlocks } = await this.#engine.writeZeroes({
        volumeId, chunkIndex: h.chunkIndex, offsetBlocks: h.offsetBlocks, countBlocks: h.countBlocks, version, snapSeq: h.snapSeq, ownerEpoch,
      }));
    }
    if (!isRepair && isVolume) {
      this.recentWrites.note(h.volumeId, { chunkIndex: h.chunkIndex, offsetBlocks: h.offsetBlocks, countBlocks: h.countBlocks, epoch: h.ownerEpoch, seq: h.versionSeq }, h.watermark);
    }
    if ((h.flags & Flag.FUA) !== 0) await this.#engine.flush();
    return { header: replyHeader(h, { countBlocks: appliedBlocks }), parts: [] };
  }

  async #read(h: FrameHeader): Promise<Reply> {
    this.#checkRange(h);
    this.#checkEpochs(h, true);
    if ((h.flags & Flag.REPAIR) === 0 && !this.#view.canServeReads(h.poolId, h.pgId, h.pgEpoch)) {
      throw new ShaleError('NOT_READY', `PG ${h.poolId}.${h.pgId} is recovering on this store`);
    }
    let options: { snapshotId?: number } = {};
    if (h.op === Op.READ_SNAP) {
      if (h.snapSeq === 0) throw new ShaleError('INVALID_ARGUMENT', 'READ_SNAP needs a snapshot id in the snap seq field');
      options = { snapshotId: h.snapSeq };
      this.#checkSnapshotComplete(h.volumeId, h.snapSeq);
    }
    const objectId = engineObjectId(h.namespace, h.volumeId);
    const result = await this.#engine.read(objectId, h.chunkIndex, h.offsetBlocks, h.countBlocks, options);
    // The snap stamp of each version read, so copies (repair, reconciliation) keep it; looked up
    // after the read, so it counts only where the version is still the one read.
    // (An index lookup per block; a write stamped above 0 may reach this store before the map
    // that names its snapshot, so the engine's snapshot list cannot tell when to skip it.)
    let stamps: Float64Array | undefined;
    {
      const now = this.#engine.blockVersions(objectId, h.chunkIndex, h.offsetBlocks, h.countBlocks, options.snapshotId);
      stamps = new Float64Array(h.countBlocks);
      for (let i = 0; i < h.countBlocks; i++) {
        if (now.epochs[i] === result.epochs[i] && now.seqs[i] === result.seqs[i]) stamps[i] = now.stamps[i]!;
      }
    }
    return readReply(h, result.data, { ...result, stamps });
  }

  #blockStates(h: FrameHeader): Reply {
    this.#checkRange(h);
    this.#checkEpochs(h, true);
    if (!this.#view.canServeReads(h.poolId, h.pgId, h.pgEpoch)) {
      throw new ShaleError('NOT_READY', `PG ${h.poolId}.${h.pgId} is recovering on this store`);
    }
    const states = Buffer.from(this.#engine.blockStates(engineObjectId(h.namespace, h.volumeId), h.chunkIndex, h.offsetBlocks, h.countBlocks));
    return { header: replyHeader(h, { payloadBytes: states.length }), parts: [states] };
  }

  #blockVersions(h: FrameHeader): Reply {
    this.#checkRange(h);
    this.#checkEpochs(h, true);
    if ((h.flags & Flag.REPAIR) === 0 && !this.#view.canServeReads(h.poolId, h.pgId, h.pgEpoch)) {
      throw new ShaleError('NOT_READY', `PG ${h.poolId}.${h.pgId} is recovering on this store`);
    }
    this.#checkSnapshotComplete(h.volumeId, h.snapSeq);
    const versions = this.#engine.blockVersions(h.volumeId, h.chunkIndex, h.offsetBlocks, h.countBlocks, h.snapSeq === 0 ? undefined : h.snapSeq);
    const payload = encodeBlockVersions(versions, h.countBlocks);
    return { header: replyHeader(h, { payloadBytes: payload.length }), parts: [payload] };
  }

  #recentWrites(h: FrameHeader): Reply {
    if (this.#view.isDeleted(h.volumeId)) throw new ShaleError('NOT_FOUND', `volume ${h.volumeId} was deleted`);
    const fence = this.#engine.ownerEpoch(h.volumeId);
    if (h.ownerEpoch < fence) throw new ShaleError('FENCED', `volume ${h.volumeId} is fenced at ${fence}, above ${h.ownerEpoch}`);
    const payload = encodeRecentWrites(this.recentWrites.list(h.volumeId));
    if ((h.flags & Flag.CLEAR) !== 0) this.recentWrites.clearOlder(h.volumeId, h.ownerEpoch);
    return { header: replyHeader(h, { payloadBytes: payload.length }), parts: [payload] };
  }

  async #fence(h: FrameHeader): Promise<Reply> {
    const current = this.#engine.ownerEpoch(h.volumeId);
    if (h.ownerEpoch < current) throw new ShaleError('FENCED', `volume ${h.volumeId} is fenced at ${current}, above ${h.ownerEpoch}`);
    if (h.ownerEpoch > current) await this.#engine.fence(h.volumeId, h.ownerEpoch);
    return { header: replyHeader(h), parts: [] };
  }

  /** KV_PUT / KV_DELETE on a bucket-index shard: the PG checks of a write, then the version rule per key. */
  async #kvWrite(frame: Frame): Promise<Reply> {
    const h = frame.header;
    this.#checkKv(h);
    const payload = frame.parts ? Buffer.concat(frame.parts) : frame.payload;
    const { key, value } = decodeKvKey(payload);
    const version = { epoch: h.ownerEpoch, seq: h.versionSeq };
    const fua = (h.flags & Flag.FUA) !== 0;
    const shardId = engineObjectId(h.namespace, h.volumeId);
    const { applied } = h.op === Op.KV_PUT
      ? await this.#engine.kvPut(shardId, Buffer.from(key), Buffer.from(value), version, { fua })
      : await this.#engine.kvDelete(shardId, Buffer.from(key), version, { fua });
    if (fua && !applied) await this.#engine.flush();
    return { header: replyHeader(h, { countBlocks: applied ? 1 : 0 }), parts: [] };
  }

  /** KV_GET / KV_LIST: only from a replica that serves reads of the shard's PG. */
  #kvRead(frame: Frame): Reply {
    const h = frame.header;
    this.#checkKv(h);
    if ((h.flags & Flag.REPAIR) === 0 && !this.#view.canServeReads(h.poolId, h.pgId, h.pgEpoch)) {
      throw new ShaleError('NOT_READY', `PG ${h.poolId}.${h.pgId} is recovering on this store`);
    }
    const payload = frame.parts ? Buffer.concat(frame.parts) : frame.payload;
    const shardId = engineObjectId(h.namespace, h.volumeId);
    if (h.op === Op.KV_GET) {
      const { key } = decodeKvKey(payload);
      const entry = this.#engine.kvGet(shardId, Buffer.from(key));
      if (!entry) return { header: replyHeader(h, { countBlocks: 0, ownerEpoch: 0, versionSeq: 0 }), parts: [] };
      return { header: replyHeader(h, { countBlocks: 1, ownerEpoch: entry.version.epoch, versionSeq: entry.version.seq, payloadBytes: entry.value.length }), parts: [entry.value] };
    }
    if (h.countBlocks < 1 || h.countBlocks > KV_LIST_LIMIT_MAX) throw new ShaleError('INVALID_ARGUMENT', `KV_LIST limit ${h.countBlocks} outside 1..${KV_LIST_LIMIT_MAX}`);
    const { prefix, startAfter } = decodeKvListRequest(payload);
    const entries = this.#engine.kvList(shardId, { prefix: Buffer.from(prefix), startAfter: startAfter ? Buffer.from(startAfter) : undefined, limit: h.countBlocks });
    const out = encodeKvRecords(entries.map((entry) => ({ key: entry.key, value: entry.value, epoch: entry.version.epoch, seq: entry.version.seq })));
    return { header: replyHeader(h, { countBlocks: entries.length, payloadBytes: out.length }), parts: [out] };
  }

  /**
   * KV_LIST_PG: a page of every record (tombstones too, with versions) of the namespace-2 shards in
   * the PG, in (shard, key) order, after the cursor in the payload. Like LIST_PG, it notes the PG
   * epoch and answers after the writes accepted before it are applied.
   */
  async #kvListPg(frame: Frame): Promise<Reply> {
    const h = frame.header;
    if (h.namespace !== Namespace.S3_INDEX) throw new ShaleError('INVALID_ARGUMENT', `KV_LIST_PG is for namespace ${Namespace.S3_INDEX}, not ${h.namespace}`);
    if (h.pgCount === 0 || h.pgId >= h.pgCount) throw new ShaleError('INVALID_ARGUMENT', `PG ${h.pgId} of ${h.pgCount}`);
    if (h.countBlocks < 1 || h.countBlocks > KV_LIST_LIMIT_MAX) throw new ShaleError('INVALID_ARGUMENT', `KV_LIST_PG limit ${h.countBlocks} outside 1..${KV_LIST_LIMIT_MAX}`);
    this.#checkEpochs({ ...h, volumeId: 0 }, true);
    await this.#writesAnswered();
    const after = decodeKvPgCursor(frame.parts ? Buffer.concat(frame.parts) : frame.payload);
    const shards: number[] = [];
    for (const engineId of this.#engine.kvShardIds()) {
      const local = namespacedId(engineId);
      if (local?.namespace !== Namespace.S3_INDEX || placementGroupOf(local.id, 0, h.pgCount) !== h.pgId) continue;
      if (after && local.id < after.shardId) continue;
      shards.push(local.id);
    }
    shards.sort((a, b) => a - b);
    const out: KvPgRecord[] = [];
    for (const shardId of shards) {
      for (const record of this.#engine.kvRecords(engineObjectId(Namespace.S3_INDEX, shardId))) {
        if (after && shardId === after.shardId && Buffer.compare(record.key, after.key) <= 0) continue;
        out.push({ shardId, key: record.key, value: record.value, epoch: record.version.epoch, seq: record.version.seq });
        if (out.length >= h.countBlocks) break;
      }
      if (out.length >= h.countBlocks) break;
    }
    const payload = encodeKvPgRecords(out);
    return { header: replyHeader(h, { countBlocks: out.length, payloadBytes: payload.length }), parts: [payload] };
  }

  #checkKv(h: FrameHeader): void {
    if (h.namespace !== Namespace.S3_INDEX) throw new ShaleError('INVALID_ARGUMENT', `key-value ops are for namespace ${Namespace.S3_INDEX}, not ${h.namespace}`);
    if (h.pgCount === 0 || placementGroupOf(h.volumeId, 0, h.pgCount) !== h.pgId) {
      throw new ShaleError('INVALID_ARGUMENT', `shard ${h.volumeId} is not in PG ${h.pgId} of ${h.pgCount}`);
    }
    this.#checkEpochs(h, true);
  }

  /** PG_DIGEST: per-block crc32c, state, version and read-back check of a PG (scrub; no data sent). */
  async #pgDigest(frame: Frame): Promise<Reply> {
    const h = frame.header;
    if (h.pgCount === 0 || h.pgId >= h.pgCount) throw new ShaleError('INVALID_ARGUMENT', `PG ${h.pgId} of ${h.pgCount}`);
    this.#checkEpochs({ ...h, volumeId: 0 }, true);
    await this.#writesAnswered();
    const volumeIds = new Set(decodeVolumeIds(frame.payload));
    const objects = await digestPg(this.#env, this.#engine, volumeIds, (volumeId, chunkIndex) => placementGroupOf(volumeId, chunkIndex, h.pgCount) === h.pgId, h.countBlocks * 1024 * 1024);
    const payload = encodeDigest(objects);
    return { header: replyHeader(h, { payloadBytes: payload.length }), parts: [payload] };
  }

  async #listPg(frame: Frame): Promise<Reply> {
    const h = frame.header;
    if (h.pgCount === 0 || h.pgId >= h.pgCount) throw new ShaleError('INVALID_ARGUMENT', `PG ${h.pgId} of ${h.pgCount}`);
    this.#checkEpochs({ ...h, volumeId: 0 }, true);
    // Writes accepted before this listing must be in it: wait until they are in the index.
    await this.#writesAnswered();
    if (h.namespace === Namespace.S3_DATA) {
      // Every S3 data object of the PG, by its namespace-local id (the PG hash the object client writes with).
      const inPg = (engineId: number, chunkIndex: number): boolean => {
        const local = namespacedId(engineId);
        return local?.namespace === Namespace.S3_DATA && placementGroupOf(local.id, chunkIndex, h.pgCount) === h.pgId;
      };
      const objects = this.#engine.listObjects(undefined, inPg).map((object) => ({ ...object, volumeId: namespacedId(object.volumeId)!.id }));
      const payload = encodeListReply(objects);
      return { header: replyHeader(h, { payloadBytes: payload.length }), parts: [payload] };
    }
    if (h.namespace !== Namespace.VOLUME) throw new ShaleError('INVALID_ARGUMENT', `LIST_PG of namespace ${h.namespace}: key-value shards are listed with KV_LIST_PG`);
    const volumeIds = new Set(decodeVolumeIds(frame.payload));
    const objects = this.#engine.listObjects(volumeIds, (volumeId, chunkIndex) => placementGroupOf(volumeId, chunkIndex, h.pgCount) === h.pgId);
    const payload = encodeListReply(objects);
    return { header: replyHeader(h, { payloadBytes: payload.length }), parts: [payload] };
  }
}

/** A reply before encoding: its header fields and payload parts. Sockets encode it; local callers take it as is. */
export interface Reply {
  header: FrameHeader;
  parts: Buffer[];
  /** A buffer of the read pool among the parts: a socket gives it back once the reply is written (local callers own it). */
  recycle?: Buffer;
}

/** The parts of a reply without payload; never changed. */
const NO_PARTS: Buffer[] = [];

function replyHeader(request: FrameHeader, fields: Partial<FrameHeader> = {}): FrameHeader {
  return { ...request, op: request.op | REPLY_BIT, status: 0, payloadBytes: 0, ...fields };
}

/** A READ reply: a descriptor per block, then the data of the DATA blocks back to back. */
function readReply(h: FrameHeader, rangeData: Buffer, versions: { checksums: Uint32Array; states: Uint8Array; epochs: ArrayLike<number>; seqs: ArrayLike<number>; stamps: ArrayLike<number> }): Reply {
  const descriptors = encodeReadDescriptors(versions, h.countBlocks);
  let dataBlocks = 0;
  for (let i = 0; i < h.countBlocks; i++) if (versions.states[i] === BlockState.DATA) dataBlocks++;
  if (dataBlocks === h.countBlocks) {
    // The engine's read buffer goes out as is; the socket path gives it back once written.
    return { header: replyHeader(h, { payloadBytes: descriptors.length + rangeData.length }), parts: [descriptors, rangeData], recycle: rangeData };
  }
  const data = Buffer.allocUnsafe(dataBlocks * BLOCK_SIZE_BYTES);
  let at = 0;
  for (let i = 0; i < h.countBlocks; i++) {
    if (versions.states[i] !== BlockState.DATA) continue;
    rangeData.copy(data, at, i * BLOCK_SIZE_BYTES, (i + 1) * BLOCK_SIZE_BYTES);
    at += BLOCK_SIZE_BYTES;
  }
  giveBack(rangeData);
  return { header: replyHeader(h, { payloadBytes: descriptors.length + data.length }), parts: [descriptors, data] };
}

/** Per-block arrays for #readNow, reused: each is encoded into the reply before the next read. */
let headVersions: HeadVersions = newHeadVersions(256);

function newHeadVersions(blocks: number): HeadVersions {
  return { states: new Uint8Array(blocks), checksums: new Uint32Array(blocks), epochs: new Uint32Array(blocks), seqs: new Float64Array(blocks), stamps: new Float64Array(blocks) };
}

function headVersionsScratch(blocks: number): HeadVersions {
  if (headVersions.states.length < blocks) headVersions = newHeadVersions(blocks);
  return headVersions;
}

function errorReply(request: FrameHeader, error: unknown): Reply {
  const shaleError = toShaleError(error);
  const message = Buffer.from(shaleError.message.slice(0, 1000), 'utf8');
  return { header: { ...request, op: request.op | REPLY_BIT, status: ErrorCodes[codeOf(shaleError)].wire, payloadBytes: message.length }, parts: [message] };
}
