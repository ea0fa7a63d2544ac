/**
 * The benchmark's yardsticks for what one Node.js thread can do: an NBD server with no storage
 * logic beyond where a block goes. It speaks just enough of the protocol for fio's nbd engine
 * (libnbd): the fixed newstyle handshake, NBD_OPT_GO / EXPORT_NAME, simple replies, READ, WRITE,
 * FLUSH and DISC. It checksums every 4 KiB of a write with crc32c, as any server that keeps
 * checksums must, and writes replies the way Shale's gateway does: gathered during an event-loop
 * turn and sent with one socket write. Two ways to keep the data:
 *
 * - in place (default): FILE is the export; a write is one `writeSync` at the request's offset,
 *   as nbdkit's file plugin does;
 * - `--log BYTES`: FILE is a log and the export is BYTES long. The writes of one socket read are
 *   one batch: a 4 KiB header block (each block's number and crc32c, what a log needs to be
 *   replayed) and the data blocks, placed at the log's head in free blocks and written with one
 *   `writevSync` per run of adjacent blocks. An in-memory table maps export blocks to log blocks.
 *   Blocks that are still live are skipped when the head wraps, so nothing is ever compacted.
 *   This is the least any log-structured store does per write (DESIGN §4's engine is one).
 *
 * Shale's figures beside these tell Shale's own cost (its layers, its engine) from Node's (the
 * event loop, the socket, one thread for all of it) and from the log's (a log writes every block
 * to a page the page cache has not held since the log last passed there; an in-place file
 * rewrites the pages it holds). Beside nbdkit's, they show what Node.js leaves on the table.
 *
 *   node bench/minimal-nbd.ts FILE unix:PATH | tcp:PORT [--log EXPORT_BYTES]
 */
