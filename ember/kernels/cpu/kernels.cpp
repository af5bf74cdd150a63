// ember's CPU kernels: the decode hot path without per-op dispatch or gathered copies.
//
// Plain C ABI (called through ctypes), OpenMP for threads. libgomp is the one torch already loaded,
// so these kernels share torch's thread pool. Every kernel takes a dtype code (0 = fp32, 1 = bf16)
// and reproduces the roundings of the torch code it replaces: a value is rounded to the model's
// dtype wherever the torch version materialises a tensor of that dtype.
//
//   linear_bf16   y = x·Wᵀ (+ b) over packed bf16 weights (linear_w8: int8 weights, row scales)
//   linear_w8a8   the same over int8 weights and int8 inputs (per block of 64), VNNI dot products
//   rms_norm      out = w · norm(x + residual), the sum written for the next layer (fused add)
//   rotary        neox-style rotation of q and k, cos|sin table indexed by position
//   silu_mul      out = silu(gate) · up
//   greedy_head   argmax(x·Wᵀ) over the LM head, the full product's answer from an int8 screen
//   kv_write      new keys/values into their slots of the paged cache
//   paged_decode  one query per sequence against its blocks, online softmax, GQA groups together
//   decode_layers every layer of a Llama-family decode step, through the kernels above
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>
#include <immintrin.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__)
#error "ember's CPU kernels need AVX-512 (F and BW); the torch paths serve other CPUs"
#endif

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f32_to_bf16(float f) {   // round to nearest even, NaN kept quiet
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

template <typename T> static inline float load(const T* p, int64_t i);
template <> inline float load<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float load<bf16>(const bf16* p, int64_t i) { return bf16_to_f32(p[i]); }

template <typename T> static inline void store(T* p, int64_t i, float v);
template <> inline void store<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> inline void store<bf16>(bf16* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }

// a value as the torch code would hold it: rounded to T
template <typename T> static inline float round_to(float v);
template <> inline float round_to<float>(float v) { return v; }
template <> inline float round_to<bf16>(float v) { return bf16_to_f32(f32_to_bf16(v)); }

// ---------------------------------------------------------------------------------------------
// 16 lanes at a time. load16/store16 convert to and from fp32; vround<T> rounds like a T tensor.
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const bf16* p) {
    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
static inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// v rounded to bf16 (nearest even) in the top 16 bits of each lane; the low bits are left over
static inline __m512i round_to_bf16_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
}
static inline void store16(bf16* p, __m512 v) {   // round to nearest even
    _mm256_storeu_si256((__m256i*)p,
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_to_bf16_bits(v), 16)));
}
template <typename T> static inline __m512 vround(__m512 v) {
    if constexpr (sizeof(T) == 4) return v;
    T tmp[16];
    store16(tmp, v);
    return load16(tmp);
}

// ---------------------------------------------------------------------------------------------
// Dot products of bf16 pairs, the step every bf16 kernel below is built on: acc + a.even·b.even +
// a.odd·b.odd in each of 16 fp32 lanes, where a vector of bf16 pairs holds 16 lanes × 2 values.
// With AVX-512 BF16 (Zen 4, Sapphire Rapids) that is one vdpbf16ps. Without it (Ice Lake,
// Skylake-X) the pairs are widened to fp32 (a bf16 is the top half of an fp32: one shift or one
// mask per vector) and multiplied by two FMAs; the kernels keep the same layouts and the same
// loops, and each widening serves many FMAs (a weight vector every row of a tile, a key vector
// every query head). The sums differ from vdpbf16ps's only in rounding (two fp32 roundings per
// pair, and denormals kept), well inside the tolerance the torch reference is held to.
#if defined(__AVX512BF16__)
struct Pairs { __m512bh v; };
static inline Pairs widen(__m512i v) { return {(__m512bh)v}; }
static inline __m512 dot(__m512 acc, Pairs a, Pairs b) { return _mm512_dpbf16_ps(acc, a.v, b.v); }
#else
struct Pairs { __m512 even, odd; };
static inline Pairs widen(__m512i v) {
    return {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000)))};
}
static inline __m512 dot(__m512 acc, Pairs a, Pairs b) {
    return _mm512_fmadd_ps(a.odd, b.odd, _mm512_fmadd_ps(a.even, b.even, acc));
}
#endif
static inline Pairs load_pairs(const void* p) { return widen(_mm512_loadu_si512(p)); }
// one pair of inputs (x[0], x[1]), broadcast to every lane. An fp32 pair needs no widening: two
// broadcasts from memory (the FMAs take them as operands)
static inline Pairs broadcast_pair(const bf16* x) {
    int32_t pair;
    std::memcpy(&pair, x, 4);
    return widen(_mm512_set1_epi32(pair));
}
// Where a kernel keeps an operand it broadcasts (input rows, queries, probabilities): as bf16
// with AVX-512 BF16; else as fp32 holding the same bf16 values, whose pairs are two broadcasts
// from memory that need no widening.
#if defined(__AVX512BF16__)
typedef bf16 DotInput;
static inline void store_dot_input(bf16* p, __m512 v) { store16(p, v); }
#else
typedef float DotInput;
static inline Pairs broadcast_pair(const float* x) {
    return {_mm512_set1_ps(x[0]), _mm512_set1_ps(x[1])};
}
static inline void store_dot_input(float* p, __m512 v) {   // v rounded to bf16, as store16 does
    const __m512i bits = _mm512_and_si512(round_to_bf16_bits(v), _mm512_set1_epi32((int)0xffff0000));
    _mm512_storeu_ps(p, _mm512_castsi512_ps(bits));
}
#endif
// n bf16 values as DotInputs
static inline void to_dot_input(const bf16* src, DotInput* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) store_dot_input(dst + i, load16(src + i));
    for (; i < n; i++) store(dst, i, bf16_to_f32(src[i]));     // exact: already a bf16 value
}
// ---------------------------------------------------------------------------------------------
// linear_bf16: y[M, N] = x[M, K] · W[N, K]ᵀ + b, W packed once at load time (pack_linear_weight) as
// [N/32][K/2][32][2]: for each pair of inputs, 32 outputs' weights side by side. One AVX-512 BF16
// dot product then adds x[m, k]·W[n, k] + x[m, k+1]·W[n, k+1] for 16 outputs n at once, with the
// pair (x[m, k], x[m, k+1]) broadcast. A tile is MR rows of x × 32 outputs (2·MR accumulators in
// registers); a panel of 32 outputs (K·64 bytes) is read in order, once per MR rows: at decode
// (M ≤ MR) every weight is read exactly once, as one sequential stream per thread. Without
// AVX-512 BF16, x is widened to fp32 once per call (X = float), so that a tile's input pairs are
// plain broadcasts from memory.
constexpr int MR = 10;   // 12: 4% slower on prefill's 1024 × 3072 × 576, no faster elsewhere

// one pair of inputs × 32 outputs of a packed panel, as two vectors of bf16 pairs. int8 weights
// (weight-only quantization, one scale per output applied after the sum) convert exactly to bf16.
static inline void load_pairs(const bf16* panel, int64_t kp, Pairs& b0, Pairs& b1) {
    b0 = load_pairs(panel + kp * 64);
    b1 = load_pairs(panel + kp * 64 + 32);
}
#if defined(__AVX512BF16__)
static inline __m512 int8x16_to_f32(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline void load_pairs(const int8_t* panel, int64_t kp, Pairs& b0, Pairs& b1) {
    const int8_t* p = panel + kp * 64;
    b0 = {_mm512_cvtne2ps_pbh(int8x16_to_f32(p + 16), int8x16_to_f32(p))};
    b1 = {_mm512_cvtne2ps_pbh(int8x16_to_f32(p + 48), int8x16_to_f32(p + 32))};
}
#else
static inline Pairs int8_pairs(const int8_t* p) {    // 16 int8 pairs: each int16 lane's halves
    const __m512i v = _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return {_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24)),
            _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24))};
}
static inline void load_pairs(const int8_t* panel, int64_t kp, Pairs& b0, Pairs& b1) {
    b0 = int8_pairs(panel + kp * 64);
    b1 = int8_pairs(panel + kp * 64 + 32);
}
#endif

// The panel after this one, fetched into cache while a tile computes (`next`, one call per
// panel): at decode the panels come from memory, and the hardware prefetchers would start each
// one's stream cold. The lines the tile reads for a pair of inputs: K·64 bytes a panel (bf16) or
// K·32 (int8). The 30 layers' linears of a step (benchmarks/kernel_ab.py, Ice Lake VM): 1.09× at
// 1 and 128 rows, 1.02× at 64, 1.01× at 1024.
template <typename W>
static inline void prefetch_pair(const W* next, int64_t kp) {
    _mm_prefetch((const char*)(next + kp * 64), _MM_HINT_T0);
    if (sizeof(W) == 2) _mm_prefetch((const char*)(next + kp * 64 + 32), _MM_HINT_T0);
}

template <int R, typename X, typename W>
static inline void gemm_tile(const X* x, int64_t ldx, const W* panel, int64_t K,
                             const float* scale, const bf16* bias, bf16* y, int64_t ldy,
                             const W* next = nullptr) {
    __m512 acc[R][2];
    for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    // The k loop, two steps an iteration, with the prefetch in a loop of its own instead of a
    // branch in every step: the loop's counters and branches then take half as many of the issue
    // slots the FMAs need nearly all of. The 30 layers' linears of a step (kernel_ab.py, Ice Lake
    // VM, median of rounds): 1.07-1.13x at 64 rows, 1.08x at 128, 1.02-1.19x at 1024, 1.00x at 1
    // row (bound by memory); four steps an iteration gained less, and the same loops through a
    // shared helper measured less.
    auto step = [&](int64_t kp) __attribute__((always_inline)) {
        Pairs b0, b1;
        load_pairs(panel, kp, b0, b1);
        for (int i = 0; i < R; i++) {
            const Pairs a = broadcast_pair(x + i * ldx + 2 * kp);
            acc[i][0] = dot(acc[i][0], a, b0);
            acc[i][1] = dot(acc[i][1], a, b1);
        }
    };
    if (next) {
        #pragma GCC unroll 2
        for (int64_t kp = 0; kp < K / 2; kp++) {
            prefetch_pair(next, kp);
            step(kp);
        }
    } else {
        #pragma GCC unroll 2
        for (int64_t kp = 0; kp < K / 2; kp++) step(kp);
    }
    const __m512 s_lo = scale ? _mm512_loadu_ps(scale) : _mm512_set1_ps(1.f);
    const __m512 s_hi = scale ? _mm512_loadu_ps(scale + 16) : _mm512_set1_ps(1.f);
    const __m512 b_lo = bias ? load16(bias) : _mm512_setzero_ps();
    const __m512 b_hi = bias ? load16(bias + 16) : _mm512_setzero_ps();
    for (int i = 0; i < R; i++) {
        store16(y + i * ldy, _mm512_fmadd_ps(acc[i][0], s_lo, b_lo));
        store16(y + i * ldy + 16, _mm512_fmadd_ps(acc[i][1], s_hi, b_hi));
    }
}

// The panel the first tile of panel p's rows [m0, ...) fetches: panel p + 1 from the first row
// block only (the later blocks find it in cache), none after the last panel.
template <typename W>
static inline const W* panel_to_fetch(const W* packed, int64_t p, int64_t panels, int64_t K,
                                      int64_t m0) {
    return m0 == 0 && p + 1 < panels ? packed + (p + 1) * K * 32 : nullptr;
}

// `next`: the panel the first tile fetches (or null)
template <typename X, typename W>
static void gemm_rows(const X* x, int64_t ldx, int64_t rows, const W* panel, int64_t K,
                      const float* scale, const bf16* bias, bf16* y, int64_t ldy,
                      const W* next) {
    int64_t i = 0;
    for (; i + MR <= rows; i += MR, next = nullptr)
        gemm_tile<MR>(x + i * ldx, ldx, panel, K, scale, bias, y + i * ldy, ldy, next);
    x += i * ldx;
    y += i * ldy;
    switch (rows - i) {
#define TAIL(r) case r: gemm_tile<r>(x, ldx, panel, K, scale, bias, y, ldy, next); break;
        TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7) TAIL(8) TAIL(9)
#undef TAIL
    }
}

