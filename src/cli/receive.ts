// `stage2 receive`: not built yet (the live-migration issue builds it).
import type { Command } from 'commander';

export function registerReceive(program: Command): void {
  program
    .command('receive')
    .description('not built yet')
    .allowUnknownOption()
    .action(() => {
      throw new Error('stage2 receive is not built yet');
    });
}
