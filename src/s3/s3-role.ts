/**
 * `shale s3`: an S3 gateway process (and the one `shale up` runs). It reaches the conductor for
 * keys, buckets and data ids, and the stores for data and bucket indexes.
 */
import { ClusterClient } from '../client/cluster-client.ts';
import { nodeEnv } from '../env/node/node-env.ts';
import type { LocalStores } from '../proto/local-channel.ts';
import { startS3Gateway, type S3Gateway } from './gateway.ts';

export const DEFAULT_S3_PORT = 9000;

export async function startS3Role(options: {
  listen: string;
  conductor: string;
  log: (message: string) => void;
  localStores?: LocalStores;
  domains?: string[];
  graceMs?: number;
}): Promise<S3Gateway & { stop(): Promise<void> }> {
  const cluster = new ClusterClient(nodeEnv, { conductorUrls: options.conductor, ownerId: `s3-${process.pid}`, log: options.log, localStores: options.localStores });
  await cluster.start();
  const gateway = await startS3Gateway(nodeEnv, {
    listen: options.listen, cluster, log: options.log, ...(options.domains ? { domains: options.domains } : {}),
    ...(options.graceMs !== undefined ? { graceMs: options.graceMs } : {}),
  });
  return {
    ...gateway,
    address: gateway.address,
    store: gateway.store,
    collect: () => gateway.collect(),
    close: () => gateway.close(),
    async stop(): Promise<void> {
      await gateway.close();
      await cluster.close();
    },
  };
}
