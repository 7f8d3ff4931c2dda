"""Triton-interpreter compatibility (TRITON_INTERPRET=1 only; compiled kernels never import this).

Triton 3.6's interpreter turns a scalar tensor into a Python int (as a `range` bound) with
`int(array)` on a shape-(1,) array, which NumPy >= 2.3 rejects. Newer Triton squeezes first; this
gives 3.6 the same behaviour, and does nothing where the conversion already works.
"""

import numpy as np


def _scalar_int_conversion_works() -> bool:
    try:
        int(np.ones(1, dtype=np.int32))
    except TypeError:
        return False
    return True


def patch_scalar_index() -> None:
    if _scalar_int_conversion_works():
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_fastgpt_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._fastgpt_patched = True
    interpreter._patch_lang_tensor = patched
