/* edgellm.kvindex._rows: RowTable, the compact engine map of the in-memory index,
 * pack_tokens, the checked packing of token ids every backend hashes, and chain_hashes,
 * the prefix hash chain over packed blocks (at the end).
 *
 * One pod's rows in one context (memory_tables.Holdings.engine_map): engine block hash ->
 * row (key, parent engine hash or None, state), the same mapping a dict of tuples gave,
 * in a 32-byte slot instead of ~150 bytes of Python objects a row (two ints, a tuple and a
 * dict entry). Open addressing with linear probing, keys mixed with splitmix64 and mapped
 * onto any capacity by multiply-shift, so the table grows by half (load 0.57..0.85) and
 * deletions shift back (no tombstones); an eighth-full table shrinks. It holds no Python
 * objects, so the cyclic garbage collector never tracks it.
 *
 * Mapping protocol: t[e], t[e] = (key, parent, state), del t[e], e in t, len(t); methods
 * get, pop, isdisjoint, keys, values, items, clear, and for the hot path (no tuple built)
 * add (t[e] = ...), add_chain (the rows of a chain stored in one event), add_child (a
 * row and its parent's one more child), leave (a child gone), key_of (t[e][0] or None)
 * and bump (state + 1). Engine hashes, keys and states are unsigned 64-bit ints (anything
 * else is an OverflowError or TypeError when storing, "not found" when looking up).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* A slot: its flags live in the key's top bits (keys are below 2**60), so a probe touches
 * one 32-byte slot and an empty slot is all zeros. */
typedef struct {
    uint64_t engine, key, parent, state;
} Row;

#define USED (1ULL << 63)
#define HAS_PARENT (1ULL << 62)
#define KEY_LIMIT (1ULL << 62)

typedef struct {
    PyObject_HEAD
    Row *rows;
    Py_ssize_t cap, len;
} RowTable;

