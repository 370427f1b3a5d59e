// migrate --compress lz4 end to end, with zero pages: a dirty-rate guest writes half of its RAM
// (the rest stays zero and goes as ZERO records), the written pages (one 8-byte word each) go
// lz4-compressed; the destination verifies by hash as always.
import { describe, expect, it } from 'vitest';
import { stage2 } from './run-cli.ts';

describe('migrate --compress lz4', () => {
  it('compresses RAM records, sends untouched pages as zero pages, verifies', async () => {
    const r = await stage2(['migrate', '--local', '--engine', 'soft', '-v', '2', '-b', '16M', '--workload', 'dirty-rate', '--working-set', '16M', '--compress', 'lz4', '--json'], { timeoutMs: 60_000 });
    expect(r.code, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j.status).toBe('completed');
    expect(j.verified).toBe(true);
    const pages = j.ramBytes / 4096;
    expect(j.zeroPages).toBeGreaterThanOrEqual(pages / 2); // the half never written
    expect(j.compression.pages).toBeGreaterThan(0);
    expect(j.compression.ratio).toBeGreaterThan(10);
    expect(j.transferredBytes).toBeLessThan(j.ramBytes / 4);
  });

  it('without it, nothing is compressed; a bad codec is refused in one line', async () => {
    const plain = await stage2(['migrate', '--local', '--engine', 'soft', '-v', '1', '-b', '8M', '--workload', 'idle', '--json'], { timeoutMs: 60_000 });
    expect(JSON.parse(plain.stdout).compression).toBeUndefined();
    const bad = await stage2(['migrate', '--local', '--compress', 'zstd']);
    expect(bad.code).toBe(1);
    expect(bad.stderr.trim()).toBe('stage2: --compress zstd: must be one of none, lz4');
  });
});
