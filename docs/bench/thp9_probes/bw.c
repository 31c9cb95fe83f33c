#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int c,char**v){size_t n=atol(v[1])<<20;char*a=malloc(n),*b=malloc(n);memset(a,1,n);memset(b,2,n);for(int r=0;r<4;r++){double t=now();memcpy(b,a,n);printf("%zu MiB memcpy: %.2f GB/s\n",n>>20,n/(now()-t)/1e9);}return b[5];}
