"""What the numbers of a GPU check were measured on: device, driver, library versions, the SDPA kernel our
attention runs, and the TF32 switches."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F

# The aten op each SDPA backend runs as (the profiler names the op our attention call dispatched to).
SDPA_OPS = {"_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
            "_scaled_dot_product_flash_attention": "flash",
            "_scaled_dot_product_efficient_attention": "memory-efficient",
            "_scaled_dot_product_cudnn_attention": "cuDNN", "_scaled_dot_product_fused_attention_overrideable": "fused",
            "_scaled_dot_product_attention_math": "math"}
PACKAGES = ("deepspeed", "triton", "numpy", "sentencepiece", "galore-torch", "transformers", "safetensors",
            "tensorboard", "pydantic")


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi (None where there is none)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def sdpa_backend(device: torch.device, heads: int, head_dim: int, seq_len: int, dtype: torch.dtype) -> str:
    """The SDPA kernel a causal attention call of this shape dispatches to, as our model calls it
    (F.scaled_dot_product_attention, is_causal=True), forward and backward."""
    from torch.profiler import profile
    q, k, v = (torch.randn(2, heads, seq_len, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    with profile() as prof:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    names = {e.key.removeprefix("aten::") for e in prof.key_averages()}
    found = [label for op, label in SDPA_OPS.items() if op in names]
    return ", ".join(found) or "math (no fused SDPA op ran)"


def tf32_settings() -> dict:
    """The TF32 switches torch reads for fp32 matmuls and convolutions."""
    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def environment(device: torch.device, model_cfg) -> dict:
    """One flat dict: device, driver, CUDA, cuDNN, torch, python, packages, SDPA backend for `model_cfg`'s
    attention shape in bf16, TF32 settings."""
    env = {"device": "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device),
           "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
           else None, "cpu_count": os.cpu_count(), "driver": None, "capability": None, "gpu_memory_gib": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(driver=driver_version(), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 2), gpu_count=torch.cuda.device_count())
    env.update({p: version(p) for p in PACKAGES})
    heads = model_cfg.num_attention_heads
    env["sdpa_backend"] = sdpa_backend(device, heads, model_cfg.hidden_size // heads, 256, torch.bfloat16)
    env["sdpa_enabled"] = ", ".join(name for name in ("flash", "mem_efficient", "math", "cudnn")
                                    if getattr(torch.backends.cuda, f"{name}_sdp_enabled", lambda: False)())
    env.update(tf32_settings())
    return env


def galore_without_8bit() -> str:
    """Make `from galore_torch import GaLoreAdamW, GaLoreAdafactor` work where bitsandbytes is missing:
    galore_torch's __init__ imports its 8-bit AdamW, which needs bitsandbytes (about 70 MB, more than a
    lease's wheelhouse can carry, and not used here). The package is then registered without its
    __init__, holding the two optimizers we use. Returns a note ("" when nothing had to be done)."""
    import importlib.util
    import types

    try:
        import galore_torch  # noqa: F401
        return ""
    except ImportError as e:
        spec = importlib.util.find_spec("galore_torch")
        if spec is None or "bitsandbytes" not in str(e):
            return f"galore_torch not importable ({e}); the GaLore cases will fail"
        first = e
    bare = types.ModuleType("galore_torch")
    bare.__path__ = list(spec.submodule_search_locations)
    sys.modules["galore_torch"] = bare
    try:
        from galore_torch.adafactor import Adafactor
        from galore_torch.adamw import AdamW
    except ImportError as e:
        del sys.modules["galore_torch"]
        return f"galore_torch not importable ({e}; first {first}); the GaLore cases will fail"
    bare.GaLoreAdamW, bare.GaLoreAdafactor = AdamW, Adafactor
    return f"galore_torch loaded without its 8-bit optimizer ({first})"
