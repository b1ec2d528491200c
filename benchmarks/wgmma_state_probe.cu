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
// from registers) is phi^T(a, b; keys) = k_{I a} k_{J b}. Per k16 slice a thread takes the [16 keys x 16] tile of
// K_J from shared memory with one ldmatrix.x4.trans (exactly the (key pair, b) values its fragment needs, packed by
// key pairs), the key pairs of k_{I a} by ldmatrix.x2.trans and a shuffle from the lane holding coordinate a, and
// makes the fragment with 8 packed bf16 multiplies (one rounding per product, as in Triton's kernel).
// B is V as stored ([keys x e], e contiguous: the MN-major, transposed B of wgmma) in shared memory with the 128-byte
// swizzle, copied by cp.async, STAGES steps deep. Each k16 slice's two wgmma form one commit group; before a slice's
// fragment registers are rebuilt, the group that read them (the same slice, one step earlier) is waited for, so the
// construction of slice s overlaps the products of the three slices before it.

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;

constexpr int D = 64, E = 64, BF = 16, NB = D / BF, FB = BF * BF, NPAIRS = NB * (NB + 1) / 2, DT = NPAIRS * FB;
constexpr int STEP = 64;            // keys per step
constexpr int THREADS = 256;
constexpr int STAGES = 4;           // copy stages (a stage is reused once the products of two steps before are done)
constexpr int KROW = 24;            // K row stride in shared memory (bf16): 48 bytes put ldmatrix's 8 rows on all banks
#ifndef PROBE_MIN_BLOCKS            // programs per multiprocessor the registers are capped for
#define PROBE_MIN_BLOCKS 2
#endif
#ifndef PROBE_V_LBO                 // descriptor of V (MN-major): byte offsets between atoms along e and along keys
#define PROBE_V_LBO 16
#endif
#ifndef PROBE_V_SBO
#define PROBE_V_SBO 1024
#endif

struct __align__(1024) Stage {
  bf16_t v[STEP * E];               // key row t at 128 t bytes, its 16-byte chunk j at chunk j ^ (t % 8)
  bf16_t ki[STEP * KROW];           // k_I of key t at row t
  bf16_t kj[STEP * KROW];
};

__device__ __forceinline__ u32 mul_bf16x2(u32 x, u32 y) {  // exact product rounded once to bf16, per half
  u32 out;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(out) : "r"(x), "r"(y));
  return out;
}

__device__ __forceinline__ u32 smem_address(const void* p) { return static_cast<u32>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void copy16(void* dst, const void* src, bool ok) {  // zero-filled when not ok
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src), "r"(ok ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

__device__ __forceinline__ void ldmatrix_x2_trans(u32 (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(row)));
}

// Shared-memory matrix descriptor, 128-byte swizzle: lbo and sbo the byte offsets between core-matrix groups.
__device__ __forceinline__ u64 smem_descriptor(const void* tile, u32 lbo, u32 sbo) {
  return ((smem_address(tile) & 0x3FFFF) >> 4) | (static_cast<u64>(lbo >> 4) << 16) |
         (static_cast<u64>(sbo >> 4) << 32) | (static_cast<u64>(1) << 62);
}

// d = A B + (accumulate ? d : 0), A (64 x 16) from registers, B (16 x 64) from shared memory; trans_b = 1: B is
// MN-major
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], const u32 (&a)[4], u64 b_desc, int accumulate = 1) {
  asm volatile(
      "{\n"
      ".reg .pred accumulate;\n"
      "setp.ne.b32 accumulate, %38, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, accumulate, 1, 1, %37;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "n"(TRANS_B), "r"(accumulate));
}

template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// One step's keys [start, start + STEP) clipped to [.., last): V rows, and blocks I and J of K, 3 copies per thread.
__device__ __forceinline__ void stage_step(Stage& st, const bf16_t* k_head, const bf16_t* v_head, int start, int last,
                                           int blk_i, int blk_j, int tid) {
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    const int idx = tid + n * THREADS, t = idx / 8, j = idx % 8, key = start + t;
    const bool ok = key < last;
    copy16(st.v + t * E + (j ^ (t % 8)) * 8, v_head + static_cast<long long>(ok ? key : start) * E + j * 8, ok);
  }
  const int t = tid / 4, part = tid % 4, key = start + t;
  const bool ok = key < last;
  bf16_t* dst = (part < 2 ? st.ki : st.kj) + t * KROW + (part % 2) * 8;
  const int column = (part < 2 ? blk_i : blk_j) * BF + (part % 2) * 8;
  copy16(dst, k_head + static_cast<long long>(ok ? key : start) * D + column, ok);
}