// body(p, m0, rows) for every panel p < panels and block of rows [m0, m0 + rows) of M, on all
// threads. Rows are cut in blocks of ROW_BLOCK (so that a block of x stays in L2 while the panels
// stream by); threads share (panel, row block) pairs, panels outermost so that each thread gets
// its share of every row block (a short last block would otherwise load one thread only).
// guided: large contiguous shares first (one weight stream per thread), then small ones, so that
// a thread the OS takes away for a moment (the HTTP loop, a client) is covered by the others
// instead of holding up the step.
constexpr int64_t ROW_BLOCK = 16 * MR;

template <typename Body>
static void for_panel_blocks(int64_t panels, int64_t M, Body body) {
    const int64_t row_blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK;
    #pragma omp parallel for collapse(2) schedule(guided)
    for (int64_t p = 0; p < panels; p++)
        for (int64_t rb = 0; rb < row_blocks; rb++)
            body(p, rb * ROW_BLOCK, std::min(ROW_BLOCK, M - rb * ROW_BLOCK));
}

// The input the tiles read: x itself with AVX-512 BF16; else x widened to fp32 (rows of K) into
// a buffer of the calling thread's, kept from call to call (a fresh one of this size is a mapping
// that every call would fault in page by page), valid until that thread's next call.
#if defined(__AVX512BF16__)
static inline const bf16* tile_input(const bf16* x, int64_t& ldx, int64_t, int64_t) { return x; }
#else
static const float* tile_input(const bf16* x, int64_t& ldx, int64_t M, int64_t K) {
    static thread_local std::vector<float> wide;
    if ((int64_t)wide.size() < M * K) wide.resize(M * K);
    float* w = wide.data();
    #pragma omp parallel for schedule(static) if (M * K > 65536)
    for (int64_t m = 0; m < M; m++) to_dot_input(x + m * ldx, w + m * K, K);
    ldx = K;
    return w;
}
#endif

template <typename W>
static void linear_impl(const bf16* x_in, int64_t ldx, const W* packed, const float* scales,
                        const bf16* bias, bf16* y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
    const DotInput* x = tile_input(x_in, ldx, M, K);
    for_panel_blocks(N / 32, M, [&](int64_t p, int64_t m0, int64_t rows) {
        gemm_rows(x + m0 * ldx, ldx, rows, packed + p * K * 32, K,
                  scales ? scales + p * 32 : nullptr, bias ? bias + p * 32 : nullptr,
                  y + m0 * ldy + p * 32, ldy, panel_to_fetch(packed, p, N / 32, K, m0));
    });
}

// 1 where the bf16 kernels run on dot products of bf16 pairs in hardware (AVX-512 BF16), 0 where
// they widen the pairs to fp32 (see dot()); either way they serve.
extern "C" int ember_has_bf16_dot() {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

// bf16 weights packed by kernels.pack_linear_weight ([N/32][K/2][32][2]); int8 weights packed the
// same way (one byte each), with
// one fp32 scale per output: y = (x · q) · scale + b.
extern "C" void ember_linear_bf16(const bf16* x, int64_t ldx, const bf16* packed, const bf16* bias,
                                  bf16* y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
    linear_impl(x, ldx, packed, nullptr, bias, y, ldy, M, N, K);
}

extern "C" void ember_linear_w8(const bf16* x, int64_t ldx, const int8_t* packed,
                                const float* scales, const bf16* bias, bf16* y, int64_t ldy,
                                int64_t M, int64_t N, int64_t K) {
    linear_impl(x, ldx, packed, scales, bias, y, ldy, M, N, K);
}

// e^x: 2^(x·log2 e) = 2^n · 2^f with |f| ≤ 1/2, 2^f by its Taylor series to degree 7
// (relative error < 2e-7), 2^n applied by scalef. Underflows to 0, never NaN for finite x.
static inline __m512 exp16(__m512 x) {
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)),
                                   _mm512_set1_ps(1.44269504f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718f));
    const float c[] = {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
    __m512 p = _mm512_set1_ps(c[0]);
    for (int i = 1; i < 8; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(p, n);
}

// ---------------------------------------------------------------------------------------------
// rms_norm, as RMSNorm does it in fp32: r = T(x + residual); out = w · T(r · rsqrt(mean(r²) + eps)).
// With a residual, the sum r goes to residual_out (the next layer's residual).
template <typename T>
static void rms_norm_impl(const T* x, const T* residual, T* residual_out, const T* w, T* out,
                          int64_t rows, int64_t D, float eps) {
    #pragma omp parallel for schedule(static) if (rows > 8)
    for (int64_t t = 0; t < rows; t++) {
        const T* src = x + t * D;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t i = 0; i < D; i += 16) {
            __m512 v = load16(src + i);
            if (residual) {
                v = vround<T>(_mm512_add_ps(v, load16(residual + t * D + i)));
                store16(residual_out + t * D + i, v);
            }
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / D + eps));
        if (residual) src = residual_out + t * D;
        for (int64_t i = 0; i < D; i += 16)
            store16(out + t * D + i,
                    _mm512_mul_ps(load16(w + i), vround<T>(_mm512_mul_ps(load16(src + i), inv))));
    }
}

extern "C" void ember_rms_norm(int dtype, const void* x, const void* residual, void* residual_out,
                               const void* w, void* out, int64_t rows, int64_t D, float eps) {
    if (dtype == 1)
        rms_norm_impl((const bf16*)x, (const bf16*)residual, (bf16*)residual_out, (const bf16*)w,
                      (bf16*)out, rows, D, eps);
    else
        rms_norm_impl((const float*)x, (const float*)residual, (float*)residual_out,
                      (const float*)w, (float*)out, rows, D, eps);
}

// ---------------------------------------------------------------------------------------------
// rotary, neox style: x = (x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin), each product and sum
// rounded to T as the torch version does. cos_sin [max_pos, D] holds (cos | sin). q, k are read
// with row strides ldq, ldk (views of the qkv projection); the results are contiguous.
template <typename T>
static void rotary_impl(const T* q, int64_t ldq, const T* k, int64_t ldk, T* q_out, T* k_out,
                        const int64_t* pos, const T* cos_sin, int64_t rows, int64_t hq,
                        int64_t hk, int64_t D) {
    const int64_t half = D / 2;
    #pragma omp parallel for schedule(static) if (rows > 8)
    for (int64_t t = 0; t < rows; t++) {
        const T* cs = cos_sin + pos[t] * D;
        for (int64_t h = 0; h < hq + hk; h++) {
            const T* x = h < hq ? q + t * ldq + h * D : k + t * ldk + (h - hq) * D;
            T* y = h < hq ? q_out + (t * hq + h) * D : k_out + (t * hk + h - hq) * D;
            for (int64_t i = 0; i < half; i += 16) {
                __m512 x1 = load16(x + i), x2 = load16(x + half + i);
                __m512 c = load16(cs + i), s = load16(cs + half + i);
                store16(y + i, vround<T>(_mm512_sub_ps(vround<T>(_mm512_mul_ps(x1, c)),
                                                       vround<T>(_mm512_mul_ps(x2, s)))));
                store16(y + half + i, vround<T>(_mm512_add_ps(vround<T>(_mm512_mul_ps(x2, c)),
                                                              vround<T>(_mm512_mul_ps(x1, s)))));
            }
        }
    }
}

extern "C" void ember_rotary(int dtype, const void* q, int64_t ldq, const void* k, int64_t ldk,
                             void* q_out, void* k_out, const int64_t* pos, const void* cos_sin,
                             int64_t rows, int64_t hq, int64_t hk, int64_t D) {
    if (dtype == 1)
        rotary_impl((const bf16*)q, ldq, (const bf16*)k, ldk, (bf16*)q_out, (bf16*)k_out, pos,
                    (const bf16*)cos_sin, rows, hq, hk, D);
    else
        rotary_impl((const float*)q, ldq, (const float*)k, ldk, (float*)q_out, (float*)k_out, pos,
                    (const float*)cos_sin, rows, hq, hk, D);
}

// ---------------------------------------------------------------------------------------------
// silu_mul: gate_up [rows, 2I] → out [rows, I] = T(T(silu(gate)) · up)
template <typename T>
static inline __m512 silu_times(__m512 gate, __m512 up) {    // before the final rounding to T
    const __m512 silu = _mm512_div_ps(gate, _mm512_add_ps(
        _mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate))));
    return _mm512_mul_ps(vround<T>(silu), up);
}

template <typename T>
static void silu_mul_impl(const T* gate_up, T* out, int64_t rows, int64_t I) {
    #pragma omp parallel for schedule(static) if (rows > 4)
    for (int64_t t = 0; t < rows; t++) {
        const T* g = gate_up + t * 2 * I;
        for (int64_t i = 0; i < I; i += 16)
            store16(out + t * I + i, silu_times<T>(load16(g + i), load16(g + I + i)));
    }
}

extern "C" void ember_silu_mul(int dtype, const void* gate_up, void* out, int64_t rows, int64_t I) {
    if (dtype == 1) silu_mul_impl((const bf16*)gate_up, (bf16*)out, rows, I);
    else silu_mul_impl((const float*)gate_up, (float*)out, rows, I);
}

// ---------------------------------------------------------------------------------------------
// linear_silu: out [M, I] = silu_mul(x · Wᵀ) for a gate_up weight W [2I, K] (gate rows, then up
// rows; packed like linear_bf16's, or int8 with row scales), without writing x · Wᵀ: a tile is R
// rows × 32 gate outputs and the 32 up outputs that pair with them, both rounded to bf16 as the
// [M, 2I] tensor would hold them, then multiplied as silu_mul does. Same bits, one pass less.
// (Where the weights are widened, a block of many rows takes the gate and up panels in turn
// instead: see linear_silu_impl.)
#if defined(__AVX512BF16__)
constexpr int MR_SILU = 6;                 // 4·R accumulators + 4 weight vectors in registers
#else
constexpr int MR_SILU = 5;                 // + 8 widened weight vectors: 6 rows spilled to the stack
#endif

template <int R, typename X, typename W>
static inline void gemm_silu_tile(const X* x, int64_t ldx, const W* gate, const W* up,
                                  int64_t K, const float* gate_scale, const float* up_scale,
                                  bf16* out, int64_t ldo, const W* next = nullptr) {
    // gemm_tile's loop over two panels at once (a shared helper over P panels measured 6% slower)
    __m512 acc[R][4];
    for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm512_setzero_ps();
    auto step = [&](int64_t kp) __attribute__((always_inline)) {   // as gemm_tile's loop
        Pairs g0, g1, u0, u1;
        load_pairs(gate, kp, g0, g1);
        load_pairs(up, kp, u0, u1);
        for (int i = 0; i < R; i++) {
            const Pairs a = broadcast_pair(x + i * ldx + 2 * kp);
            acc[i][0] = dot(acc[i][0], a, g0);
            acc[i][1] = dot(acc[i][1], a, g1);
            acc[i][2] = dot(acc[i][2], a, u0);
            acc[i][3] = dot(acc[i][3], a, u1);
        }
    };
    if (next) {
        #pragma GCC unroll 2
        for (int64_t kp = 0; kp < K / 2; kp++) {
            prefetch_pair(next, kp), prefetch_pair(next + (up - gate), kp);
            step(kp);
        }
    } else {
        #pragma GCC unroll 2
        for (int64_t kp = 0; kp < K / 2; kp++) step(kp);
    }
    __m512 s[4];
    for (int j = 0; j < 4; j++) {
        const float* sc = j < 2 ? gate_scale : up_scale;
        s[j] = sc ? _mm512_loadu_ps(sc + 16 * (j % 2)) : _mm512_set1_ps(1.f);
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < 2; j++) {
            const __m512 g = vround<bf16>(_mm512_fmadd_ps(acc[i][j], s[j], _mm512_setzero_ps()));
            const __m512 u = vround<bf16>(_mm512_fmadd_ps(acc[i][j + 2], s[j + 2], _mm512_setzero_ps()));
            store16(out + i * ldo + 16 * j, silu_times<bf16>(g, u));
        }
}

