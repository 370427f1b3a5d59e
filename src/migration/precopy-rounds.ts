// The pre-copy round loop (QEMU ram.c's ram_save_iterate under migration_iteration_run): the
// bulk round sends every page, then each iterative round harvests the dirty log and sends what
// the guest wrote since, until the convergence policy (convergence.ts) says stop-and-copy,
// post-copy or fail.
//
// The bulk round sends the engine-internal slots first (small; never paged on demand), then
// guest RAM. Under a post-copy policy that may switch early (--postcopy-after 0, --postcopy
// auto) the bulk round is probed: before its first guest RAM page and then every 1/BULK_PROBES
// of RAM, the dirty log is harvested and the policy told how much of what was sent the guest
// wrote again. A switch there marks every page not sent yet as pending (the destination then
// misses it), so a guest that re-dirties everything costs about one copy of RAM plus what was
// sent before the probe, instead of two.
//
// Concurrency: the VMM's main thread; vCPUs run meanwhile.
import { PAGE_SIZE } from '../vmm/engine.ts';
import type { ConvergencePolicy, PostcopyConvergence } from './convergence.ts';
import { NoConvergenceError } from './errors.ts';
import { RUN_PAGES } from './page-sender.ts';
import { now, secs, type SourceRun } from './source-run.ts';

/**
 * An iterative round sends for at most this long, then harvests again (what is left stays
 * pending). It bounds how stale the convergence estimate gets and how long auto-converge waits
 * between steps, like QEMU's periodic bitmap sync.
 */
const ROUND_MAX_MS = 1000;
/**
 * Probes of the bulk round (--postcopy auto): after the first BULK_PROBE_FIRST_PAGES (4 MiB),
 * then each time what was sent doubled, at most 1/BULK_PROBES of guest RAM apart. Early probes
 * make a switch cheap (a guest re-dirtying everything leaves few stale pages to drop on the
 * destination, on the downtime path); later ones catch a guest that dirties less densely.
 */
const BULK_PROBES = 16;
const BULK_PROBE_FIRST_PAGES = 1024;
/** Assumed before the link was measured, without --max-bandwidth: 1 GB/s (as convergence.ts). */
const DEFAULT_BANDWIDTH = 1e9;

export type RoundsOutcome =
  | { action: 'stop-and-copy'; /** Set when forced above the downtime limit. */ downtimeExceeded: string | null }
  | { action: 'postcopy'; reason: string; /** Part-way through the bulk round (or before it). */ duringBulk: boolean };

export async function runPrecopyRounds(run: SourceRun, convergence: ConvergencePolicy, postcopy: PostcopyConvergence | null): Promise<RoundsOutcome> {
  const { sender, dirty, state } = run;
  // ---- bulk round
  run.state.set('active');
  run.opts.onPhase?.('bulk', run.link);
  run.round = 1;
  state.update({ round: 1 });
  run.phase('during active (round 1)');
  run.startRound();
  const switchReason = await bulkRound(run, postcopy?.probesBulk ? postcopy : null);
  run.syncedRound = 1;
  await sender.syncAll(1);
  const bulk = run.endRound('bulk', run.totalPages);
  postcopy?.bulkSent(bulk.bytes);
  if (switchReason !== null) return { action: 'postcopy', reason: switchReason, duringBulk: true };

  // ---- iterative rounds
  run.opts.onPhase?.('iterative', run.link);
  for (;;) {
    sender.check();
    const pendingPages = dirty.harvest();
    // The guest's dirty rate over the round just sent: what this harvest found over the time its
    // log covered (since the previous harvest, a bulk-round probe's included).
    if (dirty.harvestIntervalSeconds > 0) run.dirtyPagesRate = Math.round(dirty.newlyDirty / dirty.harvestIntervalSeconds);
    run.remainingBytes = pendingPages * PAGE_SIZE;
    const decision = convergence.decide({ iterativeRounds: run.round - 1, pendingBytes: run.remainingBytes, bandwidth: run.bandwidth });
    run.expectedDowntimeSeconds = decision.expectedDowntimeSeconds;
    state.update({ remainingBytes: run.remainingBytes, dirtySyncCount: dirty.syncCount, dirtyPagesRate: run.dirtyPagesRate, expectedDowntimeSeconds: run.expectedDowntimeSeconds });
    run.progress(true);
    if (decision.action === 'fail') throw new NoConvergenceError(`${decision.reason}`);
    if (decision.action === 'postcopy') return { action: 'postcopy', reason: decision.reason ?? 'post-copy', duringBulk: false };
    if (decision.action === 'stop-and-copy') {
      const limit = run.opts.downtimeLimitMs!;
      const over = decision.expectedDowntimeSeconds * 1000 > limit;
      return { action: 'stop-and-copy', downtimeExceeded: over ? (decision.reason ?? `stop-and-copy forced with expected downtime ${(decision.expectedDowntimeSeconds * 1000).toFixed(0)} ms over the ${limit} ms limit`) : null };
    }
    run.round++;
    state.update({ round: run.round });
    run.phase(`during active (round ${run.round})`);
    run.roundStartSent = sender.counters.zeroPages + sender.counters.normalPages;
    run.roundStartPending = pendingPages;
    const sent = await run.sendAllPending(run.manual, performance.now() + ROUND_MAX_MS);
    run.syncedRound = run.round;
    await sender.syncAll(run.round);
    const { bytes } = run.endRound('iterative', sent);
    convergence.afterRound({ round: run.round, sentBytes: bytes, dirtiedBytes: dirty.newlyDirty * PAGE_SIZE });
  }
}

