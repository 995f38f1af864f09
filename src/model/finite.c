/* Finding and naming non-finite values (see finite.h). Only a failing step or a
 * load pays for a scan: the hot loops never test their values. */
#include "dpoc/finite.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "dpoc/dtype.h"

/* The exponent bits of the 16-bit formats: all ones is an Inf or a NaN. */
#define F16_EXP_MASK 0x7C00u
#define BF16_EXP_MASK 0x7F80u

size_t dpoc_find_nonfinite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return i;
    return n;
}

static size_t find_nonfinite_16(const uint16_t *x, size_t n, uint16_t mask) {
    for (size_t i = 0; i < n; i++)
        if ((x[i] & mask) == mask) return i;
    return n;
}

static const char *kind_of(float v) { return isnan(v) ? "nan" : v > 0 ? "inf" : "-inf"; }

int dpoc_model_find_nonfinite(const dpoc_model *m, const float *block, size_t lo, size_t hi, size_t *row,
                              size_t *elem) {
    for (size_t i = 0; i < m->n_tensors; i++) {
        const dpoc_param_info *p = &m->info[i];
        if (!p->trainable || p->offset + p->numel <= lo || p->offset >= hi) continue;
        const size_t a = p->offset > lo ? p->offset : lo;
        const size_t b = p->offset + p->numel < hi ? p->offset + p->numel : hi;
        const size_t at = dpoc_find_nonfinite(block + (a - lo), b - a);
        if (at < b - a) {
            *row = i;
            *elem = a - p->offset + at;
            return 1;
        }
    }
    return 0;
}

int dpoc_model_check_finite(const dpoc_model *m, const float *block, size_t lo, size_t hi, const char *what,
                            dpoc_err *err) {
    size_t row, elem;
    if (!dpoc_model_find_nonfinite(m, block, lo, hi, &row, &elem)) return 0;
    const dpoc_param_info *p = &m->info[row];
    const float v = block[p->offset + elem - lo];
    return dpoc_errf(err, DPOC_EINPUT, "%s %s is not finite (%s at element %zu of %zu)", what, p->name, kind_of(v),
                     elem, p->numel);
}

int dpoc_model_check_weights(const dpoc_model *m, const char *source, dpoc_err *err) {
    for (size_t i = 0; i < m->n_tensors; i++) {
        const dpoc_param_info *p = &m->info[i];
        size_t at = p->numel;
        const char *kind = "nan or inf";
        if (p->data) { /* kept in its source's storage */
            if (p->dtype == DPOC_DT_F32) at = dpoc_find_nonfinite(p->data, p->numel);
            else if (p->dtype == DPOC_DT_F16) at = find_nonfinite_16(p->data, p->numel, F16_EXP_MASK);
            else if (p->dtype == DPOC_DT_BF16) at = find_nonfinite_16(p->data, p->numel, BF16_EXP_MASK);
            if (at < p->numel && p->dtype == DPOC_DT_F32) kind = kind_of(((const float *)p->data)[at]);
        } else {
            const float *base = p->trainable ? m->params : m->frozen;
            if (!base || p->offset == DPOC_NO_PARAM) continue;
            at = dpoc_find_nonfinite(base + p->offset, p->numel);
            if (at < p->numel) kind = kind_of(base[p->offset + at]);
        }
        if (at < p->numel)
            return dpoc_errf(err, DPOC_EINPUT, "%s: weight %s is not finite (%s at element %zu of %zu)", source,
                             p->name, kind, at, p->numel);
    }
    return 0;
}

void dpoc_act_watch_see(dpoc_act_watch *w, const char *name, float *x, size_t n) {
    if (!n) return;
    if (w->inject[0] && strcmp(w->inject, name) == 0) {
        x[0] = w->inject_value;
        w->injected++;
    }
    if (!w->check || w->first[0]) return;
    const size_t at = dpoc_find_nonfinite(x, n);
    if (at == n) return;
    snprintf(w->first, sizeof w->first, "%s", name);
    w->first_index = at;
    w->first_value = x[at];
}
