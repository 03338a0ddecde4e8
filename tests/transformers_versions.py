"""Plain-transformers behaviours that differ between the versions pyproject.toml allows (5.21 and newer).

Tests that check what plain transformers does with our outputs assert the installed version's
behaviour through these flags, so the suite passes, and stays meaningful, at the floor and at the newest.
"""

from __future__ import annotations

import transformers
from packaging.version import Version

INSTALLED = Version(transformers.__version__)

# transformers 5.23 changed its compressed-tensors loading (checked on 5.21.0, 5.22.0, 5.23 and 5.24.0):
# - asymmetric pack-quantized checkpoints: 5.21/5.22 load them and dequantize exactly as our reference
#   does; 5.23 and newer build the zero-point tensor unpacked and stop ("ignore_mismatched_sizes",
#   llm-compressor#1618);
# - MoE checkpoints with dense per-expert tensors beside packed layers: 5.21/5.22 load them with the
#   routed experts reported missing (left randomly initialised); 5.23 and newer stop ("automatic
#   conversion of the weights").
COMPRESSED_TENSORS_LOADER_5_23 = INSTALLED >= Version("5.23")
