// Negative errno values, as the kernel's hva_to_pfn / get_user_pages paths return them.
// Host memory and the host address space report failures on hot paths as these numbers (never
// by throwing) so a vCPU worker's fault handler can branch on them without try/catch.

/** Operation not permitted: a write through a read-only VMA. */
export const EPERM = -1;
/**
 * Try again: the page is missing in a VMA registered with userfaultfd (MISSING mode), so
 * handle_userfault would queue the fault for the VMM; the caller waits for UFFDIO_COPY (or exits
 * to the VMM, KVM_EXIT_MEMORY_FAULT) and retries.
 */
export const EAGAIN = -11;
/** Out of memory: no free host frame (or no free 2 MiB frame for hugetlb). */
export const ENOMEM = -12;
/** Bad address: no VMA covers the hva. */
export const EFAULT = -14;
/** UFFDIO_COPY onto a page that is already populated. */
export const EEXIST = -17;
/** Invalid argument (e.g. a UFFDIO_COPY of the wrong size). */
export const EINVAL = -22;

export function errnoName(errno: number): string {
  switch (errno) {
    case EPERM: return 'EPERM';
    case ENOMEM: return 'ENOMEM';
    case EFAULT: return 'EFAULT';
    case EAGAIN: return 'EAGAIN';
    case EEXIST: return 'EEXIST';
    case EINVAL: return 'EINVAL';
    default: return `errno ${errno}`;
  }
}
