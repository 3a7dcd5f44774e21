"""Router-only fixtures from transformers' own router modules (not run by CI).

For routers whose families the runtime cannot load yet (their expert MLPs are not
implemented), this checks the routing maths alone: random router weights, biases and
tokens go through transformers' router module, and its chosen experts and weights are
written to tests/fixtures/routers/<name>.safetensors, compared by tests/router_fixtures.rs.

    python scripts/make_router_fixtures.py --out tests/fixtures/routers
"""
import argparse
from pathlib import Path

import safetensors.torch
import torch
import transformers
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4TopKRouter
from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

H, E, K, T = 64, 8, 4, 64


def tokens(gen):
    x = torch.randn(T, H, generator=gen)
    return x * 10.0 ** (torch.rand(T, 1, generator=gen) * 1.5 - 1.0)


@torch.no_grad()
def gpt_oss(gen):
    r = GptOssTopKRouter(GptOssConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=K))
    r.weight.copy_(torch.randn(E, H, generator=gen) * (2.0 / H**0.5))
    r.bias.copy_(torch.randn(E, generator=gen) * 0.5)
    x = tokens(gen)
    _, w, ids = r(x)
    return {"x": x, "weight": r.weight.data, "bias": r.bias.data, "ids": ids.to(torch.int32),
            "weights": w}


@torch.no_grad()
def deepseek_v4(gen):
    cfg = DeepseekV4Config(hidden_size=H, num_local_experts=E, num_experts_per_tok=K,
                           routed_scaling_factor=1.5, scoring_func="sqrtsoftplus")
    r = DeepseekV4TopKRouter(cfg)
    r.weight.copy_(torch.randn(E, H, generator=gen) * (2.0 / H**0.5))
    r.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.3)
    x = tokens(gen)
    _, w, ids = r(x)
    return {"x": x, "weight": r.weight.data, "bias": r.e_score_correction_bias.data,
            "ids": ids.to(torch.int32), "weights": w,
            "scale": torch.tensor([cfg.routed_scaling_factor])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/routers")
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    for seed, (name, make) in enumerate([("gpt_oss", gpt_oss), ("deepseek_v4", deepseek_v4)]):
        t = make(torch.Generator().manual_seed(1000 + seed))
        t = {k: v.contiguous().float() if v.dtype != torch.int32 else v.contiguous()
             for k, v in t.items()}
        safetensors.torch.save_file(t, out / f"{name}.safetensors",
                                    metadata={"transformers": transformers.__version__,
                                              "torch": torch.__version__})
        print(name, {k: tuple(v.shape) for k, v in t.items()})


if __name__ == "__main__":
    main()