template <typename W>
static void linear_silu_impl(const bf16* x_in, int64_t ldx, const W* packed, const float* scales,
                             bf16* out, int64_t ldo, int64_t M, int64_t I, int64_t K) {
    const DotInput* x = tile_input(x_in, ldx, M, K);
    const int64_t panels = I / 32;
    for_panel_blocks(panels, M, [&](int64_t p, int64_t m0, int64_t rows) {
        const W* gate = packed + p * K * 32;
        const W* up = packed + (p + panels) * K * 32;
        const float* gs = scales ? scales + p * 32 : nullptr;
        const float* us = scales ? scales + (p + panels) * 32 : nullptr;
        const DotInput* xr = x + m0 * ldx;
        bf16* o = out + m0 * ldo + p * 32;
        const W* next = panel_to_fetch(packed, p, panels, K, m0);   // (and its up panel)
#if !defined(__AVX512BF16__)
        if (rows >= 2 * MR) {
            // Many rows, weights widened: the gate and up panels one after the other through
            // gemm_tile's MR rows (4 widenings a step for 40 FMAs, against gemm_silu_tile's 8
            // for 40), into a [rows, 64] scratch of this thread's, then SiLU·mul: the same
            // roundings, the same bits. Step linears (kernel_ab.py, Ice Lake): 1.01-1.04x at 64
            // rows, 1.01-1.05x at 128 and 1024; at 1 row (bound by memory) the fused tile below
            // is 7% faster.
            static thread_local std::vector<bf16> gu;
            if ((int64_t)gu.size() < rows * 64) gu.resize(rows * 64);
            gemm_rows(xr, ldx, rows, gate, K, gs, nullptr, gu.data(), 64, next);
            gemm_rows(xr, ldx, rows, up, K, us, nullptr, gu.data() + 32, 64,
                      next ? next + (up - gate) : nullptr);
            for (int64_t r = 0; r < rows; r++)
                for (int j = 0; j < 32; j += 16)
                    store16(o + r * ldo + j, silu_times<bf16>(load16(gu.data() + r * 64 + j),
                                                              load16(gu.data() + r * 64 + 32 + j)));
            return;
        }
#endif
        int64_t i = 0;
        for (; i + MR_SILU <= rows; i += MR_SILU, next = nullptr)
            gemm_silu_tile<MR_SILU>(xr + i * ldx, ldx, gate, up, K, gs, us, o + i * ldo, ldo, next);
        switch (rows - i) {
#define TAIL(r) case r: gemm_silu_tile<r>(xr + i * ldx, ldx, gate, up, K, gs, us, o + i * ldo, ldo, next); break;
            TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5)
#undef TAIL
        }
    });
}

// W [2I, K] packed (bf16), or int8 with `scales` [2I]; I a multiple of 32.
extern "C" void ember_linear_silu(const bf16* x, int64_t ldx, const void* packed,
                                  const float* scales, bf16* out, int64_t ldo, int64_t M,
                                  int64_t I, int64_t K) {
    if (scales) linear_silu_impl(x, ldx, (const int8_t*)packed, scales, out, ldo, M, I, K);
    else linear_silu_impl(x, ldx, (const bf16*)packed, nullptr, out, ldo, M, I, K);
}

// ---------------------------------------------------------------------------------------------
// argmax of each row of x [rows, cols] (row stride ld), as torch.argmax: the first index of the
// largest value, or of the first NaN if the row has one. Greedy sampling reads the logits once,
// in their own dtype, instead of converting them all to fp32 first.
template <typename T>
static void argmax_impl(const T* x, int64_t ld, int64_t rows, int64_t cols, int64_t* out) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const T* row = x + r * ld;
        int64_t j = 0, best = 0;
        float top = -INFINITY;
        bool nan = false;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (; j + 16 <= cols; j += 16) {
            const __m512 v = load16(row + j);
            if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) { nan = true; break; }
            vmax = _mm512_max_ps(vmax, v);
        }
        if (!nan) {
            top = _mm512_reduce_max_ps(vmax);
            for (int64_t i = j; i < cols; i++) {
                const float v = load(row, i);
                if (v != v) { nan = true; break; }
                top = std::max(top, v);
            }
        }
        for (int64_t i = 0; i < cols; i++) {      // the first index that holds it
            const float v = load(row, i);
            if (nan ? v != v : v == top) { best = i; break; }
        }
        out[r] = best;
    }
}

extern "C" void ember_argmax(int dtype, const void* x, int64_t ld, int64_t rows, int64_t cols,
                             int64_t* out) {
    if (dtype == 1) argmax_impl((const bf16*)x, ld, rows, cols, out);
    else argmax_impl((const float*)x, ld, rows, cols, out);
}

// ---------------------------------------------------------------------------------------------
// greedy_head: the token a greedy row samples, argmax(x · Wᵀ) over the LM head W [N, K], the same
// index ember_argmax(ember_linear_bf16(x, W)) gives (bf16 logits, the first of equal maxima), at
// about half the cost: at batch 64 the LM head is ~15% of a decode step, and int8 dot products
// run twice as many multiply-adds per instruction as bf16 ones.
//
// 1. Screen. Every logit is estimated with int8 dot products, together with a bound on the
//    estimate's error that holds for any input (no statistics):
//      x = t·p + r    (p int8, one scale t per row; r the rounding residual)
//      W_j = s_j·q_j + e_j    (q_j int8, one scale s_j per output, prepared once)
//      x·W_j = t·s_j·(p·q_j) + (t·p)·e_j + r·W_j,   |the last two| ≤ ‖t·p‖·‖e_j‖ + ‖r‖·‖W_j‖
//    by Cauchy–Schwarz. A few dimensions of x are far larger than the rest (outliers) and would
//    make t coarse: the input pairs largest in this batch (4 + M/4 of them, at most 16: one row
//    has few, a batch's union more) are left out of p and added exactly (bf16 dot products on W's
//    packed bf16 panel, lines scattered over it), so r covers the ordinary dimensions only.
// 2. Keep every 32-output panel holding an output whose upper bound reaches the largest lower
//    bound lb, less a margin γ. Each bound also carries (K + 64)·2⁻²²·‖x‖·‖W_j‖ (at least
//    1e-4·‖x‖·‖W_j‖), 4× the rounding of the fp32 sums (the exact path's, ≤ K·2⁻²⁴·‖x‖·‖W_j‖ for
//    K terms, and the estimate's own, a few dozen roundings), so the exact path's fp32 logits lie
//    within the bounds too. An output outside the kept panels then has an fp32 logit below
//    lb − γ, and the output with the largest lower bound one at or above lb.
//    γ = (max(|lb|, |ub|) + 1)/32 exceeds two bf16 ulps (≤ |v|·2⁻⁷ each) at either value, so the
//    two round to different bf16 values: the one outside can neither win nor tie.
// 3. Recompute the kept panels with gemm_tile, the very loop linear_bf16 runs, so their bf16
//    logits are bit for bit those of the full product, and take the first largest.
// A row with a non-finite value (or non-finite bounds) computes every panel, as the full path.
// Typically a handful of the N/32 panels survive the screen.
#if defined(__AVX512VNNI__)
constexpr int OUTLIER_PAIRS = 16;   // at most; at batch 1, 4 were 0.4 ms faster than 16 (0.3% of
                                    // panels kept against 0.1%)
constexpr int SCREEN_R = 8;     // rows per screen tile; 10 was slower at batch 64 (a last tile of 4)

// From the LM head W [N, K] as linear_bf16 reads it (packed: [N/32][K/2][32][2]; the pages every
// step reads anyway, where the plain weight may be an embedding mapped from disk), a panel of 32
// outputs at a time: q [N/32][K/4][32][4] int8 (four inputs of 32 outputs side by side, what one
// VNNI dot product reads), colsum_j = Σ_k q_jk, scale s_j, err_norm ≥ ‖W_j − s_j·q_j‖ and
// w_norm ≥ ‖W_j‖. The norms are fp32 sums of squares, at most K·2⁻²⁴ relative off, then raised
// by K·2⁻²² (at least 1e-3) relative so that they bound. NaN or inf weights give NaN or inf
// norms: the rows that meet them take the exact path.
static inline void bf16_pairs_to_f32(__m512i v, __m512& even, __m512& odd) {
    even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000)));
}

static void greedy_head_prepare_impl(const bf16* packed, int64_t N, int64_t K, int8_t* q,
                                     int32_t* colsum, float* scale, float* err_norm,
                                     float* w_norm) {
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    #pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < N / 32; p++) {
        const bf16* bp = packed + p * K * 32;
        int8_t* qp = q + p * K * 32;
        for (int h = 0; h < 2; h++) {               // outputs 16h .. 16h + 15, one per lane
            __m512 amax = _mm512_setzero_ps(), even, odd;
            for (int64_t kp = 0; kp < K / 2; kp++) {
                bf16_pairs_to_f32(_mm512_loadu_si512(bp + kp * 64 + h * 32), even, odd);
                amax = _mm512_max_ps(amax, _mm512_max_ps(_mm512_and_ps(even, abs_mask),
                                                         _mm512_and_ps(odd, abs_mask)));
            }
            const __mmask16 usable = _mm512_cmp_ps_mask(amax, _mm512_set1_ps(0.f), _CMP_GT_OQ)
                                     & _mm512_cmp_ps_mask(amax, _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
            const __m512 s = _mm512_mask_div_ps(_mm512_set1_ps(1.f), usable, amax,
                                                _mm512_set1_ps(127.f));
            const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), s);
            __m512 e2 = _mm512_setzero_ps(), w2 = _mm512_setzero_ps();
            __m512i sum = _mm512_setzero_si512();
            auto quantize = [&](__m512 v) {          // → q as int32 lanes; sums updated
                __m512 qf = _mm512_roundscale_ps(_mm512_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT);
                qf = _mm512_min_ps(_mm512_max_ps(qf, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f));
                const __m512 e = _mm512_fnmadd_ps(s, qf, v);
                e2 = _mm512_fmadd_ps(e, e, e2);
                w2 = _mm512_fmadd_ps(v, v, w2);
                const __m512i qi = _mm512_cvtps_epi32(qf);
                sum = _mm512_add_epi32(sum, qi);
                return _mm512_and_si512(qi, _mm512_set1_epi32(0xff));
            };
            for (int64_t kq = 0; kq < K / 4; kq++) {  // inputs 4kq .. 4kq + 3: one int32 per lane
                __m512 e0, o0, e1, o1;
                bf16_pairs_to_f32(_mm512_loadu_si512(bp + (2 * kq) * 64 + h * 32), e0, o0);
                bf16_pairs_to_f32(_mm512_loadu_si512(bp + (2 * kq + 1) * 64 + h * 32), e1, o1);
                __m512i quad = quantize(e0);
                quad = _mm512_or_si512(quad, _mm512_slli_epi32(quantize(o0), 8));
                quad = _mm512_or_si512(quad, _mm512_slli_epi32(quantize(e1), 16));
                quad = _mm512_or_si512(quad, _mm512_slli_epi32(quantize(o1), 24));
                _mm512_storeu_si512(qp + kq * 128 + h * 64, quad);
            }
            const int64_t j = p * 32 + h * 16;
            const __m512 up = _mm512_set1_ps(1.f + std::max(1e-3f, std::ldexp((float)K, -22)));
            _mm512_storeu_si512(colsum + j, sum);
            _mm512_storeu_ps(scale + j, s);
            _mm512_storeu_ps(err_norm + j, _mm512_mul_ps(_mm512_sqrt_ps(e2), up));
            _mm512_storeu_ps(w_norm + j, _mm512_mul_ps(_mm512_sqrt_ps(w2), up));
        }
    }
}

