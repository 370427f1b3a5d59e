// Whether this host can run the kvm engine, and why not, for it.skipIf in test/kvm.
import { EngineUnavailableError } from '../../src/vmm/engine.ts';
import { KvmEngine } from '../../src/kvm/engine.ts';

export async function openKvmOrReason(): Promise<{ engine: KvmEngine | null; reason: string }> {
  try {
    return { engine: await KvmEngine.open(), reason: '' };
  } catch (e) {
    if (!(e instanceof EngineUnavailableError)) throw e;
    console.log(`[test/kvm] skipped: ${e.message}`);
    return { engine: null, reason: e.message };
  }
}