extern "C" __global__ void __launch_bounds__(THREADS, PROBE_MIN_BLOCKS)
state_probe(const bf16_t* __restrict__ K, const bf16_t* __restrict__ V, float* __restrict__ S, int T, int n_chunks,
            int chunk) {
  extern __shared__ unsigned char smem_raw[];   // STAGES stages + 1024 bytes to align them by hand
  Stage* stages = reinterpret_cast<Stage*>((reinterpret_cast<unsigned long long>(smem_raw) + 1023) & ~1023ull);

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

  const int first = c * chunk, last = min(first + chunk, T), n_steps = (last - first + STEP - 1) / STEP;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (i < n_steps) stage_step(stages[i], k_head, v_head, first + i * STEP, last, blk_i, blk_j, tid);
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  }
  // ldmatrix rows of this lane: K_J's 4 matrices (keys 0-7 | 8-15) x (coordinates 0-7 | 8-15); K_I's 2 matrices
  // (keys 0-7 | 8-15) x the 8 coordinates of this warpgroup's a
  const int kj_row = (lane % 8) + 8 * (lane / 16), kj_col = 8 * ((lane / 8) % 2);
  const int ki_row = (lane % 8) + 8 * ((lane / 8) % 2), ki_col = 8 * group;
  u32 frag[4][2][4];                                                     // [slice][tile][register]
  for (int i = 0; i < n_steps; ++i) {
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();                   // step i is staged; every warpgroup is done with step i - 2's stage
    if (i + 2 < n_steps) stage_step(stages[(i + 2) % STAGES], k_head, v_head, first + (i + 2) * STEP, last, blk_i, blk_j, tid);
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    const Stage& st = stages[i % STAGES];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      u32 kj[4], ki[2];
      ldmatrix_x4_trans(kj, st.kj + (16 * s + kj_row) * KROW + kj_col);
      ldmatrix_x2_trans(ki, st.ki + (16 * s + ki_row) * KROW + ki_col);
      wgmma_wait<3>();                 // slice s of the step before, which read frag[s], is done
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        const int source = 4 * (4 * m + w) + q;                          // the lane holding coordinate a's key pairs
        const u32 lo = __shfl_sync(0xffffffffu, ki[0], source), hi = __shfl_sync(0xffffffffu, ki[1], source);
        frag[s][m][0] = mul_bf16x2(lo, kj[0]);
        frag[s][m][1] = mul_bf16x2(lo, kj[1]);
        frag[s][m][2] = mul_bf16x2(hi, kj[2]);
        frag[s][m][3] = mul_bf16x2(hi, kj[3]);
      }
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
      const u64 desc = smem_descriptor(st.v + 16 * s * E, PROBE_V_LBO, PROBE_V_SBO);
#pragma unroll
      for (int m = 0; m < 2; ++m) wgmma_m64n64k16<1>(acc[m], frag[s][m], desc);
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    }
  }
  wgmma_wait<0>();

  // D fragment: register 4 j + {0, 1} is row g, columns 8 j + 2 q + {0, 1}; 4 j + {2, 3} is row g + 8
  float* out = S + ((static_cast<long long>(h) * n_chunks + c) * DT + p * FB) * E;
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const int row0 = 128 * group + 64 * m + 16 * w + g;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int col = 8 * j + 2 * q;
      *reinterpret_cast<float2*>(out + row0 * E + col) = make_float2(acc[m][4 * j], acc[m][4 * j + 1]);
      *reinterpret_cast<float2*>(out + (row0 + 8) * E + col) = make_float2(acc[m][4 * j + 2], acc[m][4 * j + 3]);
    }
  }
}

// The query side of the same product: Y[h, t, :] = sum over pairs p and features (a, b) of
// q_t[16 I + a] q_t[16 J + b] S[h, c(t), p * 256 + 16 a + b, :], with c(t) = t / chunk (no decay, no intra-chunk part).
// Program (query block of 128 rows, h): 2 warpgroups of 64 rows, the block's q rows staged once in shared memory.
// A pipeline step is half a pair: 128 features x 64 values of S_c as stored (the MN-major B of wgmma, 128-byte
// swizzle), copied by cp.async, QSTAGES steps deep. Its k16 slice s is the coordinate a = 8 half + s of block I, so
// the A fragment of rows (queries) g, g + 8 and columns b = 2 q + {0, 1, 8, 9} is q_{I a} q_{J b}: the q_J pairs of
// the thread's two rows are packed bf16x2 as loaded, q_{I a} is broadcast into both halves, and 4 packed multiplies
// make the fragment. One commit group per slice; QIN_FLIGHT fragment sets rotate.
constexpr int QROWS = 128;
constexpr int QSTAGES = 4;
constexpr int QIN_FLIGHT = 4;
constexpr int QKROW = D + 8;                          // staged q row (bf16), padded 16 bytes

