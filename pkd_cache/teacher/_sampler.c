/* pkd_cache.teacher._sampler: sample:N draws by inverse CDF, a row of logits at a time, in one C pass.
 *
 * teacher/token_targets.py defines the draws: draw j of a row is the first id whose CDF (of the row's softmax at
 * the temperature) exceeds u_j x total, u_j the row's j-th counter uniform. The torch version there takes a
 * softmax, a float64 cumsum over the whole vocabulary, a searchsorted and a sort + run-length encoding: about twice
 * the CPU of this one (benchmarks/RESULTS.md), one of the costs that kept `dump --task lm` behind the bare forward.
 *
 * Per row, here:
 *   1. the max, and whether the row holds NaN or +inf, or only -inf (refused: no finite probability);
 *   2. in one pass, block by block: e_i = exp((z_i - max) / T) in float32 (a vectorisable exp, within 2 ulp: the
 *      softmax up to its scale, which the inverse CDF does not need), and the float64 sum of each block of 16;
 *   3. the uniforms (sorted by the caller) scaled by the total (the sum of the block sums, in order); one walk over the
 *      block sums that goes into a block only where a draw falls, adding that block's e_i in float64 in order and
 *      emitting id i for every scaled uniform below the running sum. Draws come out ascending, so ids and counts
 *      are the run-length encoding at once.
 * The CDF is summed in another order than torch's cumsum, so a draw within float rounding of a CDF step may go
 * to the neighbouring id: both are draws of the same distribution (the format defines the draws up to rounding).
 * A draw that rounding leaves past a block's last element goes to the block's last id of nonzero probability.
 * Built for AVX-512, AVX2 and baseline x86-64 (picked at load time; the same results: no float operation is
 * reordered or fused, -ffp-contract=off): 7 us a row of 4,096 logits on one core (benchmarks/RESULTS.md).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define PKD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PKD_CLONES
#endif

#define BLOCK 16
/* GCC / Clang vector types: a block's sum is four float64 lanes, t[k] = ((y[k] + y[k + 4]) + y[k + 8]) + y[k + 12],
 * then (t[0] + t[1]) + (t[2] + t[3]); written lane-wise, so every build (and clone) adds in this order */
typedef float f4 __attribute__((vector_size(16)));
typedef double d4 __attribute__((vector_size(32)));

/* exp(max(x, -87)) for x <= 0 (x = -inf included), float32, within about 2 ulp. Cody-Waite reduction to r in
 * [-ln2/2, ln2/2], then Cephes' expf polynomial; branch-free, so it vectorises. exp_row then zeroes what lies
 * below -87 (the float32 exponent's floor) in a second loop. */
static inline float exp_clamped(float x) {
    uint32_t bits; /* the clamp on the bits: for x <= 0, x < -87 exactly when they exceed -87's, and a float
                    * compare here would make the compiler branch */
    memcpy(&bits, &x, 4);
    bits = bits < 0xC2AE0000u ? bits : 0xC2AE0000u; /* -87.0f */
    float xs;
    memcpy(&xs, &bits, 4);
    int32_t n = (int32_t)(xs * 1.44269504088896341f - 0.5f); /* round(x / ln2), for x <= 0 */
    float fn = (float)n;
    float r = xs - fn * 0.693359375f - fn * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t scale_bits = (uint32_t)(n + 127) << 23;
    float scale;
    memcpy(&scale, &scale_bits, 4);
    return p * scale;
}

/* exp(x) for -87 < x <= 0, and 0 for x <= -87: exp_clamped with the floor applied on the bits (for x <= 0, x <= -87
 * exactly when they are at least -87's), so that the loop calling it has no float compare and vectorises */
static inline float exp_floored(float x) {
    uint32_t bits, out;
    memcpy(&bits, &x, 4);
    float y = exp_clamped(x);
    memcpy(&out, &y, 4);
    out &= bits < 0xC2AE0000u ? 0xFFFFFFFFu : 0u;
    memcpy(&y, &out, 4);
    return y;
}

/* 1 and 2: e [V] and the block sums [ceil(V / BLOCK)] of one row; 0 if the row has no finite probability.
 * The loops are written lane by lane (8 lanes for the max, 4 float64 lanes per block sum, then a fixed pairing)
 * so that the compiler vectorises them without reassociating anything: every build sums in the same order. */
