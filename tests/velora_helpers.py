"""One compressed layer built the way apply_velora builds it (an nn.Linear and a codec from make_codec),
for the tests of velora's layer, function and codecs."""
import torch.nn as nn

from velora import CompressedLinear
from velora.codecs import make_codec


def compressed(d_in: int, d_out: int, codec: str = "velora", bias: bool = False, sub_token_size: int = 8,
               **codec_kw) -> CompressedLinear:
    """A CompressedLinear over a new nn.Linear(d_in, d_out) (nn.Linear's initialisation); `sub_token_size`
    (unused by sr<k>) and `codec_kw` go to make_codec."""
    return CompressedLinear(nn.Linear(d_in, d_out, bias=bias),
                            make_codec(codec, d_in, sub_token_size=sub_token_size, **codec_kw))
