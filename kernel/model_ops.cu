// flashmoe model ops: the RMSNorm in front of each MoE block and the residual add after it,
// run between the layer launches of host/gpu/model.rs on the same stream.
// Entry points (state dtype _ layer dtype):
//   fm_rms_norm_f32_f32 / _f32_bf16 / _f32_f16 / _bf16_bf16 / _f16_f16   (FmNormParams)
//   fm_residual_add_f32_f32 / _f32_bf16 / _f32_f16 / _bf16_bf16 / _f16_f16 (FmResidualParams)
#include "flashmoe/model_ops.cuh"

#define FM_MODEL_OPS(suffix, S, T)                                                          \
    extern "C" __global__ void __launch_bounds__(FM_MODEL_OP_THREADS)                       \
        fm_rms_norm_##suffix(const __grid_constant__ FmNormParams p) {                      \
        fm::model::rms_norm<S, T>(p);                                                       \
    }                                                                                       \
    extern "C" __global__ void __launch_bounds__(FM_MODEL_OP_THREADS)                       \
        fm_residual_add_##suffix(const __grid_constant__ FmResidualParams p) {              \
        fm::model::residual_add<S, T>(p);                                                   \
    }

FM_MODEL_OPS(f32_f32, float, float)
FM_MODEL_OPS(f32_bf16, float, __nv_bfloat16)
FM_MODEL_OPS(f32_f16, float, __half)
FM_MODEL_OPS(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
FM_MODEL_OPS(f16_f16, __half, __half)