struct __align__(1024) QueryShared {
  bf16_t s[QSTAGES][128 * E];                         // feature row f at 128 f bytes, chunk j at j ^ (f % 8)
  bf16_t q[QROWS * QKROW];
};

__device__ __forceinline__ void stage_half_pair(bf16_t* dst, const bf16_t* s_chunk, int step, int tid) {
  const bf16_t* src = s_chunk + static_cast<long long>(step) * 128 * E;  // features [128 step, +128): half a pair
#pragma unroll
  for (int n = 0; n < 4; ++n) {
    const int idx = tid + n * THREADS, f = idx / 8, j = idx % 8;
    copy16(dst + f * E + (j ^ (f % 8)) * 8, src + f * E + j * 8, true);
  }
}

extern "C" __global__ void __launch_bounds__(THREADS, 2)
query_probe(const bf16_t* __restrict__ Q, const bf16_t* __restrict__ S, float* __restrict__ Y, int T, int n_chunks,
            int chunk) {
  extern __shared__ unsigned char smem_raw[];   // QueryShared + 1024 bytes to align it by hand
  QueryShared& sm = *reinterpret_cast<QueryShared*>((reinterpret_cast<unsigned long long>(smem_raw) + 1023) & ~1023ull);
  const int h = blockIdx.y, first_row = blockIdx.x * QROWS, c = first_row / chunk;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, group = warp / 4, w = warp % 4;
  const int g = lane / 4, q = lane % 4;
  const bf16_t* q_head = Q + static_cast<long long>(h) * T * D;
  const bf16_t* s_chunk = S + (static_cast<long long>(h) * n_chunks + c) * DT * E;
  constexpr int STEPS = 2 * NPAIRS;

  for (int i = tid; i < QROWS * D / 8; i += THREADS) {  // the block's q rows (zero past T)
    const int r = i / (D / 8), j = i % (D / 8), row = first_row + r;
    copy16(sm.q + r * QKROW + j * 8, q_head + static_cast<long long>(row < T ? row : 0) * D + j * 8, row < T);
  }
#pragma unroll
  for (int i = 0; i < QSTAGES - 2; ++i) {
    stage_half_pair(sm.s[i], s_chunk, i, tid);
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  }
  float acc[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.f;
  const int r0 = 64 * group + 16 * w + g;             // this thread's rows r0, r0 + 8 of the block
  u32 frag[QIN_FLIGHT][4];
  for (int step = 0; step < STEPS; ++step) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(QSTAGES - 3) : "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    if (step + QSTAGES - 2 < STEPS) stage_half_pair(sm.s[(step + QSTAGES - 2) % QSTAGES], s_chunk, step + QSTAGES - 2, tid);
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    const int pair = step / 2, half = step % 2;
    const int delta = pair / NB, blk_i = pair % NB, blk_j = (blk_i + delta) % NB;
    // q_J pairs (b = 2q, 2q + 1 and 2q + 8, 2q + 9) of rows r0, r0 + 8; q_I coordinates 8 half .. + 7 of both rows
    const bf16_t* row_lo = sm.q + r0 * QKROW;
    const bf16_t* row_hi = row_lo + 8 * QKROW;
    const u32 qj[4] = {*reinterpret_cast<const u32*>(row_lo + blk_j * BF + 2 * q),
                       *reinterpret_cast<const u32*>(row_hi + blk_j * BF + 2 * q),
                       *reinterpret_cast<const u32*>(row_lo + blk_j * BF + 2 * q + 8),
                       *reinterpret_cast<const u32*>(row_hi + blk_j * BF + 2 * q + 8)};
    const uint4 qi_lo = *reinterpret_cast<const uint4*>(row_lo + blk_i * BF + 8 * half);
    const uint4 qi_hi = *reinterpret_cast<const uint4*>(row_hi + blk_i * BF + 8 * half);
    const u32 lo_words[4] = {qi_lo.x, qi_lo.y, qi_lo.z, qi_lo.w}, hi_words[4] = {qi_hi.x, qi_hi.y, qi_hi.z, qi_hi.w};
    const bf16_t* st = sm.s[step % QSTAGES];
#pragma unroll
    for (int sl = 0; sl < 8; ++sl) {
      const u32 sel = sl % 2 ? 0x3232u : 0x1010u;      // broadcast the low or high bf16 of the word into both halves
      u32 a_lo, a_hi;
      asm("prmt.b32 %0, %1, 0, %2;" : "=r"(a_lo) : "r"(lo_words[sl / 2]), "r"(sel));
      asm("prmt.b32 %0, %1, 0, %2;" : "=r"(a_hi) : "r"(hi_words[sl / 2]), "r"(sel));
      asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(QIN_FLIGHT - 1) : "memory");
      u32 (&f)[4] = frag[sl % QIN_FLIGHT];
      f[0] = mul_bf16x2(a_lo, qj[0]);
      f[1] = mul_bf16x2(a_hi, qj[1]);
      f[2] = mul_bf16x2(a_lo, qj[2]);
      f[3] = mul_bf16x2(a_hi, qj[3]);
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
      wgmma_m64n64k16<1>(acc, f, smem_descriptor(st + 16 * sl * E, 16, 1024));
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    }
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  const int rows[2] = {first_row + r0, first_row + r0 + 8};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= T) continue;
    float* out = Y + (static_cast<long long>(h) * T + rows[r]) * E;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      *reinterpret_cast<float2*>(out + 8 * j + 2 * q) = make_float2(acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1]);
  }
}

