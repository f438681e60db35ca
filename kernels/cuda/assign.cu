// Nearest and second-nearest centroid of every point (k-means assignment).
//
// Contract (shared with the CPU twin, see kernels/src/lib.rs): squared Euclidean
// distances in f32, never negative; ties go to the lowest centroid index; with
// k = 1 the second best is NO_INDEX at +inf; a point's result depends only on
// that point and the centroids. The n x k distance matrix is never materialised:
// every block keeps the running best and second best of its points in registers
// while it streams the centroids through shared memory.
//
// Two families of kernels:
//  - assign_direct_D (d <= D, D in 1, 2, 4, 8, 16, 32): one thread per point, the
//    point in registers, tiles of centroids in shared memory, distances computed
//    directly as sum (x - c)^2 in feature order without FMA contraction, which is
//    bit-identical to the plain reference.
//  - assign_expanded (d > 32): a register-blocked GEMM computes x . c for a tile of
//    64 points against tiles of 64 centroids; distances are |x|^2 - 2 x.c + |c|^2
//    after shifting points and centroids by the mean of the centroids (so the
//    norms stay of the order of the distances). The distances reported for the
//    best and second best are recomputed directly at the end.
//
// Host-provided defines: DIRECT_THREADS, DIRECT_TILE_CENTROIDS, EXP_TILE_POINTS,
// EXP_TILE_CENTROIDS (kernels/src/cuda/compile.rs).

typedef unsigned int u32;
typedef unsigned long long u64;

#define NO_INDEX 0xffffffffu
#define FULL_MASK 0xffffffffu

#define EXP_THREADS 256  // 16 x 16 threads, 4 x 4 (point, centroid) pairs each
#define EXP_TILE_FEATURES 16
#define EXP_PAD 4  // keeps float4 alignment of the shared rows

#if EXP_TILE_POINTS != 64 || EXP_TILE_CENTROIDS != 64
#error "assign_expanded is written for 64 x 64 tiles (16 x 16 threads of 4 x 4)"
#endif

// Layout of kernels::Nearest (repr(C)).
struct Nearest {
    u32 best;
    float best_dist;
    u32 second;
    float second_dist;
};

__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

__device__ __forceinline__ Nearest empty_nearest() {
    Nearest s;
    s.best = NO_INDEX;
    s.best_dist = pos_inf();
    s.second = NO_INDEX;
    s.second_dist = pos_inf();
    return s;
}

// Offers centroid j at `dist`. Centroids must be offered in increasing index
// order: with strict comparisons a tie keeps the lower index. Infinite distances
// never enter; `finish` fills the places they leave empty.
__device__ __forceinline__ void offer(Nearest& s, u32 j, float dist) {
    if (dist < s.best_dist) {
        s.second = s.best;
        s.second_dist = s.best_dist;
        s.best = j;
        s.best_dist = dist;
    } else if (dist < s.second_dist) {
        s.second = j;
        s.second_dist = dist;
    }
}

// Total order on (distance, index): smaller distance first, then lower index.
__device__ __forceinline__ bool before(float da, u32 ia, float db, u32 ib) {
    return da < db || (da == db && ia < ib);
}

// Best and second best of the union of two disjoint sets of centroids.
__device__ __forceinline__ Nearest merge(const Nearest& a, const Nearest& b) {
    Nearest r;
    if (before(b.best_dist, b.best, a.best_dist, a.best)) {
        r.best = b.best;
        r.best_dist = b.best_dist;
        if (before(b.second_dist, b.second, a.best_dist, a.best)) {
            r.second = b.second;
            r.second_dist = b.second_dist;
        } else {
            r.second = a.best;
            r.second_dist = a.best_dist;
        }
    } else {
        r.best = a.best;
        r.best_dist = a.best_dist;
        if (before(b.best_dist, b.best, a.second_dist, a.second)) {
            r.second = b.best;
            r.second_dist = b.best_dist;
        } else {
            r.second = a.second;
            r.second_dist = a.second_dist;
        }
    }
    return r;
}

__device__ __forceinline__ Nearest shfl_xor_nearest(const Nearest& s, int mask) {
    Nearest o;
    o.best = __shfl_xor_sync(FULL_MASK, s.best, mask);
    o.best_dist = __shfl_xor_sync(FULL_MASK, s.best_dist, mask);
    o.second = __shfl_xor_sync(FULL_MASK, s.second, mask);
    o.second_dist = __shfl_xor_sync(FULL_MASK, s.second_dist, mask);
    return o;
}

