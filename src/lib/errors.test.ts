import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { codeOf, errorCodeFromWire, ErrorCodes, NbdErrno, ShaleError, type ErrorCode } from './errors.ts';

const codes = Object.keys(ErrorCodes) as ErrorCode[];
const nbdNames = new Map<number, string>(Object.entries(NbdErrno).map(([name, value]) => [value, name]));

test('every error code is mapped to an NBD errno, an S3 code, an HTTP status and an exit code', () => {
  const wires = new Set<number>();
  for (const code of codes) {
    const spec = ErrorCodes[code];
    assert.ok(nbdNames.has(spec.nbdErrno) && Number(spec.nbdErrno) !== 0, `${code} maps to a known, non-zero NBD errno`);
    assert.match(spec.s3Code, /^[A-Z][A-Za-z0-9]+$/, `${code} has an S3 error code`);
    assert.ok(spec.httpStatus >= 400 && spec.httpStatus < 600, `${code} has an HTTP error status`);
    assert.ok(Number.isInteger(spec.exitCode) && spec.exitCode > 0 && spec.exitCode < 126, `${code} has a usable exit code`);
    assert.ok(spec.wire > 0 && spec.wire < 0xffff && !wires.has(spec.wire), `${code} has a unique wire value`);
    wires.add(spec.wire);
    assert.equal(errorCodeFromWire(spec.wire), code);
    assert.ok(spec.doc.length > 20, `${code} is explained`);
  }
});

test('docs/errors.md documents every code with exactly the mappings of the table', () => {
  const doc = readFileSync(new URL('../../docs/errors.md', import.meta.url), 'utf8');
  const rows = new Map<string, string[]>();
  for (const line of doc.split('\n')) {
    const cells = line.split('|').map((cell) => cell.trim().replace(/`/g, ''));
    if (cells.length > 7 && isCode(cells[1]!)) rows.set(cells[1]!, cells.slice(2, 7));
  }
  for (const code of codes) {
    const spec = ErrorCodes[code];
    const row = rows.get(code);
    assert.ok(row, `docs/errors.md has a row for ${code}`);
    assert.deepEqual(row, [String(spec.wire), nbdNames.get(spec.nbdErrno), spec.s3Code, String(spec.httpStatus), String(spec.exitCode)], `docs row of ${code}`);
  }
  assert.equal(rows.size, codes.length, 'docs/errors.md lists no code the table lacks');
});

test('unknown wire values and foreign exceptions read as INTERNAL', () => {
  assert.equal(errorCodeFromWire(60000), 'INTERNAL');
  assert.equal(codeOf(new Error('boom')), 'INTERNAL');
  assert.equal(codeOf(new ShaleError('NO_SPACE', 'full')), 'NO_SPACE');
});

function isCode(text: string): text is ErrorCode {
  return Object.hasOwn(ErrorCodes, text);
}
