// The addon's real userfaultfd, without KVM: worker threads touch registered memory and block in
// the kernel; other threads (this one, or the addon's native readers) resolve.
import { afterEach, describe, expect, it } from 'vitest';
import {
  EEXIST, ENOENT, PAGEFAULT_FLAG_MINOR, UFFD_EVENT_PAGEFAULT, UFFD_FEATURE, UffdError, Userfaultfd, anonymousMemory, sharedMemoryPair,
} from '../../src/uffd/userfaultfd.ts';
import { PAGE, openOrReason, pagePattern, sleep, touch } from './touch.ts';

const probe = openOrReason();
probe.uffd?.close();
const open: Userfaultfd[] = [];
function uffd(): Userfaultfd {
  const u = Userfaultfd.open();
  open.push(u);
  return u;
}
afterEach(() => open.splice(0).forEach((u) => u.close()));

/** Read events until one page fault arrives (this thread never touches registered memory). */
function nextFault(u: Userfaultfd): { address: number; ptid: number; flags: number } {
  const ev = u.readEvents(1, 5000);
  expect(ev.length, 'a fault event within 5 s').toBe(1);
  expect(ev[0]!.event).toBe(UFFD_EVENT_PAGEFAULT);
  return ev[0]!;
}

describe.skipIf(!probe.uffd)(`userfaultfd (addon) ${probe.reason}`, () => {
  it('opens with the API handshake and grants thread ids and MINOR on shmem', () => {
    const u = uffd();
    expect(['syscall', '/dev/userfaultfd']).toContain(u.via);
    expect(u.has(UFFD_FEATURE.THREAD_ID)).toBe(true);
    expect(u.has(UFFD_FEATURE.MINOR_SHMEM)).toBe(true);
  });

  it('errors are typed: which op, which errno', () => {
    const u = uffd();
    const m = anonymousMemory(4 * PAGE);
    expect(() => u.register(m.hva + 1, PAGE, ['missing'])).toThrow(expect.objectContaining({ name: 'UffdError', op: 'UFFDIO_REGISTER', code: 'EINVAL' }));
    // COPY into memory nobody registered: ENOENT from UFFDIO_COPY.
    const src = pagePattern(1);
    try {
      u.copyFrom(m.hva, src);
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(UffdError);
      expect((e as UffdError).op).toBe('UFFDIO_COPY');
      expect((e as UffdError).errno).toBe(ENOENT);
    }
  });

  it('MISSING: a touching worker blocks until COPY from another thread, then sees the page', async () => {
    const u = uffd();
    const m = anonymousMemory(8 * PAGE);
    u.register(m.hva, 8 * PAGE, ['missing']);
    const t = touch(m.buffer, [3]);
    const f = nextFault(u);
    expect(f.address).toBe(m.hva + 3 * PAGE);
    expect(f.ptid).toBeGreaterThan(0);
    expect(f.ptid).not.toBe(process.pid); // the faulting thread is the worker, not this one
    await sleep(30);
    expect(t.progress(), 'still blocked before the resolve').toBe(0);
    expect(u.copyFrom(m.hva + 3 * PAGE, pagePattern(77))).toBe('installed');
    expect(await t.done).toEqual([77, 77]);
  });

  it('COPY from a view over a SharedArrayBuffer (a localSource) takes the right bytes', async () => {
    const u = uffd();
    const m = anonymousMemory(2 * PAGE);
    u.register(m.hva, 2 * PAGE, ['missing']);
    const sab = new SharedArrayBuffer(3 * PAGE);
    new Uint8Array(sab).set(pagePattern(9), 2 * PAGE);
    expect(u.copyFrom(m.hva + PAGE, new Uint8Array(sab, 2 * PAGE, PAGE))).toBe('installed');
    expect(await touch(m.buffer, [1]).done).toEqual([9, 9]);
  });

  it('ZEROPAGE resolves with zeros', async () => {
    const u = uffd();
    const m = anonymousMemory(4 * PAGE);
    u.register(m.hva, 4 * PAGE, ['missing']);
    const t = touch(m.buffer, [1]);
    const f = nextFault(u);
    expect(u.zeropage(f.address, PAGE)).toBe('installed');
    expect(await t.done).toEqual([0, 0]);
    expect(u.zeropage(f.address, PAGE)).toBe('exists');
  });

  it('WAKE: a page installed without waking (another path) leaves the waiter asleep until WAKE', async () => {
    const u = uffd();
    const m = anonymousMemory(4 * PAGE);
    u.register(m.hva, 4 * PAGE, ['missing']);
    const t = touch(m.buffer, [2]);
    const f = nextFault(u);
    expect(u.copyFrom(f.address, pagePattern(5), true)).toBe('installed');
    await sleep(50);
    expect(t.progress(), 'COPY with DONTWAKE must not wake it').toBe(0);
    u.wake(f.address, PAGE);
    expect(await t.done).toEqual([5, 5]);
  });

  it('a second COPY of one page gets EEXIST and changes nothing: installed exactly once', async () => {
    const u = uffd();
    const m = anonymousMemory(2 * PAGE);
    u.register(m.hva, 2 * PAGE, ['missing']);
    expect(u.copyFrom(m.hva, pagePattern(10))).toBe('installed');
    expect(u.copyFrom(m.hva, pagePattern(11))).toBe('exists');
    expect(EEXIST).toBe(17);
    const t = touch(m.buffer, [0]);
    expect(await t.done).toEqual([10, 10]);
  });

  it('two threads racing for one page: one install, both resume (native readers)', async () => {
    for (let round = 0; round < 5; round++) {
      const u = uffd();
      const m = anonymousMemory(4 * PAGE);
      const src = new Uint8Array(4 * PAGE);
      src.set(pagePattern(round + 100), PAGE);
      u.register(m.hva, 4 * PAGE, ['missing']);
      const h = u.startHandler({ mode: 'copy', readers: 2, delayUs: 2000, ranges: [{ dst: m.hva, len: 4 * PAGE, src: u.native.addressOf(src) }] });
      const a = touch(m.buffer, [1]);
      const b = touch(m.buffer, [1]);
      expect(await a.done).toEqual([round + 100, round + 100]);
      expect(await b.done).toEqual([round + 100, round + 100]);
      const s = h.stop();
      expect(s.resolved).toBe(1);
      expect(s.resolved + s.exists).toBe(s.events);
      expect(s.errors).toBe(0);
    }
  });

  it('stress: 4 threads x 3 readers over 512 shared pages in random orders; every page once and right', async () => {
    const pages = 512;
    const u = uffd();
    const m = anonymousMemory(pages * PAGE);
    const src = new Uint8Array(pages * PAGE);
    for (let p = 0; p < pages; p++) src.set(pagePattern(p + 1), p * PAGE);
    u.register(m.hva, pages * PAGE, ['missing']);
    const h = u.startHandler({ mode: 'copy', readers: 3, delayUs: 0, ranges: [{ dst: m.hva, len: pages * PAGE, src: u.native.addressOf(src) }] });
    const orders = [0, 1, 2, 3].map(() => shuffled(pages));
    const seen = await Promise.all(orders.map((o) => touch(m.buffer, o).done));
    seen.forEach((s, t) => orders[t]!.forEach((p, i) => expect(s.slice(2 * i, 2 * i + 2)).toEqual([p + 1, p + 1])));
    const s = h.stop();
    expect(s.resolved, 'each page installed exactly once').toBe(pages);
    expect(s.resolved + s.exists).toBe(s.events);
    expect(new Uint8Array(m.buffer).every((b, i) => b === src[i])).toBe(true);
  });

  it('a reader that cannot resolve keeps the error (op + errno); closing the uffd frees its waiter', async () => {
    const u = Userfaultfd.open();
    const m = anonymousMemory(2 * PAGE);
    u.register(m.hva, 2 * PAGE, ['missing']);
    // A source address nothing is mapped at: UFFDIO_COPY fails with EFAULT.
    const h = u.startHandler({ mode: 'copy', readers: 1, delayUs: 0, ranges: [{ dst: m.hva, len: 2 * PAGE, src: 4096 }] });
    const t = touch(m.buffer, [0]);
    for (let i = 0; i < 500 && h.counters().errors === 0; i++) await sleep(10);
    expect(h.counters().errors).toBe(1);
    expect(() => h.stop()).toThrow(expect.objectContaining({ name: 'UffdError', op: 'UFFDIO_COPY', code: 'EFAULT' }));
    expect(t.progress()).toBe(0);
    u.close(); // wakes the waiter; with nothing registered it faults in a zero page
    expect(await t.done).toEqual([0, 0]);
  });

  it('notify readers hand each fault to this thread, which resolves it', async () => {
    const u = uffd();
    const m = anonymousMemory(16 * PAGE);
    u.register(m.hva, 16 * PAGE, ['missing']);
    const asked: number[] = [];
    const h = u.startHandler({
      mode: 'notify',
      readers: 2,
      onFault(address) {
        const page = (address - m.hva) / PAGE;
        asked.push(page);
        u.copyFrom(address, pagePattern(page + 1000));
      },
    });
    const order = shuffled(16);
    const seen = await touch(m.buffer, order).done;
    order.forEach((p, i) => expect(seen.slice(2 * i, 2 * i + 2)).toEqual([p + 1000, p + 1000]));
    expect(asked).toEqual(order);
    expect(h.stop().events).toBe(16);
  });

  it('MINOR on shared memory: the page is written through a second mapping, then CONTINUE', async () => {
    const u = uffd();
    const pages = 8;
    const shm = sharedMemoryPair(pages * PAGE);
    const alias = new Uint8Array(shm.alias);
    alias.fill(0); // every page in the page cache: touches through `hva` are MINOR faults
    u.register(shm.hva, pages * PAGE, ['minor']);
    const t = touch(shm.buffer, [4]);
    const f = nextFault(u);
    expect(f.flags & PAGEFAULT_FLAG_MINOR).toBe(PAGEFAULT_FLAG_MINOR);
    expect(f.address).toBe(shm.hva + 4 * PAGE);
    alias.set(pagePattern(44), 4 * PAGE);
    expect(u.continue(f.address, PAGE)).toBe('installed');
    expect(await t.done).toEqual([44, 44]);
    expect(u.continue(f.address, PAGE)).toBe('exists');

    // And with native readers (mode continue) for the rest, two threads racing.
    const src = new Uint8Array(pages * PAGE);
    for (let p = 0; p < pages; p++) src.set(pagePattern(p + 200), p * PAGE);
    const h = u.startHandler({ mode: 'continue', readers: 2, delayUs: 0, ranges: [{ dst: shm.hva, len: pages * PAGE, src: u.native.addressOf(src), alias: shm.aliasHva }] });
    const rest = [0, 1, 2, 3, 5, 6, 7];
    const [a, b] = await Promise.all([touch(shm.buffer, rest).done, touch(shm.buffer, [...rest].reverse()).done]);
    rest.forEach((p, i) => expect(a!.slice(2 * i, 2 * i + 2)).toEqual([p + 200, p + 200]));
    [...rest].reverse().forEach((p, i) => expect(b!.slice(2 * i, 2 * i + 2)).toEqual([p + 200, p + 200]));
    const s = h.stop();
    expect(s.resolved).toBe(rest.length);
    expect(s.errors).toBe(0);
  });
});

function shuffled(n: number): number[] {
  const a = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a;
}
