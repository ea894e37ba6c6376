"""`--metap true` for the recipes: MetaP's per-group learning rates in any `Trainer` (TRL's included).

The base shape travels in the model config (`metap_base_*`, see `modeling_llama4/metap.py`): a model pretrained
with MetaP carries it, and the flags below set or override it (for a from-scratch model they must be in the
config before it is built, since they set the init scales). The trainer side is a mix-in over `create_optimizer`,
so the optimizer class and its other settings are whatever `TrainingArguments` / TRL choose; the groups are built
from the model the trainer holds when it creates the optimizer, by parameter-name tails that survive DDP, FSDP2
and torch.compile wrapping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from eval.loading import InputError
from modeling_llama4.metap import BASE_FIELDS, OPTIONAL_BASE_FIELDS, _find_config, metap_enabled, metap_param_groups


@dataclass
class MetaPArguments:
    metap: bool = field(
        default=False,
        metadata={"help": "Train with MetaP per-group learning rates (and, from scratch, init scales)."},
    )
    metap_base_hidden_size: int | None = field(default=None, metadata={"help": "MetaP base hidden size."})
    metap_base_num_hidden_layers: int | None = field(default=None, metadata={"help": "MetaP base depth."})
    metap_base_intermediate_size: int | None = field(
        default=None, metadata={"help": "MetaP base expert (and shared-expert) width."}
    )
    metap_base_num_local_experts: int | None = field(default=None, metadata={"help": "MetaP base expert count."})
    metap_base_intermediate_size_mlp: int | None = field(
        default=None, metadata={"help": "MetaP base dense-MLP width (default: scaled like the expert width)."}
    )


def with_metap_overrides(args) -> None:
    """Put the `--metap_base_*` flags into `args.model_config_overrides`, so the model is built (or loaded) with
    them in its config. `--metap false` with base fields given is refused: the init would change silently."""
    given = {
        name: getattr(args, name) for name in BASE_FIELDS + OPTIONAL_BASE_FIELDS if getattr(args, name) is not None
    }
    if not given:
        return
    if not args.metap:
        raise InputError(f"{', '.join(given)} given without --metap true: add --metap true, or drop them")
    overrides = args.model_config_overrides or {}
    if isinstance(overrides, str):
        overrides = json.loads(overrides)
    args.model_config_overrides = {**overrides, **given}


class MetaPTrainerMixin:
    """`create_optimizer` with MetaP parameter groups (lr, weight decay, eps per group) and the optimizer class
    and kwargs the trainer would have used."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            if not metap_enabled(_find_config(opt_model)):
                raise InputError(
                    "--metap true but the model config has no MetaP base shape: give --metap_base_hidden_size, "
                    "--metap_base_num_hidden_layers, --metap_base_intermediate_size and --metap_base_num_local_experts "
                    "(or train a model pretrained with them)"
                )
            groups = metap_param_groups(
                opt_model, self.args.learning_rate, weight_decay=self.args.weight_decay, eps=self.args.adam_epsilon
            )
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            # The per-group values win over the trainer's defaults for the same keys.
            kwargs = {k: v for k, v in kwargs.items() if k not in ("lr", "weight_decay", "eps", "params", "model")}
            self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer


def metap_trainer(trainer_cls: type, enabled: bool = True) -> type:
    """`trainer_cls` with MetaP's optimizer groups mixed in (or `trainer_cls` itself when not enabled)."""
    if not enabled:
        return trainer_cls
    return type(f"MetaP{trainer_cls.__name__}", (MetaPTrainerMixin, trainer_cls), {})
