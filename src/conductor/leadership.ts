/**
 * Leadership: whether this conductor may change the cluster now, and where the one that may is.
 * With SQLite there is one conductor and it always leads (the file lock keeps a second one out);
 * with etcd the conductors elect one through a leased key (meta/etcd-election.ts).
 *
 * Only the leader writes: it commits changes, detects failed stores, and answers every request
 * that changes something. The others answer reads from the MetaStore and send writes to the
 * leader (HTTP 307), or answer UNAVAILABLE while no one leads.
 */

export interface ConductorIdentity {
  /** A random id for this conductor process, for logs and the leader key. */
  id: string;
  /** The base URL clients reach this conductor's API at: "http://10.0.0.5:49180". */
  url: string;
}

export interface Leadership {
  /** Whether this conductor leads now. May turn false at any time; commits are guarded anyway. */
  readonly isLeader: boolean;
  /** The leader's base URL when one is known (this conductor's own when it leads). */
  readonly leaderUrl: string | undefined;
  /** Called on every change of `isLeader`, after it changed. */
  onChange(listener: (leading: boolean) => void): void;
  /** Gives leadership up (so another takes over at once) and stops campaigning. */
  close(): Promise<void>;
}

/** The single conductor of a SQLite cluster: it leads from start to close. */
export class SoleLeadership implements Leadership {
  readonly isLeader = true;
  readonly leaderUrl: string;

  constructor(url: string) {
    this.leaderUrl = url;
  }

  onChange(): void {}

  async close(): Promise<void> {}
}
