// Digests of the non-memory state a migration carries, so that END can bind everything the
// destination will run on (memory has its own hash, hash.ts):
//
//   configDigest    = xxh64(JSON text of CONFIG, seed CONFIG_SEED)
//   vcpuStateDigest = xxh64(JSON text of the array of vCPU states ordered by vCPU index,
//                           seed VCPU_SEED)
//
// "JSON text" is JSON.stringify of the value as the source built it and as the destination
// parsed it. JSON.parse then JSON.stringify of a stringify output gives the same text (key order
// is kept, numbers print the same), so the digests compare values, not bytes: a stream that
// spells the same value differently (whitespace) is the same state, and any change of a value
// (a memslot base, a flag, a pass counter) changes the digest. A deliberate forger can recompute
// it; the digest guards against corruption and bugs, and channel security is the transport's.
//
// Concurrency: pure functions over xxhash-wasm (initialised once, asynchronously), main thread.
import xxhash from 'xxhash-wasm';

const CONFIG_SEED = 0x5354_4147_4543_4647n; // "STAGECFG"
const VCPU_SEED = 0x5354_4147_4556_4350n; // "STAGEVCP"

export interface StateDigester {
  config(config: unknown): bigint;
  /** `states` in any order; each must carry its `vcpu` index. */
  vcpuStates(states: readonly { vcpu: number }[]): bigint;
}

let api: ReturnType<typeof xxhash> | undefined;

export async function createStateDigester(): Promise<StateDigester> {
  api ??= xxhash();
  const { h64 } = await api;
  return {
    config: (config) => h64(JSON.stringify(config), CONFIG_SEED),
    vcpuStates: (states) => h64(JSON.stringify([...states].sort((a, b) => a.vcpu - b.vcpu)), VCPU_SEED),
  };
}

/** A digest as it appears in messages: 16 hex digits. */
export const formatDigest = (d: bigint): string => d.toString(16).padStart(16, '0');
