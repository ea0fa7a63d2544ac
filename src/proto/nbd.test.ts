import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { ShaleError } from '../lib/errors.ts';
import {
  ByteQueue,
  NBD_ERROR_CHUNK_FIXED_BYTES,
  NBD_GREETING_BYTES,
  NBD_OFFSET_DATA_HEADER_BYTES,
  NBD_OFFSET_HOLE_CHUNK_BYTES,
  NBD_REPLY_FLAG_DONE,
  NBD_STRUCTURED_REPLY_MAGIC,
  NBD_OPTION_REPLY_HEADER_BYTES,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRING_BYTES_MAX,
  NbdClientFlag,
  NbdCommand,
  NbdCommandFlag,
  NbdHandshakeFlag,
  NbdInfo,
  NbdOption,
  NbdReply,
  NbdReplyParser,
  NbdServerParser,
  NbdStructuredReplyType,
  decodeBlockStatus,
  decodeErrorChunk,
  decodeExportName,
  decodeMetaContextReply,
  decodeMetaContextRequest,
  decodeOffsetData,
  decodeOffsetHole,
  decodeStructuredReplyHeader,
  decodeExportNameReply,
  decodeGreeting,
  decodeInfoReply,
  decodeInfoRequest,
  decodeOptionReplyHeader,
  decodeRequestHeader,
  decodeServerEntry,
  decodeSimpleReplyHeader,
  encodeBlockStatusChunk,
  encodeClientFlags,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoDescription,
  encodeInfoExport,
  encodeInfoName,
  encodeInfoRequest,
  encodeMetaContextReply,
  encodeMetaContextRequest,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOffsetHoleChunk,
  encodeOptionReply,
  encodeOptionRequest,
  encodeRequestHeader,
  encodeServerEntry,
  encodeSimpleReplyHeader,
  encodeStructuredReplyHeader,
  isOptionReplyError,
  structuredReplyTypeName,
} from './nbd.ts';
import type { NbdClientMessage, NbdReplyMessage, NbdRequestFields, NbdServerParserLimits } from './nbd.ts';

describe('handshake codecs', () => {
  test('the greeting is NBDMAGIC, IHAVEOPT and the handshake flags', () => {
    const greeting = encodeGreeting(NbdHandshakeFlag.FIXED_NEWSTYLE | NbdHandshakeFlag.NO_ZEROES);
    assert.equal(greeting.length, NBD_GREETING_BYTES);
    assert.equal(greeting.toString('hex'), '4e42444d4147494349484156454f50540003');
    assert.deepEqual(decodeGreeting(greeting), { handshakeFlags: 3 });
    assert.throws(() => decodeGreeting(Buffer.from('NBDMAGIC\x00\x00\x42\x02\x81\x86\x12\x53\x00\x00', 'latin1')), { code: 'PROTOCOL' });
  });

  test('an option reply has the reply magic, option, type, length and data', () => {
    const reply = encodeOptionReply(NbdOption.GO, NbdReply.ERR_UNKNOWN, 'no such export');
    assert.equal(reply.toString('hex', 0, 8), '0003e889045565a9');
    const header = decodeOptionReplyHeader(reply);
    assert.deepEqual(header, { option: NbdOption.GO, replyType: 0x80000006, lengthBytes: 14 });
    assert.equal(reply.toString('utf8', NBD_OPTION_REPLY_HEADER_BYTES), 'no such export');
    assert.ok(isOptionReplyError(header.replyType));
    assert.ok(!isOptionReplyError(NbdReply.ACK));
    assert.equal(encodeOptionReply(NbdOption.ABORT, NbdReply.ACK).length, NBD_OPTION_REPLY_HEADER_BYTES);
    assert.throws(() => decodeOptionReplyHeader(Buffer.alloc(20)), { code: 'PROTOCOL' });
  });

  test('error messages and names are cut to 4096 bytes on a character boundary', () => {
    const reply = encodeOptionReply(NbdOption.GO, NbdReply.ERR_UNKNOWN, 'é'.repeat(3000));
    const length = decodeOptionReplyHeader(reply).lengthBytes;
    assert.ok(length <= NBD_STRING_BYTES_MAX && length >= NBD_STRING_BYTES_MAX - 1);
    assert.equal(reply.toString('utf8', NBD_OPTION_REPLY_HEADER_BYTES), 'é'.repeat(length / 2));
  });

  test('server entries, info replies and block sizes round-trip', () => {
    assert.deepEqual(decodeServerEntry(encodeServerEntry('vol@snap', 'snapshot of vol')), { name: 'vol@snap', description: 'snapshot of vol' });
    assert.deepEqual(decodeServerEntry(encodeServerEntry('', '')), { name: '', description: '' });
    const size = 2 ** 53 - 1;
    assert.deepEqual(decodeInfoReply(encodeInfoExport(size, 0x1ed)), { type: NbdInfo.EXPORT, sizeBytes: size, transmissionFlags: 0x1ed });
    assert.deepEqual(decodeInfoReply(encodeInfoName('vol')), { type: NbdInfo.NAME, name: 'vol' });
    assert.deepEqual(decodeInfoReply(encodeInfoDescription('a volume')), { type: NbdInfo.DESCRIPTION, description: 'a volume' });
    const sizes = { minimumBytes: 1, preferredBytes: 4096, maximumPayloadBytes: 32 * 1024 * 1024 };
    assert.deepEqual(decodeInfoReply(encodeInfoBlockSize(sizes)), { type: NbdInfo.BLOCK_SIZE, sizes });
    assert.equal(encodeInfoExport(1, 1).length, 12);
    assert.equal(encodeInfoBlockSize(sizes).length, 14);
  });

  test('the export name reply has 124 zeroes unless NO_ZEROES', () => {
    const withZeroes = encodeExportNameReply(2 ** 40 + 3, 0x0103, false);
    assert.equal(withZeroes.length, 134);
    assert.ok(withZeroes.subarray(10).equals(Buffer.alloc(124)));
    assert.deepEqual(decodeExportNameReply(withZeroes), { sizeBytes: 2 ** 40 + 3, transmissionFlags: 0x0103 });
    assert.equal(encodeExportNameReply(5, 1, true).length, 10);
  });

  test('INFO/GO data round-trips and malformed data is INVALID_ARGUMENT', () => {
    const request = { name: 'vol-1', informationRequests: [NbdInfo.NAME, NbdInfo.BLOCK_SIZE, 77] };
    assert.deepEqual(decodeInfoRequest(encodeInfoRequest(request.name, request.informationRequests)), request);
    assert.deepEqual(decodeInfoRequest(encodeInfoRequest('', [])), { name: '', informationRequests: [] });
    const good = encodeInfoRequest('abc', [1]);
    const invalid: Buffer[] = [
      Buffer.alloc(5),
      good.subarray(0, good.length - 1),
      Buffer.concat([good, Buffer.alloc(1)]),
      (() => {
        const copy = Buffer.from(good);
        copy.writeUInt32BE(1000, 0);
        return copy;
      })(),
      encodeInfoRequest('a\u0000b', []),
      Buffer.concat([Buffer.from([0, 0, 0, 2, 0xc3, 0x28]), Buffer.from([0, 0])]),
      encodeInfoRequest('x'.repeat(NBD_STRING_BYTES_MAX + 1), []),
    ];
    for (const data of invalid) {
      assert.throws(() => decodeInfoRequest(data), (error: unknown) => error instanceof ShaleError && error.code === 'INVALID_ARGUMENT', data.toString('hex'));
    }
    assert.equal(decodeExportName(Buffer.from('vol@snap')), 'vol@snap');
    assert.throws(() => decodeExportName(Buffer.from([0x61, 0])), { code: 'INVALID_ARGUMENT' });
  });
});

