/* Names of the profile categories (dpoc/prof.h). */
#include "dpoc/prof.h"

static const char *const NAMES[DPOC_PROF_N] = {"gemm", "attention", "pointwise", "lm_head",
                                               "loss",  "optimizer", "communication", "data"};

const char *dpoc_prof_name(dpoc_prof_kind k) { return (unsigned)k < DPOC_PROF_N ? NAMES[k] : "?"; }
