"""`dalle-ar tokenizer train`: train the caption BPE on shards or text files."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="text tokenizer (BPE) tools")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    t = sub.add_parser("train", help="train a BPE on captions (WebDataset shards or text files)",
                       description="Train a lower-cased NFKC BPE on the `txt` captions of WebDataset shards "
                                   "(one caption per line) or on plain text files (one caption per line).")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", nargs="+", metavar="PATTERN", help="tar shards or brace patterns")
    src.add_argument("--files", nargs="+", metavar="FILE", help="text files, one caption per line")
    t.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, specials included")
    t.add_argument("--out", required=True, help="output directory (tokenizer.json + tokenizer_config.json)")
    t.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge (default 2)")
    t.add_argument("--bpe-dropout", type=float, default=None,
                   help="BPE dropout used when training the prior with data.bpe_dropout=true (default 0.1)")
    t.set_defaults(func=_train)


def _train(args) -> int:
    from dalle_ar.tokenizer import TextTokenizer, read_captions

    stats: dict = {}
    tok = TextTokenizer.train(read_captions(args.shards or args.files, stats), vocab_size=args.vocab_size,
                              min_frequency=args.min_frequency, dropout=args.bpe_dropout)
    tok.save_pretrained(args.out)
    skipped = f", skipped {stats}" if any(stats.values()) else ""
    print(f"tokenizer: vocab {tok.vocab_size} (pad id {tok.pad_id}) -> {args.out}{skipped}")
    return 0
