import { describe, expect, it } from 'vitest';
import { MigrationConnection } from '../../../src/migration/transport/connection.ts';
import { MigrationListener } from '../../../src/migration/transport/listener.ts';
import { RateLimiter } from '../../../src/migration/transport/rate-limiter.ts';

describe('RateLimiter', () => {
  it('lets a burst through at once and makes a larger amount wait roughly bytes/rate', async () => {
    const limiter = new RateLimiter(10 << 20, 1 << 20); // 10 MiB/s, 1 MiB burst
    const t0 = process.hrtime.bigint();
    await limiter.take(1 << 20);
    expect(limiter.throttledSeconds).toBe(0); // the burst never waits (a wall-clock bound would flake on a loaded box)
    for (let i = 0; i < 4; i++) await limiter.take(1 << 20); // 4 MiB beyond the burst: >= ~0.4 s
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    expect(seconds).toBeGreaterThan(0.3);
    expect(limiter.throttledSeconds).toBeGreaterThan(0.3);
  });

  it('rejects a nonsensical rate', () => {
    expect(() => new RateLimiter(0)).toThrow(/positive/);
    expect(() => new RateLimiter(Number.NaN)).toThrow(/positive/);
  });

  it('caps a real TCP transfer over 2 channels, and every byte sent is received', async () => {
    const server = await MigrationListener.listen({ host: '127.0.0.1', port: 0 });
    const rate = 8 << 20;
    const conn = await MigrationConnection.connect({ host: '127.0.0.1', port: server.port, channels: 2, maxBandwidthBytesPerSec: rate, batchBytes: 256 << 10 });
    const incoming = await server.accept();
    const layout = [{ slot: 0, pages: 1024 }];
    let pages = 0;
    const received = (async () => {
      for await (const rec of incoming.records()) if (rec.kind === 'ram') pages += rec.count;
    })();
    const t0 = process.hrtime.bigint();
    await conn.send({ kind: 'config', config: { memslots: layout } });
    const data = new Uint8Array(512 * 4096).fill(7); // 2 MiB per channel, 4 MiB in all
    await Promise.all([conn.sendRam(0, 0, 512, data, { channel: 0 }), conn.sendRam(0, 512, 512, data, { channel: 1 })]);
    await conn.sync(1);
    await conn.send({ kind: 'end', memoryHash: 0n, pages: 1024, configDigest: 0n, vcpuStateDigest: 0n, vcpuStates: 0 });
    await conn.flush();
    await received;
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    // 4 MiB at 8 MiB/s with a 0.4 MiB burst: about 0.45 s. Only a gross lower bound is asserted.
    expect(seconds).toBeGreaterThan(0.3);
    expect(pages).toBe(1024);
    expect(incoming.bytesReceived).toBe(conn.bytesSent);
    expect(conn.bytesSent).toBeGreaterThan(4 << 20);
    await conn.close();
    await incoming.close();
    await server.close();
  });
});