/** Every page once; with `probe`, stop early when it says switch (returns its reason). */
async function bulkRound(run: SourceRun, probe: PostcopyConvergence | null): Promise<string | null> {
  const { sender, dirty } = run;
  const internal = run.slots.filter((s) => s.internal);
  const ram = run.slots.filter((s) => !s.internal);
  for (const s of internal) {
    await sender.sendSlot(s, 1);
    run.progress();
  }
  const ramPages = ram.reduce((a, s) => a + s.pages, 0);
  const every = Math.max(BULK_PROBE_FIRST_PAGES, Math.ceil(ramPages / BULK_PROBES));
  let sentRam = 0;
  let nextProbe = 0;
  const t0 = now();
  const bytes0 = run.link.bytesSent();
  const bandwidth = () => {
    const s = secs(t0);
    const b = run.link.bytesSent() - bytes0;
    return b >= 1 << 20 && s > 0 ? b / s : (run.opts.maxBandwidth ?? 0) > 0 ? run.opts.maxBandwidth! : DEFAULT_BANDWIDTH;
  };
  for (let si = 0; si < ram.length; si++) {
    const s = ram[si]!;
    for (let p = 0; p < s.pages; p += RUN_PAGES) {
      if (probe && sentRam >= nextProbe) {
        nextProbe = Math.max(BULK_PROBE_FIRST_PAGES, Math.min(sentRam * 2, sentRam + every));
        dirty.harvest();
        let dirtied = dirty.pendingBelow(s.slot, p);
        for (let j = 0; j < si; j++) dirtied += dirty.pendingBelow(ram[j]!.slot, ram[j]!.pages + 31);
        // Pages not sent yet go out in this round anyway: only re-dirtied sent ones stay pending.
        dirty.setPendingFrom(s, p, false);
        for (let j = si + 1; j < ram.length; j++) dirty.setPendingFrom(ram[j]!, 0, false);
        const reason = probe.decideInBulk({ sentPages: sentRam, dirtiedPages: dirtied, ramPages, bandwidth: bandwidth() });
        if (reason !== null) {
          // The destination misses what was never sent.
          dirty.setPendingFrom(s, p, true);
          for (let j = si + 1; j < ram.length; j++) dirty.setPendingFrom(ram[j]!, 0, true);
          return reason;
        }
      }
      const n = Math.min(RUN_PAGES, s.pages - p);
      await sender.sendRun(s, p, n, 1);
      sentRam += n;
      run.progress();
    }
  }
  return null;
}
