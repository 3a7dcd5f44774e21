// ABI probe: checks on the device that FmKernelParams, passed BY VALUE as the kernel's one
// parameter, arrives exactly as the Rust host (host/params.rs) lays it out.
//
// Launch: 1 block of any size >= 1 (256 is natural), no shared memory.
// Output `out` (u64, FM_ABI_PROBE_HEADER + sizeof(FmKernelParams) / 8 words):
//   [0]  FM_ABI_PROBE_HEADER (number of header words)
//   [1]  sizeof(FmKernelParams)      [2]  sizeof(FmLayerParams)     [3]  sizeof(FmRankParams)
//   [4]  offsetof(FmKernelParams, launch_ranks)   [5]  offsetof(FmKernelParams, rank)
//   [6]  offsetof(FmLayerParams, routed_scale)    [7]  offsetof(FmLayerParams, timeout_ns)
//   [8]  offsetof(FmLayerParams, heap_stride_row) [9]  offsetof(FmLayerParams, ws_epoch)
//   [10] offsetof(FmLayerParams, logit_bias)      [11] offsetof(FmRankParams, heap)
//   [12] offsetof(FmRankParams, given_weights)
//   field echoes, read by name on the device:
//   [13] p.layer.version   [14] p.layer.hidden   [15] p.layer.experts
//   [16] bits of p.layer.routed_scale             [17] p.layer.fault_silent_rank
//   [18] p.layer.timeout_ns  [19] p.layer.ws_bytes  [20] p.layer.logit_bias
//   [21] p.launch_ranks
//   [22 + 2r], [23 + 2r] for r < FM_MAX_LAUNCH_RANKS: p.rank[r].rank, p.rank[r].given_weights
//   [FM_ABI_PROBE_HEADER + i]: the i-th 8-byte word of p as the device sees it.
// tests/gpu_abi.rs mirrors this layout.
#include <stddef.h>

#include "flashmoe/params.h"

#define FM_ABI_PROBE_HEADER (22 + 2 * FM_MAX_LAUNCH_RANKS)

static_assert(sizeof(FmKernelParams) % 8 == 0, "the raw echo copies whole 8-byte words");

extern "C" __global__ void flashmoe_abi_probe(FmKernelParams p, unsigned long long* out) {
    typedef unsigned long long u64;
    if (threadIdx.x == 0) {
        out[0] = FM_ABI_PROBE_HEADER;
        out[1] = sizeof(FmKernelParams);
        out[2] = sizeof(FmLayerParams);
        out[3] = sizeof(FmRankParams);
        out[4] = offsetof(FmKernelParams, launch_ranks);
        out[5] = offsetof(FmKernelParams, rank);
        out[6] = offsetof(FmLayerParams, routed_scale);
        out[7] = offsetof(FmLayerParams, timeout_ns);
        out[8] = offsetof(FmLayerParams, heap_stride_row);
        out[9] = offsetof(FmLayerParams, ws_epoch);
        out[10] = offsetof(FmLayerParams, logit_bias);
        out[11] = offsetof(FmRankParams, heap);
        out[12] = offsetof(FmRankParams, given_weights);
        out[13] = p.layer.version;
        out[14] = p.layer.hidden;
        out[15] = p.layer.experts;
        out[16] = __float_as_uint(p.layer.routed_scale);
        out[17] = p.layer.fault_silent_rank;
        out[18] = p.layer.timeout_ns;
        out[19] = p.layer.ws_bytes;
        out[20] = p.layer.logit_bias;
        out[21] = p.launch_ranks;
        for (int r = 0; r < FM_MAX_LAUNCH_RANKS; ++r) {
            out[22 + 2 * r] = p.rank[r].rank;
            out[23 + 2 * r] = p.rank[r].given_weights;
        }
    }
    // Raw echo of the whole parameter, word by word, by all threads of the block.
    const u64* words = reinterpret_cast<const u64*>(&p);
    for (unsigned i = threadIdx.x; i < sizeof(FmKernelParams) / 8; i += blockDim.x) {
        out[FM_ABI_PROBE_HEADER + i] = words[i];
    }
}
