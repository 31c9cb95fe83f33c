# Issue 7: does a rank-r projection of the keys (PCA) rank pages well enough to be
# mdci's first pass? Usage (dumps from icecache-kvgen, see lowrank11_check.md):
#   python3 docs/bench/lowrank11_check.py FAMILY[,FAMILY..] RANK[,RANK..]
# reads /tmp/dumps/FAMILY (keys.npy, queries.npy).
import numpy as np, sys, os
fams = sys.argv[1].split(',')
ranks = [int(x) for x in sys.argv[2].split(",")]
cs = [2, 4, 8, 16]; B = 256; T = 16

for fam in fams:
    d = '/tmp/dumps/' + fam
    K = np.load(d + '/keys.npy').astype(np.float32)[0]      # [H, N, D]
    Q = np.load(d + '/queries.npy').astype(np.float32)[:, 0]  # [S, QH, D]
    H, N, D = K.shape; S = Q.shape[0]; G = Q.shape[1] // H
    scale = 1 / np.sqrt(D)
    res = {}
    for h in range(H):
        k = K[h]
        _, sv, vt = np.linalg.svd(k[::4], full_matrices=False)
        for s in range(S):
            q = Q[s, h*G:(h+1)*G]
            L = (q @ k.T) * scale
            L -= L.max(1, keepdims=True)
            p = np.exp(L); p /= p.sum(1, keepdims=True)
            m = p.sum(0) / G
            pm = m.reshape(-1, T).sum(1)
            o_page = np.sort(pm)[-B//T:].sum()
            o_tok = np.sort(m)[-B:].sum()
            for r in ranks:
                P = vt[:r].T
                La = ((q @ P) @ (k @ P).T) * scale
                La -= La.max(1, keepdims=True)
                pa = np.exp(La); pa /= pa.sum(1, keepdims=True)
                pma = (pa.sum(0) / G).reshape(-1, T).sum(1)
                order = np.argsort(-pma)
                for c in cs:
                    cand = order[:c * B // T]
                    got_page = np.sort(pm[cand])[-B//T:].sum()
                    toks = m.reshape(-1, T)[cand].ravel()
                    got_tok = np.sort(toks)[-B:].sum()
                    res.setdefault((r, c), []).append((got_page / o_page, got_tok / o_tok))
    print(fam, ' '.join('r%d c%d: page %.3f tok %.3f' % (r, c, np.mean([x[0] for x in v]), np.mean([x[1] for x in v])) for (r, c), v in sorted(res.items())), flush=True)
