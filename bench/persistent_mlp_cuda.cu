// Probe (bench/persistent_mlp_cuda.py): the batch-1 decode MLP as one persistent kernel,
// y = W2 act(W1 x [+ b1]), with a grid-wide wait for h between the two projections that does not stop
// the weight stream.
// Measured on an H200 (bench/NOTES-perf.md, tenth session): correct and repeatable, but 10% slower than
// the engine's two Triton kernels, so the engine does not use it.
//
// Why: as two kernels (dejavu/model/fused.py) each projection pays its own ramp and tail, and nothing is
// read from DRAM between them. Here one CTA per SM runs a producer warp that keeps a ring of 16 KB
// shared-memory stages filled with bulk copies (cp.async.bulk, completion counted by an mbarrier), in
// weight order: this CTA's fc_in rows, then its fc_out rows. fc_out's weights do not depend on h, so while
// the consumer warps wait for the last CTA's h rows, the ring goes on filling with fc_out.
//
// Work: a stage holds whole rows (rows of 2 * k bytes must divide 16 KB). Consumer warp w takes units
// w, w + 4, w + 8, ... of the CTA's sequence and computes each of its rows as one warp-wide dot product
// against the input vector, which sits in shared memory (x, later h). No cross-warp sum, no float atomics:
// the result does not depend on timing. act 1: relu(W1 x + b1); act 2: SwiGLU, W1 = [gate; up] and a
// stage holds gate rows i.. and up rows i.. in its two halves.
//
// The ring depth is a multiple of the consumer warps, so each stage is only ever read by one warp, in
// order. Otherwise a warp could wait on a stage's full barrier two uses ahead of the warp before it, and
// mbarrier parity waits cannot tell use k from use k - 2: it would read a stage not yet filled (seen: 10
// stages over 8 warps gave results that changed from call to call).
//
// Every CTA must be resident at once (they wait for each other): one per SM, launched after the kernel
// before it has finished (no programmatic early launch).

#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <cstdint>

namespace {

constexpr int kTileBytes = 16384;
constexpr int kConsumers = 4;                      // consumer warps
constexpr int kThreads = (kConsumers + 1) * 32;    // and one producer warp
constexpr int kMaxStages = 12;

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
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumers * 32) : "memory");
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One row (vecs 16-byte vectors, in shared memory) against the input vector, by one warp, in fp32.
template <typename T>
__device__ __forceinline__ float row_dot(const uint4* row, const uint4* in, int vecs, int lane) {
  using T2 = typename Pair<T>::type;
  float s[4] = {0.f, 0.f, 0.f, 0.f};  // four independent FMA chains, not one 8-deep chain per vector
#pragma unroll 4
  for (int v = lane; v < vecs; v += 32) {
    const uint4 a = row[v], b = in[v];
    const T2* a2 = reinterpret_cast<const T2*>(&a);
    const T2* b2 = reinterpret_cast<const T2*>(&b);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 fa = to_float2(a2[i]), fb = to_float2(b2[i]);
      s[i] = fmaf(fa.x, fb.x, s[i]);
      s[i] = fmaf(fa.y, fb.y, s[i]);
    }
  }
  return warp_sum((s[0] + s[1]) + (s[2] + s[3]));
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

