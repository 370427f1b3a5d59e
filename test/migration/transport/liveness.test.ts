// The idle watch (transport/liveness.ts) on stand-in channels: it fires only while this side
// waits on the peer, only after the idle timeout without progress, and names the phase; a slow
// but moving peer never trips it. Timeouts are small; the assertions on time are hang guards.
import { describe, it, expect } from 'vitest';
import { IdleWatch, type ProgressSource } from '../../../src/migration/transport/liveness.ts';
import type { MigrationTransportError } from '../../../src/migration/transport/errors.ts';

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

class FakeChannel implements ProgressSource {
  bytesReceived = 0;
  writesCompleted = 0;
  writesInFlight = 0;
  queue = 0;
  writeQueueBytes(): number {
    return this.queue;
  }
}

function watch(ch: FakeChannel, idleMs: number) {
  const fired: MigrationTransportError[] = [];
  const w = new IdleWatch(() => [ch], 'destination', (e) => fired.push(e), idleMs, 'during test');
  return { w, fired };
}

describe('IdleWatch', () => {
  it('does not fire while this side waits for nothing', async () => {
    const ch = new FakeChannel();
    const { w, fired } = watch(ch, 100);
    await sleep(400);
    expect(fired).toEqual([]);
    w.stop();
  });

  it('fires once an awaited answer does not come, naming the phase', async () => {
    const ch = new FakeChannel();
    const { w, fired } = watch(ch, 100);
    w.setPhase({ label: 'waiting for COMPLETE', awaiting: true });
    const t0 = Date.now();
    while (fired.length === 0 && Date.now() - t0 < 5000) await sleep(10);
    expect(fired).toHaveLength(1);
    expect(fired[0]!.code).toBe('idle-timeout');
    expect(fired[0]!.message).toBe('no progress from the destination for 100 ms waiting for COMPLETE');
    expect(Date.now() - t0).toBeGreaterThanOrEqual(100);
    w.stop();
  });

  it('a phase may carry its own, longer timeout', async () => {
    const ch = new FakeChannel();
    const { w, fired } = watch(ch, 100);
    w.setPhase({ label: 'during setup (waiting for READY)', awaiting: true, idleTimeoutMs: 600 });
    await sleep(300);
    expect(fired).toEqual([]);
    const t0 = Date.now();
    while (fired.length === 0 && Date.now() - t0 < 5000) await sleep(10);
    expect(fired[0]!.message).toBe('no progress from the destination for 600 ms during setup (waiting for READY)');
    w.stop();
  });

  it('a slow peer that keeps sending never trips it, however long the wait', async () => {
    const ch = new FakeChannel();
    const { w, fired } = watch(ch, 150);
    w.setPhase({ label: 'waiting for COMPLETE', awaiting: true });
    for (let i = 0; i < 20; i++) {
      await sleep(40);
      ch.bytesReceived += 1;
    }
    expect(fired).toEqual([]);
    w.stop();
  });

  it('a write that drains slowly is progress; one that does not drain fires in any phase', async () => {
    const ch = new FakeChannel();
    const { w, fired } = watch(ch, 150);
    w.setPhase({ label: 'during active (round 1)', awaiting: false });
    ch.writesInFlight = 1;
    ch.queue = 4 << 20;
    for (let i = 0; i < 15; i++) {
      await sleep(40);
      ch.queue -= 64 << 10; // the kernel takes a little at a time
    }
    expect(fired).toEqual([]);
    const t0 = Date.now();
    while (fired.length === 0 && Date.now() - t0 < 5000) await sleep(10);
    expect(fired[0]!.message).toBe('no progress from the destination for 150 ms during active (round 1)');
    w.stop();
  });

  it('stop() ends it for good', async () => {
    const ch = new FakeChannel();
    const { w, fired } = watch(ch, 50);
    w.setPhase({ label: 'waiting for STARTED after GO', awaiting: true });
    w.stop();
    await sleep(300);
    expect(fired).toEqual([]);
  });
});
