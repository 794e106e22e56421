"""Hydra app: run the teacher once over the training split and store its targets for offline KD.

    python -m distill.teacher_targets teacher.path=outputs/.../export kd.topk=32

It takes the distill app's configuration (conf/teacher_targets.yaml composes the same groups), so the targets
it writes are the ones a `python -m distill.distill ... kd.teacher_targets=offline` run with the same data,
teacher, `kd.topk`, `kd.temperature` and `kd.targets_dtype` finds in the cache (distill/kd/targets.py); a
distill run that finds none computes them itself, the same way.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from distill.config import register_configs
from distill.errors import exit_on_config_error
from distill.hydra_errors import run_app
from distill.resolve import resolve

register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="teacher_targets")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    spec = resolve(cfg, "teacher_targets")  # every check, before the data libraries load
    from distill.kd.targets import ensure_targets, read_meta
    from distill.stage import prepare_data

    assert spec.teacher is not None and spec.kd is not None
    dm = prepare_data(spec)
    spec.teacher.check_vocab(dm.tokenizer)
    k = spec.kd.cfg
    _, path, reused = ensure_targets(dm, spec.teacher.as_gpt, spec.teacher.identity().sha256, k=k.topk,
                                     temperature=k.temperature, batch_size=dm.cfg.batch_size,
                                     value_dtype=k.targets_dtype, router_topk=k.router_topk)
    meta = read_meta(path) or {}
    print(f"[teacher_targets] {'reused' if reused else 'computed'} {meta.get('rows')} blocks, {meta.get('tokens'):,} "
          f"tokens, k={meta.get('k')}, T={meta.get('temperature')}: {meta.get('bytes_per_token', 0):.1f} bytes/token, "
          f"teacher pass {meta.get('tokens_per_s', 0):,.0f} tokens/s -> {path}", flush=True)


if __name__ == "__main__":
    run_app(main, "teacher_targets")
