"""What a GPU adds to the CPU count, each correction stated (none of these can be measured here).

- Allocator rounding: the CUDA caching allocator rounds every block up to 512 bytes (kMinBlockSize in
  c10/cuda/CUDACachingAllocator.cpp) and `max_memory_allocated` counts rounded blocks: the tracker keeps
  that count beside the exact one. Blocks are carved from segments (2 MiB for requests up to 1 MiB, 20 MiB
  up to 10 MiB, larger ones rounded to 2 MiB): that is *reserved* memory, above allocated by the
  fragmentation, which the fit leaves to FIT_MARGIN.
- cuBLAS workspace: PyTorch allocates it through the caching allocator on the first matmul, so it counts
  in `max_memory_allocated`: 32 MiB per handle on Hopper (its default CUBLAS_WORKSPACE_CONFIG,
  `:4096:8`; 8 MiB + 128 KiB on older GPUs). One handle: one stream, one thread.
- CUDA context: the driver's own memory (kernels, cuBLAS/cuDNN handles), outside PyTorch's allocator and
  outside `max_memory_allocated`, but not available to tensors: about 500 MiB with CUDA 12's lazy module
  loading (an assumption; it varies with driver and libraries).
- Attention: the CPU step runs `_scaled_dot_product_flash_attention_for_cpu`, which saves q, k, v, the
  output and an fp32 log-sum-exp of shape (batch, heads, tokens); CUDA's flash attention saves the same
  tensors plus two 8-byte RNG scalars per layer (its philox seed and offset): no correction beyond the
  rounding.
"""
from __future__ import annotations

MIB = 2 ** 20
CUBLAS_WORKSPACE = 32 * MIB
CUDA_CONTEXT = 500 * MIB
FIT_MARGIN = 0.05          # reserved above allocated (fragmentation), as a fraction of the device


def cuda_corrections(rounded_peak: int) -> dict:
    """The GPU prediction from the tracker's 512-byte-rounded peak."""
    allocated = rounded_peak + CUBLAS_WORKSPACE
    return {"max_memory_allocated": allocated, "allocator_rounding_included": True,
            "cublas_workspace_bytes": CUBLAS_WORKSPACE, "cuda_context_bytes": CUDA_CONTEXT,
            "device_bytes": allocated + CUDA_CONTEXT}


def fits(plan: dict, gpu_bytes: int) -> bool:
    """Whether a step fits a GPU of `gpu_bytes`: allocated + context within (1 - FIT_MARGIN) of it."""
    return plan["cuda"]["device_bytes"] <= gpu_bytes * (1 - FIT_MARGIN)