static inline uint64_t mix(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static inline Py_ssize_t home(Py_ssize_t cap, uint64_t engine) {
    return (Py_ssize_t)(((unsigned __int128)mix(engine) * (uint64_t)cap) >> 64);
}

static Py_ssize_t find(RowTable *t, uint64_t engine) {
    if (t->cap == 0) return -1;
    Py_ssize_t i = home(t->cap, engine);
    while (t->rows[i].key) {
        if (t->rows[i].engine == engine) return i;
        if (++i == t->cap) i = 0;
    }
    return -1;
}

/* Converts a Python int to uint64; returns 0 on success, -1 (error set) otherwise. */
static int to_u64(PyObject *obj, uint64_t *out) {
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "an int is required, got %.50s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *out = (uint64_t)v;
    return 0;
}

/* The slot of a lookup key, or -1 when absent or not a uint64 (no error left set). */
static Py_ssize_t lookup(RowTable *t, PyObject *obj) {
    uint64_t engine;
    if (to_u64(obj, &engine) < 0) {
        PyErr_Clear();
        return -1;
    }
    return find(t, engine);
}

static void place(Row *rows, Py_ssize_t cap, const Row *row) {
    Py_ssize_t i = home(cap, row->engine);
    while (rows[i].key) {
        if (++i == cap) i = 0;
    }
    rows[i] = *row;
}

/* Moves every row into a new table of ``cap`` slots; -1 (error set) without memory. */
static int rebuild(RowTable *t, Py_ssize_t cap) {
    Row *rows = PyMem_Calloc((size_t)cap, sizeof(Row));
    if (rows == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < t->cap; i++) {
        if (t->rows[i].key) place(rows, cap, &t->rows[i]);
    }
    PyMem_Free(t->rows);
    t->rows = rows;
    t->cap = cap;
    return 0;
}

/* Stores a row: replaces the one held for its engine hash when ``replace``, else leaves a
 * held one as it is (t->len unchanged tells). -1 (error set) for a bad key or parent, or
 * without memory. */
static int store(RowTable *t, uint64_t engine, uint64_t key, PyObject *parent,
                 uint64_t state, int replace) {
    if (key >= KEY_LIMIT) {
        PyErr_SetString(PyExc_OverflowError, "a row's key must be below 2**62");
        return -1;
    }
    Row row = {engine, key | USED, 0, state};
    if (parent != Py_None) {
        if (to_u64(parent, &row.parent) < 0) return -1;
        row.key |= HAS_PARENT;
    }
    if ((t->len + 1) * 20 > t->cap * 17  /* load <= 0.85, then grow by half */
            && rebuild(t, t->cap < 8 ? 8 : t->cap + t->cap / 2) < 0) return -1;
    /* One probe: the row's slot if held, else the first empty slot of its run. */
    Py_ssize_t i = home(t->cap, engine);
    while (t->rows[i].key) {
        if (t->rows[i].engine == engine) {
            if (replace) t->rows[i] = row;
            return 0;
        }
        if (++i == t->cap) i = 0;
    }
    t->rows[i] = row;
    t->len++;
    return 0;
}

static inline int put(RowTable *t, uint64_t engine, uint64_t key, PyObject *parent,
                      uint64_t state) {
    return store(t, engine, key, parent, state, 1);
}

static inline int put_new(RowTable *t, uint64_t engine, uint64_t key, PyObject *parent,
                          uint64_t state) {
    return store(t, engine, key, parent, state, 0);
}

static void erase(RowTable *t, Py_ssize_t i) {
    /* Backward-shift deletion: move up every later entry of the run that may live at i. */
    Py_ssize_t j = i;
    for (;;) {
        t->rows[i].key = 0;
        for (;;) {
            if (++j == t->cap) j = 0;
            if (!t->rows[j].key) {
                t->len--;
                return;
            }
            Py_ssize_t k = home(t->cap, t->rows[j].engine);
            if (i <= j ? (i < k && k <= j) : (i < k || k <= j)) continue;
            break;
        }
        t->rows[i] = t->rows[j];
        i = j;
    }
}

/* After deletions: a table an eighth full is rebuilt at twice its rows (min 8 slots). */
static void maybe_shrink(RowTable *t) {
    if (t->cap <= 64 || t->len * 8 >= t->cap) return;
    if (rebuild(t, t->len * 2 < 8 ? 8 : t->len * 2) < 0) PyErr_Clear();  /* optional */
}

static PyObject *row_tuple(RowTable *t, Py_ssize_t i) {
    Row *row = &t->rows[i];
    PyObject *key = PyLong_FromUnsignedLongLong(row->key & (HAS_PARENT - 1));
    PyObject *parent;
    if (row->key & HAS_PARENT) {
        parent = PyLong_FromUnsignedLongLong(row->parent);
    } else {
        parent = Py_None;
        Py_INCREF(parent);
    }
    PyObject *state = PyLong_FromUnsignedLongLong(row->state);
    if (key == NULL || parent == NULL || state == NULL) {
        Py_XDECREF(key);
        Py_XDECREF(parent);
        Py_XDECREF(state);
        return NULL;
    }
    PyObject *tuple = PyTuple_New(3);
    if (tuple == NULL) {
        Py_DECREF(key);
        Py_DECREF(parent);
        Py_DECREF(state);
        return NULL;
    }
    PyTuple_SET_ITEM(tuple, 0, key);
    PyTuple_SET_ITEM(tuple, 1, parent);
    PyTuple_SET_ITEM(tuple, 2, state);
    return tuple;
}

/* --- the type ---------------------------------------------------------------------- */

static PyObject *RowTable_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "RowTable() takes no arguments");
        return NULL;
    }
    RowTable *t = (RowTable *)type->tp_alloc(type, 0);
    if (t != NULL) {
        t->rows = NULL;
        t->cap = t->len = 0;
    }
    return (PyObject *)t;
}

