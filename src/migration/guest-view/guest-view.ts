// What a migration cost the guest, as the guest saw it (issue 12 part 3): from the progress-clock
// windows the source and the destination watched (progress-watch.ts), per vCPU
//   maxStallMs   the longest gap between two consecutive completed units during the migration:
//                on the source, then across the switchover (the last unit on the source before
//                the pause to the first unit on the destination, which includes the real
//                destination restart), then on the destination until its first unit after the
//                migration ended (post-copy: until all pages were there);
//   p99StallMs   the 99th percentile of those gaps (within 1%, gap-histogram.ts);
//   unitsPerSecBefore / unitsPerSecDuring / dipPercent   the rate in the second before the
//                migration against the rate from its start to that last unit, and the drop.
// A unit is the engine's (vmm/run/progress-clock.ts: soft 64 page accesses, kvm one pass).
//
// When the destination was not watched (`migrate --to`: its clock is in another process, maybe on
// another machine) or a vCPU made no progress there before it stopped, the stall across the
// switchover is counted up to when we stopped looking and flagged `lowerBound`. After a failed
// migration the guest goes on on the source: the window ends at its first unit after the end.
//
// Pure functions over plain data (tested with synthetic stamps in test/migration/guest-view/).
import { GapHistogram } from './gap-histogram.ts';
import type { ProgressWindow, VcpuProgressWindow } from './progress-watch.ts';

export interface VcpuGuestView {
  vcpu: number;
  /** Null: the vCPU made no progress at all (a halted guest). */
  maxStallMs: number | null;
  p99StallMs: number | null;
  /** The gap across the switchover: last unit on the source to first on the destination. */
  switchoverStallMs: number | null;
  unitsPerSecBefore: number;
  unitsPerSecDuring: number;
  /** 100 * (1 - during / before); null without a rate before. Negative: faster during. */
  dipPercent: number | null;
  /** Units completed from the migration's start to the window's end. */
  unitsDuring: number;
  /** The window never closed (no unit seen after the migration): the stall is at least this. */
  lowerBound: boolean;
  /** Units whose stamps were overwritten before they were read (gaps unknown). */
  lostUnits: number;
}

export interface GuestView {
  /** What one unit of progress is on this engine. */
  unit: string;
  /** The destination's clock was read (migrate --local); else stalls across the switchover are lower bounds. */
  destinationObserved: boolean;
  /** The worst vCPU's figures (null: no vCPU made progress). */
  maxStallMs: number | null;
  p99StallMs: number | null;
  perVcpu: VcpuGuestView[];
}

/** Where the guest went on after the migration. */
export type GuestContinued = 'destination' | 'source';

const round3 = (x: number) => Math.round(x * 1000) / 1000;

function vcpuView(s: VcpuProgressWindow, d: VcpuProgressWindow | null, src: ProgressWindow, dst: ProgressWindow | null, continued: GuestContinued): VcpuGuestView {
  const gaps = GapHistogram.fromJSON(s.gaps);
  const lastOnSource = s.lastMs ?? s.lastBeforeMs;
  let switchover: number | null = null;
  let lowerBound = false;
  let endMs: number;
  let units = s.units;
  let lost = s.lost;
  if (continued === 'source') {
    // A failed migration: the source ran on; its own window says it all.
    endMs = s.closed ? s.lastMs! : src.toMs;
    if (!s.closed && lastOnSource !== null) {
      gaps.add(src.toMs - lastOnSource);
      lowerBound = true;
    }
  } else if (d) {
    gaps.merge(GapHistogram.fromJSON(d.gaps));
    units += d.units;
    lost += d.lost;
    if (lastOnSource !== null) {
      switchover = (d.firstMs ?? dst!.toMs) - lastOnSource;
      lowerBound = d.firstMs === null;
      gaps.add(switchover);
    }
    if (!d.closed && d.lastMs !== null) {
      // Progress on the destination that never reached the migration's end.
      gaps.add(dst!.toMs - d.lastMs);
      lowerBound = true;
    }
    endMs = d.closed ? d.lastMs! : dst!.toMs;
  } else {
    // Completed, destination not watched: the guest was stalled at least until we stopped.
    endMs = src.toMs;
    if (lastOnSource !== null) {
      switchover = src.toMs - lastOnSource;
      gaps.add(switchover);
      lowerBound = true;
    }
  }
  const before = s.beforeMs > 0 ? (s.unitsBefore / s.beforeMs) * 1000 : 0;
  const span = endMs - src.fromMs;
  const during = span > 0 ? (units / span) * 1000 : 0;
  const progressed = lastOnSource !== null || (d?.firstMs ?? null) !== null;
  return {
    vcpu: s.vcpu,
    maxStallMs: progressed && gaps.count > 0 ? round3(gaps.maxMs) : null,
    p99StallMs: progressed ? (gaps.quantileMs(0.99) === null ? null : round3(gaps.quantileMs(0.99)!)) : null,
    switchoverStallMs: switchover === null ? null : round3(switchover),
    unitsPerSecBefore: Math.round(before),
    unitsPerSecDuring: Math.round(during),
    dipPercent: before > 0 ? Math.round(1000 * (1 - during / before)) / 10 : null,
    unitsDuring: units,
    lowerBound,
    lostUnits: lost,
  };
}

/** Join the source's window with the destination's (null: not watched) into the report. */
export function guestView(unit: string, src: ProgressWindow, dst: ProgressWindow | null, continued: GuestContinued): GuestView {
  const perVcpu = src.vcpus.map((s) => vcpuView(s, dst?.vcpus[s.vcpu] ?? null, src, dst, continued));
  const worst = (k: 'maxStallMs' | 'p99StallMs') => {
    const xs = perVcpu.map((v) => v[k]).filter((x): x is number => x !== null);
    return xs.length ? Math.max(...xs) : null;
  };
  return { unit, destinationObserved: dst !== null, maxStallMs: worst('maxStallMs'), p99StallMs: worst('p99StallMs'), perVcpu };
}
