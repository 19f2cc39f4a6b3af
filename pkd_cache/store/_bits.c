/* pkd_cache.store._bits: bit-level loops numpy does slowly: whether a buffer of floats holds inf or NaN (one
 * read-only pass over its bits), and packing and decoding the bit streams of coded token targets (`pack_codes`,
 * `rice_rows`, `gamma_rows`, below).
 *
 * The reader checks every chunk it decodes (store/trust.py, `non_finite`). numpy needs two max passes for that
 * (the positive and the negative non-finite values sit at the tops of the two halves of any integer view); this
 * needs one: clear the sign bit, then a signed max, which reaches the all-ones exponent exactly when some value is
 * inf or NaN. Compiled with -O3 the loop vectorises; on x86-64 Linux it is also built for AVX2 and picked at load
 * time. The build is optional (setup.py): without a compiler, trust.py falls back to the numpy passes, which give
 * the same answers (tests/test_tampered_stores.py compares both on every special value).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define PKD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PKD_CLONES
#endif

/* values per block: a block is reduced to one max, then tested, so a non-finite value stops the scan early */
#define BLOCK 16384

#define DEFINE_SCAN(NAME, UINT, INT, ABS_MASK, INF_BITS)                                        \
    PKD_CLONES static int NAME(const char *p, Py_ssize_t n) {                                     \
        Py_ssize_t i = 0;                                                                         \
        while (i < n) {                                                                           \
            Py_ssize_t end = n - i > BLOCK ? i + BLOCK : n;                                       \
            INT m = 0;                                                                            \
            for (; i < end; i++) {                                                                \
                UINT u;                                                                           \
                memcpy(&u, p + i * (Py_ssize_t)sizeof(UINT), sizeof(UINT));                       \
                INT v = (INT)(u & (UINT)(ABS_MASK));                                              \
                m = v > m ? v : m;                                                                \
            }                                                                                     \
            if (m >= (INT)(INF_BITS)) return 1;                                                   \
        }                                                                                         \
        return 0;                                                                                 \
    }

DEFINE_SCAN(scan16, uint16_t, int16_t, 0x7FFFu, 0x7C00)
DEFINE_SCAN(scan32, uint32_t, int32_t, 0x7FFFFFFFu, 0x7F800000)
DEFINE_SCAN(scan64, uint64_t, int64_t, 0x7FFFFFFFFFFFFFFFull, 0x7FF0000000000000ll)

static PyObject *non_finite(PyObject *self, PyObject *args) {
    Py_buffer view;
    int itemsize, found;
    if (!PyArg_ParseTuple(args, "y*i", &view, &itemsize)) return NULL;
    if (itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "itemsize must be 2, 4 or 8");
        return NULL;
    }
    Py_ssize_t n = view.len / itemsize;
    Py_BEGIN_ALLOW_THREADS
    found = itemsize == 2 ? scan16(view.buf, n) : itemsize == 4 ? scan32(view.buf, n) : scan64(view.buf, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyBool_FromLong(found);
}

/* pack_codes: the bit streams of store/sparse_codec.py in one pass. A stream there is the unary codes of one array
 * of values, then the binary codes of another (widths per value), MSB first, cut into bytes, the last zero-padded:
 * np.packbits(np.concatenate([_unary_bits(unary), _to_bits(values, widths)])), which takes a numpy pass per bit
 * plane. The numpy version stays the definition and the fallback (tests/test_native.py compares both). */
typedef struct {
    unsigned char *out;
    Py_ssize_t pos; /* bytes written */
    uint64_t acc;   /* pending bits, in the low `held` bits */
    int held;
} BitWriter;

static inline void put_bits(BitWriter *w, uint64_t value, int width) { /* width <= 56 */
    w->acc = (w->acc << width) | (value & ((((uint64_t)1) << width) - 1)); /* at most 7 + 56 bits held */
    w->held += width;
    while (w->held >= 8) {
        w->held -= 8;
        w->out[w->pos++] = (unsigned char)(w->acc >> w->held);
    }
}

