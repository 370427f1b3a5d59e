// An Engine that tells an observer about each Vm it creates: how the dashboard finds the VM of
// a command that builds it deep inside (a benchmark, a migration's destination) without that code
// knowing about the dashboard. The Vm itself is the engine's own object, unwrapped.
//
// Concurrency: the VMM's main thread.
import type { Engine, Vm } from '../vmm/engine.ts';

export function observeEngine(engine: Engine, onVm: (vm: Vm) => void): Engine {
  return {
    kind: engine.kind,
    capabilities: () => engine.capabilities(),
    createVm: async (config) => {
      const vm = await engine.createVm(config);
      onVm(vm);
      return vm;
    },
  };
}
