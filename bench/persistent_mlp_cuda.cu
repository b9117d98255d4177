// Probe (bench/persistent_mlp_cuda.py): the batch-1 decode MLP as one persistent kernel,
// y = W2 act(W1 x [+ b1]), with a grid-wide wait for h between the two projections that does not stop
// the weight stream.
// Measured on an H200 (bench/NOTES-perf.md, tenth and twelfth sessions): correct and repeatable. The first
// form was 10% slower than the engine's two Triton kernels. With the ring filled before the wait for the
// kernel before (PDL), the dot products on tensor cores, each stage handed back once in registers and the
// add+norm before it folded in, it is 8% under them at OPT (21.7 vs 23.6 us) and 3% at Llama: too little
// for a JIT-built extension in the engine, which does not use it.
//
// Why: as two kernels (dejavu/model/fused.py) each projection pays its own ramp and tail, and nothing is
// read from DRAM between them. Here one CTA per SM runs a producer warp that keeps a ring of 16 KB
// shared-memory stages filled with bulk copies (cp.async.bulk, completion counted by an mbarrier), in
// weight order: this CTA's fc_in rows, then its fc_out rows. fc_out's weights do not depend on h, so while
// the consumer warps wait for the last CTA's h rows, the ring goes on filling with fc_out. Nor do they
// depend on the kernel before: launched early (programmatic dependent launch), the producer fills the
// ring while that kernel finishes, and only the consumers wait for it.
//
// Work: a stage holds whole rows: 4 of fc_in (k1 = 2048) or one of fc_out (k2 = 8192). Consumer warp w
// takes units w, w + CONSUMERS, ... of the CTA's sequence and computes all of a stage's rows against the
// input vector, which sits in shared memory (x, later h), on CUDA cores or tensor cores (TENSOR). No
// cross-warp sum, no float atomics: the result does not depend on timing. act 1: relu(W1 x + b1); act 2:
// SwiGLU, W1 = [gate; up] and a stage holds gate rows i, i + 1 and the same up rows in its two halves.
//
// The ring depth is a multiple of the consumer warps, so each stage is only ever read by one warp, in
// order. Otherwise a warp could wait on a stage's full barrier two uses ahead of the warp before it, and
// mbarrier parity waits cannot tell use k from use k - 2: it would read a stage not yet filled (seen: 10
// stages over 8 warps gave results that changed from call to call).
//
// Every CTA must be resident at once (they wait for each other): one per SM. An early launch cannot
// deadlock on that: the kernel before never waits for this one, so its SMs free up.

#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <cstdint>
#include <type_traits>

namespace {

constexpr int kTileBytes = 16384;
constexpr int kMaxStages = 12;
constexpr int kRows1 = 4;  // fc_in rows a stage holds (k1 = 2048); fc_out's stage is one row (k2 = 8192)

template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
};

__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(bar)));
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void mbar_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// The consumer warps only: the producer warp must never be held at these.
template <int CONSUMERS>
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(CONSUMERS * 32) : "memory");
}

// Programmatic dependent launch: a no-op unless the kernel was launched with the attribute. Only what reads
// the kernel before's output waits; the weight stream does not.
__device__ __forceinline__ void wait_for_kernel_before() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void let_kernel_after_launch() { asm volatile("griddepcontrol.launch_dependents;"); }

