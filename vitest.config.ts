import { defineConfig } from 'vitest/config';

// Tests spawn worker threads (vCPUs) and may load the kvm addon: run each test file in its own
// forked process, not in a worker thread, and never more than the machine's two cores at once.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    pool: 'forks',
    maxWorkers: 2,
    testTimeout: 120_000,
    hookTimeout: 120_000,
  },
});
