"""Router logs: the on-disk format, a crash-safe writer, a validating lazy reader, importers.

A router log is a directory with ``manifest.json`` and ``shards/NNNNN.safetensors`` (see
:mod:`usmoe_lp.logs.format`). Capture one from a live model with :func:`capture`, write one with
:class:`RouterLogWriter`, read it with :meth:`RouterLog.open`, or turn a foreign dump into one
with :func:`import_hf_router_logits`, :func:`import_array`, :func:`import_safetensors` or
:func:`import_file`; import the experts a serving or training stack recorded (SGLang, vLLM,
Megatron-Core, the OLMoE scripts) as a selection log with :func:`import_foreign` (formats: :data:`FORMATS`).
"""

from usmoe_lp.logs.capture import CaptureFailed, RouterNotFound, RouterSpec, capture, find_routers
from usmoe_lp.logs.errors import (
    CorruptLog,
    ImportFailed,
    InvalidLogInput,
    LogError,
    LogExists,
    LogNotFound,
    MissingLayer,
    NonFiniteLogits,
    UnsupportedVersion,
)
from usmoe_lp.logs.foreign import FORMATS, ForeignFormat, import_foreign
from usmoe_lp.logs.format import FORMAT_VERSION, LayerInfo, Manifest, ModelInfo, ShardInfo, TensorSpec
from usmoe_lp.logs.importers import (
    import_array,
    import_file,
    import_hf_router_logits,
    import_safetensors,
    load_tensor,
)
from usmoe_lp.logs.reader import Chunk, RouterLog, ValidationReport
from usmoe_lp.logs.writer import RouterLogWriter

__all__ = [
    "CaptureFailed", "RouterNotFound", "RouterSpec", "capture", "find_routers",
    "FORMAT_VERSION", "FORMATS", "ForeignFormat", "import_foreign",
    "Chunk", "CorruptLog", "ImportFailed", "InvalidLogInput", "LayerInfo", "LogError",
    "LogExists", "LogNotFound", "Manifest", "MissingLayer", "ModelInfo", "NonFiniteLogits", "RouterLog",
    "RouterLogWriter", "ShardInfo", "TensorSpec", "UnsupportedVersion", "ValidationReport", "import_array",
    "import_file", "import_hf_router_logits", "import_safetensors", "load_tensor",
]
