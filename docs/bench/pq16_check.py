# Issue 7: does a 4-bit product quantiser of the (centred) keys rank pages well enough
# to be a first pass (fast scan)? Candidates: top c*B/T pages by PQ-estimated group mass
# (each query's softmax over the approximate logits), sink and last page forced in; then the
# exact page / token choice among them. Ratio to the exact page / token oracle.
# Usage: python3 docs/bench/pq16_check.py FAMILY[,FAMILY..] M[,M..] [u8]  (dumps in /tmp/dumps/FAMILY,
# icecache-kvgen as in lowrank11_check.md; M sub-spaces, 16 centroids each)
import numpy as np, sys
fams = sys.argv[1].split(','); ms = [int(x) for x in sys.argv[2].split(',')]
qlut = len(sys.argv) > 3 and sys.argv[3] == 'u8'
cs = [1, 2, 4, 8]; B = 256; T = 16
rng = np.random.default_rng(0)
def kmeans(x, k, it=12):
    c = x[rng.choice(len(x), k, replace=False)]
    for _ in range(it):
        d = ((x[:, None, :] - c[None]) ** 2).sum(-1); a = d.argmin(1)
        for j in range(k):
            s = x[a == j]
            if len(s): c[j] = s.mean(0)
    return c
for fam in fams:
    d = '/tmp/dumps/' + fam
    K = np.load(d + '/keys.npy').astype(np.float32)[0]
    Q = np.load(d + '/queries.npy').astype(np.float32)[:, 0]
    H, N, D = K.shape; S = Q.shape[0]; G = Q.shape[1] // H
    scale = 1 / np.sqrt(D); res = {}
    for h in range(H):
        k = K[h]; kc = k - k.mean(0)
        samp = kc[rng.choice(N, 16384, replace=False)]
        books = {}
        for m in ms:
            dsub = D // m; cb = []; codes = np.empty((N, m), np.uint8)
            for j in range(m):
                c = kmeans(samp[:, j*dsub:(j+1)*dsub], 16)
                cb.append(c)
                sub = kc[:, j*dsub:(j+1)*dsub]
                codes[:, j] = ((sub[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
            books[m] = (cb, codes)
        for s in range(S):
            q = Q[s, h*G:(h+1)*G]
            L = (q @ k.T) * scale; L -= L.max(1, keepdims=True)
            p = np.exp(L); p /= p.sum(1, keepdims=True)
            mm = p.sum(0) / G; pm = mm.reshape(-1, T).sum(1)
            o_page = np.sort(pm)[-B//T:].sum(); o_tok = np.sort(mm)[-B:].sum()
            for m in ms:
                cb, codes = books[m]; dsub = D // m
                La = np.zeros((G, N), np.float32)
                for j in range(m):
                    lut = q[:, j*dsub:(j+1)*dsub] @ cb[j].T     # [G, 16]
                    if qlut:
                        lo = lut.min(1, keepdims=True); hi = lut.max(1, keepdims=True)
                        lut = lo + np.round((lut - lo) / (hi - lo) * 255) * (hi - lo) / 255
                    La += lut[:, codes[:, j]]
                La *= scale; La -= La.max(1, keepdims=True)
                pa = np.exp(La); pa /= pa.sum(1, keepdims=True)
                pma = (pa.sum(0) / G).reshape(-1, T).sum(1)
                order = np.argsort(-pma)
                for c in cs:
                    cand = np.unique(np.concatenate([[0, N//T-1], order[:c * B // T]]))
                    gp = np.sort(pm[cand])[-B//T:].sum()
                    gt = np.sort(mm.reshape(-1, T)[cand].ravel())[-B:].sum()
                    res.setdefault((m, c), []).append((gp / o_page, gt / o_tok))
    out = []
    for (m, c), v in sorted(res.items()):
        a = np.array(v)
        out.append('m%d c%d: page %.3f (p10 %.3f) tok %.3f' % (m, c, a[:, 0].mean(), np.percentile(a[:, 0], 10), a[:, 1].mean()))
    print(fam, '\n  ' + '\n  '.join(out), flush=True)