// When some distances were infinite (f32 overflow), the lowest such indices fill
// the empty places, as the reference's "first index wins" does.
__device__ __forceinline__ void finish(Nearest& s, u32 k) {
    if (s.best == NO_INDEX) s.best = 0;
    if (k >= 2 && s.second == NO_INDEX) s.second = (s.best == 0) ? 1 : 0;
}

// Squared distance accumulated in feature order without FMA, exactly as
// kernels::reference::squared_distance.
__device__ __forceinline__ float direct_distance(const float* __restrict__ x,
                                                 const float* __restrict__ c, u32 d) {
    float acc = 0.0f;
    for (u32 f = 0; f < d; ++f) {
        const float t = __fsub_rn(x[f], c[f]);
        acc = __fadd_rn(acc, __fmul_rn(t, t));
    }
    return acc;
}

__device__ __forceinline__ void store(Nearest* __restrict__ out, u64 p, const Nearest& s) {
    uint4 v;
    v.x = s.best;
    v.y = __float_as_uint(s.best_dist);
    v.z = s.second;
    v.w = __float_as_uint(s.second_dist);
    reinterpret_cast<uint4*>(out)[p] = v;
}

// ---------------------------------------------------------------------------
// Small d: direct distances, one point per thread.

template <int D>
__device__ __forceinline__ void assign_direct(const float* __restrict__ points, u64 n, u32 d,
                                              const float* __restrict__ centroids, u32 k,
                                              Nearest* __restrict__ out) {
    // Centroids of the current tile, each padded with zeros to D features: the
    // padding adds (0 - 0)^2 = +0 to the sums, which leaves them bit-identical.
    __shared__ __align__(16) float tile[DIRECT_TILE_CENTROIDS * D];

    const u64 p = (u64)blockIdx.x * DIRECT_THREADS + threadIdx.x;
    const bool active = p < n;
    float x[D];
#pragma unroll
    for (int f = 0; f < D; ++f) x[f] = (active && (u32)f < d) ? points[p * d + f] : 0.0f;

    Nearest s = empty_nearest();
    for (u32 c0 = 0; c0 < k; c0 += DIRECT_TILE_CENTROIDS) {
        const u32 count = min((u32)DIRECT_TILE_CENTROIDS, k - c0);
        __syncthreads();
        for (u32 e = threadIdx.x; e < DIRECT_TILE_CENTROIDS * D; e += DIRECT_THREADS) {
            const u32 j = e / D, f = e % D;
            tile[e] = (j < count && f < d) ? centroids[(u64)(c0 + j) * d + f] : 0.0f;
        }
        __syncthreads();
        if (active) {
            // Not unrolled: ptxas spills the running best when two centroids are
            // interleaved (D = 8, 16); the many resident warps of this small
            // kernel hide the latency of the dependent adds instead.
#pragma unroll 1
            for (u32 j = 0; j < count; ++j) {
                const float* c = &tile[j * D];
                float acc = 0.0f;
#pragma unroll
                for (int f = 0; f < D; ++f) {
                    const float t = __fsub_rn(x[f], c[f]);
                    acc = __fadd_rn(acc, __fmul_rn(t, t));
                }
                offer(s, c0 + j, acc);
            }
        }
    }
    if (active) {
        finish(s, k);
        store(out, p, s);
    }
}

#define DIRECT_KERNEL(D)                                                                  \
    extern "C" __global__ void __launch_bounds__(DIRECT_THREADS)                          \
        assign_direct_##D(const float* __restrict__ points, u64 n, u32 d,                 \
                          const float* __restrict__ centroids, u32 k,                     \
                          Nearest* __restrict__ out) {                                    \
        assign_direct<D>(points, n, d, centroids, k, out);                                \
    }

DIRECT_KERNEL(1)
DIRECT_KERNEL(2)
DIRECT_KERNEL(4)
DIRECT_KERNEL(8)
DIRECT_KERNEL(16)
DIRECT_KERNEL(32)

// ---------------------------------------------------------------------------
// Larger d: expanded form on register-blocked tiles.
//
// Thread (ty, tx) = (threadIdx.x / 16, threadIdx.x % 16) owns points ty*4 .. ty*4+3
// of the block's tile and centroids tx*4 .. tx*4+3 of every centroid tile, so it
// meets its centroids in increasing index order. The 16 threads of a point row
// are 16 consecutive lanes of one warp; they merge their running best at the end.
//
// `shift` is the mean of the centroids and `c_norms` holds |c - shift|^2 (both
// computed by the host once per call).

