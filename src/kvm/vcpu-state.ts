// Saving and loading every register set a vCPU of this engine needs to resume elsewhere, in the
// order QEMU's kvm_arch_put_registers uses (regs, fpu/xsave, xcrs, sregs, msrs, events,
// mp_state, lapic, debugregs). The blobs are KVM's structs verbatim, base64 in JSON: the
// destination is the same engine on the same kind of host.
//
// Only the VMM thread calls these, and only while the vCPU's worker is outside KVM_RUN (not
// started yet, or PAUSED; see control.ts).
import type { KvmAddon } from './addon.ts';
import type { VcpuState } from '../vmm/engine.ts';
import { VcpuStateError, stateInt, stateObject, stateOnlyKeys } from '../vmm/vcpu-state.ts';
import { REGS_BYTES, SAVED_MSRS, SREGS_BYTES, STATE_BYTES, decodeMsrs, encodeMsrs } from './abi.ts';

export interface KvmArchState {
  regs: string;
  sregs: string;
  fpu: string;
  xsave?: string;
  xcrs?: string;
  msrs: { index: number; data: string }[];
  lapic?: string;
  vcpuEvents: string;
  mpState: string;
  debugregs?: string;
}

export interface VcpuStateFeatures {
  xsaveBytes: number; // 0: no XSAVE; 4096: KVM_GET_XSAVE; more: KVM_GET_XSAVE2
  xcrs: boolean;
  lapic: boolean; // an in-kernel irqchip exists
  debugregs: boolean;
  /** MSRs this host lets us read and write, a subset of SAVED_MSRS. */
  msrIndices: number[];
}

const b64 = (b: Uint8Array): string => Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('base64');
const unb64 = (s: string, minBytes: number): Uint8Array => {
  const raw = Buffer.from(s, 'base64');
  const out = new Uint8Array(Math.max(minBytes, raw.length));
  out.set(raw);
  return out;
};

function get(addon: KvmAddon, fd: number, name: string, bytes: number): Uint8Array {
  const b = new Uint8Array(bytes);
  addon.ioctl(fd, name, b);
  return b;
}

/** The subset of SAVED_MSRS that KVM_GET_MSRS reads on this host (it stops at the first failure). */
export function probeMsrs(addon: KvmAddon, vcpuFd: number): number[] {
  let indices: number[] = [...SAVED_MSRS];
  for (;;) {
    const n = addon.ioctl(vcpuFd, 'KVM_GET_MSRS', encodeMsrs(indices.map((index) => ({ index, data: 0n }))));
    if (n === indices.length) return indices;
    indices = indices.filter((_, i) => i !== n);
  }
}

export function saveArchState(addon: KvmAddon, fd: number, f: VcpuStateFeatures): KvmArchState {
  const msrBuf = encodeMsrs(f.msrIndices.map((index) => ({ index, data: 0n })));
  const n = addon.ioctl(fd, 'KVM_GET_MSRS', msrBuf);
  if (n !== f.msrIndices.length) throw new Error(`KVM_GET_MSRS read ${n} of ${f.msrIndices.length} MSRs`);
  const state: KvmArchState = {
    regs: b64(get(addon, fd, 'KVM_GET_REGS', REGS_BYTES)),
    sregs: b64(get(addon, fd, 'KVM_GET_SREGS', SREGS_BYTES)),
    fpu: b64(get(addon, fd, 'KVM_GET_FPU', STATE_BYTES.fpu)),
    msrs: decodeMsrs(msrBuf, n).map((m) => ({ index: m.index, data: m.data.toString() })),
    vcpuEvents: b64(get(addon, fd, 'KVM_GET_VCPU_EVENTS', STATE_BYTES.vcpuEvents)),
    mpState: b64(get(addon, fd, 'KVM_GET_MP_STATE', STATE_BYTES.mpState)),
  };
  if (f.xsaveBytes > 0) state.xsave = b64(get(addon, fd, f.xsaveBytes > 4096 ? 'KVM_GET_XSAVE2' : 'KVM_GET_XSAVE', f.xsaveBytes));
  if (f.xcrs) state.xcrs = b64(get(addon, fd, 'KVM_GET_XCRS', STATE_BYTES.xcrs));
  if (f.lapic) state.lapic = b64(get(addon, fd, 'KVM_GET_LAPIC', STATE_BYTES.lapic));
  if (f.debugregs) state.debugregs = b64(get(addon, fd, 'KVM_GET_DEBUGREGS', STATE_BYTES.debugregs));
  return state;
}

