/**
 * The `shale` command line: runs any role (`up`, `conductor`, `store`, `nbd`) and administers a
 * cluster through the conductor's HTTP API (src/cli/admin.ts).
 */
process.env.UV_THREADPOOL_SIZE ??= '16';

import { setFlagsFromString } from 'node:v8';
import { Command, CommanderError } from 'commander';
import { registerAdminCommands } from './admin.ts';
import { exitWithError } from './output.ts';
import { registerRoleCommands } from './roles.ts';
import { registerSnapshotCommands } from './snapshot-commands.ts';
import { registerUpCommand } from './up.ts';

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
