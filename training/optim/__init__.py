"""The optimizers of a run: `build_optimizer` (AdamW, 8-bit AdamW, Adafactor, GaLore), the learning-rate
schedule, and the ZeRO library under them (`partition_layouts` recovers which parameter pieces each rank's
flat partition holds; ZeroAdafactor and ZeroGaLore step those partitions)."""
from .build import build_optimizer, galore_param_groups
from .schedule import build_scheduler, lr_factor, warmup_steps
from .zero_adafactor import ZeroAdafactor
from .zero_galore import ZeroGaLore
from .zero_layout import PINNED, partition_layouts, row_blocks

__all__ = ["PINNED", "ZeroAdafactor", "ZeroGaLore", "build_optimizer", "build_scheduler", "galore_param_groups",
           "lr_factor", "partition_layouts", "row_blocks", "warmup_steps"]