// R consecutive rows of a stage (vecs 16-byte vectors each, in shared memory) against the input vector, by
// one warp, in fp32. The input vector is read once per vector for all R rows, and every row keeps four
// independent FMA chains: the warp's latency, not the SM's issue rate, is what limits a consumer.
template <typename T, int R>
__device__ __forceinline__ void rows_dot(const uint4* rows, const uint4* in, int vecs, int lane, float (&out)[R]) {
  using T2 = typename Pair<T>::type;
  float s[R][4] = {};
#pragma unroll 2
  for (int v = lane; v < vecs; v += 32) {
    const uint4 b = in[v];
    const T2* b2 = reinterpret_cast<const T2*>(&b);
    float2 fb[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) fb[i] = to_float2(b2[i]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint4 a = rows[r * vecs + v];
      const T2* a2 = reinterpret_cast<const T2*>(&a);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 fa = to_float2(a2[i]);
        s[r][i] = fmaf(fa.x, fb[i].x, s[r][i]);
        s[r][i] = fmaf(fa.y, fb[i].y, s[r][i]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) out[r] = (s[r][0] + s[r][1]) + (s[r][2] + s[r][3]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
#pragma unroll
    for (int r = 0; r < R; ++r) out[r] += __shfl_xor_sync(0xffffffffu, out[r], o);
}

// The same dot products on tensor cores (mma.m16n8k16, fp32 accumulators), for a warp whose latency per stage
// is what holds the ring. A stage (8192 elements) is read as A = 16 "virtual rows" of 512 elements: fc_in's
// 4 rows of 2048 are virtual rows 4i..4i+3 (input chunk v % 4), fc_out's one row of 8192 is virtual rows
// 0..15 (input chunk v). Column n of B is the input chunk that virtual rows v = n and v = n + 8 need, so the
// useful products are D[v][v % 8] (fc_out: two B, for chunks 0..7 and 8..15). Each virtual row is read with
// its k order rotated by 8 (v % 8) elements, and B's column n with the same rotation: the eight 1 KB-apart
// rows of an 8x8 ldmatrix then fall on different banks. Its error against fp32 equals the CUDA-core form's
// (fp16 and bf16, on the H200).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&a)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(addr)
               : "memory");
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A at k step kk (16 elements of every virtual row): lane l addresses row l % 8 of 8x8 matrix l / 8.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], uint32_t stage, int kk, int lane) {
  const int r = lane & 7, m = lane >> 3, v = r + 8 * (m & 1), kc = 8 * (m >> 1);
  ldmatrix_x4(a, stage + v * 1024 + 2 * ((kk * 16 + kc + 8 * r) & 511));
}

// B's pair of k rows kr, kr + 1 in column g (= lane / 4), from input chunk `chunk` in shared memory.
__device__ __forceinline__ uint32_t b_pair(const uint4* in, int chunk, int kk, int kr, int g) {
  return reinterpret_cast<const uint32_t*>(in)[(chunk * 512 + ((kk * 16 + kr + 8 * g) & 511)) / 2];
}

// fc_in: the stage's 4 rows against x, whose B fragments (bx) every stage shares.
// The whole stage's A fragments into registers (128 a lane). With `early`, the stage is handed back to the
// producer right after, before the math.
__device__ __forceinline__ void load_stage(uint32_t (&a)[32][4], uint32_t stage, int lane, uint64_t* early) {
#pragma unroll
  for (int kk = 0; kk < 32; ++kk) load_a(a[kk], stage, kk, lane);
  if (early) {
    __syncwarp();
    if (lane == 0) mbar_arrive(early);
  }
}

template <typename T>
__device__ __forceinline__ void rows4_mma(uint32_t stage, const uint32_t (&bx)[32][2], int lane, float (&out)[4],
                                          uint64_t* early) {
  uint32_t a[32][4];
  load_stage(a, stage, lane, early);
  float d[4][4] = {};  // four independent accumulator chains
#pragma unroll
  for (int kk = 0; kk < 32; ++kk) mma16816<T>(d[kk & 3], a[kk], bx[kk][0], bx[kk][1]);
  const int g = lane >> 2, t = lane & 3;
  const bool mine = t == g / 2;  // this lane holds D[g][g] and D[g + 8][g]
  float lo = 0.f, hi = 0.f;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    lo += (g & 1) ? d[c][1] : d[c][0];
    hi += (g & 1) ? d[c][3] : d[c][2];
  }
  lo = mine ? lo : 0.f;
  hi = mine ? hi : 0.f;
  out[0] = g < 4 ? lo : 0.f;  // virtual rows 0..3 -> row 0, 4..7 -> 1, 8..11 -> 2, 12..15 -> 3
  out[1] = g < 4 ? 0.f : lo;
  out[2] = g < 4 ? hi : 0.f;
  out[3] = g < 4 ? 0.f : hi;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
