"""`dalle-ar convert openai-dvae`: OpenAI's released dVAE (encoder.pkl + decoder.pkl) -> a dVAE directory.
`dalle-ar convert taming-vqgan`: a taming-transformers VQGAN (last.ckpt + model.yaml) -> a VQGAN directory."""

from __future__ import annotations

from dalle_ar import convert


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert third-party weights into dalle-ar directories")
    sub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    o = sub.add_parser("openai-dvae", help="OpenAI's released dVAE (dall_e encoder.pkl + decoder.pkl)",
                       description=f"{__doc__.split(': ', 1)[1]} {convert.INSTALL_HINT[0].upper()}{convert.INSTALL_HINT[1:]}")
    o.add_argument("--encoder", required=True, help="OpenAI's encoder.pkl")
    o.add_argument("--decoder", required=True, help="OpenAI's decoder.pkl")
    o.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    o.add_argument("--image-size", type=int, default=convert.OPENAI_IMAGE_SIZE,
                   help=f"image size the dVAE expects (default {convert.OPENAI_IMAGE_SIZE}, as trained by OpenAI)")
    o.set_defaults(func=_openai_dvae)
    t = sub.add_parser("taming-vqgan", help="a taming-transformers VQGAN (VQModel or GumbelVQ: last.ckpt + model.yaml)",
                       description="A taming-transformers VQGAN checkpoint (VQModel or GumbelVQ) -> a VQGAN directory "
                                   "(config.json + model.safetensors); read without running code from the file, "
                                   "loss.* dropped, the YAML checked against the tensor shapes.")
    t.add_argument("--ckpt", required=True, help="the Lightning checkpoint (e.g. last.ckpt)")
    t.add_argument("--config", required=True, help="its model YAML (e.g. model.yaml / *-project.yaml)")
    t.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    t.add_argument("--image-size", type=int, default=None,
                   help="image size the tokenizer expects (default: the YAML's ddconfig.resolution)")
    t.set_defaults(func=_taming_vqgan)


def _openai_dvae(args) -> int:
    out = convert.convert_openai_dvae(args.encoder, args.decoder, args.out, image_size=args.image_size)
    print(f"wrote {out}")
    return 0


def _taming_vqgan(args) -> int:
    from dalle_ar.convert_taming import convert_taming_vqgan  # torch: only when this command runs

    out = convert_taming_vqgan(args.ckpt, args.config, args.out, image_size=args.image_size)
    print(f"wrote {out}")
    return 0
