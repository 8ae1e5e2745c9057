"""Compatibility shim for Triton's CPU interpreter (``TRITON_INTERPRET=1``, how CI runs kernels).

Triton 3.6's interpreter holds scalars as 1-element arrays and converts them with
``int(ndarray)``, which NumPy >= 2 refuses, so any loop bounded by a loaded value (a sequence
length) fails there. :func:`patch` makes the conversion take the element. It only touches the
interpreter; remove it once Triton's interpreter converts with ``.item()`` itself.
"""

from __future__ import annotations

import os

_patched = False


def patch() -> None:
    global _patched
    if _patched or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    _patched = True
