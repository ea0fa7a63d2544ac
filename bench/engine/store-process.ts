/**
 * A store process for the benchmark: opens (formatting if new) one disk with the log engine and
 * serves it with the production StoreServer on a unix socket. Prints "ready <address>" and stops
 * cleanly on SIGTERM. Usage: node bench/engine/store-process.ts DISK SIZE_BYTES SOCKET
 */
import { nodeEnv } from '../../src/env/node/node-env.ts';
import { openLogEngine } from '../../src/store/open-engine.ts';
import { StoreServer } from '../../src/store/store-server.ts';

process.env.UV_THREADPOOL_SIZE ??= '16';
const [disk, size, socket] = process.argv.slice(2) as [string, string, string];
const engine = await openLogEngine(nodeEnv, { path: disk, clusterId: 'bench', format: true, sizeBytes: Number(size) });
const view = {
  ready: true,
  pgEpoch: () => 0,
  notePgEpoch: () => {},
  canServeReads: () => true,
  isDeleted: () => false,
};
const server = new StoreServer(nodeEnv, { engine, view, log: (message: string) => console.error(message) });
const address = await server.listen(`unix:${socket}`);
console.log(`ready ${address}`);
process.on('SIGTERM', () => {
  void (async () => {
    await server.close();
    await engine.close();
    process.exit(0);
  })();
});
