// Ticket prefetch: a routed decode or prefill tile takes its block's next queue ticket while
// its first stages load (task_queue.cuh's take_task then only waits for that ticket's entry).
// The state lives in Misc (common.cuh): Misc::ticket, Misc::queue_ctl.
#ifndef FLASHMOE_TICKET_CUH
#define FLASHMOE_TICKET_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/sync.cuh"

namespace fm {

constexpr uint32_t kNoTicket = 0xFFFFFFFFu;  // Misc::ticket: no ticket taken ahead
constexpr uint32_t kNoPeek = 0xFFFFFFFFu;    // Misc::peek: no published entry seen (kind 3: never staged)

// Whether this build starts next tasks early (next_stage.cuh): the P2P build. In the
// NVSHMEM build every phase is inlined into one entry point at the register budget, and the
// early step 0 takes its spills from none to 52 / 104 bytes (stores / loads, bf16; tried
// 2026-12-02), and scripts/ptxas_spills.py allows none; there every tile fills its own
// pipeline.
#ifdef FM_NVSHMEM
constexpr bool kEarlyStageBuild = false;
#else
constexpr bool kEarlyStageBuild = true;
#endif

// Whether the run's mode starts next tasks early (next_stage.cuh): auto and narrow.
__device__ __forceinline__ bool early_stage_mode(const FmLayerParams& L) {
    return kEarlyStageBuild && (L.tile_mode == FM_TILES_AUTO || L.tile_mode == FM_TILES_NARROW);
}

// Thread 0, once per launch before any task: no ticket taken ahead, no early step 0, and
// the queue for prefetch_ticket. Thread 0 alone reads and writes Misc::ticket and
// Misc::staged_ticket; Misc::peek and Misc::staged are written by thread 0 and read by every
// thread after a block barrier (next_stage.cuh).
__device__ __forceinline__ void init_ticket_prefetch(const Ctx& c) {
    if (threadIdx.x != 0) return;
    c.misc->ticket = kNoTicket;
    c.misc->staged_ticket = kNoTicket;  // no early step 0 in flight (next_stage.cuh)
    c.misc->staged = 0;
    c.misc->peek = kNoPeek;
    const uint64_t cap = c.L->ws_queue_capacity;  // tickets are u32
    c.misc->peek_cap = early_stage_mode(*c.L) ? uint32_t(cap < 0xFFFFFFFFull ? cap : 0xFFFFFFFFull) : 0u;
    c.misc->epoch = uint32_t(c.n);
    c.misc->queue = c.queue();
    c.misc->queue_ctl = c.queue_ctl();
}

// Thread 0 of a tile whose first stages are in flight: takes the block's next queue ticket
// now, so the atomic's round trip overlaps the loads every warp waits for at the first K
// step instead of following the tile. Only when entries are reserved beyond the head
// (tail > head, one relaxed load): then no block is waiting for a ticket, and the one taken
// is one a producer is publishing; a ticket taken while others idle would hold a task back
// for the rest of this tile. Waits for nothing (take_task waits for the entry later).
// The queue and the ticket live in Misc (Misc::queue_ctl, Misc::ticket), read here rather
// than passed in: nothing of it stays live across the tile's prologue. Only the decode and
// prefill tiles call it (the classic tile stays the path before the tile rule).
__device__ __forceinline__ void prefetch_ticket() {
    if (threadIdx.x != 0) return;
    Misc* m = block_misc();
    uint32_t* ctl = m->queue_ctl;
    uint64_t th;
    asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(th) : "l"(ctl) : "memory");
    const uint32_t tail = uint32_t(th), head = uint32_t(th >> 32);
    if (int32_t(tail - head) > 0) m->ticket = atomicAdd(ctl + 1, 1u);
}

// Thread 0 of a decode, prefill or wide tile whose K loop is done: the task of the ticket
// taken ahead if its entry is already published (one acquire load, no wait), into Misc::peek for
// stage_next (next_stage.cuh). Everything it reads is in Misc (init_ticket_prefetch), so
// the tile keeps nothing of the task loop live for it; peek_cap is 0 in modes that do not
// stage, and entries carry the launch's epoch in their high word (scheduler.cuh).
__device__ __forceinline__ void peek_next() {
    if (!kEarlyStageBuild || threadIdx.x != 0) return;
    Misc* const m = block_misc();
    uint32_t task = kNoPeek;
    const uint32_t ticket = m->ticket;
    if (ticket != kNoTicket && ticket < m->peek_cap) {
        const uint64_t e = ld_acquire_gpu(m->queue + ticket);
        if (uint32_t(e >> 32) == m->epoch) task = uint32_t(e);
    }
    m->peek = task;
}

}  // namespace fm

#endif  // FLASHMOE_TICKET_CUH
