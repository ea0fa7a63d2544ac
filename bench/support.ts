/** What the benchmark scripts share: the CLI's path, progress lines on stderr, a free TCP port. */
import { createServer } from 'node:net';
import { fileURLToPath } from 'node:url';

export const MAIN = fileURLToPath(new URL('../src/cli/main.ts', import.meta.url));

export function log(message: string): void {
  process.stderr.write(`[bench] ${message}\n`);
}

/** A port on 127.0.0.1 that was free a moment ago (for servers started as child processes). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no free port'))));
    });
  });
}