import { closeSync, fdatasyncSync, fstatSync, openSync, readSync, unlinkSync, writeSync, writevSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { crc32c } from '@node-rs/crc32';

const BLOCK = 4096;
const [file, listen, logFlag, logExportBytes] = process.argv.slice(2);
const logMode = logFlag === '--log';
if (file === undefined || listen === undefined || !/^(unix:.+|tcp:\d+)$/.test(listen) ||
  (logFlag !== undefined && (!logMode || !/^\d+$/.test(logExportBytes ?? '')))) {
  process.stderr.write('usage: node bench/minimal-nbd.ts FILE unix:PATH | tcp:PORT [--log EXPORT_BYTES]\n');
  process.exit(2);
}
const fd = openSync(file, 'r+');

/** Where the export's data lives. Writes may wait in a batch until commit(). */
interface Backing {
  readonly sizeBytes: number;
  /** Takes a write; false when it can't (the request gets EINVAL). */
  write(offset: number, data: Buffer): boolean;
  /** Writes what write() took; the writes taken are answered after it. */
  commit(): void;
  /** The bytes; undefined when it can't read such a range (the request gets EINVAL). */
  read(offset: number, length: number): Buffer | undefined;
}

class InPlace implements Backing {
  readonly sizeBytes = fstatSync(fd).size;

  write(offset: number, data: Buffer): boolean {
    writeSync(fd, data, 0, data.length, offset);
    return true;
  }

  commit(): void {}

  read(offset: number, length: number): Buffer {
    const data = Buffer.allocUnsafe(length);
    readSync(fd, data, 0, length, offset);
    return data;
  }
}

class Log implements Backing {
  readonly sizeBytes: number;
  /** Export block → log block holding it, or -1 (never written: zeros). */
  readonly #where: Int32Array;
  /** Log block → export block whose live copy it holds, or -1 (free). */
  readonly #holds: Int32Array;
  #head = 0;
  #batch: { block: number; data: Buffer }[] = [];

  constructor(sizeBytes: number) {
    this.sizeBytes = sizeBytes;
    const logBlocks = Math.floor(fstatSync(fd).size / BLOCK);
    this.#where = new Int32Array(sizeBytes / BLOCK).fill(-1);
    this.#holds = new Int32Array(logBlocks).fill(-1);
    // Room for every block live at once, plus a batch of the largest requests.
    if (logBlocks < this.#where.length + 2 * (32 << 20) / BLOCK) throw new Error(`${file} is too small for a ${sizeBytes}-byte export`);
  }

  write(offset: number, data: Buffer): boolean {
    if (offset % BLOCK !== 0 || data.length % BLOCK !== 0) return false;
    for (let at = 0; at < data.length; at += BLOCK) this.#batch.push({ block: (offset + at) / BLOCK, data: data.subarray(at, at + BLOCK) });
    return true;
  }

  /** The next free log block at or after the head. */
  #place(): number {
    while (this.#holds[this.#head]! >= 0) this.#head = (this.#head + 1) % this.#holds.length;
    const place = this.#head;
    this.#head = (this.#head + 1) % this.#holds.length;
    return place;
  }

  commit(): void {
    const batch = this.#batch;
    this.#batch = [];
    const perHeader = BLOCK / 8 - 1;
    for (let first = 0; first < batch.length; first += perHeader) {
      const part = batch.slice(first, first + perHeader);
      const header = Buffer.alloc(BLOCK);
      header.writeUInt32LE(part.length, 0);
      const places = [this.#place()];
      const buffers: Buffer[] = [header];
      part.forEach((entry, i) => {
        header.writeUInt32LE(entry.block, 8 + i * 8);
        header.writeUInt32LE(crc32c(entry.data), 12 + i * 8);
        places.push(this.#place());
        buffers.push(entry.data);
      });
      header.writeUInt32LE(crc32c(header.subarray(8)), 4);
      for (let start = 0; start < places.length;) {
        let end = start + 1;
        while (end < places.length && places[end] === places[end - 1]! + 1) end++;
        writevSync(fd, buffers.slice(start, end), places[start]! * BLOCK);
        start = end;
      }
      part.forEach((entry, i) => {
        const old = this.#where[entry.block]!;
        if (old >= 0) this.#holds[old] = -1;
        this.#where[entry.block] = places[i + 1]!;
        this.#holds[places[i + 1]!] = entry.block;
      });
    }
  }

  read(offset: number, length: number): Buffer | undefined {
    if (offset % BLOCK !== 0 || length % BLOCK !== 0) return undefined;
    const data = Buffer.alloc(length);
    const first = offset / BLOCK;
    const count = length / BLOCK;
    for (let i = 0; i < count;) {
      const place = this.#where[first + i]!;
      let run = 1;
      if (place >= 0) while (i + run < count && this.#where[first + i + run] === place + run) run++;
      if (place >= 0) readSync(fd, data, i * BLOCK, run * BLOCK, place * BLOCK);
      i += run;
    }
    return data;
  }
}

const backing: Backing = logMode ? new Log(Number(logExportBytes)) : new InPlace();
const sizeBytes = backing.sizeBytes;

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPT_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const OPT = { EXPORT_NAME: 1, ABORT: 2, INFO: 6, GO: 7 } as const;
const REP_ACK = 1;
const REP_INFO = 3;
const REP_ERR_UNSUP = 0x80000001;
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3 } as const;
const FLAG_HAS_FLAGS = 1 << 0;
const FLAG_SEND_FLUSH = 1 << 2;
const FLAG_CAN_MULTI_CONN = 1 << 8;
const TRANSMISSION_FLAGS = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;
const EMPTY = Buffer.alloc(0);
const EINVAL = 22;
const EIO = 5;

function serve(socket: Socket): void {
  let pending: Buffer = EMPTY;
  /**
   * A write whose payload has not all come yet is gathered here, each chunk copied once, instead
   * of concatenating what has come with every new chunk (a 1 MiB write comes in 64 KiB reads).
   */
  let gathering: Buffer | undefined;
  let gathered = 0;
  /** Set by request() when the write at the end of `pending` needs this many bytes in all. */
  let wanted = 0;
  /** The client's 4 flag bytes come first, then options, then requests. */
  let stage: 'flags' | 'options' | 'requests' = 'flags';
  let noZeroes = false;
  const replies: Buffer[] = [];
  /** Handles of the writes taken in this socket read, answered once the backing commits them. */
  const written: Buffer[] = [];
  let flushQueued = false;

  const flushReplies = (): void => {
    flushQueued = false;
    if (replies.length === 0 || socket.destroyed) return;
    socket.cork();
    for (const reply of replies) socket.write(reply);
    socket.uncork();
    replies.length = 0;
  };
  const reply = (error: number, handle: Buffer, data?: Buffer): void => {
    const header = Buffer.allocUnsafe(16);
    header.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
    header.writeUInt32BE(error, 4);
    handle.copy(header, 8);
    replies.push(header);
    if (data !== undefined) replies.push(data);
    if (!flushQueued) {
      flushQueued = true;
      setImmediate(flushReplies);
    }
  };
  const optionReply = (option: number, type: number, data: Buffer = Buffer.alloc(0)): void => {
    const header = Buffer.allocUnsafe(20);
    header.writeBigUInt64BE(OPT_REPLY_MAGIC, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(type, 12);
    header.writeUInt32BE(data.length, 16);
    socket.write(Buffer.concat([header, data]));
  };
  const exportInfo = (): Buffer => {
    const info = Buffer.alloc(12);
    info.writeUInt16BE(0, 0); // NBD_INFO_EXPORT
    info.writeBigUInt64BE(BigInt(sizeBytes), 2);
    info.writeUInt16BE(TRANSMISSION_FLAGS, 10);
    return info;
  };

  const commitWritten = (): void => {
    if (written.length === 0) return;
    let error = 0;
    try {
      backing.commit();
    } catch {
      error = EIO;
    }
    for (const handle of written) reply(error, handle);
    written.length = 0;
  };

  /** A broken request or option: the connection is closed (the caller reads 0 bytes used). */
  const hangUp = (): number => {
    socket.destroy();
    return 0;
  };

  /** One option from `pending` at `at`; the bytes it used, or 0 when it is not all here yet. */
  const option = (at: number): number => {
    if (pending.length - at < 16) return 0;
    const code = pending.readUInt32BE(at + 8);
    const length = pending.readUInt32BE(at + 12);
    if (pending.readBigUInt64BE(at) !== IHAVEOPT || length > 4096) return hangUp();
    if (pending.length - at < 16 + length) return 0;
    if (code === OPT.EXPORT_NAME) {
      const tail = Buffer.alloc(noZeroes ? 10 : 134);
      tail.writeBigUInt64BE(BigInt(sizeBytes), 0);
      tail.writeUInt16BE(TRANSMISSION_FLAGS, 8);
      socket.write(tail);
      stage = 'requests';
    } else if (code === OPT.GO || code === OPT.INFO) {
      optionReply(code, REP_INFO, exportInfo());
      optionReply(code, REP_ACK);
      if (code === OPT.GO) stage = 'requests';
    } else if (code === OPT.ABORT) {
      optionReply(code, REP_ACK);
      socket.end();
    } else {
      optionReply(code, REP_ERR_UNSUP);
    }
    return 16 + length;
  };

  /** One request from `pending` at `at`; the bytes it used, or 0 when it is not all here yet. */
  const request = (at: number): number => {
    if (pending.length - at < 28) return 0;
    if (pending.readUInt32BE(at) !== REQUEST_MAGIC) return hangUp();
    const type = pending.readUInt16BE(at + 6);
    const handle = pending.subarray(at + 8, at + 16);
    const offset = Number(pending.readBigUInt64BE(at + 16));
    const length = pending.readUInt32BE(at + 24);
    const inRange = offset + length <= sizeBytes && length <= 32 << 20;
    if (type === CMD.WRITE) {
      if (!inRange) return hangUp();
      if (pending.length - at < 28 + length) {
        wanted = 28 + length;
        return 0;
      }
      const data = pending.subarray(at + 28, at + 28 + length);
      if (!logMode) for (let block = 0; block < length; block += BLOCK) crc32c(data.subarray(block, Math.min(length, block + BLOCK)));
      try {
        if (backing.write(offset, data)) written.push(Buffer.from(handle));
        else reply(EINVAL, Buffer.from(handle));
      } catch {
        reply(EIO, Buffer.from(handle));
      }
      return 28 + length;
    }
    if (type === CMD.READ) {
      if (!inRange) reply(EINVAL, Buffer.from(handle));
      else {
        try {
          const data = backing.read(offset, length);
          if (data === undefined) reply(EINVAL, Buffer.from(handle));
          else reply(0, Buffer.from(handle), data);
        } catch {
          reply(EIO, Buffer.from(handle));
        }
      }
    } else if (type === CMD.FLUSH) {
      commitWritten();
      try {
        fdatasyncSync(fd);
        reply(0, Buffer.from(handle));
      } catch {
        reply(EIO, Buffer.from(handle));
      }
    } else if (type === CMD.DISC) {
      commitWritten();
      flushReplies();
      socket.end();
    } else {
      reply(EINVAL, Buffer.from(handle));
    }
    return 28;
  };

  /** Parses what `pending` holds; keeps the rest, or starts gathering a write not all here yet. */
  const parse = (): void => {
    let at = 0;
    for (;;) {
      let used: number;
      if (stage === 'flags') {
        used = pending.length - at < 4 ? 0 : 4;
        if (used > 0) {
          noZeroes = (pending.readUInt32BE(at) & 0b10) !== 0;
          stage = 'options';
        }
      } else {
        used = stage === 'options' ? option(at) : request(at);
      }
      if (used === 0 || socket.destroyed) break;
      at += used;
    }
    const rest = pending.subarray(at);
    pending = EMPTY;
    if (wanted > rest.length) {
      gathering = Buffer.allocUnsafe(wanted);
      gathered = rest.copy(gathering);
    } else if (rest.length > 0) {
      pending = rest;
    }
    wanted = 0;
  };

  socket.on('data', (chunk: Buffer) => {
    if (gathering !== undefined) {
      const taken = chunk.copy(gathering, gathered);
      gathered += taken;
      if (gathered < gathering.length) return;
      pending = gathering;
      gathering = undefined;
      parse();
      chunk = chunk.subarray(taken);
    }
    if (chunk.length > 0) {
      pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk]);
      parse();
    }
    commitWritten();
  });
  socket.on('error', () => socket.destroy());

  const greeting = Buffer.alloc(18);
  greeting.writeBigUInt64BE(NBDMAGIC, 0);
  greeting.writeBigUInt64BE(IHAVEOPT, 8);
  greeting.writeUInt16BE(0b11, 16); // FIXED_NEWSTYLE | NO_ZEROES
  socket.write(greeting);
}

const server = createServer({ noDelay: true }, serve);
if (listen.startsWith('unix:')) {
  const path = listen.slice('unix:'.length);
  try {
    unlinkSync(path);
  } catch {
    // No stale socket to remove.
  }
  server.listen(path);
} else {
  server.listen(Number(listen.slice('tcp:'.length)), '127.0.0.1');
}
server.on('listening', () => process.stdout.write(`minimal NBD server on ${listen}, serving ${file}\n`));
for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  process.on(signal, () => {
    server.close();
    closeSync(fd);
    process.exit(0);
  });
}
