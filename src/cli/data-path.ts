/**
 * The CLI on the data path: a client library instance for verbs that read or write the stores
 * (snapshot rollback/diff, volume flatten/export/import/usage, `volume info --usage`), with the
 * admin token the API calls use. The map watcher's long poll must not keep the command alive
 * after the verb: `closeDataPath` leaves once what is pending has had a moment to finish.
 */
import { ClusterClient } from '../client/cluster-client.ts';
import { nodeEnv } from '../env/node/node-env.ts';
import { normalizeApiUrl } from './admin-api.ts';

export async function openDataPath(apiUrls: string, token: string | undefined): Promise<ClusterClient> {
  const client = new ClusterClient(nodeEnv, {
    conductorUrls: apiUrls.split(',').map((url) => normalizeApiUrl(url.trim())), ownerId: `shale-cli-${process.pid}`, token, ioTimeoutMs: 60_000,
  });
  await client.start();
  return client;
}

export async function closeDataPath(client: ClusterClient, exitAfter: boolean): Promise<void> {
  await client.close().catch(() => {});
  if (exitAfter) setTimeout(() => process.exit(), 50).unref();
}
