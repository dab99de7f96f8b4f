"""The pipeline's argument checks: what a call may be given, each a ValueError naming the argument."""

from __future__ import annotations

from typing import Optional

import torch

OUTPUT_TYPES = ("pil", "np", "pt", "codes")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def check_dtype(dtype, name: str = "torch_dtype") -> Optional[torch.dtype]:
    """None, a floating torch.dtype or one of DTYPES' names ("bf16", "torch.float16", ...) -> torch.dtype."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"{name} must be None, torch.float32/bfloat16/float16 or one of {sorted(DTYPES)}, got {dtype!r}")


def check_prompts(prompts) -> list[str]:
    """One prompt or a non-empty list of non-blank strings -> a list."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: the list is empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts: prompt {i} is empty or not a string: {p!r}")
    return prompts


def check_call(num_candidates, keep, batch_size, output_type, callback_on_step_end) -> None:
    """The counts (integers >= 1, keep <= num_candidates), output_type and the step callback of a call."""
    for name, v in (("num_candidates", num_candidates), ("keep", keep), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if keep > num_candidates:
        raise ValueError(f"keep={keep} > num_candidates={num_candidates}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise ValueError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")


def check_keep_rows(keep_rows, init_image, grid: int) -> Optional[int]:
    """The rows of init_image's codes kept (1 .. grid-1; default grid // 2), None without an init_image."""
    if keep_rows is not None and init_image is None:
        raise ValueError("keep_rows needs an init_image")
    if init_image is not None:
        keep_rows = grid // 2 if keep_rows is None else keep_rows
        if not isinstance(keep_rows, int) or isinstance(keep_rows, bool) or not 1 <= keep_rows < grid:
            raise ValueError(f"keep_rows must be an int in [1, {grid - 1}] (the image has {grid} rows of codes), "
                             f"got {keep_rows!r}")
    return keep_rows


def per_prompt(value, prompts: list, name: str, allow_empty: bool = False) -> Optional[list]:
    """None, one value for every prompt, or a list/tuple with one per prompt -> None or a list."""
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple)) else [value] * len(prompts)
    if len(values) != len(prompts):
        raise ValueError(f"{name}: {len(values)} given for {len(prompts)} prompts")
    if name == "negative_prompt":
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise ValueError(f"negative_prompt must be a string or one per prompt, item {i} is {type(v).__name__}")
    return values


def prompt_generators(prompts: list, seed, generator, device) -> list[torch.Generator]:
    """One torch.Generator per prompt: seeded `seed + i` (seed None: 0), or the given one(s)."""
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if generator is None:
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be None or an int, got {seed!r}")
        return [torch.Generator(device=device).manual_seed((seed or 0) + i) for i in range(len(prompts))]
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * len(prompts)
    if len(gens) != len(prompts) or not all(isinstance(x, torch.Generator) for x in gens):
        raise ValueError(f"generator must be a torch.Generator or a list of {len(prompts)} (one per prompt), "
                         f"got {generator!r}")
    return gens
