/**
 * The NBD server driven byte by byte with NbdSimpleClient over real sockets on 127.0.0.1:
 * negotiation, every command, every refusal, concurrency, back-pressure, isolation, shutdown.
 * Tests with real clients (qemu, nbdinfo, nbdcopy, fio, libnbd) are in clients.test.ts.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import fc from 'fast-check';
import { describe, test } from 'node:test';
import type { TestContext } from 'node:test';
import { nodeEnv } from '../env/node/node-env.ts';
import { NbdErrno, ShaleError } from '../lib/errors.ts';
import {
  NBD_REPLY_FLAG_DONE,
  NbdBlockStatusFlag,
  NbdClientFlag,
  NbdCommand,
  NbdCommandFlag,
  NbdInfo,
  NbdOption,
  NbdReply,
  NbdStructuredReplyType,
  NbdTransmissionFlag,
  decodeServerEntry,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOptionRequest,
  encodeRequestHeader,
} from '../proto/nbd.ts';
import { MemoryExport, MemoryExportProvider } from './memory-export.ts';
import type { MemoryOperation } from './memory-export.ts';
import type { NbdExport, NbdExtentStatus, NbdReadPiece } from './server.ts';
import { startNbdServer } from './server.ts';
import type { NbdServer, NbdServerOptions } from './server.ts';
import { allWithin, NbdSimpleClient } from './simple-client.ts';

const MiB = 1024 * 1024;

interface Served {
  readonly server: NbdServer;
  readonly logs: string[];
  connect(clientFlags?: number): Promise<NbdSimpleClient>;
  /** Connects and enters transmission on `name` with NBD_OPT_GO. */
  open(name: string): Promise<NbdSimpleClient>;
}

async function serve(t: TestContext, exports: MemoryExport[], options: Partial<NbdServerOptions> = {}): Promise<Served> {
  const logs: string[] = [];
  const server = await startNbdServer(nodeEnv, {
    listen: '127.0.0.1:0',
    provider: new MemoryExportProvider(exports),
    log: (message) => logs.push(message),
    ...options,
  });
  t.after(() => server.close());
  const connect = async (clientFlags?: number): Promise<NbdSimpleClient> => {
    const client = await NbdSimpleClient.connect(nodeEnv, server.address, clientFlags);
    t.after(() => client.destroy());
    return client;
  };
  return {
    server,
    logs,
    connect,
    open: async (name) => {
      const client = await connect();
      await client.go(name);
      return client;
    },
  };
}

/** A latch tests open to let held operations go on. */
function latch(): { readonly opened: Promise<void>; open(): void } {
  let open!: () => void;
  const opened = new Promise<void>((resolve) => {
    open = resolve;
  });
  return { opened, open };
}

async function waitFor(what: string, condition: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

function patterned(lengthBytes: number, seed: number): Buffer {
  const bytes = Buffer.allocUnsafe(lengthBytes);
  for (let index = 0; index < lengthBytes; index++) bytes[index] = (index * 31 + seed * 7) & 0xff;
  return bytes;
}

describe('handshake', () => {
  test('greets with FIXED_NEWSTYLE | NO_ZEROES, and GO returns size, flags and block sizes', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: 3 * MiB + 512, description: 'a disk' });
    const { connect } = await serve(t, [disk]);
    const client = await connect();
    assert.equal(client.handshakeFlags, 3);
    const infos = await client.go('disk', [NbdInfo.NAME, NbdInfo.DESCRIPTION, NbdInfo.BLOCK_SIZE]);
    assert.equal(client.sizeBytes, 3 * MiB + 512);
    const expectedFlags = NbdTransmissionFlag.HAS_FLAGS | NbdTransmissionFlag.SEND_FLUSH | NbdTransmissionFlag.SEND_FUA
      | NbdTransmissionFlag.SEND_TRIM | NbdTransmissionFlag.SEND_WRITE_ZEROES | NbdTransmissionFlag.CAN_MULTI_CONN
      | NbdTransmissionFlag.SEND_FAST_ZERO;
    assert.equal(client.transmissionFlags, expectedFlags);
    assert.deepEqual(infos.filter((info) => info.type !== NbdInfo.EXPORT), [
      { type: NbdInfo.BLOCK_SIZE, sizes: { minimumBytes: 1, preferredBytes: 4096, maximumPayloadBytes: 32 * MiB } },
      { type: NbdInfo.NAME, name: 'disk' },
      { type: NbdInfo.DESCRIPTION, description: 'a disk' },
    ]);
    await client.disconnect();
  });

  test('INFO answers without entering transmission, then GO does', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    const { connect } = await serve(t, [disk]);
    const client = await connect();
    const infos = await client.go('disk', [], true);
    assert.ok(infos.some((info) => 'sizeBytes' in info && info.sizeBytes === MiB));
    assert.equal(client.sizeBytes, 0, 'INFO does not enter transmission');
    await client.go('disk');
    assert.equal((await client.read(0, 16)).error, 0);
    await client.disconnect();
  });

  test('an unknown export or the empty name gets NBD_REP_ERR_UNKNOWN, and the client may try again', async (t) => {
    const { connect, logs } = await serve(t, [new MemoryExport({ name: 'disk', sizeBytes: MiB })]);
    const client = await connect();
    await assert.rejects(client.go('nope'), (error: unknown) => error instanceof ShaleError && error.code === 'NOT_FOUND' && /nope/.test(error.message));
    await assert.rejects(client.go(''), { code: 'NOT_FOUND' });
    await assert.rejects(client.go('nope', [], true), { code: 'NOT_FOUND' });
    await client.go('disk');
    assert.equal((await client.read(0, 1)).error, 0);
    assert.ok(logs.some((line) => line.includes('refused export "nope"')), logs.join('\n'));
  });

  test('LIST returns every export with its description; LIST with data is NBD_REP_ERR_INVALID', async (t) => {
    const { connect } = await serve(t, [
      new MemoryExport({ name: 'a', sizeBytes: 512, description: 'first' }),
      new MemoryExport({ name: 'b@snap', sizeBytes: 512, readOnly: true }),
    ]);
    const client = await connect();
    const replies = await client.option(NbdOption.LIST);
    assert.deepEqual(replies.map((reply) => reply.replyType), [NbdReply.SERVER, NbdReply.SERVER, NbdReply.ACK]);
    assert.deepEqual(replies.slice(0, 2).map((reply) => decodeServerEntry(reply.data)), [
      { name: 'a', description: 'first' },
      { name: 'b@snap', description: '' },
    ]);
    const invalid = await client.option(NbdOption.LIST, Buffer.from('x'));
    assert.equal(invalid.at(-1)!.replyType, NbdReply.ERR_INVALID);
  });

  test('unsupported and unknown options get NBD_REP_ERR_UNSUP; malformed GO gets NBD_REP_ERR_INVALID', async (t) => {
    const { connect } = await serve(t, [new MemoryExport({ name: 'disk', sizeBytes: 4096 })]);
    const client = await connect();
    for (const option of [NbdOption.EXTENDED_HEADERS, NbdOption.PEEK_EXPORT, 999, 0xffffffff]) {
      const replies = await client.option(option);
      assert.deepEqual(replies.map((reply) => reply.replyType), [NbdReply.ERR_UNSUP], `option ${option}`);
      assert.match(replies[0]!.data.toString(), /not supported/);
    }
    const malformed = await client.option(NbdOption.GO, Buffer.from([0, 0, 0, 9, 1]));
    assert.equal(malformed.at(-1)!.replyType, NbdReply.ERR_INVALID);
    await client.go('disk');
    await client.disconnect();
  });

  test('an option with too much data is skipped and answered NBD_REP_ERR_TOO_BIG; the handshake goes on', async (t) => {
    const { connect } = await serve(t, [new MemoryExport({ name: 'disk', sizeBytes: 4096 })]);
    const client = await connect();
    const replies = await client.option(NbdOption.INFO, Buffer.alloc(200 * 1024, 0x41));
    assert.deepEqual(replies.map((reply) => reply.replyType), [NbdReply.ERR_TOO_BIG]);
    await client.go('disk');
    assert.equal((await client.read(0, 4096)).error, 0);
  });

  test('ABORT is acknowledged and the server ends the connection', async (t) => {
    const { connect, logs } = await serve(t, [new MemoryExport({ name: 'disk', sizeBytes: 4096 })]);
    const client = await connect();
    const replies = await client.option(NbdOption.ABORT);
    assert.deepEqual(replies.map((reply) => reply.replyType), [NbdReply.ACK]);
    await client.closed;
    assert.deepEqual(logs, []);
  });

  test('EXPORT_NAME enters transmission, with or without the 124 zeroes', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: 8192 });
    const { connect } = await serve(t, [disk]);
    const noZeroes = await connect();
    await noZeroes.exportName('disk', true);
    assert.equal(noZeroes.sizeBytes, 8192);
    assert.equal((await noZeroes.write(0, Buffer.alloc(10, 3))).error, 0);
    const withZeroes = await connect(NbdClientFlag.FIXED_NEWSTYLE);
    await withZeroes.exportName('disk', false);
    assert.deepEqual((await withZeroes.read(0, 10)).data, Buffer.alloc(10, 3));
    await Promise.all([noZeroes.disconnect(), withZeroes.disconnect()]);
  });

  test('EXPORT_NAME of an unknown export closes the connection (it cannot answer an error) and logs it once', async (t) => {
    const { connect, logs } = await serve(t, [new MemoryExport({ name: 'disk', sizeBytes: 4096 })]);
    const client = await connect();
    await assert.rejects(client.exportName('missing'));
    await client.closed;
    await waitFor('the log line', () => logs.length > 0);
    assert.equal(logs.length, 1);
    assert.match(logs[0]!, /refused export "missing"/);
  });

  test('unknown client flags, a bad option magic, or a silent client close that connection only', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: 4096 });
    const { connect, open, logs } = await serve(t, [disk], { handshakeTimeoutMs: 300 });
    const healthy = await open('disk');

    const badFlags = await connect(0x80 | NbdClientFlag.FIXED_NEWSTYLE);
    await badFlags.closed;

    const badMagic = await connect();
    badMagic.sendRaw(Buffer.from('IHAVEOPU\0\0\0\x07\0\0\0\0', 'latin1'));
    await badMagic.closed;

    const silent = await connect();
    await silent.closed;

    assert.equal((await healthy.write(0, Buffer.alloc(4096, 9))).error, 0);
    assert.deepEqual((await healthy.read(0, 4096)).data, Buffer.alloc(4096, 9));
    await waitFor('three log lines', () => logs.length >= 3);
    assert.equal(logs.length, 3, logs.join('\n'));
    assert.ok(logs.some((line) => /client flags 0x81/.test(line)));
    assert.ok(logs.some((line) => /bad option magic/.test(line)));
    assert.ok(logs.some((line) => /handshake not completed within 300 ms/.test(line)));
  });

  test('too many options close the connection', async (t) => {
    const { connect, logs } = await serve(t, [], { optionsPerConnectionMax: 5 });
    const client = await connect();
    for (let index = 0; index < 5; index++) await client.option(NbdOption.EXTENDED_HEADERS);
    await assert.rejects(client.option(NbdOption.EXTENDED_HEADERS));
    await client.closed;
    assert.match(logs.join('\n'), /more than 5 options/);
  });

  test('connections beyond maxConnections are refused and logged', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: 4096 });
    const { server, open, logs } = await serve(t, [disk], { maxConnections: 2 });
    const first = await open('disk');
    const second = await open('disk');
    await assert.rejects(NbdSimpleClient.connect(nodeEnv, server.address));
    assert.match(logs.join('\n'), /refused connection: 2 connections already open/);
    await first.disconnect();
    await waitFor('the slot to free', () => server.connectionCount() === 1);
    const third = await open('disk');
    assert.equal((await third.read(0, 1)).error, 0);
    await Promise.all([second.disconnect(), third.disconnect()]);
  });
});

