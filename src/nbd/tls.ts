/**
 * TLS for NBD (NBD_OPT_STARTTLS, proto.md "TLS support"): loading x509 credentials, and upgrading a
 * plaintext Connection in place — the server after it has sent NBD_REP_ACK to STARTTLS, a client
 * after it has received it.
 *
 * The env's Connection interface has no notion of TLS, so this module reaches below it: it needs a
 * Connection from the Node environment (`src/env/node/node-env.ts`), whose `socket` property is the
 * net.Socket, and wraps that socket with node:tls. A Connection from any other environment (the
 * simulator) cannot be upgraded: `upgrade` throws NOT_SUPPORTED and the session ends that
 * connection. That is why TLS needs the Node environment; everything else in the NBD server runs on
 * any env.
 *
 * After the upgrade the old Connection is dead to its user: its socket no longer delivers data
 * (the TLS layer reads it) and its close event fires when the TLS connection closes. The caller
 * must switch every listener to the returned Connection and ignore the old one's events.
 *
 * Certificates: `certFile` / `keyFile` are the server's PEM certificate (chain) and key. With
 * `caFile`, the server asks every client for a certificate and refuses the TLS handshake unless it
 * is signed by that CA (like `nbdkit --tls-verify-peer` and qemu-nbd's `verify-peer=on`); without
 * it, clients are not asked. TLS 1.2 is the minimum (proto.md: MUST support 1.2, SHOULD NOT enable
 * older versions by default).
 */
import { Duplex } from 'node:stream';
import * as tls from 'node:tls';
import type { Connection, Env } from '../env/env.ts';
import { writeToStream } from '../env/node/node-env.ts';
import { ShaleError } from '../lib/errors.ts';

export type NbdTlsMode = 'off' | 'on' | 'require';

export interface NbdTlsOptions {
  /**
   * off: STARTTLS is refused (NBD_REP_ERR_POLICY), everything is plaintext (proto.md NOTLS).
   * on: a client may upgrade with STARTTLS at any point of the handshake; plaintext works too
   *   (SELECTIVETLS with no TLS-only export).
   * require: every option but STARTTLS and ABORT is refused with NBD_REP_ERR_TLS_REQD until the
   *   client has upgraded; NBD_OPT_EXPORT_NAME in plaintext closes the connection (FORCEDTLS).
   */
  readonly mode: NbdTlsMode;
  /** PEM certificate (with its chain) of the server. Required unless mode is off. */
  readonly certFile?: string;
  /** PEM private key of that certificate. Required unless mode is off. */
  readonly keyFile?: string;
  /** PEM CA certificate(s): when given, clients must present a certificate signed by one of them. */
  readonly caFile?: string;
}

/** What a session needs to offer TLS. */
export interface NbdTls {
  readonly mode: Exclude<NbdTlsMode, 'off'>;
  /**
   * Starts the server side of a TLS handshake on the connection's socket and returns the
   * Connection that carries everything from now on (data arrives once the handshake is done; a
   * failed handshake closes it with the error). Errors: NOT_SUPPORTED when the connection does not
   * come from the Node environment.
   */
  upgrade(connection: Connection): Connection;
}

/**
 * Reads the credentials through env.disk and builds the server's TLS context; undefined for mode
 * off. Errors: INVALID_ARGUMENT naming the option for a missing file or unusable PEM.
 */
export async function loadServerTls(env: Env, options: NbdTlsOptions): Promise<NbdTls | undefined> {
  if (options.mode === 'off') return undefined;
  if (options.mode !== 'on' && options.mode !== 'require') {
    throw new ShaleError('INVALID_ARGUMENT', `nbd server option tls.mode: "${String(options.mode)}" is not off, on or require`);
  }
  const read = async (name: 'certFile' | 'keyFile' | 'caFile', required: boolean): Promise<Buffer | undefined> => {
    const path = options[name];
    if (path === undefined) {
      if (required) throw new ShaleError('INVALID_ARGUMENT', `nbd server option tls.${name} is required when tls.mode is ${options.mode}`);
      return undefined;
    }
    const bytes = await env.disk.readFile(path);
    if (bytes === undefined) throw new ShaleError('INVALID_ARGUMENT', `nbd server option tls.${name}: ${path} does not exist`);
    return bytes;
  };
  const cert = await read('certFile', true);
  const key = await read('keyFile', true);
  const ca = await read('caFile', false);
  try {
    // Fails now, with the option's name, rather than at the first client.
    tls.createSecureContext({ cert, key, ca, minVersion: 'TLSv1.2' });
  } catch (error) {
    throw new ShaleError('INVALID_ARGUMENT', `nbd server option tls: cannot use ${options.certFile} / ${options.keyFile}${ca ? ` / ${options.caFile}` : ''}: ${error instanceof Error ? error.message : String(error)}`);
  }
  const verifyPeer = ca !== undefined;
  const serverOptions: tls.TlsOptions = { cert, key, ca, minVersion: 'TLSv1.2', requestCert: verifyPeer, rejectUnauthorized: verifyPeer };
  return {
    mode: options.mode,
    upgrade: (connection) => {
      const raw = socketOf(connection);
      // A tls.Server that never listens runs the server side of the handshake on the socket handed
      // to it: unlike a bare TLSSocket, it verifies the client's certificate and drops the
      // connection when it is missing or not signed by the CA. One per connection, so that its
      // events belong to this connection (it costs a parse of the credentials, small next to the
      // handshake).
      const server = tls.createServer(serverOptions);
      const upgraded = new TlsConnection(connection.remoteAddress, raw);
      server.once('secureConnection', (socket: tls.TLSSocket) => upgraded.secured(socket));
      server.once('tlsClientError', (error: Error) => upgraded.failed(error));
      raw.once('close', () => upgraded.failed(new Error('the connection closed during the TLS handshake')));
      server.emit('connection', raw);
      return upgraded;
    },
  };
}