static void RowTable_dealloc(RowTable *t) {
    PyMem_Free(t->rows);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static Py_ssize_t RowTable_len(RowTable *t) { return t->len; }

static int RowTable_contains(RowTable *t, PyObject *engine) { return lookup(t, engine) >= 0; }

static PyObject *RowTable_subscript(RowTable *t, PyObject *engine) {
    Py_ssize_t i = lookup(t, engine);
    if (i < 0) {
        PyErr_SetObject(PyExc_KeyError, engine);
        return NULL;
    }
    return row_tuple(t, i);
}

static int RowTable_ass_subscript(RowTable *t, PyObject *engine, PyObject *value) {
    if (value == NULL) {
        Py_ssize_t i = lookup(t, engine);
        if (i < 0) {
            PyErr_SetObject(PyExc_KeyError, engine);
            return -1;
        }
        erase(t, i);
        maybe_shrink(t);
        return 0;
    }
    uint64_t e, key, state;
    if (to_u64(engine, &e) < 0) return -1;
    if (!PyTuple_Check(value) || PyTuple_GET_SIZE(value) != 3) {
        PyErr_SetString(PyExc_TypeError, "a row is a (key, parent, state) tuple");
        return -1;
    }
    if (to_u64(PyTuple_GET_ITEM(value, 0), &key) < 0) return -1;
    if (to_u64(PyTuple_GET_ITEM(value, 2), &state) < 0) return -1;
    return put(t, e, key, PyTuple_GET_ITEM(value, 1), state);
}

static PyObject *RowTable_add(RowTable *t, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t e, key, state;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "add(engine, key, parent, state)");
        return NULL;
    }
    if (to_u64(args[0], &e) < 0 || to_u64(args[1], &key) < 0 || to_u64(args[3], &state) < 0)
        return NULL;
    if (put(t, e, key, args[2], state) < 0) return NULL;
    Py_RETURN_NONE;
}

/* add_chain(engines, keys, parent, state, last_state): rows for a chain stored in one event,
 * each the child of the one before (the first of ``parent``, whose own row is left as it
 * is), all with ``state`` but the last (``last_state``). Stops before the first engine
 * hash already held (or named twice): returns how many rows it added, engines[:n]. */
static PyObject *RowTable_add_chain(RowTable *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "add_chain(engines, keys, parent, state, last_state)");
        return NULL;
    }
    PyObject *engines = args[0], *keys = args[1], *parent = args[2];
    uint64_t state, last_state;
    if (!PyList_Check(keys) || !(PyList_Check(engines) || PyTuple_Check(engines))) {
        PyErr_SetString(PyExc_TypeError, "engines and keys must be lists");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(keys);
    if (PySequence_Fast_GET_SIZE(engines) < n) {
        PyErr_SetString(PyExc_ValueError, "fewer engines than keys");
        return NULL;
    }
    if (to_u64(args[3], &state) < 0 || to_u64(args[4], &last_state) < 0) return NULL;
    PyObject **items = PySequence_Fast_ITEMS(engines);
    Py_ssize_t before = t->len;
    PyObject *prev = parent;
    for (Py_ssize_t k = 0; k < n; k++) {
        uint64_t e, key;
        if (to_u64(items[k], &e) < 0 || to_u64(PyList_GET_ITEM(keys, k), &key) < 0) return NULL;
        Py_ssize_t len = t->len;
        if (put_new(t, e, key, prev, k == n - 1 ? last_state : state) < 0) return NULL;
        if (t->len == len) break;  /* held already */
        prev = items[k];
    }
    return PyLong_FromSsize_t(t->len - before);
}

/* add_child(engine, key, parent, state): t[engine] = (key, parent, state), and parent's
 * row (which must be held) gets one more child. */