describe('transmission', () => {
  test('READ, WRITE, FUA, FLUSH, TRIM and WRITE_ZEROES reach the export with their flags', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: 4 * MiB });
    const { open } = await serve(t, [disk]);
    const client = await open('disk');
    const data = patterned(MiB, 1);
    assert.equal((await client.write(4096, data)).error, 0);
    assert.equal((await client.write(0, Buffer.alloc(512, 7), NbdCommandFlag.FUA)).error, 0);
    assert.equal((await client.request(NbdCommand.FLUSH)).error, 0);
    assert.deepEqual((await client.read(4096, MiB)).data, data);
    assert.equal((await client.request(NbdCommand.TRIM, { offsetBytes: 4096, lengthBytes: 4096, flags: NbdCommandFlag.FUA })).error, 0);
    assert.equal((await client.request(NbdCommand.WRITE_ZEROES, { offsetBytes: 8192, lengthBytes: 4096, flags: NbdCommandFlag.NO_HOLE })).error, 0);
    assert.equal((await client.request(NbdCommand.WRITE_ZEROES, { offsetBytes: 12288, lengthBytes: 4096 })).error, 0);
    const after = (await client.read(0, 4096 + 3 * 4096)).data!;
    assert.deepEqual(after.subarray(0, 512), Buffer.alloc(512, 7));
    assert.deepEqual(after.subarray(4096), Buffer.alloc(3 * 4096));
    assert.deepEqual((await client.read(16384, 4096)).data, data.subarray(12288, 16384));
    assert.deepEqual(
      { writes: disk.counters.writes, fuaWrites: disk.counters.fuaWrites, flushes: disk.counters.flushes, trims: disk.counters.trims, fuaTrims: disk.counters.fuaTrims, writeZeroes: disk.counters.writeZeroes, noHole: disk.counters.noHoleWriteZeroes },
      { writes: 2, fuaWrites: 1, flushes: 1, trims: 1, fuaTrims: 1, writeZeroes: 2, noHole: 1 },
    );
    await client.disconnect();
  });

  test('trim and write zeroes may cover more than the maximum payload', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: 80 * MiB });
    const { open } = await serve(t, [disk]);
    const client = await open('disk');
    assert.equal((await client.request(NbdCommand.WRITE_ZEROES, { offsetBytes: 0, lengthBytes: 80 * MiB })).error, 0);
    assert.equal((await client.request(NbdCommand.TRIM, { offsetBytes: 0, lengthBytes: 80 * MiB })).error, 0);
  });

  test('zero-length requests succeed without touching the export', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: 4096 });
    const { open } = await serve(t, [disk]);
    const client = await open('disk');
    assert.deepEqual(await client.read(4096, 0), { error: 0, data: undefined });
    assert.equal((await client.write(100, Buffer.alloc(0))).error, 0);
    assert.equal((await client.request(NbdCommand.TRIM, { offsetBytes: 0, lengthBytes: 0 })).error, 0);
    assert.equal(disk.counters.reads + disk.counters.writes + disk.counters.trims, 0);
    assert.equal((await client.read(0, 8)).error, 0, 'the stream is still in step');
  });

  test('requests past the end: EINVAL for read and trim, ENOSPC for write and write zeroes; the connection keeps working', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    const { open, logs } = await serve(t, [disk]);
    const client = await open('disk');
    assert.equal((await client.read(MiB - 512, 1024)).error, NbdErrno.EINVAL);
    assert.equal((await client.read(MiB + 1, 0)).error, NbdErrno.EINVAL);
    assert.equal((await client.read(2 ** 60, 512)).error, NbdErrno.EINVAL);
    assert.equal((await client.request(NbdCommand.TRIM, { offsetBytes: MiB, lengthBytes: 1 })).error, NbdErrno.EINVAL);
    assert.equal((await client.write(MiB - 10, Buffer.alloc(20))).error, NbdErrno.ENOSPC);
    assert.equal((await client.request(NbdCommand.WRITE_ZEROES, { offsetBytes: 0, lengthBytes: MiB + 1 })).error, NbdErrno.ENOSPC);
    assert.equal((await client.write(MiB - 10, Buffer.alloc(10, 5))).error, 0);
    assert.deepEqual((await client.read(MiB - 10, 10)).data, Buffer.alloc(10, 5));
    assert.equal(disk.counters.reads, 1, 'refused requests never reach the export');
    await client.disconnect();
    await waitFor('the summary line', () => logs.some((line) => /6 requests were refused or failed/.test(line)));
    assert.equal(logs.filter((line) => /refused NBD_CMD_READ/.test(line)).length, 1, 'logged once');
    assert.equal(logs.length, 2, logs.join('\n'));
  });

  test('a read-only export answers EPERM to write, trim and write zeroes, and serves reads', async (t) => {
    const snapshot = new MemoryExport({ name: 'vol@snap', sizeBytes: 8192, readOnly: true });
    snapshot.data.fill(0x5a);
    const { open } = await serve(t, [snapshot]);
    const client = await open('vol@snap');
    assert.ok((client.transmissionFlags & NbdTransmissionFlag.READ_ONLY) !== 0);
    assert.equal((await client.write(0, Buffer.alloc(512))).error, NbdErrno.EPERM);
    assert.equal((await client.write(0, Buffer.alloc(512), NbdCommandFlag.FUA)).error, NbdErrno.EPERM);
    assert.equal((await client.request(NbdCommand.TRIM, { lengthBytes: 512 })).error, NbdErrno.EPERM);
    assert.equal((await client.request(NbdCommand.WRITE_ZEROES, { lengthBytes: 512 })).error, NbdErrno.EPERM);
    assert.equal((await client.request(NbdCommand.FLUSH)).error, 0);
    assert.deepEqual((await client.read(0, 8192)).data, Buffer.alloc(8192, 0x5a));
  });

  test('unknown commands and flags not valid for a command get EINVAL; a write payload is still consumed', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: 8192 });
    const { open } = await serve(t, [disk]);
    const client = await open('disk');
    assert.equal((await client.request(NbdCommand.CACHE, { lengthBytes: 512 })).error, NbdErrno.EINVAL);
    assert.equal((await client.request(NbdCommand.BLOCK_STATUS, { lengthBytes: 512 })).error, NbdErrno.EINVAL, 'no meta context was selected');
    assert.equal((await client.request(200)).error, NbdErrno.EINVAL);
    assert.equal((await client.read(0, 512, NbdCommandFlag.DF)).error, NbdErrno.EINVAL, 'DF needs structured replies');
    assert.equal((await client.read(0, 512, NbdCommandFlag.REQ_ONE)).error, NbdErrno.EINVAL);
    assert.equal((await client.write(0, Buffer.alloc(512, 1), NbdCommandFlag.NO_HOLE)).error, NbdErrno.EINVAL);
    assert.equal((await client.write(0, Buffer.alloc(512, 1), NbdCommandFlag.FAST_ZERO)).error, NbdErrno.EINVAL);
    assert.equal((await client.request(NbdCommand.FLUSH, { flags: 0x8000 })).error, NbdErrno.EINVAL);
    assert.equal((await client.read(0, 512, NbdCommandFlag.FUA)).error, 0, 'FUA is accepted on every command');
    assert.deepEqual((await client.read(0, 512)).data, Buffer.alloc(512), 'the refused write changed nothing');
    assert.equal(disk.counters.writes, 0);
  });

  test('a read above the maximum payload is EINVAL; an oversized write is skipped and EINVAL; the stream stays in step', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: 64 * MiB });
    const { open } = await serve(t, [disk]);
    const client = await open('disk');
    assert.equal((await client.read(0, 32 * MiB + 1)).error, NbdErrno.EINVAL);
    assert.equal((await client.write(0, Buffer.alloc(32 * MiB + 4096, 0xee))).error, NbdErrno.EINVAL);
    assert.equal(disk.counters.writes, 0);
    assert.equal((await client.write(0, Buffer.alloc(32 * MiB, 0x11))).error, 0, 'the maximum itself is fine');
    assert.deepEqual((await client.read(32 * MiB - 4, 4)).data, Buffer.alloc(4, 0x11));
    await client.disconnect();
  });

  test('a write beyond what the server skips closes that connection only', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    const { open, logs } = await serve(t, [disk], { payloadBytesMax: 64 * 1024, oversizedPayloadSkipBytesMax: 128 * 1024 });
    const other = await open('disk');
    const client = await open('disk');
    client.sendRaw(encodeRequestHeader({ flags: 0, type: NbdCommand.WRITE, cookieHigh: 0, cookieLow: 1, offsetBytes: 0, lengthBytes: 128 * 1024 + 1 }));
    await client.closed;
    assert.match(logs.join('\n'), /beyond the 131072 bytes the server skips/);
    assert.equal((await other.read(0, 64 * 1024)).error, 0);
  });

  test('garbage in transmission closes that connection; a concurrent one carries on', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    const { open, logs } = await serve(t, [disk]);
    const good = await open('disk');
    const bad = await open('disk');
    const pending = Array.from({ length: 32 }, (_, index) => good.write(index * 4096, patterned(4096, index)));
    bad.sendRaw(Buffer.from('GET / HTTP/1.1\r\nHost: example\r\n\r\n'));
    await bad.closed;
    const replies = await Promise.all(pending);
    assert.ok(replies.every((reply) => reply.error === 0));
    for (let index = 0; index < 32; index++) assert.deepEqual((await good.read(index * 4096, 4096)).data, patterned(4096, index));
    assert.equal(logs.length, 1, logs.join('\n'));
    assert.match(logs[0]!, /closing connection: bad request magic 0x47455420/);
    await good.disconnect();
  });

  test('export failures map through the error table: NO_SPACE → ENOSPC, READ_ONLY → EPERM, anything else → EIO', async (t) => {
    const failures = new Map<number, unknown>([
      [0, new ShaleError('NO_SPACE', 'disk full')],
      [4096, new ShaleError('READ_ONLY', 'fenced snapshot')],
      [8192, new ShaleError('OUT_OF_RANGE', 'beyond')],
      [12288, new ShaleError('SHUTTING_DOWN', 'stopping')],
      [16384, new Error('a bug')],
      [20480, 'a string'],
    ]);
    const disk = new MemoryExport({
      name: 'disk',
      sizeBytes: MiB,
      beforeOperation: (_operation, offsetBytes) => {
        if (failures.has(offsetBytes)) throw failures.get(offsetBytes);
      },
    });
    const { open, logs } = await serve(t, [disk]);
    const client = await open('disk');
    const errors = await Promise.all([0, 4096, 8192, 12288, 16384, 20480, 24576].map(async (offset) => (await client.write(offset, Buffer.alloc(512))).error));
    assert.deepEqual(errors, [NbdErrno.ENOSPC, NbdErrno.EPERM, NbdErrno.EINVAL, NbdErrno.ESHUTDOWN, NbdErrno.EIO, NbdErrno.EIO, 0]);
    assert.equal((await client.read(16384, 512)).error, NbdErrno.EIO);
    assert.ok(logs.some((line) => /failed: a bug/.test(line)), 'bugs are logged');
  });
});