template <typename T, int ACT>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_mlp_kernel(const T* __restrict__ x, const T* __restrict__ w1, const T* __restrict__ b1,
                          T* h, const T* __restrict__ w2, T* __restrict__ y, uint32_t* sync, int n1, int k1,
                          int n2, int k2, int stages, int mode) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) uint64_t full[kMaxStages];
  __shared__ __align__(8) uint64_t empty[kMaxStages];
  unsigned char* ring = smem;
  uint4* xs = reinterpret_cast<uint4*>(smem + stages * kTileBytes);
  uint4* hs = xs + k1 / 8;
  float* bias = reinterpret_cast<float*>(hs + k2 / 8);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows1 = kTileBytes / (2 * k1), outs1 = ACT == 2 ? rows1 / 2 : rows1;
  const int rows2 = kTileBytes / (2 * k2), vecs1 = k1 / 8, vecs2 = k2 / 8;
  int first1, count1, first2, count2;
  share(n1 / outs1, first1, count1);
  share(n2 / rows2, first2, count2);
  const int total = count1 + count2;

  uint32_t generation = 0;
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(&full[s]);
      mbar_init(&empty[s]);
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the copy engine sees the barriers
    generation = load_acquire(sync + 1);
  }
  for (int v = threadIdx.x; v < vecs1; v += kThreads) xs[v] = reinterpret_cast<const uint4*>(x)[v];
  if (ACT == 1)
    for (int r = threadIdx.x; r < count1 * outs1; r += kThreads) bias[r] = to_float(b1[first1 * outs1 + r]);
  __syncthreads();

  if (warp == kConsumers) {  // the producer: stage t % stages gets unit t once its last reader let it go
    if (lane == 0)
      for (int t = 0; t < total; ++t) {
        const int s = t % stages;
        if (t >= stages) mbar_wait(&empty[s], (t / stages - 1) & 1);
        unsigned char* dst = ring + s * kTileBytes;
        mbar_expect(&full[s], kTileBytes);
        if (t >= count1) {
          bulk_copy(dst, w2 + (long)(first2 + t - count1) * rows2 * k2, kTileBytes, &full[s]);
        } else if (ACT == 2) {  // gate rows, then the same up rows
          const long row = (long)(first1 + t) * outs1;
          bulk_copy(dst, w1 + row * k1, kTileBytes / 2, &full[s]);
          bulk_copy(dst + kTileBytes / 2, w1 + (n1 + row) * k1, kTileBytes / 2, &full[s]);
        } else {
          bulk_copy(dst, w1 + (long)(first1 + t) * rows1 * k1, kTileBytes, &full[s]);
        }
      }
    return;
  }

  int t = warp;
  for (; t < count1; t += kConsumers) {  // fc_in
    const uint4* stage = acquire(ring, full, t, stages);
    for (int o = 0; o < (mode == 2 ? 0 : outs1); ++o) {
      const float a = row_dot<T>(stage + o * vecs1, xs, vecs1, lane);
      float out;
      if (ACT == 2) {  // as the reference rounds: gate and up, silu(gate), the product
        const float u = row_dot<T>(stage + (outs1 + o) * vecs1, xs, vecs1, lane);
        const float g = round_to<T>(a);
        out = round_to<T>(g / (1.f + __expf(-g))) * round_to<T>(u);
      } else {
        out = fmaxf(a + bias[t * outs1 + o], 0.f);
      }
      if (lane == 0) h[(first1 + t) * outs1 + o] = from_float<T>(out);
    }
    release(empty, t, stages, lane);
  }

  // All of h, from every CTA, before fc_out. The ring keeps filling with fc_out's rows meanwhile.
  consumers_sync();  // this CTA's h rows are stored
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
  consumers_sync();
  for (int v = threadIdx.x; v < vecs2; v += kConsumers * 32) hs[v] = __ldcg(reinterpret_cast<const uint4*>(h) + v);
  consumers_sync();

  for (; t < total; t += kConsumers) {  // fc_out
    const uint4* stage = acquire(ring, full, t, stages);
    for (int o = 0; o < (mode == 2 ? 0 : rows2); ++o) {
      const float a = row_dot<T>(stage + o * vecs2, hs, vecs2, lane);
      if (lane == 0) y[(first2 + t - count1) * rows2 + o] = from_float<T>(a);
    }
    release(empty, t, stages, lane);
  }
}

