// When pre-copy stops iterating and how it makes the guest converge (QEMU migration.c's
// migration_iteration_run decision plus ram.c's auto-converge trigger), behind one small
// interface so that post-copy and dirty-limit can be further policies.
//
// The source calls decide() after every harvest (what is pending, what the link managed) and,
// after every iterative round, afterRound() with what the guest dirtied meanwhile against what
// was sent. The default policy:
//   - stop and copy once the pending bytes would go out within the downtime limit at the
//     measured bandwidth (QEMU's threshold_size), or once maxRounds iterative rounds are done;
//   - auto-converge: when the guest dirtied more than half of what a round sent
//     (throttle-trigger-threshold), throttle one step harder (20%, +10%, up to 99%). QEMU waits
//     for two such periods; with rounds capped at ROUND_MAX_MS (source.ts) one is enough.
//
// Concurrency: the VMM's main thread only.

export interface HarvestReport {
  /** Iterative rounds completed so far (0 after the bulk round). */
  iterativeRounds: number;
  pendingBytes: number;
  /** Bytes/s the link carried in the last round big enough to measure, 0 if none yet. */
  bandwidth: number;
}

export interface RoundReport {
  /** The round just finished (2 = the first iterative round). */
  round: number;
  sentBytes: number;
  /** Bytes the harvest that started this round found newly dirty (the guest's rate before it). */
  dirtiedBytes: number;
}

export interface ConvergenceDecision {
  /**
   * iterate: another round; stop-and-copy: pause and send the rest (within the downtime limit,
   * or forced: `reason` says so); postcopy: pause, send the vCPUs and run the guest on the
   * destination, which pages the rest on demand; fail: give up (`reason` says why).
   */
  action: 'iterate' | 'stop-and-copy' | 'postcopy' | 'fail';
  /** pendingBytes at the bandwidth decide() assumed (query-migrate's expected-downtime). */
  expectedDowntimeSeconds: number;
  reason?: string;
}

export interface ConvergencePolicy {
  decide(r: HarvestReport): ConvergenceDecision;
  afterRound(r: RoundReport): void;
}

/** What auto-converge acts on (cpu-throttle.ts). */
export interface Throttle {
  step(): number;
}

export interface PrecopyConvergenceOptions {
  downtimeLimitMs: number;
  maxRounds: number;
  /** --max-bandwidth (bytes/s, 0 = unlimited): the bandwidth to assume before one is measured. */
  maxBandwidth: number;
  autoConverge: boolean;
}

/** QEMU's throttle-trigger-threshold: dirtying above 50% of what was sent counts as "high". */
export const THROTTLE_TRIGGER = 0.5;
/** High periods in a row before the throttle steps up. */
const THROTTLE_HIGH_ROUNDS = 1;
/** Assumed before any round was big enough to measure, without --max-bandwidth: 1 GB/s. */
const DEFAULT_BANDWIDTH = 1e9;

export class PrecopyConvergence implements ConvergencePolicy {
  private highRounds = 0;

  constructor(
    private readonly o: PrecopyConvergenceOptions,
    private readonly throttle: Throttle,
  ) {}

  decide(r: HarvestReport): ConvergenceDecision {
    const bw = r.bandwidth > 0 ? r.bandwidth : this.o.maxBandwidth > 0 ? this.o.maxBandwidth : DEFAULT_BANDWIDTH;
    const expectedDowntimeSeconds = r.pendingBytes / bw;
    const done = expectedDowntimeSeconds * 1000 <= this.o.downtimeLimitMs || r.iterativeRounds >= this.o.maxRounds;
    return { action: done ? 'stop-and-copy' : 'iterate', expectedDowntimeSeconds };
  }

  afterRound(r: RoundReport): void {
    // The first iterative round's dirtying includes the bulk round's tail: judge from round 3.
    if (this.o.autoConverge && r.round > 2 && r.dirtiedBytes > r.sentBytes * THROTTLE_TRIGGER) {
      if (++this.highRounds >= THROTTLE_HIGH_ROUNDS) {
        this.throttle.step();
        this.highRounds = 0;
      }
    } else this.highRounds = 0;
  }
}

/** What happens when the rounds run out above the downtime limit (--on-no-convergence). */
export type OnNoConvergence = 'postcopy' | 'fail' | 'force';

export interface PostcopyPolicyOptions {
  downtimeLimitMs: number;
  /**
   * Switch after this many rounds (1 = right after the bulk round, 0 = before it), 'auto' (part-way
   * through the bulk round when the guest re-dirties what was sent, or when the rounds stop
   * shrinking), or null: only as the fallback.
   */
  switchAfter: number | 'auto' | null;
  onNoConvergence: OnNoConvergence;
  /** Whether the destination accepted post-copy (known once the handshake is done). */
  postcopyAllowed: () => boolean;
}

/**
 * Post-copy as a policy around pre-copy's (QEMU's migrate_start_postcopy, and libvirt's
 * --postcopy-after-precopy): converged rounds still end in stop-and-copy; otherwise switch to
 * post-copy after N rounds, or ('auto') as soon as the rounds stop shrinking: the pending bytes
 * at a harvest are above half of what the last round sent (the guest dirties faster than half
 * the link: QEMU's throttle-trigger-threshold), or above the previous harvest's. When pre-copy
 * gives up (its round limit), onNoConvergence decides: postcopy (when the destination allows
 * it, else fail), fail, or force (stop-and-copy above the limit, reported as such).
 */