PKD_CLONES static int exp_row(const float *restrict z, Py_ssize_t v, float inv_t, float *restrict e,
                              double *restrict sums) {
    /* two integer maxes over the bits, which vectorise where a float max does not (NaN makes it order-dependent):
     * the key x ^ ((x >> 31) & 0x7FFFFFFF) orders floats as signed ints (the row's max), and |x|'s bits exceed
     * +inf's exactly for a NaN */
    int32_t lane_key[8], lane_abs[8];
    for (int k = 0; k < 8; k++) lane_key[k] = INT32_MIN, lane_abs[k] = 0;
    Py_ssize_t v8 = v - v % 8;
    for (Py_ssize_t i = 0; i < v8; i += 8) {
        for (int k = 0; k < 8; k++) {
            int32_t x;
            memcpy(&x, z + i + k, 4);
            int32_t key = x ^ ((x >> 31) & 0x7FFFFFFF), a = x & 0x7FFFFFFF;
            lane_key[k] = key > lane_key[k] ? key : lane_key[k];
            lane_abs[k] = a > lane_abs[k] ? a : lane_abs[k];
        }
    }
    for (Py_ssize_t i = v8; i < v; i++) {
        int32_t x;
        memcpy(&x, z + i, 4);
        int32_t key = x ^ ((x >> 31) & 0x7FFFFFFF), a = x & 0x7FFFFFFF;
        lane_key[0] = key > lane_key[0] ? key : lane_key[0];
        lane_abs[0] = a > lane_abs[0] ? a : lane_abs[0];
    }
    int32_t key = INT32_MIN, most = 0;
    for (int k = 0; k < 8; k++) {
        key = lane_key[k] > key ? lane_key[k] : key;
        most = lane_abs[k] > most ? lane_abs[k] : most;
    }
    if (most > 0x7F800000) return 0; /* a NaN */
    int32_t bits = key ^ ((key >> 31) & 0x7FFFFFFF);
    float mx;
    memcpy(&mx, &bits, 4);
    if (mx == INFINITY || mx == -INFINITY) return 0; /* a +inf; or only -inf */
    /* 2: exp, the floor and each block's sum in one pass while the block is in registers (the same values as
     * three passes: the exp of every element, then the floor, then the sums) */
    Py_ssize_t full = v / BLOCK;
    for (Py_ssize_t b = 0; b < full; b++) {
        const float *zb = z + b * BLOCK;
        float y[BLOCK]; /* a local copy, so that the sums read registers, not the stores to e just made */
        for (int k = 0; k < BLOCK; k++) y[k] = exp_floored((zb[k] - mx) * inv_t);
        memcpy(e + b * BLOCK, y, sizeof y);
        f4 g[4];
        memcpy(g, y, sizeof y);
        d4 t = ((__builtin_convertvector(g[0], d4) + __builtin_convertvector(g[1], d4)) +
                __builtin_convertvector(g[2], d4)) + __builtin_convertvector(g[3], d4);
        sums[b] = (t[0] + t[1]) + (t[2] + t[3]);
    }
    if (full * BLOCK < v) {
        double s = 0;
        for (Py_ssize_t i = full * BLOCK; i < v; i++) {
            e[i] = exp_floored((z[i] - mx) * inv_t);
            s += e[i];
        }
        sums[full] = s;
    }
    return 1;
}

/* 3: the walk. v [n] sorted scaled uniforms; writes ids and counts [n] (ascending ids), returns how many */
/* the largest id below `end` of nonzero probability, -1 if none: where the rounding guards below put a draw */
static int64_t last_positive(const float *e, Py_ssize_t end) {
    while (end > 0 && !(e[end - 1] > 0)) end--;
    return (int64_t)end - 1;
}

static Py_ssize_t walk(const float *e, const double *sums, Py_ssize_t v, const double *vs, Py_ssize_t n,
                       int64_t *ids, int64_t *counts) {
    Py_ssize_t j = 0, m = 0, blocks = (v + BLOCK - 1) / BLOCK;
    double running = 0;
#define EMIT(ID)                                                 \
    do {                                                         \
        if (m > 0 && ids[m - 1] == (ID)) counts[m - 1]++;        \
        else ids[m] = (ID), counts[m] = 1, m++;                  \
    } while (0)
    for (Py_ssize_t b = 0; b < blocks && j < n; b++) {
        double next = running + sums[b];
        if (vs[j] < next) {
            double c = running;
            Py_ssize_t end = (b + 1) * BLOCK < v ? (b + 1) * BLOCK : v;
            for (Py_ssize_t i = b * BLOCK; i < end && j < n; i++) {
                if (e[i] > 0) {
                    c += e[i];
                    while (j < n && vs[j] < c) { EMIT(i); j++; }
                }
            }
            if (j < n && vs[j] < next) { /* rounding only */
                int64_t id = last_positive(e, end);
                while (j < n && vs[j] < next) { EMIT(id); j++; }
            }
        }
        running = next;
    }
    if (j < n) { /* a guard: v < total, so none is left */
        int64_t id = last_positive(e, v);
        while (j < n) { EMIT(id); j++; }
    }
#undef EMIT
    return m;
}

