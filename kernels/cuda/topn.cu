// Top-n items per query by dot product (recommendations), one block per query.
//
// The block walks the items in tiles of TOPN_TILE (one item per thread). The
// tile's item rows are staged through shared memory in slices of TOPN_FEATURES
// features (coalesced loads), and every thread accumulates its item's score
// q . y_j in feature order. Excluded items (the query's row of a CSR matrix, with
// sorted columns) are flagged per tile by walking the row alongside the tiles.
// The block keeps its best n (n <= TOPN_MAX) sorted in shared memory; a tile is
// only sorted (bitonic, in shared memory) and merged when one of its items beats
// the current n-th best, which after the first tiles is rare.
//
// Order: higher score first, equal scores to the lower item index; a NaN score
// ranks as -inf (its score is reported as computed). Empty slots hold NO_ITEM at
// -inf, which every real item beats.
//
// Host-provided defines: TOPN_TILE (a power of two, also the block size),
// TOPN_MAX (<= TOPN_TILE), TOPN_FEATURES.

typedef unsigned int u32;
typedef unsigned long long u64;

#define NO_ITEM 0xffffffffu

#if (TOPN_TILE & (TOPN_TILE - 1)) != 0 || TOPN_MAX > TOPN_TILE
#error "TOPN_TILE must be a power of two and at least TOPN_MAX"
#endif

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float rank(float s) { return isnan(s) ? neg_inf() : s; }

// Does (sa, ia) come before (sb, ib)? Every real item has a distinct index, so
// this is a strict total order on real items; empty slots all compare equal.
__device__ __forceinline__ bool before(float sa, u32 ia, float sb, u32 ib) {
    const float ra = rank(sa), rb = rank(sb);
    return ra > rb || (ra == rb && ia < ib);
}

// How many of the first n entries of the sorted list (s, i) come before (sx, ix).
__device__ __forceinline__ u32 count_before(const float* s, const u32* i, u32 n, float sx,
                                            u32 ix) {
    u32 lo = 0, hi = n;
    while (lo < hi) {
        const u32 mid = (lo + hi) / 2;
        if (before(s[mid], i[mid], sx, ix)) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

extern "C" __global__ void __launch_bounds__(TOPN_TILE)
    top_n(const float* __restrict__ queries, const float* __restrict__ items, u64 m, u32 d,
          u32 n, u32 has_exclude, const u64* __restrict__ ex_indptr,
          const u32* __restrict__ ex_indices, u32* __restrict__ out_items,
          float* __restrict__ out_scores) {
    __shared__ float ys[TOPN_TILE][TOPN_FEATURES + 1];
    __shared__ float qs[TOPN_FEATURES];
    __shared__ float tile_s[TOPN_TILE];
    __shared__ u32 tile_i[TOPN_TILE];
    __shared__ float best_s[TOPN_MAX];
    __shared__ u32 best_i[TOPN_MAX];
    __shared__ float next_s[TOPN_MAX];
    __shared__ u32 next_i[TOPN_MAX];
    __shared__ unsigned char excluded[TOPN_TILE];
    __shared__ u64 ex_next;

    const u32 tid = threadIdx.x;
    const u64 q = blockIdx.x;
    const float* query = queries + q * d;

    if (tid < n) {
        best_s[tid] = neg_inf();
        best_i[tid] = NO_ITEM;
    }
    u64 ex_pos = 0, ex_end = 0;
    if (has_exclude) {
        ex_pos = ex_indptr[q];
        ex_end = ex_indptr[q + 1];
    }

    for (u64 t0 = 0; t0 < m; t0 += TOPN_TILE) {
        // Exclusions inside [t0, t0 + TOPN_TILE): the row's next columns.
        excluded[tid] = 0;
        if (has_exclude && tid == 0) {
            u64 lo = ex_pos, hi = ex_end;  // first column >= t0 + TOPN_TILE
            while (lo < hi) {
                const u64 mid = (lo + hi) / 2;
                if ((u64)ex_indices[mid] < t0 + TOPN_TILE) lo = mid + 1;
                else hi = mid;
            }
            ex_next = lo;
        }
        __syncthreads();
        if (has_exclude) {
            const u64 next = ex_next;
            for (u64 e = ex_pos + tid; e < next; e += TOPN_TILE)
                excluded[(u64)ex_indices[e] - t0] = 1;
            ex_pos = next;
        }

        // Score of item t0 + tid, feature slice by feature slice.
        const u32 count = (u32)min((u64)TOPN_TILE, m - t0);
        float score = 0.0f;
        for (u32 f0 = 0; f0 < d; f0 += TOPN_FEATURES) {
            const u32 width = min((u32)TOPN_FEATURES, d - f0);
            __syncthreads();
            for (u32 e = tid; e < TOPN_TILE * TOPN_FEATURES; e += TOPN_TILE) {
                const u32 row = e / TOPN_FEATURES, fl = e % TOPN_FEATURES;
                ys[row][fl] = (row < count && fl < width)
                                  ? items[(t0 + row) * d + f0 + fl]
                                  : 0.0f;
            }
            if (tid < TOPN_FEATURES) qs[tid] = tid < width ? query[f0 + tid] : 0.0f;
            __syncthreads();
            for (u32 fl = 0; fl < width; ++fl) score = fmaf(qs[fl], ys[tid][fl], score);
        }

        const bool valid = tid < count && !excluded[tid];
        const u32 item = valid ? (u32)(t0 + tid) : NO_ITEM;
        if (!valid) score = neg_inf();
        const bool beats = valid && before(score, item, best_s[n - 1], best_i[n - 1]);
        if (__syncthreads_or(beats)) {
            tile_s[tid] = score;
            tile_i[tid] = item;
            // Bitonic sort of the tile, best first.
            for (u32 size = 2; size <= TOPN_TILE; size <<= 1) {
                for (u32 stride = size / 2; stride > 0; stride >>= 1) {
                    __syncthreads();
                    const u32 other = tid ^ stride;
                    if (other > tid) {
                        const bool up = (tid & size) == 0;
                        const float sa = tile_s[tid], sb = tile_s[other];
                        const u32 ia = tile_i[tid], ib = tile_i[other];
                        const bool swap = up ? before(sb, ib, sa, ia) : before(sa, ia, sb, ib);
                        if (swap) {
                            tile_s[tid] = sb;
                            tile_i[tid] = ib;
                            tile_s[other] = sa;
                            tile_i[other] = ia;
                        }
                    }
                }
            }
            if (tid < n) {
                next_s[tid] = neg_inf();
                next_i[tid] = NO_ITEM;
            }
            __syncthreads();
            // Merge the two sorted lists: an entry's place is its own rank plus the
            // number of entries of the other list before it.
            if (tid < n) {
                const float bs = best_s[tid], ts = tile_s[tid];
                const u32 bi = best_i[tid], ti = tile_i[tid];
                if (bi != NO_ITEM) {
                    const u32 at = tid + count_before(tile_s, tile_i, n, bs, bi);
                    if (at < n) {
                        next_s[at] = bs;
                        next_i[at] = bi;
                    }
                }
                if (ti != NO_ITEM) {
                    const u32 at = tid + count_before(best_s, best_i, n, ts, ti);
                    if (at < n) {
                        next_s[at] = ts;
                        next_i[at] = ti;
                    }
                }
            }
            __syncthreads();
            if (tid < n) {
                best_s[tid] = next_s[tid];
                best_i[tid] = next_i[tid];
            }
        }
        __syncthreads();
    }

    if (tid < n) {
        out_items[q * n + tid] = best_i[tid];
        out_scores[q * n + tid] = best_s[tid];
    }
}
