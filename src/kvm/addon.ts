// Loading the native addon (native/src/kvm_addon.cc) and its typed surface. The addon is thin:
// each function is one system call; everything else is decided in src/kvm/.
//
// The addon is found by absolute path under the project root, never relative to this module:
// vCPU workers run from an esbuild bundle in the temp dir and pass workerData.__stage2Root.
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';

export type AddonBacking = 'anonymous' | 'anonymous_thp' | 'hugetlb' | 'memfd';

/** An ioctl argument: an integer, or the bytes of the struct it reads and writes. */
export type IoctlArg = number | bigint | Uint8Array;

export interface KvmAddon {
  open(path: string): number;
  close(fd: number): void;
  /** Returns the ioctl's result; errnos in `tolerate` come back as -errno instead of throwing. */
  ioctl(fd: number, name: string, arg: IoctlArg, tolerate?: number[]): number;
  dirtyLog(vmFd: number, clear: boolean, slot: number, firstPage: number, numPages: number, bitmap: Uint32Array): void;
  mmapGuest(bytes: number, backing: AddonBacking): { hva: number; buffer: SharedArrayBuffer };
  releaseGuest(hva: number, bytes: number): void;
  mmapFd(fd: number, pageOffset: number, bytes: number): SharedArrayBuffer;
  threadSelf(): bigint;
  kick(tid: bigint): void;
  kickSignal: number;
}

/** An error thrown by the addon for a failed system call. */
export interface SysError extends Error {
  code: string;
  errno: number;
  syscall: string;
}

export function isSysError(e: unknown): e is SysError {
  return e instanceof Error && typeof (e as Partial<SysError>).code === 'string' && typeof (e as Partial<SysError>).errno === 'number';
}

export const EINTR = 4;
export const EAGAIN = 11;

export function addonPath(root: string): string {
  return join(root, 'native', 'build', 'Release', 'stage2_kvm.node');
}

const loaded = new Map<string, KvmAddon>();

/** Load the addon, or return null when it has not been built. */
export function loadAddon(root: string): KvmAddon | null {
  const path = addonPath(root);
  const hit = loaded.get(path);
  if (hit) return hit;
  if (!existsSync(path)) return null;
  const addon = restartOnEintr(createRequire(join(root, 'package.json'))(path) as KvmAddon);
  loaded.set(path, addon);
  return addon;
}

const TOLERATE_EINTR = [EINTR];

/**
 * Restart system calls a signal interrupted, unless the caller asked to see EINTR (KVM_RUN,
 * which a kick interrupts on purpose). KVM_CREATE_VM, for one, returns EINTR when any signal is
 * pending while it registers its mmu notifier (mm_take_all_locks); QEMU loops on it too. The
 * profiler's SIGPROF made `node --cpu-prof` runs fail there.
 */
function restartOnEintr(raw: KvmAddon): KvmAddon {
  const { ioctl, dirtyLog } = raw;
  return {
    ...raw,
    ioctl(fd, name, arg, tolerate) {
      if (tolerate?.includes(EINTR)) return ioctl(fd, name, arg, tolerate);
      for (;;) {
        const r = ioctl(fd, name, arg, tolerate ? [...tolerate, EINTR] : TOLERATE_EINTR);
        if (r !== -EINTR) return r;
      }
    },
    dirtyLog(...args) {
      for (;;) {
        try {
          return dirtyLog(...args);
        } catch (e) {
          if (!isSysError(e) || e.errno !== EINTR) throw e;
        }
      }
    },
  };
}
