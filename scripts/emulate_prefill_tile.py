#!/usr/bin/env python3
"""Emulates the index math of the prefill tiles (kernel/include/flashmoe/gemm_prefill.cuh: 64
and 128 rows), and the task partition of tile_rule.cuh task_rows,
transcribed by hand, with the PTX fragment layouts of ldmatrix.x4 and mma.m16n8k16.row.col:
every warp's A / B fragment addresses, its accumulators, the partial tiles it writes to the
arena (flat offsets as the kernel computes them) and the epilogue's in-order sum over the
K splits. Checks each output of one 64-deep stage against A x B^T, for both tilings
(gated: 32x32 warp tiles x 2 K splits; one B matrix: 32x64 x 4), and that every partial
element is written exactly once and fits the arena. Also the f32 decode tile's thread
mapping (gemm_decode_f32.cuh) for N = 8, 16, 32, and the bf16/f16 decode tile's swapped
operands (gemm_decode.cuh: fragments, skipped n8 blocks, partials, K-half sum). Stdlib only:
`python3 scripts/emulate_prefill_tile.py`. Also (review) the loader's 32-bit B offsets, the cp.async
stage reuse and the epilogue's row bound. Not a substitute for a GPU run: it checks the
index math, not the compiled code."""
import random
random.seed(1)
def zeros(*shape):
    if len(shape) == 1: return [0.0] * shape[0]
    return [zeros(*shape[1:]) for _ in range(shape[0])]
