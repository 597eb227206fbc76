/* Compiled by the host C compiler (build.rs, via cc): the static_asserts in abi.h run here
 * even when no nvcc is present, and the sizes are exported for the Rust layout test. */
#include <stddef.h>
#include "abi.h"

size_t engine_abi_sizeof(int which) {
    switch (which) {
    case 0: return sizeof(engine_attention_params);
    case 1: return sizeof(engine_matmul_params);
    case 2: return sizeof(engine_norm_params);
    default: return 0;
    }
}
