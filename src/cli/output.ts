/**
 * How the CLI reports a failure: one line on stderr, `shale: <message> (<CODE>)`, and the exit
 * code of the error table.
 */
import { codeOf, ErrorCodes, ShaleError } from '../lib/errors.ts';

export function exitWithError(error: unknown): never {
  const code = codeOf(error);
  const message = error instanceof Error ? error.message : String(error);
  process.stderr.write(`shale: ${message} (${code})\n`);
  if (!(error instanceof ShaleError) && error instanceof Error && error.stack) process.stderr.write(`${error.stack}\n`);
  process.exit(ErrorCodes[code].exitCode);
}

/** A logger for daemons: one line per message on stderr, with time and role. */
export function makeLog(role: string): (message: string) => void {
  return (message: string) => {
    process.stderr.write(`${new Date().toISOString()} ${role}: ${message}\n`);
  };
}
