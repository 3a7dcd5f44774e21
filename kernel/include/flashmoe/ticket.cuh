// Ticket prefetch: a routed decode or prefill tile takes its block's next queue ticket while
// its first stages load (task_queue.cuh's take_task then only waits for that ticket's entry).
// The state lives in Misc (common.cuh): Misc::ticket, Misc::queue_ctl.
#ifndef FLASHMOE_TICKET_CUH
#define FLASHMOE_TICKET_CUH

#include "flashmoe/common.cuh"

namespace fm {

constexpr uint32_t kNoTicket = 0xFFFFFFFFu;  // Misc::ticket: no ticket taken ahead

// Thread 0, once per launch before any task: no ticket taken ahead, and the queue for
// prefetch_ticket. Thread 0 alone reads and writes both.
__device__ __forceinline__ void init_ticket_prefetch(const Ctx& c) {
    if (threadIdx.x != 0) return;
    c.misc->ticket = kNoTicket;
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

}  // namespace fm

#endif  // FLASHMOE_TICKET_CUH
