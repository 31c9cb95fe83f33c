#include <stdio.h>
#include <sys/stat.h>
#include <signal.h>
#include <time.h>
#include <fcntl.h>
#include <setjmp.h>
#include <sched.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e9+t.tv_nsec;}
int main(){int fd=open("/dev/shm/x_sc",O_CREAT|O_RDWR,0600);struct stat st;int N=200000;
double a=now();for(int i=0;i<N;i++)fstat(fd,&st);double b=now();
sigset_t s;sigemptyset(&s);for(int i=0;i<N;i++)pthread_sigmask(SIG_BLOCK,&s,NULL);double c=now();
sigjmp_buf j;for(int i=0;i<N;i++){if(sigsetjmp(j,1))break;}double d=now();
for(int i=0;i<N;i++){if(sigsetjmp(j,0))break;}double e=now();
for(int i=0;i<N;i++)sched_yield();double f=now();
printf("fstat %.0f ns, sigmask %.0f ns, sigsetjmp(1) %.0f ns, sigsetjmp(0) %.0f ns, yield %.0f ns\n",(b-a)/N,(c-b)/N,(d-c)/N,(e-d)/N,(f-e)/N);}
