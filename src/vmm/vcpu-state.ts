// Checking a VcpuState that came from outside (a migration stream) before an engine loads it.
// The envelope (engine, vcpu, progress) is engine-neutral and checked here; each engine checks
// its own `arch` with the same error type before it changes anything, so a malformed state is
// refused while the vCPU is still stopped, never after the guest has run on it.
//
// Concurrency: pure functions.
import type { EngineKind, VcpuState } from './engine.ts';
import { describeValue } from '../util/describe-value.ts';

/** A vCPU state field broke a rule; `field` is its path (e.g. `arch.pos`). */
export class VcpuStateError extends Error {
  constructor(
    readonly field: string,
    readonly rule: string,
  ) {
    super(`vCPU state ${field}: ${rule}`);
    this.name = 'VcpuStateError';
  }
}


export function stateObject(v: unknown, field: string): Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new VcpuStateError(field, `must be an object, got ${describeValue(v)}`);
  return v as Record<string, unknown>;
}

export function stateInt(v: unknown, field: string, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v)) throw new VcpuStateError(field, `must be an integer, got ${describeValue(v)}`);
  if (v < min || v > max) throw new VcpuStateError(field, `${v} is outside ${min}..${max}`);
  return v;
}

export function stateBool(v: unknown, field: string): boolean {
  if (typeof v !== 'boolean') throw new VcpuStateError(field, `must be true or false, got ${describeValue(v)}`);
  return v;
}

/** Refuse fields nobody would load: a state this build half-understands is not the source's. */
export function stateOnlyKeys(o: Record<string, unknown>, field: string, required: readonly string[], optional: readonly string[] = []): void {
  for (const k of Object.keys(o)) if (!required.includes(k) && !optional.includes(k)) throw new VcpuStateError(`${field}.${k}`, 'unknown field');
  for (const k of required) if (!(k in o)) throw new VcpuStateError(`${field}.${k}`, 'missing');
}

/** Largest pass counter any engine keeps (a signed 32-bit shared word). */
export const MAX_PASSES = 2 ** 31 - 1;

/**
 * The envelope of a state for `engine` with `vcpus` vCPUs: engine, vcpu index and progress
 * checked; `arch` is left to the engine. Returns the state typed.
 */
export function checkVcpuStateEnvelope(raw: unknown, engine: EngineKind, vcpus: number): VcpuState {
  const o = stateObject(raw, 'record');
  stateOnlyKeys(o, 'record', ['engine', 'vcpu', 'progress', 'arch']);
  if (o.engine !== engine) throw new VcpuStateError('engine', `${describeValue(o.engine)}, expected ${JSON.stringify(engine)}`);
  const vcpu = stateInt(o.vcpu, 'vcpu', 0, vcpus - 1);
  const p = stateObject(o.progress, 'progress');
  stateOnlyKeys(p, 'progress', ['vcpu', 'passesCompleted', 'halted']);
  if (p.vcpu !== vcpu) throw new VcpuStateError('progress.vcpu', `${describeValue(p.vcpu)} but the state is for vCPU ${vcpu}`);
  stateInt(p.passesCompleted, 'progress.passesCompleted', 0, MAX_PASSES);
  stateBool(p.halted, 'progress.halted');
  stateObject(o.arch, 'arch');
  return o as unknown as VcpuState;
}
