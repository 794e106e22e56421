"""Models that load anywhere: transformers directories with their own modeling code (`trust_remote_code`).

`configuration_distill.py` and `modeling_distill.py` are self-contained templates copied into each export;
`export` chooses between a transformers family and them (`export_anywhere`) and writes the directory.
"""

from distill.hf_remote.export import FAMILY, REMOTE, export_anywhere, export_remote, hf_tokenizer

__all__ = ["FAMILY", "REMOTE", "export_anywhere", "export_remote", "hf_tokenizer"]
