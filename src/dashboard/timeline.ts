// What the dashboard and the report chart over time: pages sent per round and the guest's dirty
// rate at each harvest, with the link's rate. Rounds and dirty rates come from the migration's
// progress callback, which it calls right after every harvest (then query() holds the new dirty
// rate), so they are exact whether or not a page is watching; at the end the rounds come from
// its stats. The link's rate is sampled by the dashboard's ticks. Bounded: the oldest points go
// first.
//
// Concurrency: the VMM's main thread only.
import type { MigrationQuery, MigrationState } from '../migration/migration-state.ts';
import type { MigrationProgress, RoundStats } from '../migration/stats.ts';

export const MAX_POINTS = 600;

export interface RoundPoint {
  round: number;
  kind: RoundStats['kind'] | 'running';
  pages: number;
  /** Known once the migration's stats are in (finish); 0 before. */
  seconds: number;
}

export interface RatePoint {
  /** Seconds since the timeline started. */
  t: number;
  dirtyPagesPerSecond: number;
}

export interface ThroughputPoint {
  t: number;
  mbps: number;
}

export class Timeline {
  private readonly t0 = performance.now();
  readonly rounds: RoundPoint[] = [];
  readonly dirtyRate: RatePoint[] = [];
  readonly throughput: ThroughputPoint[] = [];
  private lastSync = 0;
  private lastBytes = 0;
  private lastBytesT = 0;
  /** Link rate between the last two samples, MB/s (decimal). */
  currentMBps = 0;
  private state: MigrationState | null = null;

  /** The migration whose dirty rate to record at each harvest. */
  watch(state: MigrationState): void {
    this.state = state;
  }

  now(): number {
    return (performance.now() - this.t0) / 1000;
  }

  /** PrecopyOptions.onProgress: the pages of the round in flight (final after each harvest). */
  readonly progress = (p: MigrationProgress): void => {
    if (p.round < 1) return;
    let r = this.rounds.find((x) => x.round === p.round);
    if (!r) {
      r = { round: p.round, kind: p.round === 1 ? 'bulk' : 'running', pages: 0, seconds: 0 };
      this.rounds.push(r);
      if (this.rounds.length > MAX_POINTS) this.rounds.shift();
    }
    r.pages = Math.max(r.pages, p.roundSentPages);
    if (this.state && this.state.counters.dirtySyncCount > this.lastSync) {
      this.lastSync = this.state.counters.dirtySyncCount;
      push(this.dirtyRate, { t: this.now(), dirtyPagesPerSecond: this.state.counters.dirtyPagesRate });
    }
  };

  /** A dashboard sample: the link's rate since the last sample. */
  sample(q: MigrationQuery): void {
    const t = this.now();
    if (t > this.lastBytesT) {
      this.currentMBps = q.transferredBytes >= this.lastBytes ? (q.transferredBytes - this.lastBytes) / (t - this.lastBytesT) / 1e6 : 0;
      if (this.lastBytesT > 0 || this.lastBytes > 0) push(this.throughput, { t, mbps: this.currentMBps });
      this.lastBytes = q.transferredBytes;
      this.lastBytesT = t;
    }
  }

  /** The migration's own per-round figures replace what progress saw. */
  finish(rounds: readonly RoundStats[]): void {
    this.rounds.length = 0;
    for (const r of rounds.slice(-MAX_POINTS)) this.rounds.push({ round: r.round, kind: r.kind, pages: r.zeroPages + r.normalPages, seconds: r.seconds });
  }
}

function push<X>(a: X[], x: X): void {
  a.push(x);
  if (a.length > MAX_POINTS) a.shift();
}
