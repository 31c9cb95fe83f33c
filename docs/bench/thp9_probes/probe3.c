#include <stdio.h>
#include <sys/mman.h>
#include <time.h>
#include <stdlib.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int c,char**v){size_t g=atoi(v[1]);size_t G=1ul<<30;char*p=mmap(0,g*G,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
if(getenv("HP"))madvise(p,g*G,MADV_HUGEPAGE);
for(int pass=0;pass<4;pass++){double t=now();for(size_t o=0;o<g*G;o+=4096)p[o]+=1;printf("pass %d: %.3f s\n",pass,now()-t);fflush(stdout);}
return 0;}