struct ScreenRow {          // one row of x, as the screen reads it
    float t;                // the int8 scale of the ordinary dimensions
    float tp_norm;          // ≥ ‖t·p‖
    float r_norm;           // ≥ ‖r‖, plus the slack for the fp32 arithmetic (see above)
    bool exact;             // non-finite input: every panel, exactly
};

// acc += Σ of 4 products u8·s8 per 32-bit lane. In asm: through the intrinsic, GCC 12 moved the
// accumulators of a 10-row tile through the stack on every step (the int8 screen ran at half speed).
static inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
    return acc;
}

// acc[i] += Σ u·q over `quads` groups of four inputs: u the rows of unsigned bytes (row i at
// u + i·ldu), q a panel's int8 weights as [quads][32][4]. The loop every VNNI kernel runs.
template <int R>
__attribute__((always_inline)) static inline void vnni_sums(const uint8_t* u, int64_t ldu,
                                                            const int8_t* q, int64_t quads,
                                                            __m512i (&acc)[R][2]) {
    for (int64_t kq = 0; kq < quads; kq++) {
        const __m512i b0 = _mm512_loadu_si512(q + kq * 128);
        const __m512i b1 = _mm512_loadu_si512(q + kq * 128 + 64);
        for (int i = 0; i < R; i++) {
            int32_t quad;
            std::memcpy(&quad, u + i * ldu + 4 * kq, 4);
            const __m512i a = _mm512_set1_epi32(quad);
            acc[i][0] = dpbusd(acc[i][0], a, b0);
            acc[i][1] = dpbusd(acc[i][1], a, b1);
        }
    }
}

// The int8 estimate of R rows × 32 outputs, unscaled: Σ_k u·q (u = p + 128).
template <int R>
static inline void vnni_tile(const uint8_t* u, int64_t K, const int8_t* qp, int32_t* sums) {
    __m512i acc[R][2];
    for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
    vnni_sums<R>(u, K, qp, K / 4, acc);
    for (int i = 0; i < R; i++) {
        _mm512_storeu_si512(sums + i * 32, acc[i][0]);
        _mm512_storeu_si512(sums + i * 32 + 16, acc[i][1]);
    }
}

// est [R][32] += the outlier pairs' products, exactly as bf16 dot products
template <int R>
static inline void outlier_tile(const bf16* x, int64_t ldx, const bf16* bp, const int* pairs,
                                int n_pairs, float* est) {
    __m512 acc[R][2];
    for (int i = 0; i < R; i++) {
        acc[i][0] = _mm512_loadu_ps(est + i * 32);
        acc[i][1] = _mm512_loadu_ps(est + i * 32 + 16);
    }
    for (int o = 0; o < n_pairs; o++) {
        Pairs b0, b1;
        load_pairs(bp, pairs[o], b0, b1);
        for (int i = 0; i < R; i++) {
            const Pairs a = broadcast_pair(x + i * ldx + 2 * pairs[o]);
            acc[i][0] = dot(acc[i][0], a, b0);
            acc[i][1] = dot(acc[i][1], a, b1);
        }
    }
    for (int i = 0; i < R; i++) {
        _mm512_storeu_ps(est + i * 32, acc[i][0]);
        _mm512_storeu_ps(est + i * 32 + 16, acc[i][1]);
    }
}

// R rows × 32 outputs of one panel: bounds (lo = estimate − bound, hi = estimate + bound), their
// maximum over the panel's outputs written to lo_max / hi_max [row][panel].
template <int R>
static inline void screen_tile(const uint8_t* u, int64_t K, const bf16* x, int64_t ldx,
                               const ScreenRow* rows, const int8_t* qp, const bf16* bp,
                               const int32_t* colsum, const float* scale, const float* err_norm,
                               const float* w_norm, const int* pairs, int n_pairs,
                               float* lo_max, float* hi_max, int64_t ld) {
    alignas(64) int32_t sums[R * 32];
    alignas(64) float est[R * 32];
    vnni_tile<R>(u, K, qp, sums);
    // u = p + 128: take 128·Σq back out (exact in int32), then scale
    const __m512i c0 = _mm512_slli_epi32(_mm512_loadu_si512(colsum), 7);
    const __m512i c1 = _mm512_slli_epi32(_mm512_loadu_si512(colsum + 16), 7);
    const __m512 s0 = _mm512_loadu_ps(scale), s1 = _mm512_loadu_ps(scale + 16);
    for (int i = 0; i < R; i++) {
        const __m512 t = _mm512_set1_ps(rows[i].t);
        const __m512i a0 = _mm512_sub_epi32(_mm512_load_si512(sums + i * 32), c0);
        const __m512i a1 = _mm512_sub_epi32(_mm512_load_si512(sums + i * 32 + 16), c1);
        _mm512_store_ps(est + i * 32, _mm512_mul_ps(_mm512_cvtepi32_ps(a0), _mm512_mul_ps(t, s0)));
        _mm512_store_ps(est + i * 32 + 16,
                        _mm512_mul_ps(_mm512_cvtepi32_ps(a1), _mm512_mul_ps(t, s1)));
    }
    outlier_tile<R>(x, ldx, bp, pairs, n_pairs, est);
    const __m512 e0 = _mm512_loadu_ps(err_norm), e1 = _mm512_loadu_ps(err_norm + 16);
    const __m512 w0 = _mm512_loadu_ps(w_norm), w1 = _mm512_loadu_ps(w_norm + 16);
    for (int i = 0; i < R; i++) {
        const __m512 tp = _mm512_set1_ps(rows[i].tp_norm), rn = _mm512_set1_ps(rows[i].r_norm);
        const __m512 d0 = _mm512_fmadd_ps(tp, e0, _mm512_mul_ps(rn, w0));
        const __m512 d1 = _mm512_fmadd_ps(tp, e1, _mm512_mul_ps(rn, w1));
        const __m512 v0 = _mm512_load_ps(est + i * 32), v1 = _mm512_load_ps(est + i * 32 + 16);
        // max_ps passes its second operand when either is NaN: NaN must survive to the row
        // check, so the running value goes second
        const __m512 lo = _mm512_max_ps(_mm512_sub_ps(v1, d1), _mm512_sub_ps(v0, d0));
        const __m512 hi = _mm512_max_ps(_mm512_add_ps(v1, d1), _mm512_add_ps(v0, d0));
        const bool finite = !_mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q)
                            && !_mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q);
        lo_max[i * ld] = finite ? _mm512_reduce_max_ps(lo) : NAN;
        hi_max[i * ld] = finite ? _mm512_reduce_max_ps(hi) : NAN;
    }
}

static void greedy_head_impl(const bf16* x, int64_t ldx, int64_t M, const bf16* packed,
                             const int8_t* q, const int32_t* colsum, const float* scale,
                             const float* err_norm, const float* w_norm, int64_t N, int64_t K,
                             int64_t* out, int64_t* panels_computed) {
    const int64_t P = N / 32;
    // the outlier pairs: largest |x| over the batch
    std::vector<float> score(K / 2, 0.f);
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) {
            const float a = std::fabs(bf16_to_f32(x[m * ldx + k]));
            if (a > score[k / 2]) score[k / 2] = a;          // (NaN ignored here: see `exact`)
        }
    std::vector<int> order(K / 2);
    for (int64_t i = 0; i < K / 2; i++) order[i] = (int)i;
    const int n_pairs = (int)std::min<int64_t>({OUTLIER_PAIRS, 4 + M / 4, K / 2});
    std::partial_sort(order.begin(), order.begin() + n_pairs, order.end(),
                      [&](int a, int b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
    std::vector<int> pairs(order.begin(), order.begin() + n_pairs);
    std::sort(pairs.begin(), pairs.end());
    std::vector<uint8_t> is_outlier(K, 0);
    for (int p : pairs) is_outlier[2 * p] = is_outlier[2 * p + 1] = 1;

    // the rows, quantized: u = p + 128
    const double slack = std::max(1e-4, std::ldexp(double(K + 64), -22));
    std::vector<uint8_t> u(M * K);
    std::vector<ScreenRow> rows(M);
    for (int64_t m = 0; m < M; m++) {
        const bf16* xr = x + m * ldx;
        float amax = 0.f;
        bool finite = true;
        for (int64_t k = 0; k < K; k++) {
            const float v = bf16_to_f32(xr[k]);
            finite &= std::isfinite(v);
            if (!is_outlier[k]) amax = std::max(amax, std::fabs(v));
        }
        const float t = amax > 0.f ? amax / 127.f : 1.f;
        double tp2 = 0, r2 = 0, x2 = 0;
        for (int64_t k = 0; k < K; k++) {
            const float v = bf16_to_f32(xr[k]);
            int32_t p = 0;
            if (!is_outlier[k] && finite) {
                p = (int32_t)std::min(127.f, std::max(-127.f, std::nearbyint(v / t)));
                const double r = (double)v - (double)t * p;
                tp2 += ((double)t * p) * ((double)t * p);
                r2 += r * r;
            }
            x2 += (double)v * v;
            u[m * K + k] = (uint8_t)(p + 128);
        }
        rows[m] = {t, std::nextafter((float)std::sqrt(tp2), INFINITY),
                   std::nextafter((float)(std::sqrt(r2) + slack * std::sqrt(x2)), INFINITY),
                   !finite};
    }

    std::vector<float> lo_max(M * P), hi_max(M * P);
    for_panel_blocks(P, M, [&](int64_t p, int64_t m0, int64_t n) {
        const int8_t* qp = q + p * K * 32;
        const bf16* bp = packed + p * K * 32;
        const int64_t c = p * 32;
        if (p + 1 < P)          // the next panel's outlier lines: scattered, so no prefetcher's
            for (int o = 0; o < n_pairs; o++) {
                _mm_prefetch((const char*)(bp + K * 32 + pairs[o] * 64), _MM_HINT_T0);
                _mm_prefetch((const char*)(bp + K * 32 + pairs[o] * 64 + 32), _MM_HINT_T0);
            }
        int64_t i = 0;
        auto tile = [&](auto r) {
            constexpr int R = decltype(r)::value;
            screen_tile<R>(u.data() + (m0 + i) * K, K, x + (m0 + i) * ldx, ldx,
                           rows.data() + m0 + i, qp, bp, colsum + c, scale + c, err_norm + c,
                           w_norm + c, pairs.data(), n_pairs, lo_max.data() + (m0 + i) * P + p,
                           hi_max.data() + (m0 + i) * P + p, P);
        };
        for (; i + SCREEN_R <= n; i += SCREEN_R) tile(std::integral_constant<int, SCREEN_R>());
        switch (n - i) {
#define TAIL(r) case r: tile(std::integral_constant<int, r>()); break;
            TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7)
#undef TAIL
        }
    });

    int64_t computed = 0;
    #pragma omp parallel for schedule(dynamic, 1) reduction(+:computed)
    for (int64_t m = 0; m < M; m++) {
        const float* lo = lo_max.data() + m * P;
        const float* hi = hi_max.data() + m * P;
        float lb = -INFINITY, ub = -INFINITY;
        bool exact = rows[m].exact;
        for (int64_t p = 0; p < P && !exact; p++) {
            exact = !std::isfinite(lo[p]) || !std::isfinite(hi[p]);
            lb = std::max(lb, lo[p]);
            ub = std::max(ub, hi[p]);
        }
        // more than two bf16 ulps at any magnitude in play (an ulp is at most |v|·2⁻⁷; γ ≥ |lb|/63
        // is enough, see the note above)
        const float gamma = (std::max(std::fabs(lb), std::fabs(ub)) + 1.f) * (1.f / 32);
        const float threshold = lb - gamma;
        exact |= !std::isfinite(threshold);
        // the first largest bf16 logit over the panels kept (all of them: `every`), and whether
        // a non-finite one was met (then only the full row answers as torch.argmax does)
        const bf16* xr = x + m * ldx;
        auto scan = [&](bool every, bool& nonfinite) {
            bf16 logits[32];
            float best = -INFINITY;
            int64_t best_j = -1;
            for (int64_t p = 0; p < P; p++) {
                if (!every && !(hi[p] >= threshold)) continue;
                gemm_tile<1>(xr, ldx, packed + p * K * 32, K, nullptr, nullptr, logits, 32);
                computed++;
                for (int l = 0; l < 32; l++) {
                    const float v = bf16_to_f32(logits[l]);
                    if (!std::isfinite(v)) nonfinite = true;
                    if (v != v) return p * 32 + l;         // NaN: the first one
                    if (best_j < 0 || v > best) { best = v; best_j = p * 32 + l; }
                }
            }
            return best_j;
        };
        bool nonfinite = false;
        int64_t token = scan(exact, nonfinite);
        if (nonfinite && !exact) token = scan(true, nonfinite);
        out[m] = token;
    }
    if (panels_computed) *panels_computed = computed;
}
#endif