static PyObject *RowTable_add_child(RowTable *t, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t e, key, p, state;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "add_child(engine, key, parent, state)");
        return NULL;
    }
    if (to_u64(args[0], &e) < 0 || to_u64(args[1], &key) < 0 || to_u64(args[2], &p) < 0
            || to_u64(args[3], &state) < 0)
        return NULL;
    Py_ssize_t i = find(t, p);
    if (i < 0) {
        PyErr_SetObject(PyExc_KeyError, args[2]);
        return NULL;
    }
    t->rows[i].state++;
    if (put(t, e, key, args[2], state) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *RowTable_get(RowTable *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(engine[, default])");
        return NULL;
    }
    Py_ssize_t i = lookup(t, args[0]);
    if (i < 0) {
        PyObject *dflt = nargs == 2 ? args[1] : Py_None;
        Py_INCREF(dflt);
        return dflt;
    }
    return row_tuple(t, i);
}

static PyObject *RowTable_pop(RowTable *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop(engine[, default])");
        return NULL;
    }
    Py_ssize_t i = lookup(t, args[0]);
    if (i < 0) {
        if (nargs == 2) {
            Py_INCREF(args[1]);
            return args[1];
        }
        PyErr_SetObject(PyExc_KeyError, args[0]);
        return NULL;
    }
    PyObject *row = row_tuple(t, i);
    if (row != NULL) {
        erase(t, i);
        maybe_shrink(t);
    }
    return row;
}

static PyObject *RowTable_key_of(RowTable *t, PyObject *engine) {
    Py_ssize_t i = lookup(t, engine);
    if (i < 0) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(t->rows[i].key & (HAS_PARENT - 1));
}

static PyObject *RowTable_bump(RowTable *t, PyObject *engine) {
    Py_ssize_t i = lookup(t, engine);
    if (i < 0) {
        PyErr_SetObject(PyExc_KeyError, engine);
        return NULL;
    }
    t->rows[i].state++;
    Py_RETURN_NONE;
}

#define CHILD_BITS 20  /* memory_tables.CHILD_BITS: state = eff << CHILD_BITS | children */

/* leave(parent, eff): a child row leaves ``parent``'s row, which gets one child less and
 * the recency max(its own, eff). Returns its new state, or None if ``parent`` is not held. */
static PyObject *RowTable_leave(RowTable *t, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t eff;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "leave(parent, eff)");
        return NULL;
    }
    Py_ssize_t i = lookup(t, args[0]);
    if (i < 0) Py_RETURN_NONE;
    if (to_u64(args[1], &eff) < 0) return NULL;
    uint64_t state = t->rows[i].state;
    uint64_t own = state >> CHILD_BITS;
    uint64_t children = state & ((1ULL << CHILD_BITS) - 1);
    if (children) children--;
    state = (eff > own ? eff : own) << CHILD_BITS | children;
    t->rows[i].state = state;
    return PyLong_FromUnsignedLongLong(state);
}

static PyObject *RowTable_isdisjoint(RowTable *t, PyObject *iterable) {
    PyObject *it = PyObject_GetIter(iterable);
    if (it == NULL) return NULL;
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        Py_ssize_t i = lookup(t, item);
        Py_DECREF(item);
        if (i >= 0) {
            Py_DECREF(it);
            Py_RETURN_FALSE;
        }
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_TRUE;
}

/* kind 0: keys, 1: values, 2: items */
static PyObject *listing(RowTable *t, int kind) {
    PyObject *out = PyList_New(t->len);
    if (out == NULL) return NULL;
    Py_ssize_t n = 0;
    for (Py_ssize_t i = 0; i < t->cap && n < t->len; i++) {
        if (!t->rows[i].key) continue;
        PyObject *item;
        if (kind == 0) {
            item = PyLong_FromUnsignedLongLong(t->rows[i].engine);
        } else if (kind == 1) {
            item = row_tuple(t, i);
        } else {
            PyObject *engine = PyLong_FromUnsignedLongLong(t->rows[i].engine);
            PyObject *row = engine ? row_tuple(t, i) : NULL;
            item = row ? PyTuple_Pack(2, engine, row) : NULL;
            Py_XDECREF(engine);
            Py_XDECREF(row);
        }
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, n++, item);
    }
    return out;
}