// The state term of dq, the backward's third product (no gate, no intra-chunk part, no 1/denominator):
//
//     G_t = S_c(t) dN_t  (Dt features),   dq_t[16 I + a] += sum_b G_t[p, a, b] q_t[16 J + b],
//                                         dq_t[16 J + b] += sum_a G_t[p, a, b] q_t[16 I + a]   for every pair p = (I, J)
//
// Program (query block of 128 rows, h): 2 warpgroups of 64 rows. G comes out of wgmma m64n64k16 with both operands in
// shared memory: A = the block's dN rows (K-major, staged once), B = a quarter pair of S_c (64 features x 64 values,
// K-major as stored), cp.async DQ_STAGES steps deep. After each quarter pair, its 64 x 64 G tile is contracted with q in
// registers: lane q of a quad owns coordinates {2q, 2q+1, 2q+8, 2q+9} of every 16-block of its rows g, g + 8, so the J
// side sums over the tile's 4 coordinates a locally and the I side sums over b across the quad (2 shuffles). The 40
// quarter pairs are unrolled, so dq's 32 registers per thread are indexed statically. DQ_DOUBLE = 1 keeps two
// accumulator tiles, so a quarter pair's products run while the one before is contracted.
#ifndef DQ_DOUBLE
#define DQ_DOUBLE 1
#endif
#ifndef DQ_MIN_BLOCKS                                 // programs per multiprocessor the registers are capped for
#define DQ_MIN_BLOCKS 2
#endif
constexpr int DQ_STAGES = 4;
constexpr int DQ_STEPS = 4 * NPAIRS;                  // quarter pairs: 4 coordinates a of block I x 16 of block J
constexpr int DQ_QROW = D + 8;                        // staged q row (bf16), padded 16 bytes

struct __align__(1024) DqShared {
  bf16_t s[DQ_STAGES][64 * E];                        // feature row f at 128 f bytes, chunk j at j ^ (f % 8)
  bf16_t dn[QROWS * E];                               // dN row r at 128 r bytes, swizzled the same way
  bf16_t q[QROWS * DQ_QROW];
};

// d = A B + (accumulate ? d : 0), both from shared memory, K-major (no transpose)
__device__ __forceinline__ void wgmma_ss_m64n64k16(float (&d)[32], u64 a_desc, u64 b_desc, int accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred accumulate;\n"
      "setp.ne.b32 accumulate, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, accumulate, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a_desc), "l"(b_desc), "r"(accumulate));
}

__device__ __forceinline__ void stage_quarter_pair(bf16_t* dst, const bf16_t* s_chunk, int step, int tid) {
  const bf16_t* src = s_chunk + static_cast<long long>(step) * 64 * E;  // features [64 step, +64)
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    const int idx = tid + n * THREADS, f = idx / 8, j = idx % 8;
    copy16(dst + f * E + (j ^ (f % 8)) * 8, src + f * E + j * 8, true);
  }
}

__device__ __forceinline__ float bf16_at(const bf16_t* row, int col) {
  return __uint_as_float(static_cast<u32>(row[col]) << 16);
}