extern "C" int ember_has_greedy_head() {
#if defined(__AVX512VNNI__)
    return 1;
#else
    return 0;
#endif
}

extern "C" void ember_greedy_head_prepare(const bf16* packed, int64_t N, int64_t K, int8_t* q,
                                          int32_t* colsum, float* scale, float* err_norm,
                                          float* w_norm) {
#if defined(__AVX512VNNI__)
    greedy_head_prepare_impl(packed, N, K, q, colsum, scale, err_norm, w_norm);
#endif
}

// x [M, K] bf16 (row stride ldx); packed: the LM head as pack_linear_weight packs it; the rest
// from ember_greedy_head_prepare. out [M] token ids; panels_computed (optional): how many 32-output
// panels were computed exactly, over all rows.
extern "C" void ember_greedy_head(const bf16* x, int64_t ldx, int64_t M, const bf16* packed,
                                  const int8_t* q, const int32_t* colsum, const float* scale,
                                  const float* err_norm, const float* w_norm, int64_t N,
                                  int64_t K, int64_t* out, int64_t* panels_computed) {
#if defined(__AVX512VNNI__)
    greedy_head_impl(x, ldx, M, packed, q, colsum, scale, err_norm, w_norm, N, K, out,
                     panels_computed);
#endif
}

// ---------------------------------------------------------------------------------------------
// linear_w8a8: int8 weights and int8 activations, the products summed by VNNI dot products
// (quantization="w8a8"). Without AVX-512 BF16 a bf16 linear is two FMAs per pair of inputs; one
// vpdpbusd adds four products of 16 outputs, so the same issue slots do four times the work.
//   weights  q_w = round(W / s_w), s_w = max|W_row| / 127: one scale per output (as int8), packed
//            [N/32][K/4][32][4] (four inputs of 32 outputs side by side, as the greedy head's
//            screen reads them), with offsets [N/32][K/64][32] = −128 · Σ q_w over each block of
//            64 inputs (int32).
//   inputs   each row's blocks of 64 values quantized on the fly: s_x = max|x_block| / 127,
//            q_x = round(x · 127 / max|x_block|), stored as u = q_x + 128 (the unsigned operand
//            vpdpbusd takes). Per block rather than per row: one outlier then coarsens 64 values,
//            not the whole row (SmolLM2, teacher-forced argmax agreement with bf16: 95% per
//            block of 64 against 90% per row; weight-only int8: 97%).
//   y[m, n] = s_w[n] · Σ_blocks s_x[m, b] · (Σ_{k∈b} u·q_w + offset[b, n]) + bias[n]
// The int32 sums are exact (|Σ| ≤ 64 · 255 · 127 per block); a block's sum is converted to fp32
// and scaled into a fp32 accumulator. A tile is 5 rows × 32 outputs: 10 int32 and 10 fp32
// accumulators in registers (6 rows: 0.89-0.95x at 1024 rows, 0.98-1.00x at 64; 4 and 7 rows
// slower than 6).
#if defined(__AVX512VNNI__)
constexpr int W8A8_MR = 5;
constexpr int64_t QBLOCK = 64;

// x [M, K] bf16 → u [M, K] (q_x + 128) and s [M, K/64]
static void quantize_blocks(const bf16* x, int64_t ldx, int64_t M, int64_t K, uint8_t* u,
                            float* s) {
    const int64_t nb = K / QBLOCK;
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    #pragma omp parallel for schedule(static) if (M * K > 65536)
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < nb; b++) {
            const bf16* p = x + m * ldx + b * QBLOCK;
            __m512 v[4];
            __m512 amax = _mm512_setzero_ps();
            for (int j = 0; j < 4; j++) {
                v[j] = load16(p + 16 * j);
                amax = _mm512_max_ps(amax, _mm512_and_ps(v[j], abs_mask));
            }
            const float mx = _mm512_reduce_max_ps(amax);
            const float inv = mx > 0.f ? 127.f / mx : 0.f;
            s[m * nb + b] = mx / 127.f;
            for (int j = 0; j < 4; j++) {
                const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[j], _mm512_set1_ps(inv)));
                _mm_storeu_si128((__m128i*)(u + m * K + b * QBLOCK + 16 * j),
                                 _mm512_cvtepi32_epi8(_mm512_add_epi32(q, _mm512_set1_epi32(128))));
            }
        }
    }
}

template <int R>
static inline void w8a8_tile(const uint8_t* u, const float* s, int64_t K, const int8_t* panel,
                             const int32_t* offsets, const float* scale, const bf16* bias,
                             bf16* y, int64_t ldy, const int8_t* next) {
    const int64_t nb = K / QBLOCK;
    __m512 acc[R][2];
    for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m512i o0 = _mm512_loadu_si512(offsets + b * 32);
        const __m512i o1 = _mm512_loadu_si512(offsets + b * 32 + 16);
        __m512i sum[R][2];
        for (int i = 0; i < R; i++) sum[i][0] = o0, sum[i][1] = o1;
        const int8_t* wp = panel + b * QBLOCK * 32;
        const uint8_t* ub = u + b * QBLOCK;
        if (next) {   // the next panel's lines for this block, while this one computes
            for (int l = 0; l < QBLOCK * 32; l += 64)
                _mm_prefetch((const char*)(next + b * QBLOCK * 32 + l), _MM_HINT_T0);
        }
        vnni_sums<R>(ub, K, wp, QBLOCK / 4, sum);
        for (int i = 0; i < R; i++) {
            const __m512 sx = _mm512_set1_ps(s[i * nb + b]);
            acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[i][0]), sx, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[i][1]), sx, acc[i][1]);
        }
    }
    const __m512 s_lo = _mm512_loadu_ps(scale), s_hi = _mm512_loadu_ps(scale + 16);
    const __m512 b_lo = bias ? load16(bias) : _mm512_setzero_ps();
    const __m512 b_hi = bias ? load16(bias + 16) : _mm512_setzero_ps();
    for (int i = 0; i < R; i++) {
        store16(y + i * ldy, _mm512_fmadd_ps(acc[i][0], s_lo, b_lo));
        store16(y + i * ldy + 16, _mm512_fmadd_ps(acc[i][1], s_hi, b_hi));
    }
}

static void w8a8_rows(const uint8_t* u, const float* s, int64_t K, int64_t rows,
                      const int8_t* panel, const int32_t* offsets, const float* scale,
                      const bf16* bias, bf16* y, int64_t ldy, const int8_t* next) {
    const int64_t nb = K / QBLOCK;
    int64_t i = 0;
    for (; i + W8A8_MR <= rows; i += W8A8_MR, next = nullptr)
        w8a8_tile<W8A8_MR>(u + i * K, s + i * nb, K, panel, offsets, scale, bias, y + i * ldy,
                           ldy, next);
    u += i * K;
    s += i * nb;
    y += i * ldy;
    switch (rows - i) {
#define TAIL(r) case r: w8a8_tile<r>(u, s, K, panel, offsets, scale, bias, y, ldy, next); break;
        TAIL(1) TAIL(2) TAIL(3) TAIL(4)
#undef TAIL
    }
}

static void linear_w8a8_impl(const bf16* x, int64_t ldx, const int8_t* packed,
                             const float* scales, const int32_t* offsets, const bf16* bias,
                             bf16* y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
    // the calling thread's buffers, kept from call to call (see tile_input)
    static thread_local std::vector<uint8_t> u_buf;
    static thread_local std::vector<float> s_buf;
    if ((int64_t)u_buf.size() < M * K) u_buf.resize(M * K);
    if ((int64_t)s_buf.size() < M * (K / QBLOCK)) s_buf.resize(M * (K / QBLOCK));
    uint8_t* u = u_buf.data();
    float* s = s_buf.data();
    quantize_blocks(x, ldx, M, K, u, s);
    const int64_t panels = N / 32, nb = K / QBLOCK;
    for_panel_blocks(panels, M, [&](int64_t p, int64_t m0, int64_t rows) {
        w8a8_rows(u + m0 * K, s + m0 * nb, K, rows, packed + p * K * 32, offsets + p * nb * 32,
                  scales + p * 32, bias ? bias + p * 32 : nullptr, y + m0 * ldy + p * 32, ldy,
                  panel_to_fetch(packed, p, panels, K, m0));
    });
}
#endif

extern "C" int ember_has_w8a8() {
#if defined(__AVX512VNNI__)
    return 1;
#else
    return 0;
#endif
}

// x [M, K] bf16 (row stride ldx), K a multiple of 64 and N of 32; packed, scales and offsets from
// kernels.quantize_linear_weight_w8a8; y [M, N] bf16 (row stride ldy).
extern "C" void ember_linear_w8a8(const bf16* x, int64_t ldx, const int8_t* packed,
                                  const float* scales, const int32_t* offsets, const bf16* bias,
                                  bf16* y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
#if defined(__AVX512VNNI__)
    linear_w8a8_impl(x, ldx, packed, scales, offsets, bias, y, ldy, M, N, K);
#endif
}

// ---------------------------------------------------------------------------------------------
// The pair layout of bf16 caches (block size 16, head size a multiple of 32): the
// layout the dot products read, so that attention needs neither horizontal sums nor shuffles.
// Within one block of one KV head (16 positions × D, the same place and size as the row layout's
// [16][D]):
//   keys    [D/2][16][2]   dims (2i, 2i+1) of the 16 positions side by side: one vector holds a
//                          dim pair of every key, and q·k for 16 keys is D/2 dot products with a
//                          broadcast query pair;
//   values  [8][D][2]      positions (2t, 2t+1) side by side per dim: p·v for a pair of keys is
//                          D/16 dot products with the broadcast pair of probabilities.
// kv_write writes it; paged_decode_pairs and paged_prefill read it. pair_layout() is the rule,
// and ember/attention/cpu_paged.py holds the same one (the torch code never reads such a cache).
static inline bool pair_layout(int64_t elem, int64_t bs, int64_t D) {
    return elem == 2 && bs == 16 && D % 32 == 0 && D <= 256;
}

static inline int64_t value_index(int64_t pos, int64_t d, int64_t D) {
    return ((pos / 2) * D + d) * 2 + pos % 2;
}

