/* pkd_cache.store._bits: whether a buffer of floats holds inf or NaN, in one read-only pass over its bits.
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

static PyMethodDef methods[] = {
    {"non_finite", non_finite, METH_VARARGS,
     "non_finite(buffer, itemsize) -> bool: whether the C-contiguous floats of that size in buffer hold inf or "
     "NaN (itemsize 2, 4 or 8: IEEE half, single, double)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bits", NULL, -1, methods};

PyMODINIT_FUNC PyInit__bits(void) { return PyModule_Create(&module); }
