// `stage2 migrate`: not built yet (the live-migration issue builds it).
import type { Command } from 'commander';

export function registerMigrate(program: Command): void {
  program
    .command('migrate')
    .description('not built yet')
    .allowUnknownOption()
    .action(() => {
      throw new Error('stage2 migrate is not built yet');
    });
}
