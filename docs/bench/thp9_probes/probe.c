#include <stdio.h>
#include <sys/mman.h>
#include <time.h>
#include <stdlib.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int c,char**v){size_t g=atoi(v[1]);size_t G=1ul<<30;char*p=mmap(0,g*G,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
for(size_t i=0;i<g;i++){double t=now();for(size_t o=0;o<G;o+=4096)p[i*G+o]=1;printf("GiB %zu: %.2f s\n",i,now()-t);fflush(stdout);}return 0;}