// Contract one quarter pair's G tile (rows g, g + 8 of this warp; columns 8 j + 2q + {0, 1} = features 16 a + b with
// a = 4 quarter + j / 2, b = 8 (j % 2) + 2q + {0, 1}) with q into dq.
template <int STEP>
__device__ __forceinline__ void contract(float (&dq)[2][16], const float (&gt)[32], const bf16_t* row_lo, int q) {
  constexpr int pair = STEP / 4, quarter = STEP % 4;
  constexpr int delta = pair / NB, blk_i = pair % NB, blk_j = (blk_i + delta) % NB;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bf16_t* row = row_lo + r * 8 * DQ_QROW;
    float qj[4], qi[4], ti[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      qj[k] = bf16_at(row, blk_j * BF + 2 * q + (k % 2) + 8 * (k / 2));  // b of slot k
      qi[k] = bf16_at(row, blk_i * BF + 4 * quarter + k);               // a = 4 quarter + k
      ti[k] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float v0 = gt[4 * j + 2 * r], v1 = gt[4 * j + 2 * r + 1];
      const int a = j / 2, slot = 2 * (j % 2);            // b = 8 (j % 2) + 2q + {0, 1}: slots 2 (j % 2) + {0, 1}
      dq[r][4 * blk_j + slot] += v0 * qi[a];
      dq[r][4 * blk_j + slot + 1] += v1 * qi[a];
      ti[a] += v0 * qj[slot] + v1 * qj[slot + 1];
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      ti[k] += __shfl_xor_sync(0xffffffffu, ti[k], 1);
      ti[k] += __shfl_xor_sync(0xffffffffu, ti[k], 2);
    }
    // coordinate a = 4 quarter + k of block I belongs to lane (a % 8) / 2, slot (a % 2) + 2 (a / 8)
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int a = 4 * quarter + k;
      if (q == (a % 8) / 2) dq[r][4 * blk_i + (a % 2) + 2 * (a / 8)] += ti[k];
    }
  }
}

template <int STEP>
__device__ __forceinline__ void dq_step(DqShared& sm, const bf16_t* s_chunk, float (&gt)[2][32], float (&dq)[2][16],
                                        const bf16_t* row_lo, u64 a_desc, u64 s_desc, int tid, int q) {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(DQ_STAGES - 3) : "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  if (STEP + DQ_STAGES - 2 < DQ_STEPS) stage_quarter_pair(sm.s[(STEP + DQ_STAGES - 2) % DQ_STAGES], s_chunk, STEP + DQ_STAGES - 2, tid);
  asm volatile("cp.async.commit_group;\n" ::: "memory");
  float (&tile)[32] = gt[DQ_DOUBLE ? STEP % 2 : 0];
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  const u64 b_desc = s_desc + (STEP % DQ_STAGES) * (64 * E * 2 / 16);  // the stage, in 16-byte units
#pragma unroll
  for (int s = 0; s < 4; ++s) wgmma_ss_m64n64k16(tile, a_desc + 2 * s, b_desc + 2 * s, s);
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  if (DQ_DOUBLE && STEP > 0) {                        // contract the quarter pair before while this one runs
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
    contract<(STEP > 0 ? STEP - 1 : 0)>(dq, gt[(STEP + 1) % 2], row_lo, q);
  }
  if (!DQ_DOUBLE) {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    contract<STEP>(dq, tile, row_lo, q);
  }
}

template <int STEP>  // steps STEP .. DQ_STEPS - 1, unrolled (no standard library under NVRTC)
__device__ __forceinline__ void dq_steps(DqShared& sm, const bf16_t* s_chunk, float (&gt)[2][32], float (&dq)[2][16],
                                         const bf16_t* row_lo, u64 a_desc, u64 s_desc, int tid, int q) {
  if constexpr (STEP < DQ_STEPS) {
    dq_step<STEP>(sm, s_chunk, gt, dq, row_lo, a_desc, s_desc, tid, q);
    dq_steps<STEP + 1>(sm, s_chunk, gt, dq, row_lo, a_desc, s_desc, tid, q);
  }
}