describe('transmission codecs', () => {
  test('request headers round-trip, 64-bit offsets and opaque cookies included', () => {
    const cases: NbdRequestFields[] = [
      { flags: 0, type: NbdCommand.READ, cookieHigh: 0, cookieLow: 0, offsetBytes: 0, lengthBytes: 0 },
      { flags: NbdCommandFlag.FUA, type: NbdCommand.WRITE, cookieHigh: 0xffffffff, cookieLow: 0xfffffffe, offsetBytes: 2 ** 53 - 1, lengthBytes: 0xffffffff },
      { flags: 0xffff, type: 0xffff, cookieHigh: 1, cookieLow: 2, offsetBytes: 2 ** 32 + 5, lengthBytes: 4096 },
    ];
    for (const fields of cases) {
      const header = encodeRequestHeader(fields);
      assert.equal(header.length, 28);
      assert.equal(header.readUInt32BE(0), 0x25609513);
      const { magic, ...decoded } = decodeRequestHeader(header, 0);
      assert.equal(magic, 0x25609513);
      assert.deepEqual(decoded, fields);
    }
  });

  test('simple reply headers round-trip at any offset', () => {
    const target = Buffer.alloc(40);
    encodeSimpleReplyHeader(target, 20, 28, 0xdeadbeef, 7);
    assert.deepEqual(decodeSimpleReplyHeader(target, 20), { magic: NBD_SIMPLE_REPLY_MAGIC, error: 28, cookieHigh: 0xdeadbeef, cookieLow: 7 });
    assert.ok(target.subarray(0, 20).equals(Buffer.alloc(20)));
  });
});

describe('ByteQueue', () => {
  test('reads within one chunk are views; reads across chunks copy once', () => {
    const queue = new ByteQueue();
    const first = Buffer.from('abcdef');
    const second = Buffer.from('ghij');
    queue.push(first);
    queue.push(Buffer.alloc(0));
    queue.push(second);
    assert.equal(queue.length, 10);
    const view = queue.take(3);
    assert.equal(view.buffer, first.buffer);
    assert.equal(view.byteOffset, first.byteOffset);
    assert.equal(view.toString(), 'abc');
    const scratch = Buffer.alloc(8);
    const spanning = queue.peek(5, scratch);
    assert.equal(spanning.toString(), 'defgh');
    assert.equal(spanning.buffer, scratch.buffer);
    assert.equal(queue.skip(4), 4);
    assert.equal(queue.take(3).toString(), 'hij');
    assert.equal(queue.skip(10), 0);
    assert.equal(queue.length, 0);
  });

  test('inPlace gives the chunk itself and where the bytes start in it, or a copy in the scratch across chunks', () => {
    const queue = new ByteQueue();
    const first = Buffer.from('abcdef');
    queue.push(first);
    queue.push(Buffer.from('ghij'));
    queue.skip(2);
    const scratch = Buffer.alloc(8);
    const within = queue.inPlace(4, scratch);
    assert.equal(within, first, 'no view, no copy');
    assert.equal(queue.inPlaceOffset, 2);
    assert.equal(within.toString('latin1', queue.inPlaceOffset, queue.inPlaceOffset + 4), 'cdef');
    const across = queue.inPlace(6, scratch);
    assert.equal(across.buffer, scratch.buffer, 'copied into the scratch');
    assert.equal(queue.inPlaceOffset, 0);
    assert.equal(across.toString('latin1', 0, 6), 'cdefgh');
    assert.equal(queue.length, 8, 'inPlace consumes nothing');
  });
});

// -------------------------------------------------------------------------------------------------
// Stream framing

