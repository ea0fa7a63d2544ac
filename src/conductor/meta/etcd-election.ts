/**
 * Leader election of conductors through etcd (DESIGN §5): the leader is whoever created the key
 * `<prefix>/leader`, attached to its lease. The key holds {id, url} so the others can send
 * writes to the leader.
 *
 * Protocol, every `pollMs`:
 *   not leading → campaign: Txn(create_revision(leader) == 0 → put leader {id,url} with our lease;
 *                 else → read it). Success: we lead, and every later commit of the MetaStore is
 *                 guarded by `create_revision(leader) == the revision of our put`.
 *                 Failure: remember the leader's URL.
 *   leading     → confirm: the key still exists with our create revision. If not (the lease
 *                 expired, someone deleted it) we step down at once. If etcd cannot be reached
 *                 for longer than the lease TTL, we step down too: by then the lease may be gone.
 * A dead leader's key vanishes when its lease expires (≤ TTL, default 5 s), so a standby leads
 * within TTL + pollMs. A conductor that stops cleanly deletes the key and revokes its lease, so
 * a standby takes over at its next poll.
 *
 * Safety never rests on these timers: a commit is accepted by etcd only while the leader key has
 * the creator's revision, so a conductor that believes it leads but was deposed (a GC pause, a
 * partition) can never hand out an epoch or id (etcd-meta-store.ts).
 */
import type { Lease } from 'etcd3';
import type { Env, Timer } from '../../env/env.ts';
import type { ConductorIdentity, Leadership } from '../leadership.ts';
import type { EtcdMetaStore } from './etcd-meta-store.ts';

export interface EtcdElectionOptions {
  identity: ConductorIdentity;
  /** Lease time to live in whole seconds (etcd's unit). Default 5. */
  leaseTtlSeconds?: number;
  /** How often to campaign or confirm, in ms. Default 250. */
  pollMs?: number;
  log: (message: string) => void;
}

interface LeaderValue {
  id: string;
  url: string;
}

export class EtcdElection implements Leadership {
  readonly #env: Env;
  readonly #store: EtcdMetaStore;
  readonly #identity: ConductorIdentity;
  readonly #ttlSeconds: number;
  readonly #pollMs: number;
  readonly #log: (message: string) => void;
  readonly #listeners: ((leading: boolean) => void)[] = [];
  #lease: Lease | undefined;
  #leaseId: string | undefined;
  #leading = false;
  #leaderUrl: string | undefined;
  #lastConfirmedMs = 0;
  #timer: Timer | undefined;
  #ticking = false;
  #closed = false;
  #unreachableLogged = false;

  constructor(env: Env, store: EtcdMetaStore, options: EtcdElectionOptions) {
    this.#env = env;
    this.#store = store;
    this.#identity = options.identity;
    this.#ttlSeconds = options.leaseTtlSeconds ?? 5;
    this.#pollMs = options.pollMs ?? 250;
    this.#log = options.log;
    store.onLostLeadership = () => this.#stepDown('a commit found another leader');
  }

  get isLeader(): boolean {
    return this.#leading;
  }

  get leaderUrl(): string | undefined {
    return this.#leading ? this.#identity.url : this.#leaderUrl;
  }

  onChange(listener: (leading: boolean) => void): void {
    this.#listeners.push(listener);
  }

  /** Runs the first round (so a lone conductor leads before it serves), then one every pollMs. */
  async start(): Promise<void> {
    await this.#tick();
    this.#timer = this.#env.clock.every(this.#pollMs, () => void this.#tick());
  }