describe('concurrency and limits', () => {
  test('requests run concurrently and replies come back out of order, each with its cookie', async (t) => {
    const held = new Map<number, ReturnType<typeof latch>>();
    const disk = new MemoryExport({
      name: 'disk',
      sizeBytes: MiB,
      beforeOperation: async (operation, offsetBytes) => {
        if (operation !== 'read') return;
        const gate = latch();
        held.set(offsetBytes, gate);
        await gate.opened;
      },
    });
    for (let index = 0; index < 16; index++) patterned(4096, index).copy(disk.data, index * 4096);
    const { open } = await serve(t, [disk]);
    const client = await open('disk');
    const order: number[] = [];
    const replies = Array.from({ length: 16 }, (_, index) => client.read(index * 4096, 4096).then((reply) => {
      order.push(index);
      return reply;
    }));
    await waitFor('all 16 reads to run at once', () => held.size === 16);
    assert.equal(disk.counters.runningMax, 16);
    for (let index = 15; index >= 0; index--) {
      held.get(index * 4096)!.open();
      await sleep(1);
    }
    const results = await Promise.all(replies);
    results.forEach((reply, index) => assert.deepEqual(reply.data, patterned(4096, index)));
    assert.deepEqual(order, Array.from({ length: 16 }, (_, index) => 15 - index));
  });

  test('at most inFlightRequestsMax operations run per connection; the rest wait in the socket', async (t) => {
    const gate = latch();
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB, beforeOperation: () => gate.opened });
    const { open } = await serve(t, [disk], { inFlightRequestsMax: 4 });
    const client = await open('disk');
    const replies = Array.from({ length: 40 }, (_, index) => client.write(index * 1024, Buffer.alloc(1024, index)));
    await waitFor('four writes to run', () => disk.counters.running === 4);
    await sleep(50);
    assert.equal(disk.counters.running, 4);
    gate.open();
    assert.ok((await Promise.all(replies)).every((reply) => reply.error === 0));
    assert.equal(disk.counters.runningMax, 4);
    assert.equal(disk.counters.writes, 40);
  });

  test('a write whose header and first bytes were read while the connection was full, and the rest after, lands whole', async (t) => {
    // The pattern of nbd-tester-client's write test: while the one operation allowed runs, the
    // server has read the next write's header and part of its payload; it frames that write only
    // once the first one ends, after it already chose where the next socket read goes.
    const gate = latch();
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB, beforeOperation: (operation: MemoryOperation) => (operation === 'write' ? gate.opened : undefined) });
    const { open, logs } = await serve(t, [disk], { inFlightRequestsMax: 1 });
    const client = await open('disk');
    const first = client.write(0, Buffer.alloc(1024, 0x11));
    const second = client.prepare(NbdCommand.WRITE, { offsetBytes: 4096, payload: Buffer.alloc(1024, 0x22) });
    client.sendRaw(second.bytes.subarray(0, 300));
    await waitFor('the first write to run', () => disk.counters.running === 1);
    await sleep(20);
    client.sendRaw(second.bytes.subarray(300));
    await sleep(20);
    gate.open();
    const third = client.write(8192, Buffer.alloc(1024, 0x33));
    // Bytes framed in the wrong place leave a write waiting for ever.
    const replies = await allWithin(nodeEnv.clock, [first, second.reply, third], 5000, 'the three writes\' replies');
    assert.deepEqual(replies.map((reply) => reply.error), [0, 0, 0]);
    assert.deepEqual(disk.data.subarray(4096, 5120), Buffer.alloc(1024, 0x22));
    assert.deepEqual(disk.data.subarray(8192, 9216), Buffer.alloc(1024, 0x33));
    assert.doesNotMatch(logs.join('\n'), /bad request magic/);
  });

  test('writes sent as one stream cut at random points, into a connection that fills up and operations that take random time, all land whole', async () => {
    // Payloads from 1 byte to twice the server's 64 KiB read buffer; the stream is cut at up to 40
    // points anywhere, and its pieces arrive a millisecond apart at times; the server allows 1 to 4
    // operations at once, so it stops and starts reading at any point of a request.
    await fc.assert(fc.asyncProperty(
      fc.array(fc.record({ lengthBytes: fc.oneof(fc.integer({ min: 1, max: 5000 }), fc.integer({ min: 60_000, max: 140_000 })), fua: fc.boolean() }), { minLength: 1, maxLength: 16 }),
      fc.array(fc.nat(), { maxLength: 40 }),
      fc.array(fc.nat(2), { minLength: 1, maxLength: 6 }),
      fc.integer({ min: 1, max: 4 }),
      async (writes, cuts, delaysMs, inFlightRequestsMax) => {
        let operation = 0;
        const disk = new MemoryExport({
          name: 'disk', sizeBytes: 4 * MiB,
          beforeOperation: () => {
            const delayMs = delaysMs[operation++ % delaysMs.length]!;
            return delayMs === 0 ? undefined : sleep(delayMs);
          },
        });
        const logs: string[] = [];
        const server = await startNbdServer(nodeEnv, { listen: '127.0.0.1:0', provider: new MemoryExportProvider([disk]), log: (message) => logs.push(message), inFlightRequestsMax });
        const client = await NbdSimpleClient.connect(nodeEnv, server.address);
        try {
          await client.go('disk');
          let offsetBytes = 0;
          const sent = writes.map((write, index) => {
            const payload = Buffer.alloc(write.lengthBytes, (index * 37 + 1) & 0xff);
            const prepared = client.prepare(NbdCommand.WRITE, { offsetBytes, payload, flags: write.fua ? NbdCommandFlag.FUA : 0 });
            offsetBytes += write.lengthBytes;
            return { ...prepared, payload };
          });
          await client.sendInPieces(Buffer.concat(sent.map((write) => write.bytes)), cuts,
            (piece) => (piece % 3 === 2 ? sleep(1) : new Promise((resolve) => setImmediate(resolve))));
          // A write whose bytes went astray never completes.
          const replies = await allWithin(nodeEnv.clock, sent.map((write) => write.reply), 5000, 'the writes\' replies');
          assert.deepEqual(replies.map((reply) => reply.error), writes.map(() => 0));
          let at = 0;
          for (const write of sent) {
            assert.ok(disk.data.subarray(at, at + write.payload.length).equals(write.payload), `the write at ${at} landed whole`);
            at += write.payload.length;
          }
          assert.doesNotMatch(logs.join('\n'), /bad request magic|closing connection/);
        } finally {
          client.destroy();
          await server.close();
        }
      }), { numRuns: 25, endOnFailure: true }); // a failure is a 5 s stall: report the first, do not shrink
  });

  test('a client that does not read its replies stops the server reading its requests', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: 64 * MiB });
    const { open } = await serve(t, [disk], { inFlightBytesMax: 4 * MiB });
    const client = await open('disk');
    client.pauseReading();
    const replies = Array.from({ length: 64 }, (_, index) => client.read(index * MiB, MiB));
    await sleep(300);
    assert.ok(disk.counters.reads < 40, `the server read ${disk.counters.reads} MiB for a client that reads nothing`);
    client.resumeReading();
    assert.ok((await Promise.all(replies)).every((reply) => reply.error === 0 && reply.data!.length === MiB));
    assert.equal(disk.counters.reads, 64);
  });

  test('DISC: in-flight requests complete and are answered before the server closes', async (t) => {
    const gate = latch();
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB, beforeOperation: (operation: MemoryOperation) => (operation === 'read' ? gate.opened : undefined) });
    disk.data.fill(0x33, 0, 4096);
    const { open } = await serve(t, [disk]);
    const client = await open('disk');
    const read = client.read(0, 4096);
    const disconnected = client.disconnect();
    await waitFor('the read to run', () => disk.counters.running === 1);
    await sleep(20);
    assert.equal(client.isClosed, false, 'the server waits for the read');
    gate.open();
    assert.deepEqual((await read).data, Buffer.alloc(4096, 0x33));
    await disconnected;
    await waitFor('the release', () => disk.counters.releases === 1);
  });

  test('a client that vanishes mid-request: the operation completes, the reply is dropped, the export is released after', async (t) => {
    const gate = latch();
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB, beforeOperation: () => gate.opened });
    const { server, open, logs } = await serve(t, [disk]);
    const client = await open('disk');
    const write = client.write(0, Buffer.alloc(4096, 0x77));
    await waitFor('the write to run', () => disk.counters.running === 1);
    client.destroy();
    await assert.rejects(write);
    await sleep(20);
    assert.equal(disk.counters.releases, 0, 'not released under a running operation');
    assert.equal(server.connectionCount(), 1);
    gate.open();
    await waitFor('the release', () => disk.counters.releases === 1);
    assert.equal(server.connectionCount(), 0);
    assert.deepEqual(disk.data.subarray(0, 4096), Buffer.alloc(4096, 0x77), 'the write still landed');
    assert.match(logs.join('\n'), /connection lost.*1 requests in flight/);
  });

  test('connections share one export: released once, when the last one closes; INFO alone releases too', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    const { connect, open } = await serve(t, [disk]);
    const first = await open('disk');
    const second = await open('disk');
    assert.equal((await first.write(0, Buffer.alloc(512, 1))).error, 0);
    assert.equal((await second.request(NbdCommand.FLUSH)).error, 0);
    assert.deepEqual((await second.read(0, 512)).data, Buffer.alloc(512, 1), 'a write on one connection is visible on another');
    await first.disconnect();
    await sleep(20);
    assert.equal(disk.counters.releases, 0);
    await second.disconnect();
    await waitFor('the release', () => disk.counters.releases === 1);
    const info = await connect();
    await info.go('disk', [], true);
    await waitFor('the INFO release', () => disk.counters.releases === 2);
    await info.option(NbdOption.ABORT);
  });

  test('one request stream can carry many requests in a single chunk', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    const { open } = await serve(t, [disk]);
    const client = await open('disk');
    const writes = Array.from({ length: 100 }, (_, index) => client.write(index * 100, Buffer.alloc(100, index)));
    const reads = Array.from({ length: 100 }, (_, index) => client.read(index * 100, 100));
    assert.ok((await Promise.all(writes)).every((reply) => reply.error === 0));
    const data = await Promise.all(reads);
    // Reads were dispatched after the writes of the same chunk; with an in-memory export they see them.
    data.forEach((reply, index) => assert.deepEqual(reply.data, Buffer.alloc(100, index)));
  });
});