const smallLimits: NbdServerParserLimits = { optionDataBytesMax: 8192, payloadBytesMax: 64, oversizedPayloadSkipBytesMax: 200 };

function request(fields: Partial<NbdRequestFields> & { type: number }, payload?: Buffer): Buffer {
  const header = encodeRequestHeader({ flags: 0, cookieHigh: 0, cookieLow: 0, offsetBytes: 0, lengthBytes: payload?.length ?? 0, ...fields });
  return payload === undefined ? header : Buffer.concat([header, payload]);
}

/** A whole client conversation: flags, options (one oversized), GO, then every kind of request. */
function conversation(): Buffer {
  return Buffer.concat([
    encodeClientFlags(NbdClientFlag.FIXED_NEWSTYLE | NbdClientFlag.NO_ZEROES),
    encodeOptionRequest(NbdOption.LIST),
    encodeOptionRequest(NbdOption.STRUCTURED_REPLY, Buffer.alloc(8200, 7)),
    encodeOptionRequest(NbdOption.INFO, encodeInfoRequest('vol', [NbdInfo.NAME])),
    encodeOptionRequest(NbdOption.GO, encodeInfoRequest('vol', [])),
    request({ type: NbdCommand.READ, cookieLow: 1, offsetBytes: 4096, lengthBytes: 512 }),
    request({ type: NbdCommand.WRITE, cookieLow: 2, offsetBytes: 2 ** 40, flags: NbdCommandFlag.FUA }, Buffer.alloc(64, 0xab)),
    request({ type: NbdCommand.WRITE, cookieLow: 3, offsetBytes: 8 }, Buffer.alloc(150, 0xcd)),
    request({ type: NbdCommand.WRITE, cookieLow: 4 }, Buffer.alloc(0)),
    request({ type: NbdCommand.FLUSH, cookieHigh: 0xffffffff, cookieLow: 5 }),
    request({ type: NbdCommand.TRIM, cookieLow: 6, offsetBytes: 512, lengthBytes: 2 ** 31 }),
    request({ type: NbdCommand.WRITE_ZEROES, cookieLow: 7, flags: NbdCommandFlag.NO_HOLE, lengthBytes: 100 }),
    request({ type: 99, cookieLow: 8, lengthBytes: 12 }),
    request({ type: NbdCommand.DISC, cookieLow: 9 }),
  ]);
}

/** Runs a parser over the pieces, switching to transmission after GO as a server would. */
function parse(pieces: readonly Buffer[], limits = smallLimits): unknown[] {
  const parser = new NbdServerParser(limits);
  const messages: unknown[] = [];
  for (const piece of pieces) {
    parser.push(piece);
    for (let message = parser.next(); message !== undefined; message = parser.next()) {
      messages.push(normalize(message));
      if (message.kind === 'option' && message.option === NbdOption.GO) parser.enterTransmission();
    }
  }
  assert.equal(parser.bufferedBytes, 0, 'nothing left over');
  return messages;
}

function normalize(message: NbdClientMessage): unknown {
  if (message.kind === 'option') return { ...message, data: message.data.toString('hex') };
  if (message.kind === 'request') return { ...message, payload: message.payload?.toString('hex') };
  return message;
}

