// The kernel's loopback TCP ceiling: one connection, a writer process and a reader process,
// 1 MiB write()s and read()s of the same buffer, no other work. Prints one JSON line:
//   {"bytes":N,"seconds":S,"GBps":G}
// Built and run by src/bench/kernel-ceiling.ts (cc -O2); usage: loopback-pump [bytes]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1 << 20)

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  long long total = argc > 1 ? atoll(argv[1]) : (4LL << 30);
  int ls = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t al = sizeof a;
  if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1) || getsockname(ls, (struct sockaddr *)&a, &al)) { perror("listen"); return 1; }
  char *buf = malloc(CHUNK);
  memset(buf, 0x5a, CHUNK);
  pid_t pid = fork();
  if (pid == 0) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&a, sizeof a)) { perror("connect"); _exit(1); }
    for (long long sent = 0; sent < total;) {
      ssize_t n = write(s, buf, (size_t)(total - sent < CHUNK ? total - sent : CHUNK));
      if (n <= 0) { perror("write"); _exit(1); }
      sent += n;
    }
    close(s);
    _exit(0);
  }
  int c = accept(ls, NULL, NULL);
  if (c < 0) { perror("accept"); return 1; }
  double t0 = now();
  long long got = 0;
  for (;;) {
    ssize_t n = read(c, buf, CHUNK);
    if (n < 0) { perror("read"); return 1; }
    if (n == 0) break;
    got += n;
  }
  double dt = now() - t0;
  waitpid(pid, NULL, 0);
  printf("{\"bytes\":%lld,\"seconds\":%.6f,\"GBps\":%.3f}\n", got, dt, got / dt / 1e9);
  return got == total ? 0 : 1;
}