static PyObject *RowTable_keys(RowTable *t, PyObject *Py_UNUSED(unused)) { return listing(t, 0); }
static PyObject *RowTable_values(RowTable *t, PyObject *Py_UNUSED(unused)) { return listing(t, 1); }
static PyObject *RowTable_items(RowTable *t, PyObject *Py_UNUSED(unused)) { return listing(t, 2); }

static PyObject *RowTable_iter(RowTable *t) {
    PyObject *keys = listing(t, 0);
    if (keys == NULL) return NULL;
    PyObject *it = PyObject_GetIter(keys);
    Py_DECREF(keys);
    return it;
}

static PyObject *RowTable_clear(RowTable *t, PyObject *Py_UNUSED(unused)) {
    PyMem_Free(t->rows);
    t->rows = NULL;
    t->cap = t->len = 0;
    Py_RETURN_NONE;
}

static PyObject *RowTable_sizeof(RowTable *t, PyObject *Py_UNUSED(unused)) {
    return PyLong_FromSsize_t((Py_ssize_t)sizeof(RowTable) + t->cap * (Py_ssize_t)sizeof(Row));
}

static PyMethodDef RowTable_methods[] = {
    {"add", (PyCFunction)(void (*)(void))RowTable_add, METH_FASTCALL,
     "add(engine, key, parent, state): t[engine] = (key, parent, state)"},
    {"get", (PyCFunction)(void (*)(void))RowTable_get, METH_FASTCALL,
     "get(engine[, default]): the row, or default"},
    {"pop", (PyCFunction)(void (*)(void))RowTable_pop, METH_FASTCALL,
     "pop(engine[, default]): remove and return the row"},
    {"add_chain", (PyCFunction)(void (*)(void))RowTable_add_chain, METH_FASTCALL,
     "add_chain(engines, keys, parent, state, last_state): a chain's rows; how many new"},
    {"add_child", (PyCFunction)(void (*)(void))RowTable_add_child, METH_FASTCALL,
     "add_child(engine, key, parent, state): a row, and one more child for its parent"},
    {"leave", (PyCFunction)(void (*)(void))RowTable_leave, METH_FASTCALL,
     "leave(parent, eff): one child less, recency max(own, eff); the new state or None"},
    {"key_of", (PyCFunction)RowTable_key_of, METH_O,
     "key_of(engine): the row's key, or None if absent (no tuple built)"},
    {"bump", (PyCFunction)RowTable_bump, METH_O,
     "bump(engine): the row's state + 1 (one more child); KeyError if absent"},
    {"isdisjoint", (PyCFunction)RowTable_isdisjoint, METH_O,
     "isdisjoint(engines): True if none of them is held"},
    {"keys", (PyCFunction)RowTable_keys, METH_NOARGS, "the engine hashes, as a list"},
    {"values", (PyCFunction)RowTable_values, METH_NOARGS, "the rows, as a list"},
    {"items", (PyCFunction)RowTable_items, METH_NOARGS, "(engine hash, row) pairs, as a list"},
    {"clear", (PyCFunction)RowTable_clear, METH_NOARGS, "forget every row"},
    {"__sizeof__", (PyCFunction)RowTable_sizeof, METH_NOARGS, "bytes allocated"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods RowTable_as_sequence = {
    .sq_contains = (objobjproc)RowTable_contains,
};

static PyMappingMethods RowTable_as_mapping = {
    .mp_length = (lenfunc)RowTable_len,
    .mp_subscript = (binaryfunc)RowTable_subscript,
    .mp_ass_subscript = (objobjargproc)RowTable_ass_subscript,
};

static PyTypeObject RowTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "edgellm.kvindex._rows.RowTable",
    .tp_doc = "engine block hash -> (key, parent engine hash or None, state), compactly",
    .tp_basicsize = sizeof(RowTable),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = RowTable_new,
    .tp_dealloc = (destructor)RowTable_dealloc,
    .tp_as_sequence = &RowTable_as_sequence,
    .tp_as_mapping = &RowTable_as_mapping,
    .tp_iter = (getiterfunc)RowTable_iter,
    .tp_methods = RowTable_methods,
};

/* --- token packing ------------------------------------------------------------------ */

/* pack_tokens(tokens[, n]): the first n (default: all) token ids of a list or tuple as
 * 4-byte big-endian unsigned ints, the hash chain's input. TypeError for an item that is
 * not exactly an int (a bool is refused: it is no token id), OverflowError for one outside
 * 0 .. 2**32-1, ValueError if there are fewer than n. */
static PyObject *pack_tokens(PyObject *Py_UNUSED(module), PyObject *const *args,
                             Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pack_tokens(tokens[, n])");
        return NULL;
    }
    PyObject *seq = args[0];
    if (!PyList_Check(seq) && !PyTuple_Check(seq)) {
        PyErr_Format(PyExc_TypeError, "token ids must be a list or tuple, got %.50s",
                     Py_TYPE(seq)->tp_name);
        return NULL;
    }
    Py_ssize_t size = PySequence_Fast_GET_SIZE(seq), n = size;
    if (nargs == 2) {
        n = PyLong_AsSsize_t(args[1]);
        if (n == -1 && PyErr_Occurred()) return NULL;
        if (n < 0 || n > size) {
            PyErr_Format(PyExc_ValueError, "%zd token ids wanted, %zd given", n, size);
            return NULL;
        }
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 4);
    if (out == NULL) return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = items[i];
        if (!PyLong_CheckExact(item)) {
            PyErr_Format(PyExc_TypeError, "token id %zd is a %.50s, not an int", i,
                         Py_TYPE(item)->tp_name);
            Py_DECREF(out);
            return NULL;
        }
        unsigned long v = PyLong_AsUnsignedLong(item);  /* fast for one- or two-digit ints */
        if ((v == (unsigned long)-1 && PyErr_Occurred()) || v > 0xFFFFFFFFUL) {
            PyErr_Clear();
            PyErr_Format(PyExc_OverflowError, "token id %zd is outside 0..2**32-1", i);
            Py_DECREF(out);
            return NULL;
        }
        uint32_t u = (uint32_t)v;
        p[0] = (unsigned char)(u >> 24);
        p[1] = (unsigned char)(u >> 16);
        p[2] = (unsigned char)(u >> 8);
        p[3] = (unsigned char)u;
        p += 4;
    }
    return out;
}

