/* W4A16 matmul for a few rows on x86 CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids and later).
 *
 * y[m, n] = sum_g scale[g, n] * (sum_{k in g} c[n, k] * x[m, k])  -  zs[g, n] * (sum_{k in g} x[m, k])
 *
 * with c = q - 8 the signed 4-bit code (q in [0, 15] as stored), x bf16 activations, scale and
 * zs = scale * zero_point in fp32 (zs may be NULL: symmetric). Each code becomes the exact bf16
 * value of c through a 16-entry table (vpermw), and vdpbf16ps multiplies 16 rows x 2 columns of
 * codes by a pair of activations per instruction, accumulating in fp32; the group's scale is
 * applied once per group, not per weight. That is about 8 instructions per 64 weights, against
 * PyTorch's _weight_int4pack_mm_for_cpu, which converts every weight to fp32 and multiplies
 * it by its scale first (1.8-2.7x slower at batch 1 on an AMD EPYC with AVX512-BF16).
 *
 * Packed layout (built by compressor.kernels.cpu_int4_avx512.pack_w4): rows in tiles of 64,
 * columns in quads of 4; for each (tile, quad) 128 bytes, 32 per 16-row subtile t. Byte 2j+s of
 * subtile t holds row 64*tile + 16*t + j: column 4*quad + s in the low nibble, column
 * 4*quad + 2 + s in the high nibble. So one 32-byte load widened to 16-bit lanes gives, by
 * nibble, the (column pair, row) layout vdpbf16ps wants, and the weight is read front to back.
 *
 * w4a16_gated_mlp runs a whole gated MLP, down(silu(gate(x)) * up(x)), in one call (see
 * compressor.kernels.gated_mlp): at batch 1 that saves four Python-level steps per block.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 1 when this CPU can run w4a16_matmul (the library itself builds on any x86-64 GCC/Clang). */
int w4a16_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* One input row's 64 outputs of row tile `tile`, in fp32 (o[0..3], 16 rows each). */
AVX512_BF16 static inline __attribute__((always_inline)) void tile_row(
    const uint16_t *xm, const uint8_t *packed, const float *scale, const float *zs, const float *xsum_m,
    int64_t N, int64_t K, int64_t group, int64_t tile, __m512 o[4]) {
    /* entry q is the bf16 bit pattern of q - 8 (entries 16..31 are never indexed) */
    const __m512i lut = _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000,
        (short)0xBF80, (short)0xC000, (short)0xC040, (short)0xC080,
        (short)0xC0A0, (short)0xC0C0, (short)0xC0E0, (short)0xC100);
    const __m512i low_nibble = _mm512_set1_epi16(0x000F);
    const int64_t quads = K / 4, group_quads = group / 4, groups = K / group;
    const uint8_t *p = packed + tile * quads * 128; /* the tile stays in L2 for the next row */
    __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
    for (int64_t g = 0; g < groups; ++g) {
        /* two accumulators per subtile (low / high nibbles): 8 independent chains */
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        const uint32_t *pairs = (const uint32_t *)(xm + g * group);
        for (int64_t q = 0; q < group_quads; ++q, p += 128) {
            const __m512bh xa = (__m512bh)_mm512_set1_epi32((int)pairs[2 * q]);
            const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)pairs[2 * q + 1]);
#define W4A16_STEP(T, A, B)                                                                        \
    {                                                                                              \
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + 32 * T))); \
        A = _mm512_dpbf16_ps(A, (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(w, low_nibble), lut), xa); \
        B = _mm512_dpbf16_ps(B, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), lut), xb); \
    }
            W4A16_STEP(0, a0, b0)
            W4A16_STEP(1, a1, b1)
            W4A16_STEP(2, a2, b2)
            W4A16_STEP(3, a3, b3)
#undef W4A16_STEP
        }
        const float *s = scale + g * N + tile * 64;
        o0 = _mm512_fmadd_ps(_mm512_add_ps(a0, b0), _mm512_loadu_ps(s), o0);
        o1 = _mm512_fmadd_ps(_mm512_add_ps(a1, b1), _mm512_loadu_ps(s + 16), o1);
        o2 = _mm512_fmadd_ps(_mm512_add_ps(a2, b2), _mm512_loadu_ps(s + 32), o2);
        o3 = _mm512_fmadd_ps(_mm512_add_ps(a3, b3), _mm512_loadu_ps(s + 48), o3);
        if (zs) {
            const float *z = zs + g * N + tile * 64;
            const __m512 total = _mm512_set1_ps(xsum_m[g]);
            o0 = _mm512_fnmadd_ps(_mm512_loadu_ps(z), total, o0);
            o1 = _mm512_fnmadd_ps(_mm512_loadu_ps(z + 16), total, o1);
            o2 = _mm512_fnmadd_ps(_mm512_loadu_ps(z + 32), total, o2);
            o3 = _mm512_fnmadd_ps(_mm512_loadu_ps(z + 48), total, o3);
        }
    }
    o[0] = o0, o[1] = o1, o[2] = o2, o[3] = o3;
}

