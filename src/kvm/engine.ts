// The kvm engine: real hardware virtualization through /dev/kvm and the native addon. open()
// checks everything the engine needs and says exactly what is missing; the VM itself is in
// vm.ts.
import { accessSync, constants, readFileSync } from 'node:fs';
import {
  EngineUnavailableError,
  type Backing,
  type Engine,
  type EngineCapabilities,
  type Vm,
  type VmConfig,
} from '../vmm/engine.ts';
import { projectRoot } from '../util/worker.ts';
import { isSysError, loadAddon, type KvmAddon } from './addon.ts';
import { CAP, KVM_API_VERSION } from './abi.ts';
import { KvmVm } from './vm.ts';
import { Userfaultfd } from '../uffd/userfaultfd.ts';
import type { GuestCpl } from './guest-setup.ts';

/** Capabilities without which the engine cannot run its guests at all. */
const REQUIRED_CAPS: [keyof typeof CAP, string][] = [
  ['USER_MEMORY', 'KVM_CAP_USER_MEMORY'],
  ['IMMEDIATE_EXIT', 'KVM_CAP_IMMEDIATE_EXIT'],
  ['EXT_CPUID', 'KVM_CAP_EXT_CPUID'],
  ['MP_STATE', 'KVM_CAP_MP_STATE'],
  ['VCPU_EVENTS', 'KVM_CAP_VCPU_EVENTS'],
];

function hugetlbPagesFree(): number {
  try {
    const m = /HugePages_Free:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'));
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

function thpAvailable(): boolean {
  try {
    return !readFileSync('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8').includes('[never]');
  } catch {
    return false;
  }
}

let uffdOpensCache: boolean | undefined;
function uffdOpens(root: string): boolean {
  if (uffdOpensCache === undefined) {
    try {
      Userfaultfd.open({ root }).close();
      uffdOpensCache = true;
    } catch {
      uffdOpensCache = false;
    }
  }
  return uffdOpensCache;
}

export interface KvmEngineOptions {
  /**
   * Privilege level the workload guests run at (see guest-setup.ts). Default 3, or 0 when the
   * environment sets STAGE2_KVM_GUEST_CPL=0 (to run like the KVM selftests' guests do).
   */
  guestCpl?: GuestCpl;
}

export class KvmEngine implements Engine {
  readonly kind = 'kvm' as const;
  readonly guestCpl: GuestCpl;

  private constructor(
    readonly addon: KvmAddon,
    readonly kvmFd: number,
    readonly root: string,
    options: KvmEngineOptions,
  ) {
    this.guestCpl = options.guestCpl ?? (process.env.STAGE2_KVM_GUEST_CPL === '0' ? 0 : 3);
  }

  /** Open /dev/kvm, or throw EngineUnavailableError naming exactly what is missing. */
  static async open(root: string = projectRoot, options: KvmEngineOptions = {}): Promise<KvmEngine> {
    const addon = loadAddon(root);
    if (!addon) throw new EngineUnavailableError('kvm', 'addon not built (run npm run build:addon)');
    let fd: number;
    try {
      fd = addon.open('/dev/kvm');
    } catch (e) {
      const code = isSysError(e) ? e.code : String(e);
      throw new EngineUnavailableError('kvm', `/dev/kvm cannot be opened (${code})`);
    }
    const version = addon.ioctl(fd, 'KVM_GET_API_VERSION', 0);
    if (version !== KVM_API_VERSION) {
      addon.close(fd);
      throw new EngineUnavailableError('kvm', `KVM API version ${version}, need ${KVM_API_VERSION}`);
    }
    for (const [cap, name] of REQUIRED_CAPS) {
      if (addon.ioctl(fd, 'KVM_CHECK_EXTENSION', CAP[cap]) <= 0) {
        addon.close(fd);
        throw new EngineUnavailableError('kvm', `${name} missing`);
      }
    }
    return new KvmEngine(addon, fd, root, options);
  }

  checkExtension(cap: number): number {
    return this.addon.ioctl(this.kvmFd, 'KVM_CHECK_EXTENSION', cap);
  }

  capabilities(): EngineCapabilities {
    const backings: Backing[] = ['anonymous'];
    if (thpAvailable()) backings.push('anonymous_thp');
    if (hugetlbPagesFree() > 0) backings.push('hugetlb');
    let userfaultfd = false;
    try {
      accessSync('/dev/userfaultfd', constants.R_OK | constants.W_OK);
      userfaultfd = true;
    } catch {
      userfaultfd = false;
    }
    return {
      kind: 'kvm',
      manualDirtyLogProtect: (this.checkExtension(CAP.MANUAL_DIRTY_LOG_PROTECT2) & 1) !== 0,
      // KVM reports the largest ring in bytes; entries are 16-byte struct kvm_dirty_gfn.
      dirtyRingMaxEntries: Math.max(this.checkExtension(CAP.DIRTY_LOG_RING_ACQ_REL), this.checkExtension(CAP.DIRTY_LOG_RING)) / 16,
      memoryFaultExit: this.checkExtension(CAP.MEMORY_FAULT_INFO) > 0,
      // 'uffd' where the addon's userfaultfd opens; never 'exit' (KVM_MEM_EXIT_ON_MISSING was
      // never merged upstream: kvm/demand-pager.ts says so when asked).
      demandPagingPaths: uffdOpens(this.root) ? ['uffd'] : [],
      userfaultfd,
      backings,
      maxVcpus: this.checkExtension(CAP.MAX_VCPUS),
    };
  }

  async createVm(config: VmConfig = {}): Promise<Vm> {
    return KvmVm.create(this, config);
  }
}
