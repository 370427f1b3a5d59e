export * from './vma-table.ts';
export * from './host-address-space.ts';
