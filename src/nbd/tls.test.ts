/**
 * NBD over TLS (NBD_OPT_STARTTLS) with certificates made by the test: the three modes, client
 * certificates, renegotiation after the upgrade, and everything that must close or refuse.
 * Real clients over TLS (nbdinfo, qemu-img, nbdcopy) are in clients.test.ts.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { TLSSocket } from 'node:tls';
import { after, before, describe, test } from 'node:test';
import type { TestContext } from 'node:test';
import type { Connection } from '../env/env.ts';
import { nodeEnv } from '../env/node/node-env.ts';
import { ShaleError } from '../lib/errors.ts';
import { NbdClientFlag, NbdOption, NbdReply, NbdTransmissionFlag, encodeInfoRequest, encodeOptionRequest } from '../proto/nbd.ts';
import { MemoryExport, MemoryExportProvider } from './memory-export.ts';
import { startNbdServer } from './server.ts';
import type { NbdServerOptions } from './server.ts';
import { NbdSimpleClient } from './simple-client.ts';
import { makeTestCertificates } from './test-certificates.ts';
import type { TestCertificates } from './test-certificates.ts';
import { loadServerTls } from './tls.ts';
import type { NbdTlsMode } from './tls.ts';

const MiB = 1024 * 1024;
let certificates: TestCertificates;
let directory: string;

before(async () => {
  directory = await mkdtemp(join(tmpdir(), 'shale-nbd-tls-'));
  certificates = await makeTestCertificates(directory);
});

after(async () => {
  await rm(directory, { recursive: true, force: true });
});

async function serve(t: TestContext, mode: NbdTlsMode, options: Partial<NbdServerOptions> & { verifyClients?: boolean } = {}) {
  const logs: string[] = [];
  const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB });
  const server = await startNbdServer(nodeEnv, {
    listen: '127.0.0.1:0',
    provider: new MemoryExportProvider([disk]),
    log: (message) => logs.push(message),
    tls: { mode, certFile: certificates.serverCertFile, keyFile: certificates.serverKeyFile, caFile: options.verifyClients ? certificates.caFile : undefined },
    ...options,
  });
  t.after(() => server.close());
  const connect = async (clientFlags?: number): Promise<NbdSimpleClient> => {
    const client = await NbdSimpleClient.connect(nodeEnv, server.address, clientFlags);
    t.after(() => client.destroy());
    return client;
  };
  return { server, logs, disk, connect };
}

const withClientCertificate = () => ({ ca: certificates.ca, cert: certificates.clientCert, key: certificates.clientKey });
const replyTypeOf = (error: unknown): unknown => (error instanceof ShaleError ? error.details?.replyType : undefined);

async function waitFor(what: string, condition: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

describe('TLS', () => {
  test('require: every option but STARTTLS and ABORT is refused with NBD_REP_ERR_TLS_REQD until TLS is up', async (t) => {
    const { connect, logs } = await serve(t, 'require');
    const client = await connect();
    for (const option of [NbdOption.LIST, NbdOption.STRUCTURED_REPLY, 999]) {
      assert.deepEqual((await client.option(option)).map((reply) => reply.replyType), [NbdReply.ERR_TLS_REQD], `option ${option}`);
    }
    await assert.rejects(client.go('disk'), (error: unknown) => replyTypeOf(error) === NbdReply.ERR_TLS_REQD);
    await assert.rejects(client.go('disk', [], true), (error: unknown) => replyTypeOf(error) === NbdReply.ERR_TLS_REQD);
    assert.equal((await client.option(NbdOption.STARTTLS, Buffer.from('x'))).at(-1)!.replyType, NbdReply.ERR_INVALID);
    await client.startTls({ ca: certificates.ca });
    assert.ok(client.connection instanceof Object && (client.connection as unknown as { socket: unknown }).socket instanceof TLSSocket);
    const listed = await client.option(NbdOption.LIST);
    assert.deepEqual(listed.map((reply) => reply.replyType), [NbdReply.SERVER, NbdReply.ACK]);
    assert.equal((await client.option(NbdOption.STARTTLS)).at(-1)!.replyType, NbdReply.ERR_INVALID, 'TLS is already active');
    await client.go('disk');
    assert.equal((await client.write(0, Buffer.alloc(4096, 0x5e))).error, 0);
    assert.deepEqual((await client.read(0, 4096)).data, Buffer.alloc(4096, 0x5e));
    await client.disconnect();
    assert.equal(logs.filter((line) => /before STARTTLS/.test(line)).length, 1, logs.join('\n'));
  });

  test('require: plaintext NBD_OPT_EXPORT_NAME and non-fixed-newstyle clients are disconnected; ABORT is answered', async (t) => {
    const { connect, logs } = await serve(t, 'require');
    const exportName = await connect();
    await assert.rejects(exportName.exportName('disk'));
    await exportName.closed;
    const oldStyle = await connect(NbdClientFlag.NO_ZEROES);
    await oldStyle.closed;
    const abort = await connect();
    assert.deepEqual((await abort.option(NbdOption.ABORT)).map((reply) => reply.replyType), [NbdReply.ACK]);
    await abort.closed;
    await waitFor('two log lines', () => logs.length >= 2);
    assert.match(logs.join('\n'), /NBD_OPT_EXPORT_NAME without TLS, which this server requires/);
    assert.match(logs.join('\n'), /TLS is required and the client does not speak fixed newstyle/);
  });

  test('on: plaintext works, and a client may upgrade; STARTTLS forgets structured replies negotiated before', async (t) => {
    const { connect, disk } = await serve(t, 'on');
    const plain = await connect();
    await plain.go('disk');
    assert.equal((await plain.write(0, Buffer.alloc(512, 1))).error, 0);
    const secure = await connect();
    assert.equal(await secure.negotiateStructuredReplies(), true);
    await secure.startTls({ ca: certificates.ca });
    await secure.go('disk');
    assert.equal(secure.transmissionFlags & NbdTransmissionFlag.SEND_DF, 0, 'structured replies must be negotiated again after STARTTLS');
    const read = await secure.read(0, 512);
    assert.deepEqual([read.data, read.chunks], [Buffer.alloc(512, 1), undefined]);
    assert.equal(disk.counters.writes, 1);
    const again = await connect();
    await again.startTls({ ca: certificates.ca });
    assert.equal(await again.negotiateStructuredReplies(), true);
    assert.deepEqual(await again.metaContext('disk', ['base:allocation']), [{ contextId: 1, name: 'base:allocation' }]);
    await again.go('disk');
    assert.deepEqual((await again.blockStatus(0, 4096)).blockStatus?.get(1), [{ lengthBytes: 4096, flags: 0 }]);
    await Promise.all([plain.disconnect(), secure.disconnect(), again.disconnect()]);
  });

  test('off: STARTTLS is refused with NBD_REP_ERR_POLICY and the handshake goes on', async (t) => {
    const { connect } = await serve(t, 'off');
    const client = await connect();
    await assert.rejects(client.startTls({ ca: certificates.ca }), (error: unknown) => replyTypeOf(error) === NbdReply.ERR_POLICY);
    await client.go('disk');
    assert.equal((await client.read(0, 1)).error, 0);
  });

  test('with a CA: a client without a certificate, or with one from another CA, fails the TLS handshake; a good one works', async (t) => {
    const { connect, logs } = await serve(t, 'require', { verifyClients: true });
    const anonymous = await connect();
    // TLS 1.3 finishes the client's side before the server checks the certificate: the refusal
    // then shows as the connection closing.
    await anonymous.startTls({ ca: certificates.ca }).then(() => anonymous.go('disk')).then(
      () => assert.fail('a client without a certificate got in'),
      () => {},
    );
    await anonymous.closed;
    const stranger = await connect();
    await stranger.startTls({ ca: certificates.ca, cert: certificates.strangerCert, key: certificates.strangerKey }).then(() => stranger.go('disk')).then(
      () => assert.fail('a client with a certificate from another CA got in'),
      () => {},
    );
    await stranger.closed;
    const trusted = await connect();
    await trusted.startTls(withClientCertificate());
    await trusted.go('disk');
    assert.equal((await trusted.read(0, 512)).error, 0);
    await trusted.disconnect();
    await waitFor('two refusals logged', () => logs.filter((line) => /connection lost during the handshake \(TLS\)/.test(line)).length >= 2);
    assert.match(logs.join('\n'), /certificate/);
  });

  test('a client that does not wait for the STARTTLS reply, or never starts TLS, is disconnected', async (t) => {
    const { connect, logs } = await serve(t, 'require', { handshakeTimeoutMs: 300 });
    const eager = await connect();
    eager.sendRaw(Buffer.concat([encodeOptionRequest(NbdOption.STARTTLS), encodeOptionRequest(NbdOption.GO, encodeInfoRequest('disk', []))]));
    await eager.closed;
    const silent = await connect();
    assert.equal((await silent.option(NbdOption.STARTTLS)).at(-1)!.replyType, NbdReply.ACK);
    await silent.closed;
    await waitFor('two log lines', () => logs.length >= 2);
    assert.match(logs.join('\n'), /sent data after NBD_OPT_STARTTLS without waiting for the reply/);
    assert.match(logs.join('\n'), /handshake not completed within 300 ms/);
  });

  test('close() with TLS connections: in-flight requests are answered, then everything closes', async (t) => {
    let release!: () => void;
    const gate = new Promise<void>((resolve) => {
      release = resolve;
    });
    const disk = new MemoryExport({ name: 'disk', sizeBytes: MiB, beforeOperation: (operation) => (operation === 'read' ? gate : undefined) });
    const { server, connect } = await serve(t, 'require', { provider: new MemoryExportProvider([disk]) });
    const client = await connect();
    await client.startTls({ ca: certificates.ca });
    await client.go('disk');
    const read = client.read(0, 512);
    await waitFor('the read to run', () => disk.counters.running === 1);
    const closing = server.close();
    await sleep(20);
    release();
    assert.equal((await read).error, 0);
    await closing;
    await client.closed;
    assert.equal(disk.counters.releases, 1);
  });

  test('bad TLS options are INVALID_ARGUMENT naming the option; a connection of another environment cannot be upgraded', async () => {
    const provider = new MemoryExportProvider([]);
    const start = (tls: NbdServerOptions['tls']) => startNbdServer(nodeEnv, { listen: '127.0.0.1:0', provider, tls });
    await assert.rejects(start({ mode: 'require' }), /tls.certFile is required/);
    await assert.rejects(start({ mode: 'on', certFile: join(directory, 'missing.pem'), keyFile: certificates.serverKeyFile }), /tls.certFile: .*missing.pem does not exist/);
    const garbage = join(directory, 'garbage.pem');
    await writeFile(garbage, 'not a certificate');
    await assert.rejects(start({ mode: 'on', certFile: garbage, keyFile: certificates.serverKeyFile }), { code: 'INVALID_ARGUMENT' });
    await assert.rejects(start({ mode: 'sometimes' as NbdTlsMode, certFile: certificates.serverCertFile, keyFile: certificates.serverKeyFile }), /tls.mode/);
    const off = await start({ mode: 'off' });
    await off.close();
    const tls = await loadServerTls(nodeEnv, { mode: 'on', certFile: certificates.serverCertFile, keyFile: certificates.serverKeyFile });
    const simulated = { remoteAddress: 'sim' } as unknown as Connection;
    assert.throws(() => tls!.upgrade(simulated), { code: 'NOT_SUPPORTED' });
  });
});