def rand_mat(r, c): return [[float(random.randint(-3, 3)) for _ in range(c)] for _ in range(r)]
M = N = K = 64      # TILE_M, TILE_N, and one 64-deep stage (K splits are within a stage)
CSTRIDE = 64 + 4    # kCStride
# kArenaBytes<bf16>: kStages x (A: 128 rows, Bg, Bu: 64 rows) x kLd halves.
ARENA_BYTES = 3 * (128 + 64 + 64) * (64 + 8) * 2
def ldmatrix_x4(S, addr):  # addr[lane] = (row, col) of the 8-element row lane provides
    out = zeros(32, 4, 2)
    for i in range(4):
        for t in range(32):
            r, c = addr[8 * i + t // 4]
            out[t][i] = S[r][c + 2 * (t % 4): c + 2 * (t % 4) + 2]
    return out
def mma(d, a, b0, b1):  # per lane fragments
    A = zeros(16, 16); B = zeros(16, 8)
    for t in range(32):
        g, c = t // 4, t % 4
        A[g][2*c:2*c+2] = a[t][0]; A[g+8][2*c:2*c+2] = a[t][1]
        A[g][2*c+8:2*c+10] = a[t][2]; A[g+8][2*c+8:2*c+10] = a[t][3]
        B[2*c][g], B[2*c+1][g] = b0[t]; B[2*c+8][g], B[2*c+9][g] = b1[t]
    C = [[sum(A[i][k] * B[k][j] for k in range(16)) for j in range(8)] for i in range(16)]
    for t in range(32):
        g, c = t // 4, t % 4
        for q, v in enumerate([C[g][2*c], C[g][2*c+1], C[g+8][2*c], C[g+8][2*c+1]]):
            d[t][q] += v
def run(WM, WN, KS, gated, M=64):
    """M: the block tile's rows (PrefillShape::kRows): 64, or 128 for a wide task."""
    A = rand_mat(M, K)
    Bs = [rand_mat(N, K) for _ in range(2 if gated else 1)]
    kWM, kWN = M // WM, N // WN
    assert kWM * kWN * KS == 8
    Mi, Np, steps = WM // 16, WN // 16, K // 16 // KS
    arena = {}
    seen = set()
    for warp in range(8):
        wm, wn, wk = warp % kWM, (warp // kWM) % kWN, warp // (kWM * kWN)
        acc = zeros(len(Bs), Mi, 2 * Np, 32, 4)
        for s in range(steps):
            kk = wk * steps + s
            a = [ldmatrix_x4(A, [(wm*WM + mi*16 + (l % 16), kk*16 + (l // 16)*8) for l in range(32)]) for mi in range(Mi)]
            for np_ in range(Np):
                addr = [(wn*WN + np_*16 + (l % 8) + (l // 16)*8, kk*16 + ((l // 8) % 2)*8) for l in range(32)]
                for m, B in enumerate(Bs):
                    b = ldmatrix_x4(B, addr)
                    for mi in range(Mi):
                        mma(acc[m][mi][np_*2], a[mi], [x[0] for x in b], [x[1] for x in b])
                        mma(acc[m][mi][np_*2+1], a[mi], [x[2] for x in b], [x[3] for x in b])
        for m in range(len(Bs)):
            for mi in range(Mi):
                for j in range(2 * Np):
                    for h in range(2):
                        for l in range(32):
                            row = wm*WM + mi*16 + l // 4 + h*8
                            col = wn*WN + j*8 + (l % 4)*2
                            assert (wk, m, row, col) not in seen and (wk, m, row, col+1) not in seen
                            seen.add((wk, m, row, col)); seen.add((wk, m, row, col+1))
                            # The arena as the kernel indexes it: P + ((wk*kMats + m)*kRows + row)*kCStride + col.
                            flat = ((wk * len(Bs) + m) * M + row) * CSTRIDE + col
                            arena[flat] = acc[m][mi][j][l][2*h]
                            arena[flat + 1] = acc[m][mi][j][l][2*h+1]
    assert len(seen) == KS * len(Bs) * M * N, "every (split, matrix, row, column) written once"
    # The epilogue's reads: g = r*kCStride + col (gate / only matrix), u = kRows*kCStride + g
    # (up), split s at s * kSplitStride, kSplitStride = kMats * kRows * kCStride.
    split_stride = len(Bs) * M * CSTRIDE
    assert max(arena) < KS * split_stride and KS * split_stride * 4 <= ARENA_BYTES
    for m, B in enumerate(Bs):
        for r in range(M):
            for c in range(N):
                base = r * CSTRIDE + c + m * M * CSTRIDE
                got = arena[base]
                for s_ in range(1, KS): got += arena[s_ * split_stride + base]
                want = sum(A[r][k] * B[c][k] for k in range(K))
                assert got == want, (WM, WN, KS, m, r, c, got, want)
    print("ok", M, "rows:", WM, WN, KS, "gated" if gated else "plain")
def run_f32_decode(n):
    """The f32 decode tile (gemm_decode_f32.cuh): thread (ty, tx) = (tid / 16, tid % 16) owns
    tokens 2 ty, 2 ty + 1 and columns 4 tx .. 4 tx + 3; As / Bg are k-major (f32_put); a warp
    skips the FMAs when its tokens are all >= n, which must be warp-uniform."""
    A = rand_mat(M, K)
    B = rand_mat(N, K)
    As = [[A[r][k] for r in range(M)] for k in range(K)]  # As[k][token]
    Bs = [[B[c][k] for c in range(N)] for k in range(K)]  # Bg[k][column]
    out, active_by_warp = {}, {}
    for tid in range(256):
        tx, ty = tid % 16, tid // 16
        active = ty * 2 < n
        assert active_by_warp.setdefault(tid // 32, active) == active, "warp-uniform skip"
        if not active:
            continue
        for i in range(2):
            for j in range(4):
                acc = 0.0
                for kk in range(K):  # one chain in k order, as ffma_mainloop
                    acc += As[kk][ty * 2 + i] * Bs[kk][tx * 4 + j]
                key = (ty * 2 + i, tx * 4 + j)
                assert key not in out
                out[key] = acc
    for r in range(n):
        for c in range(N):
            assert out[(r, c)] == sum(A[r][k] * B[c][k] for k in range(K)), (n, r, c)
    print("ok f32 decode", n)

run(32, 32, 2, True)
run(32, 64, 4, False)
run(32, 32, 1, True, M=128)   # PrefillFor<true, 128>: the wide gated tile
run(32, 64, 2, False, M=128)  # PrefillFor<false, 128>
for n in (8, 16, 32):
    run_f32_decode(n)

def run_decode(n, rows, gated):
    """The bf16/f16 decode tile (gemm_decode.cuh), swapped operands: warp (wm, wk) = (warp %
    4, warp / 4) takes weight rows wm*16.. as the mma A operand (ldmatrix.x4 at row wm*16 +
    lane % 16, column kk*16 + (lane / 16)*8, kk = wk*2 + h) and the tokens as B (row jp*16 +
    lane % 8 + (lane / 16)*8, column kk*16 + ((lane / 8) % 2)*8), n8 blocks past n skipped;
    partials at C[((wk*2 + m)*32 + token)*kDecodeCStride + column]; the epilogue sums K half 0
    then half 1 for tokens < rows. Token rows the loader leaves unwritten (>= n: stale arena
    contents) are NaN here: no stored output may see them."""
    NMAX, CS = 32, 64 + 4
    X = rand_mat(NMAX, K)
    for r in range(rows, n):
        X[r] = [0.0] * K                       # loaded, zero-filled past a_rows
    for r in range(n, NMAX):
        X[r] = [float("nan")] * K              # never loaded
    Ws = [rand_mat(N, K) for _ in range(2 if gated else 1)]
    C = {}
    for warp in range(8):
        wm, wk = warp % 4, warp // 4
        acc = zeros(len(Ws), NMAX // 8, 32, 4)
        for h in range(2):
            kk = wk * 2 + h
            a = [ldmatrix_x4(W, [(wm * 16 + (l % 16), kk * 16 + (l // 16) * 8) for l in range(32)]) for W in Ws]
            for jp in range(NMAX // 16):
                if jp * 16 >= n:
                    break
                b = ldmatrix_x4(X, [(jp * 16 + (l % 8) + (l // 16) * 8, kk * 16 + ((l // 8) % 2) * 8) for l in range(32)])
                for m in range(len(Ws)):
                    mma(acc[m][jp * 2], a[m], [x[0] for x in b], [x[1] for x in b])
                    if jp * 16 + 8 < n:
                        mma(acc[m][jp * 2 + 1], a[m], [x[2] for x in b], [x[3] for x in b])
        for m in range(len(Ws)):
            for j in range(NMAX // 8):
                if j * 8 >= n:
                    break
                for l in range(32):
                    for q in range(4):
                        col = wm * 16 + l // 4 + (8 if q >= 2 else 0)
                        tok = j * 8 + (l % 4) * 2 + (q & 1)
                        flat = ((wk * 2 + m) * NMAX + tok) * CS + col
                        assert flat not in C
                        C[flat] = acc[m][j][l][q]
    assert max(C) * 4 < 2 * 2 * NMAX * CS * 4 <= ARENA_BYTES
    half1 = 2 * NMAX * CS
    for r in range(rows):
        for col in range(N):
            for m, W in enumerate(Ws):
                g = (m * NMAX + r) * CS + col
                got = C[g] + C[half1 + g]
                want = sum(X[r][k] * W[col][k] for k in range(K))
                assert got == want, (n, rows, gated, m, r, col, got, want)
    print("ok decode", n, "tokens,", rows, "rows,", "gated" if gated else "plain")

for n, rows in ((8, 1), (8, 8), (16, 9), (32, 17), (32, 32)):
    for gated in (True, False):
        run_decode(n, rows, gated)

def run_loader_and_pipeline():
    """Review addition: what run() does not see. (1) prefill_load_stage / prefill_mainloop's
    loader: thread tid, j < 2 loads chunk tid % 8 of row tid / 8 + 32 j; the B source offset
    is computed in 32 bits (boff + j * b32 + koff, uint32 wrap emulated) and must equal the
    exact row * b_stride + kc * 128 + chunk * 16 for every K step up to kMaxDim = 65536
    (bf16/f16: b_stride = K * 2); every (row, chunk) of a stage is loaded exactly once.
    (2) The cp.async pipeline (kStages = 3, prologue of 2 groups, wait_group<1>, one
    __syncthreads, then the load of step kc + 2 into buffer (kc + 2) % 3): the buffer a step
    reads holds that step, its group is complete, and no load targets a buffer that a warp may
    still read (the one read since the last barrier). (3) The epilogue loop: i < out_rows * 8
    covers rows < out_rows and 16-byte vectors 0..7 once each, never a row >= out_rows."""
    M32 = (1 << 32) - 1
    for K in (64, 128, 4096, 65536):
        bs = K * 2
        nk = K // 64
        for kc in sorted({0, min(1, nk - 1), nk // 2, nk - 1}):
            koff = (kc * 64 * 2) & M32
            seen = set()
            for tid in range(256):
                boff = ((tid // 8) * bs + (tid % 8) * 16) & M32
                b32 = (32 * bs) & M32
                for j in range(2):
                    i = tid + j * 256
                    r, ch = i // 8, i % 8
                    assert (r, ch) not in seen
                    seen.add((r, ch))
                    bo = (boff + j * b32 + koff) & M32
                    assert bo == r * bs + kc * 128 + ch * 16, (K, kc, tid, j)
                    assert bo + 16 <= 64 * bs
            assert len(seen) == 64 * 8
    S = 3
    # staged: step 0 was issued into buffer 0 and committed as its own group before the tile
    # (next_stage.cuh, after the previous tile's last barrier); the prologue skips step 0's
    # load and commit (cp_async_pipeline's staged).
    for nk, staged in [(n, st) for n in range(1, 12) for st in (False, True)]:
        buf = {}          # buffer -> (step, group) last loaded into it
        pending = []      # (buffer, issue iteration, step) of every load
        groups = 0        # commit groups so far (empty ones too)
        if staged:
            buf[0] = (0, groups)
            pending.append((0, -1, 0))
            groups += 1
        for s in range(S - 1):
            if s == 0 and staged:
                continue
            if s < nk:
                buf[s % S] = (s, groups)
                pending.append((s % S, -1, s))
            groups += 1
        reads = []        # (iteration, buffer)
        for kc in range(nk):
            complete = groups - (S - 2)   # wait_group<S-2>: all but the newest S-2 groups
            # __syncthreads here: every warp has finished reading step kc-1's buffer.
            nxt = kc + S - 1
            if nxt < nk:
                buf[nxt % S] = (nxt, groups)
                pending.append((nxt % S, kc, nxt))
            groups += 1
            step, g = buf[kc % S]
            assert step == kc and g < complete, (nk, kc, staged)   # landed, the right step
            reads.append((kc, kc % S))
        # A load issued at iteration i (after that iteration's barrier) into buffer b may
        # land any time until its step is read: no read of b from iteration i on until then.
        for b, i, step in pending:
            assert all(rb != b for it, rb in reads if i <= it < step), (nk, b, i, step, staged)
    for out_rows in range(1, 129):
        cells = [(i // 8, i % 8) for i in range(out_rows * 8)]
        assert len(set(cells)) == out_rows * 8 and all(r < out_rows for r, _ in cells)
    # The A loader of both block tiles: thread tid loads chunk tid % 8 of rows tid / 8 + 32 j,
    # j < kARows = kRows * 8 / 256: every (row, chunk) once; a stage's A, Bg and Bu rows
    # (kStageRows = kRows + 128) stay inside the arena for every buffer.
    for rows in (64, 128):
        seen = {((tid // 8) + 32 * j, tid % 8) for tid in range(256) for j in range(rows * 8 // 256)}
        assert seen == {(r, c) for r in range(rows) for c in range(8)}, rows
        stage = (rows + 128) * (64 + 8)
        assert 3 * stage * 2 <= ARENA_BYTES
    print("ok loader offsets, pipeline reuse (with and without a staged step 0), epilogue bounds")

run_loader_and_pipeline()

def task_rows(count, rb, wide):
    """tile_rule.cuh task_rows: the rows of row block rb's task, 0 for a wide task's tail."""
    rest = count - rb * 64
    if wide:
        if rb % 2 == 1 and rest > 32:
            return 0
        if rb % 2 == 0 and rest > 64 + 32:
            return min(rest, 128)
    return min(rest, 64)

def run_task_partition():
    """Every pair of a list of `count` pairs is in exactly one task: task rb covers pairs
    rb * 64 .. + task_rows (the kernel's unit_of: p0 = base + rb * 64), a task has 1 to 128
    rows, and GEMM1 tasks add blocks_of(rows) to a counter armed at -blocks_of(count)."""
    for wide in (False, True):
        for count in range(1, 1000):
            blocks = (count + 63) // 64
            covered, added = [], 0
            for rb in range(blocks):
                n = task_rows(count, rb, wide)
                if n == 0:
                    continue
                assert 1 <= n <= (128 if wide else 64), (count, rb, n)
                covered += range(rb * 64, rb * 64 + n)
                added += (n + 63) // 64
            assert covered == list(range(count)), (wide, count)
            assert added == blocks, (wide, count)
    print("ok task partition (narrow and wide)")

run_task_partition()
