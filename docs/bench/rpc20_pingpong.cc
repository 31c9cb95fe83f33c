// Pipe ping-pong between two processes: the cost of waking a thread whose CPU is idle
// (docs/bench/rpc.md, "Why a wake-up costs 90 us here"). The parent busy-waits ARG us after
// each round trip, so the child's CPU is idle when it is woken. Not part of the build:
//   g++ -O2 docs/bench/rpc20_pingpong.cc -o /tmp/pp && for g in 0 10 30 60 100 150 200; do /tmp/pp
//   $g; done taskset -c 0 /tmp/pp 100     # both processes on one CPU
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>
int main(int argc, char** argv) {
  int a[2], b[2];
  pipe(a);
  pipe(b);
  int spin_us = argc > 1 ? atoi(argv[1]) : 0;
  if (fork() == 0) {
    close(a[1]);
    char c;
    for (;;) {
      if (read(a[0], &c, 1) != 1) return 0;
      write(b[1], &c, 1);
    }
  }
  std::vector<double> t;
  char c = 'x';
  for (int i = 0; i < 5000; i++) {
    auto s = std::chrono::steady_clock::now();
    write(a[1], &c, 1);
    read(b[0], &c, 1);
    t.push_back(
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - s).count());
    if (spin_us) {
      auto e = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us);
      while (std::chrono::steady_clock::now() < e)
        ;
    }
  }
  std::sort(t.begin(), t.end());
  printf("spin %d: p50 %.1f us p90 %.1f p99 %.1f\n", spin_us, t[t.size() / 2], t[t.size() * 9 / 10],
         t[t.size() * 99 / 100]);
  close(a[1]);
  wait(nullptr);
}