describe('NbdServerParser', () => {
  const stream = conversation();
  const expected = parse([stream]);

  test('frames a whole conversation', () => {
    assert.equal(expected.length, 14);
    assert.deepEqual(expected[0], { kind: 'client-flags', flags: 3 });
    assert.deepEqual(expected[2], { kind: 'oversized-option', option: NbdOption.STRUCTURED_REPLY, lengthBytes: 8200 });
    assert.deepEqual(expected[6], {
      kind: 'request', flags: 1, type: NbdCommand.WRITE, cookieHigh: 0, cookieLow: 2, offsetBytes: 2 ** 40, lengthBytes: 64,
      payload: 'ab'.repeat(64), payloadSkipped: false, payloadLent: false,
    });
    assert.deepEqual(expected[7], {
      kind: 'request', flags: 0, type: NbdCommand.WRITE, cookieHigh: 0, cookieLow: 3, offsetBytes: 8, lengthBytes: 150,
      payload: undefined, payloadSkipped: true, payloadLent: false,
    });
    assert.deepEqual(expected[8], {
      kind: 'request', flags: 0, type: NbdCommand.WRITE, cookieHigh: 0, cookieLow: 4, offsetBytes: 0, lengthBytes: 0,
      payload: '', payloadSkipped: false, payloadLent: false,
    });
    assert.equal((expected[12] as { type: number }).type, 99);
    assert.equal((expected[13] as { type: number }).type, NbdCommand.DISC);
  });

  test('every split into two pieces frames the same messages', () => {
    for (let split = 0; split <= stream.length; split++) {
      assert.deepEqual(parse([stream.subarray(0, split), stream.subarray(split)]), expected, `split at ${split}`);
    }
  });

  test('every split into three pieces of the transmission part frames the same messages', () => {
    const transmissionStart = stream.length - (28 * 9 + 64 + 150);
    const head = stream.subarray(0, transmissionStart);
    const tail = stream.subarray(transmissionStart);
    for (let first = 0; first <= tail.length; first++) {
      for (let second = first; second <= tail.length; second += 3) {
        const pieces = [head, tail.subarray(0, first), tail.subarray(first, second), tail.subarray(second)];
        assert.deepEqual(parse(pieces), expected, `splits at ${first}, ${second}`);
      }
    }
  });

  test('byte by byte frames the same messages', () => {
    const pieces = [...stream].map((byte) => Buffer.from([byte]));
    assert.deepEqual(parse(pieces), expected);
  });

  test('random splits of random requests frame the same messages', () => {
    const arbitraryRequest = fc.record({
      type: fc.constantFrom(NbdCommand.READ, NbdCommand.WRITE, NbdCommand.FLUSH, NbdCommand.TRIM, NbdCommand.WRITE_ZEROES, 42),
      flags: fc.integer({ min: 0, max: 0xffff }),
      cookieHigh: fc.nat(0xffffffff),
      cookieLow: fc.nat(0xffffffff),
      offsetBytes: fc.nat(Number.MAX_SAFE_INTEGER),
      lengthBytes: fc.nat(100),
    });
    fc.assert(fc.property(fc.array(arbitraryRequest, { maxLength: 20 }), fc.array(fc.nat(), { maxLength: 10 }), (requests, cuts) => {
      const bytes = Buffer.concat(requests.map((fields) => (fields.type === NbdCommand.WRITE ? request(fields, Buffer.alloc(fields.lengthBytes, fields.cookieLow & 0xff)) : request(fields))));
      const points = [...new Set(cuts.map((cut) => cut % (bytes.length + 1)))].sort((a, b) => a - b);
      const pieces: Buffer[] = [];
      let start = 0;
      for (const point of points) {
        pieces.push(bytes.subarray(start, point));
        start = point;
      }
      pieces.push(bytes.subarray(start));
      const parser = new NbdServerParser(smallLimits);
      parser.push(encodeClientFlags(1));
      parser.push(encodeOptionRequest(NbdOption.GO, encodeInfoRequest('x', [])));
      parser.next();
      parser.next();
      parser.enterTransmission();
      const framed: unknown[] = [];
      for (const piece of pieces) {
        parser.push(piece);
        for (let message = parser.next(); message !== undefined; message = parser.next()) framed.push(normalize(message));
      }
      assert.equal(framed.length, requests.length);
      framed.forEach((message, index) => {
        const fields = requests[index]!;
        const skipped = fields.type === NbdCommand.WRITE && fields.lengthBytes > smallLimits.payloadBytesMax;
        assert.deepEqual(message, {
          kind: 'request', ...fields,
          payload: fields.type === NbdCommand.WRITE && !skipped ? Buffer.alloc(fields.lengthBytes, fields.cookieLow & 0xff).toString('hex') : undefined,
          payloadSkipped: skipped,
          payloadLent: false,
        });
      });
    }));
  });

  test('reading in place frames the same messages, every payload lent, nothing left in the reused staging buffer', () => {
    // Payloads up to twice the 64 KiB staging buffer, some above the limit (skipped); reads of any
    // size; the reader sometimes stops pulling messages (a connection pausing), sometimes pulls them
    // after the next read's target was chosen and before that read lands (a paused session
    // resuming once replies went out), and after each release the staging buffer is overwritten
    // as the next read would.
    const limits: NbdServerParserLimits = { optionDataBytesMax: 8192, payloadBytesMax: 100_000, oversizedPayloadSkipBytesMax: 200_000 };
    const arbitraryRequest = fc.record({
      type: fc.constantFrom(NbdCommand.READ, NbdCommand.WRITE, NbdCommand.WRITE, NbdCommand.FLUSH, NbdCommand.TRIM),
      flags: fc.integer({ min: 0, max: 0xffff }),
      cookieHigh: fc.nat(0xffffffff),
      cookieLow: fc.nat(0xffffffff),
      offsetBytes: fc.nat(Number.MAX_SAFE_INTEGER),
      lengthBytes: fc.oneof(fc.nat(5000), fc.integer({ min: 60_000, max: 140_000 })),
    });
    const options = { numRuns: 200 };
    fc.assert(fc.property(fc.array(arbitraryRequest, { maxLength: 12 }), fc.nat(), fc.array(fc.integer({ min: 1, max: 150_000 }), { minLength: 1, maxLength: 20 }),
      fc.array(fc.boolean(), { minLength: 1, maxLength: 7 }), fc.array(fc.boolean(), { minLength: 1, maxLength: 5 }),
      (requests, ownedPrefix, readSizes, keepsPulling, pullsBeforeRead) => {
        const bytes = Buffer.concat(requests.map((fields) => (fields.type === NbdCommand.WRITE && fields.lengthBytes <= limits.oversizedPayloadSkipBytesMax
          ? request(fields, Buffer.alloc(fields.lengthBytes, fields.cookieLow & 0xff)) : request(fields))));
        const lent = new Set<Buffer>();
        const parser = new NbdServerParser(limits, (size) => {
          const buffer = Buffer.alloc(size);
          lent.add(buffer);
          return buffer;
        });
        parser.push(encodeClientFlags(1));
        parser.push(encodeOptionRequest(NbdOption.GO, encodeInfoRequest('x', [])));
        parser.next();
        parser.next();
        parser.enterTransmission();
        // Some bytes arrive before reading in place starts, as owned chunks.
        const prefix = ownedPrefix % (bytes.length + 1);
        parser.push(Buffer.from(bytes.subarray(0, prefix)));
        const framed: NbdClientMessage[] = [];
        let staging: Buffer | undefined;
        let at = prefix;
        let turn = 0;
        for (; at < bytes.length; turn++) {
          const target = parser.readTarget();
          assert.ok(target.length > 0, 'a read target is never empty');
          if (pullsBeforeRead[turn % pullsBeforeRead.length]!) for (let message = parser.next(); message !== undefined; message = parser.next()) framed.push(message);
          const count = Math.min(target.length, readSizes[turn % readSizes.length]!, bytes.length - at);
          bytes.copy(target, 0, at, at + count);
          at += count;
          parser.received(count);
          if (keepsPulling[turn % keepsPulling.length]!) for (let message = parser.next(); message !== undefined; message = parser.next()) framed.push(message);
          parser.release();
          if (![...lent].some((buffer) => buffer.buffer === target.buffer)) staging = target;
          staging?.fill(0xee);
        }
        for (let message = parser.next(); message !== undefined; message = parser.next()) framed.push(message);
        assert.equal(framed.length, requests.length);
        framed.forEach((message, index) => {
          const fields = requests[index]!;
          const skipped = fields.type === NbdCommand.WRITE && fields.lengthBytes > limits.payloadBytesMax;
          const withPayload = fields.type === NbdCommand.WRITE && !skipped;
          assert.deepEqual(normalize(message), {
            kind: 'request', ...fields,
            payload: withPayload ? Buffer.alloc(fields.lengthBytes, fields.cookieLow & 0xff).toString('hex') : undefined,
            payloadSkipped: skipped,
            payloadLent: withPayload && fields.lengthBytes > 0 && message.kind === 'request' && message.payload !== undefined && lent.has(message.payload),
          });
          // Payloads framed from the bytes that came before reading in place may be views of those
          // owned chunks; every payload framed after it is lent.
          if (withPayload && fields.lengthBytes > 0 && message.kind === 'request' && !message.payloadLent) {
            assert.ok(message.payload !== undefined && !lent.has(message.payload));
          }
        });
      }), options);
  });

  test('a payload inside one chunk is a view of it, not a copy', () => {
    const parser = new NbdServerParser();
    parser.push(encodeClientFlags(1));
    parser.next();
    parser.push(encodeOptionRequest(NbdOption.GO, encodeInfoRequest('x', [])));
    parser.next();
    parser.enterTransmission();
    const chunk = request({ type: NbdCommand.WRITE, cookieLow: 1 }, Buffer.alloc(4096, 1));
    parser.push(chunk);
    const message = parser.next();
    assert.ok(message?.kind === 'request' && message.payload !== undefined);
    assert.equal(message.payload.buffer, chunk.buffer);
    assert.equal(message.payload.byteOffset, chunk.byteOffset + 28);
  });

  test('a bad option magic, a bad request magic and a write too large to skip are PROTOCOL, and stay so', () => {
    const badOption = new NbdServerParser(smallLimits);
    badOption.push(Buffer.concat([encodeClientFlags(1), Buffer.from('IHAVEOPX\0\0\0\x01\0\0\0\0', 'latin1')]));
    assert.deepEqual(badOption.next(), { kind: 'client-flags', flags: 1 });
    assert.throws(() => badOption.next(), { code: 'PROTOCOL' });
    assert.throws(() => badOption.next(), { code: 'PROTOCOL' });

    const transmission = (): NbdServerParser => {
      const parser = new NbdServerParser(smallLimits);
      parser.push(Buffer.concat([encodeClientFlags(1), encodeOptionRequest(NbdOption.GO, encodeInfoRequest('x', []))]));
      parser.next();
      parser.next();
      parser.enterTransmission();
      return parser;
    };
    const badRequest = transmission();
    const garbage = request({ type: NbdCommand.READ, lengthBytes: 1 });
    garbage.writeUInt32BE(0x21e41c71, 0);
    badRequest.push(garbage);
    assert.throws(() => badRequest.next(), /bad request magic 0x21e41c71/);
    badRequest.push(request({ type: NbdCommand.READ }));
    assert.throws(() => badRequest.next(), { code: 'PROTOCOL' });
    assert.equal(badRequest.bufferedBytes, 0);

    const tooLarge = transmission();
    tooLarge.push(request({ type: NbdCommand.WRITE, lengthBytes: smallLimits.oversizedPayloadSkipBytesMax + 1 }));
    assert.throws(() => tooLarge.next(), /too large|beyond/);
  });

  test('random garbage either frames messages or fails with PROTOCOL, nothing else', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 300 }), fc.boolean(), (bytes, inTransmission) => {
      const parser = new NbdServerParser(smallLimits);
      if (inTransmission) {
        parser.push(Buffer.concat([encodeClientFlags(1), encodeOptionRequest(NbdOption.GO, encodeInfoRequest('x', []))]));
        parser.next();
        parser.next();
        parser.enterTransmission();
      }
      parser.push(Buffer.from(bytes));
      try {
        let count = 0;
        while (parser.next() !== undefined) count++;
        assert.ok(count <= bytes.length);
      } catch (error) {
        assert.ok(error instanceof ShaleError && error.code === 'PROTOCOL', String(error));
      }
      assert.ok(parser.bufferedBytes <= bytes.length);
    }));
  });

  test('the header of a request arriving in pieces is read once it is whole, and a partial payload waits', () => {
    const parser = new NbdServerParser(smallLimits);
    parser.push(Buffer.concat([encodeClientFlags(1), encodeOptionRequest(NbdOption.GO, encodeInfoRequest('x', []))]));
    parser.next();
    parser.next();
    parser.enterTransmission();
    const write = request({ type: NbdCommand.WRITE, cookieLow: 11 }, Buffer.alloc(60, 9));
    parser.push(write.subarray(0, 27));
    assert.equal(parser.next(), undefined);
    parser.push(write.subarray(27, 50));
    assert.equal(parser.next(), undefined);
    assert.equal(parser.bufferedBytes, 50);
    parser.push(write.subarray(50));
    const message = parser.next();
    assert.ok(message?.kind === 'request');
    assert.equal(message.payload?.length, 60);
    assert.equal(parser.next(), undefined);
  });
});

