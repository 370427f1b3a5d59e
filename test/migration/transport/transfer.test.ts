import { connect, createServer, type Socket } from 'node:net';
import { describe, expect, it } from 'vitest';
import { PageHashTable, createMemoryHasher } from '../../../src/migration/hash.ts';
import { MigrationTransportError } from '../../../src/migration/transport/errors.ts';
import { MigrationConnection } from '../../../src/migration/transport/connection.ts';
import { MigrationListener, type IncomingMigration } from '../../../src/migration/transport/listener.ts';
import { CAP_LZ4, MigrationStreamError, type MigrationRecord } from '../../../src/migration/stream/format.ts';

const PAGE = 4096;
const LAYOUT = [
  { slot: 0, pages: 512 },
  { slot: 5, pages: 256 },
];

/** A stand-in guest: one byte array per slot. */
type Memory = Map<number, Uint8Array>;

function freshMemory(): Memory {
  return new Map(LAYOUT.map((s) => [s.slot, new Uint8Array(s.pages * PAGE)]));
}

/** Page contents carry the round that wrote them in their first word, so order can be checked. */
function writePage(mem: Memory, slot: number, page: number, round: number, rng: () => number): void {
  const p = mem.get(slot)!.subarray(page * PAGE, (page + 1) * PAGE);
  const dv = new DataView(p.buffer, p.byteOffset, PAGE);
  dv.setUint32(0, round, true);
  for (let w = 1; w < 1024; w += 31) dv.setUint32(w * 4, rng() >>> 0, true);
}

function rngFrom(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>>= 0);
  };
}


/** Split a set of page indexes of one slot into runs of consecutive pages. */
function runsOf(slot: number, pages: number[]): { slot: number; first: number; count: number }[] {
  const out: { slot: number; first: number; count: number }[] = [];
  for (const p of pages.sort((a, b) => a - b)) {
    const last = out[out.length - 1];
    if (last && last.first + last.count === p && last.count < 64) last.count++;
    else out.push({ slot, first: p, count: 1 });
  }
  return out;
}

async function receive(incoming: IncomingMigration, hasherP: ReturnType<typeof createMemoryHasher>, useRun = false) {
  const hasher = await hasherP;
  const mem = freshMemory();
  let table: PageHashTable | undefined;
  let barrierRound = 0; // pages of round r may only arrive after SYNC(r-1)
  const violations: string[] = [];
  const syncs: number[] = [];
  let end: MigrationRecord | undefined;
  const apply = (rec: MigrationRecord) => {
    if (rec.kind === 'config') table = new PageHashTable(LAYOUT);
    else if (rec.kind === 'ram') {
      const m = mem.get(rec.slot)!;
      for (let i = 0; i < rec.count; i++) {
        const round = new DataView(rec.data.buffer, rec.data.byteOffset + i * PAGE, 4).getUint32(0, true);
        if (round !== barrierRound + 1) violations.push(`slot ${rec.slot} page ${rec.firstPage + i} of round ${round} applied in round ${barrierRound + 1}`);
      }
      m.set(rec.data, rec.firstPage * PAGE);
      hasher.hashInto(table!, rec.slot, rec.firstPage, rec.count, rec.data);
    } else if (rec.kind === 'zero') {
      mem.get(rec.slot)!.fill(0, rec.firstPage * PAGE, (rec.firstPage + rec.count) * PAGE);
      table!.setZero(rec.slot, rec.firstPage, rec.count);
    } else if (rec.kind === 'sync') {
      syncs.push(rec.round);
      barrierRound = rec.round;
    } else if (rec.kind === 'end') end = rec;
  };
  if (useRun) await incoming.run(apply);
  else for await (const rec of incoming.records()) apply(rec);
  await incoming.reply({ kind: 'complete', memoryHash: table!.total(), pages: table!.pages });
  const meanReadBytes = incoming.bytesReceived / incoming.channels.reduce((n, c) => n + c.chunksReceived, 0);
  return { mem, table: table!, violations, syncs, end, meanReadBytes };
}

/**
 * A TCP relay that re-chunks the source->destination bytes into random small pieces (1..9000
 * bytes, seeded) with an event-loop turn between pieces, so the destination's reads split
 * records at arbitrary places. The back channel is passed through as is.
 */
