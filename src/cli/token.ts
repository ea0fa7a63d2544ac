/**
 * Where the CLI keeps and finds the cluster's admin token. The token never goes on a command
 * line or into a log: it lives in a file of mode 0600 or in the SHALE_TOKEN environment variable.
 *
 * Files, under the config directory ($SHALE_CONFIG_DIR, else $XDG_CONFIG_HOME/shale, else
 * ~/.config/shale; created with mode 0700):
 *   token                       the token of the cluster started last (shale conductor, shale up)
 *   tokens/<host>_<port>        the token of the conductor at that address, so several clusters
 *                               on one machine (tests, say) do not overwrite each other's
 * Lookup for a call to API URL U: SHALE_TOKEN → tokens/<host of U>_<port of U> → token.
 */
import { chmodSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';

type Environment = Readonly<Record<string, string | undefined>>;

export function configDirectory(env: Environment): string {
  if (env.SHALE_CONFIG_DIR) return env.SHALE_CONFIG_DIR;
  if (env.XDG_CONFIG_HOME) return join(env.XDG_CONFIG_HOME, 'shale');
  return join(env.HOME || homedir(), '.config', 'shale');
}

/** "http://127.0.0.1:49180/…" → "127.0.0.1_49180" (undefined for what is not a URL). */
export function endpointFileName(url: string): string | undefined {
  try {
    const parsed = new URL(/^[a-z][a-z0-9+.-]*:\/\//i.test(url) ? url : `http://${url}`);
    const port = parsed.port || (parsed.protocol === 'https:' ? '443' : '80');
    return `${parsed.hostname.replace(/[^A-Za-z0-9.-]/g, '_')}_${port}`;
  } catch {
    return undefined;
  }
}

export interface TokenLookup {
  token: string | undefined;
  /** Where it came from, or every place looked, for messages. */
  source: string;
}

/** The token for calls to `apiUrl`. `read` returns a file's text or undefined. */
export function findToken(env: Environment, apiUrl: string, read: (path: string) => string | undefined): TokenLookup {
  if (env.SHALE_TOKEN) return { token: env.SHALE_TOKEN.trim(), source: 'SHALE_TOKEN' };
  const dir = configDirectory(env);
  const candidates: string[] = [];
  const perEndpoint = endpointFileName(apiUrl);
  if (perEndpoint) candidates.push(join(dir, 'tokens', perEndpoint));
  candidates.push(join(dir, 'token'));
  for (const path of candidates) {
    const text = read(path)?.trim();
    if (text) return { token: text, source: path };
  }
  return { token: undefined, source: `SHALE_TOKEN, ${candidates.join(', ')}` };
}

export function readTextFile(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return undefined;
  }
}

function writePrivate(path: string, text: string): void {
  const temporary = `${path}.${process.pid}.tmp`;
  writeFileSync(temporary, text, { mode: 0o600 });
  chmodSync(temporary, 0o600);
  renameSync(temporary, path);
}

/**
 * Saves `token` as the config directory's `token` and as the one for `apiUrls` (mode 0600).
 * Returns the path of the main file.
 */
export function saveToken(env: Environment, token: string, apiUrls: readonly string[]): string {
  const dir = configDirectory(env);
  mkdirSync(join(dir, 'tokens'), { recursive: true, mode: 0o700 });
  const main = join(dir, 'token');
  writePrivate(main, `${token}\n`);
  for (const url of apiUrls) {
    const name = endpointFileName(url);
    if (name) writePrivate(join(dir, 'tokens', name), `${token}\n`);
  }
  return main;
}

/** Writes a token file of mode 0600 at `path` (shale up keeps its cluster's token in its data directory). */
export function writeTokenFile(path: string, token: string): void {
  writePrivate(path, `${token}\n`);
}
