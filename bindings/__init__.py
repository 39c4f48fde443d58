"""torch.library bindings: importing this package registers ``torch.ops.tokentm.*``.

See ``tokentm_fast.bindings.library`` for the schemas. Use the ops through
``torch.ops.tokentm.<name>`` or the validated plain-tensor API
``tokentm_fast.ops``.
"""
from .library import (  # noqa: F401  (importing registers the ops)
    NAMESPACE,
    OP_NAMES,
    fuse_heads,
    legrad_reduce,
    matrix_update,
    register,
    row_update,
    transform_weights,
)

__all__ = ["NAMESPACE", "OP_NAMES", "register", *OP_NAMES]