static PyObject *pack_codes(PyObject *self, PyObject *args) {
    Py_buffer ub, vb, wb;
    if (!PyArg_ParseTuple(args, "y*y*y*", &ub, &vb, &wb)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t nu = ub.len / 8, nv = vb.len / 8;
    const int64_t *unary = ub.buf, *values = vb.buf, *widths = wb.buf;
    uint64_t bits = 0;
    if (ub.len % 8 || vb.len % 8 || wb.len != vb.len) {
        PyErr_SetString(PyExc_ValueError, "pack_codes: int64 arrays expected, values and widths of one length");
        goto done;
    }
    for (Py_ssize_t i = 0; i < nu; i++) {
        if (unary[i] < 0 || unary[i] > ((int64_t)1 << 40)) {
            PyErr_SetString(PyExc_ValueError, "pack_codes: a unary value outside [0, 2^40]");
            goto done;
        }
        bits += (uint64_t)unary[i] + 1;
    }
    for (Py_ssize_t i = 0; i < nv; i++) {
        if (widths[i] < 0 || widths[i] > 62) {
            PyErr_SetString(PyExc_ValueError, "pack_codes: a width outside [0, 62]");
            goto done;
        }
        bits += (uint64_t)widths[i];
    }
    if (bits > ((uint64_t)1 << 46)) {
        PyErr_SetString(PyExc_ValueError, "pack_codes: more than 2^46 bits");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((bits + 7) / 8));
    if (result == NULL) goto done;
    BitWriter w = {(unsigned char *)PyBytes_AS_STRING(result), 0, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < nu; i++) {
        int64_t ones = unary[i];
        while (ones > 48) put_bits(&w, ~(uint64_t)0, 48), ones -= 48;
        put_bits(&w, ((((uint64_t)1) << ones) - 1) << 1, (int)ones + 1); /* ones 1 bits, then a 0 */
    }
    for (Py_ssize_t i = 0; i < nv; i++) {
        int width = (int)widths[i];
        if (width > 48) put_bits(&w, (uint64_t)values[i] >> 32, width - 32), width = 32;
        put_bits(&w, (uint64_t)values[i], width);
    }
    if (w.held) w.out[w.pos++] = (unsigned char)(w.acc << (8 - w.held));
    Py_END_ALLOW_THREADS
done:
    PyBuffer_Release(&ub), PyBuffer_Release(&vb), PyBuffer_Release(&wb);
    return result;
}

/* rice_rows, gamma_rows: the reader's decoding of sampled and top-K ids and of sampled counts (the codes of
 * store/sparse_codec.py), straight into the padded [T, max m] rows the loss takes, in one pass per stream instead
 * of a numpy pass per bit plane and several more to lay the rows out. Each returns None unless its stream is
 * exactly a valid one (no bit missing, no byte over, zero padding, every id below V, every count >= 1 and the
 * counts summing to n): the numpy decoder stays the definition, and names what is wrong with a stream that is
 * not (tests/test_native.py checks both agree on valid and on damaged chunks). */
typedef struct {
    const unsigned char *b;
    Py_ssize_t nbytes;
    uint64_t nbits, pos;
} BitReader;

static inline uint64_t peek64(const BitReader *r) { /* the 64 bits from r->pos on, MSB first; 0 beyond the end */
    Py_ssize_t byte = (Py_ssize_t)(r->pos >> 3);
    int off = (int)(r->pos & 7);
    unsigned char tmp[9] = {0};
    const unsigned char *p = tmp;
    if (byte + 9 <= r->nbytes) p = r->b + byte; /* the usual case: no copy */
    else if (byte < r->nbytes) memcpy(tmp, r->b + byte, (size_t)(r->nbytes - byte));
    uint64_t x;
    memcpy(&x, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    x = __builtin_bswap64(x);
#endif
    return off ? (x << off) | (uint64_t)(p[8] >> (8 - off)) : x;
}

static inline int read_unary(BitReader *r, int64_t *out) { /* ones, then a 0 bit */
    int64_t ones = 0;
    for (;;) {
        if (r->pos >= r->nbits) return 0;
        uint64_t x = ~peek64(r);
        if (x) {
            int run = __builtin_clzll(x);
            ones += run, r->pos += (uint64_t)run + 1;
            break;
        }
        ones += 64, r->pos += 64;
    }
    *out = ones;
    return r->pos <= r->nbits; /* the 0 bit lay inside the stream, not in the zeros beyond it */
}

static inline int read_bits(BitReader *r, int width, int64_t *out) { /* 0 <= width <= 62 */
    if (r->pos + (uint64_t)width > r->nbits) return 0;
    *out = width ? (int64_t)(peek64(r) >> (64 - width)) : 0;
    r->pos += (uint64_t)width;
    return 1;
}

static inline int at_exact_end(const BitReader *r) { /* the bytes the bits need, no more, the padding zero */
    if ((r->pos + 7) / 8 != (uint64_t)r->nbytes) return 0;
    return !(r->pos & 7) || !(r->b[r->nbytes - 1] & ((1u << (8 - (r->pos & 7))) - 1));
}

static inline int floor_log2(uint64_t x) { return 63 - __builtin_clzll(x); } /* x >= 1 */

/* ids: all the gaps' unary parts (token-major), then all their k_t low bits; id_0 = g_0, id_j = id_{j-1} + g_j + 1 */
static int rice_rows(BitReader *r, const int64_t *m, Py_ssize_t T, int64_t vocab, Py_ssize_t W, int64_t *out) {
    for (Py_ssize_t t = 0; t < T; t++)
        for (int64_t j = 0; j < m[t]; j++)
            if (!read_unary(r, &out[t * W + j])) return 0;
    for (Py_ssize_t t = 0; t < T; t++) {
        int64_t mean = (vocab - m[t]) / (m[t] + 1);
        int k = floor_log2(mean > 1 ? (uint64_t)mean : 1);
        int64_t limit = (vocab - 1) >> k, previous = -1, low;
        for (int64_t j = 0; j < m[t]; j++) {
            int64_t q = out[t * W + j];
            if (q > limit || !read_bits(r, k, &low)) return 0;
            previous += ((q << k) | low) + 1;
            if (previous >= vocab) return 0;
            out[t * W + j] = previous;
        }
    }
    return at_exact_end(r);
}

/* counts: the gamma codes of each token's first m_t - 1 counts (all their unary lengths, then all their low bits);
 * the last count is n minus their sum */
static int gamma_rows(BitReader *r, const int64_t *m, Py_ssize_t T, int64_t n, Py_ssize_t W, int64_t *out) {
    int most = floor_log2((uint64_t)n);
    for (Py_ssize_t t = 0; t < T; t++)
        for (int64_t j = 0; j < m[t] - 1; j++)
            if (!read_unary(r, &out[t * W + j]) || out[t * W + j] > most) return 0;
    for (Py_ssize_t t = 0; t < T; t++) {
        int64_t left = n, low;
        for (int64_t j = 0; j < m[t] - 1; j++) {
            int length = (int)out[t * W + j];
            if (!read_bits(r, length, &low)) return 0;
            out[t * W + j] = ((int64_t)1 << length) + low;
            left -= out[t * W + j];
        }
        if (left < 1) return 0;
        out[t * W + m[t] - 1] = left;
    }
    return at_exact_end(r);
}

static PyObject *decode_rows(PyObject *args, int gamma) {
    Py_buffer pb, mb;
    long long param;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*y*L", &pb, &mb, &param)) return NULL;
    Py_ssize_t T = mb.len / 8, W = 0;
    const int64_t *m = mb.buf;
    int valid = mb.len % 8 == 0 && param >= 1;
    for (Py_ssize_t t = 0; valid && t < T; t++) {
        valid = m[t] >= 1 && m[t] <= param && m[t] <= pb.len * 8; /* more values than bits: no valid stream */
        W = m[t] > W ? (Py_ssize_t)m[t] : W;
    }
    if (!valid) {
        result = Py_None, Py_INCREF(result);
        goto done;
    }
    result = PyByteArray_FromStringAndSize(NULL, T * W * 8);
    if (result == NULL) goto done;
    int64_t *out = (int64_t *)PyByteArray_AS_STRING(result);
    int ok;
    Py_BEGIN_ALLOW_THREADS
    memset(out, 0, (size_t)(T * W * 8));
    BitReader r = {pb.buf, pb.len, (uint64_t)pb.len * 8, 0};
    ok = gamma ? gamma_rows(&r, m, T, param, W, out) : rice_rows(&r, m, T, param, W, out);
    Py_END_ALLOW_THREADS
    if (!ok) {
        Py_DECREF(result);
        result = Py_None, Py_INCREF(result);
    }
done:
    PyBuffer_Release(&pb), PyBuffer_Release(&mb);
    return result;
}

static PyObject *rice_rows_py(PyObject *self, PyObject *args) { return decode_rows(args, 0); }
static PyObject *gamma_rows_py(PyObject *self, PyObject *args) { return decode_rows(args, 1); }

static PyMethodDef methods[] = {
    {"pack_codes", pack_codes, METH_VARARGS,
     "pack_codes(unary, values, widths) -> bytes: the unary codes of int64 unary [n], then int64 values [m] in "
     "int64 widths [m] bits each, MSB first, packed into bytes (the last one zero-padded)"},
    {"rice_rows", rice_rows_py, METH_VARARGS,
     "rice_rows(packed, m, vocab) -> bytearray of int64 [T, max m] (each row's m[t] ids ascending, then 0s), or "
     "None where packed (uint8) is not exactly the Rice-coded ids of tokens with m (int64 [T]) unique ids each"},
    {"gamma_rows", gamma_rows_py, METH_VARARGS,
     "gamma_rows(packed, m, n) -> bytearray of int64 [T, max m] (each row's m[t] counts, then 0s), or None where "
     "packed is not exactly the gamma-coded first m[t] - 1 counts of each token, leaving its last count >= 1"},
    {"non_finite", non_finite, METH_VARARGS,
     "non_finite(buffer, itemsize) -> bool: whether the C-contiguous floats of that size in buffer hold inf or "
     "NaN (itemsize 2, 4 or 8: IEEE half, single, double)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bits", NULL, -1, methods};

PyMODINIT_FUNC PyInit__bits(void) { return PyModule_Create(&module); }