export function loadArchState(addon: KvmAddon, fd: number, f: VcpuStateFeatures, s: KvmArchState): void {
  addon.ioctl(fd, 'KVM_SET_REGS', unb64(s.regs, REGS_BYTES));
  addon.ioctl(fd, 'KVM_SET_FPU', unb64(s.fpu, STATE_BYTES.fpu));
  if (s.xsave && f.xsaveBytes > 0) addon.ioctl(fd, 'KVM_SET_XSAVE', unb64(s.xsave, f.xsaveBytes));
  if (s.xcrs && f.xcrs) addon.ioctl(fd, 'KVM_SET_XCRS', unb64(s.xcrs, STATE_BYTES.xcrs));
  addon.ioctl(fd, 'KVM_SET_SREGS', unb64(s.sregs, SREGS_BYTES));
  const msrs = s.msrs.map((m) => ({ index: m.index, data: BigInt(m.data) }));
  const n = addon.ioctl(fd, 'KVM_SET_MSRS', encodeMsrs(msrs));
  if (n !== msrs.length) throw new Error(`KVM_SET_MSRS: wrote ${n} of ${msrs.length} MSRs (stopped at 0x${msrs[n]?.index.toString(16)})`);
  addon.ioctl(fd, 'KVM_SET_VCPU_EVENTS', unb64(s.vcpuEvents, STATE_BYTES.vcpuEvents));
  addon.ioctl(fd, 'KVM_SET_MP_STATE', unb64(s.mpState, STATE_BYTES.mpState));
  if (s.lapic && f.lapic) addon.ioctl(fd, 'KVM_SET_LAPIC', unb64(s.lapic, STATE_BYTES.lapic));
  if (s.debugregs && f.debugregs) addon.ioctl(fd, 'KVM_SET_DEBUGREGS', unb64(s.debugregs, STATE_BYTES.debugregs));
}

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

function blob(a: Record<string, unknown>, key: string, bytes: number, required: boolean): void {
  const v = a[key];
  if (v === undefined && !required) return;
  if (typeof v !== 'string' || !BASE64.test(v) || v.length % 4 !== 0) throw new VcpuStateError(`arch.${key}`, 'must be a base64 string');
  const n = Buffer.byteLength(v, 'base64');
  if (n > bytes) throw new VcpuStateError(`arch.${key}`, `${n} bytes, KVM's struct has ${bytes}`);
}

/**
 * `state.arch` as KvmArchState for this host's features, or VcpuStateError: every blob base64
 * and no longer than its KVM struct, every MSR one this host saves with a 64-bit value. Checked
 * before the first KVM_SET_* so a bad state changes no register.
 */
export function checkKvmArchState(state: VcpuState, f: VcpuStateFeatures): KvmArchState {
  const a = stateObject(state.arch, 'arch');
  stateOnlyKeys(a, 'arch', ['regs', 'sregs', 'fpu', 'msrs', 'vcpuEvents', 'mpState'], ['xsave', 'xcrs', 'lapic', 'debugregs']);
  blob(a, 'regs', REGS_BYTES, true);
  blob(a, 'sregs', SREGS_BYTES, true);
  blob(a, 'fpu', STATE_BYTES.fpu, true);
  blob(a, 'vcpuEvents', STATE_BYTES.vcpuEvents, true);
  blob(a, 'mpState', STATE_BYTES.mpState, true);
  blob(a, 'xsave', Math.max(f.xsaveBytes, 0), false);
  blob(a, 'xcrs', STATE_BYTES.xcrs, false);
  blob(a, 'lapic', STATE_BYTES.lapic, false);
  blob(a, 'debugregs', STATE_BYTES.debugregs, false);
  if (!Array.isArray(a.msrs)) throw new VcpuStateError('arch.msrs', 'must be an array');
  a.msrs.forEach((m: unknown, i: number) => {
    const o = stateObject(m, `arch.msrs[${i}]`);
    stateOnlyKeys(o, `arch.msrs[${i}]`, ['index', 'data']);
    const index = stateInt(o.index, `arch.msrs[${i}].index`, 0, 0xffff_ffff);
    if (!f.msrIndices.includes(index)) throw new VcpuStateError(`arch.msrs[${i}].index`, `MSR 0x${index.toString(16)} is not one this host saves`);
    if (typeof o.data !== 'string' || !/^\d{1,20}$/.test(o.data) || BigInt(o.data) >= 2n ** 64n) throw new VcpuStateError(`arch.msrs[${i}].data`, 'must be a decimal 64-bit value');
  });
  return a as unknown as KvmArchState;
}
