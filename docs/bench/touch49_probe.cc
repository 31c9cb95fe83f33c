// The probe behind docs/bench/touch49.md: a 512 MiB /dev/shm file written
// through one mapping, then copied into through a second, fresh mapping of
// the same file, four ways: nothing first (mode 0), a read of one byte per
// page the file holds (mincore, mode 1: what RegisterShm does now), an
// atomic add of zero per page (mode 2), MAP_POPULATE (mode 3).
// g++ -O2 -o /tmp/touch49_probe docs/bench/touch49_probe.cc && /tmp/touch49_probe
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
static double ms(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}
int main(int argc, char** argv) {
  size_t n = 512ul << 20;
  int fd = open("/dev/shm/s49v", O_RDWR | O_CREAT | O_TRUNC, 0600);
  unlink("/dev/shm/s49v");
  ftruncate(fd, n);
  char* a = (char*)mmap(0, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  memset(a, 1, n);
  char* src = (char*)malloc(n);
  memset(src, 3, n);
  for (int mode = 0; mode < 4; mode++) {
    char* b = (char*)mmap(0, n, PROT_READ | PROT_WRITE, MAP_SHARED | (mode == 3 ? MAP_POPULATE : 0),
                          fd, 0);
    auto t = std::chrono::steady_clock::now();
    std::vector<unsigned char> v(n / 4096);
    if (mode == 1) {
      mincore(b, n, v.data());
      volatile char acc = 0;
      for (size_t i = 0; i < n; i += 4096)
        if (v[i / 4096] & 1) acc += b[i];
    }
    if (mode == 2) {
      for (size_t i = 0; i < n; i += 4096) __atomic_fetch_add(b + i, 0, __ATOMIC_RELAXED);
    }
    printf("mode %d touch %.1f", mode, ms(t));
    t = std::chrono::steady_clock::now();
    memcpy(b, src, n);
    printf(" write-copy %.1f", ms(t));
    t = std::chrono::steady_clock::now();
    memcpy(b, src, n);
    printf(" again %.1f\n", ms(t));
    munmap(b, n);
  }
}
