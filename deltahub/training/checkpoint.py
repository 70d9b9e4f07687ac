"""The best-so-far training checkpoint, written without pickle, and resuming from it.

transformers' own checkpoints hold the optimizer, scheduler and RNG states as pickles
(`torch.save`), which deltahub never writes or loads. This checkpoint holds the same
state as safetensors and JSON, and `CheckpointTrainer` reads it back through Trainer's
own resume path (its epoch / step bookkeeping, data order and batch skipping):

    trainable.safetensors     the parameters being trained (by `TaskModel` name)
    optimizer.safetensors     the optimizer's tensor state; optimizer.json the rest
    scheduler.json            the learning-rate scheduler's state
    rng.safetensors, rng.json torch's and Python's random states
    trainer_state.json        Trainer's state (global step, epoch, logs): its own JSON
    deltahub_checkpoint.json  what was being trained (`identity`) and the early-stopping state

It is written when an evaluation improves on the best so far (every epoch without
evaluation data), into a sibling directory renamed over the old one, so a Ctrl-C
mid-write keeps the previous checkpoint whole. Where: `<output_dir>/checkpoint` when
training writes an output directory, else `$DELTAHUB_HOME/checkpoints/<name>` (not under
the home's `tmp/`, which `gc` sweeps).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltahub.errors import InvalidConfig, NotFound

MARKER = "deltahub_checkpoint.json"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; `checkpoint` is the directory kept (None when no epoch finished)."""

    def __init__(self, checkpoint: Path | None) -> None:
        super().__init__()
        self.checkpoint = checkpoint


def checkpoint_dir(name: str, output_dir: str | Path | None = None, home: str | Path | None = None) -> Path:
    """Where training `name` keeps its checkpoint."""
    if output_dir is not None:
        return Path(output_dir) / "checkpoint"
    from deltahub.settings import default_home

    return Path(home or default_home()) / "checkpoints" / name.replace("/", "--")


def _json(obj: Any) -> Any:
    """JSON-safe copy (tuples to lists; tensors must have been taken out)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


class Checkpoint:
    """One checkpoint directory: `save` the state, `load_*` it back, `check` what it is of."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return (self.path / MARKER).is_file()

    def info(self) -> dict[str, Any]:
        if not self.exists():
            raise NotFound(f"no checkpoint at {self.path}; train without --resume to start one")
        return dict(json.loads((self.path / MARKER).read_text()))

    def check(self, identity: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's info, if it is of the same training as `identity` describes."""
        info = self.info()
        saved = info.get("identity", {})
        for key in sorted(set(saved) | set(identity)):
            if saved.get(key) != _json(identity.get(key)):
                raise InvalidConfig(
                    f"the checkpoint at {self.path} is of another training ({key}: {saved.get(key)!r} there, "
                    f"{_json(identity.get(key))!r} now); resume with the same options, or remove it"
                )
        return info

    # ------------------------------------------------------------------ save

    def save(
        self,
        params: dict[str, nn.Parameter],
        optimizer: Any,
        scheduler: Any,
        state: Any,
        info: dict[str, Any],
    ) -> None:
        from safetensors.torch import save_file

        tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(
            {k: p.detach().cpu().contiguous() for k, p in params.items()}, str(tmp / "trainable.safetensors")
        )
        opt = optimizer.state_dict()
        tensors: dict[str, Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for i, entry in opt["state"].items():
            for k, v in entry.items():
                if isinstance(v, Tensor):
                    tensors[f"{i}.{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(i), {})[k] = v
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(
            json.dumps({"param_groups": _json(opt["param_groups"]), "scalars": _json(scalars)})
        )
        (tmp / "scheduler.json").write_text(json.dumps(_json(scheduler.state_dict())))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "rng.json").write_text(json.dumps(_json(random.getstate())))
        state.save_to_json(str(tmp / "trainer_state.json"))
        (tmp / MARKER).write_text(json.dumps(_json(info), indent=2, sort_keys=True) + "\n")
        old = self.path.with_name(self.path.name + f".old-{os.getpid()}")
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def load_weights(self, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        saved = load_file(str(self.path / "trainable.safetensors"))
        if set(saved) != set(params):
            odd = sorted(set(saved) ^ set(params))[0]
            raise InvalidConfig(f"the checkpoint at {self.path} does not fit this model ({odd!r}); remove it")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])
        return saved

    def load_optimizer(self, optimizer: Any, scheduler: Any) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(self.path / "optimizer.safetensors"))
        meta = json.loads((self.path / "optimizer.json").read_text())
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            i, k = key.split(".", 1)
            state.setdefault(int(i), {})[k] = value
        for i, entry in meta["scalars"].items():
            state.setdefault(int(i), {}).update(entry)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        scheduler.load_state_dict(json.loads((self.path / "scheduler.json").read_text()))

    def load_rng(self) -> None:
        from safetensors.torch import load_file

        rng = load_file(str(self.path / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        version, internal, gauss = json.loads((self.path / "rng.json").read_text())
        random.setstate((version, tuple(internal), gauss))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def checkpoint_trainer() -> type:
    """transformers' `Trainer` reading our checkpoint format on `train(resume_from_checkpoint=...)`."""
    from transformers import Trainer

    class CheckpointTrainer(Trainer):  # type: ignore[misc]
        checkpoint: Checkpoint | None = None
        trainable: dict[str, nn.Parameter] = {}  # noqa: RUF012 (set per instance)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            self.checkpoint.load_weights(self.trainable)  # type: ignore[union-attr]

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            if checkpoint is not None:
                self.checkpoint.load_optimizer(self.optimizer, self.lr_scheduler)  # type: ignore[union-attr]

        def _load_rng_state(self, checkpoint: str | None) -> None:
            if checkpoint is not None:
                self.checkpoint.load_rng()  # type: ignore[union-attr]

    return CheckpointTrainer
