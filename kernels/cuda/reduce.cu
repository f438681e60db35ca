// Per-centroid sums (f64) and counts (u64) of labelled points, without atomics.
//
// The points are cut into fixed chunks of SUM_CHUNK consecutive points. One block
// reduces one chunk into a private k x d f64 partial (and k counts), adding the
// chunk's points to each element in point order. partial_sums_merge then adds the
// chunk partials into the running total in chunk order, one thread per element.
// Every element is therefore the same sequence of f64 additions whatever the GPU,
// the launch configuration or the number of chunk partials held at once: the
// result is deterministic, and it is the order of the CPU backend (chunks of the
// same size merged in chunk order), so the two agree bit for bit.
//
// Two chunk kernels:
//  - partial_sums_small (k*d <= SMALL_MAX_ELEMENTS): each thread owns up to
//    SMALL_PER_THREAD (label, feature) elements in registers; the chunk is staged
//    in shared memory and every thread scans it in order.
//  - partial_sums_wide: each thread owns features f = tid, tid + blockDim, ...
//    and adds every point of the chunk into the block's partial in global memory.
//
// Host-provided defines: SUM_CHUNK, SUM_THREADS.

typedef unsigned int u32;
typedef unsigned long long u64;

#define SMALL_PER_THREAD 4
#define SMALL_MAX_ELEMENTS (SUM_THREADS * SMALL_PER_THREAD)
#define STAGE_FLOATS 4096  // 16 KiB of points staged at once
#define STAGE_LABELS 1024

extern "C" __global__ void __launch_bounds__(SUM_THREADS)
    partial_sums_small(const float* __restrict__ points, const u32* __restrict__ labels, u64 n,
                       u32 d, u32 k, u64 first_chunk, double* __restrict__ partials,
                       u64* __restrict__ counts) {
    __shared__ float xs[STAGE_FLOATS];
    __shared__ u32 ls[STAGE_FLOATS];

    const u32 tid = threadIdx.x;
    const u32 kd = k * d;  // <= SMALL_MAX_ELEMENTS, checked by the host
    const u64 chunk = first_chunk + blockIdx.x;
    const u64 p0 = chunk * SUM_CHUNK;
    const u64 p1 = min(n, p0 + SUM_CHUNK);

    u32 label[SMALL_PER_THREAD], feature[SMALL_PER_THREAD];
    double acc[SMALL_PER_THREAD];
    u32 count[SMALL_PER_THREAD];
#pragma unroll
    for (int r = 0; r < SMALL_PER_THREAD; ++r) {
        const u32 e = tid + SUM_THREADS * r;
        label[r] = e < kd ? e / d : 0xffffffffu;
        feature[r] = e < kd ? e % d : 0;
        acc[r] = 0.0;
        count[r] = 0;
    }

    // Points per stage: as many whole rows as fit.
    const u32 stage = max(1u, min((u32)STAGE_FLOATS / d, (u32)STAGE_FLOATS));
    for (u64 s0 = p0; s0 < p1; s0 += stage) {
        const u32 m = (u32)min((u64)stage, p1 - s0);
        __syncthreads();
        for (u32 e = tid; e < m * d; e += SUM_THREADS) xs[e] = points[s0 * d + e];
        for (u32 e = tid; e < m; e += SUM_THREADS) ls[e] = labels[s0 + e];
        __syncthreads();
        for (u32 q = 0; q < m; ++q) {
            const u32 l = ls[q];
#pragma unroll
            for (int r = 0; r < SMALL_PER_THREAD; ++r) {
                if (label[r] == l) {
                    acc[r] += (double)xs[q * d + feature[r]];
                    count[r] += 1;
                }
            }
        }
    }

    double* slot = partials + (u64)blockIdx.x * kd;
    u64* cslot = counts + (u64)blockIdx.x * k;
#pragma unroll
    for (int r = 0; r < SMALL_PER_THREAD; ++r) {
        const u32 e = tid + SUM_THREADS * r;
        if (e < kd) {
            slot[e] = acc[r];
            if (feature[r] == 0) cslot[label[r]] = count[r];
        }
    }
}

extern "C" __global__ void __launch_bounds__(SUM_THREADS)
    partial_sums_wide(const float* __restrict__ points, const u32* __restrict__ labels, u64 n,
                      u32 d, u32 k, u64 first_chunk, double* __restrict__ partials,
                      u64* __restrict__ counts) {
    __shared__ u32 ls[STAGE_LABELS];

    const u32 tid = threadIdx.x;
    const u64 kd = (u64)k * d;
    const u64 chunk = first_chunk + blockIdx.x;
    const u64 p0 = chunk * SUM_CHUNK;
    const u64 p1 = min(n, p0 + SUM_CHUNK);
    double* slot = partials + (u64)blockIdx.x * kd;
    u64* cslot = counts + (u64)blockIdx.x * k;

    for (u64 e = tid; e < kd; e += SUM_THREADS) slot[e] = 0.0;
    for (u32 e = tid; e < k; e += SUM_THREADS) cslot[e] = 0;

    for (u64 s0 = p0; s0 < p1; s0 += STAGE_LABELS) {
        const u32 m = (u32)min((u64)STAGE_LABELS, p1 - s0);
        __syncthreads();  // also orders the zeroing above before the first additions
        for (u32 e = tid; e < m; e += SUM_THREADS) ls[e] = labels[s0 + e];
        __syncthreads();
        for (u32 q = 0; q < m; ++q) {
            const u32 l = ls[q];
            const float* x = points + (s0 + q) * d;
            double* row = slot + (u64)l * d;
            for (u32 f = tid; f < d; f += SUM_THREADS) row[f] += (double)x[f];
            if (tid == 0) cslot[l] += 1;
        }
    }
}

// total[e] += partials[0][e] + partials[1][e] + ... in chunk order.
extern "C" __global__ void partial_sums_merge(const double* __restrict__ partials,
                                              const u64* __restrict__ counts, u32 chunks, u32 d,
                                              u32 k, double* __restrict__ total,
                                              u64* __restrict__ total_counts) {
    const u64 kd = (u64)k * d;
    const u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e < kd) {
        double s = total[e];
        for (u32 c = 0; c < chunks; ++c) s += partials[c * kd + e];
        total[e] = s;
    }
    if (e < k) {
        u64 s = total_counts[e];
        for (u32 c = 0; c < chunks; ++c) s += counts[(u64)c * k + e];
        total_counts[e] = s;
    }
}
