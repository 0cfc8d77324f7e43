"""The format's versions: each holds what the one before it holds and more (docs/format.md).

Apart from fileformat.py so that the forms can declare the version their chunks need
(forms/base.Form.version) without importing the file's reader, which reads their walk."""

FORMAT_VERSION = 1  # files without quantized storage
QUANTIZED_VERSION = 2  # version 1 plus integer bases and factors (docs/format.md, section 9)
SHARED_VERSION = 3  # version 2 plus chunks that share one basis (topology shared, docs/format.md section 10)
BASE_QUANT_VERSION = 4  # version 3 plus bases stored in a scheme of their own (`base_quant`, docs/format.md section 11)
GRID_VERSION = 5  # version 4 plus the mid-rise schemes int3-midrise and int2-midrise (docs/format.md section 12)
LEFT_VERSION = 6  # version 5 plus chunks that share their left factor (topology shared-left) and shared chunks'
# per-layer residual factors (docs/format.md section 13)