/** What the bulk round has done when it is probed (PostcopyConvergence.decideInBulk). */
export interface BulkProbe {
  /** Guest RAM pages sent so far in the bulk round. */
  sentPages: number;
  /** Of those, pages the guest wrote again since (dirty log harvested at the probe). */
  dirtiedPages: number;
  ramPages: number;
  /** Bytes/s the link carried so far (or the assumed bandwidth). */
  bandwidth: number;
}

export class PostcopyConvergence implements ConvergencePolicy {
  private lastPending = Infinity;
  private lastSent = 0;

  constructor(
    private readonly precopy: ConvergencePolicy,
    private readonly o: PostcopyPolicyOptions,
  ) {}

  /** Whether the bulk round should be probed (harvested part-way) for an early switch. */
  get probesBulk(): boolean {
    return this.o.switchAfter === 0 || this.o.switchAfter === 'auto';
  }

  /**
   * A probe during the bulk round (--postcopy-after 0: before its first page; auto: every so
   * often): of the guest RAM pages sent so far, how many the guest dirtied again. Switching here
   * costs at most what was sent so far on top of one copy of RAM (unsent pages are simply
   * missing), where finishing the bulk round of a guest that re-dirties everything costs two.
   * Returns the reason to switch now, or null.
   */
  decideInBulk(b: BulkProbe): string | null {
    if (!this.o.postcopyAllowed()) return null;
    if (this.o.switchAfter === 0) return '--postcopy-after 0: switching before any pre-copy round';
    if (this.o.switchAfter !== 'auto' || b.sentPages === 0) return null;
    const f = b.dirtiedPages / b.sentPages;
    if (f <= THROTTLE_TRIGGER) return null;
    // Rounds would not shrink (the guest dirties faster than half the link). Whether they could
    // still end within the limit depends on how much it dirties in all: assume the rest of RAM
    // is written like the part sent so far.
    const projectedMs = ((f * b.ramPages * 4096) / b.bandwidth) * 1000;
    if (projectedMs <= this.o.downtimeLimitMs) return null;
    const mib = (x: number) => ((x * 4096) / 2 ** 20).toFixed(1);
    return `--postcopy auto: the guest re-dirtied ${mib(b.dirtiedPages)} MiB of the ${mib(b.sentPages)} MiB the bulk round sent so far (of ${mib(b.ramPages)} MiB); at that rate the rounds would not shrink and the dirty set would take ~${projectedMs.toFixed(0)} ms to copy, over the ${this.o.downtimeLimitMs} ms limit`;
  }

  /** Tell the policy what the bulk round sent (the first round has no afterRound()). */
  bulkSent(bytes: number): void {
    this.lastSent = bytes;
  }

  decide(r: HarvestReport): ConvergenceDecision {
    const d = this.precopy.decide(r);
    const within = d.expectedDowntimeSeconds * 1000 <= this.o.downtimeLimitMs;
    const ms = (d.expectedDowntimeSeconds * 1000).toFixed(0);
    const allowed = this.o.postcopyAllowed();
    const rounds = r.iterativeRounds + 1;
    if (d.action === 'stop-and-copy' && within) return { ...d, reason: `converged: expected downtime ${ms} ms within the ${this.o.downtimeLimitMs} ms limit` };
    const sa = this.o.switchAfter;
    if (allowed && typeof sa === 'number' && rounds >= sa) return { ...d, action: 'postcopy', reason: `--postcopy-after ${sa}: ${rounds} round(s) done, expected stop-and-copy downtime ${ms} ms` };
    if (allowed && sa === 'auto') {
      const mib = (x: number) => (x / 2 ** 20).toFixed(1);
      if (this.lastSent > 0 && r.pendingBytes > this.lastSent * THROTTLE_TRIGGER) {
        return { ...d, action: 'postcopy', reason: `--postcopy auto: rounds stopped shrinking (${mib(r.pendingBytes)} MiB dirty after round ${rounds}, which sent ${mib(this.lastSent)} MiB; expected stop-and-copy downtime ${ms} ms)` };
      }
      if (r.pendingBytes >= this.lastPending) return { ...d, action: 'postcopy', reason: `--postcopy auto: rounds stopped shrinking (${mib(r.pendingBytes)} MiB dirty after round ${rounds}, ${mib(this.lastPending)} MiB the round before)` };
    }
    this.lastPending = r.pendingBytes;
    if (d.action === 'iterate') return d;
    // Pre-copy gave up above the limit.
    const why = `pre-copy did not converge in ${rounds} round(s): expected downtime ${ms} ms, limit ${this.o.downtimeLimitMs} ms`;
    if (this.o.onNoConvergence === 'postcopy' && allowed) return { ...d, action: 'postcopy', reason: `${why}; switching to post-copy` };
    if (this.o.onNoConvergence === 'force') return { ...d, action: 'stop-and-copy', reason: `${why}; --on-no-convergence force: stopping the guest anyway` };
    const hint = this.o.onNoConvergence === 'postcopy' ? ' and the destination does not allow post-copy' : ' (--on-no-convergence fail)';
    return { ...d, action: 'fail', reason: `${why}${hint}; the source keeps running` };
  }

  afterRound(r: RoundReport): void {
    this.lastSent = r.sentBytes;
    this.precopy.afterRound(r);
  }
}
