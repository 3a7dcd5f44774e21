#!/usr/bin/env python3
"""flashmoe's CPU backend side by side with PyTorch on the same MoE layer (not run by CI).

For each shape and dtype it runs `flashmoe-bench layer --backend cpu --json` (which checks
its output against the f64 reference before timing) and a PyTorch implementation of the
same layer (same config: tokens, hidden, intermediate, experts, top-k, MLP, router, dtype),
on the same cores and thread count, in two variants: the per-expert loop that transformers
ships and a sort-by-expert one; the better median of the two counts (rounds alternate the
two sides, each figure is the median over rounds). It prints, per shape
and dtype, both medians, their ratio, each one's GFLOP/s (the flashmoe report's FLOP count
for both) against `torch.matmul` on a 2048^3 GEMM of the same dtype on the same cores, and
flashmoe's peak RSS against the size of the weights in their dtype.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch \\
        --index-url https://download.pytorch.org/whl/cpu
    cargo build --release --bin flashmoe-bench
    /tmp/venv/bin/python bench/vs_pytorch.py --threads 2

Threads: both sides run under `taskset` on the first N CPUs (flashmoe uses every CPU it
may run on; PyTorch gets `torch.set_num_threads(N)`).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

SHAPES = "tiny:256,qwen3-30b-a3b:128,olmoe-1b-7b:256,flashmoe-paper:1024,mixtral-8x7b:64"


def parse_config(text):
    """The fields of flashmoe-bench's `config` line."""
    m = re.search(
        r"tokens/rank (\d+) hidden (\d+) intermediate (\d+) experts (\d+) top-(\d+) (\w+) (\w+) ([\w-]+)",
        text,
    )
    if not m:
        sys.exit(f"cannot parse config: {text}")
    t, h, i, e, k, mlp, dtype, router = m.groups()
    return dict(tokens=int(t), hidden=int(h), inter=int(i), experts=int(e), top_k=int(k),
                mlp=mlp, dtype=dtype, router=router)


def run_flashmoe(binary, preset, tokens, dtype, iters, warmup, cpus, check_tokens=None):
    cmd = ["taskset", "-c", cpus, binary, "layer", "--backend", "cpu", "--preset", preset,
           "--tokens", str(tokens), "--dtype", dtype, "--iters", str(iters),
           "--warmup", str(warmup), "--json"]
    if check_tokens is not None:
        cmd += ["--check-tokens", str(check_tokens)]
    # GNU time reports the run's own peak RSS (a forked child of this process would also
    # count the pages it shares with it until exec).
    timer = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    with tempfile.NamedTemporaryFile("r") as rss:
        if timer:
            cmd = [timer, "-f", "%M", "-o", rss.name] + cmd
        p = subprocess.run(cmd, capture_output=True, text=True)
        rss_kb = int(rss.read().split()[-1]) if timer else None
    if p.returncode != 0:
        sys.exit(f"flashmoe-bench failed ({p.returncode}): {p.stderr[-2000:]}")
    out = p.stdout
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    return json.loads(line), rss_kb


class TorchMoe:
    """The same layer in PyTorch: router in the dtype, softmax (or sigmoid) in f32, top-k,
    experts as two matmuls with the activation between, combine by index_add."""

    def __init__(self, torch, cfg, seed=0):
        self.t = torch
        self.cfg = cfg
        dt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[cfg["dtype"]]
        self.dt = dt
        g = torch.Generator().manual_seed(seed)
        h, i, e = cfg["hidden"], cfg["inter"], cfg["experts"]
        gated = cfg["mlp"] in ("swiglu", "geglu")
        rows0 = 2 * i if gated else i
        self.gated = gated

        def rnd(*shape, scale):
            return ((torch.rand(*shape, generator=g) * 2 - 1) * scale).to(dt)

        self.router = rnd(e, h, scale=h ** -0.5)
        self.w0 = rnd(e, rows0, h, scale=h ** -0.5)
        self.w1 = rnd(e, h, i, scale=i ** -0.5)
        self.x = rnd(cfg["tokens"], h, scale=1.0)

    def act(self, z):
        f = self.t.nn.functional
        kind = self.cfg["mlp"]
        if kind == "swiglu":
            return f.silu(z)
        if kind in ("geglu", "gelu"):
            return f.gelu(z, approximate="tanh")
        return f.relu(z)

    def mlp(self, e, rows):
        z = rows @ self.w0[e].T
        if self.gated:
            g, u = z.chunk(2, dim=-1)
            a = self.act(g) * u
        else:
            a = self.act(z)
        return a @ self.w1[e].T

    def route(self):
        t, cfg = self.t, self.cfg
        logits = (self.x @ self.router.T).float()
        if cfg["router"].startswith("sigmoid"):
            p = t.sigmoid(logits)
        else:
            p = t.softmax(logits, dim=-1)
        w, ids = t.topk(p, cfg["top_k"], dim=-1)
        if cfg["router"].endswith("-norm"):
            w = w / w.sum(dim=-1, keepdim=True)
        return w.to(self.dt), ids

    def forward_loop(self):
        """transformers' loop: one_hot mask, then every expert that got a token."""
        t = self.t
        w, ids = self.route()
        out = t.zeros_like(self.x)
        mask = t.nn.functional.one_hot(ids, num_classes=self.cfg["experts"]).permute(2, 1, 0)
        hit = t.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit.flatten().tolist():
            idx, tok = t.where(mask[e])
            y = self.mlp(e, self.x[tok]) * w[tok, idx, None]
            out.index_add_(0, tok, y.to(self.dt))
        return out

    def forward_sorted(self):
        """Sort the (token, choice) pairs by expert, then contiguous segments."""
        t = self.t
        w, ids = self.route()
        k = self.cfg["top_k"]
        flat = ids.flatten()
        order = t.argsort(flat, stable=True)
        counts = t.bincount(flat, minlength=self.cfg["experts"]).tolist()
        tok = order // k
        xs = self.x[tok]
        ws = w.flatten()[order, None]
        ys = t.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                ys[start:start + n] = self.mlp(e, xs[start:start + n]) * ws[start:start + n]
            start += n
        out = t.zeros_like(self.x)
        out.index_add_(0, tok, ys)
        return out