// ---------------------------------------------------------------------------------------------
// kv_write: token t's keys/values (rows of k and v, stride ldk/ldv) into slot slot_mapping[t] of a
// cache laid out [2, Hkv, num_blocks, bs, D] (the torch backend's head-major layout), each block's
// [bs][D] in rows, or in the pair layout where pair_layout() says so.
extern "C" void ember_kv_write(int64_t elem, const void* k, int64_t ldk, const void* v, int64_t ldv,
                               void* cache, const int64_t* slots, int64_t rows, int64_t hk,
                               int64_t num_slots, int64_t bs, int64_t D) {
    char* c = (char*)cache;
    const int64_t row = D * elem, plane = hk * num_slots * row;
    if (pair_layout(elem, bs, D)) {
        // a key's dim pairs go 16 pairs apart (a scatter); its values fill every other bf16 of
        // the rows it shares with its pair partner (a masked store)
        const __m512i apart = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(16));
        // threads share the rows: the first write to a line of a block waits for the line
        #pragma omp parallel for collapse(2) schedule(static) if (rows * hk > 16)
        for (int64_t t = 0; t < rows; t++)
            for (int64_t h = 0; h < hk; h++) {
                const int64_t block = (h * num_slots + slots[t] / bs * bs) * D, pos = slots[t] % bs;
                const int32_t* kr = (const int32_t*)((const bf16*)k + t * ldk + h * D);
                const bf16* vr = (const bf16*)v + t * ldv + h * D;
                int32_t* keys = (int32_t*)((bf16*)cache + block) + pos;
                bf16* values = (bf16*)(c + plane) + block + value_index(pos, 0, D);
                for (int64_t i = 0; i < D / 2; i += 16)
                    _mm512_i32scatter_epi32(keys + i * 16, apart, _mm512_loadu_si512(kr + i), 4);
                const __mmask32 mine = pos % 2 ? 0xaaaaaaaau : 0x55555555u;
                for (int64_t d = 0; d < D; d += 16) {
                    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(vr + d)));
                    if (pos % 2) u = _mm512_slli_epi32(u, 16);
                    _mm512_mask_storeu_epi16(values + 2 * d - pos % 2, mine, u);
                }
            }
        return;
    }
    #pragma omp parallel for collapse(2) schedule(static) if (rows * hk > 16)
    for (int64_t t = 0; t < rows; t++)
        for (int64_t h = 0; h < hk; h++) {
            const int64_t off = (h * num_slots + slots[t]) * row;
            std::memcpy(c + off, (const char*)k + (t * ldk + h * D) * elem, row);
            std::memcpy(c + plane + off, (const char*)v + (t * ldv + h * D) * elem, row);
        }
}

// ---------------------------------------------------------------------------------------------
// The 16 sums of 16 vectors, as one vector: r[j] = Σ v[j][·]. A tree of in-lane unpacks and
// shuffles (45 instructions) instead of 16 horizontal reductions.
static inline __m512 hsum16(const __m512 v[16]) {
    __m512 u[4];
    for (int g = 0; g < 4; g++) {
        const __m512* a = v + 4 * g;
        // per 128-bit lane: pairs, then quads → lane l of u[g] = (Σ_l a0, Σ_l a1, Σ_l a2, Σ_l a3)
        __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
        __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
        u[g] = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    // across the four lanes: lane g of the result holds u[g]'s lanes summed
    __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
    __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// ---------------------------------------------------------------------------------------------
// Values in bf16 pairs, for p·v by dpbf16 (paged_prefill over a row-layout cache): the values of
// keys 2t and 2t+1 of a block (n keys, rows of D from v) interleaved, 32 dims per pair of
// vectors. Per 128-bit lane unpacklo holds dims 0-3 and unpackhi dims 4-7 of each 8, so sums
// against these stay in that order until store_value_sum puts them back. A missing odd key counts
// as zeros (its row is never read: it may lie past the cache).
template <int NB>
static inline void interleave_value_pairs(const bf16* v, int64_t n, int64_t D,
                                          __m512i pairs[8][2 * NB]) {
    for (int64_t t = 0; t < (n + 1) / 2; t++) {
        const bf16* row = v + 2 * t * D;
        for (int i = 0; i < NB; i++) {
            const __m512i a = _mm512_loadu_si512(row + 32 * i);
            const __m512i c = 2 * t + 1 < n ? _mm512_loadu_si512(row + D + 32 * i)
                                            : _mm512_setzero_si512();
            pairs[t][2 * i] = _mm512_unpacklo_epi16(a, c);
            pairs[t][2 * i + 1] = _mm512_unpackhi_epi16(a, c);
        }
    }
}

// out[0, 16·NV) = acc · inv, acc in dim order (an attention output row: value sums / softmax sum)
template <int NV, typename T>
static inline void store_scaled(const float* acc, float inv, T* out) {
    const __m512 scale = _mm512_set1_ps(inv);
    for (int i = 0; i < NV; i++)
        store16(out + 16 * i, _mm512_mul_ps(_mm512_load_ps(acc + 16 * i), scale));
}

// out[0, 32·NB) = acc · inv, acc in interleave_value_pairs' order
template <int NB>
static inline void store_value_sum(const float* acc, float inv, bf16* out) {
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    const __m512 scale = _mm512_set1_ps(inv);
    for (int i = 0; i < NB; i++) {
        const __m512 lo = _mm512_load_ps(acc + 32 * i), hi = _mm512_load_ps(acc + 32 * i + 16);
        store16(out + 32 * i, _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), scale));
        store16(out + 32 * i + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), scale));
    }
}

// ---------------------------------------------------------------------------------------------
// paged_decode: one query per sequence. For each (sequence, KV head), the G query heads of that
// group walk the sequence's blocks together: a block's keys and values are converted to fp32 once
// (for all G heads), then per head the block's scores against the pre-scaled query, an
// online-softmax update (running max and sum, rescaled per block) and the value sum in fp32. In
// bf16 over a pair-layout cache, paged_decode_pairs (below) serves instead.
template <typename T, int D>
static void paged_decode_heads(const T* q, int64_t ldq, const T* cache, const int32_t* tables,
                               int64_t max_blocks, const int32_t* ctx_lens, T* out, int64_t B,
                               int64_t H, int64_t HK, int64_t num_blocks, int64_t bs, float scale,
                               int64_t window) {
    constexpr int NV = D / 16;
    const int64_t G = H / HK, plane = HK * num_blocks * bs * D;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < HK; h++) {
            const int64_t ctx = ctx_lens[b];
            const int64_t start = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
            alignas(64) float qf[8][D], acc[8][D], kf[16][D], vf[16][D];
            float m[8], l[8];
            for (int64_t g = 0; g < G; g++) {
                const T* qp = q + b * ldq + (h * G + g) * D;
                for (int i = 0; i < NV; i++) {
                    _mm512_store_ps(qf[g] + 16 * i, _mm512_mul_ps(load16(qp + 16 * i),
                                                                  _mm512_set1_ps(scale)));
                    _mm512_store_ps(acc[g] + 16 * i, _mm512_setzero_ps());
                }
                m[g] = -INFINITY;
                l[g] = 0.f;
            }
            for (int64_t blk = start / bs; blk * bs < ctx; blk++) {
                const int64_t j0 = std::max(start, blk * bs), j1 = std::min(ctx, (blk + 1) * bs);
                const int64_t n = j1 - j0;
                const int64_t at = ((h * num_blocks + tables[b * max_blocks + blk]) * bs
                                    + j0 - blk * bs) * D;
                for (int64_t j = 0; j < n; j++)
                    for (int i = 0; i < NV; i++) {
                        _mm512_store_ps(kf[j] + 16 * i, load16(cache + at + j * D + 16 * i));
                        _mm512_store_ps(vf[j] + 16 * i, load16(cache + plane + at + j * D + 16 * i));
                    }
                for (int64_t g = 0; g < G; g++) {
                    __m512 dots[16];
                    __m512 qv[NV];
                    for (int i = 0; i < NV; i++) qv[i] = _mm512_load_ps(qf[g] + 16 * i);
                    for (int64_t j = 0; j < 16; j++) {
                        if (j >= n) { dots[j] = _mm512_setzero_ps(); continue; }
                        dots[j] = _mm512_mul_ps(qv[0], _mm512_load_ps(kf[j]));
                        for (int i = 1; i < NV; i++)
                            dots[j] = _mm512_fmadd_ps(qv[i], _mm512_load_ps(kf[j] + 16 * i), dots[j]);
                    }
                    const __m512 scores = hsum16(dots);
                    const __mmask16 valid = (__mmask16)((1u << n) - 1);
                    const __m512 sv = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY), scores);
                    const float mx = std::max(m[g], _mm512_reduce_max_ps(sv));
                    const float corr = std::exp(m[g] - mx);
                    const __m512 p = _mm512_maskz_mov_ps(valid,
                                                         exp16(_mm512_sub_ps(sv, _mm512_set1_ps(mx))));
                    l[g] = l[g] * corr + _mm512_reduce_add_ps(p);
                    m[g] = mx;
                    __m512 a[NV];
                    for (int i = 0; i < NV; i++)
                        a[i] = _mm512_mul_ps(_mm512_load_ps(acc[g] + 16 * i), _mm512_set1_ps(corr));
                    alignas(64) float pj[16];
                    _mm512_store_ps(pj, p);
                    for (int64_t j = 0; j < n; j++) {
                        const __m512 pv = _mm512_set1_ps(pj[j]);
                        for (int i = 0; i < NV; i++)
                            a[i] = _mm512_fmadd_ps(pv, _mm512_load_ps(vf[j] + 16 * i), a[i]);
                    }
                    for (int i = 0; i < NV; i++) _mm512_store_ps(acc[g] + 16 * i, a[i]);
                }
            }
            for (int64_t g = 0; g < G; g++)
                store_scaled<NV>(acc[g], 1.f / l[g], out + (b * H + h * G + g) * D);
        }
}

// ---------------------------------------------------------------------------------------------
// paged_decode_pairs: one query per sequence over a pair-layout cache. A (sequence, KV head) item
// walks its blocks in chunks of up to C keys, three passes per chunk, each a loop of independent
// work (a softmax update per block would be one long chain of reductions):
//   (1) scores for the G query heads: per dim pair, one key vector (16 keys) against each head's
//       broadcast query pair, two blocks at a time (2·SG accumulators), then scaled, as torch's
//       bf16 matmul does;
//   (2) per head, one online-softmax update over the chunk (one max, one rescale); probabilities
//       rounded to bf16, as torch's bf16 attention multiplies them by V;
//   (3) p·v: each value vector (16 dims of a key pair) is loaded once for PG heads at a time.
// Attention at decode is bound by reading the cache (W1: 64 sequences × ~200 keys × 30 layers,
// ~280 MB a step), and its blocks lie anywhere, out of the hardware prefetcher's reach. So while
// an item computes, it requests blocks further on into L2, a line at a time spread over its own
// loops (ItemPrefetch: as many lines per block it reads as a block has), so that the loads stream
// at the memory's pace instead of in bursts: its own blocks from LEAD on, then the next item's
// first LEAD (items are handed out one ahead from an atomic counter, dynamically, so long and
// short sequences still balance, and the next item is known). LEAD blocks of keys and values
// make 128 KB, a part of L2 (a whole next item ahead, unbounded, made a layer of 4 sequences ×
// 4,000 keys 1.9× slower); a thread's first item fetches its own first LEAD blocks at once.
struct ItemPrefetch {
    const char* keys;             // the cache's key plane; values lie `plane` bytes further
    int64_t plane, head_blocks, lines;   // bytes of a plane; blocks of one KV head; lines of a
                                         // block's keys (as many for its values)
    const int32_t* blocks = nullptr;     // the blocks being fetched, of KV head `head`
    int64_t head = 0, count = 0, blk = 0, line = 0;
    const int32_t* then_blocks = nullptr;   // fetched once those are done
    int64_t then_head = 0, then_count = 0;

    inline void step() {          // one more line, if any is left
        if (blk >= count) {
            if (then_count == 0) return;
            blocks = then_blocks, head = then_head, count = then_count;
            then_count = blk = line = 0;
        }
        const char* block = keys + (head * head_blocks + blocks[blk]) * lines * 64;
        _mm_prefetch(line < lines ? block + line * 64 : block + plane + (line - lines) * 64,
                     _MM_HINT_T1);
        if (++line == 2 * lines) line = 0, blk++;
    }
};

