// migrate --converge dirty-limit: a guest that dirties far faster than the link drains, which
// auto-converge does not bring under the downtime limit in the rounds allowed, converges once
// each vCPU is held to --vcpu-dirty-limit (QEMU 8.1's dirty-limit capability).
import { describe, expect, it } from 'vitest';
import { stage2 } from './run-cli.ts';

const args = (converge: string) => ['migrate', '--local', '--engine', 'soft', '-v', '2', '-b', '32M', '--workload', 'dirty-rate', '--dirty-rate', '400M', '--max-bandwidth', '32M', '--no-postcopy', '--on-no-convergence', 'fail', '--max-rounds', '6', '--downtime-limit', '50', '--converge', converge, '--vcpu-dirty-limit', '2M', '--json'];

describe('migrate --converge dirty-limit', () => {
  it('converges a guest auto-converge does not, and reports the limit and each vCPU\'s sleep', async () => {
    const auto = await stage2(args('auto-converge'), { timeoutMs: 120_000 });
    const a = JSON.parse(auto.stdout);
    expect(a.status).toBe('failed');
    expect(a.error).toMatch(/did not converge/);
    expect(a.dirtyLimit).toBeUndefined();

    const limited = await stage2(args('dirty-limit'), { timeoutMs: 120_000 });
    expect(limited.code, limited.stderr).toBe(0);
    const d = JSON.parse(limited.stdout);
    expect(d.status).toBe('completed');
    expect(d.verified).toBe(true);
    expect(d.downtimeSeconds * 1000).toBeLessThan(50 * 3); // the limit, with room for a loaded machine
    expect(d.throttlePercent).toBe(0); // no vCPU was throttled by auto-converge
    expect(d.dirtyLimit.bytesPerSecond).toBe(2 * 2 ** 20);
    expect(d.dirtyLimit.activatedAtRound).toBeGreaterThan(0);
    for (const ms of d.dirtyLimit.vcpuSleepMs) expect(ms).toBeGreaterThan(0);
  }, 240_000);

  it('refuses a bad policy in one line', async () => {
    const r = await stage2(['migrate', '--local', '--converge', 'slow']);
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toBe('stage2: --converge slow: must be one of auto-converge, dirty-limit');
  });
});