#pragma unroll
    for (int r = 0; r < 4; ++r) out[r] += __shfl_xor_sync(0xffffffffu, out[r], o);
}

// fc_out: the stage's one row of 8192 against h in shared memory.
template <typename T>
__device__ __forceinline__ float row1_mma(uint32_t stage, const uint4* hs, int lane, uint64_t* early) {
  const int g = lane >> 2, t = lane & 3;
  uint32_t a[32][4];
  load_stage(a, stage, lane, early);
  float d1[4][4] = {}, d2[4][4] = {};  // four independent chains each
#pragma unroll
  for (int kk = 0; kk < 32; ++kk) {
    mma16816<T>(d1[kk & 3], a[kk], b_pair(hs, g, kk, 2 * t, g), b_pair(hs, g, kk, 2 * t + 8, g));
    mma16816<T>(d2[kk & 3], a[kk], b_pair(hs, g + 8, kk, 2 * t, g), b_pair(hs, g + 8, kk, 2 * t + 8, g));
  }
  float v = 0.f;
#pragma unroll
  for (int c = 0; c < 4; ++c) v += (g & 1) ? d1[c][1] + d2[c][3] : d1[c][0] + d2[c][2];
  v = t == g / 2 ? v : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The residual add and norm before the MLP, folded in (kind 1 LayerNorm, 2 RMSNorm): x is the residual,
// delta the last MLP's output. Every CTA computes the whole norm itself from L2 (2 x 4 KB), which is what a
// megakernel does instead of an add+norm kernel; CTA 0 also stores the new residual x + delta.
template <typename T>
struct Norm {
  int kind;  // 0: x is the MLP's input as given
  const T* delta;
  const T* weight;
  const T* bias;  // LayerNorm only
  T* residual_out;
  float eps;
};

template <int CONSUMERS>
__device__ __forceinline__ float consumers_sum(float v, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  consumers_sync<CONSUMERS>();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < CONSUMERS; ++w) total += scratch[w];
  consumers_sync<CONSUMERS>();  // scratch is free again
  return total;
}

template <typename T, int CONSUMERS>
__device__ __forceinline__ void add_norm(const T* x, const Norm<T>& norm, uint4* xs, int k, float* scratch) {
  using T2 = typename Pair<T>::type;
  constexpr int kPer = 2;  // 16-byte vectors a thread: k = 2048 over 4 warps (asserted on the host)
  float v[kPer][8];
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * CONSUMERS * 32;
    if (i < k / 8) {
      const uint4 a = __ldcg(reinterpret_cast<const uint4*>(x) + i);
      const uint4 b = __ldcg(reinterpret_cast<const uint4*>(norm.delta) + i);
      const T2* a2 = reinterpret_cast<const T2*>(&a);
      const T2* b2 = reinterpret_cast<const T2*>(&b);
      uint4 r;
      T2* r2 = reinterpret_cast<T2*>(&r);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 fa = to_float2(a2[e]), fb = to_float2(b2[e]);
        v[j][2 * e] = round_to<T>(fa.x + fb.x);  // the residual is stored in T, and normalised as stored
        v[j][2 * e + 1] = round_to<T>(fa.y + fb.y);
        r2[e] = T2{from_float<T>(v[j][2 * e]), from_float<T>(v[j][2 * e + 1])};
        sum += v[j][2 * e] + v[j][2 * e + 1];
      }
      if (blockIdx.x == 0) reinterpret_cast<uint4*>(norm.residual_out)[i] = r;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) v[j][e] = 0.f;
    }
  }
  const float mean = norm.kind == 1 ? consumers_sum<CONSUMERS>(sum, scratch) / k : 0.f;
  float sq = 0.f;
