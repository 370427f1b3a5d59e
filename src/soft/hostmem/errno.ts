// Negative errno values, as the kernel's hva_to_pfn / get_user_pages paths return them.
// Host memory and the host address space report failures on hot paths as these numbers (never
// by throwing) so a vCPU worker's fault handler can branch on them without try/catch.

/** Operation not permitted: a write through a read-only VMA. */
export const EPERM = -1;
/** Out of memory: no free host frame (or no free 2 MiB frame for hugetlb). */
export const ENOMEM = -12;
/** Bad address: no VMA covers the hva. */
export const EFAULT = -14;

export function errnoName(errno: number): string {
  switch (errno) {
    case EPERM: return 'EPERM';
    case ENOMEM: return 'ENOMEM';
    case EFAULT: return 'EFAULT';
    default: return `errno ${errno}`;
  }
}
