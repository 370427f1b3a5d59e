// Failure, cancel, multi-channel and config-rejection behaviour of pre-copy on every real engine
// present (soft always; kvm when /dev/kvm works), source and destination in this process over
// real loopback TCP: whatever goes wrong before switchover, the source keeps running with its
// memory intact and dirty logging off, and the destination keeps nothing.
//
// Failures are injected through the source's own hooks: onPhase (drop the connection as a phase
// starts) and a wrapped link (drop it when the first vCPU state of stop-and-copy is sent, i.e.
// with the guest paused and END not yet sent; corrupt one page in flight).
import { describe, it, expect } from 'vitest';
import { availableEngines } from '../../src/vmm/factory.ts';
import type { Engine, Vm } from '../../src/vmm/engine.ts';
import type { WorkloadSpec } from '../../src/guest/workload.ts';
import { createSourceVm } from '../../src/migration/source-vm.ts';
import { KVM_MEM_LOG_DIRTY_PAGES } from '../../src/vmm/engine.ts';
import { MigrationLinkError, type DestLink, type DestRecord } from '../../src/migration/link.ts';
import { connectLink, listenLink } from '../../src/migration/wire-link.ts';
import { migrateVm } from '../../src/migration/source.ts';
import { receiveMigration } from '../../src/migration/destination.ts';
import { checkSequentialMemory, interceptSend, migrateInProcess } from './helpers.ts';

const { engines, unavailable } = await availableEngines();
for (const u of unavailable) console.warn(`failure-engines: skipping ${u.engine}: ${u.missing}`);

const VCPUS = 2;
const BYTES_PER_VCPU = 2 << 20;

function dirtyingVm(engine: Engine) {
  return createSourceVm(engine, { vcpus: VCPUS, bytesPerVcpu: BYTES_PER_VCPU, backing: 'anonymous', workload: 'sequential' });
}

/** A destination link that closes instead of sending `type`: that answer never reaches the source. */
function swallowReply(type: DestRecord['type']) {
  return (link: DestLink): DestLink => ({
    channels: link.channels,
    run: (onRecord) => link.run(onRecord),
    close: () => link.close(),
    send: async (r) => (r.type === type ? link.close() : link.send(r)),
  });
}

/** Logging off, the guest still making progress, memory what the workload implies. */
async function expectSourceIntact(vm: Vm, spec: WorkloadSpec) {
  expect(vm.memslots().every((s) => (s.flags & KVM_MEM_LOG_DIRTY_PAGES) === 0)).toBe(true);
  const before = vm.progress().map((p) => p.passesCompleted);
  await vm.waitForPasses(Math.max(...before) + 1, 10_000);
  await vm.pause();
  const passes = vm.progress().map((p) => p.passesCompleted);
  expect(checkSequentialMemory(vm, spec, VCPUS, passes)).toBeNull();
  await vm.destroy();
}

