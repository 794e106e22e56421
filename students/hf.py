"""Command line: a distilled student's export directory -> a transformers `save_pretrained` directory.

    python -m students.hf <export dir of a distilled student> <output dir>   # -> save_pretrained dir

The conversion itself (configs, weights, export) lives in `distill.interop`, shared with teachers/. It
streams: the export is read one tensor at a time and each is written before the next is read.
"""

from __future__ import annotations

import argparse

from distill.interop import export_hf_from_native


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", help="an export directory written by distill.distill / distill.pretrain")
    parser.add_argument("out_dir", help="where to write the save_pretrained directory")
    args = parser.parse_args(argv)
    from distill.errors import exit_on_config_error

    out = exit_on_config_error(export_hf_from_native)(args.export_dir, args.out_dir)
    print(f"[students.hf] {args.export_dir} -> {out} (loads with transformers.AutoModelForCausalLM)")


if __name__ == "__main__":
    main()
