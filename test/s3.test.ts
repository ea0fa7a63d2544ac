/**
 * The S3 gateway of `shale up` (a real child process with 3 store processes), driven by the real
 * clients: the AWS SDK for JavaScript v3 (client-s3, lib-storage, the presigner), Debian's awscli
 * and s3cmd. Wrong credentials get the right 403s; a store killed with kill -9 in the middle of a
 * multipart upload does not stop it, and the object reads back exact.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  CopyObjectCommand, CreateBucketCommand, DeleteBucketCommand, DeleteObjectCommand, DeleteObjectsCommand, GetBucketLocationCommand, GetObjectCommand,
  HeadBucketCommand, HeadObjectCommand, ListBucketsCommand, ListObjectsCommand, ListObjectsV2Command, PutObjectCommand, S3Client,
  CreateMultipartUploadCommand, UploadPartCommand, CompleteMultipartUploadCommand, AbortMultipartUploadCommand, ListPartsCommand,
  ListMultipartUploadsCommand, UploadPartCopyCommand, PutBucketPolicyCommand, GetBucketAclCommand,
} from '@aws-sdk/client-s3';
import { Upload } from '@aws-sdk/lib-storage';
import { getSignedUrl } from '@aws-sdk/s3-request-presigner';
import { requireTool, run, shale, ShaleUp, temporaryDirectory } from './harness.ts';

const MiB = 1024 * 1024;
const ALICE = { accessKeyId: 'AKALICETEST', secretAccessKey: 'alice-secret-key-0001' };
const BOB = { accessKeyId: 'AKBOBTEST', secretAccessKey: 'bob-secret-key-0002' };

function md5(data: Buffer): string {
  return createHash('md5').update(data).digest('hex');
}

async function errorOf(promise: Promise<unknown>): Promise<{ name: string; status: number | undefined }> {
  try {
    await promise;
  } catch (error) {
    const failure = error as { name: string; $metadata?: { httpStatusCode?: number } };
    return { name: failure.name, status: failure.$metadata?.httpStatusCode };
  }
  assert.fail('the request was expected to fail');
}

describe('S3 gateway of shale up, with real clients', () => {
  const dir = temporaryDirectory('s3');
  let cluster: ShaleUp;
  let endpoint: string;
  let alice: S3Client;
  let bob: S3Client;

  const client = (credentials: { accessKeyId: string; secretAccessKey: string }, options: { forcePathStyle?: boolean } = {}): S3Client =>
    new S3Client({ endpoint, region: 'us-east-1', credentials, forcePathStyle: options.forcePathStyle ?? true, maxAttempts: 1 });

  before(async () => {
    for (const tool of ['/usr/bin/aws', 's3cmd']) requireTool(tool);
    cluster = new ShaleUp(join(dir.path, 'data'), ['--disk-size', '1G', '--heartbeat-timeout', '2s', '--restart-delay', '3s']);
    await cluster.start();
    endpoint = cluster.s3Endpoint;
    process.env.SHALE_TOKEN = readFileSync(join(dir.path, 'data', 'token'), 'utf8').trim();
    for (const [account, key] of [['alice', ALICE], ['bob', BOB]] as const) {
      const created = await shale(cluster.api, 'key', 'create', '--account', account, '--access-key', key.accessKeyId, '--secret-key', key.secretAccessKey);
      assert.equal(created.status, 0, created.stderr);
    }
    alice = client(ALICE);
    bob = client(BOB);
  });

  after(async () => {
    alice?.destroy();
    bob?.destroy();
    await cluster?.stop();
    dir.remove();
  });

  test('keys: the CLI creates, lists and deletes them; a duplicate is refused', async () => {
    const listed = await shale(cluster.api, 'key', 'list', '--json');
    assert.equal(listed.status, 0, listed.stderr);
    const keys = (JSON.parse(listed.stdout) as { keys: { accessKey: string; account: string; secretKey?: string }[] }).keys;
    assert.deepEqual(keys.map((key) => [key.accessKey, key.account]).sort(), [['AKALICETEST', 'alice'], ['AKBOBTEST', 'bob']]);
    assert.ok(keys.every((key) => key.secretKey === undefined), 'list shows no secrets');
    const generated = await shale(cluster.api, 'key', 'create', '--account', 'carol', '--json');
    assert.equal(generated.status, 0, generated.stderr);
    const carol = JSON.parse(generated.stdout) as { accessKey: string; secretKey: string };
    assert.match(carol.accessKey, /^[A-Z0-9]{20}$/);
    const duplicate = await shale(cluster.api, 'key', 'create', '--account', 'alice', '--access-key', ALICE.accessKeyId, '--secret-key', 'whatever-secret');
    assert.equal(duplicate.status, 4, duplicate.stderr);
    const missing = await shale(cluster.api, 'key', 'create');
    assert.notEqual(missing.status, 0);
    assert.match(missing.stderr, /--account/);
    // A deleted key is refused (after the gateway's short cache).
    const carolClient = client({ accessKeyId: carol.accessKey, secretAccessKey: carol.secretKey });
    await carolClient.send(new ListBucketsCommand({}));
    assert.equal((await shale(cluster.api, 'key', 'delete', carol.accessKey)).status, 0);
    await new Promise((resolve) => setTimeout(resolve, 2500));
    assert.deepEqual(await errorOf(carolClient.send(new ListBucketsCommand({}))), { name: 'InvalidAccessKeyId', status: 403 });
    carolClient.destroy();
  });

  test('buckets: create with name rules, head, list, location, not-empty delete, other accounts refused', async () => {
    await alice.send(new CreateBucketCommand({ Bucket: 'alpha' }));
    await alice.send(new PutObjectCommand({ Bucket: 'alpha', Key: 'survives', Body: 'kept' }));
    // Creating one's own bucket again succeeds and changes nothing (S3 in us-east-1).
    await alice.send(new CreateBucketCommand({ Bucket: 'alpha' }));
    assert.equal(await (await alice.send(new GetObjectCommand({ Bucket: 'alpha', Key: 'survives' }))).Body!.transformToString(), 'kept');
    await alice.send(new DeleteObjectCommand({ Bucket: 'alpha', Key: 'survives' }));
    assert.deepEqual(await errorOf(bob.send(new CreateBucketCommand({ Bucket: 'alpha' }))), { name: 'BucketAlreadyExists', status: 409 });
    assert.equal((await errorOf(alice.send(new CreateBucketCommand({ Bucket: 'Bad_Name' })))).status, 400);
    assert.equal((await errorOf(alice.send(new CreateBucketCommand({ Bucket: '192.168.1.1' })))).name, 'InvalidBucketName');
    await alice.send(new HeadBucketCommand({ Bucket: 'alpha' }));
    // No ACLs beyond "the owner has full control": shown as such; anything else is NotImplemented.
    const acl = await alice.send(new GetBucketAclCommand({ Bucket: 'alpha' }));
    assert.deepEqual(acl.Grants?.map((grant) => [grant.Grantee?.ID, grant.Permission]), [['alice', 'FULL_CONTROL']]);
    assert.deepEqual(await errorOf(alice.send(new PutObjectCommand({ Bucket: 'alpha', Key: 'public', Body: 'x', ACL: 'public-read' }))), { name: 'NotImplemented', status: 501 });
    await alice.send(new PutObjectCommand({ Bucket: 'alpha', Key: 'private', Body: 'x', ACL: 'private' }));
    await alice.send(new DeleteObjectCommand({ Bucket: 'alpha', Key: 'private' }));
    assert.equal((await errorOf(alice.send(new HeadBucketCommand({ Bucket: 'nothing-here' })))).status, 404);
    const location = await alice.send(new GetBucketLocationCommand({ Bucket: 'alpha' }));
    assert.ok(!location.LocationConstraint);
    const listed = await alice.send(new ListBucketsCommand({}));
    assert.deepEqual(listed.Buckets?.map((bucket) => bucket.Name), ['alpha']);
    assert.deepEqual((await bob.send(new ListBucketsCommand({}))).Buckets ?? [], []);
    // Another account's bucket: AccessDenied for every operation.
    assert.deepEqual(await errorOf(bob.send(new PutObjectCommand({ Bucket: 'alpha', Key: 'x', Body: 'no' }))), { name: 'AccessDenied', status: 403 });
    assert.deepEqual(await errorOf(bob.send(new ListObjectsV2Command({ Bucket: 'alpha' }))), { name: 'AccessDenied', status: 403 });
    await alice.send(new PutObjectCommand({ Bucket: 'alpha', Key: 'keep', Body: 'data' }));
    assert.deepEqual(await errorOf(bob.send(new GetObjectCommand({ Bucket: 'alpha', Key: 'keep' }))), { name: 'AccessDenied', status: 403 });
    assert.deepEqual(await errorOf(alice.send(new DeleteBucketCommand({ Bucket: 'alpha' }))), { name: 'BucketNotEmpty', status: 409 });
    await alice.send(new DeleteObjectCommand({ Bucket: 'alpha', Key: 'keep' }));
    // An unfinished multipart upload does not keep the bucket alive (as in S3).
    await alice.send(new CreateMultipartUploadCommand({ Bucket: 'alpha', Key: 'pending' }));
    await alice.send(new DeleteBucketCommand({ Bucket: 'alpha' }));
    assert.equal((await errorOf(alice.send(new HeadBucketCommand({ Bucket: 'alpha' })))).status, 404);
  });

  test('objects: put, get, ranges, head, metadata, conditions, checksums, copy, delete', async () => {
    await alice.send(new CreateBucketCommand({ Bucket: 'objects' }));
    const body = randomBytes(5 * MiB + 12345);
    const put = await alice.send(new PutObjectCommand({
      Bucket: 'objects', Key: 'dir/file.bin', Body: body, ContentType: 'application/x-test', Metadata: { colour: 'blue', 'two-words': 'a b' },
      CacheControl: 'max-age=60', ContentDisposition: 'attachment; filename="f.bin"',
    }));
    assert.equal(put.ETag, `"${md5(body)}"`);
    const got = await alice.send(new GetObjectCommand({ Bucket: 'objects', Key: 'dir/file.bin' }));
    assert.ok(Buffer.from(await got.Body!.transformToByteArray()).equals(body));
    assert.equal(got.ContentType, 'application/x-test');
    assert.deepEqual(got.Metadata, { colour: 'blue', 'two-words': 'a b' });
    assert.equal(got.CacheControl, 'max-age=60');
    assert.equal(got.ContentDisposition, 'attachment; filename="f.bin"');
    assert.equal(got.ContentLength, body.length);
    // Ranges: closed, open-ended, suffix, past the end (416).
    const range = async (text: string): Promise<Buffer> => {
      const reply = await alice.send(new GetObjectCommand({ Bucket: 'objects', Key: 'dir/file.bin', Range: text }));
      assert.equal(reply.$metadata.httpStatusCode, 206);
      return Buffer.from(await reply.Body!.transformToByteArray());
    };
    assert.ok((await range('bytes=100-4194400')).equals(body.subarray(100, 4194401)));
    assert.ok((await range(`bytes=${body.length - 10}-`)).equals(body.subarray(body.length - 10)));
    assert.ok((await range('bytes=-5000')).equals(body.subarray(body.length - 5000)));
    assert.deepEqual(await errorOf(alice.send(new GetObjectCommand({ Bucket: 'objects', Key: 'dir/file.bin', Range: `bytes=${body.length}-` }))), { name: 'InvalidRange', status: 416 });
    // HEAD and conditional GET.
    const head = await alice.send(new HeadObjectCommand({ Bucket: 'objects', Key: 'dir/file.bin' }));
    assert.equal(head.ContentLength, body.length);
    assert.equal(head.ETag, put.ETag);
    assert.equal((await errorOf(alice.send(new GetObjectCommand({ Bucket: 'objects', Key: 'dir/file.bin', IfNoneMatch: put.ETag })))).status, 304);
    assert.deepEqual(await errorOf(alice.send(new GetObjectCommand({ Bucket: 'objects', Key: 'dir/file.bin', IfMatch: '"00000000000000000000000000000000"' }))), { name: 'PreconditionFailed', status: 412 });
    assert.equal((await errorOf(alice.send(new GetObjectCommand({ Bucket: 'objects', Key: 'dir/file.bin', IfModifiedSince: new Date(Date.now() + 60_000) })))).status, 304);
    assert.equal((await alice.send(new GetObjectCommand({ Bucket: 'objects', Key: 'dir/file.bin', IfMatch: put.ETag, Range: 'bytes=0-0' }))).ContentLength, 1);
    assert.deepEqual(await errorOf(alice.send(new GetObjectCommand({ Bucket: 'objects', Key: 'nope' }))), { name: 'NoSuchKey', status: 404 });
    // Checksums: the SDK sends an aws-chunked body with a trailing CRC32 / SHA-256; stored and returned.
    for (const algorithm of ['CRC32', 'CRC32C', 'SHA256'] as const) {
      const data = randomBytes(300_000);
      const sent = await alice.send(new PutObjectCommand({ Bucket: 'objects', Key: `sum-${algorithm}`, Body: data, ChecksumAlgorithm: algorithm }));
      const field = `Checksum${algorithm}` as 'ChecksumCRC32';
      assert.ok(sent[field], `${algorithm} returned on PUT`);
      const back = await alice.send(new GetObjectCommand({ Bucket: 'objects', Key: `sum-${algorithm}`, ChecksumMode: 'ENABLED' }));
      assert.equal(back[field], sent[field]);
      assert.ok(Buffer.from(await back.Body!.transformToByteArray()).equals(data));
    }
    // A wrong checksum is refused and stores nothing.
    assert.deepEqual(await errorOf(alice.send(new PutObjectCommand({ Bucket: 'objects', Key: 'bad-sum', Body: 'abc', ChecksumSHA256: Buffer.alloc(32).toString('base64') }))), { name: 'BadDigest', status: 400 });
    assert.equal((await errorOf(alice.send(new HeadObjectCommand({ Bucket: 'objects', Key: 'bad-sum' })))).status, 404);
    // Copy: metadata COPY and REPLACE; a copy onto itself without REPLACE is refused.
    await alice.send(new CopyObjectCommand({ Bucket: 'objects', Key: 'copy-1', CopySource: 'objects/dir/file.bin' }));
    const copied = await alice.send(new HeadObjectCommand({ Bucket: 'objects', Key: 'copy-1' }));
    assert.deepEqual([copied.ETag, copied.ContentType, copied.Metadata?.colour], [put.ETag, 'application/x-test', 'blue']);
    await alice.send(new CopyObjectCommand({ Bucket: 'objects', Key: 'copy-2', CopySource: 'objects/dir/file.bin', MetadataDirective: 'REPLACE', Metadata: { shape: 'round' }, ContentType: 'text/plain' }));
    const replaced = await alice.send(new GetObjectCommand({ Bucket: 'objects', Key: 'copy-2' }));
    assert.deepEqual([replaced.ContentType, replaced.Metadata], ['text/plain', { shape: 'round' }]);
    assert.ok(Buffer.from(await replaced.Body!.transformToByteArray()).equals(body));
    assert.equal((await errorOf(alice.send(new CopyObjectCommand({ Bucket: 'objects', Key: 'copy-1', CopySource: 'objects/copy-1' })))).name, 'InvalidRequest');
    // Overwrite is atomic: a reader sees the old or the new bytes, whole.
    const second = randomBytes(64 * 1024);
    await alice.send(new PutObjectCommand({ Bucket: 'objects', Key: 'dir/file.bin', Body: second }));
    assert.ok(Buffer.from(await (await alice.send(new GetObjectCommand({ Bucket: 'objects', Key: 'dir/file.bin' }))).Body!.transformToByteArray()).equals(second));
    // Empty objects and keys with odd characters.
    await alice.send(new PutObjectCommand({ Bucket: 'objects', Key: 'empty', Body: '' }));
    assert.equal((await alice.send(new HeadObjectCommand({ Bucket: 'objects', Key: 'empty' }))).ContentLength, 0);
    const odd = 'odd/ünïcode key+with&chars=?#%.txt';
    await alice.send(new PutObjectCommand({ Bucket: 'objects', Key: odd, Body: 'odd' }));
    assert.equal(await (await alice.send(new GetObjectCommand({ Bucket: 'objects', Key: odd }))).Body!.transformToString(), 'odd');
    // Delete and DeleteObjects.
    await alice.send(new DeleteObjectCommand({ Bucket: 'objects', Key: 'copy-2' }));
    const batch = await alice.send(new DeleteObjectsCommand({ Bucket: 'objects', Delete: { Objects: [{ Key: 'copy-1' }, { Key: 'empty' }, { Key: 'never-existed' }] } }));
    assert.deepEqual(batch.Deleted?.map((entry) => entry.Key).sort(), ['copy-1', 'empty', 'never-existed']);
    assert.equal((await errorOf(alice.send(new HeadObjectCommand({ Bucket: 'objects', Key: 'copy-1' })))).status, 404);
    // Conditional writes, unicode metadata, request ids on errors.
    assert.deepEqual(await errorOf(alice.send(new PutObjectCommand({ Bucket: 'objects', Key: 'dir/file.bin', Body: 'x', IfNoneMatch: '*' }))), { name: 'PreconditionFailed', status: 412 });
    assert.deepEqual(await errorOf(alice.send(new PutObjectCommand({ Bucket: 'objects', Key: 'not-there', Body: 'x', IfMatch: '"abc"' }))), { name: 'NoSuchKey', status: 404 });
    await alice.send(new PutObjectCommand({ Bucket: 'objects', Key: 'created-once', Body: 'x', IfNoneMatch: '*' }));
    await alice.send(new PutObjectCommand({ Bucket: 'objects', Key: 'unicode', Body: 'u', Metadata: { greeting: 'héllo wörld' } }));
    // Non-ASCII metadata is signed as UTF-8 and kept as the bytes sent; they come back the same (the SDK reads them as latin1).
    const greeting = (await alice.send(new HeadObjectCommand({ Bucket: 'objects', Key: 'unicode' }))).Metadata?.greeting ?? '';
    assert.equal(Buffer.from(greeting, 'latin1').toString('utf8'), 'héllo wörld');
    const missing = await fetch(`${endpoint}/objects/none`, { headers: {} });
    const requestId = missing.headers.get('x-amz-request-id');
    assert.ok(requestId);
    assert.match(await missing.text(), new RegExp(`<RequestId>${requestId}</RequestId>`));
    // Regression: DeleteObjects took keys with leading or trailing spaces, or that look like numbers, as trimmed or parsed.
    const spaced = [' ', ' padded ', '007', '1e3'];
    for (const key of spaced) await alice.send(new PutObjectCommand({ Bucket: 'objects', Key: key, Body: key }));
    const removed = await alice.send(new DeleteObjectsCommand({ Bucket: 'objects', Delete: { Objects: spaced.map((key) => ({ Key: key })) } }));
    assert.deepEqual(removed.Deleted?.map((entry) => entry.Key).sort(), [...spaced].sort());
    for (const key of spaced) assert.equal((await errorOf(alice.send(new HeadObjectCommand({ Bucket: 'objects', Key: key })))).status, 404, `"${key}" is gone`);
  });

  test('listing: v1 and v2 with prefix, delimiter, common prefixes, max-keys, continuation, start-after, url encoding', async () => {
    await alice.send(new CreateBucketCommand({ Bucket: 'listing' }));
    const keys = ['a/1', 'a/2', 'a/b/3', 'b', 'c/x/y', 'c/z', 'd d', 'e+f', 'z'];
    for (let i = 0; i < 30; i++) keys.push(`many/${String(i).padStart(3, '0')}`);
    await Promise.all(keys.map((key) => alice.send(new PutObjectCommand({ Bucket: 'listing', Key: key, Body: key }))));
    const all = await alice.send(new ListObjectsV2Command({ Bucket: 'listing' }));
    assert.deepEqual(all.Contents?.map((entry) => entry.Key), [...keys].sort());
    assert.equal(all.KeyCount, keys.length);
    const folded = await alice.send(new ListObjectsV2Command({ Bucket: 'listing', Delimiter: '/' }));
    assert.deepEqual(folded.Contents?.map((entry) => entry.Key), ['b', 'd d', 'e+f', 'z']);
    assert.deepEqual(folded.CommonPrefixes?.map((entry) => entry.Prefix), ['a/', 'c/', 'many/']);
    const underA = await alice.send(new ListObjectsV2Command({ Bucket: 'listing', Prefix: 'a/', Delimiter: '/' }));
    assert.deepEqual([underA.Contents?.map((entry) => entry.Key), underA.CommonPrefixes?.map((entry) => entry.Prefix)], [['a/1', 'a/2'], ['a/b/']]);
    // Pages of 7 with continuation tokens.
    const paged: string[] = [];
    let token: string | undefined;
    do {
      const page = await alice.send(new ListObjectsV2Command({ Bucket: 'listing', MaxKeys: 7, ContinuationToken: token }));
      paged.push(...(page.Contents ?? []).map((entry) => entry.Key!));
      assert.ok((page.Contents?.length ?? 0) <= 7);
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
    assert.deepEqual(paged, [...keys].sort());
    const after = await alice.send(new ListObjectsV2Command({ Bucket: 'listing', StartAfter: 'many/027' }));
    assert.deepEqual(after.Contents?.map((entry) => entry.Key), ['many/028', 'many/029', 'z']);
    // v1 with marker and delimiter pages.
    const v1 = await alice.send(new ListObjectsCommand({ Bucket: 'listing', Delimiter: '/', MaxKeys: 3 }));
    assert.equal(v1.IsTruncated, true);
    assert.deepEqual([v1.CommonPrefixes?.map((entry) => entry.Prefix), v1.Contents?.map((entry) => entry.Key)], [['a/', 'c/'], ['b']]);
    assert.equal(v1.NextMarker, 'c/');
    const v1next = await alice.send(new ListObjectsCommand({ Bucket: 'listing', Delimiter: '/', Marker: v1.NextMarker }));
    assert.deepEqual([v1next.CommonPrefixes?.map((entry) => entry.Prefix), v1next.Contents?.map((entry) => entry.Key)], [['many/'], ['d d', 'e+f', 'z']]);
    // encoding-type=url (the SDK decodes it back).
    const encoded = await alice.send(new ListObjectsV2Command({ Bucket: 'listing', Prefix: 'd', EncodingType: 'url' }));
    assert.equal(encoded.EncodingType, 'url');
    const zero = await alice.send(new ListObjectsV2Command({ Bucket: 'listing', MaxKeys: 0 }));
    assert.equal(zero.KeyCount ?? 0, 0);
  });

  test('multipart: lib-storage in parallel, list parts and uploads, part copy, EntityTooSmall, abort', async () => {
    await alice.send(new CreateBucketCommand({ Bucket: 'multi' }));
    const data = randomBytes(23 * MiB + 777);
    const upload = new Upload({ client: alice, params: { Bucket: 'multi', Key: 'big', Body: data }, partSize: 5 * MiB, queueSize: 4 });
    const done = await upload.done();
    assert.match(done.ETag ?? '', /^"[0-9a-f]{32}-5"$/);
    const parts = [0, 1, 2, 3, 4].map((i) => data.subarray(i * 5 * MiB, Math.min((i + 1) * 5 * MiB, data.length)));
    const expected = createHash('md5').update(Buffer.concat(parts.map((part) => createHash('md5').update(part).digest()))).digest('hex');
    assert.equal(done.ETag, `"${expected}-5"`);
    assert.ok(Buffer.from(await (await alice.send(new GetObjectCommand({ Bucket: 'multi', Key: 'big' }))).Body!.transformToByteArray()).equals(data));
    const partTwo = await alice.send(new GetObjectCommand({ Bucket: 'multi', Key: 'big', PartNumber: 2 }));
    assert.ok(Buffer.from(await partTwo.Body!.transformToByteArray()).equals(parts[1]!));
    // By hand: list uploads and parts, copy a part, a too-small part.
    const created = await alice.send(new CreateMultipartUploadCommand({ Bucket: 'multi', Key: 'manual', Metadata: { kind: 'manual' } }));
    const uploadId = created.UploadId!;
    assert.deepEqual((await alice.send(new ListMultipartUploadsCommand({ Bucket: 'multi' }))).Uploads?.map((entry) => [entry.Key, entry.UploadId]), [['manual', uploadId]]);
    const small = randomBytes(1000);
    const first = await alice.send(new UploadPartCommand({ Bucket: 'multi', Key: 'manual', UploadId: uploadId, PartNumber: 1, Body: small }));
    const second = await alice.send(new UploadPartCopyCommand({ Bucket: 'multi', Key: 'manual', UploadId: uploadId, PartNumber: 2, CopySource: 'multi/big', CopySourceRange: 'bytes=0-5242879' }));
    const listed = await alice.send(new ListPartsCommand({ Bucket: 'multi', Key: 'manual', UploadId: uploadId }));
    assert.deepEqual(listed.Parts?.map((part) => [part.PartNumber, part.Size]), [[1, 1000], [2, 5 * MiB]]);
    assert.deepEqual(await errorOf(alice.send(new CompleteMultipartUploadCommand({
      Bucket: 'multi', Key: 'manual', UploadId: uploadId, MultipartUpload: { Parts: [{ PartNumber: 1, ETag: first.ETag }, { PartNumber: 2, ETag: second.CopyPartResult!.ETag }] },
    }))), { name: 'EntityTooSmall', status: 400 });
    assert.equal((await errorOf(alice.send(new CompleteMultipartUploadCommand({
      Bucket: 'multi', Key: 'manual', UploadId: uploadId, MultipartUpload: { Parts: [{ PartNumber: 2, ETag: '"ffffffffffffffffffffffffffffffff"' }] },
    })))).name, 'InvalidPart');
    const completed = await alice.send(new CompleteMultipartUploadCommand({
      Bucket: 'multi', Key: 'manual', UploadId: uploadId, MultipartUpload: { Parts: [{ PartNumber: 2, ETag: second.CopyPartResult!.ETag }, { PartNumber: 3, ETag: undefined }].slice(0, 1) },
    }));
    assert.match(completed.ETag ?? '', /-1"$/);
    const manual = await alice.send(new GetObjectCommand({ Bucket: 'multi', Key: 'manual' }));
    assert.equal(manual.Metadata?.kind, 'manual');
    assert.ok(Buffer.from(await manual.Body!.transformToByteArray()).equals(data.subarray(0, 5 * MiB)));
    assert.equal((await errorOf(alice.send(new ListPartsCommand({ Bucket: 'multi', Key: 'manual', UploadId: uploadId })))).name, 'NoSuchUpload');
    // Completing again answers as the first completion did; a part number beyond the parts is InvalidPart.
    const again = await alice.send(new CompleteMultipartUploadCommand({
      Bucket: 'multi', Key: 'manual', UploadId: uploadId, MultipartUpload: { Parts: [{ PartNumber: 2, ETag: second.CopyPartResult!.ETag }] },
    }));
    assert.equal(again.ETag, completed.ETag);
    assert.deepEqual(await errorOf(alice.send(new GetObjectCommand({ Bucket: 'multi', Key: 'big', PartNumber: 6 }))), { name: 'InvalidPart', status: 400 });
    // Abort.
    const aborted = await alice.send(new CreateMultipartUploadCommand({ Bucket: 'multi', Key: 'gone' }));
    await alice.send(new UploadPartCommand({ Bucket: 'multi', Key: 'gone', UploadId: aborted.UploadId!, PartNumber: 1, Body: small }));
    await alice.send(new AbortMultipartUploadCommand({ Bucket: 'multi', Key: 'gone', UploadId: aborted.UploadId! }));
    assert.deepEqual((await alice.send(new ListMultipartUploadsCommand({ Bucket: 'multi' }))).Uploads ?? [], []);
    assert.equal((await errorOf(alice.send(new HeadObjectCommand({ Bucket: 'multi', Key: 'gone' })))).status, 404);
  });

  test('403s: bad signature, unknown key, expired and tampered presigned URLs; anonymous only with a public-read policy', async () => {
    await alice.send(new CreateBucketCommand({ Bucket: 'auth' }));
    await alice.send(new PutObjectCommand({ Bucket: 'auth', Key: 'secret.txt', Body: 'top secret' }));
    const wrongSecret = client({ accessKeyId: ALICE.accessKeyId, secretAccessKey: 'not-the-secret' });
    assert.deepEqual(await errorOf(wrongSecret.send(new GetObjectCommand({ Bucket: 'auth', Key: 'secret.txt' }))), { name: 'SignatureDoesNotMatch', status: 403 });
    wrongSecret.destroy();
    const unknown = client({ accessKeyId: 'AKNOBODY', secretAccessKey: 'nobody-secret' });
    assert.deepEqual(await errorOf(unknown.send(new ListBucketsCommand({}))), { name: 'InvalidAccessKeyId', status: 403 });
    unknown.destroy();
    // Presigned URLs: good, tampered, expired.
    const url = await getSignedUrl(alice, new GetObjectCommand({ Bucket: 'auth', Key: 'secret.txt' }), { expiresIn: 60 });
    const good = await fetch(url);
    assert.equal(good.status, 200);
    assert.equal(await good.text(), 'top secret');
    const tampered = await fetch(url.replace('secret.txt', 'secret.txu'));
    assert.equal(tampered.status, 403);
    assert.match(await tampered.text(), /<Code>SignatureDoesNotMatch<\/Code>/);
    const shortLived = await getSignedUrl(alice, new GetObjectCommand({ Bucket: 'auth', Key: 'secret.txt' }), { expiresIn: 1 });
    await new Promise((resolve) => setTimeout(resolve, 2100));
    const expired = await fetch(shortLived);
    assert.equal(expired.status, 403);
    assert.match(await expired.text(), /<Code>AccessDenied<\/Code>[\s\S]*expired/);
    const presignedPut = await getSignedUrl(alice, new PutObjectCommand({ Bucket: 'auth', Key: 'uploaded.txt' }), { expiresIn: 60 });
    assert.equal((await fetch(presignedPut, { method: 'PUT', body: 'via presigned url' })).status, 200);
    assert.equal(await (await alice.send(new GetObjectCommand({ Bucket: 'auth', Key: 'uploaded.txt' }))).Body!.transformToString(), 'via presigned url');
    // Expect: 100-continue: the interim answer comes only for an authorized request; a refused one gets its 403 at once.
    const expectContinue = (url: string): Promise<{ status: number; continued: boolean }> => new Promise((resolve, reject) => {
      const target = new URL(url);
      const body = Buffer.from('sent after 100 Continue');
      const outgoing = httpRequest({ method: 'PUT', host: target.hostname, port: target.port, path: target.pathname + target.search, headers: { expect: '100-continue', 'content-length': body.length } });
      let continued = false;
      outgoing.on('continue', () => {
        continued = true;
        outgoing.end(body);
      });
      outgoing.on('response', (response) => {
        response.resume();
        response.on('end', () => resolve({ status: response.statusCode ?? 0, continued }));
        if (!continued) outgoing.destroy();
      });
      outgoing.on('error', (error) => (continued ? reject(error) : undefined));
      outgoing.flushHeaders();
    });
    assert.deepEqual(await expectContinue(`${endpoint}/auth/anonymous.txt`), { status: 403, continued: false });
    const presignedContinue = await getSignedUrl(alice, new PutObjectCommand({ Bucket: 'auth', Key: 'continued.txt' }), { expiresIn: 60 });
    assert.deepEqual(await expectContinue(presignedContinue), { status: 200, continued: true });
    assert.equal(await (await alice.send(new GetObjectCommand({ Bucket: 'auth', Key: 'continued.txt' }))).Body!.transformToString(), 'sent after 100 Continue');
    // Anonymous: refused, until a public-read policy allows GET of objects (and nothing else).
    const objectUrl = `${endpoint}/auth/secret.txt`;
    assert.equal((await fetch(objectUrl)).status, 403);
    await alice.send(new PutBucketPolicyCommand({ Bucket: 'auth', Policy: JSON.stringify({
      Version: '2012-10-17', Statement: [{ Effect: 'Allow', Principal: '*', Action: 's3:GetObject', Resource: 'arn:aws:s3:::auth/*' }],
    }) }));
    await new Promise((resolve) => setTimeout(resolve, 100));
    const anonymous = await fetch(objectUrl);
    assert.equal(anonymous.status, 200);
    assert.equal(await anonymous.text(), 'top secret');
    assert.equal((await fetch(`${endpoint}/auth?list-type=2`)).status, 403);
    assert.equal((await fetch(objectUrl, { method: 'PUT', body: 'x' })).status, 403);
    // Virtual-host style: the bucket in the Host header.
    const virtualHost = new S3Client({
      endpoint, region: 'us-east-1', credentials: ALICE, forcePathStyle: true, maxAttempts: 1,
    });
    virtualHost.middlewareStack.add((next) => async (args) => {
      const request = args.request as { hostname: string; path: string; headers: Record<string, string> };
      if (request.path.startsWith('/auth/')) {
        request.headers.host = `auth.localhost:${new URL(endpoint).port}`;
        request.path = request.path.slice('/auth'.length);
      }
      return next(args);
    }, { step: 'build', name: 'virtualHost' });
    assert.equal(await (await virtualHost.send(new GetObjectCommand({ Bucket: 'auth', Key: 'secret.txt' }))).Body!.transformToString(), 'top secret');
    virtualHost.destroy();
  });

  test('awscli: a 20 MiB file goes up as a multipart upload and comes back exact; s3cmd too', async () => {
    const env = {
      AWS_ACCESS_KEY_ID: ALICE.accessKeyId, AWS_SECRET_ACCESS_KEY: ALICE.secretAccessKey, AWS_DEFAULT_REGION: 'us-east-1',
      AWS_EC2_METADATA_DISABLED: 'true', AWS_CONFIG_FILE: '/dev/null', AWS_SHARED_CREDENTIALS_FILE: '/dev/null',
    };
    const version = await run('/usr/bin/aws', ['--version'], { env });
    assert.match(version.stdout + version.stderr, /aws-cli\/2\./);
    const file = join(dir.path, 'twenty.bin');
    const data = randomBytes(20 * MiB);
    writeFileSync(file, data);
    const aws = (...args: string[]) => run('/usr/bin/aws', ['--endpoint-url', endpoint, ...args], { env, timeoutMs: 180_000 });
    const made = await aws('s3', 'mb', 's3://cli');
    assert.equal(made.status, 0, made.stderr);
    const up = await aws('s3', 'cp', file, 's3://cli/twenty.bin', '--no-progress');
    assert.equal(up.status, 0, up.stderr);
    const head = await aws('s3api', 'head-object', '--bucket', 'cli', '--key', 'twenty.bin');
    assert.equal(head.status, 0, head.stderr);
    assert.match((JSON.parse(head.stdout) as { ETag: string }).ETag, /-\d+"$/, 'awscli used a multipart upload');
    const back = join(dir.path, 'twenty.back');
    const down = await aws('s3', 'cp', 's3://cli/twenty.bin', back, '--no-progress');
    assert.equal(down.status, 0, down.stderr);
    assert.ok(readFileSync(back).equals(data));
    const ls = await aws('s3', 'ls', 's3://cli/');
    assert.match(ls.stdout, /20971520 twenty\.bin/);
    const badKey = await run('/usr/bin/aws', ['--endpoint-url', endpoint, 's3', 'ls', 's3://cli/'], { env: { ...env, AWS_SECRET_ACCESS_KEY: 'wrong-secret' } });
    assert.notEqual(badKey.status, 0);
    assert.match(badKey.stderr, /SignatureDoesNotMatch/);

    const host = new URL(endpoint).host;
    const s3cmd = (...args: string[]) => run('s3cmd', [
      `--access_key=${ALICE.accessKeyId}`, `--secret_key=${ALICE.secretAccessKey}`, `--host=${host}`, `--host-bucket=${host}`, '--no-ssl',
      '--region=us-east-1', '--config=/dev/null', ...args,
    ], { timeoutMs: 180_000 });
    const small = join(dir.path, 'small.txt');
    writeFileSync(small, 'hello from s3cmd\n');
    const put = await s3cmd('put', small, 's3://cli/s3cmd/small.txt');
    assert.equal(put.status, 0, put.stderr);
    const putBig = await s3cmd('put', '--multipart-chunk-size-mb=5', file, 's3://cli/s3cmd/big.bin');
    assert.equal(putBig.status, 0, putBig.stderr);
    const list = await s3cmd('ls', 's3://cli/s3cmd/');
    assert.match(list.stdout, /s3:\/\/cli\/s3cmd\/small\.txt/);
    const fetched = join(dir.path, 's3cmd.back');
    const get = await s3cmd('get', '--force', 's3://cli/s3cmd/big.bin', fetched);
    assert.equal(get.status, 0, get.stderr);
    assert.ok(readFileSync(fetched).equals(data));
    const removed = await s3cmd('del', 's3://cli/s3cmd/small.txt');
    assert.equal(removed.status, 0, removed.stderr);
  });

  test('kill -9 of a store during a multipart upload on a 3-replica pool: the upload completes and reads back exact', async () => {
    await alice.send(new CreateBucketCommand({ Bucket: 'crash' }));
    const data = randomBytes(30 * MiB + 4321);
    const upload = new Upload({ client: client(ALICE), params: { Bucket: 'crash', Key: 'survivor', Body: data }, partSize: 5 * MiB, queueSize: 2 });
    let killed = false;
    upload.on('httpUploadProgress', (progress) => {
      if (!killed && (progress.loaded ?? 0) >= 8 * MiB) {
        killed = true;
        process.kill(cluster.storePid(2), 'SIGKILL');
      }
    });
    const done = await upload.done();
    assert.ok(killed, 'a store was killed during the upload');
    assert.match(done.ETag ?? '', /-7"$/);
    const back = Buffer.from(await (await alice.send(new GetObjectCommand({ Bucket: 'crash', Key: 'survivor' }))).Body!.transformToByteArray());
    assert.equal(back.length, data.length);
    assert.ok(back.equals(data), 'the object reads back exact');
    // Once the store is back (restarted by shale up) the object still reads back exact.
    await new Promise((resolve) => setTimeout(resolve, 6000));
    for (let i = 0; i < 3; i++) {
      const again = Buffer.from(await (await alice.send(new GetObjectCommand({ Bucket: 'crash', Key: 'survivor' }))).Body!.transformToByteArray());
      assert.ok(again.equals(data));
    }
  });
});