/* --- the prefix hash chain ---------------------------------------------------------- */

/* XXH64 (Yann Collet's xxHash, 64-bit variant), from its specification: the prefix hash
 * chain's function, so that hashing a prompt costs no Python call per block. tests/unit/
 * test_kvindex_rows.py checks it against the xxhash package on random inputs. */
#define XXH_P1 0x9E3779B185EBCA87ULL
#define XXH_P2 0xC2B2AE3D27D4EB4FULL
#define XXH_P3 0x165667B19E3779F9ULL
#define XXH_P4 0x85EBCA77C2B2AE63ULL
#define XXH_P5 0x27D4EB2F165667C5ULL

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t read_le64(const unsigned char *p) {
    return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24
        | (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 | (uint64_t)p[6] << 48
        | (uint64_t)p[7] << 56;
}

static inline uint32_t read_le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t xxh_round(uint64_t acc, uint64_t input) {
    acc += input * XXH_P2;
    return rotl64(acc, 31) * XXH_P1;
}

static inline uint64_t xxh_merge(uint64_t acc, uint64_t v) {
    acc ^= xxh_round(0, v);
    return acc * XXH_P1 + XXH_P4;
}

static uint64_t xxh64(const unsigned char *p, size_t len, uint64_t seed) {
    const unsigned char *end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = seed + XXH_P1 + XXH_P2, v2 = seed + XXH_P2, v3 = seed, v4 = seed - XXH_P1;
        const unsigned char *limit = end - 32;
        do {
            v1 = xxh_round(v1, read_le64(p));
            v2 = xxh_round(v2, read_le64(p + 8));
            v3 = xxh_round(v3, read_le64(p + 16));
            v4 = xxh_round(v4, read_le64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xxh_merge(h, v1);
        h = xxh_merge(h, v2);
        h = xxh_merge(h, v3);
        h = xxh_merge(h, v4);
    } else {
        h = seed + XXH_P5;
    }
    h += (uint64_t)len;
    while (p + 8 <= end) {
        h ^= xxh_round(0, read_le64(p));
        h = rotl64(h, 27) * XXH_P1 + XXH_P4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)read_le32(p) * XXH_P1;
        h = rotl64(h, 23) * XXH_P2 + XXH_P3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p++) * XXH_P5;
        h = rotl64(h, 11) * XXH_P1;
    }
    h ^= h >> 33;
    h *= XXH_P2;
    h ^= h >> 29;
    h *= XXH_P3;
    h ^= h >> 32;
    return h;
}

