export * from './vma-table.ts';
export * from './host-address-space.ts';
export * from './gup.ts';
export * from './zap.ts';