describe('shutdown', () => {
  test('close() lets in-flight requests finish and answers them, then closes every connection and releases', async (t) => {
    const gate = latch();
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB, beforeOperation: (operation) => (operation === 'read' ? gate.opened : undefined) });
    const { server, connect, open } = await serve(t, [disk]);
    const busy = await open('disk');
    const idle = await open('disk');
    const negotiating = await connect();
    const read = busy.read(0, 512);
    await waitFor('the read to run', () => disk.counters.running === 1);
    const closing = server.close();
    await negotiating.closed;
    await idle.closed;
    assert.equal(busy.isClosed, false);
    gate.open();
    assert.equal((await read).error, 0);
    await closing;
    await busy.closed;
    assert.equal(disk.counters.releases, 1);
    await assert.rejects(NbdSimpleClient.connect(nodeEnv, server.address));
  });

  test('close() cuts connections whose operations outlast the grace period', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB, beforeOperation: () => new Promise(() => {}) });
    const { server, open } = await serve(t, [disk], { shutdownGraceMs: 100 });
    const client = await open('disk');
    const read = client.read(0, 512);
    await waitFor('the read to run', () => disk.counters.running === 1);
    const started = Date.now();
    await server.close();
    assert.ok(Date.now() - started < 2000);
    await assert.rejects(read);
  });

  test('bad server options are INVALID_ARGUMENT', async () => {
    const provider = new MemoryExportProvider([]);
    await assert.rejects(startNbdServer(nodeEnv, { listen: '127.0.0.1:0', provider, payloadBytesMax: 64 * MiB }), { code: 'INVALID_ARGUMENT' });
    await assert.rejects(startNbdServer(nodeEnv, { listen: '127.0.0.1:0', provider, inFlightRequestsMax: 0 }), { code: 'INVALID_ARGUMENT' });
    await assert.rejects(startNbdServer(nodeEnv, { listen: '127.0.0.1:0', provider, pollMicros: -1 }), { code: 'INVALID_ARGUMENT' });
    await assert.rejects(startNbdServer(nodeEnv, { listen: '127.0.0.1:0', provider, pollMicros: 1.5 }), { code: 'INVALID_ARGUMENT' });
    await assert.rejects(startNbdServer(nodeEnv, { listen: '127.0.0.1:0', provider, pollMicros: 2_000_000 }), { code: 'INVALID_ARGUMENT' });
  });

  test('with pollMicros, the session busy-polls after every reply and while operations run; without, never', async (t) => {
    for (const pollMicros of [150, 0]) {
      const polls: number[] = [];
      const clock = { ...nodeEnv.clock, pollFor: (durationMs: number) => polls.push(durationMs) };
      const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
      const server = await startNbdServer({ ...nodeEnv, clock }, { listen: '127.0.0.1:0', provider: new MemoryExportProvider([disk]), pollMicros });
      t.after(() => server.close());
      const client = await NbdSimpleClient.connect(nodeEnv, server.address);
      t.after(() => client.destroy());
      await client.go('disk');
      assert.equal((await client.write(0, Buffer.alloc(4096, 7))).error, 0);
      assert.equal((await client.read(0, 4096)).error, 0);
      await client.disconnect();
      if (pollMicros === 0) assert.ok(polls.every((ms) => ms === 0), `polls ${polls.join(',')}`);
      else assert.ok(polls.filter((ms) => ms === 0.15).length >= 2, `polls ${polls.join(',')}`);
    }
  });
});

