// Gram matrix A^T A (d x d, f64) of a resident n x d f32 matrix.
//
// The rows are cut into fixed blocks of GRAM_ROWS consecutive rows. gram_partial
// computes the partial Gram of one row block for one 32 x 32 tile of the output
// (upper-triangular tiles only: the result is symmetric), adding the rows in
// order: every f32 x f32 product is exact in f64, so each element is a fixed
// sequence of f64 additions. gram_merge adds the row-block partials in block
// order and writes both halves of the symmetric result. The order of additions
// does not depend on the GPU or on how many partials are held at once.
//
// Host-provided defines: GRAM_ROWS.

typedef unsigned int u32;
typedef unsigned long long u64;

#define GRAM_TILE 32
#define GRAM_THREADS 256  // 16 x 16 threads, 2 x 2 outputs each

// Grid: x = output tile (ti * tiles + tj), y = row block within the batch.
extern "C" __global__ void __launch_bounds__(GRAM_THREADS)
    gram_partial(const float* __restrict__ a, u64 n, u32 d, u32 tiles, u64 first_block,
                 double* __restrict__ partials) {
    __shared__ float as[GRAM_TILE][GRAM_TILE + 1];
    __shared__ float bs[GRAM_TILE][GRAM_TILE + 1];

    const u32 ti = blockIdx.x / tiles, tj = blockIdx.x % tiles;
    if (ti > tj) return;  // mirrored by gram_merge (uniform across the block)

    const u32 tid = threadIdx.x;
    const u32 tx = tid % 16, ty = tid / 16;
    const u64 r0 = (first_block + blockIdx.y) * GRAM_ROWS;
    const u64 r1 = min(n, r0 + GRAM_ROWS);
    const u32 ci0 = ti * GRAM_TILE, cj0 = tj * GRAM_TILE;

    double acc[2][2] = {{0.0, 0.0}, {0.0, 0.0}};
    for (u64 r = r0; r < r1; r += GRAM_TILE) {
        __syncthreads();
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const u32 e = tid + GRAM_THREADS * q;
            const u32 rr = e / GRAM_TILE, cc = e % GRAM_TILE;
            const u64 row = r + rr;
            const u32 ci = ci0 + cc, cj = cj0 + cc;
            // Rows past the block add +0 products, which leaves the sums unchanged.
            as[rr][cc] = (row < r1 && ci < d) ? a[row * d + ci] : 0.0f;
            bs[rr][cc] = (row < r1 && cj < d) ? a[row * d + cj] : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int rr = 0; rr < GRAM_TILE; ++rr) {
            const double a0 = (double)as[rr][ty * 2], a1 = (double)as[rr][ty * 2 + 1];
            const double b0 = (double)bs[rr][tx * 2], b1 = (double)bs[rr][tx * 2 + 1];
            acc[0][0] += a0 * b0;
            acc[0][1] += a0 * b1;
            acc[1][0] += a1 * b0;
            acc[1][1] += a1 * b1;
        }
    }

    double* out = partials + (u64)blockIdx.y * d * d;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const u32 gi = ci0 + ty * 2 + i;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const u32 gj = cj0 + tx * 2 + j;
            if (gi < d && gj < d) out[(u64)gi * d + gj] = acc[i][j];
        }
    }
}

// total[i][j] (i <= j) += partials[0][i][j] + partials[1][i][j] + ... in block
// order; total[j][i] = total[i][j].
extern "C" __global__ void gram_merge(const double* __restrict__ partials, u32 blocks, u32 d,
                                      double* __restrict__ total) {
    const u64 dd = (u64)d * d;
    const u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= dd) return;
    const u32 i = (u32)(e / d), j = (u32)(e % d);
    if (i > j) return;
    double s = total[e];
    for (u32 b = 0; b < blocks; ++b) s += partials[b * dd + e];
    total[e] = s;
    total[(u64)j * d + i] = s;
}