/* chain_hashes(data, block_size, seed, parent): the prefix hash of every block of ``data``
 * (the packed token bytes of whole blocks, pack_tokens' output), each
 * xxh64(seed, le64(previous hash) || the block's bytes), the first chained on ``parent``.
 * ValueError if ``data`` is not whole blocks. */
static PyObject *chain_hashes(PyObject *Py_UNUSED(module), PyObject *const *args,
                              Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "chain_hashes(data, block_size, seed, parent)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *out = NULL;
    unsigned char *buf = NULL;
    Py_ssize_t block_size = PyLong_AsSsize_t(args[1]);
    uint64_t seed, h;
    if (block_size == -1 && PyErr_Occurred()) goto done;
    if (block_size < 1 || block_size > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "block_size must be within 1..2**20");
        goto done;
    }
    if (to_u64(args[2], &seed) < 0 || to_u64(args[3], &h) < 0) goto done;
    Py_ssize_t width = 4 * block_size;
    if (view.len % width) {
        PyErr_Format(PyExc_ValueError, "%zd bytes are not whole blocks of %zd tokens",
                     view.len, block_size);
        goto done;
    }
    Py_ssize_t n = view.len / width;
    buf = PyMem_Malloc((size_t)(8 + width));
    if (buf == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    out = PyList_New(n);
    if (out == NULL) goto done;
    const unsigned char *data = (const unsigned char *)view.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        for (int b = 0; b < 8; b++) buf[b] = (unsigned char)(h >> (8 * b));
        memcpy(buf + 8, data + i * width, (size_t)width);
        h = xxh64(buf, (size_t)(8 + width), seed);
        PyObject *item = PyLong_FromUnsignedLongLong(h);
        if (item == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, item);
    }
done:
    PyMem_Free(buf);
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef module_methods[] = {
    {"pack_tokens", (PyCFunction)(void (*)(void))pack_tokens, METH_FASTCALL,
     "pack_tokens(tokens[, n]): token ids as 4-byte big-endian ints (checked)"},
    {"chain_hashes", (PyCFunction)(void (*)(void))chain_hashes, METH_FASTCALL,
     "chain_hashes(data, block_size, seed, parent): the prefix hash of every block"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef rows_module = {
    PyModuleDef_HEAD_INIT, "edgellm.kvindex._rows",
    "The C parts of the prefix index: RowTable (the in-memory engine map), pack_tokens\n"
    "(token ids as the hash chain's bytes) and chain_hashes (the hash chain).", -1,
    module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__rows(void) {
    if (PyType_Ready(&RowTableType) < 0) return NULL;
    PyObject *m = PyModule_Create(&rows_module);
    if (m == NULL) return NULL;
    Py_INCREF(&RowTableType);
    if (PyModule_AddObject(m, "RowTable", (PyObject *)&RowTableType) < 0) {
        Py_DECREF(&RowTableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
