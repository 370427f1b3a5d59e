// `stage2 demo`: not built yet (the live-migration issue builds it).
import type { Command } from 'commander';

export function registerDemo(program: Command): void {
  program
    .command('demo')
    .description('not built yet')
    .allowUnknownOption()
    .action(() => {
      throw new Error('stage2 demo is not built yet');
    });
}
