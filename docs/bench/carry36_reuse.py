"""How far a head's best tokens move from one decode step to the next
(docs/bench/carry36.md).

    icecache-kvgen --tokens 32768 --layers 2 --steps 16 --out DIR
    /usr/bin/python3 docs/bench/carry36_reuse.py DIR

For every (layer, KV head) and step t of the dump, with budget 256 (4 sinks
and the last 64 tokens forced): the exact-token oracle of step t - d
evaluated with step t's queries, over step t's own oracle ("oracle"); and
the best 256 of step t chosen only among the best W of step t - d ("cand
W": what a carried candidate set of W tokens leaves to choose from).
Ratios are of the group's mean softmax mass; above 1 where the forced
tokens make step t's own set not the best.
"""
import sys

import numpy as np

DIR = sys.argv[1] if len(sys.argv) > 1 else 'dumpA'
K = np.load(DIR + '/keys.npy', mmap_mode='r')
Q = np.load(DIR + '/queries.npy')
L,H,N,D=K.shape; S=Q.shape[0]; G=Q.shape[2]//H
B=256
def oracle(p):
    s=p.sum(0).copy()
    forced=np.r_[0:4, N-64:N]
    s[forced]=np.inf
    return np.argpartition(-s,B)[:B]
res={1:[],2:[],4:[]}
for l in range(L):
  for h in range(H):
    k=np.asarray(K[l,h],dtype=np.float32)
    sets=[];P=[]
    for s in range(S):
      q=Q[s,l,h*G:(h+1)*G].astype(np.float32)
      lg=q@k.T/np.sqrt(D); lg-=lg.max(1,keepdims=True); p=np.exp(lg); p/=p.sum(1,keepdims=True)
      P.append(p); sets.append(oracle(p))
    for s in range(S):
      own=P[s][:,sets[s]].sum(1).mean()
      for d in res:
        if s-d>=0: res[d].append(P[s][:,sets[s-d]].sum(1).mean()/own)
for d in res:
  a=np.array(res[d]); print('oracle', d, 'mean %.3f p10 %.3f'%(a.mean(), np.percentile(a,10)))
def top(p,n):
    s=p.sum(0).copy(); s[np.r_[0:4,N-64:N]]=np.inf
    return np.argpartition(-s,n)[:n]
for W in (1024,2048):
  r={1:[],2:[],4:[]}
  for l in range(L):
    for h in range(H):
      k=np.asarray(K[l,h],dtype=np.float32); P=[]
      for s in range(S):
        q=Q[s,l,h*G:(h+1)*G].astype(np.float32)
        lg=q@k.T/np.sqrt(D); lg-=lg.max(1,keepdims=True); p=np.exp(lg); p/=p.sum(1,keepdims=True); P.append(p)
      for s in range(S):
        own=P[s][:,top(P[s],B)].sum(1).mean()
        for d in r:
          if s-d<0: continue
          cand=top(P[s-d],W); sub=P[s][:,cand]; sc=sub.sum(0)
          pick=cand[np.argpartition(-sc,B)[:B]]
          r[d].append(P[s][:,pick].sum(1).mean()/own)
  for d in r:
    a=np.array(r[d]); print('cand',W,d,'mean %.3f p10 %.3f'%(a.mean(),np.percentile(a,10)))
