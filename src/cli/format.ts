/**
 * Output for people: tables (cli-table3, without colours when stdout is not a terminal) and
 * "key: value" blocks. Scripts use --json instead, which prints the API's answer as is.
 */
import Table from 'cli-table3';

export type Cell = string | number;

export function renderTable(head: readonly string[], rows: readonly (readonly Cell[])[], isTty: boolean): string {
  const table = new Table({
    head: [...head],
    // Borderless, one line per row (as kubectl and docker print): reads and greps well.
    chars: {
      top: '', 'top-mid': '', 'top-left': '', 'top-right': '', bottom: '', 'bottom-mid': '', 'bottom-left': '', 'bottom-right': '',
      left: '', 'left-mid': '', mid: '', 'mid-mid': '', right: '', 'right-mid': '', middle: '  ',
    },
    style: { 'padding-left': 0, 'padding-right': 0, ...(isTty ? { head: ['bold'] } : { head: [], border: [] }) },
  });
  for (const row of rows) table.push(row.map((cell) => String(cell)));
  return table.toString().split('\n').map((line) => line.trimEnd()).join('\n') + '\n';
}

export function renderFields(fields: readonly (readonly [string, Cell])[]): string {
  const width = Math.max(...fields.map(([key]) => key.length));
  return fields.map(([key, value]) => `${(key + ':').padEnd(width + 1)} ${value}\n`).join('');
}

export function formatJson(value: unknown): string {
  return JSON.stringify(value, null, 2) + '\n';
}

/** "2024-05-01T10:20:30.123Z" → "2024-05-01 10:20:30Z"; null → "-". */
export function formatTime(iso: string | null | undefined): string {
  if (!iso) return '-';
  const match = /^(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(?:\.\d+)?Z$/.exec(iso);
  return match ? `${match[1]} ${match[2]}Z` : iso;
}

export function formatPercent(part: number, whole: number): string {
  if (whole <= 0) return '-';
  return `${((part / whole) * 100).toFixed(1)}%`;
}

const replicaStateLetters: Record<string, string> = { clean: 'clean', recovering: 'recovering', down: 'DOWN' };

/** A PG's replicas in order: "3 clean, 1 recovering, 2 DOWN". */
export function formatReplicas(replicas: readonly { storeId: number; state: string }[]): string {
  return replicas.map((r) => `${r.storeId} ${replicaStateLetters[r.state] ?? r.state}`).join(', ');
}
