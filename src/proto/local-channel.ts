/**
 * The in-process transport to a store (DESIGN §9: "the store engine can run inside the gateway's
 * process when a replica is local"). A LocalStores registry, shared by a store daemon and a client
 * library living in the same process, maps the store's address to its server; the client then
 * calls the server directly instead of going through a socket. Same requests, same checks, same
 * errors as StoreChannel, without framing, copies of write payloads or event-loop hops.
 */
import { errorCodeFromWire, ShaleError, toShaleError } from '../lib/errors.ts';
import { emptyHeader, encodeChecksums, Op, type Frame, type FrameHeader } from './store-protocol.ts';
import type { LocalReadFields, LocalReadResult, LocalWriteFields, StoreRequester, WriteDone } from './store-channel.ts';

export interface LocalStoreEndpoint {
  /** Resolves with the reply's header and payload parts; rejects with the ShaleError a socket client would get as a status. */
  serveLocal(frame: Frame): Promise<{ header: FrameHeader; parts: Buffer[] }>;
  /** A READ done synchronously, or undefined (then serveLocal gives the answer or the error). */
  readLocalNow?(fields: LocalReadFields): LocalReadResult | undefined;
  /** A READ without the wire format, or undefined; a rejection means: ask serveLocal. */
  readLocal?(fields: LocalReadFields): Promise<LocalReadResult> | undefined;
  /**
   * A volume WRITE taken without the wire format (true), settled through `done` later, or false:
   * the store can't take it so (serveLocal then gives the answer or the error).
   */
  writeLocalNow?(fields: LocalWriteFields, checksums: Uint32Array, data: Buffer, done: WriteDone): boolean;
}

/** Stores served by this process, by the address they registered with. */
export class LocalStores {
  readonly #endpoints = new Map<string, LocalStoreEndpoint>();

  add(address: string, endpoint: LocalStoreEndpoint): void {
    this.#endpoints.set(address, endpoint);
  }

  remove(address: string): void {
    this.#endpoints.delete(address);
  }

  get(address: string): LocalStoreEndpoint | undefined {
    return this.#endpoints.get(address);
  }
}

const EMPTY = Buffer.alloc(0);

export class LocalChannel implements StoreRequester {
  readonly address: string;
  readonly #endpoint: LocalStoreEndpoint;
  #inFlight = 0;
  #closed = false;

  constructor(address: string, endpoint: LocalStoreEndpoint) {
    this.address = address;
    this.#endpoint = endpoint;
  }

  get inFlight(): number {
    return this.#inFlight;
  }

  async request(fields: Partial<FrameHeader> & { op: number }, payload: readonly Buffer[] = []): Promise<Frame> {
    if (this.#closed) throw new ShaleError('SHUTTING_DOWN', `channel to ${this.address} is closed`);
    let payloadBytes = 0;
    for (const part of payload) payloadBytes += part.length;
    const header: FrameHeader = { ...emptyHeader(), ...fields, payloadBytes };
    const single = payload.length === 1 ? payload[0]! : undefined;
    this.#inFlight++;
    try {
      // A multi-part payload (a WRITE's checksums and data) travels as its parts, never concatenated.
      const reply = await this.#endpoint.serveLocal({ header, payload: single ?? EMPTY, parts: payload });
      if (reply.header.status !== 0) {
        throw new ShaleError(errorCodeFromWire(reply.header.status), `store ${this.address}: ${Buffer.concat(reply.parts).toString('utf8')}`);
      }
      const parts = reply.parts;
      // The store verified every block's crc32c as it read it, in this process: no transit to check again.
      if (parts.length <= 1) return { header: reply.header, payload: parts[0] ?? EMPTY, parts, verified: true };
      // Several parts (a READ's descriptors and data): readers that know the parts use them; the
      // payload is joined (a copy) only for one that asks for it.
      let joined: Buffer | undefined;
      return {
        header: reply.header,
        parts,
        verified: true,
        get payload(): Buffer {
          joined ??= Buffer.concat(parts);
          return joined;
        },
      };
    } finally {
      this.#inFlight--;
    }
  }

  readNow(fields: LocalReadFields): LocalReadResult | undefined {
    if (this.#closed) return undefined;
    return this.#endpoint.readLocalNow?.(fields);
  }

  readLocal(fields: LocalReadFields): Promise<LocalReadResult> | undefined {
    if (this.#closed) return undefined;
    return this.#endpoint.readLocal?.(fields);
  }

  writeNow(fields: LocalWriteFields, checksums: Uint32Array, data: Buffer, done: WriteDone): void {
    this.#inFlight++;
    const settle: WriteDone = (error) => {
      this.#inFlight--;
      done(error);
    };
    if (!this.#closed && this.#endpoint.writeLocalNow?.(fields, checksums, data, settle) === true) return;
    // Declined: the same write as a request, which reports what made the store decline (if anything still does).
    this.#inFlight--;
    this.request({ ...fields, op: Op.WRITE }, [encodeChecksums(checksums), data]).then(
      () => done(undefined),
      (error: unknown) => done(toShaleError(error)),
    );
  }

  close(): void {
    this.#closed = true;
  }

  reset(): void {}
}
