// flashmoe, NVSHMEM build: the same kernel as flashmoe.cu, where peers whose entry in the
// peers table is 0 (not reachable by load/store) receive their rows by
// nvshmem_putmem_signal_nbi from this rank's send cells. Built with -rdc and device-linked
// against libnvshmem_device (see kernel/README.md). Entry points:
// flashmoe_layer_nvshmem_bf16 / _f16 / _f32.
#define FM_NVSHMEM 1
#include "flashmoe/layer.cuh"

#define FM_ENTRY(name, code)                                                                  \
    extern "C" __global__ void __launch_bounds__(FM_BLOCK_THREADS, 2)                         \
        name(const __grid_constant__ FmKernelParams p) {                                      \
        fm::layer<fm::Dt<code>>(p);                                                           \
    }

#if !defined(FM_ONLY_DTYPE) || FM_ONLY_DTYPE == 0
FM_ENTRY(flashmoe_layer_nvshmem_bf16, FM_DTYPE_BF16)
#endif
#if !defined(FM_ONLY_DTYPE) || FM_ONLY_DTYPE == 1
FM_ENTRY(flashmoe_layer_nvshmem_f16, FM_DTYPE_F16)
#endif
#if !defined(FM_ONLY_DTYPE) || FM_ONLY_DTYPE == 2
FM_ENTRY(flashmoe_layer_nvshmem_f32, FM_DTYPE_F32)
#endif