extern "C" __global__ void __launch_bounds__(EXP_THREADS)
    assign_expanded(const float* __restrict__ points, u64 n, u32 d,
                    const float* __restrict__ centroids, u32 k,
                    const float* __restrict__ shift, const float* __restrict__ c_norms,
                    Nearest* __restrict__ out) {
    __shared__ __align__(16) float xs[EXP_TILE_FEATURES][EXP_TILE_POINTS + EXP_PAD];
    __shared__ __align__(16) float cs[EXP_TILE_FEATURES][EXP_TILE_CENTROIDS + EXP_PAD];
    __shared__ float x_norms[EXP_TILE_POINTS];

    const u32 tid = threadIdx.x;
    const u32 tx = tid % 16, ty = tid / 16;
    const u64 p0 = (u64)blockIdx.x * EXP_TILE_POINTS;

    // |x - shift|^2 of the tile's points: 4 threads (4 consecutive lanes) per point.
    {
        const u32 pl = tid / 4, g = tid % 4;
        const u64 p = p0 + pl;
        float acc = 0.0f;
        if (p < n) {
            for (u32 f = g; f < d; f += 4) {
                const float v = points[p * d + f] - shift[f];
                acc = fmaf(v, v, acc);
            }
        }
        acc += __shfl_xor_sync(FULL_MASK, acc, 1);
        acc += __shfl_xor_sync(FULL_MASK, acc, 2);
        if (g == 0) x_norms[pl] = acc;
    }
    __syncthreads();
    float xn[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) xn[i] = x_norms[ty * 4 + i];

    Nearest s[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) s[i] = empty_nearest();

    for (u32 c0 = 0; c0 < k; c0 += EXP_TILE_CENTROIDS) {
        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

        for (u32 f0 = 0; f0 < d; f0 += EXP_TILE_FEATURES) {
            __syncthreads();
            // 64 x 16 values of each operand, 4 per thread; 16 consecutive threads
            // read 16 consecutive features of one row.
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const u32 e = tid + EXP_THREADS * r;
                const u32 row = e / EXP_TILE_FEATURES, fl = e % EXP_TILE_FEATURES;
                const u32 f = f0 + fl;
                const u64 p = p0 + row;
                const u32 c = c0 + row;
                const float sh = f < d ? shift[f] : 0.0f;
                xs[fl][row] = (p < n && f < d) ? points[p * d + f] - sh : 0.0f;
                cs[fl][row] = (c < k && f < d) ? centroids[(u64)c * d + f] - sh : 0.0f;
            }
            __syncthreads();
#pragma unroll
            for (int fl = 0; fl < EXP_TILE_FEATURES; ++fl) {
                const float4 a = *reinterpret_cast<const float4*>(&xs[fl][ty * 4]);
                const float4 b = *reinterpret_cast<const float4*>(&cs[fl][tx * 4]);
                const float av[4] = {a.x, a.y, a.z, a.w};
                const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
            }
        }

#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32 c = c0 + tx * 4 + j;
            if (c < k) {
                const float cn = c_norms[c];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    float dist = (xn[i] - 2.0f * acc[i][j]) + cn;
                    if (!isfinite(dist)) {
                        // Overflow in the expanded form (huge features): the direct
                        // form overflows only if the distance itself does.
                        const u64 p = p0 + ty * 4 + i;
                        dist = p < n ? direct_distance(points + p * d,
                                                       centroids + (u64)c * d, d)
                                     : pos_inf();
                    }
                    offer(s[i], c, fmaxf(dist, 0.0f));
                }
            }
        }
    }

    // Merge the 16 threads of each point row (lanes differing in bits 0..3).
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int mask = 1; mask < 16; mask <<= 1) s[i] = merge(s[i], shfl_xor_nearest(s[i], mask));
    }

    // Thread tx = i reports point i of its row, with direct distances.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u64 p = p0 + ty * 4 + i;
        if (tx == (u32)i && p < n) {
            Nearest r = s[i];
            const float* x = points + p * d;
            if (r.best != NO_INDEX) r.best_dist = direct_distance(x, centroids + (u64)r.best * d, d);
            if (r.second != NO_INDEX) {
                r.second_dist = direct_distance(x, centroids + (u64)r.second * d, d);
                if (before(r.second_dist, r.second, r.best_dist, r.best)) {
                    const u32 j = r.best;
                    const float dj = r.best_dist;
                    r.best = r.second;
                    r.best_dist = r.second_dist;
                    r.second = j;
                    r.second_dist = dj;
                }
            }
            finish(r, k);
            store(out, p, r);
        }
    }
}
