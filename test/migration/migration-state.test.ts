// MigrationState: only QEMU's transitions, final states stay final, query() reads the counters.
import { describe, expect, it } from 'vitest';
import { MigrationState, MigrationStateError } from '../../src/migration/migration-state.ts';

describe('MigrationState', () => {
  it('walks setup -> active -> device -> completed and freezes the clock at the end', async () => {
    const s = new MigrationState();
    s.update({ ramBytes: 1 << 20, remainingBytes: 1 << 20 });
    const seen: string[] = [];
    s.onStatus((st) => seen.push(st));
    expect(s.query()).toMatchObject({ status: 'setup', ramBytes: 1 << 20, remainingBytes: 1 << 20, setupSeconds: 0 });
    s.set('active');
    s.update({ round: 1, transferredBytes: 4096, normalPages: 1 });
    expect(s.query()).toMatchObject({ status: 'active', round: 1, transferredBytes: 4096, normalPages: 1 });
    expect(s.query().setupSeconds).toBeGreaterThan(0);
    s.set('device');
    s.set('completed');
    const a = s.query().totalSeconds;
    await new Promise((r) => setTimeout(r, 5));
    expect(s.query().totalSeconds).toBe(a);
    expect(seen).toEqual(['active', 'device', 'completed']);
    expect(s.finished).toBe(true);
  });

  it('refuses transitions QEMU does not make', () => {
    const s = new MigrationState();
    expect(() => s.set('device')).toThrow(MigrationStateError);
    expect(() => s.set('completed')).toThrow(/setup -> completed is not a transition/);
    s.set('active');
    s.set('failed', 'link lost');
    expect(s.query()).toMatchObject({ status: 'failed', error: 'link lost' });
    expect(() => s.set('active')).toThrow(MigrationStateError);
    expect(() => s.set('cancelled')).toThrow(MigrationStateError);
  });

  it('post-copy cannot be cancelled once the destination runs the guest', () => {
    const s = new MigrationState();
    s.set('active');
    s.set('postcopy-active');
    expect(() => s.set('cancelled')).toThrow(MigrationStateError);
    s.set('completed');
  });

  it('query() samples the moving counters while it runs, and keeps the last sample after', () => {
    const s = new MigrationState();
    let bytes = 0;
    s.setSampler(() => ({ transferredBytes: bytes }));
    s.set('active');
    bytes = 100;
    expect(s.query().transferredBytes).toBe(100);
    bytes = 200;
    s.set('failed', 'x');
    bytes = 300;
    expect(s.query().transferredBytes).toBe(200);
  });
});
