// `stage2 calc-dirty-rate`: each mode reports the rate the dirty-rate guest achieved (measured
// by the guest's own count over the same interval), and refuses what it cannot do.
import { describe, expect, it } from 'vitest';
import { stage2 } from './run-cli.ts';

describe('stage2 calc-dirty-rate', () => {
  it.each(['page-sampling', 'dirty-bitmap', 'dirty-ring'])('--mode %s: within 15 percent of the rate the guest measured', async (mode) => {
    // 2 vCPUs x 32 MiB, 16 MiB/s in all over a 1 s interval: 4096 distinct pages of 16384
    // (page-sampling reads every page: 262144 per GiB, no sampling error to allow for).
    const r = await stage2(['calc-dirty-rate', '--engine', 'soft', '-v', '2', '-b', '32M', '--workload', 'dirty-rate', '--dirty-rate', '16M', '--calc-time', '1', '--mode', mode, '--sample-pages', '262144', '--json'], { timeoutMs: 60_000 });
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j.mode).toBe(mode);
    expect(j.guestWriteRateMBps).toBeGreaterThan(0);
    expect(Math.abs(j.dirtyRateMBps - j.guestWriteRateMBps) / j.guestWriteRateMBps).toBeLessThan(0.15);
    if (mode === 'dirty-ring') {
      expect(j.vcpuDirtyRateMBps).toHaveLength(2);
      const sum = j.vcpuDirtyRateMBps[0] + j.vcpuDirtyRateMBps[1];
      expect(Math.abs(sum - j.dirtyRateMBps) / j.dirtyRateMBps).toBeLessThan(0.01); // each vCPU dirties its own slice
    } else {
      expect(j.vcpuDirtyRateMBps).toBeNull();
    }
    expect(r.stderr).toMatch(/Dirty rate: [\d.]+ MB\/s/);
  });

  it('refuses at once, one line: an unknown mode, the dirty-rate guest on kvm', async () => {
    const bad = await stage2(['calc-dirty-rate', '--mode', 'guess']);
    expect(bad.code).toBe(1);
    expect(bad.stderr.trim()).toBe('stage2: --mode guess: must be one of page-sampling, dirty-bitmap, dirty-ring');
    const kvm = await stage2(['calc-dirty-rate', '--engine', 'kvm', '--workload', 'dirty-rate', '--dirty-rate', '1M']);
    expect(kvm.code).toBe(1);
    expect(kvm.stderr.trim().split('\n')).toHaveLength(1);
    expect(kvm.stderr).toMatch(/dirty-rate runs on the soft engine only/);
  });
});
