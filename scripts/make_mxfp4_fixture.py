"""An MXFP4 fixture from transformers' own dequantiser (not run by CI).

Random MXFP4 blocks and E8M0 scales shaped like a tiny gpt-oss layer's experts
(`gate_up_proj_blocks` [E, 2I, H/32, 16], `down_proj_blocks` [E, H, I/32, 16] and their
`_scales`), and what transformers' `convert_moe_packed_tensors` makes of them (the
`[E, in, out]` tensors its GptOssExperts use), written to tests/fixtures/mxfp4.safetensors
for tests/mxfp4.rs.

    python scripts/make_mxfp4_fixture.py --out tests/fixtures/mxfp4.safetensors
"""
import argparse

import safetensors.torch
import torch
import transformers
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

E, H, I = 2, 64, 64


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/mxfp4.safetensors")
    out = ap.parse_args().out
    g = torch.Generator().manual_seed(7)
    t = {}
    for name, rows, cols in [("gate_up_proj", 2 * I, H), ("down_proj", H, I)]:
        blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
        # E8M0 scales around 2^0 (127), a few decades each way.
        scales = torch.randint(120, 134, (E, rows, cols // 32), generator=g, dtype=torch.uint8)
        t[f"{name}_blocks"] = blocks
        t[f"{name}_scales"] = scales
        t[f"{name}_dequantized"] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    safetensors.torch.save_file({k: v.contiguous() for k, v in t.items()}, out,
                                metadata={"transformers": transformers.__version__})
    print({k: tuple(v.shape) for k, v in t.items()})


if __name__ == "__main__":
    main()