#pragma unroll
  for (int j = 0; j < kPer; ++j)
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int i = threadIdx.x + j * CONSUMERS * 32;
      const float c = i < k / 8 ? v[j][e] - mean : 0.f;
      sq += c * c;
    }
  const float rstd = rsqrtf(consumers_sum<CONSUMERS>(sq, scratch) / k + norm.eps);
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * CONSUMERS * 32;
    if (i >= k / 8) continue;
    const uint4 wv = reinterpret_cast<const uint4*>(norm.weight)[i];
    const uint4 bv = norm.kind == 1 ? reinterpret_cast<const uint4*>(norm.bias)[i] : uint4{0, 0, 0, 0};
    const T2* w2 = reinterpret_cast<const T2*>(&wv);
    const T2* b2 = reinterpret_cast<const T2*>(&bv);
    uint4 o;
    T2* o2 = reinterpret_cast<T2*>(&o);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 fw = to_float2(w2[e]), fb = to_float2(b2[e]);
      o2[e] = T2{from_float<T>((v[j][2 * e] - mean) * rstd * fw.x + fb.x),
                 from_float<T>((v[j][2 * e + 1] - mean) * rstd * fw.y + fb.y)};
    }
    xs[i] = o;
  }
}

// Unit t's stage, once its bytes have landed.
__device__ __forceinline__ const uint4* acquire(unsigned char* ring, uint64_t* full, int t, int stages) {
  mbar_wait(&full[t % stages], (t / stages) & 1);
  return reinterpret_cast<const uint4*>(ring + (t % stages) * kTileBytes);
}

// The warp is done reading unit t's stage: the producer may refill it.
__device__ __forceinline__ void release(uint64_t* empty, int t, int stages, int lane) {
  __syncwarp();
  if (lane == 0) mbar_arrive(&empty[t % stages]);
}

// Contiguous share [first, first + count) of n units for this CTA.
__device__ __forceinline__ void share(int n, int& first, int& count) {
  first = (int)((long)blockIdx.x * n / gridDim.x);
  count = (int)((long)(blockIdx.x + 1) * n / gridDim.x) - first;
}

template <typename T, int ACT, int CONSUMERS, bool TENSOR>
__global__ void __launch_bounds__((CONSUMERS + 1) * 32, 1)
    persistent_mlp_kernel(const T* __restrict__ x, const T* __restrict__ w1, const T* __restrict__ b1,
                          T* h, const T* __restrict__ w2, T* __restrict__ y, uint32_t* sync, int n1, int k1,
                          int n2, int k2, int stages, int mode, Norm<T> norm) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) uint64_t full[kMaxStages];
  __shared__ __align__(8) uint64_t empty[kMaxStages];
  __shared__ float reduce_scratch[2 * CONSUMERS];
  unsigned char* ring = smem;
  uint4* xs = reinterpret_cast<uint4*>(smem + stages * kTileBytes);
  uint4* hs = xs + k1 / 8;
  float* bias = reinterpret_cast<float*>(hs + k2 / 8);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int outs1 = ACT == 2 ? kRows1 / 2 : kRows1;
  const int vecs1 = k1 / 8, vecs2 = k2 / 8;
  int first1, count1, first2, count2;
  share(n1 / outs1, first1, count1);
  share(n2, first2, count2);
  const int total = count1 + count2;

  // Before the wait for the kernel before: only what does not depend on it (barriers, weights, biases).
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(&full[s]);
      mbar_init(&empty[s]);
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the copy engine sees the barriers
  }
  if (ACT == 1)
    for (int r = threadIdx.x; r < count1 * outs1; r += blockDim.x) bias[r] = to_float(b1[first1 * outs1 + r]);
  __syncthreads();

  if (warp == CONSUMERS) {  // the producer: stage t % stages gets unit t once its last reader let it go
    if (lane == 0)
      for (int t = 0; t < total; ++t) {
        const int s = t % stages;
        if (t >= stages) mbar_wait(&empty[s], (t / stages - 1) & 1);
        unsigned char* dst = ring + s * kTileBytes;
        mbar_expect(&full[s], kTileBytes);
        if (t >= count1) {
          bulk_copy(dst, w2 + (long)(first2 + t - count1) * k2, kTileBytes, &full[s]);
        } else if (ACT == 2) {  // gate rows, then the same up rows
          const long row = (long)(first1 + t) * outs1;
          bulk_copy(dst, w1 + row * k1, kTileBytes / 2, &full[s]);
          bulk_copy(dst + kTileBytes / 2, w1 + (n1 + row) * k1, kTileBytes / 2, &full[s]);
        } else {
          bulk_copy(dst, w1 + (long)(first1 + t) * kRows1 * k1, kTileBytes, &full[s]);
        }
      }
    return;
  }

  wait_for_kernel_before();  // x, and the grid wait's counters, which the last launch left
  uint32_t generation = 0;
  if (threadIdx.x == 0) generation = load_acquire(sync + 1);
  if (norm.kind) add_norm<T, CONSUMERS>(x, norm, xs, k1, reduce_scratch);
  else
    for (int v = threadIdx.x; v < vecs1; v += CONSUMERS * 32) xs[v] = reinterpret_cast<const uint4*>(x)[v];
  consumers_sync<CONSUMERS>();
  uint32_t bx[32][2];  // x as fc_in's B fragments (tensor cores), the same for every stage
  if (TENSOR)