for (const engine of engines) {
  describe(`pre-copy failures on the ${engine.kind} engine`, () => {
    for (const phase of ['setup', 'bulk', 'iterative'] as const) {
      it(`a connection dropped during ${phase} leaves the source running, intact, logging off`, async () => {
        const { vm, spec } = await dirtyingVm(engine);
        const { stats, dest, destError } = await migrateInProcess(vm, engine, {
          workload: spec,
          downtimeLimitMs: 0,
          maxRounds: 3,
          onPhase: (p, link) => {
            if (p === phase) setImmediate(() => link.destroy(new MigrationLinkError('injected drop')));
          },
        });
        expect(stats.status).toBe('failed');
        expect(stats.error).toMatch(/injected drop/);
        expect(stats.sourceIntact).toBe(true);
        expect(stats.verified).toBe(false);
        expect(dest).toBeNull();
        expect(destError?.message).toMatch(/incoming migration failed.*nothing was kept/);
        await expectSourceIntact(vm, spec);
      });
    }

    it('a connection dropped during stop-and-copy (guest paused, END not sent) resumes the source, intact, logging off', async () => {
      const { vm, spec } = await dirtyingVm(engine);
      let dropped = false;
      const { stats, dest, destError } = await migrateInProcess(vm, engine, {
        workload: spec,
        downtimeLimitMs: 0,
        maxRounds: 2,
        wrapLink: (link) =>
          interceptSend(link, (r, ch) => {
            if (r.type === 'vcpu' && !dropped) {
              dropped = true;
              link.destroy(new MigrationLinkError('injected drop'));
            }
            return link.send(r, ch);
          }),
      });
      expect(dropped).toBe(true);
      expect(stats.status).toBe('failed');
      expect(stats.error).toMatch(/injected drop/);
      expect(stats.rounds.some((r) => r.kind === 'iterative')).toBe(true);
      expect(stats.sourceIntact).toBe(true);
      expect(dest).toBeNull();
      expect(destError?.message).toMatch(/incoming migration failed.*nothing was kept/);
      await expectSourceIntact(vm, spec);
    });

    // The switchover commit (stream/format.ts): END -> COMPLETE (ready, not running), GO ->
    // STARTED. Whatever breaks, the guest never runs on both sides.
    it('COMPLETE lost on the way (before the commit): the source resumes, the destination starts nothing', async () => {
      const { vm, spec } = await dirtyingVm(engine);
      const { stats, dest, destError } = await migrateInProcess(vm, engine, {
        workload: spec,
        downtimeLimitMs: 0,
        maxRounds: 2,
        wrapDestLink: swallowReply('complete'),
      });
      expect(stats.status).toBe('failed');
      expect(stats.sourceIntact).toBe(true);
      expect(stats.sourceRunning).toBe(true);
      expect(dest).toBeNull();
      expect(destError?.message).toMatch(/incoming migration failed during committing: .*nothing was kept/);
      await expectSourceIntact(vm, spec);
    });

    it('GO lost on the way: the source, committed, stays paused; the destination starts nothing', async () => {
      const { vm, spec } = await dirtyingVm(engine);
      const { stats, dest, destError } = await migrateInProcess(vm, engine, {
        workload: spec,
        downtimeLimitMs: 0,
        maxRounds: 2,
        wrapLink: (link) =>
          interceptSend(link, (r, ch) => {
            if (r.type !== 'go') return link.send(r, ch);
            link.destroy(new MigrationLinkError('injected drop instead of GO'));
            return Promise.reject(new MigrationLinkError('injected drop instead of GO'));
          }),
      });
      expect(stats.status).toBe('failed');
      expect(stats.error).toMatch(/switchover outcome unknown: .*injected drop instead of GO/);
      expect(stats.sourceIntact).toBe(true);
      expect(stats.sourceRunning).toBe(false);
      expect(dest).toBeNull();
      expect(destError?.message).toMatch(/incoming migration failed during committing: .*injected drop instead of GO; nothing was kept/);
      // Paused for good: no pass completes, logging is off, memory is the switchover state.
      const at = vm.progress().map((p) => p.passesCompleted);
      await new Promise((r) => setTimeout(r, 200));
      expect(vm.progress().map((p) => p.passesCompleted)).toEqual(at);
      expect(vm.memslots().every((s) => (s.flags & KVM_MEM_LOG_DIRTY_PAGES) === 0)).toBe(true);
      expect(checkSequentialMemory(vm, spec, VCPUS, at)).toBeNull();
      await vm.destroy();
    });

    it('STARTED lost on the way back: the guest runs on the destination only; the source stays paused', async () => {
      const { vm, spec } = await dirtyingVm(engine);
      const { stats, dest, destError } = await migrateInProcess(vm, engine, {
        workload: spec,
        downtimeLimitMs: 0,
        maxRounds: 2,
        wrapDestLink: swallowReply('started'),
      });
      expect(destError).toBeNull();
      expect(stats.status).toBe('failed');
      expect(stats.error).toMatch(/switchover outcome unknown/);
      expect(stats.sourceRunning).toBe(false);
      const at = vm.progress().map((p) => p.passesCompleted);
      // The destination runs the guest on from where the source stopped...
      await dest!.vm.waitForPasses(Math.max(...dest!.passesAtSwitchover) + 2, 10_000);
      // ...while the source has not moved.
      expect(vm.progress().map((p) => p.passesCompleted)).toEqual(at);
      await dest!.vm.destroy();
      await vm.destroy();
    });

    it('an AbortSignal cancels mid-migration; the source keeps running', async () => {
      const { vm, spec } = await dirtyingVm(engine);
      const ac = new AbortController();
      const { stats, destError } = await migrateInProcess(vm, engine, {
        workload: spec,
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
      await expectSourceIntact(vm, spec);
    });

    it('three channels give the same memory as one', async () => {
      const hashes: string[] = [];
      for (const channels of [1, 3]) {
        const { vm, spec } = await createSourceVm(engine, { vcpus: VCPUS, bytesPerVcpu: BYTES_PER_VCPU, backing: 'anonymous', workload: 'idle' });
        const { stats, dest } = await migrateInProcess(vm, engine, { workload: spec, channels });
        expect(stats.status).toBe('completed');
        expect(stats.verified).toBe(true);
        expect(stats.params.channels).toBe(channels);
        hashes.push(dest!.hash);
        await dest!.vm.destroy();
      }
      expect(hashes[1]).toBe(hashes[0]);
    });

    it('three channels with a dirtying guest verify', async () => {
      const { vm, spec } = await dirtyingVm(engine);
      const { stats, dest } = await migrateInProcess(vm, engine, { workload: spec, channels: 3, downtimeLimitMs: 0, maxRounds: 4 });
      expect(stats.status).toBe('completed');
      expect(stats.verified).toBe(true);
      expect(stats.rounds.length).toBeGreaterThanOrEqual(3);
      await dest!.vm.destroy();
    });

    it('the receiver rejects a config it cannot host, with a clear error; the source stays intact', async () => {
      const { vm, spec } = await dirtyingVm(engine);
      const listener = await listenLink({ host: '127.0.0.1', port: 0 });
      const destP = listener.accept().then((link) => receiveMigration(link, { openEngine: async () => engine, limits: { maxRamBytes: 1 << 20 } }));
      const destResult = destP.then(
        () => null,
        (e: Error) => e,
      );
      const link = await connectLink({ host: '127.0.0.1', port: listener.port, channels: 1 });
      const stats = await migrateVm(vm, link, { workload: spec, backing: 'anonymous' });
      listener.close();
      expect(stats.status).toBe('failed');
      expect(stats.error).toMatch(/cannot host this VM: .* bytes of guest RAM, this receiver accepts at most 1048576/);
      expect(stats.sourceIntact).toBe(true);
      expect((await destResult)?.message).toMatch(/cannot host this VM/);
      await expectSourceIntact(vm, spec);
    });

    it('a page corrupted in flight makes the destination refuse to start the guest; the source resumes', async () => {
      // The idle guest never rewrites its test memory after population, so no later round
      // heals the corrupted page.
      const { vm, spec } = await createSourceVm(engine, { vcpus: VCPUS, bytesPerVcpu: BYTES_PER_VCPU, backing: 'anonymous', workload: 'idle' });
      let corrupted = false;
      // The test memory's memslot: the one that holds the workload's first page.
      const guestSlot = vm.memslots().find((s) => spec.gpaBase >= s.guestPhysAddr && spec.gpaBase < s.guestPhysAddr + s.memorySize)!.slot;
      const { stats, dest, destError } = await migrateInProcess(vm, engine, {
        workload: spec,
        maxRounds: 2,
        wrapLink: (link) =>
          interceptSend(link, (r, ch) => {
            if (r.type === 'ram' && !corrupted && r.slot === guestSlot) {
              corrupted = true;
              const bad = Buffer.from(r.data);
              bad[100] ^= 0xff;
              r.onWritten?.();
              return link.send({ ...r, data: bad, onWritten: undefined }, ch);
            }
            return link.send(r, ch);
          }),
      });
      expect(corrupted).toBe(true);
      expect(stats.status).toBe('failed');
      expect(stats.error).toMatch(/memory hash mismatch at END/);
      expect(stats.sourceIntact).toBe(true);
      expect(dest).toBeNull();
      expect(destError?.message).toMatch(/the guest is not started/);
      await vm.pause();
      expect(checkSequentialMemory(vm, spec, VCPUS, [0, 0])).toBeNull();
      await vm.destroy();
    });
  });
}
