"""Activation codecs: what a compressed input tensor keeps for backward (see base.py)."""
from __future__ import annotations

from ..config import check_codec, check_fused
from .base import Codec, Encoded, mix_seed
from .pca import PrincipalPlusRandom
from .quant import StochasticRounding
from .subtoken import RandomSubToken, SubTokenBasis, compute_dtype


def make_codec(name: str, width: int, *, sub_token_size: int, rank: int = 1, init: str = "batch_average_once",
               coef_dtype: str = "compute", grad_scale: float = 1.0, group_size: int = 128,
               refresh_every: int = 200, seed: int = 0, fused="auto", device=None) -> Codec:
    """The codec `name` (one of velora.config.CODECS) for inputs of width `width`.

    `sub_token_size`, `rank`: M and r of the sub-token codecs (and of pca's budget); `init`,
    `coef_dtype`, `grad_scale`: velora's; `group_size`: sr<k>'s; `refresh_every`: pca's; `seed`: the velora
    `random` init's seed, and the stream of the random codecs (mixed with rank and forward count);
    `fused`: velora.fused ("auto", True or False, see fused.py).
    """
    check_codec(name)
    check_fused(fused)
    if name == "velora":
        codec = SubTokenBasis(width, sub_token_size, rank, init, coef_dtype, seed, grad_scale=grad_scale,
                              device=device)
    elif name in ("sr2", "sr4", "sr8"):
        codec = StochasticRounding(width, int(name[2:]), group_size, seed, device=device)
    elif name in ("rademacher", "gaussian"):
        codec = RandomSubToken(width, sub_token_size, rank, name, seed, device=device)
    else:   # pca (check_codec refused any other name)
        codec = PrincipalPlusRandom(width, sub_token_size, rank, refresh_every, seed, device=device)
    codec.fused = fused
    return codec


__all__ = ["Codec", "Encoded", "PrincipalPlusRandom", "RandomSubToken", "StochasticRounding", "SubTokenBasis",
           "compute_dtype", "make_codec", "mix_seed"]
