#!/usr/bin/env python3
"""Writes the MoE fixtures of `tests/fixtures/moe/` with transformers as the oracle.

Not run by CI. Needs transformers (5.x), torch and safetensors:

    python scripts/make_moe_fixtures.py [--out tests/fixtures/moe]

For every family/variant below it builds a tiny random model with transformers' own
classes (`torch.manual_seed`), randomises what transformers initialises to constants (norm
weights, correction biases) and rescales the rest so that routing is not a coin toss, then
for each dtype (float32, bfloat16):

1. saves the model with `save_pretrained` (safetensors) into `<out>/<name>-<dtype>/`,
2. loads it back with `from_pretrained(dtype=...)` (so that what is computed is exactly
   what was saved, including transformers' f32-kept router tensors), and
3. writes `expected.safetensors` beside it, computed with that loaded model's modules:
   - `block.{l}.input`, `block.{l}.output`, `block.{l}.topk`: each MoE block alone
     (`layer.mlp`) on its own input rows;
   - `chain.input`, `chain.output`, `chain.{l}.topk`: `x = x + mlp(post_attention_layernorm(x))`
     over the MoE layers in order (dense layers skipped, as flashmoe skips them);
   `topk` holds the router's chosen expert ids per token (ascending), from the block's
   own router (`mlp.gate`).
   For bf16, also `exact.*`: the same blocks and chain on the same inputs, computed by the
   same classes loaded from the same checkpoint in float64 (eager experts).
   Rows have widely varying scale: N(0, 1) rows times 10^U(-2, 2) for the chain,
   10^U(-1, 0.5) for a block alone (its input is a normed row).
4. writes `fixture.json` (family, dtype, MoE layers, versions).

The versions used are recorded in `<out>/versions.json`.
"""

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import torch
import transformers
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DeepseekV4Config,
    DeepseekV4ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    Llama4ForCausalLM,
    Llama4TextConfig,
    MiniMaxM2Config,
    MiniMaxM2ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PhimoeConfig,
    PhimoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
)

H = 64
I = 64
TOKENS = 48
# Row scales (decades). A block's input is a normed row (RMS about the norm weight), so it
# spans 10^-1..10^0.5; the chain's input is the residual stream, 10^-2..10^2. (Block rows of
# scale 100 push sigmoid routers to logits near -100, where transformers' `+ 1e-20` in the
# DeepSeek-V3 renormalisation dominates the selected weights: not a realistic regime.)
BLOCK_SCALE = (-1.0, 0.5)
CHAIN_SCALE = (-2.0, 2.0)

# Attention is never run; keep it as small as the configs allow.
COMMON = dict(
    vocab_size=16,
    hidden_size=H,
    intermediate_size=I,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    hidden_act="silu",
)

# DeepSeek-V4 (both fixtures): attention as small as the config allows; a low swiglu_limit
# so that the clamps bite.
V4 = dict(COMMON, head_dim=32, num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2,
          moe_intermediate_size=I, n_shared_experts=1, routed_scaling_factor=1.5,
          swiglu_limit=1.5, layer_types=["sliding_attention"] * 2, sliding_window=8,
          q_lora_rank=32, o_groups=1, o_lora_rank=32, index_n_heads=2, index_head_dim=32,
          index_topk=4, hc_mult=2)