describe('raw bytes', () => {
  test('a handshake and requests sent all at once, split at every byte, are served', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: 4096 });
    disk.data.fill(0x42);
    const { server } = await serve(t, [disk]);
    const connection = await nodeEnv.net.connect(server.address);
    t.after(() => connection.destroy());
    const received: Buffer[] = [];
    connection.onData((chunk) => received.push(chunk));
    const bytes = Buffer.concat([
      encodeClientFlags(NbdClientFlag.FIXED_NEWSTYLE | NbdClientFlag.NO_ZEROES),
      encodeOptionRequest(NbdOption.GO, encodeInfoRequest('disk', [])),
    ]);
    for (const byte of bytes) {
      connection.write(Buffer.from([byte]));
      await sleep(0);
    }
    await waitFor('the GO reply', () => Buffer.concat(received).length >= 18 + 20 + 12 + 20 + 14 + 20);
    received.length = 0;
    connection.write(Buffer.concat([
      encodeRequestHeader({ flags: 0, type: NbdCommand.READ, cookieHigh: 1, cookieLow: 2, offsetBytes: 0, lengthBytes: 8 }),
      encodeRequestHeader({ flags: 0, type: NbdCommand.DISC, cookieHigh: 0, cookieLow: 0, offsetBytes: 0, lengthBytes: 0 }),
    ]));
    await waitFor('the read reply', () => Buffer.concat(received).length >= 24);
    const reply = Buffer.concat(received);
    assert.equal(reply.toString('hex'), '67446698' + '00000000' + '00000001' + '00000002' + '42'.repeat(8));
  });
});

/** Connects, negotiates structured replies (and `base:allocation` on `name` unless told not to), then GO. */
async function openStructured(served: Served, name: string, metaContext = true): Promise<NbdSimpleClient> {
  const client = await served.connect();
  assert.equal(await client.negotiateStructuredReplies(), true);
  if (metaContext) assert.deepEqual(await client.metaContext(name, ['base:allocation']), [{ contextId: 1, name: 'base:allocation' }]);
  await client.go(name);
  return client;
}

const chunkTypes = (reply: { chunks?: readonly { type: number; flags: number }[] }): string[] =>
  (reply.chunks ?? []).map((chunk) => `${chunk.type}${(chunk.flags & NBD_REPLY_FLAG_DONE) !== 0 ? '!' : ''}`);
const DATA = NbdStructuredReplyType.OFFSET_DATA;
const HOLE = NbdStructuredReplyType.OFFSET_HOLE;
const ERROR = NbdStructuredReplyType.ERROR;

describe('structured replies', () => {
  test('reads come back as one data chunk, or as data and hole chunks where the export has holes', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    disk.load(8192, patterned(8192, 3));
    const served = await serve(t, [disk]);
    const client = await openStructured(served, 'disk', false);
    assert.ok((client.transmissionFlags & NbdTransmissionFlag.SEND_DF) !== 0, 'SEND_DF once structured replies are on');
    const data = await client.read(8192, 8192);
    assert.deepEqual(data.data, patterned(8192, 3));
    assert.deepEqual(chunkTypes(data), [`${DATA}!`]);
    const mixed = await client.read(0, 64 * 1024);
    assert.deepEqual(chunkTypes(mixed), [`${HOLE}`, `${DATA}`, `${HOLE}!`]);
    assert.deepEqual(mixed.chunks!.map((chunk) => [chunk.offsetBytes, chunk.lengthBytes]), [[0, 8192], [8192, 8192], [16384, 65536 - 16384]]);
    assert.deepEqual(mixed.data!.subarray(8192, 16384), patterned(8192, 3));
    assert.ok(mixed.data!.subarray(0, 8192).equals(Buffer.alloc(8192)) && mixed.data!.subarray(16384).equals(Buffer.alloc(65536 - 16384)));
    const unfragmented = await client.read(0, 64 * 1024, NbdCommandFlag.DF);
    assert.deepEqual(chunkTypes(unfragmented), [`${DATA}!`], 'DF: one content chunk with the zeroes in it');
    assert.deepEqual(unfragmented.data, mixed.data);
    const hole = await client.read(MiB - 4096, 4096);
    assert.deepEqual(chunkTypes(hole), [`${HOLE}!`]);
    const empty = await client.read(0, 0);
    assert.deepEqual(chunkTypes(empty), [`${NbdStructuredReplyType.NONE}!`], 'a read of nothing is a NONE chunk');
    assert.equal((await client.write(0, Buffer.alloc(10, 1))).chunks, undefined, 'other successes keep the simple reply');
    await client.disconnect();
  });

  test('errors come as error chunks with a message; a read above the maximum is EOVERFLOW', async (t) => {
    const disk = new MemoryExport({
      name: 'disk',
      sizeBytes: MiB,
      beforeOperation: (operation, offsetBytes) => {
        if (offsetBytes === 4096) throw new ShaleError('NO_QUORUM', 'only 1 of 3 replicas answered');
      },
    });
    const served = await serve(t, [disk]);
    const client = await openStructured(served, 'disk');
    const pastEnd = await client.read(MiB - 512, 1024);
    assert.equal(pastEnd.error, NbdErrno.EINVAL);
    assert.deepEqual(chunkTypes(pastEnd), [`${ERROR}!`]);
    assert.match(pastEnd.message!, /1024 bytes at 1048064 go past the end of the export \(1048576 bytes\)/);
    const failed = await client.read(4096, 512);
    assert.equal(failed.error, NbdErrno.EIO);
    assert.match(failed.message!, /NO_QUORUM: only 1 of 3 replicas answered/);
    const write = await client.write(4096, Buffer.alloc(512));
    assert.deepEqual([write.error, chunkTypes(write)], [NbdErrno.EIO, [`${ERROR}!`]]);
    assert.equal((await client.read(0, 32 * MiB + 1)).error, NbdErrno.EOVERFLOW);
    assert.equal((await client.request(NbdCommand.CACHE, { lengthBytes: 1 })).error, NbdErrno.EINVAL);
    assert.equal((await client.read(0, 512)).error, 0, 'the connection carries on');
  });

  test('NBD_OPT_STRUCTURED_REPLY with data is NBD_REP_ERR_INVALID; without it, reads stay simple and DF is refused', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    const served = await serve(t, [disk]);
    const client = await served.connect();
    assert.equal((await client.option(NbdOption.STRUCTURED_REPLY, Buffer.from('x'))).at(-1)!.replyType, NbdReply.ERR_INVALID);
    await client.go('disk');
    assert.equal(client.transmissionFlags & NbdTransmissionFlag.SEND_DF, 0);
    const read = await client.read(0, 4096);
    assert.equal(read.chunks, undefined);
    assert.deepEqual(read.data, Buffer.alloc(4096));
    assert.equal(disk.counters.sparseReads, 0, 'readSparse is for structured replies only');
  });

  test('an export whose readSparse breaks its contract gets EIO, logged, and nothing malformed goes out', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    const broken: NbdExport = {
      name: 'broken', sizeBytes: MiB, readOnly: false,
      read: (offset, length) => disk.read(offset, length),
      readSparse: async (offsetBytes): Promise<NbdReadPiece[]> => [{ offsetBytes, lengthBytes: 100 }, { offsetBytes: offsetBytes + 200, lengthBytes: 100 }],
      write: (offset, data, fua) => disk.write(offset, data, fua),
      flush: () => disk.flush(),
      trim: (offset, length, fua) => disk.trim(offset, length, fua),
      writeZeroes: (offset, length, options) => disk.writeZeroes(offset, length, options),
      blockStatus: async (): Promise<NbdExtentStatus[]> => [{ lengthBytes: 0, hole: true, zero: true }],
      release: async () => {},
    };
    const served = await serve(t, [disk], { provider: { open: async () => broken, list: async () => [] } });
    const client = await openStructured(served, 'broken');
    assert.equal((await client.read(0, 300)).error, NbdErrno.EIO);
    assert.equal((await client.blockStatus(0, 4096)).error, NbdErrno.EIO);
    assert.equal((await client.read(0, 300, NbdCommandFlag.DF)).error, 0, 'DF reads use read()');
    assert.match(served.logs.join('\n'), /bug: export "broken" readSparse returned a piece at 200 where 100 was due/);
    assert.match(served.logs.join('\n'), /bug: export "broken" blockStatus returned an extent of 0 bytes/);
  });
});