// -------------------------------------------------------------------------------------------------
// Meta contexts and structured replies

describe('meta context codecs', () => {
  test('LIST/SET_META_CONTEXT data round-trips, queries and all', () => {
    const cases = [
      { exportName: 'vol', queries: ['base:allocation'] },
      { exportName: '', queries: [] },
      { exportName: 'vol@snap', queries: ['base:', 'qemu:dirty-bitmap:b0', 'x-é:z'] },
    ];
    for (const request of cases) assert.deepEqual(decodeMetaContextRequest(encodeMetaContextRequest(request.exportName, request.queries)), request);
    assert.equal(encodeMetaContextRequest('ab', ['base:allocation']).toString('hex'), '00000002' + '6162' + '00000001' + '0000000f' + Buffer.from('base:allocation').toString('hex'));
  });

  test('malformed meta context data is INVALID_ARGUMENT, never a crash', () => {
    const good = encodeMetaContextRequest('vol', ['base:allocation']);
    const hugeCount = Buffer.from(good);
    hugeCount.writeUInt32BE(0xffffffff, 4 + 3);
    const hugeQuery = Buffer.from(good);
    hugeQuery.writeUInt32BE(0xffffff00, 4 + 3 + 4);
    const invalid = [
      Buffer.alloc(0), Buffer.alloc(3), good.subarray(0, good.length - 1), Buffer.concat([good, Buffer.alloc(1)]), hugeCount, hugeQuery,
      encodeMetaContextRequest('a\u0000', []), encodeMetaContextRequest('vol', ['x'.repeat(NBD_STRING_BYTES_MAX + 1)]),
    ];
    for (const data of invalid) assert.throws(() => decodeMetaContextRequest(data), { code: 'INVALID_ARGUMENT' }, data.toString('hex').slice(0, 80));
    fc.assert(fc.property(fc.uint8Array({ maxLength: 64 }), (bytes) => {
      try {
        decodeMetaContextRequest(Buffer.from(bytes));
      } catch (error) {
        assert.ok(error instanceof ShaleError && error.code === 'INVALID_ARGUMENT', String(error));
      }
    }));
  });

  test('NBD_REP_META_CONTEXT carries an id and a name', () => {
    const data = encodeMetaContextReply(1, 'base:allocation');
    assert.equal(data.toString('hex', 0, 4), '00000001');
    assert.deepEqual(decodeMetaContextReply(data), { contextId: 1, name: 'base:allocation' });
    assert.throws(() => decodeMetaContextReply(Buffer.alloc(3)), { code: 'PROTOCOL' });
  });
});

