// query() while a migration runs (QEMU's query-migrate): the status walks through every phase and
// the counters move, read from outside the source state machine.
import { expect, it } from 'vitest';
import { openEngine } from '../../src/vmm/factory.ts';
import { createSourceVm } from '../../src/migration/source-vm.ts';
import { MigrationState, type MigrationQuery } from '../../src/migration/migration-state.ts';
import { migrateInProcess } from './helpers.ts';

it('query() mid-migration sees the status and the counters move', async () => {
  const engine = await openEngine('soft');
  const { vm, spec } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 8 << 20, backing: 'anonymous', workload: 'sequential' });
  const state = new MigrationState();
  const statuses: string[] = [state.status];
  state.onStatus((s) => statuses.push(s));
  const samples: MigrationQuery[] = [];
  const poll = setInterval(() => samples.push(state.query()), 20);
  try {
    // 16 MiB at 24 MB/s: the bulk round alone takes ~0.7 s, many polls.
    const { stats, dest } = await migrateInProcess(vm, engine, { workload: spec, state, maxBandwidth: 24e6, maxRounds: 3, downtimeLimitMs: 50 });
    expect(stats.status).toBe('completed');
    await dest?.vm.destroy();
  } finally {
    clearInterval(poll);
    await vm.destroy();
  }
  expect(statuses).toEqual(['setup', 'active', 'device', 'completed']);
  const active = samples.filter((q) => q.status === 'active');
  expect(active.length).toBeGreaterThan(3);
  const bytes = active.map((q) => q.transferredBytes);
  expect(bytes[bytes.length - 1]!).toBeGreaterThan(bytes[0]!);
  for (let i = 1; i < bytes.length; i++) expect(bytes[i]!).toBeGreaterThanOrEqual(bytes[i - 1]!);
  expect(active.every((q) => q.ramBytes === 16 << 20 && q.round >= 1)).toBe(true);
  const end = state.query();
  expect(end).toMatchObject({ status: 'completed', remainingBytes: 0 });
  expect(end.transferredBytes).toBeGreaterThanOrEqual(16 << 20);
  expect(end.dirtySyncCount).toBeGreaterThanOrEqual(2);
  expect(end.totalSeconds).toBe(state.query().totalSeconds);
});
