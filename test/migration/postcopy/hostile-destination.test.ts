// A destination that asks for a page outside guest memory during post-copy (broken or hostile):
// the source refuses with a clear error, and stays paused with its memory intact (the guest may
// already run on the destination: resuming it here would run it twice).
//
// The request is written on the wire: the destination's COMPLETE is rewritten to point the
// source at a proxy in front of the real post-copy listener, and the proxy puts a
// POSTCOPY_REQUEST for a page past the end of guest RAM on the preempt connection before
// forwarding anything else.
import { describe, expect, it } from 'vitest';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { openEngine } from '../../../src/vmm/factory.ts';
import { createSourceVm } from '../../../src/migration/source-vm.ts';
import { encodeToBytes } from '../../../src/migration/stream/encoder.ts';
import { createMemoryHasher, hashVmMemory } from '../../../src/migration/hash.ts';
import { SlotMap } from '../../../src/migration/slot-map.ts';
import { describeVm } from '../../../src/migration/config.ts';
import type { DestLink } from '../../../src/migration/link.ts';
import { checkSequentialMemory, migrateInProcess } from '../helpers.ts';

const engine = await openEngine('soft');

/** Forwards to `port`; on the `inject`th connection (0-based) first writes `bytes` towards the client. */
async function injectingProxy(port: number, inject: number, bytes: Uint8Array): Promise<{ server: Server; port: number }> {
  let n = 0;
  const server = createServer((client: Socket) => {
    const i = n++;
    const upstream = connect({ host: '127.0.0.1', port });
    if (i === inject) client.write(bytes);
    client.pipe(upstream);
    upstream.pipe(client);
    const end = () => (client.destroy(), upstream.destroy());
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { server, port: (server.address() as { port: number }).port };
}

/** The DestLink with COMPLETE's post-copy port replaced by `rewrite(port)`. */
function rewritingCompletePort(link: DestLink, rewrite: (port: number) => Promise<number>): DestLink {
  return {
    get channels() {
      return link.channels;
    },
    get postcopyAllowed() {
      return link.postcopyAllowed;
    },
    run: (f) => link.run(f),
    close: () => link.close(),
    setIdleTimeout: (ms) => link.setIdleTimeout?.(ms),
    send: async (r) => {
      if (r.type === 'complete' && typeof r.details?.postcopyPort === 'number') r = { ...r, details: { ...r.details, postcopyPort: await rewrite(r.details.postcopyPort) } };
      return link.send(r);
    },
  };
}

describe('post-copy: a destination requesting a page outside guest memory', () => {
  it('is refused with a clear error; the source stays paused with its memory intact', async () => {
    const { vm, spec } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 4 << 20, backing: 'anonymous', workload: 'sequential' });
    const ram = vm.memslots().filter((s) => !s.internal);
    const slot = ram[0]!;
    const bogus = encodeToBytes({ kind: 'postcopy-request', slot: slot.slot, page: slot.pages + 5, count: 1 });
    let proxy: Server | null = null;
    const { stats, dest } = await migrateInProcess(vm, engine, {
      workload: spec,
      downtimeLimitMs: 0,
      destroyOnComplete: false,
      postcopy: { switchAfter: 1, onNoConvergence: 'postcopy', retries: 2, retryDelayMs: 20 },
      postcopyRecoverTimeoutMs: 300,
      // The preempt connection is the source's second.
      wrapDestLink: (l) => rewritingCompletePort(l, async (port) => {
        const p = await injectingProxy(port, 1, bogus);
        proxy = p.server;
        return p.port;
      }),
    });
    try {
      expect(stats.status, JSON.stringify({ e: stats.error, pc: stats.postcopy, proxied: proxy !== null })).toBe("failed");
      expect(stats.error).toMatch(new RegExp(`requested pages \\[${slot.pages + 5}, \\+1\\) of memslot ${slot.slot}, which is not guest RAM`));
      // Not retried: a hostile request is no dropped connection.
      expect(stats.postcopy?.recoveries ?? 0).toBe(0);
      expect(stats.sourceRunning).toBe(false);
      expect(stats.sourceIntact).toBe(true);
      // Paused for good, memory as at the switchover (the workload's stamps of those passes).
      const before = vm.progress().map((p) => p.passesCompleted);
      expect(before).toEqual(stats.passesAtSwitchover);
      const hasher = await createMemoryHasher();
      const slotMap = new SlotMap(describeVm(vm, spec, 'anonymous').memslots);
      const h1 = hashVmMemory(hasher, vm, slotMap);
      await new Promise((r) => setTimeout(r, 100));
      expect(vm.progress().map((p) => p.passesCompleted)).toEqual(before);
      expect(hashVmMemory(hasher, vm, slotMap)).toBe(h1);
      expect(checkSequentialMemory(vm, spec, 2, before)).toBeNull();
    } finally {
      (proxy as Server | null)?.close();
      await dest?.vm.destroy();
      await vm.destroy();
    }
  }, 60_000);
});
