import { describe, it, expect } from 'vitest';
import { EpochDomain } from '../../../src/soft/locking/epoch.ts';

function domain() {
  const freed: [number, number][] = [];
  const d = EpochDomain.create({ maxSlots: 4, capacity: 100 }, (id, tag) => freed.push([id, tag]));
  return { d, freed };
}

describe('EpochDomain', () => {
  it('frees a retired id only after every reader that could see it has left', () => {
    const { d, freed } = domain();
    const a = d.claimSlot();
    const b = d.claimSlot();
    expect(a).not.toBe(b);
    d.readLock(a);
    d.deferFree(7, 2);
    d.readLock(b); // entered after the retirement: may not see id 7, does not hold it back
    expect(d.reclaim()).toBe(0);
    expect(d.pending()).toBe(1);
    d.readUnlock(a);
    expect(d.reclaim()).toBe(1);
    expect(freed).toEqual([[7, 2]]);
    expect(d.pending()).toBe(0);
    d.readUnlock(b);
  });

  it('a reader that entered before a retirement holds it even with newer readers around', () => {
    const { d, freed } = domain();
    const a = d.claimSlot();
    const b = d.claimSlot();
    d.readLock(b);
    d.reclaim(); // advance
    d.deferFree(1);
    d.readLock(a);
    expect(d.reclaim()).toBe(0);
    d.readUnlock(b);
    expect(d.reclaim()).toBe(1);
    d.readUnlock(a);
    expect(freed.length).toBe(1);
  });

  it('read sections nest; callRcu runs on this thread after the grace period', () => {
    const { d } = domain();
    const a = d.claimSlot();
    let ran = 0;
    d.readLock(a);
    d.readLock(a);
    d.callRcu(() => ran++);
    d.readUnlock(a);
    d.reclaim();
    expect(ran).toBe(0);
    d.readUnlock(a);
    d.reclaim();
    expect(ran).toBe(1);
    expect(() => d.readUnlock(a)).toThrow(/without readLock/);
  });

  it('synchronize waits for the grace period and refuses to run inside a read section', () => {
    const { d, freed } = domain();
    const a = d.claimSlot();
    d.deferFree(3);
    d.synchronize();
    expect(freed).toEqual([[3, 0]]);
    d.readLock(a);
    expect(() => d.synchronize()).toThrow(/inside read section/);
    const other = EpochDomain.attach(d.shared, () => {});
    d.deferFree(4);
    expect(() => other.synchronize(30)).toThrow(/stayed in its read section/);
    d.readUnlock(a);
  });

  it('drainAll frees everything; slots are claimed and released', () => {
    const { d, freed } = domain();
    const s = [d.claimSlot(), d.claimSlot(), d.claimSlot(), d.claimSlot()];
    expect(() => d.claimSlot()).toThrow(/taken/);
    d.readLock(s[0]!);
    expect(() => d.releaseSlot(s[0]!)).toThrow();
    d.deferFree(10);
    d.deferFree(11);
    expect(d.activeReaders()).toBe(1);
    expect(d.drainAll()).toBe(2);
    expect(freed.map((f) => f[0]).sort()).toEqual([10, 11]);
    d.readUnlock(s[0]!);
    d.releaseSlot(s[0]!);
    expect(d.claimSlot()).toBe(s[0]);
  });

  it('keeps grace periods right across the Int32 wrap and epoch 0', () => {
    for (const start of [2 ** 31 - 3, -3]) {
      const freed: number[] = [];
      const d = EpochDomain.create({ maxSlots: 4, capacity: 100, initialEpoch: start }, (id) => freed.push(id));
      const a = d.claimSlot();
      const b = d.claimSlot();
      for (let i = 0; i < 6; i++) {
        // a enters, an id is retired, b enters later; a holds the id, b does not.
        d.readLock(a);
        d.deferFree(i);
        d.readLock(b);
        d.reclaim();
        expect(freed).not.toContain(i);
        d.readUnlock(a);
        d.reclaim();
        expect(freed).toContain(i);
        d.readUnlock(b);
      }
      d.readLock(a);
      d.deferFree(50);
      d.readUnlock(a);
      d.synchronize();
      expect(freed).toContain(50);
    }
  });
});
