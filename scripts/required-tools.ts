/**
 * The external programs the tests drive, each with the Debian package that provides it. One
 * table: `npm test` (scripts/test.ts) installs what is missing, and tests name the package when a
 * tool is still absent.
 */
import { spawnSync } from 'node:child_process';

export const requiredTools: Readonly<Record<string, string>> = {
  'qemu-img': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  nbdinfo: 'libnbd-bin',
  nbdcopy: 'libnbd-bin',
  nbdfuse: 'libnbd-bin',
  nbdsh: 'python3-libnbd',
  fio: 'fio',
  fuse2fs: 'fuse2fs',
  fusermount3: 'fuse3',
  'mkfs.ext4': 'e2fsprogs',
  e2fsck: 'e2fsprogs',
  debugfs: 'e2fsprogs',
  openssl: 'openssl',
  etcd: 'etcd-server',
  etcdctl: 'etcd-client',
  ip: 'iproute2',
  '/usr/bin/aws': 'awscli',
  s3cmd: 's3cmd',
};

export function hasTool(tool: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' }).status === 0;
}

/** Throws, naming the Debian package, when a test's tool is not installed. */
export function requireTool(tool: string): void {
  if (hasTool(tool)) return;
  const pkg = requiredTools[tool];
  throw new Error(`${tool} is not installed: run \`npm test\` as root (it installs it)${pkg ? ` or \`apt-get install -y ${pkg}\`` : ''}`);
}
