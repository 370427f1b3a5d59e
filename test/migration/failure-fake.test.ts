// Failure, cancel, multi-channel and config-rejection behaviour of pre-copy (fake engine, real
// loopback TCP): whatever goes wrong before switchover, the source keeps running with its memory
// intact and dirty logging off, and the destination keeps nothing.
import { describe, it, expect } from 'vitest';
import { FakeEngine, type FakeVm } from './fake-engine.ts';
import { createSourceVm } from '../../src/migration/source-vm.ts';
import { KVM_MEM_LOG_DIRTY_PAGES } from '../../src/vmm/engine.ts';
import { MigrationLinkError } from '../../src/migration/link.ts';
import { connectLink, listenLink } from '../../src/migration/transports.ts';
import { migrateVm } from '../../src/migration/source.ts';
import { receiveMigration } from '../../src/migration/destination.ts';
import { checkSequentialMemory, migrateInProcess } from './helpers.ts';

const engine = new FakeEngine();

async function dirtyingVm() {
  const r = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 2 << 20, backing: 'anonymous', workload: 'sequential' });
  (r.vm as FakeVm).pagesPerStep = 16;
  return r;
}

async function expectSourceIntact(vm: FakeVm, spec: Parameters<typeof checkSequentialMemory>[1]) {
  expect(vm.memslots().every((s) => (s.flags & KVM_MEM_LOG_DIRTY_PAGES) === 0)).toBe(true);
  const before = vm.progress().map((p) => p.passesCompleted);
  await vm.waitForPasses(Math.max(...before) + 1, 10_000);
  await vm.pause();
  const passes = vm.progress().map((p) => p.passesCompleted);
  expect(checkSequentialMemory(vm, spec, 2, passes)).toBeNull();
  await vm.destroy();
}

for (const transport of ['tcp', 'wire'] as const)
describe(`pre-copy failures (fake engine, ${transport} transport)`, () => {
  for (const phase of ['setup', 'bulk', 'iterative', 'stop-and-copy'] as const) {
    it(`a connection dropped during ${phase} leaves the source running, intact, logging off`, async () => {
      const { vm, spec } = await dirtyingVm();
      const { stats, dest, destError } = await migrateInProcess(vm, engine, {
        workload: spec,
        transport,
        downtimeLimitMs: 0,
        maxRounds: 3,
        onPhase: (p, link) => {
          if (p === phase) setImmediate(() => link.destroy(new MigrationLinkError('injected drop')));
        },
      });
      expect(stats.status).toBe('failed');
      expect(stats.error).toMatch(/injected drop|closed|dropped|lost|reset/);
      expect(stats.sourceIntact).toBe(true);
      expect(stats.verified).toBe(false);
      expect(dest).toBeNull();
      expect(destError?.message).toMatch(/incoming migration failed.*nothing was kept/);
      await expectSourceIntact(vm as FakeVm, spec);
    });
  }

  it('an AbortSignal cancels mid-migration; the source keeps running', async () => {
    const { vm, spec } = await dirtyingVm();
    const ac = new AbortController();
    const { stats, destError } = await migrateInProcess(vm, engine, {
      workload: spec,
      transport,
      downtimeLimitMs: 0,
      maxRounds: 50,
      signal: ac.signal,
      onPhase: (p) => {
        if (p === 'iterative') setTimeout(() => ac.abort(), 5);
      },
    });
    expect(stats.status).toBe('cancelled');
    expect(stats.sourceIntact).toBe(true);
    expect(destError).not.toBeNull();
    await expectSourceIntact(vm as FakeVm, spec);
  });

  it('three channels give the same memory as one', async () => {
    const hashes: string[] = [];
    for (const channels of [1, 3]) {
      const { vm, spec } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 2 << 20, backing: 'anonymous', workload: 'idle' });
      const { stats, dest } = await migrateInProcess(vm, engine, { workload: spec, channels, transport });
      expect(stats.status).toBe('completed');
      expect(stats.verified).toBe(true);
      expect(stats.params.channels).toBe(channels);
      hashes.push(dest!.hash);
      await dest!.vm.destroy();
    }
    expect(hashes[1]).toBe(hashes[0]);
  });

  it('three channels with a dirtying guest verify', async () => {
    const { vm, spec } = await dirtyingVm();
    const { stats, dest } = await migrateInProcess(vm, engine, { workload: spec, channels: 3, transport, downtimeLimitMs: 0, maxRounds: 4 });
    expect(stats.status).toBe('completed');
    expect(stats.verified).toBe(true);
    expect(stats.rounds.length).toBeGreaterThanOrEqual(3);
    await dest!.vm.destroy();
  });

  it('the receiver rejects a config it cannot host, with a clear error; the source stays intact', async () => {
    const { vm, spec } = await dirtyingVm();
    const listener = await listenLink(transport, { host: '127.0.0.1', port: 0 });
    const destP = listener.accept().then((link) => receiveMigration(link, { openEngine: async () => engine, limits: { maxRamBytes: 1 << 20 } }));
    const destResult = destP.then(() => null, (e: Error) => e);
    const link = await connectLink(transport, { host: '127.0.0.1', port: listener.port, channels: 1 });
    const stats = await migrateVm(vm, link, { workload: spec, backing: 'anonymous' });
    listener.close();
    expect(stats.status).toBe('failed');
    expect(stats.error).toMatch(/cannot host this VM: .* bytes of guest RAM, this receiver accepts at most 1048576/);
    expect(stats.sourceIntact).toBe(true);
    expect((await destResult)?.message).toMatch(/cannot host this VM/);
    await expectSourceIntact(vm as FakeVm, spec);
  });
});

describe('switchover guard (fake engine)', () => {
  it('a page corrupted in flight makes the destination refuse to start the guest; the source resumes', async () => {
    const { vm, spec } = await dirtyingVm();
    let corrupted = false;
    const { stats, dest, destError } = await migrateInProcess(vm, engine, {
      workload: spec,
      maxRounds: 2,
      wrapLink: (link) => ({
        get channels() {
          return link.channels;
        },
        acksRounds: link.acksRounds,
        send: (r, ch) => {
          // A page of the fake's code slot: the guest never rewrites it, so no later round heals it.
          if (r.type === 'ram' && !corrupted && r.gpa >= 0x100000 && r.gpa < 0x100000 + 64 * 4096) {
            corrupted = true;
            const bad = Buffer.from(r.data);
            bad[100] ^= 0xff;
            return link.send({ ...r, data: bad }, ch);
          }
          return link.send(r, ch);
        },
        receive: () => link.receive(),
        bytesSent: () => link.bytesSent(),
        close: () => link.close(),
        destroy: (e) => link.destroy(e),
      }),
    });
    expect(corrupted).toBe(true);
    expect(stats.status).toBe('failed');
    expect(stats.error).toMatch(/memory hash mismatch at END/);
    expect(stats.sourceIntact).toBe(true);
    expect(dest).toBeNull();
    expect(destError?.message).toMatch(/the guest is not started/);
    await expectSourceIntact(vm as FakeVm, spec);
  });
});
