/**
 * The `shale` command line: runs any role (`up`, `conductor`, `store`, `nbd`) and administers a
 * cluster through the conductor's HTTP API (src/cli/admin.ts).
 */
import { availableParallelism } from 'node:os';
import { setFlagsFromString } from 'node:v8';
import { Command, CommanderError } from 'commander';
import { registerAdminCommands } from './admin.ts';
import { exitWithError } from './output.ts';
import { registerRoleCommands } from './roles.ts';
import { registerSnapshotCommands } from './snapshot-commands.ts';
import { registerUpCommand } from './up.ts';

/**
 * libuv's thread pool does the reads that are not synchronous (cache misses, large reads) and the
 * syncs. Two threads per core, at least 4: on this project's 2-core VM, 16 threads made reads
 * through the pool cost 44–51 CPU µs each against 27–36 with 4, as the threads woke each other
 * and switched; cold 4 KiB reads at queue depth 32 went 13–18k IOPS with 16, 21–23k with 4
 * (docs/benchmarks.md). Read before the pool starts, on the first asynchronous file operation.
 */
process.env.UV_THREADPOOL_SIZE ??= String(Math.min(64, Math.max(4, 2 * availableParallelism())));

// Every I/O buffer is memory outside V8's heap. By default V8 starts a full mark-compact each time
// a few tens of MiB of it were allocated: at 1 MiB per request that is a full GC every few dozen
// requests, and profiles of 1 MiB sequential I/O showed half the CPU in marking and sweeping.
// Counting it in the global heap limit instead roughly halved the CPU per 1 MiB request and took
// peak RSS from ~260 to ~320 MiB (docs/benchmarks.md).
setFlagsFromString('--external-memory-accounted-in-global-limit');

const program = new Command('shale')
  .description('Shale: replicated block volumes over NBD and S3 buckets on ordinary servers')
  .version('0.1.0')
  .showHelpAfterError()
  .exitOverride();

registerUpCommand(program);
registerRoleCommands(program);
registerAdminCommands(program);
registerSnapshotCommands(program);

try {
  await program.parseAsync(process.argv);
} catch (error) {
  if (error instanceof CommanderError) {
    // --help and --version end here too, with code 0.
    process.exit(error.exitCode === 0 ? 0 : 2);
  }
  exitWithError(error);
}