template <int D>
static void paged_decode_pairs(const bf16* q, int64_t ldq, const bf16* cache, const int32_t* tables,
                               int64_t max_blocks, const int32_t* ctx_lens, bf16* out, int64_t B,
                               int64_t H, int64_t HK, int64_t num_blocks, float scale,
                               int64_t window) {
    constexpr int64_t BS = 16, NV = D / 16, DP = D / 2, C = 128;
    constexpr int64_t LEAD = (128 << 10) / (2 * BS * D * 2);   // blocks fetched ahead: 128 KB
    constexpr int SG = 4;                        // heads per score pass (× 2 blocks: 8 chains)
    constexpr int PG = NV >= 16 ? 1 : 16 / NV;   // heads per p·v pass (PG · NV accumulators)
    const int64_t G = H / HK, plane = HK * num_blocks * BS * D, items = B * HK;
    auto first_block = [&](int64_t b) {
        return window > 0 ? std::max<int64_t>(0, ctx_lens[b] - window) / BS : int64_t(0);
    };
    std::atomic<int64_t> claimed{0};
    #pragma omp parallel
    for (int64_t item = claimed.fetch_add(1), next, first = 1; item < items; item = next, first = 0) {
        next = claimed.fetch_add(1);
        const int64_t b = item / HK, h = item % HK, ctx = ctx_lens[b];
        const int64_t start = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
        const int32_t* table = tables + b * max_blocks;
        const int64_t own = start / BS, own_blocks = (ctx + BS - 1) / BS - own;
        ItemPrefetch ahead{(const char*)cache, plane * 2, num_blocks, BS * D * 2 / 64};
        if (first) {          // nothing fetched this item's first blocks: now, at once
            ahead.blocks = table + own, ahead.head = h, ahead.count = std::min(LEAD, own_blocks);
            while (ahead.blk < ahead.count) ahead.step();
            ahead.blk = ahead.line = 0;
        }
        ahead.blocks = table + own + LEAD, ahead.head = h;
        ahead.count = std::max<int64_t>(0, own_blocks - LEAD);
        if (next < items) {
            const int64_t nb = next / HK, nf = first_block(nb);
            ahead.then_blocks = tables + nb * max_blocks + nf, ahead.then_head = next % HK;
            ahead.then_count = std::min(LEAD, (ctx_lens[nb] + BS - 1) / BS - nf);
        }
        alignas(64) float acc[8][D], s[8][C];
        alignas(64) DotInput p[8][C], qp[8][D];   // probabilities; each head's query
        float m[8], l[8];
        for (int64_t g = 0; g < G; g++) {
            m[g] = -INFINITY;
            l[g] = 0.f;
            to_dot_input(q + b * ldq + (h * G + g) * D, qp[g], D);
            for (int i = 0; i < NV; i++) _mm512_store_ps(acc[g] + 16 * i, _mm512_setzero_ps());
        }
        auto block_at = [&](int64_t blk) {       // the item's block blk (keys; values + plane)
            return cache + ((h * num_blocks + table[blk]) * BS) * D;
        };
        for (int64_t c0 = start / BS * BS; c0 < ctx; c0 += C) {
            const int64_t nblk = (std::min(ctx, c0 + C) - c0 + BS - 1) / BS, blk0 = c0 / BS;
            // (1) scores
            for (int64_t g0 = 0; g0 < G; g0 += SG)
                for (int64_t i = 0; i < nblk; i += 2) {
                    const bool two = i + 1 < nblk;
                    const bf16* k0 = block_at(blk0 + i);
                    const bf16* k1 = two ? block_at(blk0 + i + 1) : k0;
                    __m512 s0[SG], s1[SG];
                    for (int u = 0; u < SG; u++) s0[u] = s1[u] = _mm512_setzero_ps();
                    for (int dp = 0; dp < DP; dp++) {
                        if (g0 == 0) ahead.step(), ahead.step();
                        const Pairs ka = load_pairs(k0 + dp * 32);
                        const Pairs kb = load_pairs(k1 + dp * 32);
                        for (int u = 0; u < SG; u++)
                            if (g0 + u < G) {
                                const Pairs qq = broadcast_pair(qp[g0 + u] + 2 * dp);
                                s0[u] = dot(s0[u], qq, ka);
                                s1[u] = dot(s1[u], qq, kb);
                            }
                    }
                    const __m512 sc = _mm512_set1_ps(scale);
                    for (int u = 0; u < SG; u++)
                        if (g0 + u < G) {
                            _mm512_store_ps(s[g0 + u] + i * BS, _mm512_mul_ps(s0[u], sc));
                            if (two) _mm512_store_ps(s[g0 + u] + i * BS + BS, _mm512_mul_ps(s1[u], sc));
                        }
                }
            // (2) the softmax update; keys before start or from ctx on get probability 0
            auto valid = [&](int64_t j) {          // of keys c0 + j .. c0 + j + 15
                const int64_t lo = std::max<int64_t>(start - c0 - j, 0);
                const int64_t hi = std::min<int64_t>(ctx - c0 - j, 16);
                const uint32_t below_hi = hi >= 16 ? 0xffffu : (1u << hi) - 1;
                return (__mmask16)(below_hi & ~((1u << lo) - 1));
            };
            float corr[8];
            for (int64_t g = 0; g < G; g++) {
                __m512 mx = _mm512_set1_ps(m[g]);
                for (int64_t j = 0; j < nblk * BS; j += BS)
                    mx = _mm512_mask_max_ps(mx, valid(j), mx, _mm512_load_ps(s[g] + j));
                const float mnew = _mm512_reduce_max_ps(mx);
                corr[g] = std::exp(m[g] - mnew);
                __m512 sum = _mm512_setzero_ps();
                for (int64_t j = 0; j < nblk * BS; j += BS) {
                    const __m512 e = _mm512_maskz_mov_ps(
                        valid(j), exp16(_mm512_sub_ps(_mm512_load_ps(s[g] + j), _mm512_set1_ps(mnew))));
                    sum = _mm512_add_ps(sum, e);
                    store_dot_input(p[g] + j, e);
                }
                l[g] = l[g] * corr[g] + _mm512_reduce_add_ps(sum);
                m[g] = mnew;
            }
            // (3) p·v straight from the value pairs
            for (int64_t g0 = 0; g0 < G; g0 += PG) {
                __m512 a[PG][NV];
                for (int u = 0; u < PG; u++)
                    if (g0 + u < G)
                        for (int j = 0; j < NV; j++)
                            a[u][j] = _mm512_mul_ps(_mm512_load_ps(acc[g0 + u] + 16 * j),
                                                    _mm512_set1_ps(corr[g0 + u]));
                for (int64_t i = 0; i < nblk; i++) {
                    const bf16* vb = block_at(blk0 + i) + plane;
                    for (int64_t t = 0; t < BS / 2; t++) {
                        if (g0 == 0)
                            for (int j = 0; j < NV; j++) ahead.step();
                        Pairs vv[NV];
                        for (int j = 0; j < NV; j++) vv[j] = load_pairs(vb + t * 2 * D + 32 * j);
                        for (int u = 0; u < PG; u++)
                            if (g0 + u < G) {
                                const Pairs pp = broadcast_pair(p[g0 + u] + i * BS + 2 * t);
                                for (int j = 0; j < NV; j++) a[u][j] = dot(a[u][j], pp, vv[j]);
                            }
                    }
                }
                for (int u = 0; u < PG; u++)
                    if (g0 + u < G)
                        for (int j = 0; j < NV; j++) _mm512_store_ps(acc[g0 + u] + 16 * j, a[u][j]);
            }
        }
        for (int64_t g = 0; g < G; g++)
            store_scaled<NV>(acc[g], 1.f / l[g], out + (b * H + h * G + g) * D);
    }
}

template <typename T>
static void paged_decode_impl(const T* q, int64_t ldq, const T* cache, const int32_t* tables,
                              int64_t max_blocks, const int32_t* ctx_lens, T* out, int64_t B,
                              int64_t H, int64_t HK, int64_t num_blocks, int64_t bs, int64_t D,
                              float scale, int64_t window) {
    if constexpr (std::is_same<T, bf16>::value)
        if (pair_layout(sizeof(T), bs, D))
            switch (D) {
#define HEAD(d) case d: paged_decode_pairs<d>(q, ldq, cache, tables, max_blocks, ctx_lens, out, B, \
                                              H, HK, num_blocks, scale, window); return;
                HEAD(32) HEAD(64) HEAD(96) HEAD(128) HEAD(160) HEAD(192) HEAD(256)
#undef HEAD
            }
    switch (D) {      // head sizes as compile-time constants: the accumulators stay in registers
#define HEAD(d) case d: paged_decode_heads<T, d>(q, ldq, cache, tables, max_blocks, ctx_lens, out, \
                                                 B, H, HK, num_blocks, bs, scale, window); break;
        HEAD(16) HEAD(32) HEAD(48) HEAD(64) HEAD(80) HEAD(96) HEAD(112) HEAD(128) HEAD(160)
        HEAD(192) HEAD(256)
#undef HEAD
    }
}

extern "C" void ember_paged_decode(int dtype, const void* q, int64_t ldq, const void* cache,
                                   const int32_t* tables, int64_t max_blocks,
                                   const int32_t* ctx_lens, void* out, int64_t B, int64_t H,
                                   int64_t HK, int64_t num_blocks, int64_t bs, int64_t D,
                                   float scale, int64_t window) {
    if (dtype == 1)
        paged_decode_impl((const bf16*)q, ldq, (const bf16*)cache, tables, max_blocks, ctx_lens,
                          (bf16*)out, B, H, HK, num_blocks, bs, D, scale, window);
    else
        paged_decode_impl((const float*)q, ldq, (const float*)cache, tables, max_blocks, ctx_lens,
                          (float*)out, B, H, HK, num_blocks, bs, D, scale, window);
}

// ---------------------------------------------------------------------------------------------
// paged_prefill (bf16, head size a multiple of 32, no sliding window): a work item is a tile of
// consecutive query rows of one request (tile_starts[t] .. [t+1]; row i sees context[i] keys) and
// one KV head, so that each key block serves the tile's rows × G heads in the pair layout: keys
// as [D/2][16 keys] bf16 pairs (q·k for 16 keys is then D/2 dot products with a broadcast query
// pair: no horizontal sums), values in key pairs. A pair-layout cache holds its blocks so; from a
// row-layout cache (other block sizes) each block is rearranged once per tile (PAIRS false).
// Blocks go in chunks of up to CB; per chunk, four query vectors at a time: the scores of all the
// chunk's keys, one online-softmax update per query over the whole chunk, then p·v (the update's
// reductions are chains of dependent instructions: once per chunk, not once per block).
constexpr int PREFILL_MAX_Q = 32;          // query vectors (rows × G) a tile may hold

