"""Training methods: one module each, found through `get_method(Method)`.

Importing this package imports every method module, and each registers itself on its last line
(`register_method(Method.X, Impl)`), as peft's tuners do with `register_peft_method`.
"""

from vramplan.methods import (  # noqa: F401  (imported for their registration)
    dreambooth, full, hypernetwork, lokr, loha, lora, textual_inversion,
)
from vramplan.methods.base import (AdapterMethod, MethodImpl, TrainableTensor, get_method, register_method,
                                   registered_methods, safetensors_file_bytes)

__all__ = ["AdapterMethod", "MethodImpl", "TrainableTensor", "get_method", "register_method",
           "registered_methods", "safetensors_file_bytes"]
