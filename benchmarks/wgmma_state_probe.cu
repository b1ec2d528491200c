// Probe (benchmarks/probe_wgmma_state.py): the chunk-local state product of power retention, deg 2, d = e = 64,
// built the way forward_notes.md ("Where the state products stand") proposes, to measure what Hopper's wgmma gives
// before the package's kernels take the construction:
//
//     S[h, c, p * 256 + a * 16 + b, :] = sum over keys t of chunk c of  k_t[16 I + a] k_t[16 J + b] v_t      (fp32)
//
// for the pair p = (I, J) of 16-coordinate blocks, numbered as the Triton state kernel numbers them (delta = p / 4,
// I = p % 4, J = (I + delta) % 4). No gate, no scan, no validity: only the product whose speed is in question.
//
// Program (c, p, h): 256 threads = 2 warpgroups; warpgroup g owns rows [128 g, +128) of the 256-row pair tile as two
// m64 tiles. Row r = 16 a + b, so in m64 tile m warp w (of its warpgroup) owns the single coordinate
// a = 8 g + 4 m + w and the lanes own b = lane / 4 and lane / 4 + 8: the A fragment of wgmma m64n64k16 (bf16, A
// from registers) is phi^T(a, b; keys) = k_{I a} k_{J b}, built by each thread from 4 keys' k_{I a} (the same for
// the warp) and 2 x 4 (b, key) values of k_J, with no exchange between threads. B is V^T (64 value columns x 64
// keys, K-major) in shared memory with the 128-byte swizzle, written by the threads (then a proxy fence).
// Per 64-key step: stage K_I, K_J, V^T; build 2 tiles x 4 k16 slices of A (32 registers); issue 8 wgmma; wait.

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;

constexpr int D = 64, E = 64, BF = 16, NB = D / BF, FB = BF * BF, NPAIRS = NB * (NB + 1) / 2, DT = NPAIRS * FB;
constexpr int STEP = 64;            // keys per step
constexpr int THREADS = 256;
#ifndef PROBE_MIN_BLOCKS            // programs per multiprocessor the registers are capped for (2: 128 registers, so one
#define PROBE_MIN_BLOCKS 1          // program's construction and staging can overlap the other's products)
#endif

__device__ __forceinline__ float bf16_to_float(bf16_t x) { return __uint_as_float(static_cast<u32>(x) << 16); }

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {  // round to nearest even, as Triton's bf16 product
  u32 out;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(out) : "f"(hi), "f"(lo));
  return out;
}

// Shared-memory matrix descriptor: K-major tile, 128-byte rows, 128-byte swizzle (8-row atoms 1024 bytes apart).
__device__ __forceinline__ u64 smem_descriptor(const void* tile) {
  u64 address = static_cast<u64>(__cvta_generic_to_shared(tile));
  return ((address & 0x3FFFF) >> 4) | (static_cast<u64>(16 >> 4) << 16) | (static_cast<u64>(1024 >> 4) << 32) |
         (static_cast<u64>(1) << 62);
}