template <typename T, int ACT>
void launch(const at::Tensor& x, const at::Tensor& w1, const at::Tensor* b1, const at::Tensor& w2,
            at::Tensor& h, at::Tensor& y, at::Tensor& sync, int stages, int mode, int ctas, size_t smem) {
  auto kernel = persistent_mlp_kernel<T, ACT>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  int resident = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kThreads, smem));
  TORCH_CHECK(resident >= 1, "persistent_mlp: a CTA of ", stages, " stages does not fit an SM");
  kernel<<<ctas, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const T*>(w1.data_ptr()),
      b1 ? reinterpret_cast<const T*>(b1->data_ptr()) : nullptr, reinterpret_cast<T*>(h.data_ptr()),
      reinterpret_cast<const T*>(w2.data_ptr()), reinterpret_cast<T*>(y.data_ptr()),
      reinterpret_cast<uint32_t*>(sync.data_ptr()), (int)h.numel(), (int)w1.size(1), (int)w2.size(0),
      (int)w2.size(1), stages, mode);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// x [1, k1]; w1 [n1, k1] (act 1) or [2 n1, k1] (act 2); b1 [n1] (act 1 only); w2 [n2, n1]; sync: two
// int32, zero once, reusable by every launch on one stream (not by launches that may run concurrently).
// Returns y [1, n2]. mode (where the time goes): 0 the MLP; 1 no grid-wide wait (h may be stale); 2 the
// consumer warps wait for and release each stage but do no math (y is garbage).
at::Tensor persistent_mlp(at::Tensor x, at::Tensor w1, c10::optional<at::Tensor> b1, at::Tensor w2,
                          int64_t act, at::Tensor sync, int64_t stages, int64_t mode) {
  TORCH_CHECK(act == 1 || act == 2, "act: 1 relu with bias, 2 swiglu");
  TORCH_CHECK(x.is_contiguous() && w1.is_contiguous() && w2.is_contiguous(), "contiguous tensors");
  TORCH_CHECK(stages >= kConsumers && stages <= kMaxStages && stages % kConsumers == 0, "stages: a multiple of ",
              kConsumers, " up to ", kMaxStages);
  const int k1 = w1.size(1), n1 = act == 2 ? w1.size(0) / 2 : w1.size(0), n2 = w2.size(0), k2 = w2.size(1);
  TORCH_CHECK(x.numel() == k1 && k2 == n1, "shapes: x [1, k1], w1 [n1 or 2 n1, k1], w2 [n2, n1]");
  const int rows1 = kTileBytes / (2 * k1), outs1 = act == 2 ? rows1 / 2 : rows1, rows2 = kTileBytes / (2 * k2);
  TORCH_CHECK(k1 % 256 == 0 && k2 % 256 == 0 && kTileBytes % (2 * k1) == 0 && kTileBytes % (2 * k2) == 0 &&
                  outs1 >= 1 && n1 % outs1 == 0 && n2 % rows2 == 0,
              "persistent_mlp: rows must tile 16 KB");
  const int ctas = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  TORCH_CHECK(n1 / outs1 >= ctas && n2 / rows2 >= ctas, "persistent_mlp: fewer units than SMs");
  auto h = at::empty({n1}, x.options());
  auto y = at::empty({1, n2}, x.options());
  const int max_outs = ((n1 / outs1 + ctas - 1) / ctas) * outs1;
  const size_t smem = (size_t)stages * kTileBytes + 2 * (k1 + k2) + 4 * max_outs;
  const at::Tensor* bias = b1.has_value() ? &b1.value() : nullptr;
  TORCH_CHECK(act == 2 || bias, "act 1 needs a bias");
  if (x.scalar_type() == at::kHalf) {
    act == 1 ? launch<__half, 1>(x, w1, bias, w2, h, y, sync, stages, (int)mode, ctas, smem)
             : launch<__half, 2>(x, w1, bias, w2, h, y, sync, stages, (int)mode, ctas, smem);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "fp16 or bf16");
    act == 1 ? launch<__nv_bfloat16, 1>(x, w1, bias, w2, h, y, sync, stages, (int)mode, ctas, smem)
             : launch<__nv_bfloat16, 2>(x, w1, bias, w2, h, y, sync, stages, (int)mode, ctas, smem);
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("persistent_mlp", &persistent_mlp); }
