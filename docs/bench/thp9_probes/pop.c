#include <stdio.h>
#include <sys/mman.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int c,char**v){size_t G=1ul<<30;size_t n=atoi(v[1])*G/4;
for(int r=0;r<3;r++){
char*p=mmap(0,n,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);double t=now();
int mode=atoi(v[2]); if(mode==1) madvise(p,n,23/*MADV_POPULATE_WRITE*/); if(mode==2){madvise(p,n,MADV_HUGEPAGE);}
if(mode==3){madvise(p,n,MADV_HUGEPAGE);madvise(p,n,23);}
double t1=now(); memset(p,1,n); double t2=now();
printf("mode %d: advise %.3f s, memset %.3f s\n",mode,t1-t,t2-t1);munmap(p,n);}
return 0;}