describe('structured reply codecs', () => {
  test('the chunk header is magic, flags, type, cookie, length', () => {
    const target = Buffer.alloc(24);
    encodeStructuredReplyHeader(target, 4, NBD_REPLY_FLAG_DONE, NbdStructuredReplyType.BLOCK_STATUS, 0x01020304, 0x05060708, 12);
    assert.equal(target.toString('hex'), '00000000' + '668e33ef' + '0001' + '0005' + '01020304' + '05060708' + '0000000c');
    assert.deepEqual(decodeStructuredReplyHeader(target, 4), { magic: NBD_STRUCTURED_REPLY_MAGIC, flags: 1, type: 5, cookieHigh: 0x01020304, cookieLow: 0x05060708, lengthBytes: 12 });
    assert.equal(structuredReplyTypeName(NbdStructuredReplyType.OFFSET_HOLE), 'NBD_REPLY_TYPE_OFFSET_HOLE');
  });

  test('a data chunk header is 28 bytes: header with length 8 + data, then the offset', () => {
    const target = Buffer.alloc(NBD_OFFSET_DATA_HEADER_BYTES);
    encodeOffsetDataHeader(target, 0, NBD_REPLY_FLAG_DONE, 0, 9, 2 ** 40 + 512, 4096);
    const header = decodeStructuredReplyHeader(target);
    assert.deepEqual({ type: header.type, flags: header.flags, lengthBytes: header.lengthBytes }, { type: NbdStructuredReplyType.OFFSET_DATA, flags: 1, lengthBytes: 4104 });
    const decoded = decodeOffsetData(Buffer.concat([target.subarray(20), Buffer.alloc(4096, 3)]));
    assert.equal(decoded.offsetBytes, 2 ** 40 + 512);
    assert.deepEqual(decoded.data, Buffer.alloc(4096, 3));
    assert.throws(() => decodeOffsetData(Buffer.alloc(8)), { code: 'PROTOCOL' });
  });

  test('a hole chunk is 32 bytes: offset and size', () => {
    const target = Buffer.alloc(NBD_OFFSET_HOLE_CHUNK_BYTES);
    encodeOffsetHoleChunk(target, 0, 0, 1, 2, 8192, 65536);
    const header = decodeStructuredReplyHeader(target);
    assert.deepEqual({ type: header.type, flags: header.flags, lengthBytes: header.lengthBytes }, { type: NbdStructuredReplyType.OFFSET_HOLE, flags: 0, lengthBytes: 12 });
    assert.deepEqual(decodeOffsetHole(target.subarray(20)), { offsetBytes: 8192, holeBytes: 65536 });
    assert.throws(() => decodeOffsetHole(Buffer.alloc(12)), { code: 'PROTOCOL' }, 'a hole of 0 bytes');
  });

  test('an error chunk carries the errno and a message cut to 4096 bytes; NONE is empty and DONE', () => {
    const chunk = encodeErrorChunk(0, 3, 22, 'read past the end');
    const header = decodeStructuredReplyHeader(chunk);
    assert.deepEqual({ type: header.type, flags: header.flags, lengthBytes: header.lengthBytes }, { type: NbdStructuredReplyType.ERROR, flags: 1, lengthBytes: NBD_ERROR_CHUNK_FIXED_BYTES + 17 });
    assert.deepEqual(decodeErrorChunk(header.type, chunk.subarray(20)), { error: 22, message: 'read past the end', offsetBytes: undefined });
    const long = encodeErrorChunk(0, 3, 5, 'x'.repeat(10_000));
    assert.equal(decodeStructuredReplyHeader(long).lengthBytes, NBD_ERROR_CHUNK_FIXED_BYTES + NBD_STRING_BYTES_MAX);
    const withOffset = Buffer.concat([Buffer.from([0, 0, 0, 5, 0, 1, 0x61]), Buffer.from([0, 0, 0, 0, 0, 0, 0x10, 0])]);
    assert.deepEqual(decodeErrorChunk(NbdStructuredReplyType.ERROR_OFFSET, withOffset), { error: 5, message: 'a', offsetBytes: 4096 });
    assert.throws(() => decodeErrorChunk(NbdStructuredReplyType.ERROR, Buffer.from([0, 0, 0, 5, 0, 9, 0x61])), { code: 'PROTOCOL' });
    assert.equal(encodeNoneChunk(1, 2).toString('hex'), '668e33ef' + '0001' + '0000' + '00000001' + '00000002' + '00000000');
  });

  test('a block status chunk is the context id and one (length, flags) pair per extent', () => {
    const extents = [{ lengthBytes: 4096, flags: 0 }, { lengthBytes: 2 ** 32 - 1, flags: 3 }];
    const chunk = encodeBlockStatusChunk(0, 4, 1, extents);
    assert.equal(decodeStructuredReplyHeader(chunk).lengthBytes, 4 + 16);
    assert.deepEqual(decodeBlockStatus(chunk.subarray(20)), { contextId: 1, extents });
    assert.throws(() => decodeBlockStatus(Buffer.alloc(4)), { code: 'PROTOCOL' });
    assert.throws(() => decodeBlockStatus(Buffer.alloc(13)), { code: 'PROTOCOL' });
  });
});

