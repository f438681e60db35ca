// One implicit-ALS half-step: a conjugate-gradient solve per row, in the style
// of the `implicit` library's GPU kernel (cg_least_squares), one block per row.
//
// For row u with stored items i (confidence c_ui >= 1) it runs cg_steps steps on
//   (A + Y^T (C_u - I) Y) x_u = Y^T C_u p_u,   A = Y^T Y + lambda I,
// warm-started from the current x_u:
//   r  = -A x + sum_i [c_ui - (c_ui - 1)(y_i . x)] y_i
//   Ap =  A p + sum_i (c_ui - 1)(y_i . p) y_i
// exactly as kernels::reference::als_solve_row (same stopping rules: no step when
// |r|^2 < 1e-20 at the start, stop when p.Ap <= 0 or |r|^2 < 1e-20).
//
// Thread f of the block owns feature f (blockDim.x = d rounded up to a warp).
// A is kept in shared memory when it fits (the host decides, a_in_shared); it is
// passed transposed, so that thread f reads A[f][i] at at[i * d + f] (consecutive
// threads, consecutive banks). The sparse terms are processed in rounds of
// ALS_CHUNK stored items: each warp computes the dot products of some of them
// (lanes stride the features, a fixed butterfly sums the lanes), then every
// thread adds the round's terms to its feature in CSR order. Block-wide dot
// products reduce warps in a fixed tree, then the warp sums in warp order, so a
// row's result depends only on its own data. With want_loss, each row's pair
// loss (with the new x_u) goes to row_loss[u], for the host to add in row order.
//
// Host-provided defines: ALS_CHUNK.

typedef unsigned int u32;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu
#define CG_TOLERANCE 1e-20f

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) v += __shfl_xor_sync(FULL_MASK, v, m);
    return v;  // identical in every lane
}

// Sum of `v` over the block, returned to every thread. `red` holds one float per
// warp; the trailing barrier lets the caller reuse it immediately.
__device__ __forceinline__ float block_sum(float v, float* red) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float s = 0.0f;
    for (u32 w = 0; w < warps; ++w) s += red[w];
    __syncthreads();
    return s;
}

// acc + sum over the stored items j of row [begin, end) of coef_j * y_j[f], with
//   coef_j = c_j - (c_j - 1)(y_j . v)   (residual = true)
//   coef_j = (c_j - 1)(y_j . v)         (residual = false)
// `v` is a block-shared vector of d floats.
__device__ __forceinline__ float sparse_terms(float acc, u64 begin, u64 end,
                                              const u32* __restrict__ indices,
                                              const float* __restrict__ values,
                                              const float* __restrict__ y, u32 d,
                                              const float* v, float* coef, u32* cols,
                                              bool residual) {
    const u32 f = threadIdx.x, lane = f & 31, warp = f >> 5, warps = blockDim.x >> 5;
    for (u64 c0 = begin; c0 < end; c0 += ALS_CHUNK) {
        const u32 count = (u32)min((u64)ALS_CHUNK, end - c0);
        for (u32 j = warp; j < count; j += warps) {
            const u32 col = indices[c0 + j];
            const float c = values[c0 + j];
            const float* yj = y + (u64)col * d;
            float dot = 0.0f;
            for (u32 g = lane; g < d; g += 32) dot = fmaf(yj[g], v[g], dot);
            dot = warp_sum(dot);
            if (lane == 0) {
                cols[j] = col;
                coef[j] = residual ? c - (c - 1.0f) * dot : (c - 1.0f) * dot;
            }
        }
        __syncthreads();
        if (f < d) {
            for (u32 j = 0; j < count; ++j) acc = fmaf(coef[j], y[(u64)cols[j] * d + f], acc);
        }
        __syncthreads();
    }
    return acc;
}