extern "C" __global__ void __launch_bounds__(THREADS, DQ_MIN_BLOCKS)
dq_probe(const bf16_t* __restrict__ Q, const bf16_t* __restrict__ DN, const bf16_t* __restrict__ S,
         float* __restrict__ DQ, int T, int n_chunks, int chunk) {
  extern __shared__ unsigned char smem_raw[];   // DqShared + 1024 bytes to align it by hand
  DqShared& sm = *reinterpret_cast<DqShared*>((reinterpret_cast<unsigned long long>(smem_raw) + 1023) & ~1023ull);
  const int h = blockIdx.y, first_row = blockIdx.x * QROWS, c = first_row / chunk;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, group = warp / 4, w = warp % 4;
  const int g = lane / 4, q = lane % 4;
  const bf16_t* q_head = Q + static_cast<long long>(h) * T * D;
  const bf16_t* dn_head = DN + static_cast<long long>(h) * T * E;
  const bf16_t* s_chunk = S + (static_cast<long long>(h) * n_chunks + c) * DT * E;

  for (int i = tid; i < QROWS * 8; i += THREADS) {  // the block's q and dN rows (zero past T); dN swizzled
    const int r = i / 8, j = i % 8, row = first_row + r;
    const long long at = static_cast<long long>(row < T ? row : 0);
    copy16(sm.q + r * DQ_QROW + j * 8, q_head + at * D + j * 8, row < T);
    copy16(sm.dn + r * E + (j ^ (r % 8)) * 8, dn_head + at * E + j * 8, row < T);
  }
#pragma unroll
  for (int i = 0; i < DQ_STAGES - 2; ++i) {
    stage_quarter_pair(sm.s[i], s_chunk, i, tid);
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  }
  float gt[2][32], dq[2][16];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int i = 0; i < 16; ++i) dq[r][i] = 0.f;
  const int r0 = 64 * group + 16 * w + g;             // this thread's rows r0, r0 + 8 of the block
  const u64 a_desc = smem_descriptor(sm.dn + 64 * group * E, 16, 1024);  // + 2 per k16 slice (32 bytes)
  const u64 s_desc = smem_descriptor(sm.s[0], 16, 1024);  // stage 0; + 2 per k16 slice (32 bytes)
  dq_steps<0>(sm, s_chunk, gt, dq, sm.q + r0 * DQ_QROW, a_desc, s_desc, tid, q);
  if (DQ_DOUBLE) {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    contract<DQ_STEPS - 1>(dq, gt[(DQ_STEPS - 1) % 2], sm.q + r0 * DQ_QROW, q);
  }
  // dq[r][4 blk + k]: coordinate 16 blk + 2q + (k % 2) + 8 (k / 2) of row r0 + 8 r
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = first_row + r0 + 8 * r;
    if (row >= T) continue;
    float* out = DQ + (static_cast<long long>(h) * T + row) * D;
#pragma unroll
    for (int blk = 0; blk < NB; ++blk) {
      *reinterpret_cast<float2*>(out + 16 * blk + 2 * q) = make_float2(dq[r][4 * blk], dq[r][4 * blk + 1]);
      *reinterpret_cast<float2*>(out + 16 * blk + 2 * q + 8) = make_float2(dq[r][4 * blk + 2], dq[r][4 * blk + 3]);
    }
  }
}

// The intra-chunk part of the query kernel (causal, no gate, deg 2, no state term), the product a query kernel on
// wgmma would run beside phi(q) S_c (forward_notes.md, session 25):
//
//     y_t = sum over keys j of chunk(t) with j <= t of w_tj v_j / (sum_j w_tj + 1e-6),   w_tj = bf16((s q_t . k_j)^2)
//
// Program (query block of 128 rows, h), the blocks launched longest first (every chunk's last block, then the
// blocks before it): 2 warpgroups of 64 rows. Per step of 64 keys, from the chunk's start to the block's last row,
// X = Q K^T on wgmma with both operands in shared memory (the block's q rows staged once, the step's k rows by
// cp.async INTRA_AHEAD steps ahead; both K-major with the 128-byte swizzle). w = (s x)^2 in registers, zero above
// the diagonal in the steps that reach the block's own rows, rounded to bf16 and summed into the denominator, is
// repacked as the A fragments of acc += w V: the accumulator of m64n64 holds, per thread, rows g and g + 8 at
// columns 8 j + 2q + {0, 1}, which are the A fragment's (row, k) pairs of k16 slice s for j = 2s, 2s + 1. V is read
// as stored (the MN-major B), the way the state probe reads it. INTRA_LOOKAHEAD = 1 issues the next step's X (into a
// second accumulator) before this step's w V, so the two products run together; 0 waits for each product in turn.
#ifndef INTRA_LOOKAHEAD
#define INTRA_LOOKAHEAD 1
#endif
#ifndef INTRA_MIN_BLOCKS                              // programs per multiprocessor the registers are capped for
#define INTRA_MIN_BLOCKS 1
#endif
constexpr int INTRA_STAGES = 4;
constexpr int INTRA_AHEAD = 2;                        // a stage is refilled two steps after its products were issued

struct __align__(1024) IntraShared {
  bf16_t k[INTRA_STAGES][STEP * D];                   // key row t at 128 t bytes, chunk j at j ^ (t % 8)
  bf16_t v[INTRA_STAGES][STEP * E];                   // the same
  bf16_t q[QROWS * D];                                // query row r at 128 r bytes, swizzled the same way
};

