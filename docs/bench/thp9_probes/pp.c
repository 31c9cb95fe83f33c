#include <stdio.h>
#include <unistd.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(){int a[2],b[2];pipe(a);pipe(b);char c=0;int n=20000;
if(fork()==0){for(int i=0;i<n;i++){read(a[0],&c,1);write(b[1],&c,1);}return 0;}
double t=now();for(int i=0;i<n;i++){write(a[1],&c,1);read(b[0],&c,1);}printf("pipe round trip %.1f us\n",(now()-t)/n*1e6);return 0;}
