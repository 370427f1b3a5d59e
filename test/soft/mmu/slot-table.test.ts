// Memslot generations: a reader sees one whole generation, and the publisher's synchronize waits
// until no reader still uses an older one (SRCU).
import { describe, expect, it } from 'vitest';
import { MessageChannel } from 'node:worker_threads';
import { SlotPublisher, SlotReader, type SlotDesc } from '../../../src/soft/mmu/slot-table.ts';
import { G_REQ, newControlBlock } from '../../../src/soft/vcpu/control.ts';

function slot(id: number, baseGfn: number, npages: number): SlotDesc {
  return { slot: id, flags: 0, baseGfn, npages, hva: 0x7f00_0000_0000 + baseGfn * 4096, hostWritable: true, logDirty: false, dirtyBitmap: null };
}

/** One vCPU's reader on a fresh publisher (vCPU 0 of 1). */
function oneReader() {
  const ctl = newControlBlock(1);
  const pub = new SlotPublisher(ctl, () => 1);
  const { port1, port2 } = new MessageChannel();
  pub.addPort(port1);
  const reader = new SlotReader(ctl, 0, port2, pub.current);
  return { pub, reader, close: () => (pub.close(), port2.close()) };
}

describe('memslot generations', () => {
  it('synchronize waits for a reader of the old generation; the reader then sees the new one whole', () => {
    const ctl = newControlBlock(2);
    const pub = new SlotPublisher(ctl, () => 2);
    const { port1, port2 } = new MessageChannel();
    pub.addPort(port1);
    pub.publish([slot(0, 1000, 10)]);
    const reader = new SlotReader(ctl, 1, port2, { gen: 1, slots: [] });
    const old = reader.readLock();
    expect(old.find(1005)?.slot).toBe(0);
    expect(reader.stale()).toBe(false);
    const held = old.slots;
    // A new generation: slot 0 moved, slot 1 added. It bumps G_REQ, so a vCPU holding its
    // reader across guest mode looks at stale() at its next request check.
    const req = Atomics.load(ctl, G_REQ);
    pub.publish([slot(1, 50, 5), slot(0, 2000, 10)]);
    expect(Atomics.load(ctl, G_REQ)).not.toBe(req);
    expect(reader.stale()).toBe(true);
    expect(() => pub.synchronize(30)).toThrow(/still reads memslot generation 2/);
    // The reader's generation never changed under it.
    expect(old.slots).toBe(held);
    expect(old.find(1005)?.slot).toBe(0);
    reader.readUnlock();
    pub.synchronize(1000);
    const now = reader.readLock();
    expect(reader.stale()).toBe(false);
    expect(now.find(1005)).toBeNull();
    expect(now.find(2003)?.slot).toBe(0);
    expect(now.find(52)?.slot).toBe(1);
    reader.readUnlock();
    pub.close();
    port2.close();
  });

  it("peek() (under the MMU lock, 'global' mode) catches up but leaves the registration stale", () => {
    const { pub, reader, close } = oneReader();
    reader.readLock();
    pub.publish([slot(7, 700, 1)]);
    expect(reader.peek().slots.map((s) => s.slot)).toEqual([7]);
    expect(reader.stale()).toBe(true); // synchronize still waits for this reader to retake
    expect(() => pub.synchronize(30)).toThrow(/still reads memslot generation/);
    reader.readUnlock();
    expect(reader.stale()).toBe(false);
    reader.readLock();
    expect(reader.stale()).toBe(false);
    pub.synchronize(1000);
    reader.readUnlock();
    close();
  });

  it('a reader idle across several publications catches up to the latest', () => {
    const { pub, reader, close } = oneReader();
    for (let i = 1; i <= 5; i++) {
      pub.publish([slot(i, i * 100, 1)]);
      pub.synchronize(1000);
    }
    const l = reader.readLock();
    expect(l.slots.map((s) => s.slot)).toEqual([5]);
    reader.readUnlock();
    close();
  });
});
