/* The m largest values of each row of a [rows, E] matrix and their column ids, largest first: the answer of
 * torch.topk(x, m, dim=-1) (sorted) for small m: m branch-free max passes over each row's packed keys (rows of
 * at most MAX_E experts), else one insertion pass into the m best so far.
 *
 * Ordering: every NaN is larger than +inf (as torch.topk orders them); -0.0 sorts below +0.0, which compare
 * equal as floats, so the values equal torch's. Ids of equal values come lowest id first (torch leaves that
 * order unspecified). Values are written as float32 (exact for float16 and bfloat16 inputs).
 *
 * dtype: 0 float32, 1 bfloat16, 2 float16. Row r starts at x + r * row_stride elements; a row's E elements
 * are contiguous. Thread safety: none needed; callers split rows between threads.
 */
#include <stdint.h>
#include <string.h>

#define MAX_M 64

static inline uint32_t f16_to_f32_bits(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1fu) return sign | 0x7f800000u | (man << 13);          /* inf, NaN */
    if (exp != 0) return sign | ((exp + 112u) << 23) | (man << 13);     /* normal */
    if (man == 0) return sign;                                          /* zero */
    /* subnormal half: normalise */
    exp = 113u;
    while (!(man & 0x400u)) { man <<= 1; exp--; }
    return sign | (exp << 23) | ((man & 0x3ffu) << 13);
}

/* a total order on float32 bit patterns matching the numeric order, with NaN above everything */
static inline int32_t order_key(uint32_t bits) {
    if ((bits & 0x7fffffffu) > 0x7f800000u) return INT32_MAX;           /* NaN */
    return (bits & 0x80000000u) ? (int32_t)(bits ^ 0x7fffffffu) : (int32_t)bits;
}

static inline uint32_t load_bits(const void *x, int dtype, int64_t i) {
    if (dtype == 0) return ((const uint32_t *)x)[i];
    if (dtype == 1) return (uint32_t)((const uint16_t *)x)[i] << 16;
    return f16_to_f32_bits(((const uint16_t *)x)[i]);
}

/* Top m by m passes of a max over packed keys: value order in the high bits, (E - 1 - id) in the low bits, so
 * keys are distinct and the largest key is the largest value, lowest id first among equals. A pass takes the
 * max (a branch-free loop the compiler vectorises), then sets that key, found by its id, to the minimum. */
#define PASSES(KEY_T, KEY_MIN, ID_MASK)                                                            \
    for (int64_t i = 0; i < m; i++) {                                                              \
        KEY_T best = KEY_MIN;                                                                      \
        for (int64_t j = 0; j < E; j++) best = keys[j] > best ? keys[j] : best;                    \
        out[i] = best;                                                                             \
        keys[E - 1 - (int64_t)(best & ID_MASK)] = KEY_MIN;                                         \
    }

#define MAX_E 4096  /* experts per row for the max passes: their keys live on the stack (16-bit ids fit) */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(MOE_REROUTE_NO_CLONES)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* 16-bit floats (dtype 1 bfloat16, 2 float16): int32 keys */
CLONES static void top16(const uint16_t *x, int dtype, int64_t rows, int64_t E, int64_t row_stride, int64_t m,
                         float *vals, int64_t *ids) {
    int32_t keys[MAX_E], out[MAX_M];
    const uint16_t nan_above = dtype == 1 ? 0x7f80u : 0x7c00u; /* |bits| above this is NaN */
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * row_stride;
        for (int64_t j = 0; j < E; j++) {
            uint16_t b = row[j];
            uint16_t mag = b & 0x7fffu;
            uint16_t ord = mag > nan_above ? 0x7fffu : ((b & 0x8000u) ? (uint16_t)(b ^ 0x7fffu) : b);
            keys[j] = (int32_t)(((uint32_t)ord << 16) | (uint32_t)(E - 1 - j));
        }
        PASSES(int32_t, INT32_MIN, 0xffff)
        for (int64_t i = 0; i < m; i++) {
            int64_t j = E - 1 - (int64_t)(out[i] & 0xffff);
            uint32_t bits = load_bits(row, dtype, j);
            memcpy(&vals[r * m + i], &bits, sizeof(float));
            ids[r * m + i] = j;
        }
    }
}

/* float32: int64 keys */
CLONES static void top32(const uint32_t *x, int64_t rows, int64_t E, int64_t row_stride, int64_t m, float *vals,
                         int64_t *ids) {
    int64_t keys[MAX_E], out[MAX_M];
    for (int64_t r = 0; r < rows; r++) {
        const uint32_t *row = x + r * row_stride;
        for (int64_t j = 0; j < E; j++) {
            uint32_t ord = (uint32_t)order_key(row[j]);
            keys[j] = (int64_t)(((uint64_t)ord << 32) | (uint64_t)(E - 1 - j));
        }
        PASSES(int64_t, INT64_MIN, 0xffffffff)
        for (int64_t i = 0; i < m; i++) {
            int64_t j = E - 1 - (int64_t)(out[i] & 0xffffffff);
            memcpy(&vals[r * m + i], &row[j], sizeof(float));
            ids[r * m + i] = j;
        }
    }
}

/* any E: one insertion pass per row into the m best so far */
static void top_insert(const void *x, int dtype, int64_t rows, int64_t E, int64_t row_stride, int64_t m,
                       float *vals, int64_t *ids) {
    int32_t key[MAX_M];
    uint32_t bits[MAX_M];
    int64_t id[MAX_M];
    for (int64_t r = 0; r < rows; r++) {
        int64_t base = r * row_stride;
        int64_t n = 0;
        for (int64_t j = 0; j < E; j++) {
            uint32_t b = load_bits(x, dtype, base + j);
            int32_t k = order_key(b);
            if (n == m && k <= key[m - 1]) continue;  /* not among the m best so far */
            int64_t p = (n < m) ? n++ : m - 1;         /* the last slot is dropped */
            while (p > 0 && key[p - 1] < k) {          /* strict: an equal earlier value stays first */
                key[p] = key[p - 1]; bits[p] = bits[p - 1]; id[p] = id[p - 1];
                p--;
            }
            key[p] = k; bits[p] = b; id[p] = j;
        }
        for (int64_t i = 0; i < m; i++) {
            memcpy(&vals[r * m + i], &bits[i], sizeof(float));
            ids[r * m + i] = id[i];
        }
    }
}

/* returns 0, or -1 for bad arguments (m < 1, m > MAX_M, m > E, unknown dtype) */
int top_rows(const void *x, int dtype, int64_t rows, int64_t E, int64_t row_stride, int64_t m,
             float *vals, int64_t *ids) {
    if (m < 1 || m > MAX_M || m > E || dtype < 0 || dtype > 2) return -1;
    if (dtype != 0 && E <= MAX_E)
        top16((const uint16_t *)x, dtype, rows, E, row_stride, m, vals, ids);
    else if (dtype == 0 && E <= MAX_E)
        top32((const uint32_t *)x, rows, E, row_stride, m, vals, ids);
    else
        top_insert(x, dtype, rows, E, row_stride, m, vals, ids);
    return 0;
}