/** A server's side of a conversation: simple and structured replies of every kind, for cookies 1..7. */
function replyStream(): { bytes: Buffer; dataBytes: Map<number, number> } {
  const simple = (cookie: number, error: number, data?: Buffer): Buffer => {
    const header = Buffer.alloc(16);
    encodeSimpleReplyHeader(header, 0, error, 0, cookie);
    return data === undefined ? header : Buffer.concat([header, data]);
  };
  const dataChunk = (cookie: number, flags: number, offset: number, data: Buffer): Buffer => {
    const header = Buffer.alloc(NBD_OFFSET_DATA_HEADER_BYTES);
    encodeOffsetDataHeader(header, 0, flags, 0, cookie, offset, data.length);
    return Buffer.concat([header, data]);
  };
  const hole = (cookie: number, flags: number, offset: number, length: number): Buffer => {
    const chunk = Buffer.alloc(NBD_OFFSET_HOLE_CHUNK_BYTES);
    encodeOffsetHoleChunk(chunk, 0, flags, 0, cookie, offset, length);
    return chunk;
  };
  const bytes = Buffer.concat([
    simple(1, 0, Buffer.alloc(100, 1)),
    simple(2, 22),
    dataChunk(3, 0, 0, Buffer.alloc(40, 3)),
    simple(4, 0),
    hole(3, 0, 40, 24),
    dataChunk(3, NBD_REPLY_FLAG_DONE, 64, Buffer.alloc(36, 3)),
    encodeErrorChunk(0, 5, 5, 'disk on fire'),
    encodeBlockStatusChunk(0, 6, 1, [{ lengthBytes: 512, flags: 3 }, { lengthBytes: 1024, flags: 0 }]),
    encodeNoneChunk(0, 7),
  ]);
  return { bytes, dataBytes: new Map([[1, 100], [2, 100], [3, 100], [4, 0], [5, 100], [6, 0], [7, 0]]) };
}

function parseReplies(pieces: readonly Buffer[], dataBytes: Map<number, number>, chunkPayloadBytesMax = 1024): unknown[] {
  const parser = new NbdReplyParser({ simpleReplyDataBytes: (high, low) => (high === 0 ? dataBytes.get(low) : undefined), chunkPayloadBytesMax });
  const messages: unknown[] = [];
  for (const piece of pieces) {
    parser.push(piece);
    for (let message = parser.next(); message !== undefined; message = parser.next()) messages.push(normalizeReply(message));
  }
  assert.equal(parser.bufferedBytes, 0, 'nothing left over');
  return messages;
}

function normalizeReply(message: NbdReplyMessage): unknown {
  if (message.kind === 'simple') return { ...message, data: message.data?.toString('hex') };
  return { ...message, payload: message.payload.toString('hex') };
}