template <int D, bool PAIRS>
static void paged_prefill_heads(const bf16* q, int64_t ldq, const bf16* cache,
                                const int32_t* tables, int64_t max_blocks, const int32_t* ctx_lens,
                                const int32_t* tile_starts, int64_t num_tiles, bf16* out,
                                int64_t H, int64_t HK, int64_t num_blocks, int64_t bs, float scale) {
    constexpr int NB = D / 32, NV = D / 16, DP = D / 2, CB = D <= 128 ? 4 : 2;
    const int64_t G = H / HK, plane = HK * num_blocks * bs * D;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t t = 0; t < num_tiles; t++)
        for (int64_t h = 0; h < HK; h++) {
            const int64_t r0 = tile_starts[t], nq = (tile_starts[t + 1] - r0) * G;
            const int64_t last = ctx_lens[tile_starts[t + 1] - 1];
            const int32_t* table = tables + r0 * max_blocks;
            alignas(64) float acc[PREFILL_MAX_Q][D];
            alignas(64) int32_t kt[PAIRS ? 1 : CB][DP][16];          // the row layout's blocks,
            alignas(64) __m512i vpairs[PAIRS ? 1 : CB][8][2 * NB];   // rearranged
            const __m512i* kblk[CB];        // per block: [DP] vectors of 16 keys' dim pairs
            const __m512i* vblk[CB];        // per block: [8][2·NB] vectors of 16 dims × key pair
            float m[PREFILL_MAX_Q], l[PREFILL_MAX_Q];
            alignas(64) DotInput qrow[PREFILL_MAX_Q][D];  // query vector v: row v / G, head v % G
            int64_t ctx[PREFILL_MAX_Q];
            for (int64_t v = 0; v < nq; v++) {
                const int64_t row = r0 + v / G;
                to_dot_input(q + row * ldq + (h * G + v % G) * D, qrow[v], D);
                ctx[v] = ctx_lens[row];
                m[v] = -INFINITY;
                l[v] = 0.f;
                for (int i = 0; i < NV; i++) _mm512_store_ps(acc[v] + 16 * i, _mm512_setzero_ps());
            }
            const __m512i key_offsets = _mm512_mullo_epi32(
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                _mm512_set1_epi32(DP));                      // key j's row, in int32 units
            const int64_t num_blk = (last + bs - 1) / bs;
            for (int64_t c0 = 0; c0 < num_blk; c0 += CB) {
                const int64_t nb = std::min<int64_t>(CB, num_blk - c0);
                for (int64_t i = 0; i < nb; i++) {
                    const int64_t j0 = (c0 + i) * bs, n = std::min(last, j0 + bs) - j0;
                    const int64_t at = ((h * num_blocks + table[c0 + i]) * bs) * D;
                    if (PAIRS) {            // already so in the cache
                        kblk[i] = (const __m512i*)(cache + at);
                        vblk[i] = (const __m512i*)(cache + plane + at);
                        continue;
                    }
                    const __mmask16 present = (__mmask16)((1u << n) - 1);
                    const int32_t* kb = (const int32_t*)(cache + at);
                    for (int dp = 0; dp < DP; dp++)
                        _mm512_store_si512(kt[i][dp], _mm512_mask_i32gather_epi32(
                            _mm512_setzero_si512(), present, key_offsets, kb + dp, 4));
                    interleave_value_pairs<NB>(cache + plane + at, n, D, vpairs[i]);
                    kblk[i] = (const __m512i*)kt[i];
                    vblk[i] = vpairs[i][0];
                }
                for (int64_t v0 = 0; v0 < nq; v0 += 4) {
                    const int64_t nv = std::min<int64_t>(4, nq - v0);
                    __m512 s[4][CB];
                    for (int64_t i = 0; i < nb; i++) {
                        for (int u = 0; u < 4; u++) s[u][i] = _mm512_setzero_ps();
                        for (int dp = 0; dp < DP; dp++) {
                            const Pairs k = load_pairs(kblk[i] + dp);
                            for (int u = 0; u < 4; u++)
                                if (u < nv)
                                    s[u][i] = dot(s[u][i], broadcast_pair(qrow[v0 + u] + 2 * dp), k);
                        }
                    }
                    for (int u = 0; u < nv; u++) {
                        const int64_t v = v0 + u;
                        __mmask16 valid[CB];
                        __m512 mx = _mm512_set1_ps(m[v]);
                        for (int64_t i = 0; i < nb; i++) {
                            const int64_t nk = std::min(ctx[v], (c0 + i + 1) * bs) - (c0 + i) * bs;
                            valid[i] = nk <= 0 ? (__mmask16)0 : (__mmask16)((1u << nk) - 1);
                            s[u][i] = _mm512_mul_ps(s[u][i], _mm512_set1_ps(scale));
                            mx = _mm512_mask_max_ps(mx, valid[i], mx, s[u][i]);
                        }
                        if (!valid[0]) continue;                 // this row ends earlier
                        const float mnew = _mm512_reduce_max_ps(mx);
                        const float corr = std::exp(m[v] - mnew);
                        __m512 sum = _mm512_setzero_ps();
                        alignas(64) DotInput pb[CB][16];
                        for (int64_t i = 0; i < nb; i++) {
                            const __m512 pr = _mm512_maskz_mov_ps(
                                valid[i], exp16(_mm512_sub_ps(s[u][i], _mm512_set1_ps(mnew))));
                            sum = _mm512_add_ps(sum, pr);
                            store_dot_input(pb[i], pr);
                        }
                        l[v] = l[v] * corr + _mm512_reduce_add_ps(sum);
                        m[v] = mnew;
                        __m512 a0[NV], a1[NV];
                        for (int i = 0; i < NV; i++) {
                            a0[i] = _mm512_mul_ps(_mm512_load_ps(acc[v] + 16 * i), _mm512_set1_ps(corr));
                            a1[i] = _mm512_setzero_ps();
                        }
                        for (int64_t i = 0; i < nb; i++) {
                            const int64_t npairs = (std::min<int64_t>(ctx[v] - (c0 + i) * bs, bs) + 1) / 2;
                            for (int64_t p = 0; p < npairs; p += 2) {
                                const Pairs p0 = broadcast_pair(pb[i] + 2 * p);
                                for (int j = 0; j < NV; j++)
                                    a0[j] = dot(a0[j], p0, load_pairs(vblk[i] + p * NV + j));
                                if (p + 1 < npairs) {
                                    const Pairs p1 = broadcast_pair(pb[i] + 2 * p + 2);
                                    for (int j = 0; j < NV; j++)
                                        a1[j] = dot(a1[j], p1, load_pairs(vblk[i] + (p + 1) * NV + j));
                                }
                            }
                        }
                        for (int i = 0; i < NV; i++)
                            _mm512_store_ps(acc[v] + 16 * i, _mm512_add_ps(a0[i], a1[i]));
                    }
                }
            }
            for (int64_t v = 0; v < nq; v++) {
                bf16* o = out + ((r0 + v / G) * H + h * G + v % G) * D;
                if (PAIRS)          // sums in dim order
                    store_scaled<NV>(acc[v], 1.f / l[v], o);
                else
                    store_value_sum<NB>(acc[v], 1.f / l[v], o);
            }
        }
}

// Returns 0 where it cannot serve (not bf16, head size, tile too large): the caller then uses
// paged_decode row by row. out rows are laid out [rows, H, D] like q's heads.
extern "C" int ember_paged_prefill(const void* q, int64_t ldq, const void* cache,
                                   const int32_t* tables, int64_t max_blocks,
                                   const int32_t* ctx_lens, const int32_t* tile_starts,
                                   int64_t num_tiles, void* out, int64_t H, int64_t HK,
                                   int64_t num_blocks, int64_t bs, int64_t D, float scale) {
    for (int64_t t = 0; t < num_tiles; t++)
        if ((tile_starts[t + 1] - tile_starts[t]) * (H / HK) > PREFILL_MAX_Q) return 0;
    switch (D) {
#define HEAD(d) case d: \
        if (pair_layout(2, bs, d)) \
            paged_prefill_heads<d, true>((const bf16*)q, ldq, (const bf16*)cache, tables, \
                max_blocks, ctx_lens, tile_starts, num_tiles, (bf16*)out, H, HK, num_blocks, bs, \
                scale); \
        else \
            paged_prefill_heads<d, false>((const bf16*)q, ldq, (const bf16*)cache, tables, \
                max_blocks, ctx_lens, tile_starts, num_tiles, (bf16*)out, H, HK, num_blocks, bs, \
                scale); \
        return 1;
        HEAD(32) HEAD(64) HEAD(96) HEAD(128) HEAD(160) HEAD(192) HEAD(256)
#undef HEAD
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------
// decode_layers: every decoder layer of a Llama-family model for a batch of decodes (one token per
// sequence), bf16, in one call: the same steps as LlamaDecoderLayer.forward, through the kernels
// above, so a decode step costs one call instead of a dozen per layer. x [B, H] holds the
// embeddings on entry and the last layer's output on return; residual [B, H] the running sum.
struct LayerWeights {              // filled by ember/kernels/cpu/llama_decode.py
    const bf16 *input_norm, *post_norm;        // [H]
    const void *qkv;                           // packed [Q + 2·KV, H]
    const bf16 *qkv_bias;                      // [Q + 2·KV] or null
    const bf16 *q_norm, *k_norm;               // [D] or null (Qwen3's per-head norms)
    const void *o, *gate_up, *down;            // packed [H, Q], [2·I, H], [H, I]
    const float *qkv_scale, *o_scale, *gate_up_scale, *down_scale;   // int8 weights, else null
    bf16* kv_cache;                            // [2, HK, num_blocks, block_size, D]
    const int32_t *qkv_offsets, *o_offsets, *gate_up_offsets, *down_offsets;  // W8A8, else null
};

// a packed linear of any weight kind: W8A8 when it has offsets, else int8 when it has scales
static void packed_linear(const bf16* x, int64_t ldx, const void* w, const float* scale,
                          const int32_t* offsets, const bf16* bias, bf16* y, int64_t ldy,
                          int64_t M, int64_t N, int64_t K) {
    if (offsets) ember_linear_w8a8(x, ldx, (const int8_t*)w, scale, offsets, bias, y, ldy, M, N, K);
    else if (scale) ember_linear_w8(x, ldx, (const int8_t*)w, scale, bias, y, ldy, M, N, K);
    else ember_linear_bf16(x, ldx, (const bf16*)w, bias, y, ldy, M, N, K);
}

struct DecodeShape {
    int64_t hidden, heads, kv_heads, head_dim, inter, num_blocks, block_size, window;
    float eps, scale;
};

extern "C" void ember_decode_layers(const LayerWeights* layers, int64_t num_layers,
                                    const DecodeShape* s, bf16* x, bf16* residual, int64_t B,
                                    const int64_t* positions, const bf16* cos_sin,
                                    const int64_t* slots, const int32_t* tables,
                                    int64_t max_blocks, const int32_t* ctx_lens) {
    const int64_t H = s->hidden, D = s->head_dim, Q = s->heads * D, KV = s->kv_heads * D;
    const int64_t QKV = Q + 2 * KV, I = s->inter;
    bf16 *h = new bf16[B * H], *qkv = new bf16[B * QKV], *q = new bf16[B * Q],
         *k = new bf16[B * KV], *attn = new bf16[B * Q],
         *act = new bf16[B * I], *gate_up = nullptr;   // [B, 2I]: W8A8's product before SiLU
    for (int64_t l = 0; l < num_layers; l++) {
        const LayerWeights& w = layers[l];
        if (l == 0) {
            std::memcpy(residual, x, B * H * sizeof(bf16));
            rms_norm_impl<bf16>(x, nullptr, nullptr, w.input_norm, h, B, H, s->eps);
        } else {
            rms_norm_impl<bf16>(x, residual, residual, w.input_norm, h, B, H, s->eps);
        }
        packed_linear(h, H, w.qkv, w.qkv_scale, w.qkv_offsets, w.qkv_bias, qkv, QKV, B, QKV, H);
        if (w.q_norm) {                // in place, head by head: each head's D values are a row
            for (int64_t t = 0; t < B; t++) {
                rms_norm_impl<bf16>(qkv + t * QKV, nullptr, nullptr, w.q_norm, qkv + t * QKV,
                                    s->heads, D, s->eps);
                rms_norm_impl<bf16>(qkv + t * QKV + Q, nullptr, nullptr, w.k_norm,
                                    qkv + t * QKV + Q, s->kv_heads, D, s->eps);
            }
        }
        rotary_impl<bf16>(qkv, QKV, qkv + Q, QKV, q, k, positions, cos_sin, B, s->heads,
                          s->kv_heads, D);
        ember_kv_write(sizeof(bf16), k, KV, qkv + Q + KV, QKV, w.kv_cache, slots, B, s->kv_heads,
                       s->num_blocks * s->block_size, s->block_size, D);
        paged_decode_impl<bf16>(q, Q, w.kv_cache, tables, max_blocks, ctx_lens, attn, B, s->heads,
                                s->kv_heads, s->num_blocks, s->block_size, D, s->scale, s->window);
        packed_linear(attn, Q, w.o, w.o_scale, w.o_offsets, nullptr, x, H, B, H, Q);
        rms_norm_impl<bf16>(x, residual, residual, w.post_norm, h, B, H, s->eps);
        if (w.gate_up_offsets) {
            if (!gate_up) gate_up = new bf16[B * 2 * I];
            packed_linear(h, H, w.gate_up, w.gate_up_scale, w.gate_up_offsets, nullptr, gate_up,
                          2 * I, B, 2 * I, H);
            ember_silu_mul(1, gate_up, act, B, I);
        } else {
            ember_linear_silu(h, H, w.gate_up, w.gate_up_scale, act, I, B, I, H);
        }
        packed_linear(act, I, w.down, w.down_scale, w.down_offsets, nullptr, x, H, B, H, I);
    }
    delete[] h; delete[] qkv; delete[] q; delete[] k; delete[] attn; delete[] act;
    delete[] gate_up;
}
