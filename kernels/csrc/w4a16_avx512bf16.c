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

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void tile_rows(const uint16_t *x, const uint8_t *packed, const float *scale, const float *zs,
                      const float *xsum, int64_t M, int64_t N, int64_t K, int64_t group, uint16_t *out,
                      int64_t tile) {
    /* entry q is the bf16 bit pattern of q - 8 (entries 16..31 are never indexed) */
    const __m512i lut = _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000,
        (short)0xBF80, (short)0xC000, (short)0xC040, (short)0xC080,
        (short)0xC0A0, (short)0xC0C0, (short)0xC0E0, (short)0xC100);
    const __m512i low_nibble = _mm512_set1_epi16(0x000F);
    const int64_t quads = K / 4, group_quads = group / 4, groups = K / group;
    for (int64_t m = 0; m < M; ++m) {
        const uint16_t *xm = x + m * K;
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
                const __m512 total = _mm512_set1_ps(xsum[m * groups + g]);
                o0 = _mm512_fnmadd_ps(_mm512_loadu_ps(z), total, o0);
                o1 = _mm512_fnmadd_ps(_mm512_loadu_ps(z + 16), total, o1);
                o2 = _mm512_fnmadd_ps(_mm512_loadu_ps(z + 32), total, o2);
                o3 = _mm512_fnmadd_ps(_mm512_loadu_ps(z + 48), total, o3);
            }
        }
        uint16_t *o = out + m * N + tile * 64; /* fp32 -> bf16, round to nearest even */
        _mm256_storeu_si256((__m256i *)o, (__m256i)_mm512_cvtneps_pbh(o0));
        _mm256_storeu_si256((__m256i *)(o + 16), (__m256i)_mm512_cvtneps_pbh(o1));
        _mm256_storeu_si256((__m256i *)(o + 32), (__m256i)_mm512_cvtneps_pbh(o2));
        _mm256_storeu_si256((__m256i *)(o + 48), (__m256i)_mm512_cvtneps_pbh(o3));
    }
}

/* x [M, K] bf16, out [M, N] bf16, N % 64 == 0, K % group == 0, group % 4 == 0 (checked by the
 * caller). Returns 0, or -1 when the scratch for asymmetric group sums cannot be allocated. */
int w4a16_matmul(const uint16_t *x, const uint8_t *packed, const float *scale, const float *zs,
                 int64_t M, int64_t N, int64_t K, int64_t group, uint16_t *out, int64_t threads) {
    const int64_t groups = K / group, tiles = N / 64;
    float *xsum = NULL;
    if (zs) {
        xsum = (float *)malloc((size_t)(M * groups) * sizeof(float));
        if (!xsum) return -1;
        for (int64_t m = 0; m < M; ++m)
            for (int64_t g = 0; g < groups; ++g) {
                float total = 0.f;
                for (int64_t k = g * group; k < (g + 1) * group; ++k) total += bf16_to_float(x[m * K + k]);
                xsum[m * groups + g] = total;
            }
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && tiles > 1)
    for (int64_t tile = 0; tile < tiles; ++tile)
        tile_rows(x, packed, scale, zs, xsum, M, N, K, group, out, tile);
    free(xsum);
    return 0;
}