// d = A B (the first k16 slice of a product), both from shared memory, K-major: d is written only, so the registers
// of the tile it replaces are free before it runs (the accumulating form reads them)
__device__ __forceinline__ void wgmma_ss_m64n64k16_first(float (&d)[32], u64 a_desc, u64 b_desc) {
  asm volatile(
      "{\n"
      ".reg .pred accumulate;\n"
      "setp.ne.b32 accumulate, 0, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, accumulate, 1, 1, 0, 0;\n"
      "}\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]),
        "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]),
        "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]),
        "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31])
      : "l"(a_desc), "l"(b_desc));
}

__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {  // rounded to nearest even, lo in the low half
  u32 out;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(out) : "f"(hi), "f"(lo));
  return out;
}

// What one program works on: its rows, its keys' steps, and the head's rows of q, k and v.
struct IntraBlock {
  int chunk_start, first_row, steps, diagonal_from;
  const bf16_t* q_head;
  const bf16_t* k_head;
  const bf16_t* v_head;
};

__device__ __forceinline__ void stage_keys(IntraShared& sm, const IntraBlock& ib, int step, int tid) {
  const int slot = step % INTRA_STAGES, start = ib.chunk_start + step * STEP;
#pragma unroll
  for (int n = 0; n < STEP * 8 / THREADS; ++n) {
    const int idx = tid + n * THREADS, t = idx / 8, j = idx % 8;
    const long long key = start + t;
    copy16(sm.k[slot] + t * D + (j ^ (t % 8)) * 8, ib.k_head + key * D + j * 8, true);
    copy16(sm.v[slot] + t * E + (j ^ (t % 8)) * 8, ib.v_head + key * E + j * 8, true);
  }
}

// Wait for the keys of ``step``, refill the stage of step - 2 with those of step + INTRA_AHEAD (every warpgroup past
// the barrier has waited for the products of step - 1, and so of step - 2), then issue X = Q K^T of ``step`` into x.
__device__ __forceinline__ void issue_scores(IntraShared& sm, const IntraBlock& ib, int step, float (&x)[32],
                                             u64 q_desc, int tid) {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(INTRA_AHEAD - 1) : "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  if (step + INTRA_AHEAD < ib.steps) stage_keys(sm, ib, step + INTRA_AHEAD, tid);
  asm volatile("cp.async.commit_group;\n" ::: "memory");
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  const u64 k_desc = smem_descriptor(sm.k[step % INTRA_STAGES], 16, 1024);
  wgmma_ss_m64n64k16_first(x, q_desc, k_desc);
#pragma unroll
  for (int s = 1; s < 4; ++s) wgmma_ss_m64n64k16(x, q_desc + 2 * s, k_desc + 2 * s, 1);
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// w = (s x)^2 of the thread's rows r0, r0 + 8 (registers 4 j + 2 half + {0, 1}: row r0 + 8 half, keys 8 j + 2q +
// {0, 1} of the step), masked, rounded, summed into den and packed as the A fragments of the step's 4 k16 slices.
__device__ __forceinline__ void weights(const IntraBlock& ib, int step, const float (&x)[32], float scale, int r0,
                                        int q, float (&den)[2], u32 (&frag)[4][4]) {
  const bool diagonal = step >= ib.diagonal_from;
  const int key0 = ib.chunk_start + step * STEP + 2 * q;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = ib.first_row + r0 + 8 * half, key = key0 + 8 * j;
      const float s0 = scale * x[4 * j + 2 * half], s1 = scale * x[4 * j + 2 * half + 1];
      const float w0 = diagonal && key > row ? 0.f : s0 * s0, w1 = diagonal && key + 1 > row ? 0.f : s1 * s1;
      const u32 packed = pack_bf16x2(w0, w1);
      den[half] += __uint_as_float(packed << 16) + __uint_as_float(packed & 0xffff0000u);
      frag[j / 2][2 * (j % 2) + half] = packed;       // slice j / 2: rows lo, hi at k 2q (j even), 2q + 8 (j odd)
    }
  }
}