// sum over the stored items j of row [begin, end) of c_j (1 - s_j)^2 - s_j^2 with
// s_j = y_j . v, in double, valid in thread 0: warps compute the dot products of a
// round, thread 0 adds the terms in CSR order.
__device__ __forceinline__ double pair_loss_terms(u64 begin, u64 end,
                                                  const u32* __restrict__ indices,
                                                  const float* __restrict__ values,
                                                  const float* __restrict__ y, u32 d,
                                                  const float* v, float* dots) {
    const u32 f = threadIdx.x, lane = f & 31, warp = f >> 5, warps = blockDim.x >> 5;
    double total = 0.0;
    for (u64 c0 = begin; c0 < end; c0 += ALS_CHUNK) {
        const u32 count = (u32)min((u64)ALS_CHUNK, end - c0);
        for (u32 j = warp; j < count; j += warps) {
            const float* yj = y + (u64)indices[c0 + j] * d;
            float dot = 0.0f;
            for (u32 g = lane; g < d; g += 32) dot = fmaf(yj[g], v[g], dot);
            dot = warp_sum(dot);
            if (lane == 0) dots[j] = dot;
        }
        __syncthreads();
        if (f == 0) {
            for (u32 j = 0; j < count; ++j) {
                const double s = dots[j], c = values[c0 + j];
                total += c * (1.0 - s) * (1.0 - s) - s * s;
            }
        }
        __syncthreads();
    }
    return total;
}

// Dynamic shared memory: [A^T: d*d floats if a_in_shared] [v: blockDim floats]
// [coef: ALS_CHUNK floats] [cols: ALS_CHUNK u32] [red: 32 floats].
extern "C" __global__ void __launch_bounds__(1024)
    als_cg(float* __restrict__ x, const float* __restrict__ y, const float* __restrict__ at,
           const u64* __restrict__ indptr, const u32* __restrict__ indices,
           const float* __restrict__ values, u64 rows, u32 d, u32 cg_steps, u32 a_in_shared,
           double* __restrict__ row_loss, u32 want_loss) {
    extern __shared__ __align__(16) float smem[];
    const u32 f = threadIdx.x;
    const u32 threads = blockDim.x;
    float* a_s = smem;
    float* v = smem + (a_in_shared ? (u64)d * d : 0);
    float* coef = v + threads;
    u32* cols = reinterpret_cast<u32*>(coef + ALS_CHUNK);
    float* red = reinterpret_cast<float*>(cols + ALS_CHUNK);

    if (a_in_shared) {
        for (u32 e = f; e < d * d; e += threads) a_s[e] = at[e];
        __syncthreads();
    }
    const float* a = a_in_shared ? a_s : at;

    for (u64 u = blockIdx.x; u < rows; u += gridDim.x) {
        float* xu = x + u * d;
        const u64 begin = indptr[u], end = indptr[u + 1];
        float xf = f < d ? xu[f] : 0.0f;

        // r = -A x + sum_i [c - (c - 1)(y_i . x)] y_i
        v[f] = xf;
        __syncthreads();
        float r = 0.0f;
        if (f < d) {
            for (u32 i = 0; i < d; ++i) r = fmaf(-a[(u64)i * d + f], v[i], r);
        }
        r = sparse_terms(r, begin, end, indices, values, y, d, v, coef, cols, true);
        float p = r;
        float rs_old = block_sum(r * r, red);

        if (rs_old >= CG_TOLERANCE) {
            for (u32 it = 0; it < cg_steps; ++it) {
                // Ap = A p + sum_i (c - 1)(y_i . p) y_i
                v[f] = p;
                __syncthreads();
                float ap = 0.0f;
                if (f < d) {
                    for (u32 i = 0; i < d; ++i) ap = fmaf(a[(u64)i * d + f], v[i], ap);
                }
                ap = sparse_terms(ap, begin, end, indices, values, y, d, v, coef, cols, false);
                const float p_ap = block_sum(p * ap, red);
                if (!(p_ap > 0.0f)) break;  // uniform: every thread holds the same sum
                const float alpha = rs_old / p_ap;
                xf = fmaf(alpha, p, xf);
                r = fmaf(-alpha, ap, r);
                const float rs_new = block_sum(r * r, red);
                if (rs_new < CG_TOLERANCE) break;
                p = fmaf(rs_new / rs_old, p, r);
                rs_old = rs_new;
            }
        }
        if (want_loss) {
            v[f] = xf;
            __syncthreads();
            const double loss = pair_loss_terms(begin, end, indices, values, y, d, v, coef);
            if (f == 0) row_loss[u] = loss;
        }
        if (f < d) xu[f] = xf;
        __syncthreads();  // v is rewritten by the next row
    }
}
