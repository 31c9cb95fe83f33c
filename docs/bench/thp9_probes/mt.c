#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
char* keep[200];
int main(){double t=now();for(int i=0;i<200;i++){char*p=malloc(5<<20);memset(p,i,5<<20);keep[i]=p;}printf("200x5MiB malloc+memset kept: %.3f s (%d)\n",now()-t,keep[7][9]);
t=now();for(int i=0;i<200;i++){free(keep[i]);} for(int i=0;i<200;i++){char*p=malloc(5<<20);memset(p,i,5<<20);keep[i]=p;}printf("again after free: %.3f s (%d)\n",now()-t,keep[7][9]);return 0;}
