/**
 * The CLI's calls to the conductor's HTTP API (src/conductor/api/types.ts). The CLI is the one
 * place outside src/env/ that uses the network directly (global fetch): it is a short-lived
 * process with nothing to simulate. Every failure becomes a ShaleError with the API's code, and
 * an API that cannot be reached is UNAVAILABLE with a hint.
 *
 * --api may list several conductors ("http://a:49180,http://b:49180"): the first that answers
 * is used. A standby sends changes to the leader with a 307; the CLI follows it itself (fetch
 * would drop the Authorization header on a redirect to another port) and sends the token again.
 */
import { isErrorCode, ShaleError } from '../lib/errors.ts';

export const defaultApiUrl = 'http://127.0.0.1:49180';
export const apiTimeoutMs = 30_000;

/** "http://h:p", "h:p" or "http://h:p/api/v1/" → "http://h:p". Errors: INVALID_ARGUMENT. */
export function normalizeApiUrl(text: string): string {
  const withScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(text) ? text : `http://${text}`;
  let url: URL;
  try {
    url = new URL(withScheme);
  } catch {
    throw new ShaleError('INVALID_ARGUMENT', `--api: "${text}" is not a URL (example: http://127.0.0.1:49180)`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new ShaleError('INVALID_ARGUMENT', `--api: "${text}" must be an http:// or https:// URL`);
  }
  return `${url.origin}${url.pathname.replace(/\/+$/, '').replace(/\/api\/v1$/, '')}`;
}

/** Redirects followed for one call. */
export const redirectsMax = 3;

export class AdminApi {
  readonly baseUrl: string;
  readonly baseUrls: readonly string[];
  readonly #fetch: typeof fetch;
  readonly #token: string | undefined;
  readonly #tokenSource: string;

  /** `baseUrl`: one URL or several, comma separated. `token`: sent as a bearer token when given. */
  constructor(baseUrl: string, fetchImpl: typeof fetch = fetch, token?: string, tokenSource = 'SHALE_TOKEN') {
    const urls = baseUrl.split(',').map((part) => part.trim()).filter((part) => part.length > 0);
    if (urls.length === 0) throw new ShaleError('INVALID_ARGUMENT', '--api: no URL given (example: http://127.0.0.1:49180)');
    this.baseUrls = urls.map(normalizeApiUrl);
    this.baseUrl = this.baseUrls[0]!;
    this.#fetch = fetchImpl;
    this.#token = token;
    this.#tokenSource = tokenSource;
  }

  async call<T>(method: string, path: string, body?: unknown, timeoutMs = apiTimeoutMs): Promise<T> {
    let lastError: unknown;
    for (const base of this.baseUrls) {
      try {
        return await this.#callOne<T>(base, method, path, body, timeoutMs);
      } catch (error) {
        lastError = error;
        if (!(error instanceof ShaleError) || error.code !== 'UNAVAILABLE') throw error;
      }
    }
    throw lastError;
  }

  async #callOne<T>(base: string, method: string, path: string, body: unknown, timeoutMs: number): Promise<T> {
    let url = `${base}/api/v1${path}`;
    const headers: Record<string, string> = body === undefined ? {} : { 'content-type': 'application/json' };
    if (this.#token) headers.authorization = `Bearer ${this.#token}`;
    let response: Response;
    for (let redirects = 0; ; redirects++) {
      try {
        response = await this.#fetch(url, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
          redirect: 'manual',
          signal: AbortSignal.timeout(timeoutMs),
        });
      } catch (error) {
        const cause = (error as { cause?: { code?: string; message?: string } }).cause;
        const reason = (error as Error).name === 'TimeoutError'
          ? `no answer within ${timeoutMs / 1000} s`
          : cause?.code ?? cause?.message ?? (error as Error).message;
        throw new ShaleError('UNAVAILABLE', `cannot reach the Shale API at ${base} (${reason}): is \`shale up\` or \`shale conductor\` running? Point --api or SHALE_API at it`);
      }
      const location = response.headers.get('location');
      if ((response.status === 307 || response.status === 308) && location && redirects < redirectsMax) {
        await response.text().catch(() => '');
        url = new URL(location, url).href;
        continue;
      }
      break;
    }
    const text = await response.text();
    let parsed: unknown;
    try {
      parsed = text.length > 0 ? JSON.parse(text) : {};
    } catch {
      throw new ShaleError('PROTOCOL', `${base} answered ${method} ${path} with status ${response.status} and no JSON: is it a Shale API?`);
    }
    if (!response.ok) {
      const errorBody = (parsed ?? {}) as { code?: unknown; message?: unknown };
      const code = isErrorCode(errorBody.code) ? errorBody.code : 'INTERNAL';
      let message = typeof errorBody.message === 'string' ? errorBody.message : `the API answered ${response.status}`;
      if (code === 'UNAUTHENTICATED') {
        message = this.#token
          ? `${message} (token from ${this.#tokenSource})`
          : `no admin token found (looked in ${this.#tokenSource}): set SHALE_TOKEN, or SHALE_CONFIG_DIR to the directory where \`shale conductor\` or \`shale up\` saved it`;
      }
      throw new ShaleError(code, message);
    }
    return parsed as T;
  }
}
