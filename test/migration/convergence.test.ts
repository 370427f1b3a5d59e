// The default convergence policy: stop when the rest fits the downtime limit or the rounds run
// out; auto-converge steps the throttle when the guest dirties more than half of what was sent.
import { describe, expect, it } from 'vitest';
import { PrecopyConvergence } from '../../src/migration/convergence.ts';

function policy(o: Partial<ConstructorParameters<typeof PrecopyConvergence>[0]> = {}) {
  const steps: number[] = [];
  let pct = 0;
  const p = new PrecopyConvergence({ downtimeLimitMs: 300, maxRounds: 5, maxBandwidth: 0, autoConverge: true, ...o }, { step: () => (steps.push((pct = pct ? pct + 10 : 20)), pct) });
  return { p, steps };
}

describe('PrecopyConvergence', () => {
  it('stops once the pending bytes fit the downtime limit at the measured bandwidth', () => {
    const { p } = policy();
    expect(p.decide({ iterativeRounds: 0, pendingBytes: 100e6, bandwidth: 100e6 })).toEqual({ action: 'iterate', expectedDowntimeSeconds: 1 });
    expect(p.decide({ iterativeRounds: 1, pendingBytes: 30e6, bandwidth: 100e6 })).toEqual({ action: 'stop-and-copy', expectedDowntimeSeconds: 0.3 });
  });

  it('assumes --max-bandwidth, else 1 GB/s, before a round was measured', () => {
    expect(policy({ maxBandwidth: 10e6 }).p.decide({ iterativeRounds: 0, pendingBytes: 10e6, bandwidth: 0 }).expectedDowntimeSeconds).toBe(1);
    expect(policy().p.decide({ iterativeRounds: 0, pendingBytes: 1e9, bandwidth: 0 }).expectedDowntimeSeconds).toBe(1);
  });

  it('forces stop-and-copy after maxRounds iterative rounds', () => {
    const { p } = policy({ maxRounds: 2 });
    expect(p.decide({ iterativeRounds: 1, pendingBytes: 1e12, bandwidth: 1e6 }).action).toBe('iterate');
    expect(p.decide({ iterativeRounds: 2, pendingBytes: 1e12, bandwidth: 1e6 }).action).toBe('stop-and-copy');
  });

  it('auto-converge: one step per round dirtying more than half of what it sent, from round 3', () => {
    const { p, steps } = policy();
    p.afterRound({ round: 2, sentBytes: 100, dirtiedBytes: 90 });
    expect(steps).toEqual([]);
    p.afterRound({ round: 3, sentBytes: 100, dirtiedBytes: 51 });
    p.afterRound({ round: 4, sentBytes: 100, dirtiedBytes: 50 });
    p.afterRound({ round: 5, sentBytes: 100, dirtiedBytes: 90 });
    expect(steps).toEqual([20, 30]);
    const off = policy({ autoConverge: false });
    off.p.afterRound({ round: 3, sentBytes: 100, dirtiedBytes: 100 });
    expect(off.steps).toEqual([]);
  });
});
