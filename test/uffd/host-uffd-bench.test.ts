// runHostUffdBench (bench demand-paging --host-uffd): every page faults once, is resolved once by
// the native readers and is right afterwards (the bench itself checks and throws otherwise).
import { describe, expect, it } from 'vitest';
import { runHostUffdBench } from '../../src/bench/host-uffd.ts';
import { openOrReason } from './touch.ts';

const probe = openOrReason();
probe.uffd?.close();

describe.skipIf(!probe.uffd)(`host uffd bench ${probe.reason}`, () => {
  for (const mode of ['missing', 'minor'] as const) {
    for (const sharedUffd of [true, false]) {
      it(`${mode}, ${sharedUffd ? 'one uffd (-a)' : 'one uffd per vCPU'}, 2 vCPUs, 2 readers`, async () => {
        const r = await runHostUffdBench({ vcpus: 2, bytesPerVcpu: 2 << 20, mode, sharedUffd, readers: 2, delayUs: 0 });
        expect(r.pages).toBe(1024);
        expect(r.perVcpuPagesPerSec).toHaveLength(2);
        expect(r.overallPagesPerSec).toBeGreaterThan(0);
        expect(r.handler).toBe('native-pthread');
      });
    }
  }

  it('delayUs holds each fetch: 64 pages at 1 ms on one reader take >= 64 ms', async () => {
    const r = await runHostUffdBench({ vcpus: 1, bytesPerVcpu: 64 * 4096, mode: 'missing', sharedUffd: true, readers: 1, delayUs: 1000 });
    expect(r.seconds).toBeGreaterThanOrEqual(0.064);
  });

  it('bad options get a clear error', async () => {
    await expect(runHostUffdBench({ vcpus: 0, bytesPerVcpu: 4096, mode: 'missing', sharedUffd: true, readers: 1, delayUs: 0 })).rejects.toThrow(/vcpus must be/);
    await expect(runHostUffdBench({ vcpus: 1, bytesPerVcpu: 1000, mode: 'missing', sharedUffd: true, readers: 1, delayUs: 0 })).rejects.toThrow(/multiple of 4096/);
  });
});