AVX512_BF16 static inline void store_bf16(uint16_t *o, const __m512 v[4]) { /* round to nearest even */
    for (int i = 0; i < 4; ++i) _mm256_storeu_si256((__m256i *)(o + 16 * i), (__m256i)_mm512_cvtneps_pbh(v[i]));
}

AVX512_BF16 static void tile_rows(const uint16_t *x, const uint8_t *packed, const float *scale, const float *zs,
                                  const float *xsum, int64_t M, int64_t N, int64_t K, int64_t group, uint16_t *out,
                                  int64_t tile) {
    const int64_t groups = K / group;
    for (int64_t m = 0; m < M; ++m) {
        __m512 o[4];
        tile_row(x + m * K, packed, scale, zs, xsum ? xsum + m * groups : NULL, N, K, group, tile, o);
        store_bf16(out + m * N + tile * 64, o);
    }
}

/* Per input row, the sums of x over each group of columns (asymmetric layers need them). */
static float *group_sums(const uint16_t *x, int64_t M, int64_t K, int64_t group) {
    const int64_t groups = K / group;
    float *sums = (float *)malloc((size_t)(M * groups) * sizeof(float));
    if (!sums) return NULL;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < groups; ++g) {
            float total = 0.f;
            for (int64_t k = g * group; k < (g + 1) * group; ++k) total += bf16_to_float(x[m * K + k]);
            sums[m * groups + g] = total;
        }
    return sums;
}

/* x [M, K] bf16, out [M, N] bf16, N % 64 == 0, K % group == 0, group % 4 == 0 (checked by the
 * caller). Returns 0, or -1 when the scratch for asymmetric group sums cannot be allocated. */
int w4a16_matmul(const uint16_t *x, const uint8_t *packed, const float *scale, const float *zs,
                 int64_t M, int64_t N, int64_t K, int64_t group, uint16_t *out, int64_t threads) {
    const int64_t tiles = N / 64;
    float *xsum = NULL;
    if (zs && !(xsum = group_sums(x, M, K, group))) return -1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && tiles > 1)
    for (int64_t tile = 0; tile < tiles; ++tile)
        tile_rows(x, packed, scale, zs, xsum, M, N, K, group, out, tile);
    free(xsum);
    return 0;
}

/* e^x for fp32 lanes: Cody-Waite range reduction and Cephes' degree-5 polynomial (about 1 ulp). */
AVX512_BF16 static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365478515625f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* out = down(silu(gate(x)) * up(x)) for a gated MLP whose three layers are in this file's
 * layout: x [M, K] bf16; gate and up [I, K] (I % 64 == 0, group_in divides K); down [N, I]
 * (N padded to 64, group_mid divides I); hidden [M, I] bf16 scratch; out [M, N] bf16. The
 * product silu(g) * u is taken in fp32 from the fp32 sums and rounded once to bf16, the
 * activation `down` reads. One parallel region: gate/up tiles, then down tiles. Returns 0, or
 * -1 when the scratch for asymmetric group sums cannot be allocated. */
AVX512_BF16 int w4a16_gated_mlp(const uint16_t *x, int64_t M, int64_t K, int64_t I, int64_t N,
                                const uint8_t *gate, const float *gate_scale, const float *gate_zs,
                                const uint8_t *up, const float *up_scale, const float *up_zs, int64_t group_in,
                                const uint8_t *down, const float *down_scale, const float *down_zs,
                                int64_t group_mid, uint16_t *hidden, uint16_t *out, int64_t threads) {
    const int64_t mid_tiles = I / 64, out_tiles = N / 64, groups_in = K / group_in;
    float *xsum = NULL, *hsum = NULL;
    int failed = 0;
    if ((gate_zs || up_zs) && !(xsum = group_sums(x, M, K, group_in))) return -1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t tile = 0; tile < mid_tiles; ++tile)
            for (int64_t m = 0; m < M; ++m) {
                const float *xs = xsum ? xsum + m * groups_in : NULL;
                __m512 g[4], u[4], h[4];
                tile_row(x + m * K, gate, gate_scale, gate_zs, xs, I, K, group_in, tile, g);
                tile_row(x + m * K, up, up_scale, up_zs, xs, I, K, group_in, tile, u);
                for (int i = 0; i < 4; ++i) {
                    const __m512 sigmoid_inverse = _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g[i])));
                    h[i] = _mm512_mul_ps(_mm512_div_ps(g[i], sigmoid_inverse), u[i]);
                }
                store_bf16(hidden + m * I + tile * 64, h);
            }
#pragma omp single
        if (down_zs && !(hsum = group_sums(hidden, M, I, group_mid))) failed = 1;
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t tile = 0; tile < out_tiles; ++tile)
                tile_rows(hidden, down, down_scale, down_zs, hsum, M, N, I, group_mid, out, tile);
        }
    }
    free(xsum);
    free(hsum);
    return failed ? -1 : 0;
}