__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], const u32 (&a)[4], u64 b_desc) {
  asm volatile(
      "{\n"
      ".reg .pred accumulate;\n"
      "setp.ne.b32 accumulate, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, accumulate, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(1));
}

extern "C" __global__ void __launch_bounds__(THREADS, PROBE_MIN_BLOCKS)
state_probe(const bf16_t* __restrict__ K, const bf16_t* __restrict__ V, float* __restrict__ S, int T, int n_chunks,
            int chunk, int restage) {
  __shared__ __align__(1024) bf16_t vt[E * STEP];      // V^T: row = value column, 128 bytes of keys, swizzled
  __shared__ float ki[STEP][BF + 1];                   // k_{I a} per key
  __shared__ float kj[STEP][BF + 1];                   // k_{J b} per key

  const int c = blockIdx.x, p = blockIdx.y, h = blockIdx.z;
  const int delta = p / NB, blk_i = p % NB, blk_j = (blk_i + delta) % NB;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, group = warp / 4, w = warp % 4;
  const int g = lane / 4, q = lane % 4;
  const bf16_t* k_head = K + static_cast<long long>(h) * T * D;
  const bf16_t* v_head = V + static_cast<long long>(h) * T * E;

  float acc[2][32];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[m][i] = 0.f;

  const int first = c * chunk, last = min(first + chunk, T);
  for (int start = first; start < last; start += STEP) {
    if (restage || start == first) {  // restage = 0 times the construction and products alone (inputs of step 0)
      // thread tid stages key tid / 4: a quarter of its 16 + 16 coordinates (8-byte loads) and of its 64 values
      const int t = tid / 4, part = tid % 4, key = start + t;
      const bool ok = key < last;
      const long long row = static_cast<long long>(ok ? key : first);
      uint2 ki4 = *reinterpret_cast<const uint2*>(k_head + row * D + blk_i * BF + part * 4);
      uint2 kj4 = *reinterpret_cast<const uint2*>(k_head + row * D + blk_j * BF + part * 4);
      const bf16_t* ki_raw = reinterpret_cast<const bf16_t*>(&ki4);
      const bf16_t* kj_raw = reinterpret_cast<const bf16_t*>(&kj4);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        ki[t][part * 4 + i] = ok ? bf16_to_float(ki_raw[i]) : 0.f;
        kj[t][part * 4 + i] = ok ? bf16_to_float(kj_raw[i]) : 0.f;
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        uint4 v8 = *reinterpret_cast<const uint4*>(v_head + row * E + part * 16 + half * 8);
        const bf16_t* v_raw = reinterpret_cast<const bf16_t*>(&v8);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int col = part * 16 + half * 8 + i;                      // value column = row of V^T
          const int chunk16 = (t / 8) ^ (col % 8);                       // 16-byte chunk after the 128-byte swizzle
          vt[col * STEP + chunk16 * 8 + t % 8] = ok ? v_raw[i] : bf16_t(0);
        }
      }
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();

    u32 a_frag[2][4][4];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const int a = 8 * group + 4 * m + w;                               // this warp's coordinate of block I
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int t0 = 16 * s + 2 * q;
        const float i00 = ki[t0][a], i01 = ki[t0 + 1][a], i10 = ki[t0 + 8][a], i11 = ki[t0 + 9][a];
        a_frag[m][s][0] = pack_bf16(i00 * kj[t0][g], i01 * kj[t0 + 1][g]);
        a_frag[m][s][1] = pack_bf16(i00 * kj[t0][g + 8], i01 * kj[t0 + 1][g + 8]);
        a_frag[m][s][2] = pack_bf16(i10 * kj[t0 + 8][g], i11 * kj[t0 + 9][g]);
        a_frag[m][s][3] = pack_bf16(i10 * kj[t0 + 8][g + 8], i11 * kj[t0 + 9][g + 8]);
      }
    }
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int s = 0; s < 4; ++s) wgmma_m64n64k16(acc[m], a_frag[m][s], smem_descriptor(vt + 16 * s));
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    __syncthreads();                                                     // the next step overwrites the stage
  }

  // D fragment: register 4 j + {0, 1} is row g, columns 8 j + 2 q + {0, 1}; 4 j + {2, 3} is row g + 8
  float* out = S + ((static_cast<long long>(h) * n_chunks + c) * DT + p * FB) * E;
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const int row0 = 128 * group + 64 * m + 16 * w + g;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int col = 8 * j + 2 * q;
      out[row0 * E + col] = acc[m][4 * j];
      out[row0 * E + col + 1] = acc[m][4 * j + 1];
      out[(row0 + 8) * E + col] = acc[m][4 * j + 2];
      out[(row0 + 8) * E + col + 1] = acc[m][4 * j + 3];
    }
  }
}