describe('meta contexts and block status', () => {
  test('LIST and SET_META_CONTEXT: base:allocation only, other namespaces ignored, structured replies first', async (t) => {
    const served = await serve(t, [new MemoryExport({ name: 'disk', sizeBytes: MiB })]);
    const client = await served.connect();
    await assert.rejects(client.metaContext('disk', ['base:allocation']), (error: unknown) => error instanceof ShaleError && error.details?.replyType === NbdReply.ERR_INVALID);
    await client.negotiateStructuredReplies();
    assert.deepEqual(await client.metaContext('disk', [], true), [{ contextId: 0, name: 'base:allocation' }]);
    assert.deepEqual(await client.metaContext('disk', ['base:'], true), [{ contextId: 0, name: 'base:allocation' }]);
    assert.deepEqual(await client.metaContext('disk', ['qemu:dirty-bitmap:x', 'x-shale:'], true), []);
    assert.deepEqual(await client.metaContext('disk', ['base:'], false), [], 'base: selects nothing');
    assert.deepEqual(await client.metaContext('disk', ['qemu:allocation-depth', 'base:allocation', 'base:nonsense']), [{ contextId: 1, name: 'base:allocation' }]);
    await assert.rejects(client.metaContext('disk', ['allocation']), (error: unknown) => error instanceof ShaleError && error.details?.replyType === NbdReply.ERR_INVALID);
    await assert.rejects(client.metaContext('nope', ['base:allocation']), (error: unknown) => error instanceof ShaleError && error.details?.replyType === NbdReply.ERR_UNKNOWN);
    const malformed = await client.option(NbdOption.SET_META_CONTEXT, encodeMetaContextRequest('disk', ['base:allocation']).subarray(0, 10));
    assert.equal(malformed.at(-1)!.replyType, NbdReply.ERR_INVALID);
    await client.go('disk');
    assert.equal((await client.blockStatus(0, 4096)).error, NbdErrno.EINVAL, 'the failed SET forgot the earlier selection');
  });

  test('BLOCK_STATUS reports holes, data and allocated zeroes as the export tracks them', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    const served = await serve(t, [disk]);
    const client = await openStructured(served, 'disk');
    assert.equal((await client.write(64 * 1024, Buffer.alloc(128 * 1024, 7))).error, 0);
    assert.equal((await client.request(NbdCommand.TRIM, { offsetBytes: 96 * 1024, lengthBytes: 32 * 1024 })).error, 0);
    assert.equal((await client.request(NbdCommand.WRITE_ZEROES, { offsetBytes: 256 * 1024, lengthBytes: 64 * 1024, flags: NbdCommandFlag.NO_HOLE })).error, 0);
    assert.equal((await client.request(NbdCommand.WRITE_ZEROES, { offsetBytes: 128 * 1024, lengthBytes: 16 * 1024 })).error, 0);
    const reply = await client.blockStatus(0, MiB);
    assert.equal(reply.error, 0);
    assert.deepEqual(chunkTypes(reply), [`${NbdStructuredReplyType.BLOCK_STATUS}!`]);
    const hole = NbdBlockStatusFlag.HOLE | NbdBlockStatusFlag.ZERO;
    const KiB = 1024;
    assert.deepEqual(reply.blockStatus!.get(1), [
      { lengthBytes: 64 * KiB, flags: hole },
      { lengthBytes: 32 * KiB, flags: 0 },
      { lengthBytes: 32 * KiB, flags: hole },
      { lengthBytes: 16 * KiB, flags: hole },
      { lengthBytes: 48 * KiB, flags: 0 },
      { lengthBytes: 64 * KiB, flags: hole },
      { lengthBytes: 64 * KiB, flags: NbdBlockStatusFlag.ZERO },
      { lengthBytes: MiB - 320 * KiB, flags: hole },
    ].reduce<{ lengthBytes: number; flags: number }[]>((merged, extent) => {
      // The server merges neighbours with equal flags.
      const last = merged.at(-1);
      if (last?.flags === extent.flags) last.lengthBytes += extent.lengthBytes;
      else merged.push({ ...extent });
      return merged;
    }, []));
    const one = await client.blockStatus(100, 4000, NbdCommandFlag.REQ_ONE);
    assert.deepEqual(one.blockStatus!.get(1), [{ lengthBytes: 4000, flags: hole }], 'REQ_ONE: one extent, no longer than asked');
    const unaligned = await client.blockStatus(65 * KiB + 1, 10);
    assert.deepEqual(unaligned.blockStatus!.get(1), [{ lengthBytes: 10, flags: 0 }]);
    assert.equal((await client.blockStatus(MiB - 10, 11)).error, NbdErrno.EINVAL);
    assert.equal((await client.blockStatus(0, 0)).error, NbdErrno.EINVAL);
    assert.equal((await client.request(NbdCommand.BLOCK_STATUS, { lengthBytes: 512, flags: NbdCommandFlag.NO_HOLE })).error, NbdErrno.EINVAL);
    await client.disconnect();
  });

  test('a block status reply holds at most blockStatusExtentsMax extents; the client asks again for the rest', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    for (let block = 0; block < 16; block += 2) disk.load(block * 4096, Buffer.alloc(4096, 1));
    const served = await serve(t, [disk], { blockStatusExtentsMax: 3 });
    const client = await openStructured(served, 'disk');
    const first = (await client.blockStatus(0, MiB)).blockStatus!.get(1)!;
    assert.deepEqual(first.map((extent) => extent.flags), [0, 3, 0]);
    const covered = first.reduce((sum, extent) => sum + extent.lengthBytes, 0);
    assert.equal(covered, 3 * 4096);
    assert.deepEqual((await client.blockStatus(covered, MiB - covered)).blockStatus!.get(1)![0], { lengthBytes: 4096, flags: 3 });
  });

  test('without blockStatus on the export, the whole range is data; GO on another export than SET leaves BLOCK_STATUS off', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    const plain: NbdExport = {
      name: 'plain', sizeBytes: MiB, readOnly: true,
      read: (offset, length) => disk.read(offset, length),
      write: async () => {}, flush: async () => {}, trim: async () => {}, writeZeroes: async () => {}, release: async () => {},
    };
    const provider = { open: async (name: string) => (name === 'plain' ? plain : disk), list: async () => [] };
    const served = await serve(t, [disk], { provider });
    const client = await openStructured(served, 'plain');
    assert.deepEqual((await client.blockStatus(4096, 3 * MiB / 4)).blockStatus!.get(1), [{ lengthBytes: 3 * MiB / 4, flags: 0 }]);
    const other = await served.connect();
    await other.negotiateStructuredReplies();
    await other.metaContext('plain', ['base:allocation']);
    await other.go('disk');
    assert.equal((await other.blockStatus(0, 4096)).error, NbdErrno.EINVAL);
  });
});

