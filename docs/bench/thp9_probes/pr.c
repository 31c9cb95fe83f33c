#define _GNU_SOURCE
#include <stdio.h>
#include <sys/mman.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(){size_t n=512ul<<20;int fd=memfd_create("x",0);ftruncate(fd,n);char*w=mmap(0,n,PROT_READ|PROT_WRITE,MAP_SHARED,fd,0);memset(w,3,n);
char*dst=aligned_alloc(2<<20,n); if(getenv("HP"))madvise(dst,n,MADV_HUGEPAGE);memset(dst,0,n);
for(int r=0;r<3;r++)for(int pop=0;pop<2;pop++){char*m=mmap(0,n,PROT_READ|PROT_WRITE,MAP_SHARED,fd,0);double t=now();if(pop)madvise(m,n,22);double t1=now();memcpy(dst,m,n);double t2=now();
printf("populate=%d: advise %.3f s, copy %.3f s, total %.3f\n",pop,t1-t,t2-t1,t2-t);munmap(m,n);}return 0;}
