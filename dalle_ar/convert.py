"""OpenAI's released dVAE (encoder.pkl + decoder.pkl) -> a dVAE directory (taming VQGANs: convert_taming.py).

    dalle-ar convert openai-dvae --encoder encoder.pkl --decoder decoder.pkl --out openai-dvae/

OpenAI ship whole pickled modules of their `dall_e` package, so reading them needs that package
(`pip install attrs requests && pip install DALL-E --no-deps`). They are read with
torch.load(weights_only=True) and an allow-list of the classes they are made of (no code from the
file runs), mapped onto DiscreteVAE's names (`blocks.*` -> `encoder.blocks.*` / `decoder.blocks.*`)
and written as config.json + model.safetensors. After this one-time step the pickles are never needed again.
"""

from __future__ import annotations

import re
from pathlib import Path

# torch (and the dVAE) load inside the functions: `dalle-ar --help` reads this module's constants.
OPENAI_IMAGE_SIZE = 256  # the released model was trained on 256 x 256 images (32 x 32 codes)
INSTALL_HINT = ("reading OpenAI's pickles needs their `dall_e` package: pip install attrs requests && "
                "pip install DALL-E --no-deps  (pure Python; --no-deps keeps it from replacing torch)")


def _infer(enc_sd: dict, dec_sd: dict, image_size: int):
    """DVAEConfig fields from the tensor shapes of OpenAI-layout state dicts."""
    for name, sd, key in (("encoder", enc_sd, "blocks.input.w"), ("encoder", enc_sd, "blocks.output.conv.w"),
                          ("decoder", dec_sd, "blocks.input.w"), ("decoder", dec_sd, "blocks.output.conv.w")):
        if key not in sd:
            raise ValueError(f"{name} state dict has no {key!r}: not OpenAI's dall_e layout "
                             f"(keys start with {sorted(sd)[:3]})")
    groups = sorted({int(m.group(1)) for k in enc_sd if (m := re.match(r"blocks\.group_(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in enc_sd if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))}
    if not groups or groups != list(range(1, len(groups) + 1)) or not blocks:
        raise ValueError(f"encoder state dict: groups {groups}, blocks {sorted(blocks)}: not OpenAI's dall_e layout")
    enc_in, enc_out = enc_sd["blocks.input.w"], enc_sd["blocks.output.conv.w"]
    dec_in, dec_out = dec_sd["blocks.input.w"], dec_sd["blocks.output.conv.w"]
    if dec_in.shape[1] != enc_out.shape[0]:
        raise ValueError(f"encoder vocabulary {enc_out.shape[0]} != decoder vocabulary {dec_in.shape[1]}")
    if dec_out.shape[0] != 2 * enc_in.shape[1]:
        raise ValueError(f"decoder outputs {dec_out.shape[0]} channels; the logit-Laplace decoder of a "
                         f"{enc_in.shape[1]}-channel encoder has {2 * enc_in.shape[1]}")
    return dict(image_size=image_size, input_channels=int(enc_in.shape[1]), n_hid=int(enc_in.shape[0]),
                group_count=len(groups), n_blk_per_group=len(blocks), vocab_size=int(enc_out.shape[0]),
                n_init=int(dec_in.shape[0]), loss="logit_laplace", logit_laplace_eps=0.1)


def convert_openai_state_dicts(enc_sd: dict, dec_sd: dict, image_size: int = OPENAI_IMAGE_SIZE):
    """OpenAI `dall_e` Encoder/Decoder state dicts -> (DVAEConfig, DiscreteVAE state dict, fp32).

    Pure: the config comes from the tensor shapes (image_size, which weights do not fix, is an
    argument); the mapped dict is checked key by key and shape by shape against the model it
    describes, so anything else is a ValueError naming the problem.
    """
    import torch

    from .dvae import DiscreteVAE, DVAEConfig

    config = DVAEConfig(**_infer(enc_sd, dec_sd, image_size))
    sd = {f"{part}.{k}": v.detach().to("cpu", torch.float32).contiguous()
          for part, src in (("encoder", enc_sd), ("decoder", dec_sd)) for k, v in src.items()}
    DiscreteVAE.check_weights(sd, config, "OpenAI state dicts", "the config")  # shapes only: no memory for 8192 codes
    return config, sd


def load_openai_pickle(path) -> dict:
    """The state dict of one of OpenAI's pickled dall_e modules (encoder.pkl / decoder.pkl)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        import dall_e.decoder
        import dall_e.encoder
        import dall_e.utils
    except ImportError as e:
        raise ValueError(f"{INSTALL_HINT} ({e})") from None
    import collections

    import torch
    import torch.nn as nn

    # Exactly what the released modules are made of; weights_only refuses anything else.
    allowed = [dall_e.encoder.Encoder, dall_e.encoder.EncoderBlock, dall_e.decoder.Decoder,
               dall_e.decoder.DecoderBlock, dall_e.utils.Conv2d, nn.Sequential, nn.ReLU, nn.MaxPool2d,
               nn.Upsample, nn.Identity, collections.OrderedDict, torch.device, set]
    try:
        with torch.serialization.safe_globals(allowed):
            module = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (unpickling errors come in many types)
        import zipfile

        if not zipfile.is_zipfile(path):  # torch < 1.6 wrote modules with a reference to their source code
            raise ValueError(f"{path}: a plain pickle or one in torch's legacy (pre-1.6) format, which cannot be read without "
                             f"running code from it. If you trust the file, re-save it once in the current format: "
                             f"python -c \"import torch; torch.save(torch.load('{path}', weights_only=False), "
                             f"'{path.with_suffix('.new.pkl')}')\" and convert that") from None
        # torch's own text advises weights_only=False ("will likely succeed"): keep only what it refused
        lines = [x for x in str(e).splitlines() if x.strip() and not x.startswith(
            ("Weights only load failed", "Please file an issue", "Check the documentation"))]
        detail = lines[0].replace("WeightsUnpickler error:", "").strip() if lines else str(e)
        raise ValueError(f"{path}: not a dall_e module pickle torch can read safely: {detail[:300]}") from None
    if not isinstance(module, nn.Module):
        raise ValueError(f"{path}: expected a pickled dall_e Encoder or Decoder, got {type(module).__name__}")
    return module.state_dict()


def convert_openai_dvae(encoder, decoder, out, image_size: int = OPENAI_IMAGE_SIZE) -> Path:
    """encoder.pkl + decoder.pkl -> `out`/config.json + model.safetensors (loadable by DiscreteVAE.from_pretrained)."""
    from . import io

    config, sd = convert_openai_state_dicts(load_openai_pickle(encoder), load_openai_pickle(decoder), image_size)
    return io.save_pretrained(out, config, sd)
