"""AWQ (Lin et al. 2023, arXiv:2306.00978): per-input-channel scales that protect salient channels,
folded into the op that produces the linears' input, so the exported graph needs no extra op.

For a group of linears that share one input X (produced by ``prev``: an RMSNorm or a linear), the
search tries ``s = mean|X|^alpha`` (normalised by sqrt(max*min), alpha in [0, 1) on a grid, as the
reference ``auto_scale``) and keeps the alpha minimising ``||X W^T - (X/s) Q(W s)^T||^2`` over the
group's outputs on the captured calibration rows; alpha = 0 is s = 1, i.e. plain RTN, so the search
is never worse than RTN on that objective. Then ``prev``'s output channels are divided by s (norm
gain, or linear rows and bias) and the linears' input columns multiplied by s; the linears are
rounded afterwards by the format's own RTN. The rescaled float tensors of ``prev`` are returned so
the writer stores them instead of the originals.

Groups are data (each architecture record's ``awq_groups``, as roles): a group is used only where every listed linear present in the
layer is quantized and nothing else reads ``prev``'s output. Routed experts: each expert's down_proj
gets its own scale folded into its up_proj rows (moe_coverage.py). Not scaled: the routed experts'
gate/up inputs (the post-attention norm also feeds the router and every expert), o_proj under GQA
(v rows are shared by several query heads), and lm_head (no op before it to fold into). Every AWQ
linear is then rounded with a per-block clip search weighted by its rescaled inputs (methods.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..archs import ARCHITECTURES, module_path
from ..formats import FORMATS
from .methods import CalibOptions, InputStats


def _mha(config) -> bool:
    return int(config.num_attention_heads) == int(getattr(config, "num_key_value_heads", config.num_attention_heads))


# Conditions a record's AwqGroup may name (``when``), on transformers' config object.
CONDITIONS: dict[str, Callable[[object], bool]] = {"": lambda config: True, "mha": _mha}


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # module whose output is the linears' input
    linears: tuple[str, ...]  # every reader of that output (those absent from a layer are ignored)
    when: Callable[[object], bool] = lambda config: True


def scale_groups(model_type: str) -> tuple[ScaleGroup, ...]:
    """The AWQ groups of ``model_type``'s record as module paths inside one decoder layer ((), unknown type)."""
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        return ()
    return tuple(
        ScaleGroup(module_path(g.prev), tuple(module_path(r) for r in g.linears), CONDITIONS[g.when])
        for g in arch.awq_groups
    )


def _get(layer: nn.Module, path: str) -> nn.Module | None:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


def search_scale(
    x: torch.Tensor, weights: list[torch.Tensor], formats: list[str], grid: int
) -> tuple[torch.Tensor, float, float]:
    """Best per-channel scale for inputs ``x`` [n, in] and the group's weights; returns (s, alpha, rel err)."""
    ref = torch.cat([x @ w.T for w in weights], dim=1)
    ref_norm = float(ref.double().square().sum())
    x_mean = x.abs().mean(0)
    best = (torch.ones(x.shape[1]), 0.0, math.inf)
    for k in range(grid):
        alpha = k / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        out = torch.cat(
            [(x / s) @ FORMATS[f].quantize(w * s).dequantize().T for w, f in zip(weights, formats, strict=True)], dim=1
        )
        err = float((out - ref).double().square().sum())
        if err < best[2]:
            best = (s, alpha, err)
    s, alpha, err = best
    return s, alpha, math.sqrt(err / ref_norm) if ref_norm > 0 else math.sqrt(err)


def apply_awq(
    layer: nn.Module,
    prefix: str,
    config,
    stats: dict[str, InputStats],
    formats: dict[str, str],
    opts: CalibOptions,
    dtypes: dict[str, torch.dtype] | None = None,
) -> dict[str, torch.Tensor]:
    """Search and fold AWQ scales into ``layer`` in place; return rescaled float tensors of ``prev`` ops
    that are not themselves quantized (by HF name), rounded to their checkpoint dtype."""
    out: dict[str, torch.Tensor] = {}
    dtypes = dtypes or {}
    for group in scale_groups(config.model_type):
        prev = _get(layer, group.prev)
        present = [n for n in group.linears if _get(layer, n) is not None]
        if prev is None or not present or not group.when(config):
            continue
        if any(f"{prefix}{n}.weight" not in formats or n not in stats or not stats[n].rows for n in present):
            continue  # a reader is kept unquantized or was not captured: leave the group unscaled
        x = stats[present[0]].samples
        mods = [layer.get_submodule(n) for n in present]
        s, _, _ = search_scale(  # float32 weights: the captured rows are float32 whatever the forward's dtype
            x, [m.weight.data.to(torch.float32) for m in mods], [formats[f"{prefix}{n}.weight"] for n in present],
            opts.awq_grid,
        )
        for m in mods:  # float32 (a bfloat16 forward's weights too): the quantizer rounds these values
            m.weight.data = m.weight.data.to(torch.float32) * s
        # later groups' searches see the scaled inputs; linears reading one input share one statistics
        # object (methods.SharedInputs): scale its rows once
        for st in {id(stats[n]): stats[n] for n in present}.values():
            if st.rows:
                st.rows = [r / s for r in st.rows]
        for pname, p in prev.named_parameters(recurse=False):
            if pname not in ("weight", "bias"):
                continue
            scaled = p.data / s if p.data.ndim == 1 else p.data / s.unsqueeze(1)
            hf = f"{prefix}{group.prev}.{pname}"
            if hf in formats:  # a quantized linear: its QuantizedTensor is made from the scaled weight later
                p.data = scaled
                continue
            dtype = dtypes.get(hf, torch.bfloat16)
            p.data = scaled.to(dtype).to(p.dtype)  # what the writer will store, in the forward's dtype
            out[hf] = scaled.to(dtype)
        # the prev linear's own input statistics are unaffected (its input is not rescaled)
    return out
