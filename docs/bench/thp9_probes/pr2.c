#define _GNU_SOURCE
#include <stdio.h>
#include <sys/mman.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(){size_t n=512ul<<20;int fd=memfd_create("x",0);ftruncate(fd,n);char*w=mmap(0,n,PROT_READ|PROT_WRITE,MAP_SHARED,fd,0);memset(w,3,n);
char*dst=malloc(n);memset(dst,0,n);
for(int r=0;r<3;r++){double t=now();memcpy(dst,w,n);printf("from writer mapping: %.3f s\n",now()-t);}
char*m=mmap(0,n,PROT_READ|PROT_WRITE,MAP_SHARED,fd,0);
for(int r=0;r<3;r++){double t=now();memcpy(dst,m,n);printf("from second mapping pass %d: %.3f s\n",r,now()-t);}
for(int r=0;r<2;r++){double t=now();memcpy(m,dst,n);printf("to second mapping pass %d: %.3f s\n",r,now()-t);}
return 0;}
