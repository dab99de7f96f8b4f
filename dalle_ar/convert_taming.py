"""`dalle-ar convert taming-vqgan`: a taming-transformers VQGAN checkpoint -> a VQGAN directory.

    dalle-ar convert taming-vqgan --ckpt last.ckpt --config model.yaml --out vqgan-f16-1024/

taming's released models (VQModel: ImageNet f16 1024 / 16384, OpenImages f8; GumbelVQ: f8 8192)
are PyTorch Lightning checkpoints: the weights under "state_dict", beside optimizer and callback
state, and a YAML that holds the architecture. The checkpoint is read with torch's weights-only
unpickler; the classes Lightning pickles next to the weights (callbacks, hyper-parameter
containers) are replaced by inert stand-ins from an allow-list of packages, and any other class
or function the file names (os.system, builtins.eval, ...) stops the load with a ValueError
before anything runs. `loss.*` (discriminator, LPIPS) is dropped, the YAML is checked against
the tensor shapes, and config.json + model.safetensors are written only when everything matches.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Packages whose pickled classes a Lightning checkpoint carries beside the weights; none is needed
# for the weights, so each is loaded as an inert placeholder.
INERT_PACKAGES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "numpy", "typing", "argparse",
                  "taming", "main")
TARGETS = {"taming.models.vqgan.VQModel": "vq", "taming.models.vqgan.GumbelVQ": "gumbel"}


class _Inert:
    """Stands in for a class named by a checkpoint: keeps its arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):  # pickled functions (REDUCE on a function name)
        return _Inert(*args, **kwargs)


def _inert(name: str):
    return type(name.rsplit(".", 1)[-1], (_Inert,), {"__module__": "dalle_ar.convert_taming.inert",
                                                     "__qualname__": name})


def load_lightning_checkpoint(path) -> dict:
    """A Lightning checkpoint (or a bare state dict) -> its state dict, without running code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # noqa: BLE001  (not a zip / not a pickle: many error types)
        raise ValueError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    refused = [g for g in unsafe if g.split(".", 1)[0] not in INERT_PACKAGES]
    if refused:
        raise ValueError(f"{path}: refusing to load: the checkpoint names {refused[:5]}, which are not "
                         f"weights or Lightning bookkeeping (an untrusted file may run code through them)")
    try:
        with torch.serialization.safe_globals([(_inert(g), g) for g in unsafe]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a checkpoint torch can read safely: {str(e)[:300]}") from None
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: no state_dict of tensors in the checkpoint "
                         f"(top-level keys: {sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__})")
    return sd


def config_from_yaml(path, image_size=None):
    """taming's model YAML -> VQGANConfig (target VQModel or GumbelVQ)."""
    import yaml

    from .vqgan import VQGANConfig

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {str(e)[:300]}") from None
    model = (doc or {}).get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or "params" not in model:
        raise ValueError(f"{path}: no model.params: not a taming-transformers model config")
    target, p = model.get("target"), model["params"]
    if target not in TARGETS:
        raise ValueError(f"{path}: model.target {target!r} is not one of {sorted(TARGETS)}")
    dd = p.get("ddconfig") or {}
    need = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution", "in_channels", "out_ch")
    missing = [k for k in need if k not in dd] + [k for k in ("embed_dim", "n_embed") if k not in p]
    if missing:
        raise ValueError(f"{path}: model.params is missing {missing}")
    if dd.get("double_z", False):
        raise ValueError(f"{path}: ddconfig.double_z is true: that is a KL autoencoder, not a VQGAN")
    if p.get("remap"):
        raise ValueError(f"{path}: index remapping (params.remap) is not supported")
    quantizer = TARGETS[target]
    kw = dict(image_size=int(image_size or dd["resolution"]), in_channels=dd["in_channels"], out_ch=dd["out_ch"],
              ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
              attn_resolutions=tuple(dd["attn_resolutions"]), dropout=float(dd.get("dropout", 0.0)),
              z_channels=dd["z_channels"], embed_dim=p["embed_dim"], n_embed=p["n_embed"], quantizer=quantizer)
    if quantizer == "gumbel":
        kw["gumbel_kl_weight"] = float(p.get("kl_weight", 1e-8))
    if "resamp_with_conv" in dd:
        kw["resamp_with_conv"] = bool(dd["resamp_with_conv"])
    try:
        return VQGANConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def convert_taming_state_dict(sd: dict, config):
    """taming VQModel / GumbelVQ state dict -> VQGAN state dict (fp32, `loss.*` dropped), checked against `config`."""
    from .vqgan import VQGAN

    out = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()
           if not k.startswith("loss.") and v.is_floating_point()}
    VQGAN.check_weights(out, config, "the checkpoint's weights", "the YAML config")
    return out


def convert_taming_vqgan(ckpt, config, out, image_size=None) -> Path:
    """last.ckpt + model.yaml -> `out`/config.json + model.safetensors (VQGAN.from_pretrained loads it)."""
    from . import io

    cfg = config_from_yaml(config, image_size)
    sd = convert_taming_state_dict(load_lightning_checkpoint(ckpt), cfg)
    return io.save_pretrained(out, cfg, sd)

