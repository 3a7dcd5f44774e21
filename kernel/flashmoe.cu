// flashmoe: one MoE layer (gate, dispatch, expert FFN, combine) as one persistent
// cooperative kernel, peers reached by direct stores (Single, Emulated, NVLink P2P).
// Entry points: flashmoe_layer_bf16 / _f16 / _f32 (see kernel/README.md).
#include "flashmoe/layer.cuh"

#define FM_ENTRY(name, code)                                                                  \
    extern "C" __global__ void __launch_bounds__(FM_BLOCK_THREADS, 2)                         \
        name(const __grid_constant__ FmKernelParams p) {                                      \
        fm::layer<fm::Dt<code>>(p);                                                           \
    }

#if !defined(FM_ONLY_DTYPE) || FM_ONLY_DTYPE == 0
FM_ENTRY(flashmoe_layer_bf16, FM_DTYPE_BF16)
#endif
#if !defined(FM_ONLY_DTYPE) || FM_ONLY_DTYPE == 1
FM_ENTRY(flashmoe_layer_f16, FM_DTYPE_F16)
#endif
#if !defined(FM_ONLY_DTYPE) || FM_ONLY_DTYPE == 2
FM_ENTRY(flashmoe_layer_f32, FM_DTYPE_F32)
#endif
