/**
 * The `shale` command line: runs any role (`up`, `conductor`, `store`, `nbd`) and administers a
 * cluster through the conductor's HTTP API (src/cli/admin.ts).
 */
process.env.UV_THREADPOOL_SIZE ??= '16';

import { Command, CommanderError } from 'commander';
import { registerAdminCommands } from './admin.ts';
import { exitWithError } from './output.ts';
import { registerRoleCommands } from './roles.ts';
import { registerSnapshotCommands } from './snapshot-commands.ts';
import { registerUpCommand } from './up.ts';

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
