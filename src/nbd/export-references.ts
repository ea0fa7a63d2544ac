/**
 * Counts who holds each open NbdExport, so `release()` is called exactly once when the last holder
 * lets go. A holder is a connection in transmission, or an NBD_OPT_INFO reply being built.
 *
 * The provider returns one shared instance per export name (that is what makes CAN_MULTI_CONN
 * true). If it hands back an instance whose release is still running, the acquirer waits for the
 * release to finish and asks the provider again, so nobody uses an export after its release().
 */
import { assert } from '../lib/assert.ts';
import { ShaleError } from '../lib/errors.ts';
import type { ExportProvider, NbdExport } from './server.ts';

/** How often acquire asks the provider again when it keeps returning an export being released. */
const ACQUIRE_ATTEMPTS_MAX = 4;

export class ExportReferences {
  readonly #provider: ExportProvider;
  readonly #log: (message: string) => void;
  readonly #holders = new Map<NbdExport, number>();
  readonly #releasing = new Map<NbdExport, Promise<void>>();

  constructor(provider: ExportProvider, log: (message: string) => void) {
    this.#provider = provider;
    this.#log = log;
  }

  /**
   * Opens `name` through the provider and counts one holder. Errors: whatever the provider throws
   * (NOT_FOUND for an unknown export), UNAVAILABLE if the export stays in release.
   */
  async acquire(name: string): Promise<NbdExport> {
    for (let attempt = 0; attempt < ACQUIRE_ATTEMPTS_MAX; attempt++) {
      const opened = await this.#provider.open(name);
      assert(typeof opened === 'object' && opened !== null, 'the provider returns an export');
      assert(Number.isSafeInteger(opened.sizeBytes) && opened.sizeBytes >= 0, 'an export size is a safe non-negative integer');
      const releasing = this.#releasing.get(opened);
      if (releasing !== undefined) {
        await releasing;
        continue;
      }
      this.#holders.set(opened, (this.#holders.get(opened) ?? 0) + 1);
      return opened;
    }
    throw new ShaleError('UNAVAILABLE', `export "${name}" is being released; try again`);
  }

  /** Drops one holder; the last one calls the export's release() (errors are logged, not thrown). */
  release(opened: NbdExport): void {
    const holders = this.#holders.get(opened);
    assert(holders !== undefined && holders > 0, 'release follows acquire');
    if (holders > 1) {
      this.#holders.set(opened, holders - 1);
      return;
    }
    this.#holders.delete(opened);
    const releasing = (async () => {
      try {
        await opened.release();
      } catch (error) {
        this.#log(`nbd: release of export "${opened.name}" failed: ${error instanceof Error ? error.message : String(error)}`);
      } finally {
        this.#releasing.delete(opened);
      }
    })();
    this.#releasing.set(opened, releasing);
  }

  holders(opened: NbdExport): number {
    return this.#holders.get(opened) ?? 0;
  }

  /** Resolves when every release() started so far has finished. */
  async settled(): Promise<void> {
    while (this.#releasing.size > 0) await Promise.all(this.#releasing.values());
  }
}