def median_ms(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def mid(v):
    """The median of `v` (the lower one of an even count)."""
    v = sorted(v)
    return v[(len(v) - 1) // 2]


def matmul_gflops(torch, dtype, n=2048, reps=5):
    dt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    a = torch.randn(n, n).to(dt)
    b = torch.randn(n, n).to(dt)
    for _ in range(2):
        torch.matmul(a, b)
    best = min(timed(lambda: torch.matmul(a, b)) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="target/release/flashmoe-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default=SHAPES, help="preset:tokens,...")
    ap.add_argument("--dtypes", default="bf16,f32")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of both sides")
    args = ap.parse_args()

    cpus = f"0-{args.threads - 1}"
    os.sched_setaffinity(0, set(range(args.threads)))
    import torch

    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} thread(s) on CPUs {cpus}, "
          f"{args.rounds} round(s) of {args.iters} iterations, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    peaks = {d: matmul_gflops(torch, d) for d in args.dtypes.split(",")}
    print("| shape | dtype | flashmoe ms | PyTorch ms (loop / sorted) | flashmoe / PyTorch "
          "| flashmoe GFLOP/s | PyTorch GFLOP/s | torch.matmul GFLOP/s | flashmoe / matmul "
          "| flashmoe peak RSS / weights |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.shapes.split(","):
        preset, tokens = spec.split(":")
        for dtype in args.dtypes.split(","):
            # Rounds alternate the two sides, so that both see the same load; each side's
            # figure is the median of its per-round medians. The first round checks 64
            # tokens against the reference, later ones 8.
            fms, loops, srts = [], [], []
            moe = None
            for r in range(args.rounds):
                fm, rss = run_flashmoe(args.bin, preset, int(tokens), dtype, args.iters,
                                       args.warmup, cpus, None if r == 0 else 8)
                fms.append(fm["latency_ms"]["median"])
                rss_kb = rss if r == 0 else max(rss_kb or 0, rss or 0)
                if moe is None:
                    cfg = parse_config(fm["config"])
                    flops = fm["work"]["flops"]
                    moe = TorchMoe(torch, cfg)
                with torch.inference_mode():
                    loops.append(median_ms(moe.forward_loop, args.iters, args.warmup))
                    srts.append(median_ms(moe.forward_sorted, args.iters, args.warmup))
            loop, srt = mid(loops), mid(srts)
            weights = (moe.router.numel() + moe.w0.numel() + moe.w1.numel()) * moe.router.element_size()
            del moe
            fm_ms = mid(fms)
            best = min(loop, srt)
            gf = flops / fm_ms / 1e6
            rss = f"{rss_kb / 1024 / 1024:.2f} GiB / {weights / 2**30:.2f} GiB" if rss_kb else "n/a"
            print(f"| {preset} ({tokens} tok) | {dtype} | {fm_ms:.1f} | {loop:.1f} / {srt:.1f} "
                  f"| {fm_ms / best:.2f}x | {gf:.0f} | {flops / best / 1e6:.0f} "
                  f"| {peaks[dtype]:.0f} | {gf / peaks[dtype]:.0%} | {rss} |", flush=True)


if __name__ == "__main__":
    main()