/* sample_rows(logits, u, T, V, n, inv_temperature, ids, counts, unique, threads) -> -1, or the first row with no
 * finite probability. logits: float32 [T, V]; u: float64 [T, n], each row ascending; ids, counts: int64 [T, n]
 * zeroed, written; unique: int64 [T]. Built with OpenMP, the rows are split over `threads` of the process's OpenMP
 * threads: torch's own (the same libgomp), which are awake after the forward's last op, where threads of another
 * pool would compete with them while they spin-wait. Without OpenMP, `threads` is ignored (the caller splits). */
static PyObject *sample_rows(PyObject *self, PyObject *args) {
    Py_buffer zb, ub, ib, cb, mb;
    Py_ssize_t t, v, n, threads;
    float inv_t;
    if (!PyArg_ParseTuple(args, "y*y*nnnfw*w*w*n", &zb, &ub, &t, &v, &n, &inv_t, &ib, &cb, &mb, &threads))
        return NULL;
    PyObject *result = NULL;
    if (t < 0 || v < 1 || n < 1 || zb.len != t * v * 4 || ub.len != t * n * 8 || ib.len != t * n * 8 ||
        cb.len != t * n * 8 || mb.len != t * 8) {
        PyErr_SetString(PyExc_ValueError, "sample_rows: buffer sizes do not match [T, V] and [T, n]");
        goto done;
    }
    Py_ssize_t bad = t; /* the first row with no finite probability, t if none */
    int nomem = 0;
    (void)threads;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel num_threads((int)(threads > 1 ? threads : 1))
#endif
    {
        float *e = malloc((size_t)v * sizeof(float));
        double *sums = malloc((size_t)((v + BLOCK - 1) / BLOCK) * sizeof(double));
        double *vs = malloc((size_t)n * sizeof(double));
        int ok = e && sums && vs;
        Py_ssize_t mine = t; /* this thread's first bad row: its rows come in order, so the least over threads is the first */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (Py_ssize_t r = 0; r < t; r++) {
            if (!ok || r > mine) continue;
            if (!exp_row((const float *)zb.buf + r * v, v, inv_t, e, sums)) { mine = r; continue; }
            double total = 0;
            for (Py_ssize_t b = 0; b < (v + BLOCK - 1) / BLOCK; b++) total += sums[b];
            const double *u = (const double *)ub.buf + r * n;
            for (Py_ssize_t j = 0; j < n; j++) vs[j] = u[j] * total;
            ((int64_t *)mb.buf)[r] = walk(e, sums, v, vs, n, (int64_t *)ib.buf + r * n, (int64_t *)cb.buf + r * n);
        }
#ifdef _OPENMP
#pragma omp critical
#endif
        {
            if (mine < bad) bad = mine;
            if (!ok) nomem = 1;
        }
        free(e), free(sums), free(vs);
    }
    Py_END_ALLOW_THREADS
    if (nomem) PyErr_NoMemory();
    else result = PyLong_FromSsize_t(bad < t ? bad : -1);
done:
    PyBuffer_Release(&zb), PyBuffer_Release(&ub), PyBuffer_Release(&ib), PyBuffer_Release(&cb);
    PyBuffer_Release(&mb);
    return result;
}

static PyMethodDef methods[] = {
    {"sample_rows", sample_rows, METH_VARARGS,
     "sample_rows(logits, u, T, V, n, inv_temperature, ids, counts, unique, threads) -> -1 or the first bad row: "
     "sample:n draws of each row of float32 logits [T, V] at the float64 uniforms u [T, n] (rows ascending), "
     "run-length encoded into the zeroed int64 ids and counts [T, n], with each row's number of unique ids in unique "
     "[T]; on `threads` OpenMP threads where built with OpenMP (the module's `openmp`)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sampler", NULL, -1, methods};

PyMODINIT_FUNC PyInit__sampler(void) {
    PyObject *m = PyModule_Create(&module);
#ifdef _OPENMP
    int openmp = 1;
#else
    int openmp = 0;
#endif
    if (m != NULL && PyModule_AddIntConstant(m, "openmp", openmp) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