  async #tick(): Promise<void> {
    if (this.#ticking || this.#closed) return;
    this.#ticking = true;
    try {
      if (this.#leading) await this.#confirm();
      else await this.#campaign();
      this.#unreachableLogged = false;
    } catch (error) {
      if (!this.#unreachableLogged) {
        this.#log(`election: cannot reach etcd: ${(error as Error).message}`);
        this.#unreachableLogged = true;
      }
      if (this.#leading && this.#env.clock.nowMs() - this.#lastConfirmedMs > this.#ttlSeconds * 1000) {
        this.#stepDown(`etcd unreachable for more than the lease TTL (${this.#ttlSeconds} s)`);
      }
    } finally {
      this.#ticking = false;
    }
  }

  async #ensureLease(): Promise<string> {
    if (this.#leaseId) return this.#leaseId;
    const lease = this.#store.client.lease(this.#ttlSeconds, { autoKeepAlive: true });
    lease.on('lost', () => {
      if (this.#lease !== lease) return;
      this.#lease = undefined;
      this.#leaseId = undefined;
      if (this.#leading) this.#stepDown('its etcd lease was lost');
    });
    // A lease that fails to be granted is dropped; the next round grants a new one.
    lease.on('error' as never, () => {});
    let id: string;
    try {
      id = await this.#store.call('lease grant', () => lease.grant());
    } catch (error) {
      void lease.revoke().catch(() => {});
      throw error;
    }
    this.#lease = lease;
    this.#leaseId = id;
    return id;
  }

  async #campaign(): Promise<void> {
    const leaseId = await this.#ensureLease();
    const key = Buffer.from(this.#store.leaderKey);
    const value: LeaderValue = { id: this.#identity.id, url: this.#identity.url };
    const response = await this.#store.call('campaign', () => this.#store.client.kv.txn({
      compare: [{ key, target: 'Create', result: 'Equal', create_revision: 0 }],
      success: [{ request_put: { key, value: Buffer.from(JSON.stringify(value)), lease: leaseId } }],
      failure: [{ request_range: { key } }],
    }));
    if (this.#closed) return;
    if (response.succeeded) {
      // The put is the txn's only write: its revision is the key's create revision.
      this.#store.setGuard({ createRevision: response.header.revision });
      this.#lastConfirmedMs = this.#env.clock.nowMs();
      this.#setLeading(true, `leads (etcd lease ${leaseId}, TTL ${this.#ttlSeconds} s)`);
      return;
    }
    const holder = response.responses[0]?.response_range.kvs[0];
    if (!holder) return;
    let leader: Partial<LeaderValue> = {};
    try {
      leader = JSON.parse(holder.value.toString('utf8')) as Partial<LeaderValue>;
    } catch {
      // not ours to judge: another conductor wrote it; we only cannot redirect to it
    }
    if (leader.id === this.#identity.id && holder.lease === leaseId) {
      // Our own key from before a step-down that etcd still holds: lead with it again.
      this.#store.setGuard({ createRevision: holder.create_revision });
      this.#lastConfirmedMs = this.#env.clock.nowMs();
      this.#setLeading(true, 'leads again with its own leader key');
      return;
    }
    if (leader.url !== this.#leaderUrl) {
      this.#leaderUrl = typeof leader.url === 'string' ? leader.url : undefined;
      if (this.#leaderUrl) this.#log(`election: the leader is ${leader.id} at ${this.#leaderUrl}`);
    }
  }

  async #confirm(): Promise<void> {
    const guard = this.#store.guard;
    const response = await this.#store.call('confirm', () => this.#store.client.kv.range({ key: Buffer.from(this.#store.leaderKey) }));
    const holder = response.kvs[0];
    if (!guard || !holder || holder.create_revision !== guard.createRevision) {
      this.#stepDown('its leader key is gone or belongs to another conductor');
      return;
    }
    this.#lastConfirmedMs = this.#env.clock.nowMs();
  }

  #setLeading(leading: boolean, why: string): void {
    if (this.#leading === leading) return;
    this.#leading = leading;
    if (leading) this.#leaderUrl = this.#identity.url;
    this.#log(`election: conductor ${this.#identity.id} (${this.#identity.url}) ${why}`);
    for (const listener of this.#listeners) listener(leading);
  }

  #stepDown(why: string): void {
    this.#store.setGuard(undefined);
    this.#leaderUrl = undefined;
    if (!this.#leading) return;
    // A fresh lease for the next campaign: the old one may be expiring.
    const lease = this.#lease;
    this.#lease = undefined;
    this.#leaseId = undefined;
    void lease?.revoke().catch(() => {});
    this.#setLeading(false, `steps down: ${why}`);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#timer?.cancel();
    const guard = this.#store.guard;
    this.#store.setGuard(undefined);
    const wasLeading = this.#leading;
    this.#leading = false;
    if (wasLeading && guard) {
      // Hand over at once: delete our key (only if still ours), then revoke the lease.
      const key = Buffer.from(this.#store.leaderKey);
      await this.#store.call('resign', () => this.#store.client.kv.txn({
        compare: [{ key, target: 'Create', result: 'Equal', create_revision: guard.createRevision }],
        success: [{ request_delete_range: { key } }],
        failure: [],
      })).catch(() => {});
    }
    await this.#lease?.revoke().catch(() => {});
    this.#lease = undefined;
    this.#leaseId = undefined;
  }
}