MLA = dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def fixtures():
    """(name, model class, config, model_type to write or None, save_original_format).

    Sizes are as small as the runtime allows (hidden and expert widths of 64) and the
    layer counts low, to keep the whole folder under 8 MB."""
    return [
        ("mixtral", MixtralForCausalLM,
         MixtralConfig(**COMMON, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
         None, True),
        ("qwen2_moe", Qwen2MoeForCausalLM,
         Qwen2MoeConfig(**COMMON, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=I, shared_expert_intermediate_size=I,
                        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[]),
         None, True),
        ("qwen3_moe", Qwen3MoeForCausalLM,
         Qwen3MoeConfig(**COMMON, head_dim=32, num_hidden_layers=1, num_experts=4,
                        num_experts_per_tok=2, moe_intermediate_size=I, norm_topk_prob=True,
                        decoder_sparse_step=1, mlp_only_layers=[]),
         None, True),
        # transformers 5 fused layout (`experts.gate_up_proj`), saved as such (bf16 only).
        ("qwen3_moe_fused", Qwen3MoeForCausalLM,
         Qwen3MoeConfig(**COMMON, head_dim=32, num_hidden_layers=1, num_experts=4,
                        num_experts_per_tok=2, moe_intermediate_size=I, norm_topk_prob=True,
                        decoder_sparse_step=1, mlp_only_layers=[]),
         None, False),
        ("olmoe", OlmoeForCausalLM,
         OlmoeConfig(**COMMON, num_hidden_layers=1, num_experts=4, num_experts_per_tok=2,
                     norm_topk_prob=False),
         None, True),
        ("deepseek_v2_lite", DeepseekV2ForCausalLM,
         DeepseekV2Config(**COMMON, **MLA, num_hidden_layers=2, n_routed_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=I, n_shared_experts=2,
                          first_k_dense_replace=1, topk_method="greedy", n_group=1,
                          topk_group=1, routed_scaling_factor=1.0),
         None, True),
        ("deepseek_v2_group", DeepseekV2ForCausalLM,
         DeepseekV2Config(**COMMON, **MLA, num_hidden_layers=2, n_routed_experts=8,
                          num_experts_per_tok=2, moe_intermediate_size=I, n_shared_experts=1,
                          first_k_dense_replace=1, topk_method="group_limited_greedy",
                          n_group=4, topk_group=2, routed_scaling_factor=16.0),
         None, True),
        ("deepseek_v3", DeepseekV3ForCausalLM,
         DeepseekV3Config(**COMMON, **MLA, num_hidden_layers=2, n_routed_experts=16,
                          num_experts_per_tok=4, moe_intermediate_size=I, n_shared_experts=1,
                          first_k_dense_replace=1, n_group=4, topk_group=2,
                          routed_scaling_factor=2.5, norm_topk_prob=True),
         None, True),
        ("glm4_moe", Glm4MoeForCausalLM,
         Glm4MoeConfig(**COMMON, head_dim=32, num_hidden_layers=2, n_routed_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=I, n_shared_experts=1,
                       first_k_dense_replace=1, n_group=1, topk_group=1,
                       routed_scaling_factor=2.5, norm_topk_prob=True),
         None, True),
        # transformers has no `kimi_k2` model class: Kimi-K2.5 maps a `kimi_k2` text config
        # to deepseek_v3 (models/kimi_k25/configuration_kimi_k25.py), so compute with
        # DeepseekV3 and write `model_type: kimi_k2` into config.json.
        ("kimi_k2", DeepseekV3ForCausalLM,
         DeepseekV3Config(**COMMON, **MLA, num_hidden_layers=2, n_routed_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=I, n_shared_experts=1,
                          first_k_dense_replace=1, n_group=1, topk_group=1,
                          routed_scaling_factor=2.827, norm_topk_prob=True),
         "kimi_k2", True),
        # Qwen3-Next: Qwen2-MoE's block, renormalised, RMSNorm by (1 + w).
        ("qwen3_next", Qwen3NextForCausalLM,
         Qwen3NextConfig(**COMMON, head_dim=32, num_hidden_layers=1, num_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=I,
                         shared_expert_intermediate_size=I, norm_topk_prob=True,
                         decoder_sparse_step=1, mlp_only_layers=[],
                         layer_types=["full_attention"], linear_num_value_heads=2,
                         linear_num_key_heads=2, linear_key_head_dim=16,
                         linear_value_head_dim=16),
         None, True),
        # Qwen3.5-MoE, text model (Qwen3-Next's block, always renormalised).
        ("qwen3_5_moe", Qwen3_5MoeForCausalLM,
         Qwen3_5MoeTextConfig(**COMMON, head_dim=32, num_hidden_layers=1, num_experts=4,
                              num_experts_per_tok=2, moe_intermediate_size=I,
                              shared_expert_intermediate_size=I,
                              layer_types=["full_attention"], linear_num_value_heads=2,
                              linear_num_key_heads=2, linear_key_head_dim=16,
                              linear_value_head_dim=16),
         None, True),
        # PhiMoE: sparsemixer (eps 0.01) and LayerNorm with a bias.
        ("phimoe", PhimoeForCausalLM,
         PhimoeConfig(**COMMON, num_hidden_layers=1, num_local_experts=4, num_experts_per_tok=2,
                      router_jitter_noise=0.01, input_jitter_noise=0.0),
         None, True),
        # MiniMax-M2: sigmoid + the block's correction bias, always renormalised.
        ("minimax_m2", MiniMaxM2ForCausalLM,
         MiniMaxM2Config(**COMMON, head_dim=32, num_hidden_layers=1, num_local_experts=4,
                         num_experts_per_tok=2),
         None, True),
        # Llama-4 text: top-1 logits, sigmoid scales the expert's input, shared expert,
        # MoE on every second layer (layer 1 of 2).
        ("llama4", Llama4ForCausalLM,
         Llama4TextConfig(**COMMON, head_dim=32, num_hidden_layers=2, num_local_experts=4,
                          num_experts_per_tok=1, intermediate_size_mlp=I,
                          interleave_moe_layer_step=2),
         None, True),
        # gpt-oss: top-k of the biased logits, softmax over the k; biased experts with the
        # clamped SwiGLU, gate/up interleaved. A low swiglu_limit so that the clamps bite.
        ("gpt_oss", GptOssForCausalLM,
         GptOssConfig(**COMMON, head_dim=32, num_hidden_layers=1, num_local_experts=4,
                      num_experts_per_tok=2, swiglu_limit=1.5),
         None, True),
        # DeepSeek-V4: sqrt(softplus) scores + `gate.bias` for the choice, renormalised,
        # times routed_scaling_factor; experts and shared expert with the clamped SiLU GLU
        # (a low swiglu_limit so that the clamps bite). Regular `moe` layers only: hash
        # layers route by token id, which the runtime does not carry. The chain below is
        # `x + mlp(post_attention_layernorm(x))` as for every family, not V4's
        # hyper-connection residual.
        ("deepseek_v4", DeepseekV4ForCausalLM,
         DeepseekV4Config(**V4, mlp_layer_types=["moe", "moe"]), None, True),
        # DeepSeek-V4 with its first layer hash-routed: experts by token id through
        # `tid2eid` (randomised below), weighted by the chosen sqrt(softplus) scores. The
        # rows come with token ids (`*.input_ids`), which hash blocks take.
        ("deepseek_v4_hash", DeepseekV4ForCausalLM,
         DeepseekV4Config(**V4, mlp_layer_types=["hash_moe", "moe"]), None, True),
    ]


# Each fixture's seed, pinned so that every committed fixture regenerates bit for bit
# whatever the list's order (they were 7 x (100 + position) when each was added; MiniMax-M2
# and Llama-4 were added before Qwen3.5-MoE and PhiMoE, hence their shared seeds).
SEEDS = {
    "mixtral": 700, "qwen2_moe": 707, "qwen3_moe": 714, "qwen3_moe_fused": 721, "olmoe": 728,
    "deepseek_v2_lite": 735, "deepseek_v2_group": 742, "deepseek_v3": 749, "glm4_moe": 756,
    "kimi_k2": 763, "qwen3_next": 770, "qwen3_5_moe": 777, "phimoe": 784, "minimax_m2": 777,
    "llama4": 784, "gpt_oss": 805, "deepseek_v4": 812, "deepseek_v4_hash": 819,
}


def moe_block(layer):
    """The decoder layer's MoE block, or None for a dense MLP."""
    block = getattr(layer, "mlp", None)
    if block is None:
        block = getattr(layer, "block_sparse_moe", None)
    if block is None:
        block = getattr(layer, "feed_forward", None)  # Llama-4
    return block if block is not None and hasattr(block, "experts") else None


@torch.no_grad()
def randomise(model, gen):
    """Random weights on a scale where routing and the residual both matter."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5, generator=gen))
        elif (name.endswith(".gate.weight") or name.endswith("shared_expert_gate.weight")
              or name.endswith(".router.weight")):
            # Router logits with a spread of ~1.5 on unit-RMS rows.
            p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / math.sqrt(p.shape[-1])))
        elif p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.empty_like(b).uniform_(-0.1, 0.1, generator=gen))
        elif name.endswith("tid2eid"):
            # k distinct experts per token id.
            experts = model.config.num_local_experts
            for v in range(b.shape[0]):
                b[v] = torch.randperm(experts, generator=gen)[: b.shape[1]]


def rows(gen, dtype, lo, hi):
    """N(0, 1) rows, each times 10^U(lo, hi)."""
    x = torch.randn(TOKENS, H, generator=gen)
    scale = 10.0 ** (torch.rand(TOKENS, 1, generator=gen) * (hi - lo) + lo)
    return (x * scale).to(dtype)


def is_hash(block):
    return getattr(block, "is_hash", False)


def block_out(block, x, ids):
    y = block(x.unsqueeze(0), ids.unsqueeze(0)) if is_hash(block) else block(x.unsqueeze(0))
    if isinstance(y, tuple):
        y = y[0]
    return y.reshape(x.shape)


def block_topk(block, x, ids):
    if is_hash(block):
        ids = block.gate.tid2eid[ids.long()]
    elif hasattr(block, "router"):
        out = block.router(x)
        if len(out) == 3:  # PhiMoE: (logits, weights, experts) from sparsemixer
            ids = out[-1]
        else:  # Llama-4: (scores, logits); the top-k of the logits
            ids = torch.topk(out[1], block.top_k, dim=-1).indices
    elif hasattr(block, "e_score_correction_bias"):  # MiniMax-M2: the bias lives on the block
        ids = block.gate(x, block.e_score_correction_bias)[-1]
    else:
        ids = block.gate(x)[-1]
    return torch.sort(ids.to(torch.int32), dim=-1).values.contiguous()


@torch.no_grad()
def expected(model, dtype, gen):
    layers = model.model.layers
    moe = [i for i, layer in enumerate(layers) if moe_block(layer) is not None]
    out = {}
    hashed = any(is_hash(moe_block(layers[i])) for i in moe)
    vocab = model.config.vocab_size
    for i in moe:
        x = rows(gen, dtype, *BLOCK_SCALE)
        # Token ids only for models with hash layers (the others' streams stay as they were).
        ids = torch.randint(0, vocab, (TOKENS,), generator=gen, dtype=torch.int32) if hashed else None
        block = moe_block(layers[i])
        out[f"block.{i}.input"] = x
        if hashed:
            out[f"block.{i}.input_ids"] = ids
        out[f"block.{i}.output"] = block_out(block, x, ids)
        out[f"block.{i}.topk"] = block_topk(block, x, ids)
    x = rows(gen, dtype, *CHAIN_SCALE)
    ids = torch.randint(0, vocab, (TOKENS,), generator=gen, dtype=torch.int32) if hashed else None
    out["chain.input"] = x.clone()
    if hashed:
        out["chain.input_ids"] = ids
    for i in moe:
        layer = layers[i]
        normed = layer.post_attention_layernorm(x)
        out[f"chain.{i}.topk"] = block_topk(moe_block(layer), normed, ids)
        x = x + block_out(moe_block(layer), normed, ids)
    out["chain.output"] = x
    for k, v in out.items():
        assert torch.isfinite(v.float()).all(), k
    return moe, {k: v.contiguous() for k, v in out.items()}


@torch.no_grad()
def exact(model, tensors, moe):
    """The same blocks and chain in float64, on the same checkpoint and inputs.

    A bf16 checkpoint upcasts to float64 exactly, so this is the families' own code without
    the roundings of a bf16 run (transformers still computes what it casts to float32, e.g.
    RMSNorm and the DeepSeek router, in float32). Stored in float32, prefixed `exact.`.
    """
    layers = model.model.layers
    out = {}
    for i in moe:
        x = tensors[f"block.{i}.input"].double()
        ids = tensors.get(f"block.{i}.input_ids")
        block = moe_block(layers[i])
        out[f"exact.block.{i}.output"] = block_out(block, x, ids).float()
        out[f"exact.block.{i}.topk"] = block_topk(block, x, ids)
    x = tensors["chain.input"].double()
    ids = tensors.get("chain.input_ids")
    for i in moe:
        layer = layers[i]
        normed = layer.post_attention_layernorm(x)
        out[f"exact.chain.{i}.topk"] = block_topk(moe_block(layer), normed, ids)
        x = x + block_out(moe_block(layer), normed, ids)
    out["exact.chain.output"] = x.float()
    for k, v in out.items():
        assert torch.isfinite(v.float()).all(), k
    return {k: v.contiguous() for k, v in out.items()}


def write(name, cls, config, model_type, original_format, out_dir, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomise(model, gen)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        dtypes = [(torch.float32, "f32"), (torch.bfloat16, "bf16")]
        if not original_format:
            dtypes = dtypes[1:]
        for dtype, tag in dtypes:
            target = out_dir / f"{name}-{tag}"
            shutil.rmtree(target, ignore_errors=True)
            m = cls.from_pretrained(tmp, dtype=dtype).eval()
            m.save_pretrained(target, save_original_format=original_format)
            m = cls.from_pretrained(target, dtype=dtype).eval()
            moe, tensors = expected(m, dtype, torch.Generator().manual_seed(seed + 1))
            if dtype != torch.float32:
                m64 = cls.from_pretrained(target, dtype=torch.float64, experts_implementation="eager").eval()
                tensors.update(exact(m64, tensors, moe))
            safetensors.torch.save_file(tensors, target / "expected.safetensors")
            if model_type is not None:
                cfg_path = target / "config.json"
                cfg = json.loads(cfg_path.read_text())
                cfg["model_type"] = model_type
                cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            meta = {
                "name": name,
                "model_class": cls.__name__,
                "dtype": tag,
                "moe_layers": moe,
                "tokens": TOKENS,
                "seed": seed,
                "save_original_format": original_format,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            }
            (target / "fixture.json").write_text(json.dumps(meta, indent=2) + "\n")
            print(f"{target.name}: MoE layers {moe}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/moe")
    ap.add_argument("--only", nargs="*", help="fixture names to (re)write")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for name, cls, config, model_type, original in fixtures():
        if args.only and name not in args.only:
            continue
        write(name, cls, config, model_type, original, out_dir, SEEDS[name])
    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    (out_dir / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")


if __name__ == "__main__":
    main()