describe('write zeroes, fast zero, block sizes, multi-conn', () => {
  test('FAST_ZERO: ENOTSUP when the export cannot zero fast, leaving the data; NOT_SUPPORTED elsewhere is EINVAL', async (t) => {
    const slow = new MemoryExport({ name: 'slow', sizeBytes: MiB, fastZeroes: false });
    slow.load(0, Buffer.alloc(8192, 9));
    const fast = new MemoryExport({ name: 'fast', sizeBytes: MiB });
    fast.load(0, Buffer.alloc(8192, 9));
    const served = await serve(t, [slow, fast, new MemoryExport({
      name: 'odd', sizeBytes: MiB, beforeOperation: () => {
        throw new ShaleError('NOT_SUPPORTED', 'not here');
      },
    })]);
    const slowClient = await served.open('slow');
    assert.ok((slowClient.transmissionFlags & NbdTransmissionFlag.SEND_FAST_ZERO) !== 0);
    const zero = (client: NbdSimpleClient, flags: number): Promise<number> => client.request(NbdCommand.WRITE_ZEROES, { lengthBytes: 8192, flags }).then((reply) => reply.error);
    assert.equal(await zero(slowClient, NbdCommandFlag.FAST_ZERO), NbdErrno.ENOTSUP);
    assert.deepEqual(slow.data.subarray(0, 8192), Buffer.alloc(8192, 9), 'a refused fast zero changes nothing');
    assert.equal(await zero(slowClient, 0), 0, 'without FAST_ZERO the slow export zeroes');
    assert.deepEqual(slow.data.subarray(0, 8192), Buffer.alloc(8192));
    const fastClient = await served.open('fast');
    assert.equal(await zero(fastClient, NbdCommandFlag.FAST_ZERO | NbdCommandFlag.NO_HOLE), 0);
    assert.deepEqual(fast.data.subarray(0, 8192), Buffer.alloc(8192));
    assert.deepEqual([slow.counters.fastWriteZeroes, fast.counters.fastWriteZeroes, fast.counters.noHoleWriteZeroes], [1, 1, 1]);
    const oddClient = await served.open('odd');
    assert.equal(await zero(oddClient, NbdCommandFlag.FAST_ZERO), NbdErrno.ENOTSUP);
    assert.equal(await zero(oddClient, 0), NbdErrno.EINVAL, 'ENOTSUP is for FAST_ZERO only');
    assert.equal((await oddClient.read(0, 512)).error, NbdErrno.EINVAL);
    assert.equal((await oddClient.request(NbdCommand.TRIM, { lengthBytes: 512 })).error, NbdErrno.EINVAL);
  });

  test('an export with block sizes: advertised in NBD_INFO_BLOCK_SIZE, unaligned or too large requests get EINVAL', async (t) => {
    const aligned = new MemoryExport({ name: 'aligned', sizeBytes: MiB, blockSizes: { minimumBytes: 512, maximumPayloadBytes: 64 * 1024 } });
    const served = await serve(t, [aligned, new MemoryExport({ name: 'bad', sizeBytes: MiB, blockSizes: { minimumBytes: 3 } })]);
    const client = await served.connect();
    const infos = await client.go('aligned', [NbdInfo.BLOCK_SIZE]);
    assert.deepEqual(infos.find((info) => info.type === NbdInfo.BLOCK_SIZE), { type: NbdInfo.BLOCK_SIZE, sizes: { minimumBytes: 512, preferredBytes: 4096, maximumPayloadBytes: 64 * 1024 } });
    assert.equal((await client.read(512, 1024)).error, 0);
    assert.equal((await client.read(100, 512)).error, NbdErrno.EINVAL);
    assert.equal((await client.write(0, Buffer.alloc(100))).error, NbdErrno.EINVAL);
    assert.equal((await client.request(NbdCommand.TRIM, { offsetBytes: 512, lengthBytes: 1000 })).error, NbdErrno.EINVAL);
    assert.equal((await client.read(0, 128 * 1024)).error, NbdErrno.EINVAL);
    assert.equal((await client.write(0, Buffer.alloc(128 * 1024))).error, NbdErrno.EINVAL, 'a write above the export maximum, payload consumed');
    assert.equal((await client.request(NbdCommand.WRITE_ZEROES, { lengthBytes: 512 * 1024 })).error, 0, 'no payload, no maximum');
    assert.equal(aligned.counters.writes, 0);
    const refused = await served.connect();
    await assert.rejects(refused.go('bad'), /block sizes/);
    assert.match(served.logs.join('\n'), /refused export "bad": INTERNAL: export "bad" has block sizes 3\/4096/);
  });

  test('CAN_MULTI_CONN: a FLUSH on one connection makes the writes acknowledged on the others durable', async (t) => {
    // An export with a volatile cache: writes land in the cache, a flush persists it, a crash drops it.
    const durable = Buffer.alloc(MiB);
    let cache = new Map<number, Buffer>();
    const cached: NbdExport = {
      name: 'cached', sizeBytes: MiB, readOnly: false,
      read: async (offset, length) => {
        const bytes = Buffer.from(durable.subarray(offset, offset + length));
        for (const [at, data] of cache) if (at >= offset && at + data.length <= offset + length) data.copy(bytes, at - offset);
        return bytes;
      },
      write: async (offset, data, fua) => {
        if (fua) data.copy(durable, offset);
        else cache.set(offset, Buffer.from(data));
      },
      flush: async () => {
        for (const [at, data] of cache) data.copy(durable, at);
        cache = new Map();
      },
      trim: async () => {}, writeZeroes: async () => {}, release: async () => {},
    };
    const served = await serve(t, [], { provider: { open: async () => cached, list: async () => [] } });
    const writers = await Promise.all([served.open('cached'), served.open('cached'), served.open('cached')]);
    assert.ok(writers.every((client) => (client.transmissionFlags & NbdTransmissionFlag.CAN_MULTI_CONN) !== 0));
    const acked = await Promise.all(writers.flatMap((client, index) => Array.from({ length: 8 }, (_, block) => client.write((index * 8 + block) * 4096, patterned(4096, index * 8 + block)))));
    assert.ok(acked.every((reply) => reply.error === 0));
    const flusher = await served.open('cached');
    assert.equal((await flusher.request(NbdCommand.FLUSH)).error, 0);
    assert.equal((await writers[0]!.write(100 * 4096, patterned(4096, 99))).error, 0, 'acknowledged after the flush: not covered');
    cache = new Map(); // crash: the volatile cache is lost
    for (let block = 0; block < 24; block++) assert.deepEqual(durable.subarray(block * 4096, (block + 1) * 4096), patterned(4096, block), `block ${block} survived`);
    assert.deepEqual(durable.subarray(100 * 4096, 101 * 4096), Buffer.alloc(4096), 'the unflushed write was lost, so this test can fail');
  });
});

describe('robustness', () => {
  test('random requests and random bytes after a structured handshake: errors or a closed connection, never a crash; others carry on', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    disk.load(0, patterned(64 * 1024, 1));
    const scratch = new MemoryExport({ name: 'scratch', sizeBytes: MiB, blockSizes: { minimumBytes: 512 } });
    const served = await serve(t, [disk, scratch], { payloadBytesMax: 64 * 1024, oversizedPayloadSkipBytesMax: 128 * 1024, blockStatusExtentsMax: 8 });
    const healthy = await openStructured(served, 'disk');
    const arbitraryRequest = fc.record({
      type: fc.constantFrom(NbdCommand.READ, NbdCommand.WRITE, NbdCommand.FLUSH, NbdCommand.TRIM, NbdCommand.WRITE_ZEROES, NbdCommand.BLOCK_STATUS, NbdCommand.CACHE, 77),
      flags: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 0x3f }), fc.integer({ min: 0, max: 0xffff })),
      // Aligned values too, so that many requests are valid and reach the export (not only refusals).
      offsetBytes: fc.oneof(fc.nat(MiB), fc.nat(MiB / 512 - 1).map((sector) => sector * 512), fc.constantFrom(MiB - 512, MiB, 2 ** 40, Number.MAX_SAFE_INTEGER)),
      lengthBytes: fc.oneof(fc.nat(8192), fc.integer({ min: 1, max: 16 }).map((sectors) => sectors * 512), fc.constantFrom(0, 512, 64 * 1024, 64 * 1024 + 1, 2 ** 32 - 1)),
    });
    await fc.assert(fc.asyncProperty(fc.array(arbitraryRequest, { maxLength: 12 }), fc.option(fc.uint8Array({ minLength: 1, maxLength: 64 }), { nil: undefined }), async (requests, garbage) => {
      const client = await openStructured(served, 'scratch');
      const replies = requests.map((request) => {
        // A write's payload goes with it unless it is above what the server skips (then the server hangs up).
        const payload = request.type === NbdCommand.WRITE && request.lengthBytes <= 128 * 1024 ? randomBytes(request.lengthBytes) : undefined;
        return client.request(request.type, { flags: request.flags, offsetBytes: request.offsetBytes, lengthBytes: request.lengthBytes, payload, expectData: request.type === NbdCommand.READ })
          .then((reply) => reply.error, () => 'closed' as const);
      });
      if (garbage !== undefined) client.sendRaw(Buffer.from(garbage));
      const outcomes = await Promise.all(replies);
      for (const outcome of outcomes) assert.ok(outcome === 'closed' || [0, NbdErrno.EINVAL, NbdErrno.EPERM, NbdErrno.ENOSPC, NbdErrno.EOVERFLOW].includes(outcome), `unexpected outcome ${outcome}`);
      client.destroy();
      await client.closed;
      const check = await healthy.read(0, 4096);
      assert.deepEqual(check.data, patterned(64 * 1024, 1).subarray(0, 4096), 'the healthy connection still reads what it should');
    }), { numRuns: 40 });
    await waitFor('every fuzzed connection to finish', () => served.server.connectionCount() === 1);
    assert.equal(scratch.counters.running, 0);
    assert.ok(scratch.counters.reads + scratch.counters.writes + scratch.counters.blockStatuses > 0, 'some requests got through to the export');
  });
});