#pragma unroll
    for (int kk = 0; kk < 32; ++kk) {
      bx[kk][0] = b_pair(xs, (lane >> 2) % 4, kk, 2 * (lane & 3), lane >> 2);
      bx[kk][1] = b_pair(xs, (lane >> 2) % 4, kk, 2 * (lane & 3) + 8, lane >> 2);
    }

  const bool early = TENSOR && mode == 6;  // each stage handed back once it is in registers
  int t = warp;
  for (; t < count1; t += CONSUMERS) {  // fc_in
    const uint4* stage = acquire(ring, full, t, stages);
    if (mode != 2 && mode != 5) {  // 5: fc_out's math only
      float a[kRows1];
      if (TENSOR) rows4_mma<T>(smem_u32(stage), bx, lane, a, early ? &empty[t % stages] : nullptr);
      else rows_dot<T, kRows1>(stage, xs, vecs1, lane, a);
      if (lane == 0)
#pragma unroll
        for (int o = 0; o < outs1; ++o) {
          float out;
          if (ACT == 2) {  // as the reference rounds: gate and up, silu(gate), the product
            const float g = round_to<T>(a[o]);
            out = round_to<T>(g / (1.f + __expf(-g))) * round_to<T>(a[outs1 + o]);
          } else {
            out = fmaxf(a[o] + bias[t * outs1 + o], 0.f);
          }
          if (mode != 3 || out == 12345.f) h[(first1 + t) * outs1 + o] = from_float<T>(out);
        }
    }
    if (!early || mode == 2 || mode == 5) release(empty, t, stages, lane);
  }

  // All of h, from every CTA, before fc_out. The ring keeps filling with fc_out's rows meanwhile.
  consumers_sync<CONSUMERS>();  // this CTA's h rows are stored
  if (threadIdx.x == 0 && mode != 1) {
    __threadfence();
    if (atomicAdd(sync, 1u) == gridDim.x - 1) {
      atomicExch(sync, 0u);
      __threadfence();
      atomicAdd(sync + 1, 1u);
    } else {
      while (load_acquire(sync + 1) == generation) {
      }
    }
  }
  consumers_sync<CONSUMERS>();
  let_kernel_after_launch();  // the add+norm after may be resident beside this CTA while fc_out streams
  for (int v = threadIdx.x; v < vecs2; v += CONSUMERS * 32) hs[v] = __ldcg(reinterpret_cast<const uint4*>(h) + v);
  consumers_sync<CONSUMERS>();

  for (; t < total; t += CONSUMERS) {  // fc_out
    const uint4* stage = acquire(ring, full, t, stages);
    if (mode != 2 && mode != 4) {  // 4: fc_in's math only
      float a[1];
      if (TENSOR) a[0] = row1_mma<T>(smem_u32(stage), hs, lane, early ? &empty[t % stages] : nullptr);
      else rows_dot<T, 1>(stage, hs, vecs2, lane, a);
      if (lane == 0 && (mode != 3 || a[0] == 12345.f)) y[first2 + t - count1] = from_float<T>(a[0]);
    }
    if (!early || mode == 2 || mode == 4) release(empty, t, stages, lane);
  }
}

