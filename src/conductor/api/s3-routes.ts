/**
 * The conductor's S3 administration routes (accounts, access keys, buckets, data id ranges):
 * used by `shale key …` and by S3 gateways, with the admin token like every route.
 */
import { ShaleError } from '../../lib/errors.ts';
import type { S3Registry } from '../s3-registry.ts';
import { integerField, optionalBooleanField, optionalIntegerField, stringField, type JsonObject } from '../validate.ts';

interface RouteRequest {
  params: string[];
  query: URLSearchParams;
  body: JsonObject;
}

type MakeRoute<R> = (method: string, path: string, handle: (request: RouteRequest) => Promise<{ status?: number; body?: unknown }>) => R;

function segment(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw new ShaleError('INVALID_ARGUMENT', `bad percent-encoding in the path: "${text}"`);
  }
}

function optionalString(body: JsonObject, name: string): string | undefined {
  return body[name] === undefined || body[name] === null ? undefined : stringField(body, name);
}

export function s3Routes<R>(registry: () => S3Registry, route: MakeRoute<R>): R[] {
  return [
    route('POST', '/s3/keys', async ({ body }) => ({
      status: 201,
      body: await registry().createKey({ account: stringField(body, 'account'), accessKey: optionalString(body, 'accessKey'), secretKey: optionalString(body, 'secretKey') }),
    })),
    route('GET', '/s3/keys', async () => ({ body: { keys: await registry().keys() } })),
    route('GET', '/s3/keys/{accessKey}', async ({ params }) => ({ body: await registry().key(segment(params[0]!)) })),
    route('DELETE', '/s3/keys/{accessKey}', async ({ params }) => {
      await registry().deleteKey(segment(params[0]!));
      return { body: { ok: true } };
    }),
    route('POST', '/s3/buckets', async ({ body }) => ({
      status: 201,
      body: await registry().createBucket({ name: stringField(body, 'name'), account: stringField(body, 'account'), shardCount: optionalIntegerField(body, 'shardCount', 1, 256) }),
    })),
    route('GET', '/s3/buckets', async () => ({ body: { buckets: await registry().buckets() } })),
    route('GET', '/s3/buckets/{name}', async ({ params }) => ({ body: await registry().bucket(segment(params[0]!)) })),
    route('PATCH', '/s3/buckets/{name}', async ({ params, body }) => ({ body: await registry().setPublicRead(segment(params[0]!), optionalBooleanField(body, 'publicRead')) })),
    route('DELETE', '/s3/buckets/{name}', async ({ params }) => {
      await registry().deleteBucket(segment(params[0]!));
      return { body: { ok: true } };
    }),
    route('POST', '/s3/ids', async ({ body }) => ({ body: await registry().allocateDataIds(integerField(body, 'count', 1, 65_536)) })),
  ];
}