export interface NbdTlsClientOptions {
  /** PEM CA certificate(s) that must have signed the server's certificate. */
  readonly ca: Buffer;
  /** Client certificate and key, for servers that verify their clients. */
  readonly cert?: Buffer;
  readonly key?: Buffer;
  /** The name the server's certificate must carry (default "localhost"). */
  readonly servername?: string;
}

/**
 * The client side: after NBD_REP_ACK to NBD_OPT_STARTTLS, runs the TLS handshake on the
 * connection's socket and resolves with the Connection to use from then on. Errors: NOT_SUPPORTED
 * outside the Node environment; UNAVAILABLE when the handshake fails (with the TLS error).
 */
export function upgradeClientConnection(connection: Connection, options: NbdTlsClientOptions): Promise<Connection> {
  const raw = socketOf(connection);
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ socket: raw, ca: options.ca, cert: options.cert, key: options.key, servername: options.servername ?? 'localhost', minVersion: 'TLSv1.2' });
    const onError = (error: Error): void => reject(new ShaleError('UNAVAILABLE', `TLS handshake with ${connection.remoteAddress} failed: ${error.message}`));
    socket.once('error', onError);
    socket.once('secureConnect', () => {
      socket.off('error', onError);
      resolve(new TlsConnection(connection.remoteAddress, raw, socket));
    });
  });
}

function socketOf(connection: Connection): Duplex {
  const socket: unknown = (connection as { readonly socket?: unknown }).socket;
  if (!(socket instanceof Duplex)) {
    throw new ShaleError('NOT_SUPPORTED', 'TLS needs a connection of the Node environment (one with a socket to upgrade)');
  }
  return socket;
}

/**
 * A Connection over a TLS socket; the same contract as the Node environment's NodeConnection. On
 * the server side the socket only exists once the handshake has succeeded (`secured`): until then
 * listeners and the paused state are kept, and a failed handshake (`failed`) closes the connection
 * with the TLS error. Nothing is written before that: the client speaks first after STARTTLS.
 */
class TlsConnection implements Connection {
  readonly remoteAddress: string;
  /** The plaintext socket the TLS layer runs on. */
  readonly #raw: Duplex;
  #socket: tls.TLSSocket | undefined;
  #handshakeFailed = false;
  #closed = false;
  #paused = false;
  readonly #dataListeners: ((chunk: Buffer) => void)[] = [];
  readonly #drainListeners: (() => void)[] = [];
  readonly #closeListeners: ((error?: Error) => void)[] = [];
  #lastError: Error | undefined;

  constructor(remoteAddress: string, raw: Duplex, socket?: tls.TLSSocket) {
    this.remoteAddress = remoteAddress;
    this.#raw = raw;
    if (socket !== undefined) this.secured(socket);
  }

  /** The handshake succeeded: from now on everything goes through `socket`. */
  secured(socket: tls.TLSSocket): void {
    if (this.#handshakeFailed || this.#socket !== undefined) {
      socket.destroy();
      return;
    }
    this.#socket = socket;
    socket.on('error', (error) => {
      this.#lastError = error;
    });
    socket.on('close', () => this.#close());
    for (const listener of this.#dataListeners) socket.on('data', listener);
    for (const listener of this.#drainListeners) socket.on('drain', listener);
    if (this.#paused) socket.pause();
  }

  /** The handshake failed (or the socket closed before it ended): close with the error. */
  failed(error: Error): void {
    if (this.#socket !== undefined || this.#handshakeFailed) return;
    this.#handshakeFailed = true;
    this.#lastError = error;
    this.#raw.destroy();
    this.#close();
  }

  #close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const listener of this.#closeListeners) listener(this.#lastError);
  }

  get closed(): boolean {
    return this.#closed || this.#socket?.destroyed === true;
  }

  /** The TLS socket once the handshake is done (for peer certificate checks). */
  get socket(): tls.TLSSocket | undefined {
    return this.#socket;
  }

  write(data: Buffer | readonly Buffer[], onWritten?: () => void): boolean {
    return writeToStream(this.closed ? undefined : this.#socket, data, onWritten);
  }

  onData(listener: (chunk: Buffer) => void): void {
    this.#dataListeners.push(listener);
    this.#socket?.on('data', listener);
  }

  onDrain(listener: () => void): void {
    this.#drainListeners.push(listener);
    this.#socket?.on('drain', listener);
  }

  onClose(listener: (error?: Error) => void): void {
    this.#closeListeners.push(listener);
  }

  pause(): void {
    this.#paused = true;
    this.#socket?.pause();
  }

  resume(): void {
    this.#paused = false;
    this.#socket?.resume();
  }

  end(): void {
    this.#socket?.end();
  }

  destroy(error?: Error): void {
    if (this.#socket !== undefined) this.#socket.destroy(error);
    else this.failed(error ?? new Error('closed during the TLS handshake'));
  }
}