template <typename T, int ACT, int CONSUMERS, bool TENSOR>
void launch(const at::Tensor& x, const at::Tensor& w1, const at::Tensor* b1, const at::Tensor& w2,
            at::Tensor& h, at::Tensor& y, at::Tensor& sync, int stages, int mode, bool pdl, int ctas,
            size_t smem, const Norm<T>& norm) {
  auto kernel = persistent_mlp_kernel<T, ACT, CONSUMERS, TENSOR>;
  constexpr int threads = (CONSUMERS + 1) * 32;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  int resident = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, threads, smem));
  TORCH_CHECK(resident >= 1, "persistent_mlp: a CTA of ", stages, " stages does not fit an SM");
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(ctas);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  config.attrs = attribute;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(
      &config, kernel, reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const T*>(w1.data_ptr()),
      b1 ? reinterpret_cast<const T*>(b1->data_ptr()) : static_cast<const T*>(nullptr),
      reinterpret_cast<T*>(h.data_ptr()), reinterpret_cast<const T*>(w2.data_ptr()),
      reinterpret_cast<T*>(y.data_ptr()), reinterpret_cast<uint32_t*>(sync.data_ptr()), (int)h.numel(),
      (int)w1.size(1), (int)w2.size(0), (int)w2.size(1), stages, mode, norm));
}

template <typename T, int ACT>
void launch_with(int consumers, bool tensor, const at::Tensor& x, const at::Tensor& w1, const at::Tensor* b1,
                 const at::Tensor& w2, at::Tensor& h, at::Tensor& y, at::Tensor& sync, int stages, int mode,
                 bool pdl, int ctas, size_t smem, const Norm<T>& norm) {
  if (tensor) {
    if (consumers == 4) launch<T, ACT, 4, true>(x, w1, b1, w2, h, y, sync, stages, mode, pdl, ctas, smem, norm);
    else launch<T, ACT, 8, true>(x, w1, b1, w2, h, y, sync, stages, mode, pdl, ctas, smem, norm);
  } else {
    if (consumers == 4) launch<T, ACT, 4, false>(x, w1, b1, w2, h, y, sync, stages, mode, pdl, ctas, smem, norm);
    else launch<T, ACT, 8, false>(x, w1, b1, w2, h, y, sync, stages, mode, pdl, ctas, smem, norm);
  }
}

template <typename T>
Norm<T> norm_args(const c10::optional<at::Tensor>& delta, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias, at::Tensor& residual_out, double eps) {
  if (!delta.has_value()) return Norm<T>{0, nullptr, nullptr, nullptr, nullptr, 0.f};
  TORCH_CHECK(weight.has_value(), "the folded norm needs its weight");
  return Norm<T>{bias.has_value() ? 1 : 2, reinterpret_cast<const T*>(delta->data_ptr()),
                 reinterpret_cast<const T*>(weight->data_ptr()),
                 bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr,
                 reinterpret_cast<T*>(residual_out.data_ptr()), (float)eps};
}

template <typename T>
void dispatch(int64_t act, int consumers, bool tensor, const at::Tensor& x, const at::Tensor& w1,
              const at::Tensor* b1, const at::Tensor& w2, at::Tensor& h, at::Tensor& y, at::Tensor& sync,
              int stages, int mode, bool pdl, int ctas, size_t smem, const Norm<T>& norm) {
  if (act == 1) launch_with<T, 1>(consumers, tensor, x, w1, b1, w2, h, y, sync, stages, mode, pdl, ctas, smem, norm);
  else launch_with<T, 2>(consumers, tensor, x, w1, b1, w2, h, y, sync, stages, mode, pdl, ctas, smem, norm);
}

}  // namespace

