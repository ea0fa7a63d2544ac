/**
 * The CLI's calls to the conductor's HTTP API (src/conductor/api/types.ts). The CLI is the one
 * place outside src/env/ that uses the network directly (global fetch): it is a short-lived
 * process with nothing to simulate. Every failure becomes a ShaleError with the API's code, and
 * an API that cannot be reached is UNAVAILABLE with a hint.
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

export class AdminApi {
  readonly baseUrl: string;
  readonly #fetch: typeof fetch;

  constructor(baseUrl: string, fetchImpl: typeof fetch = fetch) {
    this.baseUrl = normalizeApiUrl(baseUrl);
    this.#fetch = fetchImpl;
  }

  async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const url = `${this.baseUrl}/api/v1${path}`;
    let response: Response;
    try {
      response = await this.#fetch(url, {
        method,
        headers: body === undefined ? {} : { 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(apiTimeoutMs),
      });
    } catch (error) {
      const cause = (error as { cause?: { code?: string; message?: string } }).cause;
      const reason = (error as Error).name === 'TimeoutError'
        ? `no answer within ${apiTimeoutMs / 1000} s`
        : cause?.code ?? cause?.message ?? (error as Error).message;
      throw new ShaleError('UNAVAILABLE', `cannot reach the Shale API at ${this.baseUrl} (${reason}): is \`shale up\` or \`shale conductor\` running? Point --api or SHALE_API at it`);
    }
    const text = await response.text();
    let parsed: unknown;
    try {
      parsed = text.length > 0 ? JSON.parse(text) : {};
    } catch {
      throw new ShaleError('PROTOCOL', `${this.baseUrl} answered ${method} ${path} with status ${response.status} and no JSON: is it a Shale API?`);
    }
    if (!response.ok) {
      const errorBody = (parsed ?? {}) as { code?: unknown; message?: unknown };
      const code = isErrorCode(errorBody.code) ? errorBody.code : 'INTERNAL';
      const message = typeof errorBody.message === 'string' ? errorBody.message : `the API answered ${response.status}`;
      throw new ShaleError(code, message);
    }
    return parsed as T;
  }
}
