/**
 * `npm test` after the type check: makes sure the real clients the tests drive are installed
 * (Debian packages, installed with apt-get when missing and we are root), then runs every test
 * file with Node's test runner. Extra arguments are passed to `node --test` (e.g. a file name).
 */
import { spawnSync } from 'node:child_process';
import { hasTool, requiredTools } from './required-tools.ts';

const missing = [...new Set(Object.entries(requiredTools).filter(([tool]) => !hasTool(tool)).map(([, pkg]) => pkg))];
if (missing.length > 0) {
  if (process.getuid?.() === 0) {
    console.log(`installing ${missing.join(' ')} with apt-get for the integration tests`);
    const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
    spawnSync('apt-get', ['update', '-qq'], { stdio: 'inherit', env });
    const install = spawnSync('apt-get', ['install', '-y', '-qq', ...missing], { stdio: 'inherit', env });
    if (install.status !== 0) {
      console.error(`apt-get install ${missing.join(' ')} failed: the integration tests will fail`);
    }
  } else {
    console.error(`MISSING TOOLS: ${missing.join(' ')} are not installed and we are not root: the integration tests will fail.`);
    console.error(`Install them with: sudo apt-get install -y ${missing.join(' ')}`);
  }
}

const patterns = process.argv.length > 2 ? process.argv.slice(2) : ['src/**/*.test.ts', 'test/**/*.test.ts'];
const result = spawnSync(process.execPath, ['--test', '--test-concurrency=2', '--test-timeout=600000', ...patterns], { stdio: 'inherit' });
process.exit(result.status ?? 1);