// x [1, k1]; w1 [n1, k1] (act 1) or [2 n1, k1] (act 2); b1 [n1] (act 1 only); w2 [n2, n1]; sync: two
// int32, zero once, reusable by every launch on one stream (not by launches that may run concurrently).
// With delta, the add+norm before the MLP is folded in: x is then the residual, the MLP's input is
// norm(x + delta) (LayerNorm with norm_b, RMSNorm without), and the new residual x + delta is returned too.
// Returns (y [1, n2], the residual: x + delta, or x itself). mode (where the time goes): 0 the MLP; 1 no
// grid-wide wait (h may be stale); 2 the consumer warps wait for and release each stage but do no math (y is
// garbage); 3 the math without storing h or y (y is garbage); 4 fc_in's math only, 5 fc_out's only (y is
// garbage); 6 the MLP, with each stage handed back to the producer once its fragments are in registers
// (tensor cores only).
std::tuple<at::Tensor, at::Tensor> persistent_mlp(
    at::Tensor x, at::Tensor w1, c10::optional<at::Tensor> b1, at::Tensor w2, int64_t act, at::Tensor sync,
    int64_t stages, int64_t mode, int64_t consumers, bool pdl, bool tensor, c10::optional<at::Tensor> delta,
    c10::optional<at::Tensor> norm_w, c10::optional<at::Tensor> norm_b, double eps) {
  TORCH_CHECK(act == 1 || act == 2, "act: 1 relu with bias, 2 swiglu");
  TORCH_CHECK(x.is_contiguous() && w1.is_contiguous() && w2.is_contiguous(), "contiguous tensors");
  TORCH_CHECK(consumers == 4 || consumers == 8, "consumers: 4 or 8 warps");
  TORCH_CHECK(stages >= consumers && stages <= kMaxStages && stages % consumers == 0, "stages: a multiple of ",
              consumers, " up to ", kMaxStages);
  const int k1 = w1.size(1), n1 = act == 2 ? w1.size(0) / 2 : w1.size(0), n2 = w2.size(0), k2 = w2.size(1);
  TORCH_CHECK(x.numel() == k1 && k2 == n1, "shapes: x [1, k1], w1 [n1 or 2 n1, k1], w2 [n2, n1]");
  const int outs1 = act == 2 ? kRows1 / 2 : kRows1;
  TORCH_CHECK(kRows1 * 2 * k1 == kTileBytes && 2 * k2 == kTileBytes && n1 % outs1 == 0,
              "persistent_mlp: the probe's stages hold 4 rows of k1 = 2048 or one row of k2 = 8192");
  const int ctas = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  TORCH_CHECK(n1 / outs1 >= ctas && n2 >= ctas, "persistent_mlp: fewer units than SMs");
  TORCH_CHECK(!delta.has_value() || (delta->is_contiguous() && delta->numel() == k1), "delta: [1, k1]");
  auto h = at::empty({n1}, x.options());
  auto y = at::empty({1, n2}, x.options());
  auto residual = delta.has_value() ? at::empty_like(x) : x;
  const int max_outs = ((n1 / outs1 + ctas - 1) / ctas) * outs1;
  const size_t smem = (size_t)stages * kTileBytes + 2 * (k1 + k2) + 4 * max_outs;
  const at::Tensor* bias = b1.has_value() ? &b1.value() : nullptr;
  TORCH_CHECK(act == 2 || bias, "act 1 needs a bias");
  if (x.scalar_type() == at::kHalf) {
    dispatch<__half>(act, consumers, tensor, x, w1, bias, w2, h, y, sync, stages, (int)mode, pdl, ctas, smem,
                     norm_args<__half>(delta, norm_w, norm_b, residual, eps));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "fp16 or bf16");
    dispatch<__nv_bfloat16>(act, consumers, tensor, x, w1, bias, w2, h, y, sync, stages, (int)mode, pdl, ctas,
                            smem, norm_args<__nv_bfloat16>(delta, norm_w, norm_b, residual, eps));
  }
  return {y, residual};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("persistent_mlp", &persistent_mlp); }