async function chunkingProxy(targetPort: number, seed: number): Promise<{ port: number; close: () => void }> {
  const rng = rngFrom(seed);
  const sockets: Socket[] = [];
  const server = createServer((src) => {
    const dst = connect(targetPort, '127.0.0.1');
    sockets.push(src, dst);
    const queue: Buffer[] = [];
    let pumping = false;
    const pump = () => {
      const chunk = queue[0];
      if (!chunk) {
        pumping = false;
        src.resume();
        return;
      }
      const n = Math.min(chunk.length, 1 + (rng() % (rng() % 4 === 0 ? 9000 : 300)));
      dst.write(chunk.subarray(0, n));
      if (n === chunk.length) queue.shift();
      else queue[0] = chunk.subarray(n);
      setImmediate(pump);
    };
    src.on('data', (c: Buffer) => {
      queue.push(c);
      if (queue.length > 64) src.pause();
      if (!pumping) {
        pumping = true;
        setImmediate(pump);
      }
    });
    dst.on('data', (c) => src.write(c));
    const closeBoth = () => {
      src.destroy();
      dst.destroy();
    };
    src.on('end', () => {
      const finish = () => (queue.length || pumping ? setImmediate(finish) : dst.end());
      finish();
    });
    dst.on('end', () => src.end());
    src.on('error', closeBoth);
    dst.on('error', closeBoth);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    port: (server.address() as { port: number }).port,
    close: () => {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

async function transfer(channels: number, opts: { compress?: boolean; rounds?: number; slabReads?: boolean; useRun?: boolean; rechunk?: boolean } = {}) {
  const hasherP = createMemoryHasher();
  const hasher = await hasherP;
  const server = await MigrationListener.listen({ host: '127.0.0.1', port: 0, slabReads: opts.slabReads });
  const received = server.accept().then((inc) => receive(inc, hasherP, opts.useRun).finally(() => inc.close()));
  const proxy = opts.rechunk ? await chunkingProxy(server.port, 7) : undefined;
  const conn = await MigrationConnection.connect({ host: '127.0.0.1', port: proxy?.port ?? server.port, channels, caps: opts.compress ? CAP_LZ4 : 0, batchBytes: 128 * 1024 });
  expect(conn.channelCount).toBe(channels);
  const src = freshMemory();
  const rng = rngFrom(42);
  await conn.send({ kind: 'config', config: { memslots: LAYOUT, engine: 'soft' } });
  const rounds = opts.rounds ?? 4;
  for (let round = 1; round <= rounds; round++) {
    // Round 1 writes most pages (leaving some zero); later rounds re-dirty a shrinking random set.
    const dirty = new Map<number, number[]>();
    for (const { slot, pages } of LAYOUT) {
      const list: number[] = [];
      for (let p = 0; p < pages; p++) if (round === 1 ? p % 7 !== 3 : rng() % (round * 3) === 0) list.push(p);
      for (const p of list) writePage(src, slot, p, round, rng);
      dirty.set(slot, list);
    }
    if (round === 2) {
      // A page that became zero again travels as ZERO.
      src.get(0)!.fill(0, 10 * PAGE, 11 * PAGE);
      dirty.get(0)!.push(10);
    }
    const runs = [...dirty].flatMap(([slot, pages]) => runsOf(slot, [...new Set(pages)]));
    // Skew: channel 0 gets the first half of the runs, the rest spread, so channels finish a
    // round at very different times and the barrier has something to hold back.
    const perChannel: (typeof runs)[] = Array.from({ length: channels }, () => []);
    runs.forEach((r, i) => perChannel[i < runs.length / 2 ? 0 : i % channels]!.push(r));
    await Promise.all(perChannel.map(async (list, ch) => {
      for (const r of list) {
        const data = src.get(r.slot)!.subarray(r.first * PAGE, (r.first + r.count) * PAGE);
        await conn.sendPages(r.slot, r.first, r.count, data, { channel: ch });
      }
    }));
    await conn.sync(round);
  }
  const srcHash = hasher.hashGuestMemory((slot, first, dst) => dst.set(src.get(slot)!.subarray(first * PAGE, first * PAGE + dst.length)), LAYOUT);
  await conn.send({ kind: 'vcpu-state', state: { vcpus: [] } });
  await conn.send({ kind: 'end', memoryHash: srcHash.memoryHash, pages: srcHash.pages, configDigest: 0n, vcpuStateDigest: 0n, vcpuStates: 0 });
  await conn.flush();
  const complete = await conn.nextBackRecord(['complete'], 20_000);
  const bytesSent = conn.bytesSent;
  const compressedPages = conn.channels.reduce((n, c) => n + c.compressedPages, 0);
  await conn.close();
  const result = await received;
  proxy?.close();
  await server.close();
  return { src, srcHash, complete, bytesSent, compressedPages, ...result };
}

function memEqual(a: Memory, b: Memory): boolean {
  return [...a].every(([slot, m]) => Buffer.compare(m, b.get(slot)!) === 0);
}

describe('migration transport over TCP on 127.0.0.1', () => {
  it('transfers several rounds over 1, 2 and 4 channels with identical applied memory (records() and run())', async () => {
    const results = [];
    for (const channels of [1, 2, 4]) {
      const r = await transfer(channels, { useRun: channels === 4 }); // 4: the callback API
      expect(r.violations).toEqual([]);
      expect(r.syncs).toEqual([1, 2, 3, 4]);
      expect(memEqual(r.src, r.mem)).toBe(true);
      expect(r.end).toMatchObject({ kind: 'end', memoryHash: r.srcHash.memoryHash, pages: 768, configDigest: 0n, vcpuStateDigest: 0n, vcpuStates: 0 });
      expect(r.complete).toMatchObject({ kind: 'complete', memoryHash: r.srcHash.memoryHash });
      expect(r.table.total()).toBe(r.srcHash.memoryHash);
      results.push(r);
    }
    // Same source sequence (seeded) gives the same memory whatever the channel count.
    expect(memEqual(results[0]!.mem, results[1]!.mem)).toBe(true);
    expect(memEqual(results[0]!.mem, results[2]!.mem)).toBe(true);
  });

  it('survives records split at arbitrary byte boundaries on the way (re-chunking relay, 3 channels)', async () => {
    const r = await transfer(3, { rechunk: true, rounds: 3 });
    // The relay did cut the stream: reads far below the 128 KiB batches it was written in.
    expect(r.meanReadBytes).toBeLessThan(32 * 1024);
    expect(r.violations).toEqual([]);
    expect(r.syncs).toEqual([1, 2, 3]);
    expect(memEqual(r.src, r.mem)).toBe(true);
    expect(r.complete).toMatchObject({ kind: 'complete', memoryHash: r.srcHash.memoryHash });
  });

  it('gives the same result with node\'s plain 64 KiB reads instead of slab reads', async () => {
    const r = await transfer(2, { slabReads: false, rounds: 3 });
    expect(r.violations).toEqual([]);
    expect(memEqual(r.src, r.mem)).toBe(true);
    expect(r.complete).toMatchObject({ kind: 'complete', memoryHash: r.srcHash.memoryHash });
  });

  it('recycles read slabs: 64 MiB over one channel with a handful of slabs, every page intact', async () => {
    const pages = 16384;
    const server = await MigrationListener.listen({ host: '127.0.0.1', port: 0 });
    const conn = await MigrationConnection.connect({ host: '127.0.0.1', port: server.port });
    const incoming = await server.accept();
    const bad: number[] = [];
    let seen = 0;
    const received = (async () => {
      for await (const rec of incoming.records()) {
        if (rec.kind !== 'ram') continue;
        const dv = new DataView(rec.data.buffer, rec.data.byteOffset, rec.data.byteLength);
        for (let i = 0; i < rec.count; i++) {
          const page = rec.firstPage + i;
          if (dv.getUint32(i * PAGE, true) !== page || dv.getUint32(i * PAGE + PAGE - 4, true) !== ~page >>> 0) bad.push(page);
        }
        seen += rec.count;
      }
    })();
    await conn.send({ kind: 'config', config: { memslots: [{ slot: 0, pages }] } });
    const batch = new Uint8Array(256 * PAGE);
    const dv = new DataView(batch.buffer);
    for (let first = 0; first < pages; first += 256) {
      for (let i = 0; i < 256; i++) {
        dv.setUint32(i * PAGE, first + i, true);
        dv.setUint32(i * PAGE + PAGE - 4, ~(first + i) >>> 0, true);
      }
      await conn.sendRam(0, first, 256, batch);
    }
    await conn.sync(1);
    await conn.send({ kind: 'end', memoryHash: 0n, pages, configDigest: 0n, vcpuStateDigest: 0n, vcpuStates: 0 });
    await conn.flush();
    await received;
    expect(seen).toBe(pages);
    expect(bad).toEqual([]);
    // 64 MiB through 4 MiB slabs: without recycling that would take >= 16.
    expect(incoming.control.readSlabsAllocated).toBeGreaterThan(0);
    expect(incoming.control.readSlabsAllocated).toBeLessThan(12);
    await conn.close();
    await incoming.close();
    await server.close();
  });

  it('compresses with lz4 when both sides accept it, and memory still matches', async () => {
    const r = await transfer(2, { compress: true, rounds: 2 });
    expect(memEqual(r.src, r.mem)).toBe(true);
    expect(r.compressedPages).toBeGreaterThan(0); // the test pages are mostly zero bytes
    expect(r.bytesSent).toBeLessThan(768 * PAGE / 2);
  });
});

describe('send ordering', () => {
  it('keeps call order for overlapping (not awaited) sends on one channel', async () => {
    const server = await MigrationListener.listen({ host: '127.0.0.1', port: 0 });
    const conn = await MigrationConnection.connect({ host: '127.0.0.1', port: server.port, batchBytes: 64 * 1024 });
    const incoming = await server.accept();
    const order: number[] = [];
    const received = (async () => {
      for await (const rec of incoming.records()) {
        if (rec.kind === 'ram') for (let i = 0; i < rec.count; i++) order.push(rec.data[i * PAGE]!);
        if (rec.kind === 'zero') order.push(-rec.firstPage);
      }
    })();
    await conn.send({ kind: 'config', config: { memslots: LAYOUT } });
    const calls: Promise<unknown>[] = [];
    for (let i = 1; i <= 60; i++) {
      // Mixed sizes so some calls must wait for a batch write while later ones are already queued.
      const pages = 1 + (i % 5) * 7;
      const data = new Uint8Array(pages * PAGE);
      for (let p = 0; p < pages; p++) data[p * PAGE] = i;
      calls.push(conn.sendRam(0, (i * 8) % 480, pages, data, { channel: 0 }));
      if (i % 10 === 0) calls.push(conn.sendZero(5, i, 1, { channel: 0 }));
    }
    await Promise.all(calls);
    await conn.sync(1);
    await conn.send({ kind: 'end', memoryHash: 0n, pages: 0, configDigest: 0n, vcpuStateDigest: 0n, vcpuStates: 0 });
    await conn.flush();
    await received;
    const expected: number[] = [];
    for (let i = 1; i <= 60; i++) {
      for (let p = 0; p < 1 + (i % 5) * 7; p++) expected.push(i);
      if (i % 10 === 0) expected.push(-i);
    }
    expect(order).toEqual(expected);
    conn.destroy();
    await server.close();
  });
});

describe('once per round', () => {
  it('rejects a page sent on two channels in one round; allows it twice on one channel or across rounds', async () => {
    const server = await MigrationListener.listen({ host: '127.0.0.1', port: 0 });
    const conn = await MigrationConnection.connect({ host: '127.0.0.1', port: server.port, channels: 2 });
    const incoming = await server.accept();
    const pages: string[] = [];
    const destErr = (async () => {
      for await (const rec of incoming.records()) if (rec.kind === 'ram' || rec.kind === 'zero') pages.push(`${rec.kind}:${rec.firstPage}`);
    })().catch((e) => e);
    const page = new Uint8Array(PAGE).fill(5);
    await conn.send({ kind: 'config', config: { memslots: LAYOUT } });
    await conn.sendRam(0, 7, 1, page, { channel: 1 });
    await conn.sendRam(0, 7, 1, page, { channel: 1 }); // same channel: ordered, allowed
    await conn.sync(1);
    await conn.sendZero(0, 7, 1, { channel: 0 }); // next round, other channel: allowed
    await conn.sync(2);
    await conn.sendRam(0, 7, 1, page, { channel: 0 });
    await conn.flush();
    await conn.sendZero(0, 7, 1, { channel: 1 }); // same round, other channel: rejected
    await conn.flush();
    const err = await destErr;
    // Which of the two round-3 copies is read first is up to the sockets.
    expect(pages.slice(0, 3)).toEqual(['ram:7', 'ram:7', 'zero:7']);
    expect(pages).toHaveLength(4);
    expect(err).toBeInstanceOf(MigrationStreamError);
    expect(err.code).toBe('duplicate-page');
    expect(err.message).toMatch(/^slot 0 page 7 came on channel ([01]) and again on channel (?!\1)[01] in round 3: a page may travel once per round$/);
    conn.destroy();
    await server.close();
  });
});

describe('zero-copy sends', () => {
  it('sendRamBorrowed: buffers reused only after written() arrive intact', async () => {
    const server = await MigrationListener.listen({ host: '127.0.0.1', port: 0 });
    const conn = await MigrationConnection.connect({ host: '127.0.0.1', port: server.port, channels: 2, batchBytes: 64 * 1024 });
    const incoming = await server.accept();
    const got = new Map<number, number>();
    const received = (async () => {
      for await (const rec of incoming.records()) {
        if (rec.kind !== 'ram') continue;
        for (let i = 0; i < rec.count; i++) got.set(rec.firstPage + i, new DataView(rec.data.buffer, rec.data.byteOffset + i * PAGE, 4).getUint32(0, true));
      }
    })();
    await conn.send({ kind: 'config', config: { memslots: [{ slot: 0, pages: 4097 }] } });
    // Two 64-page buffers per channel, refilled as soon as the socket gives them back.
    const pools = [0, 1].map(() => [0, 1].map(() => ({ buf: new Uint8Array(64 * PAGE), free: Promise.resolve() })));
    let borrowedWrites = 0;
    await Promise.all([0, 1].map(async (ch) => {
      for (let run = 0; run < 32; run++) {
        const slot = pools[ch]![run % 2]!;
        await slot.free;
        const first = (ch * 32 + run) * 64;
        const dv = new DataView(slot.buf.buffer);
        for (let i = 0; i < 64; i++) dv.setUint32(i * PAGE, first + i + 1, true);
        let release!: () => void;
        slot.free = new Promise<void>((r) => (release = r));
        await conn.sendRamBorrowed(0, first, 64, slot.buf, () => {
          borrowedWrites++;
          release();
        }, { channel: ch });
      }
    }));
    let smallWritten = false;
    await conn.sendRamBorrowed(0, 4096, 1, new Uint8Array(PAGE).fill(1), () => (smallWritten = true));
    expect(smallWritten).toBe(true); // below ZERO_COPY_MIN_PAGES: copied, released at once
    await conn.sync(1);
    await conn.send({ kind: 'end', memoryHash: 0n, pages: 0, configDigest: 0n, vcpuStateDigest: 0n, vcpuStates: 0 });
    await conn.flush();
    await received;
    expect(borrowedWrites).toBe(64);
    for (let p = 0; p < 4096; p++) expect(got.get(p)).toBe(p + 1);
    expect(got.get(4096)).toBe(0x01010101);
    conn.destroy();
    await server.close();
  });
});

describe('migration transport failures', () => {
  it('says who refused the connection', async () => {
    const server = await MigrationListener.listen({ host: '127.0.0.1', port: 0 });
    const port = server.port;
    await server.close();
    const err = await MigrationConnection.connect({ host: '127.0.0.1', port, timeoutMs: 2000 }).catch((e) => e);
    expect(err).toBeInstanceOf(MigrationTransportError);
    expect(err.code).toBe('connect-refused');
    expect(err.message).toBe(`destination 127.0.0.1:${port} refused the connection`);
  });

  it('a data channel dropped mid-transfer fails both ends with typed errors', async () => {
    const server = await MigrationListener.listen({ host: '127.0.0.1', port: 0 });
    const conn = await MigrationConnection.connect({ host: '127.0.0.1', port: server.port, channels: 3 });
    const incoming = await server.accept();
    const destErr = (async () => {
      for await (const rec of incoming.records()) void rec;
    })().catch((e) => e);
    await conn.send({ kind: 'config', config: { memslots: LAYOUT } });
    const page = new Uint8Array(64 * PAGE).fill(1);
    await conn.sendRam(0, 0, 64, page, { channel: 1 });
    await conn.sync(1);
    // The wire to channel 2 is cut (not an orderly close: no ERROR, no END).
    (conn.channels[2] as unknown as { socket: Socket }).socket.destroy();
    const e1 = await destErr;
    expect(e1).toBeInstanceOf(MigrationTransportError);
    expect(e1.code).toBe('connection-lost');
    expect(e1.message).toMatch(/channel 2 .*peer closed the connection mid-stream/);
    // The destination gave up: the source learns it on its next calls.
    const e2 = await (async () => {
      for (let i = 0; i < 100; i++) {
        await conn.sendRam(0, 0, 64, page, { channel: 0 });
        await conn.flush();
        await new Promise((r) => setTimeout(r, 10));
      }
    })().catch((e) => e);
    expect(e2).toBeInstanceOf(MigrationTransportError);
    expect(e2.code).toBe('connection-lost');
    expect(e2.message).toMatch(/channel 2 \(127\.0\.0\.1:\d+\): peer closed the connection mid-stream/);
    conn.destroy();
    await server.close();
  });

  it('a source that goes silent trips the destination idle timeout', async () => {
    const server = await MigrationListener.listen({ host: '127.0.0.1', port: 0 });
    const conn = await MigrationConnection.connect({ host: '127.0.0.1', port: server.port, channels: 2 });
    const incoming = await server.accept();
    await conn.send({ kind: 'config', config: { memslots: LAYOUT } });
    await conn.sendRam(0, 0, 1, new Uint8Array(PAGE).fill(3), { channel: 1 });
    await conn.flush();
    const kinds: string[] = [];
    const err = await (async () => {
      for await (const rec of incoming.records({ idleTimeoutMs: 300 })) kinds.push(rec.kind);
    })().catch((e) => e);
    expect(kinds).toEqual(['config', 'ram']);
    expect(err).toBeInstanceOf(MigrationTransportError);
    expect(err.code).toBe('idle-timeout');
    expect(err.message).toBe('no progress from the source for 300 ms during round 1');
    conn.destroy();
    await server.close();
  });

  it('a destination that dies mid-stream fails the source with connection-lost', async () => {
    const server = await MigrationListener.listen({ host: '127.0.0.1', port: 0 });
    const conn = await MigrationConnection.connect({ host: '127.0.0.1', port: server.port, channels: 2 });
    const incoming = await server.accept();
    await conn.send({ kind: 'config', config: { memslots: LAYOUT } });
    for (const ch of incoming.channels) ch.destroy(); // destination process gone, no ERROR sent
    const err = await conn.nextBackRecord(['complete'], 5000).catch((e) => e);
    expect(err).toBeInstanceOf(MigrationTransportError);
    expect(err.code).toBe('connection-lost');
    expect(err.message).toMatch(/channel \d \(127\.0\.0\.1:\d+\)/);
    conn.destroy();
    await server.close();
  });

  it.each([
    { where: 'the control channel', channels: 1, channel: 0 },
    { where: 'a data channel', channels: 2, channel: 1 },
  ])('a corrupt record on $where makes the destination throw MigrationStreamError and tell the source', async ({ channels, channel }) => {
    const server = await MigrationListener.listen({ host: '127.0.0.1', port: 0 });
    const conn = await MigrationConnection.connect({ host: '127.0.0.1', port: server.port, channels });
    const incoming = await server.accept();
    const destErr = (async () => {
      for await (const rec of incoming.records()) void rec;
    })().catch((e) => e);
    await conn.send({ kind: 'config', config: { memslots: LAYOUT } });
    await conn.sendRam(5, 251, 6, new Uint8Array(6 * PAGE).fill(9), { channel }).catch(() => undefined); // beyond slot 5's 256 pages
    await conn.flush().catch(() => undefined);
    const e1 = await destErr;
    expect(e1).toBeInstanceOf(MigrationStreamError);
    expect(e1.message).toMatch(/slot 5 firstPage 251 count 6 outside the slot's 256 pages/);
    const e2 = await conn.nextBackRecord(['complete'], 5000).catch((e) => e);
    expect(e2).toBeInstanceOf(MigrationTransportError);
    expect(e2.code).toBe('remote-error');
    expect(e2.message).toMatch(/outside the slot's 256 pages/);
    conn.destroy();
    await server.close();
  });
});
