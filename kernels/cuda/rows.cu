// Row gather and scatter on resident dense matrices (download_rows, write_rows).
// One thread per value, grid-stride; consecutive threads touch consecutive
// features of a row. The host makes the scattered rows distinct (the last values
// listed for a row win), so no two threads write the same place.

typedef unsigned int u32;
typedef unsigned long long u64;

// dst[r][f] = src[rows[r]][f]
extern "C" __global__ void gather_rows(const float* __restrict__ src, u32 d,
                                       const u32* __restrict__ rows, u64 count,
                                       float* __restrict__ dst) {
    const u64 total = count * d;
    for (u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (u64)gridDim.x * blockDim.x) {
        const u64 r = e / d, f = e % d;
        dst[e] = src[(u64)rows[r] * d + f];
    }
}

// dst[rows[r]][f] = src[r][f]
extern "C" __global__ void scatter_rows(float* __restrict__ dst, u32 d,
                                        const u32* __restrict__ rows, u64 count,
                                        const float* __restrict__ src) {
    const u64 total = count * d;
    for (u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (u64)gridDim.x * blockDim.x) {
        const u64 r = e / d, f = e % d;
        dst[(u64)rows[r] * d + f] = src[e];
    }
}
