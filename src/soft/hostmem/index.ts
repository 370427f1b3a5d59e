export * from './errno.ts';
export * from './page-flags.ts';
export * from './layout.ts';
export * from './bitpool.ts';
export * from './host-memory.ts';
