/**
 * A real filesystem on an NBD export, for tests: nbdfuse exposes the export as a file, mkfs.ext4
 * formats it, fuse2fs mounts it, files are written, it is unmounted and mounted again, the files
 * are read back and compared, and `e2fsck -fn` checks it through nbdfuse. Fails the test (throws)
 * at the first step that goes wrong.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { requireTool } from '../scripts/required-tools.ts';
import { run, waitFor } from './harness.ts';

export async function filesystemRoundTrip(uri: string, base: string): Promise<void> {
  for (const tool of ['nbdfuse', 'fuse2fs', 'fusermount3', 'mkfs.ext4', 'e2fsck']) requireTool(tool);
  const fuseDirectory = join(base, 'nbd');
  const mountPoint = join(base, 'mnt');
  await mkdir(fuseDirectory, { recursive: true });
  await mkdir(mountPoint, { recursive: true });
  const image = join(fuseDirectory, 'disk.img');
  const pidFile = join(base, 'nbdfuse.pid');
  const children: ChildProcess[] = [];
  const started = (command: string, args: string[]): Promise<number | null> => {
    const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'inherit'] });
    children.push(child);
    return new Promise((resolve) => child.on('exit', (code) => resolve(code)));
  };
  const runOk = async (command: string, args: string[]): Promise<string> => {
    const result = await run(command, args, { timeoutMs: 120_000 });
    assert.equal(result.status, 0, `${command} ${args.join(' ')}: ${result.stdout}${result.stderr}`);
    return result.stdout;
  };
  const mounted = async (): Promise<boolean> => (await readFile('/proc/mounts', 'utf8')).includes(` ${mountPoint} `);
  const mount = async (): Promise<{ exited: Promise<number | null> }> => {
    const exited = started('fuse2fs', ['-f', image, mountPoint, '-o', 'fakeroot']);
    await waitFor('fuse2fs to mount', async () => mounted(), 20_000, 20);
    return { exited };
  };
  const unmount = async (target: string, exited: Promise<number | null>): Promise<void> => {
    await runOk('fusermount3', ['-u', target]);
    assert.equal(await exited, 0, `the FUSE daemon of ${target} exits cleanly`);
  };
  const md5 = (bytes: Buffer): string => createHash('md5').update(bytes).digest('hex');
  const files = new Map<string, Buffer>([['hello.txt', Buffer.from('hello from shale\n')], ['random.bin', randomBytes(5 * 1024 * 1024 + 321)]]);
  const nbdfuse = started('nbdfuse', ['-P', pidFile, image, uri]);
  try {
    await waitFor('nbdfuse to start', async () => (await readFile(pidFile, 'utf8').catch(() => '')).trim().length > 0, 20_000, 20);
    await runOk('mkfs.ext4', ['-q', '-F', image]);
    let { exited } = await mount();
    for (const [name, bytes] of files) await writeFile(join(mountPoint, name), bytes);
    await mkdir(join(mountPoint, 'dir'));
    await writeFile(join(mountPoint, 'dir', 'nested.txt'), 'nested\n');
    await unmount(mountPoint, exited);
    ({ exited } = await mount());
    assert.deepEqual((await readdir(mountPoint)).sort(), ['dir', 'hello.txt', 'lost+found', 'random.bin']);
    for (const [name, bytes] of files) assert.equal(md5(await readFile(join(mountPoint, name))), md5(bytes), name);
    assert.equal(await readFile(join(mountPoint, 'dir', 'nested.txt'), 'utf8'), 'nested\n');
    await unmount(mountPoint, exited);
    await runOk('e2fsck', ['-fn', image]);
    await unmount(fuseDirectory, nbdfuse);
  } finally {
    for (const target of [mountPoint, fuseDirectory]) await run('fusermount3', ['-u', '-q', target]).catch(() => {});
    for (const child of children) if (child.exitCode === null) child.kill();
  }
}