describe('NbdReplyParser', () => {
  const { bytes, dataBytes } = replyStream();
  const expected = parseReplies([bytes], dataBytes);

  test('frames simple replies (with read data) and every kind of chunk, interleaved', () => {
    assert.equal(expected.length, 9);
    assert.deepEqual(expected[0], { kind: 'simple', error: 0, cookieHigh: 0, cookieLow: 1, data: '01'.repeat(100) });
    assert.deepEqual(expected[1], { kind: 'simple', error: 22, cookieHigh: 0, cookieLow: 2, data: undefined }, 'an error reply carries no data');
    assert.deepEqual((expected as { kind: string; type?: number; flags?: number }[]).map((message) => (message.kind === 'chunk' ? `${message.type}/${message.flags}` : message.kind)), [
      'simple', 'simple', '1/0', 'simple', '2/0', '1/1', `${NbdStructuredReplyType.ERROR}/1`, '5/1', '0/1',
    ]);
  });

  test('every split into two pieces frames the same messages', () => {
    for (let split = 0; split <= bytes.length; split++) {
      assert.deepEqual(parseReplies([bytes.subarray(0, split), bytes.subarray(split)], dataBytes), expected, `split at ${split}`);
    }
  });

  test('every split into three pieces frames the same messages', () => {
    for (let first = 0; first <= bytes.length; first += 2) {
      for (let second = first; second <= bytes.length; second += 5) {
        assert.deepEqual(parseReplies([bytes.subarray(0, first), bytes.subarray(first, second), bytes.subarray(second)], dataBytes), expected, `splits at ${first}, ${second}`);
      }
    }
  });

  test('byte by byte, and at random points, frames the same messages', () => {
    assert.deepEqual(parseReplies([...bytes].map((byte) => Buffer.from([byte])), dataBytes), expected);
    fc.assert(fc.property(fc.array(fc.nat(bytes.length), { maxLength: 12 }), (cuts) => {
      const points = [...new Set(cuts)].sort((a, b) => a - b);
      const pieces: Buffer[] = [];
      let start = 0;
      for (const point of points) {
        pieces.push(bytes.subarray(start, point));
        start = point;
      }
      pieces.push(bytes.subarray(start));
      assert.deepEqual(parseReplies(pieces, dataBytes), expected);
    }));
  });

  test('a bad magic, an unknown cookie or an oversized chunk is PROTOCOL, and stays so', () => {
    const known = new Map([[1, 8]]);
    assert.throws(() => parseReplies([Buffer.from('HTTP/1.1 200 OK\r\n\r\n')], known), /bad reply magic 0x48545450/);
    const unknown = Buffer.alloc(16);
    encodeSimpleReplyHeader(unknown, 0, 0, 0, 99);
    assert.throws(() => parseReplies([unknown], known), /unknown cookie/);
    assert.throws(() => parseReplies([encodeNoneChunk(0, 99)], known), /unknown cookie/);
    const big = Buffer.alloc(20);
    encodeStructuredReplyHeader(big, 0, 0, NbdStructuredReplyType.OFFSET_DATA, 0, 1, 2 ** 31);
    const parser = new NbdReplyParser({ simpleReplyDataBytes: () => 0, chunkPayloadBytesMax: 1024 });
    parser.push(big);
    assert.throws(() => parser.next(), /exceeds 1024/);
    parser.push(encodeNoneChunk(0, 1));
    assert.throws(() => parser.next(), { code: 'PROTOCOL' });
    assert.equal(parser.bufferedBytes, 0);
  });

  test('random garbage either frames replies or fails with PROTOCOL, nothing else', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 200 }), (garbage) => {
      const parser = new NbdReplyParser({ simpleReplyDataBytes: (_high, low) => (low % 3 === 0 ? undefined : low % 64), chunkPayloadBytesMax: 256 });
      parser.push(Buffer.from(garbage));
      try {
        while (parser.next() !== undefined);
      } catch (error) {
        assert.ok(error instanceof ShaleError && error.code === 'PROTOCOL', String(error));
      }
    }));
  });
});

describe('NbdServerParser with the extensions', () => {
  /** Options for TLS, structured replies and meta contexts, then the requests they allow. */
  const stream = Buffer.concat([
    encodeClientFlags(NbdClientFlag.FIXED_NEWSTYLE),
    encodeOptionRequest(NbdOption.STARTTLS),
    encodeOptionRequest(NbdOption.STRUCTURED_REPLY),
    encodeOptionRequest(NbdOption.LIST_META_CONTEXT, encodeMetaContextRequest('vol', [])),
    encodeOptionRequest(NbdOption.SET_META_CONTEXT, encodeMetaContextRequest('vol', ['base:allocation', 'qemu:allocation-depth'])),
    encodeOptionRequest(NbdOption.GO, encodeInfoRequest('vol', [NbdInfo.BLOCK_SIZE])),
    request({ type: NbdCommand.BLOCK_STATUS, cookieLow: 1, offsetBytes: 0, lengthBytes: 2 ** 32 - 1, flags: NbdCommandFlag.REQ_ONE }),
    request({ type: NbdCommand.READ, cookieLow: 2, lengthBytes: 65536, flags: NbdCommandFlag.DF }),
    request({ type: NbdCommand.WRITE_ZEROES, cookieLow: 3, lengthBytes: 2 ** 31, flags: NbdCommandFlag.FAST_ZERO | NbdCommandFlag.NO_HOLE }),
    request({ type: NbdCommand.WRITE, cookieLow: 4 }, Buffer.alloc(33, 4)),
    request({ type: NbdCommand.DISC, cookieLow: 5 }),
  ]);
  const expected = parse([stream]);

  test('frames the options and the requests; the meta context data decodes', () => {
    assert.equal(expected.length, 11);
    const set = expected[4] as { option: number; data: string };
    assert.equal(set.option, NbdOption.SET_META_CONTEXT);
    assert.deepEqual(decodeMetaContextRequest(Buffer.from(set.data, 'hex')), { exportName: 'vol', queries: ['base:allocation', 'qemu:allocation-depth'] });
    assert.deepEqual(expected[6], {
      kind: 'request', flags: NbdCommandFlag.REQ_ONE, type: NbdCommand.BLOCK_STATUS, cookieHigh: 0, cookieLow: 1, offsetBytes: 0, lengthBytes: 2 ** 32 - 1,
      payload: undefined, payloadSkipped: false, payloadLent: false,
    });
  });

  test('every split into two pieces frames the same messages', () => {
    for (let split = 0; split <= stream.length; split++) {
      assert.deepEqual(parse([stream.subarray(0, split), stream.subarray(split)]), expected, `split at ${split}`);
    }
  });
});