__device__ __forceinline__ void issue_values(IntraShared& sm, int step, float (&acc)[32], const u32 (&frag)[4][4]) {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
  for (int s = 0; s < 4; ++s) {  // keys 16 s .. 16 s + 15 of the step
    const u64 v_desc = smem_descriptor(sm.v[step % INTRA_STAGES] + 16 * s * E, PROBE_V_LBO, PROBE_V_SBO);
    wgmma_m64n64k16<1>(acc, frag[s], v_desc, step > 0 || s > 0);  // the first product replaces acc (no zero fill)
  }
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// Step ``step`` with its X in x_now (issued): wait for it, build w, issue the next step's X into x_next (look-ahead),
// then this step's w V.
__device__ __forceinline__ void intra_step(IntraShared& sm, const IntraBlock& ib, int step, float (&x_now)[32],
                                           float (&x_next)[32], float (&acc)[32], float (&den)[2], u32 (&frag)[4][4],
                                           u64 q_desc, float scale, int r0, int q, int tid) {
  wgmma_wait<0>();  // X of this step and w V of the step before (whose fragments are rebuilt now)
  weights(ib, step, x_now, scale, r0, q, den, frag);
  if (INTRA_LOOKAHEAD && step + 1 < ib.steps) issue_scores(sm, ib, step + 1, x_next, q_desc, tid);
  issue_values(sm, step, acc, frag);
  if (!INTRA_LOOKAHEAD && step + 1 < ib.steps) {
    wgmma_wait<0>();
    issue_scores(sm, ib, step + 1, x_next, q_desc, tid);
  }
}

extern "C" __global__ void __launch_bounds__(THREADS, INTRA_MIN_BLOCKS)
intra_probe(const bf16_t* __restrict__ Q, const bf16_t* __restrict__ K, const bf16_t* __restrict__ V,
            float* __restrict__ Y, int T, int chunk, float scale) {
  extern __shared__ unsigned char smem_raw[];   // IntraShared + 1024 bytes to align it by hand
  IntraShared& sm = *reinterpret_cast<IntraShared*>((reinterpret_cast<unsigned long long>(smem_raw) + 1023) & ~1023ull);
  const int n_chunks = T / chunk, per_chunk = chunk / QROWS;
  const int block = per_chunk - 1 - static_cast<int>(blockIdx.x) / n_chunks, c = blockIdx.x % n_chunks;
  const int h = blockIdx.y, tid = threadIdx.x, lane = tid % 32, warp = tid / 32, group = warp / 4, w = warp % 4;
  const int g = lane / 4, q = lane % 4;
  IntraBlock ib;
  ib.chunk_start = c * chunk;
  ib.first_row = ib.chunk_start + block * QROWS;
  ib.steps = (block + 1) * QROWS / STEP;
  ib.diagonal_from = block * QROWS / STEP;
  ib.q_head = Q + static_cast<long long>(h) * T * D;
  ib.k_head = K + static_cast<long long>(h) * T * D;
  ib.v_head = V + static_cast<long long>(h) * T * E;

  for (int i = tid; i < QROWS * 8; i += THREADS) {  // the block's q rows, in the first commit group
    const int r = i / 8, j = i % 8;
    copy16(sm.q + r * D + (j ^ (r % 8)) * 8, ib.q_head + static_cast<long long>(ib.first_row + r) * D + j * 8, true);
  }
#pragma unroll
  for (int s = 0; s < INTRA_AHEAD; ++s) {  // steps 0 .. INTRA_AHEAD - 1 (every block has at least 2 steps)
    stage_keys(sm, ib, s, tid);
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  }
  float acc[32], x0[32], x1[32], den[2] = {0.f, 0.f};  // acc: set by the first w V product
  u32 frag[4][4];
  const int r0 = 64 * group + 16 * w + g;             // this thread's rows r0, r0 + 8 of the block
  const u64 q_desc = smem_descriptor(sm.q + 64 * group * D, 16, 1024);  // + 2 per k16 slice (32 bytes)
  issue_scores(sm, ib, 0, x0, q_desc, tid);
  for (int step = 0; step < ib.steps; step += 2) {  // an even count: the two score tiles alternate statically
    intra_step(sm, ib, step, x0, x1, acc, den, frag, q_desc, scale, r0, q, tid);
    intra_step(sm, ib, step + 1, x1, x0, acc, den, frag, q_desc, scale, r0, q, tid);
  }
  wgmma_wait<0>();
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    den[half] += __shfl_xor_sync(0xffffffffu, den[half], 1);
    den[half] += __shfl_xor_sync(0xffffffffu, den[half], 2);
    const float inv = 1.f / (den[half] + 1e-6f);
    float* out = Y + (static_cast<long long>(h) * T + ib.first_row + r0 + 8 * half) * E;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      *reinterpret_cast<float2*>(out + 8 * j + 2 * q) =
          make_float2(acc[4 * j + 2 * half] * inv, acc[4 * j + 2 * half + 1] * inv);
    }
  }
}