// The query side of the same product: Y[h, t, :] = sum over pairs p and features (a, b) of
// q_t[16 I + a] q_t[16 J + b] S[h, c(t), p * 256 + 16 a + b, :], with c(t) = t / chunk (no decay, no intra-chunk part).
// Program (query block of 128 rows, h): 2 warpgroups of 64 rows. For pair p the k16 slice s is the coordinate a = s of
// block I, so the A fragment of rows (queries) g, g + 8 and columns b = 2 q + {0, 1, 8, 9} is q_{I a} q_{J b}: each
// thread keeps its rows' 16 + 16 coordinates of blocks I and J in registers and makes 8 products per slice. B is the
// pair's state tile S^T (64 value rows x 256 features, K-major: 4 swizzled atoms of 64 features), staged per pair.
constexpr int QROWS = 128;

extern "C" __global__ void __launch_bounds__(THREADS, 1)
query_probe(const bf16_t* __restrict__ Q, const bf16_t* __restrict__ S, float* __restrict__ Y, int T, int n_chunks,
            int chunk) {
  __shared__ __align__(1024) bf16_t st[4 * E * 64];    // S^T of one pair: atom f / 64, row e, 128 bytes, swizzled

  const int h = blockIdx.y, row_block = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, group = warp / 4, w = warp % 4;
  const int g = lane / 4, q = lane % 4;
  const int first_row = row_block * QROWS, c = first_row / chunk;
  const bf16_t* q_head = Q + static_cast<long long>(h) * T * D;
  const bf16_t* s_chunk = S + (static_cast<long long>(h) * n_chunks + c) * DT * E;
  const int rows[2] = {first_row + 64 * group + 16 * w + g, first_row + 64 * group + 16 * w + g + 8};

  float acc[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.f;

  for (int p = 0; p < NPAIRS; ++p) {
    const int delta = p / NB, blk_i = p % NB, blk_j = (blk_i + delta) % NB;
    __syncthreads();                                                     // the previous pair's products are done
    {  // stage S^T: thread tid takes feature f = tid of the pair (64 values, 128 bytes)
      const int f = tid;
      const bf16_t* src = s_chunk + static_cast<long long>(p * FB + f) * E;
#pragma unroll
      for (int part = 0; part < 8; ++part) {
        uint4 v8 = *reinterpret_cast<const uint4*>(src + part * 8);
        const bf16_t* raw = reinterpret_cast<const bf16_t*>(&v8);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int e = part * 8 + i, fa = f % 64;
          st[(f / 64) * E * 64 + e * 64 + (((fa / 8) ^ (e % 8)) * 8) + fa % 8] = raw[i];
        }
      }
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();

    float qi[2][BF], qj[2][4];                                           // this thread's coordinates of rows g, g + 8
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool ok = rows[r] < T;
      const bf16_t* q_row = q_head + static_cast<long long>(ok ? rows[r] : 0) * D;
#pragma unroll
      for (int a = 0; a < BF; ++a) qi[r][a] = ok ? bf16_to_float(q_row[blk_i * BF + a]) : 0.f;
      const int cols[4] = {2 * q, 2 * q + 1, 2 * q + 8, 2 * q + 9};
#pragma unroll
      for (int j = 0; j < 4; ++j) qj[r][j] = ok ? bf16_to_float(q_row[blk_j * BF + cols[j]]) : 0.f;
    }
    u32 a_frag[BF][4];
#pragma unroll
    for (int s = 0; s < BF; ++s) {
      a_frag[s][0] = pack_bf16(qi[0][s] * qj[0][0], qi[0][s] * qj[0][1]);
      a_frag[s][1] = pack_bf16(qi[1][s] * qj[1][0], qi[1][s] * qj[1][1]);
      a_frag[s][2] = pack_bf16(qi[0][s] * qj[0][2], qi[0][s] * qj[0][3]);
      a_frag[s][3] = pack_bf16(qi[1][s] * qj[1][2], qi[1][s] * qj[1][3]);
    }
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int s = 0; s < BF; ++s) wgmma_m64n64k16(acc, a_frag[s], smem_descriptor(st + (s / 4) * E * 64 + (s % 4) * 16));
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= T) continue;
    float* out = Y + (static_cast<long long>(h) * T + rows[r]) * E;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      out[8 * j + 2 * q] = acc[4 * j + 2 * r];
      out[8 * j + 2 * q + 1] = acc[4 * j + 2 * r + 1];
    }
  }
}