describe('read buffers', () => {
  /** A 1 MiB export whose reads are `reads`' and whose other operations go to `disk`. */
  const readingExport = (name: string, disk: MemoryExport, reads: Pick<NbdExport, 'read' | 'readNow' | 'readThen' | 'recycle'>): NbdExport => ({
    name, sizeBytes: MiB, readOnly: false, ...reads,
    write: (offset, data, fua) => disk.write(offset, data, fua),
    flush: () => disk.flush(),
    trim: (offset, length, fua) => disk.trim(offset, length, fua),
    writeZeroes: (offset, length, options) => disk.writeZeroes(offset, length, options),
    release: async () => {},
  });

  /** A 1 MiB disk of `pattern` whose `hand` returns copies of its bytes, each one noted, and a list for recycle() to fill. */
  const handingDisk = (pattern: number): { disk: MemoryExport; handedOut: Buffer[]; recycled: Buffer[]; hand: (offset: number, length: number) => Buffer } => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    disk.data.set(patterned(MiB, pattern));
    const handedOut: Buffer[] = [];
    const hand = (offset: number, length: number): Buffer => {
      const copy = Buffer.from(disk.data.subarray(offset, offset + length));
      handedOut.push(copy);
      return copy;
    };
    return { disk, handedOut, recycled: [], hand };
  };

  test('readNow answers without read(); recycle gets every buffer a read returned, once its reply is out, and no other', async (t) => {
    const { disk, handedOut, recycled, hand } = handingDisk(3);
    const counts = { readNow: 0, read: 0 };
    const recycling = readingExport('recycling', disk, {
      // Even offsets are served at once, odd ones through read().
      readNow: (offset, length) => (offset % 2 === 0 ? (counts.readNow++, hand(offset, length)) : undefined),
      read: async (offset, length) => {
        counts.read++;
        if (offset === 99) throw new ShaleError('CHECKSUM', 'a failed read returns no buffer');
        return hand(offset, length);
      },
      recycle: (data) => recycled.push(data),
    });
    const served = await serve(t, [disk], { provider: { open: async () => recycling, list: async () => [] } });
    const client = await served.open('recycling');
    const reads = await Promise.all([0, 4096, 1, 5000, 77_777, 123_456].map((offset) => client.read(offset, 3000)));
    for (const [index, offset] of [0, 4096, 1, 5000, 77_777, 123_456].entries()) {
      assert.equal(reads[index]!.error, 0);
      assert.ok(reads[index]!.data!.equals(disk.data.subarray(offset, offset + 3000)), `read at ${offset}`);
    }
    assert.equal((await client.read(99, 10)).error, NbdErrno.EIO);
    assert.deepEqual(counts, { readNow: 4, read: 3 });
    await waitFor('every sent buffer recycled', () => recycled.length === handedOut.length);
    assert.equal(handedOut.length, 6);
    assert.deepEqual(new Set(recycled), new Set(handedOut), 'exactly the buffers the reads returned');
  });

  test('readThen takes what it can and read() does the rest; its errors become NBD errors, its buffers are recycled, also after the client left', async (t) => {
    const { disk, handedOut, recycled, hand } = handingDisk(5);
    const counts = { readThen: 0, read: 0 };
    const held: (() => void)[] = [];
    let hold = false;
    const callbacks = readingExport('callbacks', disk, {
      // Offsets from 8 KiB on are taken and settled a turn later; 64 KiB fails with CHECKSUM.
      readThen: (offset, length, done) => {
        if (offset < 8192) return false;
        counts.readThen++;
        const settle = (): void => {
          if (offset === 65_536) done(new ShaleError('CHECKSUM', 'no replica has it right'), undefined);
          else done(undefined, hand(offset, length));
        };
        if (hold) held.push(settle);
        else setImmediate(settle);
        return true;
      },
      read: async (offset, length) => {
        counts.read++;
        return hand(offset, length);
      },
      recycle: (data) => recycled.push(data),
    });
    const served = await serve(t, [disk], { provider: { open: async () => callbacks, list: async () => [] } });
    const client = await served.open('callbacks');
    const offsets = [0, 4096, 8192, 10_000, 65_536, 500_000];
    const reads = await Promise.all(offsets.map((offset) => client.read(offset, 3000)));
    assert.deepEqual(reads.map((reply) => reply.error), [0, 0, 0, 0, NbdErrno.EIO, 0]);
    for (const [index, offset] of offsets.entries()) {
      if (offset !== 65_536) assert.ok(reads[index]!.data!.equals(disk.data.subarray(offset, offset + 3000)), `read at ${offset}`);
    }
    assert.deepEqual(counts, { readThen: 4, read: 2 });
    await waitFor('every sent buffer recycled', () => recycled.length === handedOut.length);
    assert.equal(handedOut.length, 5);
    // A client that leaves with a taken read outstanding: the buffer comes back unsent when done comes.
    hold = true;
    const orphan = client.read(16_384, 4096).catch(() => 'closed');
    await waitFor('the read to be taken', () => held.length === 1);
    client.destroy();
    assert.equal(await orphan, 'closed');
    await waitFor('the server to see the connection gone', () => served.logs.some((line) => line.includes('replies are dropped')));
    held[0]!();
    await waitFor('the unsent buffer given back', () => recycled.length === 6);
    assert.deepEqual(new Set(recycled), new Set(handedOut), 'exactly the buffers the reads returned');
  });

  test('a read that completes after its connection closed gives its buffer back unsent', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    const recycled: Buffer[] = [];
    const pending: { resolve: (data: Buffer) => void; data: Buffer }[] = [];
    const slow = readingExport('slow', disk, {
      read: (offset, length) => new Promise<Buffer>((resolve) => pending.push({ resolve, data: Buffer.alloc(length, offset & 0xff) })),
      recycle: (data) => recycled.push(data),
    });
    const served = await serve(t, [disk], { provider: { open: async () => slow, list: async () => [] } });
    const client = await served.open('slow');
    const replies = [0, 4096, 8192].map((offset) => client.read(offset, 4096).catch(() => 'closed'));
    await waitFor('the reads to reach the export', () => pending.length === 3);
    client.destroy();
    await client.closed;
    await waitFor('the server to see the connection gone', () => served.logs.some((line) => line.includes('replies are dropped')));
    for (const read of pending) read.resolve(read.data);
    assert.deepEqual(await Promise.all(replies), ['closed', 'closed', 'closed']);
    await waitFor('every unsent buffer given back', () => recycled.length === 3);
    assert.deepEqual(new Set(recycled), new Set(pending.map((read) => read.data)));
  });
});

describe('writes without a Promise', () => {
  test('writeNow takes what it can, write() does the rest; done acknowledges or fails the request, also after the client left', async (t) => {
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
    const counts = { writeNow: 0, write: 0 };
    const held: (() => void)[] = [];
    let hold = false;
    const quick: NbdExport = {
      name: 'quick', sizeBytes: MiB, readOnly: false,
      read: (offset, length) => disk.read(offset, length),
      // Offsets on 8 KiB boundaries are taken and settled a turn later; 64 KiB fails with NO_SPACE.
      writeNow: (offset, data, fua, done) => {
        if (offset % 8192 !== 0) return false;
        counts.writeNow++;
        const settle = (): void => {
          if (offset === 65_536) done(new ShaleError('NO_SPACE', 'disk full'));
          else disk.write(offset, data, fua).then(() => done(undefined), done);
        };
        if (hold) held.push(settle);
        else setImmediate(settle);
        return true;
      },
      write: (offset, data, fua) => {
        counts.write++;
        return disk.write(offset, data, fua);
      },
      flush: () => disk.flush(),
      trim: (offset, length, fua) => disk.trim(offset, length, fua),
      writeZeroes: (offset, length, options) => disk.writeZeroes(offset, length, options),
      release: async () => disk.release(),
    };
    const served = await serve(t, [disk], { provider: { open: async () => quick, list: async () => [] } });
    const client = await served.open('quick');
    const offsets = [0, 4096, 8192, 12_288, 65_536, 16_384];
    const replies = await Promise.all(offsets.map((offset) => client.write(offset, patterned(4096, offset / 4096))));
    assert.deepEqual(replies.map((reply) => reply.error), [0, 0, 0, 0, NbdErrno.ENOSPC, 0]);
    assert.deepEqual(counts, { writeNow: 4, write: 2 });
    for (const offset of [0, 4096, 8192, 12_288, 16_384]) {
      assert.ok(disk.data.subarray(offset, offset + 4096).equals(patterned(4096, offset / 4096)), `data at ${offset}`);
    }
    // A client that leaves with a taken write outstanding: the reply is dropped when done comes.
    hold = true;
    const orphan = client.write(24_576, patterned(4096, 9));
    await waitFor('the write to be taken', () => held.length === 1);
    client.destroy();
    await assert.rejects(orphan);
    await waitFor('the server to see the connection gone', () => served.logs.some((line) => line.includes('replies are dropped')));
    assert.equal(disk.counters.releases, 0, 'not released under a taken write');
    held[0]!();
    await waitFor('the release', () => disk.counters.releases === 1);
    assert.ok(disk.data.subarray(24_576, 28_672).equals(patterned(4096, 9)), 'the write still landed');
  });
});
